"""VQGather: an embedding table decoded row by row for the indices a run reads."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxvq
from models import lstm_model, make_model, random_encoding, rng, run_ort, tied_embedding_model
from onnxvq import ops
from onnxvq.candidates import find_layers
from onnxvq.layout import WeightLayout
from onnxvq.ops import vq_gather
from onnxvq.ops.codes import code_bits_for_k, pack_codes

CODINGS = [(16, 4, 11), (5, 3, 13), (256, 5, 17), (300, 4, 21)]
EXTRAS = [(), ("scales",), ("signs",), ("projection", "signs", "scales")]


def build(case, k, d, opset, extras=(), *, seed=0, codebook_dtype=np.float16):
    """(VQGather model, dense Gather twin, indices, table) for one conformance case."""
    name, shape, index_shape, attrs, _ = case
    r = np.random.default_rng(seed)
    lay = WeightLayout(shape, False, 1, d)
    codes, codebook, table, stored = random_encoding(r, lay, k, d, extras, codebook_dtype)
    bits = code_bits_for_k(k)
    packed = pack_codes(codes, bits)
    variant = ops.Variant.of(code_bits=bits, codes_shape=packed.shape, d=d, weight_shape=shape, transposed=False,
                             extras=tuple(stored))
    indices = r.integers(-shape[0], shape[0], index_shape).astype(np.int64)  # negatives count from the end
    inits = [numpy_helper.from_array(packed, "codes"), numpy_helper.from_array(codebook, "codebook")]
    inits += [numpy_helper.from_array(a, n) for n, a in stored.items()]
    node = helper.make_node(
        "VQGather", ["indices", "codes", "codebook", *stored], ["Y"], domain=ops.DOMAIN,
        weight_shape=numpy_helper.from_array(np.array(shape, np.int64)), weight_dtype=TensorProto.FLOAT,
        code_bits=bits, method="pq", extra_inputs=",".join(stored), **attrs,
    )
    node.overload = variant.overload
    i_info = [helper.make_tensor_value_info("indices", TensorProto.INT64, list(index_shape))]
    y_info = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)]
    vq = helper.make_model(
        helper.make_graph([node], name, i_info, y_info, inits),
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(ops.DOMAIN, 1)],
        functions=[vq_gather.function(variant, opset)], ir_version=10,
    )
    dense = helper.make_model(
        helper.make_graph([helper.make_node("Gather", ["table", "indices"], ["Y"], **attrs)], name, i_info, y_info,
                          [numpy_helper.from_array(table, "table")]),
        opset_imports=[helper.make_opsetid("", opset)], ir_version=10,
    )
    return vq, dense, indices, table


@pytest.mark.parametrize("extras", EXTRAS, ids=lambda e: "+".join(e) or "plain")
@pytest.mark.parametrize("k, d, opset", CODINGS, ids=str)
@pytest.mark.parametrize("case", vq_gather.CASES, ids=[c[0] for c in vq_gather.CASES])
def test_gather_forms_agree(case, k, d, opset, extras):
    """numpy kernel = onnx.reference on the body = onnxruntime folded and not = the dense Gather."""
    vq, dense, indices, table = build(case, k, d, opset, extras)
    assert_forms_agree(vq, dense, indices, table)


def assert_forms_agree(vq, dense, indices, table, *, twin=None):
    """numpy kernel = onnx.reference on the body = onnxruntime folded and not = the dense Gather
    (= ``twin``, a decompressed model, in onnxruntime and onnx.reference, when given)."""
    feeds = {"indices": indices}
    expected = np.take(table, indices, axis=0)
    np.testing.assert_allclose(run_ort(dense, feeds)[0], expected, rtol=1e-6)
    without_functions = onnx.ModelProto()
    without_functions.CopyFrom(vq)
    del without_functions.functions[:]
    runs = [
        ReferenceEvaluator(without_functions, new_ops=ops.reference_ops()).run(None, feeds)[0],
        ReferenceEvaluator(ops.inline_bodies(vq)).run(None, feeds)[0],
        run_ort(vq, feeds)[0],
        run_ort(vq, feeds, disabled_optimizers=["ConstantFolding"])[0],
    ]
    if twin is not None:
        runs += [run_ort(twin, feeds)[0], ReferenceEvaluator(twin).run(None, feeds)[0]]
    for got in runs:
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_the_body_reads_only_the_requested_rows():
    """No op of the body touches the whole table's decoded size: codes are gathered first."""
    vq, _, _, _ = build(vq_gather.CASES[0], 256, 4, 17, ("signs", "scales"))
    body = vq.functions[0]
    first_gather = next(n for n in body.node if n.op_type == "Gather" and "codes" in n.input)
    assert list(first_gather.input) == ["codes", "at"]
    assert not any(n.op_type == "Reshape" and "wshape" in n.input for n in body.node)


