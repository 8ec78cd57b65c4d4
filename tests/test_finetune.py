"""Data-aware encoding and the fine-tune bridge, end to end through compress().

Tiny models where the right answer is known, the layer-wise and e2e paths, the e2e fallback on
ops torch cannot run, write-back that leaves every other tensor and node bit-identical, and the
CLI's calibration errors.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxvq
from models import cnn, make_model, mlp, run_ort, weight
from onnxvq.activations import LayerInputs
from onnxvq.layout import WeightLayout
from onnxvq.methods import get_method
from onnxvq.methods.pq import PQParams

torch = pytest.importorskip("torch")

from onnxvq.finetune.layerwise import train_layer  # noqa: E402


def feeds(n, shape, seed=0, batch=8):
    r = np.random.default_rng(seed)
    return [{"x": r.standard_normal((batch, *shape)).astype(np.float32)} for _ in range(n)]


def test_layer_wise_training_finds_the_codebook_that_reproduces_the_layer():
    """A weight built exactly from a codebook; start from a perturbed codebook with the right
    codes: training must bring the output error to ~0."""
    r = np.random.default_rng(0)
    truth = r.standard_normal((16, 4)).astype(np.float32)
    codes = r.integers(0, 16, size=(32, 8))
    layout = WeightLayout((32, 32), False, 1, 4)
    weight_matrix = truth[codes].reshape(32, 32)
    start = (truth + 0.3 * r.standard_normal(truth.shape)).astype(np.float32)
    encoded = get_method("pq").encode(weight_matrix, transposed=False, row_axes=1, params=PQParams(k=16, d=4),
                                      seed=np.random.SeedSequence(0))
    encoded = type(encoded)(method="pq", codes=codes, codebook=start)
    x = r.standard_normal((512, 1, 32)).astype(np.float32)
    data = LayerInputs(hessian=np.eye(32), cross=None, inputs=x, reference_inputs=None, count=512)
    module = get_method("pq").trainable(encoded, layout, PQParams(k=16, d=4))
    stats = train_layer(module, weight_matrix, layout, data, epochs=150, steps=None, lr=0.05, batch_rows=128, seed=0)
    assert stats["kept"] and stats["loss_after"] < 1e-4 * stats["loss_before"]
    np.testing.assert_allclose(module.to_encoded().codebook, truth, atol=1e-2)


def test_data_aware_encoding_lowers_every_layers_output_error():
    from digits_mlp import build_digits_mlp

    model, x_test, _ = build_digits_mlp(seed=0)
    calib = [{"x": x_test[i : i + 32]} for i in range(0, 320, 32)]
    common = dict(method="pq", k=16, d=4, min_size=0, calib=calib)
    weight_only = onnxvq.compress(model, finetune={"mode": "none", "data_aware": False}, **common).summary
    aware = onnxvq.compress(model, finetune="none", **common).summary
    before = {l.name: l.output_sqnr_db for l in weight_only.compressed_layers}
    after = {l.name: l.output_sqnr_db for l in aware.compressed_layers}
    assert len(before) == 3
    for name in before:
        assert after[name] > before[name] + 0.5, (name, before[name], after[name])
    q_before = weight_only.calibration["quality"]["encoded"]
    q_after = aware.calibration["quality"]["encoded"]
    assert q_after.sqnr_db > q_before.sqnr_db


@pytest.mark.parametrize("mode", ["layer", "e2e"])
def test_fine_tuning_improves_outputs_and_keeps_everything_else_bit_identical(mode):
    proto = cnn()
    calib = feeds(12, (3, 16, 16), batch=8)
    result = onnxvq.compress(
        proto, method="pq", k=8, d=8, min_size=0, calib=calib,
        finetune={"mode": mode, "epochs": 4, "holdout": 0.0, "lr": 3e-3},
    )
    record = result.summary.calibration
    assert record["mode"] == mode and "fallback" not in record
    quality = record["quality"]
    assert quality["fine-tuned"].sqnr_db > quality["encoded"].sqnr_db + 0.2
    trained = [l.finetune for l in result.summary.compressed_layers]
    assert all(t for t in trained) if mode == "layer" else True
    _assert_only_vq_parts_changed(proto, result.to_proto())
    # the written model computes what the summary measured
    x = calib[0]["x"]
    dense = onnxvq.decompress(result.model)
    np.testing.assert_allclose(
        run_ort(result.to_proto(), {"x": x})[0], run_ort(ir.serde.serialize_model(dense), {"x": x})[0], atol=1e-4
    )


def test_fine_tuning_is_deterministic_for_a_seed():
    calib = feeds(6, (64,), batch=16)
    runs = [
        onnxvq.compress(mlp(), method="pq", k=16, d=4, min_size=0, calib=calib, finetune={"mode": "e2e", "epochs": 2}, seed=3)
        for _ in range(2)
    ]
    assert runs[0].to_proto().SerializeToString() == runs[1].to_proto().SerializeToString()


def test_layer_wise_works_where_e2e_cannot_run_if():
    proto = _model_with_lstm_and_if()
    calib = feeds(6, (10,), batch=1)
    calib = [{"x": f["x"].reshape(1, 1, 10), "flag": np.array(i % 2 == 0)} for i, f in enumerate(calib)]
    result = onnxvq.compress(proto, method="pq", k=16, d=2, min_size=0, calib=calib, finetune={"mode": "e2e", "epochs": 3})
    record = result.summary.calibration
    assert record["mode"] == "layer"
    assert "If" in record["fallback"] and "LSTM" not in record["fallback"]  # the executor runs LSTM
    fine_tuned = {l.name: l.finetune for l in result.summary.compressed_layers}
    assert fine_tuned["proj"] and fine_tuned["proj"]["steps"] > 0  # the Gemm after the LSTM trained
    feed = calib[0]
    assert np.isfinite(run_ort(result.to_proto(), feed)[0]).all()


def test_train_rest_writes_learned_biases_back():
    proto = mlp()
    calib = feeds(6, (64,), batch=16)
    result = onnxvq.compress(proto, method="pq", k=16, d=4, min_size=0, calib=calib,
                             finetune={"mode": "e2e", "epochs": 3, "train_rest": True, "lr": 1e-2})
    before = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in result.to_proto().graph.initializer}
    assert not np.array_equal(before["b0"], after["b0"])
    assert after["b0"].dtype == before["b0"].dtype and after["b0"].shape == before["b0"].shape


def _mlp_with_graph_arithmetic() -> onnx.ModelProto:
    """The MLP with, after its first Gemm, a soft sign written in ops (``h / sqrt(h ** 2 + eps)``,
    a Pow with exponent 2 and an Add of a scalar epsilon), an affine (gamma, beta) and a
    BatchNormalization: float initializers that are the graph's arithmetic next to ones that are
    layer parameters."""
    proto = mlp()
    graph = proto.graph
    arithmetic = [
        helper.make_node("Pow", ["h0_pre", "two"], ["sq"], name="pow"),
        helper.make_node("Add", ["sq", "eps"], ["sq_eps"], name="add_eps"),
        helper.make_node("Sqrt", ["sq_eps"], ["norm"], name="sqrt"),
        helper.make_node("Div", ["h0_pre", "norm"], ["soft"], name="div"),
        helper.make_node("Mul", ["soft", "gamma"], ["scaled"], name="mul_gamma"),
        helper.make_node("Add", ["scaled", "beta"], ["shifted"], name="add_beta"),
        helper.make_node("BatchNormalization", ["shifted", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
                         ["h0_bn"], name="bn"),
    ]
    relu = next(n for n in graph.node if n.name == "relu0")
    relu.input[0] = "h0_bn"
    index = [n.name for n in graph.node].index("relu0")
    for offset, node in enumerate(arithmetic):
        graph.node.insert(index + offset, node)
    width = 128
    graph.initializer.extend([
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1e-3, np.float32), "eps"),
        numpy_helper.from_array(np.ones(width, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(width, np.float32), "beta"),
        numpy_helper.from_array(np.ones(width, np.float32), "bn_scale"),
        numpy_helper.from_array(np.zeros(width, np.float32), "bn_bias"),
        numpy_helper.from_array(np.full(width, 0.1, np.float32), "bn_mean"),
        numpy_helper.from_array(np.full(width, 0.9, np.float32), "bn_var"),
    ])
    onnx.checker.check_model(proto)
    return proto


def test_train_rest_trains_layer_parameters_and_leaves_the_graphs_arithmetic_alone():
    from onnxvq.finetune.end_to_end import _other_float_initializers

    proto = _mlp_with_graph_arithmetic()
    opened = set(_other_float_initializers(ir.from_proto(proto), {"w0", "w1", "w2"}))
    assert opened == {"b0", "b1", "b2", "gamma", "beta", "bn_scale", "bn_bias"}
    calib = feeds(6, (64,), batch=16)
    result = onnxvq.compress(proto, method="pq", k=16, d=4, min_size=0, calib=calib,
                             finetune={"mode": "e2e", "epochs": 3, "train_rest": True, "lr": 1e-2})
    before = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in result.to_proto().graph.initializer}
    # Trained, the exponent gets a NaN gradient (d h^p / dp = h^p ln h, h < 0) on the first step,
    # and a running variance can go negative; they must come back bit-identical.
    for name in ("two", "eps", "bn_mean", "bn_var"):
        assert np.array_equal(after[name], before[name]), name
    for name in ("gamma", "beta", "bn_bias"):
        assert np.isfinite(after[name]).all() and not np.array_equal(after[name], before[name]), name
    assert np.isfinite(run_ort(result.to_proto(), calib[0])[0]).all()


def test_train_rest_leaves_a_recurrent_ops_r_to_its_joined_weight():
    """An LSTM's W and R are encoded as one weight, whose module's value overrides both: R is not
    "rest". Opened, it came back as the dense original, and the fine-tuned quality was measured
    with R dense (better than the file it describes)."""
    from models import lstm_model

    r = np.random.default_rng(0)
    calib = [{"x": r.standard_normal((7, 2, 24)).astype(np.float32)} for _ in range(20)]
    common = dict(min_size=0, calib=calib, seed=1, layers={"LSTM": {"method": "pq", "k": 16, "d": 4}})
    # A wrecking rate: the held-out check keeps the untrained start, whose quality is the encoded one.
    wrecked = onnxvq.compress(lstm_model(), finetune={"mode": "e2e", "steps": 20, "lr": 50.0, "holdout": 0.25,
                                                      "train_rest": True}, **common)
    record = wrecked.summary.calibration
    assert record["e2e"]["trained_other_initializers"] == 1  # B
    assert record["e2e"]["kept_step"] == 0
    assert record["quality"]["fine-tuned"] == record["quality"]["encoded"]


def _assert_only_vq_parts_changed(original: onnx.ModelProto, compressed: onnx.ModelProto):
    """Every node that is not a VQ node and every initializer that is not a quantized weight's
    replacement is byte-identical to the original's."""
    vq_weights = set()
    kept_nodes = []
    for node in compressed.graph.node:
        if node.domain == onnxvq.ops.DOMAIN:
            vq_weights.update(i.rsplit(".vq_", 1)[0] for i in node.input if ".vq_" in i)
        else:
            kept_nodes.append(node.SerializeToString())
    original_nodes = [
        n.SerializeToString() for n in original.graph.node
        if not (n.op_type in ("Conv", "Gemm", "MatMul") and set(n.input) & vq_weights)
    ]
    assert kept_nodes == original_nodes
    originals = {t.name: t.SerializeToString() for t in original.graph.initializer}
    for tensor in compressed.graph.initializer:
        if ".vq_" in tensor.name:
            continue
        assert tensor.SerializeToString() == originals[tensor.name], tensor.name
    assert {t.name for t in compressed.graph.initializer if ".vq_" not in t.name} == set(originals) - vq_weights


