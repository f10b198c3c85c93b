"""Calibration data from the user: files, dicts, iterables of batches, or data readers.

Everything becomes one checked `{input name: array}` set (first axis = samples), so several
passes (sequential mode, one pass per sparsity level) see the same samples.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .. import data
from ..errors import OnnxPruneError


@dataclass
class CalibrationSet:
    samples: dict[str, np.ndarray]
    random: bool  # synthetic data, only when the user asked for it

    @property
    def size(self) -> int:
        return data.num_samples(self.samples)

    def batches(self, batch_size: int):
        return data.iter_batches(self.samples, batch_size)


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
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in tensor.shape.dim]
        inputs.append((value.name, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)), dims))
    return inputs


def load_calibration(source, model: onnx.ModelProto, limit: int | None, seed: int = 0) -> CalibrationSet:
    """source: a path / glob / directory, "random", a dict of arrays, an iterable of batch
    dicts, or an object with get_next() (onnxruntime's CalibrationDataReader)."""
    inputs = model_inputs(model)
    if isinstance(source, str) and source == "random":
        return CalibrationSet(_random_samples(inputs, limit or 64, seed), random=True)
    if isinstance(source, (str, os.PathLike)):
        samples = data.load_samples(source)
    elif isinstance(source, dict):
        samples = dict(source)
    elif hasattr(source, "get_next"):
        samples = _concatenate(iter(source.get_next, None), limit)
    else:
        try:
            batches = iter(source)
        except TypeError:
            raise OnnxPruneError(f"calibration data of type {type(source).__name__} is not "
                                 "supported (a path, a dict of arrays, an iterable of dicts, "
                                 "or an object with get_next())") from None
        samples = _concatenate(batches, limit)
    samples.pop(data.LABELS_KEY, None)
    samples = data.check_against_model(samples, inputs)
    n = data.num_samples(samples)
    if limit is not None and n > limit:
        # a seeded random subset, not the first `limit`: data files are often sorted (by class,
        # by source), and a prefix of a sorted file misses whole classes
        keep = np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))
        samples = {k: v[keep] for k, v in samples.items()}
    if data.num_samples(samples) == 0:
        raise OnnxPruneError("the calibration data holds no samples")
    return CalibrationSet(samples, random=False)


def _concatenate(batches, limit) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    seen = 0
    for batch in batches:
        if not isinstance(batch, dict):
            raise OnnxPruneError(f"a calibration batch must be a dict of arrays, got {type(batch).__name__}")
        for key, value in batch.items():
            parts.setdefault(key, []).append(np.asarray(value))
        seen += len(np.asarray(next(iter(batch.values())))) if batch else 0
        if limit is not None and seen >= limit:
            break
    try:
        return {k: np.concatenate(v) for k, v in parts.items()}
    except ValueError as e:
        raise OnnxPruneError(f"calibration batches do not fit together: {e}") from None


def _random_samples(inputs, n, seed) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    samples = {}
    for name, dtype, dims in inputs:
        shape = [n] + [d if isinstance(d, int) and d > 0 else 1 for d in dims[1:]]
        if np.issubdtype(dtype, np.floating):
            samples[name] = rng.standard_normal(shape).astype(dtype)
        else:
            samples[name] = np.ones(shape, dtype=dtype)  # valid ids and attention masks
    return samples
