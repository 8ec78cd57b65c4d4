"""The native kernel library against the function bodies: every ai.onnxvq op form, the same
conformance cases and fuzzed shapes as the body tests, and compressed models.

Library output = body output in onnxruntime (1e-4 relative, float32): the bodies are the
definition the library must match. Both lookup-table and decoded-tile paths of VQGemm/VQMatMul
are covered (small k against the outputs, and sign-split or large k), as are batches over the
32 rows of one table pass and weights over one decoded tile.

Skipped when the library is not built (``onnxvq native build``), unless
``ONNXVQ_REQUIRE_NATIVE=1`` (CI), where a missing library fails them.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnxvq
import test_gather
import test_recurrent_ops
from models import make_model, rng
from onnxvq import ops
from test_ops import build
from test_ops_fuzz import CASES as FUZZ_CASES
from test_ops_fuzz import FUZZ, codings

LIBRARY = ops.native_library_path()
if LIBRARY is None and os.environ.get("ONNXVQ_REQUIRE_NATIVE") != "1":
    pytest.skip("the native library is not built (onnxvq native build)", allow_module_level=True)

CODINGS = [(16, 4), (5, 3), (256, 5), (300, 4)]
EXTRAS = [(), ("scales",), ("signs",), ("projection",), ("projection", "signs", "scales")]


def run(model: onnx.ModelProto, feeds: dict, *, native: bool) -> list[np.ndarray]:
    options = ops.session_options(native=native)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_library_matches_bodies(model: onnx.ModelProto, feeds: dict) -> None:
    bodies, native = run(model, feeds, native=False), run(model, feeds, native=True)
    assert len(bodies) == len(native)
    for want, got in zip(bodies, native):
        assert got.shape == want.shape
        scale = max(1.0, float(np.abs(want).max(initial=0.0)))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)


def test_the_library_registers_kernels_that_replace_the_bodies():
    """A model whose bodies were removed runs only with the library: its kernels, not the
    bodies, compute the ops."""
    vq, *_ = build(ops.vq_gemm, ops.vq_gemm.CASES[0], 16, 4, 17, extras=("scales",))
    del vq.functions[:]
    x = {"X": rng(0).standard_normal(ops.vq_gemm.CASES[0][2]).astype(np.float32)}
    with pytest.raises(Exception):
        run(vq, x, native=False)
    assert run(vq, x, native=True)[0].shape == (5, 24)


@pytest.mark.parametrize("extras", EXTRAS, ids=lambda e: "+".join(e) or "plain")
@pytest.mark.parametrize("k, d", CODINGS, ids=str)
@pytest.mark.parametrize(
    "mod, case",
    [(m, c) for m in (ops.vq_gemm, ops.vq_matmul, ops.vq_conv, ops.vq_conv_transpose) for c in m.CASES],
    ids=[c[0] for m in (ops.vq_gemm, ops.vq_matmul, ops.vq_conv, ops.vq_conv_transpose) for c in m.CASES],
)
@pytest.mark.parametrize("codebook_dtype", [np.float16, np.float32], ids=["fp16", "fp32"])
def test_conformance_cases(mod, case, k, d, extras, codebook_dtype):
    vq, *_ = build(mod, case, k, d, 17, extras=extras, codebook_dtype=codebook_dtype)
    x = {"X": rng(1).standard_normal(case[2]).astype(np.float32)}
    assert_library_matches_bodies(vq, x)


@pytest.mark.parametrize("extras", test_gather.EXTRAS, ids=lambda e: "+".join(e) or "plain")
@pytest.mark.parametrize("k, d, opset", test_gather.CODINGS, ids=str)
@pytest.mark.parametrize("case", ops.vq_gather.CASES, ids=[c[0] for c in ops.vq_gather.CASES])
def test_gather_cases(case, k, d, opset, extras):
    vq, _, indices, _ = test_gather.build(case, k, d, opset, extras)
    assert_library_matches_bodies(vq, {"indices": indices})


RECURRENT = [c for c in test_recurrent_ops.CASES if not c[6].get("layout", 0)]  # onnxruntime runs no layout=1


@pytest.mark.parametrize("k, d, extras", [(16, 4, ()), (256, 3, ("scales",)), (300, 5, ("projection", "signs", "scales"))],
                         ids=["4bit", "8bit-scales", "16bit-all-extras"])
@pytest.mark.parametrize("case", RECURRENT, ids=[c[0] for c in RECURRENT])
def test_recurrent_cases(case, k, d, extras):
    vq, _, feeds, _ = test_recurrent_ops.build(case, k, d, extras=extras)
    assert_library_matches_bodies(vq, feeds)


@FUZZ
@given(
    op=st.sampled_from(sorted(FUZZ_CASES, key=lambda m: m.OP_TYPE)).flatmap(lambda m: st.tuples(st.just(m), FUZZ_CASES[m])),
    coding=codings(),
    seed=st.integers(0, 2**16),
)
def test_fuzzed_shapes_and_attributes(op, coding, seed):
    """The body tests' generator: Conv 1-3-D with groups, pads/auto_pad, strides, dilations;
    ConvTranspose with output_padding; Gemm with every transpose and bias broadcast; MatMul with
    batched weights on either side; 4/8/16-bit codes, every extra, fp16/fp32 codebooks."""
    mod, case = op
    k, d, opset, extras, dtype = coding
    vq, *_ = build(mod, case, k, d, opset, seed=seed, codebook_dtype=dtype, extras=extras)
    x = {"X": rng(seed).standard_normal(case[2]).astype(np.float32)}
    assert_library_matches_bodies(vq, x)


# Depthwise convolutions, which the library computes itself (ops/native/src/depthwise.cc) rather
# than through onnxruntime's Conv: widths across its 32-output blocks (5, 33, 70), 1 to 6 output
# rows (its 4-, 2- and 1-row steps), strides and dilations on each axis, asymmetric explicit pads,
# every auto_pad, a channel multiplier of 2, no bias.
DEPTHWISE = [
    ("3x3_same_upper", (6, 1, 3, 3), (2, 6, 7, 33), {"group": 6, "auto_pad": "SAME_UPPER"}, True),
    ("5x5_pads_rows2", (8, 1, 5, 5), (3, 8, 2, 70), {"group": 8, "pads": [2, 2, 2, 2]}, True),
    ("7x7_pads_wide", (4, 1, 7, 7), (1, 4, 9, 70), {"group": 4, "pads": [3, 3, 3, 3]}, False),
    ("stride2_asymmetric", (5, 1, 3, 3), (1, 5, 11, 13), {"group": 5, "strides": [2, 2], "pads": [0, 1, 2, 0]}, True),
    ("stride_2x1_same_lower", (6, 1, 5, 3), (2, 6, 6, 5), {"group": 6, "strides": [2, 1], "auto_pad": "SAME_LOWER"}, True),
    ("stride3_dilation2", (3, 1, 3, 3), (1, 3, 17, 40), {"group": 3, "strides": [1, 3], "dilations": [2, 2], "pads": [1, 2, 1, 2]}, True),
    ("valid_multiplier2", (12, 1, 3, 2), (2, 6, 6, 9), {"group": 6, "auto_pad": "VALID"}, True),
    ("dilation_1x3_stride2", (4, 1, 2, 3), (1, 4, 8, 37), {"group": 4, "dilations": [1, 3], "strides": [2, 2]}, False),
]


@pytest.mark.parametrize("case", DEPTHWISE, ids=[c[0] for c in DEPTHWISE])
@pytest.mark.parametrize("extras", [(), ("scales",), ("projection", "signs", "scales")], ids=["plain", "scales", "all"])
def test_depthwise_convolutions(case, extras):
    vq, *_ = build(ops.vq_conv, case, 16, 3, 17, extras=extras)
    x = {"X": rng(5).standard_normal(case[2]).astype(np.float32)}
    assert_library_matches_bodies(vq, x)


def _gemm_model(rows: int, cols: int, batch: int) -> onnx.ModelProto:
    weight = (0.1 * rng(2).standard_normal((rows, cols))).astype(np.float32)
    return make_model(
        [helper.make_node("Gemm", ["X", "W", "b"], ["Y"], transB=1, alpha=0.5, beta=2.0)],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, cols])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, rows])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(np.arange(rows, dtype=np.float32), "b")],
    )


@pytest.mark.parametrize("path", ["tables", "tiles", "auto"])
@pytest.mark.parametrize("method, options", [("pq", {"k": 256, "d": 8}), ("ssvq", {"k": 64, "d": 4}),
                                             ("ssvq", {"k": 256, "d": 8}), ("lr2vq", {"k": 256, "d": 8, "rank": 4}),
                                             ("pq", {"k": 16, "d": 3})])
@pytest.mark.parametrize("batch", [1, 5, 70], ids=["batch1", "batch5", "batch70"])
def test_compressed_layers_on_either_matmul_path(method, options, batch, path, monkeypatch):
    """A 512 x 4096 Gemm on each path of VQGemm (ONNXVQ_MATMUL_PATH forces one; sign-split
    weights always take the decoded path): 1 row, 5 rows padded to a vector of 8, 70 rows in
    three passes of the lookup tables; 256-row tiles (1 Mi floats / 4096) cover the outputs
    twice; up to 4 rows the decoded path dots each row as it is decoded (and sign-split weights
    at d = 8 with 8-bit codes never store it)."""
    monkeypatch.setenv("ONNXVQ_MATMUL_PATH", path)
    model = _gemm_model(512, 4096, batch)
    compressed = onnxvq.compress(model, method=method, scales="on", **options).to_proto()
    assert compressed.graph.node[0].op_type == "VQGemm"
    x = {"X": rng(3).standard_normal((batch, 4096)).astype(np.float32)}
    assert_library_matches_bodies(compressed, x)


def test_the_text_encoder_sample_runs_with_the_library():
    """One block of samples/text_encoder.py: the token table (VQGather), attention and MLP
    MatMuls with batched activations (VQMatMul) and the Gemm head."""
    from text_encoder import build_text_encoder

    compressed = onnxvq.compress(build_text_encoder(depth=1), k=256, d=8).to_proto()
    assert {"VQGather", "VQMatMul", "VQGemm"} <= {n.op_type for n in compressed.graph.node}
    feeds = {"input_ids": rng(4).integers(0, 30000, (2, 16)).astype(np.int64)}
    assert_library_matches_bodies(compressed, feeds)


def test_a_node_without_extra_inputs_is_refused_with_a_clear_error():
    """Models written before ``extra_inputs`` existed cannot tell a scale from a bias: the
    library refuses them at session creation, naming the node and what to do."""
    vq, *_ = build(ops.vq_conv, ops.vq_conv.CASES[0], 16, 4, 17, extras=("scales",))
    node = vq.graph.node[0]
    kept = [a for a in node.attribute if a.name != "extra_inputs"]
    del node.attribute[:]
    node.attribute.extend(kept)
    with pytest.raises(Exception, match="extra_inputs"):
        run(vq, {"X": np.zeros(ops.vq_conv.CASES[0][2], np.float32)}, native=True)


@pytest.mark.parametrize("mod", [ops.vq_gemm, ops.vq_conv, ops.vq_matmul], ids=lambda m: m.OP_TYPE)
def test_encoded_tensors_fed_at_run_time(mod):
    """Codes, codebook and extras given as graph inputs (not constants): the kernels read them
    from each call's inputs, and two runs with different codebooks give their own results."""
    case = mod.CASES[0]
    vq, *_ = build(mod, case, 16, 4, 17, extras=("projection", "signs", "scales"))
    encoded = {i.name: numpy_helper.to_array(i) for i in vq.graph.initializer if i.name != "bias"}
    kept = [i for i in vq.graph.initializer if i.name not in encoded]
    del vq.graph.initializer[:]
    vq.graph.initializer.extend(kept)
    for name, array in encoded.items():
        vq.graph.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype),
                                                            list(array.shape)))
    x = {"X": rng(5).standard_normal(case[2]).astype(np.float32)}
    first = {**x, **encoded}
    second = {**first, "codebook": (encoded["codebook"] * 2).astype(encoded["codebook"].dtype)}
    for feeds in (first, second):
        assert_library_matches_bodies(vq, feeds)
    assert not np.allclose(run(vq, first, native=True)[0], run(vq, second, native=True)[0])


