"""VQConv: ``Conv`` whose weight is VQ-encoded.

Math: ``Y = Conv(X, W, B)`` with every Conv attribute as given (auto_pad, dilations, group,
kernel_shape, pads, strides: 1-D, 2-D and 3-D kernels, groups and depthwise alike), where
``W`` (O, I/g, k1, ..., kn) is rebuilt by ``onnxvq.ops.vq_weight.decode_weight`` with rows = the
O output channels, each row the flattened (I/g, k1, ..., kn) kernel, never transposed.

Inputs: ``X``, ``codes``, ``codebook``, optional ``B`` (as Conv's bias).
Attributes: Conv's, plus ``weight_shape``, ``weight_dtype``, ``code_bits``, ``method``.
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_conv import _conv_implementation

from onnxvq.ops import vq_weight

__all__ = ["CASES", "CONSUMER", "OP_TYPE", "VQConv", "decode", "function", "weight_view"]

OP_TYPE = "VQConv"
CONSUMER = "Conv"
CONSUMER_ATTRIBUTES = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")
INPUTS = ["X", "codes", "codebook", "B"]
_REF_TYPES = {"auto_pad": "string", "group": "int"}  # the rest are ints


def weight_view(weight_shape, attributes: dict) -> tuple[bool, int]:
    """(transposed, row_axes) of ``onnxvq.layout`` for this consumer: rows are output channels."""
    return False, 1


def is_transposed(attributes: dict) -> bool:
    return False


def decode(codes: np.ndarray, codebook: np.ndarray, **attributes) -> np.ndarray:
    """The dense Conv weight this node stands for."""
    return vq_weight.weight_from_attributes(codes, codebook, attributes, transposed=False)


def function(variant: vq_weight.Variant, opset: int):
    refs = ", ".join(
        f"{a}: {_REF_TYPES.get(a, 'ints')} = @{a}" for a in CONSUMER_ATTRIBUTES
    )
    return vq_weight.make_function(
        op_type=OP_TYPE, variant=variant, opset=opset, inputs=INPUTS,
        attributes=list(CONSUMER_ATTRIBUTES), consumer=f"Y = Conv <{refs}> (X, w, B)",
    )


class VQConv(OpRun):
    """``onnx.reference`` kernel: numpy decode, then the reference Conv."""

    op_domain = vq_weight.DOMAIN

    def _run(self, X, codes, codebook, B=None, **attributes):
        W = decode(codes, codebook, **attributes)
        conv = {a: attributes.get(a) for a in CONSUMER_ATTRIBUTES}
        conv["auto_pad"] = conv["auto_pad"] or "NOTSET"
        conv["group"] = conv["group"] or 1
        return (_conv_implementation(X, W, B, **conv).astype(X.dtype),)


# Conformance cases: (name, weight shape, input shape, Conv attributes, with bias).
CASES = [
    ("conv1d", (8, 4, 3), (2, 4, 11), {}, True),
    ("conv2d_pads_strides", (16, 3, 3, 3), (1, 3, 9, 9), {"pads": [1, 1, 1, 1], "strides": [2, 2]}, True),
    ("conv2d_dilations", (8, 4, 3, 3), (1, 4, 10, 10), {"dilations": [2, 2]}, False),
    ("conv2d_groups", (12, 2, 3, 3), (1, 6, 8, 8), {"group": 3, "pads": [1, 1, 1, 1]}, True),
    ("conv2d_depthwise", (6, 1, 3, 3), (2, 6, 7, 7), {"group": 6, "auto_pad": "SAME_UPPER"}, True),
    ("conv2d_same_lower", (5, 3, 2, 2), (1, 3, 6, 6), {"auto_pad": "SAME_LOWER", "strides": [2, 2]}, False),
    ("conv2d_valid_1x1", (32, 16, 1, 1), (1, 16, 5, 5), {"auto_pad": "VALID"}, True),
    ("conv3d", (4, 2, 2, 3, 3), (1, 2, 4, 6, 6), {"pads": [0, 1, 1, 0, 1, 1]}, True),
]
