"""Accuracy vs compression ratio with and without calibration data, against onnxruntime, in one run.

On the two sample classifiers, each variant is compressed, saved and evaluated in onnxruntime
on the model's test set; the table gives the time to compress (and save), the file size, the
ratio against the fp32 file, top-1 accuracy and its change in percentage points.

Models and data:

* the MNIST CNN (``samples/out/mnist_cnn.onnx``, built by ``samples/mnist_cnn.py``), tested on
  the 10,000 MNIST test images; calibration: 1,024 images of the MNIST *training* set drawn with
  a fixed seed;
* the scikit-learn digits MLP (``samples/digits_mlp.py``, seed 0), tested on its 450 test
  images; calibration: its 1,347 *training* images (the script repeats the sample's own
  ``train_test_split``, checks that it gives the same test split, and keeps the training part).

Calibration is unlabeled by default (fine-tuning distils the original model's outputs);
``--labels`` also passes the calibration images' labels (adds the task loss). No test image is
ever used for calibration.

Variants per model:

* ``fp32``: the original file;
* ``onnxruntime int8 dynamic``: ``quantize_dynamic`` with QInt8 weights (on a copy without
  ``graph.value_info``, which the torch exporter writes and the quantizer trips over);
* ``onnxruntime 4-bit MatMulNBits``: ``MatMulNBitsQuantizer`` (4 bits, block size 32,
  symmetric). That quantizer only handles ``MatMul``, and the sample models use
  ``Gemm(transB=1)``, so it is applied to an equivalent copy where every Gemm with a constant
  weight is rewritten as ``MatMul(x, W.T) + bias``. The rewrite exists only for this baseline;
  the script checks that the rewritten fp32 model predicts exactly what the original does (and
  prints the largest logit difference) before quantizing. Conv layers stay fp32 in that row;
* ``onnxvq pq`` at two settings per model (MNIST k=256 d=8 and k=16 d=8; digits k=256 d=4 and
  k=16 d=4), each four ways:

  - ``none``: no calibration data (weight-only k-means);
  - ``data-aware``: calibration data, ``finetune="none"`` (k-means weighted by activation
    statistics, least-squares codebooks);
  - ``layer``: calibration data, ``finetune="layer"`` (each layer trained to reproduce the
    original layer's outputs);
  - ``e2e``: calibration data, ``finetune="e2e"`` (the whole graph in torch, distillation).

  Fine-tuning uses onnxvq's default settings (10 epochs, Adam lr 1e-3, batch 32, ``e2e`` loss
  ``kl`` on these classifiers, 10% of the calibration samples held back to measure output
  quality, seed 0). No other fixed choice was clearly better: on both models at both settings,
  ``e2e`` with ``loss="mse"``, with 30 epochs or with lr 3e-4, and ``layer`` with 30 epochs or
  lr 3e-3, moved top-1 by at most 0.17 pp on MNIST and 0.44 pp (2 of 450 images) on digits, in
  no consistent direction.

Note on the quality lines: ``e2e`` distils with KL divergence on the softmax, which ignores a
per-row shift of the logits and cares little about their scale, so its held-back output SQNR
(measured on raw logits) is often *lower* than after encoding while top-1 agreement and accuracy
hold or improve; ``loss="mse"`` keeps the logits themselves close (higher SQNR, same accuracy).

Under each table the held-back output quality that onnxvq measured while compressing
(``summary.calibration["quality"]``: output SQNR and top-1 agreement with the fp32 model, per
stage ``encoded`` and ``fine-tuned``) is printed for every variant that had calibration data.

Everything is seeded, and torch's deterministic algorithms are switched on
(``torch.use_deterministic_algorithms(True)``): without that, ``e2e`` on CPU is not bit-exact
from run to run (the backward of the codebook gather accumulates in a thread-dependent order; one
of three identical runs gave a different file, held-back SQNR 6.98 instead of 6.97 dB). With it
the same run gives the same files and accuracies. Files are written to a
fresh temporary folder (``--out DIR`` to keep them). About 2 minutes on 2 cores; ``--quick``
runs only MNIST at k=256 d=8 (about 1 minute).

Run from the repository root after building the MNIST sample (``bash samples/quickstart.sh``)::

    python samples/finetune_compare.py [--quick] [--labels] [--model samples/out/mnist_cnn.onnx]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evaluate_mnist import model_files  # noqa: E402

import onnxvq  # noqa: E402

SEED = 0
MNIST_CALIB = 1024
BATCH = 1000
VARIANTS = ("none", "data-aware", "layer", "e2e")


@dataclasses.dataclass
class Sample:
    title: str
    path: str  # fp32 ONNX file
    input_name: str
    test_x: np.ndarray
    test_y: np.ndarray
    calib_x: np.ndarray
    calib_y: np.ndarray
    settings: list[tuple[int, int]]  # (k, d)


@dataclasses.dataclass
class Row:
    name: str
    seconds: float | None
    nbytes: int
    top1: float | None
    note: str = ""


def size(path: str) -> int:
    return sum(os.path.getsize(f) for f in model_files(path))


def predict(path: str, input_name: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {input_name: x[i : i + BATCH]})[0] for i in range(0, len(x), BATCH)])


def top1(path: str, sample: Sample) -> float:
    return float((predict(path, sample.input_name, sample.test_x).argmax(axis=1) == sample.test_y).mean())


def without_value_info(path: str, out: str) -> str:
    model = onnx.load(path)
    del model.graph.value_info[:]
    plain = os.path.join(out, os.path.basename(path).replace(".onnx", ".no_value_info.onnx"))
    onnx.save(model, plain)
    return plain


def gemm_to_matmul(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite ``Gemm(x, W, b, transB=1)`` with a constant W as ``MatMul(x, W.T) + b``.

    Only for the MatMulNBits baseline (that quantizer handles MatMul only). Gemms with other
    attributes (transA, alpha, beta != 1) or a computed weight are left as they are.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, rewritten = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (
            node.op_type == "Gemm"
            and attrs.get("transB", 0) == 1
            and attrs.get("transA", 0) == 0
            and attrs.get("alpha", 1.0) == 1.0
            and attrs.get("beta", 1.0) == 1.0
            and node.input[1] in inits
        )
        if not plain:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        transposed = f"{node.input[1]}.T"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), transposed))
        has_bias = len(node.input) > 2 and node.input[2] != ""
        product = f"{node.output[0]}.matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], transposed], [product], name=f"{node.name}.matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}.add"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]
    onnx.checker.check_model(model)
    return model, rewritten


def ort_int8(sample: Sample, out: str) -> Row:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = os.path.join(out, f"{stem(sample)}.int8.onnx")
    start = time.perf_counter()
    quantize_dynamic(without_value_info(sample.path, out), path, weight_type=QuantType.QInt8)
    seconds = time.perf_counter() - start
    return Row("onnxruntime int8 dynamic", seconds, size(path), top1(path, sample))


def ort_4bit(sample: Sample, out: str) -> Row:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    matmul, count = gemm_to_matmul(onnx.load(sample.path))
    matmul_path = os.path.join(out, f"{stem(sample)}.matmul.onnx")
    onnx.save(matmul, matmul_path)
    # The rewrite must not change the model: same predictions, logits equal up to float rounding.
    original = predict(sample.path, sample.input_name, sample.test_x)
    rewritten = predict(matmul_path, sample.input_name, sample.test_x)
    max_diff = float(np.abs(original - rewritten).max())
    same_predictions = np.array_equal(original.argmax(1), rewritten.argmax(1))
    if not (same_predictions and max_diff <= 1e-4 * max(1.0, np.abs(original).max())):
        raise SystemExit(
            f"error: the Gemm->MatMul rewrite of {sample.path} changed the outputs (max |diff| {max_diff:.3g})"
        )

    path = os.path.join(out, f"{stem(sample)}.matmulnbits4.onnx")
    start = time.perf_counter()
    quantizer = MatMulNBitsQuantizer(matmul, bits=4, block_size=32, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(path, use_external_data_format=False)
    seconds = time.perf_counter() - start
    convs = sum(node.op_type == "Conv" for node in matmul.graph.node)
    note = f"{count} Gemm rewritten as MatMul (max |Δlogit| vs fp32 {max_diff:.1e}, same predictions)"
    note += f"; the {convs} Conv layers stay fp32" if convs else ""
    return Row("onnxruntime 4-bit MatMulNBits (b32, sym)", seconds, size(path), top1(path, sample), note)


def stem(sample: Sample) -> str:
    return os.path.splitext(os.path.basename(sample.path))[0]


def onnxvq_variant(sample: Sample, k: int, d: int, variant: str, with_labels: bool, out: str):
    calib = [{sample.input_name: sample.calib_x[i : i + 1]} for i in range(len(sample.calib_x))]
    labels = sample.calib_y if with_labels else None
    options: dict = {
        "none": {},
        "data-aware": dict(calib=calib, labels=labels, finetune="none"),
        "layer": dict(calib=calib, labels=labels, finetune="layer"),
        "e2e": dict(calib=calib, labels=labels, finetune="e2e"),
    }[variant]
    name = f"onnxvq pq k={k} d={d} {variant}"
    path = os.path.join(out, f"{stem(sample)}.pq_k{k}_d{d}.{variant}.onnx")
    start = time.perf_counter()
    try:
        result = onnxvq.compress(sample.path, method="pq", k=k, d=d, **options)
    except ImportError as error:  # e2e needs onnxvq.finetune.torch_graph
        return Row(name, None, 0, None, f"unavailable: {error}"), None
    result.save(path)
    seconds = time.perf_counter() - start
    return Row(name, seconds, size(path), top1(path, sample)), result.summary.calibration


def load_mnist_sample(model: str) -> Sample:
    from mnist_data import load_mnist

    train_x, train_y, test_x, test_y = load_mnist()
    pick = np.sort(np.random.default_rng(SEED).choice(len(train_x), MNIST_CALIB, replace=False))
    return Sample(
        f"MNIST CNN ({model}), 10,000 test images; calibration: {MNIST_CALIB} seeded random MNIST training images",
        model, "image", test_x, test_y, train_x[pick], train_y[pick], [(256, 8), (16, 8)],
    )


def load_digits_sample(out: str) -> Sample:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from digits_mlp import build_digits_mlp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, test_x, test_y = build_digits_mlp(seed=SEED)
    path = os.path.join(out, "digits_mlp.onnx")
    onnx.save(model, path)
    # digits_mlp.train_digits_mlp's split, repeated here to get its training part.
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)
    if not (np.array_equal(x_test, test_x) and np.array_equal(y_test, test_y)):
        raise SystemExit("error: could not reproduce samples/digits_mlp.py's train/test split")
    return Sample(
        f"digits MLP (samples/digits_mlp.py, seed {SEED}), {len(test_y)} test images; "
        f"calibration: its {len(y_train)} training images",
        path, "x", test_x, test_y, x_train, y_train, [(256, 4), (16, 4)],
    )


def run_sample(sample: Sample, settings, with_labels: bool, out: str) -> None:
    rows = [Row("fp32 (original)", None, size(sample.path), top1(sample.path, sample))]
    rows.append(ort_int8(sample, out))
    rows.append(ort_4bit(sample, out))
    qualities = []
    for k, d in settings:
        for variant in VARIANTS:
            row, calibration = onnxvq_variant(sample, k, d, variant, with_labels, out)
            rows.append(row)
            if calibration:
                qualities.append((row.name, calibration))
            print(f"  done: {row.name} ({row.seconds or 0:.1f} s)", file=sys.stderr, flush=True)

    base_size, base_acc = rows[0].nbytes, rows[0].top1
    print(f"### {sample.title}")
    print()
    print("| variant | compress s | file size | ratio vs fp32 file | top-1 | Δ top-1 (pp) |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        if row.top1 is None:
            print(f"| {row.name} | - | - | - | - | - |")
            continue
        seconds = "-" if row.seconds is None else f"{row.seconds:.2f}"
        print(
            f"| {row.name} | {seconds} | {row.nbytes / 1e3:,.1f} kB | {base_size / row.nbytes:.1f}x "
            f"| {100 * row.top1:.2f}% | {100 * (row.top1 - base_acc):+.2f} |"
        )
    notes = [f"{row.name}: {row.note}" for row in rows if row.note]
    if notes:
        print()
        for note in notes:
            print(f"- {note}")
    print()
    print("Output quality onnxvq measured on the held-back calibration samples (vs the fp32 model):")
    print()
    for name, calibration in qualities:
        stages = "; ".join(f"{stage}: {quality.format()}" for stage, quality in calibration["quality"].items())
        extra = f" [fallback: {calibration['fallback']}]" if calibration.get("fallback") else ""
        print(f"- {name} (mode {calibration['mode']}, {calibration['samples']} samples, "
              f"{calibration['held_back']} held back): {stages}{extra}")
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="samples/out/mnist_cnn.onnx", help="the MNIST sample CNN")
    parser.add_argument("--labels", action="store_true", help="also pass the calibration images' labels (task loss)")
    parser.add_argument("--quick", action="store_true", help="only MNIST at k=256 d=8 (smoke test)")
    parser.add_argument("--out", help="folder for the files (default: a new temporary folder)")
    args = parser.parse_args(argv)
    if not os.path.exists(args.model):
        hint = f"build it with `python samples/mnist_cnn.py --out {args.model}`"
        print(f"error: {args.model} not found; {hint}", file=sys.stderr)
        return 1
    try:
        import torch
    except ImportError:  # fine-tuning needs torch; compress reports that itself
        pass
    else:
        torch.use_deterministic_algorithms(True)  # e2e on CPU is not bit-exact otherwise (see above)
    out = args.out or tempfile.mkdtemp(prefix="onnxvq-finetune-compare-")
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()

    print(f"onnxruntime {ort.__version__}, onnxvq {onnxvq.__version__}; calibration "
          f"{'with labels (distillation + task loss)' if args.labels else 'without labels (distillation only)'}; "
          f"files in {out}")
    print()
    mnist = load_mnist_sample(args.model)
    run_sample(mnist, mnist.settings[:1] if args.quick else mnist.settings, args.labels, out)
    if not args.quick:
        digits = load_digits_sample(out)
        run_sample(digits, digits.settings, args.labels, out)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
