"""Memory-access accounting: MACs, bytes moved and roofline time per node, from the graph alone.

:func:`analyze` reads any ONNX model (compressed by onnxvq or not) and, for every node of the main
graph, counts what an accelerator described by an :class:`~onnxvq.accelerators.AcceleratorProfile`
must compute and move. It is a *simple analytic model*, not a simulator: no scheduling, no
caches, no overlap between layers beyond what the rules below say.

Rules
-----

MACs (multiply-accumulates)
    Conv: ``N * O * prod(output spatial) * (I / group) * prod(kernel)``, i.e. ``numel(Y) *
    prod(W.shape[1:])``. ConvTranspose (any rank, groups): every input element is scattered
    through its group's ``O / group`` kernels, ``N * I * prod(input spatial) * (O / group) *
    prod(kernel)``, i.e. ``numel(X) * prod(W.shape[1:])`` with W (I, O/group, k1, .., kn) (taps
    that ``pads`` crop off are computed, so counted). Gemm: ``M * N * K`` (K from A and
    ``transA``). MatMul: ``prod(batch) * M * N * K`` with numpy broadcasting, i.e. ``numel(Y) *
    K``. LSTM/GRU/RNN: ``seq * batch * D * G*H * (I + H)``, W and R applied at every step
    (element-wise gate math not counted); an embedding Gather: 0. The ``ai.onnxvq`` ops count
    the MACs of the op they stand for (their ``weight_shape`` attribute gives the weight); the
    decode gathers are table look-ups, not MACs, and are not counted. Every other op: 0 MACs
    (its traffic still counts).

Weight bytes (what a node fetches that is not an activation)
    Every input that is a constant (an initializer that is not a graph input, or a ``Constant``
    node's output) at its stored dtype and shape. Kinds: ``dense`` (the W of Conv/Gemm/MatMul, W
    and R of LSTM/GRU/RNN),
    ``codes`` (packed bytes as stored, e.g. two 4-bit codes per byte), ``codebook``, ``bias``
    (Conv's B, Gemm's C, a VQ op's bias) and ``other`` (every other constant: LayerNorm scales,
    an Add's bias, Reshape's shape, sign bits or low-rank factors of future VQ variants). A tensor
    read by several nodes is counted once per node that reads it: each node must fetch it (the
    simple model keeps nothing on chip between nodes except activations).
    ``weight_format="int8"`` counts the dense weight of every Conv/Gemm/MatMul at 1 byte per
    element (uniform 8-bit quantization), and a VQ op's encoded weight likewise as
    ``prod(weight_shape)`` bytes of ``dense``; biases and other constants are unchanged.

Activation bytes
    Non-constant inputs read and outputs written, ``numel * element size`` (``Shape`` and
    ``Size`` read no data, only metadata); shapes come from ONNX shape inference with the graph
    inputs fixed to the user's shapes, and dims stored as -1 or 0 (paddle2onnx's dynamic axes)
    taken as unknown. Where a shape depends on values computed in the graph (a Reshape target
    built from ``Shape``, ``Gather``, ``Cast``, ``Concat``...), those small computations are
    evaluated and inference runs again, until nothing more is learnt. Floating-point activations
    take the profile's ``activation_bytes`` when it is set (an int8 NPU datapath moves 1 byte per
    element whatever the model's dtype); integer tensors keep their dtype.

Aliases (ops that move no data)
    ``Identity``, ``Reshape``, ``Squeeze``, ``Unsqueeze``, ``Flatten``, ``Dropout`` in inference
    (no ``training_mode``, or a constant false one) and a ``Cast``/``CastLike`` to the type the
    input already has only relabel their input: their first output *is* the input's buffer. Such a
    node reads and writes no activation bytes (its other constant inputs, e.g. Reshape's shape,
    still count as ``other`` weights; a Dropout mask it writes counts); whoever reads the alias
    reads the original tensor, under the original's DRAM/on-chip rule, and a constant seen through
    an alias is still a weight (an ``Identity`` of an initializer feeding a Conv is its ``dense``
    weight). When an alias is a graph output, the original's producer writes it to DRAM; a graph
    input passed straight to a graph output is one DRAM copy (read + write) on the alias node.

On-chip buffer rule (``onchip_buffer_bytes = B``)
    * An activation whose bytes fit in B stays on chip between its producer and its consumers:
      0 off-chip bytes for that write and those reads. A larger one is written to and read from
      DRAM (once per reading node). Graph inputs are always read from DRAM, graph outputs always
      written to it.
    * Weights are always read from DRAM (except ROM codebooks, below).
    * A node with a constant weight (Conv/Gemm/MatMul and their VQ ops) whose weight as stored
      ``Wb`` + input activations ``Ab`` + output ``Yb`` exceed B is *tiled* with half of B per
      operand: ``n_w = ceil(Wb / (B/2))`` weight tiles, ``n_a = ceil(Ab / (B/2))`` activation
      tiles. If either is 1, that operand stays resident while the other streams once: no
      re-read. Otherwise the cheaper of weight-stationary (activations re-read ``n_w - 1`` more
      times) and activation-stationary (weights re-read ``n_a - 1`` more times) is taken:
      ``reread = min((n_w - 1) * Ab, (n_a - 1) * Wb)``, added to the node's off-chip bytes.
      Partial sums are assumed to stay on chip.

ROM (``rom_bytes > 0``)
    Codebook tensors (the ``codebook`` input of ``ai.onnxvq`` nodes) are placed in ROM in order of
    first use, each one that still fits (first fit); a codebook shared by several nodes takes its
    space once. Reads of a ROM codebook cost no DRAM traffic (VQ4ALL's universal codebook).

Time
    Per node ``time = max(MACs / macs_per_second, offchip_bytes / dram_bandwidth)`` (the roofline);
    totals are sums over nodes; a speedup is ``time(baseline) / time(this)``.

Only nodes of the main graph are counted (a control-flow node's subgraphs are not walked);
``Constant`` nodes are not rows (their outputs are counted where they are read).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir

from onnxvq import ops
from onnxvq.accelerators import AcceleratorProfile
from onnxvq.candidates import constant_tensor
from onnxvq.errors import OnnxVQError

__all__ = ["NodeTraffic", "Traffic", "WEIGHT_KINDS", "analyze", "parse_input_shape"]

WEIGHT_KINDS = ("dense", "codes", "codebook", "bias", "other")
WEIGHT_FORMATS = ("as_stored", "int8")
_MAC_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", *ops.RECURRENT}
# Ops that read only their input's shape, never its data.
_METADATA_ONLY = {"Shape", "Size"}
# Ops whose first output is always their first input relabelled (module docstring, aliases);
# Dropout and Cast/CastLike only in some cases (_moves_no_data).
_ALIAS_OPS = {"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}


@dataclasses.dataclass
class NodeTraffic:
    """One node's counts. Bytes are integers; times are seconds."""

    name: str
    op_type: str
    macs: int = 0
    weight_bytes: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(WEIGHT_KINDS, 0))
    activation_read: int = 0
    activation_written: int = 0
    offchip_weight_bytes: int = 0  # weights fetched from DRAM (ROM codebooks excluded)
    offchip_activation_bytes: int = 0  # activations that did not fit on chip, graph I/O
    reread_bytes: int = 0  # extra DRAM reads of the tiled operand
    rom_bytes: int = 0  # codebook bytes served from ROM
    compute_s: float = 0.0
    memory_s: float = 0.0

    @property
    def weight_total(self) -> int:
        return sum(self.weight_bytes.values())

    @property
    def offchip_bytes(self) -> int:
        return self.offchip_weight_bytes + self.offchip_activation_bytes + self.reread_bytes

    @property
    def time_s(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(weight_total=self.weight_total, offchip_bytes=self.offchip_bytes,
                   time_s=self.time_s, bound=self.bound)
        return out


@dataclasses.dataclass
class Traffic:
    """Per-node rows and totals of one model on one profile."""

    rows: list[NodeTraffic]
    profile: AcceleratorProfile
    weight_format: str
    input_shapes: dict[str, tuple[int, ...]]

    def total(self, field: str) -> float:
        """Sum of a row attribute (``macs``, ``offchip_bytes``, ``time_s``, ``weight_total``...)."""
        return sum(getattr(r, field) for r in self.rows)

    @property
    def totals(self) -> dict:
        weight = {k: sum(r.weight_bytes[k] for r in self.rows) for k in WEIGHT_KINDS}
        return {
            "macs": int(self.total("macs")),
            "weight_bytes": weight,
            "weight_total": sum(weight.values()),
            "activation_read": int(self.total("activation_read")),
            "activation_written": int(self.total("activation_written")),
            "offchip_weight_bytes": int(self.total("offchip_weight_bytes")),
            "offchip_activation_bytes": int(self.total("offchip_activation_bytes")),
            "reread_bytes": int(self.total("reread_bytes")),
            "rom_bytes": int(self.total("rom_bytes")),
            "offchip_bytes": int(self.total("offchip_bytes")),
            "compute_s": self.total("compute_s"),
            "memory_s": self.total("memory_s"),
            "time_s": self.total("time_s"),
        }

    def to_dict(self) -> dict:
        return {
            "profile": self.profile.to_dict(),
            "weight_format": self.weight_format,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "totals": self.totals,
            "nodes": [r.to_dict() for r in self.rows],
        }


def parse_input_shape(text: str, input_names: list[str] | None = None) -> tuple[str, tuple[int, ...]]:
    """``"name:1x3x224x224"`` -> ``("name", (1, 3, 224, 224))``; a bare ``1x3x224x224`` is the
    single input's when ``input_names`` has exactly one name."""
    name, sep, dims = text.rpartition(":")
    if not sep:
        if input_names is None or len(input_names) != 1:
            names = ", ".join(input_names or [])
            raise OnnxVQError(f"--input {text!r}: give NAME:SHAPE (the model's inputs: {names})")
        name, dims = input_names[0], text
    try:
        shape = tuple(int(d) for d in dims.lower().split("x")) if dims.strip() else ()
    except ValueError:
        shape = None
    if shape is None or any(d < 0 for d in shape) or not name:
        raise OnnxVQError(f"--input {text!r}: expected NAME:DxDx... with integer dims, e.g. image:1x3x224x224")
    return name, shape


def analyze(
    model: ir.Model,
    input_shapes: Mapping[str, tuple[int, ...]] | None,
    profile: AcceleratorProfile,
    *,
    weight_format: str = "as_stored",
) -> Traffic:
    """Count MACs and bytes of every main-graph node of ``model`` and time them on ``profile``.

    Args:
        model: any ONNX model as ``onnx_ir.Model``; never modified.
        input_shapes: concrete shapes of graph inputs, needed for every input with symbolic dims.
        profile: the accelerator.
        weight_format: ``"as_stored"``, or ``"int8"`` for the same graph with 1-byte weights.

    Raises:
        OnnxVQError: an unknown input name, or an activation whose shape stays unknown.

    See the module docstring for the rules.
    """
    if weight_format not in WEIGHT_FORMATS:
        raise OnnxVQError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    input_shapes = {k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}
    shapes = _infer_shapes(model, input_shapes)
    act_size = _activation_size(shapes, profile)
    graph = model.graph
    buffer = profile.onchip_buffer_bytes
    graph_inputs = {v.name for v in graph.inputs}
    graph_outputs = {v.name for v in graph.outputs}
    rom = _rom_codebooks(graph, profile.rom_bytes)

    aliases = _aliases(graph, shapes)

    def root(value: ir.Value) -> ir.Value:
        return aliases.get(value, value)

    # Tensors whose producer writes them to DRAM: graph outputs, also through an alias.
    output_roots = {root(v) for v in graph.outputs}

    rows: list[NodeTraffic] = []
    names_seen: dict[str, int] = {}
    for index, node in enumerate(graph):
        if node.op_type == "Constant" and node.domain == "":
            continue
        row = NodeTraffic(_row_name(node, index, names_seen), node.op_type)
        is_vq = ops.is_weight_op(node)
        mac_like = is_vq or (node.domain == "" and node.op_type in _MAC_OPS)
        alias = node.outputs[0] if node.outputs and node.outputs[0] in aliases else None
        stored_weight = 0  # the weight operand as stored, for the tiling rule
        input_act = 0
        for slot, value in enumerate(node.inputs):
            if value is None:
                continue
            source = root(value)
            tensor = constant_tensor(source)
            if alias is not None and slot == 0:
                # The output is this very buffer: nothing moves, except a graph input handed
                # straight to a graph output (a DRAM-to-DRAM copy).
                if tensor is None and source.producer() is None and alias.name in graph_outputs:
                    nbytes = act_size(source.name)
                    row.activation_read += nbytes
                    row.activation_written += nbytes
                    row.offchip_activation_bytes += 2 * nbytes
                continue
            if tensor is None:
                if node.domain == "" and node.op_type in _METADATA_ONLY:
                    continue
                nbytes = act_size(source.name)
                row.activation_read += nbytes
                input_act += nbytes
                if source.name in graph_inputs or nbytes > buffer:
                    row.offchip_activation_bytes += nbytes
                continue
            kind = _weight_kind(node, slot)
            nbytes = _nbytes(tensor)
            if mac_like and weight_format == "int8" and kind in ("dense", "codes", "codebook"):
                if kind == "dense":
                    nbytes = math.prod(tensor.shape)
                elif kind == "codes" and _input_name(node, slot) == "codes":
                    # the encoded weight becomes its dense int8 twin (sign bits included)
                    kind, nbytes = "dense", math.prod(_vq_weight_shape(node))
                else:
                    nbytes = 0
            row.weight_bytes[kind] += nbytes
            if kind == "codebook" and source in rom:
                row.rom_bytes += nbytes
                continue
            row.offchip_weight_bytes += nbytes
            if kind in ("dense", "codes", "codebook", "other") and mac_like:
                stored_weight += nbytes
        for value in node.outputs:
            if value is None or not value.name or value is alias:
                continue
            nbytes = act_size(value.name)
            row.activation_written += nbytes
            if value in output_roots or nbytes > buffer:
                row.offchip_activation_bytes += nbytes
        if mac_like:
            row.macs = _macs(node, shapes)
            if stored_weight and stored_weight + input_act + row.activation_written > buffer:
                row.reread_bytes = _reread(stored_weight, input_act, buffer)
        row.compute_s = row.macs / profile.macs_per_second
        row.memory_s = row.offchip_bytes / profile.dram_bandwidth
        rows.append(row)
    return Traffic(rows, profile, weight_format, input_shapes)


def _reread(weight: int, activation: int, buffer: int) -> int:
    """Extra DRAM bytes of the tiled operand (module docstring, on-chip buffer rule)."""
    half = max(buffer // 2, 1)
    n_w = math.ceil(weight / half)
    n_a = math.ceil(activation / half)
    if n_w <= 1 or n_a <= 1:
        return 0
    return min((n_w - 1) * activation, (n_a - 1) * weight)


def _row_name(node: ir.Node, index: int, seen: dict[str, int]) -> str:
    name = node.name or f"{node.op_type}_{index}"
    seen[name] = seen.get(name, 0) + 1
    return name if seen[name] == 1 else f"{name}#{seen[name]}"


def _nbytes(tensor: ir.TensorProtocol) -> int:
    return math.ceil(math.prod(tensor.shape) * tensor.dtype.bitwidth / 8)


def _weight_kind(node: ir.Node, slot: int) -> str:
    if node.domain == ops.DOMAIN:
        # Low-rank projections and per-channel scales are small per-layer tables read with the
        # codebook; sign bits are per-weight data streamed like the codes; B/C are the biases.
        kinds = {"codes": "codes", "codebook": "codebook", "projection": "codebook", "scales": "codebook",
                 "signs": "codes", "B": "bias", "C": "bias"}
        return kinds.get(_input_name(node, slot), "other")
    if node.domain == "" and node.op_type == "Gather" and slot == 0:  # an embedding table
        return "dense"
    if node.domain == "" and node.op_type in _MAC_OPS:
        if node.op_type == "MatMul" or slot < 2 or (node.op_type in ops.RECURRENT and slot == 2):
            return "dense"
        return "bias" if slot < 4 else "other"
    return "other"


def _input_name(node: ir.Node, slot: int) -> str:
    """The declared name of a VQ node's input ``slot`` ("" when unknown)."""
    if node.domain != ops.DOMAIN or not _is_vq_op(node):
        return ""
    names = ops.input_names(node.op_type, node.overload)
    return names[slot] if slot < len(names) else ""


def _is_vq_op(node: ir.Node) -> bool:
    try:
        ops.op_module(node.op_type)
        return True
    except KeyError:
        return False


def _vq_weight_shape(node: ir.Node) -> tuple[int, ...]:
    return tuple(int(s) for s in node.attributes["weight_shape"].as_tensor().numpy().reshape(-1))


def _macs(node: ir.Node, shapes: dict) -> int:
    consumer = ops.op_module(node.op_type).CONSUMER if node.domain == ops.DOMAIN and _is_vq_op(node) else node.op_type
    if consumer in ops.RECURRENT:
        return _recurrent_macs(node, shapes)
    if consumer == "Gather":  # a table lookup
        return 0
    out = node.outputs[0].name
    numel_out = math.prod(shapes[out][0])
    op = node.op_type
    if node.domain == ops.DOMAIN:
        if not _is_vq_op(node):
            return 0
        op = ops.op_module(node.op_type).CONSUMER
        weight_shape = _vq_weight_shape(node)
    else:
        weight_shape = None
    first = _shape_of(node.inputs[0], shapes) if node.inputs[0] is not None else None
    attrs = node.attributes
    if op in ("Conv", "ConvTranspose"):
        if weight_shape is None:
            weight_shape = _shape_of(node.inputs[1], shapes)
        # Conv: each output element is one kernel's dot product; ConvTranspose: each input
        # element is scattered through one group's O/g kernels (both prod(W.shape[1:]) MACs).
        numel = numel_out if op == "Conv" else math.prod(first)
        return numel * math.prod(weight_shape[1:])
    if op == "Gemm":
        trans_a = attrs["transA"].as_int() if "transA" in attrs else 0
        return numel_out * int(first[0] if trans_a else first[-1])
    # MatMul: K is the last dim of the left operand (its only dim when 1-D)
    if weight_shape is not None:
        left_is_weight = "weight_left" in attrs and attrs["weight_left"].as_int()
        left = weight_shape if left_is_weight else first
    else:
        left = first
    return numel_out * int(left[-1])


def _recurrent_macs(node: ir.Node, shapes: dict) -> int:
    """LSTM/GRU/RNN: every step of every sequence multiplies ``[x_t; h_{t-1}]`` by each
    direction's gate rows: seq x batch x D x G*H x (I + H) (the joined weight's size)."""
    first = _shape_of(node.inputs[0], shapes)
    if node.domain == ops.DOMAIN:
        weight_size = math.prod(_vq_weight_shape(node))
    else:
        weight_size = sum(math.prod(_shape_of(node.inputs[i], shapes)) for i in (1, 2))
    return math.prod(first[:2]) * weight_size


def _shape_of(value: ir.Value, shapes: dict) -> tuple[int, ...]:
    """The shape of ``value`` itself: a constant's, else the inferred one (never an alias's source)."""
    tensor = constant_tensor(value)
    if tensor is not None:
        return tuple(int(s) for s in tensor.shape)
    return shapes[value.name][0]


def _aliases(graph: ir.Graph, shapes: dict) -> dict[ir.Value, ir.Value]:
    """alias output -> the tensor it is (chains resolved), for nodes that move no data."""
    out: dict[ir.Value, ir.Value] = {}
    for node in graph:  # topological order: a chain's source is resolved before its alias
        if node.domain != "" or not node.inputs or node.inputs[0] is None or not node.outputs:
            continue
        if node.outputs[0] is None or not _moves_no_data(node, shapes):
            continue
        source = node.inputs[0]
        out[node.outputs[0]] = out.get(source, source)
    return out


def _moves_no_data(node: ir.Node, shapes: dict) -> bool:
    """Whether ``node``'s first output is its first input relabelled (module docstring, aliases)."""
    op = node.op_type
    if op in _ALIAS_OPS:
        return True
    if op == "Dropout":
        # Inference unless training_mode (opset >= 12) is given and not a constant false.
        mode = node.inputs[2] if len(node.inputs) > 2 else None
        if mode is None:
            return True
        tensor = constant_tensor(mode)
        return tensor is not None and not tensor.numpy().reshape(-1).any()
    if op == "Cast" and "to" in node.attributes:
        return _elem_type(node.inputs[0], shapes) == node.attributes["to"].as_int()
    if op == "CastLike" and len(node.inputs) > 1 and node.inputs[1] is not None:
        source = _elem_type(node.inputs[0], shapes)
        return source is not None and source == _elem_type(node.inputs[1], shapes)
    return False


def _elem_type(value: ir.Value, shapes: dict) -> int | None:
    """ONNX element type of ``value`` (from inference, else its declared or constant type)."""
    if value.name in shapes:
        return shapes[value.name][1]
    tensor = constant_tensor(value)
    dtype = tensor.dtype if tensor is not None else value.dtype
    return int(dtype) if dtype is not None else None


# ---------------------------------------------------------------------------------------------
# shapes


def _infer_shapes(model: ir.Model, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple]:
    """name -> (shape, onnx elem type) of every activation of the main graph; see :func:`analyze`."""
    proto = ir.serde.serialize_model(model)
    _fix_inputs(proto, input_shapes)
    shapes = _shapes_of(proto)
    missing = _unknown_activations(model, shapes)
    if missing and any(n.domain == ops.DOMAIN for n in model.graph):
        # Activation shapes of a compressed model equal those of its decompressed twin (same
        # value names), which plain shape inference always understands.
        from onnxvq.api import decompress

        twin = ir.serde.serialize_model(decompress(model))
        _fix_inputs(twin, input_shapes)
        shapes.update({k: v for k, v in _shapes_of(twin).items() if k not in shapes})
        missing = _unknown_activations(model, shapes)
    if missing:
        raise OnnxVQError(
            f"the shape of {missing[0]!r} is unknown after shape inference; pass the graph input "
            "shapes with --input NAME:SHAPE (e.g. --input image:1x3x224x224)"
        )
    return shapes


def _shapes_of(proto: onnx.ModelProto) -> dict[str, tuple]:
    """Shape inference, then again after folding the small shape computations it could not
    follow (e.g. paddle2onnx's ``Shape -> Cast -> Slice -> Cast -> Concat -> Reshape``), for as
    long as a round folds something (a folded Reshape gives the shape the next ``Shape`` reads)."""
    _forget_unknown_dims(proto)
    shapes = _run_inference(proto)
    produced = {name for node in proto.graph.node if node.op_type != "Constant" for name in node.output if name}
    while not produced <= shapes.keys():
        values = _fold_shape_computations(proto, shapes)
        if not values:
            break
        for name, array in values.items():
            shapes.setdefault(name, (array.shape, onnx.helper.np_dtype_to_tensor_dtype(array.dtype)))
        shapes.update({k: v for k, v in _run_inference(proto).items() if k not in shapes})
    return shapes


def _forget_unknown_dims(proto: onnx.ModelProto) -> None:
    """Declared dims of -1 or 0 (paddle2onnx writes them for dynamic axes) become unknown, so that
    inference neither trusts nor fights them."""
    graph = proto.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = info.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value") and not _fixed(dim):
                dim.Clear()


# Shape computations are small: values of at most this many elements are folded.
_FOLD_LIMIT = 1 << 12
_NOT_FOLDED = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def _fold_shape_computations(proto: onnx.ModelProto, shapes: dict) -> dict[str, np.ndarray]:
    """Replace in ``proto`` every node whose outputs are small values computable from constants
    and known shapes by initializers holding those values; return them (empty: none found).

    Evaluated with ``onnx.reference`` one node at a time, at the model's opsets; the input shapes
    were fixed by the caller, so ``Shape`` outputs are plain constants.
    """
    from onnx.reference import ReferenceEvaluator

    graph = proto.graph
    opset_imports = list(proto.opset_import)
    overridable = {i.name for i in graph.input}
    known: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        external = init.data_location == onnx.TensorProto.EXTERNAL
        if init.name not in overridable and not external and math.prod(init.dims) <= _FOLD_LIMIT:
            known[init.name] = onnx.numpy_helper.to_array(init)
    folded: dict[str, np.ndarray] = {}
    kept = []
    for node in graph.node:
        kept.append(node)
        if node.domain != "" or node.op_type in _NOT_FOLDED:
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        names = [i for i in node.input if i]
        if node.op_type in _METADATA_ONLY and names and names[0] in shapes:
            # Only the shape is read: a zero-stride view of one byte stands for the tensor.
            shape = shapes[names[0]][0]
            feeds = {names[0]: np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), shape, [0] * len(shape))}
        elif all(i in known for i in names) and sum(known[i].size for i in names) <= _FOLD_LIMIT:
            feeds = {i: known[i] for i in names}
        else:
            continue
        # A function pins the model's opset (a bare node would run at the newest one).
        function = onnx.helper.make_function("onnxvq.fold", "fold", names, node.output, [node], opset_imports)
        try:
            results = ReferenceEvaluator(function).run(None, feeds, attributes={})
        except Exception:  # an op onnx.reference lacks or refuses: leave the node to inference
            continue
        outputs = {name: np.asarray(r) for name, r in zip(node.output, results) if name}
        if not outputs or any(r.size > _FOLD_LIMIT or r.dtype == object for r in outputs.values()):
            continue
        known.update(outputs)
        if node.op_type != "Constant":
            folded.update(outputs)
            kept.pop()
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
        graph.initializer.extend(onnx.numpy_helper.from_array(v, n) for n, v in folded.items())
    return folded


