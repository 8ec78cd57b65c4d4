"""PQ: plain product quantization of a layer's subvectors.

Each weight becomes ``W_sub ~= C[codes]``: the rows of subvectors of ``onnxvq.layout`` are
clustered by k-means into a k x d codebook ``C``, each subvector storing the index of its nearest
codeword (Stock et al. 2020, "And the bit goes down"; Martinez et al. 2021, PQF, use the same
weight-space objective before fine-tuning). k is capped by the layer's number of subvectors.
Padding entries of the last subvector of a row (d not dividing it) are ignored by k-means.

With calibration inputs (data-aware encoding, "And the bit goes down"), the weight-space
k-means result is the start of a search that minimises the layer's *output* error
``sum_r (m^_r - m_r)' H (m^_r - m_r)``, ``H = E[x x']``: activation-weighted Lloyd iterations
(block-diagonal H) and then a least-squares codebook for the fixed codes under the full H
(:mod:`onnxvq.weighted_kmeans`). Each step never increases that error. With ``feedback`` (the
default) and a full H, GPTVQ's Hessian error feedback (:mod:`onnxvq.gptvq`) assigns the codes
again, position by position, pushing each position's error onto the columns not yet quantized,
alternated with the least-squares codebook. Of the weight-space, weighted and feedback encodings
the one with the least output error is kept (``stats["encoding"]`` says which).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxvq.gptvq import refine
from onnxvq.kmeans import KMeansResult, kmeans
from onnxvq.weighted_kmeans import output_error, refit_codebook, weighted_kmeans
from onnxvq.layout import WeightLayout
from onnxvq.methods.base import Encoded, Method, MethodParams, point_weights

__all__ = ["PQ", "PQParams", "subvector_kmeans"]


@dataclasses.dataclass(frozen=True)
class PQParams(MethodParams):
    """Parameters of ``pq``.

    Attributes:
        k: codewords (default 256, one byte per code).
        d: subvector length (default 8: about 1 bit per weight at k=256).
        max_iter: Lloyd iterations at most (k-means stops earlier once the relative inertia
            decrease falls below 1e-4).
        feedback: with calibration data, also try GPTVQ's Hessian error feedback.

    Example::

        >>> PQParams(k=256, d=4)
        PQParams(k=256, d=4, max_iter=50, feedback=True)
    """

    max_iter: int = 50
    feedback: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer (got {self.max_iter!r})")
        if not isinstance(self.feedback, bool):
            raise ValueError(f"feedback must be true or false (got {self.feedback!r})")


def subvector_kmeans(subvectors: np.ndarray, layout: WeightLayout, k: int, *, seed, max_iter: int,
                     weights: np.ndarray | None = None) -> KMeansResult:
    """k-means of a layer's (rows, n_sub, d) subvectors, k capped by their number, the padding of
    each row's last subvector ignored (partial points of ``onnxvq.kmeans``); ``weights``: one per
    subvector (:func:`onnxvq.methods.base.point_weights`) or None."""
    points = subvectors.reshape(-1, layout.d)
    partial = None
    if layout.tail < layout.d:
        partial = np.zeros((layout.rows, layout.n_sub), bool)
        partial[:, -1] = True
        partial = partial.reshape(-1)
    return kmeans(points, min(k, len(points)), seed=seed, max_iter=max_iter, partial=partial, tail=layout.tail,
                  weights=weights)


class PQ(Method):
    name = "pq"
    Params = PQParams

    def encode(self, weight, *, transposed, row_axes, params, seed, inputs=None) -> Encoded:
        layout = WeightLayout(tuple(weight.shape), transposed, row_axes, params.d)
        subvectors = layout.to_subvectors(weight)  # (rows, n_sub, d)
        weights = point_weights(inputs, layout)
        result = subvector_kmeans(subvectors, layout, params.k, seed=seed, max_iter=params.max_iter, weights=weights)
        codes, codebook = result.codes.reshape(layout.rows, layout.n_sub), result.codebook
        stats = {"kmeans_iterations": result.iterations}
        if weights is not None:
            stats["row_weighted"] = True
        if inputs is not None and inputs.hessian is not None:
            hessian = layout.pad_moment(inputs.hessian)
            weighted = weighted_kmeans(subvectors, hessian, codebook, max_iter=params.max_iter)
            weighted_codes = weighted.codes.reshape(layout.rows, layout.n_sub)
            candidates = {
                # The assignment sees only H's diagonal blocks: with strongly cross-correlated
                # inputs it can lose to the weight-space codes, so both compete.
                "weighted": (weighted_codes, refit_codebook(subvectors, weighted_codes, weighted.codebook, hessian)),
                "weight-space": (codes, refit_codebook(subvectors, codes, codebook, hessian)),
            }
            if params.feedback and hessian.ndim == 2:
                feedback_codes, feedback_codebook, _ = refine(subvectors, hessian, candidates["weighted"][1])
                candidates["feedback"] = (feedback_codes, feedback_codebook)
            errors = {name: output_error(subvectors, c, cb, hessian) for name, (c, cb) in candidates.items()}
            chosen = min(errors, key=errors.get)
            codes, codebook = candidates[chosen]
            stats["weighted_iterations"] = weighted.iterations
            stats["encoding"] = chosen
        return Encoded(method=self.name, codes=codes, codebook=codebook, stats=stats)

    def trainable(self, encoded, layout, params):
        from onnxvq.methods.pq_trainable import PQWeight

        return PQWeight(encoded, layout)
