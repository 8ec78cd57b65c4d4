"""Layer-wise fine-tuning: each encoded layer alone, against the original layer's outputs.

For a layer with weight matrix ``M`` (rows x cols, :mod:`onnxvq.layout`) and captured input
pairs ``(x_q, x_o)`` at the same positions (``x_q`` from the model whose layers are already
quantized, ``x_o`` from the original, see :mod:`onnxvq.activations`), the module's parameters
minimise the normalised output error

    L = sum ||M^ x_q - M x_o||^2 / sum ||M x_o||^2

with Adam over minibatches of rows. Grouped convolutions apply group ``j``'s rows of ``M`` to
group ``j``'s patch. Works on any graph: only this one layer runs in torch. The result is kept
only if it lowers ``L`` over all kept rows; otherwise the module is put back as it was.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from onnxvq.activations import LayerInputs
from onnxvq.finetune.trainable import TrainableWeight
from onnxvq.layout import WeightLayout

__all__ = ["layer_outputs", "train_layer"]


def layer_outputs(matrix: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``M x`` for inputs (n, groups, cols) -> (n, rows), group ``j`` using its slice of rows."""
    n, groups, cols = inputs.shape
    per_group = matrix.reshape(groups, -1, cols)
    return torch.einsum("ngc,gpc->ngp", inputs, per_group).reshape(n, -1)


def train_layer(
    module: TrainableWeight,
    original: np.ndarray,
    layout: WeightLayout,
    data: LayerInputs,
    *,
    epochs: int,
    steps: int | None,
    lr: float,
    batch_rows: int,
    seed: int,
) -> dict:
    """Train ``module`` in place; returns ``{"loss_before", "loss_after", "kept", "steps"}``."""
    generator = torch.Generator().manual_seed(seed)
    x_q = torch.from_numpy(data.inputs)
    x_o = torch.from_numpy(data.reference_inputs) if data.reference_inputs is not None else x_q
    with torch.no_grad():
        target = layer_outputs(torch.from_numpy(np.ascontiguousarray(layout.to_matrix(original), np.float32)), x_o)
    scale = float((target**2).sum() / len(target)) or 1.0
    n = len(x_q)
    per_epoch = max(1, math.ceil(n / batch_rows))
    total = steps if steps is not None else epochs * per_epoch

    def full_loss() -> float:
        with torch.no_grad():
            m = module.matrix()
            loss = sum(
                float(((layer_outputs(m, x_q[i : i + 4096]) - target[i : i + 4096]) ** 2).sum())
                for i in range(0, n, 4096)
            )
        return loss / n / scale

    before = full_loss()
    saved = copy.deepcopy(module.state_dict())
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    order = torch.randperm(n, generator=generator)
    for step in range(total):
        if step and step % per_epoch == 0:
            module.end_epoch(step // per_epoch - 1, math.ceil(total / per_epoch))
            order = torch.randperm(n, generator=generator)
        start = (step % per_epoch) * batch_rows
        rows = order[start : start + batch_rows]
        loss = ((layer_outputs(module.matrix(), x_q[rows]) - target[rows]) ** 2).sum() / len(rows) / scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        module.after_step(step, total)
    after = full_loss()
    kept = after < before
    if not kept:
        module.load_state_dict(saved)
    return {"loss_before": before, "loss_after": min(after, before), "kept": kept, "steps": total}
