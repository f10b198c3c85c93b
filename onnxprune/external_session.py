"""onnxruntime sessions over a loaded model whose weights stay in their data files.

onnxruntime (1.31) refuses external-data locations that are absolute, reached through a
symlink or outside the model's folder ("External data path escapes model directory"). A loaded
model refers to its data by absolute path, possibly to several folders (the input, and a staged
output holding the layers pruned so far), so it cannot be handed over by path without copying its
weights. Instead the model proto (small: its weights are external) goes as bytes, and each data
file as a read-only memory map under a short name
(SessionOptions.add_external_initializers_from_files_in_memory). onnxruntime copies the tensors
it needs while the session is created; the maps are closed right after. Nothing is written.
"""
from __future__ import annotations

import mmap
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .errors import OnnxPruneError
from .modelio import (PROTOBUF_LIMIT, is_external, iter_graphs, iter_tensors, make_inline, refer_to,
                      tensor_nbytes, tensor_to_array)
from .runtime import make_session

# older onnxruntime lacks it: the model is then written to a temporary folder
_IN_MEMORY_FILES = hasattr(ort.SessionOptions, "add_external_initializers_from_files_in_memory")


def session_for(model: onnx.ModelProto, device: str = "auto", light: bool = False,
                optimize: bool = True) -> ort.InferenceSession:
    """A session over a ModelProto however its tensors are held: external ones read where they
    are, inline ones as bytes (a model over protobuf's 2 GB limit through a temporary copy)."""
    if any(is_external(t) for t in iter_tensors(model)):
        return make_external_session(model, device, light, optimize)
    if model.ByteSize() > PROTOBUF_LIMIT:
        return _session_from_a_copy(model, device, optimize)
    return make_session(model.SerializeToString(), device, light, optimize=optimize)


def make_external_session(model: onnx.ModelProto, device: str = "auto",
                          light: bool = False, optimize: bool = True) -> ort.InferenceSession:
    """A session over `model` (tensors inline or external with absolute locations)."""
    if not _IN_MEMORY_FILES:
        return _session_from_a_copy(model, device, optimize)
    inlined: list = []
    names: dict[str, str] = {}  # data file -> name given to onnxruntime
    changed = []
    try:  # the proto is put back as it was on every way out
        _inline_for_onnxruntime(model, inlined)
        for tensor in iter_tensors(model):
            for entry in tensor.external_data:
                if entry.key == "location":
                    changed.append((entry, entry.value))
                    entry.value = names.setdefault(entry.value, f"weights{len(names)}.bin")
        if model.ByteSize() > PROTOBUF_LIMIT:
            raise OnnxPruneError("the model holds over 2 GB of inline tensors; onnxruntime "
                                 "cannot take it without writing it out (give an output path)")
        proto = model.SerializeToString()
    finally:
        for entry, value in changed:
            entry.value = value
        for tensor, entries in inlined:
            refer_to(tensor, entries)
    maps = []
    try:
        for path in names:
            try:
                with open(path, "rb") as f:
                    maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            except OSError as e:
                raise OnnxPruneError(f"{path}: cannot read external data ({e.strerror})") from None
        options = ort.SessionOptions()
        if names:
            options.add_external_initializers_from_files_in_memory(
                list(names.values()), maps, [len(m) for m in maps])
        return make_session(proto, device, light, options=options, optimize=optimize)
    finally:
        for m in maps:
            m.close()


# External tensors up to this size go inline: onnxruntime's shape inference reads the shape
# inputs of Reshape / Expand ... from the proto only (torch's dynamo export saved with
# size_threshold=0 puts those int64 tensors in the data file too: "Cannot parse data from
# external tensors").
SMALL_TENSOR = 64 << 10


def _inline_for_onnxruntime(model: onnx.ModelProto, inlined: list) -> None:
    """The tensors onnxruntime would not find among the in-memory files go inline until the
    proto is serialised: small ones (see SMALL_TENSOR), and those of If / Loop / Scan bodies,
    whose external data it looks for on disk (they are small, as a rule). Appends (tensor, its
    external_data entries) to `inlined`, to put back."""
    bodies = {id(t) for graph in list(iter_graphs(model.graph))[1:]
              for t in [*graph.initializer, *(a.t for node in graph.node for a in node.attribute
                                             if a.type == onnx.AttributeProto.TENSOR)]}
    for tensor in iter_tensors(model, sparse=False):
        if is_external(tensor) and (id(tensor) in bodies or tensor_nbytes(tensor) <= SMALL_TENSOR):
            raw = np.ascontiguousarray(tensor_to_array(tensor)).tobytes()  # little-endian
            inlined.append((tensor, [(e.key, e.value) for e in tensor.external_data]))
            make_inline(tensor, raw)


def _session_from_a_copy(model: onnx.ModelProto, device: str, optimize: bool = True) -> ort.InferenceSession:
    """The model and its weights written to a temporary folder and loaded from there."""
    from .writer import save_model

    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # save_model re-points the tensors it writes
    with tempfile.TemporaryDirectory(prefix="onnxprune-session-") as tmp:
        path = Path(tmp) / "model.onnx"
        save_model(copy, path, external_data=True)
        return make_session(path, device, optimize=optimize)
