"""LTP's second half: the weights learn under the soft mask, within a layer's learned budget.

In the LTP paper weights and thresholds train together, so the surviving weights are not the
dense network's largest. ltp.py learns the thresholds (the allocation) with the weights fixed;
here each layer's weights then learn on its calibration reconstruction error through the same
soft mask,

    min_W  trace((W*m - W0) H (W*m - W0)^T),   m = sigmoid((w^2 - tau) / T),

- with LTP's gradient rule dv/dw := m (the full derivative lost on the deep CNN: 85 % against
  91 % at 0.9);
- tau re-set every 4 steps between the budget's last kept and first pruned w^2: the budget
  binds exactly, as the L0 term does once lambda is found;
- H = Gram + DAMPING * mean(diag) I: a pull towards W0 where 512 calibration samples say little.
Ours:
- T annealed geometrically from T_START * tau to T_END * tau: a wide mask lets every weight near
  the threshold move, a sharp one makes the soft error the hard one;
- Adam with ONE second moment per layer: per-weight normalisation moves every weight at the
  same speed whatever its effect on the error (deep CNN at 0.9: 63.6 % against 85-91 %);
- steps of LR times the starting threshold's |w|, cosine-decayed (in units of the RMS weight
  they overshot at 50 % sparsity, where MiniLM's learned supports lost to the dense top-k);
- the weights learn in saliency units u_ij = w_ij / sqrt([H^-1]_jj) (H: the Gram damped 1 %),
  so the mask thresholds the same OBS saliency u^2 that ltp.py's thresholds were learned on,
  and a weight on a strong input counts for more than one on a weak input. With the mask on
  plain w^2 MiniLM kept less (mean cosine 0.938 / 0.802 at 0.5 / 0.7 against 0.955 / 0.852);
  preconditioning the steps alone changed nothing (0.939).
Then the support is exactly the layer's budget of largest learned |u| (top_k_mask, ties as in
magnitude pruning).
STEPS: 400; with 200 MiniLM at 0.5 stayed below DC (0.951 against 0.953).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .magnitude import keep_threshold, top_k_mask
from .refit import damped_gram, low_rank_factor, refit_gram, refit_on_support, ridge

STEPS = 400
LR = 0.05  # step, times the starting threshold's |w|, cosine-decayed to 0
T_START, T_END = 1.0, 0.01  # temperature, times tau, annealed geometrically
DAMPING = 0.03  # of the mean Gram diagonal: the pull towards the dense weights
_ADAM = (0.9, 0.999, 1e-30)


def inverse_diagonal(gram: np.ndarray, damping: float = 0.01,
                     factor: np.ndarray | None = None) -> np.ndarray:
    """[H^-1]_ii per block (k, d), H = G + damping * mean(diag G) * I (an all-zero block: H = I).
    With `factor` (G = F F^T of rank r < d) by the Woodbury identity, r x r solves only."""
    G = np.asarray(gram, dtype=np.float64)
    k, d, _ = G.shape
    out = np.ones((k, d))
    ridges = ridge(G, damping)
    for b in np.flatnonzero(np.einsum("kii->k", G) > 0):  # an all-zero block: H = I
        if factor is not None:
            # (ridge I + F F^T)^-1 = (I - F (ridge I + F^T F)^-1 F^T) / ridge
            F = np.asarray(factor[b], dtype=np.float64)
            M = F.T @ F
            np.einsum("ii->i", M)[:] += ridges[b]
            out[b] = (1.0 - np.einsum("ij,ji->i", F, np.linalg.solve(M, F.T))) / ridges[b]
        else:
            out[b] = np.diagonal(np.linalg.inv(damped_gram(G[b:b + 1], damping)[0]))
    return out


def learn_weights(W: np.ndarray, gram: np.ndarray | None, n_keep: int, *, bias: bool = False,
                  factor: np.ndarray | None = None, steps: int = STEPS, lr: float = LR,
                  damping: float = DAMPING) -> np.ndarray:
    """Weights of a stack W (k, d_out, d_in) learned through the soft mask with n_keep kept (see
    the module docstring); Gram (k, d_in, d_in). With `bias`, W's last column is the bias and
    the Gram is that of [X, 1]: the bias learns too, unmasked and not counted. `factor`:
    low_rank_factor(gram, rows) when the Gram was summed from fewer rows than inputs (cheaper
    steps; `gram` may then be None). Weights that are zero in W stay zero. Returns float32
    weights of W's shape."""
    W0 = np.asarray(W, dtype=np.float32)
    live = W0 != 0
    if bias:
        live[..., -1] = False  # never masked, never counted; it learns through `free`
    if n_keep <= 0 or n_keep >= np.count_nonzero(live):
        return W0.copy()
    free = live.copy()
    if bias:
        free[..., -1] = True
    if factor is not None:  # the Gram is F F^T: its diagonal is all the steps need of it
        diag = np.einsum("kdr,kdr->k", factor, factor) / max(factor.shape[1], 1)
        factor = factor.astype(np.float32)
        factor_t = np.ascontiguousarray(np.swapaxes(factor, 1, 2))
    else:
        G = np.asarray(gram, dtype=np.float64)
        diag = np.einsum("kii->k", G) / max(G.shape[-1], 1)
        G32 = damped_gram(G, damping).astype(np.float32)
    damp = (damping * diag).astype(np.float32)[:, None, None]
    w = W0.copy()
    m1, m2 = np.zeros_like(w), 0.0
    x, m, r, g = (np.empty_like(w) for _ in range(4))
    b1, b2, eps = _ADAM
    masked = not live.all()

    def threshold(x):
        return keep_threshold(np.where(live, x, -1.0) if masked else x, n_keep)

    tau = threshold(W0 * W0)
    scale = lr * float(np.sqrt(tau))  # steps in units of the threshold's |w|
    for t in range(1, steps + 1):
        np.multiply(w, w, out=x)
        if t % 4 == 0:  # tau moves slowly; a partition per step would cost as much as the rest
            tau = threshold(x)
        T = max(tau * T_START * (T_END / T_START) ** ((t - 1) / max(steps - 1, 1)), 1e-30)
        # m = sigmoid((x - tau) / T), as 0.5 (1 + tanh(z / 2)): float32, in place
        np.subtract(x, np.float32(tau), out=m)
        m *= np.float32(0.5 / T)
        np.tanh(m, out=m)
        m *= 0.5
        m += 0.5
        if bias:
            m[..., -1] = 1.0
        np.multiply(w, m, out=r)
        r -= W0
        d = (r @ factor) @ factor_t + damp * r if factor is not None else r @ G32
        np.multiply(m, d, out=g)  # LTP's rule: the mask is a constant for w (dv/dw := m)
        if masked:
            g *= free
        m1 *= b1
        m1 += (1 - b1) * g
        m2 = b2 * m2 + (1 - b2) * float(np.mean(g * g))
        step = scale * 0.5 * (1 + np.cos(np.pi * (t - 1) / steps)) / (1 - b1 ** t)
        w -= np.float32(step / (np.sqrt(m2 / (1 - b2 ** t)) + eps)) * m1
    return w


