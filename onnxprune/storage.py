"""Sparse storage: pruned initializers as ONNX sparse_initializer (flat INT64 indices).

onnxruntime densifies sparse initializers when it loads a model, so this saves disk space and
download size only, never run time or memory.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .modelio import iter_graphs, tensor_to_array

INDEX_BYTES = 8  # the onnx checker accepts INT64 indices only


def sparse_nbytes(nnz: int, itemsize: int) -> int:
    return nnz * (itemsize + INDEX_BYTES)


def to_sparse_initializers(model: onnx.ModelProto, names: set[str],
                           max_inline_bytes: int | None = None) -> tuple[list[str], list[str]]:
    """Move the named initializers to sparse_initializer where that is smaller; edits in place.

    Sparse values and indices are stored inline, also in models with external data: onnx.load's
    external-data helpers skip sparse tensors, so external ones would not load back.
    `max_inline_bytes` caps their total (the model file must stay under 2 GB, and is read
    whole); the tensors past it stay dense. Returns (converted, left dense by the cap).
    """
    converted, over = [], []
    room = max_inline_bytes
    for graph in iter_graphs(model.graph):
        keep = []
        for tensor in graph.initializer:
            sparse = None
            if tensor.name in names:
                array = tensor_to_array(tensor).reshape(-1)
                nnz = int(np.count_nonzero(array))
                nbytes = sparse_nbytes(nnz, array.dtype.itemsize)
                if nbytes < array.nbytes and (room is None or nbytes <= room):
                    sparse = _as_sparse(tensor, array)
                    room = None if room is None else room - nbytes
                elif nbytes < array.nbytes:
                    over.append(tensor.name)
                del array  # a mapped tensor's pages go with it
            if sparse is None:
                keep.append(tensor)
            else:
                graph.sparse_initializer.append(sparse)
                converted.append(tensor.name)
        if len(keep) != len(graph.initializer):
            del graph.initializer[:]
            graph.initializer.extend(keep)
    return converted, over


def _as_sparse(tensor: onnx.TensorProto, flat: np.ndarray) -> onnx.SparseTensorProto:
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    indices = np.flatnonzero(flat)
    sparse = onnx.SparseTensorProto()
    sparse.dims.extend(tensor.dims)
    values, index_tensor = sparse.values, sparse.indices  # filled in place: no second copy
    values.name, values.data_type = tensor.name, tensor.data_type
    values.dims.append(indices.size)
    values.raw_data = np.ascontiguousarray(flat[indices]).astype(dtype.newbyteorder("<")).tobytes()
    index_tensor.data_type = onnx.TensorProto.INT64
    index_tensor.dims.append(indices.size)
    index_tensor.raw_data = indices.astype("<i8").tobytes()
    return sparse
