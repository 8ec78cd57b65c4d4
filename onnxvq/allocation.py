"""Size targets: choose each layer's encoding so the model meets a budget with the least damage.

``--target-ratio R`` (the output at least R times smaller than the input) and ``--target-bits B``
(average bits per weight of the candidate layers, everything stored counted: codes, codebooks,
scales, and the layers left dense at their own width) turn planning into an allocation:

1. **Ladder.** Every layer that no explicit setting fixes gets candidates: dense, and the
   configured method at each (k, d) of :data:`LADDER` (k capped by the subvectors: k = 256 with
   d from 1 to 16, and k = 16, whose 16-entry codebooks cost almost nothing, for small layers and
   the highest ratios), with
   per-channel scales where ``scales`` allows them (``auto``: where the rows' RMS spread reaches
   ``channel_scales.AUTO_MIN_SPREAD``). Candidates that store no fewer bytes than dense are dropped.
   A method whose one codebook serves every layer (``vq4all``: its universal codebook, fixed k
   and d) has one candidate besides dense, its codes into that codebook; the allocation then
   decides which layers stay dense.
2. **Distortion.** Each candidate is encoded quickly (k-means of at most :data:`SAMPLE_PER_CODEWORD`
   subvectors per codeword for :data:`ESTIMATE_ITERATIONS` iterations, then every subvector
   assigned), giving its weight error ``D_l(c) = |W - W_c|^2``.
3. **Sensitivity.** The model output's relative error when layer ``l`` alone is replaced by its
   reference candidate (k = 256, d = :data:`REFERENCE_D`), ``E_l(ref)``, is measured in one onnxruntime
   session whose weights are overridable inputs (on up to :data:`SENSITIVITY_SAMPLES` calibration
   samples, else on inputs generated from the model's input specs; a softmax output is measured
   on its logits, see :mod:`onnxvq.sensitivity`). Other candidates are estimated from the
   measured points on the log-log line of error against weight distortion: with one point
   ``E_l(c) = E_l(ref) D_l(c) / D_l(ref)``, with more, interpolated between them and extrapolated
   with the nearest segment's slope, never flatter than 1.
4. **Knapsack.** Minimise ``sum_l E_l(c_l)`` subject to the bytes fitting the budget: a
   Lagrangian relaxation (each layer picks ``argmin E + lambda * bytes``; lambda bisected to the
   smallest value that fits), then a greedy pass that spends the remaining bytes on the upgrades
   with the best error saved per byte. Layers whose encodings save too little for the error they
   cost stay dense. No layer is offered anything coarser than the finest k = 256 rung at which
   every layer fits the budget (the uniform floor): the knapsack only decides which layers get
   more. Without the floor it sacrificed layers whose coarse-rung estimates looked cheap, and
   those estimates (quick weight-only k-means) are the least reliable: PP-OCRv6's recognizer at
   8x with data read 0.926 char accuracy without it, 0.996 with it (fp32 0.998), and a uniform
   d = 3 at 9.4x already reads 0.994.
5. **Refinement.** An estimate far from the reference can be badly wrong (a classifier whose
   logits saturate its softmax, a layer feeding a sharp nonlinearity), and the knapsack seeks
   exactly the layers whose estimates look cheapest. So the candidate chosen for each layer is
   measured too, its point joins the layer's curve, and the knapsack runs again, for up to
   :data:`REFINE_ROUNDS` rounds or until every chosen candidate has been measured. The whole
   plan's error (all chosen layers replaced at once) is measured last and logged against the
   sum of the per-layer estimates.

Each chosen plan's ``rule`` says what was chosen and why, for the summary and ``inspect``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import zlib
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxvq.calibration import CalibrationSet
from onnxvq.candidates import Layer
from onnxvq.channel_scales import AUTO_MIN_SPREAD, row_rms, rms_spread
from onnxvq.config import CompressConfig, LayerPlan
from onnxvq.errors import OnnxVQError
from onnxvq.kmeans import assign, kmeans
from onnxvq.layout import WeightLayout
from onnxvq.methods import get_method
from onnxvq.ops.codes import code_bits_for_k
from onnxvq.packing import CODEBOOK_DTYPES
from onnxvq.progress import progress as progress_bar

__all__ = ["LADDER", "Budget", "Option", "allocate", "solve"]

logger = logging.getLogger(__name__)

# (k, d) candidates: 8/d bits per weight at k = 256, 4/d at k = 16
LADDER = tuple((256, d) for d in (1, 2, 3, 4, 6, 8, 12, 16)) + tuple((16, d) for d in (1, 2, 4, 8, 16))
REFERENCE_D = 4
SAMPLE_PER_CODEWORD = 32
ESTIMATE_ITERATIONS = 8
SENSITIVITY_SAMPLES = 4
REFINE_ROUNDS = 4
# Bytes the compressed file holds besides the tensors, so that the file, not only the tensors,
# meets the ratio: per compressed layer its node, its share of the provenance record and its
# tensors' framing (about 500 measured on PP-OCRv6's detector), and per op variant a function
# body (1,000-1,800 measured); the variants are a few whatever the model's size.
NODE_OVERHEAD_BYTES = 600
FUNCTION_OVERHEAD_BYTES = 2000
MAX_VARIANTS = 12


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to store one weight: its bytes, its estimated output error, and the plan."""

    nbytes: int
    error: float
    plan: LayerPlan


