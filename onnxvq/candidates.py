"""Which nodes of a model can be compressed, and why the others are left alone.

A *layer* is a Conv, ConvTranspose, Gemm, MatMul, LSTM, GRU, RNN or embedding Gather node (in
the main graph or any If/Loop/Scan body) whose weight is a constant: an initializer that is not
also a graph input, or the output of a ``Constant`` node (older exporters store weights that
way). The weight is Conv's or ConvTranspose's W, Gemm's B, either MatMul operand when the other
is not constant, a Gather's table (a float matrix read on axis 0 by run-time indices), or a
recurrent op's W and R together (both constant, joined as in :mod:`onnxvq.layout`;
:attr:`Layer.parts` names the two). A ``DequantizeLinear`` of constants (the weights of a QDQ
model, as onnxruntime's ``quantize_static`` writes them) counts as a constant: its float value is
encoded and the integer tensor goes. (Weights computed from constants and onnxruntime's integer
ops are turned into such layers first: :mod:`onnxvq.weight_folding`, :mod:`onnxvq.integer_ops`.)
Layers that share one weight are encoded once (see :func:`group_by_weight`).

Layer names are what configs and ``--skip`` refer to: the node's name, or, for unnamed or
duplicate node names, ``<op_type>:<weight name>``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from onnxvq import ops
from onnxvq.layout import join_recurrent, split_recurrent

__all__ = [
    "SOURCE",
    "STORED_BYTES",
    "stored_values",
    "WEIGHT_SLOTS",
    "Layer",
    "LeftAlone",
    "constant_tensor",
    "dequantized_tensor",
    "find_layers",
    "group_by_weight",
    "iter_nodes",
    "weight_feeds",
]

_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


@dataclasses.dataclass(eq=False)
class Layer:
    """A compressible node and its constant weight."""

    name: str
    node: ir.Node
    weight: ir.Value
    weight_index: int  # which input of the node is the weight
    tensor: ir.TensorProtocol
    # A recurrent op's (W, R), joined in ``tensor``; empty for every other consumer.
    parts: tuple[ir.Value, ...] = ()
    # Bytes the weight is stored in when that is not ``tensor`` (an int8 weight behind a
    # DequantizeLinear, or of an integer op: ``tensor`` is its float value); None otherwise.
    stored_nbytes: int | None = None
    source: str | None = None  # what the weight was, when not a float tensor

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.tensor.shape)

    @property
    def weight_dtype(self) -> ir.DataType:
        return self.tensor.dtype

    @property
    def size(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def nbytes(self) -> int:
        """What the weight takes in the input model (the size target's "dense")."""
        if self.stored_nbytes is not None:
            return self.stored_nbytes
        return int(self.size * self.tensor.dtype.itemsize)


    @property
    def weight_left(self) -> bool:
        return self.op_type == "MatMul" and self.weight_index == 0

    @property
    def consumer_attributes(self) -> dict[str, ir.Attr]:
        """The attributes the VQ op carries over: the node's own, or MatMul's ``weight_left``."""
        if self.op_type == "MatMul":
            return {"weight_left": ir.AttrInt64("weight_left", int(self.weight_left))}
        return dict(self.node.attributes)

    def view(self) -> tuple[bool, int]:
        """(transposed, row_axes) of :mod:`onnxvq.layout` for this consumer."""
        attrs = {name: attr.value for name, attr in self.consumer_attributes.items()}
        return ops.op_for_consumer(self.op_type).weight_view(self.weight_shape, attrs)

    def weight_array(self) -> np.ndarray:
        return self.tensor.numpy()

    def feeds(self, array: np.ndarray) -> list[tuple[ir.Value, np.ndarray]]:
        """The graph values that hold a dense ``array`` of this layer's weight, with their parts."""
        return weight_feeds(self.weight, array)


def weight_feeds(weight: ir.Value, array: np.ndarray) -> list[tuple[ir.Value, np.ndarray]]:
    """Where a dense weight goes in a graph: ``[(weight, array)]``, or, for the joined weight of a
    recurrent op (``weight`` is its W, ``array`` is W and R joined), ``[(W, w), (R, r)]``.

    Works on any graph holding the value (a clone's too) and on numpy arrays and torch tensors,
    so every place that swaps weights into a model (captures, sensitivity, the graph walk, the
    end-to-end executor) splits them the same way.
    """
    for node, index in weight.uses():
        if node.domain == "" and node.op_type in ops.RECURRENT and index == 1:
            recurrence = node.inputs[2]
            if array.shape[-1] != _shape(weight)[-1]:  # W and R joined
                w, r = split_recurrent(array, _shape(recurrence)[-1])
                if isinstance(array, np.ndarray):
                    w, r = np.ascontiguousarray(w), np.ascontiguousarray(r)
                return [(weight, w), (recurrence, r)]
    return [(weight, array)]


@dataclasses.dataclass(frozen=True)
class LeftAlone:
    """A Conv/Gemm/MatMul node that is not a candidate, and why."""

    name: str
    op_type: str
    reason: str


# The inputs that may hold each layer op's weight, in the order they are tried.
WEIGHT_SLOTS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (1,), "MatMul": (1, 0), "Gather": (0,),
                **{op: (1, 2) for op in ops.RECURRENT}}

