"""How much a model's output moves when one weight is replaced.

:class:`OutputSensitivity` keeps one onnxruntime session of the model in which the weights of
interest are graph inputs with their initializers as defaults (ONNX lets a feed override such an
initializer), so measuring a layer costs one run per sample, not a new session.

The error is ``sum |y - y'|^2 / sum |y|^2`` over every float output of every sample, plus, for
each output computed by ``Softmax``/``LogSoftmax`` (or ``Sigmoid``), the mean over its rows (or
elements) and samples of the divergence ``KL(p || p')`` of the class (or Bernoulli)
distributions, computed from the op's input (the logits); an ``Identity`` after the op is looked
through. A squared error of probabilities misses what breaks a classifier with many classes:
noise on thousands of logits lifts some wrong class above the right one, and saturated
probabilities barely move until they flip; and a detector's probability map is near zero almost
everywhere, so its squared error is the noise of a few pixels. The divergence sees the
probability mass that moves and, like the squared error, grows linearly with small weight noise.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxvq.activations import open_session
from onnxvq.calibration import CalibrationSet
from onnxvq.candidates import Layer, dequantized_tensor
from onnxvq.passes._values import read_from_initializer

__all__ = ["ELEMENTWISE", "MeasuredOutput", "OutputSensitivity", "measured_output"]

logger = logging.getLogger(__name__)


class OutputSensitivity:
    def __init__(self, model: ir.Model, layers: Sequence[Layer], samples: CalibrationSet):
        from onnx_ir.passes.common import LiftConstantsToInitializersPass

        # every value a layer's weight is fed through (a recurrent op's W and R)
        names = {value.name for layer in layers for value in (layer.parts or (layer.weight,))}
        copy = model.clone()
        # Weights held in Constant nodes (paddle2onnx writes them so) become initializers, which
        # a feed can override; in this measuring copy only.
        LiftConstantsToInitializersPass(size_limit=1)(copy)
        graph = copy.graph
        _lift_dequantized(graph, names)
        opset = copy.opset_imports.get("", 13)
        self.outputs = [measured_output(value, opset) for value in graph.outputs]
        for output in self.outputs:
            if output.value not in graph.outputs:
                graph.outputs.append(output.value)
        graph_inputs = {v.name for v in graph.inputs}
        self.overridable = set()
        for name in sorted(names):
            value = graph.initializers.get(name)
            if value is not None and name not in graph_inputs:
                graph.inputs.append(value)
                self.overridable.add(name)
        if copy.ir_version < 4:  # initializers as overridable inputs need IR >= 4
            copy.ir_version = 4
        self.session = open_session(copy)
        self.output_names = [output.value.name for output in self.outputs]
        self.feeds = [dict(sample) for sample in samples.samples]
        self.reference = [self.session.run(self.output_names, feed) for feed in self.feeds]
        self.signal = sum(
            _energy(out) for outs in self.reference for out, output in zip(outs, self.outputs) if output.axis is None
        )

    def error(self, layer: Layer, weight: np.ndarray) -> float | None:
        """Output error (module docstring) with ``layer``'s weight replaced by ``weight`` (None
        when it cannot be fed, or the model's outputs are all zero)."""
        return self.joint_error({layer: weight})

    def joint_error(self, weights: Mapping[Layer, np.ndarray]) -> float | None:
        """Output error with every layer's weight in ``weights`` replaced at once."""
        names = {value.name: part for layer, weight in weights.items() for value, part in layer.feeds(weight)}
        classes = any(output.axis is not None for output in self.outputs)
        if not names or not set(names) <= self.overridable or (self.signal <= 0 and not classes):
            return None
        noise = divergence = 0.0
        for feed, reference in zip(self.feeds, self.reference):
            outputs = self.session.run(self.output_names, {**feed, **names})
            for output, out, ref in zip(self.outputs, outputs, reference):
                if output.axis is None:
                    noise += _energy(out, ref)
                else:
                    divergence += _mean_kl(ref, out, output.axis, output.flatten)
        return (noise / self.signal if self.signal > 0 else 0.0) + divergence / len(self.feeds)


