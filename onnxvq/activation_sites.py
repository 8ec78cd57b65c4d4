"""Which activations a PWLU can stand in for, and what function each one computes.

A *site* is an activation in the main graph that reads the output of a layer of the model
(:mod:`onnxvq.candidates`: a Conv, ConvTranspose, Gemm or MatMul with a constant weight, encoded
or left dense, which passes on the error of the layers before it), directly or through
``Add`` / ``BatchNormalization`` / ``Identity`` nodes that read nothing else computed (a bias, a
norm, an exporter's identity), on float32 values:

| pattern | f(x) | kinks | exact as a PWLU |
|---|---|---|---|
| ``Relu`` | max(x, 0) | 0 | yes |
| ``LeakyRelu(alpha)`` | x if x >= 0 else alpha x | 0 | yes |
| ``Clip(min, max)``, constant bounds (ReLU6) | min(max(x, min), max) | min, max | yes |
| ``HardSigmoid(alpha, beta)`` | clip(alpha x + beta, 0, 1) | -beta/alpha, (1-beta)/alpha | yes |
| ``HardSwish``, ``Mul(x, HardSigmoid(x))`` | x hardsigmoid(x) | the same two | outside them, and at knots |
| ``Mul(x, Sigmoid(x))`` (SiLU, Swish) | x sigmoid(x) | none | no |

"Exact" means a PWLU whose knots include every kink reproduces f everywhere (the kinks are
inside the bounds, :func:`onnxvq.pwlu.aligned_bounds`); HardSwish is quadratic between its kinks,
so there the PWLU interpolates it (error at most h^2 / 24 for knot spacing h).

The channel axis of a site is the producing layer's output-channel axis (axis 1 of a Conv,
ConvTranspose or Gemm output, the last axis of a MatMul whose weight is the right operand):
channel-wise parameters have one function per channel there.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from onnxvq.candidates import Layer, constant_tensor

__all__ = ["ActivationSite", "find_sites"]

_PASS_THROUGH = ("Add", "BatchNormalization", "Identity")


@dataclasses.dataclass(eq=False)
class ActivationSite:
    """One activation to stand in for.

    ``nodes``: the nodes the PWLU replaces (the activation, and the gate of ``Mul(x, g(x))``);
    ``input``: x; ``output``: f(x), the value the PWLU will produce; ``kinks``: where f is not
    smooth (sorted); ``piecewise_linear``: f is linear between and beyond the kinks;
    ``channels``/``param_shape``: the channel-wise parameter shape P, ``(C, 1, ..., 1)``.
    """

    name: str
    kind: str
    nodes: list[ir.Node]
    input: ir.Value
    output: ir.Value
    kinks: tuple[float, ...]
    piecewise_linear: bool
    function: object  # numpy x -> f(x)
    channel_axis: int | None  # None: the layer's channel axis is not known (layer-wise only)
    channels: int
    param_shape: tuple[int, ...]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.function(x)


def find_sites(model: ir.Model, layers: list[Layer]) -> list[ActivationSite]:
    """The sites behind ``layers`` (layers of the main graph), in graph order."""
    produced_by = {}
    for layer in layers:
        if layer.node.graph is model.graph and layer.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            produced_by[layer.node.outputs[0]] = layer
    sites = []
    seen: set[int] = set()
    for node in model.graph:
        site = _site(node, produced_by, model.graph)
        if site is not None and id(site.nodes[-1]) not in seen:
            seen.update(id(n) for n in site.nodes)
            sites.append(site)
    return sites


def _site(node: ir.Node, produced_by: dict[ir.Value, Layer], graph: ir.Graph) -> ActivationSite | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    form = _form(node, graph)
    if form is None:
        return None
    kind, x, nodes, kinks, linear, fn = form
    layer = _producing_layer(x, produced_by)
    if layer is None or _dtype(x) not in (None, ir.DataType.FLOAT):
        return None
    axis, channels, shape = _channels(layer)
    output = nodes[-1].outputs[0]
    name = nodes[-1].name or f"{kind}:{output.name}"
    return ActivationSite(name=name, kind=kind, nodes=nodes, input=x, output=output, kinks=kinks,
                          piecewise_linear=linear, function=fn, channel_axis=axis, channels=channels,
                          param_shape=shape)


def _form(node: ir.Node, graph: ir.Graph):
    """(kind, x, nodes, kinks, piecewise linear, numpy f) of an activation node, or None."""
    op = node.op_type
    if op == "Relu":
        return "Relu", node.inputs[0], [node], (0.0,), True, lambda x: np.maximum(x, 0)
    if op == "LeakyRelu":
        alpha = _float_attr(node, "alpha", 0.01)
        return "LeakyRelu", node.inputs[0], [node], (0.0,), True, lambda x: np.where(x >= 0, x, alpha * x)
    if op == "Clip":
        low, high = _clip_bounds(node)
        if low is None and high is None:
            return None
        lo, hi = -math.inf if low is None else low, math.inf if high is None else high
        kinks = tuple(v for v in (low, high) if v is not None)
        return "Clip", node.inputs[0], [node], kinks, True, lambda x: np.clip(x, lo, hi)
    if op == "HardSigmoid":
        if _gates_its_input(node):  # the Mul(x, HardSigmoid(x)) site takes it
            return None
        alpha, beta = _float_attr(node, "alpha", 0.2), _float_attr(node, "beta", 0.5)
        if alpha <= 0:
            return None
        return ("HardSigmoid", node.inputs[0], [node], (-beta / alpha, (1 - beta) / alpha), True,
                lambda x: np.clip(alpha * x + beta, 0, 1))
    if op == "HardSwish":
        return "HardSwish", node.inputs[0], [node], (-3.0, 3.0), False, lambda x: x * np.clip(x / 6 + 0.5, 0, 1)
    if op == "Mul" and len(node.inputs) == 2:
        for x, gate in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            producer = gate.producer() if gate is not None else None
            if (producer is None or producer.graph is not graph or producer.inputs[0] is not x
                    or len(gate.uses()) != 1 or gate in graph.outputs):
                continue
            if producer.op_type == "Sigmoid":
                return "Swish", x, [producer, node], (), False, lambda v: v / (1 + np.exp(-v))
            if producer.op_type == "HardSigmoid":
                alpha, beta = _float_attr(producer, "alpha", 0.2), _float_attr(producer, "beta", 0.5)
                if alpha > 0:
                    return ("HardSwish", x, [producer, node], (-beta / alpha, (1 - beta) / alpha), False,
                            lambda v: v * np.clip(alpha * v + beta, 0, 1))
    return None


def _gates_its_input(node: ir.Node) -> bool:
    uses = list(node.outputs[0].uses())
    if len(uses) != 1:
        return False
    consumer = uses[0].node if hasattr(uses[0], "node") else uses[0][0]
    return consumer.op_type == "Mul" and node.inputs[0] in consumer.inputs


def _producing_layer(x: ir.Value, produced_by: dict[ir.Value, Layer]) -> Layer | None:
    """The encoded layer whose output reaches ``x`` through bias adds and norms, if any."""
    value = x
    for _ in range(4):
        if value in produced_by:
            return produced_by[value]
        node = value.producer()
        if node is None or node.op_type not in _PASS_THROUGH or node.domain not in ("", "ai.onnx"):
            return None
        computed = [v for v in node.inputs if v is not None and constant_tensor(v) is None]
        if len(computed) != 1:  # a residual Add mixes two paths: not one layer's channels
            return None
        value = computed[0]
    return None


def _channels(layer: Layer) -> tuple[int | None, int, tuple[int, ...]]:
    """(channel axis, C, channel-wise parameter shape P) of a layer's output."""
    shape = layer.weight_shape
    attrs = layer.node.attributes
    if layer.op_type == "Conv":
        return 1, shape[0], (shape[0],) + (1,) * (len(shape) - 2)
    if layer.op_type == "ConvTranspose":
        c = shape[1] * attrs["group"].as_int() if "group" in attrs else shape[1]
        return 1, c, (c,) + (1,) * (len(shape) - 2)
    if layer.op_type == "Gemm":
        trans_b = attrs["transB"].as_int() if "transB" in attrs else 0
        c = shape[0] if trans_b else shape[1]
        return 1, c, (c,)
    if layer.op_type == "MatMul" and layer.weight_index == 1 and len(shape) == 2:
        return -1, shape[1], (shape[1],)
    return None, 1, (1,)


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return float(attr.as_float()) if attr is not None else default


def _clip_bounds(node: ir.Node) -> tuple[float | None, float | None]:
    if "min" in node.attributes or "max" in node.attributes:  # opset < 11
        low, high = node.attributes.get("min"), node.attributes.get("max")
        return (low.as_float() if low is not None else None, high.as_float() if high is not None else None)
    bounds = []
    for i in (1, 2):
        value = node.inputs[i] if len(node.inputs) > i else None
        if value is None:
            bounds.append(None)
            continue
        tensor = constant_tensor(value)
        if tensor is None:
            return None, None  # a computed bound: not a fixed function
        bounds.append(float(tensor.numpy().reshape(-1)[0]))
    return bounds[0], bounds[1]


def _dtype(value: ir.Value) -> ir.DataType | None:
    return value.type.dtype if value.type is not None else None
