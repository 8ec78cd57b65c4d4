"""LSTM / GRU / RNN layers through compress, decompress, the size target and the report."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxvq
from models import make_model, rng, run_ort, weight
from onnxvq import ops
from onnxvq.candidates import find_layers

SEQ, BATCH, FEATURES = 12, 2, 16


def crnn(op_type="LSTM", hidden=32, *, outputs=("Y",)):
    """x (SEQ, BATCH, FEATURES) -> MatMul 16x24 -> bidirectional recurrent op (hidden) -> reshape
    (SEQ, BATCH, 2*hidden) -> MatMul (2*hidden x 20): a CTC reader's tail."""
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op_type]
    w_in = weight((FEATURES, 24), 1)
    w = weight((2, gates * hidden, 24), 2)
    r = weight((2, gates * hidden, hidden), 3)
    b = weight((2, 2 * gates * hidden), 4)
    head = weight((2 * hidden, 20), 5)
    last_state = outputs[0] != "Y"
    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["h"], name="proj"),
        helper.make_node(op_type, ["h", "W", "R", "B"], ["", "Y_h_raw"] if last_state else ["Y"], name="rnn",
                         direction="bidirectional", hidden_size=hidden),
    ]
    if not last_state:
        nodes += [
            helper.make_node("Transpose", ["Y"], ["yt"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", ["yt", "shape"], ["seq"]),
            helper.make_node("MatMul", ["seq", "head"], ["logits"], name="head"),
        ]
        out = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [SEQ, BATCH, 20])]
    else:  # only the last hidden state, (D, BATCH, hidden) -> (BATCH, D * hidden)
        nodes += [
            helper.make_node("Transpose", ["Y_h_raw"], ["Y_h"], perm=[1, 0, 2]),
            helper.make_node("Reshape", ["Y_h", "state_shape"], ["state"]),
            helper.make_node("MatMul", ["state", "head"], ["logits"], name="head"),
        ]
        out = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [BATCH, 20])]
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (w_in, "w_in"), (w, "W"), (r, "R"), (b, "B"), (head, "head"),
        (np.array([SEQ, BATCH, 2 * hidden], np.int64), "shape"),
        (np.array([BATCH, 2 * hidden], np.int64), "state_shape"),
    )]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SEQ, BATCH, FEATURES])], out, inits)


FEEDS = {"x": rng(3).standard_normal((SEQ, BATCH, FEATURES)).astype(np.float32)}


def _twin(compressed: onnx.ModelProto) -> onnx.ModelProto:
    return ir.serde.serialize_model(onnxvq.decompress(compressed))


@pytest.mark.parametrize("op_type", ["LSTM", "GRU", "RNN"])
def test_recurrent_layer_is_encoded_and_equals_its_decompressed_twin(op_type):
    original = crnn(op_type)
    model = ir.serde.deserialize_model(original)
    layers, left = find_layers(model)
    recurrent = [l for l in layers if l.op_type == op_type]
    assert len(recurrent) == 1 and [p.name for p in recurrent[0].parts] == ["W", "R"] and not left
    assert recurrent[0].weight_shape == (2, {"LSTM": 4, "GRU": 3, "RNN": 1}[op_type] * 32, 24 + 32)

    result = onnxvq.compress(original, k=64, d=4, min_size=0)
    compressed = result.to_proto()
    onnx.checker.check_model(compressed)
    vq = [n for n in compressed.graph.node if n.domain == ops.DOMAIN]
    assert sorted(n.op_type for n in vq) == sorted(["VQMatMul", "VQMatMul", f"VQ{op_type}"])
    names = {i.name for i in compressed.graph.initializer}
    assert "W" not in names and "R" not in names and "W.vq_codes" in names  # both weights encoded
    got = run_ort(compressed, FEEDS)[0]
    twin = _twin(compressed)
    assert {n.op_type for n in twin.graph.node} >= {op_type}
    np.testing.assert_allclose(got, run_ort(twin, FEEDS)[0], rtol=1e-5, atol=1e-5)
    reference = run_ort(original, FEEDS)[0]
    relative_error = np.sum((got - reference) ** 2) / np.sum(reference**2)
    assert 0 < relative_error < 0.5  # random weights at 1.5 bits each: SQNR above 3 dB, not noise
    layer = next(l for l in result.summary.layers if l.op_type == op_type)
    assert layer.compressed and layer.sqnr_db > 5


