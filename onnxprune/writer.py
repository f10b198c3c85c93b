"""The write stage: where new tensor values go while a model is pruned, and the atomic save.

A ModelWriter sends each new value into the loaded model's proto, into the data file of the
output being assembled (models with external data: staging.OutputStage), or holds it until the
output is written (one written level of an inline model: the bytes go from the arrays straight
into the file). save_model writes atomically, after the caller's check.
"""
from __future__ import annotations

import os
import signal
import threading
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx

from . import mapped
from .errors import OnnxPruneError, one_line
from .modelio import (PROTOBUF_LIMIT, LoadedModel, has_external, inline_nbytes, little_endian,
                      write_array, write_streamed)
from .parallel import map_in_threads, read_chunk, scratch
from .staging import OutputStage, make_temp_folder


class ModelWriter:
    """New values for the tensors of `loaded.model`.

    With `defer`, new values of inline tensors wait in `pending` ({id: (tensor, array)}) and go
    straight from the arrays into the written file: replacing raw_data in the proto first would
    leave the old bytes in protobuf's arena, which frees nothing until the model goes."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.stage: OutputStage | None = None  # the output being assembled, if any
        self.defer = False
        self.pending: dict = {}

    def stage_output(self, output) -> None:
        """Write external tensors straight into the data file of `output` from now on (models
        with external data; None: back to writing them into the proto)."""
        if self.stage is not None:
            self.stage.close()
        self.stage = (OutputStage(self.loaded.model, output)
                      if output and self.loaded.external_data else None)

    def streams(self, tensor: onnx.TensorProto) -> bool:
        """Whether the tensor's new value can go straight into the staged output's data file."""
        return self.stage is not None and self.stage.covers(tensor)

    def rewrite(self, tensor: onnx.TensorProto, values: np.ndarray, fn, chunk_size: int) -> list:
        """Replace a streamed tensor's values chunk by chunk, never holding it whole:
        fn(chunk, start, out) returns (the new flat chunk, *info) for the chunk of `values` (the
        input's, usually a memory map: not what an earlier level of a trail wrote) at flat index
        `start` (`out`: a buffer it may write it into); each new chunk is written at its place.
        Returns every chunk's info, in order."""
        flat = values.reshape(-1)

        def one(start):
            n = min(chunk_size, flat.size - start)
            chunk = read_chunk(flat, start, start + n, "in")
            new, *info = fn(chunk, start, scratch("out", n, flat.dtype))
            new = np.ascontiguousarray(new, dtype=flat.dtype)
            self.stage.write_part(tensor, start * flat.dtype.itemsize, memoryview(new.view(np.uint8)))
            return info

        infos = map_in_threads(one, range(0, flat.size, chunk_size))
        self.stage.written(tensor)
        return infos

    def write_array(self, tensor: onnx.TensorProto, array: np.ndarray) -> None:
        """Replace a tensor's values: at its place in the staged output's data file when there is
        one, else in the proto (modelio.write_array), or later (`defer`)."""
        if not self.streams(tensor):
            if self.defer:
                self.pending[id(tensor)] = (tensor, little_endian(tensor, array))
            else:
                write_array(tensor, array)
            return
        source = {e.key: e.value for e in tensor.external_data}
        self.stage.write(tensor, memoryview(little_endian(tensor, array).reshape(-1).view(np.uint8)))
        # the tensor just written may still be read by the caller; the pages of the others go
        mapped.drop_resident_pages(keep=(source["location"], int(source.get("offset", 0))))

    def flush_pending(self) -> None:
        """Put the deferred values into the proto (after the file was written)."""
        while self.pending:
            _, (tensor, array) = self.pending.popitem()
            write_array(tensor, array)


def output_files(path, external_data: bool) -> list[Path]:
    """The model file, then its data file when tensors are stored externally."""
    path = Path(path)
    return [path] + ([path.with_name(path.name + ".data")] if external_data else [])


def check_targets(targets: list[Path], force: bool, protect=()) -> None:
    protected = {Path(p).resolve() for p in protect}
    for target in targets:
        try:
            target.resolve()
            target.is_dir()
        except (RuntimeError, OSError) as e:  # a link loop, a name too long
            raise OnnxPruneError(f"{target}: not a usable output path "
                                 f"({getattr(e, 'strerror', None) or 'a symbolic link loop'})") from None
        folder = target.parent if str(target.parent) else Path(".")
        if not folder.is_dir():
            raise OnnxPruneError(f"{folder}: output folder does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OnnxPruneError(f"{folder}: output folder is not writable")
        if target.resolve() in protected:
            raise OnnxPruneError(f"{target}: refusing to overwrite the input model or its data")
        if target.is_dir():
            raise OnnxPruneError(f"{target}: is a directory")
        exists = os.path.lexists(target)  # a dangling link exists too: not replaced without force
        if exists and not (target.is_file() or target.is_symlink()):  # /dev/null, a FIFO
            raise OnnxPruneError(f"{target}: not a regular file; the output must be a file path")
        if exists and not force:
            raise OnnxPruneError(f"{target}: already exists (--force, force=True in the API, "
                                 "overwrites it)")


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool = False,
               force: bool = False, protect: tuple[Path, ...] = (), check=None,
               stage=None, replacements: dict | None = None) -> list[Path]:
    """Write atomically: into a temporary folder beside the target, then renamed into place.

    With external data (a model with external tensors, external_data=True, or over 2 GB),
    tensors go to `<name>.data` next to the model: external tensors at their offsets (through
    `stage`, the staging.OutputStage that pruned tensors were already written to, or a new one),
    inline tensors of 1 KiB or more after them. `check(path)` runs on the finished temporary copy
    before anything is moved into place: if it raises, no output appears. Returns the files
    written. `protect` lists paths never to overwrite, even with force (the input and its data).
    After the move, the model's external tensors refer to the written data file.
    """
    path = Path(path)
    external_data = (external_data or stage is not None or has_external(model)
                     or inline_nbytes(model) > PROTOBUF_LIMIT - (64 << 20))
    targets = output_files(path, external_data)
    check_targets(targets, force, protect)
    parent = path.parent if str(path.parent) else Path(".")
    if external_data and stage is None:
        stage = OutputStage(model, path)
    tmp = stage.tmp if stage is not None else make_temp_folder(parent)
    try:
        if stage is not None:
            stage.finish(model, tmp / path.name)
        else:
            write_streamed(model, tmp / path.name, replacements)
        stale = []  # every tensor went inline (stored sparse): no empty data file, and no old one
        if len(targets) > 1 and (tmp / targets[1].name).stat().st_size == 0:
            targets, stale = targets[:1], [t for t in targets[1:] if os.path.lexists(t)]
        if check is not None:
            check(tmp / path.name)
        with _signals_deferred():  # Ctrl-C between the renames would leave a mismatched pair
            for target in reversed(targets):  # the model file appears last
                os.replace(tmp / target.name, target)
            for old in stale:  # (force: check_targets refused it otherwise)
                os.unlink(old)
        if stage is not None:
            stage.settle(model, targets[-1])
    except OSError as e:
        raise OnnxPruneError(f"{path}: cannot write output ({e.strerror})") from None
    finally:
        if stage is not None:
            stage.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return targets


@contextmanager
def _signals_deferred():
    """SIGINT / SIGTERM held until the block ends, then raised: what it does is all or none.
    (Python runs handlers in the main thread only, which is also the only one they interrupt.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in pending:
            signal.raise_signal(s)  # to the handler that was there before


def check_by_path(candidate: Path, reference=None) -> str | None:
    """The ONNX checker on a written model, by path (the only way it takes models over 2 GB).

    Raises OnnxPruneError when the candidate fails and the reference (the input: a path or
    bytes) passes; returns a note when both fail, else None."""
    try:
        onnx.checker.check_model(str(candidate))
        return None
    except Exception as e:  # ValidationError, or errors of the C++ loader
        problem = one_line(e)
    try:
        if reference is not None:
            onnx.checker.check_model(reference if isinstance(reference, bytes) else str(reference))
    except Exception:
        return f"the ONNX checker rejects the input model too: {problem}"
    raise OnnxPruneError(f"the pruned model fails the ONNX checker: {problem}")
