"""A corpus of small models in the forms real producers write, built in code (nothing downloaded).

Each builder returns a :class:`CorpusModel`: the model, input sets to run it on, and how many of
its Conv/Gemm/MatMul nodes read a constant weight (every one of them must become an ``ai.onnxvq``
node). The producers and the habits of theirs that a compressor trips on:

* torch's TorchScript exporter (``dynamo=False``, opset 11): BatchNorm folded into Conv, Linear as
  Gemm, bias-free Linear and parameter products as MatMul (batched, and with the weight on the
  left), dynamic batch;
* torch's dynamo exporter (``dynamo=True``, opset 18): the same network through torch.export and
  onnxscript's optimizer;
* onnxscript (``@script``): weights as ``Constant`` nodes, a model-local function in a custom
  domain called from the graph, and one whose MatMul reads a function input (left dense);
* ``onnx.helper`` by hand, at any opset 11..21: Conv in both branches of an ``If`` (one weight
  from the outer scope, one from a ``Constant`` inside the branch), a Gemm inside a ``Loop`` body,
  a model-local function;
* paddle2onnx (as in rapidocr's PP-OCR models): IR 7, opset 11, every weight a ``Constant`` node,
  batch stored as ``dim_value: -1``, unfolded BatchNormalization, hardswish as Add/Clip/Mul/Div, a
  squeeze-excite block, ``Shape -> Cast -> Slice -> Cast -> Concat -> Reshape`` flattening, fc as
  MatMul + Add, ``Identity`` chains;
* tf2onnx (Keras): NHWC input behind a Transpose, SAME_UPPER/VALID Conv, Dense as MatMul + Add,
  ``Squeeze``/``Unsqueeze`` with axes inputs (opset 13), ``unk__`` dim names;
* onnxconverter-common's float16 conversion: float16 weights, Cast nodes at the float32 I/O.
"""

from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models import cnn, weight

__all__ = [
    "CorpusModel",
    "dynamo_export",
    "float16_converted",
    "helper_control_flow",
    "onnxscript_model",
    "paddle2onnx_style",
    "tf2onnx_style",
    "torchscript_export",
]


@dataclasses.dataclass
class CorpusModel:
    """A model, the input sets to run it on, and its number of compressible layers."""

    model: onnx.ModelProto
    feeds: list[dict[str, np.ndarray]]
    layers: int
    # Relative agreement of compressed and decompressed outputs. float32 models agree to float32
    # rounding. float16 ones to float16's: onnxruntime's CPU provider has no float16 Mul, so it
    # runs the body's per-channel scaling in float32 and the decoded weight misses the float16
    # rounding of the twin's weight (at most 1 ulp per weight; 2e-4 of the output measured).
    rtol: float = 1e-4


def _x(shape, seed: int = 11) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _tensor(name: str, shape, seed: int) -> onnx.TensorProto:
    return numpy_helper.from_array(weight(shape, seed), name)


def _constant(name: str, array: np.ndarray, node_name: str | None = None) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], name=node_name or name, value=numpy_helper.from_array(np.asarray(array), name)
    )


# -- torch ---------------------------------------------------------------------------------------


def _torch_net():
    """A small torch network that exercises every consumer form torch's exporters write."""
    import torch

    class TinyNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.grouped = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
            self.depthwise = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.fc = torch.nn.Linear(16, 24)
            self.proj = torch.nn.Linear(24, 24, bias=False)  # MatMul with a transposed weight
            self.mix = torch.nn.Parameter(torch.randn(2, 12, 6) / 4)  # batched weight
            # weight @ activation; the outputs are not named like a parameter: the dynamo exporter
            # would name the initializer and the output alike (not SSA).
            self.left = torch.nn.Parameter(torch.randn(5, 12) / 4)

        def forward(self, x):
            h = torch.relu(self.bn(self.stem(x)))
            h = torch.relu(self.grouped(h))
            h = self.depthwise(h).mean((2, 3))
            h = self.proj(torch.nn.functional.gelu(self.fc(h)))
            mixed = torch.matmul(h.reshape(-1, 2, 1, 12), self.mix).reshape(-1, 12)
            left = torch.matmul(self.left, h[:, :12].unsqueeze(-1)).squeeze(-1)
            return mixed, left

    torch.manual_seed(0)
    net = TinyNet().eval()
    with torch.no_grad():  # a trained-looking BatchNorm, so folding it changes the weights
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net


