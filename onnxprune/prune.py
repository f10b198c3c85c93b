"""The pruning pipeline: load -> find weights -> statistics -> new weights -> write -> verify.

Each stage lives in its own module; this one only moves data between them.
"""
from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from . import budget, graph, modelio, solve, storage
from .calibration.collect import (GroupedStatistics, accumulator_bytes, calibratable,
                                  calibration_groups, collect_statistics, open_session)
from .calibration.source import load_calibration
from .errors import OnnxPruneError
from .methods import magnitude
from .report import LayerRow, PruneReport
from .runtime import check_device, device_note
from .verify import compare_models

DATA_FREE_METHODS = ("layer", "global", "global-mt")
CALIBRATED_METHODS = ("dc", "ltp")
METHODS = DATA_FREE_METHODS + CALIBRATED_METHODS
ALLOCATIONS = ("global-mt", "uniform", "ltp")
STORAGES = ("dense", "sparse")
MT_VARIANTS = ("rescale", "waterfill")


@dataclass
class PruneResult:
    model: onnx.ModelProto | None  # None for the levels of a trail written to files: load those
    report: PruneReport


def default_output(path: str | os.PathLike) -> Path:
    path = Path(path)
    stem = path.name[:-5] if path.name.endswith(".onnx") else path.name
    return path.with_name(stem + ".pruned.onnx")


def level_output(output: str | os.PathLike, sparsity: float) -> Path:
    """out.onnx -> out.s0.9.onnx: one file per level of a trail."""
    output = Path(output)
    stem = output.name[:-5] if output.name.endswith(".onnx") else output.name
    return output.with_name(f"{stem}.s{sparsity:g}.onnx")


