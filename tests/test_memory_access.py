"""Memory-access accounting: golden counts computed by hand for tiny models of every op form."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxvq
from models import cnn, make_model, weight
from onnxvq.accelerators import AcceleratorProfile, get_profile, load_profiles
from onnxvq.errors import OnnxVQError
from onnxvq.memory_access import analyze, parse_input_shape
from onnxvq.passes import AnnotateMemoryAccessPass

# fp32 activations (activation_bytes=None), 1 MiB buffer: every tiny tensor fits on chip.
PROFILE = AcceleratorProfile("test", "", macs_per_second=1e9, dram_bandwidth=1e9, onchip_buffer_bytes=1 << 20)
F = TensorProto.FLOAT


def info(name, shape):
    return helper.make_tensor_value_info(name, F, shape)


def single_node(op, inputs, weights, x_shape, y_shape, **attrs):
    """One node reading graph input ``x`` and initializers ``weights`` (name -> array)."""
    node = helper.make_node(op, inputs, ["y"], name="layer", **attrs)
    inits = [numpy_helper.from_array(a, n) for n, a in weights.items()]
    return make_model([node], [info("x", x_shape)], [info("y", y_shape)], inits)


def conv_groups():
    # x (1,16,10,10), W (16, 8, 3, 3), group 2, pads 1 -> y (1,16,10,10)
    return single_node("Conv", ["x", "w", "b"], {"w": weight((16, 8, 3, 3), 1), "b": np.zeros(16, np.float32)},
                       [1, 16, 10, 10], [1, 16, 10, 10], group=2, pads=[1, 1, 1, 1])


def gemm_trans_b(m=4):
    # A (m,24), B (32,24) transB=1, C (32,) -> y (m,32)
    return single_node("Gemm", ["x", "w", "c"], {"w": weight((32, 24), 2), "c": np.zeros(32, np.float32)},
                       [m, 24], [m, 32], transB=1)


def matmul_right():
    # X (2,3,24) @ W (24,32) -> (2,3,32)
    return single_node("MatMul", ["x", "w"], {"w": weight((24, 32), 3)}, [2, 3, 24], [2, 3, 32])


def matmul_left():
    # W (20,24) @ X (2,24,5) -> (2,20,5)
    return single_node("MatMul", ["w", "x"], {"w": weight((20, 24), 4)}, [2, 24, 5], [2, 20, 5])


def only_row(model, profile=PROFILE, **kwargs):
    traffic = analyze(ir.serde.deserialize_model(model) if isinstance(model, onnx.ModelProto) else model,
                      {}, profile, **kwargs)
    (row,) = traffic.rows
    return row


def kinds(row):
    return {k: v for k, v in row.weight_bytes.items() if v}


# ------------------------------------------------------------------------------------------------
# dense forms


def test_conv_with_groups_and_bias():
    row = only_row(conv_groups())
    # MACs = N * O * prod(out spatial) * (I/group) * prod(kernel) = 1 * 16 * 100 * 8 * 9
    assert row.macs == 115_200
    # W: 16*8*3*3 = 1152 fp32 = 4608 B; B: 16 fp32 = 64 B
    assert kinds(row) == {"dense": 4608, "bias": 64}
    # x: 16*10*10*4 = 6400 B read; y: 16*10*10*4 = 6400 B written
    assert (row.activation_read, row.activation_written) == (6400, 6400)
    # graph input and output always cross DRAM: 4608 + 64 + 6400 + 6400
    assert row.offchip_bytes == 17_472 and row.reread_bytes == 0
    assert row.compute_s == pytest.approx(115_200 / 1e9)
    assert row.memory_s == pytest.approx(17_472 / 1e9)
    assert row.time_s == max(row.compute_s, row.memory_s)


def test_gemm_trans_b_with_bias():
    row = only_row(gemm_trans_b())
    assert row.macs == 4 * 32 * 24  # M * N * K = 3072
    assert kinds(row) == {"dense": 32 * 24 * 4, "bias": 32 * 4}  # 3072 B, 128 B
    assert (row.activation_read, row.activation_written) == (4 * 24 * 4, 4 * 32 * 4)  # 384 B, 512 B


def test_matmul_constant_right_and_left():
    right = only_row(matmul_right())
    assert right.macs == 2 * 3 * 32 * 24  # batch * M * N * K = 4608
    assert kinds(right) == {"dense": 24 * 32 * 4}  # 3072 B
    assert (right.activation_read, right.activation_written) == (2 * 3 * 24 * 4, 2 * 3 * 32 * 4)
    left = only_row(matmul_left())
    assert left.macs == 2 * 20 * 5 * 24  # batch * M * N * K = 4800
    assert kinds(left) == {"dense": 20 * 24 * 4}  # 1920 B
    assert (left.activation_read, left.activation_written) == (2 * 24 * 5 * 4, 2 * 20 * 5 * 4)


def test_int8_counts_dense_weights_at_one_byte():
    row = only_row(gemm_trans_b(), weight_format="int8")
    assert kinds(row) == {"dense": 32 * 24, "bias": 128}  # 768 B; the bias keeps fp32
    conv = only_row(conv_groups(), weight_format="int8")
    assert kinds(conv) == {"dense": 1152, "bias": 64}


def test_uncompressed_weight_bytes_are_the_initializers():
    model = cnn()
    traffic = analyze(ir.serde.deserialize_model(model), {"x": (2, 3, 16, 16)}, PROFILE)
    expected = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert traffic.totals["weight_total"] == expected
    # MACs of the cnn: conv1 2*32*16*16*3*9 + conv2 2*64*8*8*32*9 + fc1 2*40*64 + fc2 2*10*40
    assert traffic.totals["macs"] == 442_368 + 2_359_296 + 5_120 + 800


def test_deit_tiny_sample_weight_bytes_and_int8():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "samples"))
    from deit_tiny import build_deit_tiny, count_params

    model = build_deit_tiny()
    assert 5_600_000 < count_params(model) < 5_800_000
    ir_model = ir.serde.deserialize_model(model)
    profile = get_profile("edge-npu")
    traffic = analyze(ir_model, {"image": (1, 3, 224, 224)}, profile)
    assert traffic.totals["weight_total"] == sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    int8 = analyze(ir_model, {"image": (1, 3, 224, 224)}, profile, weight_format="int8")
    # every Conv/Gemm/MatMul weight: 3*192*256 + 12*(192*576 + 192*192 + 2*192*768) + 192*1000
    assert int8.totals["weight_bytes"]["dense"] == 147_456 + 12 * 442_368 + 192_000


# ------------------------------------------------------------------------------------------------
# encoded forms


def compressed(model, k, d, scales="off"):
    result = onnxvq.compress(model, k=k, d=d, min_size=0, scales=scales)
    assert all(layer.compressed for layer in result.summary.layers)
    return result.model


@pytest.mark.parametrize(
    "build, k, d, op_type, macs, codes, codebook, bias",
    [
        # rows 16 (O), cols 8*3*3 = 72: d=8 -> n_sub 9; 4-bit: 16 * ceil(9/2) = 80 B; codebook 16*8 fp16
        (conv_groups, 16, 8, "VQConv", 115_200, 16 * 5, 16 * 8 * 2, 64),
        # d=4 -> n_sub 18; k=64 -> 8-bit: 16 * 18 = 288 B; codebook 64*4 fp16 = 512 B
        (conv_groups, 64, 4, "VQConv", 115_200, 16 * 18, 64 * 4 * 2, 64),
        # rows 32 (N), cols 24: d=4 -> n_sub 6; 8-bit: 32*6 = 192 B; bias C 32 fp32
        (gemm_trans_b, 64, 4, "VQGemm", 3072, 32 * 6, 64 * 4 * 2, 128),
        # rows 32 outputs, cols 24: 4-bit: 32 * ceil(6/2) = 96 B; codebook 16*4 fp16 = 128 B
        (matmul_right, 16, 4, "VQMatMul", 4608, 32 * 3, 16 * 4 * 2, 0),
        # left weight (20,24): rows 20, d=8 -> n_sub 3; 4-bit: 20 * 2 = 40 B; codebook 16*8 fp16
        (matmul_left, 16, 8, "VQMatMul", 4800, 20 * 2, 16 * 8 * 2, 0),
    ],
)
def test_encoded_forms(build, k, d, op_type, macs, codes, codebook, bias):
    dense = only_row(build())
    row = only_row(compressed(build(), k, d))
    assert row.op_type == op_type
    assert row.macs == macs  # the MACs of the op it stands for; decode gathers are not MACs
    assert row.weight_bytes == {"dense": 0, "codes": codes, "codebook": codebook, "bias": bias, "other": 0}
    assert (row.activation_read, row.activation_written) == (dense.activation_read, dense.activation_written)
    assert row.offchip_bytes == codes + codebook + bias + row.activation_read + row.activation_written
    # int8 of the compressed graph = int8 of the original: the encoded weight counts as its dense twin
    int8 = only_row(compressed(build(), k, d), weight_format="int8")
    assert int8.weight_bytes == only_row(build(), weight_format="int8").weight_bytes


def test_scales_are_read_with_the_codebook():
    """Per-channel scales: one fp16 per output row, a small table counted with the codebook."""
    row = only_row(compressed(gemm_trans_b(), 64, 4, scales="on"))
    assert row.weight_bytes["codebook"] == 64 * 4 * 2 + 32 * 2
    assert row.weight_bytes["codes"] == 32 * 6


def test_rom_holds_codebooks_in_first_use_order():
    model = compressed(cnn(), 16, 4)  # four codebooks of 16*4 fp16 = 128 B each
    rom = AcceleratorProfile("rom", "", 1e9, 1e9, 1 << 20, rom_bytes=300)  # two fit: 256 B, 44 B left
    traffic = analyze(model, {"x": (1, 3, 16, 16)}, rom)
    by_name = {r.name: r for r in traffic.rows}
    assert [by_name[n].rom_bytes for n in ("conv1", "conv2", "fc1", "fc2")] == [128, 128, 0, 0]
    totals = traffic.totals
    assert totals["weight_bytes"]["codebook"] == 512
    assert totals["offchip_weight_bytes"] == totals["weight_total"] - 256
    plain = analyze(model, {"x": (1, 3, 16, 16)}, PROFILE).totals
    assert plain["offchip_bytes"] - totals["offchip_bytes"] == 256


# ------------------------------------------------------------------------------------------------
# buffer rule


def relu_chain():
    # x (1,1000) -> Relu -> r -> Relu -> y: every tensor 4000 B in fp32
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu1"), helper.make_node("Relu", ["r"], ["y"], name="relu2")]
    return ir.serde.deserialize_model(make_model(nodes, [info("x", [1, 1000])], [info("y", [1, 1000])], []))


def test_activation_that_fits_stays_on_chip_and_larger_goes_to_dram():
    big = AcceleratorProfile("big", "", 1e9, 1e9, onchip_buffer_bytes=8000)
    rows = analyze(relu_chain(), {}, big).rows
    # graph input read and graph output written from DRAM; r (4000 B) fits in 8000 B: on chip
    assert [r.offchip_bytes for r in rows] == [4000, 4000]
    small = AcceleratorProfile("small", "", 1e9, 1e9, onchip_buffer_bytes=2000)
    rows = analyze(relu_chain(), {}, small).rows
    # r (4000 B) > 2000 B: written by relu1 and read by relu2 through DRAM
    assert [r.offchip_bytes for r in rows] == [8000, 8000]


def test_tiled_layer_rereads_the_cheaper_operand():
    # Gemm A (64,24) = 6144 B, W (32,24) = 3072 B, y (64,32) = 8192 B; buffer 1024 B, half 512 B
    # n_w = ceil(3072/512) = 6, n_a = ceil(6144/512) = 12
    # reread = min((6-1) * 6144, (12-1) * 3072) = min(30720, 33792) = 30720
    tiny = AcceleratorProfile("tiny", "", 1e9, 1e9, onchip_buffer_bytes=1024)
    row = only_row(gemm_trans_b(m=64), tiny)
    assert row.reread_bytes == 30_720
    assert row.offchip_bytes == 3072 + 128 + 6144 + 8192 + 30_720
    # with a buffer of 16 KiB, weight + input + output (17408 B) still overflow, but the weight
    # fits in half (8 KiB): it stays resident while activations stream once
    assert only_row(gemm_trans_b(m=64), AcceleratorProfile("b", "", 1e9, 1e9, 16384)).reread_bytes == 0


def test_activation_bytes_of_the_profile_apply_to_float_tensors():
    int8_npu = AcceleratorProfile("npu", "", 1e9, 1e9, 1 << 20, activation_bytes=1)
    row = only_row(conv_groups(), int8_npu)
    assert (row.activation_read, row.activation_written) == (1600, 1600)  # 1600 elements at 1 B


# ------------------------------------------------------------------------------------------------
# shapes and errors


def test_symbolic_input_needs_a_shape():
    model = ir.serde.deserialize_model(cnn())  # x: (N, 3, 16, 16)
    with pytest.raises(OnnxVQError, match=r"--input x:"):
        analyze(model, {}, PROFILE)
    with pytest.raises(OnnxVQError, match="no such input"):
        analyze(model, {"image": (1, 3, 16, 16)}, PROFILE)


def test_activation_of_unknown_shape_is_an_error():
    # Reshape to a shape computed at run time: y's shape cannot be inferred
    node = helper.make_node("Reshape", ["x", "s"], ["y"], name="reshape")
    model = make_model([node], [info("x", [2, 3]), helper.make_tensor_value_info("s", TensorProto.INT64, [2])],
                       [helper.make_tensor_value_info("y", F, None)], [])
    with pytest.raises(OnnxVQError, match=r"'y'.*--input NAME:SHAPE"):
        analyze(ir.serde.deserialize_model(model), {}, PROFILE)


def test_parse_input_shape():
    assert parse_input_shape("image:1x3x224x224") == ("image", (1, 3, 224, 224))
    assert parse_input_shape("1x3x8x8", ["x"]) == ("x", (1, 3, 8, 8))
    with pytest.raises(OnnxVQError, match="NAME:SHAPE"):
        parse_input_shape("1x3", ["a", "b"])
    with pytest.raises(OnnxVQError, match="integer dims"):
        parse_input_shape("x:1xNx3")


def test_profiles():
    profiles = load_profiles()
    assert list(profiles) == ["edge-npu", "mobile-soc", "datacenter-gpu"]
    assert all(p.macs_per_second > 0 and p.dram_bandwidth > 0 and p.description for p in profiles.values())
    edge = get_profile("edge-npu", {"dram_bandwidth": "16e9", "onchip_buffer_bytes": "2MiB", "activation_bytes": "null"})
    assert (edge.dram_bandwidth, edge.onchip_buffer_bytes, edge.activation_bytes) == (16e9, 2 << 20, None)
    with pytest.raises(OnnxVQError, match="edge-npu, mobile-soc, datacenter-gpu"):
        get_profile("tpu")
    with pytest.raises(OnnxVQError, match="unknown accelerator field 'bandwidth'"):
        get_profile("edge-npu", {"bandwidth": "1"})
    with pytest.raises(OnnxVQError, match="must be > 0"):
        get_profile("edge-npu", {"dram_bandwidth": "0"})
    with pytest.raises(OnnxVQError, match="not a number"):
        get_profile("edge-npu", {"rom_bytes": "lots"})


def test_pass_writes_totals_into_metadata_only():
    model = compressed(cnn(), 16, 4)
    before = ir.serde.serialize_model(model)
    result = AnnotateMemoryAccessPass({"x": (1, 3, 16, 16)}, PROFILE)(model)
    assert result.modified
    record = json.loads(model.metadata_props["onnxvq.memory_access"])
    assert record["profile"] == "test" and record["input_shapes"] == {"x": [1, 3, 16, 16]}
    assert record["totals"] == json.loads(json.dumps(analyze(model, {"x": (1, 3, 16, 16)}, PROFILE).totals))
    after = ir.serde.serialize_model(model)
    del after.metadata_props[-1]
    assert after.SerializeToString() == before.SerializeToString()


# ------------------------------------------------------------------------------------------------
# CLI


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxvq.cli", *map(str, args)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)


def test_cli_report_tables_json_and_png(tmp_path):
    original, vq = tmp_path / "m.onnx", tmp_path / "m.vq.onnx"
    onnx.save(cnn(), original)
    onnxvq.compress(cnn(), k=16, d=4, min_size=0, scales="off").save(vq)
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    done = run_cli("report", vq, "--baseline", original, "--input", "x:1x3x16x16", "--set", "dram_bandwidth=16e9",
                   "--json", out_json, "--plot", out_png)
    assert done.returncode == 0, done.stderr
    for text in ("conv1", "VQConv", "off-chip", "int8 weights", "this model", "vs int8", "vs original"):
        assert text in done.stdout
    record = json.loads(out_json.read_text())
    assert [c["variant"] for c in record["comparison"]] == ["baseline", "int8", "model"]
    assert record["profile"]["dram_bandwidth"] == 16e9
    model_row = record["comparison"][2]
    assert model_row["speedup_vs_baseline"] > 1 and model_row["offchip_bytes"] < record["comparison"][1]["offchip_bytes"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # no baseline: int8 comes from the decompressed twin; a bare shape is the single input's
    alone = run_cli("report", vq, "--input", "1x3x16x16", "--json", out_json)
    assert alone.returncode == 0, alone.stderr
    assert [c["variant"] for c in json.loads(out_json.read_text())["comparison"]] == ["int8", "model"]


def test_cli_report_errors(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(cnn(), path)
    for args, message in [
        ((), "pass --input x:SHAPE"),
        (("--input", "x:1x3x16x16", "--accelerator", "tpu"), "choose one of: edge-npu"),
        (("--input", "x:1x3x16x16", "--set", "speed=3"), "unknown accelerator field"),
        (("--input", "x:1x3x16x16", "--plot", tmp_path / "missing" / "p.png"), "does not exist"),
    ]:
        done = run_cli("report", path, *args)
        assert done.returncode == 1 and message in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1


# ------------------------------------------------------------------------------------------------
# aliases: ops that move no data


def conv_identity_conv(identity=True):
    """x (1,4,8,8) -> conv1 (8,4,3,3) pads 1 -> a (1,8,8,8) [-> Identity -> b] -> conv2 (8,8,1,1) -> y."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1])]
    if identity:
        nodes.append(helper.make_node("Identity", ["a"], ["b"], name="identity"))
    nodes.append(helper.make_node("Conv", ["b" if identity else "a", "w2"], ["y"], name="conv2"))
    inits = [numpy_helper.from_array(weight((8, 4, 3, 3), 1), "w1"),
             numpy_helper.from_array(weight((8, 8, 1, 1), 2), "w2")]
    return ir.serde.deserialize_model(make_model(nodes, [info("x", [1, 4, 8, 8])], [info("y", [1, 8, 8, 8])], inits))


