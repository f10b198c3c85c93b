"""Tensors read from external data files without loading them.

A MappedTensor is a read-only np.memmap, so every numpy operation works on it. Two things differ
from a plain memmap, both for memory: 1-D contiguous slices (what chunked passes over weights
take) are read with pread into ordinary arrays instead of through the mapping, and the pages a
whole-tensor operation touched can be dropped (`drop_resident_pages`). Mapped file pages count
in RSS until they are unmapped, so without this one pass over every tensor of a model would
leave the whole model resident.
"""
from __future__ import annotations

import mmap
import weakref

import numpy as np

_live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> MappedTensor alive


class MappedTensor(np.memmap):
    def __new__(cls, path, dtype, shape, offset: int):
        self = super().__new__(cls, str(path), dtype=dtype, mode="r", offset=offset, shape=tuple(shape))
        self._origin = self.ctypes.data  # address of the byte at `offset` (views move from it)
        _live[id(self)] = self
        return self

    def __array_finalize__(self, obj):
        super().__array_finalize__(obj)
        self._origin = getattr(obj, "_origin", None) if self._mmap is not None else None

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        # like np.memmap: results of operations are plain arrays, not maps
        arr = np.ndarray.__array_wrap__(self, arr, context, return_scalar)
        if arr is self or not isinstance(arr, np.ndarray):
            return arr
        return arr[()] if return_scalar else arr.view(np.ndarray)

    def read_into(self, start: int, out: np.ndarray) -> np.ndarray:
        """Elements [start, start + out.size) of this 1-D contiguous map, read into `out` (a
        caller's reusable buffer: no fresh pages, no mapping)."""
        if self.ndim != 1 or self._origin is None or not self.flags.c_contiguous:
            out[...] = self[start:start + out.size]
            return out
        return read_into(self.filename, self._position(start), out)

    def _position(self, start: int) -> int:
        """File offset of element `start` of this (1-D, contiguous) map or view of it."""
        return self.offset + (self.ctypes.data - self._origin) + start * self.itemsize

    def __getitem__(self, key):
        if (self.ndim == 1 and isinstance(key, slice) and key.step in (None, 1)
                and self._origin is not None and self.flags.c_contiguous):
            start, stop, _ = key.indices(self.shape[0])
            return read_array(self.filename, self._position(start), self.dtype, max(stop - start, 0))
        result = super().__getitem__(key)
        if isinstance(result, MappedTensor) and result._mmap is None:
            return result.view(np.ndarray)
        return result


def open_tensor(path, offset: int, dtype, shape) -> np.ndarray:
    """The tensor stored at `offset` of `path` (little-endian), mapped read-only."""
    dtype = np.dtype(dtype).newbyteorder("<")
    if int(np.prod(shape, dtype=np.int64)) == 0:
        empty = np.empty(tuple(shape), dtype)
        empty.flags.writeable = False
        return empty
    return MappedTensor(path, dtype, shape, offset)


def read_array(path, offset: int, dtype, count: int) -> np.ndarray:
    """`count` elements at byte `offset` of a file, read into a new array (no mapping)."""
    return read_into(path, offset, np.empty(count, dtype))


def read_into(path, offset: int, out: np.ndarray) -> np.ndarray:
    """Fill the contiguous array `out` from byte `offset` of a file; returns `out`."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < view.nbytes:  # a single read returns at most ~2 GB on Linux
            n = f.readinto(view[done:])
            if not n:
                raise EOFError(f"{path}: {view.nbytes - done} bytes missing at offset {offset + done}")
            done += n
    return out


def drop_resident_pages(keep: tuple[str, int] | None = None) -> None:
    """Unmap the resident pages of every MappedTensor but the one at `keep` (file, offset);
    they are read again from the page cache if touched. Tensors stay mapped for the whole run
    and a trail reads each once per level: this keeps RSS at the tensor in use, not at all
    tensors ever read."""
    advice = getattr(mmap, "MADV_DONTNEED", None)  # POSIX only
    for tensor in list(_live.values()) if advice is not None else []:
        if tensor._mmap is None or (str(tensor.filename), tensor.offset) == keep:
            continue
        try:
            tensor._mmap.madvise(advice)
        except (ValueError, OSError):  # closed meanwhile, or madvise unsupported here
            pass
