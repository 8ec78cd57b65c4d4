"""Fuzzed agreement of the ai.onnxvq ops (hypothesis, derandomized: the same examples every run).

Each example draws a consumer (Conv 1-D/2-D/3-D with groups, strides, pads or auto_pad,
dilations; ConvTranspose 1-D/2-D with strides, pads and output_padding; Gemm with transA/transB/alpha/beta and every bias broadcast; MatMul with batched
weights on either side and broadcast or vector activations), a coding (k, hence 4/8/16-bit codes;
d dividing the rows or not; the extras of pq, lr2vq, ssvq, with or without per-channel scales;
float16 or float32 codebooks) and an opset from 11 to 21, then holds equal:

    numpy decode (exactly the weight the codes stand for)
    = the function body in onnx.reference (inlined, as :func:`onnxvq.ops.inline_bodies` does)
    = the function body in onnxruntime, constant-folded or not
    = the numpy reference kernels
    = the dense twin in onnxruntime = the decompressed twin (same weight, bit for bit).

A second test runs the real encoders (``onnxvq.compress``) on random weights of the same
consumers and holds the compressed model equal to its decompressed twin.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxvq
from models import run_ort
from onnxvq import ops
from onnxvq.ops.codes import code_bits_for_k
from test_ops import _assert_all_agree, _close, build

OPSETS = st.integers(11, 21)
# Reproducible and CI-sized: a fixed example sequence, no example database written to the
# checkout, no per-example deadline (the first onnxruntime session of a run is slow).
FUZZ = settings(
    max_examples=60, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
METHOD_EXTRAS = {"pq": (), "lr2vq": ("projection",), "ssvq": ("signs",)}


@st.composite
def conv_cases(draw):
    """(name, weight shape, input shape, Conv attributes, with bias), as in ``vq_conv.CASES``."""
    spatial = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    in_per_group, out_per_group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kernel = draw(st.lists(st.integers(1, 3), min_size=spatial, max_size=spatial))
    strides = draw(st.lists(st.integers(1, 2), min_size=spatial, max_size=spatial))
    auto_pad = draw(st.sampled_from(["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID", None]))
    # onnxruntime refuses dilations with SAME_UPPER/SAME_LOWER ("Dilation not supported").
    dilation = st.just(1) if auto_pad in ("SAME_UPPER", "SAME_LOWER") else st.integers(1, 2)
    dilations = draw(st.lists(dilation, min_size=spatial, max_size=spatial))
    extent = [(k - 1) * dl + 1 for k, dl in zip(kernel, dilations)]
    # 3-D inputs stay small: onnx.reference's Conv is a Python loop over output positions.
    slack = 1 if spatial == 3 else 3
    size = [e + draw(st.integers(0, slack)) for e in extent]
    attrs = {}
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    if auto_pad in (None, "NOTSET") and draw(st.booleans()):
        # Pads below the kernel's extent: larger ones are legal ONNX but outside what runtimes test.
        attrs["pads"] = [draw(st.integers(0, e - 1)) for e in extent + extent]
    if group > 1 or draw(st.booleans()):
        attrs["group"] = group
    if strides != [1] * spatial or draw(st.booleans()):
        attrs["strides"] = strides
    if dilations != [1] * spatial or draw(st.booleans()):
        attrs["dilations"] = dilations
    if draw(st.booleans()):
        attrs["kernel_shape"] = kernel
    weight_shape = (group * out_per_group, in_per_group, *kernel)
    input_shape = (draw(st.integers(1, 2)), group * in_per_group, *size)
    return (f"conv{spatial}d", weight_shape, input_shape, attrs, draw(st.booleans()))


@st.composite
def gemm_cases(draw):
    """(name, weight shape, input shape, Gemm attributes, bias shape or None)."""
    m, k, n = draw(st.integers(1, 4)), draw(st.integers(1, 24)), draw(st.integers(1, 24))
    attrs = {}
    trans_a, trans_b = draw(st.booleans()), draw(st.booleans())
    for name, flag in (("transA", trans_a), ("transB", trans_b)):
        if flag or draw(st.booleans()):
            attrs[name] = int(flag)
    for name in ("alpha", "beta"):
        value = draw(st.sampled_from([None, 1.0, 0.5, -1.25, 3.0]))
        if value is not None:
            attrs[name] = value
    bias = draw(st.sampled_from([None, (n,), (1, n), (m, n), (m, 1), (1,)]))
    weight_shape = (n, k) if trans_b else (k, n)
    input_shape = (k, m) if trans_a else (m, k)
    return ("gemm", weight_shape, input_shape, attrs, bias)


@st.composite
def matmul_cases(draw):
    """(name, weight shape, input shape, {"weight_left": 1} or {}, None): batched weights on
    either side; activations with fewer, broadcast (size 1) or extra batch axes, or a vector."""
    left = draw(st.booleans())
    batch = draw(st.lists(st.integers(1, 3), max_size=2))
    m, k, n = draw(st.integers(1, 5)), draw(st.integers(1, 16)), draw(st.integers(1, 16))
    x_batch = [draw(st.sampled_from([b, 1])) for b in batch]
    x_batch = draw(st.lists(st.integers(1, 2), max_size=1)) + x_batch
    x_batch = x_batch[draw(st.integers(0, len(x_batch))):]  # fewer axes broadcast too
    vector = draw(st.booleans()) and not x_batch
    if left:  # Y = W @ X, W (..., M, K), X (..., K, N) or (K,)
        weight_shape, input_shape = (*batch, m, k), ((k,) if vector else (*x_batch, k, n))
    else:  # Y = X @ W, W (..., K, N), X (..., M, K) or (K,)
        weight_shape, input_shape = (*batch, k, n), ((k,) if vector else (*x_batch, m, k))
    return ("matmul", weight_shape, input_shape, {"weight_left": 1} if left else {}, None)


@st.composite
def conv_transpose_cases(draw):
    """(name, weight shape, input shape, ConvTranspose attributes, bias shape or None); one group
    (onnx's reference ConvTranspose has none; grouped forms are tested against onnxruntime in
    ``test_ops``)."""
    spatial = draw(st.integers(1, 2))
    c_in, c_out = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    kernel = draw(st.lists(st.integers(1, 3), min_size=spatial, max_size=spatial))
    strides = draw(st.lists(st.integers(1, 2), min_size=spatial, max_size=spatial))
    pads = [draw(st.integers(0, (k - 1) // 2)) for k in kernel] * 2  # the output keeps >= 1 position
    output_padding = [draw(st.integers(0, s - 1)) for s in strides]
    size = draw(st.lists(st.integers(2, 5), min_size=spatial, max_size=spatial))
    attrs = {"strides": strides, "pads": pads, "output_padding": output_padding}
    bias = (c_out,) if draw(st.booleans()) else None
    return ("fuzz_conv_transpose", (c_in, c_out, *kernel), (draw(st.integers(1, 2)), c_in, *size), attrs, bias)


CASES = {ops.vq_conv: conv_cases(), ops.vq_conv_transpose: conv_transpose_cases(), ops.vq_gemm: gemm_cases(),
         ops.vq_matmul: matmul_cases()}
# k over all three code widths; 4-bit with a short codebook (k < 16) as well as a full one.
K = st.one_of(st.integers(1, 16), st.integers(17, 256), st.integers(257, 600))


@st.composite
def codings(draw):
    """(k, d, opset, extras, codebook dtype)."""
    extras = METHOD_EXTRAS[draw(st.sampled_from(sorted(METHOD_EXTRAS)))]
    if draw(st.booleans()):
        extras += ("scales",)
    dtype = draw(st.sampled_from([np.float16, np.float32]))
    return draw(K), draw(st.integers(1, 9)), draw(OPSETS), extras, dtype


def _dense_weight(model: onnx.ModelProto) -> np.ndarray:
    """The weight of the single Conv/Gemm/MatMul of a dense model."""
    (node,) = [n for n in model.graph.node if n.op_type in ops.consumers()]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return next(inits[name] for name in node.input if name in inits and name != "bias")


def _assert_body_agreement(mod, case, k, d, opset, extras, codebook_dtype, seed):
    vq, dense, weight, stored, codebook, stored_extras = build(
        mod, case, k, d, opset, seed=seed, codebook_dtype=codebook_dtype, extras=extras
    )
    decoded = mod.decode(
        stored, codebook, weight_shape=np.array(case[1]), weight_dtype=onnx.TensorProto.FLOAT,
        code_bits=code_bits_for_k(k), **stored_extras, **case[3],
    )
    np.testing.assert_array_equal(decoded, weight)
    _assert_all_agree(vq, dense, case)

    x = {"X": np.random.default_rng(1).standard_normal(case[2]).astype(np.float32)}
    expected = run_ort(dense, x)[0]
    inlined = ops.inline_bodies(vq)
    assert not [n for n in inlined.graph.node if n.domain == ops.DOMAIN]
    _close(ReferenceEvaluator(inlined).run(None, x)[0], expected)

    twin = ir.serde.serialize_model(onnxvq.decompress(vq))
    np.testing.assert_array_equal(_dense_weight(twin), weight)
    _close(run_ort(twin, x)[0], expected)


@FUZZ
@given(case=conv_cases(), coding=codings(), seed=st.integers(0, 2**16))
def test_conv_body_agreement(case, coding, seed):
    _assert_body_agreement(ops.vq_conv, case, *coding, seed)


@settings(FUZZ, max_examples=30)
@given(case=conv_transpose_cases(), coding=codings(), seed=st.integers(0, 2**16))
def test_conv_transpose_body_agreement(case, coding, seed):
    _assert_body_agreement(ops.vq_conv_transpose, case, *coding, seed)


@FUZZ
@given(case=gemm_cases(), coding=codings(), seed=st.integers(0, 2**16))
def test_gemm_body_agreement(case, coding, seed):
    _assert_body_agreement(ops.vq_gemm, case, *coding, seed)


@FUZZ
@given(case=matmul_cases(), coding=codings(), seed=st.integers(0, 2**16))
def test_matmul_body_agreement(case, coding, seed):
    _assert_body_agreement(ops.vq_matmul, case, *coding, seed)


@settings(FUZZ, max_examples=40)
@given(
    op=st.sampled_from(sorted(CASES, key=lambda m: m.OP_TYPE)).flatmap(lambda m: st.tuples(st.just(m), CASES[m])),
    method=st.sampled_from(sorted(METHOD_EXTRAS)),
    scales=st.sampled_from(["on", "off"]),
    k_exp=st.integers(1, 6),
    d=st.integers(1, 6),
    opset=OPSETS,
)
def test_compress_equals_decompressed_twin(op, method, scales, k_exp, d, opset):
    """The real encoders on random weights: whatever they choose, the compressed model in
    onnxruntime and in onnx.reference equals its decompressed twin, and every consumer is
    replaced or has a stated reason not to be."""
    mod, case = op
    _, dense, *_ = build(mod, case, 2, 1, opset)
    weight = _dense_weight(dense)
    for init in dense.graph.initializer:  # random weights, not the codebook-built ones
        if init.name == "W":
            init.CopyFrom(numpy_helper.from_array(
                np.random.default_rng(k_exp).standard_normal(weight.shape).astype(np.float32), "W"
            ))
    options = {"rank": 1} if method == "lr2vq" else {}
    result = onnxvq.compress(dense, method=method, k=2**k_exp, d=d, scales=scales, min_size=0, **options)
    (report,) = result.summary.layers
    vq = result.to_proto()
    x = {"X": np.random.default_rng(1).standard_normal(case[2]).astype(np.float32)}
    if not report.compressed:
        assert "would not be smaller" in report.rule, report.rule
        return
    (node,) = vq.graph.node
    assert (node.domain, node.op_type) == (ops.DOMAIN, mod.OP_TYPE)
    twin = ir.serde.serialize_model(onnxvq.decompress(vq))
    expected = run_ort(twin, x)[0]
    scale = max(1.0, float(np.abs(expected).max()))
    for got in (run_ort(vq, x)[0], ReferenceEvaluator(ops.inline_bodies(vq)).run(None, x)[0]):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * scale)
