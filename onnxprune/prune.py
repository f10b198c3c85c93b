"""The pruning pipeline: load -> find weights -> statistics -> new weights -> write -> verify.

Each stage lives in its own module; this one only moves data between them.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from . import budget, graph, modelio, options, solve, storage, writer
from .calibration.collect import (GroupedStatistics, calibratable, calibration_groups,
                                  collect_statistics, open_session, statistics_bytes,
                                  uncalibrated_reason)
from .calibration.source import CalibrationSet, load_calibration, model_inputs
from .errors import OnnxPruneError
from .methods import magnitude
from .options import CALIBRATED_METHODS
from .report import LayerRow, PruneReport, plural, progress_bar, shown_name
from .runtime import device_note
from .verify import compare_models



@dataclass
class PruneResult:
    model: onnx.ModelProto | None  # None for the levels of a trail written to files: load those
    report: PruneReport


def default_output(path: str | os.PathLike) -> Path:
    """model.onnx -> model.pruned.onnx."""
    return _with_suffix(Path(path), ".pruned")


def level_outputs(output: str | os.PathLike, levels: Sequence[float]) -> list[Path]:
    """out.onnx -> out.s0.9.onnx ...: one file per level of a trail, each level in its shortest
    exact text (a float32 level at float32 precision: 0.9, not 0.8999999761581421)."""
    names = [_level_text(s) for s in levels]
    if len(set(names)) < len(names):  # float32 0.9 and float64 0.9 together: every digit
        names = [np.format_float_positional(float(s), trim="-") for s in levels]
    return [_with_suffix(Path(output), f".s{name}") for name in names]


def _level_text(level: float) -> str:
    single = np.float32(level)
    exact32 = float(single) == float(level)
    return np.format_float_positional(single if exact32 else float(level), trim="-")


def _with_suffix(path: Path, suffix: str) -> Path:
    stem = path.name.removesuffix(".onnx")
    return path.with_name(f"{stem}{suffix}.onnx")


def prune(model, sparsity: float | Sequence[float], *, method: str = "global-mt", output=None,
          min_keep: float = 0.05, mt_variant: str = "rescale",
          include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
          storage_format: str = "dense", force: bool = False,
          verify: bool = True, dims: dict[str, int] | None = None, device: str = "auto",
          calib=None, calib_samples: int | None = 1024, batch_size: int = 32,
          allocation: str = "global-mt", refit: bool = False, sequential: bool = False,
          max_positions: int | None = 64, row_cap: int = 20000, seed: int = 0,
          progress: bool = False, max_memory: int | str = budget.DEFAULT):
    """Prune a model (a path, bytes or a ModelProto; never modified).

    `sparsity` is one level, or a list of levels (a trail: one load and one calibration pass,
    one model per level; with `output`, level s goes to `<output stem>.s<s>.onnx`). A level of a
    trail equals a single run at that level, except with ltp (one optimisation path: its
    per-layer counts may differ slightly).
    With `output`, each model is written atomically after it was verified in onnxruntime
    (unless verify=False). Returns a PruneResult, or a list of them for a trail.

    The keyword arguments are the command line's options (`onnxprune prune --help` explains
    each): method (layer, global, global-mt, dc, ltp), min_keep and mt_variant (global-mt),
    include / exclude (a regex, or a list of them: any matches), storage_format (dense,
    sparse), force, verify and dims (the verification run's symbolic sizes), device (auto,
    cpu, cuda), calib (a path, 'random', a mapping of arrays, an iterable of batches or an
    object with get_next()), calib_samples, batch_size, allocation (dc), refit, sequential,
    max_positions, row_cap, seed, progress (progress bars) and max_memory (bytes, or a size
    such as '512M').
    """
    levels, trail = options.sparsity_levels(sparsity)
    max_memory = budget.parse_size(max_memory)  # bytes; see budget.py for what it decides
    options.check_options(levels, method, storage_format, min_keep, mt_variant, allocation, calib,
                          refit, sequential)
    options.check_settings(model, output, device, include, exclude, dims,
                           flags=dict(force=force, verify=verify, refit=refit, sequential=sequential,
                                      progress=progress),
                           counts=dict(seed=seed, calib_samples=calib_samples, batch_size=batch_size,
                                       row_cap=row_cap, max_positions=max_positions))
    outputs = _plan_outputs(model, output, levels, trail, force)

    timings: dict[str, float] = {}
    with _timed(timings, "load"):
        loaded, layers, skipped, biases = _load(model, include, exclude, dims)
    for out in filter(None, outputs):  # now that the input's data files are known
        writer.check_targets(writer.output_files(out, loaded.external_data), force, protect=loaded.files)
    run = _Run(model, loaded, writer.ModelWriter(loaded), layers, skipped, biases, method=method,
               allocation=allocation,
               refit=refit, sequential=sequential, trail=trail, storage_format=storage_format,
               force=force, verify=verify, dims=dims, max_memory=max_memory,
               options=CalibrationOptions(batch_size, row_cap, max_positions, device, seed, progress))
    if method in CALIBRATED_METHODS or refit:
        with _timed(timings, "calibrate"):
            _calibrate(run, calib, calib_samples)
    take = modelio.take_array if run.detach else modelio.tensor_to_array
    run.dense = [take(layer.tensor) for layer in layers]
    with _timed(timings, "select"):
        plans = _allocate_levels(run, levels, outputs, min_keep, mt_variant)

    results = []
    try:
        for level in plans:
            level_timings = dict(timings)
            with _timed(level_timings, "prune"):
                _start_level(run, level, first=level is plans[0])
                rows, notes = _apply_level(run, level)
            report = _level_report(run, level, rows, notes, level_timings)
            pruned = _finish(run, report, level.output)
            # a written level of a trail lives in its file: later levels rewrite loaded.model
            results.append(PruneResult(None if trail and level.output is not None else pruned, report))
    except OnnxPruneError as e:  # a trail keeps the levels already written: say which
        written = [r.report.output_files[0] for r in results if r.report.output_files]
        if written:
            raise type(e)(f"{e}; levels written and complete: {', '.join(written)}") from None
        raise
    finally:  # a stage not saved (an error, Ctrl-C, SIGTERM) goes now, not at exit
        run.writer.stage_output(None)
    return results if trail else results[0]


@dataclass(frozen=True)
class CalibrationOptions:
    batch_size: int
    row_cap: int  # rows DC keeps per ReLU layer
    max_positions: int | None  # im2col positions per sample
    device: str
    seed: int
    progress: bool


@dataclass
class _Run:
    """What the stages of one run share: the model, its layers, the settings, the statistics."""
    source: object  # prune()'s model argument (never modified)
    loaded: modelio.LoadedModel
    writer: writer.ModelWriter  # where new values go: the proto, a staged data file, or later
    layers: list[graph.Layer]
    skipped: list[graph.Skipped]
    biases: dict[str, np.ndarray]  # dense biases by layer key, as stored
    method: str
    allocation: str
    refit: bool
    sequential: bool
    trail: bool
    options: CalibrationOptions
    storage_format: str
    force: bool
    verify: bool
    dims: dict[str, int] | None
    max_memory: int
    dense: list = field(default_factory=list)  # each layer's weights; None once written back
    shared_biases: dict = field(default_factory=dict)  # {id(bias): values}, shared by parts (_write_bias)
    stats: dict | GroupedStatistics = field(default_factory=dict)  # {layer key: LayerStats}
    calibration: dict | None = None  # the report's calibration info
    calib_set: CalibrationSet | None = None

    @property
    def detach(self) -> bool:
        # A single level moves the weights out of the proto (each goes back, or straight into the
        # output file, once pruned); a trail or sequential calibration needs the proto intact.
        return not self.trail and not self.sequential

    @property
    def learned_allocation(self) -> bool:
        return self.method == "ltp" or self.allocation == "ltp"


@dataclass
class _Level:
    sparsity: float
    output: Path | None
    counts: list[int]  # zeros per layer
    ranking: object  # the global magnitude ranking that gives each layer its cut, or None
    mt_counts: list[int]  # global-mt's (or uniform's) counts, reported next to a learned allocation
    ltp: object = None  # the LTP result when the allocation is learned


@contextmanager
def _timed(timings: dict[str, float], name: str):
    clock = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - clock


def _plan_outputs(model, output, levels, trail, force) -> list[Path | None]:
    """Each level's output file (None: in memory), checked before the work, not after it."""
    if output is None:
        return [None] * len(levels)
    outputs = level_outputs(output, levels) if trail else [Path(output)]
    inputs = (model,) if isinstance(model, (str, os.PathLike)) else ()
    for out in outputs:
        writer.check_targets(writer.output_files(out, False), force, protect=inputs)
    return outputs


