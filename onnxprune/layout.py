"""How a prunable weight and its layer's input map to stacks of matrices (pure numpy).

Every prunable layer (Conv, ConvTranspose, Gemm, MatMul) is expressed as ``k`` independent
blocks: the weight becomes ``(k, d_out, d_in)`` and the layer input becomes rows
``(k, n, d_in)`` such that, per block, the pre-bias output rows are ``X_k @ W_k.T``.
``k`` is the number of conv groups, or the number of leading (batch) indices of a rank > 2
MatMul weight, else 1.

Conventions:
- Conv ``W (C_out, C_in/g, *kernel)``: block ``g`` holds output channels of group ``g`` and its
  columns are ``(c, *kernel)`` in C order, i.e. an im2col patch.
- ConvTranspose ``W (C_in, C_out/g, *kernel)`` is written as the equivalent direct convolution
  over the input with ``stride - 1`` zeros inserted between pixels: kernel flipped spatially,
  in/out channels swapped, so ``d_out = C_out/g`` and ``d_in = C_in/g * prod(kernel)``.
- Gemm ``Y = A' B'``: constant ``B`` ('right') gives ``W = B'^T`` and rows ``A'``; constant ``A``
  ('left') gives ``W = A'`` and rows are the columns of ``B'`` (the output is transposed).
- MatMul ``(X, W)`` ('right'): ``W (..., d_in, d_out)``, rows are ``X``'s last axis; a rank-1
  ``W (d_in,)`` is a single output (``d_out = 1``). ``MatMul(W, X)`` ('left'):
  ``W (..., d_out, d_in)``, rows are the columns of ``X``; a rank-1 ``W (d_in,)`` is again one
  output. Broadcast batch axes of ``X`` that the weight does not index become extra rows.
Weights map to blocks through a fixed index permutation (``block_index``), so
``weight_blocks`` and ``blocks_to_weight`` are exact inverses by construction.
"""

from __future__ import annotations

import math

import numpy as np

from onnxprune.errors import OnnxPruneError

OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_SIDES = ("right", "left")


def block_shape(weight_shape, op: str, attrs: dict, weight_side: str = "right") -> tuple[int, int, int]:
    """(k, d_out, d_in) of the block stack for a weight of ``weight_shape``."""
    shape = tuple(int(s) for s in weight_shape)
    _check_op(op, weight_side, len(shape))
    if op in ("Conv", "ConvTranspose"):
        group = _group(attrs, op, shape)
        kernel = math.prod(shape[2:])
        if op == "Conv":
            return group, shape[0] // group, shape[1] * kernel
        return group, shape[1], shape[0] // group * kernel
    if op == "Gemm":
        rows, cols = shape
        return (1, rows, cols) if _gemm_weight_is_rowmajor(attrs, weight_side) else (1, cols, rows)
    if len(shape) == 1:
        return 1, 1, shape[0]
    k = math.prod(shape[:-2])
    if weight_side == "right":
        return k, shape[-1], shape[-2]
    return k, shape[-2], shape[-1]


def block_index(weight_shape, op: str, attrs: dict, weight_side: str = "right") -> np.ndarray:
    """Flat indices into the weight, shaped (k, d_out, d_in): ``blocks = w.flat[idx]``."""
    size = math.prod(int(s) for s in weight_shape)
    dtype = np.int32 if size < 2**31 else np.int64  # halves the memory of big index maps
    index = np.arange(size, dtype=dtype).reshape(tuple(weight_shape))
    return np.ascontiguousarray(_to_blocks(index, op, attrs, weight_side))


def weight_blocks(weight: np.ndarray, op: str, attrs: dict, weight_side: str = "right") -> np.ndarray:
    """The weight as a fresh (k, d_out, d_in) array (never a view of ``weight``)."""
    weight = np.asarray(weight)
    return np.array(_to_blocks(weight, op, attrs, weight_side), order="C", copy=True)


def blocks_to_weight(blocks: np.ndarray, op: str, attrs: dict, weight_shape,
                     weight_side: str = "right") -> np.ndarray:
    """Inverse of ``weight_blocks``: a new array of ``weight_shape`` holding ``blocks``."""
    index = block_index(weight_shape, op, attrs, weight_side)
    blocks = np.asarray(blocks)
    if blocks.shape != index.shape:
        raise OnnxPruneError(f"{op} blocks have shape {blocks.shape}, expected {index.shape}")
    flat = np.empty(index.size, dtype=blocks.dtype)
    flat[index.ravel()] = blocks.ravel()
    return flat.reshape(tuple(weight_shape))


