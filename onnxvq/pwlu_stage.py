"""The PWLU step of ``compress --activations pwlu``: activations behind the model's layers become
learnable piecewise-linear functions that win back part of what quantization took.

Per site (:mod:`onnxvq.activation_sites`), from its input captured at the same random positions
in the original model (``x_o``) and in the quantized one (``x_q``), :func:`fit_site`:

1. **initialises** a PWLU that reproduces the activation, bounds from ``x_q`` (mean ± 3 std per
   group, aligned so the activation's kinks fall on knots; :func:`onnxvq.pwlu.initial_parameters`);
2. **fits** its knots and slopes by least squares from ``x_q`` to the original activation's
   output ``f(x_o)`` (:func:`onnxvq.pwlu.fit`) on three quarters of the positions; the other
   quarter decides: a group (the layer's one function, or a channel's) keeps its fit only where
   it lowers the held-out error, and a site whose PWLU does not lower its error below the
   original activation's, ``f(x_q)``, is put back as the original op.

Where the sites are fitted:

* ``--finetune layer``: inside the layer-wise walk (:func:`onnxvq.tuning.finetune`), each when
  the walk reaches it, every layer and PWLU before it already in place, so that the layers after
  it train on its outputs (:class:`SwitchedActivations` lets one graph run either function).
  Fitting every site from one capture of the fine-tuned model instead (:func:`fit_activations`,
  what :func:`learn_activations` falls back to where the walk fitted nothing) ignores that each
  layer after a site has learned to undo the error the site sees: on the tests' model it took the
  output from 16 dB to 2 dB where the walk took it to 22 dB.
* ``--finetune e2e``: the PWLUs start as the activations (:func:`fit_activations` with
  ``refit=False``) and their knots and slopes train with the encoded weights
  (:func:`onnxvq.finetune.end_to_end.train_end_to_end`, ``extra_trainable``).

Then the model is **checked** (:func:`check_pwlus`): its output with and without the PWLUs on
the held-back samples; if the PWLUs do not raise the output SQNR, all are put back (the summary
says so). Layer-wise fine-tuning checks before it returns and, where they do not help, trains
the layers again without them, since the layers after each site were tuned to its outputs;
:func:`learn_activations` reports that check, or makes it after end-to-end training.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from onnxvq.activation_sites import ActivationSite
from onnxvq.activations import _TapSession, run_model
from onnxvq.calibration import CalibrationSet
from onnxvq.output_quality import OutputQuality, output_quality
from onnxvq.progress import progress as progress_bar
from onnxvq.pwlu import PWLUParameters, fit, initial_parameters, squared_error

__all__ = [
    "CAPTURE_VALUES",
    "ActivationPlan",
    "FittedActivation",
    "PWLUCheck",
    "SwitchedActivations",
    "as_rows",
    "check_pwlus",
    "fit_activations",
    "fit_site",
    "learn_activations",
    "sites_behind",
    "trainable_names",
    "with_pwlu",
]

# Captured values per site and model (float32): ``x_q`` and ``x_o`` of ~2**19 values each.
CAPTURE_VALUES = 2**19
# Samples per capture run: every site's activation comes back at once (PP-OCRv6's detector:
# about 40 maps of up to 20 MB per sample and model).
_CAPTURE_BATCH = 1


@dataclasses.dataclass(eq=False)
class FittedActivation:
    """A site, its fitted parameters and what the fit measured (squared errors against the
    original activation's output on the held-out positions, summed over groups)."""

    site: ActivationSite
    params: PWLUParameters
    error_original: float  # f(x_q) against f(x_o)
    error_pwlu: float  # PWLU(x_q) against f(x_o)
    groups_fitted: int  # groups whose fit was kept (the others reproduce f)
    refit: bool = True  # False: the PWLU reproduces f, end-to-end training learns it

    @property
    def kept(self) -> bool:
        """Trained end to end, or fitted in some group and better than the activation there."""
        return not self.refit or (self.groups_fitted > 0 and self.error_pwlu < self.error_original)

    def record(self) -> dict:
        return {"kind": self.site.kind, "groups": int(self.params.bounds.shape[1]),
                "groups_fitted": self.groups_fitted, "intervals": self.params.intervals,
                "error_gain_db": _gain_db(self.error_original, self.error_pwlu), "kept": self.kept}


@dataclasses.dataclass(eq=False)
class ActivationPlan:
    """The PWLUs of one compress: the sites and settings; fine-tuning fills ``fitted``."""

    sites: list[ActivationSite]
    intervals: int
    channelwise: bool
    fitted: list[FittedActivation] = dataclasses.field(default_factory=list)
    # Set by layer-wise fine-tuning, which checks its PWLUs itself before it returns (and trains
    # the layers again without them where they do not help): :func:`learn_activations` reports it.
    check: PWLUCheck | None = None
    # The original model's outputs on the evaluation samples (the held-back ones, else the
    # training ones), set by fine-tuning, which runs it first: the check need not run it again.
    reference: list | None = None

    @property
    def kept(self) -> list[FittedActivation]:
        return [f for f in self.fitted if f.kept]


@dataclasses.dataclass(frozen=True)
class PWLUCheck:
    """The model's output quality against the original's without and with the kept PWLUs (the
    same weights), and whether the PWLUs stay: only where they raise the output SQNR."""

    without: OutputQuality
    with_pwlu: OutputQuality
    retrained: bool = False  # the layers were trained again without the PWLUs

    @property
    def helps(self) -> bool:
        return self.with_pwlu.sqnr_db > self.without.sqnr_db

    def record(self) -> dict:
        record = {"output_sqnr_db": {"without": self.without.sqnr_db, "with": self.with_pwlu.sqnr_db}}
        if not self.helps:
            record["verdict"] = (f"the PWLUs lowered the model's output SQNR ({self.without.sqnr_db:.2f} -> "
                                 f"{self.with_pwlu.sqnr_db:.2f} dB): the activations are kept as they were"
                                 + ("; the layers after them were trained again without them" if self.retrained else ""))
        return record


def check_pwlus(model: ir.Model, kept: list[FittedActivation], quantized: dict[str, np.ndarray],
                evaluation: CalibrationSet, reference: list, without: OutputQuality) -> PWLUCheck:
    """:class:`PWLUCheck` of ``kept`` on ``evaluation`` (``reference``: the original model's
    outputs there; ``without``: the quality with ``quantized`` and no PWLU)."""
    outputs = run_model(with_pwlu(model, kept), evaluation, quantized=quantized)
    return PWLUCheck(without, output_quality(reference, outputs, evaluation.labels))


def fit_activations(
    model: ir.Model,
    sites: list[ActivationSite],
    quantized: dict[str, np.ndarray],
    calib: CalibrationSet,
    *,
    intervals: int,
    channelwise: bool,
    seed: int,
    progress: bool = False,
    refit: bool = True,
) -> list[FittedActivation]:
    """:func:`fit_site` for every site, their inputs captured from one run of the original model
    and of the model with ``quantized`` weights (weight name -> dense weight)."""
    if not sites:
        return []
    captured = _capture(model, sites, quantized, calib, channelwise=channelwise, seed=seed, progress=progress)
    rng = np.random.default_rng(seed)
    return [fit_site(site, *captured[site.name], intervals, rng, refit=refit) for site in sites]


def fit_site(site: ActivationSite, x_q: np.ndarray, x_o: np.ndarray, intervals: int, rng: np.random.Generator,
             *, refit: bool = True) -> FittedActivation:
    """Initialise and fit (module docstring) one site's PWLU from its captured rows (n, G); with
    ``refit`` False the PWLU only reproduces the activation (end-to-end training learns it)."""
    held = rng.random(len(x_q)) < 0.25
    target = site(x_o.astype(np.float64))
    train_q = x_q[~held].astype(np.float64)
    mean, std = np.nanmean(train_q, axis=0), np.nanstd(train_q, axis=0)
    init = initial_parameters(site.function, site.kinks, np.nan_to_num(mean - 3 * std), np.nan_to_num(mean + 3 * std),
                              intervals, samples=train_q[:4096])
    held_q, held_target = x_q[held].astype(np.float64), target[held]
    error_original = float(np.nansum((site(held_q) - held_target) ** 2))
    error_init = squared_error(init, held_q, held_target)
    if not refit:
        return FittedActivation(site=site, params=init, error_original=error_original,
                                error_pwlu=float(error_init.sum()), groups_fitted=0, refit=False)
    learned = fit(init, train_q, target[~held])
    error_fit = squared_error(learned, held_q, held_target)
    use = error_fit < error_init
    return FittedActivation(
        site=site, params=learned.select(use, init), error_original=error_original,
        error_pwlu=float(np.where(use, error_fit, error_init).sum()), groups_fitted=int(use.sum()),
    )


def as_rows(x: np.ndarray, site: ActivationSite, channelwise: bool) -> np.ndarray:
    """An activation input as rows (n, G): one column, or one per channel."""
    if not channelwise or site.channel_axis is None:
        return x.reshape(-1, 1).astype(np.float32, copy=False)
    return np.moveaxis(x, site.channel_axis, -1).reshape(-1, site.channels).astype(np.float32, copy=False)


class SwitchedActivations:
    """Each site's activation output chosen at run time between the activation and a PWLU, for
    layer-wise fine-tuning, which fits each PWLU when its walk reaches it
    (:func:`onnxvq.tuning.finetune`) so that the layers after it train on its outputs.

    Adds to ``model`` in place, per site: ``p = PWLU(x, bounds, knots, slopes)`` and
    ``y' = Where(on, p, y)`` read by every reader of ``y`` (the activation's output), with ``on``
    (bool) and the parameters as initializers; :attr:`original` holds their values that give
    the original model (``on`` False). :meth:`remove` takes it all out again.
    """

    def __init__(self, model: ir.Model, sites: list[ActivationSite], intervals: int, channelwise: bool):
        from onnxvq import ops
        from onnxvq.passes._values import register_initializer, value_names
        from onnxvq.passes.replace_activations_with_pwlu import parameter_tensors

        self.model = model
        self.sites = sites
        self.intervals, self.channelwise = intervals, channelwise
        self.original: dict[str, np.ndarray] = {}
        self.names: dict[str, dict[str, str]] = {}
        self._added: list[tuple[ir.Value, ir.Value, list[ir.Node]]] = []
        taken = value_names(model)
        graph = model.graph
        for site in sites:
            groups = site.channels if channelwise and site.channel_axis is not None else 1
            placeholder = initial_parameters(site.function, site.kinks, np.full(groups, -1.0), np.full(groups, 1.0),
                                             intervals)
            tensors = {"on": np.array(False), **parameter_tensors(site, placeholder)}
            values = {key: register_initializer(graph, f"{site.output.name}.pwlu_switch_{key}", array, taken)
                      for key, array in tensors.items()}
            self.names[site.name] = {key: value.name for key, value in values.items()}
            self.original.update({value.name: tensors[key] for key, value in values.items()})
            readers = [(use.node, use.idx) for use in site.output.uses()]
            pwlu_node = ir.Node(ops.DOMAIN, ops.pwlu.OP_TYPE,
                                [site.input, values["bounds"], values["knots"], values["slopes"]], num_outputs=1)
            switch = ir.Node("", "Where", [values["on"], pwlu_node.outputs[0], site.output], num_outputs=1)
            pwlu_node.outputs[0].name = f"{site.output.name}.pwlu_switch_p"
            switch.outputs[0].name = f"{site.output.name}.pwlu_switch_y"
            switch.outputs[0].type, switch.outputs[0].shape = site.output.type, site.output.shape
            graph.insert_after(site.nodes[-1], [pwlu_node, switch])
            for node, index in readers:
                node.replace_input_with(index, switch.outputs[0])
            self._added.append((site.output, switch.outputs[0], [pwlu_node, switch]))
        if sites:
            from onnxvq.passes import AttachVQFunctionsPass

            self._functions_before = set(model.functions)
            self._ir_version = model.ir_version
            AttachVQFunctionsPass()(model)

    def feeds(self, fitted: FittedActivation) -> dict[str, np.ndarray]:
        """The switch's values that run ``fitted``'s PWLU at its site."""
        from onnxvq.passes.replace_activations_with_pwlu import parameter_tensors

        names = self.names[fitted.site.name]
        tensors = {"on": np.array(True), **parameter_tensors(fitted.site, fitted.params)}
        return {names[key]: array for key, array in tensors.items()}

    def remove(self) -> None:
        from onnxvq import ops

        graph = self.model.graph
        for output, switched, nodes in self._added:
            for use in list(switched.uses()):
                use.node.replace_input_with(use.idx, output)
            for node in reversed(nodes):
                graph.remove(node, safe=True)
        for name in self.original:
            graph.initializers.pop(name)
        if self.sites:
            for key in set(self.model.functions) - self._functions_before:
                del self.model.functions[key]
            if not any(node.domain == ops.DOMAIN for node in self.model.graph):
                self.model.opset_imports.pop(ops.DOMAIN, None)
            self.model.ir_version = self._ir_version


def _capture(model, sites, quantized, calib: CalibrationSet, *, channelwise: bool, seed: int, progress: bool):
    """Site name -> (x_q, x_o), each (n, G): rows are positions, columns the groups (channels
    when ``channelwise``, else one column of scalars)."""
    taps = {site.name: [site.input.name] for site in sites}
    original = _TapSession(model, taps, None, taps_only=True)
    encoded = _TapSession(model, taps, quantized, taps_only=True)
    batches = list(calib.batches(_CAPTURE_BATCH))
    rng = np.random.default_rng(seed)
    kept: dict[str, tuple[list, list]] = {site.name: ([], []) for site in sites}
    with progress_bar(total=len(batches), desc="capturing activations", unit="batch", enabled=progress) as bar:
        for _, feed, _ in batches:
            acts_o, acts_q = original.run(feed), encoded.run(feed)
            for site in sites:
                x_o = as_rows(acts_o[site.input.name], site, channelwise)
                x_q = as_rows(acts_q[site.input.name], site, channelwise)
                per_batch = math.ceil(CAPTURE_VALUES / x_o.shape[1] / len(batches))
                rows = rng.choice(len(x_o), size=min(per_batch, len(x_o)), replace=False)
                kept[site.name][0].append(x_q[rows])
                kept[site.name][1].append(x_o[rows])
            bar.update()
    return {name: (np.concatenate(q), np.concatenate(o)) for name, (q, o) in kept.items()}


def with_pwlu(model: ir.Model, fitted: list[FittedActivation]) -> ir.Model:
    """A copy of ``model`` whose kept sites are PWLU nodes with their function body."""
    from onnxvq.passes import AttachVQFunctionsPass
    from onnxvq.passes.replace_activations_with_pwlu import ReplaceActivationsWithPWLUPass

    copy = model.clone()
    by_name = {site.name: site for site in _sites_of(copy, fitted)}
    ReplaceActivationsWithPWLUPass([(by_name[f.site.name], f.params) for f in fitted if f.kept])(copy)
    AttachVQFunctionsPass()(copy)
    return copy


def trainable_names(student: ir.Model, fitted: list[FittedActivation]) -> list[tuple[str, str]]:
    """Per fitted site, the names of its PWLU's knots and slopes initializers in ``student``
    (:func:`with_pwlu`)."""
    by_output = {node.outputs[0].name: node for node in student.graph if node.op_type == "PWLU"}
    return [(by_output[f.site.output.name].inputs[2].name, by_output[f.site.output.name].inputs[3].name)
            for f in fitted]


def _sites_of(copy: ir.Model, fitted: list[FittedActivation]) -> list[ActivationSite]:
    """The sites of ``fitted`` re-found in a clone of their model (same node names and order)."""
    nodes = {id(node): i for i, node in enumerate(fitted[0].site.nodes[0].graph)} if fitted else {}
    copy_nodes = list(copy.graph)
    values = {v.name: v for node in copy.graph for v in node.outputs}
    values.update({v.name: v for v in copy.graph.inputs})
    out = []
    for f in fitted:
        site = f.site
        out.append(dataclasses.replace(
            site, nodes=[copy_nodes[nodes[id(n)]] for n in site.nodes],
            input=values[site.input.name], output=values[site.output.name]))
    return out


def _gain_db(before: float, after: float) -> float | None:
    if before <= 0 or after <= 0:
        return None
    return round(10 * math.log10(before / after), 3)


def sites_behind(model: ir.Model, layers: list) -> list[ActivationSite]:
    """The activation sites behind ``layers`` (every layer of the model, encoded or not)."""
    from onnxvq.activation_sites import find_sites

    return find_sites(model, layers)


def learn_activations(
    model: ir.Model,
    jobs: list,
    train: CalibrationSet,
    held: CalibrationSet | None,
    settings,
    qualities: dict,
    *,
    plan: ActivationPlan,
    seed: int,
    progress: bool = False,
) -> tuple[dict, list[FittedActivation]]:
    """The check of the module docstring after fine-tuning (``jobs``: the
    :class:`onnxvq.tuning.WeightJob` list, final; ``plan.fitted``: the PWLUs fine-tuning fitted
    or trained; when it is empty, they are fitted here from one capture). Returns (a JSON-able
    record for the calibration summary, the PWLUs to write: empty when none helps). Adds the
    model's quality with the PWLUs to ``qualities`` as ``"with PWLU"`` when they are kept."""
    quantized = {job.name: job.decode(job.encoded) for job in jobs}
    sites = plan.sites
    fitted = plan.fitted
    if not fitted:
        fitted = fit_activations(model, sites, quantized, train, intervals=plan.intervals,
                                 channelwise=plan.channelwise, seed=seed, progress=progress)
    kept = [f for f in fitted if f.kept]
    fitted_sites = {f.site.name for f in fitted}
    record = {"method": settings.activations, "sites": len(sites), "kept": len(kept),
              "layers": {f.site.name: f.record() for f in fitted},
              "not_fitted": [s.name for s in sites if s.name not in fitted_sites]}
    if not kept:
        record["verdict"] = "no PWLU lowered its activation's error: the activations are kept as they were"
        return record, []
    check = plan.check
    if check is None:
        evaluation = held or train
        reference = plan.reference if plan.reference is not None else run_model(model, evaluation)
        check = check_pwlus(model, kept, quantized, evaluation, reference, list(qualities.values())[-1])
    record.update(check.record())
    if not check.helps:
        return record, []
    after = check.with_pwlu
    qualities["with PWLU"] = after
    record["verdict"] = f"{len(kept)} of {len(sites)} activations replaced by PWLUs"
    record["parameter_bytes"] = int(sum(4 * (f.params.bounds.size + f.params.knots.size + f.params.slopes.size)
                                        for f in kept))  # float32, as written
    return record, kept
