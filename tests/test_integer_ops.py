"""onnxruntime's integer ops (quantize_dynamic): converted to float layers, encoded, or put back."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

import onnxvq
from models import cnn, lstm_model, make_model, rng, run_ort, weight
from onnxvq.integer_ops import convert_integer_ops, restore_unencoded

FEEDS = {"x": rng(50).standard_normal((2, 3, 16, 16)).astype(np.float32)}


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dynamic")
    onnx.save(cnn(), folder / "fp32.onnx")
    quantize_dynamic(str(folder / "fp32.onnx"), str(folder / "int8.onnx"), weight_type=QuantType.QInt8,
                     op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    return onnx.load(folder / "int8.onnx")


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_conversion_computes_the_same_integers_and_restores_exactly(dynamic):
    model = ir.serde.deserialize_model(dynamic)
    converted = convert_integer_ops(model)
    assert [c.original.op_type for c in converted] == ["ConvInteger", "ConvInteger", "MatMulInteger", "MatMulInteger"]
    as_float = ir.serde.serialize_model(model)
    assert "ConvInteger" not in _ops(as_float) and "MatMulInteger" not in _ops(as_float)
    np.testing.assert_array_equal(run_ort(as_float, FEEDS)[0], run_ort(dynamic, FEEDS)[0])
    assert restore_unencoded(model, converted) == 4
    restored = ir.serde.serialize_model(model)
    assert _ops(restored) == _ops(dynamic)
    assert sorted(i.name for i in restored.graph.initializer) == sorted(i.name for i in dynamic.graph.initializer)
    np.testing.assert_array_equal(run_ort(restored, FEEDS)[0], run_ort(dynamic, FEEDS)[0])


def test_a_dynamically_quantized_model_compresses_further(dynamic):
    result = onnxvq.compress(dynamic, k=256, d=2, min_size=0)
    compressed = result.to_proto()
    onnx.checker.check_model(compressed)
    encoded = {l.name for l in result.summary.compressed_layers}
    dense = [l for l in result.summary.layers if not l.compressed]
    assert encoded and dense  # conv1 (864 weights) is smaller as int8 than any encoding: kept
    assert _ops(compressed).count("ConvInteger") + _ops(compressed).count("MatMulInteger") == len(dense)
    assert len(compressed.SerializeToString()) < len(dynamic.SerializeToString())
    got, quantized = run_ort(compressed, FEEDS)[0], run_ort(dynamic, FEEDS)[0]
    assert np.sum((got - quantized) ** 2) / np.sum(quantized**2) < 0.05
    twin = ir.serde.serialize_model(onnxvq.decompress(compressed))
    np.testing.assert_allclose(got, run_ort(twin, FEEDS)[0], rtol=1e-5, atol=1e-5)
    text = result.summary.format()
    assert "ConvInteger weights (onnxruntime's dynamic quantization)" in text
    assert "no layer was compressed" not in text
    assert all(l.bytes_before < 4 * l.params for l in result.summary.layers)  # counted at int8


def test_nothing_encoded_leaves_the_integer_model_as_it_was(dynamic):
    result = onnxvq.compress(dynamic, k=256, d=8, min_size=10**9)
    compressed = result.to_proto()
    assert _ops(compressed) == _ops(dynamic)
    np.testing.assert_array_equal(run_ort(compressed, FEEDS)[0], run_ort(dynamic, FEEDS)[0])


def test_per_row_and_per_channel_zero_points():
    """MatMulInteger with a zero point per row of A and per column of B (checked against the
    definition: onnxruntime runs scalar zero points only), ConvInteger with scalar ones: the
    conversion computes the same int32."""
    r = np.random.default_rng(0)
    a_zp = r.integers(0, 255, (6,)).astype(np.uint8)
    b = r.integers(-127, 127, (32, 40)).astype(np.int8)
    b_zp = r.integers(-5, 5, (40,)).astype(np.int8)
    w = r.integers(-127, 127, (12, 4, 3, 3)).astype(np.int8)
    w_zp = np.array(3, np.int8)
    nodes = [
        helper.make_node("MatMulInteger", ["a", "b", "a_zp", "b_zp"], ["mm"], name="mm"),
        helper.make_node("ConvInteger", ["img", "w", "img_zp", "w_zp"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [6, 32]),
         helper.make_tensor_value_info("img", TensorProto.UINT8, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("mm", TensorProto.INT32, None), helper.make_tensor_value_info("conv", TensorProto.INT32, None)],
        [numpy_helper.from_array(x, n) for x, n in ((a_zp, "a_zp"), (b, "b"), (b_zp, "b_zp"), (w, "w"), (w_zp, "w_zp"),
                                                     (np.array(7, np.uint8), "img_zp"))],
    )
    feeds = {"a": r.integers(0, 255, (6, 32)).astype(np.uint8), "img": r.integers(0, 255, (1, 4, 8, 8)).astype(np.uint8)}
    ir_model = ir.serde.deserialize_model(model)
    assert len(convert_integer_ops(ir_model)) == 2
    mm, conv = run_ort(ir.serde.serialize_model(ir_model), feeds)
    # onnxruntime's MatMulInteger takes scalar zero points only: the definition, in integers
    expected = (feeds["a"].astype(np.int64) - a_zp[:, None]) @ (b.astype(np.int64) - b_zp)
    np.testing.assert_array_equal(mm, expected.astype(np.int32))
    conv_only = onnx.ModelProto()
    conv_only.CopyFrom(model)
    del conv_only.graph.node[0]
    del conv_only.graph.output[0]
    del conv_only.graph.input[0]
    np.testing.assert_array_equal(conv, run_ort(conv_only, {"img": feeds["img"]})[0])


def _nbits_model(tmp_path, k, n, bits, symmetric, *, bias=False, seed=0, hqq=False):
    """(MatMulNBits model from onnxruntime's own quantizer, its fp32 source): an MLP's two
    MatMuls, the first with a bias added to the quantized node (an input onnxruntime takes).
    ``hqq``: the HQQ quantizer, whose zero points are floats like the scales."""
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    fp32 = make_model(
        [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w1"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(weight((k, n), seed), "w0"), numpy_helper.from_array(weight((n, 10), seed + 1), "w1")],
    )
    source = onnx.ModelProto()
    source.CopyFrom(fp32)
    if hqq:
        quantizer = MatMulNBitsQuantizer(source, algo_config=HQQWeightOnlyQuantConfig(block_size=32, bits=bits))
    else:
        quantizer = MatMulNBitsQuantizer(source, bits=bits, block_size=32, is_symmetric=symmetric)
    quantizer.process()
    quantized = quantizer.model.model
    if bias:
        node = next(n for n in quantized.graph.node if n.op_type == "MatMulNBits")
        node.input.extend([""] * (5 - len(node.input)) + ["nbits_bias"])
        quantized.graph.initializer.append(
            numpy_helper.from_array(rng(seed).standard_normal(n).astype(np.float32), "nbits_bias"))
    return quantized, fp32


@pytest.mark.parametrize("bits, symmetric, k, hqq", [(4, True, 64, False), (4, False, 70, False), (8, False, 64, False),
                                                     (8, True, 96, False), (2, False, 64, False), (4, False, 64, True)])
def test_matmulnbits_becomes_the_matmul_it_stands_for(tmp_path, bits, symmetric, k, hqq):
    """The float MatMul computes what onnxruntime's MatMulNBits kernel computes (K not a multiple
    of the block, packed 2/4/8-bit zero points, float ones (HQQ), a bias), and is put back exactly."""
    quantized, _ = _nbits_model(tmp_path, k, 40, bits, symmetric, bias=True, hqq=hqq)
    assert [n.op_type for n in quantized.graph.node].count("MatMulNBits") == 2
    feeds = {"x": rng(3).standard_normal((5, k)).astype(np.float32)}
    want = run_ort(quantized, feeds)[0]
    model = ir.serde.deserialize_model(quantized)
    converted = convert_integer_ops(model)
    as_float = ir.serde.serialize_model(model)
    assert "MatMulNBits" not in _ops(as_float) and _ops(as_float).count("MatMul") == 2
    np.testing.assert_allclose(run_ort(as_float, feeds)[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert restore_unencoded(model, converted) == 2
    restored = ir.serde.serialize_model(model)
    assert _ops(restored) == _ops(quantized)
    np.testing.assert_array_equal(run_ort(restored, feeds)[0], want)


def test_a_4bit_matmulnbits_model_compresses_further(tmp_path):
    quantized, fp32 = _nbits_model(tmp_path, 256, 512, 4, False, seed=1)
    result = onnxvq.compress(quantized, k=256, d=8, min_size=0)
    compressed = result.to_proto()
    onnx.checker.check_model(compressed)
    # the 512 x 10 head is smaller as int4 than with a codebook of 256 x 8: put back as it was
    assert _ops(compressed) == ["VQMatMul", "Relu", "MatMulNBits"]
    assert len(compressed.SerializeToString()) < 0.5 * len(quantized.SerializeToString())
    feeds = {"x": rng(4).standard_normal((8, 256)).astype(np.float32)}
    got, int4 = run_ort(compressed, feeds)[0], run_ort(quantized, feeds)[0]
    assert np.sum((got - int4) ** 2) / np.sum(int4**2) < 0.5  # random weights: a 1-bit code is coarse
    assert "MatMulNBits 4-bit weights (onnxruntime's MatMulNBitsQuantizer)" in result.summary.format()
    twin = ir.serde.serialize_model(onnxvq.decompress(compressed))
    np.testing.assert_allclose(got, run_ort(twin, feeds)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_channel", [False, True])
def test_dynamic_quantize_lstm_becomes_an_lstm(tmp_path, per_channel):
    """DynamicQuantizeLSTM (onnxruntime's quantize_dynamic on an LSTM) becomes the LSTM of its
    dequantized weights: the same outputs but for the per-step activation quantization the float
    op does not do; put back exactly."""
    onnx.save(lstm_model(), tmp_path / "lstm.onnx")
    quantize_dynamic(str(tmp_path / "lstm.onnx"), str(tmp_path / "q.onnx"), op_types_to_quantize=["LSTM"],
                     per_channel=per_channel)
    quantized = onnx.load(tmp_path / "q.onnx")
    assert "DynamicQuantizeLSTM" in _ops(quantized)
    feeds = {"x": rng(8).standard_normal((7, 2, 24)).astype(np.float32)}
    want = run_ort(quantized, feeds)
    model = ir.serde.deserialize_model(quantized)
    converted = convert_integer_ops(model)
    as_float = ir.serde.serialize_model(model)
    assert "LSTM" in _ops(as_float) and "DynamicQuantizeLSTM" not in _ops(as_float)
    for got, expected in zip(run_ort(as_float, feeds), want):  # 30 dB: the 8-bit activations' noise
        assert np.sum((got - expected) ** 2) < 1e-3 * np.sum(expected**2)
    assert restore_unencoded(model, converted) == 1
    restored = ir.serde.serialize_model(model)
    assert _ops(restored) == _ops(quantized)
    for got, expected in zip(run_ort(restored, feeds), want):
        np.testing.assert_array_equal(got, expected)


def test_a_quantized_lstm_is_encoded(tmp_path):
    onnx.save(lstm_model(hidden=64, size=64), tmp_path / "lstm.onnx")
    quantize_dynamic(str(tmp_path / "lstm.onnx"), str(tmp_path / "q.onnx"), op_types_to_quantize=["LSTM"], per_channel=True)
    quantized = onnx.load(tmp_path / "q.onnx")
    result = onnxvq.compress(quantized, k=256, d=2, min_size=0)  # 4 bits per weight: half the int8 bytes
    compressed = result.to_proto()
    assert "VQLSTM" in _ops(compressed) and "DynamicQuantizeLSTM" not in _ops(compressed)
    (layer,) = result.summary.layers
    assert layer.bytes_before < 1.1 * layer.params  # counted at int8
    assert len(compressed.SerializeToString()) < 0.7 * len(quantized.SerializeToString())
    feeds = {"x": rng(9).standard_normal((7, 2, 64)).astype(np.float32)}
    for got, expected in zip(run_ort(compressed, feeds), run_ort(quantized, feeds)):
        assert np.sum((got - expected) ** 2) / np.sum(expected**2) < 0.05
    twin = ir.serde.serialize_model(onnxvq.decompress(compressed))
    for got, expected in zip(run_ort(compressed, feeds), run_ort(twin, feeds)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def qoperator(tmp_path_factory):
    """The sample CNN through onnxruntime's quantize_static in the QOperator format: QLinearConv,
    QGemm (com.microsoft), QLinearMatMul, per-channel int8 weights, uint8 activations."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"x": rng(60 + i).standard_normal((2, 3, 16, 16)).astype(np.float32)} for i in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    folder = tmp_path_factory.mktemp("qoperator")
    onnx.save(cnn(), folder / "fp32.onnx")
    quantize_static(str(folder / "fp32.onnx"), str(folder / "qop.onnx"), Reader(), quant_format=QuantFormat.QOperator,
                    per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    return onnx.load(folder / "qop.onnx")


def test_qoperator_ops_become_float_layers_between_dequantize_and_quantize(qoperator):
    """Within one step of the output's quantization (float vs integer accumulation can round a
    value to the neighbouring level), and put back exactly."""
    assert {"QLinearConv", "QGemm", "QLinearMatMul"} <= set(_ops(qoperator))
    want = run_ort(qoperator, FEEDS)[0]
    model = ir.serde.deserialize_model(qoperator)
    converted = convert_integer_ops(model)
    assert sorted(c.original.op_type for c in converted) == ["QGemm", "QLinearConv", "QLinearConv", "QLinearMatMul"]
    as_float = ir.serde.serialize_model(model)
    assert not {"QLinearConv", "QGemm", "QLinearMatMul"} & set(_ops(as_float))
    step = float(numpy_helper.to_array(next(i for i in qoperator.graph.initializer if i.name == "logits_scale")))
    assert np.abs(run_ort(as_float, FEEDS)[0] - want).max() <= 2 * step + 1e-6
    assert restore_unencoded(model, converted) == 4
    restored = ir.serde.serialize_model(model)
    assert _ops(restored) == _ops(qoperator)
    np.testing.assert_array_equal(run_ort(restored, FEEDS)[0], want)


def test_a_qoperator_model_compresses_further(qoperator):
    result = onnxvq.compress(qoperator, k=256, d=2, min_size=0)
    compressed = result.to_proto()
    onnx.checker.check_model(compressed)
    assert {"VQConv", "VQGemm"} <= set(_ops(compressed))
    assert len(compressed.SerializeToString()) < len(qoperator.SerializeToString())
    got, quantized = run_ort(compressed, FEEDS)[0], run_ort(qoperator, FEEDS)[0]
    assert np.sum((got - quantized) ** 2) / np.sum(quantized**2) < 0.05
    assert "QLinearConv int8 weights (onnxruntime's QOperator quantization)" in result.summary.format()
    twin = ir.serde.serialize_model(onnxvq.decompress(compressed))
    np.testing.assert_allclose(got, run_ort(twin, FEEDS)[0], rtol=1e-5, atol=1e-5)