@pytest.mark.parametrize("buffer, a_offchip", [(1 << 20, 0), (1024, 2048)])
def test_identity_moves_nothing_and_its_reader_reads_the_source(buffer, a_offchip):
    profile = AcceleratorProfile("p", "", 1e9, 1e9, onchip_buffer_bytes=buffer)
    conv1, identity, conv2 = analyze(conv_identity_conv(), {}, profile).rows
    assert (identity.op_type, identity.activation_read, identity.activation_written) == ("Identity", 0, 0)
    assert (identity.weight_total, identity.offchip_bytes, identity.macs) == (0, 0, 0)
    # a: 8*8*8 fp32 = 2048 B. With 1 MiB it stays on chip; with 1 KiB conv1 writes it to DRAM and
    # conv2 reads it back from there, exactly as if conv2 read a directly.
    assert (conv1.activation_written, conv2.activation_read) == (2048, 2048)
    assert conv1.offchip_activation_bytes == 1024 + a_offchip  # x (4*8*8*4 B) from DRAM, a
    assert conv2.offchip_activation_bytes == a_offchip + 2048  # a, then y to DRAM
    without = analyze(conv_identity_conv(identity=False), {}, profile)
    assert analyze(conv_identity_conv(), {}, profile).totals == without.totals


def test_alias_that_is_a_graph_output_is_written_to_dram_once():
    # x (1,8) -> Gemm (16,8) -> a (1,16) -> Reshape [4,4] -> y; both a and y are graph outputs
    nodes = [helper.make_node("Gemm", ["x", "w"], ["a"], name="fc", transB=1),
             helper.make_node("Reshape", ["a", "shape"], ["y"], name="reshape")]
    inits = [numpy_helper.from_array(weight((16, 8), 1), "w"),
             numpy_helper.from_array(np.array([4, 4], np.int64), "shape")]
    outputs = [info("a", [1, 16]), info("y", [4, 4])]
    for graph_outputs in (outputs[1:], outputs):
        model = ir.serde.deserialize_model(make_model(nodes, [info("x", [1, 8])], graph_outputs, inits))
        fc, reshape = analyze(model, {}, PROFILE).rows
        # a (64 B) would fit on chip, but it is (or its alias is) an output: written once
        assert (fc.activation_written, fc.offchip_activation_bytes) == (64, 32 + 64)
        assert (reshape.activation_read, reshape.activation_written, reshape.offchip_activation_bytes) == (0, 0, 0)
        assert kinds(reshape) == {"other": 16}  # the shape tensor, 2 int64