def prune(model, sparsity: float | Sequence[float], *, method: str = "global-mt", output=None,
          min_keep: float = 0.05, mt_variant: str = "rescale", include: str | None = None,
          exclude: str | None = None, storage_format: str = "dense", force: bool = False,
          verify: bool = True, dims: dict[str, int] | None = None, device: str = "auto",
          calib=None, calib_samples: int | None = 1024, batch_size: int = 32,
          allocation: str = "global-mt", refit: bool = False, sequential: bool = False,
          max_positions: int | None = 64, row_cap: int = 20000, seed: int = 0,
          progress: bool = False, max_memory: int | str = budget.DEFAULT):
    """Prune a model (a path, bytes or a ModelProto; never modified).

    `sparsity` is one level, or a list of levels (a trail: one load and one calibration pass,
    one model per level; with `output`, level s goes to `<output stem>.s<s>.onnx`).
    With `output`, each model is written atomically after it was verified in onnxruntime
    (unless verify=False). Returns a PruneResult, or a list of them for a trail.

    The keyword arguments are the command line's options (`onnxprune prune --help` explains
    each): method (layer, global, global-mt, dc, ltp), min_keep and mt_variant (global-mt),
    include / exclude (regexes), storage_format (dense, sparse), force, verify and dims (the
    verification run's symbolic sizes), device (auto, cpu, cuda), calib (a path, 'random', a
    mapping of arrays, an iterable of batches or an object with get_next()), calib_samples,
    batch_size, allocation (dc), refit, sequential, max_positions, row_cap, seed, progress
    (progress bars) and max_memory (bytes, or a size such as '512M').
    """
    levels = [sparsity] if np.isscalar(sparsity) else list(sparsity)
    max_memory = budget.parse_size(max_memory)  # bytes; see budget.py for what it decides
    levels = _check_options(levels, method, storage_format, min_keep, mt_variant, allocation, calib,
                            refit, sequential)
    _check_settings(model, device, include, exclude, dims, seed=seed, calib_samples=calib_samples,
                    batch_size=batch_size, row_cap=row_cap, max_positions=max_positions)
    trail = not np.isscalar(sparsity)
    outputs = [None] * len(levels)
    if output is not None:
        outputs = [level_output(output, s) if trail else Path(output) for s in levels]
        inputs = (model,) if isinstance(model, (str, os.PathLike)) else ()
        for out in outputs:  # fail before the work, not after it
            modelio.check_targets(modelio.output_files(out, False), force, protect=inputs)

    timings: dict[str, float] = {}
    clock = time.perf_counter()
    loaded = modelio.load_model(model)
    _check_dims(loaded.model, dims)
    layers, skipped = graph.find_layers(loaded.model, include, exclude)
    if not layers:
        quantized = sum(s.reason == graph.QUANTIZED_REASON for s in skipped)
        raise OnnxPruneError(
            f"no float weights to prune: {quantized} quantized weights found; onnxprune prunes "
            "float weights, so prune the model before quantizing it" if quantized else
            "no prunable weights found (Conv, ConvTranspose, Gemm and MatMul with constant float "
            "weights; see --include)")
    biases = {layer.key: _scaled(modelio.tensor_to_array(layer.bias), layer.bias_scale)
              for layer in layers if layer.bias is not None}
    timings["load"] = time.perf_counter() - clock

    stats, calibration, calib_set = {}, None, None
    options = CalibrationOptions(batch_size, row_cap, max_positions, device, seed, progress)
    if method in CALIBRATED_METHODS or refit:
        clock = time.perf_counter()
        calib_set = load_calibration(calib, loaded.model, calib_samples, seed)
        stats, calibration = _calibrate(loaded, layers, calib_set, method, allocation, sequential,
                                        options, max_memory)
        timings["calibrate"] = time.perf_counter() - clock

    # A single level moves the weights out of the proto (each goes back, or straight into the
    # output file, once pruned); a trail or sequential calibration needs the proto intact.
    detach = not trail and not sequential
    dense = [modelio.take_array(layer.tensor) if detach else modelio.tensor_to_array(layer.tensor)
             for layer in layers]
    clock = time.perf_counter()
    allocations = [_allocate(method, allocation, dense, s, min_keep, mt_variant) for s in levels]
    counts_per_level = [counts for counts, _ in allocations]
    learned = None
    if method == "ltp" or (method == "dc" and allocation == "ltp"):
        # the allocation is learned; global-mt's stays in the report for comparison
        learned = _ltp_counts(layers, dense, stats, levels, counts_per_level, min_keep, seed)
    timings["select"] = time.perf_counter() - clock

    mt_counts_per_level = counts_per_level
    if learned is not None:
        counts_per_level = [learned[s][0] for s in levels]
    results, cuda_note = [], device_note(device)
    try:
        for s, counts, (_, ranking), out in zip(levels, counts_per_level, allocations, outputs):
            level_timings = dict(timings)
            clock = time.perf_counter()
            loaded.stage_output(out)  # external data: pruned tensors go straight to the output's data file
            if sequential and trail and s != levels[0] and any(layer.shared_inputs for layer in layers):
                # a shared weight's other uses see it and the layers after it: dense again, as in a
                # single level, or this level's statistics would depend on the level before
                for layer, values in zip(layers, dense):
                    loaded.write_array(layer.tensor, values)
                    if layer.key in biases:  # a refitted bias too
                        loaded.write_array(layer.bias, _scaled(biases[layer.key], 1 / layer.bias_scale))
            # one written level of dense storage: new inline values go from arrays to the file
            loaded.defer_writes = (out is not None and not trail and storage_format == "dense"
                                   and not sequential and not loaded.external_data)
            rows, notes = _apply_level(
                loaded, layers, dense, biases, counts, ranking, method, stats, refit,
                calib_set if sequential and (method in CALIBRATED_METHODS or refit) else None, options,
                calibration, detach)
            if calib_set is not None and calib_set.note:
                notes.append(calib_set.note)
            level_timings["prune"] = time.perf_counter() - clock
            if cuda_note and (verify or calibration is not None):
                notes.append(cuda_note)
            report = PruneReport(method=method, target_sparsity=s, storage=storage_format, layers=rows,
                                 skipped=[vars(x) for x in skipped], timings=level_timings,
                                 calibration=calibration, notes=notes)
            if learned is not None:
                report.ltp = _ltp_summary(learned[s][1], rows, mt_counts_per_level[levels.index(s)], s)
            pruned = _finish(loaded, model, layers, report, out, storage_format, force, verify,
                             dims, device, copy=trail and out is None, max_memory=max_memory)
            # a written level of a trail lives in its file: later levels rewrite loaded.model
            results.append(PruneResult(None if trail and out is not None else pruned, report))
    finally:  # a stage not saved (an error, Ctrl-C, SIGTERM) goes now, not at exit
        loaded.stage_output(None)
    return results if trail else results[0]


def _check_dims(model: onnx.ModelProto, dims: dict[str, int] | None) -> None:
    """--dim names a symbolic dimension of the model's inputs (a typo would pass unseen)."""
    known = {d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim
             if d.dim_param}
    unknown = sorted(set(dims or {}) - known)
    if unknown:
        raise OnnxPruneError(f"--dim {unknown[0]}: the model's inputs have no such dimension "
                             f"(theirs: {', '.join(sorted(known)) or 'none'})")


def _scaled(array: np.ndarray, scale: float) -> np.ndarray:
    return array if scale == 1 else array.astype(np.float64) * scale


