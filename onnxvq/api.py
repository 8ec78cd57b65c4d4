"""The public API: :func:`compress` and :func:`decompress`.

The flow of ``compress`` (DESIGN.md): load -> plan (config resolved per layer) -> encode (one
method call per distinct weight) -> rewrite (passes) -> provenance; saving is the caller's
choice (:meth:`CompressResult.save`), so the API works inside a pipeline without touching disk.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxvq import channel_scales, ops, quality_guard
from onnxvq.activations import LayerInputs, capture_inputs
from onnxvq.allocation import allocate
from onnxvq.calibration import CalibrationSet, CalibrationSource, load_calibration
from onnxvq.candidates import Layer, find_layers, group_by_weight, iter_nodes, stored_values
from onnxvq.config import CompressConfig, LayerPlan, resolve_layers
from onnxvq.class_rows import kept_layer_names, split_class_rows
from onnxvq.conv_folding import fold_batch_norms, fold_bias_adds
from onnxvq.errors import OnnxVQError
from onnxvq.finetune_settings import FinetuneSettings
from onnxvq.integer_ops import convert_integer_ops, restore_unencoded
from onnxvq.methods import Encoded, get_method
from onnxvq.model_check import check_model
from onnxvq.model_io import SOURCE_FILES, load_model, model_bytes_without, save_model
from onnxvq.layout import WeightLayout
from onnxvq.packing import CODEBOOK_DTYPES, PackedWeight, pack
from onnxvq.progress import progress as progress_bar
from onnxvq.passes import AttachVQFunctionsPass, DecompressVQOpsPass, ReplaceActivationsWithPWLUPass, ReplaceWithVQOpsPass
from onnxvq.row_frequency import capture_row_weights
from onnxvq.shared_codebook import PREFIX as SHARED_PREFIX
from onnxvq.summary import LayerReport, Summary, format_bytes, sqnr_db
from onnxvq.tuning import WeightJob, output_sqnr_db
from onnxvq.tuning import finetune as finetune_jobs
from onnxvq.weight_folding import fold_weight_chains

__all__ = ["PROVENANCE_KEY", "CompressResult", "compress", "decompress"]

PROVENANCE_KEY = "onnxvq"
ModelLike = str | os.PathLike | onnx.ModelProto | ir.Model


@dataclasses.dataclass
class CompressResult:
    """A compressed model and what was done to it.

    Attributes:
        model: the compressed model (``onnx_ir.Model``); :meth:`to_proto` gives a ModelProto.
        summary: per-layer and total sizes, ratios and SQNR.
    """

    model: ir.Model
    summary: Summary
    codebook_external: bool = False  # what save() does with a universal codebook by default

    def to_proto(self) -> onnx.ModelProto:
        """The model as one self-contained proto: tensors still in the input's external data
        are read into memory first (their references are relative to the input's folder, so a
        proto that kept them would not run anywhere else)."""
        ir.external_data.load_to_model(self.model)
        return ir.serde.serialize_model(self.model)

    def save(self, path: str | os.PathLike, *, external_data: bool | None = None, codebook_external: bool | None = None,
             before_commit=None, protected=()) -> list[str]:
        """Write atomically (see :func:`onnxvq.model_io.save_model`); returns the files written.

        ``codebook_external``: a universal codebook (``vq4all``) goes to its own file beside the
        model, which other models compressed with it into the same folder share
        (:mod:`onnxvq.shared_codebook`); default: as :func:`compress` was told.
        ``before_commit(files)`` runs on the complete temporary files and ``protected`` are
        further files not to write (see ``save_model``).
        Refuses to write over any file the original model was read from."""
        from onnxvq import shared_codebook

        hashes = {}
        if codebook_external is None:
            codebook_external = self.codebook_external
        if codebook_external:
            record = json.loads(self.model.metadata_props.get(PROVENANCE_KEY) or "{}")
            hashes = record.get("universal_codebooks") or {}
            if not hashes:
                raise OnnxVQError("--codebook-external keeps a universal codebook in its own file; this model has none "
                                  "(compress with --method vq4all --codebook FILE)")
        shared_files: list[str] = []

        def commit(files: list[str]) -> None:
            if hashes:
                directory = os.path.dirname(os.path.abspath(os.fspath(path)))
                shared_files.extend(shared_codebook.externalize(
                    files[0], directory, hashes, protected=[*self.model.meta.get(SOURCE_FILES, []), *protected]))
            if before_commit is not None:
                before_commit(files)

        written = save_model(self.model, path, external_data=external_data, before_commit=commit, protected=protected)
        return written + shared_files


def compress(
    model: ModelLike,
    config: CompressConfig | Mapping[str, Any] | str | os.PathLike | None = None,
    /,
    *,
    calib: CalibrationSource | CalibrationSet | None = None,
    labels: str | os.PathLike | np.ndarray | None = None,
    finetune: FinetuneSettings | Mapping[str, Any] | str | None = None,
    progress: bool = False,
    codebook_external: bool = False,
    **settings: Any,
) -> CompressResult:
    """Replace the weights of Conv/Gemm/MatMul layers by vector-quantized ``ai.onnxvq`` ops.

    Args:
        model: a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``; never modified.
        config: a :class:`CompressConfig`, a mapping of settings, or a JSON/YAML file path.
        calib: calibration data (:mod:`onnxvq.calibration`): an ``.npz`` path, a folder of
            ``.npz`` samples, or an iterable of feed dicts. With it, encoding minimises each
            layer's output error instead of its weight error.
        labels: class labels for a task loss (or a ``labels`` array in the calibration data).
        finetune: a mode (``"none"``, ``"layer"``, ``"e2e"``), a mapping or
            :class:`FinetuneSettings`; default ``layer`` with ``calib``, else ``none``.
        progress: show progress bars (on stderr).
        codebook_external: ``vq4all``: the universal codebook will be saved in its own file
            (:meth:`CompressResult.save`'s default), so a size target does not count it in the
            model file; otherwise it is in the file and counts.
        **settings: settings applied over ``config`` (``method``, ``k``, ``d``, ``skip``, ...).

    Returns:
        :class:`CompressResult` with the compressed model and the summary.

    Example::

        >>> import onnxruntime as ort, onnxvq
        >>> result = onnxvq.compress("model.onnx", method="pq", k=256, d=8)  # doctest: +SKIP
        >>> tuned = onnxvq.compress("model.onnx", calib="calib.npz", finetune="e2e")  # doctest: +SKIP
        >>> print(result.summary.format())  # doctest: +SKIP
        >>> session = ort.InferenceSession(result.to_proto().SerializeToString())  # doctest: +SKIP
    """
    config = _make_config(config, settings)
    model = _as_ir_model(model)
    _check_compressible(model)
    tuning = FinetuneSettings.make(finetune, has_calib=calib is not None)
    calib_set = load_calibration(calib, model, labels=labels) if calib is not None else None
    if labels is not None and calib is None:
        raise OnnxVQError("labels need calibration data: give --calib with --labels")
    original_ir_version = model.ir_version
    total_float_params = _float_params(model)

    # A size target's reference, taken before the conversions below add float twins.
    input_bytes = _input_bytes(model) if config.targeted else 0
    fold_weight_chains(model)
    # Bias Adds first: a Conv -> Add -> BatchNormalization chain then folds whole.
    bias_adds_folded = fold_bias_adds(model)
    batch_norms_folded = fold_batch_norms(model)
    integer_layers = convert_integer_ops(model)
    class_rows = []
    if calib_set is not None and config.class_rows == "auto":
        # Before the layers are found: a head's kept rows are a layer of their own. With fixed
        # settings only a head they encode is split (a dense head reads every class exactly).
        class_rows = split_class_rows(model, calib_set, None if config.targeted else _encoded_nodes(model, config))
    layers, left_alone = find_layers(model)
    # A size target replaces min_size: the allocation decides which small layers stay dense.
    # Fixed settings would encode a head's kept rows as coarsely as the rest: they stay dense.
    resolving = (dataclasses.replace(config, min_size=0) if config.targeted
                 else dataclasses.replace(config, skip=[*config.skip, *kept_layer_names(class_rows)]))
    plans = resolve_layers(resolving, [(l.name, l.op_type, l.size) for l in layers])
    plan_of = dict(zip(layers, plans))
    groups = list(group_by_weight(layers).values())
    # Integer weights (QDQ, integer ops) count as the model's parameters in the literature's
    # convention, as their float values would.
    total_float_params += sum(group[0].size for group in groups if group[0].source)
    group_plans = [_group_plan(group, plan_of) for group in groups]
    for group, plan in zip(groups, group_plans):  # before any work: a user error, not minutes in
        if plan.compressed or (config.targeted and plan.rule == "default"):
            _check_finite(group[0])
    if config.targeted:
        # What stays as it is, measured on the model as it now stands (folded BatchNormalization
        # parameters and Constant-node framing of the weights gone), not estimated from the input.
        rest_bytes = model_bytes_without(model, {v.name for group in groups for v in stored_values(group[0])})
        if not codebook_external:
            rest_bytes += _universal_codebook_bytes(config, input_bytes)
        group_plans = allocate(
            model, groups, group_plans, config, input_bytes=input_bytes, rest_bytes=rest_bytes,
            samples=calib_set, progress=progress,
        )
    planned = list(zip(groups, group_plans))
    rules = [_rule(group[0], plan) for group, plan in planned]
    to_encode = [(g, p) for (g, p), rule in zip(planned, rules) if p.compressed and rule == p.rule]

    train, held = calib_set.split(tuning.holdout) if calib_set else (None, None)
    inputs = {}
    if calib_set is not None:
        # Encoding needs only the moments; layer-wise training captures its own rows (from the
        # model as it then stands), so none are kept here (on PP-OCRv6's detector they were
        # about a gigabyte).
        inputs = capture_inputs(
            model, [l for g, _ in to_encode for l in g], train,
            max_rows=0, batch_size=tuning.batch_size, seed=config.seed, progress=progress,
        )
        # Tables only looked up: how often each row is read (a lookup multiplies nothing). A table
        # tied to a Gemm/MatMul keeps that layer's input moments, whose rows all count alike.
        tables = [l for g, _ in to_encode if all(x.op_type == "Gather" for x in g) for l in g]
        inputs.update(capture_row_weights(model, tables, train, batch_size=tuning.batch_size))
    jobs: dict[int, WeightJob] = {}
    with progress_bar(total=len(to_encode), desc="encoding", unit="weight", enabled=progress) as bar:
        for group, plan in to_encode:
            bar.set_postfix_str(group[0].name, refresh=False)
            layer_inputs = inputs.get(group[0].weight.name) if tuning.data_aware else None
            jobs[id(group)] = _encode(group, plan, config, layer_inputs)
            bar.update()

    calibration = None
    learned_rest: dict[str, np.ndarray] = {}
    activations = None  # PWLUs: fine-tuning fits them (layer) or trains them (e2e)
    if calib_set is not None and tuning.pwlu is not None and jobs:
        from onnxvq import pwlu_stage

        intervals, channelwise = tuning.pwlu
        activations = pwlu_stage.ActivationPlan(pwlu_stage.sites_behind(model, layers), intervals, channelwise)
        if tuning.mode == "e2e":  # start from PWLUs that reproduce the activations
            activations.fitted = pwlu_stage.fit_activations(
                model, activations.sites, {job.name: job.decode(job.encoded) for job in jobs.values()}, train,
                intervals=intervals, channelwise=channelwise, seed=config.seed, progress=progress, refit=False,
            )
    if calib_set is not None:
        calibration, learned_rest = finetune_jobs(
            model, list(jobs.values()), train, held, tuning, seed=config.seed, progress=progress,
            vectors_per_sample={name: data.count / len(train) for name, data in inputs.items()
                                if data.row_weights is None},
            activations=activations,
        )
        calibration.update(samples=len(calib_set), held_back=len(held) if held else 0,
                           data_aware=tuning.data_aware)

    reports: list[LayerReport] = []
    replacements: list[tuple[Layer, PackedWeight]] = []
    for (group, plan), rule in zip(planned, rules):
        job = jobs.get(id(group))
        packed = _pack(job, plan) if job else None
        reports += _reports(group, rule, packed, job, inputs.get(group[0].weight.name))
        replacements += [(layer, packed) for layer in group] if packed else []

    pwlu_bytes = 0
    if activations is not None:
        from onnxvq.pwlu_stage import learn_activations

        calibration["activations"], fitted = learn_activations(
            model, list(jobs.values()), train, held, tuning, calibration["quality"], seed=config.seed,
            progress=progress, plan=activations)
        if fitted:
            ReplaceActivationsWithPWLUPass([(f.site, f.params) for f in fitted])(model)
            pwlu_bytes = calibration["activations"]["parameter_bytes"]

    check = quality_guard.check(
        model, lambda: {job.name: job.decode(job.encoded) for job in jobs.values()},
        calibration=calibration, held_back=bool(held), seed=config.seed,
    )

    _write_back(model, learned_rest)
    ReplaceWithVQOpsPass(replacements)(model)
    restore_unencoded(model, integer_layers)
    AttachVQFunctionsPass()(model)
    shared = _shared_codebooks(replacements)
    if replacements:
        record = _provenance(config, reports, original_ir_version, tuning if calib_set else None)
        if shared:  # checked when a model is loaded (onnxvq.shared_codebook.verify)
            record["universal_codebooks"] = {f"{SHARED_PREFIX}{sha[:12]}": sha for sha in shared}
        model.metadata_props[PROVENANCE_KEY] = json.dumps(record, sort_keys=True)

    summary = Summary(
        layers=reports,
        left_alone=[dataclasses.asdict(l) for l in left_alone],
        total_float_params=total_float_params,
        # PWLU parameters are new tensors of the model: counted like any uncompressed one
        literature_bytes=_literature_bytes(total_float_params, replacements) + pwlu_bytes,
        shared_codebooks=shared,
        calibration=calibration,
        check=check,
        batch_norms_folded=batch_norms_folded,
        bias_adds_folded=bias_adds_folded,
        class_rows=class_rows,
    )
    return CompressResult(model, summary, codebook_external=codebook_external)


def _encoded_nodes(model: ir.Model, config: CompressConfig) -> set[ir.Node]:
    """The nodes whose weight fixed settings (no size target) encode."""
    layers, _ = find_layers(model)
    plans = resolve_layers(config, [(l.name, l.op_type, l.size) for l in layers])
    return {layer.node for layer, plan in zip(layers, plans) if plan.compressed}


def decompress(model: ModelLike) -> ir.Model:
    """The dense equivalent of a compressed model, in standard ops only.

    Every ``ai.onnxvq`` node becomes its original op with the decoded weight; the provenance
    record is removed and the IR version it recorded is restored.
    """
    model = _as_ir_model(model)
    if not any(ops.is_weight_op(n) for n in iter_nodes(model)):
        raise OnnxVQError("the model has no ai.onnxvq weight nodes: it is not compressed by onnxvq")
    DecompressVQOpsPass()(model)
    provenance = model.metadata_props.pop(PROVENANCE_KEY, None)
    if provenance:
        try:
            model.ir_version = int(json.loads(provenance)["original_ir_version"])
        except (ValueError, KeyError, TypeError):
            pass
    return model


def _make_config(config, settings: Mapping[str, Any]) -> CompressConfig:
    if config is None:
        base = CompressConfig()
    elif isinstance(config, CompressConfig):
        base = config
    elif isinstance(config, Mapping):
        base = CompressConfig.from_dict(config)
    else:
        base = CompressConfig.from_file(config)
    base.validate()
    return base.merged(**settings) if settings else base


def _as_ir_model(model: ModelLike) -> ir.Model:
    """An ``ir.Model`` the caller does not share (so in-place passes never touch their object)."""
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    if isinstance(model, onnx.ModelProto):
        check_model(model, source="the model")
        return ir.serde.deserialize_model(model)  # a new object graph; the proto is only read
    if isinstance(model, ir.Model):
        # A structural copy sharing the (never mutated) tensors: external tensors keep their
        # base folder, which a serialize/deserialize round trip would lose.
        clone = model.clone()
        if SOURCE_FILES in model.meta:  # so that saving still refuses to overwrite them
            clone.meta[SOURCE_FILES] = list(model.meta[SOURCE_FILES])
        return clone
    raise OnnxVQError(f"expected a model path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def _check_compressible(model: ir.Model) -> None:
    if any(n.domain == ops.DOMAIN for n in iter_nodes(model)) or any(
        key[0] == ops.DOMAIN for key in model.functions
    ):
        raise OnnxVQError(
            "the model is already compressed by onnxvq (it has ai.onnxvq nodes); "
            "compress the original, or run `onnxvq decompress` first"
        )
    opset = model.opset_imports.get("")
    if opset is None or opset < ops.MIN_OPSET:
        raise OnnxVQError(
            f"the model's opset {opset} is older than {ops.MIN_OPSET}; "
            "upgrade it with onnx.version_converter first"
        )


def _rule(layer: Layer, plan: LayerPlan) -> str:
    """The plan's rule, or why encoding this layer is pointless."""
    if not plan.compressed:
        return plan.rule
    return _no_smaller_reason(layer, plan) or plan.rule


def _reports(
    group: list[Layer], rule: str, packed: PackedWeight | None, job: WeightJob | None, inputs: LayerInputs | None
) -> list[LayerReport]:
    """One report per layer reading the weight (the first one carries the numbers)."""
    first = group[0]
    sqnr = output_sqnr = None
    if packed is not None:
        weight = first.weight_array().astype(np.float32, copy=False)
        decoded = packed.decode(transposed=job.layout.transposed)
        sqnr = sqnr_db(weight, decoded)
        if inputs is not None:
            output_sqnr = output_sqnr_db(weight, decoded, job.layout, inputs.hessian, inputs.row_weights)
    reports = []
    for i, layer in enumerate(group):
        report = LayerReport(
            name=layer.name,
            op_type=layer.op_type,
            weight=layer.weight.name,
            shape=layer.weight_shape,
            params=layer.size,
            bytes_before=layer.nbytes,
            compressed=packed is not None,
            rule=rule,
            shared_with=first.name if i else None,
            source=layer.source,
        )
        if packed is not None:
            report.method, report.k, report.d = packed.method, packed.k, packed.d
            report.code_bits, report.bytes_after = packed.code_bits, packed.nbytes
            report.rank = packed.rank if packed.rank is not None else packed.stats.get("rank")
            report.scales = "scales" in packed.extras
            report.storage_note = packed.stats.get("codebook_dtype_note")
            report.sqnr_db, report.output_sqnr_db = sqnr, output_sqnr
            report.finetune = dict(job.finetune_stats) or None
        reports.append(report)
    return reports


def _group_plan(group: list[Layer], plan_of: dict[Layer, LayerPlan]) -> LayerPlan:
    plans = [plan_of[l] for l in group]
    for layer, plan in zip(group[1:], plans[1:]):
        if plan.settings() != plans[0].settings():
            raise OnnxVQError(
                f"layers {group[0].name!r} and {layer.name!r} share weight {group[0].weight.name!r} "
                "but resolve to different settings; give them the same settings (or skip both)"
            )
    return plans[0]


def _no_smaller_reason(layer: Layer, plan: LayerPlan) -> str | None:
    """Why encoding this layer is pointless (its stored form would not be smaller), if it is."""
    transposed, row_axes = layer.view()
    lay = WeightLayout(layer.weight_shape, transposed, row_axes, plan.params.d)
    itemsize = np.dtype(CODEBOOK_DTYPES[plan.codebook_dtype]).itemsize
    stored = get_method(plan.method).stored_nbytes(lay, plan.params, itemsize)
    if plan.scales != "off":
        stored += lay.rows * itemsize
    if stored >= layer.nbytes:
        return f"encoded ({stored} B) would not be smaller than dense ({layer.nbytes} B)"
    return None


def _check_finite(layer: Layer) -> None:
    if not np.isfinite(layer.weight_array()).all():
        raise OnnxVQError(
            f"weight {layer.weight.name!r} of layer {layer.name!r} contains NaN or Inf; "
            "fix the model before compressing"
        )


def _encode(group: list[Layer], plan: LayerPlan, config: CompressConfig, inputs: LayerInputs | None) -> WeightJob:
    layer = group[0]
    weight = layer.weight_array()
    weight32 = weight.astype(np.float32, copy=False)
    transposed, row_axes = layer.view()
    # One seed per weight, independent of layer order, so that a config change on one layer
    # does not reshuffle every other layer.
    weight_seed = np.random.SeedSequence(config.seed, spawn_key=(zlib.crc32(layer.weight.name.encode()),))
    method = get_method(plan.method)

    def decode(value: Encoded) -> np.ndarray:
        return _pack_encoded(value, layer, plan).decode(transposed=transposed)

    encoded = channel_scales.encode(
        method, weight32, transposed=transposed, row_axes=row_axes, params=plan.params, seed=weight_seed,
        inputs=inputs, scales=method.forced_scales or plan.scales, decode=decode,
    )

    layout = WeightLayout(layer.weight_shape, transposed, row_axes, plan.params.d)
    return WeightJob(group=group, method=method, params=plan.params, layout=layout, encoded=encoded, decode=decode)


def _pack(job: WeightJob, plan: LayerPlan) -> PackedWeight:
    return _pack_encoded(job.encoded, job.group[0], plan)


def _pack_encoded(encoded: Encoded, layer: Layer, plan: LayerPlan) -> PackedWeight:
    return pack(
        encoded,
        weight_shape=layer.weight_shape,
        weight_dtype=int(layer.weight_dtype),
        codebook_dtype=plan.codebook_dtype,
    )


def _write_back(model: ir.Model, learned: Mapping[str, np.ndarray]) -> None:
    """Learned values of non-quantized initializers (``train_rest`` only) into the graph."""
    for name, array in learned.items():
        value = model.graph.initializers[name]
        value.const_value = ir.tensor(array.astype(value.const_value.dtype.numpy()), name=name)


def _universal_codebook_bytes(config: CompressConfig, input_bytes: int) -> int:
    """Bytes of the one codebook every layer reads (vq4all's universal codebook, stored at the
    config's codebook dtype), 0 for other methods; an error when it alone exceeds a ratio target."""
    codebook = get_method(config.method).fixed_codebook(config.params_for()[1])
    if codebook is None:
        return 0
    nbytes = codebook.size * np.dtype(CODEBOOK_DTYPES[config.codebook_dtype]).itemsize
    if config.target_ratio is not None and nbytes >= input_bytes / config.target_ratio:
        raise OnnxVQError(
            f"--target-ratio {config.target_ratio:g} cannot be met with the universal codebook in the file: it "
            f"alone takes {format_bytes(nbytes)} of the {format_bytes(input_bytes / config.target_ratio)} the target "
            "allows; keep it in its own file with --codebook-external, or lower the target")
    return nbytes


def _input_bytes(model: ir.Model) -> int:
    """The size of the model as the user has it: its files when it was read from files, else
    its serialized size."""
    files = model.meta.get(SOURCE_FILES)
    if files and all(os.path.exists(f) for f in files):
        return sum(os.path.getsize(f) for f in files)
    return model_bytes_without(model, set())


def _float_params(model: ir.Model) -> int:
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is not None and tensor.dtype.is_floating_point():
                total += math.prod(tensor.shape)
        for node in graph:
            if node.op_type == "Constant" and "value" in node.attributes:
                tensor = node.attributes["value"].as_tensor()
                if tensor.dtype.is_floating_point():
                    total += math.prod(tensor.shape)
    return total


def _literature_bytes(total_float_params: int, replacements: list[tuple[Layer, PackedWeight]]) -> float:
    unique = {id(p): (layer, p) for layer, p in replacements}.values()
    compressed_params = sum(layer.size for layer, _ in unique)
    coded = sum(p.literature_nbytes for _, p in unique)
    shared = sum(2.0 * p.codebook.size for p in {p.shared_codebook: p for _, p in unique if p.shared_codebook}.values())
    return coded + shared + 4.0 * (total_float_params - compressed_params)


def _shared_codebooks(replacements: list[tuple[Layer, PackedWeight]]) -> dict[str, int]:
    """Content hash -> stored bytes of each universal codebook the model's nodes share."""
    return {p.shared_codebook: int(p.codebook.nbytes) for _, p in replacements if p.shared_codebook}


def _provenance(
    config: CompressConfig, reports: list[LayerReport], ir_version: int, tuning: FinetuneSettings | None
) -> dict:
    from onnxvq import __version__

    return {
        "onnxvq_version": __version__,
        "original_ir_version": ir_version,
        "config": config.to_dict(),
        "calibration": dataclasses.asdict(tuning) if tuning else None,
        "layers": {
            r.name: {"method": r.method, "k": r.k, "d": r.d, "rule": r.rule, "scales": bool(r.scales),
                     **({"rank": r.rank} if r.rank is not None else {})}
            for r in reports
            if r.compressed
        },
    }