def test_graph_input_passed_to_a_graph_output_is_one_copy():
    nodes = [helper.make_node("Identity", ["x"], ["y"], name="copy")]
    model = make_model(nodes, [info("x", [2, 8])], [info("y", [2, 8])], [])
    row = only_row(model)
    assert (row.activation_read, row.activation_written, row.offchip_bytes) == (64, 64, 128)


def test_identity_of_an_initializer_is_the_convs_dense_weight():
    # conv_groups with its W read through Identity(w0)
    nodes = [helper.make_node("Identity", ["w0"], ["w"], name="identity"),
             helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=2, pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(weight((16, 8, 3, 3), 1), "w0"),
             numpy_helper.from_array(np.zeros(16, np.float32), "b")]
    model = make_model(nodes, [info("x", [1, 16, 10, 10])], [info("y", [1, 16, 10, 10])], inits)
    model = ir.serde.deserialize_model(model)
    for weight_format, dense in (("as_stored", 4608), ("int8", 1152)):
        identity, conv = analyze(model, {}, PROFILE, weight_format=weight_format).rows
        assert (identity.weight_total, identity.activation_read, identity.activation_written) == (0, 0, 0)
        assert conv.macs == 115_200 and kinds(conv) == {"dense": dense, "bias": 64}
        assert (conv.activation_read, conv.activation_written) == (6400, 6400)


