"""ssvq: sign bits packed 8 per byte, exact recovery of weights built from a magnitude codebook
and signs, data-aware encoding that never loses, and the trainable module (STE gradient,
progressive freezing that never unfreezes, write-back, learned signs that repair wrong ones)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from onnxvq.activations import LayerInputs
from onnxvq.layout import WeightLayout, matrix_to_weight
from onnxvq.methods.base import Encoded, MethodParams
from onnxvq.methods.pq import PQ, PQParams
from onnxvq.methods.ssvq import SSVQ, SSVQParams, signed_output_error
from onnxvq.ops.signs import SIGN_TABLE, pack_signs, packed_sign_bytes, unpack_signs

torch = pytest.importorskip("torch")

from onnxvq.finetune.layerwise import train_layer  # noqa: E402


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These layers are tiny: torch's thread pool only adds spinning, which gets 10x slower when
    the cores are shared with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def decode(encoded: Encoded, layout: WeightLayout) -> np.ndarray:
    """The numpy decode: ``C[codes]`` (padding dropped) times the unpacked signs, as a weight."""
    magnitudes = encoded.codebook[encoded.codes].reshape(layout.rows, -1)[:, : layout.cols]
    matrix = magnitudes * unpack_signs(encoded.extras["signs"], layout.cols)
    return matrix_to_weight(matrix, layout.weight_shape, layout.transposed)


def encode(weight, layout, params, inputs=None, seed=0) -> Encoded:
    return SSVQ().encode(
        weight, transposed=layout.transposed, row_axes=layout.row_axes, params=params,
        seed=np.random.SeedSequence(seed), inputs=inputs,
    )


def built_weight(layout: WeightLayout, k: int, seed: int = 0):
    """A weight that is exactly ``C[codes] * S`` for a known magnitude codebook (entries in
    [0.1, 2], some exact zeros) and random signs."""
    r = np.random.default_rng(seed)
    codebook = r.uniform(0.1, 2.0, (k, layout.d)).astype(np.float32)
    codebook[0, 0] = 0.0
    codes = r.integers(0, k, (layout.rows, layout.n_sub))
    signs = np.where(r.random((layout.rows, layout.cols)) < 0.5, -1.0, 1.0).astype(np.float32)
    matrix = codebook[codes].reshape(layout.rows, -1)[:, : layout.cols] * signs
    return matrix_to_weight(matrix, layout.weight_shape, layout.transposed), codebook


def output_error(weight, decoded, layout, hessian) -> float:
    """``sum_r (m^_r - m_r)' H (m^_r - m_r)`` straight from the definition."""
    diff = layout.to_matrix(decoded).astype(np.float64) - layout.to_matrix(weight)
    if hessian.ndim == 1:
        return float(np.sum(diff * diff * hessian))
    return float(np.einsum("rc,cd,rd->", diff, hessian, diff))


def correlated_inputs(cols: int, n: int = 2048, seed: int = 1) -> np.ndarray:
    """Inputs with cross-correlations and per-column scales spanning 100x."""
    r = np.random.default_rng(seed)
    mix = r.standard_normal((cols, cols)) * 0.3 + np.eye(cols)
    scales = 10.0 ** r.uniform(-1, 1, cols)
    return (r.standard_normal((n, cols)) @ mix * scales).astype(np.float32)


def layer_inputs(x: np.ndarray, diagonal: bool = False) -> LayerInputs:
    hessian = x.T.astype(np.float64) @ x / len(x)
    return LayerInputs(
        hessian=np.diagonal(hessian).copy() if diagonal else hessian,
        cross=None, inputs=x[:, None, :], reference_inputs=None, count=len(x),
    )


