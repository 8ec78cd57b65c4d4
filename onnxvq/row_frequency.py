"""How often calibration reads each row of an embedding table, as k-means row weights.

A ``Gather`` of table ``M`` (V rows) multiplies nothing: a lookup of row ``r`` copies ``m_r``, so
the output error of an encoded table over a stream of lookups is

    E = sum_lookups ||m^_r - m_r||^2 = N sum_r p_r ||m^_r - m_r||^2

with ``p_r`` the share of the ``N`` lookups that read row ``r``. Rows read often deserve more of
the codebook than rows never read; encoding with ``p_r`` as each row's weight (weighted k-means,
:func:`onnxvq.methods.base.point_weights`) minimises ``E`` instead of the plain weight error.

``p`` is estimated from calibration counts ``n_r`` with Good-Turing's estimate of the unseen
mass: a real token stream reads rows the calibration set never did, so rows with ``n_r = 0``
share ``p_0 = max(N_1, 1) / N`` (``N_1``: rows read exactly once; at most the unseen rows'
fraction of the table, which makes a stream of distinct rows read once each uniform) equally,
and the seen rows keep ``(1 - p_0) n_r / N``. A small calibration set thus leaves much weight on unseen rows (the
encoding stays close to the unweighted one); a large one concentrates it where the data is.
Returned weights are ``V p`` (mean 1), so a uniform stream gives all ones.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxvq.activations import LayerInputs, _TapSession
from onnxvq.calibration import CalibrationSet
from onnxvq.candidates import Layer

__all__ = ["capture_row_weights", "count_rows", "row_weights"]


def capture_row_weights(
    model: ir.Model, layers: list[Layer], calib: CalibrationSet, *, batch_size: int = 16
) -> dict[str, LayerInputs]:
    """For every embedding ``Gather`` among ``layers`` in the main graph: weight name ->
    :class:`LayerInputs` with its ``row_weights`` (layers sharing a table add their counts).
    Tables read inside control-flow bodies are left out (encoded unweighted)."""
    tables = [l for l in layers if l.op_type == "Gather" and l.node.graph is model.graph]
    if not tables:
        return {}
    taps = {l.name: [l.node.inputs[1].name] for l in tables}
    session = _TapSession(model, taps, None, taps_only=True)
    counts = {l.weight.name: np.zeros(l.weight_shape[0], np.int64) for l in tables}
    for _, feed, _ in calib.batches(batch_size):
        values = session.run(feed)
        for layer in tables:
            counts[layer.weight.name] += count_rows(values[taps[layer.name][0]], layer.weight_shape[0])
    return {
        name: LayerInputs(hessian=None, cross=None, inputs=np.zeros((0, 1, 0), np.float32), reference_inputs=None,
                          count=int(n.sum()), row_weights=row_weights(n))
        for name, n in counts.items() if n.sum() > 0
    }


def count_rows(indices: np.ndarray, rows: int) -> np.ndarray:
    """Lookups per row of a ``rows``-row table for one run's ``indices`` (any shape; negative
    indices count from the end, as Gather reads them; out-of-range ones, which Gather rejects,
    are not counted)."""
    flat = np.asarray(indices).reshape(-1).astype(np.int64)
    flat = np.where(flat < 0, flat + rows, flat)
    return np.bincount(flat[(flat >= 0) & (flat < rows)], minlength=rows)


def row_weights(counts: np.ndarray) -> np.ndarray:
    """``V p`` (module docstring) from per-row lookup counts (at least one lookup)."""
    n = np.asarray(counts, np.float64)
    total = n.sum()
    if total <= 0:
        raise ValueError("no lookups were counted")
    unseen = n == 0
    if not unseen.any():
        return n / total * len(n)
    # At most the unseen rows' share of the table: there the seen rows, each read once, weigh
    # as much as an unseen one (the data said nothing about frequencies: all weights equal).
    p_unseen = min(max(float(np.sum(n == 1)), 1.0) / total, unseen.mean())
    p = np.where(unseen, p_unseen / unseen.sum(), (1.0 - p_unseen) * n / total)
    return p * len(n)
