"""Compression configs and their per-layer resolution.

A config gives global settings and per-layer overrides. For each candidate layer (see
``onnxvq inspect``), the settings are resolved by the first rule that applies:

1. ``skip`` list (CLI ``--skip``): an exact layer name or a ``re:`` pattern -> left dense;
2. ``layers`` key equal to the layer's exact name;
3. the first ``layers`` key ``re:PATTERN`` (in file order) whose pattern ``re.fullmatch``-es the
   name;
4. ``layers`` key equal to the layer's op type (``Conv``, ``ConvTranspose``, ``Gemm``, ``MatMul``,
   ``LSTM``, ``GRU``, ``RNN``, ``Gather``);
5. the size threshold: a layer with fewer than ``min_size`` weights is left dense;
6. the global settings.

An override (rules 2-4) is a mapping of any of ``method``, ``skip`` (true leaves the layer
dense), ``codebook_dtype`` and the method's parameters (``k``, ``d``, ...); keys it omits come
from the global settings. A rule that matches a layer wins outright, so an explicit override
also compresses a layer below ``min_size``. Every ``skip`` entry and ``layers`` key must match
at least one layer, and unknown keys are rejected.

Example (YAML; JSON with the same structure works too)::

    method: pq
    k: 256
    d: 8
    min_size: 4096
    skip: ["re:.*classifier.*"]
    layers:
      conv1: {skip: true}
      "re:layer4\\..*": {d: 4}
      Conv: {k: 128}
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from onnxvq.channel_scales import SCALES_SETTINGS
from onnxvq.class_rows import CLASS_ROWS_SETTINGS
from onnxvq.errors import OnnxVQError
from onnxvq.methods import METHODS, MethodParams, get_method
from onnxvq.packing import CODEBOOK_DTYPES

__all__ = ["CompressConfig", "LayerPlan", "resolve_layers"]

# A config is a few lines of settings: a larger file is a mistake (or /dev/zero), not read.
MAX_CONFIG_FILE = 16 * 2**20

_OVERRIDE_COMMON_KEYS = ("method", "skip", "codebook_dtype", "scales")


@dataclasses.dataclass
class CompressConfig:
    """What to compress and how.

    Attributes:
        method: registry name of the default method (``pq``).
        k: codewords per codebook (2..65536).
        d: subvector length.
        options: further parameters of the default method (e.g. ``{"max_iter": 30}``).
        codebook_dtype: ``float16`` (default) or ``float32``.
        scales: per-output-channel scales, ``auto`` (default: kept where they lower the
            per-channel error, :mod:`onnxvq.channel_scales`), ``on`` or ``off``.
        class_rows: ``auto`` (default): with calibration data, the classes of a classifier
            head that the data shows winning are split into a layer of their own
            (:mod:`onnxvq.class_rows`); ``off``: never.
        min_size: layers with fewer weights stay dense unless an override names them (not used
            with a size target, which decides that per layer).
        target_ratio: a size target: the output at least this many times smaller than the input;
            each layer's k, d and scales are then chosen by :mod:`onnxvq.allocation`.
        target_bits: a size target: average stored bits per weight of the candidate layers.
        seed: seed of all random choices; the same seed gives the same model.
        skip: layer names or ``re:`` patterns left dense whatever else says.
        layers: per-layer overrides keyed by exact name, ``re:`` pattern or op type.

    Example::

        >>> cfg = CompressConfig(method="pq", k=256, d=4, layers={"re:.*fc.*": {"d": 8}})
        >>> cfg.k, cfg.layers
        (256, {'re:.*fc.*': {'d': 8}})
    """

    method: str = "pq"
    k: int = 256
    d: int = 8
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    codebook_dtype: str = "float16"
    scales: str = "auto"
    class_rows: str = "auto"
    min_size: int = 1024
    target_ratio: float | None = None
    target_bits: float | None = None
    seed: int = 0
    skip: list[str] = dataclasses.field(default_factory=list)
    layers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CompressConfig":
        """Build from a flat mapping: the fields above, plus method parameters at top level.

        Unknown keys are rejected, naming the valid ones.
        """
        if not isinstance(data, Mapping):
            raise OnnxVQError(f"a config must be a mapping of settings, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)} - {"options"}
        known = dict(data)
        options = known.pop("options", None) or {}
        if not isinstance(options, Mapping):
            raise OnnxVQError(
                f"config 'options' must be a mapping of method parameters (e.g. {{max_iter: 30}}), "
                f"got {type(options).__name__}"
            )
        options = dict(options)
        kwargs = {key: known.pop(key) for key in list(known) if key in fields}
        method = kwargs.get("method", cls.method)
        if method in METHODS:
            unknown = sorted(set(known) - set(METHODS[method].Params.field_names()))
            if unknown:
                valid = sorted(fields | set(METHODS[method].Params.field_names()))
                raise OnnxVQError(
                    f"unknown config key(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}"
                )
        options.update(known)  # method parameters beyond k and d
        config = cls(**kwargs, options=options)
        config.validate()
        return config

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "CompressConfig":
        """Read a ``.json``, ``.yaml`` or ``.yml`` config file."""
        return cls.from_dict(read_config_file(path))

    def merged(self, **overrides: Any) -> "CompressConfig":
        """A copy with the given non-None settings replaced (how CLI flags apply over a file)."""
        data = self.to_dict()
        for key, value in overrides.items():
            if value is None:
                continue
            if key == "skip":
                data["skip"] = list(data.get("skip", [])) + list(value)
            else:
                data[key] = value
        return CompressConfig.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        options = data.pop("options")
        data.update(options)
        return data

    def params_for(self, override: Mapping[str, Any] | None = None) -> tuple[str, MethodParams]:
        """(method name, validated params) for the global settings overlaid with ``override``."""
        override = dict(override or {})
        method_name = override.pop("method", self.method)
        method = get_method(method_name)
        names = method.Params.field_names()
        values = {"k": self.k, "d": self.d}
        if method_name == self.method:
            values.update(self.options)
        else:  # options belong to the default method; carry over only what the other one has
            values.update({k: v for k, v in self.options.items() if k in names})
        for key in _OVERRIDE_COMMON_KEYS:
            override.pop(key, None)
        values.update(override)
        fixed = method.fixed_k_d(values)
        if fixed is not None:  # a method whose k and d come with it (vq4all: its codebook's)
            values["k"], values["d"] = fixed
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise OnnxVQError(
                f"unknown setting(s) {', '.join(map(repr, unknown))} for method {method_name!r}; "
                f"valid: {', '.join((*names, *_OVERRIDE_COMMON_KEYS))}"
            )
        try:
            return method_name, method.Params(**values)
        except ValueError as e:
            raise OnnxVQError(str(e)) from None

    def validate(self) -> None:
        """Check every setting that can be checked without a model; raise ``OnnxVQError``."""
        if self.method not in METHODS:
            get_method(self.method)  # raises the standard unknown-method error
        self.params_for()
        _check_codebook_dtype(self.codebook_dtype)
        _check_scales(self.scales)
        if self.class_rows not in CLASS_ROWS_SETTINGS:
            raise OnnxVQError(f"class_rows must be one of {', '.join(CLASS_ROWS_SETTINGS)} (got {self.class_rows!r})")
        self._check_target()
        for name in ("min_size", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise OnnxVQError(f"{name} must be a non-negative integer (got {value!r})")
        if isinstance(self.skip, str) or not isinstance(self.skip, Sequence):
            raise OnnxVQError("skip must be a list of layer names or re: patterns")
        for entry in self.skip:
            _compile_key(entry)
        if not isinstance(self.layers, Mapping):
            raise OnnxVQError("layers must be a mapping of layer keys to settings")
        for key, override in self.layers.items():
            _compile_key(key)
            if not isinstance(override, Mapping):
                raise OnnxVQError(f"layers[{key!r}] must be a mapping of settings")
            if "skip" in override and not isinstance(override["skip"], bool):
                raise OnnxVQError(f"layers[{key!r}].skip must be true or false")
            if "codebook_dtype" in override:
                _check_codebook_dtype(override["codebook_dtype"])
            if "scales" in override:
                _check_scales(override["scales"])
            try:
                self.params_for(override)
            except OnnxVQError as e:
                raise OnnxVQError(f"layers[{key!r}]: {e}") from None


    @property
    def targeted(self) -> bool:
        """Whether a size target decides the layers' settings."""
        return self.target_ratio is not None or self.target_bits is not None

    def _check_target(self) -> None:
        if self.target_ratio is not None and self.target_bits is not None:
            raise OnnxVQError("give one size target: --target-ratio or --target-bits, not both")
        for name, low, high in (("target_ratio", 1.0, 1e6), ("target_bits", 0.0, 32.0)):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
                raise OnnxVQError(f"{name} must be a number in ({low:g}, {high:g}] (got {value!r})")


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """The resolved settings of one layer; ``method`` is None when it stays dense."""

    name: str
    method: str | None
    params: MethodParams | None
    codebook_dtype: str
    rule: str  # which rule decided, e.g. "layers['re:fc.*']" or "min_size"
    scales: str = "auto"

    @property
    def compressed(self) -> bool:
        return self.method is not None

    def settings(self) -> tuple:
        """What must agree between layers that share one weight."""
        return (self.method, self.params, self.codebook_dtype, self.scales)


