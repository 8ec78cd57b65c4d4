"""onnxruntime's integer ops (quantize_dynamic): converted to float layers, encoded, or put back."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

import onnxvq
from models import cnn, make_model, rng, run_ort
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
