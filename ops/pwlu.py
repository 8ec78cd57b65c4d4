"""PWLU: a learnable piecewise-linear activation (Zhou, Zhu, Zhong, ICCV 2021, arXiv 2104.03693).

Math: ``N`` uniform intervals on ``[B_L, B_R]`` (width ``h = (B_R - B_L) / N``), ``N + 1`` knot
values ``Y_0..Y_N`` and boundary slopes ``K_L, K_R``:

    f(x) = (x - B_L) K_L + Y_0                               x < B_L
    f(x) = (x - B_R) K_R + Y_N                               x > B_R
    f(x) = Y_i + (t - i) (Y_(i+1) - Y_i),  t = (x - B_L) / h,  i = min(floor(t), N - 1)   otherwise

(``f`` is continuous; a NaN input gives NaN.) Parameters are layer-wise or channel-wise: every
parameter tensor has a leading axis (2 for bounds and slopes, ``N + 1`` for knots) followed by
the parameter shape ``P``, which is ``(1,)`` for one function for the whole tensor, or
``(C, 1, ..., 1)``: one function per index of X's axis ``rank(X) - rank(P)`` (size C), the
trailing ones broadcasting over the axes after it, as a Conv output's ``(C, 1, 1)`` or a
MatMul output's ``(C,)``. So ``P`` broadcasts against ``X`` by the standard rule and no
attribute is needed.

Inputs: ``X``, ``bounds`` (2, *P) = ``[B_L; B_R]``, ``knots`` (N+1, *P), ``slopes`` (2, *P) =
``[K_L; K_R]``, all float32 (the body casts N to float32, and ``CastLike``, which would let it
follow X's type, needs opset 15 where the bodies start at 11). Output ``Y``, X's shape. No
attributes. ``B_R > B_L`` everywhere.

The op is not a weight encoding: :func:`decode` does not apply, and decompression keeps it.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
from onnx.reference.op_run import OpRun

from onnxvq.ops.vq_weight import DOMAIN, MIN_OPSET

__all__ = ["CASES", "INPUTS", "OP_TYPE", "PWLU", "check_parameters", "function", "pwlu"]

OP_TYPE = "PWLU"
INPUTS = ("X", "bounds", "knots", "slopes")


def check_parameters(bounds: np.ndarray, knots: np.ndarray, slopes: np.ndarray) -> None:
    """Raise ``ValueError`` unless the three tensors form a valid parameter set (module docstring)."""
    shape = bounds.shape[1:]
    if bounds.shape[:1] != (2,) or slopes.shape != bounds.shape or knots.shape[1:] != shape:
        raise ValueError(f"PWLU parameters must be bounds (2, *P), knots (N+1, *P), slopes (2, *P); "
                         f"got {bounds.shape}, {knots.shape}, {slopes.shape}")
    if len(knots) < 2:
        raise ValueError("PWLU needs at least one interval (two knots)")
    if not shape or any(n != 1 for n in shape[1:]):
        raise ValueError(f"PWLU parameter shape must be (1,) or (C, 1, ..., 1), got {shape}")
    if not np.all(bounds[1] > bounds[0]):
        raise ValueError("PWLU bounds must have B_R > B_L")


def pwlu(x: np.ndarray, bounds: np.ndarray, knots: np.ndarray, slopes: np.ndarray) -> np.ndarray:
    """The numpy reference of the op (module docstring); computed in float64, returned in X's type."""
    xd = x.astype(np.float64)
    lo, hi = bounds[0].astype(np.float64), bounds[1].astype(np.float64)
    y = knots.astype(np.float64)
    n = len(y) - 1
    with np.errstate(invalid="ignore"):
        t = (xd - lo) / (hi - lo) * n
        i = np.clip(np.floor(np.nan_to_num(t)), 0, n - 1).astype(np.int64)
    frac = t - i
    channel = np.broadcast_to(np.arange(y[0].size).reshape(y[0].shape), np.broadcast_shapes(x.shape, y[0].shape))
    flat = y.reshape(n + 1, -1)
    y0, y1 = flat[i, channel], flat[i + 1, channel]
    inside = y0 + frac * (y1 - y0)
    below = (xd - lo) * slopes[0] + y[0]
    above = (xd - hi) * slopes[1] + y[n]
    out = np.where(xd < lo, below, np.where(xd > hi, above, inside))
    return out.astype(x.dtype)


