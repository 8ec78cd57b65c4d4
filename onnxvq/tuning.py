"""The calibration-driven steps of ``compress``: fine-tuning and output-quality measurement.

Given encoded weights (already data-aware when calibration data was given), this

1. measures the task-agnostic quality of the encoded model on the held-back samples
   (:mod:`onnxvq.output_quality`; onnxruntime, weights decoded from their packed form, so exactly
   what the written model computes);
2. fine-tunes (``layer`` or ``e2e``, :mod:`onnxvq.finetune_settings`) through each method's
   trainable module, importing torch only here;
3. measures again, and writes the learned tensors back into the ``Encoded`` values.

Layer-wise mode goes through the layers in graph order and captures each one's inputs from the
model as it stands then (Gauss-Seidel: earlier layers already fine-tuned), so every layer learns
to undo the remaining error of the layers before it, against the original model's outputs of
that layer. (Capturing all layers at once from the encoded model, Jacobi style, was measured
worse than no training: each layer then also corrects upstream errors that upstream training
removes.)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxvq import channel_scales
from onnxvq.activations import LayerInputs, capture_inputs, run_model
from onnxvq.calibration import CalibrationSet
from onnxvq.candidates import Layer
from onnxvq.finetune_settings import FinetuneSettings
from onnxvq.layout import WeightLayout
from onnxvq.methods.base import Encoded, Method, MethodParams
from onnxvq.output_quality import OutputQuality, output_quality
from onnxvq.progress import progress as progress_bar

if TYPE_CHECKING:
    from onnxvq.pwlu_stage import ActivationPlan

__all__ = ["WeightJob", "finetune", "output_sqnr_db"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class WeightJob:
    """One weight being encoded, for every layer that reads it."""

    group: list[Layer]
    method: Method
    params: MethodParams
    layout: WeightLayout
    encoded: Encoded
    decode: Callable[[Encoded], np.ndarray]  # Encoded -> dense weight, as the written model has it
    finetune_stats: dict = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.group[0].weight.name


def output_sqnr_db(weight: np.ndarray, approximation: np.ndarray, layout: WeightLayout, hessian: np.ndarray | None,
                   row_weights: np.ndarray | None = None) -> float:
    """``10 log10(sum_r w_r m_r' H m_r / sum_r w_r e_r' H e_r)``, ``e = m - m^``: the layer's output
    SQNR on the calibration inputs (H their second moment, or its diagonal; the identity when None,
    for an embedding table, whose rows ``w`` weights by how often they are read; w = 1 when None)."""
    m = layout.to_matrix(weight).astype(np.float64)
    e = m - layout.to_matrix(approximation)
    if hessian is None:
        signal_rows, noise_rows = (m * m).sum(axis=1), (e * e).sum(axis=1)
    elif hessian.ndim == 1:
        signal_rows, noise_rows = (m * m) @ hessian, (e * e) @ hessian
    else:
        signal_rows, noise_rows = np.empty(len(m)), np.empty(len(m))
        for start in range(0, len(m), 1024):
            mb, eb = m[start : start + 1024], e[start : start + 1024]
            signal_rows[start : start + 1024] = ((mb @ hessian) * mb).sum(axis=1)
            noise_rows[start : start + 1024] = ((eb @ hessian) * eb).sum(axis=1)
    w = np.ones(len(m)) if row_weights is None else np.asarray(row_weights, np.float64)
    signal, noise = float(signal_rows @ w), float(noise_rows @ w)
    if noise <= 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def finetune(
    model: ir.Model,
    jobs: list[WeightJob],
    train: CalibrationSet,
    held: CalibrationSet | None,
    settings: FinetuneSettings,
    *,
    seed: int,
    progress: bool = False,
    vectors_per_sample: dict[str, float] | None = None,
    activations: ActivationPlan | None = None,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Fine-tune ``jobs`` in place (their ``encoded`` is replaced by the learned one).

    ``activations``: the PWLU plan (:class:`onnxvq.pwlu_stage.ActivationPlan`). Layer-wise, each
    site's PWLU is fitted when the walk reaches it, and the layers after it train on its outputs
    (``plan.fitted`` is filled); then the model's output with and without the PWLUs decides
    (``plan.check``), and where they do not help the layers are trained again without them;
    end to end, the PWLUs in ``plan.fitted`` train with the weights
    (their ``params`` are updated in place).

    Returns (a JSON-able record: qualities before/after, mode used and why, step counts;
    learned values of other initializers, only with ``train_rest``).
    """
    evaluation = held or train
    reference = run_model(model, evaluation)
    if activations is not None:
        activations.reference = reference
    quality: dict[str, OutputQuality] = {}
    quality["encoded"] = _quality(model, jobs, evaluation, reference)
    record: dict = {"mode": settings.mode, "quality": quality}
    learned_rest: dict[str, np.ndarray] = {}
    mode = settings.mode
    if mode == "e2e":
        from onnxvq.finetune.torch_graph import unsupported_ops

        missing = unsupported_ops(model)
        if missing:
            mode = "layer"
            record["fallback"] = (
                f"end-to-end needs every op in torch; the executor cannot run {', '.join(missing)}: "
                "fine-tuned layer-wise instead"
            )
            logger.warning(record["fallback"])
    record["mode"] = mode
    if mode == "none" or not jobs:
        return record, learned_rest

    import torch  # FinetuneSettings.make checked that it is installed

    torch.manual_seed(seed)
    modules = {job.name: channel_scales.trainable(job.method, job.encoded, job.layout, job.params) for job in jobs}
    # The backward of a codebook gather accumulates in a thread-dependent order; deterministic
    # kernels make a fixed seed give the same bytes (the caller's setting is restored after).
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        if mode == "layer":
            _layer_wise(model, jobs, modules, train, settings, seed=seed, progress=progress,
                        vectors_per_sample=vectors_per_sample or {}, activations=activations)
            if activations is not None and activations.kept:
                activations.check = _check_pwlus(model, jobs, modules, evaluation, reference, activations)
                if not activations.check.helps:
                    # The layers after each PWLU trained on its outputs: without the PWLUs they
                    # would be tuned to functions that are gone (ddddocr's detector: output SQNR
                    # 21.1 -> 20.5 dB). Train them again, from the same start, without.
                    logger.info("the PWLUs lowered the output SQNR; training the layers again without them")
                    activations.check = dataclasses.replace(activations.check, retrained=True)
                    torch.manual_seed(seed)
                    modules.update({job.name: channel_scales.trainable(job.method, job.encoded, job.layout, job.params)
                                    for job in jobs})
                    _layer_wise(model, jobs, modules, train, settings, seed=seed, progress=progress,
                                vectors_per_sample=vectors_per_sample or {})
        else:
            from onnxvq.finetune.end_to_end import train_end_to_end

            student, names, trained = None, [], []
            if activations is not None and activations.kept:
                from onnxvq.pwlu_stage import trainable_names, with_pwlu

                trained = activations.kept
                student = with_pwlu(model, trained)
                names = trainable_names(student, trained)
            record["e2e"], learned_rest = train_end_to_end(
                model, modules, train, settings, seed=seed, held=held, progress=progress,
                student=student, extra_trainable=[n for pair in names for n in pair],
            )
            for fitted, (knots, slopes) in zip(trained, names):
                fitted.params.knots = learned_rest.pop(knots).reshape(len(fitted.params.knots), -1).astype(np.float64)
                fitted.params.slopes = learned_rest.pop(slopes).reshape(2, -1).astype(np.float64)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    for job in jobs:
        job.encoded = modules[job.name].to_encoded()
        job.finetune_stats.update(modules[job.name].stats())
    quality["fine-tuned"] = _quality(model, jobs, evaluation, reference, learned_rest)
    return record, learned_rest