# Metadata keys of a weight value standing for an integer tensor (onnxvq.integer_ops): its stored
# bytes and what it was.
STORED_BYTES = "onnxvq.stored_bytes"
SOURCE = "onnxvq.source"
_DEQUANTIZED = "integer weights behind a DequantizeLinear (QDQ), dequantized and encoded"

# Weight-bearing ops onnxvq does not encode yet, listed by ``inspect`` (issue 12 of the tracker).
_NOT_SUPPORTED = {
    "ConvInteger": "its weight is not a constant only this node reads",
    "MatMulInteger": "its weight is not a constant only this node reads",
    "QLinearConv": "its weight is not a constant only this node reads, or its input scale is not a constant",
    "QLinearMatMul": "its B is not a constant 2-D weight only this node reads",
    "QGemm": "its weight is not a constant only this node reads, or its input scale is not a constant",
    "MatMulNBits": ("its weight is not a constant only this node reads, it has g_idx (columns out of block "
                    "order), or its width is not 2, 4 or 8 bits"),
    "DynamicQuantizeLSTM": "its weights are not constants only this node reads",
}


def iter_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Every node of the main graph and of its subgraphs, recursively, in graph order."""
    yield from ir.traversal.RecursiveGraphIterator(model.graph)


def find_layers(model: ir.Model) -> tuple[list[Layer], list[LeftAlone]]:
    """The model's compressible layers and the Conv/Gemm/MatMul nodes left alone (with reasons)."""
    consumers = set(ops.consumers())
    nodes = [n for n in iter_nodes(model) if n.domain == "" and n.op_type in consumers and not _not_a_table(n)]
    found = {node: _find_weight(node) for node in nodes}
    names = _layer_names({n: (f[0] if not isinstance(f, str) else 1) for n, f in found.items()})

    layers: list[Layer] = []
    left_alone: list[LeftAlone] = []
    for node, weight in found.items():
        if isinstance(weight, str):
            left_alone.append(LeftAlone(names[node], node.op_type, weight))
            continue
        index, tensor, parts = weight
        value = node.inputs[index]
        stored = _dequantized_bytes(value) if not parts else None
        source = _DEQUANTIZED if stored is not None else value.meta.get(SOURCE)
        stored = stored if stored is not None else value.meta.get(STORED_BYTES)
        layers.append(Layer(names[node], node, value, index, tensor, parts, stored, source))

    for function in model.functions.values():
        if function.domain == ops.DOMAIN:  # our own decode bodies
            continue
        for node in function:
            if node.domain == "" and node.op_type in consumers:
                left_alone.append(
                    LeftAlone(
                        node.name or node.op_type,
                        node.op_type,
                        f"inside model-local function {function.name!r} (functions are not rewritten)",
                    )
                )

    for node in iter_nodes(model):
        reason = _NOT_SUPPORTED.get(node.op_type)
        if reason and any(constant_tensor(v) is not None for v in node.inputs[1:3] if v is not None):
            left_alone.append(LeftAlone(node.name or node.op_type, node.op_type, reason))

    kept, shared_reasons = _check_shared_weights(layers)
    left_alone.extend(LeftAlone(l.name, l.op_type, shared_reasons[l]) for l in layers if l in shared_reasons)
    return kept, left_alone


def group_by_weight(layers: list[Layer]) -> dict[ir.Value, list[Layer]]:
    """Layers keyed by their weight value, in first-use order."""
    groups: dict[ir.Value, list[Layer]] = {}
    for layer in layers:
        groups.setdefault(layer.weight, []).append(layer)
    return groups


