"""onnxruntime's own quantizers, as the baselines onnxvq is compared with.

* ``int8 dynamic``: ``quantize_dynamic`` (QInt8 weights, per tensor; activations quantized at run
  time; Conv becomes ConvInteger, MatMul/Gemm MatMulInteger);
* ``int8 static QDQ``: ``quantize_static`` in QDQ format, QInt8 activations and weights, weights
  per channel, MinMax calibration over the suite's calibration set (the same feeds onnxvq gets).
  Models below opset 13 are first converted to 13 (per-channel DequantizeLinear needs it); if
  onnxruntime still refuses the per-channel file, per-tensor weights are used and the note says so;
* ``int4 MatMulNBits``: ``MatMulNBitsQuantizer`` (4 bits, block size 32, symmetric) on the
  MatMul nodes with a constant 2-D weight. Conv and Gemm stay fp32; a model with no such MatMul
  gets "n/a".

Each writes a file and returns a note. The fp32 model is first passed through a copy without
``graph.value_info`` (exporters' shape annotations, which the quantizers trip over on some
models); ``quant_pre_process`` (shape inference and graph optimization, which onnxruntime
recommends before static quantization) is tried for QDQ and skipped when it fails.
"""

from __future__ import annotations

import os
import tempfile

import onnx

__all__ = ["BASELINES", "NotApplicable"]


class NotApplicable(Exception):
    """The quantizer has nothing to do on this model (reported as n/a)."""


def _without_value_info(path, out_dir) -> str:
    model = onnx.load(str(path))
    del model.graph.value_info[:]
    out = os.path.join(out_dir, "fp32_novi.onnx")
    onnx.save(model, out)
    return out


def int8_dynamic(model_path, out_path, calib, work_dir) -> str:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(_without_value_info(model_path, work_dir), out_path, weight_type=QuantType.QInt8)
    return "QInt8 weights, per tensor"


class _Reader:
    """``CalibrationDataReader`` over a list of feed dicts."""

    def __init__(self, feeds):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # some onnxruntime versions call it
        pass


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def int8_static_qdq(model_path, out_path, calib, work_dir) -> str:
    return _int8_static(model_path, out_path, calib, work_dir, qoperator=False)


def int8_static_qoperator(model_path, out_path, calib, work_dir) -> str:
    """The QOperator format (QLinearConv, QLinearMatMul, QGemm, ...), uint8 activations (what
    onnxruntime's CPU QLinear kernels take), int8 weights; not a suite baseline (the QDQ one is),
    used by ``on_int8.py``."""
    return _int8_static(model_path, out_path, calib, work_dir, qoperator=True)


def _int8_static(model_path, out_path, calib, work_dir, *, qoperator: bool) -> str:
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static

    src = _without_value_info(model_path, work_dir)
    notes = []
    model = onnx.load(src)
    if _opset(model) < 13:  # per-channel DequantizeLinear (its axis attribute) needs opset 13
        try:
            from onnx import version_converter

            onnx.save(version_converter.convert_version(model, 13), src)
            notes.append(f"opset {_opset(model)} -> 13")
        except Exception as e:  # noqa: BLE001
            notes.append(f"opset upgrade failed ({type(e).__name__})")
    pre = os.path.join(work_dir, "fp32_pre.onnx")
    # symbolic shape inference gives up on some graphs (dynamic spatial sizes); the rest of the
    # pre-processing (onnx shape inference, graph optimization) still applies then
    for skip_symbolic in (False, True):
        try:
            quant_pre_process(src, pre, skip_symbolic_shape=skip_symbolic)
            src = pre
            notes.append("quant_pre_process" + (" without symbolic shapes" if skip_symbolic else ""))
            break
        except Exception as e:  # noqa: BLE001 (report and go on without it)
            if skip_symbolic:
                notes.append(f"no pre-process ({type(e).__name__})")
    reader_cls = type("Reader", (_Reader, CalibrationDataReader), {})
    for per_channel in (True, False):
        quantize_static(src, out_path, reader_cls(calib), per_channel=per_channel,
                        quant_format=QuantFormat.QOperator if qoperator else QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8 if qoperator else QuantType.QInt8,
                        weight_type=QuantType.QInt8)
        try:  # the quantizer can write a file onnxruntime refuses; per tensor is then the fallback
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            ort.InferenceSession(str(out_path), opts, providers=["CPUExecutionProvider"])
            break
        except Exception as e:  # noqa: BLE001
            if not per_channel:
                raise
            notes.append(f"per-channel file invalid ({type(e).__name__}), per tensor")
    head = (("QOperator, QUInt8 act, QInt8 weights " if qoperator else "QDQ, QInt8 act + weights ")
            + ("per channel" if per_channel else "per tensor") + ", MinMax")
    return ", ".join([head, *notes])


def _constant_matmuls(model: onnx.ModelProto) -> int:
    inits = {t.name: t for t in model.graph.initializer}
    return sum(
        1 for n in model.graph.node
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
    )


def int4_matmulnbits(model_path, out_path, calib, work_dir) -> str:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(_without_value_info(model_path, work_dir))
    count = _constant_matmuls(model)
    if not count:
        raise NotApplicable("no MatMul with a constant 2-D weight")
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out_path), use_external_data_format=False)
    done = sum(n.op_type == "MatMulNBits" for n in onnx.load(str(out_path)).graph.node)
    if not done:
        raise NotApplicable(f"{count} constant MatMuls, none converted")
    return f"{done} of {count} constant MatMuls to 4 bits (b32, sym); Conv/Gemm fp32"


BASELINES = {
    "ort int8 dynamic": int8_dynamic,
    "ort int8 static QDQ": int8_static_qdq,
    "ort int4 MatMulNBits": int4_matmulnbits,
}


def run(name: str, model_path, out_path, calib) -> str:
    """Run one baseline into ``out_path``; returns its note (raises NotApplicable or the error)."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizers log advice ("consider pre-processing") as warnings
    try:
        with tempfile.TemporaryDirectory() as work_dir:
            return BASELINES[name](model_path, out_path, [dict(f) for f in calib], work_dir)
    finally:
        root.setLevel(level)

