"""Sparse storage: pruned initializers as ONNX sparse_initializer (flat INT64 indices).

onnxruntime densifies sparse initializers when it loads a model, so this saves disk space and
download size only, never run time or memory.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .modelio import iter_graphs

INDEX_BYTES = 8  # the onnx checker accepts INT64 indices only


def sparse_nbytes(nnz: int, itemsize: int) -> int:
    return nnz * (itemsize + INDEX_BYTES)


def to_sparse_initializers(model: onnx.ModelProto, names: set[str]) -> list[str]:
    """Move the named initializers to sparse_initializer where that is smaller; edits in place."""
    converted = []
    for graph in iter_graphs(model.graph):
        keep = []
        for tensor in graph.initializer:
            sparse = _as_sparse(tensor) if tensor.name in names else None
            if sparse is None:
                keep.append(tensor)
            else:
                graph.sparse_initializer.append(sparse)
                converted.append(tensor.name)
        if len(keep) != len(graph.initializer):
            del graph.initializer[:]
            graph.initializer.extend(keep)
    return converted


def _as_sparse(tensor: onnx.TensorProto) -> onnx.SparseTensorProto | None:
    from .modelio import tensor_to_array

    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    flat = tensor_to_array(tensor).reshape(-1)
    indices = np.flatnonzero(flat)
    if sparse_nbytes(indices.size, dtype.itemsize) >= flat.size * dtype.itemsize:
        return None
    values = onnx.TensorProto()
    values.name, values.data_type = tensor.name, tensor.data_type
    values.dims.append(indices.size)
    values.raw_data = np.ascontiguousarray(flat[indices]).astype(dtype.newbyteorder("<")).tobytes()
    index_tensor = onnx.TensorProto()
    index_tensor.data_type = onnx.TensorProto.INT64
    index_tensor.dims.append(indices.size)
    index_tensor.raw_data = indices.astype("<i8").tobytes()
    sparse = onnx.SparseTensorProto()
    sparse.values.CopyFrom(values)
    sparse.indices.CopyFrom(index_tensor)
    sparse.dims.extend(tensor.dims)
    return sparse
