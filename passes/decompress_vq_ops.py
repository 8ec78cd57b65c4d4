"""Turn ``ai.onnxvq`` nodes back into standard Conv/Gemm/MatMul/Gather/LSTM/GRU/RNN with dense weights.

Rule: each VQ node becomes its consumer op (``VQConv`` -> ``Conv``, ...) with the consumer's own
attributes, the activation and bias in their original positions (a ``weight_left`` MatMul takes the
weight first), and a dense initializer decoded by the op's numpy ``decode``, stored at
``weight_dtype``. Nodes that shared one ``codes`` tensor share one dense initializer, named after
the codes minus ``.vq_codes`` when that name is free (a recurrent op's R: that name plus
``.recurrence``). The VQ initializers, functions and the
``ai.onnxvq`` opset import are removed when nothing uses them any more. Node names, outputs, doc
strings and metadata are kept.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxvq import ops
from onnxvq.candidates import iter_nodes
from onnxvq.passes._values import register_initializer, remove_if_dead, replace_node, value_names
from onnxvq.passes.replace_with_vq_ops import CODES_SUFFIX

__all__ = ["DecompressVQOpsPass"]


class DecompressVQOpsPass(ir.passes.InPlacePass):
    """Replace every VQ node by its dense standard-op twin; see the module docstring."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        vq_nodes = [n for n in iter_nodes(model) if ops.is_weight_op(n)]
        taken = value_names(model)
        dense: dict[ir.Value, list[ir.Value]] = {}
        encoded_values: set[ir.Value] = set()
        for node in vq_nodes:
            op = ops.op_module(node.op_type)
            inputs = list(node.inputs)
            names = ops.vq_weight.encoded_inputs(ops.vq_weight.node_variant(node.overload))
            encoded, rest = inputs[1 : 1 + len(names)], inputs[1 + len(names) :]
            codes = encoded[0]
            encoded_values.update(v for v in encoded if v is not None)
            if codes not in dense:
                dense[codes] = _dense_weights(model.graph, op, node, dict(zip(names, encoded)), taken)
            weights = dense[codes]
            attributes = {name: attr for name, attr in node.attributes.items()}
            weight_left = bool(attributes.pop("weight_left").value) if "weight_left" in attributes else False
            for name in ops.vq_weight.VQ_ATTRIBUTES:
                attributes.pop(name, None)
            if op.CONSUMER == "MatMul":
                new_inputs = [weights[0], inputs[0]] if weight_left else [inputs[0], weights[0]]
            elif op.CONSUMER == "Gather":
                new_inputs = [weights[0], inputs[0]]
            else:
                new_inputs = [inputs[0], *weights, *rest]
            replace_node(node, "", op.CONSUMER, new_inputs, list(attributes.values()))
        for value in encoded_values:
            remove_if_dead(value)
        # PWLU activations are not weight encodings: they stay, with their bodies and the domain.
        kept = {(n.op_type, n.overload) for n in iter_nodes(model) if n.domain == ops.DOMAIN}
        removed_functions = [key for key in model.functions if key[0] == ops.DOMAIN and key[1:] not in kept]
        for key in removed_functions:
            del model.functions[key]
        if not kept:
            model.opset_imports.pop(ops.DOMAIN, None)
        return ir.passes.PassResult(model, modified=bool(vq_nodes or removed_functions))


def _dense_weights(graph: ir.Graph, op, node: ir.Node, encoded: dict[str, ir.Value], taken: set[str]) -> list[ir.Value]:
    """The decoded weight of ``node`` from its ``encoded`` inputs (by name), as an initializer; a
    recurrent op's W and R (``<name>`` and ``<name>.recurrence``)."""
    tensors = {name: value.const_value.numpy() for name, value in encoded.items()}
    attributes = {}
    for name, attr in node.attributes.items():
        value = attr.value
        attributes[name] = value.numpy() if isinstance(value, ir.TensorProtocol) else value
    array = op.decode(tensors.pop("codes"), tensors.pop("codebook"), **tensors, **attributes)
    name = encoded["codes"].name
    if name.endswith(CODES_SUFFIX):
        name = name[: -len(CODES_SUFFIX)]
    if op.CONSUMER in ops.RECURRENT:
        w, r = op.split(array)
        return [
            register_initializer(graph, name, np.ascontiguousarray(w), taken),
            register_initializer(graph, f"{name}.recurrence", np.ascontiguousarray(r), taken),
        ]
    return [register_initializer(graph, name, np.ascontiguousarray(array), taken)]