def _apply_level(loaded, layers, dense, biases, counts, ranking, method, stats, refit,
                 sequential_set, options, calibration, detached):
    """Write this level's weights (and refitted biases) into the loaded model's tensors.

    `ranking`: the level's global magnitude ranking (it gives each layer's cut) or None;
    `sequential_set`: the calibration set when each layer's statistics must come from the
    model as pruned so far (--sequential), else None. Returns the report rows and notes."""
    sequential = sequential_set is not None
    rows, notes, fallback = [], [], []
    for i, (layer, n_zero) in enumerate(zip(_progress(layers, options.progress, "pruning"), counts)):
        array = dense[i]
        layer_stats = stats.get(layer.key)
        if sequential and calibratable(layer):
            # statistics from the model as pruned so far (earlier layers already written)
            one, info = collect_statistics(
                loaded.model, [layer], sequential_set.batches(options.batch_size),
                row_cap=_row_caps([layer], method, options.row_cap),
                max_positions=options.max_positions, device=options.device,
                seed=options.seed)
            layer_stats = one.get(layer.key)
            calibration.update(provider=info["provider"],
                               seconds=calibration.get("seconds", 0) + info["seconds"])
        new_bias, note = None, ""
        solved = method in CALIBRATED_METHODS and layer_stats is not None
        refitted = refit and layer_stats is not None and not solved
        cut = None
        if not solved:
            cut = (ranking and ranking.cut(i, n_zero, array)) or magnitude.layer_cut(array, n_zero)
            if method in CALIBRATED_METHODS or (refit and layer_stats is None):
                fallback.append(layer.name)
        if cut is not None and not refitted and loaded.streams(layer.tensor):
            # a mask alone: straight from the input's data file into the output's, in chunks
            parts = loaded.rewrite(layer.tensor, array, lambda chunk, start, out:
                                   magnitude.apply_cut(chunk, cut, start, out), magnitude.CHUNK)
            zeros_before, zeros_after = (sum(p[i] for p in parts) for i in (0, 1))
        else:
            if solved and method == "dc":
                new, new_bias = solve.dc_layer(layer, array, n_zero, layer_stats,
                                               biases.get(layer.key), seed=options.seed)
            elif solved:
                new, new_bias, learned_support = solve.ltp_layer(
                    layer, array, n_zero, layer_stats, biases.get(layer.key), refit)
                note = "learned support" if learned_support else "dense top-k support"
            else:
                new = solve.magnitude_layer(array, n_zero, cut)
            if refitted:
                new = solve.refit_layer(layer, array, new, layer_stats)
            zeros_before, zeros_after = int(np.count_nonzero(array == 0)), int(np.count_nonzero(new == 0))
            loaded.write_array(layer.tensor, new)
        rows.append(LayerRow(layer.name, layer.op, list(layer.shape), layer.dtype.name, layer.size,
                             zeros_before, zeros_after, layer.graph,
                             "; ".join(x for x in (note, "bias refitted" if new_bias is not None
                                                   else "") if x), layer.node))
        if new_bias is not None:
            loaded.write_array(layer.bias, _scaled(new_bias, 1 / layer.bias_scale))
        if detached:
            dense[i] = None  # its data now lives in the proto again
    if sequential and calibration is not None:
        # one per layer, plus the learned allocation's pass over the dense model
        calibration["passes"] = sum(calibratable(layer) for layer in layers) + bool(stats)
    if fallback:
        notes.append(f"{len(fallback)} tensors have no calibration statistics (inside subgraphs, "
                     f"unresolved layout, shared by nodes that use it differently, or not a layer "
                     f"weight) and were pruned by magnitude{', not refitted' if refit else ''}: "
                     + ", ".join(fallback[:5]) + (" ..." if len(fallback) > 5 else ""))
    return rows, notes


@dataclass(frozen=True)
class CalibrationOptions:
    batch_size: int
    row_cap: int  # rows DC keeps per ReLU layer
    max_positions: int | None  # im2col positions per sample
    device: str
    seed: int
    progress: bool


