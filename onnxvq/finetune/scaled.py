"""Per-channel scales around any method's trainable module (see :mod:`onnxvq.channel_scales`).

``M = diag(s) M_inner``: the wrapped module rebuilds the row-normalised matrix from its own
parameters, and the scales ``s`` are learned along with them. Everything else (codes, signs,
callbacks, statistics) is the wrapped module's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from onnxvq.finetune.trainable import TrainableWeight
from onnxvq.methods.base import Encoded

__all__ = ["ScaledWeight"]


class ScaledWeight(TrainableWeight):
    def __init__(self, inner: TrainableWeight, scales: np.ndarray):
        super().__init__(inner.layout)
        self.inner = inner
        self.scales = torch.nn.Parameter(torch.from_numpy(np.array(scales, np.float32)))

    def matrix(self) -> torch.Tensor:
        return self.inner.matrix() * self.scales[:, None]

    def to_encoded(self) -> Encoded:
        encoded = self.inner.to_encoded()
        scales = self.scales.detach().numpy().astype(np.float32)
        return dataclasses.replace(encoded, extras={**encoded.extras, "scales": scales})

    def end_epoch(self, epoch: int, epochs: int) -> None:
        self.inner.end_epoch(epoch, epochs)

    def after_step(self, step: int, steps: int) -> None:
        self.inner.after_step(step, steps)

    def stats(self) -> dict:
        return self.inner.stats()
