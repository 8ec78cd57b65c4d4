"""LSTM, GRU and RNN in the torch executor against onnxruntime, and gradients through them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from models import make_model, run_ort
from onnxvq.finetune.torch_graph import TorchGraph

SEQ, BATCH, SIZE = 6, 3, 5
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}

# (op, directions, hidden, optional inputs, attributes, outputs)
CASES = [
    ("LSTM", 1, 4, ("B",), {}, ("Y", "Y_h", "Y_c")),
    ("LSTM", 2, 5, ("B", "sequence_lens", "initial_h", "initial_c", "P"), {"direction": "bidirectional"},
     ("Y", "Y_h", "Y_c")),
    ("LSTM", 1, 4, ("B", "sequence_lens"), {"direction": "reverse", "input_forget": 1, "clip": 0.8}, ("Y", "Y_h")),
    ("LSTM", 1, 3, ("B",), {"activations": ["HardSigmoid", "Tanh", "Relu"], "activation_alpha": [0.3],
                            "activation_beta": [0.6]}, ("Y",)),
    ("GRU", 2, 4, ("B", "", "initial_h"), {"direction": "bidirectional"}, ("Y", "Y_h")),
    ("GRU", 1, 6, ("B", "sequence_lens"), {"linear_before_reset": 1, "direction": "reverse"}, ("Y", "Y_h")),
    ("GRU", 1, 4, (), {"clip": 0.5}, ("Y",)),
    ("RNN", 2, 4, ("B", "sequence_lens", "initial_h"), {"direction": "bidirectional"}, ("Y", "Y_h")),
    ("RNN", 1, 5, ("B",), {"activations": ["Relu"]}, ("Y", "Y_h")),
]


def _model(case, seed=0, *, batch_first=False):
    op, dirs, hidden, optional, attrs, outputs = case
    rng = np.random.default_rng(seed)
    g = GATES[op]
    values = {
        "W": 0.5 * rng.standard_normal((dirs, g * hidden, SIZE)),
        "R": 0.5 * rng.standard_normal((dirs, g * hidden, hidden)),
        "B": 0.3 * rng.standard_normal((dirs, 2 * g * hidden)),
        "sequence_lens": np.array([SEQ, SEQ - 2, 1], np.int32),
        "initial_h": rng.standard_normal((dirs, BATCH, hidden)),
        "initial_c": rng.standard_normal((dirs, BATCH, hidden)),
        "P": 0.3 * rng.standard_normal((dirs, 3 * hidden)),
    }
    if batch_first:
        for name in ("initial_h", "initial_c"):
            values[name] = np.swapaxes(values[name], 0, 1)
        attrs = {**attrs, "layout": 1}
    inputs = ["x", "W", "R", *optional]
    inits = [numpy_helper.from_array(np.asarray(a, np.int32 if a.dtype == np.int32 else np.float32), n)
             for n, a in values.items() if n in inputs]
    node = helper.make_node(op, inputs, list(outputs), hidden_size=hidden, **attrs)
    return make_model(
        [node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits, opset=14,
    )


def _run_torch(model, feeds):
    with torch.no_grad():
        return [o.numpy() for o in TorchGraph(model)({k: torch.from_numpy(v) for k, v in feeds.items()})]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_recurrent_ops_match_onnxruntime(case):
    x = np.random.default_rng(5).standard_normal((SEQ, BATCH, SIZE)).astype(np.float32)
    model = _model(case)
    expected = run_ort(model, {"x": x})
    got = _run_torch(model, {"x": x})
    assert len(got) == len(expected)
    for a, e in zip(got, expected):
        assert a.shape == e.shape
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)
    # batch first: the same computation with the batch axis moved (onnxruntime runs only layout 0)
    batch_first = _run_torch(_model(case, batch_first=True), {"x": np.swapaxes(x, 0, 1).copy()})
    moved = {"Y": lambda y: np.moveaxis(y, 2, 0), "Y_h": lambda s: np.swapaxes(s, 0, 1),
             "Y_c": lambda s: np.swapaxes(s, 0, 1)}
    for name, a, e in zip(case[5], batch_first, expected):
        np.testing.assert_allclose(a, moved[name](e), rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_recurrent_weights():
    model = _model(CASES[1])
    graph = TorchGraph(model, trainable={"W", "R"})
    x = torch.from_numpy(np.random.default_rng(6).standard_normal((SEQ, BATCH, SIZE)).astype(np.float32))
    graph({"x": x})[0].square().sum().backward()
    for name in ("W", "R"):
        grad = graph.initializer(name).grad
        assert grad is not None and float(grad.abs().sum()) > 0
