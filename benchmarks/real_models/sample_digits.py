"""The project's own digits MLP (``samples/digits_mlp.py``: scikit-learn's bundled 8x8 digits,
an MLP 64-256-256-10 trained in seconds and written as ONNX Gemms), as a small sanity row.

Data: the real digits, not synthesised: the eval set is the sample's 25% test split (450
images, labels exact), the calibration set random images of its training split (no labels).
The model is built once into the suite's cache folder.

Metric (headline ``accuracy``): top-1 accuracy on the test split.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import common
from common import Evaluation

NAME = "digits_mlp"
TITLE = "onnxvq sample digits MLP (scikit-learn digits), classification"
METRIC = "accuracy"
SEED = 0  # the sample's split and training seed
SIZES = {"eval": 450, "calib": 64, "eval_quick": 450, "calib_quick": 32}
_SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def _split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    # the same call as samples/digits_mlp.py, so the test split is the one the MLP never saw
    return train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)


def model_path():
    path = Path(common.CACHE_DIR) / "digits_mlp.onnx"
    if not path.exists():
        sys.path.insert(0, str(_SAMPLES))
        from digits_mlp import build_digits_mlp

        model, _, _ = build_digits_mlp(seed=SEED)
        path.parent.mkdir(parents=True, exist_ok=True)
        import onnx

        onnx.save(model, str(path))
    return path


def make_eval_set(seed: int, n: int) -> list[dict]:
    _, x_test, _, y_test = _split()
    return [{"feed": {"x": x_test[i:i + 50]}, "labels": y_test[i:i + 50]} for i in range(0, min(n, len(x_test)), 50)]


def make_calib_set(seed: int, n: int) -> list[dict[str, np.ndarray]]:
    x_train = _split()[0]
    pick = np.random.default_rng(seed).choice(len(x_train), size=n, replace=False)
    return [{"x": x_train[i:i + 1]} for i in pick]


def evaluate(sess, eval_set: list[dict], reference: Evaluation | None = None) -> Evaluation:
    outputs = [sess.run(None, s["feed"])[0] for s in eval_set]
    pred = np.concatenate([o.argmax(1) for o in outputs])
    metrics = {"accuracy": float(np.mean(pred == np.concatenate([s["labels"] for s in eval_set])))}
    if reference is not None:
        metrics["agree_fp32"] = float(np.mean(pred == np.concatenate(reference.extra)))
    return Evaluation(metrics, outputs, [o.argmax(1) for o in outputs])
