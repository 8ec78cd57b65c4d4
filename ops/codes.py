"""Packed storage of codeword indices.

Codes are a (rows, n_sub) array of indices into a k-row codebook, stored per row as:

==========  ==========  ===============================================================
code_bits   k           stored tensor
==========  ==========  ===============================================================
4           k <= 16     uint8 (rows, ceil(n_sub / 2)); byte j holds code 2j in its low
                        nibble and code 2j + 1 in its high nibble (ONNX's INT4 order);
                        an odd row ends with a zero high nibble
8           k <= 256    uint8 (rows, n_sub)
16          k <= 65536  uint16 (rows, n_sub)
==========  ==========  ===============================================================

Packing per row (rather than over the flattened codes) keeps the codes' first axis equal to the
weight's rows, which is all a decoder needs to rebuild the row matrix; it costs at most half a
byte per row.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_K", "code_bits_for_k", "pack_codes", "unpack_codes", "packed_nbytes"]

MAX_K = 1 << 16


def code_bits_for_k(k: int) -> int:
    """The narrowest storage for indices below ``k``."""
    # k == 1 happens when a layer has a single subvector; it still packs as 4 bits.
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in [1, {MAX_K}], got {k}")
    if k <= 16:
        return 4
    return 8 if k <= 256 else 16


def pack_codes(codes: np.ndarray, code_bits: int) -> np.ndarray:
    """(rows, n_sub) integer codes -> the stored tensor (see module docstring)."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D (rows, n_sub), got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << code_bits)):
        raise ValueError(f"codes out of range for {code_bits}-bit storage")
    if code_bits == 16:
        return codes.astype(np.uint16)
    if code_bits == 8:
        return codes.astype(np.uint8)
    if code_bits != 4:
        raise ValueError(f"code_bits must be 4, 8 or 16, got {code_bits}")
    rows, n_sub = codes.shape
    even = np.zeros((rows, n_sub + (n_sub % 2)), np.uint8)
    even[:, :n_sub] = codes
    return (even[:, 0::2] | (even[:, 1::2] << 4)).astype(np.uint8)


def unpack_codes(stored: np.ndarray, code_bits: int) -> np.ndarray:
    """The stored tensor -> (rows, m) int64 codes, ``m >= n_sub`` (a 4-bit odd row gains a 0)."""
    stored = np.asarray(stored)
    if code_bits in (8, 16):
        return stored.astype(np.int64)
    if code_bits != 4:
        raise ValueError(f"code_bits must be 4, 8 or 16, got {code_bits}")
    rows, n_bytes = stored.shape
    out = np.empty((rows, 2 * n_bytes), np.int64)
    out[:, 0::2] = stored & 0x0F
    out[:, 1::2] = stored >> 4
    return out


def packed_nbytes(rows: int, n_sub: int, code_bits: int) -> int:
    """Bytes of the stored codes tensor."""
    if code_bits == 4:
        return rows * ((n_sub + 1) // 2)
    return rows * n_sub * (code_bits // 8)
