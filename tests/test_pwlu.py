"""PWLU (issue 15): the op (numpy = onnx.reference on the body = onnxruntime on the body), the
parameters (bounds on the kinks, exact initialisation, least-squares fit), and the compress step
(``--activations pwlu``) on a model with every eligible activation."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from models import make_model, run_ort, weight
from onnxvq import ops
from onnxvq.activation_sites import find_sites
from onnxvq.candidates import find_layers
from onnxvq.errors import OnnxVQError
from onnxvq.ops.pwlu import CASES, check_parameters, pwlu
from onnxvq.passes import AttachVQFunctionsPass, ReplaceActivationsWithPWLUPass
from onnxvq.pwlu import PWLUParameters, aligned_bounds, fit, initial_parameters, squared_error


def random_parameters(rng, param_shape, intervals):
    lo = (rng.standard_normal(param_shape) - 1).astype(np.float32)
    hi = lo + rng.uniform(0.5, 4, param_shape).astype(np.float32)
    knots = rng.standard_normal((intervals + 1, *param_shape)).astype(np.float32)
    slopes = rng.standard_normal((2, *param_shape)).astype(np.float32)
    return np.stack([lo, hi]), knots, slopes


def pwlu_model(x_shape, bounds, knots, slopes, opset):
    node = helper.make_node("PWLU", ["X", "bounds", "knots", "slopes"], ["Y"], domain=ops.DOMAIN)
    inits = [numpy_helper.from_array(a, n) for a, n in ((bounds, "bounds"), (knots, "knots"), (slopes, "slopes"))]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(ops.DOMAIN, 1)],
                              functions=[ops.pwlu.function(opset)])
    model.ir_version = 10
    return model


# --- the op -----------------------------------------------------------------------------------

@pytest.mark.parametrize("opset", [11, 13, 17, 21])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_numpy_equals_body_in_reference_and_onnxruntime(case, opset):
    name, x_shape, param_shape, intervals = case
    rng = np.random.default_rng(len(name) + opset)
    bounds, knots, slopes = random_parameters(rng, param_shape, intervals)
    x = (rng.standard_normal(x_shape) * 3).astype(np.float32)
    flat = x.reshape(-1)
    flat[0], flat[1], flat[2], flat[3] = np.nan, bounds[0].flat[0], bounds[1].flat[0], 1e6  # NaN, both bounds, far tail
    expected = pwlu(x, bounds, knots, slopes)
    model = pwlu_model(x_shape, bounds, knots, slopes, opset)
    body = ReferenceEvaluator(ops.inline_bodies(model)).run(None, {"X": x})[0]
    runtime = run_ort(model, {"X": x})[0]
    for got in (body, runtime):
        assert np.isnan(got.reshape(-1)[0])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # the registered onnx.reference kernel is the numpy reference
    kernel = ReferenceEvaluator(model, new_ops=ops.reference_ops()).run(None, {"X": x})[0]
    np.testing.assert_array_equal(kernel, expected)


def test_numpy_reference_against_the_definition():
    """Knot values at knots, linear between them, the boundary slopes beyond."""
    bounds, knots, slopes = np.array([[-1.0], [3.0]]), np.array([[0.0], [2.0], [1.0], [5.0], [-1.0]]), np.array([[0.5], [-2.0]])
    x = np.array([[-3.0], [-1.0], [-0.5], [0.0], [2.0], [2.5], [3.0], [4.0]])
    expected = [[-1.0], [0.0], [1.0], [2.0], [5.0], [2.0], [-1.0], [-3.0]]
    np.testing.assert_allclose(pwlu(x, bounds, knots, slopes), expected)


@pytest.mark.parametrize("bounds_shape, knots_shape, slopes_shape, message", [
    ((2, 4), (9, 3), (2, 4), "must be bounds"),
    ((2, 4, 2), (9, 4, 2), (2, 4, 2), "(C, 1, ..., 1)"),
    ((2, 4), (1, 4), (2, 4), "at least one interval"),
])
def test_bad_parameters_are_rejected(bounds_shape, knots_shape, slopes_shape, message):
    bounds = np.stack([np.zeros(bounds_shape[1:]), np.ones(bounds_shape[1:])]) if bounds_shape[0] == 2 else np.zeros(bounds_shape)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_parameters(bounds, np.zeros(knots_shape), np.zeros(slopes_shape))
    with pytest.raises(ValueError, match="B_R > B_L"):
        check_parameters(np.ones((2, 3)), np.zeros((5, 3)), np.zeros((2, 3)))


# --- parameters -------------------------------------------------------------------------------

ACTIVATIONS = {
    "relu": (lambda x: np.maximum(x, 0), (0.0,)),
    "relu6": (lambda x: np.clip(x, 0, 6), (0.0, 6.0)),
    "leaky_relu": (lambda x: np.where(x >= 0, x, 0.01 * x), (0.0,)),
    "hard_sigmoid": (lambda x: np.clip(0.2 * x + 0.5, 0, 1), (-2.5, 2.5)),
    "clip_low_only": (lambda x: np.maximum(x, -1.5), (-1.5,)),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_initialisation_reproduces_piecewise_linear_activations_exactly(name):
    function, kinks = ACTIVATIONS[name]
    rng = np.random.default_rng(7)
    worst = 0.0
    for _ in range(100):  # input statistics anywhere, including far from the kinks
        centre, spread = rng.normal(0, 5), abs(rng.normal(0, 3)) + 1e-3
        low = centre - 3 * spread + rng.normal(0, 1, 3)
        high = low + np.abs(rng.normal(0, 6, 3))
        params = initial_parameters(function, kinks, low, high, int(rng.integers(1, 20)))
        x = np.concatenate([rng.normal(centre, 3 * spread, (1000, 3)), rng.uniform(-100, 100, (1000, 3))])
        worst = max(worst, float(np.abs(params(x) - function(x)).max()))
    assert worst < 1e-9


def test_hard_swish_is_exact_outside_its_kinks_and_within_interpolation_error_inside():
    function = lambda x: x * np.clip(x / 6 + 0.5, 0, 1)  # noqa: E731
    params = initial_parameters(function, (-3.0, 3.0), np.array([-4.0]), np.array([5.0]), 16)
    h = float(params.bounds[1, 0] - params.bounds[0, 0]) / 16
    inside = np.linspace(-3, 3, 10001)[:, None]
    outside = np.concatenate([np.linspace(-50, -3, 1000), np.linspace(3, 50, 1000)])[:, None]
    knots = params.bounds[0, 0] + h * np.arange(17)[:, None]
    assert np.abs(params(outside) - function(outside)).max() < 1e-9
    assert np.abs(params(knots) - function(knots)).max() < 1e-9
    error = np.abs(params(inside) - function(inside)).max()
    assert 0 < error <= h * h / 24 + 1e-12  # f'' = 1/3 between the kinks


@pytest.mark.parametrize("kinks", [(), (0.0,), (0.0, 6.0), (-3.0, 3.0)])
def test_aligned_bounds_put_kinks_on_knots_and_cover_the_range(kinks):
    rng = np.random.default_rng(3)
    for _ in range(200):
        low = rng.normal(0, 4)
        high = low + abs(rng.normal(0, 5)) + 1e-3
        n = int(rng.integers(1, 33))
        b_l, b_r = aligned_bounds(low, high, kinks, n)
        h = (b_r - b_l) / n
        assert b_r > b_l
        for kink in kinks:
            position = (kink - b_l) / h
            assert -1e-6 <= position <= n + 1e-6 and abs(position - round(position)) < 1e-6
        if len(kinks) < 2:  # the spacing of [low, high] (widened to the kinks) is kept
            lo, hi = min([low, *kinks]), max([high, *kinks])
            assert h == pytest.approx((hi - lo) / n) and b_l <= lo + 1e-9


def test_fit_recovers_a_pwlu_and_keeps_unvisited_knots():
    rng = np.random.default_rng(5)
    init = initial_parameters(lambda x: np.maximum(x, 0), (0.0,), np.array([-3.0, -2.0]), np.array([3.0, 4.0]), 8)
    truth = PWLUParameters(init.bounds.copy(), init.knots + rng.normal(0, 0.3, init.knots.shape),
                           init.slopes + rng.normal(0, 0.1, init.slopes.shape))
    x = rng.normal(0, 2, (5000, 2))
    fitted = fit(init, x, truth(x), ridge=1e-9)
    np.testing.assert_allclose(fitted.knots, truth.knots, atol=1e-6)
    np.testing.assert_allclose(fitted.slopes, truth.slopes, atol=1e-6)
    # data only in [0, 1]: knots far from it and the slopes stay at the initialisation
    x = rng.uniform(0, 1, (2000, 2))
    fitted = fit(init, x, truth(x))
    assert np.abs(fitted.knots[0] - init.knots[0]).max() < 1e-3 and np.abs(fitted.slopes - init.slopes).max() < 1e-3
    assert (squared_error(fitted, x, truth(x)) < 1e-3 * squared_error(init, x, truth(x))).all()


# --- sites and the compress step ----------------------------------------------------------------

def activation_zoo(opset: int = 17) -> onnx.ModelProto:
    """Six 3x3 convolutions, each followed by one eligible activation form, then a Gemm head
    with a LeakyRelu; input x (N, 3, 12, 12), output logits (N, 10)."""
    channels = [3, 16, 16, 16, 16, 16, 16]
    nodes, inits = [], []
    forms = ["Relu", "Clip", "HardSwish", "Swish", "HardSigmoidMul", "HardSigmoid"]
    value = "x"
    for i, form in enumerate(forms):
        w = weight((channels[i + 1], channels[i], 3, 3), 10 + i) * 2
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.full(channels[i + 1], 0.1 * i, np.float32), f"b{i}")]
        nodes.append(helper.make_node("Conv", [value, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        out = f"a{i}"
        if form == "Clip":
            inits += [numpy_helper.from_array(np.array(0, np.float32), "zero"), numpy_helper.from_array(np.array(6, np.float32), "six")]
            nodes.append(helper.make_node("Clip", [f"c{i}", "zero", "six"], [out], name=f"act{i}"))
        elif form == "Swish":
            nodes += [helper.make_node("Sigmoid", [f"c{i}"], [f"g{i}"], name=f"gate{i}"),
                      helper.make_node("Mul", [f"c{i}", f"g{i}"], [out], name=f"act{i}")]
        elif form == "HardSigmoidMul":
            nodes += [helper.make_node("HardSigmoid", [f"c{i}"], [f"g{i}"], name=f"gate{i}", alpha=1 / 6),
                      helper.make_node("Mul", [f"g{i}", f"c{i}"], [out], name=f"act{i}")]
        else:
            nodes.append(helper.make_node(form, [f"c{i}"], [out], name=f"act{i}"))
        value = out
    w = weight((10, 16), 30)
    inits += [numpy_helper.from_array(w, "wf")]
    nodes += [helper.make_node("GlobalAveragePool", [value], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "wf"], ["fc"], name="fc", transB=1),
              helper.make_node("LeakyRelu", ["fc"], ["logits"], name="head_act", alpha=0.1)]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                      [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits, opset=opset)


def test_sites_find_every_form_with_its_channels():
    model = ir.serde.deserialize_model(activation_zoo())
    layers, _ = find_layers(model)
    sites = find_sites(model, layers)
    assert [(s.name, s.kind, len(s.nodes), s.param_shape) for s in sites] == [
        ("act0", "Relu", 1, (16, 1, 1)), ("act1", "Clip", 1, (16, 1, 1)), ("act2", "HardSwish", 1, (16, 1, 1)),
        ("act3", "Swish", 2, (16, 1, 1)), ("act4", "HardSwish", 2, (16, 1, 1)), ("act5", "HardSigmoid", 1, (16, 1, 1)),
        ("head_act", "LeakyRelu", 1, (10,)),
    ]
    assert sites[1].kinks == (0.0, 6.0) and sites[4].kinks == pytest.approx((-3.0, 3.0))
    # an activation behind a layer that is not encoded is no site
    assert [s.name for s in find_sites(model, [l for l in layers if l.name != "conv0"])][0] == "act1"


@pytest.mark.parametrize("channelwise", [False, True])
def test_initialised_pwlus_reproduce_the_model(channelwise):
    """Every piecewise-linear activation of the fp32 model replaced by its initial PWLU: the same
    outputs (HardSwish and SiLU are interpolated, so they are left out here)."""
    proto = activation_zoo()
    model = ir.serde.deserialize_model(proto)
    layers, _ = find_layers(model)
    rng = np.random.default_rng(0)
    replacements = []
    for site in find_sites(model, layers):
        if not site.piecewise_linear:
            continue
        groups = site.channels if channelwise else 1
        low, high = rng.normal(0, 2, groups), rng.normal(0, 2, groups) + 3
        replacements.append((site, initial_parameters(site.function, site.kinks, low, high, 8)))
    ReplaceActivationsWithPWLUPass(replacements)(model)
    AttachVQFunctionsPass()(model)
    out = ir.serde.serialize_model(model)
    assert sum(n.op_type == "PWLU" for n in out.graph.node) == 4
    x = np.random.default_rng(1).standard_normal((4, 3, 12, 12)).astype(np.float32) * 3
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], run_ort(proto, {"x": x})[0], rtol=1e-5, atol=1e-5)


def feeds(n: int, seed: int) -> list[dict]:
    x = np.random.default_rng(seed).standard_normal((n, 3, 12, 12)).astype(np.float32)
    return [{"x": x[i : i + 1]} for i in range(n)]


@pytest.fixture(scope="module")
def calib():
    return feeds(48, 2)


@pytest.fixture(scope="module")
def compressed(calib):
    import onnxvq

    return onnxvq.compress(activation_zoo(), calib=calib, finetune={"mode": "layer", "activations": "pwlu:8:channel"},
                           method="pq", k=16, d=4, min_size=0)


def test_compress_replaces_activations_and_says_so(compressed, calib):
    record = compressed.summary.calibration["activations"]
    assert record["sites"] == 7 and record["method"] == "pwlu:8:channel"
    assert set(record["layers"]) == {"act0", "act1", "act2", "act3", "act4", "act5", "head_act"}
    proto = compressed.to_proto()
    kept = [n.name for n in proto.graph.node if n.op_type == "PWLU"]
    assert len(kept) == record["kept"] == sum(layer["kept"] for layer in record["layers"].values())
    assert "activations (pwlu:8:channel):" in compressed.summary.format()
    if kept:  # the written model runs, in onnx.reference on the bodies too
        x = np.concatenate([f["x"] for f in calib[:4]])
        np.testing.assert_allclose(ReferenceEvaluator(ops.inline_bodies(proto)).run(None, {"x": x})[0],
                                   run_ort(proto, {"x": x})[0], rtol=1e-4, atol=1e-5)
        quality = compressed.summary.calibration["quality"]
        assert quality["with PWLU"].sqnr_db > quality["fine-tuned"].sqnr_db


def test_each_kept_pwlu_lowers_its_error_and_the_kept_ones_raise_the_output_sqnr():
    """On a model whose quantization error is mostly a per-channel shift, the channel-wise PWLUs
    must be kept and win back output SQNR."""
    import onnxvq

    proto = activation_zoo()
    x = feeds(64, 4)
    result = onnxvq.compress(proto, calib=x, finetune={"mode": "layer", "activations": "pwlu:8:channel"},
                             method="pq", k=4, d=8, min_size=0, scales="off")
    record = result.summary.calibration["activations"]
    assert record["kept"] >= 3, record
    assert all(layer["error_gain_db"] > 0 for layer in record["layers"].values() if layer["kept"])
    sqnr = record["output_sqnr_db"]
    assert sqnr["with"] > sqnr["without"] + 0.1, sqnr


def test_layers_train_again_without_pwlus_that_do_not_help(calib, monkeypatch):
    """When the check puts the PWLUs back after layer-wise fine-tuning, the layers after them must
    not stay tuned to their outputs: the weights are those of a run without PWLUs, bit for bit."""
    import onnxvq
    from onnxvq import pwlu_stage

    settings = dict(calib=calib, method="pq", k=16, d=4, min_size=0, seed=3)
    plain = onnxvq.compress(activation_zoo(), finetune={"mode": "layer", "steps": 20}, **settings)
    kept = onnxvq.compress(activation_zoo(), finetune={"mode": "layer", "steps": 20, "activations": "pwlu:8:channel"},
                           **settings)
    monkeypatch.setattr(pwlu_stage.PWLUCheck, "helps", property(lambda self: False))
    put_back = onnxvq.compress(activation_zoo(), finetune={"mode": "layer", "steps": 20,
                                                           "activations": "pwlu:8:channel"}, **settings)
    record = put_back.summary.calibration["activations"]
    assert record["kept"] > 0 and "trained again without them" in record["verdict"], record
    assert not any(n.op_type == "PWLU" for n in put_back.to_proto().graph.node)

    def tensors(result):
        return {t.name: numpy_helper.to_array(t) for t in result.to_proto().graph.initializer}

    expected, got, with_pwlu = tensors(plain), tensors(put_back), tensors(kept)
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    # the first run's weights differ: without the retraining this test could not fail
    assert any(not np.array_equal(with_pwlu[name], expected[name]) for name in expected if name in with_pwlu)


def test_decompress_keeps_the_pwlus(compressed, calib):
    import onnxvq

    proto = compressed.to_proto()
    if not any(n.op_type == "PWLU" for n in proto.graph.node):
        pytest.skip("no PWLU kept on this model")
    dense = ir.serde.serialize_model(onnxvq.decompress(proto))
    assert sum(n.op_type == "PWLU" for n in dense.graph.node) == sum(n.op_type == "PWLU" for n in proto.graph.node)
    assert not any(n.domain == ops.DOMAIN and n.op_type != "PWLU" for n in dense.graph.node)
    assert [f.name for f in dense.functions] == ["PWLU"]
    x = np.concatenate([f["x"] for f in calib[:4]])
    np.testing.assert_allclose(run_ort(dense, {"x": x})[0], run_ort(proto, {"x": x})[0], rtol=1e-4, atol=1e-5)


def test_e2e_trains_the_pwlus(calib):
    pytest.importorskip("torch")
    import onnxvq

    result = onnxvq.compress(activation_zoo(), calib=calib, method="pq", k=16, d=4, min_size=0,
                             finetune={"mode": "e2e", "activations": "pwlu", "steps": 30})
    record = result.summary.calibration
    assert record["mode"] == "e2e" and record["activations"]["sites"] == 7
    assert "verdict" in record["activations"]


def test_bad_settings_are_clear_errors(tmp_path):
    import onnxvq

    with pytest.raises(OnnxVQError, match="pwlu\\[:N\\]"):
        onnxvq.compress(activation_zoo(), calib=feeds(2, 0),
                        finetune={"activations": "pwlu:zero"})
    with pytest.raises(OnnxVQError, match="needs calibration|--calib"):
        onnxvq.compress(activation_zoo(), finetune={"mode": "none", "activations": "pwlu"})
    path = tmp_path / "m.onnx"
    onnx.save(activation_zoo(), path)
    done = subprocess.run([sys.executable, "-m", "onnxvq.cli", "compress", str(path), "-o", str(tmp_path / "o.onnx"),
                           "--activations", "swish"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "pwlu[:N][:layer|:channel]" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_inspect_lists_the_pwlus(compressed, tmp_path):
    proto = compressed.to_proto()
    if not any(n.op_type == "PWLU" for n in proto.graph.node):
        pytest.skip("no PWLU kept on this model")
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    done = subprocess.run([sys.executable, "-m", "onnxvq.cli", "inspect", str(path), "--json"], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert {p["name"] for p in info["pwlu"]} == {n.name for n in proto.graph.node if n.op_type == "PWLU"}
    assert all(p["intervals"] == 8 and p["groups"] in (16, 10) for p in info["pwlu"])


def test_switched_activations_run_either_function_and_leave_nothing_behind():
    from onnxvq.activations import run_model
    from onnxvq.calibration import load_calibration
    from onnxvq.pwlu_stage import FittedActivation, SwitchedActivations

    proto = activation_zoo()
    model = ir.serde.deserialize_model(proto)
    before = ir.serde.serialize_model(model).SerializeToString()
    layers, _ = find_layers(model)
    sites = find_sites(model, layers)
    switches = SwitchedActivations(model, sites, 8, channelwise=True)
    samples = load_calibration(feeds(4, 9), model)
    reference = run_model(ir.serde.deserialize_model(proto), samples)
    off = run_model(model, samples)  # every switch off: the original model
    np.testing.assert_allclose(np.concatenate([o[0] for o in off]), np.concatenate([r[0] for r in reference]),
                               rtol=1e-6, atol=1e-6)
    # one switch on, with a PWLU that is not the activation: only that site changes
    params = initial_parameters(lambda x: np.maximum(x, 0), (0.0,), np.full(16, -2.0), np.full(16, 2.0), 8)
    params.knots = params.knots * 0.5
    fitted = FittedActivation(site=sites[0], params=params, error_original=1.0, error_pwlu=0.5, groups_fitted=16)
    on = run_model(model, samples, quantized=switches.feeds(fitted))
    expected = with_pwlu_reference(proto, sites[0].name, params)
    np.testing.assert_allclose(np.concatenate([o[0] for o in on]),
                               np.concatenate([run_ort(expected, f)[0] for f in feeds(4, 9)]), rtol=1e-5, atol=1e-5)
    switches.remove()
    assert ir.serde.serialize_model(model).SerializeToString() == before


def with_pwlu_reference(proto, site_name, params):
    model = ir.serde.deserialize_model(proto)
    layers, _ = find_layers(model)
    site = next(s for s in find_sites(model, layers) if s.name == site_name)
    ReplaceActivationsWithPWLUPass([(site, params)])(model)
    AttachVQFunctionsPass()(model)
    return ir.serde.serialize_model(model)
