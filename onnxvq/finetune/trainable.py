"""The contract between a method's trainable torch module and the fine-tune bridge.

A :class:`TrainableWeight` holds one encoded weight's tensors as torch parameters (a codebook,
low-rank factors, latent signs, ...) and rebuilds the dense weight from them, differentiably,
through the same layout the numpy decode uses (:mod:`onnxvq.layout`). The bridge only calls the
methods below, so it never needs to know which method it is training.
"""

from __future__ import annotations

import torch

from onnxvq.layout import WeightLayout, matrix_to_weight
from onnxvq.methods.base import Encoded

__all__ = ["TrainableWeight", "gather_matrix"]


class TrainableWeight(torch.nn.Module):
    """One encoded weight as a torch module; ``forward()`` returns the dense weight."""

    def __init__(self, layout: WeightLayout):
        super().__init__()
        self.layout = layout

    def matrix(self) -> torch.Tensor:
        """``M`` (rows, cols) of :mod:`onnxvq.layout`, built from the parameters."""
        raise NotImplementedError

    def forward(self) -> torch.Tensor:
        """The weight in its original shape (float32)."""
        return matrix_to_weight(self.matrix(), self.layout.weight_shape, self.layout.transposed)

    def to_encoded(self) -> Encoded:
        """The learned tensors as an :class:`Encoded` value, ready to pack into the graph."""
        raise NotImplementedError

    def end_epoch(self, epoch: int, epochs: int) -> None:
        """Called after each pass over the data (re-assign codes, freeze signs, ...)."""

    def after_step(self, step: int, steps: int) -> None:
        """Called after each optimizer step."""

    def stats(self) -> dict:
        """Numbers worth reporting about the training (JSON-serialisable)."""
        return {}


def gather_matrix(codebook: torch.Tensor, codes: torch.Tensor, layout: WeightLayout) -> torch.Tensor:
    """``M = C[codes]`` with each row's subvectors concatenated and the padding dropped."""
    return codebook[codes].reshape(layout.rows, -1)[:, : layout.cols]