def function(opset: int) -> onnx.FunctionProto:
    """The standard-op body: the interval index ``i`` gathers both knot values from the
    flattened knots (knot ``j`` of channel ``c`` at ``j * C + c``), ``Where`` picks the tails."""
    if opset < MIN_OPSET:
        raise ValueError(f"PWLU's body needs opset >= {MIN_OPSET}, got {opset}")
    body = [
        "zero = Constant <value = int64 {0}> ()",
        "one = Constant <value = int64 {1}> ()",
        "last = Constant <value = int64 {-1}> ()",
        "one_1d = Constant <value = int64[1] {1}> ()",
        "flat_shape = Constant <value = int64[1] {-1}> ()",
        "big = Constant <value = int64[1] {9223372036854775807}> ()",
        "zero_f = Constant <value = float {0}> ()",
        "lo = Gather <axis = 0> (bounds, zero)",
        "hi = Gather <axis = 0> (bounds, one)",
        "k_left = Gather <axis = 0> (slopes, zero)",
        "k_right = Gather <axis = 0> (slopes, one)",
        "y_first = Gather <axis = 0> (knots, zero)",
        "y_last = Gather <axis = 0> (knots, last)",
        # N and the channel count C (the size of P)
        "knots_shape = Shape (knots)",
        "n_knots = Gather <axis = 0> (knots_shape, zero)",
        "n_int = Sub (n_knots, one)",
        "n = Cast <to = 1> (n_int)",
        "last_interval_int = Sub (n_int, one)",
        "last_interval = Cast <to = 1> (last_interval_int)",
        "channels = Size (lo)",
        "p_shape = Slice (knots_shape, one_1d, big)",
        "channel_range = Range (zero, channels, one)",
        "channel = Reshape (channel_range, p_shape)",
        # interval coordinate t; a NaN (never equal to itself) indexes interval 0 and stays NaN
        "offset = Sub (X, lo)",
        "width = Sub (hi, lo)",
        "unit = Div (offset, width)",
        "t = Mul (unit, n)",
        "is_number = Equal (t, t)",
        "t_safe = Where (is_number, t, zero_f)",
        "t_floor = Floor (t_safe)",
        "i_float = Clip (t_floor, zero_f, last_interval)",
        "frac = Sub (t, i_float)",
        "i = Cast <to = 7> (i_float)",
        "row_start = Mul (i, channels)",
        "at = Add (row_start, channel)",
        "at_next = Add (at, channels)",
        "flat = Reshape (knots, flat_shape)",
        "y0 = Gather <axis = 0> (flat, at)",
        "y1 = Gather <axis = 0> (flat, at_next)",
        "rise = Sub (y1, y0)",
        "step = Mul (frac, rise)",
        "inside = Add (y0, step)",
        "left_run = Mul (offset, k_left)",
        "below = Add (left_run, y_first)",
        "past = Sub (X, hi)",
        "right_run = Mul (past, k_right)",
        "above = Add (right_run, y_last)",
        "is_below = Less (X, lo)",
        "is_above = Greater (X, hi)",
        "upper = Where (is_above, above, inside)",
        "Y = Where (is_below, below, upper)",
    ]
    text = (
        f'<domain: "{DOMAIN}", opset_import: ["" : {opset}]>\n'
        f"{OP_TYPE} ({', '.join(INPUTS)}) => (Y) {{\n  " + "\n  ".join(body) + "\n}"
    )
    return onnx.parser.parse_function(text)


class PWLU(OpRun):
    """``onnx.reference`` kernel: :func:`pwlu`."""

    op_domain = DOMAIN

    def _run(self, x, bounds, knots, slopes):
        return (pwlu(x, bounds, knots, slopes),)


# Conformance cases: (name, X shape, parameter shape P, intervals N).
CASES = [
    ("conv_channelwise", (2, 5, 4, 3), (5, 1, 1), 8),
    ("conv_layerwise", (2, 5, 4, 3), (1,), 16),
    ("matmul_last_axis", (3, 7, 6), (6,), 4),
    ("gemm_channelwise", (4, 9), (9,), 1),
    ("scalar_params_5d", (1, 3, 2, 2, 2), (3, 1, 1, 1), 6),
]
