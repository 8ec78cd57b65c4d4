"""The one weight <-> subvector layout, shared by every method and every op.

A weight is seen as a matrix ``M`` with one row per output channel (output feature), whose row
holds the entries that output contracts over, in the weight's own memory order:

==================================  ====================  ==========  =========================
consumer                            weight shape          transposed  ``M``
==================================  ====================  ==========  =========================
Conv                                (O, I/g, k1, .., kn)  no          ``W.reshape(O, -1)``
ConvTranspose (rows: input chans)   (I, O/g, k1, .., kn)  no          ``W.reshape(I, -1)``
Gather (an embedding table)         (V, D)                no          ``W``
LSTM/GRU/RNN (W and R joined)       (D, G*H, I+H)         no          ``V.reshape(D*G*H, -1)``
Gemm, transB=1                      (N, K)                no          ``W``
Gemm, transB=0                      (K, N)                yes         ``W.T``
MatMul, weight left  (``W @ X``)    (..., M, K)           no          ``W.reshape(-1, K)``
MatMul, weight right (``X @ W``)    (..., K, N)           yes         ``swapaxes(W,-1,-2).reshape(-1, K)``
==================================  ====================  ==========  =========================

Let ``L = swapaxes(W, -1, -2)`` when transposed, else ``L = W``. Then ``M = L.reshape(rows, cols)``
with ``rows`` the product of the first ``row_axes`` axes of ``L`` (1 for Conv, ConvTranspose and
Gather, 2 for recurrent ops, ``rank - 1`` for Gemm and MatMul) and ``cols`` the product of the
rest.

Each row of ``M`` is cut into ``n_sub = ceil(cols / d)`` consecutive subvectors of length ``d``.
When ``d`` does not divide ``cols``, the last subvector of every row has only
``tail = cols - (n_sub - 1) * d`` meaningful entries; the rest is padding, which k-means ignores
(it neither counts in distances nor pulls centroids) and which decoding drops:
``S = pad(M).reshape(rows, n_sub, d)`` and ``M = S.reshape(rows, -1)[:, :cols]``.

Decoding needs only ``weight_shape`` and ``transposed`` (``rows`` is the codes' first axis), so
those two are what a VQ node records.

Recurrent ops (LSTM, GRU, RNN) have two weights that feed the same gate units: ``W`` (D, G*H, I)
multiplies the input ``x_t`` and ``R`` (D, G*H, H) the previous hidden state. They are encoded as
one weight, ``V = concat(W, R, axis=-1)`` (D, G*H, I + H), with two row axes: a row is one gate
unit of one direction and dots with ``[x_t; h_{t-1}]`` (:func:`join_recurrent`,
:func:`split_recurrent`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = ["WeightLayout", "join_recurrent", "matrix_to_weight", "split_recurrent", "subvectors_to_matrix"]


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """How a weight of ``weight_shape`` maps to ``rows x n_sub`` subvectors of length ``d``.

    Example::

        >>> lay = WeightLayout(weight_shape=(64, 3, 3, 3), transposed=False, row_axes=1, d=8)
        >>> lay.rows, lay.cols, lay.n_sub, lay.tail
        (64, 27, 4, 3)
    """

    weight_shape: tuple[int, ...]
    transposed: bool
    row_axes: int
    d: int

    def __post_init__(self) -> None:
        if len(self.weight_shape) < 2:
            raise ValueError(f"a weight needs at least 2 dimensions, got {self.weight_shape}")
        if not 1 <= self.row_axes < len(self.weight_shape):
            raise ValueError(f"row_axes {self.row_axes} out of range for {self.weight_shape}")
        if self.d < 1:
            raise ValueError(f"subvector size d must be >= 1, got {self.d}")

    @property
    def layout_shape(self) -> tuple[int, ...]:
        """Shape of ``L``: the weight with its last two axes swapped when transposed."""
        return _swap_last_two(self.weight_shape) if self.transposed else tuple(self.weight_shape)

    @property
    def rows(self) -> int:
        return math.prod(self.layout_shape[: self.row_axes])

    @property
    def cols(self) -> int:
        return math.prod(self.layout_shape[self.row_axes :])

    @property
    def n_sub(self) -> int:
        return -(-self.cols // self.d)

    @property
    def tail(self) -> int:
        """Meaningful entries in the last subvector of each row (``d`` when nothing is padded)."""
        return self.cols - (self.n_sub - 1) * self.d

    def to_matrix(self, weight: np.ndarray) -> np.ndarray:
        """``W -> M`` (rows, cols), a view when possible."""
        if tuple(weight.shape) != tuple(self.weight_shape):
            raise ValueError(f"weight shape {weight.shape} != layout {self.weight_shape}")
        lay = np.swapaxes(weight, -1, -2) if self.transposed else weight
        return lay.reshape(self.rows, self.cols)

    def to_subvectors(self, weight: np.ndarray) -> np.ndarray:
        """``W -> S`` (rows, n_sub, d) float32, the padding filled with zeros.

        A view of ``weight`` when nothing is padded and no transpose or cast is needed (so a
        1 GiB layer is not copied once more).
        """
        matrix = self.to_matrix(weight).astype(np.float32, copy=False)
        if self.tail == self.d and matrix.flags.c_contiguous:
            return matrix.reshape(self.rows, self.n_sub, self.d)
        padded = np.zeros((self.rows, self.n_sub * self.d), np.float32)
        padded[:, : self.cols] = matrix
        return padded.reshape(self.rows, self.n_sub, self.d)

    def from_subvectors(self, subvectors):
        """``S -> W``: the inverse of :meth:`to_subvectors` (padding dropped); numpy or torch."""
        matrix = subvectors_to_matrix(subvectors.reshape(self.rows, -1), self.cols)
        return matrix_to_weight(matrix, self.weight_shape, self.transposed)

    def pad_moment(self, moment: np.ndarray) -> np.ndarray:
        """A (cols, cols) input moment (or its (cols,) diagonal) in subvector coordinates:
        zero rows and columns for the padding, so padding never counts in an output error."""
        padded_cols = self.n_sub * self.d
        if moment.ndim == 1:
            return np.pad(moment, (0, padded_cols - self.cols))
        return np.pad(moment, ((0, padded_cols - self.cols),) * 2)


def subvectors_to_matrix(flat_rows, cols: int):
    """Rows of concatenated subvectors (rows, >= cols) -> ``M`` (rows, cols): drop the padding."""
    return flat_rows[:, :cols]


def matrix_to_weight(matrix, weight_shape, transposed: bool):
    """``M -> W`` given only what a VQ node records: the weight shape and whether transposed.

    Written with methods numpy arrays and torch tensors share, so the fine-tune bridge rebuilds
    weights through this same definition.
    """
    weight_shape = tuple(int(s) for s in weight_shape)
    if transposed:
        return matrix.reshape(_swap_last_two(weight_shape)).swapaxes(-1, -2)
    return matrix.reshape(weight_shape)


def join_recurrent(w: np.ndarray, r: np.ndarray) -> np.ndarray:
    """A recurrent op's ``W`` (D, G*H, I) and ``R`` (D, G*H, H) as one weight (D, G*H, I+H)."""
    return np.concatenate([w, r], axis=-1)


def split_recurrent(joined, hidden: int):
    """The inverse of :func:`join_recurrent`: ``(W, R)``, ``R`` the last ``hidden`` columns."""
    width = joined.shape[-1]
    return joined[..., : width - hidden], joined[..., width - hidden :]


def _swap_last_two(shape) -> tuple[int, ...]:
    shape = tuple(shape)
    return shape[:-2] + (shape[-1], shape[-2])
