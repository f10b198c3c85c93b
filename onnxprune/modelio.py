"""Reading ONNX files and their tensors: clear errors for bad input, external data read where it
is, a tensor's values replaced in the proto. Writing outputs is writer.py's.

Nothing here does pruning math.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from . import mapped, wire
from .errors import OnnxPruneError, one_line
from .wire import TENSOR_DATA_FIELDS

PROTOBUF_LIMIT = 2**31 - 1  # a ModelProto larger than this cannot be serialised in one piece


@dataclass
class LoadedModel:
    """A model; its external tensors stay in their data files (absolute locations) until read."""

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
    for _, g in labelled_graphs(graph):
        yield g


def labelled_graphs(graph: onnx.GraphProto, path: str = ""):
    """(path, graph) for the graph ("") and every subgraph, outermost first. A body's path names
    the nodes and attributes that lead to it (`loop_node.body`, `if_node.then_branch`, ...):
    tensor names may repeat across graphs, a path and a name together do not."""
    yield path, graph
    for node in graph.node:
        for attr in node.attribute:
            bodies = ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else
                      list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else [])
            for i, body in enumerate(bodies):
                yield from labelled_graphs(body, body_label(path, node, attr.name, i, len(bodies)))


def tensor_key(path: str, name: str) -> str:
    """A tensor's name made unique in the model by the path of its graph (see labelled_graphs)."""
    return f"{path}/{name}" if path else name


def body_label(path: str, node: onnx.NodeProto, attr_name: str, i: int, n: int) -> str:
    return f"{path}/{node_name(node)}.{attr_name}{f'[{i}]' if n > 1 else ''}".lstrip("/")


def node_name(node: onnx.NodeProto) -> str:
    """The node's name (unique in a valid graph), or its op and first output."""
    return node.name or f"{node.op_type}:{node.output[0] if node.output else '?'}"