def _calibrate(loaded, layers, calib_set, method, allocation, sequential, options, max_memory):
    """Statistics of every calibratable layer: one pass when they fit `max_memory`, else one
    pass per group of layers that fits (collected as they are used); none up front with
    --sequential, except for a learned (ltp) allocation, which needs every layer's at once.
    Returns (stats: {layer key: LayerStats} or GroupedStatistics, report info)."""
    caps = _row_caps(layers, method, options.row_cap)

    def collect(group, session=None):
        return collect_statistics(
            loaded.model, group, calib_set.batches(options.batch_size), row_cap=caps,
            max_positions=options.max_positions, device=options.device,
            seed=options.seed, progress=options.progress,
            session=session)

    groups = calibration_groups(layers, caps, max_memory)
    learned_allocation = method == "ltp" or allocation == "ltp"
    if sequential and not learned_allocation:
        stats, calibration = {}, {"samples": calib_set.size, "provider": None}
    elif len(groups) <= 1:  # with --sequential, for the learned allocation (weights: per layer)
        stats, calibration = collect(layers)
    elif learned_allocation:
        need = sum(accumulator_bytes(layer, caps.get(layer.key, 0)) for g in groups for layer in g)
        raise OnnxPruneError(
            f"ltp learns every layer at once and needs all their statistics together "
            f"({budget.describe(need)}, over --max-memory {budget.describe(max_memory)}): raise "
            "--max-memory, or use dc / --refit, which calibrate layer groups in several passes")
    else:
        # one session over the dense model: every pass sees it, not what is written later
        session = open_session(loaded.model, layers, options.device)
        stats = GroupedStatistics(groups, lambda group: collect(group, session))
        calibration = stats.info
        calibration["samples"] = calib_set.size
    calibration["random"] = calib_set.random
    if sequential:
        calibration["sequential"] = True
    return stats, calibration


def _finish(loaded, source, layers, report, output, storage_format, force, verify, dims, device,
            copy, max_memory=budget.DEFAULT) -> onnx.ModelProto:
    """Storage format, atomic write with verification, file sizes; returns the pruned model."""
    clock = time.perf_counter()
    pruned = loaded.model
    if copy or storage_format == "sparse":
        pruned = onnx.ModelProto()
        pruned.CopyFrom(loaded.model)  # later levels rewrite the tensors of loaded.model
    if output is None:
        modelio.resolve_external(pruned)  # an in-memory result holds all its weights
    report.input_bytes = (sum(f.stat().st_size for f in loaded.files) if loaded.path else
                          len(source) if isinstance(source, bytes) else
                          source.ByteSize() + sum(modelio.tensor_nbytes(t) for t in modelio.iter_tensors(source)
                                                  if modelio.is_external(t)))
    if storage_format == "sparse":
        cap = min(max_memory, modelio.PROTOBUF_LIMIT - (64 << 20)) if loaded.external_data else None
        converted, over = storage.to_sparse_initializers(pruned, {layer.key for layer in layers}, cap)
        report.notes.append(f"{len(converted)} of {len(layers)} pruned tensors stored sparse "
                            "(the others are smaller dense or are not initializers)")
        if over:
            report.notes.append(f"{len(over)} tensors stay dense: sparse tensors are stored inline "
                                f"and the inline limit of {budget.describe(cap)} was reached")
    reference = loaded.path if loaded.path else _as_bytes(source)
    too_big = (budget.verification_note(modelio.data_nbytes(loaded.model), max_memory)
               if loaded.external_data else None)  # onnxruntime would hold every weight

    def check(candidate):
        if verify and isinstance(candidate, Path):  # the checker by path: the only way over 2 GB
            report.notes.extend(filter(None, [modelio.check_by_path(candidate, reference)]))
        if verify and too_big:
            report.notes.append(too_big)
        elif verify:
            report.verification = compare_models(reference, candidate, dims=dims, device=device)

    if output is not None:
        written = modelio.save_model(pruned, output, external_data=loaded.external_data,
                                     force=force, protect=tuple(loaded.files), check=check,
                                     stage=loaded.stage, replacements=loaded.pending)
        loaded.flush_pending()  # the returned model holds the new values too
        report.output_files = [str(p) for p in written]
        report.output_bytes = sum(p.stat().st_size for p in written)
    elif verify and modelio.data_nbytes(pruned) > modelio.PROTOBUF_LIMIT:
        report.notes.append("not verified: models over 2 GB are verified only when written")
    else:
        serialized = pruned.SerializeToString()
        report.output_bytes = len(serialized)
        if verify:
            check(serialized)
    # what --storage sparse gives (or gave): measured when written sparse, else estimated
    report.sparse_output_bytes = report.output_bytes - (
        0 if storage_format == "sparse" else _sparse_saving(layers, report.layers))
    report.timings["write_verify"] = time.perf_counter() - clock
    return pruned