@dataclasses.dataclass(frozen=True)
class Budget:
    """Bytes the free layers may take in all, and what the target means, for messages."""

    nbytes: float
    target: str
    rest: float = 0.0  # bytes of the file outside the free weights: other tensors, graph, op overhead
    overhead: float = 0.0  # of ``rest``, the compressed ops' own bytes reserved before the plan is known


def solve(options: Sequence[Sequence[Option]], budget: float) -> list[int]:
    """Indices of the chosen option per item minimising the summed error within ``budget`` bytes
    (module docstring, step 4). Raises ValueError when even the smallest options do not fit."""
    smallest = sum(min(o.nbytes for o in item) for item in options)
    if smallest > budget:
        raise ValueError(f"the smallest encodings take {smallest} bytes, over the budget of {budget:.0f}")

    def pick(lam: float) -> list[int]:
        return [min(range(len(item)), key=lambda i: (item[i].error + lam * item[i].nbytes, item[i].nbytes))
                for item in options]

    def total(choice: list[int]) -> int:
        return sum(item[i].nbytes for item, i in zip(options, choice))

    low, high = 0.0, 1.0
    while total(pick(high)) > budget:
        high *= 4
        if high > 1e30:
            break
    if total(pick(low)) <= budget:
        high = low
    for _ in range(100):
        if high - low <= 1e-12 * high:
            break
        middle = (low + high) / 2
        if total(pick(middle)) <= budget:
            high = middle
        else:
            low = middle
    choice = pick(high)
    if total(choice) > budget:  # numerical corner: fall back to the smallest of each
        choice = [min(range(len(item)), key=lambda i: item[i].nbytes) for item in options]
    return _spend_slack(options, choice, budget)


def _spend_slack(options, choice: list[int], budget: float) -> list[int]:
    """Greedy upgrades (less error for more bytes) by error saved per byte, while they fit."""
    used = sum(item[i].nbytes for item, i in zip(options, choice))
    while True:
        best, best_gain = None, 0.0
        for j, (item, i) in enumerate(zip(options, choice)):
            for candidate, option in enumerate(item):
                extra = option.nbytes - item[i].nbytes
                saved = item[i].error - option.error
                if saved <= 0 or used + max(extra, 0) > budget:
                    continue
                gain = saved / max(extra, 1)
                if gain > best_gain:
                    best, best_gain = (j, candidate), gain
        if best is None:
            return choice
        j, candidate = best
        used += options[j][candidate].nbytes - options[j][choice[j]].nbytes
        choice[j] = candidate


