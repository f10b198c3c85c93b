"""Per-layer calibration statistics from one onnxruntime pass.

The inputs of the layers are added as extra graph outputs; every batch is folded into the
layers' accumulators (Gram, capped row sample) and then dropped, so memory
holds the accumulators plus one batch, never all activations.
"""
from __future__ import annotations

import time
import zlib

import numpy as np
import onnx

from .. import data, layout
from ..errors import OnnxPruneError
from ..external_session import session_for
from ..graph import Layer
from ..report import progress_bar
from ..runtime import provider_name, run
from .accumulators import LayerStats


def calibratable(layer: Layer) -> bool:
    """Layers whose input can be observed: in the main graph, a known weight layout."""
    return uncalibrated_reason(layer) is None


def uncalibrated_reason(layer: Layer) -> str | None:
    """Why a layer's input cannot be observed, or None when it can."""
    if layer.role != "weight":
        return "not a layer's weight"
    if layer.graph:
        return "inside a subgraph"
    if not layer.layout_known:
        return layer.layout_unknown
    if layer.uses_differ:
        return "used differently by several nodes"
    return "no input to observe" if layer.input_name is None else None


def collect_statistics(model: onnx.ModelProto, layers: list[Layer], batches, *,
                       row_cap: dict[str, int] | None = None, max_positions: int | None = None,
                       device: str = "auto", seed: int = 0, progress: bool = False,
                       session=None, total: int | None = None) -> tuple[dict[str, LayerStats], dict]:
    """Statistics of each calibratable layer's input; `batches` yields {input name: array}.

    row_cap: {layer key: rows to sample} for the layers whose method needs raw rows.
    session: one from open_session over these layers or more (else one is opened and closed).
    total: how many batches there are (for the progress bar).

    Returns ({layer key: LayerStats}, {samples, batches, provider, seconds}).
    """
    if session is None:
        session = _session_with_outputs(model, _wanted(model, layers), device)
    start = time.perf_counter()
    layers = [layer for layer in layers if calibratable(layer)]
    wanted = _wanted(model, layers)
    shapes = {layer.name: layer.operand_shape for layer in layers}  # weights are not read
    stats: dict[str, LayerStats] = {}
    # keyed by name, so a layer sees the same positions whichever group it is collected in
    rngs = {layer.name: np.random.default_rng([seed, zlib.crc32(layer.name.encode())])
            for layer in layers}
    owner = _owners(layers, row_cap or {}, max_positions)
    samples = n_batches = 0
    for feeds in progress_bar(batches, progress, "calibrating", "batch", total):
        probes = [probe_name(n) for n in wanted]
        values = dict(zip(wanted, run(session, probes, feeds))) if wanted else {}
        values.update(feeds)
        for layer in layers:
            if owner[layer.key] != layer.key:
                continue  # its rows are another layer's: one LayerStats for both
            for name in (layer.input_name, *layer.shared_inputs):  # a shared weight: all its uses
                rows = layout.input_rows(values[name], layer.layout_op, layer.attrs,
                                         shapes[layer.name], layer.weight_side,
                                         max_positions=max_positions, rng=rngs[layer.name])
                if not np.isfinite(rows).all():  # finite data, but the model computes NaN / inf
                    raise OnnxPruneError(f"layer '{layer.name}': its input holds NaN or infinite "
                                         f"values on the calibration data (batch {n_batches + 1})")
                if layer.key not in stats:
                    stats[layer.key] = LayerStats(rows.shape[0], rows.shape[2],
                                                  row_cap=(row_cap or {}).get(layer.key, 0),
                                                   seed=seed)
                stats[layer.key].add_batch(rows)
        samples += data.batch_rows(feeds)
        n_batches += 1
    provider = provider_name(session)
    if samples == 0:
        raise OnnxPruneError("the calibration data holds no samples")
    stats.update({key: stats[first] for key, first in owner.items() if key != first})
    info = {"samples": samples, "batches": n_batches, "provider": provider,
            "seconds": time.perf_counter() - start}
    return stats, info


def open_session(model: onnx.ModelProto, layers: list[Layer], device: str = "auto"):
    """One onnxruntime session whose extra outputs are the inputs of all `layers`: several
    passes (layer groups) then all see the model as it is now, whatever is written later
    (onnxruntime holds its own copy of the weights)."""
    return _session_with_outputs(model, _wanted(model, layers), device)


def _wanted(model: onnx.ModelProto, layers: list[Layer]) -> list[str]:
    graph_inputs = {i.name for i in model.graph.input}
    return list(dict.fromkeys(name for layer in layers if calibratable(layer)
                              for name in (layer.input_name, *layer.shared_inputs)
                              if name not in graph_inputs))


