"""VQ4ALL: every layer's subvectors coded into one universal codebook (Deng, Li et al. 2024).

Each weight becomes ``W_sub ~= s_r U[codes]``: ``U`` (k x d) is a universal codebook built once
from subvectors of many networks by kernel density estimation (:mod:`onnxvq.universal_codebook`,
``onnxvq codebook build``) and never changes; per layer only the codes and one scale per output
channel ``s_r`` are stored. Every node of a model reads the same codebook initializer, so a
model stores ``U`` once, and models that share it can share one copy on a device.

Encoding: rows are normalised by their RMS (per-channel scales, always on:
:mod:`onnxvq.channel_scales`, which also refits ``s_r`` by least squares afterwards), and each
normalised subvector takes its nearest codeword. With calibration data the codes minimise the
layer's output error ``sum_r (m^_r - m_r)' H (m^_r - m_r)`` instead, as for ``pq`` but with ``U``
fixed: the nearest codeword under each position's diagonal block of ``H``, and GPTVQ's Hessian
error feedback (:func:`onnxvq.gptvq.error_feedback_codes`), the one with the least output error
kept.

Fine-tuning learns soft assignments (:mod:`onnxvq.methods.vq4all_trainable`); ``U`` stays fixed.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from onnxvq.errors import OnnxVQError
from onnxvq.gptvq import error_feedback_codes
from onnxvq.kmeans import assign
from onnxvq.layout import WeightLayout
from onnxvq.methods.base import Encoded, Method, MethodParams
from onnxvq.ops.codes import code_bits_for_k, packed_nbytes
from onnxvq.weighted_kmeans import output_error, weighted_assign

__all__ = ["VQ4ALL", "VQ4ALLParams"]


@dataclasses.dataclass(frozen=True)
class VQ4ALLParams(MethodParams):
    """Parameters of ``vq4all``.

    Attributes:
        codebook: path of the universal codebook (``onnxvq codebook build``); its k and d are
            the method's (the config's ``k``/``d`` do not apply).
        top_n: fine-tuning chooses each subvector's codeword among its ``top_n`` nearest.
        feedback: with calibration data, also try GPTVQ's Hessian error feedback.

    Example::

        >>> VQ4ALLParams(codebook="universal.npz")  # doctest: +SKIP
    """

    codebook: str = ""
    top_n: int = 8
    feedback: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.codebook, str):
            raise ValueError(f"codebook must be a path (got {self.codebook!r})")
        if not isinstance(self.top_n, int) or isinstance(self.top_n, bool) or self.top_n < 1:
            raise ValueError(f"top_n must be a positive integer (got {self.top_n!r})")
        if not isinstance(self.feedback, bool):
            raise ValueError(f"feedback must be true or false (got {self.feedback!r})")

    def universal(self):
        """The codebook file, loaded and verified (:func:`onnxvq.universal_codebook.load_codebook`)."""
        if not self.codebook:
            raise OnnxVQError("--method vq4all needs a universal codebook: --codebook FILE "
                              "(build one with `onnxvq codebook build MODEL... -o FILE`)")
        return _load(self.codebook)


@functools.lru_cache(maxsize=4)
def _load(path: str):
    from onnxvq.universal_codebook import load_codebook

    return load_codebook(path)


class VQ4ALL(Method):
    name = "vq4all"
    Params = VQ4ALLParams
    forced_scales = "on"  # the codebook models RMS-normalised rows

    def fixed_k_d(self, values: dict) -> tuple[int, int] | None:
        """The codebook's k and d."""
        universal = VQ4ALLParams(codebook=values.get("codebook") or "").universal()
        return universal.k, universal.d

    def fixed_codebook(self, params: VQ4ALLParams) -> np.ndarray:
        """The universal codebook."""
        return params.universal().codebook

    def encode(self, weight, *, transposed, row_axes, params, seed, inputs=None) -> Encoded:
        universal = params.universal()
        if (params.k, params.d) != (universal.k, universal.d):
            raise OnnxVQError(f"the codebook {params.codebook} has k={universal.k}, d={universal.d}; "
                              f"vq4all cannot use k={params.k}, d={params.d} (leave -k/-d out)")
        codebook = universal.codebook.astype(np.float32)
        layout = WeightLayout(tuple(weight.shape), transposed, row_axes, params.d)
        subvectors = layout.to_subvectors(weight)  # (rows, n_sub, d), padding zero
        codes = _nearest(subvectors, codebook, layout)
        stats = {"universal_codebook": universal.sha256, "encoding": "nearest"}
        if inputs is not None and inputs.hessian is not None:
            hessian = layout.pad_moment(inputs.hessian)
            candidates = {"nearest": codes, "weighted": weighted_assign(subvectors, hessian, codebook)}
            if params.feedback and hessian.ndim == 2:
                candidates["feedback"] = error_feedback_codes(subvectors, hessian, codebook)
            errors = {name: output_error(subvectors, c, codebook, hessian) for name, c in candidates.items()}
            stats["encoding"] = min(errors, key=errors.get)
            codes = candidates[stats["encoding"]]
        return Encoded(method=self.name, codes=codes, codebook=codebook, stats=stats)

    def trainable(self, encoded, layout, params):
        from onnxvq.methods.vq4all_trainable import VQ4ALLWeight

        return VQ4ALLWeight(encoded, layout, top_n=params.top_n)

    def stored_nbytes(self, layout: WeightLayout, params: MethodParams, codebook_itemsize: int) -> int:
        """Codes only: the codebook is stored once per model, whatever the layers."""
        return packed_nbytes(layout.rows, layout.n_sub, code_bits_for_k(params.k))


def _nearest(subvectors: np.ndarray, codebook: np.ndarray, layout: WeightLayout) -> np.ndarray:
    """Each subvector's nearest codeword; a row's last subvector by its unpadded entries only."""
    rows, n_sub, d = subvectors.shape
    codes = np.empty((rows, n_sub), np.int64)
    full = n_sub if layout.tail == d else n_sub - 1
    if full:
        codes[:, :full] = assign(subvectors[:, :full].reshape(-1, d), codebook)[0].reshape(rows, full)
    if full < n_sub:
        tail = layout.tail
        codes[:, -1] = assign(np.ascontiguousarray(subvectors[:, -1, :tail]), np.ascontiguousarray(codebook[:, :tail]))[0]
    return codes
