"""Run an ONNX model's main graph in torch eager mode, so that a loss can be backpropagated through it.

End-to-end fine-tuning needs the ORIGINAL graph to be differentiable with respect to some of its
weights. :class:`TorchGraph` interprets the graph node by node with torch operations (the graph is
never regenerated, exported or modified): initializers named in ``trainable`` become
:class:`torch.nn.Parameter`, and ``forward(feeds, overrides)`` can replace any initializer or Constant
output by a tensor computed elsewhere (for example weights decoded from trainable codebooks), with
gradients flowing into whatever produced it::

    graph = TorchGraph(model, trainable={"fc1.bias"})
    (logits,) = graph({"x": x}, overrides={"fc1.weight": codebook[codes]})
    loss(logits, teacher_logits).backward()

Semantics are those of inference, also in ``train()`` mode: Dropout is the identity,
BatchNormalization uses the stored mean and variance, nothing is random. Integer tensors (shapes,
indices) stay int64 torch tensors and shape arithmetic runs eagerly, so dynamic shapes just work.
The opset is the model's default-domain opset; attributes that moved to inputs across opsets 11-21
(Reshape, Squeeze, Unsqueeze, Reduce*, Split, Slice, Clip, Pad, Resize) are read from where the
opset puts them. Model-local functions are inlined first (``onnx.inliner.inline_local_functions``).

Supported op types of the default domain (:data:`SUPPORTED_OPS`), by group:

* convolution and linear: Conv (1-3D, groups, dilations, pads, auto_pad), ConvTranspose (1-3D,
  output_padding, output_shape), Gemm, MatMul, Einsum
* element-wise arithmetic: Add, Sub, Mul, Div, Pow, Mod, Neg, Abs, Sqrt, Reciprocal, Exp, Log,
  Erf, Floor, Ceil, Round, Sign, Sin, Cos, Tan, Asin, Acos, Atan, Sinh, Cosh, Asinh, Acosh, Atanh,
  Min, Max, Sum, Mean, Clip
* activations: Relu, LeakyRelu, PRelu, Elu, Celu, Selu, ThresholdedRelu, Sigmoid, HardSigmoid,
  HardSwish, Tanh, Gelu, Softplus, Softsign, Mish, Softmax, LogSoftmax, Hardmax
* pooling: MaxPool (also its Indices output), AveragePool (no dilations), GlobalAveragePool,
  GlobalMaxPool
* normalization: BatchNormalization (stored statistics), LayerNormalization,
  InstanceNormalization, GroupNormalization
* shape and layout: Shape, Size, Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Expand, Tile,
  Concat, Split, Slice, Pad (constant, reflect, edge, wrap), Resize and Upsample (nearest, linear,
  cubic; no antialias), DepthToSpace, SpaceToDepth, Trilu
* indexing: Gather, GatherElements, GatherND, ScatterElements, ScatterND (reduction none/add),
  Where, NonZero, OneHot, TopK, ArgMax, ArgMin, CumSum, Range
* reductions: ReduceSum, ReduceMean, ReduceMax, ReduceMin, ReduceProd, ReduceL1, ReduceL2,
  ReduceSumSquare, ReduceLogSum, ReduceLogSumExp
* logic and comparison: Equal, Less, Greater, LessOrEqual, GreaterOrEqual, Not, And, Or, Xor, IsNaN,
  IsInf
* constants and types: Constant, ConstantOfShape, Cast, CastLike, Identity, Dropout
* recurrent: LSTM, GRU, RNN (every attribute, both layouts, ``sequence_lens``;
  :mod:`onnxvq.finetune.torch_recurrent`)

Not supported (listed by :func:`unsupported_ops`): control flow (If, Loop, Scan), whose
subgraphs this executor does not interpret; sequence, optional and
string ops; quantized ops (QuantizeLinear, QLinearConv, MatMulInteger, ...); any op of a non-default
domain (``com.microsoft::FusedConv``, ``ai.onnx.ml::...``) that is not a model-local function.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx.inliner
import onnx_ir
import torch
import torch.nn.functional as F
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from onnxvq.errors import OnnxVQError

__all__ = ["SUPPORTED_OPS", "TorchGraph", "UnsupportedOpsError", "unsupported_ops"]

Tensor = torch.Tensor
OpFn = Callable[[list, dict, int], list]

_OPS: dict[str, OpFn] = {}
"""op_type (default domain) -> fn(inputs, attrs, opset) -> outputs. ``inputs`` holds a tensor or None
(an omitted optional input) per node input; ``attrs`` maps attribute names to Python values (ints,
floats, str, lists, torch tensors) plus ``"_n_outputs"`` (the node's number of outputs) and
``"_op_type"`` (for functions that serve several op types)."""


def _op(*op_types: str):
    def register(fn: OpFn) -> OpFn:
        for op_type in op_types:
            _OPS[op_type] = fn
        return fn

    return register


# --------------------------------------------------------------------------------------------------
# data types and small helpers

_DTYPES: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.INT64: torch.int64,
    TensorProto.INT32: torch.int32,
    TensorProto.INT16: torch.int16,
    TensorProto.INT8: torch.int8,
    TensorProto.UINT8: torch.uint8,
    TensorProto.BOOL: torch.bool,
    TensorProto.COMPLEX64: torch.complex64,
    TensorProto.COMPLEX128: torch.complex128,
}
for _onnx_name, _torch_name in (
    ("UINT16", "uint16"),
    ("UINT32", "uint32"),
    ("UINT64", "uint64"),
    ("FLOAT8E4M3FN", "float8_e4m3fn"),
    ("FLOAT8E4M3FNUZ", "float8_e4m3fnuz"),
    ("FLOAT8E5M2", "float8_e5m2"),
    ("FLOAT8E5M2FNUZ", "float8_e5m2fnuz"),
):
    if hasattr(TensorProto, _onnx_name) and hasattr(torch, _torch_name):
        _DTYPES[getattr(TensorProto, _onnx_name)] = getattr(torch, _torch_name)


def _torch_dtype(onnx_type: int) -> torch.dtype:
    try:
        return _DTYPES[onnx_type]
    except KeyError:
        name = helper.tensor_dtype_to_string(onnx_type) if onnx_type else "UNDEFINED"
        raise NotImplementedError(f"ONNX data type {name} has no torch equivalent here") from None


def _tensor_from_proto(proto: onnx.TensorProto) -> Tensor:
    """A torch tensor (a copy) with the proto's ONNX dtype."""
    dtype = _torch_dtype(proto.data_type)
    array = numpy_helper.to_array(proto)
    try:
        tensor = torch.from_numpy(np.array(array, copy=True))
    except TypeError:  # ml_dtypes arrays (bfloat16, float8) that torch cannot read directly
        tensor = torch.from_numpy(array.astype(np.float32))
    return tensor.to(dtype)


def _opt(inputs: list, i: int) -> Tensor | None:
    """Input i, or None when it is omitted (empty name) or absent (trailing optional input)."""
    return inputs[i] if i < len(inputs) else None


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _ints(tensor: Tensor | None) -> list[int] | None:
    return None if tensor is None else [int(v) for v in tensor.reshape(-1).tolist()]


def _torch_pad(pairs: list[tuple[int, int]]) -> list[int]:
    """(begin, end) pairs for the LAST len(pairs) dims in order -> F.pad's argument (last dim first)."""
    flat: list[int] = []
    for begin, end in reversed(pairs):
        flat += [begin, end]
    return flat


def _window(x: Tensor, axis: int, start: int, size: int) -> Tensor:
    """x[start:start+size] along axis, where positions outside x read as zeros."""
    length = x.shape[axis]
    before, after = max(0, -start), max(0, start + size - length)
    if before or after:
        pairs = [(0, 0)] * (x.dim() - axis)
        pairs[0] = (before, after)
        x = F.pad(x, _torch_pad(pairs))
        start += before
    return x.narrow(axis, start, size)


# --------------------------------------------------------------------------------------------------
# element-wise


def _unary(fn: Callable[[Tensor], Tensor]) -> OpFn:
    return lambda inputs, attrs, opset: [fn(inputs[0])]


for _name, _fn in {
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal,
    "Exp": torch.exp,
    "Log": torch.log,
    "Erf": torch.erf,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # half to even, as ONNX
    "Sign": torch.sign,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Tan": torch.tan,
    "Asin": torch.asin,
    "Acos": torch.acos,
    "Atan": torch.atan,
    "Sinh": torch.sinh,
    "Cosh": torch.cosh,
    "Asinh": torch.asinh,
    "Acosh": torch.acosh,
    "Atanh": torch.atanh,
    "Tanh": torch.tanh,
    "Sigmoid": torch.sigmoid,
    "Relu": torch.relu,
    "Softsign": F.softsign,
    "Mish": F.mish,
    "HardSwish": F.hardswish,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
    "Identity": lambda x: x,
}.items():
    _OPS[_name] = _unary(_fn)

for _name, _fn in {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Equal": torch.eq,
    "Less": torch.lt,
    "Greater": torch.gt,
    "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}.items():
    _OPS[_name] = (lambda fn: lambda inputs, attrs, opset: [fn(inputs[0], inputs[1])])(_fn)


@_op("Div")
def _div(inputs, attrs, opset):
    """Integer division truncates toward zero (C semantics, as onnxruntime)."""
    a, b = inputs
    if a.is_floating_point() or a.is_complex():
        return [a / b]
    return [torch.div(a, b, rounding_mode="trunc")]


@_op("Pow")
def _pow(inputs, attrs, opset):
    """The result has the type of the base X, whatever the exponent's type."""
    return [torch.pow(inputs[0], inputs[1]).to(inputs[0].dtype)]


@_op("Mod")
def _mod(inputs, attrs, opset):
    """fmod=1: sign of the dividend (C fmod); fmod=0 (integers): sign of the divisor (Python %)."""
    a, b = inputs
    return [torch.fmod(a, b) if attrs.get("fmod", 0) else torch.remainder(a, b)]


@_op("Where")
def _where(inputs, attrs, opset):
    return [torch.where(inputs[0].bool(), inputs[1], inputs[2])]


@_op("IsInf")
def _isinf(inputs, attrs, opset):
    x = inputs[0]
    positive = torch.isposinf(x) if attrs.get("detect_positive", 1) else torch.zeros_like(x, dtype=torch.bool)
    negative = torch.isneginf(x) if attrs.get("detect_negative", 1) else torch.zeros_like(x, dtype=torch.bool)
    return [positive | negative]


@_op("Min", "Max", "Sum", "Mean")
def _variadic(inputs, attrs, opset):
    """Variadic with multidirectional broadcasting; Mean is the Sum divided by the input count."""
    op = attrs["_op_type"]
    fn = {"Min": torch.minimum, "Max": torch.maximum}.get(op, torch.add)
    out = functools.reduce(fn, inputs)
    return [out / len(inputs) if op == "Mean" else out]


@_op("Clip")
def _clip(inputs, attrs, opset):
    """opset < 11: min/max attributes; >= 11: optional inputs 1 and 2. min > max gives max."""
    x = inputs[0]
    if opset < 11:
        low, high = attrs.get("min"), attrs.get("max")
    else:
        low, high = _opt(inputs, 1), _opt(inputs, 2)
    if low is None and high is None:
        return [x]
    return [torch.clamp(x, low, high)]


# --------------------------------------------------------------------------------------------------
# activations


@_op("LeakyRelu")
def _leaky_relu(inputs, attrs, opset):
    return [F.leaky_relu(inputs[0], attrs.get("alpha", 0.01))]


@_op("PRelu")
def _prelu(inputs, attrs, opset):
    """slope broadcasts unidirectionally to X (not only per channel as in torch's prelu)."""
    x, slope = inputs
    return [torch.where(x < 0, x * slope, x)]


@_op("Elu")
def _elu(inputs, attrs, opset):
    return [F.elu(inputs[0], attrs.get("alpha", 1.0))]


@_op("Celu")
def _celu(inputs, attrs, opset):
    return [F.celu(inputs[0], attrs.get("alpha", 1.0))]


@_op("Selu")
def _selu(inputs, attrs, opset):
    """gamma * (x if x > 0 else alpha * (exp(x) - 1)), with ONNX's attribute defaults."""
    x = inputs[0]
    alpha = attrs.get("alpha", 1.67326319217681884765625)
    gamma = attrs.get("gamma", 1.05070102214813232421875)
    return [gamma * torch.where(x > 0, x, alpha * torch.expm1(x))]


@_op("ThresholdedRelu")
def _thresholded_relu(inputs, attrs, opset):
    x = inputs[0]
    return [torch.where(x > attrs.get("alpha", 1.0), x, torch.zeros_like(x))]


@_op("HardSigmoid")
def _hard_sigmoid(inputs, attrs, opset):
    """max(0, min(1, alpha * x + beta)), alpha 0.2 and beta 0.5 by default (not torch's 1/6)."""
    return [torch.clamp(attrs.get("alpha", 0.2) * inputs[0] + attrs.get("beta", 0.5), 0.0, 1.0)]


@_op("Gelu")
def _gelu(inputs, attrs, opset):
    return [F.gelu(inputs[0], approximate=attrs.get("approximate", "none"))]


@_op("Softplus")
def _softplus(inputs, attrs, opset):
    return [F.softplus(inputs[0])]


def _softmax_family(fn: Callable[[Tensor, int], Tensor]) -> OpFn:
    def run(inputs, attrs, opset):
        """opset < 13: the input is flattened to 2-D at `axis` (default 1) and normalized over the
        second dim; opset >= 13: normalized over the single `axis` (default -1)."""
        x = inputs[0]
        if opset < 13:
            axis = _axis(attrs.get("axis", 1), x.dim())
            flat = x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
            return [fn(flat, 1).reshape(x.shape)]
        return [fn(x, _axis(attrs.get("axis", -1), x.dim()))]

    return run


def _hardmax(x: Tensor, axis: int) -> Tensor:
    """1 at the first maximum along axis, 0 elsewhere."""
    return torch.zeros_like(x).scatter(axis, x.argmax(axis, keepdim=True), 1)


_OPS["Softmax"] = _softmax_family(lambda x, axis: torch.softmax(x, axis))
_OPS["LogSoftmax"] = _softmax_family(lambda x, axis: torch.log_softmax(x, axis))
_OPS["Hardmax"] = _softmax_family(_hardmax)


# --------------------------------------------------------------------------------------------------
# convolution and linear


@_op("MatMul")
def _matmul(inputs, attrs, opset):
    return [torch.matmul(inputs[0], inputs[1])]


@_op("Gemm")
def _gemm(inputs, attrs, opset):
    """alpha * A' @ B' + beta * C, A' = A.T if transA, B' = B.T if transB; C optional, broadcast."""
    a, b, c = inputs[0], inputs[1], _opt(inputs, 2)
    if attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if attrs.get("transB", 0):
        b = b.transpose(0, 1)
    y = a @ b
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c if beta == 1.0 else c * beta)
    return [y]


@_op("Einsum")
def _einsum(inputs, attrs, opset):
    return [torch.einsum(attrs["equation"].replace(" ", ""), *inputs)]


def _spatial_pads(attrs: dict, in_sizes, kernel, strides, dilations) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial dim. pads = [x1_begin, x2_begin, ..., x1_end, x2_end];
    auto_pad SAME_* pads so that out = ceil(in / stride), the odd pixel at the end (SAME_UPPER) or
    at the beginning (SAME_LOWER); VALID pads nothing. Dilations count in the SAME padding, as the
    spec says (onnxruntime's pools leave them out, and its Conv rejects SAME with dilations)."""
    n = len(kernel)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pairs = []
        for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
            total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            pairs.append((small, big) if auto_pad == "SAME_UPPER" else (big, small))
        return pairs
    if auto_pad == "VALID":
        return [(0, 0)] * n
    pads = attrs.get("pads") or [0] * (2 * n)
    return [(pads[i], pads[i + n]) for i in range(n)]


@_op("Conv")
def _conv(inputs, attrs, opset):
    """N-D convolution; asymmetric pads are applied with F.pad before a pad-free convolution."""
    x, w, b = inputs[0], inputs[1], _opt(inputs, 2)
    n = w.dim() - 2
    strides = attrs.get("strides") or [1] * n
    dilations = attrs.get("dilations") or [1] * n
    pairs = _spatial_pads(attrs, x.shape[2:], w.shape[2:], strides, dilations)
    if all(begin == end for begin, end in pairs):
        padding = [begin for begin, _ in pairs]
    else:
        x, padding = F.pad(x, _torch_pad(pairs)), [0] * n
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return [conv(x, w, b, strides, padding, dilations, attrs.get("group", 1))]


@_op("ConvTranspose")
def _conv_transpose(inputs, attrs, opset):
    """The full transposed convolution, stride * (in - 1) + (k - 1) * dilation + 1 long, is cut to
    [pad_begin, full + output_padding - pad_end) (zeros past its end). With output_shape or auto_pad
    SAME_* (target = in * stride) the output is `target` long and starts at the begin pad of
    total = max(0, full + output_padding - target): total // 2 for SAME_UPPER, the larger half
    otherwise (NOTSET, SAME_LOWER), as the spec and onnxruntime do."""
    x, w, b = inputs[0], inputs[1], _opt(inputs, 2)
    n = w.dim() - 2
    kernel = w.shape[2:]
    strides = attrs.get("strides") or [1] * n
    dilations = attrs.get("dilations") or [1] * n
    output_padding = attrs.get("output_padding") or [0] * n
    auto_pad = attrs.get("auto_pad", "NOTSET")
    in_sizes = x.shape[2:]
    full = [s * (i - 1) + (k - 1) * d + 1 for i, k, s, d in zip(in_sizes, kernel, strides, dilations)]
    output_shape = attrs.get("output_shape")
    if output_shape or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = list(output_shape)[-n:] if output_shape else [i * s for i, s in zip(in_sizes, strides)]
        windows = []
        for length, extra, size in zip(full, output_padding, target):
            total = max(0, length + extra - size)
            windows.append((total // 2 if auto_pad == "SAME_UPPER" else total - total // 2, size))
    else:
        pads = (None if auto_pad == "VALID" else attrs.get("pads")) or [0] * (2 * n)
        windows = [(pads[i], length + extra - pads[i] - pads[i + n])
                   for i, (length, extra) in enumerate(zip(full, output_padding))]
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    y = conv(x, w, None, strides, 0, 0, attrs.get("group", 1), dilations)
    for i, (begin, size) in enumerate(windows):
        y = _window(y, 2 + i, begin, size)
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * n)
    return [y]


# --------------------------------------------------------------------------------------------------
# pooling


def _pool_pairs(x: Tensor, attrs: dict, kernel) -> tuple[list, list, list, list]:
    """(ONNX pads, pads that give exactly the ONNX output size, strides, dilations). Output size:
    floor((in + pads - (k - 1) * d - 1) / s) + 1, or ceil(...) with ceil_mode, where a last window
    that would start past the input and its begin padding is dropped (onnxruntime, torch)."""
    n = len(kernel)
    strides = attrs.get("strides") or [1] * n
    dilations = attrs.get("dilations") or [1] * n
    pairs = _spatial_pads(attrs, x.shape[2:], kernel, strides, dilations)
    ceil_mode = attrs.get("ceil_mode", 0)
    exact = []
    for size, (begin, end), k, s, d in zip(x.shape[2:], pairs, kernel, strides, dilations):
        span = size + begin + end - (k - 1) * d - 1
        if ceil_mode:
            out = -(-span // s) + 1
            if (out - 1) * s >= size + begin:
                out -= 1
        else:
            out = span // s + 1
        exact.append((begin, (out - 1) * s + (k - 1) * d + 1 - size - begin))
    return pairs, exact, strides, dilations


@_op("MaxPool")
def _max_pool(inputs, attrs, opset):
    """Padding reads as -inf. Indices (output 1) are flat over the whole input (N, C, D1, ...),
    spatial dims in reverse order when storage_order = 1."""
    x = inputs[0]
    kernel = attrs["kernel_shape"]
    n = len(kernel)
    _, exact, strides, dilations = _pool_pairs(x, attrs, kernel)
    low = -math.inf if x.is_floating_point() else torch.iinfo(x.dtype).min
    padded = F.pad(x, _torch_pad(exact), value=low)
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
    want_indices = attrs["_n_outputs"] > 1
    result = pool(padded, kernel, strides, 0, dilations, ceil_mode=False, return_indices=want_indices)
    if not want_indices:
        return [result]
    y, flat = result
    sizes, padded_sizes = x.shape[2:], padded.shape[2:]
    coords = []
    for i in reversed(range(n)):
        coords.insert(0, flat % padded_sizes[i] - exact[i][0])
        flat = torch.div(flat, padded_sizes[i], rounding_mode="floor")
    order = list(range(n)) if attrs.get("storage_order", 0) == 0 else list(reversed(range(n)))
    index = torch.zeros_like(coords[0])
    for i in order:
        index = index * sizes[i] + coords[i]
    plane = torch.arange(x.shape[0] * x.shape[1], device=x.device).reshape(x.shape[:2] + (1,) * n)
    return [y, index + plane * math.prod(sizes)]


def _window_sums(x: Tensor, kernel, strides) -> Tensor:
    """Sums over pooling windows (no padding), via avg_pool with divisor 1 (1-D is lifted to 2-D)."""
    if len(kernel) == 1:
        return _window_sums(x.unsqueeze(-1), list(kernel) + [1], list(strides) + [1]).squeeze(-1)
    pool = F.avg_pool2d if len(kernel) == 2 else F.avg_pool3d
    return pool(x, kernel, strides, 0, divisor_override=1)


@_op("AveragePool")
def _average_pool(inputs, attrs, opset):
    """Window sum / number of counted positions: input positions, plus the pads when
    count_include_pad = 1; positions past the pads (ceil_mode) never count."""
    x = inputs[0]
    kernel = attrs["kernel_shape"]
    n = len(kernel)
    pairs, exact, strides, dilations = _pool_pairs(x, attrs, kernel)
    if any(d != 1 for d in dilations):
        raise NotImplementedError("AveragePool with dilations other than 1")
    if all(begin == 0 and end <= 0 for begin, end in exact):  # no padding: torch floors the same way
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
        return [pool(x, kernel, strides)]
    ones = torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
    mask = F.pad(ones, _torch_pad(pairs), value=1.0 if attrs.get("count_include_pad", 0) else 0.0)
    mask = F.pad(mask, _torch_pad([(0, e - p[1]) for p, (_, e) in zip(pairs, exact)]))
    sums = _window_sums(F.pad(x, _torch_pad(exact)), kernel, strides)
    return [sums / _window_sums(mask, kernel, strides)]


@_op("GlobalAveragePool")
def _global_average_pool(inputs, attrs, opset):
    x = inputs[0]
    return [x.mean(dim=tuple(range(2, x.dim())), keepdim=True)]


@_op("GlobalMaxPool")
def _global_max_pool(inputs, attrs, opset):
    x = inputs[0]
    return [x.amax(dim=tuple(range(2, x.dim())), keepdim=True)]


# --------------------------------------------------------------------------------------------------
# normalization


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (x.dim() - 2)


@_op("BatchNormalization")
def _batch_norm(inputs, attrs, opset):
    """Inference form, always: (x - mean) / sqrt(var + epsilon) * scale + B with the stored mean and
    var, per channel (dim 1). Only output 0 is produced (training_mode is ignored)."""
    x, scale, bias, mean, var = inputs[:5]
    shape = _channel_shape(x)
    inv = scale.reshape(shape) * torch.rsqrt(var.reshape(shape) + attrs.get("epsilon", 1e-5))
    return [(x - mean.reshape(shape)) * inv + bias.reshape(shape)]


def _stash(x: Tensor, attrs: dict) -> Tensor:
    """stash_type 1 (default): statistics in float32, also for float16/bfloat16 inputs."""
    if attrs.get("stash_type", 1) == 1 and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


@_op("LayerNormalization")
def _layer_norm(inputs, attrs, opset):
    """Normalizes over dims axis..rank-1 (axis default -1), then * Scale + B (broadcast). Outputs 1
    and 2 (Mean, InvStdDev) keep the normalized dims as size 1."""
    x, scale, bias = inputs[0], inputs[1], _opt(inputs, 2)
    axis = _axis(attrs.get("axis", -1), x.dim())
    eps = attrs.get("epsilon", 1e-5)
    normalized = tuple(x.shape[axis:])
    fits = tuple(scale.shape) == normalized and (bias is None or tuple(bias.shape) == normalized)
    if attrs["_n_outputs"] == 1 and fits and x.dtype in (torch.float32, torch.float64):
        return [F.layer_norm(x, normalized, scale, bias, eps)]
    xs = _stash(x, attrs)
    dims = tuple(range(axis, x.dim()))
    mean = xs.mean(dims, keepdim=True)
    inv_std = torch.rsqrt((xs - mean).square().mean(dims, keepdim=True) + eps)
    y = ((xs - mean) * inv_std).to(x.dtype) * scale
    if bias is not None:
        y = y + bias
    return [y, mean, inv_std][: attrs["_n_outputs"]]


@_op("InstanceNormalization")
def _instance_norm(inputs, attrs, opset):
    x, scale, bias = inputs
    return [F.instance_norm(x, weight=scale, bias=bias, eps=attrs.get("epsilon", 1e-5))]


@_op("GroupNormalization")
def _group_norm(inputs, attrs, opset):
    """Statistics over each of num_groups channel groups; scale and bias are per group (opset 18)
    or per channel (opset 21), told apart by their length."""
    x, scale, bias = inputs
    groups = attrs["num_groups"]
    n, c = x.shape[:2]
    xs = _stash(x, attrs).reshape(n, groups, -1)
    mean = xs.mean(-1, keepdim=True)
    var = (xs - mean).square().mean(-1, keepdim=True)
    y = ((xs - mean) * torch.rsqrt(var + attrs.get("epsilon", 1e-5))).reshape(x.shape).to(x.dtype)
    if scale.numel() != c:
        scale, bias = scale.repeat_interleave(c // groups), bias.repeat_interleave(c // groups)
    shape = _channel_shape(x)
    return [y * scale.reshape(shape) + bias.reshape(shape)]


# --------------------------------------------------------------------------------------------------
# shape and layout


@_op("Shape")
def _shape(inputs, attrs, opset):
    """Dims [start:end) (opset 15; negative and out-of-range values clamp like Python slices)."""
    x = inputs[0]
    dims = list(x.shape)[attrs.get("start", 0) : attrs.get("end")]
    return [torch.tensor(dims, dtype=torch.int64, device=x.device)]


@_op("Size")
def _size(inputs, attrs, opset):
    return [torch.tensor(inputs[0].numel(), dtype=torch.int64, device=inputs[0].device)]


@_op("Reshape")
def _reshape(inputs, attrs, opset):
    """0 copies the input dim (unless allowzero = 1, then it is a 0 dim); -1 is inferred."""
    x = inputs[0]
    shape = _ints(_opt(inputs, 1)) if _opt(inputs, 1) is not None else list(attrs["shape"])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


@_op("Flatten")
def _flatten(inputs, attrs, opset):
    """2-D: (prod(dims[:axis]), prod(dims[axis:])), axis default 1."""
    x = inputs[0]
    axis = _axis(attrs.get("axis", 1), x.dim())
    return [x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))]


@_op("Transpose")
def _transpose(inputs, attrs, opset):
    x = inputs[0]
    return [x.permute(attrs.get("perm") or list(reversed(range(x.dim()))))]


def _axes(inputs: list, attrs: dict, index: int = 1) -> list[int] | None:
    """The axes from input `index` (newer opsets) or from the `axes` attribute (older ones)."""
    if _opt(inputs, index) is not None:
        return _ints(inputs[index])
    return list(attrs["axes"]) if "axes" in attrs else None


@_op("Squeeze")
def _squeeze(inputs, attrs, opset):
    """axes: attribute before opset 13, input after; none given removes every dim of size 1."""
    x = inputs[0]
    axes = _axes(inputs, attrs)
    if not axes:
        return [x.squeeze()]
    for axis in sorted((_axis(a, x.dim()) for a in axes), reverse=True):
        x = x.squeeze(axis)
    return [x]


@_op("Unsqueeze")
def _unsqueeze(inputs, attrs, opset):
    """axes (attribute before opset 13, input after) index the OUTPUT dims."""
    x = inputs[0]
    axes = _axes(inputs, attrs)
    rank = x.dim() + len(axes)
    for axis in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(axis)
    return [x]


@_op("Expand")
def _expand(inputs, attrs, opset):
    """Bidirectional broadcast of x and `shape` (a 1 in shape keeps x's dim)."""
    x = inputs[0]
    return [x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(inputs[1]))))]