def _load(model, include, exclude, dims):
    """The loaded model, its prunable layers, what was skipped, and the layers' biases."""
    loaded = modelio.load_model(model)
    options.check_dims(loaded.model, dims)
    layers, skipped = graph.find_layers(loaded.model, include, exclude)
    if not layers:
        quantized = sum(s.reason == graph.QUANTIZED_REASON for s in skipped)
        left = "; ".join(f"{shown_name(s.name, s.node, s.op)}: {s.reason}" for s in skipped[:3]) \
            + (" ..." if len(skipped) > 3 else "")
        raise OnnxPruneError(
            f"no float weights to prune: {quantized} quantized weights found; onnxprune prunes "
            "float weights, so prune the model before quantizing it" if quantized else
            "no prunable weights found (Conv, ConvTranspose, Gemm and MatMul with constant float "
            "weights; see --include)" + (f"; left alone: {left}" if skipped else ""))
    biases = {layer.key: _bias_values(layer, modelio.tensor_to_array(layer.bias))
              for layer in layers if layer.bias is not None}
    return loaded, layers, skipped, biases


def _bias_values(layer, values: np.ndarray) -> np.ndarray:
    """A layer's bias: the tensor, or its part of one that several layers share by parts."""
    return values if layer.bias_part is None else values.reshape(-1)[slice(*layer.bias_part)].copy()


