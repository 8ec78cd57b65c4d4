"""Loading and saving models safely.

* :func:`load_model` reads a model with its external data resolved lazily (memory-mapped on
  first use), and turns every way a file can be wrong (missing, not ONNX, truncated, external
  data missing or short, a graph onnxruntime would refuse: :mod:`onnxvq.model_check`) into a
  one-line :class:`~onnxvq.errors.OnnxVQError`. The input file is only ever opened for reading.
* :func:`save_model` writes atomically: everything goes to a temporary folder beside the
  destination and is renamed into place only once complete, so an interrupted or failed save
  leaves no half-written file. External data is used when asked, or when the tensors would not
  fit in one protobuf (2 GiB): such a model is never serialized into a single message.
* Nothing that was read is ever written: :func:`load_model` records every file a model is read
  from (the model and its external data files) in ``model.meta[SOURCE_FILES]``;
  :func:`check_output_paths` compares each path about to be written with every file read, and
  with each other, before any work is done, and :func:`save_model` checks again at the moment it
  knows which files it writes. Paths are compared as the files they name (symbolic links and
  hard links resolved), not as strings.
* Temporary files and folders carry the writing process's id (``.onnxvq-<pid>-...``), so a run
  killed with SIGKILL leaves nothing that the next run does not sweep (:func:`sweep_stale_temp`).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import onnx
import onnx_ir as ir

from onnxvq.errors import OnnxVQError
from onnxvq.model_check import check_model

__all__ = [
    "PROTOBUF_LIMIT",
    "all_tensors",
    "SOURCE_FILES",
    "model_bytes_without",
    "check_output_path",
    "check_output_paths",
    "check_readable_file",
    "load_model",
    "model_file_bytes",
    "save_model",
    "source_files",
    "sweep_stale_temp",
    "temp_folder",
    "write_atomically",
]

# Protobuf messages cannot exceed 2 GiB; keep a margin for the graph itself.
PROTOBUF_LIMIT = 2**31 - 2**26
# A model file is one protobuf message, so a larger file cannot be a model: reading stops there.
MAX_MODEL_FILE = 2**31
# model.meta key: the resolved paths of every file the model was read from.
SOURCE_FILES = "onnxvq.source_files"
TEMP_PREFIX = ".onnxvq-"


def load_model(path: str | os.PathLike) -> ir.Model:
    """Read an ONNX model for compression; raise ``OnnxVQError`` on any unusable input."""
    path = os.fspath(path)
    check_readable_file(path, "model", MAX_MODEL_FILE, hint="give the path of an .onnx file")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception:  # protobuf raises DecodeError, RuntimeWarning-like errors, ... on bad bytes
        raise OnnxVQError(
            f"{path} is not a valid ONNX model (it cannot be parsed: truncated or not ONNX)"
        ) from None
    if not proto.HasField("graph") or proto.ir_version < 3 or not proto.opset_import:
        raise OnnxVQError(f"{path} is not an ONNX model (no graph, IR version or opset)")
    check_model(proto, source=path)  # what onnxruntime would refuse, before minutes of work
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:
        raise OnnxVQError(f"{path} is not a well-formed ONNX model: {_first_line(e)}") from None
    ir.external_data.set_base_dir(model.graph, os.path.dirname(os.path.abspath(path)))
    _check_external_data(model, path)
    from onnxvq.shared_codebook import verify

    verify(model)
    model.meta[SOURCE_FILES] = [os.path.realpath(path)] + sorted(
        {os.path.realpath(t.path) for t in _external_tensors(model)}
    )
    return model


def check_readable_file(path: str, what: str, max_bytes: int, *, hint: str) -> None:
    """Refuse, before reading a byte, what is not a regular file of at most ``max_bytes``.

    ``/dev/zero``, a FIFO or a directory would otherwise be read without end or fail obscurely.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise OnnxVQError(f"cannot read the {what} {path}: no such file") from None
    except OSError as e:
        raise OnnxVQError(f"cannot read the {what} {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(info.st_mode):
        raise OnnxVQError(f"{path} is a directory; {hint}")
    if not stat.S_ISREG(info.st_mode):
        raise OnnxVQError(f"{path} is not a regular file (a device or pipe); {hint}")
    if info.st_size > max_bytes:
        raise OnnxVQError(
            f"the {what} {path} is {info.st_size} bytes, more than the {max_bytes} a {what} can be; {hint}"
        )
    if not os.access(path, os.R_OK):
        raise OnnxVQError(f"cannot read the {what} {path}: permission denied")


def source_files(model: ir.Model) -> list[str]:
    """Resolved paths of every file ``model`` was read from (as recorded by :func:`load_model`)
    and of every external data file it still reads."""
    files = list(model.meta.get(SOURCE_FILES, []))
    files += [os.path.realpath(t.path) for t in _external_tensors(model)]
    return list(dict.fromkeys(files))


def check_output_paths(
    outputs: Mapping[str, str | os.PathLike | None], inputs: Iterable[str | os.PathLike]
) -> None:
    """Validate every path about to be written, before any work is done.

    Args:
        outputs: what will be written, keyed by how the user names it (``"output"``,
            ``"--report"``, ``"external data"``, ...); None entries are ignored.
        inputs: every file that is read (models, their external data, configs, calibration).

    Raises OnnxVQError when an output is an input, two outputs are the same file, an output is
    a directory, or its folder is missing or not writable.
    """
    inputs = [os.fspath(p) for p in inputs if p is not None]
    seen: list[tuple[str, str]] = []
    for label, output in outputs.items():
        if output is None:
            continue
        output = os.fspath(output)
        for source in inputs:
            if _same_file(output, source):
                raise OnnxVQError(
                    f"the {label} path {output} would overwrite the input file {source}; "
                    "choose another path"
                )
        for other_label, other in seen:
            if _same_file(output, other):
                raise OnnxVQError(
                    f"the {label} path {output} is also the {other_label} path; give each its own file"
                )
        seen.append((label, output))
        if os.path.isdir(output):
            raise OnnxVQError(f"the {label} path {output} is a directory; give a file name")
        directory = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(directory):
            raise OnnxVQError(f"the folder of the {label} path, {directory}, does not exist; create it first")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise OnnxVQError(f"the folder of the {label} path, {directory}, is not writable; choose another")


def check_output_path(output: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> str:
    """:func:`check_output_paths` for one model output; returns it as a string."""
    check_output_paths({"output": output}, inputs)
    return os.fspath(output)


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: same resolved path, or one inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    protected: Iterable[str | os.PathLike] = (),
    before_commit: Callable[[list[str]], None] | None = None,
) -> list[str]:
    """Atomically write ``model`` to ``path``; return the files written.

    Args:
        external_data: True writes tensors to ``<file name>.data`` beside the model, False
            writes one file, None (default) chooses external data only when needed (over 2 GiB,
            or a tensor attribute that is itself external).
        protected: further files that must not be written (the model's own
            :func:`source_files` are always protected).
        before_commit: called with the complete temporary files (model first) before anything
            is renamed into place; if it raises, nothing is written.
    """
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    data_name = name + ".data"
    data_path = os.path.join(directory, data_name)
    tensors = list(all_tensors(model))
    external = [(t, is_attr) for t, is_attr in tensors if isinstance(t, ir.ExternalTensor)]
    too_big = sum(t.nbytes for t, _ in tensors) > PROTOBUF_LIMIT
    if external_data is None:
        external_data = too_big or any(is_attr for _, is_attr in external)
    targets = {"output": path, "external data": data_path if external_data else None}
    check_output_paths(targets, [*source_files(model), *map(os.fspath, protected)])
    sweep_stale_temp(directory)
    tmp_dir = temp_folder(directory)
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
        tmp_data = os.path.join(tmp_dir, data_name)
        # every tensor under onnx-ir's size threshold stays inline: no empty .data beside the model
        has_data = external_data and os.path.exists(tmp_data) and os.path.getsize(tmp_data) > 0
        if before_commit is not None:
            before_commit([tmp_model] + ([tmp_data] if has_data else []))
        written = []
        if has_data:
            os.replace(tmp_data, data_path)
            written.append(data_path)
        os.replace(tmp_model, path)
        written.insert(0, path)
        return written
    except OSError as e:
        raise OnnxVQError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def all_tensors(model: ir.Model) -> Iterator[tuple[ir.TensorProtocol, bool]]:
    """(tensor, is_attribute) for every initializer and tensor attribute in every graph."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value, False
        for node in graph:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                    yield attr.value, True


def model_bytes_without(model: ir.Model, excluded: set[str]) -> int:
    """The serialized size of ``model`` without the tensors of the values named in ``excluded``
    (initializers or ``Constant`` outputs): each other tensor counted at its data bytes, the rest
    by serializing the model with every tensor emptied meanwhile (no copy of the weights is made,
    and models over protobuf's 2 GiB are measured too). The model is as it was afterwards."""
    empty = ir.tensor(np.zeros(0, np.uint8))
    payload = 0
    restore: list = []
    try:
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if tensor is None:
                    continue
                payload += 0 if value.name in excluded else tensor.nbytes
                restore.append((value, tensor))
                value.const_value = empty
            for node in graph:
                attr = node.attributes.get("value")
                if node.op_type == "Constant" and attr is not None and attr.type == ir.AttributeType.TENSOR:
                    payload += 0 if node.outputs[0].name in excluded else attr.value.nbytes
                    restore.append((node, attr))
                    node.attributes["value"] = ir.AttrTensor("value", empty)
        return ir.serde.serialize_model(model).ByteSize() + payload
    finally:
        for holder, original in restore:
            if isinstance(holder, ir.Value):
                holder.const_value = original
            else:
                holder.attributes["value"] = original


def _external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    for tensor, _ in all_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            yield tensor


def model_file_bytes(path: str | os.PathLike, model: ir.Model) -> int:
    """Size of the model file at ``path`` plus the external data files ``model`` (loaded from
    it) reads its tensors from, each file counted once."""
    data_files = {os.path.realpath(t.path) for t in _external_tensors(model)}
    return os.path.getsize(path) + sum(os.path.getsize(f) for f in data_files if os.path.exists(f))


def temp_folder(directory: str | None = None) -> str:
    """A new private folder named ``.onnxvq-<pid>-...`` in ``directory`` (default: the system's
    temporary folder), which :func:`sweep_stale_temp` removes once this process is gone."""
    directory = directory if directory is not None else tempfile.gettempdir()
    try:
        return tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=directory)
    except OSError as e:
        raise OnnxVQError(f"cannot write in {directory}: {e.strerror or e}") from None


_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)-")


