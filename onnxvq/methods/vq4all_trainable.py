"""VQ4ALL's trainable module: learned assignments into a fixed universal codebook.

Each subvector ``j`` chooses among its ``n`` candidate codewords (its current codeword and the
``n - 1`` codewords nearest to it, ``U[c_j1..c_jn]``) with probabilities
``p_j = softmax(LOGIT_SCALE * a_j)`` over learnable logits ``a_j``, initialised from distance
ratios: ``a_ji = -||U_c - U_ci|| / median_i ||U_c - U_ci||`` (the current codeword 0, the
others below it in proportion to how far they are). ``LOGIT_SCALE`` sets how fast assignments
move: an Adam step of the bridge's default 1e-3 moves a scaled logit by about 0.01. (On the tests'
CNN, 100 end-to-end steps: 10 took the distillation loss from 7.5e-4 to 5.4e-5; 20 and 50 made
the codes flip back and forth and the loss rise.)

The forward pass is straight-through: its value is the *hard* decode, each subvector the
codeword of its largest logit (what the written model computes, so the layer-wise keep/revert
test and the e2e held-out loss see the real weight), and its gradient is that of the soft mixture
``sum_i p_ji U_ci``. A regulariser that pushes the soft mixture towards one-hot is then not
needed: the model never sees anything but one-hot assignments. After each epoch a subvector
whose top probability is above :data:`FREEZE_AT` is frozen to its codeword (no gradient from
then on): confident assignments stop oscillating. ``U`` never changes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from onnxvq.finetune.trainable import TrainableWeight
from onnxvq.layout import WeightLayout
from onnxvq.methods.base import Encoded

__all__ = ["FREEZE_AT", "LOGIT_SCALE", "VQ4ALLWeight"]

LOGIT_SCALE = 10.0
FREEZE_AT = 0.99


class VQ4ALLWeight(TrainableWeight):
    def __init__(self, encoded: Encoded, layout: WeightLayout, *, top_n: int):
        super().__init__(layout)
        self.encoded = encoded
        codebook = np.asarray(encoded.codebook, np.float32)
        codes = encoded.codes.reshape(-1).astype(np.int64)
        used, inverse = np.unique(codes, return_inverse=True)
        order, near = _neighbours(codebook, used, min(top_n, len(codebook)))
        scale = np.median(near[:, 1:], axis=1, keepdims=True) if near.shape[1] > 1 else np.ones((len(used), 1))
        logits = -near / np.maximum(scale, 1e-12) / LOGIT_SCALE
        self.register_buffer("codebook", torch.from_numpy(codebook))
        self.register_buffer("candidates", torch.from_numpy(order[inverse]))
        self.logits = torch.nn.Parameter(torch.from_numpy(logits[inverse].astype(np.float32)))
        self.register_buffer("frozen", torch.zeros(len(codes), dtype=torch.bool))
        self.register_buffer("start", torch.from_numpy(codes))

    def codes(self) -> torch.Tensor:
        """The hard codes: each subvector's candidate of largest logit."""
        best = self.logits.detach().argmax(dim=1, keepdim=True)
        return self.candidates.gather(1, best)[:, 0]

    def matrix(self) -> torch.Tensor:
        hard = self.codebook[self.codes()]
        weights = torch.softmax(LOGIT_SCALE * self.logits, dim=1)
        soft = (weights[:, :, None] * self.codebook[self.candidates]).sum(1)
        live = (~self.frozen)[:, None].to(soft.dtype)
        subvectors = hard + live * (soft - soft.detach())  # value: hard; gradient: soft's
        return subvectors.reshape(self.layout.rows, -1)[:, : self.layout.cols]

    def end_epoch(self, epoch: int, epochs: int) -> None:
        with torch.no_grad():
            confident = torch.softmax(LOGIT_SCALE * self.logits, dim=1).amax(dim=1) >= FREEZE_AT
            self.frozen |= confident

    def to_encoded(self) -> Encoded:
        codes = self.codes().numpy().reshape(self.encoded.codes.shape).astype(self.encoded.codes.dtype)
        return dataclasses.replace(self.encoded, codes=codes)

    def stats(self) -> dict:
        return {"codes_changed": int((self.codes() != self.start).sum()), "frozen": int(self.frozen.sum()),
                "subvectors": int(len(self.start))}


def _neighbours(codebook: np.ndarray, used: np.ndarray, n: int, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """For each codeword in ``used``: itself and its ``n - 1`` nearest other codewords (indices,
    distances; itself at distance 0), in chunks of rows, so that a 65,536-word codebook never
    needs its k x k distance matrix."""
    squares = (codebook.astype(np.float64) ** 2).sum(1)
    order = np.empty((len(used), n), np.int64)
    near = np.empty((len(used), n))
    for start in range(0, len(used), chunk):
        rows = used[start : start + chunk]
        distances = np.sqrt(np.maximum(squares[rows, None] - 2 * codebook[rows] @ codebook.T + squares[None, :], 0))
        distances[np.arange(len(rows)), rows] = -1.0  # itself first
        best = np.argpartition(distances, n - 1, axis=1)[:, :n] if n < distances.shape[1] else np.tile(
            np.arange(distances.shape[1]), (len(rows), 1))
        ranked = np.take_along_axis(best, np.argsort(np.take_along_axis(distances, best, axis=1), axis=1, kind="stable"), axis=1)
        order[start : start + chunk] = ranked
        near[start : start + chunk] = np.take_along_axis(distances, ranked, axis=1)
    near[:, 0] = 0.0
    return order, near
