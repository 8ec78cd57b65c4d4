"""Hessian error feedback for vector quantization (GPTVQ, van Baalen et al. 2024), numpy only.

Setting as in :mod:`onnxvq.weighted_kmeans`: a layer ``y = M x`` with ``M`` (rows x cols, padded to
``n_sub * d``), ``H = E[x x^T]``, and every row stored as ``n_sub`` codewords of one shared k x d
codebook ``C``. The output error of a row is ``(m - q)^T H (m - q)``.

GPTQ's column-by-column quantization, generalised to blocks of ``d`` columns: positions are
quantized left to right, and the error made at position ``j`` is pushed onto the columns not yet
quantized through the inverse Hessian, so that later positions absorb what earlier ones lost.
With ``U`` the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``) and ``S`` the d columns of
position ``j``, ``R`` the columns after it:

* **assign**: the part of the error that the remaining columns cannot undo is
  ``(w_S - c)^T (U_SS^T U_SS)^-1 (w_S - c) = ||(w_S - c) U_SS^-1||^2``, so each row's subvector goes
  to the nearest codeword after both are multiplied by ``U_SS^-1``;
* **feedback**: the best correction of the remaining columns for the error ``w_S - q_S`` is
  ``w_R -= (w_S - q_S) U_SS^-1 U_SR`` (the trailing block of ``U`` is the Cholesky factor of the
  remaining inverse Hessian, so the recursion continues with the same ``U``).

Updates are applied lazily in column blocks of about :data:`BLOCK_COLUMNS` (as GPTQ does): within
a block each position updates only the block, and the block's accumulated errors update all later
columns in one product. ``H`` is damped by ``damp * mean(diag H)`` on its diagonal; columns that
no input reaches and the padding get a negligible diagonal instead, so they neither attract
codewords nor pass error on.

The codebook is an input (from activation-weighted k-means); :func:`refine` alternates these
codes with a least-squares codebook under the full ``H`` (:func:`onnxvq.weighted_kmeans.refit_codebook`).
"""

from __future__ import annotations

import numpy as np

from onnxvq.kmeans import assign
from onnxvq.weighted_kmeans import output_error, refit_codebook

__all__ = ["BLOCK_COLUMNS", "error_feedback_codes", "refine"]

BLOCK_COLUMNS = 128
DAMP = 0.01
# Diagonal given to dead columns and padding, relative to the mean diagonal.
DEAD_DIAGONAL = 1e-8


def error_feedback_codes(
    subvectors: np.ndarray, hessian: np.ndarray, codebook: np.ndarray, *, damp: float = DAMP
) -> np.ndarray:
    """Codes (rows, n_sub) for ``subvectors`` (rows, n_sub, d) by GPTVQ's sequential
    quantization with error feedback; ``hessian`` is (n_sub*d, n_sub*d), padding rows zero."""
    rows, n_sub, d = subvectors.shape
    width = n_sub * d
    upper = _inverse_cholesky_upper(hessian, width, damp)
    work = subvectors.reshape(rows, width).astype(np.float64, copy=True)
    codebook64 = np.asarray(codebook, np.float64)
    codes = np.empty((rows, n_sub), np.int64)
    positions_per_block = max(1, BLOCK_COLUMNS // d)
    for first in range(0, n_sub, positions_per_block):
        last = min(first + positions_per_block, n_sub)
        block = slice(first * d, last * d)
        errors = np.empty((rows, (last - first) * d))
        for j in range(first, last):
            s = slice(j * d, (j + 1) * d)
            inverse = np.linalg.inv(upper[s, s])
            points = work[:, s] @ inverse
            codes[:, j], _ = assign(points.astype(np.float32), (codebook64 @ inverse).astype(np.float32))
            error = (work[:, s] - codebook64[codes[:, j]]) @ inverse
            errors[:, (j - first) * d : (j - first + 1) * d] = error
            inside = slice((j + 1) * d, last * d)
            work[:, inside] -= error @ upper[s, inside]
        if last * d < width:
            work[:, last * d :] -= errors @ upper[block, last * d :]
    return codes


def refine(
    subvectors: np.ndarray, hessian: np.ndarray, codebook: np.ndarray, *, passes: int = 2
) -> tuple[np.ndarray, np.ndarray, float]:
    """Error-feedback codes and a least-squares codebook, alternated ``passes`` times from
    ``codebook``; returns the best (codes, codebook, output error) seen."""
    best = None
    for _ in range(passes):
        codes = error_feedback_codes(subvectors, hessian, codebook)
        codebook = refit_codebook(subvectors, codes, codebook, hessian)
        error = output_error(subvectors, codes, codebook, hessian)
        if best is None or error < best[2]:
            best = (codes, codebook, error)
    return best


def _inverse_cholesky_upper(hessian: np.ndarray, width: int, damp: float) -> np.ndarray:
    """Upper ``U`` with ``U^T U = (H + damping)^-1``."""
    h = np.zeros((width, width))
    n = min(width, hessian.shape[0])
    h[:n, :n] = hessian[:n, :n]
    diagonal = np.diag(h).copy()
    mean = float(diagonal[diagonal > 0].mean()) if (diagonal > 0).any() else 1.0
    dead = diagonal <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[np.diag_indices(width)] += damp * mean
    h[dead, dead] = DEAD_DIAGONAL * mean
    lower = np.linalg.cholesky(h)
    inverse_lower = np.linalg.solve(lower, np.eye(width))  # L^-1
    inverse = inverse_lower.T @ inverse_lower  # H^-1 = L^-T L^-1
    return np.linalg.cholesky(inverse).T