def _torch_export(dynamo: bool, opset: int) -> onnx.ModelProto:
    import torch

    net = _torch_net()
    example = (torch.randn(2, 3, 8, 8),)
    buffer = io.BytesIO()
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=64)
        kwargs = {"dynamic_shapes": {"x": {0: batch}}}
    else:
        kwargs = {"dynamic_axes": {"x": {0: "batch"}}}
    with warnings.catch_warnings():  # deprecation notes of the exporters
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, example, buffer, dynamo=dynamo, opset_version=opset, input_names=["x"],
            output_names=["mixed_out", "left_out"], verbose=False, **kwargs,
        )
    return onnx.load_from_string(buffer.getvalue())


def torchscript_export(opset: int = 11) -> CorpusModel:
    """The TorchScript exporter (``dynamo=False``)."""
    return CorpusModel(_torch_export(False, opset), [{"x": _x((3, 3, 8, 8))}], layers=7)


def dynamo_export(opset: int = 18) -> CorpusModel:
    """The dynamo exporter (``dynamo=True``: torch.export, then onnxscript's optimizer)."""
    return CorpusModel(_torch_export(True, opset), [{"x": _x((3, 3, 8, 8))}], layers=7)


# -- onnxscript ----------------------------------------------------------------------------------


def onnxscript_model() -> CorpusModel:
    """A model authored with onnxscript's ``@script`` (``corpus_onnxscript``), calling two
    model-local functions."""
    from corpus_onnxscript import main

    return CorpusModel(main.to_model_proto(), [{"x": _x((3, 4, 10))}], layers=3)


# -- onnx.helper ---------------------------------------------------------------------------------


