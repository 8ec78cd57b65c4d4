"""PWLU parameters: bounds from input statistics, initialisation to a given activation, and the
least-squares fit that lets a PWLU undo part of the quantization error.

Parameters are held per *group* (one group for a layer-wise PWLU, one per channel otherwise):
``bounds`` (2, G), ``knots`` (N+1, G), ``slopes`` (2, G), the op's tensors (:mod:`onnxvq.ops.pwlu`)
with ``P = (G,)``; samples are matrices ``(n, G)``, one column per group.

**Bounds** (the paper's realignment): ``mean ± 3 std`` of the group's inputs, widened to contain
every kink of the activation, then moved so that every kink falls on a knot
(:func:`aligned_bounds`); with the kinks on knots and inside the bounds, a piecewise-linear
activation is reproduced exactly (:func:`initial_parameters`).

**Fit.** A PWLU is linear in ``theta = (Y_0..Y_N, K_L, K_R)`` once its bounds are fixed: each
input ``x`` reads two entries of ``theta`` (``Y_i, Y_(i+1)`` with weights ``1 - u, u`` inside,
``Y_0, K_L`` with ``1, x - B_L`` below, ``Y_N, K_R`` with ``1, x - B_R`` above). So the
parameters that map the quantized model's inputs ``x_q`` closest to the original model's
activation outputs ``f(x_o)`` solve a small ridge-regularised least squares per group:

    min_theta  sum (A theta - f(x_o))^2 + lambda ||theta - theta_0||^2,
    lambda = RIDGE * trace(A'A) / (N + 3)

(``theta_0`` the initialisation, which keeps intervals that the data barely visits where they
were); no gradient steps are needed.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from onnxvq.ops.pwlu import pwlu

__all__ = ["RIDGE", "PWLUParameters", "aligned_bounds", "fit", "initial_parameters", "squared_error"]

RIDGE = 1e-3


@dataclasses.dataclass
class PWLUParameters:
    """``bounds`` (2, G), ``knots`` (N+1, G), ``slopes`` (2, G), float64."""

    bounds: np.ndarray
    knots: np.ndarray
    slopes: np.ndarray

    @property
    def intervals(self) -> int:
        return len(self.knots) - 1

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The PWLU of each column of ``x`` (n, G)."""
        return pwlu(np.asarray(x, np.float64), self.bounds, self.knots, self.slopes)

    def theta(self) -> np.ndarray:
        """(G, N+3): the fitted unknowns ``(Y_0..Y_N, K_L, K_R)`` of each group."""
        return np.concatenate([self.knots, self.slopes]).T

    def with_theta(self, theta: np.ndarray) -> "PWLUParameters":
        n = self.intervals
        return PWLUParameters(self.bounds.copy(), theta[:, : n + 1].T.copy(), theta[:, n + 1 :].T.copy())

    def select(self, use: np.ndarray, other: "PWLUParameters") -> "PWLUParameters":
        """Each group's parameters from ``self`` where ``use``, else from ``other``."""
        return PWLUParameters(*(np.where(use, a, b) for a, b in zip(
            (self.bounds, self.knots, self.slopes), (other.bounds, other.knots, other.slopes))))


def aligned_bounds(low: float, high: float, kinks: tuple[float, ...], intervals: int) -> tuple[float, float]:
    """Bounds ``(B_L, B_R)`` near ``[low, high]`` that contain every kink on a knot.

    The range is first widened to contain the kinks. One kink ``b``: the knot spacing
    ``h = (high - low) / N`` is kept and ``B_L = b - j h`` with ``j = ceil((b - low) / h)``. Two
    kinks ``b_0 < b_1``: the spacing becomes ``(b_1 - b_0) / m``, ``m`` the whole number of
    intervals nearest to what the range's spacing would put between them (1..N), and ``B_L``
    is placed the same way, at most ``N - m`` knots below ``b_0``. Always ``B_R = B_L + N h``.
    """
    if len(kinks) > 2:
        raise ValueError("at most two kinks are supported")
    low, high = min([low, *kinks]), max([high, *kinks])
    if not high - low > 1e-6 * max(1.0, abs(low), abs(high)):
        pad = max(1e-3, 1e-3 * abs(low))
        low, high = low - pad, high + pad
    h = (high - low) / intervals
    if not kinks:
        return low, high
    if len(kinks) == 2 and kinks[1] > kinks[0]:
        m = min(intervals, max(1, round((kinks[1] - kinks[0]) / h)))
        h = (kinks[1] - kinks[0]) / m
        j = min(max(math.ceil((kinks[0] - low) / h - 1e-9), 0), intervals - m)
    else:
        j = min(max(math.ceil((kinks[0] - low) / h - 1e-9), 0), intervals)
    start = kinks[0] - j * h
    return start, start + intervals * h


