"""Fast, deterministic k-means for weight subvectors.

Minimises the inertia ``sum_i ||x_i - c_{a(i)}||^2`` over codebook ``C`` (k x d) and
assignments ``a`` with Lloyd's algorithm:

* **init**: greedy k-means++ (Arthur & Vassilvitskii 2007, with ``2 + ln k`` candidate trials per
  step as in scikit-learn) run on a random sample of at most ``init_sample`` points. Seeding on a
  sample is what makes init cheap on layers with millions of subvectors; Lloyd then runs on all.
* **assign**: ``argmin_j ||x||^2 - 2 x.c_j + ||c_j||^2``, the cross term one SGEMM per chunk of
  rows, so memory stays bounded (``chunk_bytes`` for the distance block) whatever the layer size.
* **update**: ``c_j = mean of its points``, accumulated in float64 with ``np.bincount``.
* **empty clusters** get the points farthest from their current centroid (deterministic).
* **stop** when the relative inertia decrease falls below ``tol`` or after ``max_iter``.

Points may carry *weights* ``w_i >= 0`` (how much each counts, e.g. how often an embedding row
is read): the objective becomes ``sum_i w_i ||x_i - c_{a(i)}||^2``, centroids are weighted means,
k-means++ draws with probability ``w_i D(x_i)^2`` and the seeding sample is drawn with probability
``w_i`` (with replacement), so that a few heavy points are not missed by a uniform sample.

Points may be *partial*: ``partial`` marks points whose only meaningful entries are the first
``tail`` ones (the last subvector of a row when d does not divide it, see ``onnxvq.layout``).
For those, distances use only the first ``tail`` entries and they pull only those entries of
their centroid.

Threads: each distance block is a thin SGEMM (rows x (d+1) by (d+1) x k). Multithreaded BLAS
splits such a product badly and its spinning threads collapse when the cores are shared (measured
3x slower than one thread under load), so BLAS is pinned to one thread here and the blocks are
spread over a pool of one Python thread per usable core instead (numpy releases the GIL in the
product and the argmin).

Why not scikit-learn's ``KMeans``: it seeds k-means++ on every point (the dominant cost on large
layers), has no notion of partial points, and its OpenMP threads ignore our chunking; the
benchmark (``benchmarks/compress_speed.py``) measures both on the same layers.
"""

from __future__ import annotations

import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

__all__ = ["KMeansResult", "assign", "kmeans"]


@dataclasses.dataclass(frozen=True)
class KMeansResult:
    codebook: np.ndarray  # (k, d) float32
    codes: np.ndarray  # (n,) int64
    inertia: float
    iterations: int