def helper_control_flow(opset: int) -> CorpusModel:
    """If (a Conv per branch), Loop (a Gemm in the body), a model-local function; any opset
    from 11 on (only ops whose signature is the same from 11 to 21)."""
    f32 = TensorProto.FLOAT
    then_branch = helper.make_graph(
        [helper.make_node("Conv", ["stem", "branch_a.w"], ["a"], name="branch_a", pads=[1, 1, 1, 1])],
        "then", [], [helper.make_tensor_value_info("a", f32, None)],
    )
    else_branch = helper.make_graph(
        [
            _constant("branch_b.w", weight((8, 8, 1, 1), 32), "branch_b.w_const"),
            helper.make_node("Conv", ["stem", "branch_b.w"], ["b_pre"], name="branch_b"),
            helper.make_node("Relu", ["b_pre"], ["b"], name="branch_b_relu"),
        ],
        "else", [], [helper.make_tensor_value_info("b", f32, None)],
    )
    loop_body = helper.make_graph(
        [
            helper.make_node("Gemm", ["h_in", "loop.w", "loop.b"], ["g"], name="loop_gemm", transB=1),
            helper.make_node("Tanh", ["g"], ["h_out"], name="loop_tanh"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="loop_cond"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", f32, None),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("h_out", f32, None)],
    )
    scale = helper.make_function(
        "corpus.local", "Scale", ["X"], ["Y"],
        [
            helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
            helper.make_node("Mul", ["X", "two"], ["Y"]),
        ],
        opset_imports=[helper.make_opsetid("", opset)],
    )
    nodes = [
        helper.make_node("Conv", ["x", "stem.w", "stem.b"], ["stem_pre"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["stem_pre"], ["stem"], name="stem_relu"),
        helper.make_node("If", ["use_a"], ["branch"], name="branch", then_branch=then_branch, else_branch=else_branch),
        helper.make_node("GlobalAveragePool", ["branch"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["h0"], name="flatten"),
        # An explicit cond, as exporters write: onnx.reference (1.23) runs no iteration at all when
        # the optional cond is omitted, where the spec (and onnxruntime) run M.
        helper.make_node("Loop", ["trips", "keep_going", "h0"], ["h"], name="loop", body=loop_body),
        helper.make_node("MatMul", ["h", "head.w"], ["logits"], name="head"),
        helper.make_node("Scale", ["logits"], ["y"], name="scale", domain="corpus.local"),
    ]
    inits = [
        _tensor("stem.w", (8, 3, 3, 3), 31), numpy_helper.from_array(np.full(8, 0.1, np.float32), "stem.b"),
        _tensor("branch_a.w", (8, 8, 3, 3), 33),
        _tensor("loop.w", (8, 8), 34), numpy_helper.from_array(np.full(8, -0.05, np.float32), "loop.b"),
        _tensor("head.w", (8, 5), 35), numpy_helper.from_array(np.array(3, np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "keep_going"),
    ]
    graph = helper.make_graph(
        nodes, f"control_flow_opset{opset}",
        [helper.make_tensor_value_info("x", f32, ["N", 3, 10, 10]), helper.make_tensor_value_info("use_a", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", f32, ["N", 5])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("corpus.local", 1)],
        functions=[scale], ir_version=8, producer_name="onnx.helper",
    )
    x = _x((2, 3, 10, 10))
    feeds = [{"x": x, "use_a": np.array(flag)} for flag in (True, False)]
    return CorpusModel(model, feeds, layers=5)


# -- paddle2onnx ---------------------------------------------------------------------------------


def paddle2onnx_style() -> CorpusModel:
    """A PP-OCR-like classifier head as paddle2onnx writes it (see the module docstring)."""
    nodes: list[onnx.NodeProto] = []
    counter: dict[str, int] = {}

    def node(op_type, inputs, outputs, **attrs):
        index = counter.get(op_type, 0)
        counter[op_type] = index + 1
        nodes.append(helper.make_node(op_type, inputs, outputs, name=f"{op_type}@{index}", **attrs))
        return outputs[0]

    def const(name, array):
        nodes.append(_constant(name, np.asarray(array), f"Constant@{len(nodes)}"))
        return name

    def conv_bn(x, name, shape, seed, *, group=1, stride=1, pad=None):
        kernel = shape[2:]
        pad = (kernel[0] // 2) if pad is None else pad
        w = const(f"{name}_weights", weight(shape, seed))
        y = node("Conv", [x, w], [f"conv2d_{seed}.tmp_0"], dilations=[1, 1], group=group,
                 kernel_shape=list(kernel), pads=[pad] * 4, strides=[stride, stride])
        rng = np.random.default_rng(seed)
        channels = shape[0]
        bn = [const(f"{name}_bn_{part}", value.astype(np.float32)) for part, value in (
            ("scale", rng.uniform(0.5, 1.5, channels)), ("offset", rng.uniform(-0.2, 0.2, channels)),
            ("mean", rng.uniform(-0.1, 0.1, channels)), ("variance", rng.uniform(0.5, 1.5, channels)))]
        return node("BatchNormalization", [y, *bn], [f"batch_norm_{seed}.tmp_2"], epsilon=1e-5, momentum=0.9)

    def hardswish(x, tag):
        three, zero, six = const(f"{tag}_3", np.float32(3)), const(f"{tag}_0", np.float32(0)), const(f"{tag}_6", np.float32(6))
        shifted = node("Add", [x, three], [f"{tag}_add"])
        clipped = node("Clip", [shifted, zero, six], [f"{tag}_clip"])
        return node("Div", [node("Mul", [x, clipped], [f"{tag}_mul"]), six], [f"hardswish_{tag}.tmp_0"])

    h = hardswish(conv_bn("x", "conv1", (8, 3, 3, 3), 41, stride=2), "hs1")
    h = node("Relu", [conv_bn(h, "conv2_expand", (16, 8, 1, 1), 42)], ["relu_0.tmp_0"])
    h = node("Identity", [node("Identity", [h], ["relu_0.tmp_0_id"])], ["relu_0.tmp_0_id2"])
    h = node("Relu", [conv_bn(h, "conv2_depthwise", (16, 1, 3, 3), 43, group=16)], ["relu_1.tmp_0"])
    # squeeze-excite: two 1x1 Convs with biases, HardSigmoid gate
    se = node("GlobalAveragePool", [h], ["pool2d_0.tmp_0"])
    se = node("Relu", [node("Conv", [se, const("conv2_se_1_weights", weight((4, 16, 1, 1), 44)),
                                     const("conv2_se_1_offset", np.full(4, 0.1, np.float32))], ["se_1.tmp_0"])], ["se_1.tmp_1"])
    se = node("Conv", [se, const("conv2_se_2_weights", weight((16, 4, 1, 1), 45)),
                       const("conv2_se_2_offset", np.zeros(16, np.float32))], ["se_2.tmp_0"])
    h = node("Mul", [h, node("HardSigmoid", [se], ["hard_sigmoid_0.tmp_0"], alpha=0.2, beta=0.5)], ["se_out.tmp_0"])
    h = conv_bn(h, "conv2_linear", (8, 16, 1, 1), 46)
    h = node("GlobalAveragePool", [node("MaxPool", [h], ["pool2d_1.tmp_0"], ceil_mode=0, kernel_shape=[2, 2],
                                        pads=[0, 0, 0, 0], strides=[2, 2])], ["pool2d_2.tmp_0"])
    # flatten the paddle2onnx way: the batch size read back from the shape, int32 round trip
    shape = node("Cast", [node("Shape", [h], ["Shape@0"])], ["shape_0.tmp_0"], to=TensorProto.INT32)
    batch = node("Slice", [shape, const("slice_starts", np.array([0], np.int64)), const("slice_ends", np.array([1], np.int64)),
                           const("slice_axes", np.array([0], np.int64)), const("slice_steps", np.array([1], np.int64))],
                 ["shape_0.tmp_0_slice_0"])
    target = node("Concat", [node("Cast", [batch], ["batch_i64"], to=TensorProto.INT64),
                             node("Cast", [const("fill_constant_1.tmp_0", np.array([-1], np.int32))], ["rest_i64"],
                                  to=TensorProto.INT64)], ["Concat@0"], axis=-1)
    h = node("Reshape", [h, target], ["reshape2_0.tmp_0"])
    h = node("MatMul", [h, const("fc_0.w_0", weight((8, 6), 47))], ["linear_1.tmp_0"])
    h = node("Add", [h, const("fc_0.b_0", np.full(6, 0.01, np.float32))], ["linear_1.tmp_1"])
    h = node("Softmax", [h], ["softmax_0.tmp_0"], axis=1)
    node("Identity", [node("Identity", [h], ["softmax_0.tmp_0_id"])], ["save_infer_model/scale_0.tmp_1"])

    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "?", "?"])
    x_info.type.tensor_type.shape.dim[0].dim_value = -1  # paddle2onnx's way of saying "dynamic"
    y_info = helper.make_tensor_value_info("save_infer_model/scale_0.tmp_1", TensorProto.FLOAT, [-1, 6])
    model = helper.make_model(
        helper.make_graph(nodes, "paddle", [x_info], [y_info]),
        opset_imports=[helper.make_opsetid("", 11)], ir_version=7, producer_name="PaddlePaddle",
    )
    return CorpusModel(model, [{"x": _x((2, 3, 16, 24))}, {"x": _x((1, 3, 8, 8), 12)}], layers=7)


# -- tf2onnx -------------------------------------------------------------------------------------


def tf2onnx_style() -> CorpusModel:
    """A Keras CNN as tf2onnx writes it (opset 13): NHWC in, MatMul + Add dense layers."""
    prefix = "StatefulPartitionedCall/model"
    f32 = TensorProto.FLOAT
    inits = [
        _tensor(f"{prefix}/conv2d/Conv2D/ReadVariableOp:0", (8, 3, 3, 3), 51),
        numpy_helper.from_array(np.full(8, 0.05, np.float32), f"{prefix}/conv2d/BiasAdd/ReadVariableOp:0"),
        _tensor(f"{prefix}/conv2d_1/Conv2D/ReadVariableOp:0", (32, 8, 3, 3), 52),
        numpy_helper.from_array(np.zeros(32, np.float32), f"{prefix}/conv2d_1/BiasAdd/ReadVariableOp:0"),
        _tensor(f"{prefix}/dense/MatMul/ReadVariableOp:0", (32, 12), 53),
        numpy_helper.from_array(np.full(12, 0.02, np.float32), f"{prefix}/dense/BiasAdd/ReadVariableOp:0"),
        _tensor(f"{prefix}/dense_1/MatMul/ReadVariableOp:0", (12, 4), 54),
        numpy_helper.from_array(np.zeros(4, np.float32), f"{prefix}/dense_1/BiasAdd/ReadVariableOp:0"),
        numpy_helper.from_array(np.array([1], np.int64), "const_axes__21"),
    ]
    nodes = [
        helper.make_node("Transpose", ["input_1"], ["input_1_nchw"], name=f"{prefix}/conv2d/Conv2D__6", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["input_1_nchw", inits[0].name, inits[1].name], [f"{prefix}/conv2d/BiasAdd:0"],
                         name=f"{prefix}/conv2d/BiasAdd", auto_pad="SAME_UPPER", dilations=[1, 1],
                         kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Relu", [f"{prefix}/conv2d/BiasAdd:0"], [f"{prefix}/conv2d/Relu:0"], name=f"{prefix}/conv2d/Relu"),
        helper.make_node("Conv", [f"{prefix}/conv2d/Relu:0", inits[2].name, inits[3].name], [f"{prefix}/conv2d_1/BiasAdd:0"],
                         name=f"{prefix}/conv2d_1/BiasAdd", auto_pad="VALID", dilations=[1, 1], kernel_shape=[3, 3],
                         strides=[1, 1]),
        helper.make_node("Relu", [f"{prefix}/conv2d_1/BiasAdd:0"], [f"{prefix}/conv2d_1/Relu:0"], name=f"{prefix}/conv2d_1/Relu"),
        helper.make_node("Transpose", [f"{prefix}/conv2d_1/Relu:0"], ["nhwc"], name=f"{prefix}/conv2d_1/Relu__12", perm=[0, 2, 3, 1]),
        helper.make_node("ReduceMean", ["nhwc"], ["pooled"], name=f"{prefix}/global_average_pooling2d/Mean",
                         axes=[1, 2], keepdims=0),
        helper.make_node("Unsqueeze", ["pooled", "const_axes__21"], ["pooled_3d"], name=f"{prefix}/expand"),
        helper.make_node("Squeeze", ["pooled_3d", "const_axes__21"], ["pooled_2d"], name=f"{prefix}/squeeze"),
        helper.make_node("MatMul", ["pooled_2d", inits[4].name], ["dense_mm"], name=f"{prefix}/dense/MatMul"),
        helper.make_node("Add", ["dense_mm", inits[5].name], ["dense_add"], name=f"{prefix}/dense/BiasAdd"),
        helper.make_node("Relu", ["dense_add"], ["dense_relu"], name=f"{prefix}/dense/Relu"),
        helper.make_node("MatMul", ["dense_relu", inits[6].name], ["dense_1_mm"], name=f"{prefix}/dense_1/MatMul"),
        helper.make_node("Add", ["dense_1_mm", inits[7].name], ["dense_1_add"], name=f"{prefix}/dense_1/BiasAdd"),
        helper.make_node("Softmax", ["dense_1_add"], ["dense_1"], name=f"{prefix}/dense_1/Softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "tf2onnx", [helper.make_tensor_value_info("input_1", f32, ["unk__28", 12, 12, 3])],
        [helper.make_tensor_value_info("dense_1", f32, ["unk__29", 4])], inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8,
        producer_name="tf2onnx", producer_version="1.16.1 15c810",
    )
    return CorpusModel(model, [{"input_1": _x((2, 12, 12, 3))}], layers=4)


# -- float16 -------------------------------------------------------------------------------------


def float16_converted() -> CorpusModel:
    """tests/models.cnn converted to float16 by onnxconverter-common, float32 inputs/outputs kept."""
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(cnn(17), keep_io_types=True)
    return CorpusModel(model, [{"x": _x((2, 3, 16, 16))}], layers=4, rtol=1e-3)
