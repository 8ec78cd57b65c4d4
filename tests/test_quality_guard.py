"""The quality guard: every compress measures its output against the original and says when the
model is damaged (onnxvq.quality_guard)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

import onnxvq
from models import cnn, make_model, mlp, rng
from onnxvq.quality_guard import MIN_SQNR_DB, generated_samples


def test_good_settings_measure_and_stay_quiet():
    result = onnxvq.compress(cnn(), k=256, d=2, min_size=0)
    check = result.summary.check
    assert check.source == "4 random inputs"
    assert check.quality.sqnr_db > MIN_SQNR_DB and check.quality.top1_agreement > 0.9
    assert check.warning is None
    assert "output check on 4 random inputs: output SQNR" in result.summary.format()
    assert result.summary.to_dict()["check"]["quality"]["sqnr_db"] > MIN_SQNR_DB


def test_damaging_settings_are_reported():
    result = onnxvq.compress(cnn(), k=2, d=16, min_size=0, scales="off")
    check = result.summary.check
    assert check.warning is not None and "differs" in check.warning and "--calib" in check.warning
    assert check.quality.sqnr_db < MIN_SQNR_DB


def test_cli_prints_the_warning_even_when_quiet(tmp_path):
    onnx.save(cnn(), tmp_path / "m.onnx")
    done = subprocess.run(
        [sys.executable, "-m", "onnxvq.cli", "compress", tmp_path / "m.onnx", "-o", tmp_path / "out.onnx",
         "-k", "2", "-d", "16", "--min-size", "0", "--scales", "off", "-q"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("warning: the compressed model's output differs from the original's on 4 random inputs")
    assert (tmp_path / "out.onnx").exists()


def test_with_calibration_data_the_check_uses_it():
    x = rng(3).standard_normal((24, 64)).astype(np.float32)
    result = onnxvq.compress(mlp(), calib=[{"x": x[i : i + 1]} for i in range(24)], finetune="none", min_size=0)
    check = result.summary.check
    assert check.source == "the held-back calibration samples"
    assert check.quality == result.summary.calibration["quality"]["encoded"]


def test_generated_inputs_follow_the_specs():
    """Fixed dims kept; a dynamic batch (named, -1 or 0) is 1; other dynamic dims get a size."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "h", 0])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [x, ids], [y], [])
    samples = generated_samples(ir.serde.deserialize_model(model), seed=0)
    feed = samples.samples[0]
    assert feed["x"].shape == (1, 3, 64, 64) and feed["x"].dtype == np.float32
    assert feed["ids"].shape == (1, 5) and not feed["ids"].any()


def test_a_model_that_fails_on_generated_inputs_is_noted_not_fatal():
    """An input whose valid values noise misses (here an index into a 4-row table)."""
    table = numpy_helper.from_array(rng(1).standard_normal((4, 64)).astype(np.float32), "table")
    w = numpy_helper.from_array(rng(2).standard_normal((64, 64)).astype(np.float32), "w")
    nodes = [helper.make_node("Add", ["ids", "offset"], ["shifted"]),
             helper.make_node("Gather", ["table", "shifted"], ["e"]),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="fc")]
    offset = numpy_helper.from_array(np.array([99], np.int64), "offset")
    model = make_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [table, w, offset])
    result = onnxvq.compress(model, min_size=0, k=16, d=4)
    assert result.summary.check.quality is None
    assert "did not run on generated inputs" in result.summary.check.note


def test_top1_agreement_per_position_of_a_sequence_of_class_distributions():
    """A recognizer's (batch, time, classes) softmax: agreement counts positions; a 3-D output
    that is not a distribution (a detector's map) gets SQNR only."""
    from onnxvq.output_quality import class_rows, output_quality

    r = np.random.default_rng(0)
    logits = r.standard_normal((2, 6, 5))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    flipped = probs.copy()
    flipped[0, :3] = flipped[0, :3, ::-1]  # 3 of 12 positions change their top class (almost surely)
    changed = int((flipped.reshape(-1, 5).argmax(1) != probs.reshape(-1, 5).argmax(1)).sum())
    quality = output_quality([[probs.astype(np.float32)]], [[flipped.astype(np.float32)]])
    assert quality.rows == 12 and quality.top1_agreement == (12 - changed) / 12 and changed >= 1
    assert quality.top1_accuracy is None
    labels = [probs.reshape(-1, 5).argmax(1)]  # one label per position
    assert output_quality([[probs]], [[probs]], labels).top1_accuracy == 1.0
    assert output_quality([[probs]], [[probs]], [np.array([0, 1])]).top1_accuracy is None  # per sample: no match
    detector_map = r.random((2, 1, 8, 8)).astype(np.float32)
    assert class_rows(detector_map) is None
    assert output_quality([[detector_map]], [[detector_map * 0.9]]).top1_agreement is None


def test_raw_scores_over_many_classes_count_when_their_winner_stands_out():
    """A captcha reader's (time, batch, classes) logits: one class far above the rest per
    position. Gaussian values of the same shape (an embedding) have no such winner."""
    from onnxvq.output_quality import class_rows, output_quality

    r = np.random.default_rng(1)
    logits = r.standard_normal((20, 1, 500)).astype(np.float32)
    winners = r.integers(500, size=20)
    logits[np.arange(20), 0, winners] += 12.0
    assert class_rows(logits) is not None
    damaged = logits.copy()
    damaged[:5, 0, winners[:5]] -= 20.0  # 5 of 20 positions lose their winner
    assert output_quality([[logits]], [[damaged]]).top1_agreement == 0.75
    embedding = r.standard_normal((20, 1, 500)).astype(np.float32)
    assert class_rows(embedding) is None and output_quality([[embedding]], [[embedding]]).top1_agreement is None
    few = logits[..., :10].copy()  # too few classes to judge by spread
    few[np.arange(20), 0, 0] += 12.0
    assert class_rows(few) is None


def test_a_nan_output_counts_as_damaged():
    """A NaN in the compressed model's output makes every comparison with it false: it must read
    as the worst SQNR, and warn, not pass as undamaged."""
    from onnxvq.output_quality import output_quality
    from onnxvq.quality_guard import verdict

    reference = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    broken = reference.copy()
    broken[1, 3] = np.nan
    quality = output_quality([[reference]], [[broken]])
    assert quality.sqnr_db == -np.inf
    assert verdict(quality, "the calibration samples", has_calib=True).warning is not None
    assert output_quality([[reference]], [[reference * 1.01]]).sqnr_db > 30