def kmeans(
    points: np.ndarray,
    k: int,
    *,
    seed: int | np.random.SeedSequence = 0,
    max_iter: int = 50,
    tol: float = 1e-4,
    partial: np.ndarray | None = None,
    tail: int | None = None,
    init_sample: int | None = None,
    chunk_bytes: int = 1 << 20,
    weights: np.ndarray | None = None,
) -> KMeansResult:
    """Cluster ``points`` (n, d) into ``k`` codewords.

    Args:
        points: (n, d) array; converted to float32.
        k: number of codewords, ``1 <= k <= n``.
        seed: seed (or ``SeedSequence``) of the only random choices (init sample, k-means++).
        max_iter: Lloyd iterations at most.
        tol: stop when ``(previous - current) / previous`` inertia falls below this.
        partial: optional boolean mask (n,) of points with only ``tail`` meaningful entries.
        tail: meaningful leading entries of partial points, ``1 <= tail < d``.
        init_sample: points used for seeding; default ``max(64 * k, 16384)``.
        chunk_bytes: size budget of one block of the distance matrix.
        weights: optional (n,) non-negative point weights, not all zero (module docstring);
            ``inertia`` is then the weighted sum.

    Example::

        >>> x = np.random.default_rng(0).normal(size=(1000, 4)).astype(np.float32)
        >>> res = kmeans(x, 16, seed=0)
        >>> res.codebook.shape, res.codes.shape
        ((16, 4), (1000,))
    """
    x = np.ascontiguousarray(points, dtype=np.float32)
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, n={n}]")
    groups = _Groups(x, partial, tail, _as_weights(weights, n))
    rng = np.random.default_rng(seed)
    # 1 MiB blocks (1024 rows at k=256) per thread stay in cache: measured ~10% faster than 4 MiB;
    # at least 256 rows so each SGEMM is still worth a call.
    chunk = max(256, int(chunk_bytes // (4 * k)))

    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(_usable_cores()) as pool:
        codebook = _init_kmeanspp(groups, k, rng, max(k, init_sample or max(64 * k, 16384)))
        previous = math.inf
        iterations = 0
        for iterations in range(1, max_iter + 1):
            codes, dist = groups.assign(codebook, chunk, pool)
            inertia = groups.weighted_sum(dist)
            if previous < math.inf and previous - inertia <= tol * previous:
                break
            previous = inertia
            codebook = groups.update(codes, codebook, dist, k)
        else:
            codes, dist = groups.assign(codebook, chunk, pool)
        return KMeansResult(codebook, codes, groups.inertia(codebook, codes), iterations)


def assign(points: np.ndarray, codebook: np.ndarray, *, chunk_bytes: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Nearest codeword of each of ``points`` (n, d) in ``codebook`` (k, d): (codes int64, squared
    distances float32), with the chunked, threaded augmented GEMM of :func:`kmeans`."""
    x = np.ascontiguousarray(points, dtype=np.float32)
    codebook = np.ascontiguousarray(codebook, dtype=np.float32)
    chunk = max(256, int(chunk_bytes // (4 * len(codebook))))
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(_usable_cores()) as pool:
        return _Groups(x, None, None).assign(codebook, chunk, pool)


class _Groups:
    """The points split by how many of their leading entries count: all ``d``, or ``tail``.

    Each part keeps its points augmented with a column of ones, ``[x, 1]``, so that one SGEMM
    with ``[-2 c, ||c||^2]`` yields ``||x - c||^2 - ||x||^2`` directly (no separate pass to add the
    codeword norms; measured about 3x faster than GEMM + add on 400k x 8 points, k=256).
    """

    def __init__(self, x: np.ndarray, partial: np.ndarray | None, tail: int | None,
                 weights: np.ndarray | None = None) -> None:
        self.x = x
        self.n, self.d = x.shape
        self.weights = weights  # (n,) float64 or None (all ones)
        if partial is None or not partial.any():
            index_sets = [(None, self.d)]
        else:
            if tail is None or not 1 <= tail < self.d:
                raise ValueError(f"tail must be in [1, d) for partial points, got {tail}")
            index_sets = [(np.flatnonzero(~partial), self.d), (np.flatnonzero(partial), tail)]
        self.parts = []
        for idx, length in index_sets:
            rows = x[:, :length] if idx is None else x[idx, :length]
            augmented = np.empty((len(rows), length + 1), np.float32)
            augmented[:, :length] = rows
            augmented[:, length] = 1.0
            norms = np.einsum("nd,nd->n", rows, rows)
            self.parts.append((idx, length, augmented, norms))

    def assign(
        self, codebook: np.ndarray, chunk: int, pool: ThreadPoolExecutor
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest codeword per point and the squared distance to it."""
        codes = np.empty(self.n, np.int64)
        dist = np.empty(self.n, np.float32)
        for idx, length, augmented, norms in self.parts:
            c = codebook[:, :length]
            weights = np.empty((length + 1, len(c)), np.float32)
            weights[:length] = -2.0 * c.T
            weights[length] = np.einsum("kd,kd->k", c, c)
            part_codes = np.empty(len(augmented), np.int64)
            part_dist = np.empty(len(augmented), np.float32)

            def assign_block(start: int) -> None:
                scores = augmented[start : start + chunk] @ weights
                best = scores.argmin(axis=1)
                part_codes[start : start + chunk] = best
                part_dist[start : start + chunk] = np.take_along_axis(scores, best[:, None], 1)[:, 0]

            list(pool.map(assign_block, range(0, len(augmented), chunk)))
            part_dist += norms
            np.maximum(part_dist, 0.0, out=part_dist)
            if idx is None:
                codes, dist = part_codes, part_dist
            else:
                codes[idx] = part_codes
                dist[idx] = part_dist
        return codes, dist

    def weighted_sum(self, values: np.ndarray) -> float:
        """``sum_i w_i values_i`` in float64."""
        if self.weights is None:
            return float(values.sum(dtype=np.float64))
        return float(np.dot(values.astype(np.float64), self.weights))

    def _part_weights(self, idx: np.ndarray | None) -> np.ndarray | None:
        if self.weights is None:
            return None
        return self.weights if idx is None else self.weights[idx]

    def inertia(self, codebook: np.ndarray, codes: np.ndarray) -> float:
        """Exact ``sum w ||x - c||^2`` over meaningful entries (the expanded form used for the
        argmin loses digits to cancellation when points sit on their codewords)."""
        total = 0.0
        step = 1 << 16  # bounded temporaries on layers with millions of subvectors
        for idx, length, augmented, _ in self.parts:
            part_codes = codes if idx is None else codes[idx]
            part_weights = self._part_weights(idx)
            for start in range(0, len(augmented), step):
                block = augmented[start : start + step, :length]
                diff = block - codebook[part_codes[start : start + step], :length]
                squared = np.einsum("nd,nd->n", diff, diff, dtype=np.float64)
                total += float(squared.sum() if part_weights is None else squared @ part_weights[start : start + step])
        return total

    def update(
        self, codes: np.ndarray, codebook: np.ndarray, dist: np.ndarray, k: int
    ) -> np.ndarray:
        """Centroids as per-entry (weighted) means of their points; empty clusters re-seeded."""
        sums = np.zeros((k, self.d), np.float64)
        counts = np.zeros((k, self.d), np.float64)
        for part_idx, length, augmented, _ in self.parts:
            rows = augmented[:, :length]
            part_codes = codes if part_idx is None else codes[part_idx]
            part_weights = self._part_weights(part_idx)
            n_per = np.bincount(part_codes, weights=part_weights, minlength=k).astype(np.float64)
            counts[:, :length] += n_per[:, None]
            for j in range(length):
                column = rows[:, j] if part_weights is None else rows[:, j] * part_weights
                sums[:, j] += np.bincount(part_codes, weights=column, minlength=k)
        new = codebook.astype(np.float64, copy=True)
        filled = counts > 0
        new[filled] = sums[filled] / counts[filled]
        empty = np.flatnonzero(counts[:, 0] == 0)
        if len(empty):
            # Farthest points (from their current centroid) become the empty clusters' centroids,
            # as scikit-learn does; only full points qualify so every entry is meaningful.
            # Weighted, the costliest points (zero-weight points never qualify).
            cost = dist if self.weights is None else np.where(self.weights > 0, dist * self.weights, -np.inf)
            candidates = cost if len(self.parts) == 1 else _mask_partial(cost, self.parts[1][0])
            far = np.argsort(-candidates, kind="stable")[: len(empty)]
            new[empty[: len(far)]] = self.x[far]
        return new.astype(np.float32)


def _usable_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _as_weights(weights: np.ndarray | None, n: int) -> np.ndarray | None:
    if weights is None:
        return None
    w = np.asarray(weights, np.float64).reshape(-1)
    if len(w) != n:
        raise ValueError(f"weights has {len(w)} entries for {n} points")
    if not np.all(np.isfinite(w)) or (w < 0).any() or not (w > 0).any():
        raise ValueError("weights must be finite, non-negative and not all zero")
    return w


def _mask_partial(dist: np.ndarray, partial_idx: np.ndarray) -> np.ndarray:
    masked = dist.copy()
    masked[partial_idx] = -np.inf
    return masked


def _init_kmeanspp(groups: _Groups, k: int, rng: np.random.Generator, sample: int) -> np.ndarray:
    """Greedy k-means++ on a sample of the (full) points; falls back to partial ones if needed."""
    full_idx = groups.parts[0][0]
    pool = np.arange(groups.n) if full_idx is None else full_idx
    if len(pool) < k:  # too few full points: seed on everything (padding entries are zeros)
        pool = np.arange(groups.n)
    if groups.weights is not None:
        pool = pool[groups.weights[pool] > 0]
        if len(pool) < k:  # fewer weighted points than codewords: the others fill in
            pool = np.arange(groups.n)
    point_weights = None
    if len(pool) > sample:
        if groups.weights is None:
            pool = np.sort(rng.choice(pool, size=sample, replace=False))
        else:  # drawn by weight, with replacement: the sample then stands for the weighted points
            p = groups.weights[pool]
            pool = np.sort(rng.choice(pool, size=sample, replace=True, p=p / p.sum()))
    elif groups.weights is not None:
        point_weights = groups.weights[pool]
    x = groups.x[pool]
    n = len(x)
    trials = 2 + int(math.log(k))
    x_norm = np.einsum("nd,nd->n", x, x)

    centers = np.empty((k, x.shape[1]), np.float32)
    first = int(rng.integers(n)) if point_weights is None else int(
        np.searchsorted(np.cumsum(point_weights), rng.random() * point_weights.sum()))
    first = min(first, n - 1)
    centers[0] = x[first]
    closest = np.maximum(x_norm - 2.0 * (x @ x[first]) + x_norm[first], 0.0)
    for c in range(1, k):
        draw = closest if point_weights is None else closest * point_weights
        total = float(draw.sum(dtype=np.float64))
        if total <= 0.0:  # every point already coincides with a center: duplicates are fine
            centers[c:] = centers[0]
            break
        cdf = np.cumsum(draw, dtype=np.float64)
        picks = np.searchsorted(cdf, rng.random(trials) * total)
        picks = np.minimum(picks, n - 1)
        cand = x[picks]  # (trials, d)
        cand_dist = x_norm[:, None] - 2.0 * (x @ cand.T) + x_norm[picks][None, :]
        np.maximum(cand_dist, 0.0, out=cand_dist)
        new_closest = np.minimum(closest[:, None], cand_dist)
        potential = new_closest.sum(axis=0) if point_weights is None else point_weights @ new_closest
        best = int(potential.argmin())
        centers[c] = cand[best]
        closest = new_closest[:, best]
    return centers
