"""How good is ``--rank auto``? Its pick against a full sweep of the rank, on real layers.

For each real layer (the trained MNIST CNN's conv2 and fc1, the digits MLP's fc1 and fc2), each
subvector size m (8 and 16) and k = 256, the layer is encoded with ``lr2vq`` at every rank
1..m, and the final error of each is measured; ``--rank auto`` must land within 10% of the best.
Errors are relative: ``||W^ - W||^2 / ||W||^2`` without data, and the output error
``sum_r (w^_r - w_r)' H (w^_r - w_r) / sum_r w_r' H w_r`` with calibration data (``H`` from 512
MNIST training images / the digits training images, captured as ``onnxvq compress --calib`` does).
The table also gives the time of the auto encoding against plain ``pq``.

    python benchmarks/lr2vq_rank.py [--model samples/out/mnist_cnn.onnx]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "samples"))

import onnx_ir as ir  # noqa: E402

from onnxvq.activations import capture_inputs  # noqa: E402
from onnxvq.calibration import load_calibration  # noqa: E402
from onnxvq.candidates import find_layers  # noqa: E402
from onnxvq.layout import WeightLayout  # noqa: E402
from onnxvq.methods import LR2VQParams, PQParams, get_method  # noqa: E402
from onnxvq.weighted_kmeans import output_error  # noqa: E402

SEED = 0


def relative_error(weight, encoded, layout, hessian) -> float:
    target = layout.to_subvectors(weight)
    codewords = encoded.codebook @ encoded.extras.get("projection", np.eye(layout.d))
    if hessian is None:
        decoded = layout.from_subvectors(codewords[encoded.codes])
        return float(((decoded - weight) ** 2).sum() / (weight**2).sum())
    zero = np.zeros((1, layout.d), np.float32)
    total = output_error(target, np.zeros((layout.rows, layout.n_sub), int), zero, hessian)
    return output_error(target, encoded.codes, codewords, hessian) / total


def layers_of(path: str, names: list[str], calib_x: np.ndarray, input_name: str):
    model = ir.load(path)
    layers = [l for l in find_layers(model)[0] if l.weight.name in names]
    calib = load_calibration([{input_name: calib_x[i : i + 1]} for i in range(len(calib_x))], model)
    inputs = capture_inputs(model, layers, calib, seed=SEED)
    return [(l, inputs[l.weight.name]) for l in layers]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="samples/out/mnist_cnn.onnx")
    args = parser.parse_args(argv)
    from mnist_data import load_mnist

    train_x, *_ = load_mnist()
    pick = np.sort(np.random.default_rng(SEED).choice(len(train_x), 512, replace=False))
    cases = [(f"mnist {l.weight.name}", l, x) for l, x in layers_of(args.model, ["conv2.weight", "fc1.weight"], train_x[pick], "image")]
    from finetune_compare import load_digits_sample

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        digits = load_digits_sample(tempfile.mkdtemp())
    cases += [(f"digits {l.weight.name}", l, x) for l, x in layers_of(digits.path, ["fc1.weight", "fc2.weight"], digits.calib_x, "x")]

    print("| layer | m | data | auto rank | its error | best swept rank | best error | auto / best | auto s | pq s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    worst = 0.0
    for label, layer, inputs in cases:
        weight = layer.weight_array().astype(np.float32)
        transposed, row_axes = layer.view()
        for m in (8, 16):
            layout = WeightLayout(weight.shape, transposed, row_axes, m)
            for data in (None, inputs):
                hessian = None if data is None else layout.pad_moment(data.hessian)

                def encode(rank):
                    return get_method("lr2vq").encode(
                        weight, transposed=transposed, row_axes=row_axes, params=LR2VQParams(k=256, d=m, rank=rank),
                        seed=np.random.SeedSequence(SEED), inputs=data,
                    )

                start = time.perf_counter()
                auto = encode("auto")
                auto_seconds = time.perf_counter() - start
                start = time.perf_counter()
                get_method("pq").encode(weight, transposed=transposed, row_axes=row_axes, params=PQParams(k=256, d=m),
                                        seed=np.random.SeedSequence(SEED), inputs=data)
                pq_seconds = time.perf_counter() - start
                sweep = {r: relative_error(weight, encode(r), layout, hessian) for r in range(1, m + 1)}
                best = min(sweep, key=sweep.get)
                chosen = auto.stats["rank"]
                ratio = sweep[chosen] / sweep[best]
                worst = max(worst, ratio)
                print(f"| {label} {tuple(weight.shape)} | {m} | {'weights' if data is None else 'calibration'} "
                      f"| {chosen} | {sweep[chosen]:.4f} | {best} | {sweep[best]:.4f} | {ratio:.3f} "
                      f"| {auto_seconds:.2f} | {pq_seconds:.2f} |", flush=True)
    print()
    print(f"worst auto / best: {worst:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
