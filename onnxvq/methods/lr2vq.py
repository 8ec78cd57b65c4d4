"""LR2VQ: low-rank representation vector quantization (Zhu, Zhou, Zhong, IJCNN 2023,
arXiv 2211.11397).

A layer's subvectors ``X`` (N x m, the rows of ``onnxvq.layout`` cut into length ``m = d``) are
represented as ``Z P`` with a per-layer projection ``P`` (r x m, r = the clustering dimension d~)
and coordinates ``Z`` (N x r); the coordinates are clustered into a k x r codebook ``C``, so

    X ~= C[codes] P            (stored: codes, C, P; decoded codewords C P, k x m)

Bits per weight stay about ``log2(k) / m`` (``m`` sets the compression ratio); ``r`` trades the
low-rank error (the part of ``X`` outside the span of ``P``) against the clustering error (k
points in r dimensions). ``r = m`` is plain PQ.

**Metric.** Without data every error is ``||x - x^||^2``. With calibration inputs (``H = E[x x']``
over the layout's columns), the output error of a row is ``(m^ - m)' H (m^ - m)``; the rank and
the factors are chosen under its block-diagonal average ``G = mean_j H_jj + lam I`` (the m x m
moment of one subvector slot, damped as in ``onnxvq.weighted_kmeans``), i.e. the error of a
subvector is ``||(x - x^) L||^2`` with ``G = L L'``. Every step below works on the *whitened*
subvectors ``X L``.

**Encoding** (all steps lower the same objective ``F = sum_i ||(x_i - c_{a_i} P) L||^2``):

1. *Low-rank representation*: the principal directions of ``X L`` (eigenvectors ``V`` of
   ``L' X' X L``, largest first) give the best rank-r fit (Eckart-Young): ``Z = X L V_r``,
   ``P = V_r' L^-1``. This is, in closed form, the layer-wise version of the paper's low-rank
   pre-training; with calibration data it is the output-error optimum under ``G``.
2. *Clustering*: k-means (``onnxvq.kmeans``) of ``Z`` gives the codes and ``C``. Because
   ``V_r`` is orthonormal, distances in ``Z`` are exactly whitened distances, and
   ``F = sum_{i > r} s_i + sum_i ||z_i - c_{a_i}||^2`` (``s`` the eigenvalues): the two errors
   ``r`` trades add up (Pythagoras).
3. *Alternating least squares* until ``F`` stops falling: ``P = (C_a' C_a)^-1 C_a' X`` for
   fixed codes and ``C`` (metric-free, ``C_a = C[codes]``), ``c_j = xbar_j G P' (P G P')^-1`` for
   fixed ``P``, and each subvector re-assigned to its nearest decoded codeword ``C P``.
4. With data, a least-squares refit of the decoded codebook under the *full* ``H``
   (``onnxvq.weighted_kmeans.refit_codebook``), mapped back to ``C`` for the fixed ``P``; kept
   only if the full output error falls. The weight-space encoding of the same rank is also
   tried, and the better one under the full ``H`` is kept (data-aware never loses).

**Choosing r** (``rank="auto"``, the paper's "estimate d~ before fine-tuning"): for each
candidate ``r``, the low-rank error is read off the spectrum (``sum_{i > r} s_i``, exact), and the
clustering error is estimated by a short k-means of ``Z`` on a sample of subvectors, measured on a
second sample (a held-out estimate, not the optimistic training inertia), scaled to all N. The
``r`` with the smallest sum wins (the smallest ``r`` among sums within 0.1% of it). Candidates are every ``r`` up to 8, and above that a geometric
grid refined around its best point. With data the errors are whitened, so ``r`` minimises the
(block-averaged) output error; because that average can misjudge the low-rank error badly (slots
see different inputs), the estimate's ``r`` is then encoded next to ``r = m`` and the one with
the lower *full* output error is kept (``stats["rank_estimate"]`` records an overruled estimate).

**Row weights** (an embedding table's rows, weighted by how often calibration reads them; see
:func:`onnxvq.methods.base.point_weights`): every sum over subvectors above carries the weight
``w_i`` of its row: the principal directions are those of ``L' X' W X L``, k-means is weighted,
step 3's least squares are weighted (``N`` holds the weight sums per codeword), and the rank
estimate draws its samples with probability ``w_i``.

``r = m`` runs :class:`onnxvq.methods.pq.PQ` itself (same seed, same codes and codebook) and
stores no projection (``P = I``), so ``lr2vq --rank m`` is exactly ``pq``, byte for byte in the
tensors; fine-tuning still learns a ``P`` (starting at ``I``) and folds it into the codebook.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from onnxvq.kmeans import assign, kmeans
from onnxvq.layout import WeightLayout
from onnxvq.methods.base import Encoded, Method, MethodParams, point_weights
from onnxvq.methods.pq import PQ, PQParams
from onnxvq.ops.codes import code_bits_for_k, packed_nbytes
from onnxvq.weighted_kmeans import _diagonal_blocks, _ridge, output_error, refit_codebook

__all__ = ["LR2VQ", "LR2VQParams", "choose_rank"]

# Damping of the slot metric G, relative to its mean diagonal (as onnxvq.weighted_kmeans does).
_DAMP = 0.01


@dataclasses.dataclass(frozen=True)
class LR2VQParams(MethodParams):
    """Parameters of ``lr2vq``.

    Attributes:
        k: codewords (default 256).
        d: subvector length ``m`` (sets the compression ratio, about ``log2(k) / m`` bits per
            weight).
        rank: the clustering dimension d~, ``1 <= rank <= d``, or ``"auto"`` (default: chosen per
            layer from the spectrum and a sampled k-means, see the module docstring).
        max_iter: Lloyd iterations of the k-means of the coordinates.
        refine_iter: alternating least-squares rounds after it (0 = none).
        rank_sample: subvectors the rank search clusters per candidate (at least 32 per
            codeword are used).

    Example::

        >>> LR2VQParams(k=256, d=16, rank=4)
        LR2VQParams(k=256, d=16, rank=4, max_iter=50, refine_iter=20, rank_sample=16384)
    """

    rank: int | str = "auto"
    max_iter: int = 50
    refine_iter: int = 20
    rank_sample: int = 16384

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank != "auto":
            if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)):
                raise ValueError(f"rank must be 'auto' or an integer, got {self.rank!r}")
            if not 1 <= self.rank <= self.d:
                raise ValueError(f"rank must be between 1 and d={self.d} (got {self.rank})")
        for name in ("max_iter", "rank_sample"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer (got {value!r})")
        if isinstance(self.refine_iter, bool) or not isinstance(self.refine_iter, int) or self.refine_iter < 0:
            raise ValueError(f"refine_iter must be a non-negative integer (got {self.refine_iter!r})")


class LR2VQ(Method):
    name = "lr2vq"
    Params = LR2VQParams

    def encode(self, weight, *, transposed, row_axes, params, seed, inputs=None) -> Encoded:
        layout = WeightLayout(tuple(weight.shape), transposed, row_axes, params.d)
        subvectors = layout.to_subvectors(weight)
        points = subvectors.reshape(-1, params.d)
        k = min(params.k, len(points))
        hessian = layout.pad_moment(inputs.hessian) if inputs is not None and inputs.hessian is not None else None
        weights = point_weights(inputs, layout)
        rank_seed = np.random.SeedSequence(seed.entropy, spawn_key=(*seed.spawn_key, 0x5A4B))

        metric = slot_metric(hessian, layout.n_sub, params.d)
        whitened = points.astype(np.float64) @ np.linalg.cholesky(metric)
        spectrum, directions = _principal(whitened, weights)
        stats: dict = {}
        if params.rank == "auto":
            rank, estimates = choose_rank(
                whitened.astype(np.float32), spectrum, directions, k, seed=rank_seed, sample=params.rank_sample,
                weights=weights,
            )
            stats["rank_estimates"] = {str(r): round(e, 6) for r, e in sorted(estimates.items())}
        else:
            rank = int(params.rank)
        args = (weight, subvectors, layout, metric, directions, k, params, seed, inputs, hessian, weights)
        encoded = self._encode_at_rank(rank, *args)
        if hessian is not None and params.rank == "auto" and rank < params.d:
            # The metric G averages the subvector slots' input moments, so its rank estimate can
            # be far off the full output error (measured: up to 5x on MNIST's fc1). The full-rank
            # encoding is the one other candidate, and the full H decides.
            full = self._encode_at_rank(params.d, *args)
            if _output_error(subvectors, full, hessian) < _output_error(subvectors, encoded, hessian):
                stats["rank_estimate"], rank, encoded = rank, params.d, full
        stats["rank"] = rank
        return dataclasses.replace(encoded, stats={**encoded.stats, **stats})

    def _encode_at_rank(self, rank, weight, subvectors, layout, metric, directions, k, params, seed, inputs,
                        hessian, weights) -> Encoded:
        """Steps 1-4 of the module docstring at a given rank (``rank == d``: PQ with ``P = I``)."""
        if rank == params.d:
            pq = PQ().encode(
                weight, transposed=layout.transposed, row_axes=layout.row_axes, seed=seed, inputs=inputs,
                params=PQParams(k=params.k, d=params.d, max_iter=params.max_iter),
            )
            # P = I is not stored: a full-rank codebook is a plain k x m codebook.
            return Encoded(self.name, pq.codes, pq.codebook, pq.stats)
        points = subvectors.reshape(-1, params.d)
        cluster_seed = np.random.SeedSequence(seed.entropy, spawn_key=(*seed.spawn_key, rank))
        padding = None
        if layout.tail < params.d:  # the last subvector of every row
            padding = (np.arange(layout.n_sub - 1, len(points), layout.n_sub), layout.tail)
        factors = _encode_low_rank(points, metric, directions[:, :rank], k, params, cluster_seed, padding, weights)
        stats = {}
        if hessian is not None:
            factors = _refit_full_output(subvectors, factors, metric, hessian)
            plain = _encode_low_rank(points, np.eye(params.d), _principal(points.astype(np.float64), weights)[1][:, :rank],
                                     k, params, cluster_seed, padding, weights)
            if _output_error(subvectors, plain, hessian) < _output_error(subvectors, factors, hessian):
                factors = plain
                stats["data_aware"] = "weight-space encoding kept (lower output error)"
        codes, codebook, projection, iterations = factors
        stats["refine_iterations"] = iterations
        return Encoded(
            self.name,
            codes.reshape(layout.rows, layout.n_sub),
            codebook.astype(np.float32),
            stats,
            {"projection": projection.astype(np.float32)},
        )

    def trainable(self, encoded, layout, params):
        from onnxvq.methods.lr2vq_trainable import LR2VQWeight

        return LR2VQWeight(encoded, layout)

    def stored_nbytes(self, layout, params, codebook_itemsize):
        # at most a k x d codebook and a d x d projection (rank <= d)
        k = min(params.k, layout.rows * layout.n_sub)
        codes = packed_nbytes(layout.rows, layout.n_sub, code_bits_for_k(k))
        return codes + (k + layout.d) * layout.d * codebook_itemsize


def slot_metric(hessian: np.ndarray | None, n_sub: int, d: int) -> np.ndarray:
    """``G`` (d x d, SPD): the mean diagonal block of the padded ``H`` (or its diagonal), damped;
    the identity without data."""
    if hessian is None:
        return np.eye(d)
    h = np.asarray(hessian, np.float64)
    # the damping of weighted_kmeans' per-slot blocks, applied to their mean
    return _diagonal_blocks(h, n_sub, d).mean(axis=0) + _ridge(h, _DAMP) * np.eye(d)


def choose_rank(
    whitened: np.ndarray,
    spectrum: np.ndarray,
    directions: np.ndarray,
    k: int,
    *,
    seed: np.random.SeedSequence,
    sample: int = 16384,
    max_iter: int = 15,
    weights: np.ndarray | None = None,
) -> tuple[int, dict[int, float]]:
    """The clustering dimension with the smallest estimated error, and every estimate made.

    The full rank is estimated first; lower ranks whose exact low-rank error alone already
    reaches that estimate are not clustered at all (on trained layers, where the full rank
    usually wins, that skips most of the search).

    ``whitened``: the subvectors in the error metric (N x m); ``spectrum``/``directions``: the
    eigenvalues (descending) and eigenvectors of ``whitened' W whitened``. An estimate is
    ``(low-rank error + clustering error) / total energy``, see the module docstring. ``weights``
    (one per subvector, or None): every error is weighted.
    """
    n, m = whitened.shape
    rng = np.random.default_rng(seed)
    train, train_weights = _sample(whitened, weights, max(sample, 32 * k), rng)
    held, held_weights = _sample(whitened, weights, 65536, rng)
    total_weight = float(n if weights is None else weights.sum())
    k_train = min(k, len(train))
    total = max(float(spectrum.sum()), 1e-30)
    estimates: dict[int, float] = {}

    def estimate(r: int) -> float:
        if r not in estimates:
            basis = directions[:, :r].astype(np.float32)
            result = kmeans(train @ basis, k_train, seed=seed, max_iter=max_iter, weights=train_weights)
            _, dist = assign(held @ basis, result.codebook)
            clustering = float(np.average(dist.astype(np.float64), weights=held_weights)) * total_weight
            estimates[r] = (float(spectrum[r:].sum()) + clustering) / total
        return estimates[r]

    def may_win(r: int) -> bool:
        # An estimate is at least its exact low-rank part: a rank whose low-rank error alone
        # reaches the full rank's estimate cannot win, and costs no k-means.
        return r == m or float(spectrum[r:].sum()) / total <= estimate(m) * 1.001 + 1e-12

    grid = list(range(1, m + 1)) if m <= 8 else sorted({*(2**i for i in range(int(math.log2(m)) + 1)), 3, 6, 12, m} & set(range(1, m + 1)))
    best = min((r for r in grid if may_win(r)), key=estimate)
    for r in (best - 1, best + 1):  # refine between grid points
        if 1 <= r <= m and may_win(r):
            estimate(r)
    # The smallest estimate wins; only estimates within 0.1% count as a tie, broken towards the
    # smaller rank. (A 1% tie band looked harmless on weight error, but at 0.5 bit per weight on
    # the digits MLP it cost 19 points of accuracy without data: at that ratio 1% of weight error
    # is not noise.)
    lowest = min(estimates.values())
    return min(r for r, e in estimates.items() if e <= lowest * 1.001 + 1e-12), estimates


def _sample(points: np.ndarray, weights: np.ndarray | None, size: int, rng: np.random.Generator):
    """(sample, its weights): all points with their weights when there are at most ``size``;
    else ``size`` of them drawn uniformly without replacement, or with probability ``w_i`` with
    replacement (then unweighted: the draw already stands for the weighted points)."""
    n = len(points)
    if n <= size:
        return points, weights
    if weights is None:
        return points[np.sort(rng.choice(n, size, replace=False))], None
    return points[np.sort(rng.choice(n, size, replace=True, p=weights / weights.sum()))], None


def _principal(whitened: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors of ``(X L)' W (X L)`` for the whitened (float64)
    subvectors ``X L`` (``W`` = diag(weights), the identity without)."""
    weighted = whitened if weights is None else whitened * weights[:, None]
    values, vectors = np.linalg.eigh(whitened.T @ weighted)
    order = np.argsort(values)[::-1]
    return np.maximum(values[order], 0.0), vectors[:, order]


