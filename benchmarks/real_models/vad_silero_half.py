"""Silero VAD, ``silero_vad_half.onnx`` (silero-vad package): the same task, data and metric as
:mod:`vad_silero`; this export takes no ``sr`` input (16 kHz only)."""

from __future__ import annotations

import vad_silero
from vad_silero import METRIC, SIZES, evaluate, make_eval_set  # noqa: F401 (the task interface)

NAME = "silero_vad_half"
TITLE = "Silero VAD half (silero-vad 6.2.3), voice activity"
MODEL_FILE = "silero_vad_half.onnx"


def model_path():
    return vad_silero.model_path(MODEL_FILE)


def make_calib_set(seed: int, n: int):
    return vad_silero.make_calib_set(seed, n, MODEL_FILE)
