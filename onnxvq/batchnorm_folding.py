"""BatchNormalization after a Conv, folded into the Conv's weight and bias before compression.

Exporters often leave inference-mode ``BatchNormalization`` as its own node after each Conv
(PP-OCR's orientation classifier has 35, whose parameters are 15% of its file). onnxruntime
fuses such pairs when it loads the model (its ``ConvBNFusion``), so they cost nothing at run
time, but in the file their parameters stay float: they cap the ratio a size target can reach,
and the Conv's rows are encoded before a per-channel scale that could have been in them.

Per output channel c, with ``s_c = scale_c / sqrt(var_c + epsilon)``:

    BN(Conv(x, W, b))_c = s_c (conv(x, W_c) + b_c - mean_c) + B_c
                        = conv(x, s_c W_c) + (s_c (b_c - mean_c) + B_c)

so the pair becomes one Conv with ``W'_c = s_c W_c`` and ``b'_c = s_c (b_c - mean_c) + B_c``
(computed in float64, stored in the weight's dtype: the outputs agree to float rounding, as
onnxruntime's own fusion does). A pair is folded when the BatchNormalization is in inference
mode with only its ``Y`` used, its four parameters are constants, it is the only reader of the
Conv's output, and the Conv's weight (and bias) are constants only that Conv reads. The old
weight, bias and parameters go; the folded weight and bias are initializers of the main graph
(visible inside control-flow bodies) under the old weight's and bias's names. This runs on
onnxvq's in-memory copy.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxvq.candidates import constant_tensor, iter_nodes
from onnxvq.passes._values import register_initializer, remove_if_dead, value_names

__all__ = ["fold_batch_norms"]


def fold_batch_norms(model: ir.Model) -> int:
    """Fold every foldable Conv -> BatchNormalization pair of ``model`` in place (module
    docstring); returns how many were folded."""
    taken = value_names(model)
    folded = 0
    for node in list(iter_nodes(model)):
        conv = _foldable_conv(node)
        if conv is None:
            continue
        weight = constant_tensor(conv.inputs[1]).numpy()
        bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
        bias = constant_tensor(bias_value).numpy() if bias_value is not None else np.zeros(weight.shape[0])
        scale, offset, mean, var = (constant_tensor(v).numpy().astype(np.float64) for v in node.inputs[1:5])
        epsilon = node.attributes["epsilon"].as_float() if "epsilon" in node.attributes else 1e-5
        s = scale / np.sqrt(var + epsilon)
        new_weight = (weight.astype(np.float64) * s.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(weight.dtype)
        new_bias = (s * (bias.astype(np.float64) - mean) + offset).astype(weight.dtype)
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
        parameters = list(node.inputs[1:5])
        node.graph.remove(node, safe=True)
        for value in parameters:
            remove_if_dead(value)
        folded += 1
    return folded


def _foldable_conv(node: ir.Node) -> ir.Node | None:
    """The Conv that ``node`` (a BatchNormalization) can be folded into, or None."""
    if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 5:
        return None
    if "training_mode" in node.attributes and node.attributes["training_mode"].as_int():
        return None
    if any(v.uses() or v.is_graph_output() for v in node.outputs[1:]):
        return None
    params = [constant_tensor(v) for v in node.inputs[1:5]]
    if any(p is None or p.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE) for p in params):
        return None
    x = node.inputs[0]
    conv = x.producer() if x is not None else None
    if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or conv.graph is not node.graph:
        return None
    if x.is_graph_output() or len(x.uses()) != 1:
        return None
    weight = constant_tensor(conv.inputs[1]) if len(conv.inputs) > 1 else None
    if weight is None or weight.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
        return None
    channels = weight.shape[0]
    if any(tuple(p.shape) != (channels,) for p in params):
        return None
    own = [conv.inputs[1]] + ([conv.inputs[2]] if len(conv.inputs) > 2 and conv.inputs[2] is not None else [])
    for value in own:
        if value.is_graph_output() or any(user is not conv for user, _ in value.uses()):
            return None
    if len(own) == 2 and constant_tensor(own[1]) is None:
        return None
    return conv