def allocate(
    model: ir.Model,
    groups: Sequence[Sequence[Layer]],
    plans: Sequence[LayerPlan],
    config: CompressConfig,
    *,
    input_bytes: int,
    samples: CalibrationSet | None,
    rest_bytes: int | None = None,
    progress: bool = False,
) -> list[LayerPlan]:
    """Plans for ``groups`` (layers sharing one weight) meeting ``config``'s size target.

    ``input_bytes`` is the input's size, the target's reference; ``rest_bytes`` what the model
    holds besides the candidates' weights (``model_io.model_bytes_without``), by default
    ``input_bytes`` less the candidates' bytes.
    ``plans`` are the config's own resolution (without ``min_size``, which a target replaces):
    only ``default`` plans are allocated; explicit settings (``layers[...]``, ``skip``) are kept
    as they are and counted in the budget.
    """
    free = [i for i, plan in enumerate(plans) if plan.rule == "default"]
    fixed_bytes = sum(_fixed_bytes(groups[i], plans[i]) for i in range(len(groups)) if i not in free)
    budget = _budget(config, groups, input_bytes, fixed_bytes, n_free=len(free), rest_bytes=rest_bytes)
    if not free:
        return list(plans)
    if budget.nbytes <= 0:  # found before the ladder's minutes of work
        raise OnnxVQError(
            f"{budget.target} cannot be met: what onnxvq leaves as it is ({budget.rest:.0f} bytes: tensors "
            "other than Conv/Gemm/MatMul weights, such as biases and normalisation parameters, the graph, "
            "a universal codebook kept in the file, layers kept by explicit settings, and the compressed ops' "
            "own bytes) already exceeds the "
            f"{budget.nbytes + budget.rest:.0f} bytes the target allows; lower the target"
        )

    from onnxvq.quality_guard import generated_samples
    from onnxvq.sensitivity import OutputSensitivity

    data = samples.subset(min(SENSITIVITY_SAMPLES, len(samples))) if samples is not None else None
    generated = data is None
    data = data or generated_samples(model, seed=config.seed)
    sensitivity = None
    if data is not None:
        try:
            sensitivity = OutputSensitivity(model, [groups[i][0] for i in free], data)
        except Exception as e:  # onnxruntime refused the inputs (a length noise cannot have)
            text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            if not generated:
                raise OnnxVQError(f"the model did not run on the calibration data: {text}; "
                                  "check the calibration samples against the model's inputs") from None
            logger.warning("the size target is allocated from the weights alone: the model did not run on "
                           "inputs generated from its input specs (%s); give --calib for a measured allocation", text)
    ladders: list[_Ladder] = []
    with progress_bar(total=len(free), desc="sizing layers", unit="layer", enabled=progress) as bar:
        for i in free:
            ladders.append(_ladder(groups[i][0], plans[i], config, sensitivity))
            bar.update()
    _set_uniform_floor(ladders, budget.nbytes)
    try:
        choice = solve([ladder.options() for ladder in ladders], budget.nbytes)
        for _ in range(REFINE_ROUNDS if sensitivity is not None else 0):
            if not sum(ladder.measure(ladder.offered()[c - 1]) for ladder, c in zip(ladders, choice) if c > 0):
                break
            choice = solve([ladder.options() for ladder in ladders], budget.nbytes)
        choice = _return_unused_overhead(ladders, choice, budget)
    except ValueError:
        smallest = fixed_bytes + sum(min(o.nbytes for o in ladder.options()) for ladder in ladders)
        raise OnnxVQError(
            f"{budget.target} cannot be met: even the smallest encodings ({smallest} bytes of weights) "
            f"do not fit in the {max(budget.nbytes + fixed_bytes, 0):.0f} bytes left once the rest of the model "
            "and the compressed ops' own bytes are counted; lower the target, or drop explicit per-layer "
            "settings that keep layers large"
        ) from None
    if sensitivity is not None:
        _log_plan_error(sensitivity, ladders, choice)
    options = [ladder.options() for ladder in ladders]
    chosen = list(plans)
    for i, item, c in zip(free, options, choice):
        chosen[i] = item[c].plan
    return chosen


def _budget(config: CompressConfig, groups, input_bytes: int, fixed_bytes: int, *, n_free: int,
            rest_bytes: int | None = None) -> Budget:
    candidate_bytes = sum(group[0].nbytes for group in groups)
    if config.target_ratio is not None:
        other = rest_bytes if rest_bytes is not None else max(input_bytes - candidate_bytes, 0)
        total = input_bytes / config.target_ratio
        overhead = NODE_OVERHEAD_BYTES * n_free + FUNCTION_OVERHEAD_BYTES * min(n_free, MAX_VARIANTS)
        return Budget(total - other - fixed_bytes - overhead, f"--target-ratio {config.target_ratio:g}",
                      other + fixed_bytes + overhead, overhead)
    weights = sum(group[0].size for group in groups)
    return Budget(config.target_bits * weights / 8 - fixed_bytes, f"--target-bits {config.target_bits:g}")