def initial_parameters(function, kinks: tuple[float, ...], low: np.ndarray,
                       high: np.ndarray, intervals: int, samples: np.ndarray | None = None) -> PWLUParameters:
    """A PWLU per group that reproduces ``function`` (numpy, elementwise), bounds aligned to the
    kinks from each group's ``[low, high]``.

    With kinks: knots ``Y_j = f(B_L + j h)`` and the tails' slopes, which is exact for a
    piecewise-linear function and exact at the knots and beyond the kinks for HardSwish (linear
    outside its kinks). Without (SiLU): knots and slopes by least squares on ``samples`` (n, G)
    together with a dense grid of the bounds and their surroundings, so the tails follow ``f``
    near the bounds too.
    """
    groups = len(low)
    bounds = np.empty((2, groups))
    for g in range(groups):
        bounds[:, g] = aligned_bounds(float(low[g]), float(high[g]), kinks, intervals)
    grid = bounds[0] + (bounds[1] - bounds[0]) * (np.arange(intervals + 1)[:, None] / intervals)
    knots = function(grid)
    width = bounds[1] - bounds[0]
    slopes = np.stack([(knots[0] - function(bounds[0] - width)) / width,
                       (function(bounds[1] + width) - knots[-1]) / width])
    params = PWLUParameters(bounds, knots.astype(np.float64), slopes.astype(np.float64))
    if kinks:
        return params
    dense = bounds[0] + width * np.linspace(-1.0, 2.0, 16 * intervals + 1)[:, None]
    x = dense if samples is None else np.concatenate([dense, samples.astype(np.float64)])
    return fit(params, x, function(x), ridge=1e-9)


def _design(params: PWLUParameters, x: np.ndarray):
    """For each sample, the two entries of theta it reads and their coefficients (module docstring)."""
    n = params.intervals
    lo, hi = params.bounds
    t = (x - lo) / (hi - lo) * n
    i = np.clip(np.floor(np.nan_to_num(t)), 0, n - 1).astype(np.int64)
    u = t - i
    below, above = x < lo, x > hi
    first = np.where(below, 0, np.where(above, n, i))
    second = np.where(below, n + 1, np.where(above, n + 2, i + 1))
    c_first = np.where(below | above, 1.0, 1 - u)
    c_second = np.where(below, x - lo, np.where(above, x - hi, u))
    return first, second, c_first, c_second


def fit(params: PWLUParameters, x: np.ndarray, target: np.ndarray, *, ridge: float = RIDGE) -> PWLUParameters:
    """Parameters (same bounds) minimising ``sum (PWLU(x) - target)^2 + lambda ||theta - theta_0||^2``
    per group (module docstring); ``x``, ``target``: (n, G). NaN samples are ignored."""
    x = np.asarray(x, np.float64)
    target = np.asarray(target, np.float64)
    ok = np.isfinite(x) & np.isfinite(target)
    x, target = np.where(ok, x, 0.0), np.where(ok, target, 0.0)
    groups, size = x.shape[1], params.intervals + 3
    a, b, ca, cb = _design(params, x)
    ca, cb = ca * ok, cb * ok
    g = np.broadcast_to(np.arange(groups), x.shape)
    base = g * size * size
    gram = np.zeros(groups * size * size)
    for (r, c, w) in ((a, a, ca * ca), (a, b, ca * cb), (b, a, ca * cb), (b, b, cb * cb)):
        gram += np.bincount((base + r * size + c).ravel(), weights=w.ravel(), minlength=gram.size)
    gram = gram.reshape(groups, size, size)
    rhs = np.zeros(groups * size)
    for r, w in ((a, ca), (b, cb)):
        rhs += np.bincount((g * size + r).ravel(), weights=(w * target).ravel(), minlength=rhs.size)
    rhs = rhs.reshape(groups, size)
    theta0 = params.theta()
    lam = ridge * np.trace(gram, axis1=1, axis2=2) / size + 1e-12
    system = gram + lam[:, None, None] * np.eye(size)
    theta = np.linalg.solve(system, (rhs + lam[:, None] * theta0)[..., None])[..., 0]
    return params.with_theta(theta)


def squared_error(params: PWLUParameters, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per group, ``sum (PWLU(x) - target)^2`` over the finite samples."""
    error = params(x) - target
    return np.nansum(error * error, axis=0)
