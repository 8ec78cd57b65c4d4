"""Conv -> BatchNormalization pairs and constant bias Adds folded into the Conv before compression."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

import onnxvq
from models import make_model, rng, run_ort, weight
from onnxvq.conv_folding import fold_batch_norms, fold_bias_adds


def _bn_params(prefix: str, channels: int, seed: int) -> list:
    r = rng(seed)
    arrays = {"scale": r.uniform(0.2, 3.0, channels), "B": r.standard_normal(channels),
              "mean": r.standard_normal(channels), "var": r.uniform(0.01, 4.0, channels)}
    return [numpy_helper.from_array(a.astype(np.float32), f"{prefix}.{n}") for n, a in arrays.items()]


def _model():
    """conv1 (bias) -> bn1 -> Relu -> conv2 (no bias) -> bn2 (graph output): folded. Left: bn3
    (conv3's output is also read by an Add), bn5 (conv4 shares its weight with conv5), bn6 (it
    reads a Relu)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn1.scale", "bn1.B", "bn1.mean", "bn1.var"], ["n1"],
                         name="bn1", epsilon=1e-3),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("BatchNormalization", ["c2", "bn2.scale", "bn2.B", "bn2.mean", "bn2.var"], ["y"], name="bn2"),
        helper.make_node("Conv", ["r1", "w3"], ["c3"], name="conv3"),
        helper.make_node("BatchNormalization", ["c3", "bn3.scale", "bn3.B", "bn3.mean", "bn3.var"], ["z"], name="bn3"),
        helper.make_node("Add", ["z", "c3"], ["zc"]),
        helper.make_node("Conv", ["zc", "w4"], ["c4"], name="conv4"),
        helper.make_node("BatchNormalization", ["c4", "bn3.scale", "bn3.B", "bn3.mean", "bn3.var"], ["z4"], name="bn5"),
        helper.make_node("Conv", ["z4", "w4"], ["c5"], name="conv5"),
        helper.make_node("Relu", ["c5"], ["rz"]),
        helper.make_node("BatchNormalization", ["rz", "bn3.scale", "bn3.B", "bn3.mean", "bn3.var"], ["u"], name="bn6"),
    ]
    inits = [numpy_helper.from_array(weight((8, 3, 3, 3), 1), "w1"),
             numpy_helper.from_array(rng(2).standard_normal(8).astype(np.float32), "b1"),
             numpy_helper.from_array(weight((6, 8, 1, 1), 3), "w2"), numpy_helper.from_array(weight((6, 8, 1, 1), 9), "w3"),
             numpy_helper.from_array(weight((6, 6, 1, 1), 10), "w4")]
    inits += _bn_params("bn1", 8, 4) + _bn_params("bn2", 6, 5) + _bn_params("bn3", 6, 6)
    return make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None), helper.make_tensor_value_info("u", TensorProto.FLOAT, None)],
        inits,
    )


