"""PQ's trainable module: the codebook is learned, the codes stay fixed (as in PQF's and "And the
bit goes down"'s fine-tuning, where each codeword moves by the summed gradient of every
subvector assigned to it)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from onnxvq.finetune.trainable import TrainableWeight, gather_matrix
from onnxvq.layout import WeightLayout
from onnxvq.methods.base import Encoded

__all__ = ["PQWeight"]


class PQWeight(TrainableWeight):
    def __init__(self, encoded: Encoded, layout: WeightLayout):
        super().__init__(layout)
        self.encoded = encoded
        self.codebook = torch.nn.Parameter(torch.from_numpy(np.array(encoded.codebook, np.float32)))
        self.register_buffer("codes", torch.from_numpy(encoded.codes.astype(np.int64)))

    def matrix(self) -> torch.Tensor:
        return gather_matrix(self.codebook, self.codes, self.layout)

    def to_encoded(self) -> Encoded:
        return dataclasses.replace(self.encoded, codebook=self.codebook.detach().numpy().astype(np.float32))
