"""End-to-end fine-tuning: the whole ONNX graph runs in torch, the quantized layers learn.

The original graph is interpreted by :class:`onnxvq.finetune.torch_graph.TorchGraph`; each
quantized weight's value is overridden by its trainable module's output, so gradients reach the
method's tensors (codebooks, ...) and nothing else, unless ``train_rest`` also opens the other
float initializers. The loss over a batch is

    sum over float outputs o of  D(student_o, teacher_o)   +   CE(student_0, labels) if labels

with the teacher outputs those of the original model (onnxruntime). With ``augment`` ``mixup``
(the default, without labels) each batch is made of mixes of calibration samples and the teacher
labels it afresh (:class:`_Mixup`); otherwise the teacher's outputs on the samples are computed
once. Adam's rate falls along a cosine to 0 over the steps. With
``FinetuneSettings.loss`` ``auto``, an output computed by ``Softmax``/``LogSoftmax`` or
``Sigmoid`` is compared on its logits, as the allocation's sensitivity does
(:func:`onnxvq.sensitivity.measured_output`): ``D`` is the mean over rows of
``KL(p_t || p_s)`` of the class distributions along the op's axis (a recognizer's
(batch, time, classes) output included), or of the Bernoulli distributions elementwise; a 2-D
output not made by such an op is taken as class scores (KL of the softmaxes of its rows); any
other output gets the normalised squared error ``mean (s - t)^2 / mean t^2``. A squared error of
probabilities barely sees thousands of classes' mass move until the top one flips. ``kl`` and
``mse`` force one divergence on the graph outputs themselves.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from onnxvq.activations import _TapSession, values_by_name
from onnxvq.candidates import weight_feeds
from onnxvq.calibration import CalibrationSet, join_feeds
from onnxvq.finetune.torch_graph import TorchGraph
from onnxvq.finetune.trainable import TrainableWeight
from onnxvq.finetune_settings import E2E_MAX_STEPS, E2E_MIN_GAIN, E2E_MIN_STEPS, E2E_PATIENCE, FinetuneSettings
from onnxvq.output_quality import is_class_scores
from onnxvq.progress import progress as progress_bar
from onnxvq.sensitivity import ELEMENTWISE, measured_output

logger = logging.getLogger(__name__)

__all__ = ["HELD_CHECKS", "distillation_loss", "train_end_to_end"]

HELD_CHECKS = 10  # held-out measurements during training (plus one before)


@dataclasses.dataclass(frozen=True)
class _Target:
    """One compared value: its loss kind (``kl``: softmax rows of the last axis, ``mse``,
    ``logits``: softmax along ``axis``, ``bernoulli``: elementwise sigmoid)."""

    kind: str
    axis: int = -1
    flatten: bool = False


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, target: _Target | str) -> torch.Tensor:
    if isinstance(target, str):
        target = _Target(target)
    if target.kind == "bernoulli":
        # KL of Bernoulli(sigmoid t) from Bernoulli(sigmoid s), with log sigmoid(x) = -softplus(-x)
        p = torch.sigmoid(teacher)
        return (p * (F.softplus(-student) - F.softplus(-teacher))
                + (1 - p) * (F.softplus(student) - F.softplus(teacher))).mean()
    if target.kind in ("kl", "logits"):
        axis = target.axis
        if target.flatten:  # opset < 13 Softmax: the classes are every axis from ``axis`` on
            axis = axis % max(teacher.ndim, 1)
            rows = math.prod(teacher.shape[:axis])
            student, teacher, axis = student.reshape(rows, -1), teacher.reshape(rows, -1), -1
        log_p_s = F.log_softmax(student, dim=axis)
        log_p_t = F.log_softmax(teacher, dim=axis)
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(axis).mean()
    return ((student - teacher) ** 2).mean() / ((teacher**2).mean() + 1e-12)


def train_end_to_end(
    model: ir.Model,
    modules: dict[str, TrainableWeight],
    calib: CalibrationSet,
    settings: FinetuneSettings,
    *,
    seed: int,
    held: CalibrationSet | None = None,
    progress: bool = False,
    student: ir.Model | None = None,
    extra_trainable: list[str] = (),
) -> tuple[dict, dict[str, np.ndarray]]:
    """Train ``modules`` (weight name -> module; the dict's values are replaced by the kept ones).

    ``student``: the graph that trains, when it is not ``model`` (``model`` with PWLU activations,
    :mod:`onnxvq.pwlu_stage`); the teacher is always ``model``. ``extra_trainable``: initializer
    names of the student that train too (PWLU knots and slopes) and come back in the learned
    values.

    With ``held`` samples, the distillation loss on them is measured before training and
    :data:`HELD_CHECKS` times during it, and the modules (and ``train_rest`` tensors) of the
    lowest held-out loss are kept, the untrained ones included: a few dozen calibration samples
    are easy to overfit (PP-OCRv6's recognizer at 8x, 22 samples, 200 steps: char_acc 0.996 ->
    0.979 without this check). Without ``steps`` or ``epochs`` and with ``held`` samples, the
    cosine is laid over :data:`~onnxvq.finetune_settings.E2E_MAX_STEPS` steps (or 10 epochs),
    and training ends after :data:`~onnxvq.finetune_settings.E2E_PATIENCE` checks when none of
    them has lowered the untrained held-out loss by
    :data:`~onnxvq.finetune_settings.E2E_MIN_GAIN` (relative).

    Returns (stats, learned other initializers: name -> array, empty unless ``train_rest`` or
    ``extra_trainable``).
    """
    torch.manual_seed(seed)
    student = model if student is None else student
    compared, targets = _compared_model(model, settings.loss)
    # One onnxruntime session of the original model labels the samples, the held-back ones and
    # the mixed batches; with mixup the samples' own outputs are never used past the first.
    teacher_session = _TapSession(compared, {}, None)
    mixing = _Mixup(calib, teacher_session) if settings.augment == "mixup" and calib.labels is None else None
    teacher = None if mixing is not None else [teacher_session.run_outputs(feed) for feed in calib.samples]
    first = teacher[0] if teacher is not None else teacher_session.run_outputs(calib.samples[0])
    targets = [(t or _plain_target(first[o])) if first[o].dtype.kind == "f" else None
               for o, t in enumerate(targets)]
    trained = compared if student is model else _compared_model(student, settings.loss)[0]
    weights = values_by_name(trained.graph)

    def overrides_now() -> dict[str, torch.Tensor]:
        """Each module's dense weight, where the graph reads it (a recurrent op's W and R apart)."""
        return {value.name: part for name, module in modules.items() for value, part in weight_feeds(weights[name], module())}

    rest = []
    if settings.train_rest:
        # Every initializer a module's value overrides, a recurrent op's R beside its joined W:
        # none of them is "rest" (opened, R would train in vain and come back as the dense original).
        with torch.no_grad():
            rest = _other_float_initializers(trained, set(overrides_now()))
    rest = list(dict.fromkeys([*rest, *extra_trainable]))
    graph = TorchGraph(trained, trainable=rest)
    graph.train()

    held_teacher = ([teacher_session.run_outputs(feed) for feed in held.samples]
                    if held is not None and len(held.samples) else None)

    def held_loss() -> float:
        with torch.no_grad():
            overrides = overrides_now()
            total = 0.0
            for indices, feed, _ in held.batches(settings.batch_size):
                outputs = graph({k: torch.from_numpy(v) for k, v in feed.items()}, overrides)
                total += float(_summed_loss(outputs, targets, _teacher_of(held_teacher, indices))) * len(indices)
            return total / len(held.samples)

    def snapshot() -> tuple[dict, dict]:
        return ({name: copy.deepcopy(module) for name, module in modules.items()},
                {name: graph.initializer(name).detach().clone() for name in rest})

    held_losses: list[tuple[int, float]] = []
    best = None
    if held_teacher is not None:
        held_losses.append((0, held_loss()))
        best = (0, held_losses[0][1], snapshot())
    # Without held-back samples, the untrained state is what a diverging run falls back to.
    untrained = (0, math.inf, snapshot()) if best is None else None
    diverged_at = None
    parameters = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    parameters += [graph.initializer(name) for name in rest]
    optimizer = torch.optim.Adam(parameters, lr=settings.lr)

    rng = np.random.default_rng(seed)
    per_epoch = sum(1 for _ in calib.batches(settings.batch_size))
    stop_early = False  # only the default length, with held-back samples, may end early
    if settings.steps is not None:
        total = settings.steps
    elif settings.epochs is not None:
        total = settings.epochs * per_epoch
    elif best is not None:
        total = max(settings.epoch_count * per_epoch, E2E_MAX_STEPS)
        stop_early = True
    else:
        total = max(settings.epoch_count * per_epoch, E2E_MIN_STEPS)
    stopped = False
    # The rate falls to 0 along a cosine over the steps: mixed batches keep the gradient noisy,
    # and at a constant rate the held-out loss swings from check to check late in training.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    losses: list[float] = []
    step = 0
    with progress_bar(total=total, desc="fine-tuning e2e", unit="step", enabled=progress) as bar:
        while step < total and not stopped:
            for indices, feed, labels in calib.batches(settings.batch_size, rng):
                if step >= total or stopped:
                    break
                if mixing is not None:
                    feed, reference = mixing(indices, rng)
                else:
                    reference = _teacher_of(teacher, indices)
                overrides = overrides_now()
                outputs = graph({k: torch.from_numpy(v) for k, v in feed.items()}, overrides)
                loss = _summed_loss(outputs, targets, reference)
                if labels is not None:
                    loss = loss + F.cross_entropy(outputs[0], torch.from_numpy(labels))
                if not torch.isfinite(loss):
                    # One step on a NaN or infinite loss makes every trained tensor NaN: training
                    # ends here and the best state so far (or the untrained one) is kept.
                    diverged_at, stopped = step, True
                    logger.warning("e2e fine-tuning: the loss is %s at step %d; training ended there and "
                                   "kept %s", float(loss.detach()), step,
                                   "the untrained state" if best is None else "the state of the lowest held-out loss")
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                for module in modules.values():
                    module.after_step(step, total)
                losses.append(float(loss.detach()))
                step += 1
                if best is not None and (step % max(1, total // HELD_CHECKS) == 0 or step == total):
                    held_losses.append((step, held_loss()))
                    if held_losses[-1][1] < best[1]:
                        best = (step, held_losses[-1][1], snapshot())
                    stopped = stop_early and not _pays([value for _, value in held_losses])
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
            for module in modules.values():
                module.end_epoch(step // max(per_epoch, 1) - 1, math.ceil(total / max(per_epoch, 1)))
    kept_step = step
    fallback = best if best is not None else (untrained if diverged_at is not None else None)
    if fallback is not None and fallback[0] != step:
        kept_step, _, (kept_modules, kept_rest) = fallback
        modules.update(kept_modules)
        with torch.no_grad():
            for name, value in kept_rest.items():
                graph.initializer(name).copy_(value)
    learned = {name: graph.initializer(name).detach().numpy().copy() for name in rest}
    window = max(1, min(len(losses) // 10, per_epoch))
    stats = {
        "steps": step,
        "planned_steps": total,
        "stopped_early": stopped and diverged_at is None,
        "diverged_at": diverged_at,
        "loss_first": float(np.mean(losses[:window])) if losses else None,
        "loss_last": float(np.mean(losses[-window:])) if losses else None,
        "losses": [target.kind if target else "none (not float)" for target in targets],
        "augment": "mixup" if mixing is not None else "none",
        "trained_other_initializers": len(rest),
        "held_losses": [[at, round(value, 6)] for at, value in held_losses],
        "kept_step": kept_step,
    }
    return stats, learned


def _pays(held_losses: list[float]) -> bool:
    """False once :data:`E2E_PATIENCE` checks after the untrained one (the first value) are in
    and none has lowered it by :data:`E2E_MIN_GAIN` (relative); True before that."""
    if len(held_losses) <= E2E_PATIENCE:
        return True
    return min(held_losses[1:]) < (1.0 - E2E_MIN_GAIN) * held_losses[0]


def _teacher_of(teacher: list[list[np.ndarray]], indices) -> list[np.ndarray]:
    """The teacher's outputs of the samples ``indices``, joined as the batch joins them."""
    return [np.concatenate([teacher[i][o] for i in indices]) for o in range(len(teacher[indices[0]]))]


