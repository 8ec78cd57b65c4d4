"""Accelerator profiles: the roofline parameters :mod:`onnxvq.memory_access` estimates time with.

Profiles are data: named entries of ``onnxvq/accelerators.yaml`` (shipped as package data, every
field documented there). :func:`get_profile` picks one by name and applies overrides, which is what
``onnxvq report --accelerator NAME --set FIELD=VALUE`` does.

Example::

    >>> from onnxvq.accelerators import get_profile
    >>> p = get_profile("edge-npu", {"dram_bandwidth": "16e9"})
    >>> p.dram_bandwidth
    16000000000.0
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
from collections.abc import Mapping
from typing import Any

import yaml

from onnxvq.errors import OnnxVQError

__all__ = ["AcceleratorProfile", "get_profile", "load_profiles", "parse_quantity"]

PROFILES_FILE = "accelerators.yaml"


@dataclasses.dataclass(frozen=True)
class AcceleratorProfile:
    """A roofline model of one accelerator.

    Attributes:
        name: the profile's name (``edge-npu``, ...).
        description: free text.
        macs_per_second: peak multiply-accumulates per second (1 MAC = 2 ops).
        dram_bandwidth: sustained off-chip bandwidth, bytes per second.
        onchip_buffer_bytes: on-chip SRAM; decides what stays on chip and what is re-read.
        rom_bytes: on-chip ROM for shared codebooks (0 = none).
        activation_bytes: bytes per floating-point activation element on the device, or ``None``
            for the model's own dtype.
    """

    name: str
    description: str
    macs_per_second: float
    dram_bandwidth: float
    onchip_buffer_bytes: int
    rom_bytes: int = 0
    activation_bytes: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_NUMERIC = {
    "macs_per_second": float,
    "dram_bandwidth": float,
    "onchip_buffer_bytes": int,
    "rom_bytes": int,
    "activation_bytes": int,
}
_FIELDS = [f.name for f in dataclasses.fields(AcceleratorProfile) if f.name != "name"]
# Decimal (k, M, G, T) and binary (KiB, MiB, GiB) suffixes, so "1MiB" or "8G" read naturally.
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_QUANTITY = re.compile(r"^\s*([0-9.eE+-]+)\s*([a-zA-Z]*)\s*$")


def parse_quantity(text: str | float | int) -> float:
    """``"8e9"``, ``"1MiB"``, ``"16G"`` or a number -> float; ValueError otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    match = _QUANTITY.match(str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def load_profiles() -> dict[str, AcceleratorProfile]:
    """Every profile of the shipped ``accelerators.yaml``, by name, in file order."""
    text = importlib.resources.files("onnxvq").joinpath(PROFILES_FILE).read_text(encoding="utf-8")
    entries = yaml.safe_load(text) or {}
    return {name: _make_profile(name, fields, PROFILES_FILE) for name, fields in entries.items()}


def get_profile(name: str, overrides: Mapping[str, Any] | None = None) -> AcceleratorProfile:
    """The profile ``name`` with ``overrides`` (field -> value or string like ``"16e9"``) applied."""
    profiles = load_profiles()
    if name not in profiles:
        raise OnnxVQError(f"unknown accelerator {name!r}; choose one of: {', '.join(profiles)}")
    fields = profiles[name].to_dict()
    del fields["name"]
    for key, value in (overrides or {}).items():
        if key not in _FIELDS:
            raise OnnxVQError(f"unknown accelerator field {key!r}; valid fields: {', '.join(_FIELDS)}")
        fields[key] = value
    return _make_profile(name, fields, "--set")


def _make_profile(name: str, fields: Any, where: str) -> AcceleratorProfile:
    if not isinstance(fields, Mapping):
        raise OnnxVQError(f"{where}: accelerator {name!r} must be a mapping of fields")
    unknown = sorted(set(fields) - set(_FIELDS))
    if unknown:
        raise OnnxVQError(
            f"{where}: unknown field(s) {', '.join(unknown)} in accelerator {name!r}; "
            f"valid fields: {', '.join(_FIELDS)}"
        )
    missing = [f for f in ("macs_per_second", "dram_bandwidth", "onchip_buffer_bytes") if f not in fields]
    if missing:
        raise OnnxVQError(f"{where}: accelerator {name!r} lacks field(s) {', '.join(missing)}")
    values: dict[str, Any] = {"name": str(name), "description": str(fields.get("description", ""))}
    for key, kind in _NUMERIC.items():
        raw = fields.get(key)
        if key == "activation_bytes" and (raw is None or str(raw).lower() in ("null", "none", "")):
            values[key] = None
            continue
        if raw is None:
            continue  # rom_bytes defaults to 0
        try:
            number = parse_quantity(raw)
        except (ValueError, TypeError):
            raise OnnxVQError(f"{where}: {key}={raw!r} of accelerator {name!r} is not a number") from None
        positive = key in ("macs_per_second", "dram_bandwidth", "activation_bytes")
        if number != number or number < 0 or (positive and number == 0) or number == float("inf"):
            bound = "> 0" if positive else ">= 0"
            raise OnnxVQError(f"{where}: {key} of accelerator {name!r} must be {bound}, got {raw!r}")
        values[key] = kind(number)
    return AcceleratorProfile(**values)
