"""Replace activations by ``ai.onnxvq::PWLU`` nodes with given parameters.

Rule: for each (site, parameters) given, the site's nodes (the activation, and the gate of a
``Mul(x, g(x))``) become one PWLU node reading the site's input and three new float32
initializers ``<name>.pwlu_bounds``, ``.pwlu_knots``, ``.pwlu_slopes`` shaped ``(2, *P)``,
``(N+1, *P)``, ``(2, *P)`` (:mod:`onnxvq.ops.pwlu`). The node keeps the activation's name, doc
string and output value (name, type, shape, graph-output role). Function bodies are attached by
:class:`onnxvq.passes.AttachVQFunctionsPass`.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxvq import ops
from onnxvq.activation_sites import ActivationSite
from onnxvq.passes._values import register_initializer, value_names
from onnxvq.pwlu import PWLUParameters

__all__ = ["ReplaceActivationsWithPWLUPass", "parameter_tensors"]

logger = logging.getLogger(__name__)


def parameter_tensors(site: ActivationSite, params: PWLUParameters) -> dict[str, np.ndarray]:
    """The op's ``bounds``, ``knots``, ``slopes`` for ``params`` (groups: 1 or the site's channels)."""
    shape = site.param_shape if params.bounds.shape[1] > 1 else (1,)
    return {name: np.ascontiguousarray(array.reshape(len(array), *shape), np.float32)
            for name, array in (("bounds", params.bounds), ("knots", params.knots), ("slopes", params.slopes))}


class ReplaceActivationsWithPWLUPass(ir.passes.InPlacePass):
    """See the module docstring. ``replacements``: (site, parameters) pairs of this model."""

    def __init__(self, replacements: list[tuple[ActivationSite, PWLUParameters]]):
        super().__init__()
        self.replacements = replacements

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        taken = value_names(model)
        graph = model.graph
        for site, params in self.replacements:
            tensors = parameter_tensors(site, params)
            ops.pwlu.check_parameters(tensors["bounds"], tensors["knots"], tensors["slopes"])
            base = site.name.replace("/", ".").strip(".") or "pwlu"
            inputs = [site.input] + [register_initializer(graph, f"{base}.pwlu_{name}", array, taken)
                                     for name, array in tensors.items()]
            last = site.nodes[-1]
            new = ir.Node(ops.DOMAIN, ops.pwlu.OP_TYPE, inputs, name=last.name, doc_string=last.doc_string,
                          metadata_props=dict(last.metadata_props), num_outputs=1)
            ir.convenience.replace_nodes_and_values(graph, last, site.nodes, [new], [site.output], list(new.outputs))
            logger.debug("replaced %s %r by PWLU (%d intervals)", site.kind, site.name, params.intervals)
        return ir.passes.PassResult(model, modified=bool(self.replacements))