def node_label(node: onnx.NodeProto) -> str:
    """For people and --include / --exclude: the module path torch's dynamo exporter records
    (its node names, node_MatMul_81, say nothing), /blocks.0/attn/qkv/linear like the
    TorchScript exporter's names; else node_name. Not unique: never a key."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s.strip(" '\"") for s in prop.value.strip("[]").split(",")]
            # torch writes each module's full name (bert, bert.encoder, ...): keep the innermost
            kept = [s for s, inner in zip(scopes, scopes[1:] + [""]) if s and not inner.startswith(s + ".")]
            if kept:
                return "/" + "/".join(kept)
    return node_name(node)


def iter_tensors(model: onnx.ModelProto, *, sparse: bool = True, dense: bool = True):
    """Every TensorProto holding data: initializers and Constant values, in all graphs.

    With sparse=False the parts (values, indices) of sparse tensors are left out, with
    dense=False everything else."""
    for graph in iter_graphs(model.graph):
        if dense:
            yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and dense:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.SPARSE_TENSOR and sparse:
                    yield attr.sparse_tensor.values
                    yield attr.sparse_tensor.indices
        if sparse:
            for st in graph.sparse_initializer:
                yield st.values
                yield st.indices


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def load_model(source: str | os.PathLike | onnx.ModelProto | bytes) -> LoadedModel:
    """Load a model from a path, bytes or a ModelProto (which is copied, never modified)."""
    loaded = _load(source)
    _constants_as_tensors(loaded.model)
    return loaded


def _constants_as_tensors(model: onnx.ModelProto) -> None:
    """Constant nodes holding value_floats hold the same float32 values as a `value` tensor
    instead: one place (a tensor) where weights are found and rewritten. A value_float is a
    scalar, never a weight: it keeps its form (exporters write many)."""
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            if node.op_type != "Constant" or len(node.attribute) != 1:
                continue
            attr = node.attribute[0]
            if attr.name != "value_floats":
                continue
            values = np.array(list(attr.floats), np.float32)
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute(
                "value", numpy_helper.from_array(values, node.output[0] if node.output else "")))


def check_model_source(model, what: str = "") -> None:
    """A model argument of the library: a path (a readable file), bytes or a ModelProto."""
    if not isinstance(model, (str, os.PathLike, bytes, onnx.ModelProto)):
        raise OnnxPruneError(f"{what or 'model'} must be a path, bytes or an onnx.ModelProto, "
                             f"not {type(model).__name__}")
    if isinstance(model, (str, os.PathLike)):
        check_model_file(Path(model), what)


def check_model_file(path: Path, what: str = "") -> None:
    """One line for a model path that is not a readable file (`what`: which model, if several)."""
    label = f"{what}: {path}" if what else str(path)
    try:
        path.resolve()
    except (RuntimeError, OSError):  # a link loop, a name too long
        raise OnnxPruneError(f"{label}: cannot be resolved (a symbolic link loop?)") from None
    if not path.exists():
        raise OnnxPruneError(f"{label}: no such file")
    if path.is_dir():
        raise OnnxPruneError(f"{label}: is a directory, not an ONNX file")
    if not path.is_file():  # a FIFO would block the read forever
        raise OnnxPruneError(f"{label}: not a regular file")


def _load(source) -> LoadedModel:
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        return LoadedModel(no_relative_data(model, "the model"), None, [])
    if isinstance(source, bytes):
        return LoadedModel(no_relative_data(_parse(source, "<bytes>"), "<bytes>"), None, [])
    path = Path(source)
    check_model_file(path)
    try:
        model = _checked(wire.read_model(path), str(path))
    except OSError as e:
        raise OnnxPruneError(f"{path}: cannot read ({e.strerror})") from None
    except (DecodeError, RuntimeError, ValueError, EOFError):
        raise OnnxPruneError(f"{path}: not an ONNX model, or the file is truncated") from None
    data_files: list[Path] = []
    # sparse parts are loaded inline (onnx's external-data helpers skip them); strings cannot be mapped
    tensors = [(t, t.data_type == onnx.TensorProto.STRING) for t in iter_tensors(model, sparse=False)]
    tensors += [(t, True) for t in iter_tensors(model, dense=False)]
    for tensor, inline in tensors:
        if is_external(tensor):
            try:
                file = _check_external(tensor, path.parent, path, load=inline)
            except OSError as e:  # unreadable (permissions)
                raise OnnxPruneError(f"{path}: cannot read the external data of tensor "
                                     f"'{tensor.name}' ({e.strerror})") from None
            if file not in data_files:
                data_files.append(file)
    _inline_overlapping(model)
    return LoadedModel(model, path, data_files)


def external_ref(tensor: onnx.TensorProto) -> tuple[str, int, int] | None:
    """(location, offset, length) of an external tensor, else None."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in tensor.external_data}
    return (info.get("location", ""), int(info.get("offset", 0)),
            int(info.get("length", tensor_nbytes(tensor))))


def _inline_overlapping(model: onnx.ModelProto) -> None:
    """Tensors whose bytes overlap in a data file (onnx.load accepts them) are read inline: each
    is pruned and written on its own, never at a place another tensor's bytes share. So are empty
    ones, which onnx.save places at the next tensor's offset."""
    spans = []  # (file, first byte, end): the bytes it reads, whatever `length` says
    for tensor in iter_tensors(model, sparse=False):
        if (ref := external_ref(tensor)) is not None:
            spans.append((ref[0], ref[1], ref[1] + tensor_nbytes(tensor), tensor))
    for span in [span for span in spans if span[1] == span[2]]:  # empty: the next tensor's offset
        make_inline(span[3], b"")
    spans = sorted((span for span in spans if span[1] < span[2]), key=lambda span: span[:3])
    overlapping, group, end = [], [], None
    for file, start, stop, tensor in spans:
        if group and file == group[0][0] and start < end:
            group.append((file, start, stop, tensor))
            end = max(end, stop)
            continue
        overlapping += group if len(group) > 1 else []
        group, end = [(file, start, stop, tensor)], stop
    overlapping += group if len(group) > 1 else []
    for file, start, stop, tensor in overlapping:
        with open(file, "rb") as f:
            f.seek(start)
            make_inline(tensor, f.read(stop - start))


