"""Input validation: refuse, before any work, a model that onnxruntime would refuse.

:func:`check_model` raises a one-line :class:`~onnxvq.errors.OnnxVQError` naming the first node
(name and op type) that breaks one of these rules, each a refusal of onnxruntime at load or at
the first run:

* every value a node or the graph output reads is defined: a graph input, an initializer, a node
  output of the same graph (in any order), or in a subgraph a value of an enclosing graph;
* no value is defined twice (by two nodes, or by a node and a graph input, an initializer or a
  value of an enclosing graph), and no two nodes of one graph share a non-empty name
  (``Constant`` nodes excepted: onnxruntime turns them into initializers);
* every node of the standard ONNX domain outside subgraphs is valid for its schema at the
  model's opset (``onnx.checker.check_node``: the op exists, input count, attributes) and its
  shape inference accepts the types inferred for its inputs (a Conv with a 2-D weight, a Gemm
  with a 3-D weight, MatMul or Gemm dimensions that do not agree);
* a ``Conv``'s input channels equal ``W.shape[1] * group``, a ``ConvTranspose``'s equal
  ``W.shape[0]``, where both are known.

What onnxruntime accepts is accepted, so nothing else is judged: nodes of other domains (custom
ops, ``ai.onnxvq`` and model-local functions: their runtime or library decides), declared shapes
that disagree with the inferred ones (onnxruntime merges them leniently: they are ignored), dims
stored as -1 or 0 (unknown), nodes listed out of topological order.

Types come from shape inference of a skeleton of the model: initializers and ``Constant`` weights
are replaced by their types (tensors of at most ``_DATA_LIMIT`` elements keep their values, for
Reshape targets and the like), so the cost does not grow with the weights and external data is
never read.
"""

from __future__ import annotations

import math

import onnx

from onnxvq.errors import OnnxVQError

__all__ = ["check_model"]

# Initializers up to this many elements keep their data in the skeleton (Reshape targets, ...).
_DATA_LIMIT = 1024
_STANDARD = ("", "ai.onnx")
_SUBGRAPHS = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def check_model(model: onnx.ModelProto, *, source: str = "the model") -> None:
    """Raise :class:`OnnxVQError` if onnxruntime would refuse ``model`` (module docstring).

    Args:
        model: the model as loaded, external data not loaded; never modified.
        source: how the message names the model (its path).

    Example::

        >>> check_model(onnx.load("model.onnx", load_external_data=False), source="model.onnx")
    """
    problem = _structure_problem(model.graph, set()) or _node_problem(model)
    if problem is not None:
        node, reason = problem
        raise OnnxVQError(
            f"{source} is not a valid model: {_describe(node)}: {reason}; onnxruntime cannot run it "
            "either: fix or re-export the model"
        )


def _structure_problem(graph: onnx.GraphProto, outer: set[str]) -> tuple[onnx.NodeProto | None, str] | None:
    """The first undefined read, double definition or duplicate node name of ``graph`` and its
    subgraphs (``outer``: the names visible from enclosing graphs)."""
    defined = {v.name for v in graph.input}
    for name in [t.name for t in graph.initializer] + [t.values.name for t in graph.sparse_initializer]:
        defined.add(name)  # IR < 4 lists initializers among the inputs too: not a redefinition
    node_names: set[str] = set()
    for node in graph.node:
        if node.name and node.op_type != "Constant":  # onnxruntime turns Constants into initializers
            if node.name in node_names:
                return node, "another node of its graph has the same name (names must be unique)"
            node_names.add(node.name)
        for name in node.output:
            if name and (name in defined or name in outer):
                return node, f"it writes {name!r}, which a graph input, initializer or other node already defines"
            defined.add(name)
    visible = outer | defined
    for node in graph.node:
        for name in node.input:
            if name and name not in visible:
                return node, f"it reads {name!r}, which no node, graph input or initializer defines"
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                problem = _structure_problem(subgraph, visible)
                if problem is not None:
                    return problem
    for output in graph.output:
        if output.name not in visible:
            return None, f"its output {output.name!r} is not defined by any node, input or initializer"
    return None


