"""Sample data for evaluation and calibration: reading, checking against a model, batching.

A data set is a dict ``{input_name: array}`` whose first axis is the sample axis, plus optional
integer class labels under ``"labels"``. On disk it is one ``.npz`` keyed by input name, or a
directory / glob of files: ``<input_name>.npy`` files (memory-mapped) and/or ``.npz`` files each
holding a slice of the samples, concatenated along axis 0 in sorted filename order.

An input the model declares as a scalar (rank 0) takes one value of shape (), fed with every
batch and not counted as samples.
"""

from __future__ import annotations

import glob
import math
import os
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from onnxprune.budget import describe
from onnxprune.errors import OnnxPruneError, one_line

try:
    import lzma  # zipfile reads LZMA members only where Python was built with it
except ImportError:
    lzma = None

LABELS_KEY = "labels"

# (input name, numpy element dtype, shape with None/str for symbolic dimensions)
ModelInput = tuple[str, np.dtype, Sequence[int | str | None] | None]  # shape None: any rank


def load_samples(
    path_or_glob: str | os.PathLike, names: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    """Read a data set from an .npz/.npy file, a directory of them, or a glob pattern.

    ``names``: the arrays to read (``labels`` too, when the data has them); None reads all.
    The other members of an .npz are never decompressed, so one the model does not use costs
    no memory however large it unpacks.
    """
    files = _data_files(str(path_or_glob))
    names = None if names is None else list(names)  # an iterator would be used up below
    wanted = None if names is None else {*names, LABELS_KEY}
    npy = [f for f in files if f.suffix == ".npy"]
    npz = [f for f in files if f.suffix == ".npz"]

    samples: dict[str, np.ndarray] = {}
    stems: set[str] = set()
    for f in npy:
        if f.stem in stems:
            raise OnnxPruneError(f"two .npy files are named {f.name}; input names must be unique")
        stems.add(f.stem)
        if wanted is None or f.stem in wanted:
            # Memory-mapped so a large data set is read batch by batch, not all at once.
            samples[f.stem] = _load_npy(f)

    for key, arr in _concatenate_npz_slices(npz, wanted).items():
        if key in samples:
            raise OnnxPruneError(f"array '{key}' is given both as {key}.npy and inside .npz files")
        samples[key] = arr
    missing = sorted(set(names or ()) - set(samples))
    if missing:  # named here, with what the data does hold (those arrays were not read)
        held = stems | {key for f in npz for key in _member_names(f)}
        raise MissingArrays(missing, held)
    return samples


class MissingArrays(OnnxPruneError):
    """Data without arrays a model takes; `missing` names them (eval says which model's)."""

    def __init__(self, missing: list[str], found):
        super().__init__(f"data has no array for model input(s) {', '.join(map(repr, missing))} "
                         f"(arrays found: {', '.join(sorted(found)) or 'none'})")
        self.missing = missing


def _member_names(path: Path) -> list[str]:
    with _open_npz(path) as z:
        return list(_npz_members(z))


def check_against_model(
    samples: Mapping[str, object], inputs: Sequence[ModelInput]
) -> dict[str, np.ndarray]:
    """Validate samples against the model's inputs; return them as arrays cast to the input dtypes.

    Values may be anything numpy reads as an array (lists too). Keys that are neither a model
    input nor ``labels`` are dropped. Axis 0 is the sample axis and is never compared with the
    model's (possibly fixed) batch dimension.
    """
    missing = [name for name, _, _ in inputs if name not in samples]
    if missing:
        raise MissingArrays(missing, samples)

    checked: dict[str, np.ndarray] = {}
    for name, dtype, shape in inputs:
        arr = _as_array(name, samples[name])
        _check_shape(name, arr.shape, shape)
        checked[name] = _cast_to_input_dtype(name, arr, np.dtype(dtype))
        _check_finite(name, checked[name], arr.dtype)

    if LABELS_KEY in samples:
        checked[LABELS_KEY] = _check_labels(_as_array(LABELS_KEY, samples[LABELS_KEY]))

    counts = {key: len(arr) for key, arr in checked.items() if arr.ndim}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{key}: {n}" for key, n in counts.items())
        raise OnnxPruneError(f"arrays disagree on the number of samples ({listed})")
    return checked


def fixed_batch(inputs: Sequence[ModelInput]) -> int | None:
    """The batch size the model fixes on axis 0 of its inputs, or None when it is free.

    Scalar inputs have no batch axis; inputs that fix different sizes fix none that fits all.
    """
    fixed = {int(shape[0]) for _, _, shape in inputs
             if shape and isinstance(shape[0], (int, np.integer)) and shape[0] > 0}
    return fixed.pop() if len(fixed) == 1 else None


def check_count(name: str, value, lowest: int = 1) -> None:
    """A whole-number setting given to the library (True is not a count)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lowest:
        raise OnnxPruneError(f"{name} must be a whole number of at least {lowest}, got {value!r}")


def batch_rows(batch: Mapping[str, np.ndarray]) -> int:
    """Samples in a batch (scalar inputs, fed whole, do not count)."""
    return next((len(v) for v in batch.values() if np.ndim(v)), 0)


def num_samples(samples: Mapping[str, np.ndarray]) -> int:
    """Number of samples (length of axis 0, which check_against_model made equal for all)."""
    return batch_rows(samples)


def iter_batches(
    samples: Mapping[str, np.ndarray], batch_size: int, limit: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{input_name: array}`` batches of up to ``batch_size`` samples, labels excluded.

    ``limit`` caps the total number of samples. Slices of memory-mapped arrays are read into
    memory here, one batch at a time. Scalar inputs go whole into every batch, after the
    per-sample arrays (so the first value of a batch has its rows).
    """
    check_count("batch size", batch_size)
    if limit is not None and limit < 0:
        raise OnnxPruneError(f"sample limit must not be negative, got {limit}")
    per_sample = {k: v for k, v in samples.items() if k != LABELS_KEY and np.ndim(v)}
    scalars = {k: v for k, v in samples.items() if k != LABELS_KEY and not np.ndim(v)}
    total = num_samples(per_sample)
    if limit is not None:
        total = min(total, limit)
    for start in range(0, total, batch_size):
        stop = min(start + batch_size, total)
        yield {**{k: np.ascontiguousarray(v[start:stop]) for k, v in per_sample.items()}, **scalars}


def _data_files(spec: str) -> list[Path]:
    path = Path(spec)
    if path.is_file():
        if path.suffix not in (".npz", ".npy"):
            raise OnnxPruneError(f"{spec}: data files must be .npz or .npy")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy") and p.is_file())
        if not files:
            raise OnnxPruneError(f"{spec}: directory holds no .npz or .npy files")
        return files
    matches = sorted(Path(p) for p in glob.glob(spec))
    files = [p for p in matches if p.suffix in (".npz", ".npy") and p.is_file()]
    if not files:
        raise OnnxPruneError(f"{spec}: no such file, directory, or matching .npz/.npy files")
    return files


def _load_npy(path: Path) -> np.ndarray:
    with _reading(str(path)):
        with open(path, "rb") as fp:
            shape, dtype, offset = _npy_header(fp, str(path))
        if path.stat().st_size < offset + _nbytes(shape, dtype):
            raise OnnxPruneError(f"{path}: truncated, or not a valid .npy file (its header "
                                 f"declares {_array_text(shape, dtype)}, more than the file holds)")
        # No memory check: a memory-mapped array takes RAM only for the pages read.
        return np.load(path, mmap_mode="r", allow_pickle=False)


def _concatenate_npz_slices(files: list[Path], wanted: set[str] | None) -> dict[str, np.ndarray]:
    if not files:
        return {}
    with ExitStack() as stack:
        zips = [stack.enter_context(_open_npz(f)) for f in files]
        # Listed from the zip directories, before any member is decompressed.
        members = [_npz_members(z) for z in zips]
        keys = set(members[0])
        for f, part in zip(files[1:], members[1:]):
            if set(part) != keys:
                raise OnnxPruneError(
                    f"{f} holds arrays {sorted(part)} but {files[0]} holds {sorted(keys)}"
                )
        keys = sorted(k for k in keys if wanted is None or k in wanted)
        slices = [{k: _read_member(f, z, part[k]) for k in keys}
                  for f, z, part in zip(files, zips, members)]
    if len(slices) == 1:
        return slices[0]
    out = {}
    for key in keys:
        try:
            out[key] = np.concatenate([part[key] for part in slices], axis=0)
        except ValueError:
            shapes = ", ".join(str(part[key].shape) for part in slices)
            raise OnnxPruneError(f"array '{key}' has incompatible shapes across files: {shapes}")
    return out


@contextmanager
def _open_npz(path: Path) -> Iterator[zipfile.ZipFile]:
    with _reading(str(path)):
        with open(path, "rb") as head:
            if head.read(2) != b"PK":  # a zip; else np.load talks of pickles
                raise OnnxPruneError(
                    f"{path}: not an .npz file (a zip of .npy arrays, as np.savez writes)")
        try:
            z = zipfile.ZipFile(path)
        except zipfile.BadZipFile as exc:  # its directory, at the end, is missing or damaged
            raise OnnxPruneError(f"{path}: not a valid .npz file: the zip is damaged or "
                                 f"truncated ({one_line(exc)})") from None
    with z:
        yield z


def _npz_members(z: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """{array name: member}, named as np.load names them (without the .npy suffix)."""
    return {(m.filename[:-4] if m.filename.endswith(".npy") else m.filename): m
            for m in z.infolist() if not m.is_dir()}


def _read_member(path: Path, z: zipfile.ZipFile, member: zipfile.ZipInfo) -> np.ndarray:
    """One array of an .npz. Its header is read first, so a member that declares more data than
    it holds, or than there is memory for, is refused before anything is allocated."""
    where = f"{path}: member '{member.filename}'"
    if member.flag_bits & 0x1:  # zipfile asks for a password (RuntimeError)
        raise OnnxPruneError(f"{where} is encrypted; onnxprune reads unencrypted .npz files "
                             "(as np.savez writes them)")
    with _reading(where):
        with z.open(member) as fp:
            shape, dtype, offset = _npy_header(fp, where)
        nbytes = _nbytes(shape, dtype)
        if member.file_size < offset + nbytes:
            raise OnnxPruneError(f"{where}: truncated, or not a valid .npy array (its header "
                                 f"declares {_array_text(shape, dtype)}, more than the member "
                                 "holds)")
        available = _available_memory()
        if available is not None and nbytes > available:
            raise OnnxPruneError(f"{where}: its header declares {_array_text(shape, dtype)}, "
                                 f"more than the {describe(available)} of memory available")
        with z.open(member) as fp:
            return np.lib.format.read_array(fp, allow_pickle=False)


def _npy_header(fp, where: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) from a .npy header, refusing arrays np.load would
    unpickle and shapes no array can have."""
    major, minor = np.lib.format.read_magic(fp)
    if (major, minor) == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
    elif (major, minor) == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    else:  # 3.0 only adds utf-8 field names of structured dtypes, which are no model input
        raise OnnxPruneError(f"{where}: .npy format version {major}.{minor} is not supported "
                             "(np.save writes 1.0 or 2.0)")
    if dtype.hasobject:
        # np.load would unpickle them
        raise OnnxPruneError(f"{where}: cannot read (object arrays are not supported)")
    if any(d < 0 for d in shape):
        raise OnnxPruneError(f"{where}: not a valid .npy array (its header declares shape {shape})")
    return shape, dtype, fp.tell()


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * dtype.itemsize  # Python ints: a hostile shape cannot overflow


def _array_text(shape: tuple[int, ...], dtype: np.dtype) -> str:
    return f"a {shape} {dtype} array of {describe(_nbytes(shape, dtype))}"


def _available_memory() -> int | None:
    """Bytes of memory that can be allocated without swapping, or None where unknown."""
    try:
        import psutil  # not a dependency: where it is missing the OS is asked directly
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:  # Linux: MemAvailable counts the page cache the kernel would give up
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# What a damaged or hostile file raises while being read: BadZipFile (a bad CRC or member
# header), zlib.error / EOFError / LZMAError (a damaged compressed stream), NotImplementedError
# (an unknown compression method), RuntimeError (a password needed), ValueError (a bad .npy
# header, too little data).
_READ_ERRORS = (OSError, ValueError, EOFError, RuntimeError, NotImplementedError,
                zipfile.BadZipFile, zlib.error) + ((lzma.LZMAError,) if lzma else ())


@contextmanager
def _reading(where: str) -> Iterator[None]:
    """One OnnxPruneError line for whatever reading `where` raises."""
    try:
        yield
    except OnnxPruneError:  # InfeasibleError is a ValueError too
        raise
    except MemoryError:
        raise OnnxPruneError(f"{where}: not enough memory to read it") from None
    except _READ_ERRORS as exc:
        # the first line: numpy's refusal of a long header adds two lines of advice
        first = str(exc).strip().splitlines()
        reason = one_line(Exception(first[0])) if first else type(exc).__name__
        raise OnnxPruneError(f"{where}: cannot read ({reason})") from None


def _as_array(name: str, value) -> np.ndarray:
    """numpy arrays (memory-mapped ones stay mapped) from whatever numpy reads as one."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:
        reason = one_line(exc)
        raise OnnxPruneError(f"'{name}': cannot be read as an array ({reason})") from None
    if arr.dtype == object:
        raise OnnxPruneError(f"'{name}': cannot be read as an array of numbers (it holds "
                             f"{type(arr.flat[0]).__name__ if arr.size else 'nothing'})")
    return arr


def _check_shape(name: str, actual: tuple[int, ...], expected: Sequence | None) -> None:
    if expected is None:  # the model declares no shape: any rank
        return
    if not len(expected) and len(actual):
        raise OnnxPruneError(
            f"input '{name}' is a scalar (rank 0): give one value of shape (), fed with every "
            f"batch; the data has shape {actual}"
        )
    if len(actual) != len(expected):
        raise OnnxPruneError(
            f"input '{name}': data has shape {actual} (rank {len(actual)}) but the model expects "
            f"rank {len(expected)} {_shape_text(expected)}, with samples on axis 0"
        )
    for axis in range(1, len(expected)):
        dim = expected[axis]
        if isinstance(dim, (int, np.integer)) and dim != actual[axis]:
            raise OnnxPruneError(
                f"input '{name}': data has shape {actual} but the model expects "
                f"{_shape_text(expected)} (axis {axis} must be {dim})"
            )


def _shape_text(shape: Sequence) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _cast_to_input_dtype(name: str, arr: np.ndarray, want: np.dtype) -> np.ndarray:
    have = arr.dtype
    if have == want:
        return arr
    if is_float(want) and is_float(have):
        with np.errstate(over="ignore"):  # overflow to inf: _check_finite says so
            return arr.astype(want)
    if _is_int(want) and _is_int(have):
        if arr.size and not _fits(arr, want):
            raise OnnxPruneError(
                f"input '{name}': values range {arr.min()}..{arr.max()} does not fit the model's "
                f"{want}"
            )
        return arr.astype(want)
    raise OnnxPruneError(f"input '{name}': data is {have} but the model expects {want}")


def _check_finite(name: str, arr: np.ndarray, given: np.dtype) -> None:
    """NaN statistics would fail deep inside a solver, far from their cause."""
    if not is_float(arr.dtype):
        return
    bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
    if bad:
        cast = f" (after the cast from {given} to {arr.dtype})" if given != arr.dtype else ""
        raise OnnxPruneError(f"input '{name}': data holds {bad} NaN or infinite values{cast}")


def _check_labels(labels: np.ndarray) -> np.ndarray:
    if labels.ndim != 1 or not _is_int(labels.dtype):
        raise OnnxPruneError(
            f"'{LABELS_KEY}' must be a 1-D integer array, "
            f"got {labels.dtype} of shape {labels.shape}"
        )
    return np.asarray(labels, dtype=np.int64)


def random_array(dtype, shape, rng: np.random.Generator) -> np.ndarray:
    """Stand-in data for an input: floats standard normal, integers and booleans 1 (a valid
    token id, an attention mask that attends)."""
    if is_float(np.dtype(dtype)):
        return rng.standard_normal(shape).astype(dtype)
    return np.ones(shape, dtype=dtype)


def is_float(dtype: np.dtype) -> bool:
    # bfloat16 and the float8 types come from ml_dtypes (what onnx maps them to); numpy does
    # not count them as floating, but they cast and compare like floats
    return np.issubdtype(dtype, np.floating) or (
        dtype.type.__module__.split(".")[0] == "ml_dtypes" and "float" in dtype.name)


def _is_int(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.integer)


def _fits(arr: np.ndarray, dtype: np.dtype) -> bool:
    info = np.iinfo(dtype)
    return info.min <= int(arr.min()) and int(arr.max()) <= info.max