def _fix_inputs(proto: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> None:
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    names = [i.name for i in inputs]
    for name in input_shapes:
        if name not in names:
            raise OnnxVQError(f"--input {name!r}: the model has no such input; its inputs: {', '.join(names)}")
    for value in inputs:
        tensor_type = value.type.tensor_type
        dims = tensor_type.shape.dim
        if value.name in input_shapes:
            given = input_shapes[value.name]
            if tensor_type.HasField("shape") and len(dims) != len(given):
                raise OnnxVQError(
                    f"--input {value.name}: shape {_text(given)} has rank {len(given)}, "
                    f"the model's input has rank {len(dims)}"
                )
            for dim, size in zip(dims, given):
                if _fixed(dim) and dim.dim_value != size:
                    raise OnnxVQError(
                        f"--input {value.name}: dim {size} conflicts with the model's fixed dim {dim.dim_value}"
                    )
            tensor_type.shape.ClearField("dim")
            for size in given:
                tensor_type.shape.dim.add().dim_value = size
        elif not tensor_type.HasField("shape") or not all(map(_fixed, dims)):
            shown = "x".join(str(d.dim_value) if _fixed(d) else d.dim_param or "?" for d in dims)
            # Suggest the model's own fixed dims with 1 for each unknown one (a batch of one).
            example = "x".join(str(d.dim_value) if _fixed(d) else "1" for d in dims) or "1x3x224x224"
            raise OnnxVQError(
                f"graph input {value.name!r} has an unknown shape ({shown or 'no shape'}); "
                f"pass --input {value.name}:SHAPE, e.g. --input {value.name}:{example}"
            )


def _fixed(dim: onnx.TensorShapeProto.Dimension) -> bool:
    """A dimension of known size: exporters write -1 or 0 for dynamic ones (paddle2onnx does)."""
    return dim.HasField("dim_value") and dim.dim_value > 0


def _run_inference(proto: onnx.ModelProto) -> dict[str, tuple]:
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except Exception as e:  # strict mode raises InferenceError, ValidationError, ...
        raise OnnxVQError(f"shape inference failed: {str(e).strip().splitlines()[0]}") from None
    shapes = {}
    graph = inferred.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = info.type.tensor_type
        if not tensor_type.HasField("shape") or not tensor_type.elem_type:
            continue
        dims = tensor_type.shape.dim
        if all(map(_fixed, dims)):
            shapes[info.name] = (tuple(int(d.dim_value) for d in dims), int(tensor_type.elem_type))
    return shapes


def _unknown_activations(model: ir.Model, shapes: dict) -> list[str]:
    missing = []
    for node in model.graph:
        if node.op_type == "Constant" and node.domain == "":
            continue
        for value in [*node.inputs, *node.outputs]:
            if value is None or not value.name or value.name in shapes or constant_tensor(value) is not None:
                continue
            if value.name not in missing:
                missing.append(value.name)
    return missing


def _activation_size(shapes: dict, profile: AcceleratorProfile):
    def size(name: str) -> int:
        shape, elem = shapes[name]
        dtype = ir.DataType(elem)
        if profile.activation_bytes is not None and dtype.is_floating_point():
            bits = profile.activation_bytes * 8
        else:
            bits = dtype.bitwidth
        return math.ceil(math.prod(shape) * bits / 8)

    return size


def _rom_codebooks(graph: ir.Graph, rom_bytes: int) -> set[ir.Value]:
    """Codebook values placed in ROM: first use order, first fit."""
    placed: set[ir.Value] = set()
    free = rom_bytes
    if free <= 0:
        return placed
    for node in graph:
        if node.domain != ops.DOMAIN:
            continue
        for slot, value in enumerate(node.inputs):
            if value is None or value in placed or _weight_kind(node, slot) != "codebook":
                continue
            tensor = constant_tensor(value)
            if tensor is not None and _nbytes(tensor) <= free:
                placed.add(value)
                free -= _nbytes(tensor)
    return placed


def _text(shape) -> str:
    return "x".join(map(str, shape))
