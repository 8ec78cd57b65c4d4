"""onnxruntime's integer ops, seen as float layers while onnxvq works, put back where not encoded.

These ops hold integer weights that onnxvq can encode once they are float:

* ``ConvInteger(x_q, w_q, x_zero_point, w_zero_point)`` and ``MatMulInteger(a_q, b_q, ...)``
  (``quantize_dynamic``), behind a ``DynamicQuantizeLinear`` of the activation and before a float
  rescale. Both compute, exactly, ``y = sum (x_q - x_zp) * (w_q - w_zp)`` as int32, so each
  becomes

      y = Cast<int32>(Round(Conv(Cast<float>(x_q) - Cast<float>(x_zp), W)))     (MatMul alike)

  with ``W = float(w_q) - float(w_zp)`` (per output channel for a 1-D ``w_zp``). Over integers
  below 2^24 the float ops are exact: the converted graph computes the same int32, and the
  activation quantization and the rescale around it stay as they were.
* ``com.microsoft::MatMulNBits(A, B, scales, zero_points, g_idx, bias)`` (``MatMulNBitsQuantizer``):
  ``Y = A @ W^T (+ bias)`` with ``W[n, k] = (q[n, k] - zp[n, b]) * scale[n, b]``, ``b = k //
  block_size``; ``q`` is packed ``bits`` per value, least significant bits first, in blocks of
  ``block_size`` along K (``B`` is (N, blocks, block_size * bits / 8)); ``zero_points`` is either
  packed the same way, one row of ``ceil(blocks * bits / 8)`` bytes per n, or float like
  ``scales``; without it, ``zp = 2^(bits - 1)``. It becomes ``MatMul(A, W^T)`` (then ``Add(bias)``).
* ``com.microsoft::DynamicQuantizeLSTM(X, W, R, B, sequence_lens, initial_h, initial_c, P,
  W_scale, W_zero_point, R_scale, R_zero_point)`` (``quantize_dynamic`` on an LSTM): ``W``
  (D, I, 4H) and ``R`` (D, H, 4H) are int8 with one scale per direction or per direction and gate
  unit. It becomes the ``LSTM`` it was made from, ``W = transpose((W_q - zp) * scale)``, every
  attribute kept. This one changes numbers a little: the quantized op also quantizes ``x_t`` and
  ``h_(t-1)`` per step, the float LSTM does not.
* QOperator ops (``quantize_static`` with ``QuantFormat.QOperator``): ``QLinearConv(x, x_scale,
  x_zp, w, w_scale, w_zp, y_scale, y_zp, B)``, ``QLinearMatMul(a, .., b, b_scale, b_zp, y_scale,
  y_zp)`` and ``com.microsoft::QGemm(a, .., b, b_scale, b_zp, C, y_scale, y_zp)``. Each becomes
  ``QuantizeLinear(Conv|MatMul|Gemm(DequantizeLinear(x), W, bias), y_scale, y_zp)`` with
  ``W = (w - w_zp) * w_scale`` (per tensor or per output channel) and the int32 bias at its scale
  ``x_scale * w_scale``; a QGemm without ``y_scale`` gives float. Float accumulation can round an
  output to the neighbouring quantization level where the integer kernel did not.

:func:`convert_integer_ops` rewrites every such node whose integer inputs are constants that only
it reads: a float layer like any other, which every part of onnxvq (captures, the size target,
fine-tuning) handles. After encoding, :func:`restore_unencoded` puts the original node back
wherever the float layer was not replaced by a VQ op, so a layer left dense keeps its integer
bytes and its exact numbers. The size target counts a converted weight at its stored bytes
(``Layer.nbytes`` reads ``candidates.STORED_BYTES`` from the weight's metadata).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxvq.candidates import SOURCE, STORED_BYTES, constant_tensor

__all__ = ["IntegerLayer", "convert_integer_ops", "restore_unencoded", "unpack_bits"]

_FLOAT = ir.DataType.FLOAT
_MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass
class IntegerLayer:
    """One converted integer node and everything the conversion put in its place."""

    original: ir.Node
    float_node: ir.Node  # the layer onnxvq sees (Conv, MatMul or LSTM)
    added: list[ir.Node]  # every node the conversion inserted, in graph order
    weights: list[ir.Value]  # the float weight initializers
    integer_inputs: list[ir.Value]  # the integer weights and their parameters, out of the graph meanwhile
    outputs: list[ir.Value | None]  # what the converted chain writes in place of each original output


def convert_integer_ops(model: ir.Model) -> list[IntegerLayer]:
    """Rewrite every integer op of the main graph whose integer weights are constants only it
    reads (module docstring); returns what :func:`restore_unencoded` needs."""
    converted = []
    for node in list(model.graph):
        rewrite = _REWRITES.get((node.domain or "", node.op_type))
        if rewrite is None:
            continue
        slots = _CONSTANT_SLOTS[node.op_type]
        shared = _SHARED_CONSTANT_SLOTS.get(node.op_type, ())
        inputs = list(node.inputs) + [None] * (max(slots + shared) + 1 - len(node.inputs))
        values = {i: inputs[i] for i in slots if inputs[i] is not None}
        tensors = {i: constant_tensor(v) for i, v in values.items()}
        tensors.update({i: constant_tensor(inputs[i]) for i in shared if inputs[i] is not None})
        if any(t is None for t in tensors.values()) or min(slots) not in values:
            continue  # a weight computed at run time: left as it is (inspect says so)
        if any(v.is_graph_output() or any(user is not node for user, _ in v.uses()) for v in values.values()):
            continue  # a weight shared with another node or read by the caller: left as it is
        layer = rewrite(model.graph, node, {i: t.numpy() for i, t in tensors.items()})
        if layer is not None:
            converted.append(layer)
    return converted


def restore_unencoded(model: ir.Model, converted: list[IntegerLayer]) -> int:
    """Put back the integer node of every converted layer whose float op is still in the graph
    (not replaced by a VQ op); drop the integer weights of those that were. Returns how many
    were put back."""
    restored = 0
    graph = model.graph
    for layer in converted:
        if layer.float_node.graph is None:  # encoded: its integer tensors are not needed any more
            continue
        for value in layer.integer_inputs:
            if value.name not in graph.initializers:
                graph.register_initializer(value)
        graph.insert_before(layer.added[0], layer.original)
        for written, original in zip(layer.outputs, layer.original.outputs):
            if written is not None:
                _take_over(written, original, ".onnxvq_float")
        for node in reversed(layer.added):
            graph.remove(node, safe=True)
        for weight in layer.weights:
            if not weight.uses():
                graph.initializers.pop(weight.name, None)
        restored += 1
    return restored


def _take_over(old: ir.Value, new: ir.Value, suffix: str) -> None:
    """``new`` takes ``old``'s name and readers (graph outputs too); ``old`` is renamed with
    ``suffix`` out of its way."""
    name = old.name
    old.name = f"{name}{suffix}"
    new.name = name
    old.replace_all_uses_with(new, replace_graph_outputs=True)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first ``count`` unsigned ``bits``-bit values of each row of ``packed`` (uint8, values
    stored least significant bits first, as onnxruntime's MatMulNBits packs them)."""
    rows = packed.reshape(packed.shape[0], -1)
    stream = np.unpackbits(rows, axis=1, bitorder="little")[:, : count * bits].reshape(rows.shape[0], count, bits)
    return (stream.astype(np.int32) << np.arange(bits, dtype=np.int32)).sum(axis=2)


