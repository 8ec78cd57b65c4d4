"""The ai.onnxvq ops: every op form, every code width, opsets 11..21.

Tier 1 (exactness): a weight built from a known codebook is what the numpy decode rebuilds.
Tier 2 (agreement): numpy reference kernel = onnx.reference on the function body = onnxruntime
on the function body (with and without constant folding) = the dense twin in onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.inliner
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from models import random_encoding, run_ort
from onnxvq import ops
from onnxvq.layout import WeightLayout, matrix_to_weight
from onnxvq.ops.codes import code_bits_for_k, pack_codes

ALL_CASES = [(mod, case) for mod in (ops.vq_conv, ops.vq_conv_transpose, ops.vq_gemm, ops.vq_matmul)
             for case in mod.CASES]
# (k, d, opset): 4-bit with a full and a short codebook, 8-bit, 16-bit; d dividing rows or not.
CODINGS = [(16, 4, 11), (5, 3, 13), (256, 8, 17), (300, 5, 21)]


def build(mod, case, k, d, opset, *, seed=0, codebook_dtype=np.float16, extras=()):
    """(VQ model, dense twin model, dense weight, stored codes, codebook, {extra: tensor}) for
    one conformance case; ``extras`` adds a rank-2 ``projection``, packed ``signs`` and/or
    per-row ``scales``."""
    name, wshape, xshape, attrs, bias = case
    rng = np.random.default_rng(seed)
    transposed, row_axes = mod.weight_view(wshape, attrs)
    lay = WeightLayout(tuple(wshape), transposed, row_axes, d)
    codes, codebook, matrix, stored_extras = random_encoding(rng, lay, k, d, extras, codebook_dtype)
    weight = np.ascontiguousarray(matrix_to_weight(matrix, wshape, transposed))
    bits = code_bits_for_k(k)
    stored = pack_codes(codes, bits)
    variant = ops.Variant.of(
        code_bits=bits, codes_shape=stored.shape, d=d, weight_shape=wshape,
        transposed=transposed, weight_left=bool(attrs.get("weight_left")), extras=extras,
    )
    inputs = ["X", "codes", "codebook", *stored_extras]
    inits = [numpy_helper.from_array(stored, "codes"), numpy_helper.from_array(codebook, "codebook")]
    inits += [numpy_helper.from_array(array, name) for name, array in stored_extras.items()]
    n_encoded = len(inits)
    if bias is True:
        bias = (wshape[0],)
    if bias:
        inputs.append("bias")
        inits.append(numpy_helper.from_array(rng.standard_normal(bias).astype(np.float32), "bias"))
    node = helper.make_node(
        mod.OP_TYPE, inputs, ["Y"], domain=ops.DOMAIN,
        weight_shape=numpy_helper.from_array(np.array(wshape, np.int64)),
        weight_dtype=TensorProto.FLOAT, code_bits=bits, method="pq", extra_inputs=",".join(stored_extras), **attrs,
    )
    node.overload = variant.overload
    x_info = [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(xshape))]
    y_info = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)]
    vq = helper.make_model(
        helper.make_graph([node], name, x_info, y_info, inits),
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(ops.DOMAIN, 1)],
        functions=[mod.function(variant, opset)],
        ir_version=10,
    )
    weight_left = attrs.get("weight_left")
    dense_inputs = (["W", "X"] if weight_left else ["X", "W"]) + inputs[1 + n_encoded :]
    dense_attrs = {a: v for a, v in attrs.items() if a != "weight_left"}
    dense = helper.make_model(
        helper.make_graph(
            [helper.make_node(mod.CONSUMER, dense_inputs, ["Y"], **dense_attrs)], name, x_info, y_info,
            [numpy_helper.from_array(weight, "W")] + inits[n_encoded:],
        ),
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=8,
    )
    # Declare the output's real shape (the checker wants one) from shape inference on the twin.
    inferred = onnx.shape_inference.infer_shapes(dense, strict_mode=True).graph.output[0]
    for model in (vq, dense):
        model.graph.output[0].CopyFrom(inferred)
    return vq, dense, weight, stored, codebook, stored_extras


def _without_functions(model):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.functions[:]
    return copy


def _close(a, b):
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("k,d,opset", CODINGS, ids=lambda v: str(v))
@pytest.mark.parametrize("mod,case", ALL_CASES, ids=[c[0] for _, c in ALL_CASES])
def test_decode_is_exact(mod, case, k, d, opset):
    _, _, weight, stored, codebook, _ = build(mod, case, k, d, opset)
    attrs = dict(case[3])
    decoded = mod.decode(
        stored, codebook, weight_shape=np.array(case[1]), weight_dtype=TensorProto.FLOAT,
        code_bits=code_bits_for_k(k), **attrs,
    )
    np.testing.assert_array_equal(decoded, weight)


@pytest.mark.parametrize("k,d,opset", CODINGS, ids=lambda v: str(v))
@pytest.mark.parametrize("mod,case", ALL_CASES, ids=[c[0] for _, c in ALL_CASES])
def test_all_implementations_agree(mod, case, k, d, opset):
    _assert_all_agree(*build(mod, case, k, d, opset)[:2], case)


def _assert_all_agree(vq, dense, case):
    """numpy reference kernel = onnx.reference on the body = ORT folded and not = the dense twin."""
    onnx.checker.check_model(vq, full_check=True)
    x = {"X": np.random.default_rng(1).standard_normal(case[2]).astype(np.float32)}
    expected = run_ort(dense, x)[0]
    numpy_ref = ReferenceEvaluator(_without_functions(vq), new_ops=ops.reference_ops()).run(None, x)[0]
    body_ref = ReferenceEvaluator(onnx.inliner.inline_local_functions(vq)).run(None, x)[0]
    ort_folded = run_ort(vq, x)[0]
    ort_unfolded = run_ort(vq, x, disabled_optimizers=["ConstantFolding"])[0]
    for got in (numpy_ref, body_ref, ort_folded, ort_unfolded):
        assert got.shape == expected.shape
        _close(got, expected)


EXTRAS = [("projection",), ("signs",), ("scales",), ("projection", "signs"), ("signs", "scales"),
          ("projection", "signs", "scales")]


@pytest.mark.parametrize("extras", EXTRAS, ids="+".join)
@pytest.mark.parametrize("mod,case", ALL_CASES, ids=[c[0] for _, c in ALL_CASES])
def test_extras_decode_is_exact(mod, case, extras):
    """Low-rank and sign-split nodes: the numpy decode rebuilds the weight they stand for."""
    for k, d, _ in CODINGS[:2]:  # 4-bit codes, d dividing the rows or not
        _, _, weight, stored, codebook, stored_extras = build(mod, case, k, d, 13, extras=extras)
        decoded = mod.decode(
            stored, codebook, weight_shape=np.array(case[1]), weight_dtype=TensorProto.FLOAT,
            code_bits=code_bits_for_k(k), **stored_extras, **case[3],
        )
        np.testing.assert_array_equal(decoded, weight)


@pytest.mark.parametrize("extras", EXTRAS, ids="+".join)
@pytest.mark.parametrize("mod,case", ALL_CASES, ids=[c[0] for _, c in ALL_CASES])
def test_extras_all_implementations_agree(mod, case, extras):
    """The function body (the projection product, the sign-table gather) equals the numpy
    decode, in onnx.reference and onnxruntime, folded or not."""
    for k, d, opset in (CODINGS[1], CODINGS[2]):
        _assert_all_agree(*build(mod, case, k, d, opset, extras=extras)[:2], case)


def test_variant_overload_roundtrip():
    for variant in (
        ops.Variant(4, True, 0), ops.Variant(8, False, 2), ops.Variant(16, True, 3, True),
        ops.Variant(8, True, 2, False, ("projection",)), ops.Variant(4, False, 0, True, ("signs",)),
        ops.Variant(16, True, 3, False, ("projection", "signs")),
        ops.Variant(8, True, 2, False, ("scales",)), ops.Variant(4, True, 4, False, ("projection", "signs", "scales")),
    ):
        assert ops.Variant.from_overload(variant.overload) == variant
    assert ops.Variant(8, False, 0, extras=("projection", "signs")).overload == "8b.lr.sg"
    assert ops.Variant(8, False, 0, extras=("signs", "scales")).overload == "8b.sg.sc"
    with pytest.raises(ValueError, match="sub-sequence"):
        ops.Variant(8, False, 0, extras=("signs", "projection"))


def test_body_casts_codebook_to_weight_dtype():
    # A float16 model: the decoded weight must be float16 so Conv sees matching types.
    mod, case = ops.vq_conv, ops.vq_conv.CASES[1]
    vq, dense, weight, *_ = build(mod, case, 256, 8, 17)
    for model in (vq, dense):
        model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
        model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    for init in dense.graph.initializer:
        arr = numpy_helper.to_array(init).astype(np.float16)
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
    for init in vq.graph.initializer:
        if init.name == "bias":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), "bias"))
    for node in vq.graph.node:
        for attr in node.attribute:
            if attr.name == "weight_dtype":
                attr.i = TensorProto.FLOAT16
    x = {"X": np.random.default_rng(2).standard_normal(case[2]).astype(np.float16)}
    got, expected = run_ort(vq, x)[0], run_ort(dense, x)[0]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("case", ops.vq_conv_transpose.GROUPED_CASES, ids=[c[0] for c in ops.vq_conv_transpose.GROUPED_CASES])
@pytest.mark.parametrize("extras", [(), ("signs", "scales")], ids=lambda e: "+".join(e) or "plain")
def test_grouped_conv_transpose_agrees_in_onnxruntime(case, extras):
    """Grouped ConvTranspose: the body in onnxruntime (folded and not) = the dense twin (onnx's
    reference runtime has no grouped ConvTranspose)."""
    vq, dense, *_ = build(ops.vq_conv_transpose, case, 16, 4, 17, extras=extras)
    x = {"X": np.random.default_rng(1).standard_normal(case[2]).astype(np.float32)}
    expected = run_ort(dense, x)[0]
    for got in (run_ort(vq, x)[0], run_ort(vq, x, disabled_optimizers=["ConstantFolding"])[0]):
        _close(got, expected)