def _find_weight(node: ir.Node) -> tuple[int, ir.TensorProtocol, tuple] | str:
    """(input index, tensor, parts) of the node's constant weight, or why there is none."""
    inputs = list(node.inputs)
    if node.op_type in ops.RECURRENT:
        return _recurrent_weight(node)
    if node.op_type == "Gather":  # an embedding table, the data input (_not_a_table filtered)
        return 0, constant_tensor(inputs[0]), ()
    slots = WEIGHT_SLOTS[node.op_type]  # MatMul: either side, when only that side is constant
    constants = {i: constant_tensor(inputs[i]) or dequantized_tensor(inputs[i]) for i in range(min(2, len(inputs)))}
    if node.op_type == "MatMul" and all(constants.get(i) is not None for i in (0, 1)):
        return "both MatMul inputs are constant (fold it instead)"
    if node.op_type == "Gemm" and constants.get(1) is None and constants.get(0) is not None:
        return "the constant is Gemm's A input, not B"
    for slot in slots:
        tensor = constants.get(slot)
        if tensor is None:
            continue
        if slot < len(inputs) and inputs[slot] is not None and inputs[slot].is_graph_output():
            return "the weight is also a graph output"
        if tensor.dtype not in _FLOAT_TYPES:
            return f"weight dtype {tensor.dtype.name} is not floating point (already quantized?)"
        if len(tensor.shape) < 2:
            return f"weight of rank {len(tensor.shape)} (a vector has no output channels)"
        if math.prod(tensor.shape) == 0:
            return "empty weight"
        return slot, tensor, ()
    value = inputs[slots[0]] if len(inputs) > slots[0] else None
    if value is not None and value.is_graph_input() and value.is_initializer():
        return "the weight initializer is also a graph input (it can be overridden at run time)"
    return "the weight is not a constant (computed at run time)"


def _not_a_table(node: ir.Node) -> bool:
    """A Gather that is no embedding lookup (shape or index arithmetic, a column pick): not a
    candidate and not worth a line in ``inspect``. A table is a constant float matrix gathered
    on axis 0 by indices computed at run time."""
    if node.op_type != "Gather":
        return False
    data = constant_tensor(node.inputs[0])
    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
    return (data is None or data.dtype not in _FLOAT_TYPES or len(data.shape) != 2 or axis != 0
            or constant_tensor(node.inputs[1]) is not None or node.inputs[0].is_graph_output())


def _recurrent_weight(node: ir.Node) -> tuple[int, ir.TensorProtocol, tuple] | str:
    """A recurrent op's W and R joined (``onnxvq.layout``), or why they cannot be."""
    inputs = list(node.inputs) + [None] * 3
    w_value, r_value = inputs[1], inputs[2]
    w, r = constant_tensor(w_value), constant_tensor(r_value)
    if w is None or r is None:
        return f"{node.op_type} weights W and R are not both constants (computed at run time)"
    if any(v.is_graph_output() for v in (w_value, r_value)):
        return "the weight is also a graph output"
    if w.dtype not in _FLOAT_TYPES or r.dtype != w.dtype:
        return f"weight dtypes {w.dtype.name}/{r.dtype.name} are not one floating-point type (already quantized?)"
    if len(w.shape) != 3 or len(r.shape) != 3 or tuple(w.shape)[:2] != tuple(r.shape)[:2] or math.prod(w.shape) == 0:
        return f"W {tuple(w.shape)} and R {tuple(r.shape)} are not (directions, gates x hidden, size) weights"
    joined = join_recurrent(w.numpy(), r.numpy())
    return 1, ir.tensor(joined, name=w_value.name), (w_value, r_value)


def stored_values(layer: Layer) -> list[ir.Value]:
    """The values whose tensors store ``layer``'s weight in the model: the weight (W and R of a
    recurrent op), or for a QDQ weight its DequantizeLinear's constant inputs."""
    stored = []
    for value in layer.parts or (layer.weight,):
        if constant_tensor(value) is not None:
            stored.append(value)
            continue
        producer = value.producer()
        if producer is not None:
            stored += [v for v in producer.inputs if v is not None and constant_tensor(v) is not None]
    return stored


