"""The native PWLU kernel (ops/native/src/pwlu.cc) against the numpy reference
(:func:`onnxvq.ops.pwlu.pwlu`) and the op's function body in onnxruntime: every conformance case
of ``ops.pwlu.CASES`` and further shapes (channel on the last axis, runs over the kernel's work
blocks, N on both sides of the vector path's table size), with NaN, infinities, values exactly
at the bounds and at the knots, and far tails; parameters as initializers and as graph inputs;
a bad parameter shape is an error when the model runs.

Skipped when the library is not built (``onnxvq native build``), unless
``ONNXVQ_REQUIRE_NATIVE=1`` (CI), where a missing library fails them.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnxvq import ops
from onnxvq.ops import pwlu as pwlu_op

LIBRARY = ops.native_library_path()
if LIBRARY is None and os.environ.get("ONNXVQ_REQUIRE_NATIVE") != "1":
    pytest.skip("the native library is not built (onnxvq native build)", allow_module_level=True)

RTOL = ATOL = 1e-5
OPSET = 17

# Beyond the conformance cases: (name, X shape, parameter shape P, intervals N).
MORE_CASES = [
    ("last_axis_rows_over_blocks", (5000, 7), (7,), 5),  # inner = 1, rows cut by the work blocks
    ("runs_over_blocks", (2, 3, 100, 70), (3, 1, 1), 16),  # runs of 7000, blocks of 16384
    ("odd_runs", (3, 4, 5, 3), (4, 1, 1), 3),  # runs shorter than a vector
    ("layerwise_rank2_p", (3, 17, 11), (1, 1), 7),
    ("x_rank_equals_p_rank", (6,), (6,), 2),
    ("one_channel_of_many_axes", (2, 1, 9, 4), (1, 1, 1), 12),
    ("n31_vector_table_full", (2, 6, 33), (6, 1), 31),
    ("n32_past_vector_table", (2, 6, 33), (6, 1), 32),
    ("large_n_scalar_path", (3, 4, 50), (4, 1), 100),
    ("layerwise_large", (1, 8, 64, 64), (1,), 16),
]
ALL_CASES = pwlu_op.CASES + MORE_CASES


def parameters(p_shape, n, seed):
    """bounds (2, *P) with B_L < 0 < B_R, knots (N+1, *P), slopes (2, *P), float32. The knots
    walk with steps of slope ~ N(0, 1) in X's units, as a trained activation's: a function whose
    slope grew with N would put float32's rounding of t (about N * 6e-8) over the tolerance."""
    rng = np.random.default_rng(seed)
    lo = -rng.uniform(0.5, 3.0, p_shape)
    hi = rng.uniform(0.5, 3.0, p_shape)
    bounds = np.stack([lo, hi]).astype(np.float32)
    steps = rng.standard_normal((n, *p_shape)) * (hi - lo) / n
    knots = np.concatenate([rng.standard_normal((1, *p_shape)), steps]).cumsum(axis=0).astype(np.float32)
    slopes = rng.uniform(-2.0, 2.0, (2, *p_shape)).astype(np.float32)
    return bounds, knots, slopes


def activations(x_shape, bounds, knots, seed):
    """Normal values over the bounds and past them, with a share of special values: NaN, +-inf,
    exactly B_L and B_R, the float just outside each, exactly at a knot, and far tails."""
    rng = np.random.default_rng(seed)
    n = len(knots) - 1
    lo = np.broadcast_to(bounds[0], x_shape)
    hi = np.broadcast_to(bounds[1], x_shape)
    x = (rng.standard_normal(x_shape) * 2.5).astype(np.float32)
    knot = rng.integers(0, n + 1, x_shape).astype(np.float32)
    special = {
        1: np.full(x_shape, np.nan, np.float32),
        2: np.full(x_shape, np.inf, np.float32),
        3: np.full(x_shape, -np.inf, np.float32),
        4: lo,
        5: hi,
        6: np.nextafter(lo, np.float32(-np.inf)),
        7: np.nextafter(hi, np.float32(np.inf)),
        8: (lo + knot * ((hi - lo) / np.float32(n))).astype(np.float32),  # at knot j
        9: rng.choice([-1.0, 1.0], x_shape).astype(np.float32) * np.float32(1e6),
        10: rng.choice([-1.0, 1.0], x_shape).astype(np.float32) * rng.uniform(5, 50, x_shape).astype(np.float32),
    }
    kind = rng.choice(len(special) + 1, x_shape, p=[0.45] + [0.55 / len(special)] * len(special))
    for k, values in special.items():
        x = np.where(kind == k, values, x)
    # every special kind at least once, whatever the draw (the first elements of the tensor)
    flat = x.reshape(-1)
    for at, k in enumerate(special):
        if at < flat.size:
            flat[at] = special[k].reshape(-1)[at]
    return flat.reshape(x_shape).astype(np.float32)


def model(x_shape, params, *, as_inputs=False, functions=True):
    node = helper.make_node("PWLU", list(pwlu_op.INPUTS), ["Y"], domain="ai.onnxvq")
    names = pwlu_op.INPUTS[1:]
    inputs = [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, list(x_shape))]
    initializers = []
    for name, value in zip(names, params):
        if as_inputs:
            inputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(value.shape)))
        else:
            initializers.append(numpy_helper.from_array(value, name))
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)],
                              initializers)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnxvq", 1)],
                          functions=[pwlu_op.function(OPSET)] if functions else [])
    m.ir_version = 10
    return m


