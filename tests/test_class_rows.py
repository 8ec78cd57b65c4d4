"""The classes a classifier head wins on the calibration data, split into a layer of their own."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxvq
from models import make_model, rng, run_ort, weight
from onnxvq.calibration import load_calibration
from onnxvq import class_rows, output_quality
from onnxvq.class_rows import split_class_rows

CLASSES, HIDDEN, FAVOURED = 300, 48, 12


def _head_model(kind: str = "gemm", *, spread: bool = False) -> tuple:
    """x (T, 32) -> MatMul -> Relu -> a head of 300 classes -> graph output, and its favoured
    classes: 12 classes whose weights are 16 times larger than the others' (none with ``spread``),
    so that one of them wins, by far.

    ``gemm``: Gemm(transB=1, bias) -> Reshape (T, 1, 300), raw logits as ddddocr's reader writes
    them. ``matmul``: MatMul -> Add(bias) -> Softmax(-1), as PP-OCR's recognizer.
    """
    r = rng(7)
    favoured = np.sort(r.choice(CLASSES, FAVOURED, replace=False))
    bias = np.zeros(CLASSES, np.float32)
    w_head = weight((CLASSES, HIDDEN), 8) * 0.5
    if not spread:  # the favoured classes' scores swing far wider: one of them stands out
        w_head[favoured] *= 16.0
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="hidden"),
             helper.make_node("Relu", ["m1"], ["h"])]
    inits = [numpy_helper.from_array(weight((32, HIDDEN), 9), "w1"),
             numpy_helper.from_array(bias, "head.b")]
    if kind == "gemm":
        nodes += [helper.make_node("Gemm", ["h", "head.w", "head.b"], ["logits"], name="head", transB=1),
                  helper.make_node("Reshape", ["logits", "shape"], ["y"])]
        inits += [numpy_helper.from_array(w_head, "head.w"), numpy_helper.from_array(np.array([-1, 1, CLASSES]), "shape")]
    else:
        nodes += [helper.make_node("MatMul", ["h", "head.w"], ["mm"], name="head"),
                  helper.make_node("Add", ["mm", "head.b"], ["logits"]),
                  helper.make_node("Softmax", ["logits"], ["y"], axis=-1)]
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w_head.T), "head.w"))
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 32])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return model, favoured


def _feeds(n: int, seed: int) -> list[dict]:
    r = rng(seed)
    return [{"x": r.standard_normal((6, 32)).astype(np.float32)} for _ in range(n)]


def _wins(model, feeds) -> list[int]:
    outputs = [run_ort(model, f)[0] for f in feeds]
    return sorted(set(np.concatenate([o.reshape(-1, CLASSES).argmax(1) for o in outputs]).tolist()))


@pytest.mark.parametrize("kind", ["gemm", "matmul"])
def test_the_split_keeps_the_classes_won_and_computes_the_same_outputs(kind):
    original, favoured = _head_model(kind)
    feeds = _feeds(12, 1)
    model = ir.serde.deserialize_model(original)
    kept = split_class_rows(model, load_calibration(feeds, model))
    assert len(kept) == 1 and kept[0].head == "head" and kept[0].classes == CLASSES
    assert kept[0].rows == _wins(original, feeds)
    assert set(kept[0].rows) <= set(favoured.tolist()) and len(kept[0].rows) >= FAVOURED // 2
    split = ir.serde.serialize_model(model)
    assert [n.op_type for n in split.graph.node if n.name == kept[0].layer] == [original.graph.node[2].op_type]
    for feed in _feeds(3, 2):  # other inputs: the split head is the same function
        np.testing.assert_allclose(run_ort(split, feed)[0], run_ort(original, feed)[0], rtol=1e-6, atol=1e-6)


def test_compressed_head_keeps_its_won_classes_exact_and_the_rest_encoded():
    original, _ = _head_model("gemm")
    feeds = _feeds(12, 1)
    result = onnxvq.compress(original, calib=feeds, finetune="none", k=16, d=4, min_size=0)
    (kept,) = result.summary.class_rows
    assert "head" in result.summary.format() and "kept apart in head.kept_rows" in result.summary.format()
    assert {"head": "head", "classes": CLASSES, "kept": len(kept.rows), "layer": kept.layer} in \
        result.summary.to_dict()["class_rows"]
    compressed = result.to_proto()
    assert any(n.op_type == "VQGemm" and n.name == "head" for n in compressed.graph.node)
    assert any(n.op_type == "Gemm" and n.name == kept.layer for n in compressed.graph.node)  # fixed settings: dense
    kept_classes = {i.name: numpy_helper.to_array(i) for i in compressed.graph.initializer}["head.kept_classes"]
    assert kept_classes.tolist() == kept.rows  # the file format's names (README)
    # Only the kept classes and the first layer's encoding differ: with the hidden layer left
    # dense, the kept classes come out exact and the others do not.
    dense_hidden = onnxvq.compress(original, calib=feeds, finetune="none", k=16, d=4, min_size=0, skip=["hidden"])
    feed = _feeds(1, 3)[0]
    reference = run_ort(original, feed)[0].reshape(-1, CLASSES)
    out = run_ort(dense_hidden.to_proto(), feed)[0].reshape(-1, CLASSES)
    np.testing.assert_allclose(out[:, kept.rows], reference[:, kept.rows], rtol=1e-5, atol=1e-5)
    others = np.setdiff1d(np.arange(CLASSES), kept.rows)
    assert np.abs(out[:, others] - reference[:, others]).max() > 1e-3


def test_a_size_target_allocates_the_kept_layer_like_any_other():
    original, _ = _head_model("matmul")
    result = onnxvq.compress(original, calib=_feeds(12, 1), finetune="none", target_ratio=4)
    names = {layer.name for layer in result.summary.layers}
    assert {"head", result.summary.class_rows[0].layer} <= names
    assert len(original.SerializeToString()) >= 4 * len(result.to_proto().SerializeToString())


def test_nothing_is_split_without_data_when_off_for_a_dense_head_or_when_too_many_classes_win(monkeypatch):
    original, _ = _head_model("gemm")
    assert onnxvq.compress(original, k=16, d=4, min_size=0).summary.class_rows == []
    off = onnxvq.compress(original, calib=_feeds(12, 1), finetune="none", k=16, d=4, min_size=0, class_rows="off")
    assert off.summary.class_rows == []
    dense_head = onnxvq.compress(original, calib=_feeds(12, 1), finetune="none", k=16, d=4, min_size=0, skip=["head"])
    assert dense_head.summary.class_rows == []  # a dense head reads every class exactly
    feeds = _feeds(12, 1)
    monkeypatch.setattr(class_rows, "MAX_KEPT_FRACTION", 0.01)
    assert len(_wins(original, feeds)) > class_rows.MAX_KEPT_FRACTION * CLASSES
    model = ir.serde.deserialize_model(original)
    assert split_class_rows(model, load_calibration(feeds, model)) == []


def test_an_output_without_a_standout_winner_is_no_head():
    """Without the bias that lifts a few classes the scores are sums of many products, as an
    embedding's are: fewer than a quarter of the dimensions win, but none stands out."""
    spread, _ = _head_model("gemm", spread=True)
    feeds = _feeds(12, 1)
    assert len(_wins(spread, feeds)) <= class_rows.MAX_KEPT_FRACTION * CLASSES
    scores = np.concatenate([run_ort(spread, f)[0].reshape(-1, CLASSES) for f in feeds])
    peak = np.median((scores.max(1) - scores.mean(1)) / scores.std(1))
    assert peak < np.sqrt(2 * np.log(CLASSES)) + output_quality.PEAK_MARGIN
    model = ir.serde.deserialize_model(spread)
    assert split_class_rows(model, load_calibration(feeds, model)) == []


