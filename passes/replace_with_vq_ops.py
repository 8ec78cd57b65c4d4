"""Replace compressed layer nodes (Conv, ConvTranspose, Gemm, MatMul, Gather, LSTM, GRU, RNN)
by their ``ai.onnxvq`` ops.

Rule: for each ``(layer, packed)`` pair, the layer's node ``Conv(X, W[, B])``,
``Gemm(A, W[, C])``, ``MatMul(X, W)``, ``MatMul(W, X)`` or ``LSTM(X, W, R[, B, ...])`` (GRU, RNN)
becomes ``VQConv(X, codes, codebook[, projection][, signs][, scales][, B])`` (etc.; a recurrent
op's W and R are one encoded weight, its optional inputs follow, and it declares every output
of its body; a Gather's indices come first) with the node's own attributes unchanged, the VQ
attributes of ``onnxvq.ops.vq_weight`` added, and the overload of its structural variant. The
new node keeps the old node's name, doc string, metadata and output values (so names, types and
shapes downstream are untouched). A weight shared by several layers gets one set of
initializers, ``<weight>.vq_codes``, ``<weight>.vq_codebook`` and ``<weight>.vq_<extra>`` for
each extra encoded tensor, in the main graph (subgraph nodes read them from the outer scope); a
universal codebook (``vq4all``) is one initializer for every node,
``onnxvq.universal_codebook.<first 12 hex digits of its hash>``. A
dense weight left without users is removed: its initializer, the ``Constant`` node that produced
it, or a QDQ weight's ``DequantizeLinear`` and integer tensor. Nothing else in the graph changes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import onnx_ir as ir

from onnxvq import ops, shared_codebook
from onnxvq.candidates import Layer
from onnxvq.packing import PackedWeight
from onnxvq.passes._values import register_initializer, remove_if_dead, replace_node, value_names

__all__ = ["CODES_SUFFIX", "UNIVERSAL_PREFIX", "ReplaceWithVQOpsPass"]

logger = logging.getLogger(__name__)

CODES_SUFFIX = ".vq_codes"
UNIVERSAL_PREFIX = shared_codebook.PREFIX


class ReplaceWithVQOpsPass(ir.passes.InPlacePass):
    """Swap each layer's node for its VQ op; see the module docstring for the rule."""

    def __init__(self, replacements: Sequence[tuple[Layer, PackedWeight]]) -> None:
        super().__init__()
        self.replacements = list(replacements)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        taken = value_names(model)
        stored: dict[ir.Value, list[ir.Value]] = {}
        shared: dict[str, ir.Value] = {}  # universal codebooks by content hash: one initializer
        for layer, packed in self.replacements:
            if layer.weight not in stored:
                tensors = {"codes": packed.codes, "codebook": packed.codebook, **packed.extras}
                values = {}
                for name, array in tensors.items():
                    if name == "codebook" and packed.shared_codebook:
                        if packed.shared_codebook not in shared:
                            shared[packed.shared_codebook] = register_initializer(
                                model.graph, f"{UNIVERSAL_PREFIX}{packed.shared_codebook[:12]}", array, taken)
                        values[name] = shared[packed.shared_codebook]
                    else:
                        values[name] = register_initializer(model.graph, f"{layer.weight.name}.vq_{name}", array, taken)
                stored[layer.weight] = list(values.values())
            _replace_node(layer, packed, stored[layer.weight])
        for weight in stored:
            remove_if_dead(weight)
        for layer, _ in self.replacements:
            for part in layer.parts:
                remove_if_dead(part)
        return ir.passes.PassResult(model, modified=bool(self.replacements))


def _replace_node(layer: Layer, packed: PackedWeight, encoded: list[ir.Value]) -> None:
    node = layer.node
    op = ops.op_for_consumer(node.op_type)
    inputs = list(node.inputs)
    if node.op_type == "MatMul":
        activation, rest = inputs[1 - layer.weight_index], []
    elif node.op_type == "Gather":  # Gather(table, indices): the indices come first
        activation, rest = inputs[1], []
    else:  # Conv/Gemm: the bias after the weight; recurrent ops: the optional inputs after W, R
        activation, rest = inputs[0], inputs[1 + max(1, len(layer.parts)) :]
    while rest and rest[-1] is None:
        rest.pop()
    transposed, _ = layer.view()
    variant = ops.Variant.of(
        code_bits=packed.code_bits,
        codes_shape=packed.codes.shape,
        d=packed.d,
        weight_shape=packed.weight_shape,
        transposed=transposed,
        weight_left=layer.weight_left,
        extras=tuple(packed.extras),
    )
    attributes = list(layer.consumer_attributes.values()) + _vq_attributes(packed)
    replace_node(
        node, ops.DOMAIN, op.OP_TYPE, [activation, *encoded, *rest], attributes, variant.overload,
        # a recurrent body computes all of its op's outputs: the node declares each of them
        num_outputs=len(op.outputs) if layer.parts else 1,
    )
    logger.debug("replaced %s %r by %s (%s)", layer.op_type, layer.name, op.OP_TYPE, variant.overload)


def _vq_attributes(packed: PackedWeight) -> list[ir.Attr]:
    values = packed.attributes()
    return [
        ir.AttrTensor("weight_shape", ir.tensor(values["weight_shape"])),
        ir.AttrInt64("weight_dtype", values["weight_dtype"]),
        ir.AttrInt64("code_bits", values["code_bits"]),
        ir.AttrString("method", values["method"]),
        ir.AttrString("extra_inputs", values["extra_inputs"]),
    ]
