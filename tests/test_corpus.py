"""The corpus: models as real producers write them (``corpus_models``) compress with every method.

For each producer and method: every Conv/Gemm/MatMul with a constant weight (in the main graph
and in If/Loop bodies) becomes an ``ai.onnxvq`` node; the output passes onnx's checker; inputs,
outputs and the user's model-local functions are kept; onnxruntime loads it and, constant-folded
or not, equals the decompressed twin to float32 rounding (relative 1e-4 of the output's scale;
float16 models to float16's); and the function bodies, inlined (``onnxvq.ops.inline_bodies``),
run in ``onnx.reference`` and equal the twin there too. Then the same at every opset from 11 to
21, and from and to files with external data.

The reference runtime is compared with itself (inlined bodies against the twin), not with
onnxruntime: onnx.reference 1.23 computes some standard ops differently from the spec (e.g.
``BatchNormalization``-9 with a ``momentum`` attribute, as paddle2onnx writes it, uses batch
statistics), which would hide whether the bodies agree.
"""

from __future__ import annotations

import functools
import hashlib
import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx.reference import ReferenceEvaluator

import corpus_models
import onnxvq
from models import run_ort
from onnxvq import ops
from onnxvq.model_io import save_model

METHODS = ("pq", "lr2vq", "ssvq")
PRODUCERS = {
    "torchscript": corpus_models.torchscript_export,
    "dynamo": corpus_models.dynamo_export,
    "onnxscript": corpus_models.onnxscript_model,
    "onnx_helper": functools.partial(corpus_models.helper_control_flow, 17),
    "paddle2onnx": corpus_models.paddle2onnx_style,
    "tf2onnx": corpus_models.tf2onnx_style,
    "float16": corpus_models.float16_converted,
}
_NEEDS = {"torchscript": "torch", "dynamo": "torch", "onnxscript": "onnxscript", "float16": "onnxconverter_common"}


@functools.cache
def _built(producer: str) -> corpus_models.CorpusModel:
    # Built once per session: the dynamo export alone takes seconds.
    return PRODUCERS[producer]()


def _corpus_model(producer: str) -> corpus_models.CorpusModel:
    if producer in _NEEDS:
        pytest.importorskip(_NEEDS[producer])
    return _built(producer)


def _compress(model, method: str, **settings):
    # k and d small enough that every layer of these small models is worth encoding; lr2vq at a
    # rank below d so that the projection input (the low-rank form) is exercised.
    options = {"rank": 2} if method == "lr2vq" else {}
    return onnxvq.compress(model, method=method, k=16, d=4, min_size=0, **options, **settings)