def _node_problem(model: onnx.ModelProto) -> tuple[onnx.NodeProto, str] | None:
    """The first standard main-graph node that its schema, its shape inference or the channel
    rule rejects, given the types inferred for the whole skeleton."""
    opsets = {o.domain or "": o.version for o in model.opset_import}
    context = onnx.checker.C.CheckerContext()
    context.ir_version = model.ir_version
    context.opset_imports = opsets
    types = _inferred_types(model)
    for node in model.graph.node:
        if node.domain not in _STANDARD or any(a.type in _SUBGRAPHS for a in node.attribute):
            continue
        try:
            onnx.checker.check_node(node, context)
            schema = onnx.defs.get_schema(node.op_type, opsets.get("", 1), "")
        except (onnx.checker.ValidationError, onnx.defs.SchemaError) as e:
            return node, _reason(e)
        if any(name and name not in types for name in node.input):
            continue  # an input of unknown type: inference could only guess
        try:
            onnx.shape_inference.infer_node_outputs(
                schema, node, {name: types[name] for name in node.input if name},
                opset_imports=list(model.opset_import), ir_version=model.ir_version,
            )
        except onnx.shape_inference.InferenceError as e:  # anything else: a doubt, not a verdict
            return node, _reason(e)
        reason = _channel_mismatch(node, types)
        if reason:
            return node, reason
    return None


def _inferred_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """name -> type of every main-graph value that shape inference of the skeleton types."""
    skeleton = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, functions=model.functions)
    graph = skeleton.graph
    graph.input.extend(model.graph.input)
    inputs = {v.name for v in graph.input}

    def typed_input(name: str, tensor: onnx.TensorProto) -> None:
        if name not in inputs:
            graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, tensor.dims))

    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL and math.prod(tensor.dims) <= _DATA_LIMIT:
            graph.initializer.append(tensor)
        else:
            typed_input(tensor.name, tensor)
    for node in model.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is not None and node.domain in _STANDARD and math.prod(value.dims) > _DATA_LIMIT:
            typed_input(node.output[0], value)  # a weight held in a Constant node
        else:
            graph.node.append(node)
    for value in graph.input:
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            for dim in value.type.tensor_type.shape.dim:
                if dim.HasField("dim_value") and dim.dim_value <= 0:
                    dim.Clear()  # paddle2onnx stores dynamic dims as -1 or 0
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton).graph
    except Exception:  # inference itself gave up: judge with the declared types only
        inferred = graph
    types = {v.name: v.type for v in [*inferred.input, *inferred.value_info, *inferred.output]}
    for tensor in graph.initializer:
        types.setdefault(tensor.name, onnx.helper.make_tensor_type_proto(tensor.data_type, tensor.dims))
    return types


def _channel_mismatch(node: onnx.NodeProto, types: dict[str, onnx.TypeProto]) -> str | None:
    """Conv: X's channels = W.shape[1] * group; ConvTranspose: X's channels = W.shape[0]."""
    if node.op_type not in ("Conv", "ConvTranspose") or len(node.input) < 2:
        return None
    x, w = (_dims(types.get(name)) for name in node.input[:2])
    if x is None or w is None or len(x) < 2 or len(w) < 2 or x[1] is None or None in w[:2]:
        return None
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    expected = w[1] * group if node.op_type == "Conv" else w[0]
    if x[1] == expected:
        return None
    rule = f"W.shape[1] * group = {w[1]} * {group}" if node.op_type == "Conv" else "W.shape[0]"
    return f"its input has {x[1]} channels, but its weight of shape {tuple(w)} expects {expected} ({rule})"


def _dims(type_proto: onnx.TypeProto | None) -> list[int | None] | None:
    """A tensor type's dims (None for each unknown one), or None if its rank is unknown."""
    if type_proto is None or not type_proto.tensor_type.HasField("shape"):
        return None
    dims = type_proto.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]


def _describe(node: onnx.NodeProto | None) -> str:
    if node is None:
        return "the graph"
    if node.name:
        return f"node {node.name!r} ({node.op_type})"
    first = next((name for name in node.output if name), "")
    return f"the {node.op_type} node writing {first!r}"


def _reason(error: Exception) -> str:
    """onnx's message, first line, without its bracketed category and node suffix."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if text.startswith("["):
        text = text.split("]", 1)[1].strip()
    return text.split(" in node ", 1)[0].rstrip(".")
