"""onnxvq on top of onnxruntime's int8 models: a pipeline that already quantized goes further.

For each task model: onnxruntime's static QDQ (``quantize_static``) and dynamic
(``quantize_dynamic``: ConvInteger/MatMulInteger) int8 files are made as the suite makes them
(``baselines.py``), then each is compressed by onnxvq at ``--target-ratio`` against the int8 file
(with the task's calibration data, data-aware encoding) and evaluated on the task's metric.
Ratios are against the fp32 file.

    python benchmarks/real_models/on_int8.py --models ppocr_det,ddddocr_det --target 2 --quick
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import baselines  # noqa: E402
import common  # noqa: E402

import onnxvq  # noqa: E402

INT8 = {"int8 static QDQ": baselines.int8_static_qdq, "int8 dynamic": baselines.int8_dynamic}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="det_ppocr,ddddocr_det", help="task modules or names, comma-separated")
    parser.add_argument("--target", type=float, default=2.0, help="onnxvq's --target-ratio against the int8 file")
    parser.add_argument("--quick", action="store_true", help="the tasks' quick eval and calibration sizes")
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        task = importlib.import_module(_module(name))
        sizes = task.SIZES
        eval_set = task.make_eval_set(1, sizes["eval_quick" if args.quick else "eval"])
        calib = task.make_calib_set(1001, sizes["calib_quick" if args.quick else "calib"])
        fp32 = task.model_path()
        reference = task.evaluate(common.session(str(fp32)), eval_set)
        metric = task.METRIC
        rows.append((task.NAME, "fp32", 1.0, reference.metrics[metric], "-"))
        with tempfile.TemporaryDirectory() as work:
            for label, make in INT8.items():
                int8 = os.path.join(work, label.replace(" ", "_") + ".onnx")
                make(fp32, int8, calib, work)
                scores = task.evaluate(common.session(int8), eval_set, reference)
                rows.append((task.NAME, f"onnxruntime {label}", _ratio(fp32, int8), scores.metrics[metric], "-"))
                start = time.perf_counter()
                result = onnxvq.compress(int8, target_ratio=args.target, calib=calib, finetune="none")
                seconds = time.perf_counter() - start
                out = os.path.join(work, label.replace(" ", "_") + ".vq.onnx")
                result.save(out)
                scores = task.evaluate(common.session(out), eval_set, reference)
                rows.append((task.NAME, f"onnxvq target {args.target:g} on {label}", _ratio(fp32, out),
                             scores.metrics[metric], f"{seconds:.0f}"))
                print(*rows[-2:], sep="\n", flush=True)
    print("\n| model | variant | ratio vs fp32 | metric | compress s |\n|---|---|---:|---:|---:|")
    for model, variant, ratio, value, seconds in rows:
        print(f"| `{model}` | {variant} | {ratio:.1f}x | {value:.4f} | {seconds} |")
    return 0


def _module(name: str) -> str:
    from run import TASKS

    for module in TASKS:
        if name == module or importlib.import_module(module).NAME == name:
            return module
    raise SystemExit(f"unknown model {name!r}; known: {', '.join(TASKS)}")


def _ratio(fp32, path) -> float:
    return os.path.getsize(fp32) / os.path.getsize(path)


if __name__ == "__main__":
    raise SystemExit(main())