def test_only_the_last_state_used_and_the_report_counts_recurrent_macs():
    original = crnn("LSTM", outputs=("", "Y_h"))
    result = onnxvq.compress(original, k=16, d=4, min_size=0)
    compressed = result.to_proto()
    got = run_ort(compressed, FEEDS)[0]
    np.testing.assert_allclose(got, run_ort(_twin(compressed), FEEDS)[0], rtol=1e-5, atol=1e-5)

    from onnxvq.accelerators import AcceleratorProfile
    from onnxvq.memory_access import analyze

    profile = AcceleratorProfile("test", "", macs_per_second=1e9, dram_bandwidth=1e9, onchip_buffer_bytes=1 << 20)
    rows = {r.name: r for r in analyze(ir.serde.deserialize_model(compressed), None, profile).rows}
    dense_rows = {r.name: r for r in analyze(ir.serde.deserialize_model(original), None, profile).rows}
    expected = SEQ * BATCH * 2 * 4 * 32 * (24 + 32)
    assert rows["rnn"].macs == dense_rows["rnn"].macs == expected
    assert rows["rnn"].weight_bytes["codes"] > 0 and dense_rows["rnn"].weight_bytes["dense"] == 4 * 2 * 128 * 56


def test_size_target_and_calibration_with_a_recurrent_layer():
    """The allocation measures the recurrent layer like any other (its W and R fed together);
    calibration leaves it encoded from its weights (its inputs are not captured)."""
    original = crnn("LSTM", hidden=48)
    calib = [{"x": rng(10 + i).standard_normal((SEQ, BATCH, FEATURES)).astype(np.float32)} for i in range(6)]
    result = onnxvq.compress(original, target_ratio=6, calib=calib, finetune="layer")
    compressed = result.to_proto()
    assert len(original.SerializeToString()) / len(compressed.SerializeToString()) >= 6
    assert any(n.op_type == "VQLSTM" for n in compressed.graph.node)
    got = run_ort(compressed, FEEDS)[0]
    np.testing.assert_allclose(got, run_ort(_twin(compressed), FEEDS)[0], rtol=1e-5, atol=1e-5)
    reference = run_ort(original, FEEDS)[0]
    error = np.sum((got - reference) ** 2) / np.sum(reference**2)
    assert error < 0.1


def test_recurrent_weights_read_elsewhere_are_left_alone():
    original = crnn("GRU")
    original.graph.node.append(helper.make_node("ReduceSum", ["R"], ["r_sum"], keepdims=0))
    original.graph.output.append(helper.make_tensor_value_info("r_sum", TensorProto.FLOAT, None))
    layers, left = find_layers(ir.serde.deserialize_model(original))
    assert all(l.op_type != "GRU" for l in layers)
    assert [a.op_type for a in left] == ["GRU"] and "'R' is also read by ReduceSum" in left[0].reason


