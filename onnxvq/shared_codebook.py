"""A universal codebook (``vq4all``) kept in one file that several compressed models reference.

With ``--codebook-external`` the model's codebook initializer
(``onnxvq.universal_codebook.<12 hex digits>``) becomes ONNX external data pointing at
``universal-<12 hex digits>.vqcb`` beside the model: the codebook's float16 values, C order,
nothing else, so that every model compressed with that codebook into the same folder reads the
same file and a device stores it once. The file is written when it is not there yet and checked
(SHA-256 of its bytes) when it is: a file of the same name with other bytes is an error, never
overwritten. The model's provenance (``metadata_props["onnxvq"]``, ``universal_codebooks``)
records each shared codebook's full hash, and :func:`verify` checks a loaded model's codebooks
against it, so a codebook file swapped under a model is named as such instead of silently
decoding other weights.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import onnx
import onnx_ir as ir

from onnxvq.errors import OnnxVQError

__all__ = ["FILE_SUFFIX", "PREFIX", "externalize", "file_name", "verify"]

PREFIX = "onnxvq.universal_codebook."
FILE_SUFFIX = ".vqcb"


def file_name(sha256: str) -> str:
    return f"universal-{sha256[:12]}{FILE_SUFFIX}"


def externalize(model_file: str, directory: str, hashes: dict[str, str], protected=()) -> list[str]:
    """Rewrite the saved model ``model_file`` (a complete temporary file) so that each shared
    codebook initializer (name -> sha256 in ``hashes``) is external data in ``directory``;
    write each codebook file that is not there yet. Returns the codebook files' paths."""
    proto = onnx.load(model_file, load_external_data=False)
    by_name = {t.name: t for t in proto.graph.initializer}
    paths = []
    for name, sha256 in hashes.items():
        tensor = by_name.get(name)
        if tensor is None or tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise OnnxVQError(f"cannot keep the codebook {name} in its own file: it is not stored in the model")
        data = onnx.numpy_helper.to_array(tensor).astype(np.float16).tobytes(order="C")
        if hashlib.sha256(data).hexdigest() != sha256:
            raise OnnxVQError(f"the codebook {name} does not match its hash {sha256[:12]}...")
        path = os.path.join(directory, file_name(sha256))
        _write_once(path, data, sha256, protected)
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        tensor.ClearField("int32_data")
        tensor.data_type = onnx.TensorProto.FLOAT16
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", file_name(sha256)), ("offset", "0"), ("length", str(len(data)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        paths.append(path)
    onnx.save(proto, model_file)
    return paths


def _write_once(path: str, data: bytes, sha256: str, protected) -> None:
    if os.path.exists(path):
        with open(path, "rb") as f:
            present = hashlib.sha256(f.read()).hexdigest()
        if present != sha256:
            raise OnnxVQError(f"{path} exists with other contents (hash {present[:12]}..., not {sha256[:12]}...); "
                              "move it away or write the model to another folder")
        return
    if os.path.realpath(path) in {os.path.realpath(os.fspath(p)) for p in protected}:
        raise OnnxVQError(f"refusing to write the codebook over {path}, an input file")
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    except OSError as e:
        raise OnnxVQError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def verify(model: ir.Model, provenance_key: str = "onnxvq") -> None:
    """Raise ``OnnxVQError`` when a shared codebook of ``model`` does not have the hash its
    provenance records (a codebook file replaced under the model)."""
    try:
        recorded = json.loads(model.metadata_props.get(provenance_key) or "{}").get("universal_codebooks") or {}
    except (ValueError, AttributeError):
        return
    for name, sha256 in recorded.items():
        value = model.graph.initializers.get(name)
        if value is None or value.const_value is None:
            continue
        tensor = value.const_value
        try:
            data = tensor.numpy().astype(np.float16).tobytes(order="C")
        except Exception as e:  # a missing or short external file
            where = getattr(tensor, "path", name)
            raise OnnxVQError(f"cannot read the shared codebook {where}: {str(e).splitlines()[0][:200]}") from None
        present = hashlib.sha256(data).hexdigest()
        if present != sha256:
            where = getattr(tensor, "path", name)
            raise OnnxVQError(f"the shared codebook {where} has hash {present[:12]}... but the model expects "
                              f"{sha256[:12]}...: use the codebook file the model was compressed with")
