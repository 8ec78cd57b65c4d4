"""Sign bits of sign-split VQ (``ssvq``), packed 8 per byte along each row of ``M``.

``M`` is the layout matrix (rows x cols) of ``onnxvq.layout``: a row holds the weights one output
reads, in the weight's own order, so "along the input dimension" is along a row. Entry ``c`` of
row ``r`` is negative when bit ``c % 8`` (least significant bit first) of byte ``c // 8`` of row
``r`` is set:

    packed[r, b] = sum_j [M[r, 8b + j] < 0] << j          (rows, ceil(cols / 8)) uint8

Bits past ``cols`` in a row's last byte are zero. Decoding gathers each byte's row of
:data:`SIGN_TABLE`, the 256 x 8 table of +-1 (``SIGN_TABLE[b, j] = -1`` iff bit ``j`` of ``b``),
then drops the padding: one Gather instead of eight shift-and-mask steps, which DESIGN.md measured
as the fastest standard-op decode. ``np.packbits``/``np.unpackbits`` with ``bitorder="little"`` do
the bit work on the numpy side.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SIGN_TABLE", "pack_signs", "packed_sign_bytes", "unpack_signs"]

SIGN_TABLE = (1.0 - 2.0 * np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")).astype(
    np.float32
)


def packed_sign_bytes(rows: int, cols: int) -> int:
    """Bytes of the packed signs of a rows x cols matrix."""
    return rows * (-(-cols // 8))


def pack_signs(negative: np.ndarray) -> np.ndarray:
    """(rows, cols) booleans (True = negative) -> (rows, ceil(cols / 8)) uint8."""
    negative = np.asarray(negative)
    if negative.ndim != 2:
        raise ValueError(f"signs must be a (rows, cols) matrix, got shape {negative.shape}")
    return np.packbits(negative.astype(bool), axis=1, bitorder="little")


def unpack_signs(packed: np.ndarray, cols: int) -> np.ndarray:
    """(rows, nbytes) uint8 -> (rows, cols) float32 of +-1: ``SIGN_TABLE[packed]`` without the
    padding bits."""
    packed = np.asarray(packed, np.uint8)
    if packed.ndim != 2 or packed.shape[1] * 8 < cols or (packed.shape[1] - 1) * 8 >= max(cols, 1):
        raise ValueError(f"packed signs of shape {packed.shape} do not hold {cols} columns")
    return SIGN_TABLE[packed].reshape(packed.shape[0], -1)[:, :cols]