def _write_bias(run: _Run, layer, values: np.ndarray) -> None:
    """A layer's bias into its tensor; a part of a shared one goes in with the other parts as
    they are now (dense, or as their layers last wrote them)."""
    if layer.bias_part is not None:
        whole = run.shared_biases.setdefault(id(layer.bias), modelio.tensor_to_array(layer.bias).copy())
        whole.reshape(-1)[slice(*layer.bias_part)] = values
        values = whole
    run.writer.write_array(layer.bias, values)


def _calibrate(run: _Run, calib, calib_samples) -> None:
    """Statistics of every calibratable layer: one pass when they fit --max-memory, else one
    pass per group of layers that fits (collected as they are used); none up front with
    --sequential, except for a learned (ltp) allocation, which needs every layer's at once.
    Sets run.calib_set, run.stats ({layer key: LayerStats} or GroupedStatistics) and
    run.calibration (the report's info)."""
    calib_set = run.calib_set = load_calibration(calib, run.loaded.model, calib_samples,
                                                 run.options.seed)
    caps = _row_caps(run.layers, run.method, run.options.row_cap)
    groups = calibration_groups(run.layers, caps, run.max_memory, run.options.max_positions)
    if run.sequential and not run.learned_allocation:
        stats, calibration = {}, {"samples": calib_set.size, "provider": None}
    elif len(groups) <= 1:  # with --sequential, for the learned allocation (weights: per layer)
        stats, calibration = _collect(run, run.layers, caps, progress=run.options.progress)
    elif run.learned_allocation:
        need = statistics_bytes(run.layers, caps, run.options.max_positions)
        raise OnnxPruneError(
            f"ltp learns every layer at once and needs all their statistics together "
            f"({budget.describe(need)}, over --max-memory {budget.describe(run.max_memory)}): "
            "raise --max-memory, or use dc / --refit, which calibrate layer groups in several passes")
    else:
        # one session over the dense model: every pass sees it, not what is written later
        session = open_session(run.loaded.model, run.layers, run.options.device)
        stats = GroupedStatistics(groups, lambda group: _collect(
            run, group, caps, progress=run.options.progress, session=session))
        calibration = stats.info
        calibration["samples"] = calib_set.size
    calibration["random"] = calib_set.random
    if run.sequential:
        calibration["sequential"] = True
    run.stats, run.calibration = stats, calibration


