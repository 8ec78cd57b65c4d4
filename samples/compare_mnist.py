"""Compare onnxvq with onnxruntime's int8 quantizer on the MNIST sample CNN, in one run.

For each variant: the time to compress, the file size and ratio against fp32, top-1 accuracy
on the 10,000 MNIST test images in onnxruntime, and the time to run those images (batches of
1000; onnxruntime constant-folds onnxvq's decode at session creation, so compressed models run
at fp32 speed; ``no-fold`` rows keep only the codes in memory and decode on every run).

Variants: the fp32 model; onnxruntime ``quantize_dynamic`` with int8 weights (the tool users
would otherwise reach for); onnxvq ``pq`` at several (k, d), without calibration data.

Run from the repository root after building the sample (``bash samples/quickstart.sh`` does)::

    python samples/compare_mnist.py [--model samples/out/mnist_cnn.onnx]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evaluate_mnist import model_files  # noqa: E402
from mnist_data import load_mnist  # noqa: E402

import onnxvq  # noqa: E402

# (k, d): 2 bits/weight, 1 bit/weight (one byte per 8 weights), 1 bit/weight with 4-bit codes.
PQ_SETTINGS = [(256, 4), (256, 8), (16, 4)]
BATCH = 1000


def accuracy_and_time(path: str, x: np.ndarray, y: np.ndarray, **session_options) -> tuple[float, float]:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"], **session_options)
    name = session.get_inputs()[0].name
    session.run(None, {name: x[:BATCH]})  # warm-up
    start = time.perf_counter()
    logits = np.concatenate([session.run(None, {name: x[i : i + BATCH]})[0] for i in range(0, len(x), BATCH)])
    return float((logits.argmax(axis=1) == y).mean()), time.perf_counter() - start


def size(path: str) -> int:
    return sum(os.path.getsize(f) for f in model_files(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="samples/out/mnist_cnn.onnx")
    args = parser.parse_args(argv)
    if not os.path.exists(args.model):
        print(f"error: {args.model} not found; build it with `python samples/mnist_cnn.py --out {args.model}`", file=sys.stderr)
        return 1
    _, _, test_x, test_y = load_mnist()
    out = tempfile.mkdtemp(prefix="onnxvq-compare-")
    rows = []

    base_size = size(args.model)
    acc, run_s = accuracy_and_time(args.model, test_x, test_y)
    rows.append(("fp32 (original)", "-", base_size, acc, run_s))

    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8 = os.path.join(out, "int8.onnx")
    start = time.perf_counter()
    # onnxruntime's quantizer transposes Gemm weights and then trips over the value_info the
    # torch exporter writes for initializers ("Inferred shape and existing shape differ"), so
    # it gets a copy without value_info (the graph is otherwise the same).
    model = onnx.load(args.model)
    del model.graph.value_info[:]
    plain = os.path.join(out, "fp32_no_value_info.onnx")
    onnx.save(model, plain)
    quantize_dynamic(plain, int8, weight_type=QuantType.QInt8)
    rows.append(("onnxruntime int8 dynamic", f"{time.perf_counter() - start:.2f}", size(int8), *accuracy_and_time(int8, test_x, test_y)))

    for k, d in PQ_SETTINGS:
        path = os.path.join(out, f"pq_k{k}_d{d}.onnx")
        start = time.perf_counter()
        onnxvq.compress(args.model, method="pq", k=k, d=d).save(path)
        seconds = f"{time.perf_counter() - start:.2f}"
        rows.append((f"onnxvq pq k={k} d={d}", seconds, size(path), *accuracy_and_time(path, test_x, test_y)))
        if (k, d) == PQ_SETTINGS[1]:
            acc, run_s = accuracy_and_time(path, test_x, test_y, disabled_optimizers=["ConstantFolding"])
            rows.append(("  same, no-fold session", "-", size(path), acc, run_s))

    print(f"MNIST CNN ({args.model}), 10,000 test images, onnxruntime {ort.__version__}, onnxvq {onnxvq.__version__}")
    print()
    print("| variant | compress s | file | ratio | top-1 | Δ top-1 | 10k images s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base_acc = rows[0][3]
    for name, seconds, nbytes, acc, run_s in rows:
        print(
            f"| {name} | {seconds} | {nbytes / 1e3:,.0f} kB | {base_size / nbytes:.1f}x | {100 * acc:.2f}% "
            f"| {100 * (acc - base_acc):+.2f} | {run_s:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
