"""VQGather: ``Gather`` (axis 0) of a VQ-encoded table, an embedding lookup.

Math: ``Y = T[indices]`` (``Gather`` on axis 0, negative indices counting from the end), where
the table ``T`` (V, D) is rebuilt by ``onnxvq.ops.vq_weight.decode_weight`` with one row per
table row (never transposed). The body decodes only the requested rows: it gathers their codes
(and sign bytes, and scales), then their codewords, so a lookup costs what the batch reads,
not the table: for each index ``i``,

    Y[i] = (concat_j C[codes[i, j]])[:D] * signs[i] * scales[i]

Inputs: ``indices`` (int32 or int64, any shape), ``codes``, ``codebook``, the variant's extras
(``projection``, ``signs``, ``scales``). Attributes: ``axis`` (0, as the original's), plus
``weight_shape``, ``weight_dtype``, ``code_bits``, ``method``.
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from onnxvq.ops import vq_weight

__all__ = ["CASES", "CONSUMER", "OP_TYPE", "VQGather", "decode", "function", "input_names", "weight_view"]

OP_TYPE = "VQGather"
CONSUMER = "Gather"
CONSUMER_ATTRIBUTES = ("axis",)


def is_transposed(attributes: dict) -> bool:
    return False


def weight_view(weight_shape, attributes: dict) -> tuple[bool, int]:
    """(transposed, row_axes): a row of the table is a row of the layout."""
    return False, 1


def input_names(variant: vq_weight.Variant) -> list[str]:
    return ["indices", *vq_weight.encoded_inputs(variant)]


def decode(codes: np.ndarray, codebook: np.ndarray, **named) -> np.ndarray:
    """The dense table this node stands for."""
    extras, attributes = vq_weight.split_extras(named)
    return vq_weight.weight_from_attributes(codes, codebook, attributes, transposed=False, **extras)


def function(variant: vq_weight.Variant, opset: int):
    lines = vq_weight.codebook_lines(variant) + [
        "zero = Constant <value = int64[1] {0}> ()",
        "one = Constant <value = int64[1] {1}> ()",
        "last = Constant <value = int64[1] {-1}> ()",
        "wshape = Constant <value: tensor = @weight_shape> ()",
        "cols = Gather <axis = 0> (wshape, one)",
        # Gather's negative indices count from the end; Gather on the codes does the same.
        "at = Cast <to = 7> (indices)",
        "row_codes = Gather <axis = 0> (codes, at)",
        "idx = Cast <to = 7> (row_codes)",
    ]
    lines += vq_weight.gather_codewords_lines(variant, "idx", "gathered")
    lines += [
        "index_shape = Shape (at)",
        "out_shape = Concat <axis = 0> (index_shape, last)",
        "flat = Reshape (gathered, out_shape)",
    ]
    rows = "flat"
    if variant.padded:
        lines.append("trimmed = Slice (flat, zero, cols, last)")
        rows = "trimmed"
    if "signs" in variant.extras:
        lines += vq_weight.sign_table_lines() + [
            "row_signs = Gather <axis = 0> (signs, at)",
            "sign_idx = Cast <to = 7> (row_signs)",
            "sign_bytes = Gather <axis = 0> (sign_table_w, sign_idx)",
            "sign_flat = Reshape (sign_bytes, out_shape)",
            "sign_rows = Slice (sign_flat, zero, cols, last)",
            f"signed = Mul ({rows}, sign_rows)",
        ]
        rows = "signed"
    if "scales" in variant.extras:
        lines += [
            "all_scales = Cast <to: int = @weight_dtype> (scales)",
            "picked_scales = Gather <axis = 0> (all_scales, at)",
            "scale_shape = Concat <axis = 0> (index_shape, one)",
            "row_scales = Reshape (picked_scales, scale_shape)",
            f"scaled = Mul ({rows}, row_scales)",
        ]
        rows = "scaled"
    lines.append(f"Y = Identity ({rows})")
    return vq_weight.make_function(
        op_type=OP_TYPE, variant=variant, opset=opset, inputs=input_names(variant),
        attributes=list(CONSUMER_ATTRIBUTES), consumer="\n  ".join(lines),
        decode=False,
    )


class VQGather(OpRun):
    """``onnx.reference`` kernel: numpy decode of the table, then ``np.take`` on axis 0."""

    op_domain = vq_weight.DOMAIN

    def _run(self, indices, codes, codebook, *rest, **attributes):
        extras, _ = vq_weight.split_inputs(self.onnx_node.overload, rest)
        table = decode(codes, codebook, **extras, **attributes)
        return (np.take(table, indices.astype(np.int64), axis=0),)


# Conformance cases: (name, table shape, indices shape, attributes, None).
CASES = [
    ("gather_rows", (40, 12), (3, 5), {}, None),
    ("gather_scalar_index", (17, 9), (), {"axis": 0}, None),
    ("gather_flat_indices", (64, 16), (7,), {}, None),
]
