"""Per-output-channel scales: one codebook shared by rows of very different magnitudes.

BN-folded convolutions have output channels whose weights differ in scale by orders of magnitude.
One codebook per layer then spends its codewords on the large rows and rounds the small ones to
noise. With scales, any method encodes the row-normalised matrix and the decode multiplies each
row back (``scales`` input of ``onnxvq.ops.vq_weight``).

Math: ``M`` is the weight matrix of :mod:`onnxvq.layout` (rows = output channels). With
``s_r = rms(m_r)`` (1 for an all-zero row) the method encodes ``N = diag(s)^-1 M`` as usual, data
aware or not, so the codebook minimises each row's error *relative to the row's own size*. Then
each scale is refit for the decoded row ``n^_r`` by least squares,

    s_r = <m_r, n^_r>_H / <n^_r, n^_r>_H      (H = E[x x'] with calibration data, else I),

which never increases a row's (output) error over ``s_r = rms(m_r)``, and the decode is
``M^ = diag(s) N^``.

``scales`` in the config: ``on``, ``off``, or ``auto`` (the default), decided per layer by the
spread of its row RMS (largest over smallest):

* under :data:`AUTO_MIN_SPREAD`, the rows already share one scale: no scales;
* from :data:`AUTO_SURE_SPREAD` up, scales without measuring (on PP-OCRv6's recognizer the
  measured comparison chose scales on all 61 layers, and at 4 bits per weight they took its
  output from 2.2 to 9.3 dB SQNR and from 54% to 94% argmax agreement on rendered text);
* in between, both encodings are made and measured by the mean relative error per output
  channel, ``mean_r |e_r|_H^2 / |m_r|_H^2`` (the quantity that decides whether small channels
  survive), and the lower one is kept.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from onnxvq.layout import WeightLayout, matrix_to_weight
from onnxvq.methods.base import Encoded, Method, MethodParams

if TYPE_CHECKING:
    from onnxvq.activations import LayerInputs
    from onnxvq.finetune.trainable import TrainableWeight

__all__ = ["AUTO_MIN_SPREAD", "AUTO_SURE_SPREAD", "SCALES_SETTINGS", "encode", "relative_channel_error", "trainable"]

SCALES_SETTINGS = ("auto", "on", "off")
# Rows within this ratio of RMS share one scale well enough: scales cannot pay for themselves.
AUTO_MIN_SPREAD = 1.5
# From this ratio on, scales are taken without measuring the unscaled encoding too.
AUTO_SURE_SPREAD = 4.0


def encode(
    method: Method,
    weight: np.ndarray,
    *,
    transposed: bool,
    row_axes: int,
    params: MethodParams,
    seed: np.random.SeedSequence,
    inputs: LayerInputs | None,
    scales: str,
    decode,
) -> Encoded:
    """``method.encode`` with per-channel scales ``on``, ``off`` or ``auto`` (module docstring).

    ``decode(encoded) -> dense weight`` is the stored form's decode (packed codes, codebook at
    its storage dtype), so that errors are measured on what the model will hold.
    """
    if scales not in SCALES_SETTINGS:
        raise ValueError(f"scales must be one of {SCALES_SETTINGS}, got {scales!r}")
    layout = WeightLayout(tuple(weight.shape), transposed, row_axes, params.d)
    kwargs = dict(transposed=transposed, row_axes=row_axes, params=params, seed=seed, inputs=inputs)
    matrix = layout.to_matrix(weight).astype(np.float32)
    rms = row_rms(matrix)
    if scales == "off" or (scales == "auto" and rms_spread(rms) < AUTO_MIN_SPREAD):
        return _with_choice(_encode_unit_scaled(method, weight, matrix, **kwargs), "off")

    normalized = _from_matrix(matrix / rms[:, None], layout)
    scaled = method.encode(normalized, **kwargs)
    hessian = inputs.hessian if inputs is not None else None
    unit = dataclasses.replace(scaled, extras={**scaled.extras, "scales": np.ones(layout.rows, np.float32)})
    decoded = layout.to_matrix(decode(unit)).astype(np.float32)
    refit = _refit_scales(matrix, decoded, hessian, fallback=rms)
    scaled = dataclasses.replace(scaled, extras={**scaled.extras, "scales": refit})
    if scales == "on" or rms_spread(rms) >= AUTO_SURE_SPREAD:
        return _with_choice(scaled, "on")

    plain = _encode_unit_scaled(method, weight, matrix, **kwargs)
    row_weights = inputs.row_weights if inputs is not None else None
    error_scaled = relative_channel_error(matrix, layout.to_matrix(decode(scaled)), hessian, row_weights)
    error_plain = relative_channel_error(matrix, layout.to_matrix(decode(plain)), hessian, row_weights)
    chosen, choice = (scaled, "on") if error_scaled < error_plain else (plain, "off")
    return _with_choice(
        chosen, choice, relative_error_scaled=round(error_scaled, 6), relative_error_plain=round(error_plain, 6)
    )


def _encode_unit_scaled(method: Method, weight: np.ndarray, matrix: np.ndarray, **kwargs) -> Encoded:
    """``method.encode`` of ``weight / 2^e`` with ``2^e`` nearest the weight's RMS, the codebook
    multiplied back: exact (a power of two), and weights around 1e30 or 1e-30 no longer
    overflow or underflow the squared distances of k-means in float32. Every method's decode is
    linear in its codebook, so scaling the codebook scales the weight."""
    rms = float(np.sqrt(np.mean(np.square(matrix, dtype=np.float64))))
    exponent = int(np.round(np.log2(rms))) if rms > 0 and np.isfinite(rms) else 0
    if exponent == 0:
        return method.encode(weight, **kwargs)
    encoded = method.encode(np.ldexp(weight, -exponent).astype(np.float32), **kwargs)
    return dataclasses.replace(encoded, codebook=np.ldexp(encoded.codebook.astype(np.float32), exponent))


def relative_channel_error(matrix: np.ndarray, approximation: np.ndarray, hessian: np.ndarray | None,
                           row_weights: np.ndarray | None = None) -> float:
    """``mean_r |m_r - m^_r|_H^2 / |m_r|_H^2`` over the rows that are not zero (H = I without
    data; a (cols,) H is its diagonal), weighted by ``row_weights`` when given (an embedding
    table's rows by how often they are read)."""
    m = matrix.astype(np.float64)
    e = m - approximation.astype(np.float64)
    signal, noise = _row_energy(m, hessian), _row_energy(e, hessian)
    live = signal > 0
    if not live.any():
        return 0.0
    weights = None if row_weights is None else np.asarray(row_weights, np.float64)[live]
    if weights is not None and not weights.sum() > 0:
        weights = None
    return float(np.average(noise[live] / signal[live], weights=weights))


def trainable(method: Method, encoded: Encoded, layout: WeightLayout, params: MethodParams) -> TrainableWeight:
    """The method's trainable module, wrapped so that per-channel scales (when the encoding has
    them) are applied to its matrix and learned along with its own tensors."""
    if "scales" not in encoded.extras:
        return method.trainable(encoded, layout, params)
    from onnxvq.finetune.scaled import ScaledWeight

    extras = {name: value for name, value in encoded.extras.items() if name != "scales"}
    inner = method.trainable(dataclasses.replace(encoded, extras=extras), layout, params)
    return ScaledWeight(inner, np.asarray(encoded.extras["scales"], np.float32))


def row_rms(matrix: np.ndarray) -> np.ndarray:
    """Each row's RMS as float32, zero rows as 1 (nothing to scale), never below float32's
    smallest normal value."""
    rms = np.sqrt(np.mean(np.square(matrix, dtype=np.float64), axis=1))
    # a row too small for float32 (1e-40) would divide by zero: it is scaled as the tiniest one
    return np.maximum(np.where(rms > 0, rms, 1.0), np.finfo(np.float32).tiny).astype(np.float32)


def rms_spread(rms: np.ndarray) -> float:
    """Largest over smallest row RMS: what ``auto`` decides by."""
    return float(rms.max()) / float(rms.min())  # in float64: a float32 quotient can overflow


def _row_energy(matrix: np.ndarray, hessian: np.ndarray | None) -> np.ndarray:
    """``m_r' H m_r`` per row, in blocks of rows (a full H times every row at once would hold
    another matrix of the layer's size)."""
    if hessian is None:
        return np.einsum("ij,ij->i", matrix, matrix)
    if hessian.ndim == 1:
        return (matrix * matrix) @ hessian.astype(np.float64)
    out = np.empty(len(matrix))
    for start in range(0, len(matrix), 1024):
        block = matrix[start : start + 1024]
        out[start : start + 1024] = np.einsum("ij,ij->i", block @ hessian, block)
    return out


def _refit_scales(matrix: np.ndarray, decoded: np.ndarray, hessian: np.ndarray | None, *, fallback: np.ndarray) -> np.ndarray:
    """Per-row least-squares scale of ``decoded`` towards ``matrix`` under H (module docstring)."""
    m, n = matrix.astype(np.float64), decoded.astype(np.float64)
    if hessian is None:
        cross, energy = np.einsum("ij,ij->i", m, n), np.einsum("ij,ij->i", n, n)
    elif hessian.ndim == 1:
        weighted = n * hessian
        cross, energy = np.einsum("ij,ij->i", m, weighted), np.einsum("ij,ij->i", n, weighted)
    else:
        cross, energy = np.empty(len(m)), np.empty(len(m))
        for start in range(0, len(m), 1024):
            block = n[start : start + 1024] @ hessian
            cross[start : start + 1024] = np.einsum("ij,ij->i", m[start : start + 1024], block)
            energy[start : start + 1024] = np.einsum("ij,ij->i", n[start : start + 1024], block)
    # A row decoded to zeros has no best scale: keep its RMS (the decode is zero either way).
    good = energy > 1e-30 * np.maximum(1.0, np.abs(cross))
    scales = np.where(good, cross / np.where(good, energy, 1.0), fallback)
    return scales.astype(np.float32)


def _from_matrix(matrix: np.ndarray, layout: WeightLayout) -> np.ndarray:
    return np.ascontiguousarray(matrix_to_weight(matrix, layout.weight_shape, layout.transposed))


def _with_choice(encoded: Encoded, choice: str, **numbers) -> Encoded:
    return dataclasses.replace(encoded, stats={**encoded.stats, "scales": choice, **numbers})
