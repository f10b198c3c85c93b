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


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max())


def test_statistics_match_direct_computation():
    data = _data()
    stats = _fold(data, 64)
    wide = data.astype(np.float64)
    assert stats.count == data.shape[1]
    _close(stats.gram, np.einsum("kni,knj->kij", wide, wide))
    _close(stats.x_sum, wide.sum(axis=1))
    _close(stats.sq_norms, (wide ** 2).sum(axis=1))
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
        np.testing.assert_array_equal(other.row_index, runs[0].row_index)
        np.testing.assert_array_equal(other.rows, runs[0].rows)
    diag_only = [_fold(data, batch, gram=False) for batch in (1, 64)]
    _close(diag_only[1].sq_norms, diag_only[0].sq_norms)
    _close(diag_only[0].sq_norms, runs[0].sq_norms)


def test_reservoir_keeps_real_rows_in_order():
    data = _data()
    stats = _fold(data, 37, row_cap=100, seed=5)
    index = stats.row_index
    assert index.shape == (100,) and np.all(np.diff(index) > 0)
    assert stats.rows.dtype == np.float32 and stats.rows.shape == (3, 100, 6)
    np.testing.assert_array_equal(stats.rows, data[:, index])  # same rows in every block
    # the keys chosen are exactly the 100 smallest among all rows
    keys = row_keys(5, np.arange(data.shape[1]))
    np.testing.assert_array_equal(index, np.sort(np.argsort(keys, kind="stable")[:100]))


def test_reservoir_below_cap_keeps_everything():
    data = _data(n=40)
    stats = _fold(data, 7, row_cap=100)
    np.testing.assert_array_equal(stats.row_index, np.arange(40))
    np.testing.assert_array_equal(stats.rows, data)


def test_reservoir_is_uniform_and_seeded():
    n, cap = 20000, 2000
    data = np.zeros((1, n, 1), np.float32)
    index = _fold(data, 500, row_cap=cap, seed=11).row_index
    counts = np.bincount(index * 10 // n, minlength=10)
    assert np.all(np.abs(counts - cap / 10) < 5 * np.sqrt(cap / 10))  # no region favoured
    other = _fold(data, 500, row_cap=cap, seed=12).row_index
    np.testing.assert_array_equal(_fold(data, 123, row_cap=cap, seed=11).row_index, index)
    assert np.intersect1d(index, other).size < cap // 2


def test_options_and_errors():
    stats = LayerStats(2, 3, gram=False, diag=False)
    stats.add_batch(np.ones((2, 4, 3)))
    stats.add_batch(np.ones((2, 0, 3)))  # empty batches are harmless
    assert stats.count == 4
    np.testing.assert_array_equal(stats.x_sum, np.full((2, 3), 4.0))
    for name in ("gram", "sq_norms", "rows", "augmented_gram"):
        with pytest.raises(AttributeError):
            getattr(stats, name)
    with pytest.raises(ValueError, match="do not match"):
        stats.add_batch(np.ones((2, 4, 5)))
    with pytest.raises(ValueError):
        LayerStats(0, 3)
