"""The options of a run, checked before any work: one clear line for each mistake."""
from __future__ import annotations

import decimal
import numbers
import os
from collections.abc import Mapping

import numpy as np
import onnx

from . import graph, modelio
from .data import check_count
from .errors import OnnxPruneError
from .methods import magnitude
from .runtime import check_device

DATA_FREE_METHODS = ("layer", "global", "global-mt")
CALIBRATED_METHODS = ("dc", "ltp")
METHODS = DATA_FREE_METHODS + CALIBRATED_METHODS
ALLOCATIONS = ("global-mt", "uniform", "ltp")
STORAGES = ("dense", "sparse")
MT_VARIANTS = ("rescale", "waterfill")
NO_LIMIT = ("calib_samples", "max_positions")  # the counts that None leaves unlimited


def sparsity_levels(sparsity) -> tuple[list[float], bool]:
    """(the levels, whether a trail was asked for): a number, or a list / tuple / 1-D array."""
    if isinstance(sparsity, np.ndarray) and sparsity.ndim <= 1:
        levels, trail = ([sparsity[()]], False) if sparsity.ndim == 0 else (list(sparsity), True)
    elif isinstance(sparsity, (list, tuple)):
        levels, trail = list(sparsity), True
    elif sparsity is None or np.isscalar(sparsity) and not isinstance(sparsity, (str, bytes)):
        levels, trail = [sparsity], False
    else:
        raise OnnxPruneError(f"sparsity must be a number or a list of numbers, got {sparsity!r}")
    if not levels:
        raise OnnxPruneError("no sparsity given")
    for s in levels:
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, (numbers.Real, decimal.Decimal)):
            raise OnnxPruneError(f"sparsity must be a number in [0, 1), got {s!r}")
    return [magnitude.check_sparsity(s) for s in levels], trail


def check_options(levels, method, storage_format, min_keep, mt_variant, allocation, calib, refit,
                  sequential) -> None:
    if sorted(set(levels)) != levels:
        raise OnnxPruneError(f"sparsity levels must be increasing, got {levels}")
    if method not in METHODS:
        raise OnnxPruneError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    if storage_format not in STORAGES:
        raise OnnxPruneError(f"unknown storage '{storage_format}' (choose from {', '.join(STORAGES)})")
    if allocation not in ALLOCATIONS:
        raise OnnxPruneError(f"unknown allocation '{allocation}' (choose from {', '.join(ALLOCATIONS)})")
    magnitude.min_keep_count(0, min_keep)  # raises for a value that is not a percentage
    if mt_variant not in MT_VARIANTS:
        raise OnnxPruneError(f"unknown Minimum Threshold variant '{mt_variant}' "
                             f"(choose from {', '.join(MT_VARIANTS)})")
    # options that would otherwise be accepted and change nothing
    if allocation != ALLOCATIONS[0] and method != "dc":
        raise OnnxPruneError(f"--allocation chooses dc's per-layer budgets; method '{method}' "
                             "has its own")
    if refit and method == "dc":
        raise OnnxPruneError("dc fits the kept weights to the calibration data itself: --refit "
                             "would change nothing")
    if sequential and method not in CALIBRATED_METHODS and not refit:
        raise OnnxPruneError(f"--sequential orders calibration passes; method '{method}' without "
                             "--refit uses no calibration data")
    needs = f"method '{method}'" if method in CALIBRATED_METHODS else "--refit" if refit else None
    if needs and calib is None:
        raise OnnxPruneError(f"{needs} needs calibration data: give --calib data.npz "
                             "(or --calib random to use random inputs, for testing only)")


def check_settings(model, output, device, include, exclude, dims, flags: dict, counts: dict) -> None:
    """The library's own arguments, checked before any work as the command line's are:
    flags are booleans (a string "False" is true), counts whole numbers."""
    modelio.check_model_source(model)
    if output is not None and not isinstance(output, (str, os.PathLike)):
        raise OnnxPruneError(f"output must be a path, not {type(output).__name__}")
    check_device(device)
    graph.name_patterns(include, "include")
    graph.name_patterns(exclude, "exclude")
    if dims is not None and not isinstance(dims, Mapping):
        raise OnnxPruneError(f"dims must map dimension names to sizes ({{'batch': 8}}), got {dims!r}")
    for name, size in (dims or {}).items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise OnnxPruneError(f"--dim {name}: a size must be a positive integer, got {size!r}")
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise OnnxPruneError(f"{name} must be True or False, got {value!r}")
    lowest = {"seed": 0, "calib_samples": 1, "batch_size": 1, "row_cap": 0, "max_positions": 1}
    for name, value in counts.items():
        if value is not None or name not in NO_LIMIT:
            check_count(name, value, lowest[name])


def check_dims(model: onnx.ModelProto, dims: dict[str, int] | None) -> None:
    """--dim names a symbolic dimension of the model's inputs (a typo would pass unseen)."""
    known = {d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim
             if d.dim_param}
    unknown = sorted(set(dims or {}) - known)
    if unknown:
        raise OnnxPruneError(f"--dim {unknown[0]}: the model's inputs have no such dimension "
                             f"(theirs: {', '.join(sorted(known)) or 'none'})")
