"""lr2vq: low-rank codebooks ``W_sub = C[codes] P``, the rank search, and its trainable module."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner

import onnxvq
from models import cnn, mlp, run_ort
from onnxvq.activations import LayerInputs
from onnxvq.cli import main
from onnxvq.layout import WeightLayout
from onnxvq.methods import LR2VQParams, PQParams, get_method
from onnxvq.methods.lr2vq import choose_rank
from onnxvq.weighted_kmeans import output_error

SEED = np.random.SeedSequence(0)


def low_rank_weight(rows, cols, k, m, r, seed=0, noise=0.0):
    """A (rows, cols) weight whose subvectors are codewords of a rank-r k x m codebook."""
    g = np.random.default_rng(seed)
    codebook = g.standard_normal((k, r)) @ g.standard_normal((r, m))
    codes = g.integers(0, k, (rows, cols // m))
    w = codebook[codes].reshape(rows, cols) + noise * g.standard_normal((rows, cols))
    return w.astype(np.float32)


def decode(encoded, layout):
    codewords = encoded.codebook @ encoded.extras.get("projection", np.eye(encoded.codebook.shape[1]))
    return layout.from_subvectors(codewords[encoded.codes])


def encode(w, transposed=False, row_axes=1, inputs=None, **params):
    return get_method("lr2vq").encode(w, transposed=transposed, row_axes=row_axes, params=LR2VQParams(**params),
                                      seed=SEED, inputs=inputs)


@pytest.mark.parametrize("rank", [2, "auto"])
@pytest.mark.parametrize("transposed", [False, True])
def test_weights_from_a_rank_r_codebook_are_recovered_exactly(rank, transposed):
    w = low_rank_weight(48, 64, k=16, m=8, r=2)
    if transposed:
        w = np.ascontiguousarray(w.T)
    enc = encode(w, transposed=transposed, k=16, d=8, rank=rank)
    assert enc.stats["rank"] == 2 and enc.codebook.shape == (16, 2) and enc.extras["projection"].shape == (2, 8)
    layout = WeightLayout(w.shape, transposed, 1, 8)
    np.testing.assert_allclose(decode(enc, layout), w, atol=1e-4 * np.abs(w).max())


def test_conv_weight_with_padding_is_recovered():
    # cols = 27 with m = 4: the last subvector of every row holds 3 weights and 1 padding entry
    g = np.random.default_rng(1)
    codebook = g.standard_normal((8, 1)) @ g.standard_normal((1, 4))
    layout = WeightLayout((20, 3, 3, 3), False, 1, 4)
    codes = g.integers(0, 8, (layout.rows, layout.n_sub))
    w = layout.from_subvectors(codebook[codes]).astype(np.float32)
    enc = encode(w, k=8, d=4, rank=1)
    # padded tail entries are fitted as zeros, so only the meaningful ones are checked
    assert np.abs(decode(enc, layout) - w).max() < 0.05 * np.abs(w).max()


def test_rank_d_is_plain_pq():
    w = np.random.default_rng(2).standard_normal((64, 96)).astype(np.float32)
    pq = get_method("pq").encode(w, transposed=False, row_axes=1, params=PQParams(k=32, d=8), seed=SEED)
    lr = encode(w, k=32, d=8, rank=8)
    np.testing.assert_array_equal(lr.codes, pq.codes)
    np.testing.assert_array_equal(lr.codebook, pq.codebook)
    assert lr.extras == {} and lr.stats["rank"] == 8  # P = I is not stored
    layout = WeightLayout(w.shape, False, 1, 8)
    np.testing.assert_array_equal(decode(lr, layout), layout.from_subvectors(pq.codebook[pq.codes]))


def test_auto_rank_finds_the_rank_of_noisy_low_rank_subvectors():
    # 512 distinct rank-3 codewords, more than k: clustering cannot be exact, so the search has to
    # trade; beyond the true rank only noise is left to fit, below it the error jumps.
    w = low_rank_weight(256, 256, k=512, m=8, r=3, seed=3, noise=0.01)
    enc = encode(w, k=64, d=8)
    assert enc.stats["rank"] == 3, enc.stats["rank_estimates"]


def test_rank_estimates_match_the_final_error():
    """The estimate of each rank (spectrum + sampled k-means) is within 10% of the error the
    full encoding reaches at that rank, so the auto rank is within 10% of the best; the ranks
    the search skips (their low-rank error alone exceeds the full rank's estimate) are indeed
    worse than the rank chosen."""
    w = np.random.default_rng(4).standard_normal((128, 128)).astype(np.float32) * np.linspace(2, 0.1, 8)[None].repeat(16, 0).reshape(-1)
    layout = WeightLayout(w.shape, False, 1, 8)
    points = layout.to_subvectors(w).reshape(-1, 8).astype(np.float64)
    values, vectors = np.linalg.eigh(points.T @ points)
    order = np.argsort(values)[::-1]
    best_rank, estimates = choose_rank(points.astype(np.float32), values[order], vectors[:, order], 64, seed=SEED)
    final = {}
    for r in range(1, 9):
        enc = encode(w, k=64, d=8, rank=r)
        final[r] = float(((decode(enc, layout) - w) ** 2).sum() / (w**2).sum())
        if r in estimates:
            assert estimates[r] == pytest.approx(final[r], rel=0.1), (r, estimates[r], final[r])
    assert final[best_rank] <= 1.1 * min(final.values())
    skipped = set(range(1, 9)) - set(estimates)
    assert skipped and all(final[r] > final[best_rank] for r in skipped)


def test_alternating_least_squares_lowers_the_error():
    w = np.random.default_rng(5).standard_normal((64, 128)).astype(np.float32)
    layout = WeightLayout(w.shape, False, 1, 8)
    errors = [float(((decode(encode(w, k=32, d=8, rank=3, refine_iter=n), layout) - w) ** 2).sum()) for n in (0, 20)]
    assert errors[1] < errors[0]


def test_data_aware_is_never_worse_in_output_error():
    g = np.random.default_rng(6)
    w = g.standard_normal((48, 64)).astype(np.float32)
    x = g.standard_normal((2048, 64)) @ g.standard_normal((64, 64)) * np.linspace(3, 0.1, 64)
    hessian = x.T @ x / len(x)
    inputs = LayerInputs(hessian=hessian, cross=None, inputs=None, reference_inputs=None, count=len(x))
    layout = WeightLayout(w.shape, False, 1, 8)
    target = layout.to_subvectors(w)

    def out_err(enc):
        return output_error(target, enc.codes, enc.codebook @ enc.extras.get("projection", np.eye(8)), hessian)

    for rank in (2, 5):
        assert out_err(encode(w, k=16, d=8, rank=rank, inputs=inputs)) <= out_err(encode(w, k=16, d=8, rank=rank)) * (1 + 1e-9)


def test_params_are_validated():
    with pytest.raises(ValueError, match="rank must be between 1 and d=8"):
        LR2VQParams(d=8, rank=9)
    with pytest.raises(ValueError, match="rank must be 'auto' or an integer"):
        LR2VQParams(rank="high")
    with pytest.raises(ValueError, match="refine_iter"):
        LR2VQParams(refine_iter=-1)


def test_compressed_model_runs_in_plain_ort_and_matches_its_decompressed_twin():
    original = cnn()
    result = onnxvq.compress(original, method="lr2vq", k=32, d=8, min_size=0)
    layers = result.summary.compressed_layers
    assert layers and all(l.rank is not None and 1 <= l.rank <= 8 for l in layers)
    compressed = result.to_proto()
    ranks = {l.name: l.rank for l in layers}
    from onnxvq.inspect_model import inspect_model  # full-rank layers store no projection: provenance
    assert {v["name"]: v["rank"] for v in inspect_model(result.model)["vq_layers"]} == ranks
    for node in compressed.graph.node:
        if node.domain == "ai.onnxvq":  # a projection input exactly when the rank is below d
            assert (".lr" in node.overload) == (ranks[node.name] < 8), (node.name, node.overload)
    x = {"x": np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    twin = ir.serde.serialize_model(onnxvq.decompress(compressed))
    np.testing.assert_allclose(run_ort(compressed, x)[0], run_ort(twin, x)[0], rtol=1e-5, atol=1e-5)


def test_cli_rank_option(tmp_path):
    import onnx

    model = tmp_path / "m.onnx"
    onnx.save(mlp(), model)
    runner = CliRunner()
    ok = runner.invoke(main, ["compress", str(model), "-o", str(tmp_path / "a.onnx"), "--method", "lr2vq",
                              "-k", "16", "-d", "8", "--rank", "3", "--min-size", "0"])
    assert ok.exit_code == 0, ok.output
    assert "lr2vq rank 3" in ok.output
    inspected = runner.invoke(main, ["inspect", str(tmp_path / "a.onnx")])
    assert inspected.exit_code == 0 and " 3 " in inspected.output
    for args, message in ((["--rank", "x", "--method", "lr2vq"], "--rank must be 'auto' or an integer"),
                          (["--rank", "9", "--method", "lr2vq"], "rank must be between 1 and d=8"),
                          (["--rank", "3"], "unknown config key(s) 'rank'")):
        bad = runner.invoke(main, ["compress", str(model), "-o", str(tmp_path / "b.onnx"), *args])
        assert bad.exit_code != 0 and message in bad.output and "Traceback" not in bad.output
        assert not (tmp_path / "b.onnx").exists()


torch = pytest.importorskip("torch")


def test_trainable_rebuilds_the_decode_and_trains_c_and_p():
    from onnxvq.finetune.layerwise import train_layer

    w = low_rank_weight(32, 64, k=16, m=8, r=2, seed=7)
    layout = WeightLayout(w.shape, False, 1, 8)
    enc = encode(w, k=16, d=8, rank=2)
    perturbed = type(enc)(enc.method, enc.codes, enc.codebook + 0.3, enc.stats,
                          {"projection": enc.extras["projection"] * 1.2})
    module = get_method("lr2vq").trainable(perturbed, layout, LR2VQParams(k=16, d=8, rank=2))
    np.testing.assert_allclose(module().detach().numpy(), decode(perturbed, layout), atol=1e-5)
    x = np.random.default_rng(8).standard_normal((512, 1, 64)).astype(np.float32)
    data = LayerInputs(hessian=np.eye(64), cross=None, inputs=x, reference_inputs=None, count=512)
    start_p = module.projection.detach().clone()
    stats = train_layer(module, w, layout, data, epochs=100, steps=None, lr=0.02, batch_rows=128, seed=0)
    assert stats["kept"] and stats["loss_after"] < 1e-2 * stats["loss_before"]
    assert not torch.equal(module.projection.detach(), start_p)
    learned = module.to_encoded()
    np.testing.assert_array_equal(learned.codes, enc.codes)
    np.testing.assert_allclose(decode(learned, layout), module().detach().numpy(), atol=1e-5)


def test_fine_tuned_lr2vq_end_to_end():
    calib = [{"x": np.random.default_rng(i).standard_normal((16, 64)).astype(np.float32)} for i in range(6)]
    result = onnxvq.compress(mlp(), method="lr2vq", k=16, d=8, rank=3, min_size=0, calib=calib,
                             finetune={"mode": "layer", "epochs": 3, "holdout": 0.0})
    quality = result.summary.calibration["quality"]
    assert quality["fine-tuned"].sqnr_db > quality["encoded"].sqnr_db
    assert all(l.rank == 3 for l in result.summary.compressed_layers)


def test_full_rank_training_folds_the_projection_into_the_codebook():
    w = np.random.default_rng(9).standard_normal((32, 64)).astype(np.float32)
    layout = WeightLayout(w.shape, False, 1, 8)
    enc = encode(w, k=16, d=8, rank=8)
    module = get_method("lr2vq").trainable(enc, layout, LR2VQParams(k=16, d=8, rank=8))
    with torch.no_grad():
        module.projection.add_(0.1)
    learned = module.to_encoded()
    assert learned.extras == {} and learned.codebook.shape == (16, 8)
    np.testing.assert_allclose(decode(learned, layout), module().detach().numpy(), atol=1e-5)
