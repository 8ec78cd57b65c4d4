"""SSVQ: sign-splitting vector quantization (Li, Deng et al., ICCV 2025, arXiv 2503.08668).

Each weight keeps its own sign bit and only the magnitudes are vector-quantized:

    M ~= C[codes] * S        C: k x d codebook of magnitudes (>= 0), S: rows x cols of +-1

``M`` is the layout matrix of :mod:`onnxvq.layout` (rows x cols); ``C[codes]`` is gathered like
PQ's (each row's subvectors concatenated, the padding dropped) and ``S = -1`` where ``M < 0``,
``+1`` elsewhere. k-means runs on the subvectors of ``|M|``, so a codeword no longer has to
serve weights of opposite signs: the codebook spends its k entries on magnitudes alone, at the
price of one more bit per weight. The signs are stored packed 8 per byte
(:mod:`onnxvq.ops.signs`) as ``Encoded.extras["signs"]``.

In fine-tuning (:mod:`onnxvq.methods.ssvq_trainable`) the signs become the signs of latent
weights trained through a straight-through estimator, so each weight can move against the
direction its codeword moves in; signs that keep oscillating are frozen progressively.

Data-aware encoding: the output error of the *signed* decode is

    E = sum_r (s_r * (c^_r - |m_r|))' H (s_r * (c^_r - |m_r|)),    H = E[x x']

so the magnitudes see ``D_s H D_s`` (``D_s = diag(s_r)``), a different metric per row, while the
shared-codebook tools of :mod:`onnxvq.weighted_kmeans` take one ``H`` for all rows. Only the
diagonal of ``H`` is sign-invariant, so the weighted Lloyd iterations and the least-squares
codebook refit run under ``diag(H)`` (exact when only the diagonal was captured). Three
candidates (the weight-space k-means result, the same codes with a ``diag(H)``-refit codebook,
and the ``diag(H)``-weighted result) are then scored under the *full* signed ``E``
(:func:`signed_output_error`) and the best is kept, so data-aware encoding never does worse than
weight-only encoding on the calibration data.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from onnxvq.layout import WeightLayout
from onnxvq.methods.base import Encoded, Method, MethodParams, point_weights
from onnxvq.methods.pq import subvector_kmeans
from onnxvq.ops.signs import pack_signs, packed_sign_bytes
from onnxvq.weighted_kmeans import output_error, refit_codebook, weighted_kmeans

__all__ = ["SIGN_MODES", "SSVQ", "SSVQParams", "signed_output_error"]

SIGN_MODES = ("fixed", "learn", "freeze")


@dataclasses.dataclass(frozen=True)
class SSVQParams(MethodParams):
    """Parameters of ``ssvq``.

    Attributes:
        k: codewords of the magnitude codebook (default 256).
        d: subvector length (default 8: about 1 + 1 = 2 bits per weight at k=256, one of them the
            sign).
        max_iter: Lloyd iterations at most (k-means, and the weighted iterations when
            data-aware).
        signs: what fine-tuning does with the signs (the paper's ablation switch):
            ``"fixed"`` keeps the encoded signs and trains the codebook only (plain VQ on
            magnitudes); ``"learn"`` trains latent signs with a straight-through estimator;
            ``"freeze"`` (default) also freezes signs that oscillate, progressively. The options
            below only matter with ``"freeze"``.
        freeze_every: F, steps between two freezing rounds. 0 (default) picks
            ``max(1, round(steps / 50))``: about 50 rounds whatever the length of the training, so
            a run of 300 steps checks every 6 steps and one of 5000 every 100.
        freeze_threshold: flip rate above which a sign is frozen at the start of training. The
            threshold follows a cosine from it down to ``freeze_threshold_end`` over the
            training, freezing only violent oscillations early and any sign still undecided late.
        freeze_threshold_end: the threshold at the end of training.
        flip_decay: the flip rate is the exponential moving average, with this decay per step,
            of "the sign flipped at this step" (0 or 1): a sign that flips every ``p`` steps
            settles near ``1 / p``, one flip alone lifts it by ``1 - flip_decay`` and then fades
            with a window of about ``1 / (1 - flip_decay)`` steps. The same average of the sign
            values gives the majority a sign is frozen to.

    Why these defaults: an oscillation is a step-scale event (a latent weight bouncing around
    zero from one step to the next, measured with Adam at a median of 5 steps between flips), so
    the flip-rate window is fixed in steps, not in fractions of the training: ``flip_decay=0.95``
    averages over about 20 steps, short enough for runs of a few hundred steps. One flip lifts
    the rate by 0.05: ``freeze_threshold=0.2`` first freezes only signs with about four flips in
    the window, and ``freeze_threshold_end=0.025`` (half a flip) freezes, by the end, every sign
    that flipped within its last ~14 steps, to its majority. Only the freezing interval scales
    with the number of steps (``freeze_every=0``). On layer-wise runs of 300 to 2000 steps these
    settings gave 25-33% less output error than ``"fixed"``, with windows of 5 or 50 steps
    doing worse, while ``"learn"`` (no freezing) did worse than ``"fixed"``. For very long runs
    (tens of thousands of steps) ``flip_decay`` may be raised (0.99: a window of 100 steps) with
    the thresholds divided by about the same factor.

    Example::

        >>> SSVQParams(k=256, d=8, signs="learn")
        SSVQParams(k=256, d=8, max_iter=50, signs='learn', freeze_every=0, freeze_threshold=0.2, freeze_threshold_end=0.025, flip_decay=0.95)
        >>> SSVQParams().freeze_interval(500), round(SSVQParams().threshold_at(250, 500), 4)
        (10, 0.1125)
    """

    max_iter: int = 50
    signs: str = "freeze"
    freeze_every: int = 0
    freeze_threshold: float = 0.2
    freeze_threshold_end: float = 0.025
    flip_decay: float = 0.95

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_int(self.max_iter) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer (got {self.max_iter!r})")
        if self.signs not in SIGN_MODES:
            raise ValueError(f"signs must be one of {', '.join(SIGN_MODES)} (got {self.signs!r})")
        if not _is_int(self.freeze_every) or self.freeze_every < 0:
            raise ValueError(
                f"freeze_every must be a non-negative integer, 0 for automatic (got {self.freeze_every!r})"
            )
        for name in ("freeze_threshold", "freeze_threshold_end", "flip_decay"):
            value = getattr(self, name)
            if not _is_real(value):
                raise ValueError(f"{name} must be a number (got {value!r})")
        if not 0.0 <= self.freeze_threshold_end <= self.freeze_threshold <= 1.0:
            raise ValueError(
                "freeze thresholds are flip rates: need 0 <= freeze_threshold_end <= freeze_threshold <= 1 "
                f"(got {self.freeze_threshold_end!r} and {self.freeze_threshold!r})"
            )
        if not 0.0 <= self.flip_decay < 1.0:
            raise ValueError(f"flip_decay must lie in [0, 1) (got {self.flip_decay!r})")

    def freeze_interval(self, steps: int) -> int:
        """F: steps between freezing rounds in a training of ``steps`` steps."""
        return self.freeze_every or max(1, round(steps / 50))

    def threshold_at(self, step: int, steps: int) -> float:
        """``t(step) = t_end + (t_start - t_end) (1 + cos(pi step / steps)) / 2``."""
        start, end = self.freeze_threshold, self.freeze_threshold_end
        return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * step / max(steps, 1)))


class SSVQ(Method):
    """Sign-split VQ: a k x d codebook of magnitudes, the codes, and one packed sign per weight."""

    name = "ssvq"
    Params = SSVQParams

    def encode(self, weight, *, transposed, row_axes, params, seed, inputs=None) -> Encoded:
        layout = WeightLayout(tuple(weight.shape), transposed, row_axes, params.d)
        magnitudes = layout.to_subvectors(np.abs(weight))  # (rows, n_sub, d)
        negative = layout.to_matrix(weight) < 0  # (rows, cols)
        codes, codebook, iterations = _magnitude_kmeans(magnitudes, layout, params, seed, point_weights(inputs, layout))
        stats = {"kmeans_iterations": iterations}
        if inputs is not None and inputs.hessian is not None:
            codes, codebook, stats["weighted_iterations"] = _data_aware(
                magnitudes, weight, layout, inputs.hessian, codes, codebook, params.max_iter
            )
        codebook = np.maximum(codebook, 0.0).astype(np.float32)
        return Encoded(
            method=self.name,
            codes=codes,
            codebook=codebook,
            stats=stats,
            extras={"signs": pack_signs(negative)},
        )

    def trainable(self, encoded, layout, params):
        from onnxvq.methods.ssvq_trainable import SSVQWeight

        if not isinstance(params, SSVQParams):  # plain MethodParams: default training options
            params = SSVQParams(k=params.k, d=params.d)
        return SSVQWeight(encoded, layout, params)

    def stored_nbytes(self, layout: WeightLayout, params: MethodParams, codebook_itemsize: int) -> int:
        return super().stored_nbytes(layout, params, codebook_itemsize) + packed_sign_bytes(layout.rows, layout.cols)


def signed_output_error(
    magnitudes: np.ndarray, signs: np.ndarray, codes: np.ndarray, codebook: np.ndarray, hessian: np.ndarray
) -> float:
    """``E = sum_r (s_r * (c^_r - |m_r|))' H (s_r * (c^_r - |m_r|))``: the output error of the
    signed decode ``s_r * c^_r`` against the weight row ``m_r = s_r * |m_r|``.

    Args:
        magnitudes: ``|M|`` as subvectors (rows, n_sub, d).
        signs: ``S`` as subvectors (rows, n_sub, d) of +-1 (0 at the padding).
        codes: (rows, n_sub) codeword indices.
        codebook: (k, d) magnitudes.
        hessian: ``H`` (n_sub*d, n_sub*d) padded, or its diagonal (n_sub*d,).

    :func:`~onnxvq.weighted_kmeans.output_error` with the signs as factors of both sides (chunked
    over rows, so memory stays bounded whatever the layer size).
    """
    return output_error(magnitudes, codes, codebook, hessian, signs=signs)


def _magnitude_kmeans(magnitudes, layout, params, seed, weights):
    """Weight-space k-means of the magnitude subvectors, exactly as PQ clusters its subvectors."""
    result = subvector_kmeans(magnitudes, layout, params.k, seed=seed, max_iter=params.max_iter, weights=weights)
    return result.codes.reshape(layout.rows, layout.n_sub), result.codebook, result.iterations


def _data_aware(magnitudes, weight, layout, hessian, codes, codebook, max_iter):
    """The best of three (codes, codebook) candidates under the full signed output error; the
    weighted ones are fitted under ``diag(H)``, the only part of ``H`` every row shares."""
    h = layout.pad_moment(np.asarray(hessian, np.float64))
    diagonal = h if h.ndim == 1 else np.diagonal(h).copy()
    signs = layout.to_subvectors(np.where(weight < 0, -1.0, 1.0).astype(np.float32))
    weighted = weighted_kmeans(magnitudes, diagonal, codebook, max_iter=max_iter)
    weighted_codes = weighted.codes.reshape(layout.rows, layout.n_sub)
    candidates = [
        (codes, codebook),
        (codes, refit_codebook(magnitudes, codes, codebook, diagonal)),
        (weighted_codes, refit_codebook(magnitudes, weighted_codes, weighted.codebook, diagonal)),
    ]
    # Magnitudes are clipped to >= 0 before scoring, so the winner is scored as it is stored.
    candidates = [(c, np.maximum(b, 0.0).astype(np.float32)) for c, b in candidates]
    errors = [signed_output_error(magnitudes, signs, c, b, h) for c, b in candidates]
    best_codes, best_codebook = candidates[int(np.argmin(errors))]  # ties keep the weight-space one
    return best_codes, best_codebook, weighted.iterations


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    return number and math.isfinite(value)
