"""Calibration data: the three sources, batching, and every bad input as a one-line error."""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import cnn, make_model, mlp, weight
from onnxvq.calibration import load_calibration
from onnxvq.errors import OnnxVQError


def ir_model(proto):
    return ir.serde.deserialize_model(proto)


def images(n, seed=0, h=16, w=16):
    return np.random.default_rng(seed).standard_normal((n, 3, h, w)).astype(np.float32)


def variable_width_model():
    """Conv over (1, 3, 8, W) with W free, then a global pool: one sample per shape."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["y"], name="gap"),
    ]
    from onnx import numpy_helper

    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 1, 1])],
        [numpy_helper.from_array(weight((16, 3, 3, 3), 0), "w")],
    )


def test_stacked_npz_one_more_axis_and_same_rank(tmp_path):
    model = ir_model(cnn())
    x = images(12)
    np.savez(tmp_path / "same_rank.npz", x=x, labels=np.arange(12) % 10)
    calib = load_calibration(tmp_path / "same_rank.npz", model)
    assert len(calib) == 12 and calib.samples[3]["x"].shape == (1, 3, 16, 16)
    np.testing.assert_array_equal(calib.samples[3]["x"][0], x[3])
    assert calib.labels[3].tolist() == [3] and calib.batchable

    np.savez(tmp_path / "extra_axis.npz", x=x.reshape(6, 2, 3, 16, 16))
    calib = load_calibration(tmp_path / "extra_axis.npz", model)
    assert len(calib) == 6 and calib.samples[0]["x"].shape == (2, 3, 16, 16) and calib.labels is None
    batches = list(calib.batches(4))
    assert [len(idx) for idx, _, _ in batches] == [2, 2, 2]
    assert [feed["x"].shape[0] for _, feed, _ in batches] == [4, 4, 4]


def test_folder_of_samples_with_variable_shapes(tmp_path):
    model = ir_model(variable_width_model())
    for i, width in enumerate([10, 12, 10, 14, 12]):
        np.savez(tmp_path / f"s{i}.npz", x=images(1, i, h=8, w=width))
    calib = load_calibration(tmp_path, model)
    assert [s["x"].shape[-1] for s in calib.samples] == [10, 12, 10, 14, 12]
    assert not calib.batchable  # the batch axis is fixed at 1: one sample per run
    assert sorted(len(idx) for idx, _, _ in calib.batches(8)) == [1, 1, 1, 1, 1]


def test_batches_only_join_equal_shapes_and_shuffle_with_a_seed():
    model = ir_model(cnn())
    feeds = [{"x": images(1, i, w=16 if i % 2 else 16)} for i in range(9)]
    calib = load_calibration(feeds, model, labels=np.arange(9))
    a = [idx for idx, _, _ in calib.batches(4, np.random.default_rng(0))]
    b = [idx for idx, _, _ in calib.batches(4, np.random.default_rng(0))]
    assert a == b and sorted(i for idx in a for i in idx) == list(range(9))
    _, feed, labels = next(calib.batches(4, np.random.default_rng(0)))
    assert feed["x"].shape[0] == len(labels) == 4


def test_batches_stop_at_max_bytes():
    """Large inputs are joined only up to max_bytes (a batch of 640x640 images multiplies every
    activation); small ones still up to batch_size."""
    model = ir_model(cnn())
    calib = load_calibration([{"x": images(1, i)} for i in range(10)], model)
    per_sample = calib.samples[0]["x"].nbytes
    sizes = [len(idx) for idx, _, _ in calib.batches(8, max_bytes=3 * per_sample)]
    assert sizes == [3, 3, 3, 1]
    assert [len(idx) for idx, _, _ in calib.batches(8, max_bytes=100 * per_sample)] == [8, 2]


def test_split_holds_back_the_last_samples():
    calib = load_calibration([{"x": images(1, i)} for i in range(20)], ir_model(cnn()))
    train, held = calib.split(0.1)
    assert len(train) == 18 and len(held) == 2
    assert calib.split(0.1)[1] is not None and load_calibration(calib.samples[:5], ir_model(cnn())).split(0.1)[1] is None


@pytest.mark.parametrize(
    "feeds, message",
    [
        ([{"y": images(1)}], "no array for model input(s) 'x'"),
        ([{"x": images(1), "z": images(1)}], "'z' that are not model inputs"),
        ([{"x": images(1).astype(np.float64)}], "is float64 but the model expects float32"),
        ([{"x": images(1)[0]}], "expects rank 4"),
        ([{"x": images(1, h=15)}], "axis 2 must be 16"),
        ([{"x": np.full((1, 3, 16, 16), np.nan, np.float32)}], "contains NaN or Inf"),
        ([], "no calibration samples"),
        ([images(1)], "not a dict of arrays"),
        ([{"x": images(2), "labels": np.array([0.5, 1.0])}], "labels must be integer"),
        ([{"x": images(2), "labels": np.array([1, 2, 3])}], "has 2 rows but 3 labels"),
        ([{"x": images(1), "labels": np.array([1])}, {"x": images(1)}], "only some samples"),
    ],
)
def test_bad_feeds_are_one_line_errors(feeds, message):
    with pytest.raises(OnnxVQError, match=None) as error:
        load_calibration(feeds, ir_model(cnn()))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_files(tmp_path):
    model = ir_model(mlp())
    with pytest.raises(OnnxVQError, match="does not exist"):
        load_calibration(tmp_path / "missing.npz", model)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(OnnxVQError, match="is not an .npz archive"):
        load_calibration(tmp_path / "junk.npz", model)
    np.save(tmp_path / "array.npy", np.zeros((3, 64), np.float32))
    os.replace(tmp_path / "array.npy", tmp_path / "array.npz")  # a .npy named .npz
    with pytest.raises(OnnxVQError, match="is not an .npz archive"):
        load_calibration(tmp_path / "array.npz", model)
    np.savez(tmp_path / "whole.npz", x=np.zeros((3, 64), np.float32))
    data = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) - 40])  # the zip directory cut off
    with pytest.raises(OnnxVQError, match="truncated.npz"):
        load_calibration(tmp_path / "truncated.npz", model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OnnxVQError, match="has no .npz files"):
        load_calibration(tmp_path / "empty", model)
    np.savez(tmp_path / "uneven.npz", x=np.zeros((3, 64), np.float32))
    with pytest.raises(OnnxVQError, match="3 labels for|labels for 3"):
        load_calibration(tmp_path / "uneven.npz", model, labels=np.arange(4))
    np.save(tmp_path / "labels.npy", np.arange(3))
    calib = load_calibration(tmp_path / "uneven.npz", model, labels=tmp_path / "labels.npy")
    assert [l.tolist() for l in calib.labels] == [[0], [1], [2]]
    with pytest.raises(OnnxVQError, match="pass a list of feed dicts"):
        load_calibration({"x": np.zeros((3, 64), np.float32)}, model)


def test_dims_stored_as_minus_one_or_zero_are_dynamic():
    """paddle2onnx writes a dynamic batch as dim_value -1 (rapidocr's classifier): any size fits."""
    w = weight((8, 12), 1)
    for dynamic in (-1, 0):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [dynamic, 12])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [dynamic, 8])
        model = make_model([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], [x], [y],
                           [numpy_helper.from_array(w, "w")])
        samples = [{"x": np.ones((n, 12), np.float32)} for n in (1, 3)]
        calib = load_calibration(samples, ir.serde.deserialize_model(model))
        assert len(calib) == 2 and calib.batchable


def test_batch_one_samples_are_stacked_to_a_fixed_batch():
    """A model exported with batch 2 fixed, calibrated with samples of batch 1."""
    w = weight((8, 12), 2)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 12])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    model = ir.serde.deserialize_model(make_model(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], [x], [y], [numpy_helper.from_array(w, "w")]))
    samples = [{"x": np.full((1, 12), i, np.float32)} for i in range(5)]
    calib = load_calibration(samples, model, labels=np.arange(5))
    assert [s["x"].shape for s in calib.samples] == [(2, 12), (2, 12)]  # the fifth is left out
    assert [s["x"][:, 0].tolist() for s in calib.samples] == [[0, 1], [2, 3]]
    assert [l.tolist() for l in calib.labels] == [[0, 1], [2, 3]]
    with pytest.raises(OnnxVQError, match="batches of exactly 2"):
        load_calibration(samples[:1], model)
