"""Data-aware ("activation-weighted") product quantization numerics, numpy only.

Setting (Stock et al. 2020, "And the bit goes down"): a layer computes ``y = M x``; ``M`` is the
weight matrix (rows x cols, cols padded to ``n_sub * d`` with zero columns as in
``onnxvq.layout``) and is stored as rows of ``n_sub`` subvectors of length ``d``:
``S`` (rows, n_sub, d). Given calibration inputs, ``H = E[x x^T]`` is the (n_sub*d) x (n_sub*d)
second-moment matrix (symmetric PSD, zero rows/cols at padding positions). A quantized ``M^``,
whose row ``r`` is the concatenation over positions ``j`` of ``C[codes[r, j]]`` (one k x d
codebook ``C`` shared by all positions), has the output error::

    E(M^) = sum_r (m^_r - t_r)^T H (m^_r - t_r)          (t_r: target row, normally the weight row)

``H`` may be given as a 1-D array (its diagonal only, for layers too wide for a full matrix); then
every formula below uses ``diag(H)``. ``H`` may also be given for the unpadded ``cols`` only; it
is padded with zeros to ``n_sub * d``.

Four functions:

* :func:`output_error` evaluates ``E`` exactly, rows in chunks: ``D = M^ - T`` for a chunk of
  rows, one GEMM ``D @ H``, then ``sum(D * (D @ H))``. Memory is bounded by the chunk, never
  rows x cols x cols.

* :func:`weighted_kmeans` runs Lloyd on the *block-diagonal* approximation of ``E``: position ``j``
  only sees its diagonal block ``B_j = H_jj + lam I`` (``H_jj = H[jd:(j+1)d, jd:(j+1)d]``,
  ``lam = damp * mean(diag H)``, so that padding and dead inputs stay well posed). The objective
  is ``F(C, codes) = sum_{r,j} (s_rj - c_{codes[r,j]})^T B_j (s_rj - c_{codes[r,j]})``.

  - **assign**: ``codes[r, j] = argmin_c (s_rj - c)^T B_j (s_rj - c)``. With the Cholesky factor
    ``B_j = L_j L_j^T`` this is ``||s_rj L_j - c L_j||^2`` (row vectors): each position's points
    are whitened once, the codebook once per iteration and position, and the nearest codeword is
    found with the same augmented-GEMM trick as ``onnxvq.kmeans`` (``[z, 1] @ [-2 c'^T; ||c'||^2]``
    gives ``||z - c'||^2 - ||z||^2``). The step is written here (kmeans.py's helper works in one
    shared metric); nothing is copied from or changed in kmeans.py.
  - **update**: for each codeword, ``(sum_j n_cj B_j) c = sum_j B_j (sum_{r: codes[r,j]=c} s_rj)``,
    the exact minimiser of ``F`` for fixed codes. Counts ``n_cj`` and sums per (position,
    codeword) come from ``np.bincount``; the k small d x d systems are solved in one batched
    ``np.linalg.solve``. Empty codewords keep their value.
  - **stop**: when the relative decrease of ``F`` falls below ``tol``, or after ``max_iter``.
    ``F`` is evaluated as ``sum ||z - c'||^2`` from the difference (not the expanded form, which
    cancels when points sit on their codewords). ``F`` never increases (each step minimises it).

* :func:`weighted_assign` is the assignment step alone, for a codebook that does not move.
* :func:`refit_codebook` keeps the codes and solves for the codebook under the *full* ``H`` (cross
  terms between positions included): with ``A_r`` gathering row ``r``'s codewords,
  ``min_C E(C) + lam ||C - C0||^2``, i.e. the normal equations
  ``(sum_r A_r^T H A_r + lam I) vec(C) = sum_r A_r^T H t_r + lam vec(C0)``. The ridge is centred on
  the starting codebook ``C0`` (not on zero) so directions that ``H`` does not see (padding, dead
  inputs, unused codewords) stay where they were instead of collapsing to zero. They are solved
  by preconditioned conjugate gradients, matrix-free: the product with a direction ``P``
  gathers ``P[codes]`` into a (rows, n_sub*d) matrix, multiplies it by ``H`` (one GEMM, chunked
  over rows; elementwise for a 1-D ``H``) and scatter-adds the result's subvectors back by code
  (``np.bincount``). The preconditioner is the exact diagonal blocks of the system,
  ``sum_j n_cj H_jj + lam I`` per codeword (so a 1-D ``H``, whose system is diagonal, converges in
  one step). The objective of every iterate follows from CG's own vectors
  (``E(C0 + X) + lam ||X||^2 = E(C0) - <X, R0> - <X, R>`` with ``R0``, ``R`` the initial and
  current residuals), the best iterate is kept, and its ``E`` is checked against ``E(C0)`` by a
  direct evaluation: the input is returned if CG did not improve.

Precision: ``E``, the CG vectors and all small systems are float64. The big GEMMs with ``H`` run
in float64 while ``rows * width^2 <= 2^28`` multiply-adds (width = n_sub*d) and in float32 above
(about twice as fast; relative error ~1e-6 in ``E``, far below any quantization error).

Threads: the assignment's score blocks are thin GEMMs, spread over a pool of one Python thread
per usable core with BLAS pinned to one thread, as in ``onnxvq.kmeans``. The refit's products
with ``H`` are big square-ish GEMMs, left to multithreaded BLAS.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

from onnxvq.kmeans import KMeansResult, _usable_cores

__all__ = ["output_error", "refit_codebook", "weighted_assign", "weighted_kmeans"]

# Row chunks of the products with the full H: (chunk, width) blocks of about this many bytes.
_CHUNK_BYTES = 32 << 20
# Score blocks of the assignment, as in onnxvq.kmeans (1 MiB per thread stays in cache).
_ASSIGN_BYTES = 1 << 20
# GEMMs with H of at most this many multiply-adds (rows * width^2) run in float64; larger ones
# in float32.
_FLOAT64_MACS = 1 << 28


def output_error(
    subvectors: np.ndarray,
    codes: np.ndarray,
    codebook: np.ndarray,
    hessian: np.ndarray,
    *,
    signs: np.ndarray | None = None,
) -> float:
    """``E = sum_r (m^_r - t_r)^T H (m^_r - t_r)`` for the rows decoded from ``codes``/``codebook``.

    Args:
        subvectors: the target ``S`` (rows, n_sub, d), converted to float32.
        codes: (rows, n_sub) or (rows * n_sub,) codeword indices.
        codebook: (k, d) codewords.
        hessian: ``H`` (n_sub*d, n_sub*d), or its diagonal (n_sub*d,); float64.
        signs: optional (rows, n_sub, d) factors (``ssvq``'s +-1 signs, 0 at the padding) that
            multiply both the decoded rows and the targets: ``m^_r = s_r * c^_r``,
            ``t_r = s_r * S_r``.

    Rows are processed in chunks (``D @ H`` per chunk), so memory stays bounded.

    Example::

        >>> s = np.ones((2, 3, 2), np.float32)
        >>> output_error(s, np.zeros((2, 3), int), np.zeros((1, 2)), np.eye(6))
        12.0
    """
    s = _as_subvectors(subvectors)
    rows, n_sub, d = s.shape
    c = _as_codebook(codebook, d)
    codes = _as_codes(codes, rows, n_sub, len(c))
    factors = None if signs is None else np.asarray(signs, np.float32).reshape(rows, n_sub * d)
    return _Outputs(s, codes, _as_hessian(hessian, n_sub, d), factors).error(c)


def weighted_kmeans(
    subvectors: np.ndarray,
    hessian: np.ndarray,
    init_codebook: np.ndarray,
    *,
    max_iter: int = 20,
    tol: float = 1e-4,
    damp: float = 0.01,
) -> KMeansResult:
    """Lloyd iterations on the block-diagonal (damped) approximation of ``E``.

    Args:
        subvectors: ``S`` (rows, n_sub, d), converted to float32.
        hessian: ``H`` (n_sub*d, n_sub*d) or its diagonal (n_sub*d,).
        init_codebook: (k, d) starting codebook (for example plain k-means'); deterministic.
        max_iter: Lloyd iterations at most.
        tol: stop when the relative decrease of the objective falls below this.
        damp: ``lam = damp * mean(diag H)`` is added to every diagonal block.

    Returns:
        ``KMeansResult`` with the float32 codebook, codes flattened to (rows * n_sub,) like
        ``kmeans(S.reshape(-1, d), ...)``, ``inertia`` the final block-diagonal objective
        ``sum_{r,j} (s_rj - c)^T (H_jj + lam I) (s_rj - c)`` and the number of assignments made.

    Example::

        >>> s = np.random.default_rng(0).normal(size=(64, 4, 2)).astype(np.float32)
        >>> res = weighted_kmeans(s, np.eye(8), s[0])
        >>> res.codebook.shape, res.codes.shape
        ((4, 2), (256,))
    """
    s = _as_subvectors(subvectors)
    rows, n_sub, d = s.shape
    codebook = _as_codebook(init_codebook, d).copy()
    h = _as_hessian(hessian, n_sub, d)
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    lam = _ridge(h, damp)
    blocks = _diagonal_blocks(h, n_sub, d) + lam * np.eye(d)

    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(_usable_cores()) as pool:
        space = _Whitened(s, _factor(blocks), len(codebook))
        previous = math.inf
        iterations = 0
        for iterations in range(1, max_iter + 1):
            codes, objective = space.assign(codebook, pool)
            if previous < math.inf and previous - objective <= tol * previous:
                break
            previous = objective
            codebook = _update(s, codes, codebook, blocks, exact=lam > 0)
        else:
            codes, objective = space.assign(codebook, pool)
    flat_codes = np.ascontiguousarray(codes.T).reshape(-1)
    return KMeansResult(codebook, flat_codes, objective, iterations)


def weighted_assign(
    subvectors: np.ndarray, hessian: np.ndarray, codebook: np.ndarray, *, damp: float = 0.01
) -> np.ndarray:
    """Codes (rows, n_sub) of each subvector's nearest codeword under its position's damped
    diagonal block of ``H``: the assignment step of :func:`weighted_kmeans` for a fixed codebook
    (a universal one, :mod:`onnxvq.methods.vq4all`)."""
    s = _as_subvectors(subvectors)
    rows, n_sub, d = s.shape
    c = _as_codebook(codebook, d)
    h = _as_hessian(hessian, n_sub, d)
    blocks = _diagonal_blocks(h, n_sub, d) + _ridge(h, damp) * np.eye(d)
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(_usable_cores()) as pool:
        codes, _ = _Whitened(s, _factor(blocks), len(c)).assign(c, pool)
    return np.ascontiguousarray(codes.T)


def refit_codebook(
    subvectors: np.ndarray,
    codes: np.ndarray,
    codebook: np.ndarray,
    hessian: np.ndarray,
    *,
    iters: int = 50,
    damp: float = 0.01,
    rtol: float = 1e-6,
) -> np.ndarray:
    """Least-squares codebook for fixed ``codes`` under the full ``H``, by matrix-free PCG.

    Minimises ``E(C) + lam ||C - codebook||^2`` (``lam = damp * mean(diag H)``; ``damp=0`` gives the
    plain least-squares optimum) starting from ``codebook``.

    Args:
        subvectors: the targets ``t`` as ``S`` (rows, n_sub, d).
        codes: (rows, n_sub) or (rows * n_sub,) fixed codeword indices.
        codebook: (k, d) starting codebook.
        hessian: ``H`` (n_sub*d, n_sub*d) or its diagonal (n_sub*d,).
        iters: conjugate-gradient steps at most (each one product with ``H``).
        damp: ridge weight relative to ``mean(diag H)``.
        rtol: stop when the residual norm falls below ``rtol`` times the initial one (CG also
            stops once a step lowers the objective by less than machine epsilon times ``E``).

    Returns:
        The (k, d) float32 codebook of the best iterate; never worse in ``E`` than ``codebook``
        (which is returned, copied, when CG does not improve on it). Unused codewords are returned
        unchanged.

    Example::

        >>> s = np.random.default_rng(0).normal(size=(16, 3, 2)).astype(np.float32)
        >>> codes = np.arange(48).reshape(16, 3) % 4
        >>> refit_codebook(s, codes, np.zeros((4, 2)), np.eye(6)).shape
        (4, 2)
    """
    s = _as_subvectors(subvectors)
    rows, n_sub, d = s.shape
    start = _as_codebook(codebook, d)
    k = len(start)
    codes = _as_codes(codes, rows, n_sub, k)
    h = _as_hessian(hessian, n_sub, d)
    lam = _ridge(h, damp)
    outputs = _Outputs(s, codes, h)

    residual0, error0 = outputs.residual(start)  # R0 = b - Q C0 = -grad E(C0) / 2
    norm0 = math.sqrt(_dot(residual0, residual0))
    if iters < 1 or norm0 == 0.0 or not error0 > 0.0 or not math.isfinite(norm0 + error0):
        return start.copy()
    eps = float(np.finfo(outputs.dtype).eps)
    # Block-Jacobi preconditioner: the exact d x d diagonal blocks of Q + lam I.
    idx = codes + (np.arange(n_sub) * k)[None, :]
    counts = np.bincount(idx.ravel(), minlength=n_sub * k).reshape(n_sub, k).astype(np.float64)
    blocks = _diagonal_blocks(h, n_sub, d)
    diagonal = (counts.T @ blocks.reshape(n_sub, d * d)).reshape(k, d, d)
    precond = _pinv_psd(diagonal + lam * np.eye(d))

    step = np.zeros((k, d))  # X: the iterate is C0 + X
    r = residual0.copy()
    z = np.einsum("kij,kj->ki", precond, r)
    p = z.copy()
    rz = _dot(r, z)
    best, best_objective = None, error0
    for _ in range(iters):
        q = outputs.product(p) + lam * p
        pq = _dot(p, q)
        if not pq > 0.0 or not math.isfinite(pq):
            break
        alpha = rz / pq
        step += alpha * p
        r -= alpha * q
        # The objective CG minimises, E(C0 + X) + lam ||X||^2, from its own vectors.
        objective = error0 - _dot(step, residual0) - _dot(step, r)
        if objective < best_objective:
            best, best_objective = step.copy(), objective
        # Stop at rtol, or once a step gains less than E's own precision: a float32 operator
        # stalls there, and going on drives the directions into (very slow) subnormal numbers.
        if math.sqrt(_dot(r, r)) <= rtol * norm0 or alpha * rz <= eps * error0:
            break
        z = np.einsum("kij,kj->ki", precond, r)
        rz_next = _dot(r, z)
        if not rz_next > 0.0:
            break
        p = z + (rz_next / rz) * p
        rz = rz_next
    if best is None:
        return start.copy()
    refit = (start + best).astype(np.float32)
    unused = counts.sum(axis=0) == 0
    refit[unused] = start[unused]
    if not np.isfinite(refit).all() or not outputs.error(refit) <= error0:
        return start.copy()
    return refit


# --- internals ------------------------------------------------------------------------------


def _as_subvectors(subvectors: np.ndarray) -> np.ndarray:
    s = np.asarray(subvectors)
    if s.ndim != 3:
        raise ValueError(f"subvectors must be (rows, n_sub, d), got shape {s.shape}")
    return np.ascontiguousarray(s, dtype=np.float32)


def _as_codebook(codebook: np.ndarray, d: int) -> np.ndarray:
    c = np.asarray(codebook, dtype=np.float32)
    if c.ndim != 2 or c.shape[1] != d or len(c) < 1:
        raise ValueError(f"codebook must be (k >= 1, d={d}), got shape {c.shape}")
    return c


def _as_codes(codes: np.ndarray, rows: int, n_sub: int, k: int) -> np.ndarray:
    c = np.asarray(codes)
    if c.size != rows * n_sub or not np.issubdtype(c.dtype, np.integer):
        raise ValueError(
            f"codes must be {rows * n_sub} integers (rows x n_sub), got {c.shape} {c.dtype}"
        )
    c = c.reshape(rows, n_sub).astype(np.int64, copy=False)
    if c.size and (c.min() < 0 or c.max() >= k):
        raise ValueError(f"codes must lie in [0, {k})")
    return c


def _as_hessian(hessian: np.ndarray, n_sub: int, d: int) -> np.ndarray:
    """``H`` as float64, padded with zeros to ``n_sub * d`` when given for ``cols`` only."""
    h = np.asarray(hessian, dtype=np.float64)
    width = n_sub * d
    if not (h.ndim == 1 or (h.ndim == 2 and h.shape[0] == h.shape[1])):
        raise ValueError(f"hessian must be square or 1-D, got shape {h.shape}")
    size = h.shape[0]
    if not width - d < size <= width:
        raise ValueError(f"hessian size {size} does not fit {n_sub} subvectors of {d}")
    if size < width:
        padded = np.zeros((width,) * h.ndim)
        padded[(slice(0, size),) * h.ndim] = h
        h = padded
    diag = h if h.ndim == 1 else np.diagonal(h)
    if not np.isfinite(h).all() or (diag < 0).any():
        raise ValueError("hessian must be finite with a non-negative diagonal (PSD)")
    return h


def _ridge(h: np.ndarray, damp: float) -> float:
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    scale = float((h if h.ndim == 1 else np.diagonal(h)).mean())
    return damp * (scale if scale > 0 else 1.0)


def _diagonal_blocks(h: np.ndarray, n_sub: int, d: int) -> np.ndarray:
    """The (n_sub, d, d) diagonal blocks ``H_jj`` (symmetrised)."""
    if h.ndim == 1:
        blocks = np.zeros((n_sub, d, d))
        blocks[:, np.arange(d), np.arange(d)] = h.reshape(n_sub, d)
        return blocks
    j = np.arange(n_sub)
    blocks = h.reshape(n_sub, d, n_sub, d)[j, :, j, :]  # (n_sub, d, d)
    return 0.5 * (blocks + blocks.transpose(0, 2, 1))


def _factor(blocks: np.ndarray) -> np.ndarray:
    """``F_j`` with ``F_j F_j^T = B_j``: Cholesky, or ``V sqrt(w)`` for singular blocks (damp=0)."""
    try:
        return np.linalg.cholesky(blocks)
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh(blocks)
        return v * np.sqrt(np.maximum(w, 0.0))[:, None, :]


def _pinv_psd(a: np.ndarray) -> np.ndarray:
    """Batched pseudo-inverse of symmetric PSD matrices (eigenvalues near zero dropped)."""
    w, v = np.linalg.eigh(a)
    cutoff = np.maximum(w.max(axis=-1, keepdims=True), 0.0) * (a.shape[-1] * 1e-12)
    keep = w > cutoff
    inv = np.divide(1.0, w, out=np.zeros_like(w), where=keep)
    return (v * inv[:, None, :]) @ v.transpose(0, 2, 1)


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()))


class _Whitened:
    """Each position's points in its own whitened coordinates ``z = s F_j``, position-major
    (n_sub, rows, d + 1) float32 and augmented with a column of ones, so that one batched SGEMM
    with ``[-2 (C F_j)^T; ||C F_j||^2]`` yields ``||z - c F_j||^2 - ||z||^2`` for every codeword."""

    def __init__(self, s: np.ndarray, factors: np.ndarray, k: int) -> None:
        rows, n_sub, d = s.shape
        self.factors = factors
        self.shape = (rows, n_sub, d)
        self.augmented = np.empty((n_sub, rows, d + 1), np.float32)
        self.augmented[:, :, :d] = np.matmul(s.transpose(1, 0, 2), factors.astype(np.float32))
        self.augmented[:, :, d] = 1.0
        # Blocks of about _ASSIGN_BYTES of scores: row ranges of one position, or several
        # positions at once when a position has few rows.
        block_rows = max(256, _ASSIGN_BYTES // (4 * k))
        row_step = min(rows, block_rows)
        pos_step = max(1, block_rows // max(row_step, 1))
        self.tasks = [
            (j, min(j + pos_step, n_sub), r, min(r + row_step, rows))
            for j in range(0, n_sub, pos_step)
            for r in range(0, rows, row_step)
        ]

    def assign(self, codebook: np.ndarray, pool: ThreadPoolExecutor) -> tuple[np.ndarray, float]:
        """Codes (n_sub, rows) of the nearest codewords and the objective
        ``sum ||z - c F_j||^2``."""
        rows, n_sub, d = self.shape
        k = len(codebook)
        whitened = np.matmul(codebook.astype(np.float64), self.factors)  # (n_sub, k, d)
        weights = np.empty((n_sub, d + 1, k), np.float32)
        weights[:, :d, :] = -2.0 * whitened.transpose(0, 2, 1)
        weights[:, d, :] = np.einsum("jkd,jkd->jk", whitened, whitened)
        whitened = whitened.astype(np.float32)
        codes = np.empty((n_sub, rows), np.int64)

        def assign_block(task: tuple[int, int, int, int]) -> float:
            j0, j1, r0, r1 = task
            points = self.augmented[j0:j1, r0:r1]
            best = np.matmul(points, weights[j0:j1]).argmin(axis=-1)  # (positions, rows)
            codes[j0:j1, r0:r1] = best
            nearest = whitened[j0:j1][np.arange(j1 - j0)[:, None], best]
            diff = points[:, :, :d] - nearest
            return float(np.einsum("jrd,jrd->", diff, diff, dtype=np.float64))

        return codes, float(sum(pool.map(assign_block, self.tasks)))


def _update(
    s: np.ndarray, codes: np.ndarray, codebook: np.ndarray, blocks: np.ndarray, *, exact: bool
) -> np.ndarray:
    """Per codeword: ``(sum_j n_cj B_j) c = sum_j B_j (sum of its points at position j)``."""
    rows, n_sub, d = s.shape
    k = len(codebook)
    idx = (codes.T + (np.arange(n_sub) * k)[None, :]).ravel()  # row-major, matches s
    counts = np.bincount(idx, minlength=n_sub * k).reshape(n_sub, k).astype(np.float64)
    sums = np.empty((n_sub, k, d))
    for e in range(d):
        sums[:, :, e] = np.bincount(idx, weights=s[:, :, e].ravel(), minlength=n_sub * k).reshape(
            n_sub, k
        )
    lhs = (counts.T @ blocks.reshape(n_sub, d * d)).reshape(k, d, d)
    rhs = np.matmul(sums, blocks).sum(axis=0)  # blocks are symmetric: sum_j (B_j sums_cj)^T
    filled = counts.sum(axis=0) > 0
    new = codebook.astype(np.float64)
    if filled.any():
        solved = None
        if exact:  # damped blocks are positive definite
            try:
                solved = np.linalg.solve(lhs[filled], rhs[filled][:, :, None])[:, :, 0]
            except np.linalg.LinAlgError:
                solved = None
        if solved is None or not np.isfinite(solved).all():
            solved = np.einsum("kij,kj->ki", _pinv_psd(lhs[filled]), rhs[filled])
        new[filled] = solved
    return new.astype(np.float32)


class _Outputs:
    """Products with ``H`` of row-gathered codebooks, chunked over rows.

    For a (k, d) array ``P``, ``G_P`` is the (rows, width) matrix whose row ``r`` concatenates
    ``P[codes[r, j]]``; ``scatter(Y)`` sums the subvectors of ``Y`` (rows, width) by code into a
    (k, d) array. Then ``Q P = scatter(G_P H)`` and ``b = scatter(T H)``.
    """

    def __init__(self, s: np.ndarray, codes: np.ndarray, h: np.ndarray, factors: np.ndarray | None = None) -> None:
        rows, n_sub, d = s.shape
        self.factors = factors  # (rows, width) multiplying every difference, or None
        self.shape = s.shape
        self.width = n_sub * d
        self.targets = s.reshape(rows, self.width)
        self.codes = codes
        small = rows * self.width * self.width <= _FLOAT64_MACS
        self.dtype = np.float64 if h.ndim == 1 or small else np.float32
        self.h = h.astype(self.dtype, copy=False)
        itemsize = np.dtype(self.dtype).itemsize
        self.step = max(1, _CHUNK_BYTES // (self.width * itemsize))

    def _chunks(self):
        rows = self.shape[0]
        for start in range(0, rows, self.step):
            yield slice(start, min(start + self.step, rows))

    def _gather(self, table: np.ndarray, rows: slice) -> np.ndarray:
        table = table.astype(self.dtype, copy=False)
        return table[self.codes[rows]].reshape(-1, self.width)

    def _times_h(self, g: np.ndarray) -> np.ndarray:
        return g * self.h if self.h.ndim == 1 else g @ self.h

    def _scatter(self, y: np.ndarray, rows: slice, out: np.ndarray) -> None:
        d = self.shape[2]
        flat_codes = self.codes[rows].ravel()
        y = y.reshape(-1, d)
        for e in range(d):
            out[:, e] += np.bincount(flat_codes, weights=y[:, e], minlength=len(out))

    def _diff(self, codebook: np.ndarray, rows: slice) -> np.ndarray:
        diff = self._gather(codebook, rows)
        diff -= self.targets[rows]
        if self.factors is not None:
            diff *= self.factors[rows]
        return diff

    def error(self, codebook: np.ndarray) -> float:
        total = 0.0
        for rows in self._chunks():
            diff = self._diff(codebook, rows)
            total += float(np.einsum("ij,ij->i", diff, self._times_h(diff)).sum(dtype=np.float64))
        return total

    def residual(self, codebook: np.ndarray) -> tuple[np.ndarray, float]:
        """``(b - Q C, E(C)) = (-scatter((G_C - T) H), sum (G_C - T) * ((G_C - T) H))``."""
        out = np.zeros((len(codebook), self.shape[2]))
        total = 0.0
        for rows in self._chunks():
            diff = self._diff(codebook, rows)
            y = self._times_h(diff)
            total += float(np.einsum("ij,ij->i", diff, y).sum(dtype=np.float64))
            self._scatter(y, rows, out)
        return -out, total

    def product(self, direction: np.ndarray) -> np.ndarray:
        """``Q P = scatter(G_P H)``, float64 (k, d)."""
        out = np.zeros(direction.shape)
        for rows in self._chunks():
            self._scatter(self._times_h(self._gather(direction, rows)), rows, out)
        return out