def no_relative_data(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    """An in-memory model has no folder: a relative data location would be read against the
    current directory, whichever it is."""
    for tensor in iter_tensors(model):
        if is_external(tensor):
            location = {e.key: e.value for e in tensor.external_data}.get("location", "")
            if not os.path.isabs(location):
                raise OnnxPruneError(
                    f"{label}: tensor '{tensor.name}' keeps its data in '{location}', a path relative "
                    "to a folder an in-memory model does not know: pass the model's file path, or "
                    "load it with its data (onnx.load)")
    return model


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
    if any(isinstance(text, bytes) for text in _texts(model)):  # upb hands invalid UTF-8 back as
        # bytes, and writing them fails: found now, not after the work
        raise OnnxPruneError(f"{label}: holds names or strings that are not valid UTF-8")
    known = set(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}
    bad = next((t for t in iter_tensors(model) if t.data_type not in known), None)
    if bad is not None:
        raise OnnxPruneError(f"{label}: tensor '{bad.name}' has no known data type ({bad.data_type})")
    return model


def _texts(model: onnx.ModelProto):
    """The model's string fields that onnxprune writes back (not the tensors' data)."""
    yield from (model.producer_name, model.producer_version, model.domain, model.doc_string)
    for graph in iter_graphs(model.graph):
        yield from (graph.name, graph.doc_string)
        for node in graph.node:
            yield from (node.name, node.op_type, node.domain, node.doc_string, *node.input, *node.output)
        for info in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
            yield info.name


def _check_external(tensor: onnx.TensorProto, base: Path, model_path: Path, load: bool) -> Path:
    """Validate an external tensor's file and extent, then point it at the file by absolute
    path (so it can be read without the model's folder), or load it inline."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    try:
        file = (base / location).resolve()
        # inside the model's folder, or the real folder of a linked model file (the Hugging Face
        # cache links model.onnx and its data into blobs/): what onnxruntime accepts
        outside = os.path.isabs(location) or not any(
            file.is_relative_to(folder) for folder in (base.resolve(), model_path.resolve().parent))
        offset, length = int(info.get("offset", 0)), int(info.get("length", tensor_nbytes(tensor)))
    except (ValueError, TypeError, OSError, RuntimeError):  # a NUL byte, a link loop, offset 'abc'
        raise OnnxPruneError(f"{model_path}: tensor '{tensor.name}' has an invalid external data "
                             f"entry (location {location!r}, offset {info.get('offset')!r}, length "
                             f"{info.get('length')!r})") from None
    if outside:  # a model must not make onnxprune read (and copy out) any file it can reach
        raise OnnxPruneError(
            f"{model_path}: tensor '{tensor.name}' keeps its data in '{location}', outside the "
            "model's folder (an absolute path, '..' or a link out of it): refused, as onnxruntime "
            "refuses it")
    if not location or not file.is_file():
        raise OnnxPruneError(
            f"{model_path}: external data file '{location}' for tensor '{tensor.name}' is missing "
            "(or not a regular file)")
    if not os.access(file, os.R_OK):
        raise OnnxPruneError(f"{model_path}: external data file '{location}' cannot be read "
                             "(permission denied)")
    if offset < 0 or length < 0:
        raise OnnxPruneError(f"{model_path}: tensor '{tensor.name}' has a negative external data "
                             f"offset or length ({offset}, {length})")
    if offset + length > file.stat().st_size or length < tensor_nbytes(tensor):
        raise OnnxPruneError(
            f"{model_path}: external data file '{location}' is truncated "
            f"(tensor '{tensor.name}' needs {max(length, tensor_nbytes(tensor))} bytes at offset {offset})")
    if load:
        with open(file, "rb") as f:
            f.seek(offset)
            make_inline(tensor, f.read(length))
    else:
        point(tensor, str(file), offset, tensor_nbytes(tensor))
    return file


def tensor_to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The tensor's values; a read-only view of raw_data when possible (no copy), a read-only
    memory map (mapped.MappedTensor) for a loaded model's external tensors."""
    try:
        return _to_array(tensor)
    except (ValueError, KeyError, TypeError) as e:  # a hostile or broken file, not our bug
        raise OnnxPruneError(f"tensor '{tensor.name}': its data does not fit its type "
                             f"({tensor.data_type}) and shape {list(tensor.dims)} ({one_line(e, 120)})") from None


def _to_array(tensor: onnx.TensorProto) -> np.ndarray:
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    if (ref := external_ref(tensor)) is not None and os.path.isabs(ref[0]):
        return mapped.open_tensor(ref[0], ref[1], dtype, tuple(tensor.dims))
    size = int(np.prod(tensor.dims, dtype=np.int64))
    if dtype.kind in "fiuV" and len(tensor.raw_data) == dtype.itemsize * size > 0:
        return np.frombuffer(tensor.raw_data, dtype=dtype.newbyteorder("<")).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor)


