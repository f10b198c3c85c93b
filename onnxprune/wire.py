"""The protobuf wire format of ONNX files, written and read element by element.

A ModelProto may hold gigabytes of tensors; onnx.load and SerializeToString hold the file's
bytes and the parsed model at once. Here a model is parsed initializer by initializer and
written tensor by tensor (raw bytes straight from numpy arrays), and packed repeated fields are
encoded by numpy.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

# the fields of a TensorProto that can hold its values
TENSOR_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                      "uint64_data", "string_data")


_GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number


_INIT_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number


_SPARSE_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["sparse_initializer"].number


def read_model(path: Path) -> onnx.ModelProto:
    """Parse a model file (sparse) initializer by initializer, so memory never holds the file's bytes
    and the parsed model at once (onnx.load needs both: twice the file size). Raises protobuf's
    DecodeError, RuntimeError, ValueError or EOFError for what is not a whole ModelProto."""
    model = onnx.ModelProto()
    size = path.stat().st_size
    with open(path, "rb") as f:
        pending = bytearray()  # consecutive small fields, merged in one call
        for field, header, start, end in _fields(f, 0, size):
            if field != _GRAPH_FIELD:
                pending += header + _read_exact(f, start, end)
                continue
            graph_pending = bytearray()
            for gfield, gheader, gstart, gend in _fields(f, start, end):
                payload = _read_exact(f, gstart, gend)
                if gfield in (_INIT_FIELD, _SPARSE_FIELD):
                    model.graph.MergeFromString(bytes(graph_pending))
                    graph_pending.clear()
                    sparse = gfield == _SPARSE_FIELD
                    target = model.graph.sparse_initializer if sparse else model.graph.initializer
                    target.add().ParseFromString(payload)
                else:
                    graph_pending += gheader + payload
            model.graph.MergeFromString(bytes(graph_pending))
        model.MergeFromString(bytes(pending))
    return model


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


STREAMED = ("initializer", "sparse_initializer")  # graph fields written one element at a time


def write_model(model: onnx.ModelProto, path: Path, replacements: dict) -> None:
    """Serialise tensor by tensor: peak memory is one tensor, not a second copy of the model.

    The bytes are a valid ModelProto: the graph field (7) is written once, its (sparse)
    initializers after its other fields; protobuf readers accept fields in any order.
    `replacements` ({id(tensor): (tensor, little-endian array)}) gives new values for
    main-graph initializers, written from the arrays instead of the proto's raw_data.
    """
    graph_shell = _shell(model.graph, STREAMED).SerializeToString()
    parts = []  # (tag, element, size) of each streamed element, in order
    for name in STREAMED:
        tag = _varint(onnx.GraphProto.DESCRIPTOR.fields_by_name[name].number << 3 | 2)
        parts += [(tag, *_encoded(t, replacements)) for t in getattr(model.graph, name)]
    graph_len = len(graph_shell) + sum(len(tag) + len(_varint(n)) + n for tag, _, n in parts)
    with open(path, "wb") as f:
        f.write(_shell(model, ("graph",)).SerializeToString())
        if model.HasField("graph"):
            f.write(_varint(_GRAPH_FIELD << 3 | 2) + _varint(graph_len))
            f.write(graph_shell)
            for tag, element, n in parts:
                f.write(tag + _varint(n))
                if isinstance(element, tuple):  # a big or replaced tensor: shell, then raw bytes
                    # (serialising a big tensor whole briefly holds its bytes twice)
                    shell, data = element
                    raw = (data.raw_data if isinstance(data, onnx.TensorProto)
                           else memoryview(data.reshape(-1).view(np.uint8)))
                    raw = memoryview(raw)
                    f.write(shell)
                    f.write(_raw_tag() + _varint(raw.nbytes))
                    f.flush()  # the raw bytes go past the buffer, in small writes
                    write_all(f.fileno(), raw, f.tell())
                    f.seek(raw.nbytes, os.SEEK_CUR)
                    del raw
                else:
                    f.write(element.SerializeToString())


def _encoded(tensor, replacements):
    """(what to write, its encoded size) for one streamed element."""
    if id(tensor) in replacements:
        data = replacements[id(tensor)][1]
        nbytes = data.nbytes
    elif (isinstance(tensor, onnx.TensorProto) and tensor.HasField("raw_data")
          and len(tensor.raw_data) >= 1 << 20):
        data, nbytes = tensor, len(tensor.raw_data)  # its bytes are copied once, when written
    else:
        return tensor, tensor.ByteSize()  # cheap per tensor
    shell = _shell(tensor, TENSOR_DATA_FIELDS).SerializeToString()
    return (shell, data), len(shell) + len(_raw_tag()) + len(_varint(nbytes)) + nbytes


def _shell(message, skip: tuple[str, ...]):
    """A copy of a message without some (large) fields."""
    copy = type(message)()
    for field, value in message.ListFields():
        if field.name in skip:
            continue
        target = getattr(copy, field.name)
        if field.is_repeated:
            target.extend(value)
        elif field.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(copy, field.name, value)
    return copy


def _raw_tag() -> bytes:
    return _varint(onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number << 3 | 2)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packed_varints(values: np.ndarray, chunk: int = 1 << 20) -> bytes:
    """Non-negative integers as consecutive protobuf varints (a packed repeated field's
    payload), encoded by numpy in chunks (its temporaries stay a few times the chunk): 7 bits
    per byte, the high bit set on all but the last byte."""
    flat = np.asarray(values).reshape(-1)
    return b"".join(_varint_chunk(flat[i:i + chunk].astype(np.uint64))
                    for i in range(0, flat.size, chunk))


def _varint_chunk(v: np.ndarray) -> bytes:
    lengths = np.ones(v.size, np.uint8)
    for k in range(1, 10):
        lengths += v >= np.uint64(1 << (7 * k))
    starts = np.cumsum(lengths, dtype=np.int64) - lengths
    out = np.empty(int(starts[-1] + lengths[-1]), np.uint8)
    for k in range(int(lengths.max())):
        at = lengths > k
        more = (lengths[at] > k + 1).astype(np.uint8) << np.uint8(7)
        out[starts[at] + k] = ((v[at] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8) | more
    return out.tobytes()


def packed_field(message_type, name: str, payload: bytes) -> bytes:
    """A length-delimited (packed repeated) field of `message_type`, ready for MergeFromString:
    millions of values parse in C instead of going through Python's extend."""
    number = message_type.DESCRIPTOR.fields_by_name[name].number
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


WRITE_PIECE = 64 << 10  # bytes per write call into a new file (see write_all)


def write_all(fd: int, data, offset: int) -> None:
    """Write all of `data` (bytes-like) at `offset` of a file, 64 KiB per call.

    Why pieces: the page cache sizes the folios of new file data by the write that creates them.
    On the test VM (ext4, Linux 6.18) 2.8 GB written in 1 MB calls took 7-11 s of kernel time,
    almost all of it copying into the fresh folios, and 1.0-1.2 s in 64 KiB calls, whatever the
    order or number of threads (cp's in-kernel copy also moves 64 KiB at a time)."""
    data = memoryview(data).cast("B")
    for start in range(0, data.nbytes, WRITE_PIECE):
        piece = data[start:start + WRITE_PIECE]
        while piece.nbytes:  # a write may take less than asked
            n = os.pwrite(fd, piece, offset + start)
            piece, start = piece[n:], start + n
