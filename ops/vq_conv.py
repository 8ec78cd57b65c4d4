"""VQConv: ``Conv`` whose weight is VQ-encoded.

Math: ``Y = Conv(X, W, B)`` with every Conv attribute as given (auto_pad, dilations, group,
kernel_shape, pads, strides: 1-D, 2-D and 3-D kernels, groups and depthwise alike), where
``W`` (O, I/g, k1, ..., kn) is rebuilt by ``onnxvq.ops.vq_weight.decode_weight`` with rows = the
O output channels, each row the flattened (I/g, k1, ..., kn) kernel, never transposed.

Inputs: ``X``, ``codes``, ``codebook``, the variant's extras (``projection``, ``signs``, ``scales``, see
``onnxvq.ops.vq_weight``), optional ``B`` (as Conv's bias).
Attributes: Conv's, plus ``weight_shape``, ``weight_dtype``, ``code_bits``, ``method``.
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_conv import _conv_implementation

from onnxvq.ops import vq_weight

__all__ = ["CASES", "CONSUMER", "OP_TYPE", "input_names", "input_vectors", "VQConv", "decode", "function", "weight_view"]

OP_TYPE = "VQConv"
CONSUMER = "Conv"
CONSUMER_ATTRIBUTES = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")
_REF_TYPES = {"auto_pad": "string", "group": "int"}  # the rest are ints


def weight_view(weight_shape, attributes: dict) -> tuple[bool, int]:
    """(transposed, row_axes) of ``onnxvq.layout`` for this consumer: rows are output channels."""
    return False, 1


def input_vectors(x: np.ndarray, weight_shape, attributes: dict, select) -> np.ndarray:
    """The patches each output channel's kernel dots with (im2col), honouring pads/auto_pad,
    strides, dilations and groups.

    ``select(total)`` picks which of the ``total`` = N x output positions to extract (only those
    are copied, so large feature maps cost nothing extra). Returns (n, group, I/g * k1 * ... * kn):
    group ``j``'s patch is what output channels ``j*O/g .. (j+1)*O/g - 1`` see, flattened in the
    weight's own (I/g, k1, ..., kn) order.
    """
    kernel = tuple(int(k) for k in weight_shape[2:])
    spatial = len(kernel)
    group = int(attributes.get("group", 1))
    strides = list(attributes.get("strides") or [1] * spatial)
    dilations = list(attributes.get("dilations") or [1] * spatial)
    extent = [(k - 1) * dl + 1 for k, dl in zip(kernel, dilations)]
    pads = _pads(x.shape[2:], extent, strides, attributes)
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + spatial]) for i in range(spatial)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, extent, axis=tuple(range(2, 2 + spatial)))
    # windows: (N, C, P1, .., Pn, E1, .., En) -> stride the positions, dilate the kernel taps
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
    index += tuple(slice(None, None, dl) for dl in dilations)
    windows = windows[index]
    out_shape = (windows.shape[0],) + windows.shape[2 : 2 + spatial]
    chosen = np.unravel_index(select(int(np.prod(out_shape))), out_shape)
    patches = windows[(chosen[0], slice(None)) + tuple(chosen[1:])]  # (n, C, k1, .., kn)
    return patches.reshape(len(chosen[0]), group, -1)


def _pads(in_spatial, extent, strides, attributes) -> list[int]:
    """Begin pads then end pads, as Conv computes them (explicit ``pads`` or ``auto_pad``)."""
    spatial = len(extent)
    auto_pad = attributes.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, e, s in zip(in_spatial, extent, strides):
            total = max((-(-size // s) - 1) * s + e - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        return begin + end
    if auto_pad == "VALID":
        return [0] * (2 * spatial)
    return list(attributes.get("pads") or [0] * (2 * spatial))

def is_transposed(attributes: dict) -> bool:
    return False


def input_names(variant: vq_weight.Variant) -> list[str]:
    """The op's inputs for ``variant``, in node order (the bias last)."""
    return ["X", *vq_weight.encoded_inputs(variant), "B"]


def decode(codes: np.ndarray, codebook: np.ndarray, **named) -> np.ndarray:
    """The dense weight this node stands for, never transposed (Conv's, and ConvTranspose's,
    which :mod:`vq_conv_transpose` decodes with this function)."""
    extras, attributes = vq_weight.split_extras(named)
    return vq_weight.weight_from_attributes(codes, codebook, attributes, transposed=False, **extras)


def function(variant: vq_weight.Variant, opset: int):
    refs = vq_weight.attribute_refs(CONSUMER_ATTRIBUTES, _REF_TYPES, "ints")
    return vq_weight.make_function(
        op_type=OP_TYPE, variant=variant, opset=opset, inputs=input_names(variant),
        attributes=list(CONSUMER_ATTRIBUTES), consumer=f"Y = Conv <{refs}> (X, w, B)",
    )


class VQConv(OpRun):
    """``onnx.reference`` kernel: numpy decode, then the reference Conv."""

    op_domain = vq_weight.DOMAIN

    def _run(self, X, codes, codebook, *rest, **attributes):
        extras, rest = vq_weight.split_inputs(self.onnx_node.overload, rest)
        B = rest[0] if rest else None
        W = decode(codes, codebook, **extras, **attributes)
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
