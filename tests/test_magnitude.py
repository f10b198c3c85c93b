"""Tests for onnxprune.methods.magnitude: exact counts, ties, chunked selection, MT."""

import ml_dtypes
import numpy as np
import pytest
import torch
from torch.nn.utils import prune

from onnxprune.errors import InfeasibleError, OnnxPruneError
from onnxprune.methods.magnitude import (
    apply_cut,
    global_zero_counts,
    keep_threshold,
    layer_cut,
    layer_zero_counts,
    min_threshold_zero_counts,
    select_smallest,
    top_k_mask,
)

DTYPES = [np.float16, np.float32, np.float64, ml_dtypes.bfloat16]


def stable_prune_order(weights):
    """Reference global ranking: (|w|, array order, flat index) by a full stable sort."""
    mags = np.concatenate([np.abs(np.asarray(w, dtype=np.float64)).ravel() for w in weights])
    owner = np.concatenate([np.full(w.size, i) for i, w in enumerate(weights)])
    return np.argsort(mags, kind="stable"), owner


def reference_global_counts(weights, k):
    order, owner = stable_prune_order(weights)
    return np.bincount(owner[order[:k]], minlength=len(weights)).tolist()


def tie_heavy(rng, shape, dtype=np.float16):
    """Few distinct magnitudes, random signs, some exact zeros (and negative zeros)."""
    w = rng.integers(-4, 5, size=shape).astype(np.float64) / 4
    w[rng.random(shape) < 0.05] = -0.0
    return w.astype(dtype)


# --- sparsity validation -------------------------------------------------------------------

@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "x", None])
def test_invalid_sparsity_is_a_user_error(bad):
    w = [np.ones(10, np.float32)]
    with pytest.raises(OnnxPruneError):
        layer_zero_counts([10], bad)
    with pytest.raises(OnnxPruneError):
        global_zero_counts(w, bad)
    with pytest.raises(OnnxPruneError):
        min_threshold_zero_counts(w, bad)


def keep_mask(w, n_zero):
    """The layer's keep-mask for n_zero zeros, as top_k_mask gives it."""
    return top_k_mask(w, np.size(w) - n_zero)


# --- top_k_mask -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_keep_mask_prunes_exactly_the_smallest_and_keeps_bits(dtype):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((17, 23)).astype(dtype)
    for n_zero in (0, 1, 100, 390, w.size):
        mask = keep_mask(w, n_zero)
        assert mask.shape == w.shape and mask.dtype == bool
        assert np.count_nonzero(~mask) == n_zero
        mag = np.abs(w.astype(np.float64))
        if 0 < n_zero < w.size:
            assert mag[~mask].max() <= mag[mask].min()
        pruned = np.where(mask, w, 0)
        assert pruned.dtype == w.dtype
        bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[w.itemsize]
        np.testing.assert_array_equal(pruned[mask].view(bits), w[mask].view(bits))
        assert not np.any(pruned[~mask].astype(np.float64))


