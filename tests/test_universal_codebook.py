"""The universal codebook of VQ4ALL: sampling, the kernel density draws, the file and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import cnn, make_model, mlp, tied_embedding_model
from onnxvq import __version__
from onnxvq.errors import OnnxVQError
from onnxvq.universal_codebook import (
    bandwidth_factor,
    build_codebook,
    kde_codebook,
    load_codebook,
    sample_subvectors,
    save_codebook,
)


def gemm_model(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """x -> Gemm(w, transB=1) for each weight in turn (shapes (out, in) chained)."""
    nodes, current = [], "x"
    for i, name in enumerate(weights):
        out = "y" if i == len(weights) - 1 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [current, name], [out], name=f"fc{i}", transB=1))
        current = out
    first, last = next(iter(weights.values())), list(weights.values())[-1]
    return make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", first.shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", last.shape[0]])],
        [numpy_helper.from_array(w, n) for n, w in weights.items()],
    )


def normalised_subvectors(matrix: np.ndarray, d: int) -> np.ndarray:
    """Every whole subvector of the row-RMS-normalised matrix (independent of the module)."""
    rms = np.sqrt(np.mean(matrix.astype(np.float64) ** 2, axis=1, keepdims=True))
    rows = matrix / np.where(rms > 0, rms, 1.0)
    whole = matrix.shape[1] // d
    return rows[:, : whole * d].reshape(-1, d)


def as_set(rows: np.ndarray) -> np.ndarray:
    return rows[np.lexsort(rows.T[::-1])]


# --- the kernel density draws ---------------------------------------------------------------

def test_kde_draws_have_the_mean_and_covariance_of_the_density():
    """Codewords drawn from the KDE have the sample mean and covariance (n-1)/n Sigma + h^2 Sigma.

    At d=8, n=500, Scott's h^2 = 0.355 and Silverman's 0.305: the 1% tolerance (the relative
    error of 400k draws is 0.2-0.5% over seeds) tells the two rules apart (3.7% apart), and a
    missing noise term (26% off), H = h Sigma, a diagonal H or noise 5% too small fail it too
    (each mutation of the module was checked by hand to fail the first covariance assertion).
    """
    d, n, draws = 8, 500, 400_000
    r = np.random.default_rng(1)
    a = r.standard_normal((d, d))
    true_cov = a @ a.T + 0.5 * np.eye(d)  # strongly correlated coordinates
    samples = r.multivariate_normal(np.arange(d, dtype=float), true_cov, size=n)
    sigma = np.cov(samples, rowvar=False)

    codewords, h = kde_codebook(samples, draws, seed=3, bandwidth="scott")
    assert codewords.shape == (draws, d) and codewords.dtype == np.float32
    assert h == pytest.approx(n ** (-1 / (d + 4)))
    x = codewords.astype(np.float64)

    # mean: within 5 standard errors per coordinate
    error = x.mean(axis=0) - samples.mean(axis=0)
    assert np.all(np.abs(error) < 5 * np.sqrt(np.diag(sigma) * (1 + h * h) / draws))

    def off_by(expected):
        return np.linalg.norm(np.cov(x, rowvar=False) - expected) / np.linalg.norm(expected)

    biased = np.cov(samples, rowvar=False, ddof=0)
    assert off_by(biased + h * h * sigma) < 0.01
    # the tolerance has power: each of these mistakes is caught
    h_silverman = bandwidth_factor(n, d, "silverman")
    assert off_by(biased + h_silverman**2 * sigma) > 0.02  # the other rule
    assert off_by(biased) > 0.1  # no noise
    assert off_by(biased + h * sigma) > 0.1  # H = h Sigma instead of h^2 Sigma
    assert off_by(biased + h * h * np.diag(np.diag(sigma))) > 0.02  # a diagonal bandwidth


def test_silverman_factor_and_singular_covariance():
    n, d = 1000, 4
    assert bandwidth_factor(n, d, "silverman") == pytest.approx((n * (d + 2) / 4) ** (-1 / (d + 4)))
    samples = np.random.default_rng(0).standard_normal((n, d))
    _, h = kde_codebook(samples, 16, seed=0, bandwidth="silverman")
    assert h == pytest.approx(bandwidth_factor(n, d, "silverman"))
    # a constant coordinate: Sigma singular, the draws stay finite and that coordinate ~constant
    samples[:, 2] = 0.25
    codewords, _ = kde_codebook(samples, 256, seed=0)
    assert np.isfinite(codewords).all()
    assert np.abs(codewords[:, 2] - 0.25).max() < 1e-3


def test_refine_lowers_the_quantization_error_and_needs_k_le_n():
    samples = np.random.default_rng(2).standard_normal((2000, 4))
    drawn, _ = kde_codebook(samples, 64, seed=0)
    refined, _ = kde_codebook(samples, 64, seed=0, refine=True)

    def error(codebook):
        return (((samples[:, None, :] - codebook[None].astype(np.float64)) ** 2).sum(-1).min(1)).mean()

    assert error(refined) < 0.8 * error(drawn)
    with pytest.raises(OnnxVQError, match="k <= the 2000 subvectors"):
        kde_codebook(samples, 2001, seed=0, refine=True)
    assert kde_codebook(samples, 2001, seed=0)[0].shape == (2001, 4)  # drawing needs no k <= n


# --- sampling ---------------------------------------------------------------------------------

def test_equal_sampling_per_tensor_and_shared_weights_once():
    per_tensor = 100
    samples, counts = sample_subvectors([cnn(), mlp(), tied_embedding_model()], 8, per_tensor, seed=0)
    cnn_counts, mlp_counts, tied_counts = counts.values()
    # cnn: conv1 (864 weights) and fc2 (400) are under 1024 weights; conv2, fc1 are sampled
    assert cnn_counts["weights"] == {"w2": per_tensor, "w3": per_tensor}
    assert mlp_counts["weights"] == {"w0": per_tensor, "w1": per_tensor, "w2": per_tensor}
    # one table read by a Gather and a Gemm counts once
    assert tied_counts["tensors"] == 1 and tied_counts["subvectors"] == per_tensor
    assert len(samples) == 6 * per_tensor and samples.dtype == np.float64
    # fewer subvectors than asked for: all of them, each once
    _, counts = sample_subvectors([mlp()], 8, 1000, seed=0)
    assert list(counts.values())[0]["weights"] == {"w0": 1000, "w1": 1000, "w2": 160}


def test_rows_are_normalised_by_their_rms_and_the_padded_tail_is_not_sampled():
    r = np.random.default_rng(0)
    # rows six orders of magnitude apart; 100 columns: d=8 leaves a padded tail of 4 per row
    scales = 10.0 ** np.linspace(-3, 3, 64)[:, None]
    w = (r.standard_normal((64, 100)) * scales).astype(np.float32)
    w[5] = 0.0  # an all-zero row keeps scale 1 (its subvectors are zeros)
    samples, counts = sample_subvectors([gemm_model({"w": w})], 8, 10**6, seed=0)
    assert list(counts.values())[0]["subvectors"] == 64 * 12  # 12 whole subvectors per row
    # exactly the normalised whole subvectors, each once (float32 normalisation as compress does)
    expected = normalised_subvectors(w, 8)
    np.testing.assert_allclose(as_set(samples), as_set(expected), rtol=1e-6, atol=1e-7)
    live = np.sqrt((samples**2).mean(axis=1))
    live = live[live > 0]
    assert live.max() / live.min() < 20  # comparable, where the raw rows spread over 1e6

    # a sample smaller than the weight: still whole, normalised subvectors of it
    few, _ = sample_subvectors([gemm_model({"w": w})], 8, 50, seed=1)
    assert len(few) == 50
    assert np.isin(few.view([("", few.dtype)] * 8), as_set(samples).view([("", few.dtype)] * 8)).all()


def test_sampling_is_seeded_per_model():
    a, _ = sample_subvectors([cnn(), mlp()], 4, 64, seed=5)
    b, _ = sample_subvectors([cnn(), mlp()], 4, 64, seed=5)
    c, _ = sample_subvectors([mlp()], 4, 64, seed=5)
    d, _ = sample_subvectors([cnn(), mlp()], 4, 64, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, d)
    assert len(c) == 3 * 64


# --- the codebook, its provenance and its file -------------------------------------------------

@pytest.fixture
def model_paths(tmp_path):
    paths = [tmp_path / "cnn.onnx", tmp_path / "mlp.onnx"]
    onnx.save(cnn(), paths[0])
    onnx.save(mlp(), paths[1])
    return paths


def test_provenance_and_hash(model_paths):
    cb = build_codebook(model_paths, k=64, d=4, per_tensor=300, seed=7, bandwidth="silverman")
    assert (cb.k, cb.d) == (64, 4) and cb.codebook.dtype == np.float32
    np.testing.assert_array_equal(cb.codebook, cb.codebook.astype(np.float16).astype(np.float32))
    assert cb.sha256 == hashlib.sha256(cb.codebook.astype("<f2").tobytes()).hexdigest()
    p = cb.provenance
    assert [m["file"] for m in p["models"]] == ["cnn.onnx", "mlp.onnx"]
    assert [m["sha256"] for m in p["models"]] == [hashlib.sha256(f.read_bytes()).hexdigest() for f in model_paths]
    assert [(m["tensors"], m["subvectors"]) for m in p["models"]] == [(2, 600), (3, 900)]
    assert p["samples"] == 1500
    assert (p["k"], p["d"], p["per_tensor"], p["seed"], p["refine"]) == (64, 4, 300, 7, False)
    assert p["bandwidth"] == "silverman"
    assert p["bandwidth_factor"] == pytest.approx(bandwidth_factor(1500, 4, "silverman"))
    assert p["onnxvq_version"] == __version__
    json.dumps(p)
    # deterministic, and the seed matters
    assert build_codebook(model_paths, k=64, d=4, per_tensor=300, seed=7, bandwidth="silverman").sha256 == cb.sha256
    assert build_codebook(model_paths, k=64, d=4, per_tensor=300, seed=8).sha256 != cb.sha256


def test_save_load_round_trip(model_paths, tmp_path):
    cb = build_codebook(model_paths, k=32, d=8, per_tensor=200, refine=True)
    path = tmp_path / "universal.cb"  # written under exactly the name given
    assert save_codebook(cb, path) == os.fspath(path)
    assert path.exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".onnxvq-")]
    with np.load(path) as data:
        assert data["codebook"].dtype == np.float16
        assert json.loads(str(data["provenance"]))["sha256"] == cb.sha256
    loaded = load_codebook(path, expected_sha256=cb.sha256.upper())
    np.testing.assert_array_equal(loaded.codebook, cb.codebook)
    assert loaded.sha256 == cb.sha256 and loaded.provenance == cb.provenance
    assert (loaded.k, loaded.d) == (32, 8)


def test_modified_file_and_wrong_expected_hash(model_paths, tmp_path):
    cb = build_codebook(model_paths, k=16, d=4, per_tensor=100)
    path = tmp_path / "u.npz"
    save_codebook(cb, path)
    with pytest.raises(OnnxVQError, match="but the model expects 00ff: use the codebook the model was compressed with"):
        load_codebook(path, expected_sha256="00ff")

    with np.load(path) as data:
        codebook, record = data["codebook"].copy(), str(data["provenance"])
    codebook[3, 1] += np.float16(0.5)
    np.savez(path, codebook=codebook, provenance=np.array(record))
    with pytest.raises(OnnxVQError) as error:
        load_codebook(path)
    message = str(error.value)
    assert "was modified" in message and str(path) in message and cb.sha256 in message
    assert hashlib.sha256(codebook.astype("<f2").tobytes()).hexdigest() in message
    # the same bytes seen as another shape
    np.savez(path, codebook=cb.codebook.astype(np.float16).reshape(32, 2), provenance=np.array(record))
    with pytest.raises(OnnxVQError, match="was modified: it is 32 x 2 but records k=16, d=4"):
        load_codebook(path)


def test_unreadable_codebook_files(tmp_path):
    with pytest.raises(OnnxVQError, match="no such file"):
        load_codebook(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(OnnxVQError, match="not a codebook file"):
        load_codebook(tmp_path / "text.npz")
    np.save(tmp_path / "array.npy", np.zeros((4, 2), np.float16))
    with pytest.raises(OnnxVQError, match="single .npy array"):
        load_codebook(tmp_path / "array.npy")
    np.savez(tmp_path / "partial.npz", codebook=np.zeros((4, 2), np.float16))
    with pytest.raises(OnnxVQError, match="has no provenance array"):
        load_codebook(tmp_path / "partial.npz")
    np.savez(tmp_path / "wide.npz", codebook=np.zeros((4, 2), np.float32), provenance=np.array("{}"))
    with pytest.raises(OnnxVQError, match="float32 of shape"):
        load_codebook(tmp_path / "wide.npz")
    np.savez(tmp_path / "nohash.npz", codebook=np.zeros((4, 2), np.float16), provenance=np.array("{}"))
    with pytest.raises(OnnxVQError, match="records no sha256"):
        load_codebook(tmp_path / "nohash.npz")


def test_never_overwrites_an_input_model(model_paths):
    cb = build_codebook(model_paths, k=16, d=4, per_tensor=100)
    before = model_paths[1].read_bytes()
    with pytest.raises(OnnxVQError, match="would overwrite the input file"):
        save_codebook(cb, model_paths[1])
    assert model_paths[1].read_bytes() == before


def test_bad_settings_are_clear_errors(model_paths, tmp_path):
    small = tmp_path / "small.onnx"
    onnx.save(gemm_model({"w": np.ones((8, 16), np.float32)}), small)  # 128 weights: under min size
    cases = [
        (dict(models=[]), "no models given"),
        (dict(d=0), "d must be at least 1"),
        (dict(k=1), r"k must be in 2\.\.65536"),
        (dict(k=65537), r"k must be in 2\.\.65536"),
        (dict(models=[model_paths[0], small]), "small.onnx has no compressible weight"),
        (dict(k=4000, refine=True), "k <= the 1000 subvectors sampled"),
        (dict(bandwidth="wide"), "bandwidth rule must be one of scott, silverman"),
        (dict(models=[model_paths[0], os.path.join(tmp_path, ".", "cnn.onnx")]), "given twice"),
    ]
    for changes, message in cases:
        settings = {**dict(models=model_paths[:1], k=16, d=4, per_tensor=500), **changes}
        with pytest.raises(OnnxVQError, match=message):
            build_codebook(settings.pop("models"), **settings)


# --- the command line -------------------------------------------------------------------------

def onnxvq(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "onnxvq.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, stdin=subprocess.DEVNULL,
    )


def test_cli_build_and_show(model_paths, tmp_path):
    out = tmp_path / "universal.npz"
    done = onnxvq("codebook", "build", *model_paths, "-o", out, "-k", 64, "-d", 4, "--per-tensor", 500,
                  "--bandwidth", "silverman", "--refine", "--seed", 3)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"{model_paths[0]}: 2 tensors, 1000 subvectors sampled"
    assert lines[1] == f"{model_paths[1]}: 3 tensors, 1320 subvectors sampled"
    cb = load_codebook(out)
    assert f"factor h={cb.provenance['bandwidth_factor']:.6g}" in lines[2] and "silverman" in lines[2]
    assert lines[3] == f"codebook: k=64, d=4, sha256 {cb.sha256}"
    assert lines[4].startswith("wrote ") and lines[4].endswith("universal.npz")
    assert cb.provenance["refine"] is True and cb.provenance["seed"] == 3

    shown = onnxvq("codebook", "show", out)
    assert shown.returncode == 0, shown.stderr
    assert f"sha256 {cb.sha256}" in shown.stdout and "verified" in shown.stdout
    assert "cnn.onnx" in shown.stdout and "3 tensors, 1320 subvectors" in shown.stdout


def test_cli_bad_input_is_one_line(model_paths, tmp_path):
    out = tmp_path / "universal.npz"
    for args in (["-k", 1, "-d", 4], ["-k", 4000, "-d", 4, "--refine", "--per-tensor", 100]):
        done = onnxvq("codebook", "build", *model_paths, "-o", out, *args)
        assert done.returncode == 1
        assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
        assert "Traceback" not in done.stderr
        assert sorted(os.listdir(tmp_path)) == ["cnn.onnx", "mlp.onnx"]  # no output, no temp file
    shown = onnxvq("codebook", "show", model_paths[0])
    assert shown.returncode == 1 and shown.stderr.startswith("error: ") and "Traceback" not in shown.stderr
