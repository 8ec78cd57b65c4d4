"""The quality guard: every compress checks its own output against the original model.

With calibration data the check uses the held-back samples (or the training samples when too few
were given); without, it generates :data:`GENERATED_SAMPLES` inputs from the model's input specs
(:func:`generated_samples`). The compressed model is run as it will be written (weights decoded
from their packed form) and compared by :func:`onnxvq.output_quality.output_quality`: output
SQNR, and top-1 agreement when the first output is class scores.

A model is reported *damaged* when the output SQNR is under :data:`MIN_SQNR_DB` or the top-1
agreement under :data:`MIN_TOP1_AGREEMENT`; the CLI then prints a warning line that says what to
try. Generated inputs are not the user's data (a detector on noise says little about text), so
the warning names where the numbers come from.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxvq.calibration import CalibrationSet, load_calibration
from onnxvq.output_quality import OutputQuality

__all__ = [
    "GENERATED_SAMPLES", "MIN_SQNR_DB", "MIN_TOP1_AGREEMENT", "QualityCheck", "check", "damage",
    "generated_samples", "verdict",
]

logger = logging.getLogger(__name__)

MIN_SQNR_DB = 10.0
MIN_TOP1_AGREEMENT = 0.9
GENERATED_SAMPLES = 4
# Size given to a dynamic dimension other than the first (batch) one: large enough for image
# models that downsample 32x, small enough to run in a moment.
GENERATED_DIM = 64


@dataclasses.dataclass(frozen=True)
class QualityCheck:
    """What the guard measured, on which data, and its verdict (``warning`` None when fine)."""

    quality: OutputQuality | None
    source: str  # "held-back calibration samples", "generated inputs", ...
    warning: str | None = None
    note: str | None = None  # why nothing was measured, when nothing was

    def to_dict(self) -> dict:
        return {
            "quality": self.quality.to_dict() if self.quality else None,
            "source": self.source,
            "warning": self.warning,
            "note": self.note,
        }


def damage(quality: OutputQuality) -> str | None:
    """Why ``quality`` counts as a damaged model, or None."""
    reasons = []
    if quality.sqnr_db < MIN_SQNR_DB:
        reasons.append(f"output SQNR {quality.sqnr_db:.1f} dB < {MIN_SQNR_DB:g} dB")
    if quality.top1_agreement is not None and quality.top1_agreement < MIN_TOP1_AGREEMENT:
        reasons.append(f"top-1 agreement {100 * quality.top1_agreement:.1f}% < {100 * MIN_TOP1_AGREEMENT:g}%")
    return "; ".join(reasons) or None


def verdict(quality: OutputQuality | None, source: str, *, has_calib: bool, note: str | None = None) -> QualityCheck:
    """The check's record, with a warning line when the model is damaged."""
    if quality is None:
        return QualityCheck(None, source, note=note)
    reason = damage(quality)
    warning = None
    if reason and has_calib:
        warning = (
            f"the compressed model's output is damaged on {source} ({reason}): use a lower "
            "--target-ratio, a larger k or a smaller d, or leave sensitive layers dense (--skip)"
        )
    elif reason:
        # Measured: PP-OCRv6's detector at --target-ratio 8 scores 14 dB on rendered text but
        # 2 dB on noise, and a broken encoding of it scores higher on noise than a good one.
        warning = (
            f"the compressed model's output differs from the original's on {source} ({reason}); "
            "random inputs can overstate the damage, so check it on real samples: give --calib "
            "(which also enables data-aware encoding and fine-tuning) or use a lower --target-ratio"
        )
    return QualityCheck(quality, source, warning)


def check(
    model: ir.Model,
    decoded: Callable[[], dict[str, np.ndarray]],
    *,
    calibration: dict | None,
    held_back: bool,
    seed: int,
) -> QualityCheck:
    """Measure the encoded ``model`` against the original: from the calibration record's last
    quality when there is one, else by running both on generated inputs (``decoded()``: weight
    name -> dense weight as stored, only called then)."""
    if calibration is not None and calibration.get("quality"):
        quality = list(calibration["quality"].values())[-1]
        source = "the held-back calibration samples" if held_back else "the calibration samples"
        return verdict(quality, source, has_calib=True)
    source = f"{GENERATED_SAMPLES} random inputs"
    samples = generated_samples(model, seed=seed)
    if samples is None:
        return verdict(None, source, has_calib=False, note="the model's inputs have no usable type or shape")
    from onnxvq.activations import run_model
    from onnxvq.output_quality import output_quality

    try:
        reference = run_model(model, samples)
        outputs = run_model(model, samples, quantized=decoded())
    except Exception as e:  # e.g. an input whose valid values noise does not hit (a sample rate)
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return verdict(None, source, has_calib=False, note=f"the model did not run on generated inputs ({text[:160]})")
    return verdict(output_quality(reference, outputs), source, has_calib=False)


def generated_samples(model: ir.Model, *, seed: int, n: int = GENERATED_SAMPLES) -> CalibrationSet | None:
    """``n`` feed dicts drawn from the model's input specs, or None when a spec leaves too much
    unknown (no type, no rank). Floats are standard normal (what normalised images and features
    look like); integers are zeros (valid indices for any embedding); a dynamic first dimension
    is 1 and any other dynamic one :data:`GENERATED_DIM`."""
    rng = np.random.default_rng(seed)
    initializers = set(model.graph.initializers)
    specs = [v for v in model.graph.inputs if v.name not in initializers]
    shapes = {}
    for value in specs:
        if value.dtype is None or value.shape is None:
            return None
        dims = []
        for axis, dim in enumerate(value.shape):
            fixed = isinstance(dim, int) and dim > 0
            dims.append(int(dim) if fixed else 1 if axis == 0 else GENERATED_DIM)
        shapes[value.name] = (tuple(dims), value.dtype.numpy())
    samples = []
    for _ in range(n):
        feed = {}
        for name, (shape, dtype) in shapes.items():
            if np.dtype(dtype).kind == "f":
                feed[name] = rng.standard_normal(shape).astype(dtype)
            else:
                feed[name] = np.zeros(shape, dtype)
        samples.append(feed)
    try:
        return load_calibration(samples, model)
    except Exception as e:  # a spec the checks refuse: then there is nothing to measure on
        logger.info("no generated inputs for the quality check: %s", e)
        return None