def _encode_low_rank(points, metric, basis, k, params, seed, padding, weights=None):
    """Steps 1-3 of the module docstring for a fixed rank: (codes, C, P, refine rounds)."""
    whitening = np.linalg.cholesky(metric)
    whitened = (points.astype(np.float64) @ whitening).astype(np.float32)
    result = kmeans(whitened @ basis.astype(np.float32), k, seed=seed, max_iter=params.max_iter, weights=weights)
    projection = basis.T @ np.linalg.inv(whitening)  # x^ L = c V_r'
    return _alternate(points, whitening, metric, result.codes, result.codebook.astype(np.float64),
                      projection, k, params.refine_iter, padding, weights)


def _alternate(points, whitening, metric, codes, codebook, projection, k, rounds, padding, weights=None):
    """Alternating least squares on ``F`` (step 3); returns the best state seen.

    ``padding`` = (indices of the subvectors whose tail is padding, meaningful length) or None.
    Padding must not count: ``F`` masks it, padded subvectors are assigned by their meaningful
    entries alone, and before each round the padded entries are set to their current decoded
    values (EM-style imputation: the imputed objective bounds the masked one from above and
    touches it at the current state, so each least-squares step still lowers the masked ``F``).
    """
    x = points.astype(np.float64)

    def objective(c, p, a):
        diff = x - (c @ p)[a]
        if padding is not None:
            diff[padding[0], padding[1] :] = 0.0
        diff = diff @ whitening
        squared = np.einsum("nd,nd->n", diff, diff)
        return float(squared.sum() if weights is None else squared @ weights)

    best = (objective(codebook, projection, codes), codes, codebook, projection)
    iterations = 0
    for iterations in range(1, rounds + 1):
        if padding is not None:
            idx, tail = padding
            x[idx, tail:] = (codebook @ projection)[codes[idx], tail:]
        whitened = (x @ whitening).astype(np.float32)
        counts = np.bincount(codes, weights=weights, minlength=k).astype(np.float64)
        sums = np.zeros((k, x.shape[1]))
        for j in range(x.shape[1]):  # bincount per column: far faster than np.add.at
            sums[:, j] = np.bincount(codes, weights=x[:, j] if weights is None else x[:, j] * weights, minlength=k)
        # P for fixed codes and C: (C' N C) P = C' S, N = diag(counts), S = per-codeword sums.
        gram = codebook.T @ (counts[:, None] * codebook)
        ridge = 1e-12 * max(np.trace(gram), 1e-30) * np.eye(len(gram))
        projection = np.linalg.solve(gram + ridge, codebook.T @ sums)
        # C for fixed P: c_j = xbar_j G P' (P G P')^-1 (empty codewords keep their value).
        pg = projection @ metric
        inner = pg @ projection.T
        filled = counts > 0
        means = sums[filled] / counts[filled, None]
        codebook = codebook.copy()
        codebook[filled] = np.linalg.solve(inner + 1e-12 * np.trace(inner) * np.eye(len(inner)), pg @ means.T).T
        # Codes for fixed C and P: nearest decoded codeword in the whitened metric (over the
        # meaningful entries only for padded subvectors: G's leading block, its own factor).
        decoded = codebook @ projection
        codes, _ = assign(whitened, decoded @ whitening)
        if padding is not None:
            idx, tail = padding
            lead = np.linalg.cholesky(metric[:tail, :tail])
            codes[idx], _ = assign(points[idx, :tail] @ lead, decoded[:, :tail] @ lead)
        value = objective(codebook, projection, codes)
        previous = best[0]
        if value < previous:
            best = (value, codes, codebook, projection)
        if value >= previous * (1 - 1e-4):
            break
    _, codes, codebook, projection = best
    return codes, codebook, projection, iterations


