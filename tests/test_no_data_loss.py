"""Nothing the user has is ever written over or lost: inputs (the model, its external data, the
config, calibration files) are never an output, outputs never collide, a failed step leaves no
file, and temporary files do not outlive their process."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import mlp
from onnxvq.errors import OnnxVQError
from onnxvq.model_io import load_model, save_model, sweep_stale_temp


def onnxvq(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "onnxvq.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, stdin=subprocess.DEVNULL,
    )


def gemm_model(rows=64, cols=256, seed=0) -> onnx.ModelProto:
    weight = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["y"], transB=1, name="fc")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cols])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows])],
        [numpy_helper.from_array(weight, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def digest(folder) -> dict[str, str]:
    """Content hash of every file in ``folder``: what 'nothing changed' is checked against."""
    return {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
        for name in sorted(os.listdir(folder))
    }


def one_error_line(done) -> str:
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.fixture
def external_input(tmp_path):
    """a.onnx whose weights live in b.onnx.data: the name a compress to b.onnx would write."""
    onnx.save(gemm_model(), tmp_path / "a.onnx", save_as_external_data=True,
              location="b.onnx.data", size_threshold=0)
    return tmp_path / "a.onnx"


def test_compress_never_writes_over_the_inputs_external_data(external_input, tmp_path):
    before = digest(tmp_path)
    line = one_error_line(onnxvq("compress", external_input, "-o", tmp_path / "b.onnx", "--external-data", "-q"))
    assert "b.onnx.data" in line and "input" in line
    assert digest(tmp_path) == before
    # The input still loads and is whole.
    assert onnxvq("inspect", external_input).returncode == 0


def test_single_file_output_beside_the_inputs_data_is_fine(external_input, tmp_path):
    """Only what is really written is refused: a single-file b.onnx does not touch b.onnx.data."""
    data_before = (tmp_path / "b.onnx.data").read_bytes()
    done = onnxvq("compress", external_input, "-o", tmp_path / "b.onnx", "-q")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "b.onnx.data").read_bytes() == data_before
    assert onnxvq("inspect", external_input).returncode == 0


def test_output_named_as_the_inputs_data_file_is_refused(external_input, tmp_path):
    before = digest(tmp_path)
    one_error_line(onnxvq("compress", external_input, "-o", tmp_path / "b.onnx.data", "-q"))
    assert digest(tmp_path) == before


def test_decompress_never_writes_over_the_inputs_external_data(tmp_path):
    onnx.save(gemm_model(), tmp_path / "m.onnx")
    assert onnxvq("compress", tmp_path / "m.onnx", "-o", tmp_path / "a.onnx", "-q").returncode == 0
    # The compressed model with all its tensors in d.onnx.data (every one is decoded, so none
    # stays external in the dense model); decompressing to d.onnx would write that file.
    compressed = onnx.load(tmp_path / "a.onnx")
    onnx.save(compressed, tmp_path / "a.onnx", save_as_external_data=True, location="d.onnx.data", size_threshold=0)
    before = digest(tmp_path)
    one_error_line(onnxvq("decompress", tmp_path / "a.onnx", "-o", tmp_path / "d.onnx", "--external-data"))
    assert digest(tmp_path) == before
    assert onnxvq("decompress", tmp_path / "a.onnx", "-o", tmp_path / "e.onnx").returncode == 0


def test_report_on_the_output_path_is_refused(tmp_path):
    model = _saved(tmp_path / "m.onnx")
    before = digest(tmp_path)
    line = one_error_line(onnxvq("compress", model, "-o", tmp_path / "out.onnx", "--report", tmp_path / "out.onnx"))
    assert "--report" in line and "output" in line
    assert digest(tmp_path) == before
    line = one_error_line(onnxvq("compress", model, "-o", tmp_path / "out.onnx", "--report", model))
    assert "input" in line
    assert digest(tmp_path) == before


def test_report_that_cannot_be_written_leaves_no_model(tmp_path):
    model = _saved(tmp_path / "m.onnx")
    (tmp_path / "file").write_text("a file, not a folder")
    before = digest(tmp_path)
    one_error_line(onnxvq("compress", model, "-o", tmp_path / "out.onnx", "--report", tmp_path / "file" / "r.json"))
    assert digest(tmp_path) == before


def test_a_failure_before_commit_writes_nothing(tmp_path):
    """save_model's last step (how the CLI writes --report) failing leaves no file at all."""
    model = load_model(_saved(tmp_path / "m.onnx"))
    before = digest(tmp_path)

    def fail(files):
        assert all(os.path.getsize(f) > 0 for f in files)
        raise OnnxVQError("cannot write the report")

    with pytest.raises(OnnxVQError, match="report"):
        save_model(model, tmp_path / "out.onnx", external_data=True, before_commit=fail)
    assert digest(tmp_path) == before


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_output_that_links_to_the_input_is_refused(tmp_path, link):
    model = _saved(tmp_path / "m.onnx")
    (os.symlink if link == "symlink" else os.link)(model, tmp_path / "alias.onnx")
    before = digest(tmp_path)
    one_error_line(onnxvq("compress", model, "-o", tmp_path / "alias.onnx", "-q"))
    assert digest(tmp_path) == before


