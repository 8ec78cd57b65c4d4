"""The native kernel library around its kernels: loading and falling back to the function bodies,
the header fetcher, the CMake build (on a throwaway source), ``onnxvq run`` and ``onnxvq native
build``. Nothing is downloaded: the fetcher reads local fake tarballs.

With ``ONNXVQ_REQUIRE_NATIVE=1`` (CI, after ``onnxvq native build``) a missing library fails the
test that uses it instead of skipping it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import onnxvq
from onnxvq.errors import OnnxVQError
from onnxvq.ops import native_build, native_library
from models import mlp

REQUIRE_NATIVE = os.environ.get("ONNXVQ_REQUIRE_NATIVE") == "1"
HEADERS = native_build.ORT_HEADERS_FOLDER


@pytest.fixture
def no_library(monkeypatch, tmp_path):
    """No library anywhere: no environment variable, nothing at the default location; the
    once-per-process warning not yet given."""
    monkeypatch.delenv(native_library.ENV_LIBRARY, raising=False)
    monkeypatch.setattr(native_library, "default_library_path", lambda: tmp_path / "absent" / "libonnxvq_ops.so")
    monkeypatch.setattr(native_library, "_warned", False)


def _warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and r.name == native_library.__name__]


def test_without_library_plain_options_and_one_warning(no_library, caplog):
    caplog.set_level(logging.WARNING)
    first = native_library.session_options(intra_op_num_threads=1)
    second = native_library.session_options()
    assert isinstance(first, ort.SessionOptions) and isinstance(second, ort.SessionOptions)
    assert first.intra_op_num_threads == 1
    (record,) = _warnings(caplog)  # once per process, not once per call
    message = record.getMessage()
    assert "not built" in message and "onnxvq native build" in message and "\n" not in message
    assert native_library.native_library_path() is None


def test_native_true_without_library_is_a_one_line_error(no_library):
    with pytest.raises(OnnxVQError) as info:
        native_library.session_options(native=True)
    assert "onnxvq native build" in str(info.value) and "\n" not in str(info.value)


@pytest.fixture
def bad_library(monkeypatch, tmp_path, caplog):
    """``$ONNXVQ_NATIVE_LIBRARY`` naming a file that is no library, the warning not yet given."""
    bad = tmp_path / "libonnxvq_ops.so"
    bad.write_bytes(b"\x7fELF but truncated")
    monkeypatch.setenv(native_library.ENV_LIBRARY, str(bad))
    monkeypatch.setattr(native_library, "_warned", False)
    caplog.set_level(logging.WARNING)
    return bad


def test_native_false_never_loads_nor_warns(bad_library, caplog):
    options, library = native_library.session_options_with_library(native=False)
    assert library is None and not _warnings(caplog)


def test_unknown_session_option_is_named():
    with pytest.raises(TypeError, match="intra_op_threads"):
        native_library.session_options(native=False, intra_op_threads=1)


def test_bad_library_file_falls_back_with_the_warning(bad_library, caplog):
    bad = bad_library
    assert native_library.native_library_path() == str(bad)
    options, library = native_library.session_options_with_library()
    assert library is None
    (record,) = _warnings(caplog)
    assert str(bad) in record.getMessage() and "did not load" in record.getMessage()
    # the options are usable: a model runs on them (through the bodies)
    session = ort.InferenceSession(mlp().SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.zeros((1, 64), np.float32)})[0].shape == (1, 10)
    with pytest.raises(OnnxVQError, match="did not load"):
        native_library.session_options(native=True)


# --- the header fetcher --------------------------------------------------------------------------

def _fake_package(path: Path) -> str:
    """A tarball laid out like the npm package: two headers in the header folder, a file beside
    it and one below it (neither extracted). Returns its SHA-256."""
    members = {
        f"{HEADERS}onnxruntime_c_api.h": b"#define ORT_API_VERSION 29\n",
        f"{HEADERS}onnxruntime_cxx_api.h": b"// C++ API\n",
        f"{HEADERS}sub/nested.h": b"// not in the folder itself\n",
        "package/Plugins/README.md": b"other files of the package\n",
    }
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetcher_rejects_a_wrong_checksum(monkeypatch, tmp_path):
    package = tmp_path / "package.tgz"
    _fake_package(package)
    monkeypatch.setattr(native_build, "ORT_HEADERS_URL", package.as_uri())
    monkeypatch.setattr(native_build, "ORT_HEADERS_SHA256", "0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(OnnxVQError, match="SHA-256") as info:
        native_build.fetch_headers(cache)
    assert "\n" not in str(info.value)
    assert list(cache.iterdir()) == []  # nothing kept, nothing that looks fetched


def test_fetcher_extracts_only_the_headers_and_reuses_them(monkeypatch, tmp_path):
    package = tmp_path / "package.tgz"
    monkeypatch.setattr(native_build, "ORT_HEADERS_SHA256", _fake_package(package))
    monkeypatch.setattr(native_build, "ORT_HEADERS_URL", package.as_uri())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("ORT_INCLUDE_DIR", raising=False)
    folder = native_build.ort_include_dir()
    assert folder == tmp_path / "xdg" / "onnxvq" / f"ort-headers-{native_build.ORT_HEADERS_VERSION}"
    assert sorted(p.name for p in folder.iterdir()) == ["onnxruntime_c_api.h", "onnxruntime_cxx_api.h"]
    assert native_build.headers_api_version(folder) == 29
    # the cache is used from now on: no second download
    monkeypatch.setattr(native_build, "ORT_HEADERS_URL", (tmp_path / "gone.tgz").as_uri())
    assert native_build.fetch_headers() == folder


def test_fetcher_download_failure_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(native_build, "ORT_HEADERS_URL", (tmp_path / "missing.tgz").as_uri())
    with pytest.raises(OnnxVQError, match="cannot download.*ORT_INCLUDE_DIR") as info:
        native_build.fetch_headers(tmp_path / "cache")
    assert "\n" not in str(info.value)


def test_include_dir_without_headers_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(tmp_path))
    with pytest.raises(OnnxVQError, match="ORT_INCLUDE_DIR .* holds no onnxruntime_c_api.h"):
        native_build.ort_include_dir()


# --- the CMake build, on a throwaway source and minimal fake headers ------------------------------

_FAKE_C_API = """\
#define ORT_API_VERSION 29
#define ORT_API_CALL
typedef struct OrtStatus OrtStatus;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtApiBase OrtApiBase;
"""
# Registers no op: onnxruntime loads it and every ai.onnxvq op keeps running its body.
_EMPTY_LIBRARY = """\
#include "onnxruntime_c_api.h"
extern "C" __attribute__((visibility("default")))
OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions*, const OrtApiBase*) { return nullptr; }
int hidden_helper() { return 1; }
"""

needs_build_tools = pytest.mark.skipif(
    not (shutil.which("cmake") and shutil.which("ninja") and (shutil.which("c++") or shutil.which("g++"))),
    reason="cmake, ninja and a C++ compiler are needed to build",
)


@pytest.fixture
def source_tree(tmp_path, monkeypatch):
    """A copy of ops/native with one throwaway source, and a fake header folder."""
    tree = tmp_path / "native"
    (tree / "src").mkdir(parents=True)
    shutil.copy(native_build.SOURCE_DIR / "CMakeLists.txt", tree)
    (tree / "src" / "empty.cc").write_text(_EMPTY_LIBRARY)
    headers = tmp_path / "headers"
    headers.mkdir()
    (headers / "onnxruntime_c_api.h").write_text(_FAKE_C_API)
    monkeypatch.setattr(native_build, "SOURCE_DIR", tree)
    return tree, headers


@needs_build_tools
def test_build_compiles_every_source_into_one_loadable_library(source_tree, tmp_path, monkeypatch, caplog):
    tree, headers = source_tree
    path = native_build.build(tmp_path / "out", ort_include=headers, build_dir=tmp_path / "build")
    assert path == tmp_path / "out" / "libonnxvq_ops.so" and path.is_file()
    exported = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True).stdout
    assert "RegisterCustomOps" in exported and "hidden_helper" not in exported  # -fvisibility=hidden
    needed = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True).stdout
    assert "onnxruntime" not in needed  # every call goes through the OrtApi table
    monkeypatch.setenv(native_library.ENV_LIBRARY, str(path))
    options, library = native_library.session_options_with_library(native=True)
    assert library == str(path)


@needs_build_tools
def test_compile_error_is_one_line_with_the_log(source_tree, tmp_path):
    tree, headers = source_tree
    (tree / "src" / "broken.cc").write_text("int broken( { return 0; }\n")
    with pytest.raises(OnnxVQError) as info:
        native_build.build(tmp_path / "out", ort_include=headers, build_dir=tmp_path / "build")
    message = str(info.value)
    assert "\n" not in message and "broken.cc" in message and "error" in message
    assert str(tmp_path / "build" / "build.log") in message
    assert not (tmp_path / "out" / "libonnxvq_ops.so").exists()


def test_build_without_sources_says_so(tmp_path, monkeypatch):
    (tmp_path / "native").mkdir()
    monkeypatch.setattr(native_build, "SOURCE_DIR", tmp_path / "native")
    with pytest.raises(OnnxVQError, match="no kernel sources"):
        native_build.build(tmp_path / "out")


# --- the command line ------------------------------------------------------------------------------

def onnxvq_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "onnxvq.cli", *map(str, args)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def compressed_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    path = folder / "mlp.vq.onnx"
    onnxvq.compress(mlp(), k=16, d=4, min_size=0).save(str(path))
    return path


def test_run_prints_outputs_and_latency_on_the_bodies(compressed_model, tmp_path):
    done = onnxvq_cli("run", compressed_model, "--no-native", "--batch", "4", "--repeat", "3", "--threads", "1")
    assert done.returncode == 0, done.stderr
    assert "3 ai.onnxvq node(s), run by: function bodies" in done.stdout
    assert "x: float32 (4, 64)" in done.stdout and "y: float32 (4, 10)  sum " in done.stdout
    assert "latency: median" in done.stdout and "over 3 run(s)" in done.stdout
    assert done.stderr == ""  # --no-native: no fallback warning

    feeds = tmp_path / "inputs.npz"
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    np.savez(feeds, x=x)
    done = onnxvq_cli("run", compressed_model, "--no-native", "--inputs", feeds, "--repeat", "1")
    assert done.returncode == 0, done.stderr
    expected = ort.InferenceSession(str(compressed_model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert f"sum {expected.astype(np.float64).sum():.9g}" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--batch", "7", "--inputs", "{npz}"], "holds only 5 row(s)"),
    (["--inputs", "{model}"], "--inputs: "),
    (["--repeat", "0"], "--repeat"),
])
def test_run_bad_input_is_one_line(compressed_model, tmp_path, args, message):
    npz = tmp_path / "five.npz"
    np.savez(npz, x=np.zeros((5, 64), np.float32))
    args = [a.format(npz=npz, model=compressed_model) for a in args]
    done = onnxvq_cli("run", compressed_model, "--no-native", *args)
    assert done.returncode == 1 and message in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_run_native_without_library_is_one_line(compressed_model, tmp_path):
    done = onnxvq_cli("run", compressed_model, "--native", env={native_library.ENV_LIBRARY: str(tmp_path / "none.so")})
    assert done.returncode == 1 and done.stderr.startswith("error: the native kernel library")
    assert done.stderr.count("\n") == 1


def test_native_build_error_is_one_line(tmp_path):
    done = onnxvq_cli("native", "build", "--out", tmp_path, "--ort-include", tmp_path / "nothing")
    assert done.returncode == 1 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert not (tmp_path / "libonnxvq_ops.so").exists()


# --- the built library, when there is one ----------------------------------------------------------

def _built_library() -> str:
    path = native_library.native_library_path()
    if path is None or not os.path.isfile(path):
        if REQUIRE_NATIVE:
            pytest.fail("ONNXVQ_REQUIRE_NATIVE=1 but the native library is not built (run `onnxvq native build`)")
        pytest.skip("the native library is not built (onnxvq native build)")
    return path


def test_built_library_is_registered_and_runs_the_model(compressed_model, monkeypatch):
    path = _built_library()
    monkeypatch.setattr(native_library, "_warned", False)
    options, library = native_library.session_options_with_library()
    assert library == path
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    native = ort.InferenceSession(str(compressed_model), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    bodies = ort.InferenceSession(str(compressed_model), native_library.session_options(native=False),
                                  providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(native, bodies, rtol=1e-4, atol=1e-4)

    done = onnxvq_cli("run", compressed_model, "--native", "--repeat", "2")
    assert done.returncode == 0, done.stderr
    assert f"run by: native library {path}" in done.stdout and "y: float32 (1, 10)" in done.stdout


def _float16_model():
    """A compressed Gemm whose weights and activations are float16."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float16)
    model = helper.make_model(
        helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], "fp16",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 64])],
                          [numpy_helper.from_array(weight, "W")]),
        opset_imports=[helper.make_opsetid("", 17)])
    return onnxvq.compress(model, k=16, d=4, min_size=0).to_proto()


def test_a_float16_model_runs_its_bodies_instead_of_failing_on_the_kernels(caplog):
    """The kernels declare float32: with the library registered onnxruntime would refuse a
    float16 model outright. Given the model, session_options leaves the library out (one
    warning) or, with native=True, says why in one line."""
    model = _float16_model()
    assert "float16" in native_library.unsupported_by_library(model)
    caplog.set_level(logging.WARNING)
    options, library = native_library.session_options_with_library(None, model)
    assert library is None
    (record,) = _warnings(caplog)
    assert "float16" in record.getMessage() and "function bodies" in record.getMessage()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones((2, 32), np.float16)})[0].shape == (2, 64)
    with pytest.raises(OnnxVQError, match="float16"):
        native_library.session_options(native=True, model=model)
    assert native_library.unsupported_by_library(onnxvq.compress(mlp(), k=16, d=4).to_proto()) is None
