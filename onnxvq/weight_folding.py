"""Weights an exporter computes from constants, folded into initializers before compression.

torch's ONNX exporter writes an LSTM cell's weights as ``Unsqueeze(Concat(Slice(weight_ih, ...)
x 4))``: the gates reordered from torch's (i, f, g, o) to ONNX's (i, o, f, c) at run time, from
the module's own parameter (silero-vad's decoder does this, inside an If branch). Such a weight
is a constant the graph recomputes; onnxvq can only encode a weight it can read.

Rule: a weight input of a layer op (W of Conv/ConvTranspose, B of Gemm, a MatMul operand whose
partner is not constant, W and R of LSTM/GRU/RNN, a Gather's table) that is not itself a
constant but is computed by standard, deterministic ops (no subgraphs, nothing random) from
constants only, with at most :data:`MAX_CHAIN` nodes, is evaluated once (``onnx.reference``) and
read from a new initializer of the main graph under the same name instead; weights that come out
identical (two If branches reordering one parameter, as in silero-vad) share one initializer,
so they are encoded once. The chain's nodes and
the constants only they read are removed when nothing else reads them. Nothing else changes; the
caller's file is never touched (this runs on onnxvq's in-memory copy).
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper
from onnx.reference import ReferenceEvaluator

from onnxvq.candidates import WEIGHT_SLOTS, constant_tensor, iter_nodes
from onnxvq.passes._values import read_from_initializer, remove_if_dead

__all__ = ["MAX_CHAIN", "fold_weight_chains"]

logger = logging.getLogger(__name__)

MAX_CHAIN = 32
# Random ops, and the quantization ops whose weights onnxvq reads as they are (a QDQ weight is a
# DequantizeLinear of constants: onnxvq.candidates.dequantized_tensor).
_NOT_FOLDED = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
               "DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear"}


def fold_weight_chains(model: ir.Model) -> list[str]:
    """Fold every constant-computed weight of ``model`` in place (module docstring); returns the
    names of the weights folded."""
    folded = []
    seen: dict[tuple, ir.Value] = {}  # identical results (two branches reordering one parameter)
    for node in list(iter_nodes(model)):
        if node.domain != "" or node.op_type not in WEIGHT_SLOTS:
            continue
        for slot in WEIGHT_SLOTS[node.op_type]:
            value = node.inputs[slot] if slot < len(node.inputs) else None
            if value is None or constant_tensor(value) is not None:
                continue
            if node.op_type == "MatMul" and constant_tensor(node.inputs[1 - slot]) is not None:
                continue
            chain = _chain(value)
            if chain is None:
                continue
            try:
                array = _evaluate(value, chain, model.opset_imports.get("", 13))
            except Exception as error:  # an op onnx's reference runtime lacks: left as it is
                logger.info("weight %r computed from constants not folded: %s", value.name, error)
                continue
            if array.dtype.kind != "f" or array.ndim < 2:  # a shape or an index, not a weight
                continue
            name = value.name
            key = (array.shape, array.dtype.str, hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest())
            if key in seen:  # one initializer, so the layers share one encoding
                value.replace_all_uses_with(seen[key])
            else:
                seen[key] = read_from_initializer(model.graph, value, ir.tensor(np.ascontiguousarray(array), name=name))
            _remove_dead(chain)
            folded.append(name)
    if folded:
        logger.info("folded %d weight(s) computed from constants: %s", len(folded), ", ".join(folded))
    return folded


def _chain(value: ir.Value) -> list[ir.Node] | None:
    """The nodes computing ``value`` from constants only, in evaluation order, or None."""
    nodes: list[ir.Node] = []
    seen: set[ir.Node] = set()

    def visit(v: ir.Value) -> bool:
        if constant_tensor(v) is not None:
            return True
        producer = v.producer()
        if producer is None or producer.domain not in ("", "ai.onnx") or producer.op_type in _NOT_FOLDED:
            return False
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in producer.attributes.values()):
            return False
        if producer in seen:
            return True
        if len(seen) >= MAX_CHAIN:
            return False
        seen.add(producer)
        if not all(visit(i) for i in producer.inputs if i is not None):
            return False
        nodes.append(producer)
        return True

    return nodes if visit(value) and nodes else None


def _evaluate(value: ir.Value, chain: list[ir.Node], opset: int) -> np.ndarray:
    """``value`` computed by ``chain`` in onnx's reference runtime."""
    leaves: dict[str, np.ndarray] = {}
    for node in chain:
        for v in node.inputs:
            if v is not None and v.producer() not in chain:
                leaves[v.name] = constant_tensor(v).numpy()
    graph = helper.make_graph(
        [ir.serde.serialize_node(node) for node in chain], "fold", [],
        [helper.make_tensor_value_info(value.name, 0, None)],
        [onnx.numpy_helper.from_array(np.asarray(a), n) for n, a in leaves.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return np.asarray(ReferenceEvaluator(model).run(None, {})[0])


def _remove_dead(chain: list[ir.Node]) -> None:
    """Remove the chain's nodes nothing reads any more (last first), then constants they freed."""
    leaves: list[ir.Value] = []
    for node in reversed(chain):
        if any(v.uses() or v.is_graph_output() for v in node.outputs):
            continue
        leaves += [v for v in node.inputs if v is not None and v.producer() not in chain]
        node.graph.remove(node, safe=True)
    for leaf in dict.fromkeys(leaves):
        remove_if_dead(leaf)
