"""compress / decompress end to end on models built in code."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxvq
from models import cnn, make_model, mlp, rng, run_ort, weight
from onnxvq import model_io, ops
from onnxvq.errors import OnnxVQError


def proto(result_or_model) -> onnx.ModelProto:
    if isinstance(result_or_model, onnxvq.CompressResult):
        return result_or_model.to_proto()
    return ir.serde.serialize_model(result_or_model)


def twin_outputs(compressed: onnx.ModelProto, feeds):
    return run_ort(proto(onnxvq.decompress(compressed)), feeds)


def assert_same_io(a: onnx.ModelProto, b: onnx.ModelProto):
    assert [i.SerializeToString() for i in a.graph.input] == [i.SerializeToString() for i in b.graph.input]
    assert [o.SerializeToString() for o in a.graph.output] == [o.SerializeToString() for o in b.graph.output]


CNN_FEEDS = {"x": rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)}


def test_cnn_runs_in_plain_ort_and_equals_its_decompressed_twin():
    original = cnn()
    result = onnxvq.compress(original, k=256, d=4, min_size=0)
    compressed = result.to_proto()
    onnx.checker.check_model(compressed, full_check=True)
    assert_same_io(original, compressed)
    assert {n.op_type for n in compressed.graph.node if n.domain == ops.DOMAIN} == {"VQConv", "VQGemm", "VQMatMul"}
    got = run_ort(compressed, CNN_FEEDS)[0]
    np.testing.assert_allclose(got, twin_outputs(compressed, CNN_FEEDS)[0], rtol=1e-5, atol=1e-5)
    # and the compressed model is a close approximation of the original
    reference = run_ort(original, CNN_FEEDS)[0]
    assert np.abs(got - reference).max() < 0.5 * np.abs(reference).max()
    assert all(l.sqnr_db > 5 for l in result.summary.layers if l.compressed)


def _codebook_built_mlp(k=16, d=4):
    """An MLP whose weights are exactly codewords of known fp16-representable codebooks."""
    r = rng(7)
    nodes, inits = [], []
    sizes = (32, 48, 24)
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        codebook = np.round(r.standard_normal((k, d)) * 8) / 8  # exact in float16
        w = codebook[r.integers(0, k, (n_out, n_in // d))].reshape(n_out, n_in).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Gemm", ["x" if i == 0 else "h0", f"w{i}"], ["h0" if i == 0 else "y"], name=f"fc{i}", transB=1))
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 24])],
        inits,
    )


def test_weights_built_from_a_codebook_are_recovered_exactly():
    original = _codebook_built_mlp()
    result = onnxvq.compress(original, k=16, d=4, min_size=0)
    assert all(l.sqnr_db == float("inf") for l in result.summary.layers)
    dense = proto(onnxvq.decompress(result.to_proto()))
    for a, b in zip(original.graph.initializer, sorted(dense.graph.initializer, key=lambda t: t.name)):
        assert a.name == b.name
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    x = {"x": rng(2).standard_normal((5, 32)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(result.to_proto(), x)[0], run_ort(original, x)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mod,case", [(m, c) for m in (ops.vq_conv, ops.vq_gemm, ops.vq_matmul) for c in m.CASES]
                         + [(ops.vq_conv_transpose, c) for c in ops.vq_conv_transpose.CASES
                            + ops.vq_conv_transpose.GROUPED_CASES],
                         ids=lambda v: v[0] if isinstance(v, tuple) else "")
def test_every_op_form_through_compress(mod, case):
    """One-node models of every Conv/ConvTranspose/Gemm/MatMul form, compressed by the real pipeline."""
    name, wshape, xshape, attrs, bias = case
    w = weight(wshape, 3)
    inputs = ["W", "X"] if attrs.get("weight_left") else ["X", "W"]
    inits = [numpy_helper.from_array(w, "W")]
    if bias:
        bshape = (wshape[0],) if bias is True else bias
        inputs.append("B")
        inits.append(numpy_helper.from_array(weight((*bshape, 1), 4)[..., 0], "B"))
    node_attrs = {a: v for a, v in attrs.items() if a != "weight_left"}
    model = make_model(
        [helper.make_node(mod.CONSUMER, inputs, ["Y"], name=name, **node_attrs)],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(xshape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        inits,
    )
    result = onnxvq.compress(model, k=16, d=3, min_size=0)
    assert result.summary.layers[0].compressed, result.summary.layers[0].rule
    compressed = result.to_proto()
    feeds = {"X": rng(5).standard_normal(xshape).astype(np.float32)}
    got = run_ort(compressed, feeds)[0]
    np.testing.assert_allclose(got, twin_outputs(compressed, feeds)[0], rtol=1e-5, atol=1e-5)
    assert got.shape == run_ort(model, feeds)[0].shape


def test_constant_node_weights_are_compressed_and_the_constants_removed():
    original = cnn(conv_weights_as_constants=True)
    result = onnxvq.compress(original, k=64, d=4, min_size=0)
    compressed = result.to_proto()
    assert not [n for n in compressed.graph.node if n.op_type == "Constant"]
    assert {l.name for l in result.summary.layers if l.compressed} >= {"conv1", "conv2"}
    np.testing.assert_allclose(run_ort(compressed, CNN_FEEDS)[0], twin_outputs(compressed, CNN_FEEDS)[0], rtol=1e-5, atol=1e-5)


def _shared_weight_model(with_gather=False):
    w = weight((64, 64), 11)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="first"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W"], ["y"], name="second"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])]
    if with_gather:
        nodes.append(helper.make_node("Gather", ["W", "ids"], ["emb"], name="embed"))
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["T"]))
        outputs.append(helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["T", 64]))
    return make_model(nodes, inputs, outputs, [numpy_helper.from_array(w, "W")])


def test_shared_weight_is_encoded_once():
    result = onnxvq.compress(_shared_weight_model(), k=32, d=4)
    compressed = result.to_proto()
    vq_nodes = [n for n in compressed.graph.node if n.domain == ops.DOMAIN]
    assert len(vq_nodes) == 2
    assert vq_nodes[0].input[1:3] == vq_nodes[1].input[1:3]
    assert [i.name for i in compressed.graph.initializer] == ["W.vq_codes", "W.vq_codebook"]
    first, second = result.summary.layers
    assert second.shared_with == "first" and len(result.summary.compressed_layers) == 1
    feeds = {"x": rng(3).standard_normal((4, 64)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(compressed, feeds)[0], twin_outputs(compressed, feeds)[0], rtol=1e-5, atol=1e-5)


def test_weight_also_read_by_another_op_is_left_alone():
    model = _shared_weight_model()
    model.graph.node.append(helper.make_node("ReduceSum", ["W"], ["total"], name="norm", keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, None))
    result = onnxvq.compress(model, k=32, d=4)
    assert not any(l.compressed for l in result.summary.layers)
    reasons = {l["name"]: l["reason"] for l in result.summary.left_alone}
    assert "also read by ReduceSum node 'norm'" in reasons["first"]


def test_a_table_shared_with_matmuls_in_another_layout_is_left_alone():
    """A Gather's table rows are its rows; a right MatMul weight's rows are its columns."""
    result = onnxvq.compress(_shared_weight_model(with_gather=True), k=32, d=4)
    assert not any(l.compressed for l in result.summary.layers)
    reasons = {l["name"]: l["reason"] for l in result.summary.left_alone}
    assert "read the shared weight 'W' in different layouts" in reasons["embed"]


def test_external_data_in_and_out(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save_model(mlp((64, 256, 256, 10)), src, save_as_external_data=True,
                    all_tensors_to_one_file=True, location="in.onnx.data", size_threshold=0)
    before = hashlib.sha256((tmp_path / "in.onnx.data").read_bytes()).hexdigest()
    result = onnxvq.compress(str(src), k=64, d=4)
    out = tmp_path / "out.onnx"
    written = result.save(out, external_data=True)
    assert written == [str(out), str(tmp_path / "out.onnx.data")]
    single = tmp_path / "single.onnx"
    assert result.save(single, external_data=False) == [str(single)]
    feeds = {"x": rng(4).standard_normal((3, 64)).astype(np.float32)}
    a = run_ort(str(out), feeds)[0]
    np.testing.assert_array_equal(a, run_ort(str(single), feeds)[0])
    np.testing.assert_allclose(a, twin_outputs(onnx.load(single), feeds)[0], rtol=1e-5, atol=1e-5)
    assert hashlib.sha256((tmp_path / "in.onnx.data").read_bytes()).hexdigest() == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".onnxvq-")]


def test_auto_external_data_over_the_protobuf_limit(tmp_path, monkeypatch):
    # A real >2 GiB model is too slow for CI; the decision is the same with a lowered limit.
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 1000)
    result = onnxvq.compress(mlp(), k=16, d=4, min_size=10**9)  # nothing compressed: stays big
    written = result.save(tmp_path / "big.onnx")
    assert written[1].endswith("big.onnx.data")
    with pytest.raises(OnnxVQError, match="2 GiB"):
        result.save(tmp_path / "single.onnx", external_data=False)


def test_metadata_doc_strings_and_producer_are_preserved():
    original = cnn()
    original.producer_name, original.producer_version = "my-exporter", "9.9"
    original.domain, original.model_version, original.doc_string = "com.example", 42, "model doc"
    original.graph.doc_string = "graph doc"
    original.graph.node[0].doc_string = "conv1 doc"
    helper.set_model_props(original, {"labels": '["cat", "dog"]', "author": "me"})
    compressed = onnxvq.compress(original, k=64, d=4, min_size=0).to_proto()
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        assert getattr(compressed, field) == getattr(original, field)
    assert compressed.graph.doc_string == "graph doc" and compressed.graph.name == original.graph.name
    assert compressed.graph.node[0].doc_string == "conv1 doc" and compressed.graph.node[0].name == "conv1"
    props = {p.key: p.value for p in compressed.metadata_props}
    assert props["labels"] == '["cat", "dog"]' and props["author"] == "me"
    assert set(props) == {"labels", "author", onnxvq.api.PROVENANCE_KEY}
    assert_same_io(original, compressed)
    # decompress drops only the provenance and restores the IR version
    dense = proto(onnxvq.decompress(compressed))
    assert {p.key: p.value for p in dense.metadata_props} == {"labels": '["cat", "dog"]', "author": "me"}
    assert dense.ir_version == original.ir_version
    assert not dense.functions and {o.domain for o in dense.opset_import} == {""}


@pytest.mark.parametrize("opset", [11, 13, 18, 21])
def test_model_opsets_are_kept(opset):
    original = cnn(opset=opset)
    compressed = onnxvq.compress(original, k=64, d=4, min_size=0).to_proto()
    assert {o.domain: o.version for o in compressed.opset_import} == {"": opset, ops.DOMAIN: 1}
    assert compressed.ir_version >= 10
    np.testing.assert_allclose(run_ort(compressed, CNN_FEEDS)[0], twin_outputs(compressed, CNN_FEEDS)[0], rtol=1e-5, atol=1e-5)


def test_opset_below_11_is_refused():
    with pytest.raises(OnnxVQError, match="older than 11"):
        onnxvq.compress(cnn(opset=10))


def test_nodes_inside_if_branches_are_compressed():
    w_then, w_else = weight((32, 64), 20), weight((32, 64), 21)
    then_graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w_then"], ["y_then"], name="then_fc", transB=1)],
        "then", [], [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, ["N", 32])],
        [numpy_helper.from_array(w_then, "w_then")],  # a subgraph initializer
    )
    else_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_else_t"], ["y_else"], name="else_fc")],
        "else", [], [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, ["N", 32])],
    )
    model = make_model(
        [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [numpy_helper.from_array(w_else.T.copy(), "w_else_t")],  # outer-scope weight
    )
    result = onnxvq.compress(model, k=32, d=4)
    assert {l.name for l in result.summary.layers if l.compressed} == {"then_fc", "else_fc"}
    compressed = result.to_proto()
    x = rng(6).standard_normal((3, 64)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        np.testing.assert_allclose(run_ort(compressed, feeds)[0], twin_outputs(compressed, feeds)[0], rtol=1e-5, atol=1e-5)


def test_float16_model():
    model = mlp((64, 128, 10))
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    compressed = onnxvq.compress(model, k=64, d=4).to_proto()
    feeds = {"x": rng(8).standard_normal((2, 64)).astype(np.float16)}
    got = run_ort(compressed, feeds)[0]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got, twin_outputs(compressed, feeds)[0], rtol=1e-3, atol=1e-3)


def _weight_dominated_model():
    return mlp((256, 512, 512, 512, 10), seed=3)


@pytest.mark.parametrize("d,min_ratio", [(4, 10), (8, 20)])
def test_file_is_10x_smaller_at_d4_and_20x_at_d8(tmp_path, d, min_ratio):
    src = tmp_path / "m.onnx"
    onnx.save(_weight_dominated_model(), src)
    out = tmp_path / "m.vq.onnx"
    onnxvq.compress(str(src), k=256, d=d).save(out)
    ratio = os.path.getsize(src) / os.path.getsize(out)
    assert ratio >= min_ratio, ratio


def test_same_seed_same_bytes_other_seed_other_bytes():
    model = _weight_dominated_model()
    a = onnxvq.compress(model, k=64, d=4, seed=1).to_proto().SerializeToString()
    b = onnxvq.compress(model, k=64, d=4, seed=1).to_proto().SerializeToString()
    c = onnxvq.compress(model, k=64, d=4, seed=2).to_proto().SerializeToString()
    assert a == b and a != c


def test_inputs_are_never_modified(tmp_path):
    model = cnn()
    before = model.SerializeToString()
    onnxvq.compress(model, k=16, d=4, min_size=0)
    assert model.SerializeToString() == before
    ir_model = ir.serde.deserialize_model(model)
    ir_before = ir.serde.serialize_model(ir_model).SerializeToString()
    onnxvq.compress(ir_model, k=16, d=4, min_size=0)
    assert ir.serde.serialize_model(ir_model).SerializeToString() == ir_before


def test_k_is_capped_by_the_number_of_subvectors():
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="small")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 100])],
        [numpy_helper.from_array(weight((40, 100), 9), "W")],
    )
    result = onnxvq.compress(model, k=256, d=40, min_size=0)  # 100 rows x 1 subvector
    (layer,) = result.summary.layers
    assert layer.compressed and layer.k == 100 and layer.code_bits == 8


def test_layer_that_would_not_shrink_stays_dense():
    # 16-bit codes for single weights plus a float32 codebook: bigger than the dense weight
    result = onnxvq.compress(cnn(), k=1000, d=1, min_size=0, codebook_dtype="float32")
    conv1 = next(l for l in result.summary.layers if l.name == "conv1")  # 864 weights
    assert not conv1.compressed and "would not be smaller" in conv1.rule


def test_nan_weights_are_refused():
    model = mlp()
    bad = numpy_helper.to_array(model.graph.initializer[0]).copy()
    bad[0, 0] = np.nan
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(bad, model.graph.initializer[0].name))
    with pytest.raises(OnnxVQError, match="contains NaN or Inf"):
        onnxvq.compress(model)


def test_already_compressed_is_refused():
    compressed = onnxvq.compress(cnn(), k=16, d=4, min_size=0).to_proto()
    with pytest.raises(OnnxVQError, match="already compressed"):
        onnxvq.compress(compressed)


def test_provenance_records_the_resolved_config():
    import json

    result = onnxvq.compress(cnn(), k=64, d=4, min_size=0, layers={"conv1": {"k": 16}})
    record = json.loads(result.model.metadata_props[onnxvq.api.PROVENANCE_KEY])
    assert record["config"]["k"] == 64
    assert record["layers"]["conv1"] == {"method": "pq", "k": 16, "d": 4, "rule": "layers['conv1']", "scales": True}


def test_conv_transpose_with_calibration_is_fine_tuned_end_to_end():
    """ConvTranspose rows are input channels, so calibration does not capture it; e2e trains it."""
    w, b = weight((16, 8, 2, 2), 1), weight((8, 1), 2)[:, 0]
    model = make_model(
        [helper.make_node("ConvTranspose", ["X", "W", "B"], ["Y"], name="up", strides=[2, 2])],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 16, 6, 6])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 8, 12, 12])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    calib = [{"X": rng(70 + i).standard_normal((2, 16, 6, 6)).astype(np.float32)} for i in range(10)]
    result = onnxvq.compress(model, k=16, d=4, min_size=0, calib=calib, finetune={"mode": "e2e", "steps": 40, "lr": 1e-2})
    record = result.summary.calibration
    assert record["mode"] == "e2e" and result.summary.layers[0].compressed
    assert record["quality"]["fine-tuned"].sqnr_db > record["quality"]["encoded"].sqnr_db
    compressed = result.to_proto()
    assert [n.op_type for n in compressed.graph.node] == ["VQConvTranspose"]
    feeds = {"X": calib[0]["X"]}
    np.testing.assert_allclose(run_ort(compressed, feeds)[0], twin_outputs(compressed, feeds)[0], rtol=1e-5, atol=1e-5)