def _layer_wise(model, jobs, modules, train, settings, *, seed, progress, vectors_per_sample, activations=None) -> None:
    """Gauss-Seidel over the layers in graph order: each layer's inputs are captured from the
    model as it stands (earlier layers already fine-tuned, later ones encoded), then it trains.

    Layers of the main graph get their inputs from one walk through the graph
    (:mod:`onnxvq.graph_walk`), a pass over the data in total, on as many samples as the layer
    with the fewest input vectors per sample needs for its kept rows (at least 16). The others
    (a weight shared by several layers, a layer inside a control-flow body) are captured from
    the whole model, on the samples they need.
    """

    from onnxvq.graph_walk import GraphWalk

    def needed(job: WeightJob) -> int:
        per_sample = max(vectors_per_sample.get(job.name, 1.0), 1e-9)
        return max(16, math.ceil(2 * settings.max_rows / per_sample))

    current = {job.name: job.decode(job.encoded) for job in jobs}
    switches = None
    if activations is not None and activations.sites:
        from onnxvq.pwlu_stage import SwitchedActivations

        activations.fitted = []
        switches = SwitchedActivations(model, activations.sites, activations.intervals, activations.channelwise)
    try:
        walk = GraphWalk(
            model, train.subset(max(needed(job) for job in jobs)),
            weights={**{job.name: job.group[0].weight_array() for job in jobs}, **(switches.original if switches else {})},
            max_rows=settings.max_rows, batch_size=settings.batch_size, seed=seed,
        )
        _train_layers(walk, model, jobs, modules, train, settings, current, needed, switches, activations,
                      seed=seed, progress=progress)
    finally:
        if switches is not None:
            switches.remove()
    logger.info("layer-wise: %d graph segments run, frontiers up to %.0f MiB", walk.segments_run,
                walk.frontier_bytes / 2**20)