@pytest.mark.parametrize("direction, layout", [("forward", 0), ("reverse", 0), ("bidirectional", 0), ("bidirectional", 1)])
def test_recurrent_input_vectors_rebuild_each_step(direction, layout):
    """Without bias an RNN's state is tanh(W x_t + R h_(t-1)): each captured vector
    [x_t; h_(t-1)] times the joined weight's rows of its direction gives the step's output.
    (Batch-first arrays are the same run transposed: onnxruntime runs only layout 0.)"""
    dirs, hidden, size = (2 if direction == "bidirectional" else 1), 6, 5
    w, r = weight((dirs, hidden, size), 1), 0.5 * weight((dirs, hidden, hidden), 2)
    h0 = weight((dirs, BATCH, hidden), 3)
    node = helper.make_node("RNN", ["x", "W", "R", "", "", "h0"], ["Y"], direction=direction, hidden_size=hidden)
    model = make_model(
        [node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R"), numpy_helper.from_array(h0, "h0")],
    )
    x = rng(4).standard_normal((SEQ, BATCH, size)).astype(np.float32)
    y = run_ort(model, {"x": x})[0]  # (S, D, B, H)
    joined = np.concatenate([w, r], axis=-1)
    attrs = {"direction": direction, "hidden_size": hidden}
    acts = (x, y, h0)
    if layout:
        attrs["layout"] = 1
        acts = (np.swapaxes(x, 0, 1), np.moveaxis(y, 2, 0), np.swapaxes(h0, 0, 1))
    vectors = ops.vq_recurrent.RNN.input_vectors(acts, joined.shape, attrs, np.arange)
    assert vectors.shape == (SEQ * BATCH, dirs, size + hidden)
    steps = np.einsum("ndc,dhc->ndh", vectors, joined)  # (positions, D, H)
    expected = np.moveaxis(y, 2, 1).reshape(SEQ * BATCH, dirs, hidden)  # positions step-major
    np.testing.assert_allclose(np.tanh(steps), expected, rtol=1e-5, atol=1e-5)


def test_calibration_captures_the_recurrent_layer_and_layer_wise_trains_it():
    original = crnn("LSTM", outputs=("", "Y_h"))  # Y unused by the model: tapped all the same
    calib = [{"x": rng(20 + i).standard_normal((SEQ, BATCH, FEATURES)).astype(np.float32)} for i in range(6)]
    from onnxvq.activations import capture_inputs
    from onnxvq.calibration import load_calibration

    model = ir.serde.deserialize_model(original)
    layers, _ = find_layers(model)
    lstm = next(l for l in layers if l.op_type == "LSTM")
    captured = capture_inputs(model, [lstm], load_calibration(calib, model), max_rows=10**6, positions_per_batch=10**6)
    data = captured["W"]
    assert data.inputs.shape == (6 * SEQ * BATCH, 2, 24 + 32) and data.hessian.shape == (56, 56)
    assert not any(v.name.startswith("onnxvq.tap") for n in model.graph for v in n.outputs)  # names given back

    result = onnxvq.compress(original, k=16, d=4, min_size=0, calib=calib, finetune="layer")
    layer = next(l for l in result.summary.layers if l.op_type == "LSTM")
    assert layer.finetune.get("steps", 0) > 0
    compressed = result.to_proto()
    got = run_ort(compressed, FEEDS)[0]
    np.testing.assert_allclose(got, run_ort(_twin(compressed), FEEDS)[0], rtol=1e-5, atol=1e-5)


def test_end_to_end_fine_tuning_runs_through_the_recurrent_layer():
    original = crnn("GRU")
    calib = [{"x": rng(30 + i).standard_normal((SEQ, BATCH, FEATURES)).astype(np.float32)} for i in range(8)]
    result = onnxvq.compress(original, k=16, d=4, min_size=0, calib=calib,
                             finetune={"mode": "e2e", "steps": 30, "lr": 1e-3})
    record = result.summary.calibration
    assert record["mode"] == "e2e" and "fallback" not in record
    before, after = record["quality"]["encoded"], record["quality"]["fine-tuned"]
    assert after.sqnr_db >= before.sqnr_db  # the held-out checkpoint never keeps a worse step
    compressed = result.to_proto()
    got = run_ort(compressed, FEEDS)[0]
    np.testing.assert_allclose(got, run_ort(_twin(compressed), FEEDS)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, params", [("lr2vq", {"k": 64, "d": 8}), ("ssvq", {"k": 16, "d": 8})])
def test_every_method_encodes_a_recurrent_layer(method, params):
    original = crnn("LSTM")
    result = onnxvq.compress(original, method=method, min_size=0, **params)
    layer = next(l for l in result.summary.layers if l.op_type == "LSTM")
    assert layer.compressed and layer.method == method
    compressed = result.to_proto()
    got = run_ort(compressed, FEEDS)[0]
    np.testing.assert_allclose(got, run_ort(_twin(compressed), FEEDS)[0], rtol=1e-5, atol=1e-5)
