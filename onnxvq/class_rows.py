"""The rows of a classifier head that the calibration data reads, split off and kept exact.

A recognizer's head is most of its weights (ddddocr's captcha reader: 8.4M of 12.8M, 8,210
classes; PP-OCRv6's recognizer: 2.2M, 18,710 classes), so a size target gives it the fewest bits
per weight, yet the task reads only the classes its text holds: on the real-model suite 49 of
ddddocr's 8,210 rows win an argmax on 48 calibration captchas. Measured on its 8x file (head at
2.7 bits per weight), putting back just those 49 rows exact takes the exact-match rate from 0.900
to fp32's 0.940; the rest of the head at 2.7 bits costs nothing.

Rule. A ``Gemm`` or ``MatMul`` (weight the second operand, a float constant) whose output's last
axis is the class axis of a graph output is a *head*; the chain from it to that output may hold
only nodes that keep each last-axis vector whole and in place: an elementwise ``Add``, ``Sub``,
``Mul`` or ``Div`` with a constant whose last dimension is 1 or the class count, ``Softmax`` or
``LogSoftmax`` over the last axis, ``Identity``, ``Transpose`` that keeps the last axis last, and
``Reshape``, ``Flatten``, ``Squeeze``, ``Unsqueeze`` whose output keeps the class count last
(checked on the first calibration sample, shapes being what the run gives). The classes that are
the argmax of some position of that output over the calibration samples are the *kept rows*
``K`` (sorted). When there are some, at most :data:`MAX_KEPT_FRACTION` of the classes, the head
has at least :data:`MIN_CLASSES`, and the output looks like class scores, the head is split as::

    y_kept = head(x) with the weight's (and bias's) classes K only      (a layer of its own)
    y      = ScatterElements(head(x), Expand(K, Shape(y_kept)), y_kept, axis = -1)

Class scores have a winner that stands out (:func:`onnxvq.output_quality.has_standout_winner`,
over every position of the calibration samples): a model whose output is an embedding is not
split.

The split is exactly the head's output for any weight: ``y[..., K] = y_kept``, the rest from the full
head. Both are layers like any other: a size target allocates bits to each by its measured
effect on the output (so the kept rows get the bits their classes are worth, dense when that is
what pays). With fixed settings only a head they encode is split, and its kept layer stays dense
(:func:`kept_layer_names`). Heads inside control-flow bodies and integer weights (kept as they
were when they stay dense, :mod:`onnxvq.integer_ops`) are not split.

Classes the calibration data never shows a model winning are served by the full head at its
encoded precision, as they would be without the split: calibration data that covers the
deployment's classes is what this relies on. Without calibration data nothing is split.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx_ir as ir

from onnxvq.activations import _TapSession
from onnxvq.calibration import CalibrationSet
from onnxvq.candidates import SOURCE, constant_tensor, iter_nodes
from onnxvq.output_quality import peak_bound, score_peaks
from onnxvq.passes._values import register_initializer, unique_name, value_names

__all__ = ["CLASS_ROWS_SETTINGS", "KEPT_SUFFIX", "KeptRows", "kept_layer_names", "split_class_rows"]

logger = logging.getLogger(__name__)

CLASS_ROWS_SETTINGS = ("auto", "off")
# A head of fewer classes is small or read whole (an orientation classifier's 2 classes).
MIN_CLASSES = 64
# When the calibration data wins more classes than this, the task reads most of the head.
MAX_KEPT_FRACTION = 0.25
KEPT_SUFFIX = ".kept_rows"
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
_ELEMENTWISE = ("Add", "Sub", "Mul", "Div")
_RESHAPING = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


@dataclasses.dataclass
class KeptRows:
    """One split head: its node's name, class count, the kept classes and the kept layer's name."""

    head: str
    classes: int
    rows: list[int]
    layer: str

    def format(self) -> str:
        return (f"{self.head}: {len(self.rows)} of {self.classes:,} classes won on the calibration data, "
                f"kept apart in {self.layer}")

    def to_dict(self) -> dict:
        return {"head": self.head, "classes": self.classes, "kept": len(self.rows), "layer": self.layer}


def kept_layer_names(kept: list[KeptRows]) -> list[str]:
    """Names of the layers holding kept rows (left dense by fixed settings)."""
    return [k.layer for k in kept]


def split_class_rows(model: ir.Model, samples: CalibrationSet, among: set[ir.Node] | None = None) -> list[KeptRows]:
    """Split every head of ``model`` (module docstring; only those in ``among`` when given) in
    place; returns what was split."""
    heads = {}
    for node in iter_nodes(model):
        if node.graph is not model.graph or (among is not None and node not in among):
            continue
        chain = _class_chain(node)
        if chain is not None:
            heads[node] = chain
    if not heads:
        return []
    wins = _class_wins(model, heads, samples)
    taken = value_names(model)
    split = []
    for node, rows in wins.items():
        classes = _classes(node)
        if rows is None or not 0 < len(rows) <= MAX_KEPT_FRACTION * classes:
            if rows is not None:
                logger.info("%s: %d of %d classes won; not split", node.name, len(rows), classes)
            continue
        split.append(_split(model, node, rows, taken))
    return split


def _classes(node: ir.Node) -> int:
    weight = constant_tensor(node.inputs[1])
    if node.op_type == "Gemm" and _int_attr(node, "transB"):
        return int(weight.shape[0])
    return int(weight.shape[-1])


def _int_attr(node: ir.Node, name: str, default: int = 0) -> int:
    return node.attributes[name].as_int() if name in node.attributes else default


def _class_chain(node: ir.Node) -> list[ir.Node] | None:
    """The nodes from a head ``node`` to the graph output its classes reach (the static part of the
    rule; shapes are checked on a run), or None when ``node`` is no head."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Gemm", "MatMul") or len(node.inputs) < 2:
        return None
    weight = constant_tensor(node.inputs[1])
    if weight is None or weight.dtype not in _FLOATS or weight.shape.rank() < 2:
        return None
    if node.inputs[1].meta.get(SOURCE):  # an integer weight seen as float: it goes back as it was
        return None
    classes = _classes(node)
    if classes < MIN_CLASSES:
        return None
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = constant_tensor(node.inputs[2])
        if bias is None or not _per_class_bias(tuple(bias.shape), classes):
            return None
    chain: list[ir.Node] = []
    value = node.outputs[0]
    while not value.is_graph_output():
        uses = value.uses()
        if len(uses) != 1:
            return None
        user = uses[0][0]
        if user.graph is not node.graph or not _keeps_classes(user, uses[0][1]):
            return None
        chain.append(user)
        value = user.outputs[0]
    return chain