def _train_layers(walk, model, jobs, modules, train, settings, current, needed, switches, activations, *, seed,
                  progress) -> None:
    """The loop of :func:`_layer_wise`: each layer captured and trained in graph order, and each
    activation site's PWLU fitted when the walk reaches it."""
    from onnxvq.finetune.layerwise import train_layer

    # Sites in the walk's order; each is fitted once the walk reaches it, before the next layer's
    # inputs are captured (so that layer trains on its outputs), the last ones after the loop.
    pending = sorted(activations.sites if switches is not None else [],
                     key=lambda site: walk.position.get(site.nodes[0], -1))
    rng = np.random.default_rng(seed)

    def fit_sites_before(position: float) -> None:
        while pending and walk.position.get(pending[0].nodes[0], -1) < position:
            _fit_site_from_walk(walk, pending.pop(0), current, switches, activations, rng)

    with progress_bar(total=len(jobs), desc="fine-tuning layers", unit="layer", enabled=progress) as bar:
        for job in jobs:
            if walk.follows(job.group):
                fit_sites_before(walk.position[job.group[0].node])
                data: LayerInputs | None = walk.inputs(job.group, current)
            else:
                others = {name: w for name, w in current.items() if name != job.name}
                data = capture_inputs(
                    model, job.group, train.subset(needed(job)), quantized=others or None,
                    max_rows=settings.max_rows, batch_size=settings.batch_size, seed=seed, moments=False,
                ).get(job.name)
            if data is not None:
                if data.reference_inputs is None:  # nothing upstream is quantized
                    data = dataclasses.replace(data, reference_inputs=data.inputs)
                stats = train_layer(
                    modules[job.name],
                    job.group[0].weight_array().astype(np.float32),
                    job.layout,
                    data,
                    epochs=settings.epoch_count,
                    steps=settings.steps,
                    lr=settings.lr,
                    batch_rows=settings.layer_batch_rows,
                    seed=seed,
                )
                job.finetune_stats.update(stats)
                current[job.name] = job.decode(modules[job.name].to_encoded())
                bar.set_postfix(loss=f"{stats['loss_after']:.4g}", refresh=False)
            bar.update()
    fit_sites_before(math.inf)


def _fit_site_from_walk(walk, site, current, switches, activations, rng) -> None:
    """Fit ``site``'s PWLU on its inputs as the walk sees them now (every layer before it
    trained, every PWLU before it in place); switch it on for what follows when it lowers the
    error."""
    from onnxvq.pwlu_stage import CAPTURE_VALUES, as_rows, fit_site

    values = walk.values(site.input, site.nodes[0], current)
    if values is None:  # the walk is past it (a branch ordered earlier): the activation stays
        return
    rows_o, rows_q = [], []
    for x_o, x_q in zip(*values):
        o, q = as_rows(x_o, site, activations.channelwise), as_rows(x_q, site, activations.channelwise)
        per_batch = -(-CAPTURE_VALUES // o.shape[1] // len(values[0]))
        pick = rng.choice(len(o), size=min(per_batch, len(o)), replace=False)
        rows_o.append(o[pick])
        rows_q.append(q[pick])
    fitted = fit_site(site, np.concatenate(rows_q), np.concatenate(rows_o), activations.intervals, rng)
    activations.fitted.append(fitted)
    if fitted.kept:
        current.update(switches.feeds(fitted))


def _check_pwlus(model, jobs, modules, evaluation, reference, activations: ActivationPlan):
    """The model's output on ``evaluation`` with the trained weights of ``modules``, without and
    with the PWLUs the layer-wise walk kept (:func:`onnxvq.pwlu_stage.check_pwlus`)."""
    from onnxvq.pwlu_stage import check_pwlus

    trained = {job.name: job.decode(modules[job.name].to_encoded()) for job in jobs}
    without = output_quality(reference, run_model(model, evaluation, quantized=trained), evaluation.labels)
    return check_pwlus(model, activations.kept, trained, evaluation, reference, without)


def _quality(model, jobs, samples, reference, rest: dict[str, np.ndarray] | None = None) -> OutputQuality:
    quantized = {job.name: job.decode(job.encoded) for job in jobs}
    quantized.update(rest or {})
    outputs = run_model(model, samples, quantized=quantized)
    return output_quality(reference, outputs, samples.labels)
