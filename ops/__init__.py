"""The ``ai.onnxvq`` custom ops (version 1), one module per op.

Each op module states its math, gives the numpy ``decode`` (built on the single definition in
:mod:`onnxvq.ops.vq_weight`), an ``onnx.reference`` kernel (``OpRun`` subclass), the standard-op
function body (``function(variant, opset)``) and conformance ``CASES``.
"""

from __future__ import annotations

from types import ModuleType

from onnxvq.ops import vq_conv, vq_gemm, vq_matmul, vq_weight
from onnxvq.ops.vq_weight import DOMAIN, MIN_OPSET, VERSION, Variant

__all__ = [
    "DOMAIN",
    "MIN_OPSET",
    "VERSION",
    "Variant",
    "input_names",
    "op_for_consumer",
    "op_module",
    "reference_ops",
]

_BY_CONSUMER: dict[str, ModuleType] = {m.CONSUMER: m for m in (vq_conv, vq_gemm, vq_matmul)}
_BY_OP_TYPE: dict[str, ModuleType] = {m.OP_TYPE: m for m in _BY_CONSUMER.values()}


def op_for_consumer(op_type: str) -> ModuleType:
    """The VQ op module that replaces a standard ``Conv``/``Gemm``/``MatMul``."""
    return _BY_CONSUMER[op_type]


def op_module(vq_op_type: str) -> ModuleType:
    """The op module of a VQ op type (``VQConv``, ...)."""
    return _BY_OP_TYPE[vq_op_type]


def input_names(vq_op_type: str, overload: str) -> list[str]:
    """Input names, in node order, of a VQ node of this op type and overload."""
    return op_module(vq_op_type).input_names(vq_weight.node_variant(overload))


def consumers() -> tuple[str, ...]:
    return tuple(_BY_CONSUMER)


def reference_ops() -> list[type]:
    """``OpRun`` classes for ``onnx.reference.ReferenceEvaluator(model, new_ops=...)``."""
    return [vq_conv.VQConv, vq_gemm.VQGemm, vq_matmul.VQMatMul]
