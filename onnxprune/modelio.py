"""Reading and writing ONNX files: clear errors for bad input, atomic writes, external data.

Nothing here does pruning math; tensors are edited by the caller and written back as they are.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from .errors import OnnxPruneError

PROTOBUF_LIMIT = 2**31 - 1  # a ModelProto larger than this cannot be serialised in one piece


@dataclass
class LoadedModel:
    model: onnx.ModelProto
    path: Path | None  # None when the model was given in memory
    data_files: list[Path]  # external data files of the input

    @property
    def external_data(self) -> bool:
        return bool(self.data_files)

    @property
    def files(self) -> list[Path]:
        return ([self.path] if self.path else []) + self.data_files


def iter_graphs(graph: onnx.GraphProto):
    """The graph and every subgraph (If/Loop/Scan bodies, at any depth), outermost first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g)


def iter_tensors(model: onnx.ModelProto, *, sparse: bool = True):
    """Every TensorProto holding data: initializers and Constant values, in all graphs.

    With sparse=False the parts of sparse tensors are left out."""
    for graph in iter_graphs(model.graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.SPARSE_TENSOR and sparse:
                    yield attr.sparse_tensor.values
                    yield attr.sparse_tensor.indices
        if sparse:
            for st in graph.sparse_initializer:
                yield st.values
                yield st.indices


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def load_model(source: str | os.PathLike | onnx.ModelProto | bytes) -> LoadedModel:
    """Load a model from a path, bytes or a ModelProto (which is copied, never modified)."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        return LoadedModel(model, None, [])
    if isinstance(source, bytes):
        return LoadedModel(_parse(source, "<bytes>"), None, [])
    path = Path(source)
    if not path.exists():
        raise OnnxPruneError(f"{path}: no such file")
    if path.is_dir():
        raise OnnxPruneError(f"{path}: is a directory, not an ONNX file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise OnnxPruneError(f"{path}: cannot read ({e.strerror})") from None
    model = _parse(data, str(path))
    del data
    data_files: list[Path] = []
    for tensor in iter_tensors(model):
        if _is_external(tensor):
            file = _load_external(tensor, path.parent, path)
            if file not in data_files:
                data_files.append(file)
    return LoadedModel(model, path, data_files)


def _parse(data: bytes, label: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        raise OnnxPruneError(f"{label}: not an ONNX model, or the file is truncated") from None
    # protobuf happily parses many non-ONNX byte strings; a real model has these.
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise OnnxPruneError(f"{label}: not an ONNX model (no IR version, graph or opset)")
    return model


def _load_external(tensor: onnx.TensorProto, base: Path, model_path: Path) -> Path:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    file = (base / location).resolve()
    if not location or not file.is_file():
        raise OnnxPruneError(
            f"{model_path}: external data file '{location}' for tensor '{tensor.name}' is missing")
    offset = int(info.get("offset", 0))
    elem = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    default_len = int(np.prod(tensor.dims, dtype=np.int64)) * elem
    length = int(info.get("length", default_len))
    with open(file, "rb") as f:
        f.seek(offset)
        raw = f.read(length)
    if len(raw) != length:
        raise OnnxPruneError(
            f"{model_path}: external data file '{location}' is truncated "
            f"(tensor '{tensor.name}' needs {length} bytes at offset {offset})")
    tensor.raw_data = raw
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
    return file


def tensor_to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The tensor's values; a read-only view of raw_data when possible (no copy)."""
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    size = int(np.prod(tensor.dims, dtype=np.int64))
    if dtype.kind in "fiuV" and len(tensor.raw_data) == dtype.itemsize * size > 0:
        return np.frombuffer(tensor.raw_data, dtype=dtype.newbyteorder("<")).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor)


def write_array(tensor: onnx.TensorProto, array: np.ndarray) -> None:
    """Replace a tensor's values, keeping its name, dtype and dims (raw little-endian bytes)."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    array = np.ascontiguousarray(array, dtype=dtype)
    assert tuple(array.shape) == tuple(tensor.dims), (array.shape, tensor.dims)
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                  "string_data"):
        tensor.ClearField(field)
    tensor.raw_data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def output_files(path, external_data: bool) -> list[Path]:
    """The model file, then its data file when tensors are stored externally."""
    path = Path(path)
    return [path] + ([path.with_name(path.name + ".data")] if external_data else [])


def check_targets(targets: list[Path], force: bool, protect=()) -> None:
    protected = {Path(p).resolve() for p in protect}
    for target in targets:
        if target.resolve() in protected:
            raise OnnxPruneError(f"{target}: refusing to overwrite the input model or its data")
        if target.is_dir():
            raise OnnxPruneError(f"{target}: is a directory")
        if target.exists() and not force:
            raise OnnxPruneError(f"{target}: already exists (use --force to overwrite)")


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool = False,
               force: bool = False, protect: tuple[Path, ...] = (), check=None) -> list[Path]:
    """Write atomically: into a temporary folder beside the target, then renamed into place.

    With external_data (forced for models over 2 GB), tensors of 1 KiB or more go to
    `<name>.data` next to the model. `check(path)` runs on the finished temporary copy before
    anything is moved into place: if it raises, no output appears. Returns the files written.
    `protect` lists paths never to overwrite, even with force (the input and its data files).
    """
    path = Path(path)
    external_data = external_data or model.ByteSize() > PROTOBUF_LIMIT
    targets = output_files(path, external_data)
    data_name = targets[-1].name
    check_targets(targets, force, protect)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OnnxPruneError(f"{parent}: output folder does not exist")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".onnxprune-", dir=parent))
    except OSError as e:
        raise OnnxPruneError(f"{parent}: cannot write output ({e.strerror})") from None
    try:
        if external_data:
            _write_with_external_data(model, tmp / path.name, data_name)
        else:
            (tmp / path.name).write_bytes(model.SerializeToString())
        if check is not None:
            check(tmp / path.name)
        for target in reversed(targets):  # the model file appears last
            os.replace(tmp / target.name, target)
    except OSError as e:
        raise OnnxPruneError(f"{path}: cannot write output ({e.strerror})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return targets


def _write_with_external_data(model: onnx.ModelProto, path: Path, data_name: str,
                              threshold: int = 1024) -> None:
    """Move large tensors' bytes into one data file, serialise, then restore them in memory."""
    moved: list[tuple[onnx.TensorProto, bytes]] = []
    try:
        with open(path.with_name(data_name), "wb") as data:
            # Sparse tensors stay inline: onnx.load's external-data helpers skip them.
            for tensor in iter_tensors(model, sparse=False):
                if not tensor.HasField("raw_data") or len(tensor.raw_data) < threshold:
                    continue
                pad = -data.tell() % 64  # aligned offsets allow memory-mapping the data
                data.write(b"\0" * pad)
                offset = data.tell()
                raw = tensor.raw_data
                data.write(raw)
                moved.append((tensor, raw))
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", data_name), ("offset", str(offset)),
                                   ("length", str(len(raw)))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
        path.write_bytes(model.SerializeToString())
    finally:
        for tensor, raw in moved:
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = raw