def _fixed_bytes(group: Sequence[Layer], plan: LayerPlan) -> int:
    layer = group[0]
    if not plan.compressed:
        return layer.nbytes
    transposed, row_axes = layer.view()
    layout = WeightLayout(layer.weight_shape, transposed, row_axes, plan.params.d)
    return _stored_nbytes(plan, layout)


def _stored_nbytes(plan: LayerPlan, layout: WeightLayout, *, scaled: bool | None = None) -> int:
    itemsize = np.dtype(CODEBOOK_DTYPES[plan.codebook_dtype]).itemsize
    scaled = plan.scales != "off" if scaled is None else scaled
    return get_method(plan.method).stored_nbytes(layout, plan.params, itemsize) + (layout.rows * itemsize if scaled else 0)


@dataclasses.dataclass
class _Rung:
    """One ladder candidate: its plan and bytes, and the quick encoding it was estimated from."""

    plan: LayerPlan
    nbytes: int
    codebook: np.ndarray
    codes: np.ndarray
    distortion: float  # |W - W_c|^2 of the quick encoding

    def matrix(self, layout: WeightLayout, rms: np.ndarray | None) -> np.ndarray:
        decoded = self.codebook[self.codes].reshape(layout.rows, -1)[:, : layout.cols]
        return decoded * rms[:, None] if rms is not None else decoded


@dataclasses.dataclass
class _Ladder:
    """A layer's candidates and the output errors measured so far (module docstring, 2-5)."""

    layer: Layer
    dense: Option
    rungs: list[_Rung]
    layouts: list[WeightLayout]
    rms: np.ndarray | None
    signal: float  # |W|^2, for the weight-only fallback
    sensitivity: object | None
    measured: dict[int, float] = dataclasses.field(default_factory=dict)  # rung -> E
    floor: int = 0  # rungs storing fewer bytes are not offered (step 4: the uniform floor)

    def weight(self, rung: int) -> np.ndarray:
        transposed, _ = self.layer.view()
        return _to_weight(self.rungs[rung].matrix(self.layouts[rung], self.rms), self.layer, transposed)

    def measure(self, rung: int) -> bool:
        """Measure ``rung``'s output error if not yet done; True when a new point was added."""
        if rung in self.measured or self.sensitivity is None:
            return False
        error = self.sensitivity.error(self.layer, self.weight(rung))
        if error is None or not math.isfinite(error):
            self.sensitivity = None  # unmeasurable weight: estimates stay weight-only
            return False
        self.measured[rung] = error
        return True

    def errors(self) -> list[float]:
        distortions = [r.distortion for r in self.rungs]
        if not self.measured:
            return [d / self.signal for d in distortions]
        return [_interpolate(d, [(distortions[i], e) for i, e in self.measured.items()]) for d in distortions]

    def offered(self) -> list[int]:
        """Indices of the rungs offered to the knapsack (none below the floor); option ``c`` of
        :meth:`options` is rung ``offered()[c - 1]``, option 0 is dense."""
        return [i for i, rung in enumerate(self.rungs) if rung.nbytes >= self.floor]

    def options(self) -> list[Option]:
        options = [self.dense]
        errors = self.errors()
        for i in self.offered():
            rung, error = self.rungs[i], errors[i]
            params = rung.plan.params
            rule = f"target: d={params.d} k={params.k} (est. output error {error:.2e})"
            options.append(Option(rung.nbytes, error, dataclasses.replace(rung.plan, rule=rule)))
        return options


