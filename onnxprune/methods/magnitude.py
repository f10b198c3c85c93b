"""Magnitude pruning: per-layer hard thresholding, Global MP and Global MP + Minimum Threshold.

Every function returns zero COUNTS; `keep_mask(w, count)` turns a count into a mask. Magnitudes are
compared as the bit pattern of |w| (float32, or float64 when an array is float64): for
non-negative floats that order equals the numeric order, it is exact for float16/bfloat16, and it
lets the global selection run as a radix select over chunks without holding all |w| in memory.
One total order is used everywhere: (|w|, array order, flat index), so ties are deterministic.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import numpy as np

from onnxprune.errors import InfeasibleError, OnnxPruneError

_DIGIT_BITS = 16  # radix-select digit: 65536-bin histograms per pass


def check_sparsity(sparsity: float) -> float:
    """Return `sparsity` as a float if it lies in [0, 1); raise OnnxPruneError otherwise."""
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise OnnxPruneError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= s < 1.0:
        raise OnnxPruneError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return s


def target_zeros(n: int, sparsity: float) -> int:
    """Zeros that sparsity `s` means for `n` weights: Python round(s * n) (half to even, as
    torch.nn.utils.prune does)."""
    return int(round(check_sparsity(sparsity) * n))


def _magnitude_keys(values: np.ndarray, wide: bool) -> np.ndarray:
    """Unsigned integer keys ordered like |values| (sign bit cleared; NaN sorts above inf)."""
    if wide:
        bits = np.asarray(values).astype(np.float64, copy=False).view(np.uint64)
        return bits & np.uint64(0x7FFF_FFFF_FFFF_FFFF)
    bits = np.asarray(values).astype(np.float32, copy=False).view(np.uint32)
    return bits & np.uint32(0x7FFF_FFFF)


def _is_wide(weights: Sequence[np.ndarray]) -> bool:
    return any(np.dtype(w.dtype) == np.float64 for w in weights)


def keep_mask(weight: np.ndarray, n_zero: int) -> np.ndarray:
    """Boolean mask (True = keep) that zeroes the `n_zero` smallest |w| of `weight`.

    Among equal magnitudes the lower flat index is pruned first. O(n): np.partition finds the
    boundary magnitude, then only the ties at the boundary are resolved.
    """
    weight = np.asarray(weight)
    n = weight.size
    if not 0 <= n_zero <= n:
        raise ValueError(f"n_zero={n_zero} outside [0, {n}]")
    if n_zero == 0:
        return np.ones(weight.shape, dtype=bool)
    keys = _magnitude_keys(weight.reshape(-1), np.dtype(weight.dtype) == np.float64)
    boundary = np.partition(keys, n_zero - 1)[n_zero - 1]
    keep = keys >= boundary
    n_tied = n_zero - (n - int(np.count_nonzero(keep)))  # ties at the boundary still to prune
    keep[np.flatnonzero(keys == boundary)[:n_tied]] = False
    return keep.reshape(weight.shape)


def layer_zero_counts(sizes: Sequence[int], sparsity: float) -> list[int]:
    """Hard thresholding: each layer loses round(s * n_l) weights.

    Rounding is per layer, so the total may differ from round(s * N) by up to L/2 weights.
    """
    s = check_sparsity(sparsity)
    return [int(round(s * int(n))) for n in sizes]


def _chunks(weight: np.ndarray, chunk_size: int):
    flat = weight.reshape(-1)  # a view for contiguous arrays and memmaps: nothing is read yet
    for start in range(0, flat.size, chunk_size):
        yield flat[start:start + chunk_size]


def _kth_smallest_key(weights, k: int, wide: bool, chunk_size: int) -> int:
    """Key of the k-th smallest magnitude (1-based) by radix select: one streaming pass per
    16-bit digit, each keeping only a 65536-bin histogram of the keys matching the prefix so far."""
    total_bits = 64 if wide else 32
    prefix, rank = 0, k
    for shift in range(total_bits - _DIGIT_BITS, -1, -_DIGIT_BITS):
        hist = np.zeros(1 << _DIGIT_BITS, dtype=np.int64)
        for w in weights:
            for chunk in _chunks(w, chunk_size):
                keys = _magnitude_keys(chunk, wide)
                if shift + _DIGIT_BITS < total_bits:
                    keys = keys[(keys >> (shift + _DIGIT_BITS)) == prefix]
                digits = ((keys >> shift) & 0xFFFF).astype(np.intp)
                hist += np.bincount(digits, minlength=1 << _DIGIT_BITS)
        cum = np.cumsum(hist)
        digit = int(np.searchsorted(cum, rank))  # first bin whose cumulative count reaches rank
        rank -= int(cum[digit - 1]) if digit else 0
        prefix = (prefix << _DIGIT_BITS) | digit
    return prefix


def _select_smallest(weights: Sequence[np.ndarray], k: int, chunk_size: int) -> list[int]:
    """How many of the k globally smallest magnitudes fall in each array (ties by array order,
    then flat index). Peak extra memory: O(chunk_size) plus a 65536-bin histogram."""
    sizes = [int(w.size) for w in weights]
    if not 0 <= k <= sum(sizes):
        raise ValueError(f"k={k} outside [0, {sum(sizes)}]")
    if k == 0 or k == sum(sizes):
        return [0] * len(sizes) if k == 0 else sizes
    wide = _is_wide(weights)
    boundary = _kth_smallest_key(weights, k, wide, chunk_size)
    below, tied = [], []
    for w in weights:
        b = t = 0
        for chunk in _chunks(w, chunk_size):
            keys = _magnitude_keys(chunk, wide)
            b += int(np.count_nonzero(keys < boundary))
            t += int(np.count_nonzero(keys == boundary))
        below.append(b)
        tied.append(t)
    ties_left = k - sum(below)
    counts = []
    for b, t in zip(below, tied):  # boundary ties go to the earliest arrays first
        take = min(t, ties_left)
        ties_left -= take
        counts.append(b + take)
    return counts


def global_zero_counts(weights: Sequence[np.ndarray], sparsity: float, *,
                       chunk_size: int = 1 << 18) -> list[int]:
    """Global MP: the round(s * N) smallest |w| over all arrays; returns each array's share.

    `keep_mask(w_l, counts[l])` per array reproduces the single global ranking exactly. Arrays
    may be np.memmap: they are streamed in chunks of `chunk_size` elements.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    k = target_zeros(sum(int(w.size) for w in weights), sparsity)
    return _select_smallest(weights, k, chunk_size)


