"""LR2VQ's trainable module: the codebook coordinates ``C`` (k x r) and the projection ``P``
(r x m) are learned end to end through ``W_sub = (C P)[codes]``, as in the paper's fine-tuning.

The codes stay fixed. Re-assigning them between epochs needs a target to assign to: the original
weights pull the codewords back to the weight-space optimum and undo what training compensated
for, and the loss itself offers no per-subvector choice short of trying every codeword. Fixed
codes are also what PQF and "And the bit goes down" fine-tune with; ``P``, shared by every
codeword, already moves all of them together.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from onnxvq.finetune.trainable import TrainableWeight, gather_matrix
from onnxvq.layout import WeightLayout
from onnxvq.methods.base import Encoded

__all__ = ["LR2VQWeight"]


class LR2VQWeight(TrainableWeight):
    def __init__(self, encoded: Encoded, layout: WeightLayout):
        super().__init__(layout)
        self.encoded = encoded
        self.codebook = torch.nn.Parameter(torch.from_numpy(np.array(encoded.codebook, np.float32)))
        projection = encoded.extras.get("projection", np.eye(layout.d))  # full rank: P = I, not stored
        self.projection = torch.nn.Parameter(torch.from_numpy(np.array(projection, np.float32)))
        self.register_buffer("codes", torch.from_numpy(encoded.codes.astype(np.int64)))

    def matrix(self) -> torch.Tensor:
        return gather_matrix(self.codebook @ self.projection, self.codes, self.layout)

    def to_encoded(self) -> Encoded:
        codebook = self.codebook.detach().numpy().astype(np.float32)
        projection = self.projection.detach().numpy().astype(np.float32)
        if projection.shape[0] == projection.shape[1]:
            # full rank: C P is a k x m codebook like any other, no projection worth storing
            return dataclasses.replace(self.encoded, codebook=codebook @ projection, extras={})
        return dataclasses.replace(self.encoded, codebook=codebook, extras={"projection": projection})
