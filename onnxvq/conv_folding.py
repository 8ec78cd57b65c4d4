"""Per-channel affine nodes after a Conv, folded into the Conv's weight and bias before compression.

Two patterns, both folded by onnxruntime when it loads an fp32 model (``ConvBNFusion``,
``ConvAddFusion``), so they cost nothing there:

* **BatchNormalization** (``fold_batch_norms``). Exporters often leave inference-mode
  ``BatchNormalization`` as its own node after each Conv (PP-OCR's orientation classifier has 35,
  whose parameters are 15% of its file). In the file their parameters stay float: they cap the
  ratio a size target can reach, and the Conv's rows are encoded before a per-channel scale that
  could have been in them. Per output channel c, with ``s_c = scale_c / sqrt(var_c + epsilon)``::

      BN(Conv(x, W, b))_c = s_c (conv(x, W_c) + b_c - mean_c) + B_c
                          = conv(x, s_c W_c) + (s_c (b_c - mean_c) + B_c)

  so the pair becomes one Conv with ``W'_c = s_c W_c`` and ``b'_c = s_c (b_c - mean_c) + B_c``.
* **A constant bias ``Add``** (``fold_bias_adds``): ``Conv(x, W, b) + a`` with ``a`` a constant
  that broadcasts per output channel (shape ``(C, 1, ..., 1)``, ``(1, C, 1, ..., 1)`` or a single
  value) is ``Conv(x, W, b + a)``. Paddle's exporter writes every Conv's bias this way (PP-OCRv6's
  detector has 75). Once a Conv is an ``ai.onnxvq`` op onnxruntime no longer fuses the Add, which
  then costs a pass over the activation per layer (6 ms of the detector's 130 ms).

Folded values are computed in float64 and stored in the weight's dtype: the outputs agree to float
rounding, as onnxruntime's own fusions do. A node is folded when its other inputs are constants,
it is the only reader of the Conv's output (which is no graph output), and the Conv's weight (and
bias) are constants only that Conv reads. The old weight, bias and parameters go (a parameter
other nodes still read stays); the folded weight and bias are initializers of the main graph
(visible inside control-flow bodies) under the old weight's and bias's names, and the Conv's output
takes the folded node's output name. This runs on onnxvq's in-memory copy.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxvq.candidates import constant_tensor, iter_nodes
from onnxvq.passes._values import register_initializer, remove_if_dead, value_names

__all__ = ["fold_batch_norms", "fold_bias_adds"]

_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)


def fold_batch_norms(model: ir.Model) -> int:
    """Fold every foldable Conv -> BatchNormalization pair of ``model`` in place (module
    docstring); returns how many were folded."""
    taken = value_names(model)
    folded = 0
    for node in list(iter_nodes(model)):
        conv = _foldable_conv(node)
        if conv is None:
            continue
        weight, bias = _conv_weight_and_bias(conv)
        scale, offset, mean, var = (constant_tensor(v).numpy().astype(np.float64) for v in node.inputs[1:5])
        epsilon = node.attributes["epsilon"].as_float() if "epsilon" in node.attributes else 1e-5
        s = scale / np.sqrt(var + epsilon)
        new_weight = (weight.astype(np.float64) * s.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(weight.dtype)
        new_bias = (s * (bias.astype(np.float64) - mean) + offset).astype(weight.dtype)
        _rewrite(model, conv, node, new_weight, new_bias, list(node.inputs[1:5]), taken)
        folded += 1
    return folded


def fold_bias_adds(model: ir.Model) -> int:
    """Fold every constant per-channel ``Add`` after a Conv into the Conv's bias, in place (module
    docstring); returns how many were folded."""
    taken = value_names(model)
    folded = 0
    for node in list(iter_nodes(model)):
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        for side in (0, 1):
            x, addend = node.inputs[side], node.inputs[1 - side]
            conv = _foldable_producer(node, x)
            tensor = constant_tensor(addend) if addend is not None else None
            if conv is None or tensor is None or tensor.dtype not in _FLOATS:
                continue
            weight, bias = _conv_weight_and_bias(conv)
            per_channel = _per_channel(tensor.numpy(), weight.shape[0], weight.ndim)
            if per_channel is None:
                continue
            new_bias = (bias.astype(np.float64) + per_channel).astype(weight.dtype)
            _rewrite(model, conv, node, weight, new_bias, [addend], taken)
            folded += 1
            break
    return folded


def _per_channel(addend: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """``addend`` as C float64 values when adding it to a Conv output of ``channels`` channels and
    rank ``rank`` adds one value per channel and keeps the output's shape, else None."""
    if addend.ndim > rank:
        return None
    shape = (1,) * (rank - addend.ndim) + tuple(addend.shape)
    if shape[0] != 1 or shape[1] not in (1, channels) or any(n != 1 for n in shape[2:]):
        return None
    return np.broadcast_to(addend.astype(np.float64).reshape(-1), (channels,))


