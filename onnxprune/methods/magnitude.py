"""Magnitude pruning: per-layer hard thresholding, Global MP and Global MP + Minimum Threshold.

Allocation functions return zero COUNTS per array. A count becomes a `Cut` (a magnitude key and
how far its ties reach), and `apply_cut` zeroes a chunk by it, so masks are computed once and
applied while streaming. Magnitudes are compared as the bit pattern of |w| in one float format
(the arrays' own, or float32/float64 when they mix): for non-negative floats that order is the
numeric order, so selection runs on unsigned integers over chunks without holding all |w|.
One total order is used everywhere: (|w|, array order, flat index), so ties are deterministic;
top_k_mask applies it within one array for the methods that choose a support of their own (DC, LTP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import numpy as np

from onnxprune.errors import InfeasibleError, OnnxPruneError
from onnxprune.parallel import map_in_threads, read_chunk, scratch

_DIGIT_BITS = 16  # radix-select digit: 65536-bin histograms per pass


def check_sparsity(sparsity: float) -> float:
    """Return `sparsity` as a float if it lies in [0, 1); raise OnnxPruneError otherwise."""
    try:
        s = float(sparsity)
    except (TypeError, ValueError, OverflowError):
        raise OnnxPruneError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= s < 1.0:
        raise OnnxPruneError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return s


def target_zeros(n: int, sparsity: float) -> int:
    """Zeros that sparsity `s` means for `n` weights: Python round(s * n) (half to even, as
    torch.nn.utils.prune does)."""
    return int(round(check_sparsity(sparsity) * n))


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
CHUNK = 1 << 18  # elements per streamed chunk: its temporaries stay in the CPU cache


def key_space(dtypes) -> np.dtype:
    """The float format whose bit patterns rank arrays of these dtypes: their own when they share
    one (no conversion), else float32 (exact for float16/bfloat16), float64 when any is."""
    kinds = {np.dtype(d) for d in dtypes}
    if len(kinds) == 1:
        return kinds.pop()
    return np.dtype(np.float64) if np.dtype(np.float64) in kinds else np.dtype(np.float32)


def _keys(values, space: np.dtype, out: np.ndarray | None = None) -> np.ndarray:
    """Unsigned integer keys ordered like |values| (sign bit cleared; NaN sorts above inf)."""
    values = np.asarray(values)
    if values.dtype != space:
        values = values.astype(space)
    bits = values.view(_UINT[space.itemsize])
    return np.bitwise_and(bits, bits.dtype.type(np.iinfo(bits.dtype).max >> 1), out=out)


def _scratch_keys(values, space: np.dtype) -> np.ndarray:
    """_keys into this thread's reusable buffer (valid until its next call in this thread)."""
    return _keys(values, space, scratch("keys", np.size(values), _UINT[space.itemsize]))


def _top_key(space: np.dtype) -> int:
    """A key above every magnitude key of `space` (a cut at it zeroes everything)."""
    return int(np.iinfo(_UINT[space.itemsize]).max)


@dataclass(frozen=True)
class Cut:
    """Which weights of one array to zero: every magnitude key (in `space`) below `key`, and
    those equal to it at flat index < `through` (ties go to lower indices first)."""
    key: int
    through: int
    space: np.dtype


def _keep(keys: np.ndarray, cut: Cut, start: int, out: np.ndarray | None = None) -> np.ndarray:
    """Keep-mask of a chunk of keys that starts at flat index `start` of its array."""
    key = keys.dtype.type(cut.key)
    if cut.through <= start:
        return np.greater_equal(keys, key, out=out)
    keep = np.greater(keys, key, out=out)
    tail = max(cut.through - start, 0)
    if tail < keys.size:
        keep[tail:] |= keys[tail:] == key
    return keep


