"""Activation-weighted PQ numerics: Lloyd under H, least-squares codebook refit, output error."""

import numpy as np
import pytest

import onnxvq.weighted_kmeans as wk
from onnxvq.kmeans import kmeans
from onnxvq.layout import WeightLayout
from onnxvq.weighted_kmeans import output_error, refit_codebook, weighted_kmeans


def _random_psd(rng, width, rank=None):
    b = rng.standard_normal((width, rank or 2 * width))
    return b @ b.T / b.shape[1]


def _dense_error(s, codes, codebook, h):
    """E straight from the definition, one row at a time."""
    rows = s.shape[0]
    codes = np.asarray(codes).reshape(rows, -1)
    decoded = np.asarray(codebook, np.float64)[codes].reshape(rows, -1)
    diff = decoded - s.reshape(rows, -1).astype(np.float64)
    h = np.diag(h) if h.ndim == 1 else h
    return float(sum(r @ h @ r for r in diff))


def _lloyd(points, codebook, iters=100):
    """Plain weight-space Lloyd from a given init (empty clusters keep their centroid)."""
    codebook = codebook.astype(np.float64)
    codes = None
    for _ in range(iters):
        dist = ((points[:, None, :] - codebook[None]) ** 2).sum(-1)
        new_codes = dist.argmin(1)
        if codes is not None and np.array_equal(new_codes, codes):
            break
        codes = new_codes
        for c in range(len(codebook)):
            if (codes == c).any():
                codebook[c] = points[codes == c].mean(0)
    inertia = float(((points - codebook[codes]) ** 2).sum())
    return codes, codebook, inertia


# 1. H = identity: the same as weight-space Lloyd --------------------------------------------


@pytest.mark.parametrize("damp", [0.0, 0.05])
def test_identity_hessian_is_weight_space_lloyd(damp):
    rng = np.random.default_rng(0)
    rows, n_sub, d, k = 60, 5, 3, 12
    s = rng.standard_normal((rows, n_sub, d)).astype(np.float32)
    points = s.reshape(-1, d).astype(np.float64)
    init = s.reshape(-1, d)[rng.choice(rows * n_sub, k, replace=False)]
    ref_codes, ref_codebook, ref_inertia = _lloyd(points, init)

    result = weighted_kmeans(s, np.eye(n_sub * d), init, max_iter=100, tol=0.0, damp=damp)
    np.testing.assert_array_equal(result.codes, ref_codes)
    np.testing.assert_allclose(result.codebook, ref_codebook, atol=1e-5)
    # H_jj + damp * mean(diag H) * I = (1 + damp) I: the objective is the inertia scaled.
    assert result.inertia == pytest.approx((1 + damp) * ref_inertia, rel=1e-5)
    assert result.codes.shape == (rows * n_sub,) and result.codes.dtype == np.int64
    assert result.codebook.dtype == np.float32


def test_identity_hessian_continues_kmeans_without_increasing_it():
    rng = np.random.default_rng(1)
    rows, n_sub, d, k = 200, 8, 4, 32
    s = rng.standard_normal((rows, n_sub, d)).astype(np.float32)
    km = kmeans(s.reshape(-1, d), k, seed=0)
    result = weighted_kmeans(s, np.eye(n_sub * d), km.codebook, damp=0.0)
    assert result.inertia <= km.inertia * (1 + 1e-6)
    assert result.inertia == pytest.approx(km.inertia, rel=1e-4)
    one = weighted_kmeans(s, np.eye(n_sub * d), km.codebook, max_iter=1, damp=0.0)
    assert one.inertia <= km.inertia * (1 + 1e-6)


# 2. exact recovery ------------------------------------------------------------------------


