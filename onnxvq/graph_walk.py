"""Layer inputs in graph order, by walking the graph one segment at a time.

Layer-wise fine-tuning is Gauss-Seidel (:mod:`onnxvq.tuning`): layer ``i`` is trained on the
inputs ``x_q`` it sees when every earlier layer is already fine-tuned, paired with the inputs
``x_o`` of the original model at the same positions. Re-running the model from its inputs for
every layer costs a pass over the data per layer (quadratic in depth); on PP-OCRv6's detector
those passes were 350 of 417 s.

The walk runs each part of the graph once. Nodes of the main graph are in topological order;
let ``p_i`` be the position of layer ``i``'s node. The *frontier* ``F(p)`` is every
data-dependent value produced before position ``p`` (or a graph input) that a node at ``p`` or
later reads: all the model needs to go on from ``p``. Layer ``i``'s activation is in
``F(p_i)``. After layer ``i`` is trained, the segment ``[p_i, p_{i+1})`` runs twice per batch,
from the original frontier with the original weights and from the current frontier with the
current weights (layer ``i`` trained, later layers encoded), giving both frontiers at
``p_{i+1}``. Values computed before ``p_i`` never depend on the weights of layers ``>= i``,
so this equals a full run of the current model, at the cost of one pass over the data in total.

Weights of layers are graph inputs of each segment's session, so one session serves the
original and the current weights. The frontiers of every calibration batch are held in memory,
two of them, within :data:`FRONTIER_BYTES` (float32 values held as float16 where they fit:
the walk's inputs then differ from a full run's by the rounding of one float16 per value, far
below what quantization changes): where a frontier grows past the budget (a wide feature map
early in a detector), the walk goes on with the first batches only, and every later layer sees
those. :attr:`GraphWalk.frontier_bytes` reports the largest size held.

Graphs with If/Loop/Scan nodes are not walked (their bodies read outer values the frontier
would have to track); :meth:`GraphWalk.follows` is False for every layer then, and the caller
captures from the whole model as before.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxvq import ops
from onnxvq.activations import (
    Accumulator,
    LayerInputs,
    capturable,
    open_session,
    position_selector,
    tap_names,
    values_by_name,
)
from onnxvq.calibration import CalibrationSet
from onnxvq.candidates import Layer, weight_feeds

__all__ = ["FRONTIER_BYTES", "GraphWalk"]

# Input bytes per batch, as in onnxvq.activations.capture_inputs.
_BATCH_BYTES = 16 << 20
# What the two frontiers may hold. PP-OCRv6's detector needs 8.4 MiB per 576x640 image at its
# widest point (both frontiers, in float16): 30 images.
FRONTIER_BYTES = 256 << 20
# Values held as float16 stay below its largest finite value with room for rounding.
_HALF_MAX = 60000.0


class GraphWalk:
    """Captures, layer after layer in graph order, the paired inputs ``(x_q, x_o)``.

    Example::

        original = {g[0].weight.name: g[0].weight_array() for g in groups}
        walk = GraphWalk(model, calib, weights=original, max_rows=4096, batch_size=32, seed=0)
        for group in groups:                         # one layer each, in graph order
            if walk.follows(group):
                data = walk.inputs(group, current)   # current: weight name -> dense weight now
                ...                                  # train, then update current[...]
    """

    def __init__(
        self,
        model: ir.Model,
        calib: CalibrationSet,
        *,
        weights: Mapping[str, np.ndarray],
        max_rows: int,
        batch_size: int,
        seed: int,
        max_bytes: int = FRONTIER_BYTES,
        half: bool = True,
    ) -> None:
        """``weights``: weight name -> original dense weight, for every weight that may differ
        between the original and the current model. ``max_bytes``: the most the two frontiers
        may hold; past it the last batches are dropped (for every later layer too). ``half``:
        float32 activations are held as float16 where they fit its range."""
        self.model = model
        self.graph = model.graph
        self.nodes = list(self.graph)
        self.position = {node: i for i, node in enumerate(self.nodes)}
        self._values = values_by_name(self.graph)
        self.original = self._parts(weights)  # value name -> original array, W and R apart
        self.max_rows = max_rows
        self.seed = seed
        self.walkable = not any(
            attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for node in self.nodes
            for attr in node.attributes.values()
        )
        self._last_use, self._dependent = self._uses()
        self.max_bytes = max_bytes
        self.half = half
        self._dtypes: dict[str, np.dtype] = {}  # what each held value is in the model
        self._at = 0  # the frontiers below are F(self._at)
        inputs = [v.name for v in self.graph.inputs if not v.is_initializer()]
        self._frontier_o = [
            {n: feed[n] for n in inputs if n in feed} for _, feed, _ in calib.batches(batch_size, max_bytes=_BATCH_BYTES)
        ]
        self._frontier_q = [dict(f) for f in self._frontier_o]
        self.frontier_bytes = 0
        self.batches_dropped = 0
        self.segments_run = 0

    def follows(self, group: list[Layer]) -> bool:
        """Whether the walk can give ``group``'s inputs: one layer of the main graph at or after
        the walk's position, whose activation is computed from the model's inputs."""
        if not self.walkable or len(group) != 1 or capturable(group[0], self.model) is not None:
            return False
        if group[0].op_type in ops.RECURRENT:  # its inputs include its own output Y
            return False
        layer = group[0]
        tap = layer.node.inputs[_activation_index(layer)]
        return self.position[layer.node] >= self._at and tap is not None and tap in self._dependent

    def inputs(self, group: list[Layer], current: Mapping[str, np.ndarray]) -> LayerInputs:
        """``group``'s inputs in the current model (``current``: weight name -> dense weight, for
        the weights that differ from the original), paired with the original's."""
        layer = group[0]
        self._advance(self.position[layer.node], current)
        tap = tap_names(group)[layer.name][0]
        module = ops.op_for_consumer(layer.op_type)
        attrs = {n: a.value for n, a in layer.consumer_attributes.items()}
        rng = np.random.default_rng([self.seed, zlib.crc32(layer.weight.name.encode())])
        per_batch = max(1, -(-self.max_rows // len(self._frontier_o)))
        accumulator = Accumulator(paired=True, moments=False)
        for frontier_o, frontier_q in zip(self._frontier_o, self._frontier_q):
            select = position_selector(rng, per_batch)
            x_o = module.input_vectors(self._unpacked(frontier_o, tap), layer.weight_shape, attrs, select)
            x_q = module.input_vectors(self._unpacked(frontier_q, tap), layer.weight_shape, attrs, select)
            accumulator.add(x_q, x_o, np.arange(len(x_q)))
        return accumulator.result(self.max_rows)

    def values(self, value: ir.Value, reader: ir.Node, current: Mapping[str, np.ndarray]):
        """``(original, current)``: per batch, ``value`` as the node ``reader`` reads it in the
        original and in the current model; None when the walk is already past ``reader`` or
        ``value`` does not depend on the inputs. Advances the walk to ``reader``."""
        at = self.position.get(reader)
        if not self.walkable or at is None or at < self._at or value not in self._dependent:
            return None
        self._advance(at, current)
        return ([self._unpacked(f, value.name) for f in self._frontier_o],
                [self._unpacked(f, value.name) for f in self._frontier_q])

    # -- the walk -------------------------------------------------------------------------------

    def _uses(self) -> tuple[dict[ir.Value, int], set[ir.Value]]:
        """(value -> last position reading it, values that depend on a graph input)."""
        dependent = {v for v in self.graph.inputs if not v.is_initializer()}
        last_use: dict[ir.Value, int] = {}
        for i, node in enumerate(self.nodes):
            for value in node.inputs:
                if value is not None:
                    last_use[value] = i
            if any(v in dependent for v in node.inputs if v is not None):
                dependent.update(node.outputs)
        return last_use, dependent

    def _frontier(self, position: int) -> list[ir.Value]:
        """``F(position)``, in the order the values are produced."""
        before = [v for v in self.graph.inputs if not v.is_initializer()]
        before += [v for node in self.nodes[:position] for v in node.outputs]
        return [v for v in before if v in self._dependent and self._last_use.get(v, -1) >= position]

    def _advance(self, to: int, current: Mapping[str, np.ndarray]) -> None:
        if to == self._at:
            return
        if to < self._at:
            raise ValueError(f"the walk is at node {self._at}; it cannot go back to {to}")
        start = self._frontier(self._at)
        end = self._frontier(to)
        carried = set(start)
        computed = [v.name for v in end if v not in carried]
        session, feeds, weights = self._segment(start, computed) if computed else (None, [], [])
        original = {w: self.original[w] for w in weights}
        current_parts = self._parts({name: a for name, a in current.items() if name in self._values})
        now = {w: np.asarray(current_parts.get(w, self.original[w])) for w in weights}
        names = [v.name for v in end]
        held = 0
        for b in range(len(self._frontier_o)):
            if b and held > self.max_bytes * b / (b + 1):  # one more batch would not fit
                self.batches_dropped += len(self._frontier_o) - b
                del self._frontier_o[b:], self._frontier_q[b:]
                break
            for frontiers, weight_feed in ((self._frontier_o, original), (self._frontier_q, now)):
                values = frontiers[b]
                if session is not None:
                    out = session.run(computed, {**{n: self._unpacked(values, n) for n in feeds}, **weight_feed})
                    values.update((n, self._packed(n, a)) for n, a in zip(computed, out))
                frontiers[b] = {n: values[n] for n in names}
                held += sum(a.nbytes for a in frontiers[b].values())
        self._at = to
        self.segments_run += 1
        self.frontier_bytes = max(self.frontier_bytes, held)

    def _segment(self, frontier: list[ir.Value], outputs: list[str]):
        """A session computing ``outputs`` from the frontier values and the layer weights it
        reads; returns (session, frontier names it reads, weight names it reads)."""
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        clone = self.model.clone()
        graph = clone.graph
        values = values_by_name(graph)
        cut = [v.name for v in frontier if not _is_graph_input(values[v.name])]
        graph.inputs.clear()
        for name in [v.name for v in frontier]:
            if name in cut:
                dtype = ir.DataType.from_numpy(self._dtypes.get(name, self._frontier_o[0][name].dtype))
                _make_input(graph, values[name], ir.TensorType(dtype))
            else:
                graph.inputs.append(values[name])
        for name in self.original:
            if name in values and values[name].uses():
                weight = values[name]
                _make_input(graph, weight, weight.type or ir.TensorType(ir.DataType.from_numpy(self.original[name].dtype)))
        graph.outputs.clear()
        graph.outputs.extend(values_by_name(graph)[name] for name in outputs)
        RemoveUnusedNodesPass()(clone)
        used = [v for v in graph.inputs if v.uses() or v in graph.outputs]
        graph.inputs.clear()
        graph.inputs.extend(used)
        names = [v.name for v in used]
        return open_session(clone), [n for n in names if n not in self.original], [n for n in names if n in self.original]

    def _parts(self, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Weight name -> array, as the graph's values hold them (a recurrent op's W and R)."""
        return {
            value.name: part for name, array in weights.items() for value, part in weight_feeds(self._values[name], array)
        }

    def _packed(self, name: str, array: np.ndarray) -> np.ndarray:
        """How a computed value is held: float32 as float16 when every entry fits (an error of
        at most 2^-11 relative, far below any quantization's; both frontiers alike)."""
        self._dtypes[name] = array.dtype
        if self.half and array.dtype == np.float32 and array.size and float(np.abs(array).max()) < _HALF_MAX:
            return array.astype(np.float16)
        return array

    def _unpacked(self, values: Mapping[str, np.ndarray], name: str) -> np.ndarray:
        array = values[name]
        dtype = self._dtypes.get(name, array.dtype)
        return array if array.dtype == dtype else array.astype(dtype)


def _activation_index(layer: Layer) -> int:
    return 1 - layer.weight_index if layer.op_type == "MatMul" else 0


def _is_graph_input(value: ir.Value) -> bool:
    return value.is_graph_input() and not value.is_initializer()


def _make_input(graph: ir.Graph, value: ir.Value, type_: ir.TypeProtocol) -> None:
    """Replace ``value`` (a node's output, an initializer or a Constant's output) by a graph
    input of the same name, so a session reads it from its feed."""
    name = value.name
    if value.is_initializer():
        graph.initializers.pop(name)
    # The clone shares its tensors with the model, and renaming a value renames its tensor.
    value.const_value = None
    value.name = f"{name}.__walk_replaced"
    replacement = ir.Value(name=name, type=type_)
    value.replace_all_uses_with(replacement, replace_graph_outputs=True)
    graph.inputs.append(replacement)
