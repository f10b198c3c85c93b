"""A map over a few threads, for chunked passes over large arrays: numpy releases the GIL on
large element-wise operations, and so does file I/O, so chunks overlap on several cores."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def map_in_threads(fn, items, min_items: int = 4) -> list:
    """[fn(x) for x in items], run on up to 4 threads; results in order."""
    items = list(items)
    threads = min(4, os.cpu_count() or 1)
    if threads == 1 or len(items) < min_items:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


_local = threading.local()
SCRATCH_LIMIT = 1 << 20  # elements


def scratch(name: str, n: int, dtype) -> np.ndarray:
    """A reusable buffer of this thread: `n` elements of `dtype`, kept under `name`. Chunked
    passes take their temporaries here instead of fresh memory for every chunk (the page faults
    of fresh buffers cost as much as the arithmetic). Large requests get fresh memory: a
    whole-tensor buffer must not stay alive with the thread."""
    if n > SCRATCH_LIMIT:
        return np.empty(n, dtype)
    buffers = _local.__dict__.setdefault("buffers", {})
    dtype = np.dtype(dtype)
    buf = buffers.get((name, dtype))
    if buf is None or buf.size < n:
        buf = buffers[(name, dtype)] = np.empty(n, dtype)
    return buf[:n]


def read_chunk(flat: np.ndarray, start: int, stop: int, name: str = "chunk") -> np.ndarray:
    """Elements [start, stop) of a flat array: a view when it is in memory; read into this
    thread's reusable buffer `name` when the array can (`read_into`: onnxprune.mapped maps)."""
    read = getattr(flat, "read_into", None)
    if read is None:
        return flat[start:stop]
    return read(start, scratch(name, stop - start, flat.dtype))
