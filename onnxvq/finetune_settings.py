"""Settings of calibration and fine-tuning (no torch here: the API and CLI build these).

Fine-tuning modes (``mode``):

* ``none``: encode only (data-aware when calibration data is given);
* ``layer``: each encoded layer is trained in torch to reproduce the original layer's outputs on
  captured inputs, where the inputs come from the model whose earlier layers are already
  quantized (works on any graph: only the quantized layers are rebuilt in torch);
* ``e2e``: the whole graph runs in torch (:mod:`onnxvq.finetune.torch_graph`), the quantized
  layers are trained to match the original model's outputs (distillation) plus the task loss when
  labels are given. A graph with an op the executor cannot run falls back to ``layer``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping
from typing import Any

from onnxvq.errors import OnnxVQError

__all__ = ["E2E_MAX_STEPS", "E2E_MIN_GAIN", "E2E_MIN_STEPS", "E2E_PATIENCE", "FINETUNE_MODES", "LOSSES", "PWLU_INTERVALS", "FinetuneSettings", "parse_activations"]

FINETUNE_MODES = ("none", "layer", "e2e")
LOSSES = ("auto", "kl", "mse")
AUGMENTS = ("mixup", "none")
# e2e's floor when counted in epochs, and its default without held-back samples. PP-OCRv6's
# recognizer at --target-ratio 16 with 48 calibration lines: 10 epochs are 20 steps and leave
# it broken; 200 steps give char_acc 0.84.
E2E_MIN_STEPS = 200
# e2e's default with held-back samples: this many steps (or 10 epochs, when more) on one cosine,
# ended after E2E_PATIENCE held-out checks when none of them has lowered the held-out loss of the
# untrained start by E2E_MIN_GAIN (relative): there fine-tuning does not pay (the recognizer at
# 8x: 0.0003 untrained, 0.05-0.14 after 100-300 steps). Where it pays it runs to the end, since
# on the cosine the late, slow steps give much of the gain (the recognizer at 16x, 22 training
# lines: held-out loss 0.072 at step 600, 0.039 at step 900; char_acc 0.75 after 200 steps,
# 0.87 after 1000), so a stall in the middle says nothing about the end.
E2E_MAX_STEPS = 1000
E2E_PATIENCE = 3
E2E_MIN_GAIN = 0.05
DEFAULT_EPOCHS = 10
PWLU_INTERVALS = 16  # the paper's default


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """How calibration data is used.

    Attributes:
        mode: ``none``, ``layer`` or ``e2e`` (see the module docstring).
        epochs: passes over the data: over each layer's captured input rows (``layer``) or over
            the calibration samples (``e2e``). None (the default): 10 for ``layer``. For ``e2e``
            with held-back samples: up to 10 epochs or :data:`E2E_MAX_STEPS` steps, whichever is
            more, ended after :data:`E2E_PATIENCE` held-out checks if none of them has lowered
            the untrained held-out loss by :data:`E2E_MIN_GAIN`; without them, 10 epochs and at
            least :data:`E2E_MIN_STEPS` steps, since a few dozen calibration samples make only a
            few batches per epoch.
        steps: optimizer steps instead of epochs (per layer for ``layer``, in all for ``e2e``).
        lr: Adam learning rate.
        batch_size: calibration samples per step (``e2e``) and per capture batch.
        loss: distillation loss for ``e2e``: ``auto`` (an output made by ``Softmax`` or
            ``Sigmoid`` is compared on its logits by KL divergence; a 2-D float output with more
            than one column, a classifier's logits, by KL of its rows' softmaxes; ``mse``
            otherwise: see :mod:`onnxvq.finetune.end_to_end`), or ``kl``/``mse`` on every output.
        train_rest: ``e2e`` only: also train the layers' other float parameters (biases, a
            normalization's scale and shift, weights left dense; never the graph's arithmetic
            constants: :func:`onnxvq.finetune.end_to_end._other_float_initializers`); they are
            written back into the graph. Off by default: every tensor that is not quantized
            stays bit-identical.
        data_aware: encode with activation statistics (weighted k-means + least-squares
            codebook); off gives weight-only k-means even with calibration data (for ablations).
        holdout: fraction of the calibration samples held back to measure output quality (none
            held back under 10 samples: then it is measured on the training samples).
        max_rows: input vectors kept per layer for layer-wise training.
        layer_batch_rows: input vectors per step in layer-wise training.
        activations: ``keep`` (default), or ``pwlu[:N][:layer|:channel]``: activations behind
            the model's layers become learnable piecewise-linear ones (:mod:`onnxvq.pwlu_stage`),
            N intervals (default :data:`PWLU_INTERVALS`), one function per layer (default) or
            per channel.
        augment: ``e2e`` only: ``mixup`` (default) trains on mixes ``lam x_i + (1 - lam) x_j``
            of calibration samples of the same input shapes, each batch labelled afresh by the
            original model (:class:`onnxvq.finetune.end_to_end._Mixup`): a few dozen samples
            are otherwise learned by heart. ``none`` trains on the samples themselves. With
            labels (a task loss) the samples are used as they are.

    Example::

        >>> FinetuneSettings(mode="e2e", epochs=5, lr=1e-4)  # doctest: +ELLIPSIS
        FinetuneSettings(mode='e2e', epochs=5, ...)
    """

    mode: str = "layer"
    epochs: int | None = None
    steps: int | None = None
    lr: float = 1e-3
    batch_size: int = 32
    loss: str = "auto"
    train_rest: bool = False
    data_aware: bool = True
    holdout: float = 0.1
    max_rows: int = 4096
    layer_batch_rows: int = 256
    activations: str = "keep"
    augment: str = "mixup"

    @property
    def pwlu(self) -> tuple[int, bool] | None:
        """``(intervals, channel-wise)`` when ``activations`` asks for PWLUs, else None."""
        return parse_activations(self.activations)

    @property
    def epoch_count(self) -> int:
        """``epochs``, or the default when it is None."""
        return DEFAULT_EPOCHS if self.epochs is None else self.epochs

    def __post_init__(self) -> None:
        if self.mode not in FINETUNE_MODES:
            raise OnnxVQError(f"fine-tune mode {self.mode!r} is not one of {', '.join(FINETUNE_MODES)}")
        if self.augment not in AUGMENTS:
            raise OnnxVQError(f"augment {self.augment!r} is not one of {', '.join(AUGMENTS)}")
        if self.loss not in LOSSES:
            raise OnnxVQError(f"loss {self.loss!r} is not one of {', '.join(LOSSES)}")
        for name in ("epochs", "batch_size", "max_rows", "layer_batch_rows"):
            value = getattr(self, name)
            if name == "epochs" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OnnxVQError(f"{name} must be a positive integer (got {value!r})")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise OnnxVQError(f"steps must be a positive integer (got {self.steps!r})")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise OnnxVQError(f"lr must be a positive number (got {self.lr!r})")
        if not 0 <= self.holdout < 1:
            raise OnnxVQError(f"holdout must be in [0, 1) (got {self.holdout!r})")
        parse_activations(self.activations)
        if self.pwlu is not None and self.mode == "none":
            raise OnnxVQError("--activations pwlu is learned from calibration data: give --calib and "
                              "--finetune layer or e2e")

    @classmethod
    def make(cls, value: FinetuneSettings | Mapping[str, Any] | str | None, *, has_calib: bool) -> FinetuneSettings:
        """From the API's ``finetune=`` argument: settings, a mapping, a mode name, or None
        (``layer`` with calibration data, ``none`` without)."""
        if isinstance(value, FinetuneSettings):
            settings = value
        elif isinstance(value, str):
            settings = cls(mode=value)
        elif isinstance(value, Mapping):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise OnnxVQError(f"unknown fine-tune setting(s): {', '.join(sorted(unknown))}")
            settings = cls(**{"mode": "layer" if has_calib else "none", **value})
        elif value is None:
            settings = cls(mode="layer" if has_calib else "none")
        else:
            raise OnnxVQError(f"finetune must be a mode name, a mapping or FinetuneSettings, got {type(value).__name__}")
        if settings.mode != "none" and not has_calib:
            raise OnnxVQError(
                f"fine-tuning ({settings.mode}) needs calibration data: give --calib, or --finetune none"
            )
        if settings.mode != "none" and importlib.util.find_spec("torch") is None:
            raise OnnxVQError(
                f"fine-tuning ({settings.mode}) needs torch: pip install torch==2.13.0 (the CPU build), "
                "or use --finetune none for data-aware encoding without training"
            )
        return settings


def parse_activations(text: str) -> tuple[int, bool] | None:
    """``keep`` -> None; ``pwlu[:N][:layer|:channel]`` -> (N, channel-wise); else a clear error."""
    if text == "keep":
        return None
    parts = text.split(":") if isinstance(text, str) else []
    intervals, channelwise = PWLU_INTERVALS, False
    ok = bool(parts) and parts[0] == "pwlu" and len(parts) <= 3
    for part in parts[1:] if ok else ():
        if part.isdigit() and 1 <= int(part) <= 1024:
            intervals = int(part)
        elif part in ("layer", "channel"):
            channelwise = part == "channel"
        else:
            ok = False
    if not ok:
        raise OnnxVQError(f"activations {text!r} is not 'keep' or 'pwlu[:N][:layer|:channel]' "
                          "(e.g. pwlu:16, pwlu:8:channel; N from 1 to 1024)")
    return intervals, channelwise
