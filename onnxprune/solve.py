"""New weights for one layer: glue between a Layer, its statistics and the numpy methods.

A layer's stored tensor is viewed as blocks (k, d_out, d_in) through `layout`; a method works on
blocks; the result goes back into a stored-shape array. No ONNX here beyond the Layer record.
"""
from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from . import layout
from .calibration.accumulators import LayerStats
from .graph import Layer
from .methods import dc, ltp, ltp_weights, magnitude, refit
from .report import progress_counter


# (ours) adaptive-lasso weighting of DC's L1 term, (mean|W| / |W_ij|): on the reference CNN at
# 0.9 it picked better supports than the paper's plain L1 (95.2 % vs 93.9 % accuracy).
DC_L1_REWEIGHT = 1.0
_MULTITHREAD_WORK = 30_000_000  # multiply-adds per LTP weight step above which BLAS uses all threads


def block_index(layer: Layer) -> np.ndarray:
    """(k, d_out, d_in) flat indices into the STORED tensor."""
    idx = layout.block_index(layer.operand_shape, layer.layout_op, layer.attrs, layer.weight_side)
    return idx if layer.index is None else layer.index.reshape(-1)[idx]


def bias_blocks(layer: Layer, bias: np.ndarray | None, k: int, d_out: int) -> np.ndarray | None:
    """The bias as (k, d_out) when each block owns a slice of it (else None: left untouched)."""
    if bias is None or bias.size != k * d_out:
        return None
    if layer.weight_side == "left":  # W X + C: outputs are C's rows (a 1-D C adds per column)
        per_output = bias.shape == (d_out, 1)
    else:  # 0-D with one output, 1-D, (1, d_out) as some exporters write a Gemm's C, or split
        per_output = bias.ndim <= 1 or bias.shape[0] == 1 or bool(layer.channel_split)
    if not per_output:
        return None
    if layer.layout_op == "MatMul" and k != 1:
        return None
    return bias.reshape(k, d_out)


