"""Size targets (onnxvq.allocation): the knapsack, and compress meeting --target-ratio and
--target-bits with explicit settings kept, deterministically."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import onnx
import pytest

import onnxvq
from models import mlp, rng, run_ort
from onnxvq.allocation import Option, solve
from onnxvq.config import LayerPlan

PLAN = LayerPlan("layer", None, None, "float16", "test")


def options(pairs):
    return [Option(nbytes, error, PLAN) for nbytes, error in pairs]


def brute_force(items, budget):
    best = None
    for choice in itertools.product(*(range(len(item)) for item in items)):
        size = sum(item[i].nbytes for item, i in zip(items, choice))
        error = sum(item[i].error for item, i in zip(items, choice))
        if size <= budget and (best is None or error < best):
            best = error
    return best


def test_solve_is_exact_on_convex_ladders():
    """Error falling convexly with bytes (as it does along a k/d ladder): the relaxation plus
    the greedy pass find the optimum."""
    items = []
    for j in range(5):
        scale = 1.0 + j
        items.append(options([(1000 * 2**i, scale * 4.0 ** -i) for i in range(5)]))
    for budget in (5000, 9000, 20000, 50000, 155000):
        choice = solve(items, budget)
        size = sum(item[i].nbytes for item, i in zip(items, choice))
        error = sum(item[i].error for item, i in zip(items, choice))
        assert size <= budget
        assert error == pytest.approx(brute_force(items, budget), rel=1e-9)


def test_solve_random_items_fit_and_come_close():
    r = rng(0)
    for trial in range(20):
        items = []
        for _ in range(4):
            sizes = np.sort(r.integers(10, 1000, 4))
            errors = np.sort(r.random(4))[::-1]
            items.append(options(zip(sizes.tolist(), errors.tolist())))
        smallest = sum(min(o.nbytes for o in item) for item in items)
        budget = smallest + r.integers(0, 2000)
        choice = solve(items, budget)
        error = sum(item[i].error for item, i in zip(items, choice))
        assert sum(item[i].nbytes for item, i in zip(items, choice)) <= budget
        assert error <= brute_force(items, budget) + 0.35, trial  # greedy exchange stays near the optimum


def test_solve_refuses_what_cannot_fit():
    with pytest.raises(ValueError, match="over the budget"):
        solve([options([(100, 1.0), (50, 2.0)])], 40)


def big_mlp():
    return mlp(sizes=(256, 512, 512, 10), seed=3)


def file_bytes(result, path) -> int:
    return sum(p.stat().st_size for p in map(type(path), result.save(path)))


@pytest.mark.parametrize("ratio", [6, 12])
def test_target_ratio_is_met_by_the_file(tmp_path, ratio):
    model = big_mlp()
    onnx.save(model, tmp_path / "in.onnx")
    result = onnxvq.compress(str(tmp_path / "in.onnx"), target_ratio=ratio)
    written = file_bytes(result, tmp_path / "out.onnx")
    assert (tmp_path / "in.onnx").stat().st_size / written >= ratio
    assert all(l.rule.startswith("target:") for l in result.summary.layers)


def test_higher_targets_cost_quality():
    model = big_mlp()
    x = {"x": rng(1).standard_normal((64, 256)).astype(np.float32)}
    reference = run_ort(model, x)[0]
    errors = []
    for ratio in (4, 8, 16):
        got = run_ort(onnxvq.compress(model, target_ratio=ratio).to_proto(), x)[0]
        errors.append(float(((got - reference) ** 2).sum() / (reference**2).sum()))
    assert errors[0] < errors[1] < errors[2], errors


def test_target_bits_counts_everything_stored():
    model = big_mlp()
    result = onnxvq.compress(model, target_bits=2.0)
    layers = result.summary.layers
    stored = sum(l.bytes_after if l.compressed else l.bytes_before for l in layers)
    weights = sum(l.params for l in layers)
    assert 8 * stored / weights <= 2.0
    assert 8 * stored / weights > 1.0  # the budget is spent, not wasted


def test_explicit_settings_win_and_count_in_the_budget():
    model = big_mlp()
    result = onnxvq.compress(model, target_bits=2.0, layers={"fc1": {"d": 16, "k": 16}, "fc2": {"skip": True}})
    by_name = {l.name: l for l in result.summary.layers}
    assert (by_name["fc1"].k, by_name["fc1"].d, by_name["fc1"].rule) == (16, 16, "layers['fc1']")
    assert not by_name["fc2"].compressed and by_name["fc2"].rule == "layers['fc2']"
    assert by_name["fc0"].rule.startswith("target:")
    stored = sum(l.bytes_after if l.compressed else l.bytes_before for l in by_name.values())
    assert 8 * stored / sum(l.params for l in by_name.values()) <= 2.0


def test_unreachable_target_is_one_clear_error():
    with pytest.raises(onnxvq.OnnxVQError, match="cannot be met"):
        onnxvq.compress(big_mlp(), target_bits=0.05)
    with pytest.raises(onnxvq.OnnxVQError, match="one size target"):
        onnxvq.compress(big_mlp(), target_bits=2, target_ratio=8)
    with pytest.raises(onnxvq.OnnxVQError, match="target_ratio must be"):
        onnxvq.compress(big_mlp(), target_ratio=0.5)


def test_same_seed_same_bytes():
    first = onnxvq.compress(big_mlp(), target_ratio=8).to_proto().SerializeToString()
    second = onnxvq.compress(big_mlp(), target_ratio=8).to_proto().SerializeToString()
    assert first == second


def test_cli_target_and_fixed_settings_conflict(tmp_path):
    onnx.save(big_mlp(), tmp_path / "in.onnx")
    done = subprocess.run(
        [sys.executable, "-m", "onnxvq.cli", "compress", tmp_path / "in.onnx", "-o", tmp_path / "out.onnx",
         "--target-ratio", "8", "-d", "4"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 1 and done.stderr.startswith("error: a size target chooses k and d")
    done = subprocess.run(
        [sys.executable, "-m", "onnxvq.cli", "compress", tmp_path / "in.onnx", "-o", tmp_path / "out.onnx",
         "--target-ratio", "8", "-q"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "in.onnx").stat().st_size / (tmp_path / "out.onnx").stat().st_size >= 8