def resolve_layers(config: CompressConfig, layers: Sequence[tuple[str, str, int]]) -> list[LayerPlan]:
    """Resolve each ``(name, op_type, n_weights)`` to a :class:`LayerPlan` (rules in module doc).

    Raises ``OnnxVQError`` when a ``skip`` entry or ``layers`` key matches no layer.
    """
    names = {name for name, _, _ in layers}
    op_types = {op for _, op, _ in layers}
    skip_patterns = [(entry, _compile_key(entry)) for entry in config.skip]
    regex_keys = [(key, _compile_key(key)) for key in config.layers if key.startswith("re:")]

    plans = []
    for name, op_type, size in layers:
        plan = None
        for entry, pattern in skip_patterns:
            if _matches(entry, pattern, name):
                plan = LayerPlan(name, None, None, config.codebook_dtype, f"skip {entry!r}")
                break
        if plan is None:
            key = None
            if name in config.layers:
                key = name
            else:
                key = next((k for k, p in regex_keys if p.fullmatch(name)), None)
                if key is None and op_type in config.layers and op_type not in names:
                    key = op_type
            if key is not None:
                plan = _plan_from_override(config, name, key)
            elif size < config.min_size:
                plan = LayerPlan(
                    name, None, None, config.codebook_dtype, f"min_size {config.min_size}"
                )
            else:
                method, params = config.params_for()
                plan = LayerPlan(name, method, params, config.codebook_dtype, "default", config.scales)
        plans.append(plan)

    # A key must match some layer; whether it won for that layer is a separate question.
    for entry, pattern in skip_patterns:
        if not any(_matches(entry, pattern, name) for name in names):
            raise OnnxVQError(
                f"skip entry {entry!r} matches no layer; run `onnxvq inspect MODEL` to list layer names"
            )
    for key in config.layers:
        pattern = _compile_key(key)
        if not (any(_matches(key, pattern, name) for name in names) or key in op_types):
            raise OnnxVQError(
                f"config key {key!r} matches no layer; run `onnxvq inspect MODEL` to list layer names"
            )
    return plans