def input_rows(x: np.ndarray, op: str, attrs: dict, weight_shape, weight_side: str = "right", *,
               max_positions: int | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """The layer input ``x`` as rows (k, n, d_in) matching ``weight_blocks``.

    Conv/ConvTranspose rows are im2col patches ordered (sample, position); ``max_positions``
    keeps that many random positions per sample (drawn from ``rng``, default seed 0).
    float64 input stays float64, anything else becomes float32.
    """
    x = np.asarray(x)
    x = x.astype(np.float64 if x.dtype == np.float64 else np.float32, copy=False)
    shape = tuple(int(s) for s in weight_shape)
    k, _, d_in = block_shape(shape, op, attrs, weight_side)
    if op in ("Conv", "ConvTranspose"):
        rng = np.random.default_rng(0) if rng is None else rng
        return _conv_rows(x, op, attrs, shape, max_positions, rng)
    if op == "Gemm":
        rows = _gemm_activation(x, attrs, weight_side)
        if weight_side == "left":
            rows = rows.T  # columns of B' are the rows that meet A'
        rows = rows[None]
    else:
        rows = _batched_rows(_matmul_activation(x, weight_side), _matmul_batch(shape))
    if rows.shape[0] != k or rows.shape[-1] != d_in:
        raise OnnxPruneError(f"{op} input of shape {x.shape} does not fit weight {shape}")
    return np.ascontiguousarray(rows)


# --- weights -------------------------------------------------------------------------------

def _check_op(op: str, weight_side: str, rank: int) -> None:
    if op not in OPS:
        raise OnnxPruneError(f"unsupported op {op!r}; expected one of {', '.join(OPS)}")
    if weight_side not in _SIDES:
        raise OnnxPruneError(f"weight_side must be 'right' or 'left', got {weight_side!r}")
    if op in ("Conv", "ConvTranspose") and (weight_side != "right" or rank < 3):
        raise OnnxPruneError(f"{op} weight must be the right operand with rank >= 3")
    if op == "Gemm" and rank != 2:
        raise OnnxPruneError(f"Gemm weight must have rank 2, got rank {rank}")
    if op == "MatMul" and rank < 1:
        raise OnnxPruneError("MatMul weight must have rank >= 1")


def _to_blocks(w: np.ndarray, op: str, attrs: dict, weight_side: str) -> np.ndarray:
    """View (or small copy) of ``w`` rearranged as (k, d_out, d_in)."""
    k, d_out, d_in = block_shape(w.shape, op, attrs, weight_side)
    if op == "Conv":
        out = w.reshape(k, d_out, d_in)
    elif op == "ConvTranspose":
        spatial = tuple(range(3, w.ndim + 1))
        grouped = w.reshape(k, w.shape[0] // k, *w.shape[1:])  # (g, C_in/g, C_out/g, *kernel)
        grouped = np.flip(grouped, axis=spatial).transpose(0, 2, 1, *spatial)
        out = grouped.reshape(k, d_out, d_in)
    elif op == "Gemm":
        out = (w if _gemm_weight_is_rowmajor(attrs, weight_side) else w.T)[None]
    elif w.ndim == 1:
        out = w.reshape(1, 1, d_in)
    elif weight_side == "right":
        out = w.reshape(k, d_in, d_out).transpose(0, 2, 1)
    else:
        out = w.reshape(k, d_out, d_in)
    assert out.shape == (k, d_out, d_in)
    return out


def _gemm_weight_is_rowmajor(attrs: dict, weight_side: str) -> bool:
    """True when the stored Gemm weight already is (d_out, d_in)."""
    if weight_side == "right":
        return bool(_int(attrs, "transB", 0))
    return not _int(attrs, "transA", 0)


# --- Gemm / MatMul inputs -----------------------------------------------------------------

def _gemm_activation(x: np.ndarray, attrs: dict, weight_side: str) -> np.ndarray:
    """A' (right weight) or B' (left weight) as the node actually uses it."""
    if x.ndim != 2:
        raise OnnxPruneError(f"Gemm input must have rank 2, got shape {x.shape}")
    transposed = _int(attrs, "transA" if weight_side == "right" else "transB", 0)
    return x.T if transposed else x


def _matmul_activation(x: np.ndarray, weight_side: str) -> np.ndarray:
    """Data operand as (..., n, d): rows on the second-to-last axis."""
    if x.ndim == 1:
        return x[None, :]  # a vector operand is one row, whichever side it is on
    return x if weight_side == "right" else np.swapaxes(x, -1, -2)


def _matmul_batch(weight_shape: tuple) -> tuple:
    return weight_shape[:-2] if len(weight_shape) > 2 else ()


def _batched_rows(x: np.ndarray, weight_batch: tuple) -> np.ndarray:
    """(..., n, d) broadcast against a weight with batch axes ``weight_batch`` -> (k, rows, d).

    Batch axes the weight indexes become blocks; axes it broadcasts over become rows.
    """
    try:
        full = np.broadcast_shapes(x.shape[:-2], weight_batch)
    except ValueError as exc:
        raise OnnxPruneError(f"MatMul input {x.shape} does not broadcast with weight batch {weight_batch}") from exc
    x = np.broadcast_to(x, full + x.shape[-2:])
    extra = len(full) - len(weight_batch)
    block_axes = [extra + i for i, size in enumerate(weight_batch) if size == full[extra + i]]
    row_axes = [a for a in range(len(full)) if a not in block_axes]
    order = block_axes + row_axes + [len(full), len(full) + 1]
    return x.transpose(order).reshape(math.prod(weight_batch), -1, x.shape[-1])


# --- convolutions ---------------------------------------------------------------------------

def _int(attrs: dict, name: str, default: int) -> int:
    value = attrs.get(name)
    return default if value is None else int(value)


def _ints(attrs: dict, name: str, default: tuple) -> tuple:
    value = attrs.get(name)
    if value is None or len(value) == 0:
        return default
    return tuple(int(v) for v in value)


def _group(attrs: dict, op: str, shape: tuple) -> int:
    group = _int(attrs, "group", 1)
    channels = shape[0]  # C_out for Conv, C_in for ConvTranspose: both split into groups
    if group < 1 or channels % group:
        raise OnnxPruneError(f"{op} group={group} does not divide weight dimension {channels}")
    return group


def _auto_pad(attrs: dict) -> str:
    value = attrs.get("auto_pad", "NOTSET")
    value = value.decode() if isinstance(value, bytes) else str(value)
    if value not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise OnnxPruneError(f"unknown auto_pad {value!r}")
    return value


def _conv_rows(x, op, attrs, shape, max_positions, rng):
    n_sp = len(shape) - 2
    kernel = shape[2:]
    if _ints(attrs, "kernel_shape", kernel) != kernel:
        raise OnnxPruneError(f"{op} kernel_shape {attrs['kernel_shape']} differs from weight {shape}")
    if x.ndim != n_sp + 2:
        raise OnnxPruneError(f"{op} input must have rank {n_sp + 2}, got shape {x.shape}")
    group = _group(attrs, op, shape)
    in_channels = shape[1] * group if op == "Conv" else shape[0]
    if x.shape[1] != in_channels:
        raise OnnxPruneError(f"{op} input has {x.shape[1]} channels, weight expects {in_channels}")
    strides = _ints(attrs, "strides", (1,) * n_sp)
    dilations = _ints(attrs, "dilations", (1,) * n_sp)
    extent = tuple(d * (k - 1) + 1 for d, k in zip(dilations, kernel))
    if op == "Conv":
        head, tail = _conv_pads(x.shape[2:], extent, strides, attrs)
        return _im2col(x, group, kernel, strides, dilations, head, tail, max_positions, rng)
    head, tail = _conv_transpose_pads(x.shape[2:], extent, strides, attrs)
    adjust = _ints(attrs, "output_padding", (0,) * n_sp)
    # Direct-conv form: zeros between input pixels, then pad so every kernel tap is covered.
    spread = np.zeros(x.shape[:2] + tuple((s - 1) * st + 1 for s, st in zip(x.shape[2:], strides)), x.dtype)
    spread[(slice(None), slice(None)) + tuple(slice(None, None, st) for st in strides)] = x
    direct_head = tuple(e - 1 - h for e, h in zip(extent, head))
    direct_tail = tuple(e - 1 - t + a for e, t, a in zip(extent, tail, adjust))
    return _im2col(spread, group, kernel, (1,) * n_sp, dilations, direct_head, direct_tail, max_positions, rng)


def _conv_pads(sizes, extent, strides, attrs):
    """(head, tail) padding of a Conv per spatial axis, auto_pad as onnxruntime applies it."""
    n_sp = len(sizes)
    mode = _auto_pad(attrs)
    if mode == "VALID":
        return (0,) * n_sp, (0,) * n_sp
    if mode == "NOTSET":
        pads = _ints(attrs, "pads", (0,) * (2 * n_sp))
        return pads[:n_sp], pads[n_sp:]
    totals = [max(0, (-(-s // st) - 1) * st + e - s) for s, e, st in zip(sizes, extent, strides)]
    return _split_pads(totals, upper=mode == "SAME_UPPER")


def _conv_transpose_pads(sizes, extent, strides, attrs):
    """(head, tail) cropping of a ConvTranspose output, as onnxruntime (and the spec) define it."""
    n_sp = len(sizes)
    mode = _auto_pad(attrs)
    adjust = _ints(attrs, "output_padding", (0,) * n_sp)
    natural = [st * (s - 1) + a + e for s, e, st, a in zip(sizes, extent, strides, adjust)]
    wanted = _ints(attrs, "output_shape", ())
    if len(wanted) == n_sp + 2:
        wanted = wanted[2:]
    if wanted:
        if len(wanted) != n_sp:
            raise OnnxPruneError(f"ConvTranspose output_shape {wanted} does not match {n_sp} spatial axes")
        totals = [nat - w for nat, w in zip(natural, wanted)]
        if any(t < 1 - st for t, st in zip(totals, strides)):
            raise OnnxPruneError(f"ConvTranspose output_shape {wanted} exceeds the natural size "
                                 f"{natural} by a stride or more")
        head, tail = _split_pads([max(t, 0) for t in totals], upper=mode == "SAME_UPPER")
        # up to stride - 1 beyond the natural size: positions no input reaches, zeros at the end
        return head, tuple(t + min(total, 0) for t, total in zip(tail, totals))
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        totals = [max(0, nat - s * st) for nat, s, st in zip(natural, sizes, strides)]
        return _split_pads(totals, upper=mode == "SAME_UPPER")
    if mode == "VALID":
        return (0,) * n_sp, (0,) * n_sp
    pads = _ints(attrs, "pads", (0,) * (2 * n_sp))
    return pads[:n_sp], pads[n_sp:]


def _split_pads(totals, upper: bool):
    """SAME_UPPER puts the odd extra pad at the end, everything else at the start."""
    head = tuple(t // 2 if upper else t - t // 2 for t in totals)
    return head, tuple(t - h for t, h in zip(totals, head))


def _im2col(x, group, kernel, strides, dilations, head, tail, max_positions, rng):
    """Patches of x (N, C, *S) for a direct conv: (group, N * positions, C/group * prod(kernel))."""
    n_sp = len(kernel)
    # Negative padding crops (ConvTranspose with large pads); positive padding adds zeros.
    crop = tuple(slice(max(0, -h), s - max(0, -t)) for s, h, t in zip(x.shape[2:], head, tail))
    x = x[(slice(None), slice(None)) + crop]
    x = np.pad(x, [(0, 0), (0, 0)] + [(max(0, h), max(0, t)) for h, t in zip(head, tail)])
    extent = tuple(d * (k - 1) + 1 for d, k in zip(dilations, kernel))
    if any(s < e for s, e in zip(x.shape[2:], extent)):
        raise OnnxPruneError(f"padded input {x.shape[2:]} is smaller than the kernel extent {extent}")
    grouped = x.reshape(x.shape[0], group, x.shape[1] // group, *x.shape[2:])
    spatial = tuple(range(3, 3 + n_sp))
    windows = np.lib.stride_tricks.sliding_window_view(grouped, extent, axis=spatial)
    windows = windows[(slice(None),) * 3 + tuple(slice(None, None, s) for s in strides)
                      + tuple(slice(None, None, d) for d in dilations)]
    # (N, g, c, *out, *kernel) -> (g, N, *out, c, *kernel): row = one patch of one group
    windows = windows.transpose(1, 0, *range(3, 3 + n_sp), 2, *range(3 + n_sp, 3 + 2 * n_sp))
    n, out = x.shape[0], windows.shape[2:2 + n_sp]
    positions = math.prod(out)
    d_in = math.prod(windows.shape[2 + n_sp:])
    if max_positions is None or max_positions >= positions:
        return np.ascontiguousarray(windows).reshape(group, n * positions, d_in)
    if max_positions < 1:
        raise OnnxPruneError(f"max_positions must be >= 1, got {max_positions}")
    # Independent random positions per sample, kept in raster order.
    chosen = np.sort(np.argsort(rng.random((n, positions)), axis=1)[:, :max_positions], axis=1)
    coords = np.unravel_index(chosen, out)
    picked = windows[(slice(None), np.arange(n)[:, None]) + coords]
    return np.ascontiguousarray(picked).reshape(group, n * max_positions, d_in)
