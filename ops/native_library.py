"""onnxruntime session options with the native kernel library registered when there is one.

A compressed model runs in stock onnxruntime through its ops' function bodies. The native
library (``libonnxvq_ops.so``, built by ``onnxvq native build``, :mod:`onnxvq.ops.native_build`)
registers C++ kernels for the ``ai.onnxvq`` ops; a registered kernel takes precedence over the
body in the same model file, and an op the library does not register still runs its body. So the
library is an optimisation (lower memory, faster runs), never a requirement: without it, or when
it fails to load, the same sessions run on the bodies.

Which library: ``$ONNXVQ_NATIVE_LIBRARY`` when set, else the default build location when the
file exists (:func:`native_library_path`).

Example::

    >>> import onnxruntime as ort
    >>> from onnxvq.ops import session_options
    >>> options = session_options(intra_op_num_threads=1)  # doctest: +SKIP
    >>> session = ort.InferenceSession("model.vq.onnx", options, providers=["CPUExecutionProvider"])  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from onnxvq.errors import OnnxVQError
from onnxvq.ops.native_build import default_library_path

__all__ = ["ENV_LIBRARY", "native_library_path", "session_options", "session_options_with_library",
           "unsupported_by_library"]

logger = logging.getLogger(__name__)

ENV_LIBRARY = "ONNXVQ_NATIVE_LIBRARY"
_BUILD_COMMAND = "onnxvq native build"
# The fallback is said once per process: a program that opens many sessions gets one line.
_warned = False


def native_library_path() -> str | None:
    """The native library to load: ``$ONNXVQ_NATIVE_LIBRARY`` when set (whether or not the file
    exists, so that a wrong path is reported rather than ignored), else the default build location
    (:func:`onnxvq.ops.native_build.default_library_path`) when that file exists, else None."""
    configured = os.environ.get(ENV_LIBRARY)
    if configured:
        return configured
    default = default_library_path()
    return str(default) if default.is_file() else None


def unsupported_by_library(model) -> str | None:
    """Why the native kernels cannot run ``model`` (a path, serialized bytes or ``ModelProto``), or
    None. They run float32 weights (and so float32 activations) only; onnxruntime checks the
    kernels' declared types when it loads a model, so a float16 model would not load at all with
    the library registered, rather than run its bodies."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        proto = model
    elif isinstance(model, bytes):
        proto = onnx.load_model_from_string(model)
    else:
        proto = onnx.load(os.fspath(model), load_external_data=False)
    from onnxvq.ops.vq_weight import DOMAIN

    def nodes(graph):
        for node in graph.node:
            yield node
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    yield from nodes(sub)

    for node in nodes(proto.graph):
        if node.domain != DOMAIN:
            continue
        dtype = next((a.i for a in node.attribute if a.name == "weight_dtype"), onnx.TensorProto.FLOAT)
        if dtype != onnx.TensorProto.FLOAT:
            name = onnx.TensorProto.DataType.Name(dtype).lower()
            return f"its {node.op_type} node {node.name!r} has {name} weights and the native kernels run float32 only"
    return None


def session_options(native: bool | None = None, model=None, **options: Any):
    """An ``onnxruntime.SessionOptions`` with ``options`` set as its attributes and the native
    kernel library registered when wanted and available.

    Args:
        native: ``None`` (default): register the library when it is there and loads; otherwise
            fall back to the function bodies, with one warning per process (through
            :mod:`logging`) that says why and how to build it. ``True``: the library is required;
            raise :class:`OnnxVQError` (one line) when it is missing or does not load.
            ``False``: never register it (the bodies run).
        model: the model the options are for (path, bytes or ``ModelProto``), optional. When
            given, a model the kernels cannot run (:func:`unsupported_by_library`: float16
            weights) gets the bodies, as a missing library does (an error with ``native=True``).
        **options: ``SessionOptions`` attributes, e.g. ``intra_op_num_threads=1`` or
            ``graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL``.

    Example::

        >>> opts = session_options(native=False, intra_op_num_threads=2)  # doctest: +SKIP
    """
    return session_options_with_library(native, model, **options)[0]


def session_options_with_library(native: bool | None = None, model=None, **options: Any):
    """:func:`session_options` and the path of the library registered in them (None when the
    function bodies run), for callers that report which one runs (``onnxvq run``, benchmarks)."""
    import onnxruntime as ort

    def fresh():
        made = ort.SessionOptions()
        for key, value in options.items():
            if not hasattr(made, key):
                raise TypeError(f"onnxruntime.SessionOptions has no attribute {key!r}")
            setattr(made, key, value)
        return made

    made = fresh()
    if native is False:
        return made, None
    path = native_library_path()
    unsupported = unsupported_by_library(model) if model is not None else None
    if unsupported is not None:
        problem = f"the model cannot run on the native kernels ({unsupported})"
        if native:
            raise OnnxVQError(f"{problem}; run it without --native / native=True")
        logger.warning("%s, so the ai.onnxvq ops run their standard-op function bodies", problem)
        return made, None
    if path is None:
        problem, fix = "the native kernel library is not built", f"build it with `{_BUILD_COMMAND}`"
    else:
        try:
            made.register_custom_ops_library(path)
            return made, path
        except Exception as e:  # onnxruntime's Fail (dlopen error, RegisterCustomOps' status), ...
            problem = f"the native kernel library {path} did not load ({_first_line(e)})"
            fix = f"rebuild it with `{_BUILD_COMMAND}`" + (f" or fix {ENV_LIBRARY}" if os.environ.get(ENV_LIBRARY) else "")
            # a library whose RegisterCustomOps failed part-way may have left op domains behind
            made = fresh()
    if native:
        raise OnnxVQError(f"{problem}; {fix}")
    _warn_once(f"{problem}, so the ai.onnxvq ops run their standard-op function bodies; {fix}")
    return made, None


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.warning(message)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    # onnxruntime prefixes "[ONNXRuntimeError] : 1 : FAIL : "; the rest says what failed
    text = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", text)
    return (text.splitlines() or [type(error).__name__])[0][:300]
