"""Task-agnostic quality of a compressed model: its outputs against the original's.

* output SQNR, ``10 log10(sum y^2 / sum (y - y_hat)^2)`` over every float output of every sample;
* top-1 agreement, when the first output looks like class scores (float, rank 2, more than one
  column; or rank 3 and more with a probability distribution along the last axis, a recognizer's
  batch x time x classes softmax): the fraction of rows (positions) whose argmax equals the
  original's;
* top-1 accuracy against the labels, when the samples have labels.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = ["OutputQuality", "class_rows", "is_class_scores", "output_quality"]


@dataclasses.dataclass(frozen=True)
class OutputQuality:
    sqnr_db: float
    top1_agreement: float | None
    top1_accuracy: float | None
    rows: int

    def format(self) -> str:
        parts = [f"output SQNR {self.sqnr_db:.2f} dB"]
        if self.top1_agreement is not None:
            parts.append(f"top-1 agreement {100 * self.top1_agreement:.2f}%")
        if self.top1_accuracy is not None:
            parts.append(f"top-1 accuracy {100 * self.top1_accuracy:.2f}%")
        return ", ".join(parts) + f" ({self.rows} rows)"

    def to_dict(self) -> dict:
        item = dataclasses.asdict(self)
        if not math.isfinite(self.sqnr_db):
            item["sqnr_db"] = str(self.sqnr_db)
        return item


def is_class_scores(array: np.ndarray) -> bool:
    """A 2-D float output with more than one column: a classifier's scores, one row per sample."""
    return array.dtype.kind == "f" and array.ndim == 2 and array.shape[1] > 1


def class_rows(array: np.ndarray) -> np.ndarray | None:
    """``array`` as (rows, classes) when it holds class scores: 2-D (:func:`is_class_scores`), or
    rank 3 and more whose last axis holds probability distributions (non-negative, summing to 1,
    as a softmax over classes per position gives); else None."""
    if is_class_scores(array):
        return array
    if array.dtype.kind != "f" or array.ndim < 3 or array.shape[-1] < 2 or array.size == 0:
        return None
    rows = array.reshape(-1, array.shape[-1]).astype(np.float64)
    if rows.min() < -1e-6 or np.abs(rows.sum(1) - 1).max() > 1e-2:
        return None
    return rows


def output_quality(
    reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]], labels: list[np.ndarray] | None = None
) -> OutputQuality:
    """Compare per-sample output lists (``[sample][output]``) of the original and compressed model."""
    signal = noise = 0.0
    agree = correct = rows = 0
    scores = all(class_rows(r[0]) is not None for r in reference)
    labelled = labels is not None
    for i, (ref, out) in enumerate(zip(reference, outputs)):
        for r, o in zip(ref, out):
            if r.dtype.kind != "f":
                continue
            r64 = r.astype(np.float64)
            signal += float((r64**2).sum())
            noise += float(((r64 - o) ** 2).sum())
        if scores:
            predicted = out[0].reshape(-1, out[0].shape[-1]).argmax(1)
            agree += int((predicted == ref[0].reshape(-1, ref[0].shape[-1]).argmax(1)).sum())
            rows += len(predicted)
            truth = None if labels is None else np.reshape(labels[i], -1)
            if truth is not None and truth.shape == predicted.shape:  # one label per row
                correct += int((predicted == truth).sum())
            else:
                labelled = False
        else:
            rows += 1
    sqnr = math.inf if noise == 0 else (-math.inf if signal == 0 else 10 * math.log10(signal / noise))
    return OutputQuality(
        sqnr_db=sqnr,
        top1_agreement=agree / rows if scores and rows else None,
        top1_accuracy=correct / rows if scores and rows and labelled else None,
        rows=rows,
    )
