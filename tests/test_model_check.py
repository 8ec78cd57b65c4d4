"""Input validation: a model that onnxruntime refuses is refused before any work, in one line
naming the node, with nothing written; every model onnxruntime runs is accepted."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxvq
from models import cnn, make_model, mlp, weight
from onnxvq.errors import OnnxVQError
from onnxvq.model_check import check_model
from onnxvq.model_io import load_model

F = TensorProto.FLOAT


def info(name, shape, elem=F):
    return helper.make_tensor_value_info(name, elem, shape)


def tensor(name, shape, seed=0):
    return numpy_helper.from_array(weight(shape, seed), name)


def one_node(node, x_shape, inits):
    return make_model([node], [info("x", x_shape)], [info("y", None)], inits)


# name -> (model, what the error line must say)
MALFORMED = {
    "conv with a 2-D weight": (
        one_node(helper.make_node("Conv", ["x", "w"], ["y"], name="conv"), [1, 3, 8, 8], [tensor("w", (4, 3))]),
        "node 'conv' (Conv): Number of spatial dimensions in the weight tensor (0) does not match",
    ),
    "conv channel mismatch": (
        one_node(helper.make_node("Conv", ["x", "w"], ["y"], name="conv"), ["N", 3, 8, 8], [tensor("w", (4, 5, 3, 3))]),
        "node 'conv' (Conv): its input has 3 channels, but its weight of shape (4, 5, 3, 3) expects 5",
    ),
    "gemm with a 3-D weight": (
        one_node(helper.make_node("Gemm", ["x", "w"], ["y"], name="fc"), [2, 8], [tensor("w", (8, 4, 2))]),
        "node 'fc' (Gemm): Input 1 expected to have rank 2 but has rank 3",
    ),
    "two nodes with the same name": (
        make_model([helper.make_node("Relu", ["x"], ["a"], name="act"),
                    helper.make_node("Relu", ["a"], ["y"], name="act")], [info("x", [2, 8])], [info("y", [2, 8])], []),
        "node 'act' (Relu): another node of its graph has the same name",
    ),
    "undefined value": (
        one_node(helper.make_node("Gemm", ["x", "w_missing"], ["y"], name="fc"), [2, 8], []),
        "node 'fc' (Gemm): it reads 'w_missing', which no node, graph input or initializer defines",
    ),
    "value defined twice": (
        make_model([helper.make_node("Relu", ["x"], ["a"], name="r1"),
                    helper.make_node("Relu", ["x"], ["a"], name="r2"),
                    helper.make_node("Add", ["a", "a"], ["y"], name="add")],
                   [info("x", [2, 8])], [info("y", [2, 8])], []),
        "node 'r2' (Relu): it writes 'a', which a graph input, initializer or other node already defines",
    ),
    "gemm inner dims differ": (
        one_node(helper.make_node("Gemm", ["x", "w"], ["y"]), [2, 8], [tensor("w", (7, 4))]),
        "the Gemm node writing 'y': Dimension mismatch",
    ),
}


def onnxvq_cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxvq.cli", *map(str, args)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)


def digest(folder) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))}


def one_error_line(done) -> str:
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.mark.parametrize("case", MALFORMED)
def test_onnxruntime_refuses_each_malformed_model(case):
    """The premise: every case is one onnxruntime refuses, at load or at the first run."""
    model, _ = MALFORMED[case]
    with pytest.raises(Exception):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        x = session.get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in x.shape]
        session.run(None, {x.name: np.zeros(shape, np.float32)})


@pytest.mark.parametrize("case", MALFORMED)
def test_compress_refuses_a_malformed_model_in_one_line(tmp_path, case):
    model, expected = MALFORMED[case]
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    before = digest(tmp_path)
    line = one_error_line(onnxvq_cli("compress", path, "-o", tmp_path / "out.onnx", "-q"))
    assert line.startswith(f"error: {path} is not a valid model: ") and expected in line, line
    assert line.endswith("onnxruntime cannot run it either: fix or re-export the model")
    assert digest(tmp_path) == before  # no output, no temporary file, the input untouched


@pytest.mark.parametrize("verb, args", [("inspect", []), ("decompress", ["-o", "out.onnx"]),
                                        ("report", ["--input", "x:2x8"])])
def test_every_verb_refuses_a_malformed_model(tmp_path, verb, args):
    model, expected = MALFORMED["two nodes with the same name"]
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    before = digest(tmp_path)
    line = one_error_line(onnxvq_cli(verb, path, *[tmp_path / a if a.endswith(".onnx") else a for a in args]))
    assert expected in line
    assert digest(tmp_path) == before


def test_subgraph_problems_are_found():
    """Inside an If branch: an undefined read, and a node output that redefines an outer value."""
    def model(then_nodes):
        then = helper.make_graph(then_nodes, "then", [], [info("t", [2, 8])])
        orelse = helper.make_graph([helper.make_node("Relu", ["x"], ["e"], name="e")], "else", [], [info("e", [2, 8])])
        nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
                 helper.make_node("Greater", ["s", "zero"], ["b"], name="positive"),
                 helper.make_node("If", ["b"], ["y"], then_branch=then, else_branch=orelse, name="if")]
        zero = numpy_helper.from_array(np.array(0, np.float32), "zero")
        return make_model(nodes, [info("x", [2, 8])], [info("y", [2, 8])], [zero])

    check_model(model([helper.make_node("Relu", ["x"], ["t"], name="t")]))  # the valid twin
    with pytest.raises(OnnxVQError, match=r"node 't' \(Relu\): it reads 'nope'"):
        check_model(model([helper.make_node("Relu", ["nope"], ["t"], name="t")]))
    with pytest.raises(OnnxVQError, match=r"node 'redefine' \(Relu\): it writes 's'"):
        check_model(model([helper.make_node("Relu", ["x"], ["s"], name="redefine"),
                           helper.make_node("Relu", ["s"], ["t"], name="t")]))


# ------------------------------------------------------------------------------------------------
# valid models are accepted


def paddle_style_dims():
    """Dynamic dims stored as -1 (input) and 0 (a value_info), as paddle2onnx writes them."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc_w"], ["y"], name="fc", transB=1)]
    model = make_model(nodes, [info("x", [-1, 3, -1, -1])], [info("y", [-1, 10])],
                       [tensor("w", (8, 3, 3, 3), 1), tensor("fc_w", (10, 8), 2)], opset=11)
    model.graph.value_info.extend([info("c", [0, 8, 0, 0]), info("f", [-1, 8])])
    return model


