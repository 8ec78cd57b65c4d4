"""VQConvTranspose: ``ConvTranspose`` whose weight is VQ-encoded.

Math: ``Y = ConvTranspose(X, W, B)`` with every ConvTranspose attribute as given (auto_pad,
dilations, group, kernel_shape, output_padding, output_shape, pads, strides), where ``W``
(C_in, C_out/g, k1, ..., kn) is rebuilt by ``onnxvq.ops.vq_weight.decode_weight`` with rows =
the C_in *input* channels, each row the flattened (C_out/g, k1, ..., kn) block, never transposed:
the weight's own memory order. (Its rows are not outputs, so per-row scales are per input
channel, and the layer's inputs are not captured: it is encoded from its weights.)

Inputs: ``X``, ``codes``, ``codebook``, the variant's extras (``projection``, ``signs``,
``scales``), optional ``B``. Attributes: ConvTranspose's, plus ``weight_shape``,
``weight_dtype``, ``code_bits``, ``method``.
"""

from __future__ import annotations

from onnx.reference.op_run import OpRun

from onnxvq.ops import vq_conv, vq_weight

__all__ = ["CASES", "CONSUMER", "OP_TYPE", "VQConvTranspose", "decode", "function", "input_names", "weight_view"]

OP_TYPE = "VQConvTranspose"
CONSUMER = "ConvTranspose"
CONSUMER_ATTRIBUTES = (
    "auto_pad", "dilations", "group", "kernel_shape", "output_padding", "output_shape", "pads", "strides",
)
_REF_TYPES = {"auto_pad": "string", "group": "int"}  # the rest are ints


def is_transposed(attributes: dict) -> bool:
    return False


def weight_view(weight_shape, attributes: dict) -> tuple[bool, int]:
    """(transposed, row_axes): rows are the input channels, as the weight is stored."""
    return False, 1


# Conv's: X, the encoded weight, then the bias; the weight decoded as stored, never transposed.
input_names = vq_conv.input_names
decode = vq_conv.decode


def function(variant: vq_weight.Variant, opset: int):
    refs = vq_weight.attribute_refs(CONSUMER_ATTRIBUTES, _REF_TYPES, "ints")
    return vq_weight.make_function(
        op_type=OP_TYPE, variant=variant, opset=opset, inputs=input_names(variant),
        attributes=list(CONSUMER_ATTRIBUTES), consumer=f"Y = ConvTranspose <{refs}> (X, w, B)",
    )


class VQConvTranspose(OpRun):
    """``onnx.reference`` kernel: numpy decode, then onnx's reference ConvTranspose."""

    op_domain = vq_weight.DOMAIN

    def _run(self, X, codes, codebook, *rest, **attributes):
        extras, rest = vq_weight.split_inputs(self.onnx_node.overload, rest)
        W = decode(codes, codebook, **extras, **attributes)
        own = {a: attributes[a] for a in CONSUMER_ATTRIBUTES if attributes.get(a) is not None}
        (Y,) = vq_weight.run_standard_op("ConvTranspose", [X, W, rest[0] if rest else None], own, 1, opset=17)
        return (Y.astype(X.dtype),)


# Conformance cases: (name, weight shape, input shape, attributes, bias shape or None). onnx's
# reference ConvTranspose has no groups: GROUPED_CASES run against onnxruntime only.
CASES = [
    ("convtranspose2d_stride2", (8, 6, 2, 2), (1, 8, 5, 5), {"strides": [2, 2]}, (6,)),
    ("convtranspose2d_pads_output_padding", (6, 4, 3, 3), (2, 6, 4, 4),
     {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}, (4,)),
    ("convtranspose2d_dilations", (8, 3, 3, 3), (1, 8, 5, 5), {"dilations": [2, 1]}, (3,)),
    ("convtranspose1d", (5, 7, 4), (2, 5, 9), {"strides": [3]}, None),
    ("convtranspose2d_output_shape", (4, 4, 3, 3), (1, 4, 4, 4), {"strides": [2, 2], "output_shape": [9, 9]}, None),
]
GROUPED_CASES = [
    ("convtranspose2d_groups", (8, 3, 3, 3), (1, 8, 5, 5), {"group": 2, "strides": [2, 2]}, (6,)),
    ("convtranspose2d_depthwise", (6, 1, 4, 4), (2, 6, 4, 4), {"group": 6, "strides": [2, 2], "pads": [1, 1, 1, 1]}, (6,)),
]
