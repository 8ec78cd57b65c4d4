"""How much a model's output moves when one weight is replaced.

:class:`OutputSensitivity` keeps one onnxruntime session of the model in which the weights of
interest are graph inputs with their initializers as defaults (ONNX lets a feed override such an
initializer), so measuring a layer costs one run per sample, not a new session: the relative
output error ``sum |y - y'|^2 / sum |y|^2`` over every float output of every sample.

Weights held in ``Constant`` nodes are lifted to initializers in the session's copy first;
weights inside If/Loop/Scan bodies cannot be fed and are reported as unmeasurable (None).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxvq.calibration import CalibrationSet
from onnxvq.candidates import Layer

__all__ = ["OutputSensitivity"]

logger = logging.getLogger(__name__)


class OutputSensitivity:
    def __init__(self, model: ir.Model, layers: Sequence[Layer], samples: CalibrationSet):
        from onnxvq.model_io import save_model, sweep_stale_temp, temp_folder

        names = {layer.weight.name for layer in layers}
        copy = model.clone()
        graph = copy.graph
        for node in list(graph):
            if node.op_type == "Constant" and node.domain == "" and node.outputs[0].name in names:
                value = node.outputs[0]
                if "value" not in node.attributes:
                    continue
                tensor = node.attributes["value"].as_tensor()
                graph.remove(node, safe=False)
                value.const_value = tensor
                graph.register_initializer(value)
        graph_inputs = {v.name for v in graph.inputs}
        self.overridable = set()
        for name in sorted(names):
            value = graph.initializers.get(name)
            if value is not None and name not in graph_inputs:
                graph.inputs.append(value)
                self.overridable.add(name)
        if copy.ir_version < 4:  # initializers as overridable inputs need IR >= 4
            copy.ir_version = 4
        options = ort.SessionOptions()
        options.log_severity_level = 3
        sweep_stale_temp()
        folder = temp_folder()
        try:
            path = Path(folder) / "sensitivity.onnx"
            save_model(copy, path)
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.feeds = [dict(sample) for sample in samples.samples]
        self.reference = [self.session.run(self.output_names, feed) for feed in self.feeds]
        self.signal = sum(_energy(out) for outs in self.reference for out in outs)

    def error(self, layer: Layer, weight: np.ndarray) -> float | None:
        """Relative output error with ``layer``'s weight replaced by ``weight`` (None when it
        cannot be fed, or the model's outputs are all zero)."""
        name = layer.weight.name
        if name not in self.overridable or self.signal <= 0:
            return None
        noise = 0.0
        for feed, reference in zip(self.feeds, self.reference):
            outputs = self.session.run(self.output_names, {**feed, name: weight})
            noise += sum(_energy(out, ref) for out, ref in zip(outputs, reference))
        return noise / self.signal


def _energy(array: np.ndarray, reference: np.ndarray | None = None) -> float:
    """``sum a^2`` of a float output, or ``sum (a - reference)^2``; other outputs count 0."""
    if array.dtype.kind != "f":
        return 0.0
    a = array.astype(np.float64)
    if reference is not None:
        a = a - reference
    return float(np.sum(a * a))
