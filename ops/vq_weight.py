"""The VQ-encoded weight: what every ``ai.onnxvq`` op has in common.

Math (plain product quantization): with codes ``Q`` (rows x n_sub, unpacked as in
``onnxvq.ops.codes``) and codebook ``C`` (k x d),

    S[r, j, :] = C[Q[r, j], :]                      (rows, n_sub, d)
    M = S.reshape(rows, n_sub * d)[:, :cols]        cols = prod(weight_shape) / rows
    W = M.reshape(weight_shape)                                       (not transposed)
    W = swapaxes(M.reshape(swap_last_two(weight_shape)), -1, -2)      (transposed)

cast to ``weight_dtype`` (the layout is ``onnxvq.layout``). Optional encoded inputs change the
decode, each present only in the variants that name it (:data:`EXTRA_INPUTS`, in this order
between ``codebook`` and the bias):

* ``projection`` (rank x d; low-rank ``lr2vq``): the codebook holds k x rank coordinates and the
  codewords are ``C @ projection``, computed once per decode (k x rank x d multiply-adds) before
  the gather, so a low-rank weight costs no more per inference than plain PQ;
* ``signs`` (rows x ceil(cols / 8) uint8; sign-split ``ssvq``): ``M = M * unpack(signs)``, one
  sign bit per weight, packed and gathered as in ``onnxvq.ops.signs``;
* ``scales`` (rows, float; per-output-channel scales, any method): ``M = M * scales[:, None]``,
  applied last, so the codebook is shared by rows of very different magnitudes (BN-folded
  convolutions) and each row keeps its own.

:func:`decode_weight` is the single numpy definition; :func:`decode_body` emits the same
computation in standard ONNX ops for the function bodies, and tests hold the two equal.

Attributes every VQ op carries:

* ``weight_shape`` (tensor, int64 1-D): the dense weight's shape as the original consumer read it;
* ``weight_dtype`` (int): ONNX element type of the dense weight (``TensorProto.FLOAT``, ...);
* ``code_bits`` (int): 4, 8 or 16, how codes are packed (``onnxvq.ops.codes``);
* ``method`` (string): the method that produced the encoding (``"pq"``, ...), informational;
* ``extra_inputs`` (string): which of :data:`EXTRA_INPUTS` follow ``codebook``, comma-separated in
  that order (``""``: none). The function overload says the same, but a kernel of the native
  library sees only attributes and inputs, and a present extra cannot always be told apart from
  the consumer's optional inputs (``scales`` and a Conv bias are both one float per output).
  Nodes written before it existed lack it; bodies never read it.

Structure that differs between nodes (code packing, extra inputs, padding, transposition, operand
side) is selected by the node's function *overload*, a pure function of the attributes, the tensor
shapes and which extra inputs are present (:class:`Variant`), so each overload's body is
straight-line standard ops.

Body facts (onnxruntime 1.31, DESIGN.md): ``Gather`` takes only int32/int64 indices, so codes are
cast first; 4-bit codes decode fastest through a "pair codebook" (256 rows of two codewords,
gathered by byte); the codebook is cast to the weight dtype *before* the gather (k x d values
rather than the whole weight). Only ops whose signature is stable from opset 11 to the newest are
used (no Unsqueeze, no Constant ``value_ints``), so bodies work in any model of opset >= 11
(in ``onnx.reference`` once inlined: ``onnxvq.ops.inline_bodies`` says why).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
import onnx.parser

from onnxvq.layout import matrix_to_weight, subvectors_to_matrix
from onnxvq.ops.codes import unpack_codes
from onnxvq.ops.signs import unpack_signs

__all__ = [
    "DOMAIN",
    "EXTRA_INPUTS",
    "MIN_OPSET",
    "VERSION",
    "VQ_ATTRIBUTES",
    "Variant",
    "attribute_refs",
    "codebook_lines",
    "decode_body",
    "decode_weight",
    "gather_codewords_lines",
    "encoded_inputs",
    "make_function",
    "node_variant",
    "np_dtype",
    "run_standard_op",
    "sign_table_lines",
    "split_extras",
    "split_inputs",
    "weight_from_attributes",
]

DOMAIN = "ai.onnxvq"
VERSION = 1
VQ_ATTRIBUTES = ("weight_shape", "weight_dtype", "code_bits", "method", "extra_inputs")
MIN_OPSET = 11
# Optional encoded inputs, in their node order, with their overload tokens.
EXTRA_INPUTS = ("projection", "signs", "scales")
_EXTRA_TOKENS = {"projection": "lr", "signs": "sg", "scales": "sc"}


@dataclasses.dataclass(frozen=True)
class Variant:
    """The structural variant of a VQ node; its ``overload`` names the function body.

    ``padded``: decoded rows are longer than ``cols`` (d does not divide a row, or an odd count of
    4-bit codes), so the body slices. ``transposed_rank``: 0, or the weight's rank when the layout
    is transposed. ``weight_left``: MatMul only, the weight is the left operand. ``extras``: which
    of :data:`EXTRA_INPUTS` the node has (they follow ``codebook`` in that order).
    """

    code_bits: int
    padded: bool
    transposed_rank: int
    weight_left: bool = False
    extras: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if tuple(e for e in EXTRA_INPUTS if e in self.extras) != tuple(self.extras):
            raise ValueError(f"extras {self.extras!r} must be a sub-sequence of {EXTRA_INPUTS}")

    @property
    def overload(self) -> str:
        parts = [f"{self.code_bits}b"]
        parts += [_EXTRA_TOKENS[e] for e in self.extras]
        if self.padded:
            parts.append("pad")
        if self.transposed_rank:
            parts.append(f"t{self.transposed_rank}")
        if self.weight_left:
            parts.append("left")
        return ".".join(parts)

    @classmethod
    def from_overload(cls, overload: str) -> "Variant":
        """Inverse of :attr:`overload`."""
        parts = overload.split(".")
        if not parts[0].endswith("b"):
            raise ValueError(f"not a VQ overload: {overload!r}")
        rank = next((int(p[1:]) for p in parts[1:] if p.startswith("t")), 0)
        extras = tuple(e for e in EXTRA_INPUTS if _EXTRA_TOKENS[e] in parts)
        return cls(int(parts[0][:-1]), "pad" in parts, rank, "left" in parts, extras)

    @classmethod
    def of(
        cls,
        *,
        code_bits: int,
        codes_shape,
        d: int,
        weight_shape,
        transposed: bool,
        weight_left: bool = False,
        extras=(),
    ) -> "Variant":
        """``d`` is the length of a decoded codeword (the projection's width when low-rank)."""
        rows = int(codes_shape[0])
        per_row = int(codes_shape[1]) * (2 if code_bits == 4 else 1)
        cols = math.prod(int(s) for s in weight_shape) // rows
        return cls(
            code_bits=int(code_bits),
            padded=per_row * d != cols,
            transposed_rank=len(weight_shape) if transposed else 0,
            weight_left=weight_left,
            extras=tuple(e for e in EXTRA_INPUTS if e in tuple(extras)),
        )


def node_variant(overload: str) -> Variant:
    """The variant of a node's overload; a node without one has the plain inputs (no extras)."""
    return Variant.from_overload(overload) if overload else Variant(8, False, 0)


def encoded_inputs(variant: Variant) -> list[str]:
    """Names of the encoded inputs of a node of ``variant``, in node order."""
    return ["codes", "codebook", *variant.extras]


def np_dtype(onnx_dtype: int) -> np.dtype:
    """Numpy dtype of an ONNX element type (bfloat16 through ml_dtypes, as onnx does)."""
    return onnx.helper.tensor_dtype_to_np_dtype(int(onnx_dtype))


def decode_weight(
    codes: np.ndarray,
    codebook: np.ndarray,
    *,
    weight_shape,
    weight_dtype: int,
    code_bits: int,
    transposed: bool,
    projection: np.ndarray | None = None,
    signs: np.ndarray | None = None,
    scales: np.ndarray | None = None,
) -> np.ndarray:
    """The dense weight a VQ node stands for (the numpy definition; see module docstring)."""
    weight_shape = tuple(int(s) for s in np.asarray(weight_shape).reshape(-1))
    index = unpack_codes(codes, int(code_bits))
    rows = index.shape[0]
    cols = math.prod(weight_shape) // rows
    codewords = codebook.astype(np.float32)
    if projection is not None:
        codewords = codewords @ projection.astype(np.float32)
    gathered = codewords[index]  # (rows, n, d)
    matrix = subvectors_to_matrix(gathered.reshape(rows, -1), cols)
    if signs is not None:
        matrix = matrix * unpack_signs(signs, cols)
    if scales is not None:
        matrix = matrix * scales.astype(np.float32).reshape(rows, 1)
    weight = matrix_to_weight(matrix, weight_shape, transposed)
    return np.ascontiguousarray(weight).astype(np_dtype(weight_dtype))


def decode_body(variant: Variant) -> list[str]:
    """ONNX text-format statements that compute ``w`` from the encoded inputs."""
    lines = codebook_lines(variant) + [
        "idx = Cast <to = 7> (codes)",
        "zero = Constant <value = int64[1] {0}> ()",
        "one = Constant <value = int64[1] {1}> ()",
    ]
    lines += gather_codewords_lines(variant, "idx", "gathered")
    lines += [
        "rows_by_rest = Constant <value = int64[2] {0, -1}> ()",
        "flat = Reshape (gathered, rows_by_rest)",
        "wshape = Constant <value: tensor = @weight_shape> ()",
    ]
    signed = "signs" in variant.extras
    if variant.padded or signed:
        lines += [
            "numel = ReduceProd <keepdims = 1> (wshape)",
            "codes_shape = Shape (codes)",
            "rows = Gather <axis = 0> (codes_shape, zero)",
            "cols = Div (numel, rows)",
        ]
    if variant.padded:
        lines.append("matrix = Slice (flat, zero, cols, one)")
    matrix = "matrix" if variant.padded else "flat"
    if signed:
        lines += sign_table_lines() + [
            "sign_idx = Cast <to = 7> (signs)",
            "sign_bytes = Gather <axis = 0> (sign_table_w, sign_idx)",
            "sign_flat = Reshape (sign_bytes, rows_by_rest)",
            "sign_matrix = Slice (sign_flat, zero, cols, one)",
            f"signed = Mul ({matrix}, sign_matrix)",
        ]
        matrix = "signed"
    if "scales" in variant.extras:
        lines += [
            "row_scales = Cast <to: int = @weight_dtype> (scales)",
            "column = Constant <value = int64[2] {-1, 1}> ()",
            "row_scales_column = Reshape (row_scales, column)",
            f"scaled = Mul ({matrix}, row_scales_column)",
        ]
        matrix = "scaled"
    rank = variant.transposed_rank
    if rank:
        perm = list(range(rank - 2)) + [rank - 1, rank - 2]
        perm_text = ", ".join(map(str, perm))
        lines += [
            f"swap = Constant <value = int64[{rank}] {{{perm_text}}}> ()",
            "layout_shape = Gather <axis = 0> (wshape, swap)",
            f"layout = Reshape ({matrix}, layout_shape)",
            f"w = Transpose <perm = [{perm_text}]> (layout)",
        ]
    else:
        lines.append(f"w = Reshape ({matrix}, wshape)")
    return lines


def codebook_lines(variant: Variant) -> list[str]:
    """Statements computing ``cb``, the codewords at the weight dtype (``codebook @ projection``
    for a low-rank variant)."""
    if "projection" in variant.extras:
        return [
            "cb_coords = Cast <to: int = @weight_dtype> (codebook)",
            "proj = Cast <to: int = @weight_dtype> (projection)",
            "cb = MatMul (cb_coords, proj)",
        ]
    return ["cb = Cast <to: int = @weight_dtype> (codebook)"]


def gather_codewords_lines(variant: Variant, index: str, out: str) -> list[str]:
    """Statements gathering the codewords of int64 stored codes ``index`` (any shape) into
    ``out`` (``index.shape + [d]``, or ``+ [2d]`` for 4-bit codes: a byte holds two codes). Needs
    ``cb`` and ``zero``."""
    if variant.code_bits != 4:
        return [f"{out} = Gather <axis = 0> (cb, {index})"]
    low = ", ".join(str(i % 16) for i in range(256))
    high = ", ".join(str(i // 16) for i in range(256))
    return [
        # Pair codebook: row b = [C[b & 15], C[b >> 4]]; indices are taken mod k so that a
        # codebook with fewer than 16 rows still yields a full 256-row table.
        "cb_shape = Shape (cb)",
        "k = Gather <axis = 0> (cb_shape, zero)",
        f"low_nibble = Constant <value = int64[256] {{{low}}}> ()",
        f"high_nibble = Constant <value = int64[256] {{{high}}}> ()",
        "low_k = Mod (low_nibble, k)",
        "high_k = Mod (high_nibble, k)",
        "cb_low = Gather <axis = 0> (cb, low_k)",
        "cb_high = Gather <axis = 0> (cb, high_k)",
        "pairs = Concat <axis = 1> (cb_low, cb_high)",
        f"{out} = Gather <axis = 0> (pairs, {index})",
    ]


def sign_table_lines() -> list[str]:
    """Statements computing ``sign_table_w`` (256 x 8, the weight dtype): row ``b`` holds the
    +-1 of the 8 bits of byte ``b``, least significant first."""
    byte_values = ", ".join(str(b) for b in range(256))
    return [
        # One Gather of a 256 x 8 table of +-1 per sign byte (DESIGN.md: the fastest
        # standard-op decode of packed bits), then the row padding is dropped. The table,
        # 1 - 2 * (floor(b / 2^j) mod 2), is computed from 256 bytes rather than stored as
        # 2048 floats: 8 kB per function body would weigh on small models (constant folding
        # removes the computation).
        f"bytes_u8 = Constant <value = uint8[256, 1] {{{byte_values}}}> ()",
        "bytes_f = Cast <to = 1> (bytes_u8)",
        "bit_weights = Constant <value = float[1, 8] {1, 2, 4, 8, 16, 32, 64, 128}> ()",
        "shifted = Div (bytes_f, bit_weights)",
        "floored = Floor (shifted)",
        "two = Constant <value = float[1] {2}> ()",
        "bits = Mod <fmod = 1> (floored, two)",
        "minus_two = Constant <value = float[1] {-2}> ()",
        "plus_one = Constant <value = float[1] {1}> ()",
        "scaled_bits = Mul (bits, minus_two)",
        "sign_table = Add (scaled_bits, plus_one)",
        "sign_table_w = Cast <to: int = @weight_dtype> (sign_table)",
    ]


def make_function(
    *,
    op_type: str,
    variant: Variant,
    opset: int,
    inputs: list[str],
    attributes: list[str],
    consumer: str,
    outputs=("Y",),
    decode: bool = True,
) -> onnx.FunctionProto:
    """The model-local function of ``op_type`` for ``variant``: decode ``w``, then ``consumer``.

    ``consumer`` is the final statement(s) in ONNX text format, computing ``outputs`` from ``w``;
    ``attributes`` lists the op's own attributes (the VQ ones are added). ``decode=False``: the
    consumer decodes what it needs itself (``VQGather`` decodes only the rows it reads).
    """
    if opset < MIN_OPSET:
        raise ValueError(f"VQ function bodies need opset >= {MIN_OPSET}, got {opset}")
    attributes = [*attributes, *VQ_ATTRIBUTES]
    body = (decode_body(variant) if decode else []) + [consumer]
    text = (
        f'<domain: "{DOMAIN}", opset_import: ["" : {opset}]>\n'
        f"{op_type} <{', '.join(attributes)}> ({', '.join(inputs)}) => ({', '.join(outputs)}) {{\n  "
        + "\n  ".join(body)
        + "\n}"
    )
    function = onnx.parser.parse_function(text)
    function.overload = variant.overload
    return function


def attribute_refs(names, types: dict[str, str], default: str) -> str:
    """The attribute references of a body's consumer node, ``"a: type = @a, ..."``: each of the
    op's own attributes passed through as the node has it (``types``: name -> text-format type)."""
    return ", ".join(f"{a}: {types.get(a, default)} = @{a}" for a in names)


def run_standard_op(op_type: str, inputs: list, attributes: dict, n_outputs: int, opset: int) -> list:
    """One standard op in ``onnx.reference`` (a one-node model: its kernels are not public API);
    ``inputs`` holds an array or None (an omitted optional input) per slot."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" if a is not None else "" for i, a in enumerate(inputs)]
    while names and names[-1] == "":
        names.pop()
    feeds = {n: a for n, a in zip(names, inputs) if n}
    outputs = [f"out{i}" for i in range(n_outputs)]
    infos = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), None) for n, a in feeds.items()]
    graph = helper.make_graph([helper.make_node(op_type, names, outputs, **attributes)], "reference", infos,
                              [helper.make_tensor_value_info(o, 0, None) for o in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ReferenceEvaluator(model).run(None, feeds)


def weight_from_attributes(
    codes: np.ndarray, codebook: np.ndarray, attributes: dict, *, transposed: bool, **extras
) -> np.ndarray:
    """:func:`decode_weight` fed from a node's attribute values (as ``onnx.reference`` gives them)
    and its extra encoded inputs by name."""
    return decode_weight(
        codes,
        codebook,
        weight_shape=attributes["weight_shape"],
        weight_dtype=attributes.get("weight_dtype", onnx.TensorProto.FLOAT),
        code_bits=attributes["code_bits"],
        transposed=transposed,
        **extras,
    )


def split_extras(named: dict) -> tuple[dict, dict]:
    """Keyword arguments of an op module's ``decode``: ({extra input: tensor}, {attribute: value})."""
    extras = {name: value for name, value in named.items() if name in EXTRA_INPUTS}
    return extras, {name: value for name, value in named.items() if name not in EXTRA_INPUTS}


def split_inputs(overload: str, tensors) -> tuple[dict, list]:
    """The tensors after ``codebook`` of a node of ``overload``: ({extra name: tensor}, rest)."""
    variant = node_variant(overload)
    n = len(variant.extras)
    return dict(zip(variant.extras, tensors[:n])), list(tensors[n:])