def test_keep_mask_ties_prune_lower_flat_index_first():
    w = np.array([3.0, 1.0, -1.0, 1.0, 2.0, 0.0, -0.0, 0.0], dtype=np.float32)
    # zeros (indices 5, 6, 7) are the smallest; the 4th pruned is the first |w| = 1, index 1
    expected = np.array([1, 0, 1, 1, 1, 0, 0, 0], dtype=bool)
    np.testing.assert_array_equal(keep_mask(w, 4), expected)
    np.testing.assert_array_equal(keep_mask(w, 5), [1, 0, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(keep_mask(np.zeros((2, 3)), 4), [[0, 0, 0], [0, 1, 1]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_keep_mask_matches_stable_sort_on_ties(dtype):
    rng = np.random.default_rng(2)
    w = tie_heavy(rng, (31, 9), dtype)
    order, _ = stable_prune_order([w])
    for n_zero in (0, 5, 70, 140, 200, w.size):
        expected = np.ones(w.size, dtype=bool)
        expected[order[:n_zero]] = False
        np.testing.assert_array_equal(keep_mask(w, n_zero).ravel(), expected)


def test_top_k_mask_rejects_bad_counts():
    with pytest.raises(ValueError):
        top_k_mask(np.ones(4), 5)
    with pytest.raises(ValueError):
        top_k_mask(np.ones(4), -1)


def test_top_k_mask_tiebreak_then_higher_index_kept():
    values = np.array([[1.0, -2.0, 2.0, 0.5, 2.0]])
    assert top_k_mask(values, 2).tolist() == [[False, False, True, False, True]]
    # a tiebreak (DC: the dense |W|) decides among equal |values| before the index does
    tiebreak = np.array([[0.0, 3.0, -1.0, 9.0, 1.0]])
    assert top_k_mask(values, 2, tiebreak).tolist() == [[False, True, False, False, True]]
    assert top_k_mask(values, 1, tiebreak).tolist() == [[False, True, False, False, False]]
    # equal values and equal tiebreaks: the higher flat index is kept
    assert top_k_mask(np.zeros(4), 1, np.ones(4)).tolist() == [False, False, False, True]


def test_keep_threshold_separates_the_top_n():
    x = np.array([0.3, 5.0, -1.0, 2.0, 2.0, 4.0])
    assert keep_threshold(x, 2) == 3.0  # between 4 and the tied 2s
    assert keep_threshold(x, 3) == 2.0  # inside a tie: cut on both sides
    assert keep_threshold(x, 5) == pytest.approx(-0.35)
    for bad in (0, 6):
        with pytest.raises(ValueError):
            keep_threshold(x, bad)


# --- per-layer and global counts -------------------------------------------------------------

def test_layer_zero_counts_rounds_per_layer():
    assert layer_zero_counts([10, 7, 1000, 3], 0.2) == [2, 1, 200, 1]
    # per-layer rounding: 3 x round(1.4) = 3 zeros, while round(0.2 * 21) = 4
    assert layer_zero_counts([7, 7, 7], 0.2) == [1, 1, 1]
    assert layer_zero_counts([5, 0], 0.0) == [0, 0]


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.77, 0.95])
def test_global_counts_match_torch_global_unstructured(sparsity):
    torch.manual_seed(0)
    modules = [torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(72, 40), torch.nn.Linear(40, 10),
               torch.nn.Conv2d(8, 4, 1)]
    rng = np.random.default_rng(3)
    weights = []
    for mod, scale in zip(modules, (1.0, 0.2, 0.5, 3.0)):
        w = (rng.standard_normal(tuple(mod.weight.shape)) * scale).astype(np.float32)
        mod.weight.data = torch.from_numpy(w.copy())
        weights.append(w)
    total = sum(w.size for w in weights)
    k = round(sparsity * total)
    counts = global_zero_counts(weights, sparsity)
    assert sum(counts) == k
    prune.global_unstructured([(m, "weight") for m in modules],
                              pruning_method=prune.L1Unstructured, amount=k)
    for mod, w, c in zip(modules, weights, counts):
        np.testing.assert_array_equal(keep_mask(w, c), mod.weight_mask.numpy().astype(bool))
        pruned = apply_cut(w, layer_cut(w, c))[0].reshape(w.shape)  # the path the pruner takes
        np.testing.assert_array_equal(pruned != 0, mod.weight_mask.numpy().astype(bool))


def test_global_counts_ties_follow_array_order_then_index():
    rng = np.random.default_rng(4)
    weights = [tie_heavy(rng, (13, 7)), np.zeros(20, np.float16), tie_heavy(rng, (50,)),
               tie_heavy(rng, (4, 4, 3))]
    total = sum(w.size for w in weights)
    order, owner = stable_prune_order(weights)
    for sparsity in (0.05, 0.2, 0.5, 0.81, 0.99):
        k = round(sparsity * total)
        counts = global_zero_counts(weights, sparsity)
        assert counts == reference_global_counts(weights, k)
        # per-array keep_mask reproduces the one global stable ranking element by element
        got = np.concatenate([~keep_mask(w, c).ravel() for w, c in zip(weights, counts)])
        expected = np.zeros(total, dtype=bool)
        expected[order[:k]] = True
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtypes", [(np.float32,) * 3, (np.float64,) * 3,
                                    (np.float16, ml_dtypes.bfloat16, np.float32),
                                    (np.float16, np.float64, np.float32)])