def _model_with_lstm_and_if() -> onnx.ModelProto:
    """x (1, 1, 10) -> MatMul(10x32) -> LSTM(hidden 8) -> If(flag: Relu | Neg) -> Gemm 'proj' (8->40)."""
    hidden = 8
    w_in = weight((10, 32), 1)
    lstm_w = weight((1, 4 * hidden, 32), 2)
    lstm_r = weight((1, 4 * hidden, hidden), 3)
    proj = weight((40, hidden), 4)
    then_graph = helper.make_graph(
        [helper.make_node("Relu", ["h"], ["branch"])], "then", [], [helper.make_tensor_value_info("branch", TensorProto.FLOAT, None)]
    )
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["h"], ["branch_neg"])], "else", [], [helper.make_tensor_value_info("branch_neg", TensorProto.FLOAT, None)]
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["m"], name="embed"),
        helper.make_node("LSTM", ["m", "lstm_w", "lstm_r"], ["", "h_last"], name="lstm", hidden_size=hidden),
        helper.make_node("Reshape", ["h_last", "shape"], ["h"], name="flatten"),
        helper.make_node("If", ["flag"], ["chosen"], name="branch", then_branch=then_graph, else_branch=else_graph),
        helper.make_node("Gemm", ["chosen", "proj_w"], ["y"], name="proj", transB=1),
    ]
    inits = [
        numpy_helper.from_array(w_in, "w_in"), numpy_helper.from_array(lstm_w, "lstm_w"),
        numpy_helper.from_array(lstm_r, "lstm_r"), numpy_helper.from_array(proj, "proj_w"),
        numpy_helper.from_array(np.array([1, hidden], np.int64), "shape"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 10]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 40])],
        inits,
    )


