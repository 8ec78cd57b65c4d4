"""Capturing layer inputs: im2col against onnxruntime's Conv, exact moments, paired captures."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import cnn, make_model, mlp, run_ort, weight
from onnxvq.activations import capture_inputs
from onnxvq.calibration import load_calibration
from onnxvq.candidates import find_layers
from onnxvq.ops import vq_conv, vq_gemm, vq_matmul

CONV_CASES = [
    ((2, 4, 9, 10), (6, 2, 3, 3), dict(pads=[1, 0, 2, 1], strides=[2, 1], dilations=[1, 2], group=2)),
    ((2, 4, 9, 10), (6, 4, 3, 3), dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    ((1, 4, 9, 10), (6, 4, 2, 3), dict(auto_pad="SAME_LOWER", strides=[2, 3])),
    ((2, 4, 9, 10), (8, 1, 3, 3), dict(auto_pad="VALID", group=4)),  # depthwise-like
    ((2, 3, 11), (5, 3, 4), dict(pads=[2, 1], strides=[3])),  # 1-D
    ((1, 2, 5, 6, 7), (4, 2, 2, 3, 2), dict(pads=[1, 0, 1, 0, 1, 1], dilations=[2, 1, 1])),  # 3-D
]


@pytest.mark.parametrize("x_shape, w_shape, attrs", CONV_CASES)
def test_conv_patches_reproduce_onnxruntime_conv(x_shape, w_shape, attrs):
    r = np.random.default_rng(0)
    x = r.standard_normal(x_shape).astype(np.float32)
    w = r.standard_normal(w_shape).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    model = make_model(
        [node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")],
    )
    y = run_ort(model, {"x": x})[0]
    group = attrs.get("group", 1)
    patches = vq_conv.input_vectors(x, w.shape, attrs, np.arange)
    per_group = w.reshape(group, w.shape[0] // group, -1)
    ours = np.einsum("ngc,gpc->ngp", patches, per_group).reshape(len(patches), -1)
    np.testing.assert_allclose(ours, np.moveaxis(y, 1, -1).reshape(-1, w.shape[0]), atol=1e-4)

    picked = vq_conv.input_vectors(x, w.shape, attrs, lambda total: np.array([total - 1, 0]))
    np.testing.assert_array_equal(picked, patches[[-1, 0]])


def test_gemm_and_matmul_vectors():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    every = np.arange
    np.testing.assert_array_equal(vq_matmul.input_vectors(x, (4, 5), {}, every)[:, 0], x.reshape(6, 4))
    left = vq_matmul.input_vectors(x, (7, 3), {"weight_left": 1}, every)[:, 0]
    np.testing.assert_array_equal(left, np.swapaxes(x, -1, -2).reshape(8, 3))
    a = x[0]
    np.testing.assert_array_equal(vq_gemm.input_vectors(a, (5, 4), {}, every)[:, 0], a)
    np.testing.assert_array_equal(vq_gemm.input_vectors(a.T, (5, 4), {"transA": 1}, every)[:, 0], a)


def test_moments_are_exact_when_every_vector_is_used():
    proto = mlp()
    model = ir.serde.deserialize_model(proto)
    x = np.random.default_rng(1).standard_normal((40, 64)).astype(np.float32)
    calib = load_calibration([{"x": x[i : i + 8]} for i in range(0, 40, 8)], model)
    layers, _ = find_layers(model)
    captured = capture_inputs(model, layers, calib, batch_size=16, max_rows=100)
    h0 = captured["w0"]
    np.testing.assert_allclose(h0.hessian, x.T.astype(np.float64) @ x / 40, rtol=1e-5, atol=1e-6)
    assert h0.count == 40 and h0.cross is None and h0.reference_inputs is None
    assert h0.inputs.shape == (40, 1, 64)
    # the second layer sees relu(x W0' + b0)
    w0 = proto.graph.initializer[0]
    hidden = np.maximum(x @ numpy_helper.to_array(w0).T, 0)
    np.testing.assert_allclose(captured["w1"].hessian, hidden.T.astype(np.float64) @ hidden / 40, rtol=1e-4, atol=1e-6)


def test_sampling_bounds_rows_and_paired_capture_with_unchanged_weights_is_symmetric():
    model = ir.serde.deserialize_model(cnn())
    feeds = [{"x": np.random.default_rng(i).standard_normal((2, 3, 16, 16)).astype(np.float32)} for i in range(6)]
    calib = load_calibration(feeds, model)
    layers, _ = find_layers(model)
    same = {l.weight.name: l.weight_array() for l in layers}
    captured = capture_inputs(model, layers, calib, quantized=same, max_rows=50, positions_per_batch=64, batch_size=4)
    conv2 = captured["w2"]
    assert conv2.inputs.shape == (50, 1, 32 * 9) and conv2.count == 3 * 64  # 3 batches of 2 samples
    np.testing.assert_allclose(conv2.cross, conv2.hessian, rtol=1e-6)
    np.testing.assert_array_equal(conv2.reference_inputs, conv2.inputs)
    again = capture_inputs(model, layers, calib, quantized=same, max_rows=50, positions_per_batch=64, batch_size=4)
    np.testing.assert_array_equal(again["w2"].inputs, conv2.inputs)  # seeded


def test_capture_without_moments_keeps_the_same_rows():
    """moments=False (layer-wise training) skips H and G but keeps exactly the rows, paired."""
    model = ir.serde.deserialize_model(cnn())
    feeds = [{"x": np.random.default_rng(i).standard_normal((2, 3, 16, 16)).astype(np.float32)} for i in range(4)]
    calib = load_calibration(feeds, model)
    layers, _ = find_layers(model)
    changed = {"w1": 0.9 * layers[0].weight_array()}
    full = capture_inputs(model, layers, calib, quantized=changed, max_rows=40, positions_per_batch=64)
    lean = capture_inputs(model, layers, calib, quantized=changed, max_rows=40, positions_per_batch=64, moments=False)
    for name, data in lean.items():
        assert data.hessian is None and data.cross is None
        np.testing.assert_array_equal(data.inputs, full[name].inputs)
        np.testing.assert_array_equal(data.reference_inputs, full[name].reference_inputs)
        assert data.count == full[name].count


def test_paired_capture_sees_the_quantized_upstream():
    model = ir.serde.deserialize_model(mlp())
    x = np.random.default_rng(2).standard_normal((16, 64)).astype(np.float32)
    calib = load_calibration([{"x": x}], model)
    layers, _ = find_layers(model)
    changed = {"w0": weight((128, 64), 99)}
    captured = capture_inputs(model, layers, calib, quantized=changed, max_rows=16)
    first, second = captured["w0"], captured["w1"]
    np.testing.assert_array_equal(first.inputs, first.reference_inputs)  # the graph input
    assert not np.allclose(second.inputs, second.reference_inputs)
    np.testing.assert_allclose(second.inputs[:, 0], np.maximum(x @ changed["w0"].T, 0)[_match(second, x)], rtol=1e-5, atol=1e-6)


def _match(captured, x):
    """Kept rows come in a seeded random order: which input row each came from."""
    model_rows = captured.reference_inputs[:, 0]
    w0 = mlp().graph.initializer[0]
    original_hidden = np.maximum(x @ numpy_helper.to_array(w0).T, 0)
    return [int(np.argmin(((original_hidden - row) ** 2).sum(1))) for row in model_rows]


def _branching_model():
    """flag (bool) picks a branch: then h = relu(x W1'), nested If on flag again -> h W2';
    else h = x W3'. W1..W3 are main-graph initializers read inside the branches."""
    def branch(name, nodes, out):
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])

    inner = helper.make_node("If", ["flag"], ["inner_out"], name="inner_if",
                             then_branch=branch("inner_then", [helper.make_node("Gemm", ["h", "W2"], ["y2"], name="fc2", transB=1)], "y2"),
                             else_branch=branch("inner_else", [helper.make_node("Identity", ["h"], ["y2b"])], "y2b"))
    then_nodes = [helper.make_node("Gemm", ["x", "W1"], ["pre"], name="fc1", transB=1),
                  helper.make_node("Relu", ["pre"], ["h"]), inner]
    outer = helper.make_node("If", ["flag"], ["y"], name="outer_if",
                             then_branch=branch("then", then_nodes, "inner_out"),
                             else_branch=branch("else", [helper.make_node("Gemm", ["x", "W3"], ["y3"], name="fc3", transB=1)], "y3"))
    weights = {"W1": weight((24, 16), 1), "W2": weight((8, 24), 2), "W3": weight((8, 16), 3)}
    return make_model(
        [outer], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
                  helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, n) for n, w in weights.items()],
    ), weights


