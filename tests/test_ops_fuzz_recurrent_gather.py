"""Fuzzed agreement of the recurrent (VQLSTM/VQGRU/VQRNN) and embedding (VQGather) op forms
(hypothesis, derandomized: the same examples every run), as ``test_ops_fuzz`` does for the
Conv/ConvTranspose/Gemm/MatMul forms.

A recurrent example draws the op, its direction, hidden and input sizes, which optional inputs
are present (B, sequence_lens, initial_h, and for LSTM initial_c, P), its attributes (clip,
input_forget, linear_before_reset, layout, activations with their alpha/beta), which outputs are
used, a coding (k over 4/8/16-bit codes, d 1..9, the extras of pq/lr2vq/ssvq with or without
scales, a float16 or float32 codebook) and an opset from 14 to 21. A VQGather example draws a
table (1..300 rows, 1..40 columns), an index shape (scalar, 1-D, 2-D), a coding and an opset from
11 to 21. Each holds equal:

    numpy decode (exactly the weight the codes stand for)
    = the decompressed twin's weight (for a recurrent op, W and R split from it)
    numpy reference kernel = the body inlined, in onnx.reference
    = the body in onnxruntime, constant-folded or not
    = the dense twin = the decompressed twin.

Recurrent forms are compared in each runtime against their own dense twin
(``test_recurrent_ops.assert_forms_agree``): onnx's reference LSTM/GRU/RNN ignore activations,
clip and sequence_lens and differ from onnxruntime's on bidirectional and peephole cases, and
onnxruntime does not run layout=1 (onnx.reference alone checks those).

A second test per form runs the real encoders (``onnxvq.compress``) on random weights and holds
the compressed model equal to its decompressed twin.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import onnxvq
import test_gather
import test_recurrent_ops
from onnxvq import ops
from onnxvq.ops import vq_gather, vq_recurrent
from test_ops_fuzz import FUZZ, METHOD_EXTRAS, OPSETS, codings

RECURRENT_OPSETS = st.integers(14, 21)  # layout exists from opset 14
# test_ops_fuzz's codings (k, d, opset, extras, codebook dtype), the opset redrawn from 14.
RECURRENT_CODINGS = st.tuples(codings(), RECURRENT_OPSETS).map(lambda c: (*c[0][:2], c[1], *c[0][3:]))
RECURRENT_OPS = (vq_recurrent.LSTM, vq_recurrent.GRU, vq_recurrent.RNN)
DIRECTIONS = {"forward": 1, "reverse": 1, "bidirectional": 2}
# Activation functions of the recurrent ops -> how many of (alpha, beta) each reads, limited to
# those both runtimes load: onnxruntime runs all of these in LSTM, GRU and RNN; onnx's reference
# LSTM and GRU ignore the attribute, its RNN knows only Tanh and Affine.
ACTIVATIONS = {
    "Affine": 2, "Elu": 1, "HardSigmoid": 2, "LeakyRelu": 1, "Relu": 0, "ScaledTanh": 2, "Sigmoid": 0,
    "Softplus": 0, "Softsign": 0, "Tanh": 0, "ThresholdedRelu": 1,
}
RNN_REFERENCE_ACTIVATIONS = ("Affine", "Tanh")
BOUNDED = ("HardSigmoid", "ScaledTanh", "Sigmoid", "Softsign", "Tanh")
PER_DIRECTION = {"LSTM": 3, "GRU": 2, "RNN": 1}  # activation functions per direction (f, g, h)


def _trimmed(names: list[str]) -> tuple[str, ...]:
    """Optional inputs/outputs left out are "" in their slot; trailing ones are dropped."""
    while names and not names[-1]:
        names.pop()
    return tuple(names)


@st.composite
def recurrent_cases(draw):
    """A ``test_recurrent_ops.CASES`` tuple less its opset: (name, op, directions, hidden, input
    size, optional inputs present, attributes, outputs used)."""
    op = draw(st.sampled_from(RECURRENT_OPS))
    direction = draw(st.sampled_from(sorted(DIRECTIONS)))
    dirs = DIRECTIONS[direction]
    hidden, isize = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    optional = _trimmed([n if draw(st.booleans()) else "" for n in op.optional_inputs])
    attrs = {}
    if direction != "forward" or draw(st.booleans()):
        attrs["direction"] = direction
    clip = draw(st.sampled_from([None, 0.5, 1.0, 3.0]))
    if clip is not None:
        attrs["clip"] = clip
    own = {vq_recurrent.LSTM: "input_forget", vq_recurrent.GRU: "linear_before_reset"}.get(op)
    if own:
        flag = draw(st.sampled_from([None, 0, 1]))
        if flag is not None:
            attrs[own] = flag
    layout = draw(st.sampled_from([None, 0, 1]))
    if layout is not None:
        attrs["layout"] = layout
    if draw(st.booleans()):
        acts = []
        for _ in range(dirs):
            if op is vq_recurrent.RNN:
                acts.append(draw(st.sampled_from(RNN_REFERENCE_ACTIVATIONS)))
            else:  # a bounded gate function f keeps the states finite over the steps
                acts.append(draw(st.sampled_from(BOUNDED)))
                acts += draw(st.lists(st.sampled_from(sorted(ACTIVATIONS)), min_size=PER_DIRECTION[op.CONSUMER] - 1,
                                      max_size=PER_DIRECTION[op.CONSUMER] - 1))
        attrs["activations"] = acts
        # One alpha and one beta per function, 0.0 for those that read none (as CASES' GRU).
        alphas = [draw(st.sampled_from([0.3, 0.5, 1.0, 1.5])) if ACTIVATIONS[a] >= 1 else 0.0 for a in acts]
        betas = [draw(st.sampled_from([0.0, 0.2, 0.5])) if ACTIVATIONS[a] >= 2 else 0.0 for a in acts]
        if any(ACTIVATIONS[a] >= 1 for a in acts):
            attrs["activation_alpha"] = alphas
        if any(ACTIVATIONS[a] >= 2 for a in acts):
            attrs["activation_beta"] = betas
    used = draw(st.integers(1, 2 ** len(op.outputs) - 1))  # a nonempty subset, as a bit mask
    outputs = _trimmed([n if used >> i & 1 else "" for i, n in enumerate(op.outputs)])
    return (f"fuzz_{op.CONSUMER.lower()}", op, dirs, hidden, isize, optional, attrs, outputs)


@st.composite
def gather_cases(draw):
    """A ``vq_gather.CASES`` tuple: (name, table shape, indices shape, attributes, None)."""
    shape = (draw(st.integers(1, 300)), draw(st.integers(1, 40)))
    index_shape = draw(st.sampled_from([(), (0,), (0, 0)]))
    index_shape = tuple(draw(st.integers(1, 6)) for _ in index_shape)
    attrs = {"axis": 0} if draw(st.booleans()) else {}
    return ("fuzz_gather", shape, index_shape, attrs, None)


def _decode(mod, vq):
    """The numpy decode of the single ai.onnxvq node of ``vq``, fed from its stored tensors."""
    (node,) = [n for n in vq.graph.node if n.domain == ops.DOMAIN]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attrs = {a: v for a, v in attrs.items() if a in ops.vq_weight.VQ_ATTRIBUTES}
    attrs["weight_shape"] = numpy_helper.to_array(attrs["weight_shape"])
    tensors = {t.name: numpy_helper.to_array(t) for t in vq.graph.initializer}
    extras = ops.Variant.from_overload(node.overload).extras
    named = {e: tensors[name] for e, name in zip(extras, node.input[3:])}
    return mod.decode(tensors[node.input[1]], tensors[node.input[2]], **named, **attrs)


def _twin_weights(twin, consumer):
    """The dense twin's single ``consumer`` node and its initializer inputs, in input order."""
    (node,) = twin.graph.node
    assert node.op_type == consumer
    inits = {i.name: numpy_helper.to_array(i) for i in twin.graph.initializer}
    return [inits[name] for name in node.input if name in inits]