def apply_cut(chunk: np.ndarray, cut: Cut, start: int = 0,
              out: np.ndarray | None = None) -> tuple[np.ndarray, int, int]:
    """The chunk (flat, from index `start` of its array) with the cut's weights set to +0.0
    (into `out` if given), and its zero counts before and after. Kept values keep their bits."""
    chunk = np.ascontiguousarray(chunk).reshape(-1)
    keys = _scratch_keys(chunk, cut.space)
    keep = _keep(keys, cut, start, out=scratch("keep", chunk.size, bool))
    bits = chunk.view(_UINT[chunk.dtype.itemsize])
    new = np.multiply(bits, keep, dtype=bits.dtype,  # exact +0.0, NaN-safe
                      out=None if out is None else out.reshape(-1).view(bits.dtype)).view(chunk.dtype)
    before = chunk.size - int(np.count_nonzero(keys))
    after = chunk.size - int(np.count_nonzero(keep)) if cut.key > 0 else before
    return new, before, after


def layer_cut(weight: np.ndarray, n_zero: int, chunk_size: int = CHUNK) -> Cut:
    """The cut that zeroes the `n_zero` smallest |w| of one array (lower flat index first
    among equal magnitudes)."""
    n = int(np.size(weight))
    if not 0 <= n_zero <= n:
        raise ValueError(f"n_zero={n_zero} outside [0, {n}]")
    return select_smallest([weight], n_zero, chunk_size=chunk_size).cut(0, n_zero, weight)


