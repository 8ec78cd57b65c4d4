"""vq4all (issue 14): every layer coded into one universal codebook, stored once per model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxvq
from models import cnn, mlp, run_ort
from onnxvq import ops
from onnxvq.errors import OnnxVQError
from onnxvq.universal_codebook import build_codebook, load_codebook, save_codebook


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vq4all")
    paths = {"cnn": folder / "cnn.onnx", "mlp": folder / "mlp.onnx"}
    onnx.save(cnn(), paths["cnn"])
    onnx.save(mlp(), paths["mlp"])
    return paths


@pytest.fixture(scope="module")
def codebook_path(models, tmp_path_factory):
    path = tmp_path_factory.mktemp("codebook") / "universal.npz"
    save_codebook(build_codebook([models["cnn"], models["mlp"]], k=64, d=4, per_tensor=2048, seed=0), path)
    return path


def vq_nodes(proto):
    return [n for n in proto.graph.node if n.domain == ops.DOMAIN]


def test_every_node_reads_one_codebook_stored_once(models, codebook_path):
    result = onnxvq.compress(str(models["cnn"]), method="vq4all", codebook=str(codebook_path), min_size=0)
    proto = result.to_proto()
    nodes = vq_nodes(proto)
    assert len(nodes) == 4
    assert len({n.input[2] for n in nodes}) == 1  # the codebook input
    name = nodes[0].input[2]
    assert name.startswith("onnxvq.universal_codebook.")
    assert sum(t.name == name for t in proto.graph.initializer) == 1
    universal = load_codebook(codebook_path)
    stored = next(onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == name)
    np.testing.assert_array_equal(stored.astype(np.float32), universal.codebook)
    # every node has per-channel scales and codes, nothing else
    assert all(n.attribute and dict((a.name, a) for a in n.attribute)["extra_inputs"].s == b"scales" for n in nodes)
    summary = result.summary
    assert summary.shared_codebooks == {universal.sha256: 64 * 4 * 2}
    assert summary.bytes_after == sum(l.bytes_after for l in summary.compressed_layers)
    assert summary.layer_ratio_with_shared < summary.layer_ratio
    assert "universal codebook" in summary.format()
    # the model equals its dense twin, in onnxruntime
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    dense = ir.serde.serialize_model(onnxvq.decompress(proto))
    np.testing.assert_allclose(run_ort(proto, {"x": x})[0], run_ort(dense, {"x": x})[0], rtol=1e-4, atol=1e-5)


def test_codes_are_each_normalised_subvectors_nearest_codeword(models, codebook_path):
    result = onnxvq.compress(str(models["mlp"]), method="vq4all", codebook=str(codebook_path), min_size=0)
    proto = result.to_proto()
    universal = load_codebook(codebook_path).codebook
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in mlp().graph.initializer}
    node = vq_nodes(proto)[0]
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    codes = arrays[node.input[1]].astype(np.int64)
    weight = next(w for name, w in weights.items() if w.ndim == 2 and w.shape[1] == 64)  # the first Gemm's B
    rows = weight / np.sqrt((weight.astype(np.float64) ** 2).mean(axis=1, keepdims=True))
    subvectors = rows.reshape(len(rows), -1, 4)
    distances = ((subvectors[:, :, None, :] - universal[None, None]) ** 2).sum(-1)
    np.testing.assert_array_equal(codes, distances.argmin(-1))


def test_calibration_data_lowers_each_layers_output_error(models, codebook_path):
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(32)]
    aware = onnxvq.compress(str(models["cnn"]), method="vq4all", codebook=str(codebook_path), min_size=0,
                            calib=calib, finetune="none")
    blind = onnxvq.compress(str(models["cnn"]), method="vq4all", codebook=str(codebook_path), min_size=0,
                            calib=calib, finetune={"mode": "none", "data_aware": False})
    for a, b in zip(aware.summary.compressed_layers, blind.summary.compressed_layers):
        assert a.output_sqnr_db >= b.output_sqnr_db - 1e-6, (a.name, a.output_sqnr_db, b.output_sqnr_db)
    assert sum(a.output_sqnr_db for a in aware.summary.compressed_layers) > sum(
        b.output_sqnr_db for b in blind.summary.compressed_layers) + 0.5


def test_fine_tuning_learns_assignments_and_keeps_the_codebook(models, codebook_path):
    pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    calib = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(32)]
    tuned = onnxvq.compress(str(models["cnn"]), method="vq4all", codebook=str(codebook_path), min_size=0,
                            calib=calib, finetune="layer")
    stats = [l.finetune for l in tuned.summary.compressed_layers]
    assert all(s and s["loss_after"] <= s["loss_before"] for s in stats)
    assert sum(s["codes_changed"] for s in stats) > 0
    proto = tuned.to_proto()
    name = vq_nodes(proto)[0].input[2]
    stored = next(onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == name)
    np.testing.assert_array_equal(stored.astype(np.float32), load_codebook(codebook_path).codebook)
    quality = tuned.summary.calibration["quality"]
    assert quality["fine-tuned"].sqnr_db > quality["encoded"].sqnr_db


def test_a_codebook_from_other_models_serves(models, tmp_path):
    other = tmp_path / "mlp_only.npz"
    save_codebook(build_codebook([models["mlp"]], k=16, d=4, per_tensor=1024, seed=3), other)
    result = onnxvq.compress(str(models["cnn"]), method="vq4all", codebook=str(other), min_size=0)
    assert len(vq_nodes(result.to_proto())) == 4
    assert all(l.k == 16 and l.d == 4 for l in result.summary.compressed_layers)


def test_a_modified_codebook_is_a_clear_error(codebook_path, models, tmp_path):
    data = dict(np.load(codebook_path))
    data["codebook"] = data["codebook"].copy()
    data["codebook"][0, 0] += np.float16(1)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **data)
    with pytest.raises(OnnxVQError, match="hash"):
        onnxvq.compress(str(models["cnn"]), method="vq4all", codebook=str(bad))
    with pytest.raises(OnnxVQError, match="codebook"):
        onnxvq.compress(str(models["cnn"]), method="vq4all")


def test_cli(models, codebook_path, tmp_path):
    out = tmp_path / "cnn.vq.onnx"
    done = subprocess.run([sys.executable, "-m", "onnxvq.cli", "compress", str(models["cnn"]), "-o", str(out),
                           "--method", "vq4all", "--codebook", str(codebook_path), "--min-size", "0"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert "universal codebook" in done.stdout and out.exists()
    done = subprocess.run([sys.executable, "-m", "onnxvq.cli", "compress", str(models["cnn"]), "-o", str(tmp_path / "x.onnx"),
                           "--method", "vq4all", "--codebook", str(codebook_path), "-k", "16"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode != 0 and "Traceback" not in done.stderr and "k and d" in done.stderr


def test_an_external_codebook_is_one_file_two_models_share(models, codebook_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    results = {}
    for name in ("cnn", "mlp"):
        result = onnxvq.compress(str(models[name]), method="vq4all", codebook=str(codebook_path), min_size=0)
        written = result.save(out / f"{name}.vq.onnx", codebook_external=True)
        results[name] = (result, written)
    sha = load_codebook(codebook_path).sha256
    shared = out / f"universal-{sha[:12]}.vqcb"
    assert [p for p in out.iterdir() if p.suffix == ".vqcb"] == [shared]
    assert all(str(shared) in written for _, written in results.values())
    assert shared.stat().st_size == 64 * 4 * 2
    inline = onnxvq.compress(str(models["cnn"]), method="vq4all", codebook=str(codebook_path), min_size=0)
    inline.save(tmp_path / "inline.onnx")
    assert (out / "cnn.vq.onnx").stat().st_size < (tmp_path / "inline.onnx").stat().st_size - 400
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(run_ort(str(out / "cnn.vq.onnx"), {"x": x})[0],
                               run_ort(str(tmp_path / "inline.onnx"), {"x": x})[0], rtol=1e-6, atol=1e-6)
    from onnxvq.model_io import load_model  # loading through onnxvq checks the codebook's hash

    load_model(out / "mlp.vq.onnx")
    # a codebook file swapped under the models: named, not silently decoding other weights
    data = bytearray(shared.read_bytes())
    data[0] ^= 1
    shared.write_bytes(bytes(data))
    with pytest.raises(OnnxVQError, match="use the codebook file the model was compressed with"):
        load_model(out / "cnn.vq.onnx")
    done = subprocess.run([sys.executable, "-m", "onnxvq.cli", "inspect", str(out / "cnn.vq.onnx")],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 1 and "expects" in done.stderr and "Traceback" not in done.stderr
    # and a new model is not written against the other bytes
    with pytest.raises(OnnxVQError, match="exists with other contents"):
        results["cnn"][0].save(out / "again.onnx", codebook_external=True)
    assert not (out / "again.onnx").exists()


def test_external_codebook_needs_vq4all(models, tmp_path):
    result = onnxvq.compress(str(models["cnn"]), method="pq", k=16, d=4, min_size=0)
    with pytest.raises(OnnxVQError, match="has none"):
        result.save(tmp_path / "m.onnx", codebook_external=True)


def test_end_to_end_fine_tuning_trains_the_assignments(models, codebook_path):
    pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    calib = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(24)]
    tuned = onnxvq.compress(str(models["cnn"]), method="vq4all", codebook=str(codebook_path), min_size=0,
                            calib=calib, finetune={"mode": "e2e", "steps": 100})
    assert tuned.summary.calibration["mode"] == "e2e"
    assert sum(l.finetune["codes_changed"] for l in tuned.summary.compressed_layers) > 0
    quality = tuned.summary.calibration["quality"]
    assert quality["fine-tuned"].sqnr_db >= quality["encoded"].sqnr_db


def test_inspect_lists_the_shared_codebook_once(models, codebook_path, tmp_path):
    result = onnxvq.compress(str(models["cnn"]), method="vq4all", codebook=str(codebook_path), min_size=0)
    result.save(tmp_path / "m.onnx")
    from onnxvq.inspect_model import inspect_model
    from onnxvq.model_io import load_model

    info = inspect_model(load_model(tmp_path / "m.onnx"))
    assert len(info["shared_codebooks"]) == 1 and info["shared_codebooks"][0]["bytes"] == 64 * 4 * 2
    codes_bytes = {t.name: t for t in result.to_proto().graph.initializer}
    assert sum(v["bytes"] for v in info["vq_layers"]) == sum(
        onnx.numpy_helper.to_array(t).nbytes for n, t in codes_bytes.items() if n.endswith((".vq_codes", ".vq_scales")))


def test_a_size_target_decides_which_layers_stay_dense(models, codebook_path, tmp_path):
    """vq4all's k and d are its codebook's, so a target's only choice per layer is dense or the
    universal codes; the written file (the codebook in it) meets the ratio."""
    input_bytes = models["cnn"].stat().st_size
    result = onnxvq.compress(str(models["cnn"]), method="vq4all", codebook=str(codebook_path), target_ratio=4)
    rules = {layer.name: layer.rule for layer in result.summary.layers}
    assert "target: dense" in rules.values(), rules
    coded = [name for name, rule in rules.items() if rule.startswith("target: d=4 k=64 ")]
    assert coded, rules
    written = result.save(tmp_path / "m.onnx")
    assert len(written) == 1 and (tmp_path / "m.onnx").stat().st_size <= input_bytes / 4
    nodes = vq_nodes(result.to_proto())
    assert sorted(n.name for n in nodes) == sorted(coded) and len({n.input[2] for n in nodes}) == 1


def test_a_size_target_counts_the_codebook_unless_it_is_external(models, codebook_path):
    # 512 bytes of codebook; at 200x the model file may hold 450
    with pytest.raises(OnnxVQError, match="universal codebook in the file: it alone takes 512 B.*--codebook-external"):
        onnxvq.compress(str(models["cnn"]), method="vq4all", codebook=str(codebook_path), target_ratio=200)
    with pytest.raises(OnnxVQError, match="cannot be met: what onnxvq leaves as it is"):
        onnxvq.compress(str(models["cnn"]), method="vq4all", codebook=str(codebook_path), target_ratio=200,
                        codebook_external=True)
    # stored as float32 it takes 1 KiB, more than the 901 bytes of a 100x target
    with pytest.raises(OnnxVQError, match="universal codebook in the file: it alone takes 1.0 KiB"):
        onnxvq.compress(str(models["cnn"]), method="vq4all", codebook=str(codebook_path), target_ratio=100,
                        codebook_dtype="float32")


def test_k_and_d_are_the_codebooks(models, codebook_path, tmp_path):
    done = subprocess.run([sys.executable, "-m", "onnxvq.cli", "compress", str(models["cnn"]), "-o",
                           str(tmp_path / "m.onnx"), "--method", "vq4all", "--codebook", str(codebook_path), "-d", "8"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 1 and "drop -k/-d" in done.stderr and "Traceback" not in done.stderr
