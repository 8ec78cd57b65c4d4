"""The ``ai.onnxvq`` custom ops (version 1), one module per op.

Each weight op module states its math, gives the numpy ``decode`` (built on the single definition in
:mod:`onnxvq.ops.vq_weight`), an ``onnx.reference`` kernel (``OpRun`` subclass), the standard-op
function body (``function(variant, opset)``) and conformance ``CASES``. :mod:`~onnxvq.ops.pwlu`
is the one op that encodes no weight (a learnable activation): its body is ``function(opset)``.

Running the bodies in ``onnx.reference``: :func:`inline_bodies` first. ``onnx.reference``
(onnx 1.23) cannot run a model-local function as called, for three reasons no body can work
around: it keys functions by (domain, name) and ignores IR 10 overloads, so a model with two
variants of one op runs one body for both; a function attribute the node leaves unset (Gemm's
``alpha``, Conv's ``pads``) is an error rather than "absent"; and its ``Constant`` of opset <= 11
rejects an attribute reference, while ``weight_shape`` reaches the body only through one (a tensor
attribute becomes a value only through ``Constant``, and ``value_ints`` needs opset 12). onnx's
inliner resolves all three as the spec says, which is what onnxruntime does too.
"""

from __future__ import annotations

from types import ModuleType

import onnx
import onnx.inliner

from onnxvq.ops import pwlu, vq_conv, vq_conv_transpose, vq_gather, vq_gemm, vq_matmul, vq_recurrent, vq_weight
from onnxvq.ops.native_library import native_library_path, session_options
from onnxvq.ops.vq_weight import DOMAIN, MIN_OPSET, VERSION, Variant

__all__ = [
    "DOMAIN",
    "MIN_OPSET",
    "VERSION",
    "Variant",
    "function_body",
    "inline_bodies",
    "is_weight_op",
    "input_names",
    "native_library_path",
    "op_for_consumer",
    "op_module",
    "reference_ops",
    "RECURRENT",
    "session_options",
]

# An op module, or an object with its interface (the three recurrent forms share one module).
_BY_CONSUMER: dict[str, ModuleType] = {
    m.CONSUMER: m
    for m in (vq_conv, vq_conv_transpose, vq_gemm, vq_matmul, vq_gather,
              vq_recurrent.LSTM, vq_recurrent.GRU, vq_recurrent.RNN)
}
_BY_OP_TYPE: dict[str, ModuleType] = {m.OP_TYPE: m for m in _BY_CONSUMER.values()}


def op_for_consumer(op_type: str) -> ModuleType:
    """The VQ op module that replaces a standard ``Conv``/``Gemm``/``MatMul``."""
    return _BY_CONSUMER[op_type]


def op_module(vq_op_type: str) -> ModuleType:
    """The op module of a VQ op type (``VQConv``, ...)."""
    return _BY_OP_TYPE[vq_op_type]


def is_weight_op(node) -> bool:
    """Whether an ``ai.onnxvq`` node (onnx-ir or proto) stands for an encoded weight's consumer
    (every op but :mod:`~onnxvq.ops.pwlu`)."""
    return node.domain == DOMAIN and node.op_type in _BY_OP_TYPE


def function_body(op_type: str, overload: str, opset: int) -> onnx.FunctionProto:
    """The standard-op body of an ``ai.onnxvq`` op (and overload) at a default-domain opset."""
    if op_type == pwlu.OP_TYPE:
        return pwlu.function(opset)
    return op_module(op_type).function(vq_weight.Variant.from_overload(overload), opset)


def input_names(vq_op_type: str, overload: str) -> list[str]:
    """Input names, in node order, of a VQ node of this op type and overload."""
    return op_module(vq_op_type).input_names(vq_weight.node_variant(overload))


def consumers() -> tuple[str, ...]:
    return tuple(_BY_CONSUMER)


RECURRENT = ("LSTM", "GRU", "RNN")
"""Consumers whose encoded weight joins two inputs, ``W`` and ``R`` (``onnxvq.layout``)."""


def reference_ops() -> list[type]:
    """``OpRun`` classes for ``onnx.reference.ReferenceEvaluator(model, new_ops=...)``."""
    recurrent = [op.reference_op() for op in (vq_recurrent.LSTM, vq_recurrent.GRU, vq_recurrent.RNN)]
    return [vq_conv.VQConv, vq_conv_transpose.VQConvTranspose, vq_gemm.VQGemm, vq_matmul.VQMatMul,
            vq_gather.VQGather, *recurrent, pwlu.PWLU]


def inline_bodies(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose ``ai.onnxvq`` nodes are replaced by their function bodies.

    Contract: every ``ai.onnxvq`` node, in the main graph and in If/Loop/Scan bodies, becomes the
    standard ops of its own overload's body, with the node's attribute values substituted and
    unset attributes left unset; the ``ai.onnxvq`` functions are dropped; every other model-local
    function is kept as it is. The result computes what onnxruntime computes from ``model`` and
    runs in ``onnx.reference.ReferenceEvaluator`` at every opset the bodies support (>=
    :data:`MIN_OPSET`), which ``model`` itself does not (see the module docstring). ``model`` is
    not modified.

    Example::

        >>> from onnx.reference import ReferenceEvaluator
        >>> outputs = ReferenceEvaluator(inline_bodies(compressed)).run(None, feeds)  # doctest: +SKIP
    """
    ids = sorted({(f.domain, f.name) for f in model.functions if f.domain == DOMAIN})
    if not ids:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    return onnx.inliner.inline_selected_functions(model, ids, exclude=False)
