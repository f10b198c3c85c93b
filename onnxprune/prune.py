"""The pruning pipeline: load -> find weights -> (statistics) -> new weights -> write -> verify.

Each stage lives in its own module; this one only moves data between them.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from . import graph, modelio, storage
from .errors import OnnxPruneError
from .methods import magnitude
from .report import LayerRow, PruneReport
from .verify import compare_models

DATA_FREE_METHODS = ("layer", "global", "global-mt")
METHODS = DATA_FREE_METHODS
STORAGES = ("dense", "sparse")


@dataclass
class PruneResult:
    model: onnx.ModelProto
    report: PruneReport


def default_output(path: str | os.PathLike) -> Path:
    path = Path(path)
    stem = path.name[:-5] if path.name.endswith(".onnx") else path.name
    return path.with_name(stem + ".pruned.onnx")


def prune(model, sparsity: float, *, method: str = "global-mt", output=None,
          min_keep: float = 0.05, mt_variant: str = "rescale", include: str | None = None,
          exclude: str | None = None, storage_format: str = "dense", force: bool = False,
          verify: bool = True, dims: dict[str, int] | None = None, device: str = "auto",
          progress: bool = False) -> PruneResult:
    """Prune a model (a path, bytes or a ModelProto; never modified) and return the result.

    With `output`, the pruned model is written there atomically, after it has been verified
    in onnxruntime (unless verify=False). Without it nothing is written and the returned
    ModelProto holds the pruned weights (verification then runs in memory).
    """
    _check_options(sparsity, method, storage_format, min_keep)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    if output is not None:  # fail before the work, not after it
        inputs = (model,) if isinstance(model, (str, os.PathLike)) else ()
        modelio.check_targets(modelio.output_files(output, False), force, protect=inputs)
    loaded = modelio.load_model(model)
    layers, skipped = graph.find_layers(loaded.model, include, exclude)
    if not layers:
        raise OnnxPruneError("no prunable weights found (Conv, ConvTranspose, Gemm and MatMul "
                             "with constant float weights; see --include)")
    timings["load"] = time.perf_counter() - clock

    clock = time.perf_counter()
    stored = [modelio.tensor_to_array(layer.tensor) for layer in layers]
    zeros_before = [int(np.count_nonzero(a == 0)) for a in stored]
    counts = _zero_counts(method, stored, sparsity, min_keep, mt_variant)
    timings["select"] = time.perf_counter() - clock

    clock = time.perf_counter()
    rows = []
    for layer, array, n_zero, before in zip(layers, _progress(stored, progress, "pruning"),
                                            counts, zeros_before):
        keep = magnitude.keep_mask(array, n_zero)
        new = np.where(keep, array, np.zeros((), array.dtype))
        modelio.write_array(layer.tensor, new)
        rows.append(LayerRow(layer.name, layer.op, list(layer.shape), layer.dtype.name,
                             layer.size, before, int(np.count_nonzero(new == 0)), layer.graph))
    del stored
    timings["prune"] = time.perf_counter() - clock

    report = PruneReport(method=method, target_sparsity=sparsity, layers=rows,
                         skipped=[vars(s) for s in skipped], storage=storage_format, timings=timings)
    report.input_bytes = sum(f.stat().st_size for f in loaded.files)
    pruned = loaded.model
    dense_bytes = pruned.ByteSize()
    report.sparse_output_bytes = dense_bytes - _sparse_saving(layers, rows)
    if storage_format == "sparse":
        converted = storage.to_sparse_initializers(pruned, {layer.name for layer in layers})
        report.notes.append(f"{len(converted)} of {len(layers)} pruned tensors stored sparse "
                            "(the others are smaller dense or are not initializers)")

    clock = time.perf_counter()
    reference = loaded.path if loaded.path else _as_bytes(loaded, model)

    def check(candidate):
        if verify:
            report.verification = compare_models(reference, candidate, dims=dims, device=device)

    if output is not None:
        protect = tuple(loaded.files)
        written = modelio.save_model(pruned, output, external_data=loaded.external_data,
                                     force=force, protect=protect, check=check)
        report.output_files = [str(p) for p in written]
        report.output_bytes = sum(p.stat().st_size for p in written)
        if storage_format == "sparse":
            report.sparse_output_bytes = report.output_bytes
    else:
        report.output_bytes = dense_bytes
        if verify:
            if dense_bytes > modelio.PROTOBUF_LIMIT:
                report.notes.append("not verified: models over 2 GB are verified only when written")
            else:
                check(pruned.SerializeToString())
    timings["write_verify"] = time.perf_counter() - clock
    return PruneResult(pruned, report)


def _zero_counts(method, stored, sparsity, min_keep, mt_variant) -> list[int]:
    if method == "layer":
        return magnitude.layer_zero_counts([a.size for a in stored], sparsity)
    if method == "global":
        return magnitude.global_zero_counts(stored, sparsity)
    return magnitude.min_threshold_zero_counts(stored, sparsity, min_keep_percent=min_keep,
                                               variant=mt_variant)


def _check_options(sparsity, method, storage_format, min_keep) -> None:
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise OnnxPruneError(f"sparsity must be in [0, 1), got {sparsity}")
    if method not in METHODS:
        raise OnnxPruneError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    if storage_format not in STORAGES:
        raise OnnxPruneError(f"unknown storage '{storage_format}' (choose from dense, sparse)")
    if not 0 <= min_keep < 100:
        raise OnnxPruneError(f"--min-keep is a percentage in [0, 100), got {min_keep}")


def _sparse_saving(layers, rows) -> int:
    saving = 0
    for layer, row in zip(layers, rows):
        dense = row.params * layer.dtype.itemsize
        sparse = storage.sparse_nbytes(row.params - row.zeros_after, layer.dtype.itemsize)
        if layer.initializer and sparse < dense:
            saving += dense - sparse
    return saving


def _as_bytes(loaded, source) -> bytes:
    if isinstance(source, bytes):
        return source
    if isinstance(source, onnx.ModelProto):
        return source.SerializeToString()
    raise AssertionError("unreachable")


def _progress(items, enabled: bool, label: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=label, unit="tensor", leave=False, delay=1.0)  # only for slow steps
