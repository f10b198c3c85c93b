"""Least-squares refit of the kept weights of a pruned layer, from its calibration Gram matrix.

For every output row `w` and its support S (the kept positions) the refit solves

    min_v (v - w)^T H (v - w)   subject to v = 0 off S,      H = G + delta * I,

i.e. the kept weights are re-chosen so that the sparse row reproduces the dense row's output on the
calibration inputs (`G = X^T X`) as well as it can. The solution is `v_S = H_SS^-1 (H w)_S`.

`delta = damping * mean(diag G)` (SparseGPT's 1 % dampening). It keeps `H_SS` invertible when the
calibration data do not span all inputs (few samples, dead channels) and pulls the solution towards
the original weights in directions the data say nothing about. A block whose Gram is all zeros has
no information at all; it gets `H = I`, for which the refit is plain masking.

Exact and batched: each row is solved on its kept set S or, when fewer weights are pruned than
kept, on its pruned set P in the OBS form `v = w - Hinv[:, P] (Hinv_PP)^-1 w_P` (one inverse of H
per block, shared by all rows), so no system is larger than min(|S|, |P|) <= d_in / 2. Rows with
alike sizes are gathered into padded stacks for one batched solve. The cost is dominated by
rows * min(|S|, |P|)^3 / 3. When the Gram was summed from r < d_in rows (G = F F^T, see
low_rank_factor), rows whose systems are larger than about r solve r x r systems instead
(Woodbury; animal_cnn's fc1, 3136 inputs and 512 calibration rows, at 0.5: 11 -> 5-8 s).
`masked_cg` is the approximate alternative (DC's refit uses it): batched conjugate gradient on
all rows at once, one (rows, d_in) x (d_in, d_in) product per iteration.

Bias: left untouched here. The function works on any Gram, so a bias refit is available by
augmentation: pass `[W | b]`, the Gram of `[X | 1]` and a mask whose last column is kept.
"""

from __future__ import annotations

import numpy as np

from ..errors import OnnxPruneError


def as_stack(name: str, a: np.ndarray) -> np.ndarray:
    """`a` as a stack of blocks (k, rows, cols): a 2-D array is one block."""
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise OnnxPruneError(f"{name} must have 2 or 3 dimensions, got shape {a.shape}")
    return a


def damped_gram(gram: np.ndarray, damping: float) -> np.ndarray:
    """`G + damping * mean(diag G) * I` per block (k, d, d); an all-zero block becomes the identity."""
    return _add_damping(np.array(gram, dtype=np.float64), damping)


def ridge(gram: np.ndarray, damping: float) -> np.ndarray:
    """What the damping adds to each block's diagonal: damping * mean(diag G), 1 for an all-zero
    block (k,)."""
    d = gram.shape[-1]
    mean_diag = np.einsum("kii->k", gram) / d if d else np.zeros(len(gram))
    return np.where(mean_diag > 0, damping * mean_diag, 1.0)


def _add_damping(g: np.ndarray, damping: float) -> np.ndarray:
    np.einsum("kii->ki", g)[:] += ridge(g, damping)[:, None]  # a writable view of the diagonals
    return g


def refit_gram(gram: np.ndarray, damping: float = 0.01) -> np.ndarray:
    """The symmetric, damped Gram stack that refit_on_support solves with."""
    G3 = as_stack("gram", gram)
    H = np.add(G3, np.swapaxes(G3, 1, 2), dtype=np.float64)  # one new array: a 3136-wide Gram
    H *= 0.5  # is 80 MB, and fresh pages cost as much as the arithmetic
    return _add_damping(H, damping)


def low_rank_factor(gram: np.ndarray, rank: int, seed: int = 0) -> np.ndarray:
    """F (k, d, r) with G = F F^T, for Grams summed from `rank` < d rows (rank at most `rank`):
    a randomised range finder, exact up to rounding then. Products with F cost r / d of one with
    G (animal_cnn's fc1 saw 512 rows for 3136 inputs: 6x cheaper)."""
    k, d, _ = gram.shape
    r = min(d, rank + 8)
    omega = np.random.default_rng(seed).standard_normal((d, r))
    q, _ = np.linalg.qr(gram @ omega)  # (k, d, r): an orthonormal basis of G's range
    gq = gram @ q
    b = np.swapaxes(q, 1, 2) @ gq
    vals, vecs = np.linalg.eigh(0.5 * (b + np.swapaxes(b, 1, 2)))
    return (q @ vecs) * np.sqrt(np.maximum(vals, 0.0))[:, None, :]