def block_keeps(W: np.ndarray, n_keep: int) -> list[int]:
    """Each block's share of a layer's n_keep largest |w| (ties: earlier first), what magnitude
    pruning keeps there. Blocks are not alike (a depthwise conv's kernels): an even split cost
    DC 40 % more output error than plain magnitude pruning on one."""
    k = len(W)
    if k == 1:
        return [min(n_keep, W.size)]
    flat = np.abs(W).reshape(k, -1)
    if n_keep >= flat.size:
        return [flat.shape[1]] * k
    kept = np.argsort(-flat.ravel(), kind="stable")[:n_keep]
    return np.bincount(kept // flat.shape[1], minlength=k).tolist()


def dc_layer(layer: Layer, stored: np.ndarray, n_zero: int, stats: LayerStats,
             bias: np.ndarray | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """DC (FeTa) for every block of a layer; returns (new stored weight, new stored bias or None)."""
    idx = block_index(layer)
    k, d_out, d_in = idx.shape
    W = solver_blocks(layer, stored, idx).astype(np.float64)
    b = bias_blocks(layer, solver_bias(layer, bias), k, d_out)
    use_relu = layer.relu and stats.row_cap > 0 and (bias is None or b is not None)
    keeps = block_keeps(W, stored.size - n_zero)
    new_W, new_b = np.empty_like(W), None if b is None else np.empty_like(b, dtype=np.float64)
    # DC's many small products run 5-6x faster on one BLAS thread than with idle threads spinning
    with threadpool_limits(limits=1, user_api="blas"):
        _dc_blocks(W, b, new_W, new_b, keeps, stats, use_relu, seed)
    return _to_stored(layer, stored, idx, new_W, n_zero), None if new_b is None else stored_bias(layer, new_b, bias)


def _dc_blocks(W, b, new_W, new_b, keeps, stats, use_relu, seed) -> None:
    # (ours) the DC support refitted by least squares (with the bias) is a second candidate,
    # and the one nearer the dense ReLU outputs on the rows is kept; not where the rows are fewer
    # than the inputs, since a fit to those rows then says little about other data (it cost the
    # reference CNN's fc1, 512 rows for 3,136 inputs, 0.15 points at 0.95)
    second = use_relu and stats.low_rank() is None
    for j in range(len(W)):
        bj = None if b is None else b[j].astype(np.float64)
        if use_relu:
            Wj, bj_new = dc.dc_relu_block(stats.rows[j], W[j], bj, keeps[j], seed=seed,
                                          l1_reweight=DC_L1_REWEIGHT)
            candidates = [(Wj, bj_new)]
            if second:
                gram = stats.augmented_gram[j] if bj is not None else stats.gram[j]
                candidates.append(refit.refit_with_bias(W[j], bj, Wj != 0, gram))
            Wj, bj = candidates[dc.nearest_on_rows(stats.rows[j], W[j], bj, candidates)]
        else:
            gram = stats.augmented_gram[j] if bj is not None else stats.gram[j]
            Wj, bj = dc.dc_linear_block(gram, W[j], bj, keeps[j], seed=seed,
                                        l1_reweight=DC_L1_REWEIGHT)
        new_W[j] = Wj
        if new_b is not None:
            new_b[j] = bj


def refit_layer(layer: Layer, dense: np.ndarray, pruned: np.ndarray, stats: LayerStats,
                bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Least-squares refit of the kept weights, and of the bias where each block owns a slice
    of it, so the layer reproduces its DENSE output on the calibration data (the zeros stay
    zero). Returns (new stored weight, new stored bias or None). Each output row is fitted on
    its own, so the scale after the layer (solver_blocks) changes nothing but the bias map."""
    idx = block_index(layer)
    k, d_out, _ = idx.shape
    keep = pruned.reshape(-1)[idx] != 0
    b = bias_blocks(layer, solver_bias(layer, bias), k, d_out)
    if b is None:
        W = dense.reshape(-1)[idx].astype(np.float64)
        with threadpool_limits(limits=1, user_api="blas"):  # batched small solves: see dc_layer
            new = refit.refit_on_support(W, keep, stats.gram, factor=_low_rank_factor(stats))
        return _to_stored(layer, pruned, idx, new), None
    # (ours) the bias is refitted with the weights (Gram of [X 1]): the kept weights no longer
    # have to make up for the mean the pruned ones carried (global-mt --refit at 0.95: animal_mlp
    # 61.45 -> 66.85 %, digits_cnn 60.83 -> 65.83 %)
    W = solver_blocks(layer, dense, idx).astype(np.float64)
    with threadpool_limits(limits=1, user_api="blas"):
        new, new_b = refit.refit_with_bias(W, b, keep, stats.augmented_gram, factor=_low_rank_factor(stats, True))
    n_zero = int(np.count_nonzero(pruned == 0))
    return _to_stored(layer, pruned, idx, new, n_zero), stored_bias(layer, new_b, bias)


def _low_rank_factor(stats: LayerStats, augmented: bool = False) -> np.ndarray | None:
    """The low-rank factor of the Gram (of [X 1] when `augmented`) when it was summed from fewer
    rows than inputs (kept for a trail's levels), else None."""
    rank, key = stats.low_rank(augmented), ("factor", augmented)
    if rank is not None and key not in stats.derived:
        stats.derived[key] = refit.low_rank_factor(stats.augmented_gram if augmented else stats.gram, rank)
    return stats.derived.get(key)


def ltp_layer(layer: Layer, stored: np.ndarray, n_zero: int, stats: LayerStats,
              bias: np.ndarray | None, refitted: bool):
    """LTP's weight learning within the layer's budget (all blocks share it), the bias learning
    with the weights where each block owns a slice of it. Returns (new stored weight, new bias
    or None, whether the learned support won over the dense top-k)."""
    idx = block_index(layer)
    k, d_out, d_in = idx.shape
    W = solver_blocks(layer, stored, idx).astype(np.float64)
    b = bias_blocks(layer, solver_bias(layer, bias), k, d_out)
    rank = stats.low_rank(augmented=b is not None)
    # small products run faster on one BLAS thread (see dc_layer), large ones on all
    step_work = k * d_out * d_in * min(d_in, rank or d_in)
    with threadpool_limits(limits=1 if step_work < _MULTITHREAD_WORK else None, user_api="blas"):
        gram = stats.gram if b is None else stats.augmented_gram
        key = ("ltp", b is not None)  # the same at every level of a trail: derived once
        if key not in stats.derived:
            stats.derived[key] = ltp_weights.derive(gram, rank)
        new, new_b, learned = ltp_weights.ltp_support_weights(
            W, gram, stored.size - n_zero, refit=refitted, bias=b, derived=stats.derived[key])
    new_bias = None if new_b is None else stored_bias(layer, new_b, bias)
    return _to_stored(layer, stored, idx, new, n_zero), new_bias, learned


def magnitude_layer(stored: np.ndarray, n_zero: int, cut: magnitude.Cut | None = None) -> np.ndarray:
    """`stored` with its n_zero smallest |w| set to zero (by `cut` when the ranking gave one)."""
    cut = cut or magnitude.layer_cut(stored, n_zero)
    return magnitude.apply_cut(stored.reshape(-1), cut)[0].reshape(stored.shape)


def _output_scale(layer: Layer, shape) -> np.ndarray | float:
    """Per block row: what the next node sees of a unit of the layer's output (the scale of a
    BatchNormalization or Mul after it, see affine.AffineAfter), as (k, d_out, 1)."""
    k, d_out, _ = shape
    return 1.0 if layer.affine is None else layer.affine.scale.reshape(k, d_out, 1)


def solver_blocks(layer: Layer, stored: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The weight as (k, d_out, d_in) blocks, as the solvers see it: with the scale after the
    layer folded in (float64), else the stored values."""
    blocks = stored.reshape(-1)[idx]
    return blocks if layer.affine is None else blocks.astype(np.float64) * _output_scale(layer, idx.shape)


def _bias_map(layer: Layer, bias: np.ndarray) -> tuple:
    """(mul, add), per output: the bias as the solvers see it is mul * stored + add (`bias`: the
    dense stored one). The map after the layer scales its bias and adds its shift; where a
    constant it adds (BN's B) is the bias, it enters as it is: the shift is `affine.shift` at
    the dense constant."""
    affine = layer.affine
    if affine is None:
        return layer.bias_scale, 0.0
    if affine.holds_bias:
        return 1.0, affine.shift - bias.astype(np.float64).reshape(-1)
    return affine.scale * layer.bias_scale, affine.shift


def solver_bias(layer: Layer, bias: np.ndarray | None) -> np.ndarray | None:
    """The stored bias as the solvers see it (output = X W^T + b), float64, in the stored shape
    (per channel, flat, with a map after the layer: the constant it adds may be (C, 1, 1))."""
    if bias is None:
        return None
    mul, add = _bias_map(layer, bias)
    solved = mul * bias.astype(np.float64).reshape(-1) + add
    return solved if layer.affine is not None else solved.reshape(bias.shape)


def stored_bias(layer: Layer, solved: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The solvers' bias back in the stored form of the dense `bias` (kept where BN's scale is 0:
    that channel's output does not depend on it)."""
    mul, add = (np.broadcast_to(v, (bias.size,)) for v in _bias_map(layer, bias))
    back = bias.astype(np.float64).reshape(-1)
    live = mul != 0
    back[live] = (np.asarray(solved, dtype=np.float64).reshape(-1)[live] - add[live]) / mul[live]
    return back.reshape(bias.shape).astype(bias.dtype)


def _to_stored(layer: Layer, stored: np.ndarray, idx: np.ndarray, blocks: np.ndarray,
               n_zero: int | None = None) -> np.ndarray:
    """Blocks back into a copy of `stored`; with `n_zero`, blocks as the solvers see them
    (solver_blocks), and the layer's zero count. A channel scaled by 0 after the layer computes
    a constant, so the solvers saw its weights as zeros: they stay zeros, except the largest,
    which keep their values where the count needs them (they change nothing)."""
    dead = None
    if n_zero is not None and layer.affine is not None:
        scale = _output_scale(layer, idx.shape)
        with np.errstate(divide="ignore", invalid="ignore"):
            blocks = np.where(scale != 0, blocks / np.where(scale != 0, scale, 1.0), 0.0)
        dead = np.broadcast_to(scale == 0, idx.shape)
    out = np.array(stored, copy=True).reshape(-1)
    out[idx.reshape(-1)] = _in_dtype(blocks.reshape(-1), stored.dtype)
    if dead is not None and dead.any():
        excess = int(np.count_nonzero(out == 0)) - n_zero
        spare = idx[dead & (stored.reshape(-1)[idx] != 0)]
        if excess > 0 and spare.size:
            back = spare[np.argsort(-np.abs(stored.reshape(-1)[spare]), kind="stable")[:excess]]
            out[back] = stored.reshape(-1)[back]
    return out.reshape(stored.shape)


def _in_dtype(values: np.ndarray, dtype) -> np.ndarray:
    """`values` cast to `dtype`, a nonzero one kept nonzero: where it rounds to 0 (a tiny solved
    weight in float16 / bfloat16), the smallest subnormal of its sign, so the zero count stays
    the one the mask set."""
    cast = np.asarray(values).astype(dtype)
    lost = (cast == 0) & (values != 0)
    if lost.any():
        bits = cast.view(f"u{cast.itemsize}")
        bits[lost] = np.where(values[lost] < 0, 1 << (8 * cast.itemsize - 1), 0) | 1
    return cast


def ltp_allocation(layers: list[Layer], dense: list[np.ndarray], stats: dict[str, LayerStats],
                   targets: list[int], seed: int = 0, progress: bool = False) -> list:
    """LTP's thresholds for the calibrated `layers`, learned along one optimisation path through
    the increasing zero counts `targets`: one LTP result (with per-layer .zeros) per target.

    (ours) The L0 term is divided by the number of ALL weights, not each layer's own size: with
    the per-layer form of ALGORITHMS.md, lambda prices a layer's kept FRACTION, so emptying a
    small layer (or one whose output is carried by a few weights) looked nearly free and the
    network collapsed (10-15 % accuracy on the reference CNNs at 0.9). Each weight is priced at
    its OBS saliency, the error left once the row's other weights compensate (what --refit
    does, with its damping), and a layer's relative error e enters as e / (1 - e), its
    noise-to-signal ratio, which is what adds up along a chain of layers. With plain masking
    errors summed, the objective let the largest layer lose most of its signal (animal_mlp at
    0.95 with --refit: 20.2 % instead of 67.6 %; README, LTP).
    """
    weights = [solver_blocks(layer, array, block_index(layer)) for layer, array in zip(layers, dense)]
    # one large inverse per layer: all BLAS threads
    obs = {}  # layers with the same inputs share their LayerStats: one inverse for them all
    for layer in layers:
        shared = stats[layer.key]
        if id(shared) not in obs:
            obs[id(shared)] = ltp.obs_gram(shared.gram, rank=shared.low_rank())
    grams = [obs[id(stats[layer.key])] for layer in layers]
    # many small products: see dc_layer; the number of lambda probes is not known in advance
    with threadpool_limits(limits=1, user_api="blas"), \
            progress_counter(progress, "learning thresholds", " probes") as bar:
        result = ltp.learn_thresholds(weights, grams, targets[-1], seed=seed, l0="total",
                                      loss="nsr", trail=targets if len(targets) > 1 else None,
                                      on_probe=lambda probe: bar.update(1))
    return result.levels or [result]