# --- sign packing ------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("cols", [1, 7, 8, 9, 15, 16, 17, 63, 64, 65])
def test_signs_round_trip_with_zero_padding_bits(rows, cols):
    negative = np.random.default_rng(rows * 100 + cols).random((rows, cols)) < 0.5
    packed = pack_signs(negative)
    assert packed.dtype == np.uint8 and packed.shape == (rows, -(-cols // 8))
    assert packed.size == packed_sign_bytes(rows, cols)
    np.testing.assert_array_equal(unpack_signs(packed, cols), np.where(negative, -1.0, 1.0))
    padding_bits = cols % 8
    if padding_bits:
        assert not (packed[:, -1] >> padding_bits).any()
    all_negative = pack_signs(np.ones((rows, cols), bool))
    assert (unpack_signs(all_negative, cols) == -1).all()


def test_sign_table_rows_are_the_bits_least_significant_first():
    bits = (np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1
    np.testing.assert_array_equal(SIGN_TABLE, np.where(bits == 1, -1.0, 1.0))
    assert SIGN_TABLE.dtype == np.float32


# --- encoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,transposed,row_axes,d",
    [
        ((24, 32), False, 1, 4),  # Gemm transB=1
        ((32, 24), True, 1, 4),  # Gemm transB=0 / MatMul with the weight on the right
        ((16, 3, 3, 3), False, 1, 4),  # Conv: cols 27, the last subvector of each row has 3
        ((20, 30), False, 1, 4),  # d does not divide cols: tail 2
    ],
)
def test_weights_built_from_magnitudes_and_signs_are_recovered_exactly(shape, transposed, row_axes, d):
    layout = WeightLayout(shape, transposed, row_axes, d)
    weight, truth = built_weight(layout, k=16)
    encoded = encode(weight, layout, SSVQParams(k=16, d=d))
    assert encoded.method == "ssvq" and encoded.codebook.dtype == np.float32
    assert encoded.codes.shape == (layout.rows, layout.n_sub) and encoded.codebook.shape == (16, d)
    assert encoded.extras["signs"].shape == (layout.rows, -(-layout.cols // 8))
    assert (encoded.codebook >= 0).all()
    np.testing.assert_allclose(decode(encoded, layout), weight, rtol=0, atol=1e-6)
    # the codebook found is the known one, up to the order of the codewords
    np.testing.assert_allclose(np.sort(encoded.codebook, axis=0), np.sort(truth, axis=0), atol=1e-6)


def test_k_is_capped_and_stored_bytes_add_the_sign_bits():
    layout = WeightLayout((4, 8), False, 1, 4)
    weight = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    encoded = encode(weight, layout, SSVQParams(k=256, d=4))
    assert encoded.k == 8  # 4 rows x 2 subvectors
    big = WeightLayout((64, 3, 3, 3), False, 1, 8)
    pq_bytes = PQ().stored_nbytes(big, PQParams(k=256, d=8), 2)
    assert SSVQ().stored_nbytes(big, SSVQParams(k=256, d=8), 2) == pq_bytes + 64 * 4  # ceil(27 / 8)


@pytest.mark.parametrize("diagonal", [False, True])
def test_data_aware_encoding_is_never_worse_than_weight_only(diagonal):
    layout = WeightLayout((32, 48), False, 1, 4)
    weight = np.random.default_rng(2).standard_normal((32, 48)).astype(np.float32)
    x = correlated_inputs(48)
    inputs = layer_inputs(x, diagonal)
    full = layer_inputs(x).hessian
    params = SSVQParams(k=16, d=4)
    plain, aware = encode(weight, layout, params), encode(weight, layout, params, inputs)
    assert "weighted_iterations" in aware.stats and "weighted_iterations" not in plain.stats
    assert (aware.codebook >= 0).all()
    hessian = inputs.hessian
    before = output_error(weight, decode(plain, layout), layout, hessian)
    after = output_error(weight, decode(aware, layout), layout, hessian)
    assert after <= before * (1 + 1e-9)
    if diagonal:  # the weighting is exact on a diagonal H: it must help clearly
        assert after < 0.9 * before
    # the error on the actual inputs agrees with the moment form (the full H)
    decoded = layout.to_matrix(decode(aware, layout))
    on_inputs = float(((x @ (decoded - weight).T) ** 2).sum() / len(x))
    np.testing.assert_allclose(on_inputs, output_error(weight, decode(aware, layout), layout, full), rtol=1e-4)


@pytest.mark.parametrize("diagonal", [False, True])
def test_signed_output_error_matches_its_definition(diagonal):
    layout = WeightLayout((10, 22), False, 1, 4)  # padded: tail 2
    r = np.random.default_rng(3)
    weight = r.standard_normal((10, 22)).astype(np.float32)
    hessian = layer_inputs(correlated_inputs(22), diagonal).hessian
    encoded = encode(weight, layout, SSVQParams(k=8, d=4))
    signs = layout.to_subvectors(np.where(weight < 0, -1.0, 1.0).astype(np.float32))
    got = signed_output_error(
        layout.to_subvectors(np.abs(weight)), signs, encoded.codes, encoded.codebook, layout.pad_moment(hessian)
    )
    np.testing.assert_allclose(got, output_error(weight, decode(encoded, layout), layout, hessian), rtol=1e-9)


# --- trainable ---------------------------------------------------------------------------------


def trainable(encoded, layout, **options):
    params = SSVQParams(k=encoded.k, d=layout.d, **options)
    return SSVQ().trainable(encoded, layout, params)


@pytest.mark.parametrize("signs", ["fixed", "learn", "freeze"])
def test_module_at_init_is_the_numpy_decode(signs):
    layout = WeightLayout((8, 3, 3, 3), False, 1, 4)
    weight = np.random.default_rng(4).standard_normal((8, 3, 3, 3)).astype(np.float32)
    weight[0, 0, 0, :2] = 0.0
    encoded = encode(weight, layout, SSVQParams(k=16, d=4))
    module = trainable(encoded, layout, signs=signs)
    with torch.no_grad():
        np.testing.assert_array_equal(module().numpy(), decode(encoded, layout))
    names = {name for name, _ in module.named_parameters()}
    assert names == ({"codebook"} if signs == "fixed" else {"codebook", "latent"})
    stats = module.stats()
    assert stats == {"signs": 8 * 27, "signs_flipped": 0, "sign_flip_events": 0, "signs_frozen": 0}


def test_zero_magnitudes_keep_their_encoded_negative_sign():
    layout = WeightLayout((2, 8), False, 1, 4)
    encoded = Encoded(
        method="ssvq", codes=np.array([[0, 1], [1, 0]]), codebook=np.array([[0.0, 1, 2, 3], [4, 0, 5, 6]], np.float32),
        extras={"signs": pack_signs(np.ones((2, 8), bool))},
    )
    module = trainable(encoded, layout, signs="learn")
    assert (module.signs() == -1).all() and module.stats()["signs_flipped"] == 0


def test_ste_gradient_is_the_weight_gradient_scaled_by_the_codeword_magnitude():
    layout = WeightLayout((6, 10), False, 1, 4)
    r = np.random.default_rng(5)
    encoded = encode(r.standard_normal((6, 10)).astype(np.float32), layout, SSVQParams(k=8, d=4))
    module = trainable(encoded, layout, signs="freeze")
    module.frozen[0, :3] = True  # frozen entries take no gradient
    upstream = torch.from_numpy(r.standard_normal((6, 10)).astype(np.float32))
    (module.matrix() * upstream).sum().backward()
    magnitude = encoded.codebook[encoded.codes].reshape(6, -1)[:, :10]
    expected = upstream.numpy() * magnitude
    expected[0, :3] = 0.0
    np.testing.assert_allclose(module.latent.grad.numpy(), expected, rtol=1e-6)
    # the codebook's gradient is the usual scatter-add of the signed weight gradient
    signed = (upstream * module.signs().detach()).numpy()
    padded = np.zeros((6, layout.n_sub * 4), np.float32)
    padded[:, :10] = signed
    codebook_grad = np.zeros_like(encoded.codebook)
    np.add.at(codebook_grad, encoded.codes.ravel(), padded.reshape(-1, 4))
    np.testing.assert_allclose(module.codebook.grad.numpy(), codebook_grad, rtol=1e-5, atol=1e-6)


def noisy_sign_training(module, steps, seed=0, record=None):
    """Adam on random targets resampled every step around a fixed mean: many weights sit near
    zero and keep flipping, which is what freezing is for."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(module.layout.rows, module.layout.cols, generator=generator) * 0.3
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
    for step in range(steps):
        target = mean + torch.randn(mean.shape, generator=generator)
        loss = ((module.matrix() - target) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        module.after_step(step, steps)
        if record is not None:
            record.append((module.frozen.clone(), module.signs().detach().clone()))


def test_frozen_signs_never_change_again_and_the_frozen_set_only_grows():
    layout = WeightLayout((16, 24), False, 1, 4)
    encoded = encode(np.random.default_rng(6).standard_normal((16, 24)).astype(np.float32), layout, SSVQParams(k=8, d=4))
    module = trainable(encoded, layout, freeze_every=3, freeze_threshold=0.3, freeze_threshold_end=0.05, flip_decay=0.8)
    history = []
    noisy_sign_training(module, 200, record=history)
    previous = torch.zeros_like(history[0][0])
    values = torch.zeros_like(history[0][1])  # each frozen sign's value when it froze
    for step, (frozen, signs) in enumerate(history):
        assert (frozen >= previous).all(), f"a frozen sign was unfrozen at step {step}"
        newly = frozen & ~previous
        values[newly] = signs[newly]
        assert (signs[frozen] == values[frozen]).all(), f"a frozen sign changed at step {step}"
        previous = frozen
    stats = module.stats()
    assert 0 < stats["signs_frozen"] < stats["signs"]
    assert stats["sign_flip_events"] > stats["signs_flipped"]
    assert json.loads(json.dumps(stats)) == stats


def test_all_training_state_lives_in_the_state_dict():
    """Layer-wise training restores a snapshot when training does not help: the freezing state
    must come back with it."""
    layout = WeightLayout((8, 16), False, 1, 4)
    encoded = encode(np.random.default_rng(7).standard_normal((8, 16)).astype(np.float32), layout, SSVQParams(k=8, d=4))
    module = trainable(encoded, layout, freeze_every=2, freeze_threshold=0.3, freeze_threshold_end=0.05, flip_decay=0.8)
    noisy_sign_training(module, 60, seed=1)
    snapshot, stats = copy.deepcopy(module.state_dict()), module.stats()
    for name in ("frozen", "frozen_values", "flip_rate", "sign_average", "previous_signs", "flip_events", "latent"):
        assert name in snapshot
    noisy_sign_training(module, 60, seed=2)
    assert module.stats() != stats
    module.load_state_dict(snapshot)
    assert module.stats() == stats


@pytest.mark.parametrize("signs", ["fixed", "learn", "freeze"])
def test_to_encoded_decodes_to_the_trained_weight(signs):
    layout = WeightLayout((12, 3, 3), False, 1, 4)  # cols 9: padded
    encoded = encode(np.random.default_rng(8).standard_normal((12, 3, 3)).astype(np.float32), layout, SSVQParams(k=8, d=4))
    module = trainable(encoded, layout, signs=signs, freeze_every=2)
    noisy_sign_training(module, 30) if signs == "freeze" else None
    with torch.no_grad():
        module.codebook[0, 1] = -0.5  # a codeword pushed below zero is stored as a magnitude
        if signs == "learn":
            module.latent.mul_(torch.where(torch.rand(module.latent.shape) < 0.3, -1.0, 1.0))
        trained = module().numpy()
    written = module.to_encoded()
    assert (written.codebook >= 0).all() and written.codebook.dtype == np.float32
    np.testing.assert_array_equal(written.codes, encoded.codes)
    assert written.method == "ssvq" and written.stats == encoded.stats
    np.testing.assert_array_equal(decode(written, layout), trained)


def test_learned_signs_repair_corrupted_signs_that_fixed_signs_cannot():
    r = np.random.default_rng(9)
    layout = WeightLayout((32, 32), False, 1, 4)
    weight, _ = built_weight(layout, k=16, seed=9)
    right = encode(weight, layout, SSVQParams(k=16, d=4))
    wrong_signs = layout.to_matrix(weight) < 0
    wrong_signs ^= r.random(wrong_signs.shape) < 0.1  # one sign in ten flipped
    corrupted = Encoded(method="ssvq", codes=right.codes, codebook=right.codebook, extras={"signs": pack_signs(wrong_signs)})
    x = r.standard_normal((512, 1, 32)).astype(np.float32)
    data = LayerInputs(hessian=np.eye(32), cross=None, inputs=x, reference_inputs=None, count=512)
    losses = {}
    for signs in ("fixed", "learn", "freeze"):
        module = trainable(corrupted, layout, signs=signs)
        result = train_layer(module, weight, layout, data, epochs=60, steps=None, lr=0.02, batch_rows=128, seed=0)
        losses[signs] = result["loss_after"]
        assert result["loss_before"] > 0.05
    assert losses["learn"] < 0.1 * losses["fixed"], losses
    assert losses["freeze"] < 0.1 * losses["fixed"], losses


def test_trainable_accepts_plain_method_params():
    layout = WeightLayout((4, 8), False, 1, 4)
    encoded = encode(np.random.default_rng(10).standard_normal((4, 8)).astype(np.float32), layout, SSVQParams(k=4, d=4))
    module = SSVQ().trainable(encoded, layout, MethodParams(k=4, d=4))
    assert module.params == SSVQParams(k=4, d=4)


# --- params ------------------------------------------------------------------------------------


def test_freezing_schedule():
    params = SSVQParams(freeze_threshold=0.4, freeze_threshold_end=0.1)
    assert params.threshold_at(0, 100) == pytest.approx(0.4)
    assert params.threshold_at(50, 100) == pytest.approx(0.25)
    assert params.threshold_at(100, 100) == pytest.approx(0.1)
    assert [params.freeze_interval(n) for n in (1, 30, 300, 5000)] == [1, 1, 6, 100]
    assert SSVQParams(freeze_every=7).freeze_interval(5000) == 7


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"signs": "flip"}, "signs must be one of"),
        ({"max_iter": 0}, "max_iter"),
        ({"freeze_every": -1}, "freeze_every"),
        ({"freeze_every": 2.5}, "freeze_every"),
        ({"freeze_threshold": 1.5}, "freeze_threshold"),
        ({"freeze_threshold": 0.1, "freeze_threshold_end": 0.2}, "freeze_threshold_end <= freeze_threshold"),
        ({"freeze_threshold_end": -0.1}, "0 <= freeze_threshold_end"),
        ({"freeze_threshold": True}, "freeze_threshold must be a number"),
        ({"flip_decay": 1.0}, "flip_decay"),
        ({"flip_decay": float("nan")}, "flip_decay"),
        ({"k": 1}, "k must be at least 2"),
    ],
)
def test_invalid_params_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SSVQParams(**kwargs)


# --- through compress(): the graph, the function bodies, the fine-tune bridge ----------------


def test_compressed_model_runs_in_plain_ort_and_matches_its_decompressed_twin():
    import onnx_ir as ir

    import onnxvq
    from models import cnn, run_ort

    result = onnxvq.compress(cnn(), method="ssvq", k=16, d=4, min_size=0)
    compressed = result.to_proto()
    vq_nodes = [n for n in compressed.graph.node if n.domain == "ai.onnxvq"]
    assert vq_nodes and all(".sg" in n.overload and len(n.input) >= 4 for n in vq_nodes)
    x = {"x": np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    twin = ir.serde.serialize_model(onnxvq.decompress(compressed))
    np.testing.assert_allclose(run_ort(compressed, x)[0], run_ort(twin, x)[0], rtol=1e-5, atol=1e-5)
    # one sign bit per weight is stored, packed
    for layer in result.summary.compressed_layers:
        assert layer.bytes_after >= layer.params / 8


@pytest.mark.parametrize("mode", ["layer", "e2e"])
def test_fine_tuning_reports_sign_statistics(mode):
    import onnxvq
    from models import mlp

    calib = [{"x": np.random.default_rng(i).standard_normal((16, 64)).astype(np.float32)} for i in range(6)]
    result = onnxvq.compress(mlp(), method="ssvq", k=16, d=8, min_size=0, calib=calib,
                             finetune={"mode": mode, "epochs": 3, "holdout": 0.0})
    quality = result.summary.calibration["quality"]
    assert quality["fine-tuned"].sqnr_db >= quality["encoded"].sqnr_db
    for layer in result.summary.compressed_layers:
        stats = layer.finetune
        assert stats["signs"] == layer.params
        assert 0 <= stats["signs_frozen"] <= stats["signs"] and 0 <= stats["signs_flipped"] <= stats["signs"]
