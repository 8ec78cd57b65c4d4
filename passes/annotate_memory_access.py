"""Write a model's memory-access totals into its metadata, for pipelines that want them.

Rule: run :func:`onnxvq.memory_access.analyze` with the configured input shapes and accelerator
profile and store ``{"profile": name, "input_shapes": ..., "weight_format": ..., "totals": ...}``
as JSON under ``model.metadata_props["onnxvq.memory_access"]`` (replacing an earlier value).
Nothing else in the model changes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

import onnx_ir as ir

from onnxvq.accelerators import AcceleratorProfile
from onnxvq.memory_access import analyze

__all__ = ["METADATA_KEY", "AnnotateMemoryAccessPass"]

logger = logging.getLogger(__name__)

METADATA_KEY = "onnxvq.memory_access"


class AnnotateMemoryAccessPass(ir.passes.InPlacePass):
    """Store the memory-access totals in metadata_props; see the module docstring."""

    def __init__(
        self,
        input_shapes: Mapping[str, tuple[int, ...]] | None,
        profile: AcceleratorProfile,
        *,
        weight_format: str = "as_stored",
    ) -> None:
        super().__init__()
        self.input_shapes = dict(input_shapes or {})
        self.profile = profile
        self.weight_format = weight_format

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        traffic = analyze(model, self.input_shapes, self.profile, weight_format=self.weight_format)
        record = {
            "profile": self.profile.name,
            "input_shapes": {k: list(v) for k, v in traffic.input_shapes.items()},
            "weight_format": self.weight_format,
            "totals": traffic.totals,
        }
        model.metadata_props[METADATA_KEY] = json.dumps(record, sort_keys=True)
        logger.debug("memory access on %s: %s", self.profile.name, record["totals"])
        return ir.passes.PassResult(model, modified=True)
