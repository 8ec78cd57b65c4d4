"""Run time and session memory of onnxvq's models against fp32 and onnxruntime's quantizers.

For each model (default: a BERT-shaped text encoder built with ``samples/text_encoder.py``'s
``build_text_encoder`` at vocab 8192, dim 1024, 16 heads of 64, depth 4, MLP 4096: 50.3M of its
59.3M weights in MatMul, 237 MB; ``--models`` adds ONNX files), four files are written to a
temporary folder (``--out`` keeps them):

* ``fp32``: the model;
* ``ort int8 dynamic``: ``onnxruntime.quantization.quantize_dynamic`` (QInt8 weights);
* ``ort int4 MatMulNBits``: ``MatMulNBitsQuantizer`` (4 bits, block 32, symmetric) on the MatMuls
  with a constant 2-D weight ("n/a" on a model without one);
* ``onnxvq pq k256 d8``: ``onnxvq.compress(model, method="pq", k=256, d=8)``,

(the last two through ``benchmarks/real_models/baselines.py``, as the real-model suite makes
them), and each is measured in onnxruntime (CPU provider). The onnxvq file is measured three
ways: ``folded bodies`` (a default session: onnxruntime constant-folds the ops' decode at session
creation, so it holds fp32 weights), ``unfolded bodies`` (``disabled_optimizers=["ConstantFolding"]``:
the decode runs in every run) and ``native kernels`` (the library of ``onnxvq native build``;
a "not built" row without it).

Each measurement is a fresh process (``multiprocessing``, spawn) that is handed its inputs, lowers
its high-water mark to its current size (``/proc/self/clear_refs``, so that the imports' peak does
not count), reads its resident size and high-water mark (``VmRSS`` and ``VmHWM`` of
``/proc/self/status``; ``getrusage``'s ``ru_maxrss`` is recorded in the JSON too, but in a spawned
child it also holds the parent's size at the fork, which no reset lowers), creates the session
with the first ``--threads`` value (``onnxvq.model_run.open_session``, which gives the heap freed
while creating it back to the system), reads its resident size again, runs the smallest batch once
and reads them again; then times ``--runs`` runs after one warm-up for each batch
(``--batches``) and thread count. The session's memory is reported over that of an empty
baseline (the same steps on a one-``Identity`` model, which is onnxruntime's own cost):
``session`` = resident size right after creation minus before (the weights and the graph, no
activations yet; shown with its ratio to the file size), ``peak`` = high-water mark after the
run minus the resident size before the session, ``resident`` = resident size after the run
minus before.

Inputs are generated from the model's input specs as ``onnxvq run`` generates them
(:func:`onnxvq.model_run.input_feed`: floats standard normal, integers 0, the first dimension the
batch, any other dynamic dimension 64: the text encoder reads 64 tokens per sequence). Ratios are
against the fp32 row of the same run: file ratio = fp32 bytes / file bytes; memory and latency
columns show ``value (x fp32)``.

Run from the repository root (the default model takes a few minutes to compress and about 15 to
measure on 2 cores; ``--quick`` uses a 2-block dim-256 encoder and 3 runs, under a minute)::

    python benchmarks/runtime.py [--quick] [--models a.onnx ...] [--threads 1,2] [--batches 1,32] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "real_models"))
sys.path.insert(0, os.path.join(ROOT, "samples"))
sys.path.insert(0, ROOT)

# The default model's builder arguments (samples/text_encoder.py), full and --quick.
DEFAULT_MODEL = dict(vocab=8192, dim=1024, heads=16, depth=4, mlp=4096)
QUICK_MODEL = dict(vocab=1000, dim=256, heads=4, depth=2, mlp=1024)
K, D = 256, 8


@dataclasses.dataclass(frozen=True)
class Mode:
    """One row: which file, and how its session is made."""

    label: str
    file: str  # key of the written files
    native: bool | None = False
    disabled_optimizers: tuple[str, ...] = ()


MODES = [
    Mode("fp32", "fp32"),
    Mode("ort int8 dynamic", "int8"),
    Mode("ort int4 MatMulNBits", "int4"),
    Mode(f"onnxvq pq k{K} d{D}, folded bodies", "onnxvq"),
    Mode(f"onnxvq pq k{K} d{D}, unfolded bodies", "onnxvq", disabled_optimizers=("ConstantFolding",)),
    Mode(f"onnxvq pq k{K} d{D}, native kernels", "onnxvq", native=True),
]


# --- the child process --------------------------------------------------------------------------

def _status_kib(key: str) -> int:
    """A size of ``/proc/self/status`` (``VmRSS``: resident now, ``VmHWM``: its high-water mark)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _reset_peak() -> bool:
    """Lower this process's high-water mark (``VmHWM``) to its current resident size (Linux 4.0+),
    so that the peak read after the session is the session's own and not that of the imports
    before it. False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(path: str, native: bool | None, disabled: tuple[str, ...], feeds: dict[int, dict],
            threads: list[int], runs: int) -> dict:
    """In a fresh process: memory of one session with ``threads[0]`` threads after one run of the
    smallest batch, then ``{"b{batch}_t{threads}": [seconds of each run]}`` (``runs`` after one
    warm-up; ``runs=0``: memory only)."""
    import resource

    # everything a session needs is imported before the first reading: imports are not its cost
    import onnxruntime  # noqa: F401

    import onnxvq.ops.native_library  # noqa: F401  (open_session imports it lazily)
    from onnxvq.model_run import open_session, timed_runs

    first = min(feeds)
    peak_reset = _reset_peak()
    rss_before, hwm_before = _status_kib("VmRSS"), _status_kib("VmHWM")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    session, library = open_session(path, native=native, threads=threads[0], disabled_optimizers=disabled)
    rss_created = _status_kib("VmRSS")  # the session alone: its weights and graph, no activations yet
    session.run(None, feeds[first])
    rss_after, hwm_after = _status_kib("VmRSS"), _status_kib("VmHWM")
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss also holds the parent's resident size when it forked this process (the kernel
    # carries the pre-exec high-water mark over exec), which clear_refs does not lower; VmHWM is
    # this process's own. Without the reset, ru_maxrss is the best there is.
    peak_after = hwm_after if peak_reset else maxrss_after
    latency = {}
    for i, count in enumerate(threads if runs else []):
        if i:
            del session
            session, _ = open_session(path, native=native, threads=count, disabled_optimizers=disabled)
        for batch, feed in sorted(feeds.items()):
            latency[f"b{batch}_t{count}"] = timed_runs(session, feed, runs)[1].seconds
    return {"library": library, "latency": latency, "rss_before_kib": rss_before, "rss_created_kib": rss_created,
            "rss_after_kib": rss_after,
            "peak_after_kib": peak_after, "peak_reset": peak_reset, "vmhwm_kib": [hwm_before, hwm_after],
            "ru_maxrss_kib": [maxrss_before, maxrss_after]}


def in_fresh_process(*args) -> dict:
    """:func:`measure` in a new spawned process (no earlier session, allocation or warm cache)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure, *args).result()