def take_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The tensor's values, moved out of the proto (no second copy); write_array puts them back.
    External tensors stay where they are (mapped, nothing to move)."""
    array = tensor_to_array(tensor)
    if is_external(tensor):
        return array
    for name in TENSOR_DATA_FIELDS:
        tensor.ClearField(name)
    return array


def write_array(tensor: onnx.TensorProto, array: np.ndarray) -> None:
    """Replace a tensor's values in the proto, keeping its name, dtype and dims (raw
    little-endian bytes; an external tensor becomes inline)."""
    array = little_endian(tensor, array)
    for name in TENSOR_DATA_FIELDS:  # raw_data is set just below
        tensor.ClearField(name)
    make_inline(tensor, array.tobytes())


def make_inline(tensor: onnx.TensorProto, raw: bytes) -> None:
    """Make `tensor` hold `raw` (little-endian) in the proto, external no more."""
    if is_external(tensor):  # an inline tensor's fields stay as they were (unset, not DEFAULT)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    tensor.raw_data = raw


def refer_to(tensor: onnx.TensorProto, entries) -> None:
    """Make `tensor` external, described by its (key, value) entries (location, offset, ...)."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def point(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make `tensor` refer to `length` bytes at `offset` of `location`."""
    refer_to(tensor, (("location", location), ("offset", str(offset)), ("length", str(length))))


def little_endian(tensor: onnx.TensorProto, array: np.ndarray) -> np.ndarray:
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    array = np.asarray(array, dtype=dtype, order="C")  # ascontiguousarray makes a scalar 1-d
    assert tuple(array.shape) == tuple(tensor.dims), (array.shape, tensor.dims)
    return array.astype(array.dtype.newbyteorder("<"), copy=False)


def resolve_external(model: onnx.ModelProto) -> None:
    """Load every external tensor into the proto (an in-memory result must stand alone)."""
    for tensor in iter_tensors(model):
        if is_external(tensor):
            write_array(tensor, np.asarray(tensor_to_array(tensor)))


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Size of a tensor's values, from its dims and type (without touching the data)."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(x) for x in tensor.string_data)
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def data_nbytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data in the model (a cheap stand-in for ByteSize, which serialises)."""
    return sum(tensor_nbytes(t) for t in iter_tensors(model))


def has_external(model: onnx.ModelProto) -> bool:
    return any(is_external(t) for t in iter_tensors(model))


def inline_nbytes(model: onnx.ModelProto) -> int:
    return sum(tensor_nbytes(t) for t in iter_tensors(model) if not is_external(t))


def write_streamed(model: onnx.ModelProto, path: Path, replacements: dict | None = None) -> None:
    """Write `model` to `path` tensor by tensor (wire.write_model); `replacements` ({id(tensor):
    (tensor, little-endian array)}) are new values, written from the arrays."""
    replacements = dict(replacements or {})
    streamed = {id(t) for name in wire.STREAMED for t in getattr(model.graph, name)}
    for key in [k for k in replacements if k not in streamed]:  # Constants, subgraphs: in place
        write_array(*replacements.pop(key))
    wire.write_model(model, path, replacements)
