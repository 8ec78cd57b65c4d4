"""SSVQ's trainable module: a learned magnitude codebook and learned signs (Li, Deng et al.,
ICCV 2025).

The weight is ``M = C[codes] * s`` (rows x cols, :mod:`onnxvq.layout`), codes fixed. Unless the
signs are ``"fixed"``, each weight has a latent real ``l``, initialised to the decoded weight
``S * C[codes]`` (magnitudes floored at the smallest normal float, so that a zero codeword entry
keeps its encoded sign), whose sign it uses through a straight-through estimator:

    forward   s = sign(l)              (sign(0) = +1)
    backward  ds/dl = 1                so  dL/dl = dL/dM * C[codes]

i.e. the latent's gradient is the weight's gradient scaled by its codeword magnitude, and a
weight whose gradient keeps pointing across zero flips, whatever its codeword does.

Progressive freezing (``signs="freeze"``): a sign that flips back and forth is noise that the
STE cannot settle. After every optimizer step the flip rate ``r = a r + (1 - a) [s != s_prev]``
and the sign average ``v = a v + (1 - a) s`` are updated (``a = flip_decay``); every F steps the
unfrozen signs with ``r > t(step)`` (a cosine-decaying threshold, see
:class:`~onnxvq.methods.ssvq.SSVQParams`) are frozen to their majority ``sign(v)`` (ties keep
the current sign), for good: a frozen sign ignores its latent from then on.

Everything that state depends on is a registered buffer, so ``state_dict()`` snapshots and
restores it (layer-wise training puts a module back when training did not help).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from onnxvq.finetune.trainable import TrainableWeight, gather_matrix
from onnxvq.layout import WeightLayout
from onnxvq.methods.base import Encoded
from onnxvq.methods.ssvq import SSVQParams
from onnxvq.ops.signs import pack_signs, unpack_signs

__all__ = ["SSVQWeight"]


class SSVQWeight(TrainableWeight):
    """One ``ssvq`` weight: parameters ``codebook`` (k, d) and, unless ``params.signs ==
    "fixed"``, ``latent`` (rows, cols)."""

    def __init__(self, encoded: Encoded, layout: WeightLayout, params: SSVQParams):
        super().__init__(layout)
        self.encoded = encoded
        self.params = params
        self.codebook = torch.nn.Parameter(torch.from_numpy(np.array(encoded.codebook, np.float32)))
        self.register_buffer("codes", torch.from_numpy(encoded.codes.astype(np.int64)))
        encoded_signs = torch.from_numpy(np.array(unpack_signs(encoded.extras["signs"], layout.cols), np.float32))
        self.register_buffer("encoded_signs", encoded_signs)
        if params.signs == "fixed":
            return
        with torch.no_grad():
            magnitude = gather_matrix(self.codebook, self.codes, layout).abs()
            # A zero codeword entry would give the latent sign(0) = +1 and silently flip an
            # encoded -1: the smallest normal float keeps every encoded sign.
            magnitude = magnitude.clamp_min(torch.finfo(torch.float32).tiny)
        self.latent = torch.nn.Parameter(encoded_signs * magnitude)
        self.register_buffer("previous_signs", encoded_signs.clone())
        self.register_buffer("flip_events", torch.zeros((), dtype=torch.int64))
        if params.signs == "freeze":
            self.register_buffer("frozen", torch.zeros_like(encoded_signs, dtype=torch.bool))
            self.register_buffer("frozen_values", encoded_signs.clone())
            self.register_buffer("flip_rate", torch.zeros_like(encoded_signs))
            self.register_buffer("sign_average", encoded_signs.clone())

    # --- the weight ------------------------------------------------------------------------

    def signs(self) -> torch.Tensor:
        """The effective signs (rows, cols) of +-1, differentiable w.r.t. ``latent`` by the STE."""
        if self.params.signs == "fixed":
            return self.encoded_signs
        hard = torch.where(self.latent >= 0, 1.0, -1.0).to(self.latent.dtype)
        # hard + (l - l): exactly +-1 in the forward, gradient 1 w.r.t. l in the backward.
        ste = hard + (self.latent - self.latent.detach())
        if self.params.signs == "freeze":
            return torch.where(self.frozen, self.frozen_values, ste)
        return ste

    def matrix(self) -> torch.Tensor:
        return gather_matrix(self.codebook, self.codes, self.layout) * self.signs()

    # --- progressive freezing --------------------------------------------------------------

    @torch.no_grad()
    def after_step(self, step: int, steps: int) -> None:
        if self.params.signs == "fixed":
            return
        current = self.signs().detach()
        flipped = current != self.previous_signs
        self.flip_events += flipped.sum()
        self.previous_signs.copy_(current)
        if self.params.signs != "freeze":
            return
        decay = self.params.flip_decay
        self.flip_rate.mul_(decay).add_(flipped.to(self.flip_rate.dtype), alpha=1.0 - decay)
        self.sign_average.mul_(decay).add_(current, alpha=1.0 - decay)
        if (step + 1) % self.params.freeze_interval(steps) == 0:
            self._freeze(current, self.params.threshold_at(step, steps))

    def _freeze(self, current: torch.Tensor, threshold: float) -> None:
        """Freeze the unfrozen signs flipping faster than ``threshold`` to their majority."""
        newly = ~self.frozen & (self.flip_rate > threshold)
        majority = torch.where(self.sign_average == 0, current, torch.sign(self.sign_average))
        self.frozen_values.copy_(torch.where(newly, majority, self.frozen_values))
        self.frozen |= newly
        # Freezing to the majority may itself flip a sign: count it now, as the step's flip.
        now = torch.where(self.frozen, self.frozen_values, current)
        self.flip_events += (now != current).sum()
        self.previous_signs.copy_(now)

    # --- results ---------------------------------------------------------------------------

    def to_encoded(self) -> Encoded:
        """The learned codebook and signs. Training may push a codeword entry below zero; since
        ``c * s == |c| * (s * sign(c))``, such entries are stored as magnitudes with the signs of
        the weights that use them flipped: exactly the trained weight, with ``C >= 0`` kept."""
        codebook = self.codebook.detach().cpu().numpy().astype(np.float32)
        signs = self.signs().detach().cpu().numpy()
        rows, cols = self.layout.rows, self.layout.cols
        entry_negative = codebook[self.encoded.codes].reshape(rows, -1)[:, :cols] < 0
        negative = (signs < 0) ^ entry_negative
        extras = {**self.encoded.extras, "signs": pack_signs(negative)}
        return dataclasses.replace(self.encoded, codebook=np.abs(codebook), extras=extras)

    def stats(self) -> dict:
        """``signs`` (total), ``signs_flipped`` (learned sign differs from the encoded one now),
        ``sign_flip_events`` (sign changes over the training, freezing included) and
        ``signs_frozen``."""
        with torch.no_grad():
            flipped = int((self.signs() != self.encoded_signs).sum())
        learned = self.params.signs != "fixed"
        return {
            "signs": int(self.encoded_signs.numel()),
            "signs_flipped": flipped,
            "sign_flip_events": int(self.flip_events) if learned else 0,
            "signs_frozen": int(self.frozen.sum()) if self.params.signs == "freeze" else 0,
        }