def test_recovers_a_known_codebook_with_zero_error():
    rng = np.random.default_rng(2)
    rows, n_sub, d, k = 50, 6, 3, 12
    truth = (rng.standard_normal((k, d)) * 10).astype(np.float32)
    codes = rng.integers(0, k, (rows, n_sub))
    codes.ravel()[:k] = np.arange(k)  # every codeword used
    s = truth[codes]
    h = _random_psd(rng, n_sub * d)
    scale = _dense_error(s, codes, np.zeros((k, d)), h)  # sum_r t_r^T H t_r
    init = truth + rng.normal(0, 0.3, truth.shape).astype(np.float32)

    result = weighted_kmeans(s, h, init)
    np.testing.assert_array_equal(result.codes, codes.ravel())
    np.testing.assert_allclose(result.codebook, truth, atol=1e-4)
    assert result.inertia <= 1e-9 * scale
    assert output_error(s, result.codes, result.codebook, h) <= 1e-9 * scale
    refit = refit_codebook(s, result.codes, result.codebook, h)
    assert output_error(s, result.codes, refit, h) <= 1e-9 * scale


# 3. correlated, anisotropic inputs: both steps lower the error, held-out too -----------------


def test_weighting_lowers_output_error_on_anisotropic_inputs_and_held_out():
    rng = np.random.default_rng(0)
    rows, cols, d, k = 64, 48, 4, 16
    n_sub = cols // d
    mixing = rng.standard_normal((cols, cols)) * np.exp(rng.normal(0, 1.5, cols))[None, :]
    x = rng.standard_normal((4000, cols)) @ mixing
    x_train, x_test = x[:2000], x[2000:]
    h = x_train.T @ x_train / len(x_train)
    m = rng.standard_normal((rows, cols)).astype(np.float32)
    s = m.reshape(rows, n_sub, d)

    def held_out(codes, codebook):
        decoded = codebook[codes].reshape(rows, cols).astype(np.float64)
        return float(((x_test @ (m - decoded).T) ** 2).sum()) / len(x_test)

    km = kmeans(s.reshape(-1, d), k, seed=0)
    weighted = weighted_kmeans(s, h, km.codebook)
    refit = refit_codebook(s, weighted.codes, weighted.codebook, h)

    e_pq = output_error(s, km.codes, km.codebook, h)
    e_weighted = output_error(s, weighted.codes, weighted.codebook, h)
    e_refit = output_error(s, weighted.codes, refit, h)
    assert e_weighted < 0.6 * e_pq
    assert e_refit < e_weighted * (1 - 1e-3)

    t_pq, t_weighted = held_out(km.codes, km.codebook), held_out(weighted.codes, weighted.codebook)
    t_refit = held_out(weighted.codes, refit)
    assert t_weighted < 0.6 * t_pq
    assert t_refit < t_weighted


