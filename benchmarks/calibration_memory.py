"""Time and peak memory of calibrated compression on a 10M+ weight model.

Builds a DeiT-small-shaped vision transformer with random weights (``samples/deit_tiny.py``
``build_deit``: dim 384, 6 heads, 12 blocks, MLP 1536; 22.05M parameters, 88 MB), writes
``--samples`` calibration images (seeded standard normal, one ``(1, 3, 224, 224)`` float32 feed
each, stacked in one ``.npz`` as the CLI takes them) and compresses the model with
``onnxvq.compress(model, method="pq", k=256, d=8, ...)`` three ways:

* ``no calibration``: weight-only, for reference;
* ``data-aware``: ``calib=...``, ``finetune="none"`` (activation statistics, no training);
* ``layer``: ``calib=...``, ``finetune="layer"`` (layer-wise fine-tuning, default settings).

Each run is a fresh Python process, so its peak RSS (``getrusage`` ``ru_maxrss`` of that process
and anything it started) is its own; the process loads the model and the calibration file,
compresses, and saves. The model and the calibration file are written by another process
beforehand, so that the runs do not inherit a large parent's high-water mark (Linux copies
``ru_maxrss`` across ``fork``); ``RSS at start`` is the run's resident size after its imports.
``wall s`` is the time of ``compress`` + ``save`` in that process (imports and Python start-up
excluded; ``process s`` is the whole process's wall time).
Swap use (``SwapTotal``/``SwapFree`` of ``/proc/meminfo``) and the kernel's swap-in/out counters
(``pswpin``/``pswpout`` of ``/proc/vmstat``) are printed before and after, and each run's major
page faults, to show that nothing was swapped.

Run from the repository root (about 7 minutes on 2 cores with the defaults; the output quality
it prints is that of random weights on random inputs, which says nothing about real models)::

    python benchmarks/calibration_memory.py [--samples 256] [--size small|tiny] [--timeout 900]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "samples"))
sys.path.insert(0, ROOT)

# (label, finetune mode or None for no calibration data)
VARIANTS = [("no calibration (weight-only)", None), ("data-aware (finetune none)", "none"), ("layer", "layer")]
K, D = 256, 8


def meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in kB."""
    values = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, rest = line.split(":", 1)
            values[key] = int(rest.split()[0])
    return values


def vmstat(*keys: str) -> dict[str, int]:
    values = {}
    with open("/proc/vmstat") as f:
        for line in f:
            key, value = line.split()
            if key in keys:
                values[key] = int(value)
    return values


def swap_line(label: str) -> str:
    m = meminfo()
    v = vmstat("pswpin", "pswpout")
    used = m["SwapTotal"] - m["SwapFree"]
    return (f"{label}: SwapTotal {m['SwapTotal'] / 2**20:.2f} GiB, SwapFree {m['SwapFree'] / 2**20:.2f} GiB "
            f"(used {used / 2**20:.2f} GiB); pswpin {v.get('pswpin', 0)}, pswpout {v.get('pswpout', 0)}; "
            f"MemAvailable {m['MemAvailable'] / 2**20:.1f} GiB of {m['MemTotal'] / 2**20:.1f} GiB")


def current_rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def child(args: argparse.Namespace) -> int:
    """One compression in this (fresh) process; prints one JSON line."""
    import onnxvq

    mode = None if args.mode == "-" else args.mode
    options = {} if mode is None else {"calib": args.calib, "finetune": mode}
    rss_start = current_rss_kb()
    start = time.perf_counter()
    result = onnxvq.compress(args.model, method="pq", k=K, d=D, **options)
    result.save(args.output)
    seconds = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = result.summary
    calibration = summary.calibration or {}
    print(json.dumps({
        "seconds": seconds,
        "peak_rss_kb": max(own.ru_maxrss, children.ru_maxrss),
        "rss_start_kb": rss_start,
        "major_faults": own.ru_majflt + children.ru_majflt,
        "total_params": summary.total_float_params,
        "compressed_params": sum(layer.params for layer in summary.compressed_layers),
        "layers": len(summary.compressed_layers),
        "file_ratio": os.path.getsize(args.model) / os.path.getsize(args.output),
        "samples": calibration.get("samples", 0),
        "held_back": calibration.get("held_back", 0),
        "mode": calibration.get("mode"),
        "fallback": calibration.get("fallback"),
        "quality": {stage: q.format() for stage, q in calibration.get("quality", {}).items()},
    }))
    return 0