def test_config_and_calibration_files_are_never_outputs(tmp_path):
    model = _saved(tmp_path / "m.onnx")
    (tmp_path / "c.yaml").write_text("k: 16\n")
    np.savez(tmp_path / "calib.npz", x=np.zeros((4, 64), np.float32))
    before = digest(tmp_path)
    one_error_line(onnxvq("compress", model, "-o", tmp_path / "c.yaml", "--config", tmp_path / "c.yaml"))
    one_error_line(onnxvq("compress", model, "-o", tmp_path / "out.onnx", "--report", tmp_path / "calib.npz",
                          "--calib", tmp_path / "calib.npz"))
    assert digest(tmp_path) == before


@pytest.mark.parametrize("argv", [["/dev/zero"], ["{model}", "--config", "/dev/zero"],
                                  ["{model}", "--calib", "/dev/zero"], ["{model}", "--config", "{folder}"]])
def test_devices_and_folders_are_not_read(tmp_path, argv):
    """Each is refused at once (a read of /dev/zero would never end)."""
    model = _saved(tmp_path / "m.onnx")
    argv = [a.format(model=model, folder=tmp_path) for a in argv]
    before = digest(tmp_path)
    start = time.monotonic()
    line = one_error_line(onnxvq("compress", *argv, "-o", tmp_path / "out.onnx"))
    assert time.monotonic() - start < 60  # bounded: the read did not run on
    assert "regular file" in line or "directory" in line or "not an .npz" in line
    assert digest(tmp_path) == before


def test_npz_header_claiming_more_than_it_holds(tmp_path):
    """An .npz member whose header says (10**6, 10**6) float32 is refused before allocating."""
    model = _saved(tmp_path / "m.onnx")
    path = tmp_path / "huge.npz"
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)})
    member.write(b"\0" * 1024)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", member.getvalue())
    line = one_error_line(onnxvq("compress", model, "-o", tmp_path / "out.onnx", "--calib", path))
    assert "huge.npz" in line
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("location", ["../outside.data", "/etc/hostname", "link.data"])
def test_external_data_outside_the_models_folder_is_refused(tmp_path, location):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "outside.data").write_bytes(b"\0" * 65536)
    os.symlink(tmp_path / "outside.data", folder / "link.data")
    proto = gemm_model()
    tensor = proto.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    onnx.save(proto, folder / "m.onnx")
    for argv in (["compress", folder / "m.onnx", "-o", tmp_path / "out.onnx"], ["inspect", folder / "m.onnx"]):
        line = one_error_line(onnxvq(*argv))
        assert "outside the model's folder" in line
        assert "bytes" not in line  # nothing about the file itself is revealed
    assert not (tmp_path / "out.onnx").exists()


def test_external_length_shorter_than_the_tensor_is_refused(tmp_path):
    onnx.save(gemm_model(), tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    proto = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    entries = proto.graph.initializer[0].external_data
    for entry in entries:
        if entry.key == "length":
            entry.value = "1024"
    onnx.save(proto, tmp_path / "m.onnx")
    line = one_error_line(onnxvq("inspect", tmp_path / "m.onnx"))
    assert "1024" in line


def test_stale_temporary_folders_are_swept(tmp_path):
    """What a killed run left (named after its dead pid) goes; a live process's stays."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / f".onnxvq-{dead}-abc").mkdir()
    (tmp_path / f".onnxvq-{dead}-abc" / "partial.onnx").write_bytes(b"half")
    (tmp_path / f".onnxvq-{os.getpid()}-live").mkdir()
    (tmp_path / f".onnxvq-{dead}-x.json").write_text("{")
    sweep_stale_temp(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [f".onnxvq-{os.getpid()}-live"]


def test_sigterm_leaves_no_temporary_files(tmp_path):
    """SIGTERM mid-run: exit 143 and no output, or (if the run won the race) a whole output;
    either way no temporary file in the output folder."""
    proto = gemm_model(rows=1024, cols=2048)
    onnx.save(proto, tmp_path / "m.onnx")
    process = subprocess.Popen(
        [sys.executable, "-m", "onnxvq.cli", "compress", tmp_path / "m.onnx", "-o", tmp_path / "out.onnx",
         "-k", "4096", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )
    time.sleep(4)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode in (0, 128 + signal.SIGTERM), stderr
    if process.returncode:
        assert stderr.strip().splitlines() == ["error: terminated; nothing was written"]
        assert not (tmp_path / "out.onnx").exists()
    else:
        onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".onnxvq-")]


def _saved(path) -> str:
    onnx.save(mlp(), path)
    return path


def test_proto_of_a_model_read_with_external_data_is_self_contained(tmp_path, monkeypatch):
    """to_proto() keeps no reference to the input's .data file: it runs from any folder."""
    import onnxruntime as ort

    import onnxvq as api

    source = tmp_path / "in"
    source.mkdir()
    model = mlp((64, 48, 10))
    onnx.save(model, source / "a.onnx", save_as_external_data=True, location="a.onnx.data", size_threshold=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # the second layer (480 weights) stays dense, so its tensor is still the input's external data
    proto = api.compress(str(source / "a.onnx"), method="pq", k=16, d=4, min_size=1000).to_proto()
    assert not any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": x})[0].shape == (2, 10)


def test_external_data_save_writes_no_empty_data_file(tmp_path):
    """Every tensor small enough to stay inline: no 0-byte .data file, none listed as written."""
    import onnxvq as api

    written = api.compress(mlp((16, 16, 4)), method="pq", k=16, d=4, min_size=0).save(
        tmp_path / "small.onnx", external_data=True
    )
    assert written == [str(tmp_path / "small.onnx")]
    assert sorted(os.listdir(tmp_path)) == ["small.onnx"]
