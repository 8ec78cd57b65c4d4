"""Per-output-channel scales (onnxvq.channel_scales): exact recovery, what auto chooses, that
every method and the fine-tune bridge carry them, and that the written model agrees with its
decompressed twin."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxvq
from models import cnn, make_model, rng, run_ort
from onnxvq import channel_scales
from onnxvq.layout import WeightLayout
from onnxvq.methods import get_method
from onnxvq.packing import pack

SEED = np.random.SeedSequence(0)


def spread_rows(rows=64, cols=96, decades=3.0, seed=0) -> np.ndarray:
    """A (rows, cols) weight whose row magnitudes span ``decades`` decades, as BN folding makes."""
    r = rng(seed)
    scales = 10.0 ** r.uniform(-decades, 0, rows)
    return (r.standard_normal((rows, cols)) * scales[:, None]).astype(np.float32)


def encode(weight, scales, method="pq", k=16, d=4, inputs=None):
    method_obj = get_method(method)
    params = method_obj.Params(k=k, d=d)

    def decode(encoded):
        return pack(encoded, weight_shape=weight.shape, weight_dtype=TensorProto.FLOAT, codebook_dtype="float32").decode(
            transposed=False
        )

    encoded = channel_scales.encode(
        method_obj, weight, transposed=False, row_axes=1, params=params, seed=SEED, inputs=inputs,
        scales=scales, decode=decode,
    )
    return encoded, decode(encoded)


def test_known_codebook_with_row_scales_is_recovered_exactly():
    """Rows that are permutations of the same codewords, each times its own scale: with scales the
    normalised rows are the codewords themselves, so encode -> decode is exact."""
    r = rng(1)
    codebook = r.standard_normal((8, 4)).astype(np.float32)
    rows = [codebook[r.permutation(np.repeat(np.arange(8), 3))].reshape(-1) for _ in range(32)]
    weight = (np.stack(rows) * (10.0 ** r.uniform(-3, 0, 32))[:, None]).astype(np.float32)
    encoded, decoded = encode(weight, "on", k=8, d=4)
    assert "scales" in encoded.extras
    np.testing.assert_allclose(decoded, weight, rtol=1e-5, atol=1e-9)


def test_scales_lower_the_per_channel_error_by_far():
    weight = spread_rows()
    _, plain = encode(weight, "off")
    scaled_encoded, scaled = encode(weight, "on")
    error_plain = channel_scales.relative_channel_error(weight, plain, None)
    error_scaled = channel_scales.relative_channel_error(weight, scaled, None)
    assert error_scaled < 0.3 * error_plain, (error_scaled, error_plain)
    assert scaled_encoded.stats["scales"] == "on"


def test_auto_follows_the_spread_of_the_rows():
    auto, _ = encode(spread_rows(decades=3.0), "auto")
    assert auto.stats["scales"] == "on" and "scales" in auto.extras
    flat = rng(2).standard_normal((64, 96)).astype(np.float32)  # one scale for every row
    auto, _ = encode(flat, "auto")
    assert auto.stats["scales"] == "off" and "scales" not in auto.extras
    # In between, both are measured and the lower relative error wins.
    middle, _ = encode(spread_rows(decades=0.45, seed=3), "auto")
    assert {"relative_error_scaled", "relative_error_plain"} <= set(middle.stats)
    chosen = "on" if middle.stats["relative_error_scaled"] < middle.stats["relative_error_plain"] else "off"
    assert middle.stats["scales"] == chosen


def test_refit_scales_never_worse_than_the_row_rms():
    weight = spread_rows(seed=4)
    encoded, decoded = encode(weight, "on")
    rms = np.sqrt(np.mean(weight.astype(np.float64) ** 2, axis=1)).astype(np.float32)
    with_rms = dataclasses.replace(encoded, extras={**encoded.extras, "scales": rms})
    as_rms = pack(with_rms, weight_shape=weight.shape, weight_dtype=TensorProto.FLOAT, codebook_dtype="float32").decode(
        transposed=False
    )
    row_error = lambda approx: ((weight.astype(np.float64) - approx) ** 2).sum(1)  # noqa: E731
    assert np.all(row_error(decoded) <= row_error(as_rms) * (1 + 1e-5) + 1e-12)


def test_zero_rows_stay_zero():
    weight = spread_rows()
    weight[[3, 17]] = 0
    _, decoded = encode(weight, "on")
    assert np.all(np.isfinite(decoded))
    np.testing.assert_array_equal(decoded[[3, 17]], 0)


def test_rows_below_float32s_normal_range_raise_no_warning():
    """A row of float32 denormals (1e-41, as dead channels of real detectors have) beside
    ordinary rows: the spread is computed without overflow and the other rows stay accurate."""
    weight = spread_rows()
    weight[7] *= 1000  # max / smallest normal float32 then overflows float32
    others = np.delete(np.arange(len(weight)), 5)

    def sqnr(decoded):
        return 10 * np.log10(np.sum(weight[others] ** 2) / np.sum((weight[others] - decoded[others]) ** 2))

    without = sqnr(encode(weight, "auto")[1])
    weight[5] = 1e-41
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, decoded = encode(weight, "auto")
    assert sqnr(decoded) > without - 0.1
    assert np.all(np.abs(decoded[5]) < 1e-30)


@pytest.mark.parametrize("method,k,d", [("pq", 64, 2), ("lr2vq", 64, 2), ("ssvq", 16, 2)])
def test_every_method_writes_scales_that_every_runtime_decodes(method, k, d):
    model = cnn()
    result = onnxvq.compress(model, method=method, k=k, d=d, min_size=0, scales="on")
    assert all(layer.scales for layer in result.summary.layers if layer.compressed)
    proto = result.to_proto()
    assert any(init.name.endswith("vq_scales") for init in proto.graph.initializer)
    x = {"x": rng(5).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    dense = ir.serde.serialize_model(onnxvq.decompress(proto))
    got, twin, original = run_ort(proto, x)[0], run_ort(dense, x)[0], run_ort(model, x)[0]
    np.testing.assert_allclose(got, twin, rtol=1e-4, atol=1e-5)
    assert 10 * np.log10((original**2).sum() / ((original - got) ** 2).sum()) > 10


@pytest.mark.parametrize("magnitude", [1e-8, 1e-30, 1e30])
def test_extreme_weights_keep_their_precision(magnitude):
    """Weights far outside float16's range (and whose squares leave float32's) are encoded as
    well as ordinary ones: tables kept float32 and said so, no overflow warnings."""
    weight = (rng(6).standard_normal((64, 32)) * magnitude).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)
    model = make_model(
        [node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [numpy_helper.from_array(weight, "w")],
    )
    for scales in ("off", "on"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = onnxvq.compress(model, k=64, d=2, min_size=0, scales=scales)
        layer = result.summary.layers[0]
        assert layer.sqnr_db > 14, (scales, layer.sqnr_db)
        assert "kept float32" in (layer.storage_note or ""), scales
        assert "kept float32" in result.summary.format()


def test_finetuning_learns_the_scales():
    torch = pytest.importorskip("torch")
    weight = spread_rows(rows=16, cols=32)
    encoded, _ = encode(weight, "on")
    layout = WeightLayout(weight.shape, False, 1, 4)
    module = channel_scales.trainable(get_method("pq"), encoded, layout, get_method("pq").Params(k=16, d=4))
    names = {name for name, _ in module.named_parameters()}
    assert names == {"scales", "inner.codebook"}
    np.testing.assert_allclose(module().detach().numpy(), encode(weight, "on")[1], rtol=1e-5, atol=1e-9)
    loss = ((module() - torch.from_numpy(weight)) ** 2).sum()
    loss.backward()
    assert module.scales.grad is not None and module.scales.grad.abs().sum() > 0
    with torch.no_grad():
        module.scales.mul_(2)
    learned = module.to_encoded()
    np.testing.assert_allclose(learned.extras["scales"], 2 * encoded.extras["scales"], rtol=1e-6)


def test_config_and_cli_reject_unknown_scales_setting():
    with pytest.raises(onnxvq.OnnxVQError, match="scales must be one of"):
        onnxvq.compress(cnn(), scales="maybe")
    with pytest.raises(onnxvq.OnnxVQError, match="scales must be one of"):
        onnxvq.compress(cnn(), layers={"conv2": {"scales": 1}}, min_size=0)
    result = onnxvq.compress(cnn(), min_size=0, k=16, d=4, scales="off", layers={"conv2": {"scales": "on"}})
    by_name = {l.name: l for l in result.summary.layers}
    assert by_name["conv2"].scales and not by_name["conv1"].scales