def test_chunked_and_memmap_selection_equals_unchunked(tmp_path, dtypes):
    rng = np.random.default_rng(5)
    arrays = [rng.standard_normal((40, 30)), tie_heavy(rng, (333,), np.float64),
              rng.standard_normal((7, 3, 3)) * 1e-3]
    arrays = [a.astype(dt) for a, dt in zip(arrays, dtypes)]
    arrays[1][:50] = 0
    maps = []
    for i, a in enumerate(arrays):
        path = tmp_path / f"w{i}.bin"
        mm = np.memmap(path, dtype=a.dtype, mode="w+", shape=a.shape)
        mm[...] = a
        mm.flush()
        maps.append(np.memmap(path, dtype=a.dtype, mode="r", shape=a.shape))
    total = sum(a.size for a in arrays)
    for sparsity in (0.1, 0.5, 0.9, 0.999):
        unchunked = global_zero_counts(arrays, sparsity)
        assert unchunked == reference_global_counts(arrays, round(sparsity * total))
        for chunk_size in ((1, 7, 64) if sparsity == 0.5 else (7,)):
            assert global_zero_counts(arrays, sparsity, chunk_size=chunk_size) == unchunked
            assert global_zero_counts(maps, sparsity, chunk_size=chunk_size) == unchunked


# --- Global MP + Minimum Threshold -----------------------------------------------------------

def two_level_layers(sizes, n_small, seed=6):
    """Each layer holds n_small[l] magnitudes in (0, 1) and the rest in (10, 11), so Global MP
    zeroes exactly n_small[l] weights per layer when the target equals sum(n_small)."""
    rng = np.random.default_rng(seed)
    out = []
    for n, k in zip(sizes, n_small):
        w = np.concatenate([rng.uniform(0, 1, k), rng.uniform(10, 11, n - k)])
        out.append((w * rng.choice([-1, 1], n)).astype(np.float32)[rng.permutation(n)])
    return out


def test_min_threshold_rescale_hand_example():
    # N = 4040, p = 2 %  ->  m = floor(80.8) = 80; s = 0.9  ->  target = 3636.
    # Global MP zeroes [40, 100, 290, 500, 2706] (sum 3636).
    # Layer 0 (40 <= 80) is not pruned: total 3596, rescale by 3636/3596 = 1.01112:
    #   [0, 101.1, 293.2, 505.6, 2736.1]; caps n_l - m = [-, 20, 220, 520, 2920]
    #   -> clamp layers 1 and 2 (20 + 220 = 240 zeros).
    # Rescale the free layers to 3636 - 240 = 3396: 500 * 3396/3206 = 529.6 > 520 -> clamp
    #   layer 3; layer 4 = 2706 * 3396/3206 = 2866.4 <= 2920 stays free.
    # Rescale again: layer 4 = 3636 - 20 - 220 - 520 = 2876 <= 2920; nothing clamps: done.
    sizes, n_small = [40, 100, 300, 600, 3000], [40, 100, 290, 500, 2706]
    weights = two_level_layers(sizes, n_small)
    assert global_zero_counts(weights, 0.9) == n_small
    counts = min_threshold_zero_counts(weights, 0.9, min_keep_percent=2)
    assert counts == [0, 20, 220, 520, 2876]
    assert [n - c for n, c in zip(sizes, counts)] == [40, 80, 80, 80, 124]


def test_min_threshold_with_zero_minimum_is_global_mp():
    rng = np.random.default_rng(7)
    weights = [rng.standard_normal(n).astype(np.float32) * sc for n, sc in
               [(30, 0.01), (500, 1.0), (2000, 0.1)]]
    for variant in ("rescale", "waterfill"):
        got = min_threshold_zero_counts(weights, 0.9, min_keep_percent=0, variant=variant)
        assert got == global_zero_counts(weights, 0.9)
        assert got[0] == 30  # Global MP collapses the small-magnitude layer when m = 0