def _collect(run: _Run, layers, caps, progress=False, session=None):
    return collect_statistics(
        run.loaded.model, layers, run.calib_set.batches(run.options.batch_size), row_cap=caps,
        max_positions=run.options.max_positions, device=run.options.device,
        seed=run.options.seed, progress=progress, session=session,
        total=run.calib_set.batch_count(run.options.batch_size))


def _allocate_levels(run: _Run, levels, outputs, min_keep, mt_variant) -> list[_Level]:
    """Every level's zero counts per layer; a learned allocation follows one LTP optimisation
    path through all levels."""
    allocations = [_allocate(run.method, run.allocation, run.dense, s, min_keep, mt_variant)
                   for s in levels]
    plans = [_Level(s, out, counts, ranking, counts)
             for s, out, (counts, ranking) in zip(levels, outputs, allocations)]
    if run.learned_allocation:  # global-mt's allocation stays in the report for comparison
        learned = _ltp_counts(run.layers, run.dense, run.stats, levels, [plan.mt_counts for plan in plans],
                              min_keep, run.options.seed, run.options.progress)
        for plan in plans:
            plan.counts, plan.ltp = learned[plan.sparsity]
    return plans


def _start_level(run: _Run, level: _Level, first: bool) -> None:
    """Where this level's tensors go, and the dense weights back for a later sequential level."""
    run.writer.stage_output(level.output)  # external data: pruned tensors go straight to the output's data file
    if run.sequential and run.trail and not first and any(layer.shared_inputs for layer in run.layers):
        # a shared weight's other uses see it and the layers after it: dense again, as in a
        # single level, or this level's statistics would depend on the level before
        for layer, values in zip(run.layers, run.dense):
            run.writer.write_array(layer.tensor, values)
            if layer.key in run.biases:  # a refitted bias too
                _write_bias(run, layer, run.biases[layer.key])
    # one written level of dense storage: new inline values go from arrays to the file
    run.writer.defer = (level.output is not None and not run.trail and run.storage_format == "dense"
                               and not run.sequential and not run.loaded.external_data)


def _apply_level(run: _Run, level: _Level) -> tuple[list[LayerRow], list[str]]:
    """Write this level's weights (and refitted biases) into the loaded model's tensors.
    Returns the report rows and notes."""
    rows, fallback, thin = [], [], []
    for i, (layer, n_zero) in enumerate(zip(progress_bar(run.layers, run.options.progress, "pruning", "tensor"),
                                            level.counts)):
        array = run.dense[i]
        stats = (_sequential_stats(run, layer) if run.sequential and calibratable(layer)
                 else run.stats.get(layer.key))
        if stats is None and (run.method in CALIBRATED_METHODS or run.refit):
            why = uncalibrated_reason(layer)
            fallback.append(f"{layer.key} ({why})" if why else layer.key)
        elif stats is not None and stats.count * _FEW_ROWS < stats.d_in:
            thin.append(f"{layer.name} ({stats.count} for {stats.d_in} inputs)")
        cut = None  # a magnitude cut, unless the calibrated method solves the layer
        if run.method not in CALIBRATED_METHODS or stats is None:
            cut = (level.ranking and level.ranking.cut(i, n_zero, array)) or magnitude.layer_cut(array, n_zero)
        new_bias, note = None, ""
        if cut is not None and not (run.refit and stats is not None) and run.writer.streams(layer.tensor):
            # a mask alone: straight from the input's data file into the output's, in chunks
            parts = run.writer.rewrite(layer.tensor, array, lambda chunk, start, out:
                                       magnitude.apply_cut(chunk, cut, start, out), magnitude.CHUNK)
            zeros_before, zeros_after = (sum(p[i] for p in parts) for i in (0, 1))
        else:
            new, new_bias, note = _new_layer_weights(run, layer, array, n_zero, cut, stats)
            zeros_before, zeros_after = int(np.count_nonzero(array == 0)), int(np.count_nonzero(new == 0))
            run.writer.write_array(layer.tensor, new)
        folded = layer.affine if cut is None else None  # the solve saw the scale and shift after it
        refitted = "" if new_bias is None else f"{layer.affine.holds_bias} refitted as its bias" if (
            layer.affine and layer.affine.holds_bias) else "bias refitted"
        rows.append(LayerRow(layer.name, layer.op, list(layer.shape), layer.dtype.name, layer.size,
                             zeros_before, zeros_after, layer.graph,
                             "; ".join(x for x in (note, f"fitted with the {folded.ops} after it" if folded
                                                   else "", refitted, *layer.notes) if x), layer.node))
        if new_bias is not None:
            _write_bias(run, layer, new_bias)
        if run.detach:
            run.dense[i] = None  # its data now lives in the proto again
    if run.sequential:  # one pass per layer, plus the learned allocation's over the dense model
        run.calibration["passes"] = sum(calibratable(layer) for layer in run.layers) + bool(run.stats)
    notes = []
    if fallback:
        notes.append(f"{plural(len(fallback), 'tensor')} without calibration statistics, pruned by "
                     f"magnitude{', not refitted' if run.refit else ''}: "
                     + ", ".join(fallback[:5]) + (" ..." if len(fallback) > 5 else ""))
    if thin:
        notes.append("few calibration rows, so these layers' fits are poorly determined (use more "
                     "calibration samples): " + ", ".join(thin[:5]) + (" ..." if len(thin) > 5 else ""))
    emptied = [row.name for row in rows if row.params and row.zeros_before < row.zeros_after == row.params]
    if emptied:  # global magnitude can take every weight of a layer whose weights are small
        notes.append(f"{plural(len(emptied), 'tensor')} pruned to all zeros, so what they compute no "
                     "longer depends on their input (global-mt's --min-keep prevents this): "
                     + ", ".join(emptied[:5]) + (" ..." if len(emptied) > 5 else ""))
    return rows, notes


