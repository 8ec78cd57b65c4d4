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
    """The standard-op body. Every piece of ``f`` is a line ``A_j x + B_j``: j = 0 the left
    tail, j = 1..N the intervals, j = N + 1 the right tail. The body builds the (N+2, *P)
    tables of A and B from the parameters (small tensors, constant-folded by a runtime when they
    are initializers), then per element needs only ``j = clip(floor(t) + 1, 0, N + 1)`` and one
    gather of each table (line ``j`` of channel ``c`` at ``j * C + c``): about a third of the
    elementwise work of interpolating between two gathered knots and picking the tails."""
    if opset < MIN_OPSET:
        raise ValueError(f"PWLU's body needs opset >= {MIN_OPSET}, got {opset}")
    body = [
        "zero = Constant <value = int64 {0}> ()",
        "one = Constant <value = int64 {1}> ()",
        "last = Constant <value = int64 {-1}> ()",
        "zero_1d = Constant <value = int64[1] {0}> ()",
        "one_1d = Constant <value = int64[1] {1}> ()",
        "last_1d = Constant <value = int64[1] {-1}> ()",
        "flat_shape = Constant <value = int64[1] {-1}> ()",
        "big = Constant <value = int64[1] {9223372036854775807}> ()",
        "zero_f = Constant <value = float {0}> ()",
        "one_f = Constant <value = float {1}> ()",
        "lo = Gather <axis = 0> (bounds, zero)",
        "hi = Gather <axis = 0> (bounds, one)",
        # N, the knot positions x_i = lo + i (hi - lo) / N, and the channel count C (P's size)
        "knots_shape = Shape (knots)",
        "n_knots = Gather <axis = 0> (knots_shape, zero)",
        "n_int = Sub (n_knots, one)",
        "n = Cast <to = 1> (n_int)",
        "width = Sub (hi, lo)",
        "scale = Div (n, width)",
        "step = Div (width, n)",
        "p_shape = Slice (knots_shape, one_1d, big)",
        "index_range = Range (zero, n_knots, one)",
        "index_f = Cast <to = 1> (index_range)",
        "p_rank = Shape (p_shape)",
        "ones = ConstantOfShape <value = int64[1] {1}> (p_rank)",
        "column_shape = Concat <axis = 0> (flat_shape, ones)",
        "index_column = Reshape (index_f, column_shape)",
        "offsets = Mul (index_column, step)",
        "positions = Add (offsets, lo)",
        # interval lines: A_i = (Y_(i+1) - Y_i) / h, B_i = Y_i - A_i x_i
        "y_left = Slice (knots, zero_1d, last_1d)",
        "y_right = Slice (knots, one_1d, big)",
        "x_left = Slice (positions, zero_1d, last_1d)",
        "rise = Sub (y_right, y_left)",
        "a_inside = Div (rise, step)",
        "ax_inside = Mul (a_inside, x_left)",
        "b_inside = Sub (y_left, ax_inside)",
        # tails: A = K, B = Y_0 - K_L B_L and Y_N - K_R B_R
        "k_left = Slice (slopes, zero_1d, one_1d)",
        "k_right = Slice (slopes, one_1d, big)",
        "y_first = Slice (knots, zero_1d, one_1d)",
        "y_last = Slice (knots, last_1d, big)",
        "lo_row = Slice (bounds, zero_1d, one_1d)",
        "hi_row = Slice (bounds, one_1d, big)",
        "kx_left = Mul (k_left, lo_row)",
        "b_left = Sub (y_first, kx_left)",
        "kx_right = Mul (k_right, hi_row)",
        "b_right = Sub (y_last, kx_right)",
        "a_table = Concat <axis = 0> (k_left, a_inside, k_right)",
        "b_table = Concat <axis = 0> (b_left, b_inside, b_right)",
        "a_flat = Reshape (a_table, flat_shape)",
        "b_flat = Reshape (b_table, flat_shape)",
        "channels = Size (lo)",
        "channel_range = Range (zero, channels, one)",
        "channel = Reshape (channel_range, p_shape)",
        "n_plus_one = Add (n, one_f)",
        # the line of each element; a NaN (never equal to itself) reads line 0 and stays NaN
        "offset = Sub (X, lo)",
        "t = Mul (offset, scale)",
        "is_number = Equal (t, t)",
        "t_safe = Where (is_number, t, zero_f)",
        "t_floor = Floor (t_safe)",
        "t_line = Add (t_floor, one_f)",
        "j_float = Clip (t_line, zero_f, n_plus_one)",
        "j = Cast <to = 7> (j_float)",
        "row_start = Mul (j, channels)",
        "at = Add (row_start, channel)",
        "a = Gather <axis = 0> (a_flat, at)",
        "b = Gather <axis = 0> (b_flat, at)",
        "ax = Mul (a, X)",
        "Y = Add (ax, b)",
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