@pytest.mark.parametrize(
    "op, attrs, extra_inputs, alias",
    [
        ("Cast", {"to": TensorProto.FLOAT}, [], True),
        ("Cast", {"to": TensorProto.FLOAT16}, [], False),
        ("Dropout", {}, [], True),
        ("Squeeze", {}, ["axes"], True),
        ("Flatten", {"axis": 0}, [], True),
        ("Relu", {}, [], False),
    ],
)
def test_which_ops_alias(op, attrs, extra_inputs, alias):
    # x (1,8) -> Gemm -> a (1,16) -> op -> b -> Relu -> y: the op's row is empty iff it aliases
    inits = [numpy_helper.from_array(weight((16, 8), 1), "w"), numpy_helper.from_array(np.array([0], np.int64), "axes")]
    nodes = [helper.make_node("Gemm", ["x", "w"], ["a"], name="fc", transB=1),
             helper.make_node(op, ["a", *extra_inputs], ["b"], name="op", **attrs),
             helper.make_node("Relu", ["b"], ["y"], name="relu")]
    y = helper.make_tensor_value_info("y", 0, None)
    model = ir.serde.deserialize_model(make_model(nodes, [info("x", [1, 8])], [y], inits))
    row = analyze(model, {}, PROFILE).rows[1]
    expected = (0, 0) if alias else (64, 32 if op == "Cast" else 64)  # a: 16 fp32; an fp16 b: 32 B
    assert (row.activation_read, row.activation_written) == expected


