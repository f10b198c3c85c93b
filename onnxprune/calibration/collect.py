"""Per-layer calibration statistics from one onnxruntime pass.

The inputs of the layers are added as extra graph outputs; every batch is folded into the
layers' accumulators (Gram, Wanda diagonal, capped row sample) and then dropped, so memory
holds the accumulators plus one batch, never all activations.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from .. import layout, modelio
from ..errors import OnnxPruneError
from ..external_session import make_external_session
from ..graph import Layer
from ..runtime import make_session, provider_name
from .accumulators import LayerStats


def calibratable(layer: Layer) -> bool:
    """Layers whose input can be observed: in the main graph, a known weight layout."""
    return (layer.role == "weight" and not layer.graph and layer.layout_known
            and layer.input_name is not None)


def collect_statistics(model: onnx.ModelProto, layers: list[Layer], batches, *,
                       gram: bool = True, row_cap: dict[str, int] | None = None, max_positions: int | None = None,
                       device: str = "auto", external_data: bool = False, seed: int = 0,
                       progress: bool = False) -> tuple[dict[str, LayerStats], dict]:
    """Statistics of each calibratable layer's input; `batches` yields {input name: array}.

    row_cap: {layer name: rows to sample} for the layers whose method needs raw rows.

    Returns ({layer name: LayerStats}, {samples, batches, provider, seconds}).
    """
    start = time.perf_counter()
    layers = [layer for layer in layers if calibratable(layer)]
    graph_inputs = {i.name for i in model.graph.input}
    wanted = list(dict.fromkeys(layer.input_name for layer in layers
                                if layer.input_name not in graph_inputs))
    shapes = {layer.name: layer.shape if layer.index is None else layer.index.shape
              for layer in layers}  # the operand's shape, without reading the weights
    stats: dict[str, LayerStats] = {}
    rngs = {layer.name: np.random.default_rng([seed, i]) for i, layer in enumerate(layers)}
    samples = n_batches = 0
    with _session_with_outputs(model, wanted, device, external_data) as session:
        for feeds in _progress(batches, progress):
            values = dict(zip(wanted, session.run(wanted, feeds))) if wanted else {}
            values.update(feeds)
            for layer in layers:
                rows = layout.input_rows(values[layer.input_name], layer.op, layer.attrs,
                                         shapes[layer.name], layer.weight_side,
                                         max_positions=max_positions, rng=rngs[layer.name])
                if layer.name not in stats:
                    stats[layer.name] = LayerStats(rows.shape[0], rows.shape[2], gram=gram,
                                                   row_cap=(row_cap or {}).get(layer.name, 0),
                                                   seed=seed)
                stats[layer.name].add_batch(rows)
            samples += len(next(iter(feeds.values())))
            n_batches += 1
        provider = provider_name(session)
    if samples == 0:
        raise OnnxPruneError("the calibration data holds no samples")
    info = {"samples": samples, "batches": n_batches, "provider": provider,
            "seconds": time.perf_counter() - start}
    return stats, info


class _session_with_outputs:
    """A session over the model with extra outputs; the ModelProto is restored afterwards.

    Small models go to onnxruntime as bytes; models with external data as bytes plus their
    mapped data files; inline models over 2 GB are written to a temporary folder.
    """

    def __init__(self, model, names, device, external_data):
        self.model, self.names, self.device, self.external = model, names, device, external_data
        self.tmp = None

    def __enter__(self):
        outputs = self.model.graph.output
        known = {o.name for o in outputs}
        added = [n for n in self.names if n not in known]
        for name in added:
            outputs.add().name = name  # onnxruntime infers the type of an untyped output
        try:
            if self.external:  # weights read where they are, nothing written (see external_session)
                return make_external_session(self.model, self.device)
            if self.model.ByteSize() > modelio.PROTOBUF_LIMIT:
                self.tmp = tempfile.TemporaryDirectory(prefix="onnxprune-calib-")
                path = Path(self.tmp.name) / "model.onnx"
                modelio.save_model(self.model, path, external_data=True)
                source = path
            else:
                source = self.model.SerializeToString()
        finally:
            del outputs[len(outputs) - len(added):]
        return make_session(source, self.device)

    def __exit__(self, *exc):
        if self.tmp is not None:
            self.tmp.cleanup()
        return False


def _progress(batches, enabled):
    if not enabled:
        return batches
    from tqdm import tqdm

    return tqdm(batches, desc="calibrating", unit="batch", leave=False, delay=1.0)