def build(size: str, samples: int, out: str) -> tuple[str, str, int]:
    import onnx

    from deit_tiny import SIZES, build_deit, count_params

    model = build_deit(**SIZES[size], seed=0, name=f"deit_{size}")
    model_path = os.path.join(out, f"deit_{size}.onnx")
    onnx.save(model, model_path)
    params = count_params(model)
    del model
    rng = np.random.default_rng(0)
    images = rng.standard_normal((samples, 1, 3, 224, 224), dtype=np.float32)  # one feed per entry
    calib_path = os.path.join(out, f"calib_{samples}.npz")
    np.savez(calib_path, image=images)
    return model_path, calib_path, params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256, help="calibration images (default 256)")
    parser.add_argument("--size", choices=("small", "tiny"), default="small", help="DeiT size (default small, 22M)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per run (default 900)")
    parser.add_argument("--out", help="folder for the model, calibration data and outputs (default: temporary)")
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "CALIB", "MODE", "OUTPUT"), help=argparse.SUPPRESS)
    parser.add_argument("--build", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.model, args.calib, args.mode, args.output = args.child
        return child(args)
    if args.build:
        print(json.dumps(build(args.size, args.samples, args.build)))
        return 0

    out = args.out or tempfile.mkdtemp(prefix="onnxvq-calib-memory-")
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    built = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--build", out,
         "--size", args.size, "--samples", str(args.samples)],
        stdout=subprocess.PIPE, text=True, check=True, cwd=ROOT,
    )
    model_path, calib_path, params = json.loads(built.stdout.strip().splitlines()[-1])
    print(f"DeiT-{args.size} ({params:,} float parameters, {os.path.getsize(model_path) / 1e6:.0f} MB), "
          f"{args.samples} calibration images of (1, 3, 224, 224) float32 "
          f"({os.path.getsize(calib_path) / 2**20:.0f} MiB .npz); pq k={K} d={D}; "
          f"built in {time.perf_counter() - start:.0f} s; {os.cpu_count()} CPUs; files in {out}")
    print(swap_line("before"))
    sys.stdout.flush()

    results = []
    for label, mode in VARIANTS:
        output = os.path.join(out, f"deit_{args.size}.{mode or 'weight_only'}.vq.onnx")
        command = [sys.executable, os.path.abspath(__file__), "--child", model_path, calib_path, mode or "-", output]
        began = time.perf_counter()
        try:
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=args.timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            results.append((label, mode, None, time.perf_counter() - began, f"stopped after {args.timeout:.0f} s"))
            print(f"  {label}: stopped after {args.timeout:.0f} s", file=sys.stderr, flush=True)
            continue
        process_s = time.perf_counter() - began
        if done.returncode != 0:
            results.append((label, mode, None, process_s, f"failed with status {done.returncode}"))
            continue
        record = json.loads(done.stdout.strip().splitlines()[-1])
        results.append((label, mode, record, process_s, ""))
        print(f"  {label}: {record['seconds']:.0f} s, peak RSS {record['peak_rss_kb'] / 2**20:.2f} GiB",
              file=sys.stderr, flush=True)
    print(swap_line("after "))
    print()

    print("| variant | weights (compressed / all) | samples (held back) | wall s | process s | peak RSS GiB "
          "| RSS at start GiB | major faults | file ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, mode, record, process_s, problem in results:
        if record is None:
            print(f"| {label} | - | {args.samples if mode else 0} | {problem} | {process_s:.1f} | - | - | - | - |")
            continue
        samples = f"{record['samples']} ({record['held_back']})" if mode else "0"
        print(
            f"| {label} | {record['compressed_params'] / 1e6:.2f}M / {record['total_params'] / 1e6:.2f}M "
            f"| {samples} | {record['seconds']:.1f} | {process_s:.1f} | {record['peak_rss_kb'] / 2**20:.2f} "
            f"| {record['rss_start_kb'] / 2**20:.2f} | {record['major_faults']} | {record['file_ratio']:.1f}x |"
        )
    print()
    for label, mode, record, _, _ in results:
        if record and record["quality"]:
            stages = "; ".join(f"{stage}: {text}" for stage, text in record["quality"].items())
            fallback = f" [fallback: {record['fallback']}]" if record["fallback"] else ""
            print(f"- {label} (mode {record['mode']}), held-back output quality: {stages}{fallback}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