def _decompressed(vq):
    return ir.serde.serialize_model(onnxvq.decompress(vq))


def _random_weights(model, names, seed):
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        if init.name in names:
            shape = tuple(init.dims)
            init.CopyFrom(numpy_helper.from_array((0.5 * rng.standard_normal(shape)).astype(np.float32), init.name))


def _compress(dense, method, k_exp, d, scales):
    """The compressed model, or None when the encoder kept the layer dense (with its reason)."""
    options = {"rank": 1} if method == "lr2vq" else {}
    result = onnxvq.compress(dense, method=method, k=2**k_exp, d=d, scales=scales, min_size=0, **options)
    (report,) = result.summary.layers
    if not report.compressed:
        assert "would not be smaller" in report.rule, report.rule
        return None
    return result.to_proto()


@settings(FUZZ, max_examples=200)
@given(case=recurrent_cases(), coding=RECURRENT_CODINGS, seed=st.integers(0, 2**16))
def test_recurrent_body_agreement(case, coding, seed):
    k, d, opset, extras, codebook_dtype = coding
    case = (*case, opset)
    op = case[1]
    vq, dense, feeds, joined = test_recurrent_ops.build(
        case, k, d, seed=seed, extras=extras, codebook_dtype=codebook_dtype
    )
    np.testing.assert_array_equal(_decode(op, vq), joined)
    twin = _decompressed(vq)
    w, r, *_ = _twin_weights(twin, op.CONSUMER)
    expected_w, expected_r = op.split(joined)
    np.testing.assert_array_equal(w, expected_w)
    np.testing.assert_array_equal(r, expected_r)
    test_recurrent_ops.assert_forms_agree(vq, dense, feeds, case, twin=twin)