def test_folded_pairs_compute_the_same_outputs():
    original = _model()
    model = ir.serde.deserialize_model(original)
    assert fold_batch_norms(model) == 2
    folded = ir.serde.serialize_model(model)
    bns = [n.name for n in folded.graph.node if n.op_type == "BatchNormalization"]
    assert bns == ["bn3", "bn5", "bn6"]
    tensors = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    assert not set(tensors) & {"bn1.scale", "bn2.var"} and {"w3", "w4", "bn3.mean"} <= set(tensors)
    # the folded weights and biases keep the user's names (conv2 had no bias: "w2.bias")
    assert tensors["w1"].shape == (8, 3, 3, 3) and tensors["b1"].shape == (8,) and tensors["w2.bias"].shape == (6,)
    assert not np.allclose(tensors["w1"], numpy_helper.to_array(original.graph.initializer[0]))
    assert [o.name for o in folded.graph.output] == ["y", "u"]
    feeds = {"x": rng(7).standard_normal((2, 3, 10, 10)).astype(np.float32)}
    for got, want in zip(run_ort(folded, feeds), run_ort(original, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_compress_folds_and_says_so():
    result = onnxvq.compress(_model(), k=16, d=2, min_size=0)
    assert result.summary.batch_norms_folded == 2
    assert "folded 2 BatchNormalization node(s)" in result.summary.format()
    compressed = result.to_proto()
    assert sum(n.op_type == "BatchNormalization" for n in compressed.graph.node) == 3
    _assert_equals_its_dense_twin(compressed)


def _bias_add_model():
    """Conv -> Add of constants: a (1, C, 1, 1) bias (conv1, which has one), a (C, 1, 1) bias on
    the left (conv2, none), a scalar (conv3), then a BatchNormalization (folded after its Add);
    left: a (C,) addend (broadcasts along the width), an addend the graph computes, and an Add
    whose Conv output is also read elsewhere."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c1", "a1"], ["s1"], name="add1"),
        helper.make_node("Relu", ["s1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["a2", "c2"], ["s2"], name="add2"),
        helper.make_node("Conv", ["s2", "w3"], ["c3"], name="conv3"),
        helper.make_node("Add", ["c3", "a3"], ["s3"], name="add3"),
        helper.make_node("BatchNormalization", ["s3", "bn.scale", "bn.B", "bn.mean", "bn.var"], ["y"], name="bn"),
        helper.make_node("Conv", ["y", "w4"], ["c4"], name="conv4"),
        helper.make_node("Add", ["c4", "a4"], ["s4"], name="add4"),
        helper.make_node("Conv", ["s4", "w5"], ["c5"], name="conv5"),
        helper.make_node("Relu", ["x"], ["rx"]),
        helper.make_node("ReduceMean", ["rx"], ["m"], keepdims=1),
        helper.make_node("Add", ["c5", "m"], ["s5"], name="add5"),
        helper.make_node("Conv", ["s5", "w6"], ["c6"], name="conv6"),
        helper.make_node("Add", ["c6", "a6"], ["s6"], name="add6"),
        helper.make_node("Add", ["s6", "c6"], ["u"]),
    ]
    r = rng(11)
    inits = [numpy_helper.from_array(weight((6, 3, 3, 3), 1), "w1"),
             numpy_helper.from_array(r.standard_normal(6).astype(np.float32), "b1"),
             numpy_helper.from_array(r.standard_normal((1, 6, 1, 1)).astype(np.float32), "a1"),
             numpy_helper.from_array(weight((10, 6, 1, 1), 2), "w2"),
             numpy_helper.from_array(r.standard_normal((10, 1, 1)).astype(np.float32), "a2"),
             numpy_helper.from_array(weight((6, 10, 1, 1), 3), "w3"),
             numpy_helper.from_array(np.float32(0.75), "a3"),
             numpy_helper.from_array(weight((10, 6, 1, 1), 4), "w4"),
             numpy_helper.from_array(r.standard_normal(10).astype(np.float32), "a4"),
             numpy_helper.from_array(weight((10, 10, 1, 1), 5), "w5"),
             numpy_helper.from_array(weight((6, 10, 1, 1), 6), "w6"),
             numpy_helper.from_array(r.standard_normal((1, 6, 1, 1)).astype(np.float32), "a6")]
    inits += _bn_params("bn", 6, 12)
    return make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 10, 10])],
        [helper.make_tensor_value_info("u", TensorProto.FLOAT, None)],
        inits,
    )


def test_bias_adds_fold_into_the_conv_bias():
    original = _bias_add_model()
    model = ir.serde.deserialize_model(original)
    assert fold_bias_adds(model) == 3
    assert fold_batch_norms(model) == 1  # the BatchNormalization now reads conv3 directly
    folded = ir.serde.serialize_model(model)
    adds = [n.name for n in folded.graph.node if n.op_type == "Add"]
    assert adds == ["add4", "add5", "add6", ""]
    convs = {n.name: list(n.input) for n in folded.graph.node if n.op_type == "Conv"}
    # conv1 keeps its bias's name, conv2 gets one; each Conv's output takes the Add's name
    assert convs["conv1"] == ["x", "w1", "b1"] and convs["conv2"] == ["r1", "w2", "w2.bias"]
    assert convs["conv3"][0] == "s2" and len(convs["conv6"]) == 2
    tensors = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    assert "a1" not in tensors and "a2" not in tensors and "a4" in tensors
    np.testing.assert_allclose(tensors["w2.bias"], numpy_helper.to_array(original.graph.initializer[4]).reshape(-1))
    feeds = {"x": rng(7).standard_normal((2, 3, 10, 10)).astype(np.float32)}
    for got, want in zip(run_ort(folded, feeds), run_ort(original, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_compress_folds_bias_adds_and_says_so():
    result = onnxvq.compress(_bias_add_model(), k=16, d=2, min_size=0)
    assert result.summary.bias_adds_folded == 3 and result.summary.batch_norms_folded == 1
    assert "folded 3 constant bias Add node(s)" in result.summary.format()
    compressed = result.to_proto()
    assert sum(n.op_type == "Add" for n in compressed.graph.node) == 4
    _assert_equals_its_dense_twin(compressed)


def _assert_equals_its_dense_twin(compressed) -> None:
    """The compressed model computes what its decompressed twin does (the folded Conv included)."""
    twin = ir.serde.serialize_model(onnxvq.decompress(compressed))
    feeds = {"x": rng(8).standard_normal((2, 3, 10, 10)).astype(np.float32)}
    for got, want in zip(run_ort(compressed, feeds), run_ort(twin, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