class _Rewrite:
    """Inserts a node's float replacement before it and, on :meth:`finish`, takes it out."""

    def __init__(self, graph: ir.Graph, node: ir.Node, integer_slots: tuple[int, ...]):
        self.graph, self.node = graph, node
        self.integer_slots = integer_slots
        self.added: list[ir.Node] = []
        self.weights: list[ir.Value] = []

    def weight(self, array: np.ndarray, name: str, stored_bytes: int, source: str) -> ir.Value:
        tensor = ir.tensor(np.ascontiguousarray(array), name=f"{name}.onnxvq_float")
        value = ir.Value(name=tensor.name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
        value.meta[STORED_BYTES] = stored_bytes
        value.meta[SOURCE] = source
        self.graph.register_initializer(value)
        self.weights.append(value)
        return value

    def add(self, op_type: str, args: list, attributes: list[ir.Attr] = (), n_outputs: int = 1, **ints) -> ir.Node:
        attrs = list(attributes) + [ir.Attr(k, ir.AttributeType.INT, v) for k, v in ints.items()]
        name = self.node.name or self.node.op_type
        new = ir.Node("", op_type, args, attributes=attrs, num_outputs=n_outputs, name=f"{name}/{op_type}_{len(self.added)}")
        self.graph.insert_before(self.node, new)
        self.added.append(new)
        return new

    def finish(self, float_node: ir.Node, outputs: list[ir.Value | None]) -> IntegerLayer:
        """Point every reader of the node's outputs at ``outputs`` (same names), remove the node
        and, while onnxvq works, its integer inputs (only it read them: checked), so that the size
        target does not count them as what stays."""
        node = self.node
        for original, written in zip(node.outputs, outputs):
            if written is not None:
                _take_over(original, written, ".onnxvq_integer")
        self.graph.remove(node, safe=False)
        integer_inputs = [node.inputs[i] for i in self.integer_slots
                          if i < len(node.inputs) and node.inputs[i] is not None and node.inputs[i].is_initializer()]
        for value in integer_inputs:
            self.graph.initializers.pop(value.name)
        return IntegerLayer(node, float_node, self.added, self.weights, integer_inputs, list(outputs))


def _copied_attributes(node: ir.Node, drop: tuple[str, ...] = ()) -> list[ir.Attr]:
    return [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values() if a.name not in drop]


def _convert_integer(graph: ir.Graph, node: ir.Node, constants: dict[int, np.ndarray]) -> IntegerLayer:
    """ConvInteger / MatMulInteger (module docstring)."""
    inputs = list(node.inputs) + [None] * (4 - len(node.inputs))
    x, w_value, x_zp, _ = inputs
    conv = node.op_type == "ConvInteger"
    w_q, w_zp = constants[1], constants.get(3)
    weight = w_q.astype(np.float32)
    if w_zp is not None:
        zp = w_zp.astype(np.float32)
        if zp.ndim == 1 and zp.size > 1:  # per output channel: Conv's axis 0, MatMul's last axis
            zp = zp.reshape((-1,) + (1,) * (weight.ndim - 1)) if conv else zp
        weight = weight - zp
    rewrite = _Rewrite(graph, node, (1, 3))
    float_weight = rewrite.weight(
        weight, w_value.name, w_q.nbytes + (w_zp.nbytes if w_zp is not None else 0),
        f"{node.op_type} weights (onnxruntime's dynamic quantization), converted to float and encoded",
    )
    centred = rewrite.add("Cast", [x], to=int(_FLOAT)).outputs[0]
    if x_zp is not None:
        zero = rewrite.add("Cast", [x_zp], to=int(_FLOAT)).outputs[0]
        zp_tensor = constant_tensor(x_zp)
        per_row = (zp_tensor is not None and len(zp_tensor.shape) == 1) or (x_zp.shape is not None and len(x_zp.shape) == 1)
        if not conv and per_row:  # MatMulInteger: one zero point per row of A, (M,) -> (M, 1)
            zero = rewrite.add("Reshape", [zero, _int64(graph, [-1, 1], "onnxvq.column_shape")]).outputs[0]
        centred = rewrite.add("Sub", [centred, zero]).outputs[0]
    float_node = rewrite.add("Conv" if conv else "MatMul", [centred, float_weight],
                             _copied_attributes(node) if conv else [])
    float_node.name, float_node.doc_string = node.name, node.doc_string
    rounded = rewrite.add("Round", [float_node.outputs[0]]).outputs[0]
    result = rewrite.add("Cast", [rounded], to=int(ir.DataType.INT32)).outputs[0]
    return rewrite.finish(float_node, [result])


def _attribute(node: ir.Node, name: str, default: int) -> int:
    return node.attributes[name].as_int() if name in node.attributes else default


def nbits_weight(node: ir.Node, constants: dict[int, np.ndarray]) -> np.ndarray:
    """MatMulNBits' weight as the (K, N) float matrix of the MatMul it stands for (module
    docstring); ``constants`` maps input slots (1 B, 2 scales, 3 zero_points) to arrays."""
    k, n = _attribute(node, "K", 0), _attribute(node, "N", 0)
    bits, block = _attribute(node, "bits", 4), _attribute(node, "block_size", 0)
    blocks = math.ceil(k / block)
    q = unpack_bits(constants[1].reshape(n, -1), bits, blocks * block)
    scales = constants[2].reshape(n, blocks)
    zp = constants.get(3)
    if zp is None:
        zero = np.full((n, blocks), 2 ** (bits - 1), np.float32)
    elif zp.dtype == np.uint8:
        zero = unpack_bits(zp.reshape(n, -1), bits, blocks).astype(np.float32)
    else:
        zero = zp.reshape(n, blocks).astype(np.float32)
    by_block = (q.reshape(n, blocks, block) - zero[:, :, None]) * scales.astype(np.float32)[:, :, None]
    return by_block.reshape(n, blocks * block)[:, :k].T.astype(scales.dtype)


def _convert_nbits(graph: ir.Graph, node: ir.Node, constants: dict[int, np.ndarray]) -> IntegerLayer | None:
    """MatMulNBits (module docstring); one with ``g_idx`` (columns out of block order) or with a
    width other than 2, 4 or 8 bits (onnxruntime's quantizer writes no other) is left."""
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    if inputs[4] is not None or _attribute(node, "block_size", 0) <= 0 or _attribute(node, "bits", 4) not in (2, 4, 8):
        return None
    weight = nbits_weight(node, constants)
    stored = sum(constants[i].nbytes for i in (1, 2, 3) if i in constants)
    rewrite = _Rewrite(graph, node, (1, 2, 3))
    float_weight = rewrite.weight(
        weight, inputs[1].name, stored,
        f"MatMulNBits {_attribute(node, 'bits', 4)}-bit weights (onnxruntime's MatMulNBitsQuantizer), "
        "converted to float and encoded",
    )
    float_node = rewrite.add("MatMul", [inputs[0], float_weight])
    float_node.name, float_node.doc_string = node.name, node.doc_string
    result = float_node.outputs[0]
    if inputs[5] is not None:
        result = rewrite.add("Add", [result, inputs[5]]).outputs[0]
    return rewrite.finish(float_node, [result])


def _dequantized_lstm_weight(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
    """(D, size, 4H) integers with per-direction or per-(direction, gate unit) parameters, as
    the LSTM's (D, 4H, size) float weight."""
    directions = q.shape[0]
    scale = scale.astype(np.float32).reshape(directions, 1, -1)
    zero = np.zeros_like(scale) if zero is None else zero.astype(np.float32).reshape(directions, 1, -1)
    return ((q.astype(np.float32) - zero) * scale).transpose(0, 2, 1)


def _convert_quantized_lstm(graph: ir.Graph, node: ir.Node, constants: dict[int, np.ndarray]) -> IntegerLayer:
    """DynamicQuantizeLSTM (module docstring)."""
    inputs = list(node.inputs) + [None] * (12 - len(node.inputs))
    w = _dequantized_lstm_weight(constants[1], constants[8], constants.get(9))
    r = _dequantized_lstm_weight(constants[2], constants[10], constants.get(11))
    stored = sum(a.nbytes for a in constants.values())
    rewrite = _Rewrite(graph, node, (1, 2, 8, 9, 10, 11))
    source = "DynamicQuantizeLSTM int8 weights (onnxruntime's dynamic quantization), converted to float and encoded"
    float_w = rewrite.weight(w, inputs[1].name, stored, source)
    float_r = rewrite.weight(r, inputs[2].name, 0, source)  # the layer (W and R joined) reads W's bytes
    optional = list(inputs[3:8])
    while optional and optional[-1] is None:
        optional.pop()
    float_node = rewrite.add("LSTM", [inputs[0], float_w, float_r, *optional], _copied_attributes(node),
                             n_outputs=len(node.outputs))
    float_node.name, float_node.doc_string = node.name, node.doc_string
    outputs = [new if old.uses() or old.is_graph_output() else None
               for new, old in zip(float_node.outputs, node.outputs)]
    return rewrite.finish(float_node, outputs)


def _per_channel(values: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """A scalar or a 1-D per-channel array, shaped to broadcast along ``axis`` of an ``ndim``
    array."""
    values = np.asarray(values, np.float64)
    if values.size == 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def _qoperator_weight(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int) -> np.ndarray:
    """``(q - zero_point) * scale`` with per-tensor or per-``axis`` parameters, float32."""
    zero_point = _per_channel(zero, q.ndim, axis) if zero is not None else 0.0
    return ((q.astype(np.float64) - zero_point) * _per_channel(scale, q.ndim, axis)).astype(np.float32)


def _convert_qoperator(graph: ir.Graph, node: ir.Node, constants: dict[int, np.ndarray]) -> IntegerLayer | None:
    """QLinearConv, QLinearMatMul and com.microsoft QGemm (module docstring): the activation
    dequantized, the float layer, the output quantized again (QGemm without ``y_scale`` gives
    float). Only a constant B / W (the second operand) is converted."""
    op = node.op_type
    layout = _QOPERATOR[op]
    inputs = list(node.inputs) + [None] * (9 - len(node.inputs))
    x, x_scale, x_zp = inputs[0:3]
    w_slot, bias_slot, y_slots = layout["weight"], layout.get("bias"), layout["y"]
    q = constants[w_slot]
    trans_b = _attribute(node, "transB", 0) if op == "QGemm" else 0
    # the output channel of the weight: Conv's axis 0, B's columns (its rows with transB)
    axis = 0 if op == "QLinearConv" or trans_b else q.ndim - 1
    if op == "QLinearMatMul" and q.ndim != 2:
        return None
    weight = _qoperator_weight(q, constants[w_slot + 1], constants.get(w_slot + 2), axis)
    stored = sum(constants[i].nbytes for i in (w_slot, w_slot + 1, w_slot + 2, bias_slot) if i in constants)
    rewrite = _Rewrite(graph, node, tuple(i for i in (w_slot, w_slot + 1, w_slot + 2, bias_slot) if i is not None))
    source = f"{op} int8 weights (onnxruntime's QOperator quantization), converted to float and encoded"
    float_weight = rewrite.weight(weight, inputs[w_slot].name, stored, source)
    args = [x, x_scale] + ([x_zp] if x_zp is not None else [])
    x_float = rewrite.add("DequantizeLinear", args).outputs[0]
    layer_inputs = [x_float, float_weight]
    if bias_slot is not None and bias_slot in constants:  # int32 at scale x_scale * w_scale
        bias_scale = float(constants[1].reshape(())) * np.asarray(constants[w_slot + 1], np.float64).reshape(-1)
        bias = (constants[bias_slot].astype(np.float64) * bias_scale).astype(np.float32)
        layer_inputs.append(rewrite.weight(bias, inputs[bias_slot].name, 0, source))
    float_type = {"QLinearConv": "Conv", "QLinearMatMul": "MatMul", "QGemm": "Gemm"}[op]
    attributes = _copied_attributes(node) if op != "QLinearMatMul" else []
    float_node = rewrite.add(float_type, layer_inputs, attributes)
    float_node.name, float_node.doc_string = node.name, node.doc_string
    result = float_node.outputs[0]
    y_scale, y_zp = (inputs[i] for i in y_slots)
    if y_scale is not None:
        result = rewrite.add("QuantizeLinear", [result, y_scale] + ([y_zp] if y_zp is not None else [])).outputs[0]
    return rewrite.finish(float_node, [result])


# Input slots of the QOperator ops: the weight (then its scale and zero point), the int32 bias,
# the output's scale and zero point. Slot 1 is always the activation's scale.
_QOPERATOR = {
    "QLinearConv": {"weight": 3, "bias": 8, "y": (6, 7)},
    "QLinearMatMul": {"weight": 3, "y": (6, 7)},
    "QGemm": {"weight": 3, "bias": 6, "y": (7, 8)},
}


_Converter = Callable[[ir.Graph, ir.Node, dict[int, np.ndarray]], "IntegerLayer | None"]
_REWRITES: dict[tuple[str, str], _Converter] = {
    ("", "ConvInteger"): _convert_integer,
    ("ai.onnx", "ConvInteger"): _convert_integer,
    ("", "MatMulInteger"): _convert_integer,
    ("ai.onnx", "MatMulInteger"): _convert_integer,
    (_MS_DOMAIN, "MatMulNBits"): _convert_nbits,
    (_MS_DOMAIN, "DynamicQuantizeLSTM"): _convert_quantized_lstm,
    ("", "QLinearConv"): _convert_qoperator,
    ("ai.onnx", "QLinearConv"): _convert_qoperator,
    ("", "QLinearMatMul"): _convert_qoperator,
    ("ai.onnx", "QLinearMatMul"): _convert_qoperator,
    (_MS_DOMAIN, "QGemm"): _convert_qoperator,
}
# The inputs that must be constants read by this node only; the first is the weight itself.
_CONSTANT_SLOTS = {"ConvInteger": (1, 3), "MatMulInteger": (1, 3), "MatMulNBits": (1, 2, 3),
                   "QLinearConv": (3, 4, 5, 8), "QLinearMatMul": (3, 4, 5), "QGemm": (3, 4, 5, 6),
                   "DynamicQuantizeLSTM": (1, 2, 8, 9, 10, 11)}


# Inputs that must be constants but may be shared: the activation's scale (a QOperator bias is
# stored at x_scale * w_scale).
_SHARED_CONSTANT_SLOTS = {"QLinearConv": (1,), "QGemm": (1,)}


def _int64(graph: ir.Graph, values: list[int], name: str) -> ir.Value:
    if name in graph.initializers:
        return graph.initializers[name]
    tensor = ir.tensor(np.array(values, np.int64), name=name)
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(ir.DataType.INT64), const_value=tensor)
    graph.register_initializer(value)
    return value
