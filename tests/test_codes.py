"""Packed code storage: 4, 8 and 16 bits."""

import numpy as np
import pytest

from onnxvq.ops.codes import code_bits_for_k, pack_codes, packed_nbytes, unpack_codes


@pytest.mark.parametrize("k,bits", [(1, 4), (2, 4), (16, 4), (17, 8), (256, 8), (257, 16), (65536, 16)])
def test_code_bits_for_k(k, bits):
    assert code_bits_for_k(k) == bits


@pytest.mark.parametrize("k", [0, 65537])
def test_code_bits_rejects(k):
    with pytest.raises(ValueError):
        code_bits_for_k(k)


@pytest.mark.parametrize("bits,k", [(4, 16), (4, 5), (8, 256), (16, 65536)])
@pytest.mark.parametrize("rows,n_sub", [(1, 1), (3, 7), (5, 8), (2, 1001)])
def test_pack_roundtrip(bits, k, rows, n_sub):
    codes = np.random.default_rng(rows * n_sub).integers(0, k, (rows, n_sub))
    stored = pack_codes(codes, bits)
    assert stored.nbytes == packed_nbytes(rows, n_sub, bits)
    assert stored.dtype == (np.uint16 if bits == 16 else np.uint8)
    assert stored.shape[0] == rows
    unpacked = unpack_codes(stored, bits)
    np.testing.assert_array_equal(unpacked[:, :n_sub], codes)
    if bits == 4 and n_sub % 2:
        np.testing.assert_array_equal(unpacked[:, n_sub:], 0)


def test_nibble_order_is_low_first():
    stored = pack_codes(np.array([[1, 2, 3]]), 4)
    assert stored.tolist() == [[0x21, 0x03]]


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_codes(np.array([[16]]), 4)
    with pytest.raises(ValueError):
        pack_codes(np.array([[-1]]), 8)