def _best_bias(W0: np.ndarray, V: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """The bias column that minimises the output error of V given its other columns (Gram of
    [X, 1]): the dense bias plus the mean output the pruning removed."""
    G = np.asarray(gram, dtype=np.float64)
    shift = np.einsum("kod,kd->ko", (V - W0)[..., :-1], G[:, :-1, -1])
    count = np.where(G[:, -1, -1] > 0, G[:, -1, -1], 1.0)
    return W0[..., -1] - shift / count[:, None]


@dataclass(frozen=True)
class Derived:
    """What the weight stage derives from a layer's Gram: the same at every level of a trail."""

    factor: np.ndarray | None  # low_rank_factor when the Gram came from fewer rows than inputs
    unit: np.ndarray  # (k, d) saliency units 1 / sqrt([H^-1]_jj), mean 1 per block


def derive(gram: np.ndarray, rank: int | None = None) -> Derived:
    """`rank`: the rows the Gram was summed from, when fewer than its size (then it is used
    through its low-rank factor), else None (LayerStats.low_rank decides)."""
    G = np.asarray(gram, dtype=np.float64)
    factor = None if rank is None else low_rank_factor(G, rank)
    # saliency units u = w * unit (module docstring); mean 1 per block keeps float32 tidy
    unit = 1.0 / np.sqrt(inverse_diagonal(G, factor=factor))
    unit /= unit.mean(axis=1, keepdims=True)
    return Derived(factor, unit)


def ltp_support_weights(W: np.ndarray, gram: np.ndarray, n_keep: int, *, refit: bool,
                        bias: np.ndarray | None = None, rank: int | None = None,
                        derived: Derived | None = None):
    """A stack's new weights with exactly n_keep kept: the top-k of the learned weights (in
    saliency units), with their learned values (or least-squares refitted on that support with
    `refit`). The dense top-k (also in saliency units, its values masked) is kept instead when
    its damped output error is lower than the learned values' (small layers, where Adam's steps
    are coarse): never worse than masking that top-k on the layer's own objective. With
    `refit`, the dense top-k is refitted too (and kept if lower) only where it won before the
    refit. With `bias` (k, d_out), `gram` is the Gram of [X, 1] and the bias is learned (or
    refitted) with the weights, as a network's biases train with its weights. `derived`:
    derive(gram, rank), when it is at hand (a trail solves each layer at several budgets).
    Returns (float64 weights, float64 bias or None, whether the learned support was used)."""
    W0 = np.asarray(W, dtype=np.float64)
    if bias is not None:
        W0 = np.concatenate([W0, np.asarray(bias, dtype=np.float64)[..., None]], axis=-1)
    weights = np.ones(W0.shape, dtype=bool)
    if bias is not None:
        weights[..., -1] = False
    G = np.asarray(gram, dtype=np.float64)
    derived = derived or derive(G, rank)
    factor, unit = derived.factor, derived.unit
    U0 = W0 * unit[:, None, :]
    if factor is None:
        learned_u = learn_weights(U0, G / (unit[:, :, None] * unit[:, None, :]), n_keep,
                                  bias=bias is not None)
    else:  # no scaled copy of a wide Gram: the factor carries it
        learned_u = learn_weights(U0, None, n_keep, bias=bias is not None,
                                  factor=factor / unit[:, :, None])
    learned = learned_u / unit[:, None, :]
    candidates = []
    for source, rank_by in ((learned, learned_u), (W0, U0)):
        mask = top_k_mask(np.where(weights & (W0 != 0), rank_by, 0), n_keep) | ~weights
        values = np.where(mask, source, 0.0)
        if bias is not None:
            values[..., -1] = _best_bias(W0, values, G)
        candidates.append((mask, values))
    errors = [_learned_error(W0, v, G, factor) for _, v in candidates]
    if refit:
        # the learned support is refitted; the dense top-k too only where it beat the learned
        # values before the refit (both refits doubled the time and, where the learned values
        # won, changed the choice on no MiniLM layer)
        H = refit_gram(G)
        for i in range(1 + (errors[1] < errors[0])):
            mask, _ = candidates[i]
            candidates[i] = (mask, refit_on_support(W0, mask, G, damped=H, factor=factor))
            errors[i] = _learned_error(W0, candidates[i][1], G, factor)
    mask, best = candidates[int(np.argmin(errors))]
    # a kept weight must stay nonzero, or the layer would lose one more than its budget
    best = np.where(mask & weights & (best == 0), W0, best)
    if bias is None:
        return best, None, errors[0] <= errors[1]
    return best[..., :-1], best[..., -1], errors[0] <= errors[1]


def _learned_error(W0, V, G, factor) -> float:
    """The damped output error the weights learned on; through the factor when there is one."""
    D = V - W0
    damp = DAMPING * np.einsum("kii->k", G) / max(G.shape[-1], 1)
    data = np.sum((D @ factor) ** 2) if factor is not None else np.sum(D * (D @ G))
    return float(data + np.sum(damp[:, None, None] * D * D))