def _interpolate(distortion: float, points: list[tuple[float, float]]) -> float:
    """Output error at ``distortion`` on the log-log curve through measured ``(D, E)`` points
    (module docstring, step 3): piecewise linear between them, the nearest segment's slope (at
    least 1) outside them, slope 1 through a single point."""
    tiny = 1e-300
    pts = sorted((math.log(max(d, tiny)), math.log(max(e, tiny))) for d, e in points)
    x = math.log(max(distortion, tiny))
    if len(pts) == 1:
        (x0, y0), slope = pts[0], 1.0
    else:
        right = next((j for j in range(1, len(pts)) if x <= pts[j][0]), len(pts) - 1)
        (x0, y0), (x1, y1) = pts[right - 1], pts[right]
        slope = (y1 - y0) / (x1 - x0) if x1 > x0 else 1.0
        if not pts[0][0] <= x <= pts[-1][0]:
            slope = max(slope, 1.0)
            x0, y0 = pts[0] if x < pts[0][0] else pts[-1]
    return math.exp(min(y0 + slope * (x - x0), 700.0))  # far out, a steep slope can leave float range


def _ladder(layer: Layer, plan: LayerPlan, config: CompressConfig, sensitivity) -> _Ladder:
    """Dense plus the ladder of quick encodings, the reference rung measured."""
    dense = Option(layer.nbytes, 0.0, dataclasses.replace(plan, method=None, params=None, rule="target: dense"))
    method_name, base = config.params_for()
    method = get_method(method_name)
    # A method with one codebook for every layer (vq4all) offers that encoding alone.
    fixed = method.fixed_codebook(base)
    weight = layer.weight_array().astype(np.float32)
    transposed, row_axes = layer.view()
    matrix = WeightLayout(layer.weight_shape, transposed, row_axes, 1).to_matrix(weight)
    rms = row_rms(matrix)
    scales = method.forced_scales or config.scales
    scaled = scales == "on" or (scales == "auto" and rms_spread(rms) >= AUTO_MIN_SPREAD)
    rms = rms if scaled else None
    seed = np.random.SeedSequence(config.seed, spawn_key=(zlib.crc32(layer.weight.name.encode()), 1))
    exact = matrix.astype(np.float64)
    rungs, layouts = [], []
    for k, d in LADDER if fixed is None else [(base.k, base.d)]:
        try:
            params = dataclasses.replace(base, d=d, k=k)
        except ValueError:
            continue
        layout = WeightLayout(layer.weight_shape, transposed, row_axes, d)
        candidate = dataclasses.replace(plan, method=method_name, params=params, scales="on" if scaled else "off")
        nbytes = _stored_nbytes(candidate, layout)
        if nbytes >= layer.nbytes:
            continue
        if fixed is None:
            codebook, codes = _quick_encode(matrix, rms, layout, params.k, seed)
        else:
            codebook, codes = fixed, assign(_padded_points(matrix, rms, layout), fixed)[0]
        rung = _Rung(candidate, nbytes, codebook, codes, 0.0)
        rung.distortion = float(np.sum((exact - rung.matrix(layout, rms)) ** 2))
        rungs.append(rung)
        layouts.append(layout)
    signal = float(np.sum(exact**2)) or 1.0
    ladder = _Ladder(layer, dense, rungs, layouts, rms, signal, sensitivity)
    if rungs:
        reference = min(range(len(rungs)), key=lambda i: (rungs[i].plan.params.k < 256, abs(rungs[i].plan.params.d - REFERENCE_D)))
        ladder.measure(reference)
    return ladder


def _quick_encode(matrix: np.ndarray, rms: np.ndarray | None, layout: WeightLayout, k: int, seed):
    """A fast approximation of the ladder point: sampled k-means, then every subvector assigned;
    returns (codebook, codes) of the row-normalised matrix when ``rms`` is given."""
    points = _padded_points(matrix, rms, layout)
    k = min(k, len(points))
    rng = np.random.default_rng(seed)
    sample = points
    if len(points) > SAMPLE_PER_CODEWORD * k:
        sample = points[rng.choice(len(points), SAMPLE_PER_CODEWORD * k, replace=False)]
    codebook = kmeans(sample, k, seed=seed, max_iter=ESTIMATE_ITERATIONS).codebook
    codes, _ = assign(points, codebook)
    return codebook, codes.astype(np.uint8 if k <= 256 else np.int32)


def _padded_points(matrix: np.ndarray, rms: np.ndarray | None, layout: WeightLayout) -> np.ndarray:
    """The (rows * n_sub, d) subvectors of ``matrix``, rows divided by ``rms`` when given, a
    row's tail padded with zeros."""
    rows = matrix / rms[:, None] if rms is not None else matrix
    padded = np.zeros((layout.rows, layout.n_sub * layout.d), np.float32)
    padded[:, : layout.cols] = rows
    return padded.reshape(-1, layout.d)


