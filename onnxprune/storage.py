"""Sparse storage: pruned initializers as ONNX sparse_initializer (flat INT64 indices).

onnxruntime densifies sparse initializers when it loads a model, so this saves disk space and
download size only, never run time or memory.
"""
from __future__ import annotations

import numpy as np
import onnx

from .modelio import is_external, labelled_graphs, tensor_key, tensor_to_array
from .wire import packed_field, packed_varints

def sparse_nbytes(nnz: int, itemsize: int, size: int) -> int:
    """About the bytes a tensor of `size` elements, `nnz` of them non-zero (spread evenly),
    takes stored sparse: varint flat indices (1 byte below 128, 2 below 16384, ...) and values
    (16-bit floats as varints of their bits: 2 or 3 bytes), plus the tensor's headers."""
    index_bytes = sum(max(0.0, 1 - 2 ** (7 * k) / size) for k in range(10)) if size else 0.0
    value_bytes = 2.5 if itemsize == 2 else itemsize
    return int(nnz * (index_bytes + value_bytes)) + _HEADER_BYTES


_HEADER_BYTES = 24  # a sparse tensor's dims and field headers beyond a dense one's


def to_sparse_initializers(model: onnx.ModelProto, keys: set[str],
                           max_inline_bytes: int | None = None) -> tuple[list[str], list[str]]:
    """Move the initializers named by `keys` (modelio.tensor_key: a name and its graph's path)
    to sparse_initializer where that is smaller; edits in place.

    Sparse values and indices are stored inline, also in models with external data: onnx.load's
    external-data helpers skip sparse tensors, so external ones would not load back.
    `max_inline_bytes` caps their total (the model file must stay under 2 GB, and is read
    whole); the tensors past it stay dense. Returns (converted, left dense by the cap).
    """
    converted, over = [], []
    room = max_inline_bytes
    for path, graph in labelled_graphs(model.graph):
        keep = []
        for tensor in graph.initializer:
            sparse = None
            if tensor_key(path, tensor.name) in keys:
                array = tensor_to_array(tensor).reshape(-1)
                nnz = int(np.count_nonzero(array))
                # the file's bytes for it now (its data file's part too), and sparse
                dense = tensor.ByteSize() + (array.nbytes if is_external(tensor) else 0)
                if sparse_nbytes(nnz, array.dtype.itemsize, array.size) < 1.2 * dense:
                    candidate = _as_sparse(tensor, array)  # the estimate's doubtful cases: exact
                    nbytes = candidate.ByteSize()
                    if nbytes < dense and (room is None or nbytes <= room):
                        sparse = candidate
                        room = None if room is None else room - nbytes
                    elif nbytes < dense:
                        over.append(tensor_key(path, tensor.name))
                    del candidate
                del array  # a mapped tensor's pages go with it
            if sparse is None:
                keep.append(tensor)
            else:
                graph.sparse_initializer.append(sparse)
                converted.append(tensor_key(path, tensor.name))
        if len(keep) != len(graph.initializer):
            del graph.initializer[:]
            graph.initializer.extend(keep)
    return converted, over


def _as_sparse(tensor: onnx.TensorProto, flat: np.ndarray) -> onnx.SparseTensorProto:
    """Values and flat INT64 indices in typed fields, not raw_data: onnx-graphsurgeon reads a
    sparse tensor's raw values as zeros, and varint indices take 1-5 bytes instead of 8."""
    indices = np.flatnonzero(flat)
    sparse = onnx.SparseTensorProto()
    sparse.dims.extend(tensor.dims)
    values, index_tensor = sparse.values, sparse.indices  # filled in place: no second copy
    values.name, values.data_type = tensor.name, tensor.data_type
    values.dims.append(indices.size)
    values.MergeFromString(_typed_values(tensor.data_type, np.ascontiguousarray(flat[indices])))
    index_tensor.data_type = onnx.TensorProto.INT64
    index_tensor.dims.append(indices.size)
    index_tensor.MergeFromString(packed_field(onnx.TensorProto, "int64_data", packed_varints(indices)))
    return sparse


def _typed_values(data_type: int, values: np.ndarray) -> bytes:
    """The values' field as ONNX stores this type outside raw_data: float32 and float64 in
    float_data / double_data, 16-bit floats as their bit patterns in int32_data."""
    if data_type == onnx.TensorProto.FLOAT:
        return packed_field(onnx.TensorProto, "float_data", values.astype("<f4").tobytes())
    if data_type == onnx.TensorProto.DOUBLE:
        return packed_field(onnx.TensorProto, "double_data", values.astype("<f8").tobytes())
    bits = values.view(np.uint16)  # FLOAT16, BFLOAT16
    return packed_field(onnx.TensorProto, "int32_data", packed_varints(bits))
