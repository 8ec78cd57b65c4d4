"""samples/crnn_digits.py: its digit strings and CTC decoding, and its exported CRNN (LSTM ops)
compressing 8x with both LSTMs encoded."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxvq
from models import run_ort

torch = pytest.importorskip("torch")
crnn = pytest.importorskip("crnn_digits")


def test_digit_strings_are_labelled_exactly_and_ctc_decoding_inverts_an_alignment():
    images, texts = crnn.make_strings(crnn.glyphs()[1], 30, seed=3)
    assert images.shape == (30, 1, crnn.HEIGHT, crnn.WIDTH) and images.min() >= 0 and images.max() <= 1
    assert all(crnn.LENGTHS[0] <= len(t) <= crnn.LENGTHS[1] and t.isdigit() for t in texts)
    # ink where the glyphs are: a string of n digits covers at least 8n columns (10n seen)
    inked = (images[:, 0].max(axis=1) > 0.1).sum(axis=1)
    assert all(inked[i] >= 8 * len(t) for i, t in enumerate(texts))
    # an alignment with repeats and blanks (class 0) between equal neighbours decodes to the text
    alignment = [0, 3, 3, 0, 3, 6, 6, 0, 1, 0]  # "2", "2", "5", "0"
    logits = np.eye(crnn.CLASSES, dtype=np.float32)[alignment][:, None, :]
    assert crnn.ctc_decode(logits) == ["2250"]
    assert crnn.exact_rate(["2250", "1"], ["2250", "7"]) == 0.5


def test_the_exported_crnn_has_lstm_ops_and_compresses_8x_with_them_encoded():
    torch.manual_seed(0)
    data = crnn.export(crnn.build_torch_model())  # untrained: shapes are what this checks
    model = onnx.load_from_string(data)
    assert [n.op_type for n in model.graph.node].count("LSTM") == 2
    result = onnxvq.compress(model, k=256, d=4)
    compressed = result.to_proto()
    assert [n.op_type for n in compressed.graph.node].count("VQLSTM") == 2
    assert len(data) / len(compressed.SerializeToString()) >= 8
    images, _ = crnn.make_strings(crnn.glyphs()[1], 3, seed=4)
    twin = ir.serde.serialize_model(onnxvq.decompress(compressed))
    got, want = run_ort(compressed, {"image": images})[0], run_ort(twin, {"image": images})[0]
    assert got.shape == (crnn.STEPS_OUT, 3, crnn.CLASSES)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