def _set_uniform_floor(ladders: Sequence[_Ladder], budget: float) -> None:
    """Find the finest k = 256 rung at which every layer fits the budget, and offer no layer
    anything coarser (module docstring, step 4); nothing when no uniform rung fits."""
    for d in sorted({d for k, d in LADDER if k == 256}):
        floors = []
        for ladder in ladders:
            rung = next((r for r in ladder.rungs if r.plan.params.d == d and r.plan.params.k == 256), None)
            floors.append(rung.nbytes if rung is not None else 0)
        # a layer without that rung (too small for it to save bytes) keeps all its options
        smallest = sum(f or min(o.nbytes for o in ladder.options()) for f, ladder in zip(floors, ladders))
        if smallest <= budget:
            for ladder, floor in zip(ladders, floors):
                ladder.floor = floor
            return


def _op_overhead(ladders: Sequence[_Ladder], choice: Sequence[int]) -> int:
    """The compressed ops' own bytes for a plan: a node per compressed layer and a function body
    per op variant (``ops.Variant``: op type, code width, the method's extra inputs, scales,
    padding and the weight's view)."""
    variants = set()
    for ladder, c in zip(ladders, choice):
        if c == 0:
            continue
        plan, layer = ladder.options()[c].plan, ladder.layer
        transposed, row_axes = layer.view()
        layout = WeightLayout(layer.weight_shape, transposed, row_axes, plan.params.d)
        variants.add((layer.op_type, code_bits_for_k(plan.params.k), plan.method, plan.scales != "off",
                      layout.tail < layout.d, transposed, layer.weight_left))
    return NODE_OVERHEAD_BYTES * sum(c > 0 for c in choice) + FUNCTION_OVERHEAD_BYTES * len(variants)


def _return_unused_overhead(ladders: Sequence[_Ladder], choice: list[int], budget: Budget) -> list[int]:
    """The budget reserved a node for every free layer and a function body for up to
    :data:`MAX_VARIANTS` variants; once a plan is known, what it does not need goes back to the
    weights and the knapsack runs again (twice at most), keeping a new plan only if it fits with
    its own ops' bytes. On small models of many layers this reserve is a large part of the file
    (PP-OCR's orientation classifier: 56 kB of 586)."""
    if not budget.overhead:
        return choice
    allowed = budget.nbytes + budget.overhead  # weights and their ops' bytes together
    current = budget.nbytes
    for _ in range(2):
        corrected = allowed - _op_overhead(ladders, choice)
        if corrected <= current:
            break
        _set_uniform_floor(ladders, corrected)
        options = [ladder.options() for ladder in ladders]
        candidate = solve(options, corrected)
        spent = sum(item[c].nbytes for item, c in zip(options, candidate))
        if spent + _op_overhead(ladders, candidate) > allowed:
            _set_uniform_floor(ladders, current)
            break
        choice, current = candidate, corrected
    return choice


def _log_plan_error(sensitivity, ladders: Sequence[_Ladder], choice: Sequence[int]) -> None:
    """Measure the whole plan at once and log it against the sum of per-layer estimates."""
    chosen = [(ladder, ladder.offered()[c - 1]) for ladder, c in zip(ladders, choice)
              if c > 0 and ladder.sensitivity is not None]
    if not chosen:
        return
    weights = {ladder.layer: ladder.weight(rung) for ladder, rung in chosen}
    joint = sensitivity.joint_error(weights)
    estimated = sum(ladder.errors()[rung] for ladder, rung in chosen)
    if joint is not None:
        logger.info("size target: estimated output error %.3g (sum over layers), measured %.3g for the plan",
                    estimated, joint)


def _to_weight(matrix: np.ndarray, layer: Layer, transposed: bool) -> np.ndarray:
    from onnxvq.layout import matrix_to_weight

    weight = matrix_to_weight(matrix.astype(np.float32), layer.weight_shape, transposed)
    return np.ascontiguousarray(weight).astype(layer.weight_dtype.numpy())
