"""Capture what each layer's weight sees: input second moments and sampled input vectors.

For a layer ``y = M x`` (M: rows x cols in the layout of :mod:`onnxvq.layout`; ``x`` a row of
Gemm's A, a MatMul row/column, or a Conv patch, see each op module's ``input_vectors``), the
output error of a quantized ``M^`` on the calibration data is

    E = mean over x of ||M x_o - M^ x_q||^2
      = sum_r  m^_r' H m^_r  -  2 m^_r' G m_r  +  m_r' H_o m_r,
    H = E[x_q x_q'],  G = E[x_q x_o'],  H_o = E[x_o x_o'],

where ``x_o`` is the input in the original model and ``x_q`` the input at the same position in
a model whose earlier layers are already quantized (``x_q = x_o``, so ``G = H``, when capturing
from the original alone). Grouped convolutions average the moments over their groups.

The model runs in onnxruntime with each layer's activation added as a graph output. Memory is
bounded whatever the data size: per batch and layer at most ``positions_per_batch`` vectors are
drawn (at random, seeded) to accumulate the moments, and at most ``max_rows`` vectors per layer
are kept for layer-wise training. Moments are float64 ``cols x cols``; over ``FULL_MOMENT_COLS``
columns only their diagonal is kept.

A layer inside If branches (at any depth) is captured on the calibration samples that take its
branch: each tapped value computed there, and a one-element "gate" constant added to the
layer's branch, becomes an extra output of its branch and of the If (the other branch gives an
empty tensor); a batch whose gate comes back empty adds nothing to that layer. Layers that
cannot be captured (inside a Loop/Scan body, a weight that is not a main-graph initializer, or a
batched MatMul weight whose inputs differ per batch entry) are absent from the result; they are
encoded from weights alone.
A recurrent op's input vectors are ``[x_t; h_(t-1)]`` per direction, rebuilt from its input
sequence and its output ``Y`` (``ops.vq_recurrent``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxvq import ops
from onnxvq.calibration import CalibrationSet
from onnxvq.candidates import Layer, weight_feeds
from onnxvq.passes._values import read_from_initializer

__all__ = [
    "FULL_MOMENT_COLS",
    "Accumulator",
    "LayerInputs",
    "capturable",
    "capture_inputs",
    "open_session",
    "position_selector",
    "run_model",
    "tap_names",
    "values_by_name",
]

FULL_MOMENT_COLS = 8192
# Input bytes per capture batch: a batch of 32 images of 640x640 multiplies every activation of a
# detector by 32, and onnxruntime's arena keeps the largest (3 GiB RSS on PP-OCRv6's detector).
CAPTURE_BATCH_BYTES = 16 << 20


@dataclasses.dataclass
class LayerInputs:
    """What one weight saw on the calibration data (summed over the layers sharing it).

    Attributes:
        hessian: ``H = E[x_q x_q']`` (cols, cols) float64, or its diagonal (cols,); None when
            captured without moments.
        cross: ``G = E[x_q x_o']``, same form; None when captured from the original model alone.
        inputs: sampled ``x_q`` (n, groups, cols) float32.
        reference_inputs: ``x_o`` at the same positions; None when equal to ``inputs``.
        count: vectors the moments average over (for an embedding table: lookups counted).
        row_weights: for an embedding table (whose lookups multiply nothing, so ``hessian`` is
            None and ``inputs`` empty), each row's share of the lookups times the row count
            (mean 1; :mod:`onnxvq.row_frequency`); None otherwise.
    """

    hessian: np.ndarray | None
    cross: np.ndarray | None
    inputs: np.ndarray
    reference_inputs: np.ndarray | None
    count: int
    row_weights: np.ndarray | None = None


def capturable(layer: Layer, model: ir.Model) -> str | None:
    """Why ``layer``'s inputs cannot be captured, or None when they can."""
    if layer.node.graph is not model.graph:
        if not _inside_if_branches(layer.node.graph, model.graph):
            return "inside a Loop/Scan body"
        if any(model.graph.initializers.get(v.name) is not v for v in layer.parts or (layer.weight,)):
            return "inside an If branch, with a weight that is not a main-graph initializer"
    if layer.op_type == "MatMul" and len(layer.weight_shape) != 2:
        return "batched MatMul weight"
    if layer.op_type == "ConvTranspose":
        return "a ConvTranspose (its encoded rows are input channels, not outputs)"
    if layer.op_type == "Gather":
        return "an embedding table (a lookup multiplies nothing; its rows are encoded from the table)"
    return None


def capture_inputs(
    model: ir.Model,
    layers: list[Layer],
    calib: CalibrationSet,
    *,
    quantized: Mapping[str, np.ndarray] | None = None,
    max_rows: int = 4096,
    positions_per_batch: int = 4096,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
    moments: bool = True,
) -> dict[str, LayerInputs]:
    """Moments and sampled inputs of ``layers``' weights, keyed by weight name.

    With ``quantized`` (weight name -> dense decoded weight), ``x_q`` comes from the model with
    those weights swapped in and ``cross``/``reference_inputs`` pair it with the original's
    ``x_o``; without, only the original runs. ``moments=False`` keeps only the sampled inputs
    (``hessian`` and ``cross`` None), for layer-wise training, which needs nothing else.
    Batches hold at most :data:`CAPTURE_BATCH_BYTES` of inputs.
    """
    from onnxvq.progress import progress as progress_bar

    layers = [l for l in layers if capturable(l, model) is None]
    if not layers:
        return {}
    with _named_taps(layers):
        taps = tap_names(layers)
        gates = {l.name: (f"onnxvq.gate.{i}", l.node.outputs[0].name)
                 for i, l in enumerate(layers) if l.node.graph is not model.graph}
        original = _TapSession(model, taps, None, taps_only=True, gates=dict(gates.values()))
        swapped = _TapSession(model, taps, quantized, taps_only=True, gates=dict(gates.values())) if quantized else None
    batches = list(calib.batches(batch_size, max_bytes=CAPTURE_BATCH_BYTES))
    keep_per_batch = max(1, -(-max_rows // len(batches)))
    rng = np.random.default_rng(seed)
    accumulators = {l.weight.name: Accumulator(paired=swapped is not None, moments=moments) for l in layers}
    consumers = {
        l.name: (ops.op_for_consumer(l.op_type), {n: a.value for n, a in l.consumer_attributes.items()})
        for l in layers
    }
    for _, feed, _ in progress_bar(iterable=batches, desc="capturing", unit="batch", enabled=progress):
        acts_o = original.run(feed)
        acts_q = swapped.run(feed) if swapped else acts_o
        for layer in layers:
            names = taps[layer.name]
            if layer.name in gates and acts_o[gates[layer.name][0]].size == 0:  # its If branch did not run
                continue
            module, attrs = consumers[layer.name]
            select = position_selector(rng, positions_per_batch)
            x_o = module.input_vectors(_activation(acts_o, names), layer.weight_shape, attrs, select)
            x_q = module.input_vectors(_activation(acts_q, names), layer.weight_shape, attrs, select) if swapped else x_o
            accumulators[layer.weight.name].add(x_q, x_o, rng.permutation(len(x_q))[:keep_per_batch])
        del acts_o, acts_q
    return {name: acc.result(max_rows) for name, acc in accumulators.items() if acc.count}


def position_selector(rng: np.random.Generator, limit: int):
    """An op module's ``select(total)``: at most ``limit`` of the ``total`` positions, drawn once
    (sorted) and then the same on every call, so paired captures read the same positions."""
    chosen: list[np.ndarray] = []

    def select(total: int) -> np.ndarray:
        if not chosen:
            n = min(total, limit)
            chosen.append(np.sort(rng.choice(total, n, replace=False)) if n < total else np.arange(total))
        return chosen[0]

    return select


def run_model(model: ir.Model, calib: CalibrationSet, *, quantized: Mapping[str, np.ndarray] | None = None,
              batch_size: int = 16) -> list[list[np.ndarray]]:
    """The graph outputs of ``model`` (with ``quantized`` weights swapped in) on every sample, in
    calibration order: ``[sample][output]``."""
    session = _TapSession(model, {}, quantized)
    return [session.run_outputs(feed) for feed in calib.samples]


class Accumulator:
    """Running sums of ``x_q x_q'`` (and ``x_q x_o'``) and a bounded sample of the vectors."""

    def __init__(self, paired: bool, moments: bool = True):
        self.paired = paired
        self.moments = moments
        self.h = self.g = None
        self.count = 0
        self.kept_q: list[np.ndarray] = []
        self.kept_o: list[np.ndarray] = []

    def add(self, x_q: np.ndarray, x_o: np.ndarray, keep: np.ndarray) -> None:
        n, groups, cols = x_q.shape
        q = np.ascontiguousarray(x_q, np.float32).reshape(n * groups, cols)
        o = np.ascontiguousarray(x_o, np.float32).reshape(n * groups, cols) if self.paired else q
        if self.moments:
            if cols > FULL_MOMENT_COLS:
                h = np.einsum("ij,ij->j", q, q, dtype=np.float64)
                g = np.einsum("ij,ij->j", q, o, dtype=np.float64) if self.paired else None
            else:  # float32 GEMM (fast), accumulated in float64 across batches
                h = (q.T @ q).astype(np.float64)
                g = (q.T @ o).astype(np.float64) if self.paired else None
            self.h = h if self.h is None else self.h + h
            if self.paired:
                self.g = g if self.g is None else self.g + g
        self.count += n * groups
        # Groups of one position count as separate vectors for the moments; the kept rows stay
        # whole positions, since a grouped layer's outputs read all of a position's groups.
        self.kept_q.append(np.array(x_q[keep], np.float32))
        if self.paired:
            self.kept_o.append(np.array(x_o[keep], np.float32))

    def result(self, max_rows: int) -> LayerInputs:
        inputs = np.concatenate(self.kept_q)[:max_rows]
        reference = np.concatenate(self.kept_o)[:max_rows] if self.paired else None
        return LayerInputs(
            hessian=self.h / self.count if self.moments else None,
            cross=self.g / self.count if self.paired and self.moments else None,
            inputs=inputs,
            reference_inputs=reference,
            count=self.count,
        )


def tap_names(layers: list[Layer]) -> dict[str, list[str]]:
    """Layer name -> names of the values its input vectors are built from: the activation input;
    for a recurrent op the input sequence, the hidden states ``Y`` and ``initial_h`` when given
    (its ``input_vectors`` rebuild ``[x_t; h_(t-1)]`` from them)."""
    taps = {}
    for layer in layers:
        node = layer.node
        if layer.op_type in ops.RECURRENT:
            initial_h = node.inputs[5] if len(node.inputs) > 5 else None
            values = [node.inputs[0], node.outputs[0]] + ([initial_h] if initial_h is not None else [])
        else:
            values = [node.inputs[1 - layer.weight_index if layer.op_type == "MatMul" else 0]]
        taps[layer.name] = [v.name for v in values]
    return taps


def _activation(acts: Mapping[str, np.ndarray], names: list[str]):
    """What an op module's ``input_vectors`` takes: one array, or the tuple of a recurrent op's."""
    return acts[names[0]] if len(names) == 1 else tuple(acts[n] for n in names)


@contextlib.contextmanager
def _named_taps(layers: list[Layer]):
    """Give an unnamed tapped output (a recurrent op's ``Y`` that the model does not use) a name
    while the tap sessions are built from the model, and take it back after."""
    unnamed = [l.node.outputs[0] for l in layers if l.op_type in ops.RECURRENT and not l.node.outputs[0].name]
    for i, value in enumerate(unnamed):
        value.name = f"onnxvq.tap.{value.producer().name or 'recurrent'}.{i}"
    try:
        yield
    finally:
        for value in unnamed:
            value.name = ""


class _TapSession:
    """An onnxruntime session of ``model`` (weights optionally swapped) that also returns the
    named intermediate values."""

    def __init__(
        self,
        model: ir.Model,
        taps: Mapping[str, str],
        quantized: Mapping[str, np.ndarray] | None,
        *,
        taps_only: bool = False,
        gates: Mapping[str, str] | None = None,
    ):
        """``gates``: gate name -> an output computed in an If branch, beside which a gate is
        added (module docstring); gates are returned with the taps."""
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        tapped = model.clone()
        wanted = list(dict.fromkeys([n for names in taps.values() for n in names] + list(gates or {})))
        hidden = [n for n in wanted if n not in values_by_name(tapped.graph)]
        self.exposed: dict[str, str] = {}  # tap name -> the If output that carries it out
        if hidden:
            tapped, self.exposed = _expose_branch_values(tapped, hidden, gates or {})
        graph = tapped.graph
        values = values_by_name(graph)
        inputs = {v.name for v in graph.inputs}
        self.n_outputs = len(graph.outputs)
        if taps_only:  # only what the taps depend on runs: the rest of the graph is pruned
            graph.outputs.clear()
            self.n_outputs = 0
        outputs = {v.name for v in graph.outputs}
        for name in (self.exposed.get(n, n) for n in wanted):
            if name not in outputs and name not in inputs:
                graph.outputs.append(values[name])
                outputs.add(name)
        for name, array in (quantized or {}).items():
            for value, part in weight_feeds(values[name], array):
                _swap_weight(value, part)
        if taps_only:
            RemoveUnusedNodesPass()(tapped)
        self.output_names = [v.name for v in graph.outputs]
        self.session = None
        if not self.output_names:  # every tap is a graph input: nothing to run
            return
        self.session = open_session(tapped)

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.session is None:
            return dict(feed)
        results = dict(zip(self.output_names, self.session.run(self.output_names, dict(feed))))
        for name, carrier in self.exposed.items():
            results[name] = results[carrier]
        results.update(feed)
        return results

    def run_outputs(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names[: self.n_outputs], dict(feed))


def _inside_if_branches(graph: ir.Graph, main: ir.Graph) -> bool:
    """Whether ``graph`` is an If branch of ``main``, or of a graph that is, and so on."""

    def search(parent: ir.Graph) -> bool:
        for node in parent:
            for attr in node.attributes.values():
                if attr.type != ir.AttributeType.GRAPH:
                    continue
                if node.op_type == "If" and node.domain in ("", "ai.onnx") and (
                        attr.value is graph or search(attr.value)):
                    return True
        return False

    return search(main)


def _expose_branch_values(model: ir.Model, names: list[str],
                          gates: Mapping[str, str]) -> tuple[ir.Model, dict[str, str]]:
    """A copy of ``model`` in which each named value computed inside If branches is also an
    output of its If (``<name>.onnxvq_tapN``), through every enclosing If; the branch that does
    not compute it outputs an empty tensor of its type. ``gates`` (gate name -> a value computed
    in a branch) first adds each gate, a Constant int64 ``[1]``, beside that value. Returns (the
    copy, name -> If output name). Works on the proto: onnx-ir fixes a node's output count when
    the node is created."""
    import onnx
    from onnx import helper

    types = {v.name: v.dtype for node in ir.traversal.RecursiveGraphIterator(model.graph) for v in node.outputs}
    types.update({gate: ir.DataType.INT64 for gate in gates})
    proto = ir.serde.serialize_model(model)
    counter = iter(range(1 << 62))

    def add_gates(graph: onnx.GraphProto) -> None:
        produced = {o for n in graph.node for o in n.output}
        for gate, beside in gates.items():
            if beside in produced:
                graph.node.append(helper.make_node(
                    "Constant", [], [gate], value=helper.make_tensor(gate, onnx.TensorProto.INT64, [1], [1])))
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    add_gates(attr.g)

    def expose(graph: onnx.GraphProto, wanted: set[str]) -> dict[str, str]:
        carried: dict[str, str] = {}
        for node in graph.node:
            if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
                continue
            branches = {a.name: a.g for a in node.attribute if a.name in ("then_branch", "else_branch")}
            found = {}
            for key, branch in branches.items():
                here = {o: o for n in branch.node for o in n.output if o in wanted}
                here.update(expose(branch, wanted - set(here)))
                found[key] = here
            for name in sorted(set().union(*found.values()) - set(carried)):
                elem = int(types.get(name) or ir.DataType.FLOAT)
                for key, branch in branches.items():
                    inner = found[key].get(name)
                    if inner is None:  # this branch does not compute it: an empty tensor
                        inner = f"{name}.onnxvq_empty{next(counter)}"
                        branch.node.append(helper.make_node(
                            "Constant", [], [inner], value=helper.make_tensor(inner, elem, [0], [])))
                    branch.output.append(helper.make_tensor_value_info(inner, elem, None))
                carried[name] = f"{name}.onnxvq_tap{next(counter)}"
                node.output.append(carried[name])
            wanted = wanted - set(carried)
        return carried

    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                add_gates(attr.g)
    exposed = expose(proto.graph, set(names))
    return ir.serde.deserialize_model(proto), exposed


def open_session(model: ir.Model) -> ort.InferenceSession:
    """A CPU onnxruntime session of ``model``, through a temporary file: a proto over 2 GiB
    cannot be serialised, so the model is saved with external data when large. The folder is
    named after this process, so the next run removes it if this one is killed first."""
    from onnxvq.model_io import save_model, sweep_stale_temp, temp_folder

    # A model with ai.onnxvq nodes (PWLU activations while they are fitted) runs them on the
    # native kernels when the library is there: their bodies are slow.
    if any(node.domain == ops.DOMAIN for node in model.graph):
        options = ops.session_options(native=None, log_severity_level=4)
    else:
        options = ort.SessionOptions()
        options.log_severity_level = 4  # failures surface as exceptions; no stderr noise
    sweep_stale_temp()
    folder = temp_folder()
    try:
        path = Path(folder) / "model.onnx"
        save_model(model, path)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs}
    values.update(graph.initializers)
    for node in graph:
        for v in node.outputs:
            values[v.name] = v
    return values


def _swap_weight(value: ir.Value, array: np.ndarray) -> None:
    """Give a weight (initializer, Constant output or QDQ DequantizeLinear output) a new tensor,
    in the clone only."""
    tensor = ir.tensor(np.asarray(array))
    if value.is_initializer():
        value.const_value = tensor
        return
    producer = value.producer()
    if producer.op_type == "Constant":
        producer.attributes["value"] = ir.AttrTensor("value", tensor)
        for key in [k for k in producer.attributes if k != "value"]:
            del producer.attributes[key]
        return
    read_from_initializer(producer.graph, value, tensor)