def min_keep_count(total: int, min_keep_percent: float) -> int:
    """m = floor(N * p / 100), computed exactly from the decimal value of p."""
    try:
        p = Fraction(str(min_keep_percent))
    except (TypeError, ValueError):
        p = Fraction(-1)
    if not 0 <= p < 100:
        raise OnnxPruneError(
            f"--min-keep must be a percentage in [0, 100), got {min_keep_percent!r}")
    return math.floor(total * p / 100)


def _largest_remainder(real: np.ndarray, caps: np.ndarray, total: int) -> list[int]:
    """Integers <= caps near `real` summing to `total`: floor, then +1 by largest fraction
    (lower index first on equal fractions)."""
    base = np.minimum(np.floor(real), caps).astype(np.int64)
    order = sorted(range(len(real)), key=lambda i: (-(real[i] - base[i]), i))
    left = total - int(base.sum())
    while left > 0:
        progressed = False
        for i in order:
            if left and base[i] < caps[i]:
                base[i] += 1
                left -= 1
                progressed = True
        if not progressed:
            # unreachable: the feasibility check guarantees sum(caps) >= total
            raise AssertionError("allocation cannot reach the target")
    return [int(c) for c in base]


def min_threshold_zero_counts(weights: Sequence[np.ndarray], sparsity: float, *,
                              min_keep_percent: float = 0.05, variant: str = "rescale",
                              chunk_size: int = 1 << 18) -> list[int]:
    """Global MP + Minimum Threshold: every layer keeps >= m = floor(N * p / 100) weights
    (layers with n_l <= m stay dense) and the total is exactly round(s * N) zeros.

    variant="rescale" (authors' procedure): Global MP sparsities, layers n_l <= m set dense, then
    rescale the free layers to the target and clamp those that keep < m, until nothing clamps;
    the real counts are rounded by largest remainder. variant="waterfill" (ours): clamped layers
    keep exactly m and one global magnitude threshold covers the others.
    """
    if variant not in ("rescale", "waterfill"):
        raise OnnxPruneError(
            f"unknown Minimum Threshold variant {variant!r} (use rescale or waterfill)")
    sizes = np.array([int(w.size) for w in weights], dtype=np.int64)
    total = int(sizes.sum())
    target = target_zeros(total, sparsity)
    m = min_keep_count(total, min_keep_percent)
    caps = np.maximum(sizes - m, 0)  # most zeros each layer may take
    if target > caps.sum():
        n_bound = int(np.count_nonzero(sizes > m))
        best = math.floor(int(caps.sum()) / total * 1e4) / 1e4 if total else 0.0
        raise InfeasibleError(
            f"sparsity {sparsity:g} is infeasible: {n_bound} layers must each keep at least "
            f"m={m} weights (--min-keep {min_keep_percent:g} % of N={total}), so at most "
            f"{best:.4f} is reachable; lower --min-keep or the sparsity")
    if variant == "waterfill":
        return _waterfill(weights, sizes, caps, target, chunk_size)

    zeros = np.array(_select_smallest(weights, target, chunk_size), dtype=np.float64)
    return _rescale_and_clamp(zeros, sizes, caps, m, target)


