"""Run a model file in onnxruntime as a deployment would, for ``onnxvq run`` and the runtime
benchmark (``benchmarks/runtime.py``): its inputs, a session, timed runs, a summary of outputs.

Inputs come from an ``.npz`` keyed by input name (read and checked as calibration data are,
:func:`onnxvq.calibration.load_calibration`) or are generated from the model's input specs as
the quality guard generates them (:func:`onnxvq.quality_guard.generated_samples`: floats standard
normal, integers zero, a dynamic dimension other than the first :data:`GENERATED_DIM`), with the
first (batch) dimension set to the batch asked for.

Sessions run on the CPU provider, with the native kernel library when it is wanted and there
(:func:`onnxvq.ops.native_library.session_options_with_library`).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxvq.errors import OnnxVQError
from onnxvq.quality_guard import GENERATED_DIM

__all__ = ["GENERATED_DIM", "Feed", "Timing", "input_feed", "open_session", "output_lines", "return_freed_heap",
           "timed_runs"]


@dataclasses.dataclass
class Feed:
    """One feed dict and where it came from, in words (``source``)."""

    arrays: dict[str, np.ndarray]
    source: str

    def lines(self) -> list[str]:
        return [f"  {name}: {a.dtype} {tuple(a.shape)}" for name, a in self.arrays.items()]


def input_feed(model: ir.Model, inputs: str | os.PathLike | None = None, *, batch: int | None = None,
               seed: int = 0, where: str = "the model") -> Feed:
    """The feed for one run of ``model``.

    With ``inputs`` (an ``.npz`` keyed by input name), its arrays as they are, or their first
    ``batch`` rows. Without, inputs generated from the specs: a dynamic first dimension becomes
    ``batch`` (default 1), another dynamic dimension :data:`GENERATED_DIM`. ``batch`` needs every
    input to have a dynamic first dimension (else :class:`OnnxVQError`), as do models that take
    batches; ``where`` names the model in messages.
    """
    from onnxvq.calibration import load_calibration
    from onnxvq.quality_guard import generated_samples

    if inputs is not None:
        try:
            samples = load_calibration(inputs, model)
        except OnnxVQError as e:
            raise OnnxVQError(f"--inputs: {e}") from None
        source = f"{os.fspath(inputs)}"
    else:
        samples = generated_samples(model, seed=seed, n=batch or 1)
        if samples is None:
            raise OnnxVQError(f"{where}'s inputs have no usable type or shape to generate data from; "
                              "give --inputs FILE.npz keyed by input name")
        source = (f"generated from the input specs (floats standard normal, integers 0; a dynamic first "
                  f"dimension = batch {batch or 1}, other dynamic dimensions {GENERATED_DIM})")
    if batch is not None and batch != 1 and not samples.batchable:
        raise OnnxVQError(f"--batch {batch}: {where} has an input without a dynamic first (batch) dimension; "
                          "drop --batch")
    rows = batch if batch is not None else samples.rows
    _, arrays, _ = next(samples.batches(rows))
    if inputs is not None and batch is not None and samples.batchable:
        got = next(iter(arrays.values())).shape[0] if arrays else batch
        if got < batch:
            raise OnnxVQError(f"--batch {batch}: {source} holds only {got} row(s) of matching shapes")
        source += f", first {batch} row(s)"
    elif inputs is not None and not samples.batchable and len(samples) > 1:
        source += f", the first of its {len(samples)} samples"
    return Feed(dict(arrays), source)


def open_session(path: str | os.PathLike, *, native: bool | None = None, threads: int | None = None,
                 disabled_optimizers: Sequence[str] | None = None, **options: Any):
    """``(session, library)``: an onnxruntime CPU session of the model file at ``path`` and the
    native library path registered in it (None when the function bodies run). ``native`` as in
    :func:`onnxvq.ops.session_options`; ``threads`` sets ``intra_op_num_threads`` (default:
    onnxruntime's, one per core); ``disabled_optimizers`` is passed to ``InferenceSession`` (e.g.
    ``["ConstantFolding"]`` keeps the bodies' decode unfolded). A model onnxruntime refuses is an
    :class:`OnnxVQError` naming the first line of its message. The heap the session's creation
    freed is given back to the system (:func:`return_freed_heap`)."""
    import onnxruntime as ort

    from onnxvq.ops.native_library import session_options_with_library

    if threads is not None:
        options["intra_op_num_threads"] = threads
    opts, library = session_options_with_library(native, path, **options)
    extra = {"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}
    try:
        session = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"], **extra)
    except Exception as e:  # onnxruntime's Fail / InvalidGraph / ...: the model, not onnxvq
        raise OnnxVQError(f"onnxruntime cannot load {os.fspath(path)}: {_first_line(e)}") from None
    return_freed_heap()
    return session, library


def return_freed_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim(0)``); False
    where there is no glibc.

    Creating a session parses the whole model as protobuf, copies its initializers into tensors
    and frees the parse (and, with folding, the bodies' intermediate tensors). glibc keeps such
    freed memory in its heap for later allocations rather than unmapping it, so the process stays
    that much larger: a 9.3 MiB compressed encoder's session measured 15.2 MiB resident, 11.1 MiB
    after the trim; with folded bodies, 564 MiB, 197 MiB after. The pages are free either way;
    this only makes the process's size what the session holds. Nothing in the standard library
    or onnxruntime exposes it, hence ctypes."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


@dataclasses.dataclass
class Timing:
    """Wall-clock seconds of each timed run (the warm-up excluded)."""

    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def minimum(self) -> float:
        return min(self.seconds)


def timed_runs(session, feed: Mapping[str, np.ndarray], repeat: int, *, warmup: int = 1) -> tuple[list, Timing]:
    """``warmup`` untimed runs (the first run allocates and, with folding off, may be slower),
    then ``repeat`` timed ones; returns the last run's outputs and the timings. A run onnxruntime
    refuses (a wrong input) is an :class:`OnnxVQError`."""
    if repeat < 1:
        raise OnnxVQError(f"--repeat must be at least 1, got {repeat}")
    seconds, outputs = [], None
    try:
        for i in range(warmup + repeat):
            start = time.perf_counter()
            outputs = session.run(None, dict(feed))
            if i >= warmup:
                seconds.append(time.perf_counter() - start)
    except Exception as e:
        raise OnnxVQError(f"the model did not run: {_first_line(e)}") from None
    return outputs, Timing(seconds)


def output_lines(names: Sequence[str], outputs: Sequence[Any]) -> list[str]:
    """One line per output: name, dtype, shape and, for numbers, their float64 sum and mean
    absolute value (a checksum that a rebuilt library or another kernel can be compared on)."""
    lines = []
    for name, value in zip(names, outputs):
        if not isinstance(value, np.ndarray):  # a sequence or map output (ZipMap)
            lines.append(f"  {name}: {type(value).__name__} of {len(value)}")
            continue
        line = f"  {name}: {value.dtype} {tuple(value.shape)}"
        if value.dtype.kind in "biuf" and value.size:
            as64 = value.astype(np.float64)
            line += f"  sum {as64.sum():.9g}  mean|x| {np.abs(as64).mean():.6g}"
        lines.append(line)
    return lines


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines() or [type(error).__name__])[0][:300]
