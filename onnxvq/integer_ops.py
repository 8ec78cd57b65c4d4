"""onnxruntime's integer ops, seen as float layers while onnxvq works, put back where not encoded.

``quantize_dynamic`` writes a layer as ``DynamicQuantizeLinear`` on the activation, then
``ConvInteger(x_q, w_q, x_zero_point, w_zero_point)`` or ``MatMulInteger(a_q, b_q, a_zero_point,
b_zero_point)`` giving int32, then a float rescale. Both compute, exactly,

    y = sum (x_q - x_zp) * (w_q - w_zp)

so :func:`convert_integer_ops` rewrites each one whose weight is constant into

    y = Cast<int32>(Round(Conv(Cast<float>(x_q) - Cast<float>(x_zp), W)))     (MatMul alike)

with ``W = float(w_q) - float(w_zp)`` (per output channel for a 1-D ``w_zp``) a float
initializer: a Conv or MatMul layer like any other, which every part of onnxvq (captures, the
size target, fine-tuning) handles. Over integers below 2^24 the float ops are exact, so the
converted graph computes the same int32; the activation quantization and the rescale after it
stay as they were. After encoding, :func:`restore_unencoded` puts the original integer node back
wherever the float layer was not replaced by a VQ op, so a layer left dense keeps its int8 bytes.
The size target counts such a weight at its int8 bytes (``Layer.nbytes`` reads
``candidates.STORED_BYTES`` from the weight's metadata).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxvq.candidates import SOURCE, STORED_BYTES, constant_tensor

__all__ = ["IntegerLayer", "convert_integer_ops", "restore_unencoded"]

_FLOAT = ir.DataType.FLOAT


@dataclasses.dataclass
class IntegerLayer:
    """One converted integer node and everything the conversion put in its place."""

    original: ir.Node
    float_node: ir.Node
    added: list[ir.Node]
    weight: ir.Value  # the float weight initializer
    integer_inputs: list[ir.Value]  # w_q and w_zero_point, taken out of the graph meanwhile
    output: ir.Value  # the int32 value the converted chain writes


def convert_integer_ops(model: ir.Model) -> list[IntegerLayer]:
    """Rewrite every ConvInteger/MatMulInteger of the main graph with a constant weight (module
    docstring); returns what :func:`restore_unencoded` needs."""
    converted = []
    for node in list(model.graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("ConvInteger", "MatMulInteger"):
            continue
        inputs = list(node.inputs) + [None] * (4 - len(node.inputs))
        w_q = constant_tensor(inputs[1])
        w_zp = constant_tensor(inputs[3]) if inputs[3] is not None else None
        if w_q is None or (inputs[3] is not None and w_zp is None) or inputs[1].is_graph_output():
            continue
        if any(node is not user for value in (inputs[1], inputs[3]) if value is not None for user, _ in value.uses()):
            continue  # a weight shared with another node: left as it is
        converted.append(_convert(model.graph, node, w_q.numpy(), w_zp.numpy() if w_zp is not None else None))
    return converted


def restore_unencoded(model: ir.Model, converted: list[IntegerLayer]) -> int:
    """Put back the integer node of every converted layer whose float op is still in the graph
    (not replaced by a VQ op); drop the integer weights of those that were. Returns how many
    were put back."""
    restored = 0
    graph = model.graph
    for layer in converted:
        if layer.float_node.graph is None:  # encoded: its int8 tensors are not needed any more
            continue
        for value in layer.integer_inputs:
            if value.name not in graph.initializers:
                graph.register_initializer(value)
        graph.insert_before(layer.added[0], layer.original)
        name = layer.output.name
        layer.output.name = f"{name}.onnxvq_float"
        result = layer.original.outputs[0]
        result.name = name
        layer.output.replace_all_uses_with(result, replace_graph_outputs=True)
        for node in reversed(layer.added):
            graph.remove(node, safe=True)
        if not layer.weight.uses():
            graph.initializers.pop(layer.weight.name, None)
        restored += 1
    return restored


def _convert(graph: ir.Graph, node: ir.Node, w_q: np.ndarray, w_zp: np.ndarray | None) -> IntegerLayer:
    inputs = list(node.inputs) + [None] * (4 - len(node.inputs))
    x, w_value, x_zp, w_zp_value = inputs
    conv = node.op_type == "ConvInteger"
    weight = w_q.astype(np.float32)
    if w_zp is not None:
        zp = w_zp.astype(np.float32)
        if zp.ndim == 1 and zp.size > 1:  # per output channel: Conv's axis 0, MatMul's last axis
            zp = zp.reshape((-1,) + (1,) * (weight.ndim - 1)) if conv else zp
        weight = weight - zp
    name = w_value.name
    tensor = ir.tensor(weight, name=f"{name}.onnxvq_float")
    float_weight = ir.Value(name=tensor.name, shape=tensor.shape, type=ir.TensorType(_FLOAT), const_value=tensor)
    float_weight.meta[STORED_BYTES] = w_q.nbytes + (w_zp.nbytes if w_zp is not None else 0)
    float_weight.meta[SOURCE] = (f"{node.op_type} weights (onnxruntime's dynamic quantization), "
                                 "converted to float and encoded")
    graph.register_initializer(float_weight)

    added: list[ir.Node] = []

    def add(op_type: str, args: list, **attributes) -> ir.Value:
        attrs = [ir.Attr(k, ir.AttributeType.INT, v) for k, v in attributes.items()]
        new = ir.Node("", op_type, args, attributes=attrs, name=f"{node.name or node.op_type}/{op_type}_{len(added)}")
        graph.insert_before(node, new)
        added.append(new)
        return new.outputs[0]

    centred = add("Cast", [x], to=int(_FLOAT))
    if x_zp is not None:
        zero = add("Cast", [x_zp], to=int(_FLOAT))
        zp_tensor = constant_tensor(x_zp)
        per_row = (zp_tensor is not None and len(zp_tensor.shape) == 1) or (x_zp.shape is not None and len(x_zp.shape) == 1)
        if not conv and per_row:  # MatMulInteger: one zero point per row of A, (M,) -> (M, 1)
            zero = add("Reshape", [zero, _int64(graph, [-1, 1], "onnxvq.column_shape")])
        centred = add("Sub", [centred, zero])
    float_node_inputs = [centred, float_weight]
    float_attrs = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()] if conv else []
    float_node = ir.Node("", "Conv" if conv else "MatMul", float_node_inputs, attributes=float_attrs,
                         name=node.name, doc_string=node.doc_string)
    graph.insert_before(node, float_node)
    added.append(float_node)
    rounded = add("Round", [float_node.outputs[0]])
    result = add("Cast", [rounded], to=int(ir.DataType.INT32))
    original = node.outputs[0]
    out_name = original.name
    original.name = f"{out_name}.onnxvq_integer"
    result.name = out_name
    original.replace_all_uses_with(result, replace_graph_outputs=True)
    graph.remove(node, safe=False)
    # Only this node read them (checked): out of the graph while onnxvq works, so that the size
    # target does not count them as what stays.
    integer_inputs = [v for v in (w_value, w_zp_value) if v is not None and v.is_initializer()]
    for value in integer_inputs:
        graph.initializers.pop(value.name)
    return IntegerLayer(node, float_node, added, float_weight, integer_inputs, result)


def _int64(graph: ir.Graph, values: list[int], name: str) -> ir.Value:
    if name in graph.initializers:
        return graph.initializers[name]
    tensor = ir.tensor(np.array(values, np.int64), name=name)
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(ir.DataType.INT64), const_value=tensor)
    graph.register_initializer(value)
    return value