# --- the parent ----------------------------------------------------------------------------------

def build_default(out: str, quick: bool) -> str:
    import onnx

    from text_encoder import build_text_encoder

    sizes = QUICK_MODEL if quick else DEFAULT_MODEL
    path = os.path.join(out, "text_encoder_" + "_".join(f"{k}{v}" for k, v in sizes.items()) + ".onnx")
    onnx.save(build_text_encoder(**sizes, seed=0), path)
    return path


def write_variants(model_path: str, out: str) -> tuple[dict[str, str], dict[str, str]]:
    """The files of every variant, and a note per variant (how it was made, or why it is n/a)."""
    import baselines
    import onnxvq

    stem = os.path.splitext(os.path.basename(model_path))[0]
    files, notes = {"fp32": model_path}, {"fp32": ""}
    for key, name in (("int8", "ort int8 dynamic"), ("int4", "ort int4 MatMulNBits")):
        path = os.path.join(out, f"{stem}.{key}.onnx")
        began = time.perf_counter()
        try:
            notes[key] = baselines.run(name, model_path, path, [])
            files[key] = path
        except baselines.NotApplicable as e:
            notes[key] = f"n/a: {e}"
        except Exception as e:  # noqa: BLE001 (a quantizer failing on a model is a result too)
            notes[key] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        _log(f"  {name}: {time.perf_counter() - began:.1f} s; {notes[key]}")
    path = os.path.join(out, f"{stem}.vq.onnx")
    began = time.perf_counter()
    result = onnxvq.compress(model_path, method="pq", k=K, d=D)
    result.save(path)
    files["onnxvq"] = path
    layers = len(result.summary.compressed_layers)
    notes["onnxvq"] = f"{layers} layers compressed in {time.perf_counter() - began:.0f} s"
    _log(f"  onnxvq: {notes['onnxvq']}")
    return files, notes