def _refit_full_output(subvectors, factors, metric, hessian):
    """Step 4: refit ``C P`` under the full ``H`` for fixed codes, back to ``C`` for fixed ``P``;
    kept only if the full output error falls."""
    codes, codebook, projection, iterations = factors
    rows, n_sub, d = subvectors.shape
    decoded = (codebook @ projection).astype(np.float32)
    refit = refit_codebook(subvectors, codes.reshape(rows, n_sub), decoded, hessian).astype(np.float64)
    pg = projection @ metric
    candidate = np.linalg.solve(pg @ projection.T, pg @ refit.T).T
    new = (codes, candidate, projection, iterations)
    return new if _output_error(subvectors, new, hessian) < _output_error(subvectors, factors, hessian) else factors


def _output_error(subvectors, encoded, hessian) -> float:
    """The full output error of (codes, C, P, ...) factors or of an :class:`Encoded` value."""
    if isinstance(encoded, Encoded):
        codes, codebook = encoded.codes, encoded.codebook
        projection = encoded.extras.get("projection", np.eye(codebook.shape[1]))
    else:
        codes, codebook, projection, _ = encoded
    rows, n_sub, _ = subvectors.shape
    return output_error(subvectors, codes.reshape(rows, n_sub), codebook @ projection, hessian)