# A layer fitted to fewer input rows than 1 per this many inputs gets a note: with 1 sample,
# dc on digits_cnn fell to 22 % accuracy, below magnitude's 57 % (the reference CNN's fc1 sees
# 512 rows for 3,136 inputs and gains from dc / ltp).
_FEW_ROWS = 8


def _sequential_stats(run: _Run, layer):
    """The layer's statistics from the model as pruned so far (earlier layers already written)."""
    one, info = _collect(run, [layer], _row_caps([layer], run.method, run.options.row_cap))
    run.calibration.update(provider=info["provider"],
                           seconds=run.calibration.get("seconds", 0) + info["seconds"])
    return one.get(layer.key)


def _new_layer_weights(run: _Run, layer, array, n_zero, cut, stats):
    """(new weights, refitted bias or None, note): the magnitude `cut` (refitted with --refit
    where the layer has statistics), or without a cut the calibrated method's solve."""
    bias = run.biases.get(layer.key)
    if cut is not None:
        new = solve.magnitude_layer(array, n_zero, cut)
        if run.refit and stats is not None:
            return *solve.refit_layer(layer, array, new, stats, bias), ""
        return new, None, ""
    if run.method == "dc":
        return *solve.dc_layer(layer, array, n_zero, stats, bias, seed=run.options.seed), ""
    new, new_bias, learned_support = solve.ltp_layer(layer, array, n_zero, stats, bias, run.refit)
    return new, new_bias, "learned support" if learned_support else "dense top-k support"


def _level_report(run: _Run, level: _Level, rows, notes, timings) -> PruneReport:
    """The level's report: its rows, the run's notes and calibration, what LTP learned."""
    if run.calib_set is not None and run.calib_set.note:
        notes.append(run.calib_set.note)
    cuda_note = device_note(run.options.device)
    if cuda_note and (run.verify or run.calibration is not None):
        notes.append(cuda_note)
    report = PruneReport(method=run.method, target_sparsity=level.sparsity, refit=run.refit,
                         storage=run.storage_format,
                         layers=rows, skipped=[vars(x) for x in run.skipped], timings=timings,
                         calibration=run.calibration, notes=notes)
    if level.ltp is not None:
        report.ltp = _ltp_summary(level.ltp, rows, level.mt_counts, level.sparsity)
    return report


