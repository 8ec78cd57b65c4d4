"""End-to-end fine-tuning: the whole ONNX graph runs in torch, the quantized layers learn.

The original graph is interpreted by :class:`onnxvq.finetune.torch_graph.TorchGraph`; each
quantized weight's value is overridden by its trainable module's output, so gradients reach the
method's tensors (codebooks, ...) and nothing else, unless ``train_rest`` also opens the other
float initializers. The loss over a batch is

    sum over float outputs o of  D(student_o, teacher_o)   +   CE(student_0, labels) if labels

with the teacher outputs those of the original model (onnxruntime, computed once) and ``D`` the
KL divergence ``sum p_t (log p_t - log p_s)`` of the softmaxes for class scores, or the
normalised squared error ``mean (s - t)^2 / mean t^2`` otherwise (``FinetuneSettings.loss``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from onnxvq.progress import progress as progress_bar

from onnxvq.calibration import CalibrationSet
from onnxvq.finetune.torch_graph import TorchGraph
from onnxvq.finetune.trainable import TrainableWeight
from onnxvq.finetune_settings import FinetuneSettings
from onnxvq.output_quality import is_class_scores

__all__ = ["distillation_loss", "train_end_to_end"]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "kl":
        log_p_s = F.log_softmax(student, dim=-1)
        log_p_t = F.log_softmax(teacher, dim=-1)
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
    return ((student - teacher) ** 2).mean() / ((teacher**2).mean() + 1e-12)


def train_end_to_end(
    model: ir.Model,
    modules: Mapping[str, TrainableWeight],
    calib: CalibrationSet,
    teacher: list[list[np.ndarray]],
    settings: FinetuneSettings,
    *,
    seed: int,
    progress: bool = False,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Train ``modules`` (weight name -> module) in place.

    Returns (stats, learned other initializers: name -> array, empty unless ``train_rest``).
    """
    torch.manual_seed(seed)
    rest = _other_float_initializers(model, set(modules)) if settings.train_rest else []
    graph = TorchGraph(model, trainable=rest)
    graph.train()
    parameters = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    parameters += [graph.initializer(name) for name in rest]
    optimizer = torch.optim.Adam(parameters, lr=settings.lr)
    kinds = [_loss_kind(t, settings.loss) for t in teacher[0]]

    rng = np.random.default_rng(seed)
    per_epoch = sum(1 for _ in calib.batches(settings.batch_size))
    total = settings.steps if settings.steps is not None else settings.epochs * per_epoch
    losses: list[float] = []
    step = 0
    with progress_bar(total=total, desc="fine-tuning e2e", unit="step", enabled=progress) as bar:
        while step < total:
            for indices, feed, labels in calib.batches(settings.batch_size, rng):
                if step >= total:
                    break
                overrides = {name: module() for name, module in modules.items()}
                outputs = graph({k: torch.from_numpy(v) for k, v in feed.items()}, overrides)
                loss = torch.zeros(())
                for o, (student, kind) in enumerate(zip(outputs, kinds)):
                    if kind is None:
                        continue
                    target = torch.from_numpy(np.concatenate([teacher[i][o] for i in indices]))
                    loss = loss + distillation_loss(student, target, kind)
                if labels is not None:
                    loss = loss + F.cross_entropy(outputs[0], torch.from_numpy(labels))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for module in modules.values():
                    module.after_step(step, total)
                losses.append(float(loss.detach()))
                step += 1
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
            for module in modules.values():
                module.end_epoch(step // max(per_epoch, 1) - 1, math.ceil(total / max(per_epoch, 1)))
    learned = {name: graph.initializer(name).detach().numpy().copy() for name in rest}
    window = max(1, min(len(losses) // 10, per_epoch))
    stats = {
        "steps": step,
        "loss_first": float(np.mean(losses[:window])) if losses else None,
        "loss_last": float(np.mean(losses[-window:])) if losses else None,
        "losses": [_loss_kind_name(k) for k in kinds],
        "trained_other_initializers": len(rest),
    }
    return stats, learned


def _loss_kind(teacher_output: np.ndarray, setting: str) -> str | None:
    if teacher_output.dtype.kind != "f":
        return None
    if setting == "auto":
        return "kl" if is_class_scores(teacher_output) else "mse"
    return setting


def _loss_kind_name(kind: str | None) -> str:
    return kind or "none (not float)"


def _other_float_initializers(model: ir.Model, quantized: set[str]) -> list[str]:
    return [
        name
        for name, value in model.graph.initializers.items()
        if name not in quantized
        and value.const_value is not None
        and value.const_value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)
        and not value.is_graph_input()
    ]