def _conv_weight_and_bias(conv: ir.Node) -> tuple[np.ndarray, np.ndarray]:
    """The Conv's constant weight and its bias (zeros when it has none)."""
    weight = constant_tensor(conv.inputs[1]).numpy()
    bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
    bias = constant_tensor(bias_value).numpy() if bias_value is not None else np.zeros(weight.shape[0])
    return weight, bias


def _rewrite(model: ir.Model, conv: ir.Node, node: ir.Node, new_weight: np.ndarray, new_bias: np.ndarray,
             parameters: list, taken: set) -> None:
    """Give ``conv`` the folded weight and bias and remove ``node`` (which reads only the Conv's
    output and the constant ``parameters``), the Conv's output taking ``node``'s output name."""
    bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
    # The old weight and bias go first, so that the folded ones take their names (what the
    # summary and inspect show is the user's weight name).
    names = [conv.inputs[1].name, bias_value.name if bias_value is not None else f"{conv.inputs[1].name}.bias"]
    old = [v for v in (conv.inputs[1], bias_value) if v is not None]
    if bias_value is None:
        conv.resize_inputs(3)
    conv.replace_input_with(1, None)
    conv.replace_input_with(2, None)
    for value in old:  # only this Conv read them (checked): they go, and their names are free
        remove_if_dead(value)
        taken.discard(value.name)
    conv.replace_input_with(1, register_initializer(model.graph, names[0], new_weight, taken))
    conv.replace_input_with(2, register_initializer(model.graph, names[1], new_bias, taken))
    y = node.outputs[0]
    conv_out = conv.outputs[0]
    name = y.name
    y.name, conv_out.name = f"{name}.onnxvq_unfolded", name
    y.replace_all_uses_with(conv_out, replace_graph_outputs=True)
    node.graph.remove(node, safe=True)
    for value in parameters:
        remove_if_dead(value)


def _foldable_conv(node: ir.Node) -> ir.Node | None:
    """The Conv that ``node`` (a BatchNormalization) can be folded into, or None."""
    if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 5:
        return None
    if "training_mode" in node.attributes and node.attributes["training_mode"].as_int():
        return None
    if any(v.uses() or v.is_graph_output() for v in node.outputs[1:]):
        return None
    params = [constant_tensor(v) for v in node.inputs[1:5]]
    if any(p is None or p.dtype not in _FLOATS for p in params):
        return None
    conv = _foldable_producer(node, node.inputs[0])
    if conv is None or any(tuple(p.shape) != (constant_tensor(conv.inputs[1]).shape[0],) for p in params):
        return None
    return conv


def _foldable_producer(node: ir.Node, x: ir.Value | None) -> ir.Node | None:
    """The Conv that computes ``x``, when ``node`` is the only reader of ``x`` (no graph output),
    in the same graph, and the Conv's weight (and bias) are float constants only it reads."""
    conv = x.producer() if x is not None else None
    if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or conv.graph is not node.graph:
        return None
    if x.is_graph_output() or len(x.uses()) != 1:
        return None
    weight = constant_tensor(conv.inputs[1]) if len(conv.inputs) > 1 else None
    if weight is None or weight.dtype not in _FLOATS:
        return None
    own = [conv.inputs[1]] + ([conv.inputs[2]] if len(conv.inputs) > 2 and conv.inputs[2] is not None else [])
    for value in own:
        if value.is_graph_output() or any(user is not conv for user, _ in value.uses()):
            return None
    if len(own) == 2 and constant_tensor(own[1]) is None:
        return None
    return conv