def model_local_function():
    """A custom-domain op defined by a model-local function (as onnxscript writes them)."""
    body = [helper.make_node("MatMul", ["X", "W"], ["XW"]), helper.make_node("Relu", ["XW"], ["Y"])]
    function = helper.make_function("local.fn", "LinearRelu", ["X", "W"], ["Y"], body,
                                    [helper.make_opsetid("", 17)])
    node = helper.make_node("LinearRelu", ["x", "w"], ["y"], name="block", domain="local.fn")
    graph = helper.make_graph([node], "g", [info("x", ["N", 8])], [info("y", ["N", 4])], [tensor("w", (8, 4))])
    return helper.make_model(graph, functions=[function], ir_version=8,
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local.fn", 1)])


def control_flow():
    """An If whose branches read outer values, with node names repeated across graphs and
    Constant nodes sharing a name (onnxruntime accepts both)."""
    then = helper.make_graph([helper.make_node("Relu", ["x"], ["t"], name="act")], "then", [], [info("t", [2, 8])])
    orelse = helper.make_graph([helper.make_node("Neg", ["x"], ["e"], name="act")], "else", [], [info("e", [2, 8])])
    zero, one = (numpy_helper.from_array(np.array(v, np.float32), "v") for v in (0, 1))
    nodes = [helper.make_node("Constant", [], ["zero"], value=zero, name="const"),
             helper.make_node("Constant", [], ["one"], value=one, name="const"),
             helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="act"),
             helper.make_node("Greater", ["s", "zero"], ["b"], name="positive"),
             helper.make_node("If", ["b"], ["i"], then_branch=then, else_branch=orelse, name="if"),
             helper.make_node("Mul", ["i", "one"], ["y"], name="scale")]
    return make_model(nodes, [info("x", [2, 8])], [info("y", [2, 8])], [])


def fp16_gemm():
    w = numpy_helper.from_array(weight((16, 8), 1).astype(np.float16), "w")
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)
    return make_model([node], [info("x", [2, 8], TensorProto.FLOAT16)], [info("y", [2, 16], TensorProto.FLOAT16)], [w])


VALID = {
    "cnn opset 7": lambda: cnn(7),
    "cnn opset 11": lambda: cnn(11),
    "cnn opset 21": lambda: cnn(21),
    "cnn with Constant weights": lambda: cnn(conv_weights_as_constants=True),
    "mlp": mlp,
    "dims stored as -1 and 0": paddle_style_dims,
    "model-local function": model_local_function,
    "If with outer reads": control_flow,
    "fp16": fp16_gemm,
    "compressed by onnxvq": lambda: onnxvq.compress(cnn(), k=16, d=4, min_size=0).to_proto(),
}


@pytest.mark.parametrize("case", VALID)
def test_valid_models_are_accepted(tmp_path, case):
    model = VALID[case]()
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])  # the premise
    check_model(model)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    load_model(path)  # what every CLI verb reads its input with


def test_a_valid_paddle_style_model_compresses(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(paddle_style_dims(), path)
    done = onnxvq_cli("compress", path, "-o", tmp_path / "m.vq.onnx", "-k", "4", "-d", "1", "--min-size", "0", "-q")
    assert done.returncode == 0, done.stderr


def test_external_data_is_not_read(tmp_path):
    """The check needs only types: a model whose external weights are absent still passes it
    (load_model reports the missing file afterwards, in its own words)."""
    path = tmp_path / "m.onnx"
    onnx.save(mlp(), path, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    os.remove(tmp_path / "m.onnx.data")
    check_model(onnx.load(path, load_external_data=False))
    with pytest.raises(OnnxVQError, match="external data file 'm.onnx.data'"):
        load_model(path)


def test_a_proto_given_to_the_api_is_checked_too():
    """compress(ModelProto) refuses what compress(path) refuses, with the same message."""
    import onnxvq

    model = mlp((32, 16, 4))
    model.graph.node[2].name = model.graph.node[0].name  # two nodes with one name
    with pytest.raises(onnxvq.OnnxVQError, match="onnxruntime cannot run it either"):
        onnxvq.compress(model, method="pq", k=16, d=4, min_size=0)
