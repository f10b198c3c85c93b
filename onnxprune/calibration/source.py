"""Calibration data from the user: files, dicts, iterables of batches, or data readers.

Everything becomes one checked `{input name: array}` set (first axis = samples), so several
passes (sequential mode, one pass per sparsity level) see the same samples.

A model whose inputs fix the batch dimension (torch's default export fixes it at 1) is fed
batches of exactly that size. Padding a last, partial batch would weigh its repeated rows twice
in the statistics, and the padded rows cannot be told apart inside the model (its activations
need not keep the batch on axis 0), so the set holds a multiple of that size instead.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .. import data
from ..errors import OnnxPruneError
from ..runtime import ORT_TYPES


@dataclass
class CalibrationSet:
    samples: dict[str, np.ndarray]
    random: bool  # synthetic data, only when the user asked for it
    fixed_batch: int | None = None  # the batch size the model's inputs fix, which batches use
    note: str | None = None  # for the report: samples left out to fit the fixed batch

    @property
    def size(self) -> int:
        return data.num_samples(self.samples)

    def batches(self, batch_size: int):
        """Batches of `batch_size` samples, or of the model's fixed batch size (all full)."""
        return data.iter_batches(self.samples, self.fixed_batch or batch_size)

    def batch_count(self, batch_size: int) -> int:
        """How many batches `batches(batch_size)` yields."""
        return -(-self.size // (self.fixed_batch or batch_size))


def model_inputs(model: onnx.ModelProto) -> list[data.ModelInput]:
    """The real inputs (initializers listed as inputs in old IR versions are not)."""
    constants = {t.name for t in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in constants:
            continue
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise OnnxPruneError(f"input '{value.name}' is not a tensor; calibration needs tensors")
        dims = ([d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                 for d in tensor.shape.dim] if tensor.HasField("shape") else None)  # None: any rank
        inputs.append((value.name, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)), dims))
    return inputs


def load_calibration(source, model: onnx.ModelProto, limit: int | None, seed: int = 0) -> CalibrationSet:
    """source: a path / glob / directory, "random", a mapping of arrays (a dict, np.load's
    NpzFile), an iterable of batch dicts, or an object with get_next() (onnxruntime's
    CalibrationDataReader)."""
    inputs = model_inputs(model)
    _check_feedable(inputs)
    fixed = data.fixed_batch(inputs)
    if isinstance(source, str) and source == "random":
        wanted = limit if limit is not None else max(64, fixed or 0)
        n = _usable(wanted, fixed, "--calib-samples is")
        return CalibrationSet(_random_samples(inputs, n, seed), random=True, fixed_batch=fixed,
                              note=_fixed_batch_note(fixed, n, wanted))
    samples, more = read_samples(source, limit, [name for name, _, _ in inputs])
    samples.pop(data.LABELS_KEY, None)
    samples = data.check_against_model(samples, inputs)
    n = data.num_samples(samples)
    if n == 0:
        raise OnnxPruneError("the calibration data holds no samples")
    wanted = n if limit is None else min(n, limit)
    keep_n = _usable(wanted, fixed, "the calibration data holds" if wanted == n
                     else "--calib-samples is")
    notes = [_fixed_batch_note(fixed, keep_n, wanted)]
    if more:  # a stream cannot be sampled at random without reading all of it
        notes.append(f"calibration read the data's first batches, up to --calib-samples {limit}, "
                     "and left the rest unread: shuffle the stream, or raise --calib-samples")
    note = "; ".join(filter(None, notes)) or None
    if keep_n < n:
        # a seeded random subset, not the first `limit`: data files are often sorted (by class,
        # by source), and a prefix of a sorted file misses whole classes
        keep = np.sort(np.random.default_rng(seed).choice(n, keep_n, replace=False))
        samples = {k: v[keep] if v.ndim else v for k, v in samples.items()}
    return CalibrationSet(samples, random=False, fixed_batch=fixed, note=note)


def read_samples(source, limit: int | None = None, names=None) -> tuple[dict, bool]:
    """{name: array} from a path / glob / directory, a mapping of arrays, an iterable of batch
    dicts or an object with get_next() (a stream is read up to `limit` samples); and whether a
    stream held more than was read. `names`: the arrays wanted from files (others are not read)."""
    if isinstance(source, (str, os.PathLike)):
        return data.load_samples(source, names), False
    if isinstance(source, Mapping):
        return dict(source), False
    if hasattr(source, "get_next"):
        return _concatenate(iter(source.get_next, None), limit)
    if isinstance(source, (bytes, np.ndarray)) or not hasattr(source, "__iter__"):
        raise OnnxPruneError(f"data of type {type(source).__name__} is not supported (a path, a "
                             "dict of arrays, an iterable of dicts, or an object with get_next())")
    return _concatenate(iter(source), limit)


