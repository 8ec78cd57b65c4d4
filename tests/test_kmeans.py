"""k-means: exactness on separable data, determinism, partial points, empty clusters."""

import numpy as np
import pytest

from onnxvq.kmeans import kmeans


def test_recovers_a_known_codebook_exactly():
    rng = np.random.default_rng(0)
    codebook = rng.standard_normal((32, 4)).astype(np.float32) * 10
    labels = np.concatenate([np.arange(32), rng.integers(0, 32, 2000)])
    result = kmeans(codebook[labels], 32, seed=0)
    assert result.inertia == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(result.codebook[result.codes], codebook[labels], atol=1e-5)


def test_deterministic_for_a_seed_and_seed_matters():
    x = np.random.default_rng(1).standard_normal((5000, 8)).astype(np.float32)
    a, b, c = kmeans(x, 64, seed=3), kmeans(x, 64, seed=3), kmeans(x, 64, seed=4)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.codebook, b.codebook)
    assert not np.array_equal(a.codebook, c.codebook)


def test_better_than_random_codebook_and_close_to_sklearn():
    sklearn = pytest.importorskip("sklearn.cluster")
    x = np.random.default_rng(2).standard_normal((20000, 4)).astype(np.float32)
    ours = kmeans(x, 64, seed=0)
    theirs = sklearn.KMeans(64, n_init=1, random_state=0).fit(x)
    assert ours.inertia <= theirs.inertia_ * 1.02
    random_codebook = x[:64]
    d = ((x[:, None, :] - random_codebook[None]) ** 2).sum(-1).min(1).sum()
    assert ours.inertia < 0.8 * d


def test_chunking_does_not_change_the_result():
    x = np.random.default_rng(3).standard_normal((3000, 8)).astype(np.float32)
    a = kmeans(x, 32, seed=0)
    b = kmeans(x, 32, seed=0, chunk_bytes=1)  # 256-row blocks
    np.testing.assert_array_equal(a.codes, b.codes)


def test_partial_points_ignore_padding():
    rng = np.random.default_rng(4)
    codebook = rng.standard_normal((8, 4)).astype(np.float32) * 5
    labels = np.concatenate([np.arange(8), rng.integers(0, 8, 800)])
    x = codebook[labels].copy()
    partial = np.zeros(len(x), bool)
    partial[8::3] = True
    x[partial, 2:] = 1e6  # garbage in the padding must not matter
    result = kmeans(x, 8, seed=0, partial=partial, tail=2)
    np.testing.assert_allclose(result.codebook[result.codes][:, :2], codebook[labels][:, :2], atol=1e-4)
    full = ~partial
    np.testing.assert_allclose(result.codebook[result.codes][full], codebook[labels][full], atol=1e-4)


def test_fewer_distinct_points_than_k():
    x = np.repeat(np.eye(3, dtype=np.float32), 10, axis=0)
    result = kmeans(x, 8, seed=0)
    assert result.codebook.shape == (8, 3)
    assert result.inertia == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(result.codebook).all()


def test_empty_clusters_are_reseeded():
    # Two tight far-apart blobs and k=4: a naive Lloyd leaves clusters empty; ours must use all 4.
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(0, 0.01, (500, 2)), rng.normal(100, 1.0, (500, 2))]).astype(np.float32)
    result = kmeans(x, 4, seed=0)
    assert len(np.unique(result.codes)) == 4


def test_rejects_bad_k():
    x = np.zeros((5, 2), np.float32)
    with pytest.raises(ValueError):
        kmeans(x, 6)
    with pytest.raises(ValueError):
        kmeans(x, 0)


def test_one_codeword_is_the_weighted_mean():
    x = np.random.default_rng(6).standard_normal((500, 3)).astype(np.float32)
    w = np.random.default_rng(7).uniform(0, 5, 500)
    result = kmeans(x, 1, seed=0, weights=w)
    np.testing.assert_allclose(result.codebook[0], np.average(x, axis=0, weights=w), rtol=1e-5, atol=1e-6)
    assert result.inertia == pytest.approx(float(w @ ((x - result.codebook[0]) ** 2).sum(1)), rel=1e-5)


def test_integer_weights_act_as_repeated_points():
    """Weighted k-means of x with weights n reaches the objective of plain k-means of x with
    each point repeated n times (the same optimum; seeding differs, so within a few percent)."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2000, 4)).astype(np.float32)
    n = rng.integers(1, 6, 2000)
    weighted = kmeans(x, 32, seed=0, weights=n)
    repeated = kmeans(np.repeat(x, n, axis=0), 32, seed=0)
    assert weighted.inertia == pytest.approx(repeated.inertia, rel=0.05)
    unweighted = kmeans(x, 32, seed=0)
    score = lambda r: float(n @ ((x - r.codebook[r.codes]) ** 2).sum(1))  # noqa: E731
    assert score(weighted) < score(unweighted)


def test_heavy_points_get_codewords_and_zero_weights_pull_nothing():
    """Ten points carrying most of the weight are each nearly reproduced (the light points that
    share their codewords pull them by about 1e-4 of their length); points of weight zero never
    move a codeword, whatever their values."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((5000, 8)).astype(np.float32)
    w = np.ones(5000)
    w[:10] = 1e4
    result = kmeans(x, 16, seed=0, weights=w)
    heavy_error = ((x[:10] - result.codebook[result.codes[:10]]) ** 2).sum(1)
    assert heavy_error.max() < 1e-2  # a point's squared length is about 8
    plain = kmeans(x, 16, seed=0)
    assert ((x[:10] - plain.codebook[plain.codes[:10]]) ** 2).sum(1).mean() > 1.0
    x[4000:] = 1e6
    w[4000:] = 0.0
    ignored = kmeans(x, 16, seed=0, weights=w)
    assert np.abs(ignored.codebook).max() < 100


@pytest.mark.parametrize("weights", [np.zeros(10), -np.ones(10), np.full(10, np.nan), np.ones(9)])
def test_rejects_bad_weights(weights):
    with pytest.raises(ValueError):
        kmeans(np.zeros((10, 2), np.float32), 2, weights=weights)
