"""LayerStats: exact statistics, independent of batching, with a reproducible row subsample."""

import numpy as np
import pytest

from onnxprune.calibration.accumulators import LayerStats, row_keys


def _data(k=3, n=700, d=6, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((k, n, d)) + rng.standard_normal((k, 1, d))).astype(np.float32)


def _fold(data, batch, **kwargs):
    stats = LayerStats(data.shape[0], data.shape[2], **kwargs)
    for start in range(0, data.shape[1], batch):
        stats.add_batch(data[:, start:start + batch])
    return stats


def _row_index(stats, data):
    """Global indices of the kept rows, found by their values (the rows are all distinct)."""
    match = (stats.rows[0][:, None, :] == data[0][None, :, :]).all(axis=2)
    assert np.all(match.sum(axis=1) == 1)
    return match.argmax(axis=1)


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max())


def test_statistics_match_direct_computation():
    data = _data()
    stats = _fold(data, 64)
    wide = data.astype(np.float64)
    assert stats.count == data.shape[1]
    _close(stats.gram, np.einsum("kni,knj->kij", wide, wide))
    _close(stats.x_sum, wide.sum(axis=1))
    assert stats.gram.dtype == np.float64


def test_augmented_gram_is_gram_of_rows_with_ones():
    data = _data(k=2, n=50, d=4)
    stats = _fold(data, 16)
    augmented = np.concatenate([data, np.ones((2, 50, 1), np.float32)], axis=2).astype(np.float64)
    _close(stats.augmented_gram, np.einsum("kni,knj->kij", augmented, augmented))


def test_batching_does_not_change_anything():
    data = _data()
    runs = [_fold(data, batch, row_cap=100, seed=3) for batch in (1, 64, data.shape[1])]
    for other in runs[1:]:
        assert other.count == runs[0].count
        _close(other.gram, runs[0].gram)
        _close(other.x_sum, runs[0].x_sum)
        np.testing.assert_array_equal(other.rows, runs[0].rows)


def test_reservoir_keeps_real_rows_in_order():
    data = _data()
    stats = _fold(data, 37, row_cap=100, seed=5)
    index = _row_index(stats, data)
    assert index.shape == (100,) and np.all(np.diff(index) > 0)
    assert stats.rows.dtype == np.float32 and stats.rows.shape == (3, 100, 6)
    np.testing.assert_array_equal(stats.rows, data[:, index])  # same rows in every block
    # the keys chosen are exactly the 100 smallest among all rows
    keys = row_keys(5, np.arange(data.shape[1]))
    np.testing.assert_array_equal(index, np.sort(np.argsort(keys, kind="stable")[:100]))


def test_reservoir_below_cap_keeps_everything():
    data = _data(n=40)
    stats = _fold(data, 7, row_cap=100)
    np.testing.assert_array_equal(stats.rows, data)


def test_reservoir_is_uniform_and_seeded():
    n, cap = 20000, 2000
    data = np.arange(n, dtype=np.float32).reshape(1, n, 1)  # each row holds its own index

    def index(batch, seed):
        return _fold(data, batch, row_cap=cap, seed=seed).rows[0, :, 0].astype(np.int64)

    chosen = index(500, 11)
    counts = np.bincount(chosen * 10 // n, minlength=10)
    assert np.all(np.abs(counts - cap / 10) < 5 * np.sqrt(cap / 10))  # no region favoured
    other = index(500, 12)
    np.testing.assert_array_equal(index(123, 11), chosen)
    assert np.intersect1d(chosen, other).size < cap // 2


def test_options_and_errors():
    stats = LayerStats(2, 3)
    stats.add_batch(np.ones((2, 4, 3)))
    stats.add_batch(np.ones((2, 0, 3)))  # empty batches are harmless
    assert stats.count == 4
    np.testing.assert_array_equal(stats.x_sum, np.full((2, 3), 4.0))
    np.testing.assert_array_equal(stats.gram, np.full((2, 3, 3), 4.0))
    with pytest.raises(AttributeError):  # no rows kept without row_cap
        stats.rows
    with pytest.raises(ValueError, match="do not match"):
        stats.add_batch(np.ones((2, 4, 5)))
    with pytest.raises(ValueError):
        LayerStats(0, 3)


def test_low_rank_when_fewer_rows_than_the_gram_is_wide():
    stats = _fold(_data(k=1, n=5, d=6), 2)
    assert stats.low_rank() == 5 and stats.low_rank(augmented=True) == 5
    stats = _fold(_data(k=1, n=6, d=6), 2)
    assert stats.low_rank() is None  # as many rows as inputs
    assert stats.low_rank(augmented=True) == 6  # but [X, 1] is 7 wide
    assert _fold(_data(k=1, n=7, d=6), 2).low_rank(augmented=True) is None