def _keeps_classes(node: ir.Node, slot: int) -> bool:
    """Whether ``node``, reading the class scores at input ``slot``, keeps each last-axis vector
    whole (what a run cannot tell: the shapes it can are checked on one)."""
    if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return False
    op = node.op_type
    if op in _ELEMENTWISE:
        if len(node.inputs) != 2 or (op in ("Sub", "Div") and slot != 0):
            return False
        return constant_tensor(node.inputs[1 - slot]) is not None
    if op in ("Softmax", "LogSoftmax"):
        return "axis" in node.attributes  # checked against the rank on a run (opset < 13's default is 1)
    if op == "Transpose":
        perm = list(node.attributes["perm"].as_ints()) if "perm" in node.attributes else []
        return bool(perm) and perm[-1] == len(perm) - 1
    return op == "Identity" or op in _RESHAPING


def _per_class_bias(shape: tuple, classes: int) -> bool:
    """Whether a Gemm bias of ``shape`` is one value, or one per class (``(N,)`` or ``(1, N)``),
    so that the kept rows take theirs (:func:`_split`); not when it varies by row of the batch."""
    return math.prod(shape) == 1 or shape in ((classes,), (1, classes))


def _class_wins(model: ir.Model, heads: dict[ir.Node, list[ir.Node]], samples: CalibrationSet):
    """Per head, the sorted classes that are the argmax of some position of its graph output over
    ``samples``, or None when the first sample's shapes break the rule or the scores have no
    winner that stands out (module docstring)."""
    # Keyed by position: node names may be empty or repeated.
    taps = {str(i): [v.name for v in [node.outputs[0], *(n.outputs[0] for n in chain)]]
            for i, (node, chain) in enumerate(heads.items())}
    keys = {node: str(i) for i, node in enumerate(heads)}
    session = _TapSession(model, taps, None, taps_only=True)
    wins: dict[ir.Node, set | None] = {node: set() for node in heads}
    peaks: dict[ir.Node, list] = {node: [] for node in heads}  # score_peaks per sample
    for i, feed in enumerate(samples.samples):
        values = session.run(feed)
        for node, chain in heads.items():
            if wins[node] is None:
                continue
            names = taps[keys[node]]
            if i == 0 and not _shapes_keep_classes(node, chain, [values[n] for n in names]):
                wins[node] = None
                continue
            scores = values[names[-1]]
            scores = scores.reshape(-1, scores.shape[-1])
            wins[node].update(np.unique(scores.argmax(1)).tolist())
            peaks[node].append(score_peaks(scores))
    for node, found in peaks.items():
        if wins[node] is not None and np.median(np.concatenate(found)) < peak_bound(_classes(node)):
            logger.info("%s: its output does not look like class scores; not split", node.name)
            wins[node] = None
    return {node: sorted(w) if w is not None else None for node, w in wins.items()}


