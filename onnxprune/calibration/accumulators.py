"""Per-layer calibration statistics folded batch by batch, never storing all rows.

Rows arrive as (k, n, d_in) blocks (see ``onnxprune.layout``). Sums are float64 so the
result does not depend on how the calibration set is cut into batches; the optional row
subsample is chosen by per-row keys hashed from the global row index, so it is the same for
any batching too.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def row_keys(seed: int, index: np.ndarray) -> np.ndarray:
    """Pseudo-random uint64 key per global row index (splitmix64 of seed and index)."""
    seed_mix = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    return _splitmix64(np.asarray(index, dtype=np.uint64) * _GOLDEN + seed_mix)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    # uint64 array arithmetic wraps modulo 2**64, which is what the mixer relies on
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class LayerStats:
    """Running statistics of one layer's input rows, per block.

    gram: sum X^T X (k, d_in, d_in); x_sum: sum of rows (k, d_in); count: rows seen per block;
    rows: with ``row_cap > 0`` a uniform random subsample of at most ``row_cap`` rows (the same
    row indices in every block), float32, in calibration order.
    """

    def __init__(self, blocks: int, d_in: int, *, row_cap: int = 0, seed: int = 0):
        if blocks < 1 or d_in < 1 or row_cap < 0:
            raise ValueError(f"bad LayerStats sizes: blocks={blocks}, d_in={d_in}, row_cap={row_cap}")
        self.blocks, self.d_in = int(blocks), int(d_in)
        self.row_cap, self.seed = int(row_cap), int(seed)
        self.count = 0
        self.x_sum = np.zeros((blocks, d_in))
        self._gram = np.zeros((blocks, d_in, d_in))
        self._filled = 0
        self._pending: list[np.ndarray] = []  # float64 rows not yet folded into the Gram
        self._pending_rows = 0
        self.derived: dict = {}  # what solvers derive from these statistics (kept across a trail)
        if row_cap:
            self._buf = np.empty((blocks, row_cap, d_in), dtype=np.float32)  # pages touched as filled
            self._keys = np.empty(row_cap, dtype=np.uint64)
            self._index = np.empty(row_cap, dtype=np.int64)

    @staticmethod
    def nbytes(blocks: int, d_in: int, *, row_cap: int = 0) -> int:
        """Most memory a LayerStats of these sizes holds (its rows waiting for the Gram too)."""
        waiting = min(512 * d_in * blocks, (1 << 22) + d_in * blocks) * 8
        return (8 * blocks * d_in * (1 + d_in) + waiting
                + row_cap * (4 * blocks * d_in + 16))

    def add_batch(self, rows: np.ndarray) -> None:
        """Fold rows (k, n, d_in) into the statistics."""
        rows = np.asarray(rows)
        if rows.ndim != 3 or rows.shape[0] != self.blocks or rows.shape[2] != self.d_in:
            raise ValueError(f"rows of shape {rows.shape} do not match ({self.blocks}, n, {self.d_in})")
        n = rows.shape[1]
        if n == 0:
            return
        wide = rows.astype(np.float64)
        self.x_sum += wide.sum(axis=1)
        # Rows wait in a buffer: one product over many rows is far cheaper than many thin
        # ones, each of which rewrites the whole d_in x d_in Gram.
        self._pending.append(wide)
        self._pending_rows += n
        if self._pending_rows >= 512 or self._pending_rows * self.d_in * self.blocks >= 1 << 22:
            self._flush()  # at most 32 MB waits per layer
        if self.row_cap:
            self._sample(rows, self.count)
        self.count += n

    def _sample(self, rows: np.ndarray, start: int) -> None:
        """Keep the row_cap rows with the smallest (key, index) seen so far."""
        index = np.arange(start, start + rows.shape[1], dtype=np.int64)
        keys = row_keys(self.seed, index)
        if self._filled == self.row_cap:  # only rows beating the current worst can enter
            take = keys < self._keys.max()
            index, keys = index[take], keys[take]
            if index.size == 0:
                return
        filled = self._filled
        pool_keys = np.concatenate([self._keys[:filled], keys])
        pool_index = np.concatenate([self._index[:filled], index])
        chosen = np.zeros(pool_keys.size, dtype=bool)
        chosen[np.lexsort((pool_index, pool_keys))[: self.row_cap]] = True
        entering = np.flatnonzero(chosen[filled:])
        # evicted slots first, then never-used ones
        slots = np.concatenate([np.flatnonzero(~chosen[:filled]), np.arange(filled, self.row_cap)])
        slots = slots[: entering.size]
        self._buf[:, slots] = rows[:, index[entering] - start]
        self._keys[slots], self._index[slots] = keys[entering], index[entering]
        self._filled = min(self.row_cap, pool_keys.size)

    def _flush(self) -> None:
        if self._pending:
            wide = np.concatenate(self._pending, axis=1)
            for block, gram in zip(wide, self._gram):  # 2-D products go straight to BLAS
                gram += block.T @ block
            self._pending, self._pending_rows = [], 0

    @property
    def gram(self) -> np.ndarray:
        self._flush()
        return self._gram

    def low_rank(self, augmented: bool = False) -> int | None:
        """The rows the Gram (of [X, 1] with `augmented`) was summed from when they are fewer
        than its size, so that it is best used through a low-rank factor; else None."""
        return self.count if self.count < self.d_in + augmented else None

    @property
    def augmented_gram(self) -> np.ndarray:
        """Gram of [X, 1] per block, (k, d_in + 1, d_in + 1), ones column last (for a bias)."""
        d = self.d_in
        out = np.empty((self.blocks, d + 1, d + 1))
        out[:, :d, :d] = self.gram
        out[:, :d, d] = out[:, d, :d] = self.x_sum
        out[:, d, d] = self.count
        return out

    @property
    def rows(self) -> np.ndarray:
        """The kept rows (k, m, d_in), float32, in calibration order."""
        self._require_rows()
        order = np.argsort(self._index[: self._filled], kind="stable")
        return self._buf[:, order]

    def _require_rows(self) -> None:
        if not self.row_cap:
            raise AttributeError("LayerStats was created with row_cap=0: no rows are kept")
