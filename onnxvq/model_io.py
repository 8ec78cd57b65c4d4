"""Loading and saving models safely.

* :func:`load_model` reads a model with its external data resolved lazily (memory-mapped on
  first use), and turns every way a file can be wrong (missing, not ONNX, truncated, external
  data missing or short) into a one-line :class:`~onnxvq.errors.OnnxVQError`. The input file is
  only ever opened for reading.
* :func:`save_model` writes atomically: everything goes to a temporary folder beside the
  destination and is renamed into place only once complete, so an interrupted or failed save
  leaves no half-written file. External data is used when asked, or when the tensors would not
  fit in one protobuf (2 GiB): such a model is never serialized into a single message.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

import onnx
import onnx_ir as ir

from onnxvq.errors import OnnxVQError

__all__ = [
    "PROTOBUF_LIMIT",
    "check_output_path",
    "load_model",
    "model_file_bytes",
    "save_model",
    "write_atomically",
]

# Protobuf messages cannot exceed 2 GiB; keep a margin for the graph itself.
PROTOBUF_LIMIT = 2**31 - 2**26


def load_model(path: str | os.PathLike) -> ir.Model:
    """Read an ONNX model for compression; raise ``OnnxVQError`` on any unusable input."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise OnnxVQError(f"{path}: no such file")
    if os.path.isdir(path):
        raise OnnxVQError(f"{path} is a directory; give the path of an .onnx file")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception:  # protobuf raises DecodeError, RuntimeWarning-like errors, ... on bad bytes
        raise OnnxVQError(
            f"{path} is not a valid ONNX model (it cannot be parsed: truncated or not ONNX)"
        ) from None
    if not proto.HasField("graph") or proto.ir_version < 3 or not proto.opset_import:
        raise OnnxVQError(f"{path} is not an ONNX model (no graph, IR version or opset)")
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:
        raise OnnxVQError(f"{path} is not a well-formed ONNX model: {_first_line(e)}") from None
    ir.external_data.set_base_dir(model.graph, os.path.dirname(os.path.abspath(path)))
    _check_external_data(model, path)
    return model


def check_output_path(output: str | os.PathLike, inputs: list[str | os.PathLike]) -> str:
    """Validate where a model will be written before any work is done; return it as a string."""
    output = os.fspath(output)
    real = os.path.realpath(output)
    for source in inputs:
        if os.path.exists(source) and os.path.realpath(source) == real:
            raise OnnxVQError(
                f"the output path {output} is the input file; choose another output path"
            )
    if os.path.isdir(output):
        raise OnnxVQError(f"the output path {output} is a directory; give a file name")
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        raise OnnxVQError(f"the output folder {directory} does not exist; create it first")
    return output


def save_model(
    model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None
) -> list[str]:
    """Atomically write ``model`` to ``path``; return the files written.

    Args:
        external_data: True writes tensors to ``<file name>.data`` beside the model, False
            writes one file, None (default) chooses external data only when needed (over 2 GiB,
            or a tensor attribute that is itself external).
    """
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    data_name = name + ".data"
    data_path = os.path.join(directory, data_name)
    tensors = list(_all_tensors(model))
    external = [(t, is_attr) for t, is_attr in tensors if isinstance(t, ir.ExternalTensor)]
    if any(os.path.realpath(t.path) == os.path.realpath(data_path) for t, _ in external):
        raise OnnxVQError(
            f"writing {data_name} would overwrite the external data the model is read from; "
            "choose another output name"
        )
    too_big = sum(t.nbytes for t, _ in tensors) > PROTOBUF_LIMIT
    if external_data is None:
        external_data = too_big or any(is_attr for _, is_attr in external)
    tmp_dir = tempfile.mkdtemp(prefix=".onnxvq-", dir=directory)
    try:
        tmp_model = os.path.join(tmp_dir, name)
        if external_data:
            ir.save(model, tmp_model, external_data=data_name)
        else:
            if too_big:
                raise OnnxVQError(
                    "the model's tensors exceed the 2 GiB protobuf limit; save with external data"
                )
            ir.external_data.load_to_model(model)
            ir.save(model, tmp_model)
        written = []
        if external_data and os.path.exists(os.path.join(tmp_dir, data_name)):
            os.replace(os.path.join(tmp_dir, data_name), data_path)
            written.append(data_path)
        os.replace(tmp_model, path)
        written.insert(0, path)
        return written
    except OSError as e:
        raise OnnxVQError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _all_tensors(model: ir.Model) -> Iterator[tuple[ir.TensorProtocol, bool]]:
    """(tensor, is_attribute) for every initializer and tensor attribute in every graph."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value, False
        for node in graph:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                    yield attr.value, True


def _external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    for tensor, _ in _all_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            yield tensor


def model_file_bytes(path: str | os.PathLike, model: ir.Model) -> int:
    """Size of the model file at ``path`` plus the external data files ``model`` (loaded from
    it) reads its tensors from, each file counted once."""
    data_files = {os.path.realpath(t.path) for t in _external_tensors(model)}
    return os.path.getsize(path) + sum(os.path.getsize(f) for f in data_files if os.path.exists(f))


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place.

    Nothing half-written is left behind on failure, and the file gets ordinary permissions
    (``mkstemp`` creates it private).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".onnxvq-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_external_data(model: ir.Model, path: str) -> None:
    for tensor in _external_tensors(model):
        location = os.fspath(tensor.location)
        data_path = tensor.path
        if not os.path.isfile(data_path):
            raise OnnxVQError(
                f"external data file {location!r} of tensor {tensor.name!r} is missing "
                f"(expected at {data_path}); keep it next to {os.path.basename(path)}"
            )
        needed = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if os.path.getsize(data_path) < needed:
            raise OnnxVQError(
                f"external data file {location!r} is shorter than tensor {tensor.name!r} needs "
                f"({os.path.getsize(data_path)} < {needed} bytes): it is truncated"
            )


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
