"""A real trained model without torch: an MLP on scikit-learn's bundled digits, built as ONNX by hand.

``sklearn.datasets.load_digits`` ships inside scikit-learn (1,797 8x8 images of digits, pixel
values 0..16), so nothing is downloaded. An ``MLPClassifier`` with two hidden layers of 256 ReLU
units is trained on 75% of it, and its weights are written into the equivalent ONNX graph::

    x (N, 64) float32 -> Gemm(transB=1) -> Relu -> Gemm(transB=1) -> Relu -> Gemm(transB=1) -> logits (N, 10)

Pixels are scaled to [0, 1] (``x = pixels / 16``) before training and are expected that way by
the ONNX model; ``x_test`` returned by :func:`build_digits_mlp` is already scaled. The logits are
the MLP's pre-softmax outputs, so their argmax is ``MLPClassifier.predict``.

Library use (tests use this; it takes a few seconds)::

    from digits_mlp import build_digits_mlp
    model, x_test, y_test = build_digits_mlp(seed=0)

Script use, from the repository root (writes the model and checks sklearn and onnxruntime agree)::

    python samples/digits_mlp.py [--out samples/out/digits_mlp.onnx] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["HIDDEN", "build_digits_mlp", "train_digits_mlp"]

HIDDEN = (256, 256)
OPSET = 17
IR_VERSION = 8  # what common exporters write; onnxvq raises it to 10 when its ops need that


def train_digits_mlp(seed: int = 0):
    """Train the MLP; returns ``(classifier, x_test float32, y_test int64)``."""
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    classifier = MLPClassifier(
        hidden_layer_sizes=HIDDEN,
        activation="relu",
        alpha=1e-4,
        batch_size=200,
        learning_rate_init=1e-3,
        max_iter=60,
        random_state=seed,
    )
    # One BLAS thread: these matrices are small, and OpenBLAS threads that spin-wait for a busy
    # core (tests run in parallel, CI machines are shared) made the fit 5-20x slower in practice.
    with threadpool_limits(1, user_api="blas"), warnings.catch_warnings():
        # A fixed, small number of epochs keeps the build to a few seconds; the MLP is at about
        # 98% test accuracy by then even if the loss has not fully flattened.
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(x_train, y_train)
    return classifier, x_test, y_test


def to_onnx(classifier) -> onnx.ModelProto:
    """The ONNX graph computing the classifier's logits (its output layer before softmax)."""
    if classifier.activation != "relu" or classifier.out_activation_ != "softmax":
        raise ValueError("only ReLU hidden layers and a softmax output are translated")
    initializers, nodes = [], []
    previous = "x"
    n_layers = len(classifier.coefs_)
    for i, (weight, bias) in enumerate(zip(classifier.coefs_, classifier.intercepts_)):
        name = f"fc{i + 1}"
        # sklearn stores (in, out); the (out, in) layout with transB=1 is that of torch's Linear
        # and of most exported models, so onnxvq sees this model the way it sees theirs.
        weight_out_in = np.ascontiguousarray(weight.T, dtype=np.float32)
        initializers.append(numpy_helper.from_array(weight_out_in, f"{name}.weight"))
        initializers.append(numpy_helper.from_array(bias.astype(np.float32), f"{name}.bias"))
        last = i == n_layers - 1
        out = "logits" if last else f"{name}_out"
        inputs = [previous, f"{name}.weight", f"{name}.bias"]
        nodes.append(helper.make_node("Gemm", inputs, [out], name=f"{name}/Gemm", transB=1))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"{name}_relu"], name=f"{name}/Relu"))
            out = f"{name}_relu"
        previous = out

    n_in, n_out = classifier.coefs_[0].shape[0], classifier.coefs_[-1].shape[1]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_out])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="onnxvq-samples",
        doc_string="sklearn MLPClassifier on load_digits (8x8, pixels/16) -> logits; onnxvq sample",
    )
    helper.set_model_props(model, {"labels": json.dumps([str(c) for c in classifier.classes_])})
    onnx.checker.check_model(model, full_check=True)
    return model


def build_digits_mlp(seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """Train the MLP and return ``(model, x_test float32 (N, 64) in [0, 1], y_test int64)``.

    The same seed gives the same split, the same weights and the same model bytes.
    """
    classifier, x_test, y_test = train_digits_mlp(seed)
    return to_onnx(classifier), x_test, y_test


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="samples/out/digits_mlp.onnx", help="ONNX file to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of the MLP")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    classifier, x_test, y_test = train_digits_mlp(args.seed)
    model = to_onnx(classifier)
    build_seconds = time.perf_counter() - start

    sk_predicted = classifier.predict(x_test)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"x": x_test})[0]
    ort_predicted = classifier.classes_[logits.argmax(axis=1)]

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    onnx.save_model(model, args.out)
    n_params = sum(w.size + b.size for w, b in zip(classifier.coefs_, classifier.intercepts_))
    print(f"trained MLP {HIDDEN} ({n_params:,} parameters, {classifier.n_iter_} epochs) "
          f"and built ONNX in {build_seconds:.1f} s")
    print(f"test accuracy ({len(y_test)} images): sklearn {np.mean(sk_predicted == y_test):.4f}, "
          f"onnxruntime {np.mean(ort_predicted == y_test):.4f}")
    print(f"wrote {args.out} ({os.path.getsize(args.out):,} bytes)")
    disagreements = int(np.sum(sk_predicted != ort_predicted))
    if disagreements:
        print(f"error: onnxruntime and sklearn disagree on {disagreements} image(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