_SESSION_MEMORY = """
import sys
import onnx, onnxruntime as ort
from onnx import TensorProto, helper
from onnxvq import ops

def anon_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024

options = ops.session_options(native=True)
io = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1])
empty = helper.make_model(helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "g", [io("a")], [io("b")]))
keep = ort.InferenceSession(empty.SerializeToString(), options, providers=["CPUExecutionProvider"])
before = anon_mib()
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
print(anon_mib() - before)
"""


def test_nodes_sharing_a_universal_codebook_hold_one_float_copy(tmp_path):
    """vq4all: every node reads the same codebook tensor, and the library converts it to float32
    once per session, not once per node (65,536 x 16 words: 4 MiB as float32, twice that with
    the lookup tables' transpose; the CNN's 4 nodes held 32 MiB before). The session is measured
    in a fresh process (resident anonymous memory over an empty session's)."""
    import subprocess
    import sys

    from models import cnn
    from onnxvq.universal_codebook import build_codebook, save_codebook

    dense = tmp_path / "cnn.onnx"
    onnx.save(cnn(), dense)
    save_codebook(build_codebook([dense], k=64, d=16, per_tensor=2048, seed=0), tmp_path / "universal.npz")
    compressed = onnxvq.compress(str(dense), method="vq4all", codebook=str(tmp_path / "universal.npz"), min_size=0).to_proto()
    nodes = [n for n in compressed.graph.node if n.domain == ops.DOMAIN]
    assert len(nodes) == 4 and len({n.input[2] for n in nodes}) == 1
    # The same codes into a 65,536-word codebook whose first 64 words are the built ones.
    table = next(t for t in compressed.graph.initializer if t.name == nodes[0].input[2])
    words = numpy_helper.to_array(table)
    large = rng(9).standard_normal((65536, 16)).astype(words.dtype)
    large[:64] = words
    table.CopyFrom(numpy_helper.from_array(large, table.name))
    x = {"x": rng(10).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    assert_library_matches_bodies(compressed, x)
    path = tmp_path / "cnn.vq.onnx"
    onnx.save(compressed, path)
    held = float(subprocess.run([sys.executable, "-c", _SESSION_MEMORY, str(path)], check=True,
                                capture_output=True, text=True).stdout)
    assert held < 12.0, f"the session holds {held:.1f} MiB"