def output_error(W: np.ndarray, V: np.ndarray, gram: np.ndarray) -> float:
    """Squared output error on the calibration data: sum over blocks of trace((V-W) G (V-W)^T)."""
    W3 = as_stack("W", W).astype(np.float64)
    D = as_stack("V", V).astype(np.float64) - W3
    G = as_stack("gram", gram)
    return float(np.sum(D * (D @ G)))


# Gathered sub-systems are solved in chunks of about this many bytes.
_CHUNK_BYTES = 1 << 27


def _row_chunks(sel, row_bytes, budget):
    """The rows with a nonempty selection, sorted by its size, in chunks of about `budget`
    bytes (row_bytes(sizes) per row) and of alike sizes (so that little is padding). Yields
    (rows, idx, valid): idx (rows, smax) the selected positions of each row first, padded."""
    sizes = sel.sum(axis=1)
    order = np.argsort(sizes, kind="stable")
    order = order[sizes[order] > 0]
    cost = row_bytes(sizes[order].astype(np.float64))
    start = 0
    while start < len(order):
        span = np.arange(1, len(order) - start + 1)
        count = max(1, int(np.searchsorted(span * cost[start:], budget, side="right")))
        similar = sizes[order[start:]] <= 1.25 * sizes[order[start]] + 8
        count = min(count, max(1, int(np.searchsorted(~similar, True))))
        rows = order[start : start + count]
        smax = int(sizes[rows[-1]])
        idx = np.argsort(~sel[rows], axis=1, kind="stable")[:, :smax]
        valid = np.arange(smax)[None, :] < sizes[rows][:, None]
        yield rows, idx, valid
        start += len(rows)


def _solve_restricted(H, blk, sel, rhs_full, budget=_CHUNK_BYTES):
    """Solve H[b][I_r, I_r] y_r = rhs_full[r, I_r] for every row r, I_r = flatnonzero(sel[r]).

    H (k, d, d); blk, sel, rhs_full index rows. Rows are sorted by |I_r| and solved as padded
    batches (padding is an identity block with zero right-hand side, so it solves to zero).
    Returns one (rows, idx, valid, y) per chunk; `rows` index into the given rows.
    """
    out = []
    d = H.shape[-1]
    # bytes per row ~ 32 * size^2 (its system and indices)
    for rows, idx, valid in _row_chunks(sel, lambda size: 32.0 * size ** 2, budget):
        smax = idx.shape[1]
        base = (blk[rows] * d * d)[:, None, None] + idx[:, :, None] * d
        A = np.take(H, base + idx[:, None, :])  # H[b][I_r, I_r], padded (flat take: fast)
        A *= valid[:, :, None] & valid[:, None, :]
        A[~valid[:, :, None] & np.eye(smax, dtype=bool)[None]] = 1.0
        rhs = np.take_along_axis(rhs_full[rows], idx, axis=1) * valid
        try:
            y = np.linalg.solve(A, rhs[..., None])[..., 0]
        except np.linalg.LinAlgError:
            raise OnnxPruneError("refit: singular Gram on a row's support; use damping > 0") from None
        out.append((rows, idx, valid, y))
    return out