def _sequence_classifier(final: str) -> onnx.ModelProto:
    """x (N, T, 8) -> MatMul (8 -> 30) -> ``final`` (Softmax over the 30 classes, or Sigmoid),
    through an Identity as paddle2onnx writes it: a recognizer's (batch, time, classes) output."""
    attrs = {"axis": -1} if final == "Softmax" else {}
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["logits"]),
        helper.make_node(final, ["logits"], ["p"], **attrs),
        helper.make_node("Identity", ["p"], ["y"]),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 30])],
        [numpy_helper.from_array(weight((8, 30), 11), "w")],
    )


@pytest.mark.parametrize("final, kind", [("Softmax", "logits"), ("Sigmoid", "bernoulli")])
def test_e2e_compares_a_softmax_or_sigmoid_output_on_its_logits(final, kind):
    from onnxvq.finetune.end_to_end import _compared_model
    from onnxvq.finetune_settings import FinetuneSettings

    model = ir.serde.deserialize_model(_sequence_classifier(final))
    compared, targets = _compared_model(model, "auto")
    assert [v.name for v in compared.graph.outputs] == ["logits"] and targets[0].kind == kind
    assert [v.name for v in model.graph.outputs] == ["y"]  # the model itself is untouched
    forced, targets = _compared_model(model, "mse")
    assert [v.name for v in forced.graph.outputs] == ["y"] and targets[0].kind == "mse"
    r = np.random.default_rng(0)
    calib = [{"x": r.standard_normal((4, 5, 8)).astype(np.float32)} for _ in range(8)]
    result = onnxvq.compress(_sequence_classifier(final), method="pq", k=4, d=4, min_size=0, calib=calib,
                             finetune=FinetuneSettings(mode="e2e", steps=40, lr=1e-2, holdout=0.0))
    record = result.summary.calibration
    assert record["e2e"]["losses"] == [kind]
    assert record["e2e"]["loss_last"] < record["e2e"]["loss_first"]


