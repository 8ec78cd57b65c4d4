"""ddddocr's older captcha text recognizer (``common_old.onnx``, ``DdddOcr(old=True)``), shipped
int8 by its authors: 18 ``ConvInteger``, one ``MatMulInteger`` head of 8,210 classes and a
``com.microsoft::DynamicQuantizeLSTM``, the output of onnxruntime's ``quantize_dynamic``.

The task is :mod:`ddddocr_ocr`'s (same captchas, preprocessing, CTC decoding and metrics); the
characters are ``ddddocr.charsets.CHARSET_OLD``. There is no fp32 file: the "fp32" row of this
model is the int8 file as shipped (``ALREADY_INT8``), and ratios are against it.
"""

from __future__ import annotations

import ddddocr_ocr
from common import Evaluation, package_file

NAME = "ddddocr_ocr_old"
TITLE = "ddddocr common_old (ddddocr 1.6.1, old OCR, int8 as shipped), captcha text"
METRIC = ddddocr_ocr.METRIC
SIZES = ddddocr_ocr.SIZES
ALREADY_INT8 = True
make_eval_set = ddddocr_ocr.make_eval_set
make_calib_set = ddddocr_ocr.make_calib_set


def model_path():
    return package_file("ddddocr", "common_old.onnx")


def evaluate(sess, eval_set: list[dict], reference: Evaluation | None = None) -> Evaluation:
    return ddddocr_ocr.evaluate(sess, eval_set, reference, charset_name="CHARSET_OLD")