def reference_waterfill(weights, k, m):
    order, owner = stable_prune_order(weights)
    caps = [max(w.size - m, 0) for w in weights]
    counts = [0] * len(weights)
    for idx in order:
        if k == sum(counts):
            break
        if counts[owner[idx]] < caps[owner[idx]]:
            counts[owner[idx]] += 1
    return counts


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("variant", ["rescale", "waterfill"])
def test_min_threshold_exact_total_and_minimum_kept(seed, variant):
    rng = np.random.default_rng(seed)
    n_layers = int(rng.integers(3, 9))
    sizes = rng.integers(1, 3000, n_layers)
    scales = 10.0 ** rng.uniform(-3, 1, n_layers)  # very different scales force layer collapse
    weights = [(rng.standard_normal(int(n)) * sc).astype(np.float32)
               for n, sc in zip(sizes, scales)]
    if seed % 2:
        weights = [tie_heavy(rng, (int(n),)) for n in sizes]
    total = int(sizes.sum())
    p = 1.0
    m = int(total * p // 100)
    for sparsity in (0.5, 0.9, 0.97):
        if sum(max(int(n) - m, 0) for n in sizes) < round(sparsity * total):
            with pytest.raises(InfeasibleError):
                min_threshold_zero_counts(weights, sparsity, min_keep_percent=p, variant=variant)
            continue
        counts = min_threshold_zero_counts(weights, sparsity, min_keep_percent=p,
                                           variant=variant, chunk_size=257)
        assert sum(counts) == round(sparsity * total)
        for n, c in zip(sizes, counts):
            assert n - c >= min(n, m)  # never below m kept; layers n <= m stay dense
        if variant == "waterfill":
            assert counts == reference_waterfill(weights, round(sparsity * total), m)


def test_waterfill_keeps_clamped_layers_at_m_and_global_ranking_elsewhere():
    sizes, n_small = [40, 100, 300, 600, 3000], [40, 100, 290, 500, 2706]
    weights = two_level_layers(sizes, n_small, seed=8)
    counts = min_threshold_zero_counts(weights, 0.9, min_keep_percent=2, variant="waterfill")
    assert counts == reference_waterfill(weights, 3636, 80)
    assert counts[:4] == [0, 20, 220, 520]  # layer 0 dense, layers 1-3 keep exactly m = 80
    assert counts[4] == 2876


def test_min_threshold_spreads_by_size_when_global_mp_leaves_free_layers_dense():
    # Global MP takes all 4 zeros from the tiny layer (n = 5 <= m = 10), which must stay dense
    weights = [np.full(5, 1e-6, np.float32), np.linspace(1, 2, 300, dtype=np.float32),
               np.linspace(1, 2, 700, dtype=np.float32)]
    assert global_zero_counts(weights, 0.004) == [4, 0, 0]
    assert min_threshold_zero_counts(weights, 0.004, min_keep_percent=1) == [0, 1, 3]


def test_min_threshold_infeasible_and_boundary():
    weights = [np.arange(1, n + 1, dtype=np.float32) for n in (50, 200, 750)]
    # N = 1000, p = 5 %: m = 50; layer 0 keeps its 50, layers 1-2 may lose 150 + 700 = 850
    counts = min_threshold_zero_counts(weights, 0.85, min_keep_percent=5)
    assert counts == [0, 150, 700]
    with pytest.raises(InfeasibleError, match=r"m=50.*0\.8500.*--min-keep"):
        min_threshold_zero_counts(weights, 0.851, min_keep_percent=5)
    with pytest.raises(InfeasibleError):
        min_threshold_zero_counts(weights, 0.86, min_keep_percent=5, variant="waterfill")
    with pytest.raises(InfeasibleError, match=r"sparsity 0.9999999 .*no layer has more than m=800"):
        min_threshold_zero_counts(weights, 0.9999999, min_keep_percent=80)  # not "sparsity 1", "0 layers"


def test_min_threshold_rejects_bad_options():
    w = [np.ones(10, np.float32)]
    with pytest.raises(OnnxPruneError):
        min_threshold_zero_counts(w, 0.5, min_keep_percent=-1)
    with pytest.raises(OnnxPruneError):
        min_threshold_zero_counts(w, 0.5, min_keep_percent=100)
    with pytest.raises(OnnxPruneError):
        min_threshold_zero_counts(w, 0.5, variant="greedy")


# --- selection strategies and cuts ----------------------------------------------------------

def mixed_arrays(rng, dtypes):
    arrays = [rng.standard_normal((40, 30)), tie_heavy(rng, (333,), np.float64),
              rng.standard_normal((7, 3, 3)) * 1e-3, rng.standard_normal(5000) * 0.1]
    arrays = [a.astype(dt) for a, dt in zip(arrays, dtypes)]
    arrays[1][:50] = 0
    return arrays


@pytest.mark.parametrize("dtypes", [(np.float32,) * 4, (np.float16,) * 4, (ml_dtypes.bfloat16,) * 4,
                                    (np.float16, ml_dtypes.bfloat16, np.float32, np.float16),
                                    (np.float16, np.float64, np.float32, np.float32)])
def test_every_selection_strategy_gives_the_stable_sort_ranking(dtypes):
    rng = np.random.default_rng(11)
    arrays = mixed_arrays(rng, dtypes)
    total = sum(a.size for a in arrays)
    for k in (0, 1, 49, 50, 51, total // 2, int(total * 0.9), total - 1, total):
        expected = reference_global_counts(arrays, k)
        for strategy in ("gather", "bracket", "radix"):
            got = select_smallest(arrays, k, chunk_size=97, strategy=strategy)
            assert got.counts == expected, (strategy, k)


def test_bracket_falls_back_when_the_sample_misleads_it(monkeypatch):
    # a sample that saw only the start of a sorted array brackets the wrong range
    import onnxprune.methods.magnitude as mag
    w = [np.sort(np.random.default_rng(3).standard_normal(20000).astype(np.float32) ** 2)]
    monkeypatch.setattr(mag, "_PIECE", 1)
    monkeypatch.setattr(mag, "_sample", lambda weights, space: mag._keys(w[0][:1000], space))
    calls = []
    original = mag._radix_select
    monkeypatch.setattr(mag, "_radix_select", lambda *a: calls.append(1) or original(*a))
    assert select_smallest(w, 15000, strategy="bracket").counts == [15000]
    assert calls  # the sample bracketed the wrong range, so the exact fallback ran


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuts_from_the_global_ranking_reproduce_it_chunk_by_chunk(dtype):
    rng = np.random.default_rng(12)
    arrays = [tie_heavy(rng, (n,), dtype) for n in (500, 77, 1203)]
    order, owner = stable_prune_order(arrays)
    total = sum(a.size for a in arrays)
    for k in (0, 1, 333, 900, total):
        ranking = select_smallest(arrays, k, chunk_size=50)
        expected = np.zeros(total, bool)
        expected[order[:k]] = True
        pruned = []
        for i, a in enumerate(arrays):
            cut = ranking.cut(i, ranking.counts[i], a, chunk_size=50)
            parts = [apply_cut(a[s:s + 64], cut, s) for s in range(0, a.size, 64)]
            new = np.concatenate([p[0] for p in parts])
            keep = keep_mask(a, ranking.counts[i])
            assert np.array_equal(new[keep].view(np.uint8), a[keep].view(np.uint8))  # exact bits
            assert not new[~keep].view(np.uint8).any()  # the pruned ones are +0.0
            assert sum(p[1] for p in parts) == int(np.count_nonzero(a == 0))
            assert sum(p[2] for p in parts) == int(np.count_nonzero(new == 0))
            pruned.append(~keep)
        assert np.array_equal(np.concatenate(pruned), expected)


def test_a_cut_outside_the_boundary_is_refused_and_layer_cut_matches_keep_mask():
    rng = np.random.default_rng(13)
    arrays = [rng.standard_normal(1000).astype(np.float32) for _ in range(2)]
    ranking = select_smallest(arrays, 900)
    assert ranking.cut(0, ranking.counts[0] + 5, arrays[0]) is None
    for n_zero in (0, 1, 517, 1000):
        cut = layer_cut(arrays[0], n_zero)
        new, _, after = apply_cut(arrays[0], cut)
        assert after == n_zero
        np.testing.assert_array_equal(new != 0, keep_mask(arrays[0], n_zero))
    with pytest.raises(ValueError):
        layer_cut(arrays[0], 1001)


def test_minimum_threshold_keeps_a_weight_in_every_layer_of_a_small_model():
    # N = 168: floor(N * 0.05 / 100) = 0, which would let Global MP empty the small layer
    from onnxprune.methods.magnitude import min_keep_count, min_threshold_zero_counts
    assert min_keep_count(168, 0.05) == 1 and min_keep_count(168, 0) == 0
    weights = [np.full(96, 10.0), np.full(72, 0.01)]
    counts = min_threshold_zero_counts(weights, 0.7)
    assert sum(counts) == round(0.7 * 168) and counts[1] == 71