def _ltp_counts(layers, dense, stats, levels, mt_counts_per_level, min_keep, seed) -> dict:
    """LTP allocation for every level along one optimisation path.

    Layers without statistics (subgraphs, unresolved layouts) keep their global-mt counts; the
    calibrated layers share the rest of each level's budget through the learned thresholds
    (solve.ltp_allocation). The learned counts also obey the same Minimum Threshold as global-mt
    (--min-keep). Returns {sparsity level: (zero counts of all layers, the LTP result)}.
    """
    calibrated = [i for i, layer in enumerate(layers) if layer.key in stats]
    others = set(range(len(layers))) - set(calibrated)
    if not calibrated:
        raise OnnxPruneError("ltp: no layer has calibration statistics (layers inside subgraphs, "
                             "with unresolved layouts or shared by nodes that use them "
                             "differently cannot be calibrated)")
    targets = [sum(counts) - sum(counts[i] for i in others) for counts in mt_counts_per_level]
    if len(set(targets)) != len(targets):
        raise OnnxPruneError("ltp: two sparsity levels give the same number of zeros")
    per_level = solve.ltp_allocation([layers[i] for i in calibrated], [dense[i] for i in calibrated],
                                     stats, targets, seed)
    learned = {}
    for level, counts, res in zip(levels, mt_counts_per_level, per_level):
        zeros = list(counts)
        for i, z in zip(calibrated, res.zeros):
            zeros[i] = z
        learned[level] = (magnitude.cap_zero_counts(zeros, [d.size for d in dense], min_keep), res)
    return learned


def _ltp_summary(res, rows, mt_counts, sparsity) -> dict:
    """What LTP learned, next to what global-mt and uniform would have chosen."""
    for row, mt in zip(rows, mt_counts):
        choices = f"global-mt {mt / row.params:.1%}, uniform {sparsity:.1%}" if row.params else ""
        row.note = "; ".join(x for x in (choices, row.note) if x)
    return {"lambda": res.lam, "thresholds": res.thresholds, "objective": res.objective,
            "probes": res.probes, "temperatures": res.temperatures}


def _allocate(method, allocation, dense, sparsity, min_keep, mt_variant):
    """Zero counts per layer, and the global ranking that gives each layer its cut (or None)."""
    if method == "layer" or (method == "dc" and allocation == "uniform"):
        return magnitude.layer_zero_counts([a.size for a in dense], sparsity), None
    ranking = magnitude.global_ranking(dense, sparsity)
    if method == "global":
        return ranking.counts, ranking
    return magnitude.min_threshold_zero_counts(dense, sparsity, min_keep_percent=min_keep,
                                               variant=mt_variant, ranking=ranking), ranking


def _check_options(levels, method, storage_format, min_keep, mt_variant, allocation, calib, refit,
                   sequential) -> list[float]:
    if not levels:
        raise OnnxPruneError("no sparsity given")
    levels = [magnitude.check_sparsity(s) for s in levels]
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
    return levels


def _check_settings(model, device, include, exclude, dims, **counts) -> None:
    """The library's own arguments, checked before any work as the command line's are."""
    if not isinstance(model, (str, os.PathLike, bytes, onnx.ModelProto)):
        raise OnnxPruneError(f"model must be a path, bytes or an onnx.ModelProto, not {type(model).__name__}")
    check_device(device)
    for option, pattern in (("include", include), ("exclude", exclude)):
        try:
            re.compile(pattern or "")
        except re.error as e:
            raise OnnxPruneError(f"--{option} '{pattern}' is not a regular expression: {e}") from None
    for name, size in (dims or {}).items():
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise OnnxPruneError(f"--dim {name}: a size must be a positive integer, got {size!r}")
    lowest = {"seed": 0, "calib_samples": 1, "batch_size": 1, "row_cap": 0, "max_positions": 1}
    for name, value in counts.items():  # None: no limit
        if value is not None and (not isinstance(value, (int, np.integer)) or value < lowest[name]):
            raise OnnxPruneError(f"{name} must be an integer of at least {lowest[name]}, got {value!r}")


def _row_caps(layers, method, cap) -> dict[str, int]:
    """DC needs raw input rows for layers followed by ReLU; everything else uses the Gram."""
    return {layer.key: cap for layer in layers if method == "dc" and layer.relu}


def _sparse_saving(layers, rows) -> int:
    saving = 0
    for layer, row in zip(layers, rows):
        dense = row.params * layer.dtype.itemsize
        sparse = storage.sparse_nbytes(row.params - row.zeros_after, layer.dtype.itemsize, row.params)
        if layer.initializer and sparse < dense:
            saving += dense - sparse
    return saving


def _as_bytes(source) -> bytes:
    return source if isinstance(source, bytes) else source.SerializeToString()


def _progress(items, enabled: bool, label: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=label, unit="tensor", leave=False, delay=1.0)  # only for slow steps