def test_output_error_matches_its_definition_on_inputs():
    rng = np.random.default_rng(3)
    rows, cols, d, k = 20, 12, 4, 8
    x = rng.standard_normal((300, cols)) @ rng.standard_normal((cols, cols))
    h = x.T @ x / len(x)
    m = rng.standard_normal((rows, cols)).astype(np.float32)
    s = m.reshape(rows, cols // d, d)
    codes = rng.integers(0, k, (rows, cols // d))
    codebook = rng.standard_normal((k, d)).astype(np.float32)
    decoded = codebook[codes].reshape(rows, cols).astype(np.float64)
    direct = float(((x @ (m - decoded).T) ** 2).sum()) / len(x)
    assert output_error(s, codes, codebook, h) == pytest.approx(direct, rel=1e-9)
    assert output_error(s, codes.ravel(), codebook, h) == pytest.approx(direct, rel=1e-9)


# 4. refit is the exact (ridge) least-squares optimum ----------------------------------------


@pytest.mark.parametrize("damp", [0.0, 0.1])
def test_refit_is_the_closed_form_least_squares_solution(damp):
    rng = np.random.default_rng(4)
    rows, n_sub, d, k = 6, 3, 2, 4
    width = n_sub * d
    s = rng.standard_normal((rows, n_sub, d)).astype(np.float32)
    codes = rng.integers(0, k, (rows, n_sub))
    codes.ravel()[:k] = np.arange(k)
    h = _random_psd(rng, width)
    start = rng.standard_normal((k, d)).astype(np.float32)

    lam = damp * np.diag(h).mean()
    normal = lam * np.eye(k * d)
    rhs = lam * start.astype(np.float64).ravel()
    for r in range(rows):
        gather = np.zeros((width, k * d))  # A_r: vec(C) -> row r of M^
        for j in range(n_sub):
            gather[j * d : (j + 1) * d, codes[r, j] * d : (codes[r, j] + 1) * d] = np.eye(d)
        normal += gather.T @ h @ gather
        rhs += gather.T @ h @ s[r].ravel().astype(np.float64)
    exact = np.linalg.solve(normal, rhs)

    refit = refit_codebook(s, codes, start, h, iters=200, damp=damp, rtol=1e-12)
    np.testing.assert_allclose(refit.ravel(), exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())
    gradient = normal @ refit.ravel().astype(np.float64) - rhs
    assert np.linalg.norm(gradient) <= 1e-5 * np.linalg.norm(rhs)
    if damp == 0.0:
        assert output_error(s, codes, refit, h) == pytest.approx(
            _dense_error(s, codes, exact.reshape(k, d), h), rel=1e-5
        )


# 5. padding ---------------------------------------------------------------------------------


def test_padded_layout_works_and_never_produces_nan():
    rng = np.random.default_rng(5)
    rows, cols, d, k = 40, 10, 4, 8
    layout = WeightLayout((rows, cols), transposed=False, row_axes=1, d=d)
    assert layout.tail == 2 and layout.n_sub == 3
    weight = rng.standard_normal((rows, cols)).astype(np.float32)
    s = layout.to_subvectors(weight)
    x = rng.standard_normal((200, cols)) * np.exp(rng.normal(0, 1, cols))
    h_cols = x.T @ x / len(x)
    h = np.zeros((layout.n_sub * d,) * 2)
    h[:cols, :cols] = h_cols  # padding rows/cols are zero

    partial = np.zeros((rows, layout.n_sub), bool)
    partial[:, -1] = True
    km = kmeans(s.reshape(-1, d), k, seed=0, partial=partial.ravel(), tail=layout.tail)
    e_start = output_error(s, km.codes, km.codebook, h)
    for damp in (0.0, 0.01):
        result = weighted_kmeans(s, h, km.codebook, damp=damp)
        refit = refit_codebook(s, result.codes, result.codebook, h, damp=damp)
        for array in (result.codebook, refit):
            assert np.isfinite(array).all()
        assert np.isfinite(result.inertia)
        e_weighted = output_error(s, result.codes, result.codebook, h)
        e_refit = output_error(s, result.codes, refit, h)
        assert np.isfinite(e_refit) and e_refit <= e_weighted <= e_start
        # E only sees the meaningful entries: decode through the layout and measure on inputs.
        decoded = layout.from_subvectors(refit[result.codes].reshape(rows, layout.n_sub, d))
        direct = float(((x @ (weight - decoded).T) ** 2).sum()) / len(x)
        assert e_refit == pytest.approx(direct, rel=1e-6)

    # H given for the unpadded cols only is padded with zeros: same results.
    a = weighted_kmeans(s, h, km.codebook)
    b = weighted_kmeans(s, h_cols, km.codebook)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.codebook, b.codebook)
    np.testing.assert_array_equal(
        refit_codebook(s, a.codes, a.codebook, h), refit_codebook(s, a.codes, a.codebook, h_cols)
    )


# 6. diagonal H as a 1-D array ---------------------------------------------------------------


def test_diagonal_hessian_matches_the_full_diagonal_matrix():
    rng = np.random.default_rng(6)
    rows, n_sub, d, k = 80, 6, 4, 16
    s = rng.standard_normal((rows, n_sub, d)).astype(np.float32)
    diag = np.exp(rng.normal(0, 1.5, n_sub * d))
    diag[[3, 17]] = 0.0  # dead inputs
    init = s.reshape(-1, d)[rng.choice(rows * n_sub, k, replace=False)]

    a = weighted_kmeans(s, diag, init)
    b = weighted_kmeans(s, np.diag(diag), init)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_allclose(a.codebook, b.codebook, rtol=1e-6, atol=1e-6)
    assert a.inertia == pytest.approx(b.inertia, rel=1e-9)
    assert a.iterations == b.iterations

    ra = refit_codebook(s, a.codes, a.codebook, diag)
    rb = refit_codebook(s, a.codes, a.codebook, np.diag(diag))
    np.testing.assert_allclose(ra, rb, rtol=1e-5, atol=1e-6)
    assert output_error(s, a.codes, ra, diag) == pytest.approx(
        output_error(s, a.codes, ra, np.diag(diag)), rel=1e-9
    )
    dense = _dense_error(s, a.codes, ra, diag)
    assert output_error(s, a.codes, ra, diag) == pytest.approx(dense, rel=1e-9)


# 7. never worse -----------------------------------------------------------------------------


@pytest.mark.parametrize("iters", [1, 3, 50])
def test_refit_never_increases_the_error(iters):
    rng = np.random.default_rng(7)
    rows, n_sub, d, k = 30, 5, 3, 10
    s = rng.standard_normal((rows, n_sub, d)).astype(np.float32)
    for h in (_random_psd(rng, n_sub * d), _random_psd(rng, n_sub * d, rank=4)):  # full, singular
        codes = rng.integers(0, k, (rows, n_sub))
        start = (rng.standard_normal((k, d)) * 3).astype(np.float32)
        e_start = output_error(s, codes, start, h)
        refit = refit_codebook(s, codes, start, h, iters=iters)
        e_refit = output_error(s, codes, refit, h)
        assert e_refit <= e_start
        again = refit_codebook(s, codes, refit, h, iters=iters)
        assert output_error(s, codes, again, h) <= e_refit


def test_refit_returns_the_input_when_cg_goes_wrong(monkeypatch):
    rng = np.random.default_rng(8)
    rows, n_sub, d, k = 30, 4, 2, 6
    s = rng.standard_normal((rows, n_sub, d)).astype(np.float32)
    codes = rng.integers(0, k, (rows, n_sub))
    h = _random_psd(rng, n_sub * d)
    start = rng.standard_normal((k, d)).astype(np.float32)
    true_product = wk._Outputs.product
    # A badly scaled operator makes CG overshoot while its own bookkeeping claims progress:
    # the direct check must catch it.
    monkeypatch.setattr(wk._Outputs, "product", lambda self, p: 1e-3 * true_product(self, p))
    refit = refit_codebook(s, codes, start, h, damp=0.0)
    np.testing.assert_array_equal(refit, start)
    assert refit is not start


def test_unused_and_empty_codewords_keep_their_values():
    rng = np.random.default_rng(9)
    rows, n_sub, d, k = 40, 4, 3, 8
    s = rng.standard_normal((rows, n_sub, d)).astype(np.float32)
    h = _random_psd(rng, n_sub * d)
    init = s.reshape(-1, d)[:k].copy()
    init[-1] = 1e3  # far from every point: never assigned
    result = weighted_kmeans(s, h, init)
    assert (result.codes != k - 1).all()
    np.testing.assert_array_equal(result.codebook[-1], init[-1])

    codes = rng.integers(0, k - 2, (rows, n_sub))  # the last two codewords unused
    start = rng.standard_normal((k, d)).astype(np.float32)
    refit = refit_codebook(s, codes, start, h)
    np.testing.assert_array_equal(refit[-2:], start[-2:])
    assert not np.allclose(refit[:-2], start[:-2])


# numerics: chunking, float32 GEMMs, determinism, validation -------------------------------


def test_chunking_and_float32_gemms_agree(monkeypatch):
    rng = np.random.default_rng(10)
    rows, n_sub, d, k = 50, 6, 4, 16
    s = rng.standard_normal((rows, n_sub, d)).astype(np.float32)
    h = _random_psd(rng, n_sub * d)
    init = s.reshape(-1, d)[:k].copy()
    result = weighted_kmeans(s, h, init)
    refit = refit_codebook(s, result.codes, result.codebook, h)
    error = output_error(s, result.codes, refit, h)

    monkeypatch.setattr(wk, "_CHUNK_BYTES", 1)  # one row per chunk
    monkeypatch.setattr(wk, "_ASSIGN_BYTES", 1)  # smallest assignment blocks
    small = weighted_kmeans(s, h, init)
    np.testing.assert_array_equal(small.codes, result.codes)
    np.testing.assert_array_equal(small.codebook, result.codebook)
    chunked = refit_codebook(s, result.codes, result.codebook, h)
    np.testing.assert_allclose(chunked, refit, rtol=1e-9, atol=1e-9)
    assert output_error(s, result.codes, refit, h) == pytest.approx(error, rel=1e-12)

    monkeypatch.setattr(wk, "_FLOAT64_MACS", 0)  # float32 GEMMs with H
    assert output_error(s, result.codes, refit, h) == pytest.approx(error, rel=1e-5)
    refit32 = refit_codebook(s, result.codes, result.codebook, h)
    assert output_error(s, result.codes, refit32, h) == pytest.approx(error, rel=1e-4)
    # Without rtol, CG still stops once its steps gain nothing at float32 precision (instead of
    # shrinking its directions into subnormals, which makes each GEMM ~40x slower).
    calls = []
    product = wk._Outputs.product
    monkeypatch.setattr(wk._Outputs, "product", lambda self, p: calls.append(1) or product(self, p))
    stalled = refit_codebook(s, result.codes, result.codebook, h, iters=500, rtol=0.0)
    assert len(calls) < 30
    assert output_error(s, result.codes, stalled, h) == pytest.approx(error, rel=1e-4)


def test_deterministic():
    rng = np.random.default_rng(11)
    s = rng.standard_normal((300, 8, 4)).astype(np.float32)
    h = _random_psd(rng, 32)
    init = s.reshape(-1, 4)[:32].copy()
    a, b = weighted_kmeans(s, h, init), weighted_kmeans(s, h, init)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.codebook, b.codebook)
    assert a.inertia == b.inertia and a.iterations == b.iterations
    np.testing.assert_array_equal(
        refit_codebook(s, a.codes, a.codebook, h), refit_codebook(s, a.codes, a.codebook, h)
    )


def test_objective_never_increases_and_tol_stops_early():
    rng = np.random.default_rng(12)
    s = rng.standard_normal((200, 6, 4)).astype(np.float32)
    h = _random_psd(rng, 24)
    init = s.reshape(-1, 4)[:16].copy()
    previous = np.inf
    for iters in range(1, 8):
        objective = weighted_kmeans(s, h, init, max_iter=iters, tol=0.0).inertia
        assert objective <= previous * (1 + 1e-6)
        previous = objective
    loose, tight = weighted_kmeans(s, h, init, tol=0.5), weighted_kmeans(s, h, init, tol=0.0)
    assert loose.iterations < tight.iterations


def test_rejects_bad_inputs():
    s = np.zeros((4, 3, 2), np.float32)
    with pytest.raises(ValueError):
        weighted_kmeans(s, np.eye(4), np.zeros((2, 2)))  # H too small even for cols
    with pytest.raises(ValueError):
        weighted_kmeans(s, np.eye(6), np.zeros((2, 3)))  # codebook d mismatch
    with pytest.raises(ValueError):
        weighted_kmeans(s.reshape(4, 6), np.eye(6), np.zeros((2, 2)))
    with pytest.raises(ValueError):
        weighted_kmeans(s, -np.eye(6), np.zeros((2, 2)))
    with pytest.raises(ValueError):
        weighted_kmeans(s, np.eye(6), np.zeros((2, 2)), damp=-1.0)
    with pytest.raises(ValueError):
        output_error(s, np.full((4, 3), 2), np.zeros((2, 2)), np.eye(6))  # code out of range
    with pytest.raises(ValueError):
        refit_codebook(s, np.zeros((4, 2), int), np.zeros((2, 2)), np.eye(6))