def empty_model(out: str) -> str:
    """A one-``Identity`` model, whose session is onnxruntime's own memory cost."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "empty",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = os.path.join(out, "empty.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def model_feeds(model_path: str, batches: list[int], shapes: dict[str, tuple[int, ...]] | None = None
                ) -> dict[int, dict[str, np.ndarray]]:
    """Inputs by batch: generated from the specs, except that an input named in ``shapes``
    (``--shape NAME=D0,D1,...``, the first dimension replaced by the batch) is drawn standard
    normal at that shape (an image detector at the size it reads, not 64 x 64)."""
    from onnxvq.model_io import load_model
    from onnxvq.model_run import input_feed

    model = load_model(model_path)
    feeds = {b: input_feed(model, batch=b, where=model_path).arrays for b in batches}
    rng = np.random.default_rng(0)
    for b, feed in feeds.items():
        for name, shape in (shapes or {}).items():
            if name in feed:
                feed[name] = rng.standard_normal((b, *shape[1:])).astype(feed[name].dtype)
    return feeds


def _named_shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, _, dims = text.partition("=")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape wants NAME=D0,D1,... (got {text!r})") from None
    if not name or not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--shape wants NAME=D0,D1,... with positive dimensions (got {text!r})")
    return name, shape


def memory_over(record: dict, baseline: dict) -> tuple[float, float, float]:
    """(created, peak, resident) MiB of the session over the empty baseline's: resident right
    after creation (weights and graph), peak and resident after the first run."""
    def over(key: str) -> float:
        return ((record[key] - record["rss_before_kib"]) - (baseline[key] - baseline["rss_before_kib"])) / 1024

    return over("rss_created_kib"), over("peak_after_kib"), over("rss_after_kib")


def benchmark_model(model_path: str, out: str, args, baseline: dict) -> tuple[list[dict], dict]:
    """The rows of one model, and the feeds they were measured on (by batch)."""
    from onnxvq.ops import native_library_path

    _log(f"{model_path}: writing the variants")
    files, notes = write_variants(model_path, out)
    feeds = model_feeds(model_path, args.batches, args.shape)
    library = native_library_path()
    rows = []
    for mode in MODES:
        row = {"model": os.path.basename(model_path), "variant": mode.label, "note": notes.get(mode.file, "")}
        rows.append(row)
        if mode.file not in files:
            continue
        row["file_bytes"] = os.path.getsize(files[mode.file])
        if mode.native and library is None:
            row["note"] = "not built (onnxvq native build)"
            continue
        began = time.perf_counter()
        try:
            record = in_fresh_process(files[mode.file], mode.native, mode.disabled_optimizers, feeds,
                                      args.threads, args.runs)
        except Exception as e:  # noqa: BLE001 (a session onnxruntime refuses is a row, not the end)
            row["note"] = f"failed: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}"
            _log(f"  {mode.label}: {row['note']}")
            continue
        row["memory_mib"] = dict(zip(("created", "peak", "resident"), memory_over(record, baseline)))
        row["latency_s"] = record["latency"]
        if record["library"]:
            row["note"] = f"library {record['library']}"
        _log(f"  {mode.label}: measured in {time.perf_counter() - began:.0f} s")
    return rows, feeds


def _num(value: float) -> str:
    """Three significant digits, and no exponent or decimals from 100 up."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _median(seconds: list[float]) -> float:
    return float(np.median(seconds))