def top_k_mask(values: np.ndarray, n_keep: int, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask (True = keep) of the `n_keep` largest |values|, in this module's order: among
    equal magnitudes the larger |tiebreak| (when given, same shape) is kept, then the higher flat
    index (the lower index is pruned first, as layer_cut prunes it)."""
    values = np.asarray(values)
    n = values.size
    if not 0 <= n_keep <= n:
        raise ValueError(f"n_keep={n_keep} outside [0, {n}]")
    keys = [np.arange(n)]
    if tiebreak is not None:
        tiebreak = np.asarray(tiebreak)
        keys.append(_keys(tiebreak.reshape(-1), key_space([tiebreak.dtype])))
    keys.append(_keys(values.reshape(-1), key_space([values.dtype])))
    mask = np.zeros(n, dtype=bool)
    mask[np.lexsort(keys)[n - n_keep:]] = True
    return mask.reshape(values.shape)


def keep_threshold(values: np.ndarray, n_keep: int) -> float:
    """A threshold between the `n_keep`-th largest of `values` and the next one (their midpoint:
    an exact tie at the boundary is cut on both sides); 0 < n_keep < values.size."""
    flat = np.asarray(values).ravel()
    n = flat.size
    if not 0 < n_keep < n:
        raise ValueError(f"n_keep={n_keep} outside (0, {n})")
    part = np.partition(flat, (n - n_keep - 1, n - n_keep))
    return 0.5 * float(part[n - n_keep - 1] + part[n - n_keep])


def layer_zero_counts(sizes: Sequence[int], sparsity: float) -> list[int]:
    """Hard thresholding: each layer loses round(s * n_l) weights.

    Rounding is per layer, so the total may differ from round(s * N) by up to L/2 weights.
    """
    s = check_sparsity(sparsity)
    return [int(round(s * int(n))) for n in sizes]


def _flat(weight: np.ndarray) -> np.ndarray:
    return weight.reshape(-1)  # a view for contiguous arrays and memmaps: nothing is read yet


def _chunk_tasks(weights, chunk_size: int):
    return [(i, start) for i, w in enumerate(weights) for start in range(0, w.size, chunk_size)]


@dataclass
class Selection:
    """The k smallest magnitudes over several arrays (ties by array order, then flat index):
    the boundary `key` (the k-th smallest, in `space`) and, per array, how many keys lie below
    it, how many equal it, and how many of the k it takes (`counts`)."""
    key: int
    space: np.dtype
    below: list[int]
    tied: list[int]
    counts: list[int]

    def cut(self, i: int, n_zero: int, weight: np.ndarray, chunk_size: int = CHUNK) -> Cut | None:
        """Array i's cut for `n_zero` zeros when the boundary gives one (else None)."""
        ties = n_zero - self.below[i]
        if not 0 <= ties <= self.tied[i]:
            return None
        if ties in (0, self.tied[i]):
            return Cut(self.key, 0 if ties == 0 else int(weight.size), self.space)
        flat, seen = _flat(weight), 0  # the ties-th tie in flat order: one pass over the array
        for start in range(0, flat.size, chunk_size):
            stop = min(start + chunk_size, flat.size)
            at = np.flatnonzero(_scratch_keys(read_chunk(flat, start, stop), self.space) == self.key)
            if seen + at.size >= ties:
                return Cut(self.key, start + int(at[ties - seen - 1]) + 1, self.space)
            seen += at.size
        raise AssertionError("fewer ties than counted")  # invariant


def select_smallest(weights: Sequence[np.ndarray], k: int, *, chunk_size: int = CHUNK,
                    strategy: str = "auto") -> Selection:
    """The k smallest magnitudes over `weights` (arrays or memory maps, read in chunks).

    strategy "gather": all keys in memory, one np.partition (small inputs); "bracket": a sample
    of the keys brackets the boundary, one streaming pass counts the keys below the bracket and
    keeps those inside it, the boundary is selected among those; "radix": one streaming pass per
    16-bit digit, a 65536-bin histogram each (bounded memory whatever the data; also the
    bracket's fallback when the sample misled it). "auto": gather up to 1 M weights, else bracket.
    All give the same exact result.
    """
    sizes = [int(w.size) for w in weights]
    total = sum(sizes)
    if not 0 <= k <= total:
        raise ValueError(f"k={k} outside [0, {total}]")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    space = key_space(w.dtype for w in weights)
    if k == 0 or k == total:
        key = 0 if k == 0 else _top_key(space)
        return Selection(key, space, [0] * len(sizes) if k == 0 else sizes, [0] * len(sizes),
                         [0] * len(sizes) if k == 0 else sizes)
    if strategy == "auto":
        strategy = "gather" if total <= _GATHER_LIMIT else "bracket"
    found = None
    if strategy == "gather":
        found = _gathered(weights, k, space)
    elif strategy == "bracket":
        found = _bracketed(weights, k, space, chunk_size)
    elif strategy != "radix":
        raise ValueError(f"unknown strategy {strategy!r}")
    if found is None:
        key = _radix_select(weights, k, space, chunk_size)
        found = (key, *_count_around(weights, key, space, chunk_size))
    key, below, tied = found
    ties_left, counts = k - sum(below), []
    for b, t in zip(below, tied):  # boundary ties go to the earliest arrays first
        take = min(t, ties_left)
        ties_left -= take
        counts.append(b + take)
    return Selection(key, space, below, tied, counts)


_GATHER_LIMIT = 1 << 20
_SAMPLE_PIECES, _PIECE = 4096, 256  # runs of contiguous weights read for the sample
_BAND_LIMIT = 1 << 25  # most keys kept inside the bracket before falling back to radix


def _gathered(weights, k, space):
    keys = [_keys(_flat(w), space) for w in weights]
    key = np.partition(np.concatenate(keys), k - 1)[k - 1]
    return (int(key), [int(np.count_nonzero(x < key)) for x in keys],
            [int(np.count_nonzero(x == key)) for x in keys])


def _sample(weights, space) -> np.ndarray:
    """Sorted keys of evenly spaced runs of _PIECE weights over the concatenated arrays."""
    ends = np.cumsum([w.size for w in weights])
    n_pieces = min(_SAMPLE_PIECES, max(64, int(ends[-1]) // (64 * _PIECE)))  # at most ~1/64 read
    starts = np.linspace(0, ends[-1] - 1, n_pieces).astype(np.int64)
    pieces = []
    for at in np.unique(starts):
        i = int(np.searchsorted(ends, at, side="right"))
        offset = int(at - (ends[i - 1] if i else 0))
        pieces.append(_keys(_flat(weights[i])[offset:offset + _PIECE], space))
    return np.sort(np.concatenate(pieces))


def _bracketed(weights, k, space, chunk_size):
    """(key, below, tied) from one pass between sampled bounds, or None when the k-th smallest
    fell outside them (or too many keys fell inside)."""
    sample = _sample(weights, space)
    total = sum(int(w.size) for w in weights)
    q = k / total
    rank = q * sample.size
    # 16 binomial standard deviations (the runs are correlated, so fewer effective samples)
    margin = 16 * np.sqrt(sample.size * q * (1 - q)) + 2 * _PIECE
    lo = int(sample[int(rank - margin)]) if rank - margin >= 0 else 0
    hi = int(sample[int(rank + margin)]) if rank + margin < sample.size else _top_key(space) >> 1
    flats = [_flat(w) for w in weights]
    unsigned = _UINT[space.itemsize]
    wrap_below = unsigned(np.iinfo(unsigned).max - lo)  # keys < lo wrap above this after - lo
    width = unsigned(hi - lo)

    def scan(task):
        i, start = task
        stop = min(start + chunk_size, flats[i].size)
        shifted = _scratch_keys(read_chunk(flats[i], start, stop), space)
        np.subtract(shifted, unsigned(lo), out=shifted)
        flags = scratch("flags", stop - start, bool)
        n_below = int(np.count_nonzero(np.greater(shifted, wrap_below, out=flags)))
        return i, n_below, shifted[np.less_equal(shifted, width, out=flags)]  # a copy

    below = [0] * len(weights)
    bands: list[list[np.ndarray]] = [[] for _ in weights]
    for i, n_below, band in map_in_threads(scan, _chunk_tasks(flats, chunk_size)):
        below[i] += n_below
        bands[i].append(band)
    n_band = sum(b.size for parts in bands for b in parts)
    first = k - sum(below)  # rank of the boundary among the bracketed keys (1-based)
    if not 1 <= first <= n_band or n_band > _BAND_LIMIT:
        return None
    pool = np.concatenate([b for parts in bands for b in parts])
    pool.partition(first - 1)  # in place: the bracketed keys are held twice at most
    key = int(pool[first - 1])  # shifted by lo
    del pool
    return (key + lo, [b + sum(int(np.count_nonzero(x < key)) for x in parts)
                       for b, parts in zip(below, bands)],
            [sum(int(np.count_nonzero(x == key)) for x in parts) for parts in bands])


def _radix_select(weights, k: int, space, chunk_size: int) -> int:
    """Key of the k-th smallest magnitude (1-based) by radix select: one streaming pass per
    16-bit digit, each keeping only a histogram of the keys matching the prefix so far."""
    total_bits = 8 * space.itemsize
    digit_bits = min(_DIGIT_BITS, total_bits)
    prefix, rank = 0, k
    for shift in range(total_bits - digit_bits, -1, -digit_bits):
        hist = np.zeros(1 << digit_bits, dtype=np.int64)
        for w in weights:
            flat = _flat(w)
            for start in range(0, flat.size, chunk_size):
                keys = _scratch_keys(read_chunk(flat, start, min(start + chunk_size, flat.size)), space)
                if shift + digit_bits < total_bits:
                    keys = keys[(keys >> (shift + digit_bits)) == prefix]
                digits = ((keys >> shift) & ((1 << digit_bits) - 1)).astype(np.intp)
                hist += np.bincount(digits, minlength=1 << digit_bits)
        cum = np.cumsum(hist)
        digit = int(np.searchsorted(cum, rank))  # first bin whose cumulative count reaches rank
        rank -= int(cum[digit - 1]) if digit else 0
        prefix = (prefix << digit_bits) | digit
    return prefix


def _count_around(weights, key: int, space, chunk_size: int) -> tuple[list[int], list[int]]:
    """Per array: keys below `key`, keys equal to it."""
    below, tied = [], []
    for w in weights:
        flat, b, t = _flat(w), 0, 0
        for start in range(0, flat.size, chunk_size):
            keys = _scratch_keys(read_chunk(flat, start, min(start + chunk_size, flat.size)), space)
            b += int(np.count_nonzero(keys < key))
            t += int(np.count_nonzero(keys == key))
        below.append(b)
        tied.append(t)
    return below, tied


def global_ranking(weights: Sequence[np.ndarray], sparsity: float, *,
                   chunk_size: int = CHUNK) -> Selection:
    """Global MP: the round(s * N) smallest |w| over all arrays (np.memmap too: streamed in
    chunks of `chunk_size` elements). `.counts` is each array's share; `.cut(l, counts[l], w_l)`
    gives the cut that reproduces the single global ranking in array l without another search."""
    k = target_zeros(sum(int(w.size) for w in weights), sparsity)
    return select_smallest(weights, k, chunk_size=chunk_size)


def global_zero_counts(weights: Sequence[np.ndarray], sparsity: float, *,
                       chunk_size: int = CHUNK) -> list[int]:
    """Global MP zero counts per array (see global_ranking)."""
    return global_ranking(weights, sparsity, chunk_size=chunk_size).counts


def min_keep_count(total: int, min_keep_percent: float) -> int:
    """m = floor(N * p / 100), computed exactly from the decimal value of p; (ours) at least 1
    when p > 0, so that models under 2,000 weights (where the floor is 0 at the default
    p = 0.05) are not left without the guarantee that no layer is emptied."""
    try:
        p = Fraction(str(min_keep_percent))
    except (TypeError, ValueError):
        p = Fraction(-1)
    if not 0 <= p < 100:
        raise OnnxPruneError(
            f"--min-keep must be a percentage in [0, 100), got {min_keep_percent!r}")
    return max(math.floor(total * p / 100), int(p > 0))


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
                              chunk_size: int = CHUNK, ranking: Selection | None = None) -> list[int]:
    """Global MP + Minimum Threshold: every layer keeps >= m = floor(N * p / 100) weights
    (layers with n_l <= m stay dense) and the total is exactly round(s * N) zeros.

    variant="rescale" (authors' procedure): Global MP sparsities, layers n_l <= m set dense, then
    rescale the free layers to the target and clamp those that keep < m, until nothing clamps;
    the real counts are rounded by largest remainder. variant="waterfill" (ours): clamped layers
    keep exactly m and one global magnitude threshold covers the others.
    `ranking`: global_ranking(weights, sparsity) when the caller has it already.
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
        bound = (f"{n_bound} layer{'s' if n_bound != 1 else ''} must each keep at least m={m} weights"
                 if n_bound else f"no layer has more than m={m} weights, so every layer stays dense")
        raise InfeasibleError(
            f"sparsity {sparsity:.10g} is infeasible: {bound} (--min-keep {min_keep_percent:g} % "
            f"of N={total}), so at most {best:.4f} is reachable; lower --min-keep or the sparsity")
    if variant == "waterfill":
        return _waterfill(weights, sizes, caps, target, chunk_size)

    if ranking is None or sum(ranking.counts) != target:
        ranking = select_smallest(weights, target, chunk_size=chunk_size)
    zeros = np.array(ranking.counts, dtype=np.float64)
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
        share = select_smallest([weights[i] for i in pool], need, chunk_size=chunk_size).counts
        counts[pool] = share
        over = [i for i in pool if counts[i] > caps[i]]
        if not over:
            return [int(c) for c in counts]
        counts[over] = caps[over]
        pool = [i for i in pool if i not in over]