def test_the_text_encoder_sample_has_its_30k_table_encoded_and_runs():
    """samples/text_encoder.py (one block, to keep the test short): the 30,000 x 512 token table
    becomes a VQGather; the model runs in onnxruntime, folded and not, and equals its
    decompressed twin."""
    from text_encoder import build_text_encoder

    original = build_text_encoder(depth=1)
    layers, _ = find_layers(ir.serde.deserialize_model(original))
    assert ("embeddings.token_lookup", "Gather", (30000, 512)) in [(l.name, l.op_type, l.weight_shape) for l in layers]
    result = onnxvq.compress(original, k=256, d=8)
    compressed = result.to_proto()
    assert any(n.op_type == "VQGather" for n in compressed.graph.node)
    assert "embeddings.tokens" not in {i.name for i in compressed.graph.initializer}
    assert len(original.SerializeToString()) / len(compressed.SerializeToString()) > 10
    feeds = {"input_ids": rng(3).integers(0, 30000, (4, 16)).astype(np.int64)}
    got = run_ort(compressed, feeds)[0]
    twin = ir.serde.serialize_model(onnxvq.decompress(compressed))
    assert [n.op_type for n in twin.graph.node][:1] == ["Gather"]
    np.testing.assert_allclose(got, run_ort(twin, feeds)[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, run_ort(compressed, feeds, disabled_optimizers=["ConstantFolding"])[0],
                               rtol=1e-4, atol=1e-5)


def test_gathers_that_are_not_tables_are_not_layers():
    shape_gather = helper.make_node("Gather", ["shape", "zero"], ["n"], name="shape_gather")
    model = make_model(
        [helper.make_node("Shape", ["x"], ["shape"]), shape_gather,
         helper.make_node("Gather", ["x", "col"], ["picked"], name="column", axis=1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("n", TensorProto.INT64, []),
         helper.make_tensor_value_info("picked", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(np.array([1], np.int64), "col")],
    )
    layers, left = find_layers(ir.serde.deserialize_model(model))
    assert not layers and not left  # index and shape gathers are nobody's business


def test_a_tied_embedding_is_encoded_once_for_the_lookup_and_the_output_projection():
    """Gather(E, tokens) and Gemm(h, E, transB=1) read E with the same rows: one encoding."""
    model = tied_embedding_model()
    result = onnxvq.compress(model, k=256, d=4)
    compressed = result.to_proto()
    assert sorted(n.op_type for n in compressed.graph.node) == ["VQGather", "VQGemm"]
    assert [l.shared_with for l in result.summary.layers] == [None, "embed"]
    names = [i.name for i in compressed.graph.initializer]  # one set of encoded tensors (scales when chosen)
    assert names[:2] == ["E.vq_codes", "E.vq_codebook"] and set(names[2:]) <= {"E.vq_scales"}
    feeds = {"tokens": rng(5).integers(0, 2048, (9,)).astype(np.int64)}
    twin = ir.serde.serialize_model(onnxvq.decompress(compressed))
    np.testing.assert_allclose(run_ort(compressed, feeds)[0], run_ort(twin, feeds)[0], rtol=1e-5, atol=1e-5)


def _table_then_upsampler() -> onnx.ModelProto:
    """tokens (2, 6) -> Gather from a 512 x 24 table ("embed") -> (B, 24, T) -> ConvTranspose
    24 -> 16, kernel 2, stride 2 ("up")."""
    table = (0.1 * rng(6).standard_normal((512, 24))).astype(np.float32)
    up = (0.1 * rng(7).standard_normal((24, 16, 2))).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "tokens"], ["embedded"], name="embed"),  # (B, T, 24)
        helper.make_node("Transpose", ["embedded"], ["channels"], perm=[0, 2, 1]),
        helper.make_node("ConvTranspose", ["channels", "U"], ["y"], name="up", strides=[2]),
    ]
    return make_model(
        nodes, [helper.make_tensor_value_info("tokens", TensorProto.INT64, [2, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(table, "E"), numpy_helper.from_array(up, "U")],
    )


@pytest.mark.parametrize("method, params", [("lr2vq", {"k": 64, "d": 8}), ("ssvq", {"k": 16, "d": 8})])
def test_every_method_encodes_a_table_and_a_conv_transpose(method, params):
    model = _table_then_upsampler()
    result = onnxvq.compress(model, method=method, min_size=0, **params)
    assert all(l.compressed and l.method == method for l in result.summary.layers)
    compressed = result.to_proto()
    assert sorted(n.op_type for n in compressed.graph.node if n.domain == ops.DOMAIN) == ["VQConvTranspose", "VQGather"]
    feeds = {"tokens": rng(8).integers(0, 512, (2, 6)).astype(np.int64)}
    twin = ir.serde.serialize_model(onnxvq.decompress(compressed))
    np.testing.assert_allclose(run_ort(compressed, feeds)[0], run_ort(twin, feeds)[0], rtol=1e-5, atol=1e-5)


def test_per_layer_config_keys_by_the_new_op_types():
    """``layers`` keys ``Gather``, ``ConvTranspose`` and ``LSTM`` pick each op's settings."""
    model = _table_then_upsampler()
    config = {"min_size": 0, "k": 64, "d": 4,
              "layers": {"Gather": {"k": 16, "d": 2}, "ConvTranspose": {"skip": True}}}
    by_name = {l.name: l for l in onnxvq.compress(model, config).summary.layers}
    assert (by_name["embed"].k, by_name["embed"].d) == (16, 2)
    assert not by_name["up"].compressed
    lstm = onnxvq.compress(lstm_model(), {"min_size": 0, "layers": {"LSTM": {"k": 32, "d": 3}}})
    (layer,) = lstm.summary.layers
    assert layer.op_type == "LSTM" and (layer.k, layer.d) == (32, 3)