def _solve_low_rank(F, ridge, blk, sel, rhs_full, budget=_CHUNK_BYTES):
    """_solve_restricted for H = F F^T + ridge I (F (k, d, r), ridge (k,)), by the Woodbury
    identity H_SS^-1 c = (c - F_S (ridge I + F_S^T F_S)^-1 F_S^T c) / ridge: r x r systems,
    about r^2 |S| work per row instead of |S|^3 (a Gram summed from r < |S| rows)."""
    out = []
    r, d = F.shape[-1], sel.shape[1]
    # bytes per row: F_S and one product of its size, its right-hand side and index rows
    for rows, idx, valid in _row_chunks(sel, lambda size: 16.0 * r * size + 24.0 * d, budget):
        FS = F[blk[rows][:, None], idx] * valid[..., None]  # (rows, smax, r)
        c = np.take_along_axis(rhs_full[rows], idx, axis=1) * valid
        FSt = np.swapaxes(FS, 1, 2)
        K = FSt @ FS
        np.einsum("bii->bi", K)[:] += ridge[blk[rows]][:, None]
        y = np.linalg.solve(K, (FSt @ c[..., None]))
        out.append((rows, idx, valid, (c - (FS @ y)[..., 0]) / ridge[blk[rows]][:, None]))
    return out


def _refit_direct(W, M, H, factor=None, ridge=None):
    """Exact refit: each row solved on its kept or (OBS form) its pruned set, whichever is smaller,
    or through `factor` (G = F F^T, ridge: the damping per block) where that is cheaper."""
    k, d_out, d_in = W.shape
    Wr = W.reshape(k * d_out, d_in)
    Mr = M.reshape(k * d_out, d_in)
    blk = np.repeat(np.arange(k), d_out)
    kept = Mr.sum(axis=1)
    on_support = kept <= d_in - kept
    smaller = np.minimum(kept, d_in - kept).astype(np.float64)
    # where G = F F^T has rank r well below the system size, Woodbury's r x r systems are cheaper
    low_rank = (np.zeros(len(kept), dtype=bool) if factor is None else
                (2.0 * factor.shape[-1] ** 2 * kept < (2.0 / 3.0) * smaller ** 3)
                & (ridge[blk] > 0))  # undamped: H_SS may be singular, the direct solve says so
    V = np.where(Mr, Wr, 0.0)  # not Wr * Mr: a pruned negative weight would be -0.0
    if (on_support | low_rank).any():
        # v_S = H_SS^-1 (H w)_S
        WH = (W @ H).reshape(k * d_out, d_in)
        for chosen, solver in ((on_support & ~low_rank, lambda *a: _solve_restricted(H, *a)),
                               (low_rank, lambda *a: _solve_low_rank(factor, ridge, *a))):
            rows = np.flatnonzero(chosen)
            for sub, idx, valid, y in solver(blk[rows], Mr[rows], WH[rows]) if len(rows) else ():
                r = rows[sub]
                vr = np.zeros((len(r), d_in))
                np.put_along_axis(vr, idx, np.where(valid, y, 0.0), axis=1)
                V[r] = np.where(Mr[r], vr, 0.0)
    if (~on_support & ~low_rank).any():
        # OBS: v = w - Hinv[:, P] (Hinv_PP)^-1 w_P, which is exactly zero on the pruned set P
        rows = np.flatnonzero(~on_support & ~low_rank)
        try:
            Hinv = np.linalg.inv(H)
        except np.linalg.LinAlgError:
            raise OnnxPruneError("refit: singular Gram; use damping > 0") from None
        Hinv = 0.5 * (Hinv + np.swapaxes(Hinv, 1, 2))
        mu = np.zeros((k * d_out, d_in))  # the multipliers, scattered to their pruned positions
        for sub, idx, valid, y in _solve_restricted(Hinv, blk[rows], ~Mr[rows], Wr[rows]):
            r = rows[sub]
            vals = np.zeros((len(r), d_in))
            np.put_along_axis(vals, idx, np.where(valid, y, 0.0), axis=1)
            mu[r] = vals
        shift = (mu.reshape(k, d_out, d_in) @ Hinv).reshape(k * d_out, d_in)
        V[rows] = np.where(Mr[rows], Wr[rows] - shift[rows], 0.0)
    return V.reshape(k, d_out, d_in)


