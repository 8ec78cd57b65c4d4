"""The digit-string CRNN (``samples/crnn_digits.py``): onnxvq against onnxruntime's int8, in one run.

For each variant: the time to compress, the file size and ratio against fp32, and the fraction
of the 1,000 test strings (handwriting the model never saw) read exactly, in onnxruntime.
Variants: fp32; onnxruntime ``quantize_dynamic`` (int8 weights; its LSTMs become
``DynamicQuantizeLSTM``); onnxvq at ``--target-ratio`` 8 and 16, without data and with 64
unlabelled calibration strings (data-aware encoding, no fine-tuning); and onnxvq at target 2 on
the int8 file (a pipeline that already ran onnxruntime's quantizer).

Run from the repository root after training the sample::

    python samples/crnn_digits.py --out samples/out/crnn_digits.onnx
    python samples/crnn_compare.py [--model samples/out/crnn_digits.onnx]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from crnn_digits import calibration_strings, onnx_exact_rate, test_strings  # noqa: E402

import onnxvq  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="samples/out/crnn_digits.onnx")
    args = parser.parse_args(argv)
    if not os.path.exists(args.model):
        print(f"error: {args.model} does not exist; train it first: python samples/crnn_digits.py", file=sys.stderr)
        return 1
    from onnxruntime.quantization import QuantType, quantize_dynamic

    images, texts = test_strings()
    calib = [{"image": image[None]} for image in calibration_strings()]  # one feed per sample
    fp32_bytes = os.path.getsize(args.model)
    rows = []

    def row(label: str, path: str, seconds: float | None) -> None:
        size = os.path.getsize(path)
        rows.append((label, size, fp32_bytes / size, onnx_exact_rate(path, images, texts), seconds))
        print(f"{label}: {size:,} bytes, exact {rows[-1][3]:.4f}", flush=True)

    with tempfile.TemporaryDirectory() as work:
        row("fp32", args.model, None)
        int8 = os.path.join(work, "int8.onnx")
        start = time.perf_counter()
        quantize_dynamic(args.model, int8, weight_type=QuantType.QInt8)
        row("onnxruntime int8 dynamic", int8, time.perf_counter() - start)
        jobs = [(f"onnxvq target {t}, {'data-aware' if data else 'no data'}", args.model, t, data)
                for t in (8, 16) for data in (False, True)]
        jobs.append(("onnxvq target 2 on the int8 file, data-aware", int8, 2, True))
        for i, (label, source, target, data) in enumerate(jobs):
            start = time.perf_counter()
            result = onnxvq.compress(source, target_ratio=target, calib=calib if data else None, finetune="none")
            seconds = time.perf_counter() - start
            out = os.path.join(work, f"vq{i}.onnx")
            result.save(out)
            row(label, out, seconds)
    print("\n| variant | file | ratio | exact strings | compress s |\n|---|---:|---:|---:|---:|")
    for label, size, ratio, exact, seconds in rows:
        print(f"| {label} | {size / 1e6:.2f} MB | {ratio:.1f}x | {exact:.4f} | "
              f"{'-' if seconds is None else f'{seconds:.0f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