def _finish(run: _Run, report: PruneReport, output: Path | None) -> onnx.ModelProto:
    """Storage format, atomic write with verification, file sizes; returns the pruned model."""
    clock = time.perf_counter()
    loaded, source, layers = run.loaded, run.source, run.layers
    pruned = loaded.model
    if (run.trail and output is None) or run.storage_format == "sparse":
        pruned = onnx.ModelProto()
        pruned.CopyFrom(loaded.model)  # later levels rewrite the tensors of loaded.model
    if output is None:
        modelio.resolve_external(pruned)  # an in-memory result holds all its weights
    report.input_files = [str(f) for f in loaded.files]
    report.input_bytes = (sum(f.stat().st_size for f in loaded.files) if loaded.path else
                          len(source) if isinstance(source, bytes) else
                          source.ByteSize() + sum(modelio.tensor_nbytes(t) for t in modelio.iter_tensors(source)
                                                  if modelio.is_external(t)))
    if run.storage_format == "sparse":
        cap = min(run.max_memory, modelio.PROTOBUF_LIMIT - (64 << 20)) if loaded.external_data else None
        converted, over = storage.to_sparse_initializers(pruned, {layer.key for layer in layers}, cap)
        dense = [layer.key for layer in layers if layer.key not in set(converted)]
        report.notes.append(f"{len(converted)} of {len(layers)} pruned tensors stored sparse"
                            + (f"; kept dense, being smaller so or not an initializer: "
                               f"{', '.join(dense[:5])}" + (" ..." if len(dense) > 5 else "") if dense else ""))
        if over:
            report.notes.append(f"{plural(len(over), 'tensor')} stay dense: sparse tensors are stored "
                                f"inline and the inline limit of {budget.describe(cap)} was reached")
    reference = loaded.path if loaded.path else _as_bytes(source)
    too_big = (budget.verification_note(modelio.data_nbytes(loaded.model), run.max_memory)
               if loaded.external_data else None)  # onnxruntime would hold every weight

    unshaped = [name for name, _, dims in model_inputs(loaded.model) if dims is None]

    def check(candidate):
        if run.verify and isinstance(candidate, Path):  # the checker by path: the only way over 2 GB
            report.notes.extend(filter(None, [writer.check_by_path(candidate, reference)]))
        if run.verify and too_big:
            report.notes.append(too_big)
        elif run.verify and unshaped:  # onnxruntime shows them as scalars: nothing to synthesise
            report.verification = {"provider": None, "max_abs_diff": {}, "note": (
                f"not run in onnxruntime: input {', '.join(map(repr, unshaped))} declares no "
                "shape, so no synthetic input can be made for it")}
        elif run.verify:
            report.verification = compare_models(reference, candidate, dims=run.dims,
                                                 device=run.options.device)

    if output is not None:
        written = writer.save_model(pruned, output, external_data=loaded.external_data,
                                    force=run.force, protect=tuple(loaded.files), check=check,
                                    stage=run.writer.stage, replacements=run.writer.pending)
        run.writer.flush_pending()  # the returned model holds the new values too
        report.output_files = [str(p) for p in written]
        report.output_bytes = sum(p.stat().st_size for p in written)
    elif run.verify and modelio.data_nbytes(pruned) > modelio.PROTOBUF_LIMIT:
        report.notes.append("not verified: models over 2 GB are verified only when written")
    else:
        serialized = pruned.SerializeToString()
        report.output_bytes = len(serialized)
        if run.verify:
            check(serialized)
    # what --storage sparse gives (or gave): measured when written sparse, else estimated
    report.sparse_output_bytes = report.output_bytes - (
        0 if run.storage_format == "sparse" else _sparse_saving(layers, report.layers))
    report.timings["write_verify"] = time.perf_counter() - clock
    return pruned


def _ltp_counts(layers, dense, stats, levels, mt_counts_per_level, min_keep, seed, progress) -> dict:
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
                             "differently cannot be calibrated); dc and --refit prune such "
                             "layers by magnitude, as do the data-free methods")
    targets = [sum(counts) - sum(counts[i] for i in others) for counts in mt_counts_per_level]
    if len(set(targets)) != len(targets):
        raise OnnxPruneError("ltp: two sparsity levels give the same number of zeros")
    per_level = solve.ltp_allocation([layers[i] for i in calibrated], [dense[i] for i in calibrated],
                                     stats, targets, seed, progress)
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
