"""The graph walk gives each layer the inputs a full run of the current model gives it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import cnn, make_model, weight
from onnxvq.activations import capture_inputs
from onnxvq.calibration import load_calibration
from onnxvq.candidates import find_layers
from onnxvq.graph_walk import GraphWalk


def _skip_model():
    """Conv (Constant weight) -> Relu -> Conv -> Add(skip) -> Reshape by a shape taken early ->
    Gemm -> Relu -> MatMul: a skip connection and an int64 value both cross layer boundaries."""
    w1, w2 = weight((8, 3, 3, 3), 1), weight((8, 8, 3, 3), 2)
    w3, w4 = weight((16, 8 * 8 * 8), 3), weight((16, 5), 4)
    nodes = [
        helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1)),
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Shape", ["r1"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "minus_one"], ["flat_shape"], axis=0),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["sum"]),
        helper.make_node("Reshape", ["sum", "flat_shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w3"], ["g"], name="fc1", transB=1),
        helper.make_node("Relu", ["g"], ["r3"]),
        helper.make_node("MatMul", ["r3", "w4"], ["y"], name="fc2"),
    ]
    inits = [
        numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(w3, "w3"), numpy_helper.from_array(w4, "w4"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
    )


def _grams(data):
    q = data.inputs.reshape(-1, data.inputs.shape[-1]).astype(np.float64)
    o = data.reference_inputs.reshape(-1, data.inputs.shape[-1]).astype(np.float64)
    return q.T @ q, q.T @ o, o.T @ o


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("build, side", [(_skip_model, 8), (cnn, 16)])
def test_walk_equals_a_full_capture_of_the_current_model(build, side, half):
    """Exactly with float32 frontiers; within float16 rounding with half ones."""
    proto = build()
    model = ir.serde.deserialize_model(proto)
    feeds = [{"x": np.random.default_rng(i).standard_normal((2, 3, side, side)).astype(np.float32)} for i in range(5)]
    calib = load_calibration(feeds, model)
    layers, _ = find_layers(model)
    assert len(layers) == 4
    originals = {l.weight.name: l.weight_array() for l in layers}
    current = {name: 0.8 * w + 0.05 * np.random.default_rng(7).standard_normal(w.shape).astype(np.float32)
               for name, w in originals.items()}
    walk = GraphWalk(model, calib, weights=originals, max_rows=10**6, batch_size=4, seed=0, half=half)
    for layer in layers:
        assert walk.follows([layer])
        walked = walk.inputs([layer], current)
        full = capture_inputs(model, [layer], calib, quantized=current, max_rows=10**6,
                              positions_per_batch=10**6, batch_size=4, moments=False)[layer.weight.name]
        assert walked.inputs.shape == full.inputs.shape and walked.count == full.count
        for ours, theirs in zip(_grams(walked), _grams(full)):
            scale = np.abs(theirs).max()
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=(2e-3 if half else 1e-6) * scale)
    # one segment up to each layer (none before a layer that reads the graph input)
    assert walk.segments_run == (4 if build is _skip_model else 3)
    assert not walk.follows([layers[0]])  # the walk only goes forward
    # the model the walk read is as it was: same names, same tensors
    assert [v.name for v in model.graph.initializers.values()] == [i.name for i in proto.graph.initializer]
    again = ir.serde.serialize_model(model)
    assert {i.name for i in again.graph.initializer} == {i.name for i in proto.graph.initializer}


def _cnn_setup(samples: int):
    """(model, calibration set of ``samples`` feeds of 2 images, layers, original weights)."""
    model = ir.serde.deserialize_model(cnn())
    feeds = [{"x": np.random.default_rng(i).standard_normal((2, 3, 16, 16)).astype(np.float32)} for i in range(samples)]
    layers, _ = find_layers(model)
    return model, load_calibration(feeds, model), layers, {l.weight.name: l.weight_array() for l in layers}


def test_walk_pairs_the_same_positions_and_is_seeded():
    model, calib, layers, originals = _cnn_setup(4)
    runs = []
    for _ in range(2):
        walk = GraphWalk(model, calib, weights=originals, max_rows=40, batch_size=4, seed=3)
        runs.append([walk.inputs([layer], originals) for layer in layers])
    for first, second in zip(*runs):
        np.testing.assert_array_equal(first.inputs, second.inputs)
        # unchanged weights: the current model is the original, position for position
        np.testing.assert_array_equal(first.inputs, first.reference_inputs)
    assert runs[0][1].inputs.shape == (40, 1, 32 * 9)


def test_graphs_with_control_flow_are_not_walked():
    then_branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["t"])], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)]
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"])], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)]
    )
    nodes = [
        helper.make_node("If", ["cond"], ["h"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="fc"),
    ]
    proto = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(weight((8, 4), 1), "w")],
    )
    model = ir.serde.deserialize_model(proto)
    calib = load_calibration([{"x": np.ones((2, 8), np.float32), "cond": np.array(True)}], model)
    layers, _ = find_layers(model)
    walk = GraphWalk(model, calib, weights={"w": layers[0].weight_array()}, max_rows=8, batch_size=4, seed=0)
    assert not walk.follows(layers)


def test_frontiers_past_the_byte_budget_keep_the_first_batches():
    model, calib, layers, originals = _cnn_setup(6)
    # 6 batches of one sample (2 rows); at conv2 the frontier is relu1's (2, 32, 16, 16) float32,
    # 64 KiB per batch, twice (original and current): 2 batches fit in 300 KiB
    walk = GraphWalk(model, calib, weights=originals, max_rows=10**6, batch_size=2, seed=0, max_bytes=300 << 10,
                     half=False)
    first = walk.inputs([layers[0]], originals)
    assert first.count == 6 * 2 * 16 * 16 and walk.batches_dropped == 0
    second = walk.inputs([layers[1]], originals)
    assert walk.batches_dropped == 4 and second.count == 2 * 2 * 8 * 8  # stride 2: 8 x 8 positions
    assert walk.frontier_bytes <= 300 << 10