def test_layers_inside_if_branches_are_captured_on_the_samples_that_take_them():
    proto, weights = _branching_model()
    model = ir.serde.deserialize_model(proto)
    layers, _ = find_layers(model)
    assert sorted(l.name for l in layers) == ["fc1", "fc2", "fc3"]
    r = np.random.default_rng(5)
    taken = [r.standard_normal((4, 16)).astype(np.float32) for _ in range(3)]
    skipped = r.standard_normal((4, 16)).astype(np.float32)
    feeds = [{"x": x, "flag": np.array(True)} for x in taken] + [{"x": skipped, "flag": np.array(False)}]
    calib = load_calibration(feeds, model)
    changed = {"W1": 0.5 * weights["W1"]}
    captured = capture_inputs(model, layers, calib, quantized=changed, batch_size=1, max_rows=100)
    x = np.concatenate(taken)
    np.testing.assert_allclose(captured["W1"].hessian, x.T.astype(np.float64) @ x / 12, rtol=1e-5, atol=1e-6)
    hidden_o = np.maximum(x @ weights["W1"].T, 0)  # fc2 sits in an If inside the then-branch
    hidden_q = np.maximum(x @ changed["W1"].T, 0)
    fc2 = captured["W2"]
    assert fc2.count == 12
    np.testing.assert_allclose(fc2.hessian, hidden_q.T.astype(np.float64) @ hidden_q / 12, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fc2.cross, hidden_q.T.astype(np.float64) @ hidden_o / 12, rtol=1e-4, atol=1e-6)
    fc3 = captured["W3"]  # the else-branch ran on one batch only
    assert fc3.count == 4
    np.testing.assert_allclose(fc3.hessian, skipped.T.astype(np.float64) @ skipped / 4, rtol=1e-5, atol=1e-6)
    only_then = load_calibration(feeds[:3], model)
    assert "W3" not in capture_inputs(model, layers, only_then, max_rows=10)  # never reached: no data
    assert run_ort(proto, feeds[0])[0].shape == (4, 8)  # the model itself is untouched