def dequantized_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The float value of a ``DequantizeLinear`` of constants (a QDQ model's weight), or None.

    ``y = (x - zero_point) * scale``, per tensor, per ``axis`` (1-D scale) or per block of
    ``block_size`` along ``axis`` (opset 21), at the scale's dtype.
    """
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "DequantizeLinear" or producer.domain not in ("", "ai.onnx"):
        return None
    inputs = list(producer.inputs) + [None, None]
    x, scale = constant_tensor(inputs[0]), constant_tensor(inputs[1])
    zero_point = constant_tensor(inputs[2]) if inputs[2] is not None else None
    if x is None or scale is None or (inputs[2] is not None and zero_point is None):
        return None
    q = x.numpy().astype(np.float32)
    s = scale.numpy()
    z = zero_point.numpy().astype(np.float32) if zero_point is not None else np.zeros_like(s, np.float32)
    if s.size > 1:
        axis = producer.attributes["axis"].as_int() if "axis" in producer.attributes else 1
        axis %= q.ndim
        block = producer.attributes["block_size"].as_int() if "block_size" in producer.attributes else 0
        if block:  # scale has x's rank, axis cut into blocks of ``block``
            s = np.repeat(s, block, axis=axis).take(range(q.shape[axis]), axis=axis)
            z = np.repeat(z, block, axis=axis).take(range(q.shape[axis]), axis=axis)
        else:
            shape = [1] * q.ndim
            shape[axis] = -1
            s, z = s.reshape(shape), z.reshape(shape)
    return ir.tensor(((q - z) * s.astype(np.float32)).astype(s.dtype), name=value.name)


def _dequantized_bytes(value: ir.Value) -> int | None:
    """Bytes of a QDQ weight as stored (its integer tensor, scale and zero point), or None."""
    if constant_tensor(value) is not None or dequantized_tensor(value) is None:
        return None
    stored = [constant_tensor(v) for v in value.producer().inputs if v is not None]
    return int(sum(math.ceil(math.prod(t.shape) * t.dtype.bitwidth / 8) for t in stored))


def _shape(value: ir.Value) -> tuple[int, ...]:
    shape = value.shape if value.shape is not None else (constant_tensor(value) or dequantized_tensor(value)).shape
    return tuple(int(d) for d in shape)


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor of a value fixed at export time, or None: an initializer that is not also a
    graph input (those can be overridden at run time), or a ``Constant`` node's output."""
    if value is None:
        return None
    if value.is_initializer():
        if value.is_graph_input():
            return None
        return value.const_value
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain == "":
        attr = producer.attributes.get("value")
        if attr is not None:
            return attr.as_tensor()
        return value.const_value  # value_float(s)/value_int(s): onnx-ir folds them
    return None


def _check_shared_weights(layers: list[Layer]) -> tuple[list[Layer], dict[Layer, str]]:
    """Drop weight groups that cannot be encoded once for all their users."""
    reasons: dict[Layer, str] = {}
    layer_nodes = {id(l.node) for l in layers}
    for weight, group in group_by_weight(layers).items():
        parts = {part for l in group for part in l.parts[1:]}  # a recurrent op's R
        others = [
            (value, node) for value in (weight, *parts) for node, _ in value.uses() if id(node) not in layer_nodes
        ]
        if others:
            value, other = others[0]
            why = f"its weight {value.name!r} is also read by {other.op_type} node {other.name!r}"
        elif len(parts) > 1:
            why = f"recurrent layers share the weight {weight.name!r} but not their recurrence weights"
        elif len({l.view() for l in group}) > 1:
            names = ", ".join(repr(l.name) for l in group)
            why = f"layers {names} read the shared weight {weight.name!r} in different layouts"
        else:
            continue
        for layer in group:
            reasons[layer] = why
    return [l for l in layers if l not in reasons], reasons


def _layer_names(weight_slots: dict[ir.Node, int]) -> dict[ir.Node, str]:
    """Node name, or ``<op_type>:<weight name>`` when unnamed or not unique; ``#n`` if still taken."""
    nodes = list(weight_slots)
    counts: dict[str, int] = {}
    for node in nodes:
        if node.name:
            counts[node.name] = counts.get(node.name, 0) + 1
    names: dict[ir.Node, str] = {}
    taken: set[str] = set()
    for node in nodes:
        if node.name and counts[node.name] == 1:
            name = node.name
        else:
            slot = weight_slots[node]
            value = node.inputs[slot] if slot < len(node.inputs) else None
            name = f"{node.op_type}:{value.name if value is not None else '?'}"
        base, i = name, 1
        while name in taken:
            i += 1
            name = f"{base}#{i}"
        taken.add(name)
        names[node] = name
    return names