def _lift_dequantized(graph: ir.Graph, names: set[str]) -> None:
    """A QDQ weight (DequantizeLinear of constants) among ``names`` becomes an initializer of its
    float value under its own name, which a feed can override; in the measuring copy only."""
    for value in [v for node in graph for v in node.outputs if v.name in names]:
        tensor = dequantized_tensor(value)
        if tensor is not None:
            read_from_initializer(graph, value, tensor)


@dataclasses.dataclass(frozen=True)
class MeasuredOutput:
    """A measured value: a graph output, or the logits of a softmax output (``axis`` set;
    ``flatten``: opset < 13 semantics, the classes are every axis from ``axis`` on) or of a
    sigmoid output (``axis`` is :data:`ELEMENTWISE`)."""

    value: ir.Value
    axis: int | str | None = None
    flatten: bool = False


ELEMENTWISE = "elementwise"


def measured_output(value: ir.Value, opset: int) -> MeasuredOutput:
    """What to compare for graph output ``value``: the logits feeding a ``Softmax``/``LogSoftmax``
    (with its class axis) or ``Sigmoid`` (elementwise) that computes it, looking through
    ``Identity``; otherwise the output itself."""
    producer = value.producer()
    while producer is not None and producer.domain == "" and producer.op_type == "Identity":
        producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
    if producer is None or producer.domain != "" or producer.op_type not in ("Softmax", "LogSoftmax", "Sigmoid"):
        return MeasuredOutput(value)
    logits = producer.inputs[0]
    if logits is None or not logits.name or (logits.dtype is not None and not logits.dtype.is_floating_point()):
        return MeasuredOutput(value)
    if producer.op_type == "Sigmoid":
        return MeasuredOutput(logits, ELEMENTWISE)
    default = -1 if opset >= 13 else 1
    axis = producer.attributes["axis"].as_int() if "axis" in producer.attributes else default
    return MeasuredOutput(logits, axis, opset < 13)


def _mean_kl(reference: np.ndarray, logits: np.ndarray, axis, flatten: bool) -> float:
    """Mean over rows of ``KL(softmax(reference) || softmax(logits))`` along the class axis, or
    with ``axis`` :data:`ELEMENTWISE` over elements of the Bernoulli divergence of
    ``sigmoid(reference)`` from ``sigmoid(logits)``."""
    ref = reference.astype(np.float64)
    new = logits.astype(np.float64)
    if axis == ELEMENTWISE:
        # log sigmoid(x) = -softplus(-x), log(1 - sigmoid(x)) = -softplus(x)
        p = np.exp(-np.logaddexp(0, -ref))  # sigmoid, without overflow
        kl = p * (np.logaddexp(0, -new) - np.logaddexp(0, -ref)) + (1 - p) * (np.logaddexp(0, new) - np.logaddexp(0, ref))
        return float(np.mean(kl)) if kl.size else 0.0
    if flatten:
        axis = axis % max(ref.ndim, 1)
        rows = int(np.prod(ref.shape[:axis]))
        ref, new, axis = ref.reshape(rows, -1), new.reshape(rows, -1), -1
    log_p = ref - _logsumexp(ref, axis)
    log_q = new - _logsumexp(new, axis)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=axis)
    return float(np.mean(kl)) if kl.size else 0.0


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(x, axis=axis, keepdims=True)
    return top + np.log(np.sum(np.exp(x - top), axis=axis, keepdims=True))


def _energy(array: np.ndarray, reference: np.ndarray | None = None) -> float:
    """``sum a^2`` of a float output, or ``sum (a - reference)^2``; other outputs count 0."""
    if array.dtype.kind != "f":
        return 0.0
    a = array.astype(np.float64)
    if reference is not None:
        a = a - reference
    return float(np.sum(a * a))
