"""The onnxvq command line, run as a real process: happy paths and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from models import cnn, mlp, rng, run_ort


def onnxvq(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "onnxvq.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(cnn(), path)
    return path


def test_compress_inspect_decompress(tmp_path, model_path):
    out, report = tmp_path / "model.vq.onnx", tmp_path / "report.json"
    done = onnxvq("compress", model_path, "-o", out, "-k", "64", "-d", "4", "--min-size", "0",
                  "--skip", "fc2", "--report", report)
    assert done.returncode == 0, done.stderr
    assert "conv1" in done.stdout and "dense: skip 'fc2'" in done.stdout and "file:" in done.stdout
    summary = json.loads(report.read_text())
    assert summary["totals"]["compressed_layers"] == 3 and summary["totals"]["file_ratio"] > 1
    assert {l["name"]: l["compressed"] for l in summary["layers"]} == {
        "conv1": True, "conv2": True, "fc1": True, "fc2": False}

    listing = onnxvq("inspect", out)
    assert listing.returncode == 0
    assert "VQ layers (3)" in listing.stdout and "candidate layers (1)" in listing.stdout
    info = json.loads(onnxvq("inspect", out, "--json").stdout)
    conv2 = next(v for v in info["vq_layers"] if v["name"] == "conv2")
    assert (conv2["method"], conv2["k"], conv2["d"], conv2["code_bits"]) == ("pq", 64, 4, 8)
    assert 2.0 < conv2["bits_per_weight"] < 2.5  # 8 bits per 4 weights plus the codebook
    assert info["provenance"]["config"]["k"] == 64

    dense = tmp_path / "dense.onnx"
    assert onnxvq("decompress", out, "-o", dense).returncode == 0
    feeds = {"x": rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(str(out), feeds)[0], run_ort(str(dense), feeds)[0], rtol=1e-5, atol=1e-5)
    assert all(n.domain == "" for n in onnx.load(dense).graph.node)


def test_external_data_model_from_another_folder(tmp_path):
    sub = tmp_path / "models"
    sub.mkdir()
    onnx.save_model(mlp((64, 256, 256, 10)), sub / "m.onnx", save_as_external_data=True,
                    location="m.onnx.data", size_threshold=0)
    done = onnxvq("compress", "models/m.onnx", "-o", "models/m.vq.onnx", "--external-data", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "wrote models/m.vq.onnx, models/m.vq.onnx.data" in done.stdout
    assert onnxvq("decompress", sub / "m.vq.onnx", "-o", sub / "dense.onnx").returncode == 0
    feeds = {"x": rng(1).standard_normal((2, 64)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(str(sub / "m.vq.onnx"), feeds)[0], run_ort(str(sub / "dense.onnx"), feeds)[0],
                               rtol=1e-5, atol=1e-5)


def test_inspect_lists_candidates_with_config_names(model_path):
    info = json.loads(onnxvq("inspect", model_path, "--json").stdout)
    assert [(c["name"], c["op_type"], c["shape"]) for c in info["candidates"]] == [
        ("conv1", "Conv", [32, 3, 3, 3]), ("conv2", "Conv", [64, 32, 3, 3]),
        ("fc1", "Gemm", [40, 64]), ("fc2", "MatMul", [40, 10])]
    assert info["candidates"][1]["bytes"] == 64 * 32 * 9 * 4


def test_config_file(tmp_path, model_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("k: 32\nd: 4\nmin_size: 0\nlayers:\n  conv1: {skip: true}\n  Gemm: {k: 16}\n")
    out = tmp_path / "o.onnx"
    done = onnxvq("compress", model_path, "-o", out, "--config", config, "-q")
    assert done.returncode == 0, done.stderr
    info = json.loads(onnxvq("inspect", out, "--json").stdout)
    assert {v["name"]: v["k"] for v in info["vq_layers"]} == {"conv2": 32, "fc1": 16, "fc2": 32}


def _bad_inputs(tmp_path, model_path):
    """(name, argv, expected message) for every bad input the CLI must handle."""
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 20)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_path.read_bytes()[: model_path.stat().st_size // 2])
    external = tmp_path / "ext.onnx"
    onnx.save_model(mlp(), external, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    compressed = tmp_path / "already.onnx"
    assert onnxvq("compress", model_path, "-o", compressed, "-k", "16", "-d", "4", "-q").returncode == 0
    nan_model = cnn()
    init = next(i for i in nan_model.graph.initializer if i.name == "w3")
    w = numpy_helper.to_array(init).copy()
    w[1, 2] = np.inf
    init.CopyFrom(numpy_helper.from_array(w, "w3"))
    nan_path = tmp_path / "nan.onnx"
    onnx.save(nan_model, nan_path)
    out = tmp_path / "out.onnx"
    return [
        ("not onnx", [text, "-o", out], "is not a valid ONNX model"),
        ("truncated", [truncated, "-o", out], "is not a valid ONNX model"),
        ("missing file", [tmp_path / "nope.onnx", "-o", out], "no such file"),
        ("missing external data", [external, "-o", out], "external data file 'ext.onnx.data' of tensor"),
        ("unknown method", [model_path, "-o", out, "--method", "zip"], "Invalid value for '--method': 'zip' is not one of 'lr2vq', 'pq', 'ssvq'"),
        ("k < 2", [model_path, "-o", out, "-k", "1"], "k must be at least 2"),
        ("d < 1", [model_path, "-o", out, "-d", "0"], "d must be at least 1"),
        ("unmatched key", [model_path, "-o", out, "--skip", "re:nothing.*"], "matches no layer; run `onnxvq inspect"),
        ("output is input", [model_path, "-o", model_path], "would overwrite the input file"),
        ("output dir missing", [model_path, "-o", tmp_path / "no" / "x.onnx"], "does not exist"),
        ("already compressed", [compressed, "-o", out], "already compressed by onnxvq"),
        ("nan weights", [nan_path, "-o", out], "contains NaN or Inf"),
    ]


def test_bad_inputs_fail_cleanly(tmp_path, model_path):
    for name, argv, message in _bad_inputs(tmp_path, model_path):
        listing_before = sorted(os.listdir(tmp_path))
        input_bytes = model_path.read_bytes()
        done = onnxvq("compress", *argv)
        assert done.returncode != 0, name
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, done.stderr)
        assert message in lines[0], (name, lines[0])
        assert "Traceback" not in done.stderr + done.stdout, name
        assert sorted(os.listdir(tmp_path)) == listing_before, name  # no output, no temp files
        assert model_path.read_bytes() == input_bytes, name


def test_decompress_of_an_uncompressed_model_is_an_error(tmp_path, model_path):
    done = onnxvq("decompress", model_path, "-o", tmp_path / "d.onnx")
    assert done.returncode == 1 and "it is not compressed by onnxvq" in done.stderr
    assert not (tmp_path / "d.onnx").exists()


def test_usage_errors_are_short(model_path):
    done = onnxvq("compress", model_path)  # no -o
    assert done.returncode == 1 and "Missing option '-o'" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_import_does_not_pull_in_torch():
    code = "import sys, onnxvq, onnxvq.cli, onnxvq.inspect_model; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_compress_with_calibration_data(tmp_path, model_path):
    calib, out = tmp_path / "calib.npz", tmp_path / "model.vq.onnx"
    np.savez(calib, x=rng(0).standard_normal((12, 3, 16, 16)).astype(np.float32))
    done = onnxvq("compress", model_path, "-o", out, "-k", "16", "-d", "4", "--min-size", "0",
                  "--calib", calib, "--finetune", "none", "--report", tmp_path / "r.json")
    assert done.returncode == 0, done.stderr
    assert "calibration: 12 sample(s)" in done.stdout and "data-aware" in done.stdout
    assert "encoded:" in done.stdout and "output SQNR" in done.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["calibration"]["quality"]["encoded"]["rows"] > 0
    assert all(l["output_sqnr_db"] is not None for l in report["layers"] if l["compressed"] and not l["shared_with"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--calib", "{tmp}/missing.npz"], "calibration data"),
        (["--calib", "{tmp}/wrong.npz"], "no array for model input(s) 'x'"),
        (["--finetune", "layer"], "need calibration data"),
        (["--labels", "{tmp}/labels.npy"], "need calibration data"),
        (["--calib", "{tmp}/calib.npz", "--epochs", "0"], "epochs must be a positive integer"),
        (["--calib", "{tmp}/calib.npz", "--labels", "{tmp}/labels.npy"], "labels for"),
    ],
)
def test_bad_calibration_input_is_one_line_and_writes_nothing(tmp_path, model_path, extra, message):
    np.savez(tmp_path / "wrong.npz", image=np.zeros((2, 3, 16, 16), np.float32))
    np.savez(tmp_path / "calib.npz", x=np.zeros((2, 3, 16, 16), np.float32))
    np.save(tmp_path / "labels.npy", np.arange(5))
    out = tmp_path / "out.onnx"
    before = model_path.read_bytes()
    done = onnxvq("compress", model_path, "-o", out, *[a.format(tmp=tmp_path) for a in extra])
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert not out.exists() and model_path.read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".") or p.endswith(".tmp")]


@pytest.mark.parametrize("argv, message", [
    (["-k", "abc"], "Invalid value for '-k'"),
    (["--codebook-dtype", "float64"], "Invalid value for '--codebook-dtype'"),
    (["--method", "nope"], "Invalid value for '--method'"),
    (["--scales", "sometimes"], "Invalid value for '--scales'"),
])
def test_usage_errors_are_one_line(model_path, tmp_path, argv, message):
    done = onnxvq("compress", model_path, "-o", tmp_path / "out.onnx", *argv)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith(f"error: {message}") and "--help" in done.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_config_typo_lists_every_valid_key(model_path, tmp_path):
    (tmp_path / "c.yaml").write_text("layers:\n  conv1: {kk: 3}\n")
    done = onnxvq("compress", model_path, "-o", tmp_path / "out.onnx", "--config", tmp_path / "c.yaml")
    assert done.returncode == 1
    for key in ("k", "d", "max_iter", "method", "skip", "codebook_dtype", "scales"):
        assert f" {key}" in done.stderr.split("valid:")[1], key


def test_progress_lines_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    from onnxvq import progress

    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    with progress.progress(total=3, desc="encoding", unit="weight", enabled=True) as bar:
        for _ in range(3):
            bar.update()
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("onnxvq: encoding 1/3 weights (33%)")
    assert lines[-1].startswith("onnxvq: encoding 3/3 weights (100%)")
    with progress.progress(total=3, desc="encoding", unit="weight", enabled=False) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""