def _fixed_batch_note(fixed: int | None, used: int, wanted: int) -> str | None:
    if not fixed or used == wanted:
        return None
    return (f"the model's batch dimension is fixed at {fixed}: calibration used {used} of the "
            f"{wanted} samples (a multiple of {fixed}, chosen at random by the seed)")


def _usable(n: int, fixed: int | None, what: str) -> int:
    """The samples to use out of n: all, or a multiple of the model's fixed batch size."""
    if not fixed:
        return n
    if n < fixed:
        raise OnnxPruneError(f"the model's batch dimension is fixed at {fixed}, so calibration "
                             f"needs at least {fixed} samples, but {what} {n}")
    return n - n % fixed


def _check_feedable(inputs) -> None:
    """bfloat16 / float8 inputs (ml_dtypes arrays, numpy kind 'V') fail only at the first run,
    with "Numpy_type 256 can't be converted": onnxruntime's Python API takes no numpy array of
    them unless runtime feeds them itself (then it lists them among its types)."""
    known = {np.dtype(t) for t in ORT_TYPES.values()}
    for name, dtype, _ in inputs:
        if dtype.kind == "V" and dtype not in known:
            raise OnnxPruneError(f"input '{name}' is {dtype}, which onnxruntime cannot take as a "
                                 f"numpy array: calibration cannot feed this model (give it "
                                 f"float32 or float16 inputs)")


def _concatenate(batches, limit) -> tuple[dict[str, np.ndarray], bool]:
    """The batches joined, read up to `limit` samples; and whether the stream held more."""
    parts: dict[str, list[np.ndarray]] = {}
    scalars: dict[str, np.ndarray] = {}  # scalar inputs: one value, the same in every batch
    seen, keys = 0, None
    for i, batch in enumerate(batches, 1):
        if not isinstance(batch, Mapping):
            raise OnnxPruneError(f"a calibration batch must be a dict of arrays, got {type(batch).__name__}")
        if keys is None:
            keys = set(batch)
        elif set(batch) != keys:  # one batch's arrays would be dropped or misaligned
            raise OnnxPruneError(f"calibration batch {i} holds {', '.join(map(repr, sorted(batch)))}, "
                                 f"but the first batch {', '.join(map(repr, sorted(keys)))}")
        for key, value in batch.items():
            value = np.asarray(value)
            if value.ndim:
                parts.setdefault(key, []).append(value)
            elif not _same_value(scalars.setdefault(key, value), value):
                raise OnnxPruneError(f"calibration batches give scalar '{key}' different values "
                                     f"({scalars[key]} and {value}); it must be one value")
        seen += data.batch_rows(batch)
        if limit is not None and seen >= limit:
            break
    if keys is None:
        raise OnnxPruneError("the calibration data yielded no batches (an iterator or data "
                             "reader that was already used up?)")
    more = limit is not None and seen >= limit and next(iter(batches), None) is not None
    try:
        return {**{k: np.concatenate(v) for k, v in parts.items()}, **scalars}, more
    except ValueError as e:
        raise OnnxPruneError(f"calibration batches do not fit together: {e}") from None


def _same_value(a: np.ndarray, b: np.ndarray) -> bool:
    nan_ok = a.dtype.kind in "fc" and b.dtype.kind in "fc"  # NaN is refused later, by name
    return bool(np.array_equal(a, b, equal_nan=nan_ok))


def _random_samples(inputs, n, seed) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    samples = {}
    for name, dtype, dims in inputs:
        if dims is None:
            raise OnnxPruneError(f"input '{name}' declares no shape, so random inputs cannot be "
                                 "made for it: give calibration data")
        if not dims:  # a scalar (a scale, a flag): the neutral 1 rather than a random sign
            samples[name] = np.ones((), dtype=dtype)
            continue
        shape = [n] + [d if isinstance(d, int) and d > 0 else 1 for d in dims[1:]]
        samples[name] = data.random_array(dtype, shape, rng)
    return samples
