"""The data file of an output model, written tensor by tensor.

An output of a model with external data is assembled in a temporary folder beside it (save_model
then renames it into place). Its data file is laid out when the stage opens: every external
tensor gets an offset (64-byte aligned, so the output can be memory-mapped). A pruned tensor is
written at its offset as soon as it is computed; at save time the tensors nobody wrote are copied
from the input by the kernel (copy_file_range), never loaded. Dense zeros keep the layout, so
nothing has to move; when tensors left the data file (stored sparse) it is compacted.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path

import onnx

from .errors import OnnxPruneError
from .modelio import external_ref, iter_tensors, make_inline, point, refer_to, write_streamed
from .wire import write_all

ALIGN = 64
INLINE_LIMIT = 1024  # inline tensors of this many bytes or more move to the data file
COPY_CHUNK = 64 << 20  # buffer of the read/write fallback when copy_file_range cannot be used


def make_temp_folder(parent: Path) -> Path:
    if not parent.is_dir():
        raise OnnxPruneError(f"{parent}: output folder does not exist")
    try:
        return Path(tempfile.mkdtemp(prefix=".onnxprune-", dir=parent))
    except OSError as e:
        raise OnnxPruneError(f"{parent}: cannot write output ({e.strerror})") from None


class OutputStage:
    """The output `path` of `model` (whose external tensors carry absolute locations) being
    assembled in a temporary folder; removed with this object unless save_model moved it."""

    def __init__(self, model: onnx.ModelProto, path: str | os.PathLike):
        path = self.path = Path(path)
        self.owner = model
        self.tmp = make_temp_folder(path.parent if str(path.parent) else Path(".")).resolve()
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.tmp, True)
        self.closed = False
        self._fd = self._close_fd = None  # the data file, opened on the first write
        self.data = self.tmp / (path.name + ".data")
        self.slots: dict[tuple[str, int], int] = {}  # (source file, offset) -> offset here
        self.lengths: dict[int, int] = {}
        self.origin: dict[int, tuple[str, int]] = {}  # offset here -> source, once written
        self.placed: dict[tuple[str, int], int] = {}  # after finish: current ref -> final offset
        self.end = 0
        for tensor in iter_tensors(model, sparse=False):
            ref = external_ref(tensor)
            if ref is not None:
                self._slot(ref)
        try:
            with open(self.data, "wb") as f:
                f.truncate(self.end)  # a sparse file: only what is written takes disk space
        except OSError as e:
            raise OnnxPruneError(f"{path}: cannot write output ({e.strerror})") from None

    def _slot(self, ref: tuple[str, int, int]) -> int:
        if ref[0] == str(self.data):
            return ref[1]
        if ref[:2] not in self.slots:
            start = -(-self.end // ALIGN) * ALIGN
            self.slots[ref[:2]], self.lengths[start], self.end = start, ref[2], start + ref[2]
        return self.slots[ref[:2]]

    def covers(self, tensor: onnx.TensorProto) -> bool:
        ref = external_ref(tensor)
        return not self.closed and ref is not None and (ref[0] == str(self.data) or ref[:2] in self.slots)

    def write(self, tensor: onnx.TensorProto, raw: memoryview) -> None:
        """Write a covered tensor's new bytes at its offset; the tensor then refers to them."""
        if raw.nbytes != external_ref(tensor)[2]:
            raise ValueError(f"tensor '{tensor.name}': {raw.nbytes} bytes for a "
                             f"{external_ref(tensor)[2]}-byte slot")
        self.write_part(tensor, 0, raw)
        self.written(tensor)

    def write_part(self, tensor: onnx.TensorProto, start: int, raw: memoryview) -> None:
        """Write bytes of a covered tensor's new value at `start` bytes into its slot (safe from
        several threads; call `written` once every byte of it is written)."""
        length = external_ref(tensor)[2]
        if start + raw.nbytes > length:
            raise ValueError(f"tensor '{tensor.name}': bytes {start}-{start + raw.nbytes} "
                             f"outside its {length}-byte slot")
        dst = self._target(tensor)
        try:
            if self._fd is None:
                self._fd = os.open(self.data, os.O_RDWR)
                self._close_fd = weakref.finalize(self, os.close, self._fd)
            write_all(self._fd, raw, dst + start)
        except OSError as e:  # a full disk, most likely
            raise OnnxPruneError(f"{self.path}: cannot write output ({e.strerror})") from None

    def written(self, tensor: onnx.TensorProto) -> None:
        """The tensor's new value is complete in the staged file: it refers to it from now on."""
        location, offset, length = external_ref(tensor)
        dst = self._target(tensor)
        self.origin.setdefault(dst, (location, offset))
        point(tensor, str(self.data), dst, length)

    def _target(self, tensor: onnx.TensorProto) -> int:
        """Offset of a covered tensor's slot in the staged data file."""
        location, offset, _ = external_ref(tensor)
        return offset if location == str(self.data) else self.slots[(location, offset)]

    def finish(self, model: onnx.ModelProto, model_path: Path) -> None:
        """Complete the data file for `model` (the owner, or a copy of it with fewer external
        tensors) and write the model file beside it; `model` is left as it was."""
        if self._close_fd is not None:  # the data file may be replaced below
            self._close_fd()
            self._fd = self._close_fd = None
        refs, moved = [], []
        for tensor in iter_tensors(model, sparse=False):
            ref = external_ref(tensor)
            if ref is not None:
                refs.append((tensor, ref))
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= INLINE_LIMIT:
                moved.append(tensor)
        here = [(t, r, self._slot(r)) for t, r in refs]
        sources = {dst: ((str(self.data), dst) if dst in self.origin else ref[:2])
                   for _, ref, dst in here}  # where each referenced slot's bytes are now
        if set(sources) == set(self.lengths):  # every slot still referenced: fill the holes
            final = {dst: dst for dst in sources}
            for dst, (file, offset) in sources.items():
                if dst not in self.origin:
                    _copy_range(file, offset, self.data, dst, self.lengths[dst])
            end = self.end
        else:  # tensors left the data file (stored sparse): copy the others to a new one
            final, end = {}, 0
            compact = self.data.with_name(self.data.name + ".compact")
            compact.touch()
            for dst in sorted(sources):
                end = -(-end // ALIGN) * ALIGN
                _copy_range(*sources[dst], compact, end, self.lengths[dst])
                final[dst], end = end, end + self.lengths[dst]
            os.replace(compact, self.data)
        self.placed = {r[:2]: final[dst] for _, r, dst in here}
        saved = [(t, [(e.key, e.value) for e in t.external_data]) for t, _ in refs]
        kept = [(t, t.raw_data) for t in moved]
        try:
            with open(self.data, "r+b") as f:
                for tensor, raw in kept:
                    end = -(-end // ALIGN) * ALIGN
                    write_all(f.fileno(), raw, end)
                    point(tensor, self.data.name, end, len(raw))
                    end += len(raw)
            for tensor, ref, dst in here:
                point(tensor, self.data.name, final[dst], ref[2])
            write_streamed(model, model_path)
        finally:
            for tensor, entries in saved:
                refer_to(tensor, entries)
            for tensor, raw in kept:
                make_inline(tensor, raw)

    def settle(self, model: onnx.ModelProto, data_path: Path) -> None:
        """After the rename: `model`'s external tensors refer to the final data file. The owner's
        tensors written here but not saved with it go back to their sources."""
        location = str(Path(data_path).resolve())
        for tensor in iter_tensors(model, sparse=False):
            ref = external_ref(tensor)
            if ref is not None and ref[:2] in self.placed:
                point(tensor, location, self.placed[ref[:2]], ref[2])
        if model is not self.owner:
            for tensor in iter_tensors(self.owner, sparse=False):
                ref = external_ref(tensor)
                if ref is not None and ref[0] == str(self.data):
                    point(tensor, *self.origin[ref[1]], ref[2])

    def close(self) -> None:
        self.closed = True
        if self._close_fd is not None:
            self._close_fd()
        self._cleanup()


def _copy_range(src: str | Path, src_offset: int, dst: Path, dst_offset: int, length: int) -> None:
    """Copy bytes between files inside the kernel (copy_file_range: no user-space buffer,
    Linux) or through a bounded buffer."""
    kernel_copy = getattr(os, "copy_file_range", None)
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        while length > 0:
            try:
                if kernel_copy is None:
                    raise OSError
                n = kernel_copy(fin.fileno(), fout.fileno(), length, src_offset, dst_offset)
            except OSError:  # other systems, old kernels, file systems without it
                fin.seek(src_offset)
                chunk = fin.read(min(length, COPY_CHUNK))
                fout.seek(dst_offset)
                n = fout.write(chunk)
            if n <= 0:
                raise OnnxPruneError(f"{src}: external data ends before offset {src_offset + length}")
            src_offset, dst_offset, length = src_offset + n, dst_offset + n, length - n
