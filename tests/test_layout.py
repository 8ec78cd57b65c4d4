"""The one weight <-> subvector layout."""

import numpy as np
import pytest

from onnxvq.layout import WeightLayout

CASES = [
    # (weight shape, transposed, row_axes, expected rows, expected cols)
    ((64, 3, 3, 3), False, 1, 64, 27),  # Conv 2-D
    ((8, 4, 5), False, 1, 8, 20),  # Conv 1-D
    ((4, 2, 2, 3, 3), False, 1, 4, 36),  # Conv 3-D
    ((24, 40), False, 1, 24, 40),  # Gemm transB=1 / MatMul left
    ((40, 24), True, 1, 24, 40),  # Gemm transB=0 / MatMul right
    ((3, 12, 10), True, 2, 30, 12),  # batched MatMul right
    ((2, 9, 12), False, 2, 18, 12),  # batched MatMul left
]


@pytest.mark.parametrize("shape,transposed,row_axes,rows,cols", CASES)
@pytest.mark.parametrize("d", [1, 3, 4, 8, 64])
def test_roundtrip_and_shapes(shape, transposed, row_axes, rows, cols, d):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    lay = WeightLayout(shape, transposed, row_axes, d)
    assert (lay.rows, lay.cols) == (rows, cols)
    s = lay.to_subvectors(w)
    assert s.shape == (rows, -(-cols // d), d)
    assert lay.tail == cols - (lay.n_sub - 1) * d
    np.testing.assert_array_equal(lay.from_subvectors(s), w)
    # padding entries are zeros, real entries are the row's own values in memory order
    flat = s.reshape(rows, -1)
    np.testing.assert_array_equal(flat[:, cols:], 0)
    np.testing.assert_array_equal(flat[:, :cols], lay.to_matrix(w))


def test_rows_are_output_channels():
    # Gemm transB=0: B is (K, N); row n of the matrix must be B[:, n].
    b = np.arange(12, dtype=np.float32).reshape(3, 4)
    lay = WeightLayout((3, 4), True, 1, 2)
    np.testing.assert_array_equal(lay.to_matrix(b)[1], b[:, 1])
    # Conv: row o is the flattened kernel of output channel o.
    w = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    np.testing.assert_array_equal(WeightLayout(w.shape, False, 1, 4).to_matrix(w)[1], w[1].ravel())


def test_rejects_bad_layouts():
    with pytest.raises(ValueError):
        WeightLayout((5,), False, 1, 2)
    with pytest.raises(ValueError):
        WeightLayout((5, 4), False, 2, 2)
    with pytest.raises(ValueError):
        WeightLayout((5, 4), False, 1, 0)
