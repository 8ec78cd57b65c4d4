"""VQGemm: ``Gemm`` whose B is VQ-encoded.

Math: ``Y = alpha * A' @ B' + beta * C`` with ``A' = A.T`` if transA, ``B' = B.T`` if transB
(Gemm's own attributes, carried over unchanged), where ``B`` is rebuilt by
``onnxvq.ops.vq_weight.decode_weight``. Rows of the encoded matrix are the N outputs: ``B`` itself
when transB=1 (shape N x K), ``B.T`` when transB=0 (K x N, the *transposed* layout).

Inputs: ``A``, ``codes``, ``codebook``, the variant's extras (``projection``, ``signs``, ``scales``, see
``onnxvq.ops.vq_weight``), optional ``C``.
Attributes: alpha, beta, transA, transB, plus ``weight_shape``, ``weight_dtype``, ``code_bits``,
``method``.
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_gemm import Gemm_7

from onnxvq.ops import vq_weight

__all__ = ["CASES", "CONSUMER", "OP_TYPE", "input_names", "input_vectors", "VQGemm", "decode", "function", "weight_view"]

OP_TYPE = "VQGemm"
CONSUMER = "Gemm"
CONSUMER_ATTRIBUTES = ("alpha", "beta", "transA", "transB")


def is_transposed(attributes: dict) -> bool:
    return not attributes.get("transB", 0)


def weight_view(weight_shape, attributes: dict) -> tuple[bool, int]:
    """(transposed, row_axes) of ``onnxvq.layout``: rows are the N outputs."""
    return is_transposed(attributes), 1


def input_vectors(x: np.ndarray, weight_shape, attributes: dict, select) -> np.ndarray:
    """The vectors each output row's weights dot with: the rows of ``A'`` (A, or A.T if transA).

    ``select(total)`` picks which of the ``total`` vectors to return (an index array). Returns
    (n, 1, K): one group (see ``vq_conv.input_vectors`` for grouped layers).
    """
    a = x.T if attributes.get("transA", 0) else x
    return a[select(a.shape[0])][:, None, :]

def input_names(variant: vq_weight.Variant) -> list[str]:
    """The op's inputs for ``variant``, in node order (the bias last)."""
    return ["A", *vq_weight.encoded_inputs(variant), "C"]


def decode(codes: np.ndarray, codebook: np.ndarray, **named) -> np.ndarray:
    """The dense B this node stands for."""
    extras, attributes = vq_weight.split_extras(named)
    return vq_weight.weight_from_attributes(codes, codebook, attributes, transposed=is_transposed(attributes), **extras)


def function(variant: vq_weight.Variant, opset: int):
    consumer = (
        "Y = Gemm <alpha: float = @alpha, beta: float = @beta, transA: int = @transA, "
        "transB: int = @transB> (A, w, C)"
    )
    return vq_weight.make_function(
        op_type=OP_TYPE, variant=variant, opset=opset, inputs=input_names(variant),
        attributes=list(CONSUMER_ATTRIBUTES), consumer=consumer,
    )


class VQGemm(OpRun):
    """``onnx.reference`` kernel: numpy decode, then the reference Gemm."""

    op_domain = vq_weight.DOMAIN

    def _run(self, A, codes, codebook, *rest, **attributes):
        extras, rest = vq_weight.split_inputs(self.onnx_node.overload, rest)
        C = rest[0] if rest else None
        B = decode(codes, codebook, **extras, **attributes)
        return Gemm_7._run(
            self,
            A,
            B,
            C,
            alpha=attributes.get("alpha", 1.0),
            beta=attributes.get("beta", 1.0),
            transA=attributes.get("transA", 0),
            transB=attributes.get("transB", 0),
        )


# Conformance cases: (name, weight shape, input shape, Gemm attributes, bias shape or None).
CASES = [
    ("gemm_transB", (24, 40), (5, 40), {"transB": 1}, (24,)),
    ("gemm_plain", (40, 24), (5, 40), {}, None),
    ("gemm_transA", (40, 24), (40, 5), {"transA": 1}, (1, 24)),
    ("gemm_transA_transB_alpha_beta", (24, 36), (36, 3), {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}, (3, 24)),
    ("gemm_odd_rows", (13, 7), (4, 13), {"alpha": 1.5}, (7,)),
]
