"""Task-agnostic quality of a compressed model: its outputs against the original's.

* output SQNR, ``10 log10(sum y^2 / sum (y - y_hat)^2)`` over every float output of every sample;
* top-1 agreement, when the first output looks like class scores (float, rank 2, more than one
  column; or rank 3 and more with a probability distribution along the last axis, a recognizer's
  batch x time x classes softmax, or raw scores over many classes whose winner stands out,
  :func:`has_standout_winner`, as a captcha reader's time x batch x classes logits): the
  fraction of rows (positions) whose argmax equals the original's;
* top-1 accuracy against the labels, when the samples have labels.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = ["MIN_SCORED_CLASSES", "PEAK_MARGIN", "OutputQuality", "class_rows", "has_standout_winner",
           "is_class_scores", "output_quality", "peak_bound", "score_peaks"]

# How far the top score must stand above the largest of as many Gaussian values, in standard
# deviations, for raw scores to count as class scores (has_standout_winner).
PEAK_MARGIN = 3.0
# Fewer classes than this say nothing by their spread (the top of 2 values is always 1 std out).
MIN_SCORED_CLASSES = 64


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
    as a softmax over classes per position gives) or raw scores of at least
    :data:`MIN_SCORED_CLASSES` classes with a standout winner; else None."""
    if is_class_scores(array):
        return array
    if array.dtype.kind != "f" or array.ndim < 3 or array.shape[-1] < 2 or array.size == 0:
        return None
    rows = array.reshape(-1, array.shape[-1]).astype(np.float64)
    if rows.min() >= -1e-6 and np.abs(rows.sum(1) - 1).max() <= 1e-2:
        return rows
    return rows if rows.shape[1] >= MIN_SCORED_CLASSES and has_standout_winner(rows) else None


def has_standout_winner(rows: np.ndarray) -> bool:
    """Whether (positions, C) scores have a winner that stands out, as class scores do: the median
    over positions of :func:`score_peaks` is at least :func:`peak_bound` (an embedding's values
    do not pass). ddddocr's captcha logits read 15 (bound 7.2), PP-OCRv6's recognizer
    probabilities 137."""
    return bool(np.median(score_peaks(rows)) >= peak_bound(np.shape(rows)[1]))


def score_peaks(rows: np.ndarray) -> np.ndarray:
    """Per row of (positions, C) scores: ``(max - mean) / std`` across the C values."""
    rows = np.asarray(rows, np.float64)
    return (rows.max(1) - rows.mean(1)) / np.maximum(rows.std(1), np.finfo(np.float64).tiny)


def peak_bound(classes: int) -> float:
    """``sqrt(2 ln C) +`` :data:`PEAK_MARGIN`: the largest of C Gaussian values lies about
    ``sqrt(2 ln C)`` standard deviations out."""
    return float(np.sqrt(2 * np.log(classes)) + PEAK_MARGIN)


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
    if not math.isfinite(noise):
        # A NaN or infinite output is as damaged as an output can be (a NaN SQNR would pass
        # every threshold, since every comparison with NaN is false).
        sqnr = -math.inf
    else:
        sqnr = math.inf if noise == 0 else (-math.inf if signal == 0 else 10 * math.log10(signal / noise))
    return OutputQuality(
        sqnr_db=sqnr,
        top1_agreement=agree / rows if scores and rows else None,
        top1_accuracy=correct / rows if scores and rows and labelled else None,
        rows=rows,
    )