def table(rows: list[dict], columns: list[str]) -> str:
    """The markdown table of one model's rows, ratios against its fp32 row."""
    fp32 = next((r for r in rows if r["variant"] == "fp32" and "latency_s" in r), None)
    lines = ["| variant | file MB | file ratio | session MiB (x file) | peak MiB | resident MiB | "
             + " | ".join(f"{c.replace('_', ' ')} ms" for c in columns) + " | note |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * len(columns) + "---|"]

    def relative(value: float, reference: float | None) -> str:
        return f" ({value / reference:.2f}x)" if reference else ""

    for r in rows:
        cells = [r["variant"]]
        size = r.get("file_bytes")
        cells += [_num(size / 1e6) if size else "-",
                  f"{fp32['file_bytes'] / size:.1f}x" if size and fp32 else "-"]
        memory = r.get("memory_mib")
        cells.append(f"{_num(memory['created'])} ({memory['created'] * 2**20 / size:.2f}x)" if memory and size else "-")
        for key in ("peak", "resident"):
            ref = fp32["memory_mib"][key] if fp32 and fp32["memory_mib"][key] > 0 else None
            cells.append(f"{_num(memory[key])}{relative(memory[key], ref)}" if memory else "-")
        for c in columns:
            seconds = r.get("latency_s", {}).get(c)
            ref = _median(fp32["latency_s"][c]) if fp32 and c in fp32["latency_s"] else None
            cells.append(f"{_num(_median(seconds) * 1e3)}{relative(_median(seconds), ref)}" if seconds else "-")
        cells.append(r.get("note", ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 (not a checkout)
        return "unknown"


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[], metavar="MODEL.onnx", help="more models to measure")
    parser.add_argument("--no-default-model", action="store_true", help="measure only --models")
    parser.add_argument("--quick", action="store_true", help="a small default model and 3 runs (a smoke run)")
    parser.add_argument("--threads", type=_int_list, default=[1, 2], help="intra-op thread counts (default 1,2)")
    parser.add_argument("--batches", type=_int_list, default=[1, 32], help="batch sizes (default 1,32)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs after one warm-up (default 5, --quick 3)")
    parser.add_argument("--out", help="folder for the written models (default: temporary, removed)")
    parser.add_argument("--json", dest="json_path", help="write every measurement as JSON here")
    parser.add_argument("--shape", action="append", default=[], metavar="NAME=D0,D1,...", type=_named_shape,
                        help="the shape of input NAME (its first dimension becomes the batch), for --models "
                             "whose dynamic dimensions would otherwise be 64 (repeatable)")
    args = parser.parse_args(argv)
    args.runs = args.runs or (3 if args.quick else 5)
    args.shape = dict(args.shape)
    logging.basicConfig(level=logging.ERROR)  # the quantizers' advice and onnxvq's progress stay quiet

    import onnxruntime as ort

    from onnxvq.ops import native_library_path

    out = args.out or tempfile.mkdtemp(prefix="onnxvq-runtime-")
    os.makedirs(out, exist_ok=True)
    try:
        models = ([] if args.no_default_model else [build_default(out, args.quick)]) + args.models
        if not models:
            parser.error("no model: drop --no-default-model or give --models")
        baseline = in_fresh_process(empty_model(out), False, (), {1: {"x": np.zeros(1, np.float32)}},
                                    args.threads[:1], 0)
        columns = [f"b{b}_t{t}" for t in args.threads for b in args.batches]
        header = (f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
                  f"commit {_commit()}, {args.runs} runs after 1 warm-up per batch and thread count; "
                  f"native library: {native_library_path() or 'not built'}; memory over an empty session "
                  f"(which itself takes {(baseline['peak_after_kib'] - baseline['rss_before_kib']) / 1024:.0f} MiB "
                  f"peak, {(baseline['rss_after_kib'] - baseline['rss_before_kib']) / 1024:.0f} MiB resident); "
                  "columns bB_tT = batch B, T threads")
        results = []
        for model_path in models:
            rows, feeds = benchmark_model(model_path, out, args, baseline)
            results.extend(rows)
            shapes = ", ".join(f"{name} {tuple(a.shape)}" for _, feed in sorted(feeds.items()) for name, a in feed.items())
            print(f"\n### {os.path.basename(model_path)}\n\n{header}; inputs: {shapes}\n")
            print(table(rows, columns))
            sys.stdout.flush()
        if args.json_path:
            with open(args.json_path, "w") as f:
                json.dump({"header": header, "baseline": baseline, "rows": results}, f, indent=1)
            _log(f"wrote {args.json_path}")
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
