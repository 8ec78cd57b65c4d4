"""Tiny models built in code with fixed seeds, for the tests. Nothing is downloaded."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def weight(shape, seed: int) -> np.ndarray:
    """A weight with some structure (per-output scales), like trained layers have."""
    r = rng(seed)
    scale = r.uniform(0.5, 1.5, size=(shape[0],) + (1,) * (len(shape) - 1))
    return (r.standard_normal(shape) * scale / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


def make_model(nodes, inputs, outputs, initializers, *, opset=OPSET, ir_version=IR_VERSION, **kwargs):
    graph = helper.make_graph(nodes, "test_graph", inputs, outputs, initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version, **kwargs
    )
    return model


def cnn(opset: int = OPSET, *, conv_weights_as_constants: bool = False) -> onnx.ModelProto:
    """Conv(3->32, 3x3) -> Relu -> Conv(32->64, 3x3, stride 2) -> Relu -> GAP -> Flatten -> Gemm(64->40)
    -> Relu -> MatMul(40->10) -> Add. Input x: (N, 3, 16, 16) float32; output logits: (N, 10)."""
    w1, b1 = weight((32, 3, 3, 3), 1), np.zeros(32, np.float32)
    w2, b2 = weight((64, 32, 3, 3), 2), weight((64, 1), 3)[:, 0]
    w3, b3 = weight((40, 64), 4), weight((40, 1), 5)[:, 0]
    w4, b4 = weight((10, 40), 6).T.copy(), weight((10, 1), 7)[:, 0]
    nodes = []
    inits = [numpy_helper.from_array(a, n) for a, n in ((b1, "b1"), (b2, "b2"), (w3, "w3"), (b3, "b3"), (w4, "w4"), (b4, "b4"))]
    if conv_weights_as_constants:
        nodes += [
            helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1)),
            helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w2)),
        ]
    else:
        inits += [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    nodes += [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["g"], name="fc1", transB=1),
        helper.make_node("Relu", ["g"], ["r3"], name="relu3"),
        helper.make_node("MatMul", ["r3", "w4"], ["mm"], name="fc2"),
        helper.make_node("Add", ["mm", "b4"], ["logits"], name="fc2_bias"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
        opset=opset,
    )


def mlp(sizes=(64, 128, 128, 10), seed: int = 0, opset: int = OPSET) -> onnx.ModelProto:
    """Gemm(transB=1) + Relu stack; input x: (N, sizes[0])."""
    nodes, inits = [], []
    current = "x"
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        inits += [numpy_helper.from_array(weight((n_out, n_in), seed + 2 * i), f"w{i}"),
                  numpy_helper.from_array(np.zeros(n_out, np.float32), f"b{i}")]
        out = "y" if i == len(sizes) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [out + ("_pre" if out != "y" else "")], name=f"fc{i}", transB=1))
        if out != "y":
            nodes.append(helper.make_node("Relu", [out + "_pre"], [out], name=f"relu{i}"))
        current = out
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", sizes[-1]])],
        inits,
        opset=opset,
    )


def lstm_model(directions=2, hidden=32, size=24) -> onnx.ModelProto:
    """LSTM (B given) -> Relu on Y; outputs the Relu and Y_h; input x: (7, 2, size)."""
    r = rng(7)
    node = helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y", "Y_h"], hidden_size=hidden,
                            direction="bidirectional" if directions == 2 else "forward", name="lstm")
    weights = {"W": 0.3 * r.standard_normal((directions, 4 * hidden, size)),
               "R": 0.3 * r.standard_normal((directions, 4 * hidden, hidden)),
               "B": 0.1 * r.standard_normal((directions, 8 * hidden))}
    return make_model(
        [node, helper.make_node("Relu", ["Y"], ["z"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [7, 2, size])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None), helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a.astype(np.float32), n) for n, a in weights.items()], opset=14,
    )


def tied_embedding_model(rows: int = 2048, dim: int = 32, seed: int = 4) -> onnx.ModelProto:
    """tokens (T,) -> Gather(E, tokens) -> Gemm(embedded, E, transB=1) -> logits (T, rows): one
    table read by a lookup ("embed") and by the output projection ("unembed")."""
    table = (0.1 * rng(seed).standard_normal((rows, dim))).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "tokens"], ["embedded"], name="embed"),
        helper.make_node("Gemm", ["embedded", "E"], ["logits"], name="unembed", transB=1),
    ]
    return make_model(
        nodes, [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["T"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["T", rows])],
        [numpy_helper.from_array(table, "E")],
    )


def random_encoding(r: np.random.Generator, layout, k: int, d: int, extras=(), codebook_dtype=np.float16, *,
                    codebook_scale: float = 1.0, scale_decades=(-2, 1)):
    """(codes (rows, n_sub), codebook, matrix (rows, cols) float32, {extra: stored tensor}):
    random codes into a random codebook (times ``codebook_scale``), with a rank-2 ``projection``,
    packed ``signs`` and/or per-row ``scales`` (``10^U(scale_decades)``) as ``extras`` asks. The
    matrix is exactly the weight the codes stand for, in ``layout``'s rows."""
    from onnxvq.ops.signs import pack_signs

    codes = r.integers(0, k, (layout.rows, layout.n_sub))
    stored = {}
    if "projection" in extras:
        codebook = (codebook_scale * r.standard_normal((k, 2))).astype(codebook_dtype)
        stored["projection"] = r.standard_normal((2, d)).astype(codebook_dtype)
        codewords = codebook.astype(np.float32) @ stored["projection"].astype(np.float32)
    else:
        codebook = (codebook_scale * r.standard_normal((k, d))).astype(codebook_dtype)
        codewords = codebook.astype(np.float32)
    matrix = codewords[codes].reshape(layout.rows, -1)[:, : layout.cols]
    if "signs" in extras:
        negative = r.random(matrix.shape) < 0.5
        stored["signs"] = pack_signs(negative)
        matrix = matrix * np.where(negative, -1.0, 1.0).astype(np.float32)
    if "scales" in extras:  # magnitudes spread over decades, as in BN-folded convolutions
        stored["scales"] = (10.0 ** r.uniform(*scale_decades, layout.rows)).astype(codebook_dtype)
        matrix = matrix * stored["scales"].astype(np.float32)[:, None]
    return codes, codebook, matrix.astype(np.float32), stored


def run_ort(model: onnx.ModelProto | bytes | str, feeds: dict, **session_kwargs) -> list[np.ndarray]:
    import onnxruntime as ort

    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"], **session_kwargs)
    return session.run(None, feeds)