def _plan_from_override(config: CompressConfig, name: str, key: str) -> LayerPlan:
    override = config.layers[key]
    rule = f"layers[{key!r}]"
    codebook_dtype = override.get("codebook_dtype", config.codebook_dtype)
    if override.get("skip", False):
        return LayerPlan(name, None, None, codebook_dtype, rule)
    method, params = config.params_for(override)
    return LayerPlan(name, method, params, codebook_dtype, rule, override.get("scales", config.scales))


def _compile_key(key: Any) -> re.Pattern | None:
    if not isinstance(key, str) or not key:
        raise OnnxVQError(f"layer keys must be non-empty strings, got {key!r}")
    if not key.startswith("re:"):
        return None
    try:
        return re.compile(key[3:])
    except re.error as e:
        raise OnnxVQError(f"invalid regular expression in {key!r}: {e}") from None


def _matches(entry: str, pattern: re.Pattern | None, name: str) -> bool:
    return pattern.fullmatch(name) is not None if pattern is not None else entry == name


def _check_codebook_dtype(value: Any) -> None:
    if value not in CODEBOOK_DTYPES:
        raise OnnxVQError(
            f"codebook_dtype must be one of {', '.join(CODEBOOK_DTYPES)} (got {value!r})"
        )


def _check_scales(value: Any) -> None:
    if value not in SCALES_SETTINGS:
        raise OnnxVQError(f"scales must be one of {', '.join(SCALES_SETTINGS)} (got {value!r})")


def read_config_file(path: str | os.PathLike) -> dict:
    """Parse a JSON or YAML config file into a mapping, with one-line errors."""
    from onnxvq.model_io import check_readable_file

    path = os.fspath(path)
    check_readable_file(path, "config", MAX_CONFIG_FILE, hint="give a JSON or YAML config file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise OnnxVQError(f"cannot read the config {path!r}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise OnnxVQError(f"config {path!r} is not UTF-8 text; save it as UTF-8 JSON or YAML") from None
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        first_line = str(e).strip().splitlines()[0]
        raise OnnxVQError(f"config {path!r} is not valid JSON/YAML: {first_line}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise OnnxVQError(f"config {path!r} must hold a mapping of settings at top level")
    return data
