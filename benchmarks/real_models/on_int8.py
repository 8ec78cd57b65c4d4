"""onnxvq on top of onnxruntime's int8 models: a pipeline that already quantized goes further.

For each task model: onnxruntime's static QDQ (``quantize_static``) and dynamic
(``quantize_dynamic``: ConvInteger/MatMulInteger) int8 files (with ``--variants``, also the
QOperator format: QLinearConv, QGemm, ...) are made as the suite makes them (``baselines.py``),
then each is compressed by onnxvq at ``--target-ratio`` against the int8 file (with the task's
calibration data, data-aware encoding) and evaluated on the task's metric.
Ratios are against the fp32 file. A model its authors ship as int8 (``ALREADY_INT8`` in its task
module, e.g. ddddocr's ``common_old.onnx``) is taken as it is; its ratios are against its fp32
form (4 bytes for every element of every initializer: what the dequantized model would store).

    python benchmarks/real_models/on_int8.py --models ppocr_det,ddddocr_det --target 2 --quick
    python benchmarks/real_models/on_int8.py --models ddddocr_ocr_old --target 2,4 --quick
    python benchmarks/real_models/on_int8.py --models ddddocr_det --variants "int8 static QOperator" --quick
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

import numpy as np  # noqa: E402
import onnx  # noqa: E402

import onnxvq  # noqa: E402

# Task modules whose model ships as int8, not in the main suite's TASKS (its fp32 rows need an fp32 file).
SHIPPED_INT8_TASKS = ["ddddocr_ocr_old"]
INT8 = {"int8 static QDQ": baselines.int8_static_qdq, "int8 dynamic": baselines.int8_dynamic,
        "int8 static QOperator": baselines.int8_static_qoperator}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="det_ppocr,ddddocr_det", help="task modules or names, comma-separated")
    parser.add_argument("--target", default="2", help="onnxvq's --target-ratio against the int8 file (comma-separated)")
    parser.add_argument("--quick", action="store_true", help="the tasks' quick eval and calibration sizes")
    parser.add_argument("--variants", default="int8 static QDQ,int8 dynamic",
                        help=f"onnxruntime int8 files to start from, comma-separated, of: {', '.join(INT8)}")
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        task = importlib.import_module(_module(name))
        sizes = task.SIZES
        eval_set = task.make_eval_set(1, sizes["eval_quick" if args.quick else "eval"])
        calib = task.make_calib_set(1001, sizes["calib_quick" if args.quick else "calib"])
        source = task.model_path()
        shipped_int8 = getattr(task, "ALREADY_INT8", False)
        fp32_bytes = _float_form_bytes(source) if shipped_int8 else os.path.getsize(source)
        reference = task.evaluate(common.session(str(source)), eval_set)
        metric = task.METRIC
        if not shipped_int8:
            rows.append((task.NAME, "fp32", 1.0, reference.metrics[metric], "-"))
        with tempfile.TemporaryDirectory() as work:
            variants = {"int8 as shipped": None} if shipped_int8 else {v: INT8[v] for v in args.variants.split(",")}
            for label, make in variants.items():
                int8 = str(source) if make is None else os.path.join(work, label.replace(" ", "_") + ".onnx")
                if make is not None:
                    make(source, int8, calib, work)
                scores = task.evaluate(common.session(int8), eval_set, reference)
                rows.append((task.NAME, f"onnxruntime {label}", fp32_bytes / os.path.getsize(int8),
                             scores.metrics[metric], "-"))
                for target in (float(t) for t in args.target.split(",")):
                    start = time.perf_counter()
                    result = onnxvq.compress(int8, target_ratio=target, calib=calib, finetune="none")
                    seconds = time.perf_counter() - start
                    out = os.path.join(work, label.replace(" ", "_") + f".vq{target:g}.onnx")
                    result.save(out)
                    scores = task.evaluate(common.session(out), eval_set, reference)
                    rows.append((task.NAME, f"onnxvq target {target:g} on {label}", fp32_bytes / os.path.getsize(out),
                                 scores.metrics[metric], f"{seconds:.0f}"))
                    print(*rows[-2:], sep="\n", flush=True)
    print("\n| model | variant | ratio vs fp32 (form) | metric | compress s |\n|---|---|---:|---:|---:|")
    for model, variant, ratio, value, seconds in rows:
        print(f"| `{model}` | {variant} | {ratio:.1f}x | {value:.4f} | {seconds} |")
    return 0


def _module(name: str) -> str:
    from run import TASKS

    for module in TASKS + SHIPPED_INT8_TASKS:
        if name == module or importlib.import_module(module).NAME == name:
            return module
    raise SystemExit(f"unknown model {name!r}; known: {', '.join(TASKS + SHIPPED_INT8_TASKS)}")


def _float_form_bytes(path) -> int:
    """4 bytes for every element of every initializer: the model's size with float32 weights."""
    model = onnx.load(str(path), load_external_data=False)
    return sum(4 * int(np.prod(t.dims)) for t in model.graph.initializer)


if __name__ == "__main__":
    raise SystemExit(main())