def _nodes(graph: onnx.GraphProto):
    """Every node of ``graph`` and of its If/Loop/Scan bodies."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _nodes(sub)


def _close(got, expected, rtol):
    assert got.shape == expected.shape and got.dtype == expected.dtype
    scale = max(1.0, float(np.abs(expected.astype(np.float32)).max()))
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=rtol, atol=rtol * scale)


def _assert_twin_agreement(entry: corpus_models.CorpusModel, vq: onnx.ModelProto, summary) -> None:
    """The checks of the module docstring on one compressed model and its summary."""
    original = entry.model
    vq_nodes = [n for n in _nodes(vq.graph) if n.domain == ops.DOMAIN]
    assert len(vq_nodes) == entry.layers
    assert sum(layer.compressed for layer in summary.layers) == entry.layers
    onnx.checker.check_model(vq, full_check=True)
    for kept, before in ((vq.graph.input, original.graph.input), (vq.graph.output, original.graph.output)):
        assert [(v.name, v.type) for v in kept] == [(v.name, v.type) for v in before]
    user_functions = {(f.domain, f.name): [n.op_type for n in f.node] for f in original.functions}
    assert {(f.domain, f.name): [n.op_type for n in f.node] for f in vq.functions if f.domain != ops.DOMAIN} == user_functions

    twin = ir.serde.serialize_model(onnxvq.decompress(vq))
    assert not [n for n in _nodes(twin.graph) if n.domain == ops.DOMAIN]
    inlined = ops.inline_bodies(vq)
    assert not [n for n in _nodes(inlined.graph) if n.domain == ops.DOMAIN]
    assert {(f.domain, f.name) for f in inlined.functions} == set(user_functions)
    for feeds in entry.feeds:
        expected = run_ort(twin, feeds)
        folded = run_ort(vq, feeds)
        unfolded = run_ort(vq, feeds, disabled_optimizers=["ConstantFolding"])
        reference_twin = ReferenceEvaluator(twin).run(None, feeds)
        reference_body = ReferenceEvaluator(inlined).run(None, feeds)
        for i, want in enumerate(expected):
            _close(folded[i], want, entry.rtol)
            _close(unfolded[i], want, entry.rtol)
            _close(reference_body[i], reference_twin[i], entry.rtol)


def _check(entry: corpus_models.CorpusModel, result) -> onnx.ModelProto:
    vq = result.to_proto()
    _assert_twin_agreement(entry, vq, result.summary)
    return vq


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("producer", PRODUCERS)
def test_producer_compresses_and_equals_twin(producer, method):
    entry = _corpus_model(producer)
    before = entry.model.SerializeToString()
    _check(entry, _compress(entry.model, method))
    assert entry.model.SerializeToString() == before  # the caller's proto is not modified


@pytest.mark.parametrize("opset", range(11, 22))
def test_every_opset(opset):
    """Bodies at each opset from 11 to 21, with If/Loop bodies and a model-local function; one
    method per opset in turn (each method meets opset 11, the oldest, and several others)."""
    entry = corpus_models.helper_control_flow(opset)
    assert entry.model.opset_import[0].version == opset
    for method in METHODS if opset in (11, 21) else METHODS[opset % 3 : opset % 3 + 1]:
        vq = _check(entry, _compress(entry.model, method, scales="on" if opset % 2 else "off"))
        assert {f.opset_import[0].version for f in vq.functions if f.domain == ops.DOMAIN} == {opset}


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("method", METHODS)
def test_external_data_in_and_out(tmp_path, method):
    """A model whose tensors all live in a .data file compresses from its path, saves with
    external data, runs from the file in onnxruntime and equals its decompressed twin; the input
    files are untouched."""
    entry = corpus_models.tf2onnx_style()
    source = tmp_path / "in" / "model.onnx"
    source.parent.mkdir()
    onnx.save_model(entry.model, source, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    inputs = {path: _sha256(path) for path in (source, tmp_path / "in" / "model.onnx.data")}

    out = tmp_path / "out" / "model.vq.onnx"
    out.parent.mkdir()
    result = _compress(str(source), method)
    written = result.save(out, external_data=True)
    assert written == [str(out), str(out) + ".data"]
    # onnx-ir keeps tensors under 256 bytes inline; the larger conv's codes go to the .data file.
    stored = onnx.load_model(out, load_external_data=False)
    assert any(init.data_location == onnx.TensorProto.EXTERNAL for init in stored.graph.initializer)
    assert os.path.getsize(written[1]) > 0

    twin_path = tmp_path / "out" / "twin.onnx"
    save_model(onnxvq.decompress(str(out)), twin_path)
    for feeds in entry.feeds:
        expected = run_ort(str(twin_path), feeds)
        got = run_ort(str(out), feeds)
        for a, b in zip(got, expected):
            _close(a, b, entry.rtol)
    assert {path: _sha256(path) for path in inputs} == inputs
    assert sorted(os.listdir(tmp_path / "in")) == ["model.onnx", "model.onnx.data"]
    # Every check of the in-memory models, on the model as loaded back from its files.
    _assert_twin_agreement(entry, onnx.load_model(out), result.summary)