@_op("Tile")
def _tile(inputs, attrs, opset):
    return [inputs[0].repeat(_ints(inputs[1]))]


@_op("Concat")
def _concat(inputs, attrs, opset):
    tensors = [t for t in inputs if t is not None]
    return [torch.cat(tensors, _axis(attrs["axis"], tensors[0].dim()))]


@_op("Split")
def _split(inputs, attrs, opset):
    """Sizes from input 1 (opset >= 13) or the `split` attribute; otherwise num_outputs (opset 18)
    or the output count parts of ceil(dim / parts), the last one smaller if needed."""
    x = inputs[0]
    axis = _axis(attrs.get("axis", 0), x.dim())
    sizes = _ints(_opt(inputs, 1)) if _opt(inputs, 1) is not None else attrs.get("split")
    if not sizes:
        parts = attrs.get("num_outputs", attrs["_n_outputs"])
        chunk = -(-x.shape[axis] // parts)
        sizes = [chunk] * (parts - 1) + [x.shape[axis] - chunk * (parts - 1)]
    return list(torch.split(x, list(sizes), axis))


@_op("Slice")
def _slice(inputs, attrs, opset):
    """starts/ends/axes as attributes before opset 10, inputs (with steps) after. Negative starts
    and ends count from the end; they clamp to [0, dim] for positive steps and [-1, dim - 1] (start
    [0, dim - 1]) for negative steps, which are run as a positive step on the flipped axis."""
    x = inputs[0]
    if opset < 10:
        starts, ends, axes, steps = list(attrs["starts"]), list(attrs["ends"]), attrs.get("axes"), None
    else:
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        axes, steps = _ints(_opt(inputs, 3)), _ints(_opt(inputs, 4))
    axes = list(axes) if axes else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _axis(axis, x.dim())
        dim = x.shape[axis]
        if step == 0:
            raise ValueError("Slice step cannot be 0")
        if dim == 0:
            continue
        start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
        index = [slice(None)] * x.dim()
        if step > 0:
            index[axis] = slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            x = x.flip(axis)
            index[axis] = slice(dim - 1 - start, dim - 1 - end, -step)
        x = x[tuple(index)]
    return [x]


@_op("Pad")
def _pad(inputs, attrs, opset):
    """pads = [x1_begin, x2_begin, ..., x1_end, x2_end] over `axes` (opset 18; all dims by default),
    attributes before opset 11. Negative pads crop. constant pads with the value (default 0);
    reflect mirrors without repeating the edge; edge repeats it; wrap is periodic."""
    x = inputs[0]
    mode = attrs.get("mode", "constant")
    if opset < 11:
        pads, value, axes = list(attrs["pads"]), attrs.get("value", 0.0), None
    else:
        pads = _ints(inputs[1])
        value = _opt(inputs, 2)
        value = 0 if value is None or value.numel() == 0 else value.reshape(-1)[0].item()
        axes = _ints(_opt(inputs, 3))
    axes = [_axis(a, x.dim()) for a in axes] if axes else list(range(x.dim()))
    n = len(axes)
    per_axis = {axis: (pads[i], pads[i + n]) for i, axis in enumerate(axes)}
    if mode == "constant":
        pairs = [per_axis.get(axis, (0, 0)) for axis in range(x.dim())]
        return [F.pad(x, _torch_pad(pairs), value=value)]
    for axis, (begin, end) in per_axis.items():
        if begin == 0 and end == 0:
            continue
        size = x.shape[axis]
        index = torch.arange(-begin, size + end, device=x.device)
        if mode == "edge":
            index = index.clamp(0, size - 1)
        elif mode == "reflect":
            if size == 1:
                index = torch.zeros_like(index)
            else:
                period = 2 * (size - 1)
                index = index.abs() % period
                index = torch.where(index >= size, period - index, index)
        elif mode == "wrap":
            index = index % size
        else:
            raise NotImplementedError(f"Pad mode {mode!r}")
        x = x.index_select(axis, index)
    return [x]


def _source_coordinates(mode: str, out_len: int, in_len: int, scale: float, roi: tuple[float, float],
                        device) -> Tensor:
    """Resize's coordinate_transformation_mode: output index -> input coordinate (float32, as
    onnxruntime computes it)."""
    o = torch.arange(out_len, dtype=torch.float32, device=device)
    if mode == "half_pixel":
        return (o + 0.5) / scale - 0.5
    if mode == "half_pixel_symmetric":
        adjustment = out_len / (scale * in_len)
        offset = in_len / 2 * (1 - adjustment)
        return offset + (o + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (o + 0.5) / scale - 0.5 if out_len > 1 else torch.zeros_like(o)
    if mode == "align_corners":
        return torch.zeros_like(o) if out_len == 1 else o * (in_len - 1) / (out_len - 1)
    if mode == "asymmetric":
        return o / scale
    if mode == "tf_half_pixel_for_nn":
        return (o + 0.5) / scale
    if mode == "tf_crop_and_resize":
        start, end = roi
        if out_len == 1:
            return torch.full_like(o, 0.5 * (start + end) * (in_len - 1))
        return start * (in_len - 1) + o * ((end - start) * (in_len - 1) / (out_len - 1))
    raise NotImplementedError(f"Resize coordinate_transformation_mode {mode!r}")


def _cubic_weights(t: Tensor, a: float) -> list[Tensor]:
    """Keys cubic kernel weights of the taps at offsets -1, 0, 1, 2 from floor(coordinate)."""
    weights = []
    for distance in (t + 1, t, 1 - t, 2 - t):
        d = distance.abs()
        near = ((a + 2) * d - (a + 3)) * d * d + 1
        far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        weights.append(torch.where(d <= 1, near, torch.where(d < 2, far, torch.zeros_like(d))))
    return weights


def _resize_axis(x: Tensor, axis: int, out_len: int, scale: float, roi, attrs: dict, opset: int) -> Tensor:
    in_len = x.shape[axis]
    mode = attrs.get("mode", "nearest")
    ctm = attrs.get("coordinate_transformation_mode", "asymmetric" if opset < 11 else "half_pixel")
    coords = _source_coordinates(ctm, out_len, in_len, scale, roi, x.device)
    shape = [1] * x.dim()
    shape[axis] = out_len

    def pick(index: Tensor) -> Tensor:
        return x.index_select(axis, index.clamp(0, in_len - 1).long())

    def weight(w: Tensor) -> Tensor:
        return w.to(x.dtype).reshape(shape)

    if mode == "nearest":
        rule = attrs.get("nearest_mode", "simple" if opset < 11 else "round_prefer_floor")
        if rule == "round_prefer_floor":
            index = torch.ceil(coords - 0.5)
        elif rule == "round_prefer_ceil":
            index = torch.floor(coords + 0.5)
        elif rule == "floor":
            index = torch.floor(coords)
        elif rule == "ceil":
            index = torch.ceil(coords)
        elif rule == "simple":  # Resize-10 / Upsample in onnxruntime: ceil when downsampling
            index = torch.ceil(coords) if scale < 1 else torch.floor(coords)
        else:
            raise NotImplementedError(f"Resize nearest_mode {rule!r}")
        y = pick(index)
    elif mode == "linear":
        clamped = coords.clamp(0, in_len - 1)
        low = torch.floor(clamped)
        frac = weight(clamped - low)
        y = pick(low) * (1 - frac) + pick(low + 1) * frac
    elif mode == "cubic":
        low = torch.floor(coords)
        weights = _cubic_weights(coords - low, attrs.get("cubic_coeff_a", -0.75))
        taps = [low + offset for offset in (-1, 0, 1, 2)]
        if attrs.get("exclude_outside", 0):
            weights = [torch.where((t >= 0) & (t < in_len), w, torch.zeros_like(w)) for t, w in zip(taps, weights)]
            total = sum(weights)
            weights = [w / total for w in weights]
        y = sum(pick(t) * weight(w) for t, w in zip(taps, weights))
    else:
        raise NotImplementedError(f"Resize mode {mode!r}")
    if ctm == "tf_crop_and_resize":
        outside = weight(((coords < 0) | (coords > in_len - 1)).float()).bool()
        y = torch.where(outside, torch.full_like(y, attrs.get("extrapolation_value", 0.0)), y)
    return y


@_op("Resize", "Upsample")
def _resize(inputs, attrs, opset):
    """Separable per-axis resampling. Inputs: (X, scales) for Upsample and Resize-10, (X, roi,
    scales, sizes) from opset 11; `axes` and keep_aspect_ratio_policy from opset 18. Output length
    floor(in * scale); with sizes, scale = out / in. Coordinates follow
    coordinate_transformation_mode (half_pixel by default, asymmetric before opset 11); nearest
    rounds by nearest_mode; linear clamps coordinates to [0, in - 1]; cubic uses cubic_coeff_a and
    exclude_outside; tf_crop_and_resize writes extrapolation_value outside the input. Negative
    `axes` count from the end (onnxruntime 1.31 leaves such axes unresized)."""
    x = inputs[0]
    if attrs["_op_type"] == "Upsample":
        roi, sizes = None, None
        scales = _opt(inputs, 1).tolist() if _opt(inputs, 1) is not None else list(attrs["scales"])
    elif opset < 11:
        roi, scales, sizes = None, inputs[1].tolist(), None
    else:
        roi, scales, sizes = (_opt(inputs, i) for i in (1, 2, 3))
        roi = roi.tolist() if roi is not None and roi.numel() else None
        scales = scales.tolist() if scales is not None and scales.numel() else None
        sizes = _ints(sizes) if sizes is not None and sizes.numel() else None
    if attrs.get("antialias", 0):
        raise NotImplementedError("Resize with antialias = 1")
    axes = [_axis(a, x.dim()) for a in attrs["axes"]] if attrs.get("axes") else list(range(x.dim()))
    in_lens = [x.shape[a] for a in axes]
    if scales is not None:
        out_lens = [int(math.floor(n * s)) for n, s in zip(in_lens, scales)]
    else:
        policy = attrs.get("keep_aspect_ratio_policy", "stretch")
        if policy == "stretch":
            out_lens = sizes
            scales = [o / n for o, n in zip(sizes, in_lens)]
        else:
            pick = min if policy == "not_larger" else max
            scale = pick(o / n for o, n in zip(sizes, in_lens))
            scales = [scale] * len(axes)
            out_lens = [int(math.floor(scale * n + 0.5)) for n in in_lens]
    ctm = attrs.get("coordinate_transformation_mode", "")
    for k, axis in enumerate(axes):
        if out_lens[k] == in_lens[k] and scales[k] == 1 and ctm != "tf_crop_and_resize":
            continue
        roi_pair = (roi[k], roi[k + len(axes)]) if roi else (0.0, 1.0)
        x = _resize_axis(x, axis, out_lens[k], float(scales[k]), roi_pair, attrs, opset)
    return [x]


@_op("DepthToSpace")
def _depth_to_space(inputs, attrs, opset):
    """DCR (default): channels are (block_h, block_w, C'); CRD: (C', block_h, block_w)."""
    x = inputs[0]
    bs = attrs["blocksize"]
    n, c, h, w = x.shape
    if attrs.get("mode", "DCR") == "DCR":
        y = x.reshape(n, bs, bs, c // bs**2, h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // bs**2, bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
    return [y.reshape(n, c // bs**2, h * bs, w * bs)]


@_op("SpaceToDepth")
def _space_to_depth(inputs, attrs, opset):
    x = inputs[0]
    bs = attrs["blocksize"]
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
    return [y.reshape(n, c * bs * bs, h // bs, w // bs)]


@_op("Trilu")
def _trilu(inputs, attrs, opset):
    """Keeps the upper (upper = 1, default) or lower triangle of the last two dims, from diagonal k."""
    k = int(inputs[1].item()) if _opt(inputs, 1) is not None else 0
    fn = torch.triu if attrs.get("upper", 1) else torch.tril
    return [fn(inputs[0], k)]


# --------------------------------------------------------------------------------------------------
# indexing


def _wrap_negative(index: Tensor, size: int) -> Tensor:
    index = index.long()
    return torch.where(index < 0, index + size, index)


@_op("Gather")
def _gather(inputs, attrs, opset):
    """out shape = data.shape[:axis] + indices.shape + data.shape[axis + 1:]; negative indices wrap."""
    x, index = inputs
    axis = _axis(attrs.get("axis", 0), x.dim())
    index = _wrap_negative(index, x.shape[axis])
    out = x.index_select(axis, index.reshape(-1))
    return [out.reshape(tuple(x.shape[:axis]) + tuple(index.shape) + tuple(x.shape[axis + 1 :]))]


@_op("GatherElements")
def _gather_elements(inputs, attrs, opset):
    x, index = inputs
    axis = _axis(attrs.get("axis", 0), x.dim())
    return [torch.gather(x, axis, _wrap_negative(index, x.shape[axis]))]


def _nd_flat_index(shape, index: Tensor) -> Tensor:
    """Row-major flat position of index[..., :k] within shape[:k]."""
    flat = torch.zeros(index.shape[:-1], dtype=torch.int64, device=index.device)
    for i in range(index.shape[-1]):
        flat = flat * shape[i] + _wrap_negative(index[..., i], shape[i])
    return flat


@_op("GatherND")
def _gather_nd(inputs, attrs, opset):
    """out = data[b..., index[b..., i..., :]] for the first batch_dims shared dims."""
    data, index = inputs
    b = attrs.get("batch_dims", 0)
    k = index.shape[-1]
    batch = math.prod(data.shape[:b])
    rest = tuple(data.shape[b + k :])
    table = data.reshape((batch, math.prod(data.shape[b : b + k])) + rest)
    flat = _nd_flat_index(data.shape[b : b + k], index).reshape(batch, -1)
    rows = torch.arange(batch, device=data.device).unsqueeze(1)
    return [table[rows, flat].reshape(tuple(index.shape[:-1]) + rest)]


@_op("ScatterND")
def _scatter_nd(inputs, attrs, opset):
    """A copy of data with data[index[i..., :]] = updates[i...] (reduction none or add)."""
    data, index, updates = inputs
    k = index.shape[-1]
    rest = tuple(data.shape[k:])
    reduction = attrs.get("reduction", "none")
    if reduction not in ("none", "add"):
        raise NotImplementedError(f"ScatterND reduction {reduction!r}")
    table = data.reshape((math.prod(data.shape[:k]),) + rest)
    flat = _nd_flat_index(data.shape[:k], index).reshape(-1)
    out = table.index_put((flat,), updates.reshape((-1,) + rest), accumulate=reduction == "add")
    return [out.reshape(data.shape)]


@_op("ScatterElements")
def _scatter_elements(inputs, attrs, opset):
    data, index, updates = inputs
    axis = _axis(attrs.get("axis", 0), data.dim())
    index = _wrap_negative(index, data.shape[axis])
    reduction = attrs.get("reduction", "none")
    if reduction == "none":
        return [torch.scatter(data, axis, index, updates)]
    torch_reduce = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}[reduction]
    return [torch.scatter_reduce(data, axis, index, updates, torch_reduce, include_self=True)]


@_op("NonZero")
def _nonzero(inputs, attrs, opset):
    return [torch.nonzero(inputs[0]).transpose(0, 1).contiguous()]


@_op("OneHot")
def _one_hot(inputs, attrs, opset):
    """values = [off, on]; negative indices count from depth; out-of-range ones give all off."""
    index, depth, values = inputs
    depth = int(depth.reshape(-1)[0].item())
    index = index.long()
    index = torch.where(index < 0, index + depth, index)
    hot = index.unsqueeze(-1) == torch.arange(depth, device=index.device)
    hot = hot.movedim(-1, _axis(attrs.get("axis", -1), index.dim() + 1))
    return [torch.where(hot, values[1], values[0])]


@_op("TopK")
def _top_k(inputs, attrs, opset):
    """k from input 1 (opset >= 10) or the attribute; largest/sorted (opset 11)."""
    x = inputs[0]
    k = int(inputs[1].reshape(-1)[0].item()) if _opt(inputs, 1) is not None else attrs["k"]
    axis = _axis(attrs.get("axis", -1), x.dim())
    values, indices = torch.topk(x, k, axis, largest=bool(attrs.get("largest", 1)), sorted=True)
    return [values, indices]


def _arg_reduce(fn: Callable) -> OpFn:
    def run(inputs, attrs, opset):
        """Index of the first extreme along axis (the last with select_last_index = 1), int64."""
        x = inputs[0]
        axis = _axis(attrs.get("axis", 0), x.dim())
        keep = bool(attrs.get("keepdims", 1))
        if attrs.get("select_last_index", 0):
            return [x.shape[axis] - 1 - fn(x.flip(axis), axis, keep)]
        return [fn(x, axis, keep)]

    return run


_OPS["ArgMax"] = _arg_reduce(torch.argmax)
_OPS["ArgMin"] = _arg_reduce(torch.argmin)


@_op("CumSum")
def _cumsum(inputs, attrs, opset):
    """Running sum along axis (input 1); exclusive leaves out the element itself, reverse runs
    from the end."""
    x = inputs[0]
    axis = _axis(int(inputs[1].reshape(-1)[0].item()), x.dim())
    reverse = attrs.get("reverse", 0)
    if reverse:
        x = x.flip(axis)
    y = torch.cumsum(x, axis, dtype=x.dtype)
    if attrs.get("exclusive", 0):
        pairs = [(0, 0)] * (x.dim() - axis)
        pairs[0] = (1, -1)
        y = F.pad(y, _torch_pad(pairs))
    return [y.flip(axis) if reverse else y]


@_op("Range")
def _range(inputs, attrs, opset):
    """max(ceil((limit - start) / delta), 0) values start, start + delta, ... of start's type."""
    start, limit, delta = inputs
    return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)]


# --------------------------------------------------------------------------------------------------
# reductions


def _reduce(fn: Callable[[Tensor, tuple[int, ...], bool], Tensor]) -> OpFn:
    def run(inputs, attrs, opset):
        """axes from input 1 (ReduceSum from opset 13, the others from 18) or the attribute; none
        reduces every dim, unless noop_with_empty_axes = 1 (then the input is returned)."""
        x = inputs[0]
        axes = _axes(inputs, attrs)
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        if x.dim() == 0:
            return [fn(x.reshape(1), (0,), False).to(x.dtype)]
        dims = tuple(sorted(_axis(a, x.dim()) for a in axes))
        return [fn(x, dims, bool(attrs.get("keepdims", 1))).to(x.dtype)]

    return run


def _prod(x: Tensor, dims: tuple[int, ...], keep: bool) -> Tensor:
    for dim in reversed(dims):
        x = x.prod(dim, keepdim=True)
    return x if keep else x.squeeze(dims)


_OPS["ReduceSum"] = _reduce(lambda x, d, k: x.sum(d, keepdim=k))
_OPS["ReduceMean"] = _reduce(lambda x, d, k: x.mean(d, keepdim=k))
_OPS["ReduceMax"] = _reduce(lambda x, d, k: x.amax(d, keepdim=k))
_OPS["ReduceMin"] = _reduce(lambda x, d, k: x.amin(d, keepdim=k))
_OPS["ReduceProd"] = _reduce(_prod)
_OPS["ReduceL1"] = _reduce(lambda x, d, k: x.abs().sum(d, keepdim=k))
_OPS["ReduceL2"] = _reduce(lambda x, d, k: x.square().sum(d, keepdim=k).sqrt())
_OPS["ReduceSumSquare"] = _reduce(lambda x, d, k: x.square().sum(d, keepdim=k))
_OPS["ReduceLogSum"] = _reduce(lambda x, d, k: x.sum(d, keepdim=k).log())
_OPS["ReduceLogSumExp"] = _reduce(lambda x, d, k: torch.logsumexp(x, d, keepdim=k))


# --------------------------------------------------------------------------------------------------
# constants and types


@_op("ConstantOfShape")
def _constant_of_shape(inputs, attrs, opset):
    """A tensor of the given shape filled with `value` (a 1-element tensor; float32 0 by default)."""
    value = attrs.get("value")
    shape = _ints(inputs[0])
    device = inputs[0].device
    if value is None:
        return [torch.zeros(shape, dtype=torch.float32, device=device)]
    return [torch.full(shape, value.reshape(-1)[0].item(), dtype=value.dtype, device=device)]


@_op("Cast")
def _cast(inputs, attrs, opset):
    """Float to integer truncates toward zero; nonzero to bool is True."""
    return [inputs[0].to(_torch_dtype(attrs["to"]))]


@_op("CastLike")
def _cast_like(inputs, attrs, opset):
    return [inputs[0].to(inputs[1].dtype)]


@_op("Dropout")
def _dropout(inputs, attrs, opset):
    """Always the inference form: output = input, mask (output 1) all True."""
    x = inputs[0]
    return [x, torch.ones_like(x, dtype=torch.bool)][: max(1, attrs["_n_outputs"])]


def _constant_value(attrs: dict) -> Tensor:
    """The tensor of a Constant node: value, value_float(s) or value_int(s)."""
    if "value" in attrs:
        return attrs["value"]
    if "value_float" in attrs:
        return torch.tensor(attrs["value_float"], dtype=torch.float32)
    if "value_floats" in attrs:
        return torch.tensor(list(attrs["value_floats"]), dtype=torch.float32)
    if "value_int" in attrs:
        return torch.tensor(attrs["value_int"], dtype=torch.int64)
    if "value_ints" in attrs:
        return torch.tensor(list(attrs["value_ints"]), dtype=torch.int64)
    raise NotImplementedError(f"Constant node with attribute(s) {sorted(attrs)}")


# LSTM, GRU and RNN live in their own module, which registers them through _op.
from onnxvq.finetune import torch_recurrent  # noqa: E402,F401

SUPPORTED_OPS: frozenset[str] = frozenset(_OPS) | {"Constant"}
"""Op types of the default ONNX domain that :class:`TorchGraph` runs."""


# --------------------------------------------------------------------------------------------------
# the module


class UnsupportedOpsError(OnnxVQError):
    """Raised by TorchGraph(...) when the graph has ops it cannot run; .op_types: list[str] (sorted)."""

    def __init__(self, op_types: Collection[str]):
        self.op_types = sorted(set(op_types))
        super().__init__(
            f"the model has op types the torch fine-tune executor cannot run: {', '.join(self.op_types)}; "
            "fine-tune a model made of standard ONNX ops (see onnxvq.finetune.torch_graph.SUPPORTED_OPS)"
        )


def _as_proto(model: onnx_ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, onnx_ir.Model):
        return onnx_ir.serde.serialize_model(model)
    raise TypeError(f"expected an onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def _is_default_domain(domain: str) -> bool:
    return domain in ("", "ai.onnx")


def unsupported_ops(model: onnx_ir.Model | onnx.ModelProto) -> list[str]:
    """Sorted, de-duplicated op types the executor cannot run (non-default domains as "domain::Op",
    e.g. "com.microsoft::FusedConv"). Control flow (If, Loop, Scan) is NOT supported and is listed. Nodes that call the model's own local functions count as
    supported when every op in the function body is (bodies are inlined before running); otherwise
    the body's unsupported ops are listed."""
    if isinstance(model, onnx_ir.Model):
        main = [(n.domain, n.op_type, n.overload) for n in model.graph]
        functions = {key: [(n.domain, n.op_type, n.overload) for n in f] for key, f in model.functions.items()}
    elif isinstance(model, onnx.ModelProto):
        main = [(n.domain, n.op_type, n.overload) for n in model.graph.node]
        functions = {
            (f.domain, f.name, f.overload): [(n.domain, n.op_type, n.overload) for n in f.node]
            for f in model.functions
        }
    else:
        raise TypeError(f"expected an onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")
    missing: set[str] = set()
    checked: set[tuple[str, str, str]] = set()

    def check(nodes: list[tuple[str, str, str]]) -> None:
        for domain, op_type, overload in nodes:
            key = (domain, op_type, overload)
            if key in functions:
                if key not in checked:  # ONNX functions cannot recurse; this also guards cycles
                    checked.add(key)
                    check(functions[key])
            elif _is_default_domain(domain):
                if op_type not in SUPPORTED_OPS:
                    missing.add(op_type)
            else:
                missing.add(f"{domain}::{op_type}")

    check(main)
    return sorted(missing)


@dataclass(frozen=True)
class _Node:
    op_type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any]


def _attribute(attr: onnx.AttributeProto) -> Any:
    value = helper.get_attribute_value(attr)
    if attr.type == AttributeProto.TENSOR:
        return _tensor_from_proto(value)
    if attr.type == AttributeProto.TENSORS:
        return [_tensor_from_proto(t) for t in value]
    if attr.type == AttributeProto.STRING:
        return value.decode("utf-8")
    if attr.type == AttributeProto.STRINGS:
        return [v.decode("utf-8") for v in value]
    if attr.type in (AttributeProto.INTS, AttributeProto.FLOATS):
        return list(value)
    return value


def _default_opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if _is_default_domain(entry.domain):
            return entry.version
    raise OnnxVQError("the model imports no version of the default ONNX domain; add one to opset_import")


class TorchGraph(torch.nn.Module):
    """The model's main graph as a torch module (see the module docstring)."""

    input_names: list[str]
    output_names: list[str]

    def __init__(self, model: onnx_ir.Model | onnx.ModelProto, *, trainable: Collection[str] = ()):
        """Prepares to run `model`'s main graph. Raises UnsupportedOpsError naming the op types when
        unsupported_ops(model) is not empty. Float initializers whose names are in `trainable` become
        torch.nn.Parameter (requires_grad) registered in the module; all other initializers are frozen
        (non-persistent buffers, requires_grad False). Never modifies `model`."""
        super().__init__()
        proto = _as_proto(model)
        missing = unsupported_ops(proto)
        if missing:
            raise UnsupportedOpsError(missing)
        if len(proto.functions):
            proto = onnx.inliner.inline_local_functions(proto)  # returns a new model
        self.opset = _default_opset(proto)
        graph = proto.graph
        initializer_names = {t.name for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in initializer_names]
        self.output_names = [o.name for o in graph.output]
        self._feedable = {i.name for i in graph.input}
        trainable = set(trainable)
        unknown = sorted(trainable - initializer_names)
        if unknown:
            raise KeyError(f"trainable names that are not initializers of the graph: {unknown}")

        self._attr_of: dict[str, str] = {}  # initializer / Constant output name -> module attribute
        for proto_tensor in graph.initializer:
            tensor = _tensor_from_proto(proto_tensor)
            if proto_tensor.name in trainable:
                if not tensor.is_floating_point():
                    raise ValueError(
                        f"trainable initializer {proto_tensor.name!r} is not a float tensor ({tensor.dtype})"
                    )
                self._register(proto_tensor.name, torch.nn.Parameter(tensor))
            else:
                self._register(proto_tensor.name, tensor)

        nodes = []
        for node in graph.node:
            attrs = {a.name: _attribute(a) for a in node.attribute}
            if node.op_type == "Constant":
                self._register(node.output[0], _constant_value(attrs))
                continue
            attrs["_n_outputs"] = len(node.output)
            attrs["_op_type"] = node.op_type
            nodes.append(_Node(node.op_type, node.name, tuple(node.input), tuple(node.output), attrs))
        self._nodes = nodes

        # free each intermediate value after its last use (graph outputs are kept)
        last_use: dict[str, int] = {}
        for i, node in enumerate(nodes):
            for name in node.inputs:
                if name:
                    last_use[name] = i
        for i, node in enumerate(nodes):
            for name in node.outputs:
                if name and name not in last_use:
                    last_use[name] = i
        self._dead_after: list[list[str]] = [[] for _ in nodes]
        for name, i in last_use.items():
            if name not in self.output_names:
                self._dead_after[i].append(name)

    def _register(self, name: str, tensor: Tensor) -> None:
        """Register under a sanitized, unique attribute name (ONNX names have dots and slashes)."""
        base = re.sub(r"[^0-9A-Za-z_]", "_", name) or "_"
        attr, i = base, 0
        while hasattr(self, attr):
            i += 1
            attr = f"{base}_{i}"
        if isinstance(tensor, torch.nn.Parameter):
            self.register_parameter(attr, tensor)
        else:
            self.register_buffer(attr, tensor, persistent=False)
        self._attr_of[name] = attr

    def initializer(self, name: str) -> Tensor:
        """The current tensor for an initializer or Constant output (the Parameter if trainable)."""
        try:
            return getattr(self, self._attr_of[name])
        except KeyError:
            raise KeyError(f"{name!r} is not an initializer or Constant output of the graph") from None

    def forward(
        self, feeds: Mapping[str, Tensor], overrides: Mapping[str, Tensor] | None = None
    ) -> list[Tensor]:
        """Runs the graph; returns graph outputs in order. `overrides` maps a value name (an initializer
        name, or the output name of a Constant node) to a tensor used instead of it; gradients flow
        through override tensors into whatever produced them. A Constant node whose output is
        overridden is not evaluated. Unknown override or feed names raise KeyError."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(self._attr_of))
        if unknown:
            raise KeyError(
                f"overrides for names that are neither initializers nor Constant outputs of the graph: {unknown}"
            )
        unknown = sorted(set(feeds) - self._feedable)
        if unknown:
            raise KeyError(f"feeds for names that are not graph inputs: {unknown} (inputs: {self.input_names})")
        absent = [name for name in self.input_names if name not in feeds]
        if absent:
            raise KeyError(f"missing feeds for graph inputs {absent}")

        env: dict[str, Tensor] = {name: getattr(self, attr) for name, attr in self._attr_of.items()}
        for name, value in feeds.items():
            env[name] = value if isinstance(value, Tensor) else torch.as_tensor(value)
        env.update(overrides)
        for node, dead in zip(self._nodes, self._dead_after):
            try:
                args = [env[name] if name else None for name in node.inputs]
            except KeyError as error:
                raise KeyError(f"{node.op_type} node {node.name!r} reads {error.args[0]!r}, which no "
                               "earlier node, input or initializer defines") from None
            try:
                outputs = _OPS[node.op_type](args, node.attrs, self.opset)
            except Exception as error:
                if hasattr(error, "add_note"):
                    error.add_note(f"while running the {node.op_type} node {node.name!r} of the ONNX graph")
                raise
            for name, value in zip(node.outputs, outputs):
                if name:
                    env[name] = value
            for name in dead:
                env.pop(name, None)
        return [env[name] for name in self.output_names]

    def extra_repr(self) -> str:
        trainable = sum(1 for _ in self.parameters())
        return f"{len(self._nodes)} nodes, opset {self.opset}, {trainable} trainable initializers"
