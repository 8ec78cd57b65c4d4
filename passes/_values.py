"""Value bookkeeping shared by the passes: unique names, new initializers, dead-weight removal."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["read_from_initializer", "register_initializer", "remove_if_dead", "replace_node", "unique_name",
           "value_names"]


def register_initializer(graph: ir.Graph, name: str, array: np.ndarray, taken: set[str]) -> ir.Value:
    """Add ``array`` as an initializer of ``graph`` under ``name`` (made unique against ``taken``)."""
    name = unique_name(name, taken)
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def read_from_initializer(graph: ir.Graph, value: ir.Value, tensor: ir.TensorProtocol) -> ir.Value:
    """Make the readers of ``value`` (a node's output) read a new initializer of ``graph`` holding
    ``tensor``, under ``value``'s name (``value`` is renamed out of its way); returns it."""
    name = value.name
    value.name = f"{name}.onnxvq_replaced"
    initializer = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(initializer)
    value.replace_all_uses_with(initializer)
    return initializer


def remove_if_dead(weight: ir.Value) -> None:
    """Drop a value nothing reads any more: its initializer, the Constant node producing it, or
    the DequantizeLinear producing it (a QDQ weight) and then that node's constant inputs."""
    if weight.uses() or weight.is_graph_output():
        return
    if weight.is_initializer():
        weight.graph.initializers.pop(weight.name)
        return
    producer = weight.producer()
    if producer is None or any(v.uses() or v.is_graph_output() for v in producer.outputs):
        return
    if producer.op_type == "Constant":
        producer.graph.remove(producer, safe=True)
    elif producer.op_type == "DequantizeLinear" and producer.domain in ("", "ai.onnx"):
        sources = [v for v in producer.inputs if v is not None]
        producer.graph.remove(producer, safe=True)
        for source in sources:
            if source.is_initializer() or (source.producer() is not None and source.producer().op_type == "Constant"):
                remove_if_dead(source)


def value_names(model: ir.Model) -> set[str]:
    """Every value name in the model's graphs (initializers, inputs, node outputs)."""
    names: set[str] = set()
    for graph in model.graphs():
        names.update(graph.initializers)
        names.update(v.name for v in graph.inputs if v.name)
        for node in graph:
            names.update(v.name for v in node.outputs if v.name)
    return names


def unique_name(name: str, taken: set[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        i += 1
        candidate = f"{name}.{i}"
    taken.add(candidate)
    return candidate


def replace_node(
    old: ir.Node,
    domain: str,
    op_type: str,
    inputs: list,
    attributes: list[ir.Attr],
    overload: str = "",
    num_outputs: int | None = None,
) -> ir.Node:
    """Put a node in ``old``'s place, keeping its name, doc string, metadata and output values
    (name, type, shape, graph-output role). ``num_outputs`` (default: as many as ``old``) may be
    more than ``old`` has: the extra outputs are new, unused values."""
    new = ir.Node(
        domain,
        op_type,
        inputs,
        attributes=attributes,
        overload=overload,
        name=old.name,
        doc_string=old.doc_string,
        metadata_props=dict(old.metadata_props),
        num_outputs=num_outputs or len(old.outputs),
    )
    ir.convenience.replace_nodes_and_values(
        old.graph, old, [old], [new], list(old.outputs), list(new.outputs)[: len(old.outputs)]
    )
    return new