def _rows_key(layer: Layer, row_cap: int, max_positions: int | None):
    """What a layer's input rows are computed from: layers with equal keys (a transformer's
    Q, K and V projections read one tensor) get the same rows. None where the rows are drawn
    at random per layer (im2col positions capped by max_positions)."""
    if layer.op in ("Conv", "ConvTranspose") and max_positions is not None:
        return None
    return (layer.input_name, tuple(layer.shared_inputs), layer.layout_op, layer.weight_side,
            layer.operand_shape, repr(sorted(layer.attrs.items())), row_cap)


def _owners(layers: list[Layer], row_cap: dict[str, int], max_positions: int | None) -> dict[str, str]:
    """{layer key: the key of the first layer with the same rows}, among calibratable `layers`."""
    first: dict = {}
    owner = {}
    for layer in filter(calibratable, layers):
        rows = _rows_key(layer, row_cap.get(layer.key, 0), max_positions)
        owner[layer.key] = layer.key if rows is None else first.setdefault(rows, layer.key)
    return owner


def accumulator_bytes(layer: Layer, row_cap: int = 0) -> int:
    """Memory the statistics of a calibratable layer will hold."""
    k, _, d_in = layout.block_shape(layer.operand_shape, layer.layout_op, layer.attrs, layer.weight_side)
    return LayerStats.nbytes(k, d_in, row_cap=row_cap)


def statistics_bytes(layers: list[Layer], row_cap: dict[str, int], max_positions: int | None) -> int:
    """Memory the statistics of `layers` hold together (layers with the same rows share theirs)."""
    owner = _owners(layers, row_cap, max_positions)
    return sum(accumulator_bytes(layer, row_cap.get(layer.key, 0))
               for layer in layers if owner.get(layer.key) == layer.key)


def calibration_groups(layers: list[Layer], row_cap: dict[str, int], budget: int,
                       max_positions: int | None = None) -> list[list[Layer]]:
    """The calibratable layers, in order, cut into runs whose statistics fit `budget` together
    (one pass over the calibration data each; a layer over the budget alone is a run). A layer
    whose rows another layer of its run already collects costs nothing more."""
    groups, used, collected = [], 0, set()
    for layer in filter(calibratable, layers):
        cap = row_cap.get(layer.key, 0)
        rows = _rows_key(layer, cap, max_positions)
        need = 0 if rows is not None and rows in collected else accumulator_bytes(layer, cap)
        if not groups or (need and used + need > budget):  # rows collected already: free
            groups.append([])
            used, collected = 0, set()
            need = accumulator_bytes(layer, cap)
        groups[-1].append(layer)
        used += need
        collected.add(rows)
    return groups


class GroupedStatistics:
    """Statistics collected one group of layers at a time, on first use: `collect(group)` makes
    one pass over the calibration data; the previous group's statistics are dropped then, so
    memory holds one group. Layers are asked for in graph order, so each group is collected
    once per level. `info` sums the passes."""

    def __init__(self, groups: list[list[Layer]], collect):
        self.groups, self.collect = groups, collect
        self.group_of = {layer.key: i for i, group in enumerate(groups) for layer in group}
        self.current, self.stats = None, {}
        self.info = {"passes": 0, "groups": len(groups), "seconds": 0.0, "provider": None}

    def get(self, key: str) -> LayerStats | None:
        i = self.group_of.get(key)
        if i is None:
            return None
        if i != self.current:
            self.stats = {}  # dropped before the next group's statistics are gathered
            self.stats, info = self.collect(self.groups[i])
            self.current = i
            self.info.update(samples=info["samples"], batches=info["batches"],
                             provider=info["provider"], passes=self.info["passes"] + 1,
                             seconds=self.info["seconds"] + info["seconds"])
        return self.stats.get(key)


def _session_with_outputs(model: onnx.ModelProto, names: list[str], device: str):
    """A session over the model with the values `names` as extra outputs; the ModelProto is
    left as it was."""
    # each value is read through an Identity copy: onnxruntime 1.31's transpose optimiser can
    # drop a value that is itself made a graph output (Transpose -> Gemm with a constant A ->
    # Transpose), but not the copy
    graph, outputs = model.graph, model.graph.output
    for name in names:
        graph.node.add().CopyFrom(onnx.helper.make_node("Identity", [name], [probe_name(name)]))
        outputs.add().name = probe_name(name)  # onnxruntime infers the type of an untyped output
    try:
        try:
            return session_for(model, device)
        except OnnxPruneError:
            # onnxruntime 1.31's graph rewrites refuse some valid graphs once values are outputs
            # (Relu -> MatMul -> BatchNormalization, torch's Linear(bias=False) -> BatchNorm1d,
            # fails in EliminateIdentity); the unoptimised graph computes the same values
            return session_for(model, device, optimize=False)
    finally:
        del outputs[len(outputs) - len(names):]
        del graph.node[len(graph.node) - len(names):]


def probe_name(name: str) -> str:
    """The extra graph output that copies the value `name` (see _session_with_outputs)."""
    return f"{name}::onnxprune_probe"