def sweep_stale_temp(directory: str | None = None) -> None:
    """Remove the temporary files and folders that onnxvq processes no longer alive left in
    ``directory`` (a run killed with SIGKILL cannot clean up after itself)."""
    directory = directory if directory is not None else tempfile.gettempdir()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if not match or _process_alive(int(match.group(1))):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except OSError:
            pass  # another user's or already gone: not ours to insist on


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place.

    Nothing half-written is left behind on failure, and the file gets ordinary permissions
    (``mkstemp`` creates it private).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    sweep_stale_temp(directory)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=directory)
    except OSError as e:
        raise OnnxVQError(f"cannot write {path}: {e.strerror or e}") from None
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
    folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    for tensor in _external_tensors(model):
        location = os.fspath(tensor.location)
        data_path = tensor.path
        # Checked before the location is looked at in any way (not even its size): a model
        # must not make onnxvq reveal or read files outside its own folder.
        inside = os.path.commonpath([folder, os.path.realpath(data_path)]) == folder
        if os.path.isabs(location) or not inside:
            raise OnnxVQError(
                f"tensor {tensor.name!r} of {os.path.basename(path)} points at external data "
                f"{location!r} outside the model's folder; refused for safety: keep the data "
                "files next to the model"
            )
        if not os.path.isfile(data_path):
            raise OnnxVQError(
                f"external data file {location!r} of tensor {tensor.name!r} is missing "
                f"(expected at {data_path}); keep it next to {os.path.basename(path)}"
            )
        if tensor.length is not None and tensor.length != tensor.nbytes:
            raise OnnxVQError(
                f"tensor {tensor.name!r} records {tensor.length} bytes of external data but its "
                f"shape and type need {tensor.nbytes}: the model is damaged; re-export it"
            )
        needed = (tensor.offset or 0) + tensor.nbytes
        if os.path.getsize(data_path) < needed:
            raise OnnxVQError(
                f"external data file {location!r} is shorter than tensor {tensor.name!r} needs "
                f"({os.path.getsize(data_path)} < {needed} bytes): it is truncated"
            )


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
