"""Models already quantized by onnxruntime (QDQ): their int8 weights are dequantized and encoded."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

import onnxvq
from models import cnn, rng, run_ort
from onnxvq.candidates import find_layers

FEEDS = {"x": rng(50).standard_normal((2, 3, 16, 16)).astype(np.float32)}
CALIB = [{"x": rng(60 + i).standard_normal((2, 3, 16, 16)).astype(np.float32)} for i in range(8)]


class _Reader(CalibrationDataReader):
    def __init__(self):
        self.feeds = iter(CALIB)

    def get_next(self):
        return next(self.feeds, None)


@pytest.fixture(scope="module", params=[True, False], ids=["per_channel", "per_tensor"])
def qdq(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("qdq")
    onnx.save(cnn(), folder / "fp32.onnx")
    quantize_static(str(folder / "fp32.onnx"), str(folder / "qdq.onnx"), _Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=request.param, weight_type=QuantType.QInt8)
    return onnx.load(folder / "qdq.onnx")


def _weight_dequantizers(model: onnx.ModelProto) -> list[str]:
    """DequantizeLinear nodes whose integer input is an initializer (the weights)."""
    inits = {i.name for i in model.graph.initializer}
    return [n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
            and not n.input[0].startswith("b")]  # biases stay as onnxruntime quantized them


def test_qdq_weights_are_layers_counted_at_their_stored_bytes(qdq):
    layers, left = find_layers(ir.serde.deserialize_model(qdq))
    assert [l.name for l in layers] == ["conv1", "conv2", "fc1", "fc2"] and not left
    assert all(l.source and "DequantizeLinear" in l.source for l in layers)
    conv2 = layers[1]
    assert conv2.weight_dtype == ir.DataType.FLOAT and conv2.size == 64 * 32 * 9
    assert 64 * 32 * 9 <= conv2.nbytes <= 64 * 32 * 9 + 64 * 5  # int8, a scale and zero point per channel


def test_qdq_model_compresses_further_and_runs(qdq):
    assert len(_weight_dequantizers(qdq)) == 4
    result = onnxvq.compress(qdq, k=256, d=2, min_size=0)
    compressed = result.to_proto()
    onnx.checker.check_model(compressed)
    # an encoded weight's int8 tensor and DequantizeLinear are gone; one whose encoding would be
    # bigger than its int8 form (conv1: 864 weights, a 1 kB codebook) stays as it was
    dense = {l.weight for l in result.summary.layers if not l.compressed}
    assert dense and "encoded" in result.summary.layers[0].rule and set(_weight_dequantizers(compressed)) == dense
    assert len([n for n in compressed.graph.node if n.domain == onnxvq.ops.DOMAIN]) == 4 - len(dense)
    assert sum(n.op_type == "QuantizeLinear" for n in compressed.graph.node) == sum(
        n.op_type == "QuantizeLinear" for n in qdq.graph.node)  # activation quantization as it was
    assert len(compressed.SerializeToString()) < len(qdq.SerializeToString())
    got, quantized = run_ort(compressed, FEEDS)[0], run_ort(qdq, FEEDS)[0]
    error = np.sum((got - quantized) ** 2) / np.sum(quantized**2)
    assert error < 0.05  # 4 bits per weight on top of int8
    twin = ir.serde.serialize_model(onnxvq.decompress(compressed))
    np.testing.assert_allclose(got, run_ort(twin, FEEDS)[0], rtol=1e-5, atol=1e-5)
    assert all(l.source and "DequantizeLinear" in l.source for l in result.summary.compressed_layers)
    assert "were integer weights behind a DequantizeLinear" in result.summary.format()


def test_size_target_on_a_qdq_model_measures_its_layers(qdq):
    result = onnxvq.compress(qdq, target_ratio=1.5, calib=CALIB, finetune="none")
    compressed = result.to_proto()
    assert len(qdq.SerializeToString()) / len(compressed.SerializeToString()) >= 1.5
    quantized = run_ort(qdq, FEEDS)[0]
    error = np.sum((run_ort(compressed, FEEDS)[0] - quantized) ** 2) / np.sum(quantized**2)
    assert error < 0.1
