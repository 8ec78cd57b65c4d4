"""Weights computed from constants (torch's LSTM gate reordering) are folded, then compressed."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

import onnxvq
from models import make_model, rng, run_ort, weight
from onnxvq.candidates import find_layers
from onnxvq.weight_folding import fold_weight_chains

HIDDEN, SIZE, SEQ, BATCH = 16, 8, 7, 2


def _reordered(name: str, source: str, width: int) -> list:
    """Nodes computing ``name`` (1, 4H, width) from ``source`` (4H, width) with the gate blocks
    reordered (i, f, g, o) -> (i, o, f, g), as torch's exporter writes an LSTM."""
    nodes = []
    for gate, start in enumerate((0, 3, 1, 2)):
        nodes.append(helper.make_node("Slice", [source, f"s{start}", f"e{start}", "axis0"], [f"{name}_g{gate}"]))
    nodes += [
        helper.make_node("Concat", [f"{name}_g{g}" for g in range(4)], [f"{name}_cat"], axis=0),
        helper.make_node("Unsqueeze", [f"{name}_cat", "axis0"], [name]),
    ]
    return nodes


def torch_style_lstm(in_branch: bool):
    w_ih, w_hh = weight((4 * HIDDEN, SIZE), 1), weight((4 * HIDDEN, HIDDEN), 2)
    bounds = []
    for gate in range(4):
        bounds += [numpy_helper.from_array(np.array([gate * HIDDEN], np.int64), f"s{gate}"),
                   numpy_helper.from_array(np.array([(gate + 1) * HIDDEN], np.int64), f"e{gate}")]
    chain = _reordered("W", "w_ih", SIZE) + _reordered("R", "w_hh", HIDDEN)
    lstm = helper.make_node("LSTM", ["x", "W", "R"], ["Y"], hidden_size=HIDDEN)
    inits = [numpy_helper.from_array(w_ih, "w_ih"), numpy_helper.from_array(w_hh, "w_hh"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0"), *bounds]
    out = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)]
    x_info = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SEQ, BATCH, SIZE])]
    if not in_branch:
        return make_model([*chain, lstm], x_info, out, inits)
    lstm.output[0] = "Y_branch"
    branch = helper.make_graph([*chain, lstm], "branch", [], [helper.make_tensor_value_info("Y_branch", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Unsqueeze", ["n", "axis1"], ["Y2"])],
                              "other", [], [helper.make_tensor_value_info("Y2", TensorProto.FLOAT, None)])
    node = helper.make_node("If", ["flag"], ["Y"], then_branch=branch, else_branch=other)
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    return make_model([node], x_info + [helper.make_tensor_value_info("flag", TensorProto.BOOL, [])], out, inits)


def _feeds(in_branch: bool):
    feeds = {"x": rng(3).standard_normal((SEQ, BATCH, SIZE)).astype(np.float32)}
    if in_branch:
        feeds["flag"] = np.array(True)
    return feeds


def test_folding_keeps_the_outputs_and_makes_the_lstm_a_layer():
    for in_branch in (False, True):
        original = torch_style_lstm(in_branch)
        model = ir.serde.deserialize_model(original)
        layers, left = find_layers(model)
        assert not layers and [a.op_type for a in left] == ["LSTM"]  # W and R are computed
        assert sorted(fold_weight_chains(model)) == ["R", "W"]
        layers, left = find_layers(model)
        assert [l.op_type for l in layers] == ["LSTM"] and not left
        assert layers[0].weight_shape == (1, 4 * HIDDEN, SIZE + HIDDEN)
        folded = ir.serde.serialize_model(model)
        names = {i.name for i in folded.graph.initializer}
        assert "w_ih" not in names and "w_hh" not in names  # nothing else read them
        np.testing.assert_allclose(run_ort(folded, _feeds(in_branch))[0], run_ort(original, _feeds(in_branch))[0],
                                   rtol=1e-6, atol=1e-6)


def test_a_folded_lstm_inside_a_branch_is_compressed():
    original = torch_style_lstm(in_branch=True)
    result = onnxvq.compress(original, k=64, d=4, min_size=0)
    compressed = result.to_proto()
    branch = next(a.g for a in compressed.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in branch.node] == ["VQLSTM"]
    feeds = _feeds(True)
    got = run_ort(compressed, feeds)[0]
    twin = ir.serde.serialize_model(onnxvq.decompress(compressed))
    np.testing.assert_allclose(got, run_ort(twin, feeds)[0], rtol=1e-5, atol=1e-5)
    reference = run_ort(original, feeds)[0]
    assert np.sum((got - reference) ** 2) / np.sum(reference**2) < 0.3


def test_shapes_and_indices_computed_from_constants_are_not_touched():
    nodes = [
        helper.make_node("Shape", ["table"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["rows"]),
        helper.make_node("Add", ["x", "rows_f"], ["y"]),
        helper.make_node("Cast", ["rows"], ["rows_f"], to=TensorProto.FLOAT),
    ]
    model = make_model(
        [nodes[0], nodes[1], nodes[3], nodes[2]],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(weight((5, 3), 1), "table"), numpy_helper.from_array(np.array(0, np.int64), "zero")],
    )
    ir_model = ir.serde.deserialize_model(model)
    assert fold_weight_chains(ir_model) == []
    assert len(list(ir_model.graph)) == 4
