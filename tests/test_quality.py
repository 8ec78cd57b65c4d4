"""Tier 3, quality: compressed vs original on a real trained model (scikit-learn digits MLP).

The digits MLP (64-256-256-10, trained by samples/digits_mlp.py on scikit-learn's bundled digits)
scores about 98% on its held-out quarter. Measured with pq and no data: 96.9% at k=256, d=4 and
94.9% at k=16, d=4. The bounds below leave a margin for BLAS differences between machines.
"""

import numpy as np
import pytest

import onnxvq
from models import run_ort

digits_mlp = pytest.importorskip("digits_mlp")


@pytest.fixture(scope="module")
def digits():
    model, x_test, y_test = digits_mlp.build_digits_mlp(seed=0)
    return model, x_test, y_test


def accuracy(model, x, y) -> float:
    return float((run_ort(model, {"x": x})[0].argmax(axis=1) == y).mean())


def test_pq_keeps_accuracy_on_a_real_model(digits):
    model, x, y = digits
    baseline = accuracy(model, x, y)
    assert baseline > 0.95
    fine = onnxvq.compress(model, k=256, d=4, min_size=0)
    coarse = onnxvq.compress(model, k=16, d=4, min_size=0)
    fine_acc, coarse_acc = accuracy(fine.to_proto(), x, y), accuracy(coarse.to_proto(), x, y)
    assert fine_acc >= baseline - 0.03
    assert coarse_acc >= baseline - 0.08
    # more codewords, same d: every layer's weights are closer to the original
    for a, b in zip(fine.summary.layers, coarse.summary.layers):
        assert a.sqnr_db > b.sqnr_db + 3
    assert fine.summary.literature_ratio > 10 and coarse.summary.literature_ratio > 20


def test_sqnr_falls_as_d_grows(digits):
    model = digits[0]
    sqnr = {d: np.mean([l.sqnr_db for l in onnxvq.compress(model, k=256, d=d, min_size=0).summary.layers])
            for d in (2, 4, 8)}
    assert sqnr[2] > sqnr[4] > sqnr[8]