def test_distillation_divergences_match_the_sensitivity_measure():
    """The training loss on logits is the divergence the allocation measures (numpy, float64)."""
    from onnxvq.finetune.end_to_end import _Target, distillation_loss
    from onnxvq.sensitivity import ELEMENTWISE, _mean_kl

    r = np.random.default_rng(1)
    teacher, student = r.standard_normal((2, 3, 5, 7))
    for target, axis in ((_Target("logits", 1), 1), (_Target("logits", -1), -1), (_Target("bernoulli"), ELEMENTWISE)):
        loss = float(distillation_loss(torch.from_numpy(student), torch.from_numpy(teacher), target))
        assert loss == pytest.approx(_mean_kl(teacher, student, axis, False), rel=1e-9)
        assert float(distillation_loss(torch.from_numpy(teacher), torch.from_numpy(teacher), target)) == pytest.approx(0, abs=1e-12)
    flat = float(distillation_loss(torch.from_numpy(student), torch.from_numpy(teacher), _Target("logits", 1, True)))
    assert flat == pytest.approx(_mean_kl(teacher, student, 1, True), rel=1e-9)


def test_e2e_runs_at_least_its_floor_of_steps_unless_epochs_are_given():
    from onnxvq.finetune_settings import E2E_MIN_STEPS

    calib = feeds(4, (64,), batch=16)
    common = dict(method="pq", k=16, d=4, min_size=0, calib=calib)
    default = onnxvq.compress(mlp(), finetune={"mode": "e2e", "holdout": 0.0}, **common)
    assert default.summary.calibration["e2e"]["steps"] == E2E_MIN_STEPS
    explicit = onnxvq.compress(mlp(), finetune={"mode": "e2e", "holdout": 0.0, "epochs": 3}, **common)
    steps = explicit.summary.calibration["e2e"]["steps"]
    assert steps < E2E_MIN_STEPS and steps % 3 == 0  # 3 epochs of a few batches


