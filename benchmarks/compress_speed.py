"""Benchmark: onnxvq's PQ compression against scikit-learn k-means on the same subvectors.

What is measured
----------------
A transformer-like ONNX model is built in code (fixed seed, nothing downloaded) and saved to
``benchmarks/out/``. The default has 2 blocks of d_model=768 (Q, K, V, O: 768x768; FFN: 768x3072
and 3072x768; all MatMul) and a tied-embedding-like output Gemm of 8192x768 (transB=1): 13 layers,
20,447,232 weights. The weights are random but not iid Gaussian: Student-t entries (heavy tail),
per-output-channel and per-input-feature scales (a few outlier input features, as trained
transformers have) and a low-rank component, so k-means sees correlated, anisotropic subvectors.

Each tool then runs in its own subprocess (so that its peak memory is its own):

* ``baseline``: imports onnxvq, loads the model as onnxvq does, materializes each weight in turn;
  ``baseline_sklearn``: the same plus ``import sklearn.cluster``. They only set the memory floor.
* ``onnxvq``: ``onnxvq.compress(path, method="pq", k=K, d=D)`` end to end (load, k-means,
  packing, graph rewrite, per-layer SQNR); the model is not saved. The k-means calls are also
  timed on their own (by wrapping ``onnxvq.methods.pq.kmeans``, no onnxvq file is changed).
* ``kmeans``: scikit-learn ``KMeans(n_clusters=min(K, n), n_init=1, random_state=0)``, otherwise
  default settings (what a user would write), fitted per layer on exactly the subvectors onnxvq
  clusters (``onnxvq.layout.WeightLayout.to_subvectors``); the reconstruction
  ``codebook[labels]`` is decoded back through ``WeightLayout.from_subvectors``.
* ``minibatch``: scikit-learn ``MiniBatchKMeans(n_clusters=min(K, n), random_state=0)``, otherwise
  default, the same way.

Reported per tool: total wall time (load + cluster + decode + SQNR, everything the worker does
after its imports), the clustering time alone, the peak RSS, and the weight SQNR
``10 log10(sum W^2 / sum (W - W_hat)^2)`` per layer and its mean over layers. Ratios
(scikit-learn / onnxvq) of time and memory come from the same run. onnxvq's SQNR is its
summary's, i.e. with the codebook as stored (float16 by default); the SQNR of its fp32 k-means
result is printed too (scikit-learn's centers are fp32; the difference is ~0.001 dB here).

Peak RSS is the ``VmHWM`` of the worker (Linux ``/proc/self/status``; ``ru_maxrss`` elsewhere).
Not ``ru_maxrss``: on Linux it survives ``exec`` and so would include the RSS of the parent at
spawn time. The parent also imports only the standard library, to keep that noise small
elsewhere. Two memory numbers are printed: the absolute peak, and the increment over the peak
of the baseline worker with the same imports (the memory of the work itself, without the
~90 MiB that importing scikit-learn and scipy costs). The memory ratio uses increments. A third
number, ``fit incr.``, isolates the clustering call (onnxvq's ``kmeans()``, scikit-learn's
``fit()``): how far RSS rose above its level at the call's start, the worst layer (Linux only:
the peak is reset through ``/proc/self/clear_refs`` before each call). It matters because the
rest of the increment is mostly the SQNR computation (``onnxvq.summary.sqnr_db``, used by every
worker so the numbers are identical, holds float64 copies: about 6x the layer's fp32 size).

The time cap
------------
scikit-learn's full ``KMeans`` seeds k-means++ on every point and runs up to 300 Lloyd
iterations; on the default 20M-weight model it takes several minutes on 2 cores (the whole
benchmark stays under ~15 minutes), so by default it runs on every layer. With
``--sklearn-subset per-shape`` both scikit-learn baselines run only on the first layer of each
distinct weight shape, and their clustering time is *extrapolated*: each measured layer's time
is counted once per layer of that shape (the cost of a layer depends on its shape, not on which
copy it is). The output then labels those times ``(extrapolated)``, and their mean SQNR is over
the measured layers only (onnxvq's mean over the same layers is printed next to it).

Run
---
    python benchmarks/compress_speed.py                 # full default run (~10 min on 2 cores)
    python benchmarks/compress_speed.py --scale small   # 2.1M weights, a quick check
    python benchmarks/compress_speed.py --k 256 --d 4 --layers 4 --skip-sklearn
    python benchmarks/compress_speed.py --sklearn-subset per-shape --no-minibatch

D must divide every row length (768 and 3072 here, or 256 and 1024 with --scale small), so that
onnxvq and scikit-learn cluster exactly the same points (no padded subvectors).

Timings are wall clock; anything else running on the machine shows up in them (the load average
at start and end is printed for that reason). On a shared machine also try ``--threads 1``:
with 2 OpenBLAS threads, onnxvq's many small GEMM calls (one per chunk of 4096 points) slow
down several-fold when another process holds a core (measured: 31 s single-threaded against
278 s with 2 threads for the default model, same results), while scikit-learn pins BLAS to one
thread and parallelizes with OpenMP instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "out")
RESULT_MARKER = "@@RESULT@@ "  # prefixes the one JSON line a worker prints for the parent

# (d_model, d_ff, vocab, blocks) per scale; --layers overrides the number of blocks.
SCALES = {
    "full": (768, 3072, 8192, 2),
    "small": (256, 1024, 2048, 2),
}


# --------------------------------------------------------------------------------------------
# Parent: orchestration and the report. Standard library only (see the module docstring).
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return

    sys.stdout.reconfigure(line_buffering=True)  # keep the report in order with the workers' stderr
    started = time.perf_counter()
    d_model, d_ff, vocab, blocks = SCALES[args.scale]
    blocks = args.layers or blocks
    model_path = os.path.join(OUT_DIR, f"bench_{args.scale}_{blocks}blk.onnx")
    load_start = os.getloadavg()

    built = spawn("build", args, model_path, extra=["--blocks", str(blocks)])
    print_header(built, args, load_start)

    bad = [c for c in built["row_lengths"] if c % args.d]
    if bad and not args.skip_sklearn:
        sys.exit(f"--d {args.d} does not divide row length(s) {sorted(set(bad))}: onnxvq would "
                 "pad those subvectors and the comparison would not be exact; pick another d")

    results = {"baseline": spawn("baseline", args, model_path)}
    results["onnxvq"] = spawn("onnxvq", args, model_path)
    if not args.skip_sklearn:
        results["baseline_sklearn"] = spawn("baseline_sklearn", args, model_path)
        results["kmeans"] = spawn("kmeans", args, model_path)
        if not args.no_minibatch:
            results["minibatch"] = spawn("minibatch", args, model_path)

    print_layers(results)
    print_summary(results, args)
    print(f"\nload average at end: {fmt_load(os.getloadavg())}; "
          f"benchmark wall time {time.perf_counter() - started:.0f} s")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=256, help="codewords per layer (default 256)")
    p.add_argument("--d", type=int, default=8, help="subvector length (default 8)")
    p.add_argument("--scale", choices=sorted(SCALES), default="full",
                   help="full: d_model 768, d_ff 3072, vocab 8192 (20.4M weights); "
                        "small: 256/1024/2048 (2.1M weights)")
    p.add_argument("--layers", type=int, default=None,
                   help="number of transformer blocks (default 2)")
    p.add_argument("--skip-sklearn", action="store_true", help="measure onnxvq only")
    p.add_argument("--no-minibatch", action="store_true", help="skip the MiniBatchKMeans baseline")
    p.add_argument("--sklearn-subset", choices=["all", "per-shape"], default="all",
                   help="layers the scikit-learn baselines run on; per-shape extrapolates time")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's weights")
    p.add_argument("--threads", type=int, default=None,
                   help="set OMP/OpenBLAS/MKL thread counts of the workers (default: the "
                        "libraries' own defaults, i.e. all cores)")
    # Internal: the parent re-runs this file as a worker.
    p.add_argument("--worker", choices=sorted(WORKERS),
                   help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--blocks", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def spawn(worker: str, args, model_path: str, extra: list[str] | None = None) -> dict:
    """Run one worker in a fresh interpreter and return the JSON it reports."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--model", model_path,
           "--k", str(args.k), "--d", str(args.d), "--scale", args.scale, "--seed", str(args.seed),
           "--sklearn-subset", args.sklearn_subset] + (extra or [])
    print(f"[running {worker} ...]", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    env = dict(os.environ)
    if args.threads:  # must be set before numpy / sklearn load their thread pools
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(args.threads)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)  # stderr passes through
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_MARKER)]
    if proc.returncode or not lines:
        sys.stdout.write(proc.stdout)
        sys.exit(f"worker {worker} failed (exit code {proc.returncode})")
    result = json.loads(lines[-1][len(RESULT_MARKER):])
    result["process_s"] = time.perf_counter() - t0  # including interpreter start and imports
    print(f"[{worker} done in {result['process_s']:.1f} s]", file=sys.stderr, flush=True)
    return result