# ------------------------------------------------------------------------------------------------
# ConvTranspose


def conv_transpose_macs_brute_force(x_shape, w_shape, group, strides, dilations, output_padding):
    """Visit every output element and count the (input element, kernel tap) products summed into it.

    Without pads, output position ``o`` receives input ``i`` through tap ``t`` where ``o = i * s +
    t * d`` on every axis; output channel ``oc`` sums the ``I / group`` input channels of its group.
    """
    n, c_in, spatial_in = x_shape[0], x_shape[1], x_shape[2:]
    c_out, kernel = w_shape[1] * group, w_shape[2:]
    spatial_out = [s * (i - 1) + p + (k - 1) * d + 1
                   for i, k, s, d, p in zip(spatial_in, kernel, strides, dilations, output_padding)]
    macs = 0
    for out in itertools.product(*map(range, spatial_out)):
        for pos in itertools.product(*map(range, spatial_in)):
            for tap in itertools.product(*map(range, kernel)):
                if all(i * s + t * d == o for i, t, s, d, o in zip(pos, tap, strides, dilations, out)):
                    macs += n * c_out * (c_in // group)
    return macs, [n, c_out, *spatial_out]


@pytest.mark.parametrize(
    "x_shape, w_shape, group, strides, dilations, output_padding",
    [
        ((2, 4, 7), (4, 3, 3), 1, [2], [1], [0]),  # 1-D, stride 2
        ((1, 6, 5), (6, 2, 4), 3, [3], [2], [1]),  # 1-D, 3 groups, dilation, output_padding
        ((1, 4, 5, 4), (4, 5, 3, 3), 1, [1, 1], [1, 1], [0, 0]),  # 2-D, stride 1
        ((2, 6, 4, 3), (6, 2, 3, 2), 3, [2, 3], [1, 2], [1, 0]),  # 2-D, groups, strides, dilations
    ],
)
def test_conv_transpose_macs_equal_a_brute_force_count(x_shape, w_shape, group, strides, dilations, output_padding):
    macs, y_shape = conv_transpose_macs_brute_force(x_shape, w_shape, group, strides, dilations, output_padding)
    attrs = dict(group=group, strides=strides, dilations=dilations, output_padding=output_padding)
    weights = {"w": weight(w_shape, 1), "b": np.zeros(y_shape[1], np.float32)}
    model = single_node("ConvTranspose", ["x", "w", "b"], weights, list(x_shape), y_shape, **attrs)
    row = only_row(model)
    assert row.macs == macs
    assert kinds(row) == {"dense": 4 * math.prod(w_shape), "bias": 4 * y_shape[1]}
    # pads crop the output, not the products computed: the same MACs (module docstring)
    cropped = [s - 2 for s in y_shape[2:]]
    padded = single_node("ConvTranspose", ["x", "w"], {"w": weight(w_shape, 1)}, list(x_shape),
                         y_shape[:2] + cropped, pads=[1] * (2 * len(cropped)), **attrs)
    assert only_row(padded).macs == macs


# ------------------------------------------------------------------------------------------------
# shapes computed in the graph; dims stored as -1 or 0


def test_reshape_target_from_shape_gather_concat_gets_its_shape():
    """x (2,3,4,5) -> Reshape to [x.shape[0], -1] -> a (2,60) -> MatMul (60,7) -> m (2,7) -> Reshape
    to [m.shape[1] cast through int32, -1] -> y (7,2): the second target needs the first's shape,
    and its opset-11 ``Unsqueeze`` (axes an attribute) must be evaluated at opset 11."""
    nodes = [
        helper.make_node("Shape", ["x"], ["sx"]),
        helper.make_node("Gather", ["sx", "zero"], ["n"], axis=0),
        helper.make_node("Concat", ["n", "minus_one"], ["target_a"], axis=0),
        helper.make_node("Reshape", ["x", "target_a"], ["a"], name="flatten"),
        helper.make_node("MatMul", ["a", "w"], ["m"], name="fc"),
        helper.make_node("Shape", ["m"], ["sm"]),
        helper.make_node("Cast", ["sm"], ["sm32"], to=TensorProto.INT32),
        helper.make_node("Gather", ["sm32", "one_scalar"], ["k32"], axis=0),
        helper.make_node("Cast", ["k32"], ["k_scalar"], to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["k_scalar"], ["k"], axes=[0]),
        helper.make_node("Concat", ["k", "minus_one"], ["target_y"], axis=0),
        helper.make_node("Reshape", ["m", "target_y"], ["y"], name="transpose_like"),
    ]
    constants = {"zero": [0], "one_scalar": 1, "minus_one": [-1]}
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in constants.items()]
    inits.append(numpy_helper.from_array(weight((60, 7), 1), "w"))
    y = helper.make_tensor_value_info("y", F, None)
    model = ir.serde.deserialize_model(make_model(nodes, [info("x", [2, 3, 4, 5])], [y], inits, opset=11))
    rows = {r.name: r for r in analyze(model, {}, PROFILE).rows}
    assert rows["fc"].macs == 2 * 7 * 60 and rows["fc"].activation_written == 2 * 7 * 4
    assert rows["transpose_like"].offchip_activation_bytes == 0  # an alias of m: fc writes y
    assert rows["fc"].offchip_activation_bytes == 2 * 60 * 4 + 2 * 7 * 4  # a is x (a graph input); y


def test_dims_stored_as_minus_one_or_zero_are_unknown():
    # paddle2onnx style: batch stored as -1 on the input, 0 on an intermediate's value_info
    nodes = [helper.make_node("Gemm", ["x", "w"], ["a"], name="fc", transB=1),
             helper.make_node("Relu", ["a"], ["y"], name="relu")]
    w = numpy_helper.from_array(weight((16, 8), 1), "w")
    model = make_model(nodes, [info("x", [-1, 8])], [info("y", [-1, 16])], [w])
    model.graph.value_info.append(info("a", [0, 16]))
    ir_model = ir.serde.deserialize_model(model)
    with pytest.raises(OnnxVQError, match=r"--input x:1x8"):
        analyze(ir_model, {}, PROFILE)
    fc, relu = analyze(ir_model, {"x": (3, 8)}, PROFILE).rows
    assert fc.macs == 3 * 16 * 8 and (fc.activation_written, relu.activation_written) == (3 * 16 * 4, 3 * 16 * 4)