def refit_with_bias(W: np.ndarray, b: np.ndarray | None, mask: np.ndarray, gram: np.ndarray,
                    factor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """refit_on_support of a block (d_out, d_in) or stack (k, d_out, d_in) with its bias
    ((d_out,) / (k, d_out)) refitted too: `gram` (and `factor`) is then of [X 1] (the
    augmentation above); without a bias, of X. Returns (weights, bias)."""
    if b is None:
        return refit_on_support(W, mask, gram, factor=factor), None
    ones = np.ones((*np.shape(b), 1), bool)
    full = refit_on_support(np.concatenate([W, np.asarray(b)[..., None]], axis=-1),
                            np.concatenate([mask, ones], axis=-1), gram, factor=factor)
    return full[..., :-1], full[..., -1]


def masked_cg(C, rhs, x0, mask, damping, iters, tol):
    """Solve (C_SS + damping I) x_S = rhs_S for every row at once, S = the row's mask.

    Batched Jacobi-preconditioned conjugate gradient: each row of x is its own system; entries
    outside the mask stay 0. Products with C run in C's dtype (float32 for big blocks), the CG
    state in float64. Stops when every row's residual is below tol * ||rhs_row||, or after
    `iters` iterations (CG lowers the refit objective at every iteration, so stopping is safe).
    """
    x = np.where(mask, x0, 0.0)
    apply = lambda p: np.where(mask, p.astype(C.dtype) @ C, 0.0) + damping * p  # noqa: E731
    r = np.where(mask, rhs, 0.0) - apply(x)
    inv_diag = np.where(mask, 1.0 / (np.diag(C) + damping), 0.0)
    z = r * inv_diag
    p = z.copy()
    rz = np.sum(r * z, axis=1)
    limit = tol * np.linalg.norm(np.where(mask, rhs, 0.0), axis=1)
    for _ in range(iters):
        if np.all(np.linalg.norm(r, axis=1) <= limit):
            break
        ap = apply(p)
        pap = np.sum(p * ap, axis=1)
        alpha = np.divide(rz, pap, out=np.zeros_like(rz), where=pap > 0)
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        z = r * inv_diag
        rz_new = np.sum(r * z, axis=1)
        beta = np.divide(rz_new, rz, out=np.zeros_like(rz), where=rz > 0)
        p = z + beta[:, None] * p
        rz = rz_new
    return x


def refit_on_support(
    W: np.ndarray,
    mask: np.ndarray,
    gram: np.ndarray,
    *,
    damping: float = 0.01,
    damped: np.ndarray | None = None,
    factor: np.ndarray | None = None,
) -> np.ndarray:
    """Refit the kept weights (mask True) of a stack W (k, d_out, d_in) given its Gram (k, d_in, d_in).

    Returns new float64 weights of W's shape, exactly zero where `mask` is False. A 2-D W / mask /
    gram is one block. Solved exactly: batched direct solves on the kept or on the pruned set of
    each row, whichever is smaller.
    `damped`: refit_gram(gram, damping), when the caller refits several supports of one layer.
    `factor`: F (k, d_in, r) with gram = F F^T, when the Gram was summed from r < d_in rows: rows
    with many kept weights are then solved through r x r systems (Woodbury), same result.
    """
    squeeze = np.ndim(W) == 2
    W3 = as_stack("W", W).astype(np.float64)
    M = as_stack("mask", mask).astype(bool)
    G3 = np.asarray(as_stack("gram", gram), dtype=np.float64)  # no copy of a wide Gram
    k, d_out, d_in = W3.shape
    if M.shape != W3.shape or G3.shape != (k, d_in, d_in):
        raise OnnxPruneError(
            f"refit: shapes do not match: W {W3.shape}, mask {M.shape}, gram {G3.shape}"
        )
    if not damping >= 0:
        raise OnnxPruneError(f"refit: damping must be >= 0, got {damping}")
    if not (np.all(np.isfinite(G3)) and np.all(np.isfinite(W3))):
        raise OnnxPruneError("refit: weights and Gram must be finite")
    H = refit_gram(G3, damping) if damped is None else damped
    if factor is not None:
        factor = as_stack("factor", np.asarray(factor, dtype=np.float64))
        if factor.shape[:2] != (k, d_in):
            raise OnnxPruneError(f"refit: factor of shape {factor.shape} does not match gram {G3.shape}")
    V = _refit_direct(W3, M, H, factor, ridge(G3, damping))
    return V[0] if squeeze else V