def print_header(built: dict, args, load: tuple) -> None:
    print("onnxvq compression benchmark: PQ vs scikit-learn k-means on the same subvectors")
    cores = os.cpu_count() or 1
    busy = "  (busy machine: timings will be noisy)" if load[0] > 0.5 * cores else ""
    print(f"machine: {built['cpu']}, {cores} logical cores "
          f"(affinity {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}), "
          f"{platform.system()} {platform.machine()}, load average at start {fmt_load(load)}{busy}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in built["versions"].items()))
    print("threads: " + "; ".join(built["threadpools"]))
    print(f"model: {built['path']}")
    print(f"  {built['description']}")
    print(f"  {built['n_layers']} Conv/Gemm/MatMul weights, {built['params']:,} weights in them "
          f"({built['total_params']:,} parameters in all), file {built['file_bytes'] / 2**20:.1f} MiB, "
          f"built in {built['build_s']:.1f} s")
    threads = args.threads or "library defaults"
    print(f"settings: method=pq k={args.k} d={args.d}; scikit-learn layers: {args.sklearn_subset}; "
          f"threads: {threads}")


def print_layers(results: dict) -> None:
    """Per-layer SQNR and clustering time of every tool, side by side."""
    tools = [t for t in ("onnxvq", "kmeans", "minibatch") if t in results]
    print("\nper layer (SQNR in dB / clustering time in s; '-' = not run on that layer):")
    header = ["layer", "shape", "points"]
    for t in tools:
        header += [f"{t} dB", f"{t} s"]
    if "kmeans" in results:
        header.append("KMeans iters")
    rows = []
    for layer in results["onnxvq"]["layers"]:
        name = layer["name"]
        row = [name, "x".join(map(str, layer["shape"])), f"{layer['points']:,}"]
        for t in tools:
            other = results[t]["layers_by_name"].get(name) if t != "onnxvq" else layer
            row += [f"{other['sqnr_db']:.2f}", f"{other['cluster_s']:.2f}"] if other else ["-", "-"]
        if "kmeans" in results:
            km = results["kmeans"]["layers_by_name"].get(name)
            row.append(str(km["n_iter"]) if km else "-")
        rows.append(row)
    print_table(header, rows)


def print_summary(results: dict, args) -> None:
    base = {t: results[t]["peak_rss_mib"] for t in ("baseline", "baseline_sklearn") if t in results}
    onnxvq = results["onnxvq"]
    print("\nbaseline workers (imports + load the model + read each weight as float32), peak RSS: "
          + ", ".join(f"{BASELINE_LABELS[t]} {v:.0f} MiB" for t, v in base.items()))
    print("\nsummary (time: seconds after imports; RSS: MiB; "
          "increment = peak - peak of the baseline with the same imports):")
    header = ["tool", "total s", "cluster s", "peak RSS", "RSS incr.", "fit incr.", "mean SQNR dB",
              "time x", "mem x"]
    rows = []
    ref_time = onnxvq["total_s"]
    ref_incr = max(onnxvq["peak_rss_mib"] - base["baseline"], 1e-9)
    for tool in ("onnxvq", "kmeans", "minibatch"):
        if tool not in results:
            continue
        r = results[tool]
        est = r.get("extrapolated", False)
        incr = r["peak_rss_mib"] - base["baseline" if tool == "onnxvq" else "baseline_sklearn"]
        rows.append([
            LABELS[tool],
            f"{r['total_s']:.1f}" + ("*" if est else ""),
            f"{r['cluster_s']:.1f}" + ("*" if est else ""),
            f"{r['peak_rss_mib']:.0f}",
            f"{incr:.0f}",
            f"{r['cluster_rss_mib']:.0f}" if r["cluster_rss_mib"] is not None else "n/a",
            f"{r['mean_sqnr_db']:.3f}" + ("**" if est else ""),
            f"{r['total_s'] / ref_time:.2f}" + ("*" if est else ""),
            f"{incr / ref_incr:.2f}",
        ])
    print_table(header, rows)
    print("fit incr. = the most RSS rose during one layer's clustering call alone (onnxvq's kmeans(), "
          "sklearn's fit()) over RSS at its start;\ntime x = tool total time / onnxvq total time; "
          "mem x = tool RSS increment / onnxvq RSS increment (> 1: slower / more memory than onnxvq)")
    measured = [r for t, r in results.items() if t in ("kmeans", "minibatch")]
    if any(r.get("extrapolated") for r in measured):
        names = measured[0]["measured_layers"]
        ov = [l["sqnr_db"] for l in onnxvq["layers"] if l["name"] in names]
        print(f"*  extrapolated: scikit-learn ran on {len(names)} layer(s), one per weight shape "
              f"({', '.join(names)}); each one's clustering time is counted once per layer of its "
              "shape. Peak RSS is as measured on those layers (the largest shape is among them).")
        print(f"** mean over those {len(names)} layer(s) only; onnxvq's mean over the same layers: "
              f"{sum(ov) / len(ov):.3f} dB")
    if "kmeans" in results:
        km = results["kmeans"]
        print(f"clustering time ratio (KMeans / onnxvq k-means): {km['cluster_s'] / onnxvq['cluster_s']:.2f}; "
              f"SQNR difference (onnxvq - KMeans, mean over layers run): "
              f"{mean_sqnr_over(onnxvq, km) - km['mean_sqnr_db']:+.3f} dB")
    fp32 = [l["fp32_sqnr_db"] for l in onnxvq["layers"]]
    print(f"onnxvq mean SQNR of its k-means result before the float16 codebook cast: "
          f"{sum(fp32) / len(fp32):.3f} dB (the table's onnxvq SQNR is after it, as stored)")
    print(f"onnxvq k-means iterations per layer: {onnxvq['iterations']} (max_iter 50); "
          f"compress() total {onnxvq['total_s']:.1f} s of which k-means {onnxvq['cluster_s']:.1f} s")


BASELINE_LABELS = {"baseline": "onnxvq imports", "baseline_sklearn": "onnxvq + sklearn.cluster imports"}

LABELS = {
    "onnxvq": "onnxvq compress (pq)",
    "kmeans": "sklearn KMeans",
    "minibatch": "sklearn MiniBatchKMeans",
}


def mean_sqnr_over(onnxvq: dict, other: dict) -> float:
    names = set(other["layers_by_name"])
    vals = [l["sqnr_db"] for l in onnxvq["layers"] if l["name"] in names]
    return sum(vals) / len(vals)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    print(fmt.format(*header))
    print(fmt.format(*("-" * w for w in widths)))
    for row in rows:
        print(fmt.format(*row))


def fmt_load(load: tuple) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def _proc_status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


_peak_before_resets = 0.0  # the process's peak from before any reset in measure_peak()


def measure_peak(fn):
    """``(fn(), MiB)``: how far RSS rose above its level at the call while ``fn`` ran.

    Uses Linux's peak reset (``/proc/self/clear_refs``); the process-wide peak seen so far is
    remembered first, so :func:`peak_rss_mib` still reports it. MiB is None where unsupported.
    """
    global _peak_before_resets
    _peak_before_resets = max(_peak_before_resets, peak_rss_mib())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = _proc_status_mib("VmRSS")
    except OSError:
        start = None
    out = fn()
    peak = peak_rss_mib()
    _peak_before_resets = max(_peak_before_resets, peak)
    return out, (peak - start if start is not None else None)


def peak_rss_mib() -> float:
    """Peak resident memory of this process (its own address space only), in MiB."""
    hwm = _proc_status_mib("VmHWM")
    if hwm is not None:
        return max(hwm, _peak_before_resets)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


# --------------------------------------------------------------------------------------------
# Workers: each runs in its own process and prints one RESULT_MARKER line of JSON.
# --------------------------------------------------------------------------------------------


def run_worker(args) -> None:
    result = WORKERS[args.worker](args)
    result["peak_rss_mib"] = peak_rss_mib()
    print(RESULT_MARKER + json.dumps(result), flush=True)


def worker_build(args) -> dict:
    import numpy as np
    import onnx
    import sklearn
    import threadpoolctl

    import onnxvq

    t0 = time.perf_counter()
    d_model, d_ff, vocab, _ = SCALES[args.scale]
    model, description = build_model(d_model, d_ff, vocab, args.blocks, seed=args.seed)
    os.makedirs(OUT_DIR, exist_ok=True)
    onnx.save(model, args.model)
    smoke_test(args.model, d_model)
    build_s = time.perf_counter() - t0

    from onnxvq.candidates import find_layers
    from onnxvq.model_io import load_model

    layers, _ = find_layers(load_model(args.model))
    row_lengths = []
    for layer in layers:
        row_lengths.append(_layout(layer, args.d).cols)
    total = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    return {
        "path": os.path.relpath(args.model),
        "description": description,
        "n_layers": len(layers),
        "params": sum(l.size for l in layers),
        "total_params": total,
        "file_bytes": os.path.getsize(args.model),
        "row_lengths": row_lengths,
        "build_s": build_s,
        "cpu": cpu_name(),
        "versions": {
            "python": platform.python_version(), "numpy": np.__version__,
            "scikit-learn": sklearn.__version__, "onnxvq": onnxvq.__version__,
            "onnx": onnx.__version__, "onnxruntime": _version("onnxruntime"),
        },
        "threadpools": [f"{p['prefix']} ({p['internal_api']} {p.get('version') or ''}".rstrip()
                        + f"): {p['num_threads']} thread(s)"
                        for p in threadpoolctl.threadpool_info()],
    }


def worker_baseline(args) -> dict:
    """What every tool must do anyway: imports, load the model, read each weight as float32.

    ``baseline_sklearn`` also imports ``sklearn.cluster`` (with scipy, ~90 MiB), so that the
    scikit-learn workers' increment is the memory of their work, not of their imports.
    """
    import numpy as np

    if args.worker == "baseline_sklearn":
        import sklearn.cluster  # noqa: F401

    from onnxvq.candidates import find_layers
    from onnxvq.model_io import load_model

    t0 = time.perf_counter()
    layers, _ = find_layers(load_model(args.model))
    checksum = 0.0
    for layer in layers:  # one at a time, as both onnxvq and the sklearn workers do
        checksum += float(layer.weight_array().astype(np.float32)[..., 0].sum())
    return {"total_s": time.perf_counter() - t0, "checksum": checksum}


def worker_onnxvq(args) -> dict:
    import onnxvq
    import onnxvq.methods.pq as pq

    # Time the k-means calls on their own, without touching onnxvq's files: PQ.encode looks
    # `kmeans` up in its module at call time.
    import numpy as np

    calls = []
    original = pq.kmeans
    extra_s = 0.0  # time this wrapper spends on its own bookkeeping, taken out of the total

    def timed_kmeans(points, k, **kw):
        nonlocal extra_s
        t = time.perf_counter()
        res, fit_mib = measure_peak(lambda: original(points, k, **kw))
        t1 = time.perf_counter()
        # SQNR of the k-means result itself (fp32 codebook): the summary's SQNR is after the
        # codebook is stored as float16 (onnxvq's default), scikit-learn's centers stay fp32.
        signal = float(np.einsum("nd,nd->", points, points, dtype=np.float64))
        fp32_db = 10.0 * np.log10(signal / res.inertia) if res.inertia > 0 else float("inf")
        calls.append((t1 - t, len(points), res.iterations, fp32_db, fit_mib))
        extra_s += time.perf_counter() - t1
        return res

    pq.kmeans = timed_kmeans

    t0 = time.perf_counter()
    result = onnxvq.compress(args.model, method="pq", k=args.k, d=args.d)
    total_s = time.perf_counter() - t0 - extra_s

    compressed = result.summary.compressed_layers
    if len(compressed) != len(calls):  # e.g. a layer left dense: the per-layer zip would lie
        raise SystemExit(f"{len(compressed)} layers compressed but {len(calls)} k-means calls")
    layers = [
        {"name": l.name, "shape": list(l.shape), "points": n, "sqnr_db": l.sqnr_db,
         "fp32_sqnr_db": fp32_db, "cluster_s": s, "n_iter": it, "cluster_rss_mib": mib}
        for l, (s, n, it, fp32_db, mib) in zip(compressed, calls)
    ]
    return summarize(layers, total_s, extrapolated=False) | {
        "iterations": [l["n_iter"] for l in layers],
        "dense_layers": [l.name for l in result.summary.layers if not l.compressed],
    }


def worker_sklearn(args) -> dict:
    """Per layer: subvectors exactly as onnxvq makes them -> sklearn -> decode -> SQNR."""
    import numpy as np
    from sklearn.cluster import KMeans, MiniBatchKMeans

    from onnxvq.candidates import find_layers
    from onnxvq.model_io import load_model
    from onnxvq.summary import sqnr_db

    def make(k):
        if args.worker == "kmeans":  # what a user would write: defaults, one init, fixed seed
            return KMeans(n_clusters=k, n_init=1, random_state=0)
        return MiniBatchKMeans(n_clusters=k, random_state=0)

    t0 = time.perf_counter()
    layers, _ = find_layers(load_model(args.model))
    chosen = choose_layers(layers, args.sklearn_subset)
    reports = []
    for layer in layers:
        if layer.name not in chosen:
            continue
        weight = layer.weight_array().astype(np.float32)
        layout = _layout(layer, args.d)
        points = layout.to_subvectors(weight).reshape(-1, args.d)
        k = min(args.k, len(points))
        t = time.perf_counter()
        est, fit_mib = measure_peak(lambda: make(k).fit(points))
        cluster_s = time.perf_counter() - t
        decoded = layout.from_subvectors(
            est.cluster_centers_.astype(np.float32)[est.labels_].reshape(layout.rows, layout.n_sub, args.d)
        )
        reports.append({
            "name": layer.name, "shape": list(layer.weight_shape), "points": len(points),
            "sqnr_db": sqnr_db(weight, decoded), "cluster_s": cluster_s,
            "n_iter": int(est.n_iter_), "repeat": chosen[layer.name], "cluster_rss_mib": fit_mib,
        })
        del weight, points, decoded, est
    measured_s = time.perf_counter() - t0
    extrapolated = args.sklearn_subset != "all"
    # Extrapolation: add each measured layer's clustering time once more per other layer of its
    # shape (loading the weights of the skipped layers is cheap and left out).
    total_s = measured_s + sum((r["repeat"] - 1) * r["cluster_s"] for r in reports)
    out = summarize(reports, total_s, extrapolated=extrapolated)
    out["cluster_s"] = sum(r["repeat"] * r["cluster_s"] for r in reports)
    out["measured_s"] = measured_s
    out["measured_layers"] = [r["name"] for r in reports]
    return out


def choose_layers(layers, subset: str) -> dict[str, int]:
    """Layer name -> how many layers it stands for (1 each for 'all')."""
    if subset == "all":
        return {l.name: 1 for l in layers}
    first_of_shape: dict[tuple, str] = {}
    counts: dict[str, int] = {}
    for layer in layers:
        key = (layer.weight_shape, layer.view())
        name = first_of_shape.setdefault(key, layer.name)
        counts[name] = counts.get(name, 0) + 1
    return counts


def summarize(layers: list[dict], total_s: float, *, extrapolated: bool) -> dict:
    return {
        "total_s": total_s,
        "cluster_s": sum(l["cluster_s"] for l in layers),
        "mean_sqnr_db": sum(l["sqnr_db"] for l in layers) / len(layers),
        "cluster_rss_mib": max_or_none(l["cluster_rss_mib"] for l in layers),
        "layers": layers,
        "layers_by_name": {l["name"]: l for l in layers},
        "extrapolated": extrapolated,
    }


def max_or_none(values):
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _layout(layer, d: int):
    from onnxvq.layout import WeightLayout

    transposed, row_axes = layer.view()
    return WeightLayout(layer.weight_shape, transposed, row_axes, d)


WORKERS = {
    "build": worker_build,
    "baseline": worker_baseline,
    "baseline_sklearn": worker_baseline,
    "onnxvq": worker_onnxvq,
    "kmeans": worker_sklearn,
    "minibatch": worker_sklearn,
}


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def build_model(d_model: int, d_ff: int, vocab: int, blocks: int, *, seed: int):
    """A pre-LN transformer stack (single-head attention, Relu FFN) and a tied-embedding head.

    Input ``x`` (batch, seq, d_model) float32; output ``logits`` (batch * seq, vocab). Weights
    are stored as MatMul right operands (K, N), the way exporters write ``x @ W``, and the head
    as Gemm B (vocab, d_model) with transB=1, like a tied embedding matrix.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def init(name, array):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def layer_norm(x, prefix):
        g = init(f"{prefix}.gamma", 1.0 + 0.1 * rng.standard_normal(d_model))
        b = init(f"{prefix}.beta", 0.02 * rng.standard_normal(d_model))
        return node("LayerNormalization", [x, g, b], prefix, axis=-1)

    def linear(x, prefix, n_in, n_out, bias=True):
        w = init(f"{prefix}.weight", realistic_weight(rng, n_out, n_in).T)  # (K, N) for x @ W
        y = node("MatMul", [x, w], prefix)
        if bias:
            y = node("Add", [y, init(f"{prefix}.bias", 0.02 * rng.standard_normal(n_out))], f"{prefix}.add")
        return y

    x = "x"
    scale = init("attn_scale", np.array(1.0 / np.sqrt(d_model)))
    for i in range(blocks):
        p = f"block{i}"
        h = layer_norm(x, f"{p}.ln1")
        q = linear(h, f"{p}.attn.q", d_model, d_model)
        k = linear(h, f"{p}.attn.k", d_model, d_model)
        v = linear(h, f"{p}.attn.v", d_model, d_model)
        kt = node("Transpose", [k], f"{p}.attn.kT", perm=[0, 2, 1])
        s = node("Mul", [node("MatMul", [q, kt], f"{p}.attn.qk"), scale], f"{p}.attn.scaled")
        a = node("MatMul", [node("Softmax", [s], f"{p}.attn.softmax", axis=-1), v], f"{p}.attn.av")
        x = node("Add", [x, linear(a, f"{p}.attn.o", d_model, d_model)], f"{p}.res1")
        h = layer_norm(x, f"{p}.ln2")
        h = node("Relu", [linear(h, f"{p}.ffn.up", d_model, d_ff)], f"{p}.ffn.relu")
        x = node("Add", [x, linear(h, f"{p}.ffn.down", d_ff, d_model)], f"{p}.res2")
    h = layer_norm(x, "final_ln")
    flat = node("Reshape", [h, init_int64(inits, "flat_shape", [-1, d_model])], "flatten")
    # Token embeddings: per-token norms vary (frequent tokens have larger ones) -> row scales.
    emb = init("embedding", realistic_weight(rng, vocab, d_model, row_sigma=0.4, low_rank=0.1))
    node("Gemm", [flat, emb], "lm_head", transB=1)
    nodes[-1].output[0] = "logits"

    graph = helper.make_graph(
        nodes, "bench_transformer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d_model])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["tokens", vocab])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    description = (f"transformer-like: {blocks} block(s) of d_model {d_model} (MatMul Q/K/V/O "
                   f"{d_model}x{d_model}, FFN {d_model}x{d_ff} and {d_ff}x{d_model}) + Gemm head "
                   f"{vocab}x{d_model} (transB=1); Student-t(4) entries, per-row and per-input-feature "
                   f"scales, low-rank part; seed {seed}")
    return model, description


def realistic_weight(rng, n_out: int, n_in: int, *, row_sigma: float = 0.25, low_rank: float = 0.2):
    """An (n_out, n_in) weight that is not iid Gaussian.

    * Student-t with 4 degrees of freedom (scaled to unit variance): a heavy-ish tail;
    * per-output-channel scales, log-normal: rows differ in norm as in trained layers;
    * per-input-feature scales, with ~1% outlier features 3-6x larger (as in trained
      transformers): entries *within* a subvector have different variances;
    * a rank-8 component carrying ``low_rank`` of the energy: correlated rows and columns.
    """
    import numpy as np

    noise = rng.standard_t(4, size=(n_out, n_in)).astype(np.float32) / np.float32(np.sqrt(2.0))
    col = rng.lognormal(0.0, 0.2, size=n_in)
    outliers = rng.choice(n_in, size=max(1, n_in // 100), replace=False)
    col[outliers] *= rng.uniform(3.0, 6.0, size=len(outliers))
    rank = 8
    lr = (rng.standard_normal((n_out, rank)) @ rng.standard_normal((rank, n_in))) / np.sqrt(rank)
    w = np.sqrt(1.0 - low_rank) * noise + np.sqrt(low_rank) * lr.astype(np.float32)
    w *= col.astype(np.float32)[None, :]
    w *= rng.lognormal(0.0, row_sigma, size=(n_out, 1)).astype(np.float32)
    return w / np.float32(np.sqrt(n_in))


def init_int64(inits, name, values):
    import numpy as np
    from onnx import numpy_helper

    inits.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
    return name


def smoke_test(path: str, d_model: int) -> None:
    """The built model must run (a benchmark on a broken graph would measure nothing real)."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 4, d_model)).astype(np.float32)
    (logits,) = session.run(None, {"x": x})
    if not np.isfinite(logits).all():
        raise SystemExit("the benchmark model produced non-finite logits")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