def cap_zero_counts(counts: Sequence[int], sizes: Sequence[int], min_keep_percent: float = 0.05) -> list[int]:
    """Apply the Minimum Threshold to any allocation (e.g. a learned one): the same rescale-and-
    clamp procedure as global-mt, starting from `counts`; the total is unchanged."""
    sizes = np.array(sizes, dtype=np.int64)
    m = min_keep_count(int(sizes.sum()), min_keep_percent)
    caps = np.maximum(sizes - m, 0)
    target = int(sum(counts))
    if target > caps.sum():
        raise InfeasibleError(f"{target} zeros cannot leave every layer at least m={m} weights "
                              "(lower --min-keep or the sparsity)")
    return _rescale_and_clamp(np.array(counts, dtype=np.float64), sizes, caps, m, target)


def _rescale_and_clamp(zeros: np.ndarray, sizes: np.ndarray, caps: np.ndarray, m: int,
                       target: int) -> list[int]:
    clamped = np.zeros(len(sizes), dtype=bool)
    free = sizes > m  # layers with n_l <= m are never free nor clamped: they stay dense
    while True:
        need = target - caps[clamped].sum()
        have = zeros[free].sum()
        if have > 0:
            zeros[free] *= need / have
        elif free.any():  # (ours) Global MP left the free layers dense: spread need by size
            zeros[free] = need * sizes[free] / sizes[free].sum()
        newly = free & (zeros > caps)
        if not newly.any():
            break
        zeros[newly] = caps[newly]
        clamped |= newly
        free &= ~newly
    counts = caps * clamped  # clamped layers are exact integers already
    counts[free] = _largest_remainder(zeros[free], caps[free], int(target - counts.sum()))
    if counts.sum() != target:
        raise AssertionError("Minimum Threshold allocation missed the target")  # invariant
    return [int(c) for c in counts]


def _waterfill(weights, sizes, caps, target: int, chunk_size: int) -> list[int]:
    """Global ranking over the unclamped layers; a layer whose share would leave < m kept is
    fixed at its cap and the rest re-ranked. A raised threshold never unclamps a layer, so this
    converges to the single threshold t with sum_l min(count_l(<t), cap_l) = target."""
    counts = np.zeros(len(sizes), dtype=np.int64)
    pool = [i for i in range(len(sizes)) if caps[i] > 0]
    while True:
        need = target - int(counts.sum() - counts[pool].sum())
        share = _select_smallest([weights[i] for i in pool], need, chunk_size)
        counts[pool] = share
        over = [i for i in pool if counts[i] > caps[i]]
        if not over:
            return [int(c) for c in counts]
        counts[over] = caps[over]
        pool = [i for i in pool if i not in over]