def _summed_loss(outputs, targets, reference: list[np.ndarray]) -> torch.Tensor:
    """Sum over compared outputs of the distillation loss against the teacher's ``reference``."""
    loss = torch.zeros(())
    for student, target, expected in zip(outputs, targets, reference):
        if target is not None:
            loss = loss + distillation_loss(student, torch.from_numpy(expected), target)
    return loss


class _Mixup:
    """Mixed calibration samples and the teacher's outputs on them (function matching, Beyer et
    al. 2022, "Knowledge distillation: a good teacher is patient and consistent").

    Each sample ``x_i`` of a batch is replaced by ``lam x_i + (1 - lam) x_j``, with ``j`` drawn
    among the samples of the same input shapes (``i`` itself included) and ``lam ~ U(0, 1)`` per
    sample; integer inputs stay those of ``x_i``. The teacher (the original model in
    onnxruntime) labels every mixed batch afresh, so the student is matched to the teacher on
    points between the calibration samples, not only on them: a few dozen samples are otherwise
    learned by heart (PP-OCRv6's recognizer at 16x, 43 lines: training loss 3.5e-4, held-out
    loss lowest after 100 of 1000 steps and rising after).
    """

    def __init__(self, calib: CalibrationSet, teacher: _TapSession):
        self.samples = calib.samples
        self.session = teacher
        self.alike: dict[tuple, list[int]] = {}
        self.key_of = []
        for i, sample in enumerate(self.samples):
            key = tuple((name, a.shape, a.dtype.str) for name, a in sorted(sample.items()))
            self.alike.setdefault(key, []).append(i)
            self.key_of.append(key)

    def __call__(self, indices, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        mixed = []
        for i in indices:
            j = int(rng.choice(self.alike[self.key_of[i]]))
            lam = rng.uniform()
            mixed.append({
                name: (lam * a + (1 - lam) * self.samples[j][name]).astype(a.dtype) if a.dtype.kind == "f" else a
                for name, a in self.samples[i].items()
            })
        feed = join_feeds(mixed)
        return feed, self.session.run_outputs(feed)


def _compared_model(model: ir.Model, setting: str) -> tuple[ir.Model, list[_Target | None]]:
    """A copy of ``model`` whose outputs are the values the loss compares (see the module
    docstring), and how each is compared (None: by :func:`_plain_target` on its values)."""
    compared = model.clone()
    outputs = list(compared.graph.outputs)
    if setting != "auto":
        return compared, [_Target(setting)] * len(outputs)
    opset = compared.opset_imports.get("", 13)
    inputs = set(compared.graph.inputs)
    values, targets = [], []
    for value in outputs:
        measured = measured_output(value, opset)
        # a logits value that is a graph input carries no gradient; one that is already
        # compared (a model with both the logits and the softmax as outputs) is not twice
        if measured.axis is None or measured.value in inputs or measured.value in values or measured.value in outputs:
            values.append(value)
            targets.append(None)  # kl or mse, decided on the teacher's values
        else:
            values.append(measured.value)
            targets.append(_Target("bernoulli") if measured.axis == ELEMENTWISE
                           else _Target("logits", measured.axis, measured.flatten))
    compared.graph.outputs.clear()
    compared.graph.outputs.extend(values)
    return compared, targets


def _plain_target(teacher_output: np.ndarray) -> _Target:
    return _Target("kl" if is_class_scores(teacher_output) else "mse")


# The inputs at which an initializer is a parameter of the layer that reads it (op type -> input
# indices; _ELEMENTWISE_OPERAND: either operand of an elementwise op, when the tensor has more than
# one entry: a bias, a norm's scale or shift). Every other float initializer is the graph's own
# arithmetic: a Pow's exponent, LayerNorm's epsilon, hard-sigmoid's 3 and 6, BatchNormalization's
# running statistics, Resize's scales, Clip's bounds. Trained, those break the graph: on
# PP-OCRv6's recognizer, the exponent 2 of LayerNorm's Pow got a NaN gradient on the first step
# (d x^p / dp = x^p ln x, with x < 0) and every loss after it was NaN.
_ELEMENTWISE_OPERAND = "elementwise"
_LEARNABLE_INPUTS: dict[str, set[int] | str] = {
    "Conv": {1, 2}, "ConvTranspose": {1, 2}, "Gemm": {0, 1, 2}, "MatMul": {0, 1},
    "BatchNormalization": {1, 2}, "LayerNormalization": {1, 2}, "InstanceNormalization": {1, 2},
    "GroupNormalization": {1, 2}, "PRelu": {1}, "LSTM": {1, 2, 3}, "GRU": {1, 2, 3}, "RNN": {1, 2, 3},
    "Add": _ELEMENTWISE_OPERAND, "Sub": _ELEMENTWISE_OPERAND, "Mul": _ELEMENTWISE_OPERAND,
    "Div": _ELEMENTWISE_OPERAND,
}


def _other_float_initializers(model: ir.Model, quantized: set[str]) -> list[str]:
    """The float initializers ``train_rest`` opens: those not quantized whose every use (at least
    one, in the main graph) is a layer's parameter (:data:`_LEARNABLE_INPUTS`)."""
    return [
        name
        for name, value in model.graph.initializers.items()
        if name not in quantized
        and value.const_value is not None
        and value.const_value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)
        and not value.is_graph_input()
        and _is_learnable(value)
    ]


def _is_learnable(value: ir.Value) -> bool:
    """True when every use of ``value`` (and there is one) is a learnable input of its node."""
    uses = value.uses()
    if not uses:
        return False
    for use in uses:
        inputs = _LEARNABLE_INPUTS.get(use.node.op_type) if use.node.domain in ("", "ai.onnx") else None
        if inputs is None:
            return False
        if inputs == _ELEMENTWISE_OPERAND:
            if value.const_value.size <= 1:
                return False
        elif use.idx not in inputs:
            return False
    return True