def test_e2e_keeps_the_modules_of_the_lowest_held_out_loss():
    """A learning rate that wrecks the codebooks: the held-out check keeps the untrained encoding,
    so the model computes what data-aware encoding alone gives."""
    calib = feeds(20, (64,), batch=4)
    common = dict(method="pq", k=16, d=4, min_size=0, calib=calib, seed=1)
    wrecked = onnxvq.compress(mlp(), finetune={"mode": "e2e", "steps": 30, "lr": 50.0, "holdout": 0.25}, **common)
    stats = wrecked.summary.calibration["e2e"]
    held = stats["held_losses"]
    assert held[0][0] == 0 and len(held) == 11 and held[-1][0] == 30
    assert stats["kept_step"] == min(held, key=lambda item: item[1])[0] == 0
    encoded = onnxvq.compress(mlp(), finetune={"mode": "none", "holdout": 0.25}, **common)
    x = calib[0]["x"]
    np.testing.assert_allclose(run_ort(wrecked.to_proto(), {"x": x})[0], run_ort(encoded.to_proto(), {"x": x})[0],
                               rtol=1e-5, atol=1e-5)
    useful = onnxvq.compress(mlp(), finetune={"mode": "e2e", "steps": 30, "lr": 3e-3, "holdout": 0.25}, **common)
    stats = useful.summary.calibration["e2e"]
    assert stats["kept_step"] > 0 and min(v for _, v in stats["held_losses"]) < stats["held_losses"][0][1]


def test_e2e_that_diverges_ends_there_and_keeps_the_untrained_encoding():
    """A rate so large that the loss overflows to inf/NaN, without held-back samples (nothing to
    compare with): training ends at the first non-finite loss and writes the untrained encoding,
    not NaNs."""
    calib = feeds(20, (64,), batch=4)
    common = dict(method="pq", k=16, d=4, min_size=0, calib=calib, seed=1)
    diverged = onnxvq.compress(mlp(), finetune={"mode": "e2e", "steps": 30, "lr": 1e30, "holdout": 0.0}, **common)
    stats = diverged.summary.calibration["e2e"]
    assert stats["diverged_at"] is not None and 0 < stats["diverged_at"] == stats["steps"] < 30
    assert stats["kept_step"] == 0 and not stats["stopped_early"]
    encoded = onnxvq.compress(mlp(), finetune={"mode": "none", "holdout": 0.0}, **common)
    x = calib[0]["x"]
    np.testing.assert_allclose(run_ort(diverged.to_proto(), {"x": x})[0], run_ort(encoded.to_proto(), {"x": x})[0],
                               rtol=1e-5, atol=1e-5)
    useful = onnxvq.compress(mlp(), finetune={"mode": "e2e", "steps": 30, "lr": 3e-3, "holdout": 0.0}, **common)
    assert useful.summary.calibration["e2e"]["diverged_at"] is None
    assert useful.summary.calibration["e2e"]["kept_step"] == 30