def _rewired(original, edit) -> list:
    model = original.__class__()
    model.CopyFrom(original)
    edit(model.graph)
    ir_model = ir.serde.deserialize_model(model)
    return split_class_rows(ir_model, load_calibration(_feeds(6, 1), ir_model))


def test_heads_whose_classes_do_not_reach_an_output_last_are_left_alone():
    original, _ = _head_model("matmul")

    def softmax_over_rows(graph):
        graph.node[-1].attribute[0].i = 0

    def second_reader(graph):
        graph.node.append(helper.make_node("Identity", ["mm"], ["also"]))
        graph.output.append(helper.make_tensor_value_info("also", TensorProto.FLOAT, None))

    def reduced(graph):
        graph.node[-1].CopyFrom(helper.make_node("ReduceMax", ["logits"], ["y"], axes=[0]))

    for edit in (softmax_over_rows, second_reader, reduced):
        assert _rewired(original, edit) == []


def test_invalid_setting_is_a_one_line_error():
    with pytest.raises(onnxvq.OnnxVQError, match="class_rows must be one of auto, off"):
        onnxvq.compress(_head_model()[0], class_rows="on")


def test_two_unnamed_heads_are_split_each_on_its_own_output():
    r = rng(3)
    h = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", HIDDEN])
    w_a, w_b = weight((CLASSES, HIDDEN), 4) * 0.5, weight((HIDDEN, CLASSES), 5) * 0.5
    w_a[r.choice(CLASSES, 5, replace=False)] *= 16.0
    w_b[:, r.choice(CLASSES, 5, replace=False)] *= 16.0
    nodes = [helper.make_node("Gemm", ["x", "wa"], ["ya"], transB=1), helper.make_node("MatMul", ["x", "wb"], ["yb"])]
    original = make_model(nodes, [h], [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("ya", "yb")],
                          [numpy_helper.from_array(w_a, "wa"), numpy_helper.from_array(w_b, "wb")])
    feeds = [{"x": r.standard_normal((6, HIDDEN)).astype(np.float32)} for _ in range(8)]
    model = ir.serde.deserialize_model(original)
    kept = split_class_rows(model, load_calibration(feeds, model))
    assert sorted(k.head for k in kept) == ["Gemm:wa", "MatMul:wb"]
    outputs = [np.concatenate([run_ort(original, f)[i] for f in feeds]) for i in (0, 1)]
    for k in kept:
        scores = outputs[0 if k.head == "Gemm:wa" else 1]
        assert k.rows == sorted(set(scores.argmax(1).tolist()))
    split = ir.serde.serialize_model(model)
    for got, want in zip(run_ort(split, feeds[0]), run_ort(original, feeds[0])):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
