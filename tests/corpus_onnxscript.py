"""The onnxscript-authored model of the corpus (``corpus_models.onnxscript_model``).

onnxscript's ``@script`` reads a function's source and resolves its type annotations among the
module's globals, so the functions live at module level, here, with their weights. Weights are
``Constant`` nodes (what ``@script`` writes for tensors); ``Swish`` and ``Mix`` become model-local
functions of the domain ``corpus.local``; ``Mix``'s MatMul reads a function input, so it is left
dense and the function must come out unchanged.
"""

from onnxscript import FLOAT, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

from models import weight
from onnx import numpy_helper

local = Opset("corpus.local", 1)
CONV_W = numpy_helper.from_array(weight((8, 4, 3), 21), "conv_w")
FC_W = numpy_helper.from_array(weight((16, 64), 22), "fc_w")
HEAD_W = numpy_helper.from_array(weight((16, 6), 23), "head_w")
MIX_W = numpy_helper.from_array(weight((6, 6), 24), "mix_w")


@script(local, default_opset=op)
def Swish(X):
    return op.Mul(X, op.Sigmoid(X))


@script(local, default_opset=op)
def Mix(X, W):
    return op.Add(X, op.MatMul(X, W))


@script(default_opset=op)
def main(x: FLOAT["N", 4, 10]) -> FLOAT["N", 6]:
    h = op.Relu(op.Conv(x, op.Constant(value=CONV_W), pads=[0, 0], strides=[1]))
    h = op.Reshape(h, op.Constant(value_ints=[-1, 64]))
    h = Swish(op.Gemm(h, op.Constant(value=FC_W), alpha=0.5, transB=1))
    return Mix(op.MatMul(h, op.Constant(value=HEAD_W)), op.Constant(value=MIX_W))