def run(m, feeds, *, native, threads=1):
    options = ops.session_options(native=native, intra_op_num_threads=threads)
    session = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def assert_agree(got, want, what):
    assert got.shape == want.shape and got.dtype == np.float32, what
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=what)


@pytest.mark.parametrize("as_inputs", [False, True], ids=["initializers", "graph_inputs"])
@pytest.mark.parametrize("case", ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_library_matches_reference_and_body(case, as_inputs):
    name, x_shape, p_shape, n = case
    seed = sum(map(ord, name))
    params = parameters(p_shape, n, seed)
    pwlu_op.check_parameters(*params)
    x = activations(x_shape, params[0], params[1], seed + 1)
    m = model(x_shape, params, as_inputs=as_inputs)
    feeds = {"X": x, **(dict(zip(pwlu_op.INPUTS[1:], params)) if as_inputs else {})}
    reference = pwlu_op.pwlu(x, *params)
    body = run(m, feeds, native=False)
    library = run(m, feeds, native=True)
    assert np.isnan(library).sum() == np.isnan(reference).sum() > 0
    assert_agree(body, reference, "body vs reference")
    assert_agree(library, reference, "library vs reference")
    assert_agree(library, body, "library vs body")


def test_values_at_knots_bounds_and_tails_are_exact_enough():
    """Hand-checked values of one function: Y at each knot, the tails' lines, NaN."""
    bounds = np.array([[-1.0], [3.0]], np.float32)
    knots = np.array([[0.0], [2.0], [-1.0], [5.0], [4.0]], np.float32)  # N = 4, h = 1
    slopes = np.array([[0.5], [-2.0]], np.float32)
    x = np.array([-1, 0, 1, 2, 3, -0.5, 2.25, -3, 5, 1e6, np.nan], np.float32)
    want = np.array([0, 2, -1, 5, 4, 1, 4.75, -1, 0, 4 - 2 * (1e6 - 3), np.nan], np.float32)
    m = model(x.shape, (bounds, knots, slopes))
    np.testing.assert_allclose(run(m, {"X": x}, native=True), want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(pwlu_op.pwlu(x, bounds, knots, slopes), want, rtol=RTOL, atol=ATOL)


def test_the_kernel_runs_without_the_body():
    """A model without the function runs only with the library: the kernel computes it."""
    params = parameters((5, 1, 1), 8, 0)
    x = activations((2, 5, 4, 3), params[0], params[1], 1)
    m = model(x.shape, params, functions=False)
    with pytest.raises(Exception):
        run(m, {"X": x}, native=False)
    assert_agree(run(m, {"X": x}, native=True), pwlu_op.pwlu(x, *params), "library vs reference")


def test_threads_give_the_same_result():
    params = parameters((64, 1, 1), 16, 2)
    x = activations((1, 64, 40, 40), params[0], params[1], 3)
    m = model(x.shape, params)
    one, two = run(m, {"X": x}, native=True, threads=1), run(m, {"X": x}, native=True, threads=2)
    np.testing.assert_array_equal(one, two)


# Bad parameter sets, fed as graph inputs so that nothing checks them before the kernel does:
# name -> (what the error says).
BAD = {
    "slopes_shape": "must be bounds (2, *P), knots (N+1, *P), slopes (2, *P)",
    "bounds_leading_axis": "must be bounds (2, *P), knots (N+1, *P), slopes (2, *P)",
    "knots_p": "must be bounds (2, *P), knots (N+1, *P), slopes (2, *P)",
    "scalar_p": "must be bounds (2, *P), knots (N+1, *P), slopes (2, *P)",
    "one_knot": "at least one interval",
    "p_not_c_ones": "must be (1,) or (C, 1, ..., 1)",
    "p_rank_above_x": "higher rank than X",
    "channel_mismatch": "has 4 channels but X's axis 1 has size 5",
    "bounds_reversed": "B_R > B_L",
}


def bad_case(name):
    x_shape, p_shape = {"p_not_c_ones": ((2, 4, 3), (4, 3)), "p_rank_above_x": ((4, 3), (4, 1, 1)),
                        "channel_mismatch": ((2, 5, 3, 3), (4, 1, 1))}.get(name, ((2, 4, 3, 3), (4, 1, 1)))
    bounds, knots, slopes = parameters(p_shape, 3, 5)
    if name == "slopes_shape":
        slopes = slopes[:, :3]
    elif name == "bounds_leading_axis":
        bounds = np.concatenate([bounds, bounds[:1]])
    elif name == "knots_p":
        knots = knots[:, :2]
    elif name == "scalar_p":
        bounds, knots, slopes = bounds[:, 0, 0, 0], knots[:, 0, 0, 0], slopes[:, 0, 0, 0]
    elif name == "one_knot":
        knots = knots[:1]
    elif name == "bounds_reversed":
        bounds = bounds[::-1]
    return x_shape, tuple(np.ascontiguousarray(p, np.float32) for p in (bounds, knots, slopes))


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_parameters_are_an_error_at_run_time(name):
    x_shape, params = bad_case(name)
    m = model(x_shape, params, as_inputs=True, functions=False)
    feeds = {"X": np.zeros(x_shape, np.float32), **dict(zip(pwlu_op.INPUTS[1:], params))}
    with pytest.raises(Exception, match="PWLU") as info:
        run(m, feeds, native=True)
    assert BAD[name] in str(info.value)
