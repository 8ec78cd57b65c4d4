"""VQMatMul: ``MatMul`` with one VQ-encoded constant operand.

Math: ``Y = X @ W`` (``weight_left`` = 0, the default) or ``Y = W @ X`` (``weight_left`` = 1),
numpy ``matmul`` semantics (broadcast batch axes), where ``W`` is rebuilt by
``onnxvq.ops.vq_weight.decode_weight``. Rows of the encoded matrix are the outputs:
``swapaxes(W, -1, -2)`` for a right weight (..., K, N), the *transposed* layout, and ``W`` itself
for a left weight (..., M, K).

Inputs: ``X`` (the activation, whichever side it multiplies from), ``codes``, ``codebook``, the
variant's extras (``projection``, ``signs``, ``scales``, see ``onnxvq.ops.vq_weight``).
Attributes: ``weight_left`` (int, 0 or 1), plus ``weight_shape``, ``weight_dtype``, ``code_bits``,
``method``.
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from onnxvq.ops import vq_weight

__all__ = ["CASES", "CONSUMER", "OP_TYPE", "input_names", "input_vectors", "VQMatMul", "decode", "function", "weight_view"]

OP_TYPE = "VQMatMul"
CONSUMER = "MatMul"
CONSUMER_ATTRIBUTES = ()


def is_transposed(attributes: dict) -> bool:
    return not attributes.get("weight_left", 0)


def weight_view(weight_shape, attributes: dict) -> tuple[bool, int]:
    """(transposed, row_axes) of ``onnxvq.layout``: rows are the outputs of every batch entry."""
    return is_transposed(attributes), len(weight_shape) - 1


def input_vectors(x: np.ndarray, weight_shape, attributes: dict, select) -> np.ndarray:
    """The vectors each output row's weights dot with: ``X``'s rows of length K (``X @ W``) or its
    columns (``W @ X``), over every batch entry. Only 2-D weights (one matrix shared by the batch).

    ``select(total)`` picks which of the ``total`` vectors to return. Returns (n, 1, K).
    """
    if len(weight_shape) != 2:
        raise ValueError("input vectors of a batched (rank > 2) MatMul weight differ per batch entry")
    k = weight_shape[1] if attributes.get("weight_left", 0) else weight_shape[0]
    vectors = np.swapaxes(x, -1, -2) if attributes.get("weight_left", 0) else x
    vectors = vectors.reshape(-1, k)
    return vectors[select(vectors.shape[0])][:, None, :]

def input_names(variant: vq_weight.Variant) -> list[str]:
    """The op's inputs for ``variant``, in node order."""
    return ["X", *vq_weight.encoded_inputs(variant)]


def decode(codes: np.ndarray, codebook: np.ndarray, **named) -> np.ndarray:
    """The dense W this node stands for."""
    extras, attributes = vq_weight.split_extras(named)
    return vq_weight.weight_from_attributes(codes, codebook, attributes, transposed=is_transposed(attributes), **extras)


def function(variant: vq_weight.Variant, opset: int):
    product = "Y = MatMul (w, X)" if variant.weight_left else "Y = MatMul (X, w)"
    return vq_weight.make_function(
        op_type=OP_TYPE, variant=variant, opset=opset, inputs=input_names(variant),
        attributes=["weight_left"], consumer=product,
    )


class VQMatMul(OpRun):
    """``onnx.reference`` kernel: numpy decode, then ``np.matmul``."""

    op_domain = vq_weight.DOMAIN

    def _run(self, X, codes, codebook, *rest, **attributes):
        extras, _ = vq_weight.split_inputs(self.onnx_node.overload, rest)
        W = decode(codes, codebook, **extras, **attributes)
        Y = np.matmul(W, X) if attributes.get("weight_left", 0) else np.matmul(X, W)
        return (Y.astype(X.dtype),)


# Conformance cases: (name, weight shape, input shape, {"weight_left": 0/1}, None).
CASES = [
    ("matmul_right_2d", (40, 24), (3, 5, 40), {}, None),
    ("matmul_right_batched_weight", (3, 12, 10), (3, 4, 12), {}, None),
    ("matmul_left_2d", (20, 12), (2, 12, 6), {"weight_left": 1}, None),
    ("matmul_left_batched_weight", (2, 9, 12), (2, 12, 5), {"weight_left": 1}, None),
    ("matmul_right_vector_input", (16, 8), (16,), {}, None),
]