@settings(FUZZ, max_examples=100)
@given(
    case=recurrent_cases(), opset=RECURRENT_OPSETS, method=st.sampled_from(sorted(METHOD_EXTRAS)),
    scales=st.sampled_from(["on", "off"]), k_exp=st.integers(1, 6), d=st.integers(1, 6),
)
def test_recurrent_compress_equals_decompressed_twin(case, opset, method, scales, k_exp, d):
    """The real encoders on random W and R: the compressed model equals its decompressed twin in
    each runtime (onnx.reference alone for layout=1), and its decode is the twin's W and R."""
    case = (*case, opset)
    op = case[1]
    _, dense, feeds, _ = test_recurrent_ops.build(case, 2, 1)
    _random_weights(dense, {"W", "R"}, k_exp)
    vq = _compress(dense, method, k_exp, d, scales)
    if vq is None:
        return
    (node,) = vq.graph.node
    assert (node.domain, node.op_type) == (ops.DOMAIN, op.OP_TYPE)
    twin = _decompressed(vq)
    w, r, *_ = _twin_weights(twin, op.CONSUMER)
    np.testing.assert_array_equal(np.concatenate([w, r], axis=-1), _decode(op, vq))
    test_recurrent_ops.assert_forms_agree(vq, twin, feeds, case, atol=1e-4)


@settings(FUZZ, max_examples=150)
@given(case=gather_cases(), coding=codings(), seed=st.integers(0, 2**16))
def test_gather_body_agreement(case, coding, seed):
    k, d, opset, extras, codebook_dtype = coding
    vq, dense, indices, table = test_gather.build(case, k, d, opset, extras, seed=seed, codebook_dtype=codebook_dtype)
    np.testing.assert_array_equal(_decode(vq_gather, vq), table)
    twin = _decompressed(vq)
    (twin_table,) = _twin_weights(twin, vq_gather.CONSUMER)
    np.testing.assert_array_equal(twin_table, table)
    test_gather.assert_forms_agree(vq, dense, indices, table, twin=twin)


@settings(FUZZ, max_examples=100)
@given(
    case=gather_cases(), opset=OPSETS, method=st.sampled_from(sorted(METHOD_EXTRAS)),
    scales=st.sampled_from(["on", "off"]), k_exp=st.integers(1, 6), d=st.integers(1, 6),
)
def test_gather_compress_equals_decompressed_twin(case, opset, method, scales, k_exp, d):
    """The real encoders on a random table: the compressed lookup equals its decompressed twin
    in onnxruntime and onnx.reference, and its decode is the twin's table."""
    _, dense, indices, _ = test_gather.build(case, 2, 1, opset)
    _random_weights(dense, {"table"}, k_exp)
    vq = _compress(dense, method, k_exp, d, scales)
    if vq is None:
        return
    (node,) = vq.graph.node
    assert (node.domain, node.op_type) == (ops.DOMAIN, vq_gather.OP_TYPE)
    twin = _decompressed(vq)
    (table,) = _twin_weights(twin, vq_gather.CONSUMER)
    np.testing.assert_array_equal(_decode(vq_gather, vq), table)
    test_gather.assert_forms_agree(vq, twin, indices, table)