def test_e2e_by_default_runs_its_cosine_unless_the_first_checks_show_no_gain():
    """Without steps or epochs, e2e with held-back samples lays its cosine over E2E_MAX_STEPS and
    ends after E2E_PATIENCE checks only when none lowered the untrained held-out loss by
    E2E_MIN_GAIN; explicit steps always run to the end."""
    from onnxvq.finetune.end_to_end import _pays
    from onnxvq.finetune_settings import E2E_MAX_STEPS, E2E_MIN_GAIN, E2E_PATIENCE

    assert E2E_PATIENCE == 3 and E2E_MIN_GAIN == 0.05  # the cases below are written for these
    assert _pays([1.0, 1.1, 1.2])  # too few checks to say
    assert not _pays([1.0, 1.1, 1.2, 1.05])  # nothing beat the start
    assert not _pays([1.0, 0.97, 0.99, 0.96])  # 4%
    assert _pays([1.0, 1.2, 1.3, 0.94])  # 6%, late
    assert _pays([1.0, 0.5, 0.6, 0.7, 0.8, 0.9])  # a stall after a gain is no reason to stop

    calib = feeds(20, (64,), batch=4)
    common = dict(method="pq", k=16, d=4, min_size=0, calib=calib, seed=1)
    every = E2E_MAX_STEPS // 10
    # A rate that wrecks the codebooks: no check beats the untrained start.
    wrecked = onnxvq.compress(mlp(), finetune={"mode": "e2e", "lr": 50.0, "holdout": 0.25}, **common)
    stats = wrecked.summary.calibration["e2e"]
    assert stats["planned_steps"] == E2E_MAX_STEPS and stats["stopped_early"]
    assert stats["steps"] == E2E_PATIENCE * every and stats["kept_step"] == 0
    assert [at for at, _ in stats["held_losses"]] == [i * every for i in range(E2E_PATIENCE + 1)]
    # A useful rate runs the whole cosine and keeps the lowest held-out loss's checkpoint.
    useful = onnxvq.compress(mlp(), finetune={"mode": "e2e", "lr": 3e-4, "holdout": 0.25}, **common)
    stats = useful.summary.calibration["e2e"]
    assert not stats["stopped_early"] and stats["steps"] == E2E_MAX_STEPS and len(stats["held_losses"]) == 11
    assert stats["kept_step"] == min(stats["held_losses"], key=lambda item: item[1])[0] > 0
    fixed = onnxvq.compress(mlp(), finetune={"mode": "e2e", "lr": 50.0, "holdout": 0.25, "steps": 500}, **common)
    assert fixed.summary.calibration["e2e"]["steps"] == 500 and not fixed.summary.calibration["e2e"]["stopped_early"]


def _shifted_mlp() -> onnx.ModelProto:
    """``mlp()`` whose input is ``x + shift`` with ``shift`` an int64 input: mixup must leave
    integer inputs as they are."""
    base = onnx.shape_inference.infer_shapes(mlp())
    graph = base.graph
    first = graph.node[0]
    first.input[0] = "x_shifted"
    graph.node.insert(0, helper.make_node("Add", ["x", "shift_f"], ["x_shifted"]))
    graph.node.insert(0, helper.make_node("Cast", ["shift"], ["shift_f"], to=TensorProto.FLOAT))
    graph.input.append(helper.make_tensor_value_info("shift", TensorProto.INT64, ["N", 1]))
    return base


