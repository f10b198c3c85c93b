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
        model = _read_streamed(path)
    except OSError as e:
        raise OnnxPruneError(f"{path}: cannot read ({e.strerror})") from None
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
    return _checked(model, label)


def _checked(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    # protobuf happily parses many non-ONNX byte strings; a real model has these.
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise OnnxPruneError(f"{label}: not an ONNX model (no IR version, graph or opset)")
    return model


_GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INIT_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number


def _read_streamed(path: Path) -> onnx.ModelProto:
    """Parse a model file initializer by initializer, so memory never holds the file's bytes
    and the parsed model at once (onnx.load needs both: twice the file size)."""
    model = onnx.ModelProto()
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            pending = bytearray()  # consecutive small fields, merged in one call
            for field, header, start, end in _fields(f, 0, size):
                if field != _GRAPH_FIELD:
                    pending += header + _read_exact(f, start, end)
                    continue
                graph_pending = bytearray()
                for gfield, gheader, gstart, gend in _fields(f, start, end):
                    payload = _read_exact(f, gstart, gend)
                    if gfield == _INIT_FIELD:
                        model.graph.MergeFromString(bytes(graph_pending))
                        graph_pending.clear()
                        model.graph.initializer.add().ParseFromString(payload)
                    else:
                        graph_pending += gheader + payload
                model.graph.MergeFromString(bytes(graph_pending))
            model.MergeFromString(bytes(pending))
    except (DecodeError, RuntimeError, ValueError, EOFError):
        raise OnnxPruneError(f"{path}: not an ONNX model, or the file is truncated") from None
    return _checked(model, str(path))


def _fields(f, start: int, end: int):
    """(field number, header bytes, payload start, payload end) of each field in [start, end)."""
    pos = start
    while pos < end:
        f.seek(pos)
        head = f.read(min(20, end - pos))
        tag, n = _decode_varint(head, 0)
        wire = tag & 7
        if wire == 0:
            _, m = _decode_varint(head, n)
            yield tag >> 3, head[:n], pos + n, pos + m
            pos += m
        elif wire == 2:
            length, m = _decode_varint(head, n)
            yield tag >> 3, head[:m], pos + m, pos + m + length
            pos += m + length
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            yield tag >> 3, head[:n], pos + n, pos + n + width
            pos += n + width
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    if pos != end:
        raise ValueError("field runs past the end of its message")


def _decode_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise EOFError
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7


def _read_exact(f, start: int, end: int) -> bytes:
    f.seek(start)
    data = f.read(end - start)
    if len(data) != end - start:
        raise EOFError
    return data


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


def take_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The tensor's values, moved out of the proto (no second copy); write_array puts them back."""
    array = tensor_to_array(tensor)
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    return array


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
    external_data = external_data or data_nbytes(model) > PROTOBUF_LIMIT - (64 << 20)
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
            _write_streamed(model, tmp / path.name)
        if check is not None:
            check(tmp / path.name)
        for target in reversed(targets):  # the model file appears last
            os.replace(tmp / target.name, target)
    except OSError as e:
        raise OnnxPruneError(f"{path}: cannot write output ({e.strerror})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return targets


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Size of a tensor's values, from its dims and type (without touching the data)."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(x) for x in tensor.string_data)
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def data_nbytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data in the model (a cheap stand-in for ByteSize, which serialises)."""
    return sum(tensor_nbytes(t) for t in iter_tensors(model))


def _shell(message, skip: str):
    """A copy of a message without one (large) field."""
    copy = type(message)()
    for field, value in message.ListFields():
        if field.name == skip:
            continue
        target = getattr(copy, field.name)
        if field.is_repeated:
            target.extend(value)
        elif field.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(copy, field.name, value)
    return copy


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _write_streamed(model: onnx.ModelProto, path: Path) -> None:
    """Serialise tensor by tensor: peak memory is one tensor, not a second copy of the model.

    The bytes are a valid ModelProto: the graph field (7) is written once, its initializers
    (field 5) after its other fields; protobuf readers accept fields in any order.
    """
    graph_field = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
    init_field = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
    graph_shell = _shell(model.graph, "initializer").SerializeToString()
    inits = model.graph.initializer
    sizes = [t.ByteSize() for t in inits]  # cheap per tensor: no recursion into big messages
    init_tag = _varint(init_field << 3 | 2)
    graph_len = len(graph_shell) + sum(len(init_tag) + len(_varint(n)) + n for n in sizes)
    with open(path, "wb") as f:
        f.write(_shell(model, "graph").SerializeToString())
        if model.HasField("graph"):
            f.write(_varint(graph_field << 3 | 2) + _varint(graph_len))
            f.write(graph_shell)
            for tensor, n in zip(inits, sizes):
                f.write(init_tag + _varint(n))
                f.write(tensor.SerializeToString())


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
