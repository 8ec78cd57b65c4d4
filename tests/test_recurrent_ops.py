"""VQLSTM / VQGRU / VQRNN: numpy decode + onnx's reference op = onnx.reference on the function
body = onnxruntime on the body (folded and not) = the dense twin in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from models import random_encoding, run_ort
from onnxvq import ops
from onnxvq.layout import WeightLayout, join_recurrent
from onnxvq.ops import vq_recurrent
from onnxvq.ops.codes import code_bits_for_k, pack_codes

# (name, op, directions, hidden, input size, optional inputs present, attributes, outputs used, opset)
CASES = [
    ("lstm_forward_bias", vq_recurrent.LSTM, 1, 8, 5, ("B",), {}, ("Y",), 13),
    ("lstm_bidirectional_states", vq_recurrent.LSTM, 2, 6, 7, ("B", "sequence_lens", "initial_h", "initial_c"),
     {"direction": "bidirectional"}, ("Y", "Y_h", "Y_c"), 11),
    ("lstm_peepholes_no_bias", vq_recurrent.LSTM, 1, 4, 3, ("", "", "", "", "P"), {"input_forget": 1}, ("Y",), 13),
    ("lstm_batch_first_last_state", vq_recurrent.LSTM, 2, 5, 4, ("B",), {"direction": "bidirectional", "layout": 1},
     ("", "Y_h"), 14),
    ("gru_reverse_linear_before_reset", vq_recurrent.GRU, 1, 6, 5, ("B", "", "initial_h"),
     {"direction": "reverse", "linear_before_reset": 1}, ("Y", "Y_h"), 13),
    ("gru_activations", vq_recurrent.GRU, 2, 4, 6, ("B",),
     {"direction": "bidirectional", "activations": ["HardSigmoid", "Tanh", "HardSigmoid", "Tanh"],
      "activation_alpha": [0.3, 0.0, 0.3, 0.0], "activation_beta": [0.4, 0.0, 0.4, 0.0]}, ("Y",), 13),
    ("rnn_clip_initial_state", vq_recurrent.RNN, 1, 7, 3, ("B", "", "initial_h"), {"clip": 2.0}, ("Y", "Y_h"), 13),
    ("rnn_bidirectional", vq_recurrent.RNN, 2, 4, 5, (), {"direction": "bidirectional"}, ("Y",), 13),
]
SEQ, BATCH = 5, 3


def build(case, k, d, *, seed=0, scales=False, extras=None, codebook_dtype=np.float16):
    """(VQ model, dense twin, feeds, joined dense weight) for one case; ``extras`` adds a rank-2 ``projection``, packed ``signs`` and/or per-row
    ``scales`` (as ``test_ops.build`` does), ``scales=True`` is ``extras=("scales",)``."""
    name, op, dirs, hidden, isize, optional, attrs, outputs, opset = case
    if extras is None:
        extras = ("scales",) if scales else ()
    rng = np.random.default_rng(seed)
    shape = (dirs, op.gates * hidden, isize + hidden)
    lay = WeightLayout(shape, False, 2, d)
    codes, codebook, matrix, stored_extras = random_encoding(  # scales per gate unit
        rng, lay, k, d, extras, codebook_dtype, codebook_scale=0.4, scale_decades=(-1, 0.5))
    joined = matrix.reshape(shape)
    w, r = op.split(joined)
    batch_first = attrs.get("layout", 0) == 1
    x = rng.standard_normal((BATCH, SEQ, isize) if batch_first else (SEQ, BATCH, isize)).astype(np.float32)
    state = (BATCH, dirs, hidden) if batch_first else (dirs, BATCH, hidden)
    optional_values = {
        "B": rng.standard_normal((dirs, 2 * op.gates * hidden)).astype(np.float32),
        "sequence_lens": np.array([SEQ, SEQ - 2, 1][:BATCH], np.int32),
        "initial_h": rng.standard_normal(state).astype(np.float32),
        "initial_c": rng.standard_normal(state).astype(np.float32),
        "P": rng.standard_normal((dirs, 3 * hidden)).astype(np.float32),
    }
    present = {n: optional_values[n] for n in optional if n}
    bits = code_bits_for_k(k)
    stored = pack_codes(codes, bits)
    variant = ops.Variant.of(code_bits=bits, codes_shape=stored.shape, d=d, weight_shape=shape, transposed=False,
                             extras=tuple(stored_extras))
    inits = [numpy_helper.from_array(stored, "codes"), numpy_helper.from_array(codebook, "codebook")]
    inits += [numpy_helper.from_array(a, n) for n, a in stored_extras.items()]
    inits += [numpy_helper.from_array(a, n) for n, a in present.items()]
    out_infos = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs if o]
    x_info = [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x.shape))]
    node = helper.make_node(
        # a VQ recurrent node declares every output of its body; those not used are left unnamed
        op.OP_TYPE, ["X", "codes", "codebook", *stored_extras, *optional],
        list(outputs) + [""] * (len(op.outputs) - len(outputs)), domain=ops.DOMAIN,
        weight_shape=numpy_helper.from_array(np.array(shape, np.int64)), weight_dtype=TensorProto.FLOAT,
        code_bits=bits, method="pq", extra_inputs=",".join(stored_extras), hidden_size=hidden, **attrs,
    )
    node.overload = variant.overload
    vq = helper.make_model(
        helper.make_graph([node], name, x_info, out_infos, inits),
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(ops.DOMAIN, 1)],
        functions=[op.function(variant, opset)], ir_version=10,
    )
    dense_node = helper.make_node(op.CONSUMER, ["X", "W", "R", *optional], list(outputs), hidden_size=hidden, **attrs)
    dense_inits = [numpy_helper.from_array(w.copy(), "W"), numpy_helper.from_array(r.copy(), "R")]
    dense_inits += [numpy_helper.from_array(a, n) for n, a in present.items()]
    dense = helper.make_model(
        helper.make_graph([dense_node], name, x_info, out_infos, dense_inits),
        opset_imports=[helper.make_opsetid("", opset)], ir_version=10,
    )
    return vq, dense, {"X": x}, joined


def assert_forms_agree(vq, dense, feeds, case, *, twin=None, rtol=1e-4, atol=1e-5):
    """Each runtime against its own dense twin: the numpy kernel and the inlined body in
    onnx.reference against ``dense`` in onnx.reference; the body in onnxruntime, folded and not,
    against ``dense`` in onnxruntime. onnx's reference LSTM differs from onnxruntime's on
    bidirectional and peephole cases (and ignores activations, clip, sequence_lens), and
    onnxruntime does not run layout=1 at all, so it is left out there. ``twin`` (a decompressed
    model) is held to ``dense`` in each runtime as well."""
    n_outputs = len([o for o in case[7] if o])
    without_functions = onnx.ModelProto()
    without_functions.CopyFrom(vq)
    del without_functions.functions[:]
    expected = ReferenceEvaluator(dense).run(None, feeds)
    numpy_kernel = ReferenceEvaluator(without_functions, new_ops=ops.reference_ops()).run(None, feeds)
    inlined = ReferenceEvaluator(ops.inline_bodies(vq)).run(None, feeds)
    runs = [(numpy_kernel, expected), (inlined, expected)]
    if twin is not None:
        runs.append((ReferenceEvaluator(twin).run(None, feeds), expected))
    if case[6].get("layout", 0) == 0:
        expected_ort = run_ort(dense, feeds)
        runs += [(run_ort(vq, feeds), expected_ort),
                 (run_ort(vq, feeds, disabled_optimizers=["ConstantFolding"]), expected_ort)]
        if twin is not None:
            runs.append((run_ort(twin, feeds), expected_ort))
    for ours, theirs in runs:
        assert len(ours) == len(theirs) == n_outputs
        for got, want in zip(ours, theirs):
            assert got.shape == want.shape
            assert np.isfinite(want).all(), "the dense twin overflowed: nothing would be compared"
            scale = max(1.0, float(np.abs(want).max(initial=0.0)))  # Relu/Affine activations grow
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("k, d, scales", [(16, 4, False), (256, 3, True)])
def test_recurrent_forms_agree(case, k, d, scales):
    vq, dense, feeds, _ = build(case, k, d, scales=scales)
    assert_forms_agree(vq, dense, feeds, case)


def test_decode_and_split_rebuild_w_and_r_exactly():
    case = CASES[1]
    vq, dense, _, joined = build(case, 16, 4)
    op = case[1]
    attrs = {a.name: helper.get_attribute_value(a) for a in vq.graph.node[0].attribute}
    attrs["weight_shape"] = numpy_helper.to_array(attrs["weight_shape"])
    tensors = {t.name: numpy_helper.to_array(t) for t in vq.graph.initializer}
    decoded = op.decode(tensors["codes"], tensors["codebook"], **{k: v for k, v in attrs.items() if k in ops.vq_weight.VQ_ATTRIBUTES})
    np.testing.assert_array_equal(decoded, joined)
    w, r = op.split(decoded)
    dense_tensors = {t.name: numpy_helper.to_array(t) for t in dense.graph.initializer}
    np.testing.assert_array_equal(w, dense_tensors["W"])
    np.testing.assert_array_equal(r, dense_tensors["R"])
    np.testing.assert_array_equal(join_recurrent(w, r), joined)