def test_mixup_feeds_mix_samples_of_the_same_shapes_and_are_labelled_by_the_original_model():
    from onnxvq.calibration import load_calibration
    from onnxvq.activations import _TapSession
    from onnxvq.finetune.end_to_end import _compared_model, _Mixup

    model = ir.from_proto(_shifted_mlp())
    r = np.random.default_rng(3)
    samples = [{"x": r.standard_normal((rows, 64)).astype(np.float32),
                "shift": np.full((rows, 1), 10 * i, np.int64)} for i, rows in enumerate((4, 4, 4, 2, 2))]
    calib = load_calibration(samples, model)
    compared, _ = _compared_model(model, "auto")
    mixup = _Mixup(calib, _TapSession(compared, {}, None))
    rng = np.random.default_rng(0)
    lams = []
    for indices in ([0, 1, 2], [3, 4], [0], [3]):
        feed, teacher = mixup(indices, rng)
        np.testing.assert_array_equal(feed["shift"], np.concatenate([samples[i]["shift"] for i in indices]))
        start = 0
        for i in indices:
            rows = len(samples[i]["x"])
            mixed = feed["x"][start:start + rows]
            start += rows
            # mixed = lam x_i + (1 - lam) x_j for a j of the same shape and lam in [0, 1]
            fits = []
            for j, other in enumerate(samples):
                if other["x"].shape != samples[i]["x"].shape:
                    continue
                delta = (samples[i]["x"] - other["x"]).ravel()
                if not delta.any():
                    fits.append((np.abs(mixed - other["x"]).max(), None))
                    continue
                lam = float(delta @ (mixed - other["x"]).ravel() / (delta @ delta))
                fits.append((np.abs(mixed - (lam * samples[i]["x"] + (1 - lam) * other["x"])).max(), lam))
            error, lam = min(fits, key=lambda item: item[0])
            assert error < 1e-5
            if lam is not None:
                assert -1e-6 <= lam <= 1 + 1e-6
                lams.append(lam)
        assert start == len(feed["x"])
        np.testing.assert_allclose(teacher[0], run_ort(ir.to_proto(compared), feed)[0], rtol=1e-6, atol=1e-6)
    assert any(0.05 < lam < 0.95 for lam in lams)  # really mixed, not only copies


def test_mixup_overfits_a_few_samples_less_than_the_samples_alone():
    """7 training samples of 2 rows, 400 steps: trained on the samples alone the held-out loss
    ends above where mixup leaves it (both from the same encoding)."""
    from onnxvq.errors import OnnxVQError

    common = dict(method="pq", k=16, d=4, min_size=0, calib=feeds(10, (64,), batch=2), seed=0)
    held = {}
    for augment in ("mixup", "none"):
        tuned = onnxvq.compress(mlp(), finetune={"mode": "e2e", "steps": 400, "holdout": 0.3, "augment": augment}, **common)
        held[augment] = tuned.summary.calibration["e2e"]["held_losses"]
        assert tuned.summary.calibration["e2e"]["augment"] == augment
    assert held["mixup"][0] == held["none"][0]
    assert held["mixup"][-1][1] < 0.9 * held["none"][-1][1]
    assert min(v for _, v in held["mixup"]) < held["mixup"][0][1]
    with pytest.raises(OnnxVQError, match="augment 'crop' is not one of mixup, none"):
        onnxvq.compress(mlp(), finetune={"mode": "e2e", "augment": "crop"}, **common)


def test_e2e_with_labels_trains_on_the_samples_themselves():
    """A mixed sample has no single label: with labels e2e does not mix, whatever ``augment`` says."""
    calib = feeds(6, (64,), batch=4)
    labels = np.arange(24) % 10
    tuned = onnxvq.compress(mlp(), method="pq", k=16, d=4, min_size=0, calib=calib, labels=labels, seed=0,
                            finetune={"mode": "e2e", "steps": 20, "holdout": 0.0, "augment": "mixup"})
    stats = tuned.summary.calibration["e2e"]
    assert stats["augment"] == "none" and stats["steps"] == 20
