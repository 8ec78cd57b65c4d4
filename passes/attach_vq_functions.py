"""Attach the standard-op function bodies that let stock runtimes run ``ai.onnxvq`` nodes.

Rule: every distinct ``(op_type, overload)`` of an ``ai.onnxvq`` node anywhere in the model (main
graph and subgraphs) gets a model-local function built by its op module at the model's default
opset; functions already present are kept. The ``ai.onnxvq`` opset import (version 1) is added,
and the IR version is raised to 10 when lower, because function overloads need IR >= 10 (local
functions alone need 8).
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from onnxvq import ops
from onnxvq.candidates import iter_nodes

__all__ = ["MIN_IR_VERSION", "AttachVQFunctionsPass"]

logger = logging.getLogger(__name__)

MIN_IR_VERSION = 10


class AttachVQFunctionsPass(ir.passes.InPlacePass):
    """Add the function body of each VQ (op, overload) in use; see the module docstring."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        used = {
            (node.op_type, node.overload)
            for node in iter_nodes(model)
            if node.domain == ops.DOMAIN
        }
        if not used:
            return ir.passes.PassResult(model, modified=False)
        opset = model.opset_imports.get("", None)
        if opset is None or opset < ops.MIN_OPSET:
            raise ValueError(f"VQ function bodies need default-domain opset >= {ops.MIN_OPSET}")
        for op_type, overload in sorted(used):
            identifier = (ops.DOMAIN, op_type, overload)
            if identifier in model.functions:
                continue
            proto = ops.function_body(op_type, overload, opset)
            model.functions[identifier] = ir.serde.deserialize_function(proto)
            logger.debug("attached function %s.%s (%s)", ops.DOMAIN, op_type, overload)
        model.opset_imports[ops.DOMAIN] = ops.VERSION
        if model.ir_version < MIN_IR_VERSION:
            model.ir_version = MIN_IR_VERSION
        return ir.passes.PassResult(model, modified=True)