def _shapes_keep_classes(head: ir.Node, chain: list[ir.Node], arrays: list[np.ndarray]) -> bool:
    """The run's half of the rule: every value from the head to the output has the class count
    last, elementwise constants broadcast along it, and a softmax normalises over it."""
    classes = _classes(head)
    if any(a.ndim == 0 or a.shape[-1] != classes for a in arrays):
        return False
    for node, before in zip(chain, arrays[:-1]):
        if node.op_type in ("Softmax", "LogSoftmax"):
            axis = node.attributes["axis"].as_int()
            if axis not in (-1, before.ndim - 1):
                return False
        if node.op_type in _ELEMENTWISE:
            other = next(constant_tensor(v) for v in node.inputs if constant_tensor(v) is not None)
            shape = tuple(other.shape)
            if len(shape) > before.ndim or (shape and shape[-1] not in (1, classes)):
                return False
    return True


def _split(model: ir.Model, node: ir.Node, rows: list[int], taken: set[str]) -> KeptRows:
    """Rewrite ``node`` as the module docstring says."""
    graph = model.graph
    classes = _classes(node)
    index = np.asarray(rows, np.int64)
    weight = constant_tensor(node.inputs[1]).numpy()
    transposed = node.op_type == "Gemm" and _int_attr(node, "transB")
    kept_weight = np.ascontiguousarray(weight[index] if transposed else weight[..., index])
    base = node.name or f"{node.op_type}:{node.inputs[1].name}"
    inputs = [node.inputs[0], register_initializer(graph, f"{node.inputs[1].name}{KEPT_SUFFIX}", kept_weight, taken)]
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = constant_tensor(node.inputs[2]).numpy()
        kept_bias = bias if bias.size == 1 else np.ascontiguousarray(bias[..., index])
        inputs.append(register_initializer(graph, f"{node.inputs[2].name}{KEPT_SUFFIX}", kept_bias, taken))
    kept = ir.Node("", node.op_type, inputs, attributes=list(node.attributes.values()), num_outputs=1,
                   name=unique_name(f"{base}{KEPT_SUFFIX}", taken))
    kept.outputs[0].name = unique_name(f"{node.outputs[0].name}{KEPT_SUFFIX}", taken)
    index_value = register_initializer(graph, f"{base}.kept_classes", index, taken)
    shape = ir.Node("", "Shape", [kept.outputs[0]], num_outputs=1, name=f"{base}.kept_shape")
    expand = ir.Node("", "Expand", [index_value, shape.outputs[0]], num_outputs=1, name=f"{base}.kept_index")
    y = node.outputs[0]
    scatter = ir.Node("", "ScatterElements", [y, expand.outputs[0], kept.outputs[0]],
                      attributes=[ir.AttrInt64("axis", -1)], num_outputs=1, name=f"{base}.kept_scatter")
    for new in (shape, expand):
        new.outputs[0].name = unique_name(f"{new.name}", taken)
    # The scatter's output takes the head's output name: graph outputs and readers keep theirs.
    name = y.name
    y.name = unique_name(f"{name}.encoded_rows", taken)
    scatter.outputs[0].name = name
    y.replace_all_uses_with(scatter.outputs[0], replace_graph_outputs=True)
    scatter.replace_input_with(0, y)
    graph.insert_after(node, [kept, shape, expand, scatter])
    logger.info("%s: kept %d of %d classes apart", base, len(rows), classes)
    return KeptRows(base, classes, rows, kept.name)

