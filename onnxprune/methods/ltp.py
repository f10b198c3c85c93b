"""Learned Threshold Pruning (LTP), adapted to one-shot pruning from calibration Gram matrices.

The LTP paper learns one threshold `tau_l` per layer during training, through the soft mask
`m = sigmoid((w^2 - tau_l) / T_l)` and a differentiable L0 penalty `lambda * sum(m)`. onnxprune
cannot train, so this is an LTP-STYLE ADAPTATION, not the paper's training run: the task loss is
replaced by each layer's relative output error on the calibration data (ALGORITHMS.md section 4),

    R_l(tau) = trace((V - W) G (V - W)^T) / E0 + lambda * sum(m) / n_l,   V = W * m,
    E0 = trace(W G W^T),

summed over a layer's blocks. Given lambda the layers decouple; one lambda shared by all layers is
searched on log scale so that the HARD masks (keep w^2 > tau_l) zero the requested total; the
per-layer allocation therefore comes out of the learned thresholds. The few-weight difference
left by the search is settled on the boundary weights, ranked across layers by their soft-mask
argument (w^2 - tau_l) / T_l, so the per-layer counts sum exactly to the target.

Temperature: T_l = T0 * Var(|w_l|), in w^2 units like tau (the variance of |w| is a squared
weight). T0 is small (DEFAULT_T0) so the soft objective follows the hard one closely: the
sigmoid turns from 0.12 to 0.88 within +-2 T_l, a band that holds a fraction of a percent of a
typical layer's weights. Small layers get a wider band (at least ~_MIN_SOFT weights across it),
otherwise their objective is a staircase with flat steps where Adam stalls.

Speed: evaluating R_l directly costs one (d_out, d_in) x (d_in, d_in) product per step. Here only
the weights in the sigmoid's transition band (|w^2 - tau| < _CUTOFF * T) change between steps:
the product for the weights below the band (m ~ 0, V = 0) is kept and updated incrementally when
the band moves, and the band's own interactions are summed pair by pair within each output row.
Outside the band m is taken as exactly 0 or 1 (error below exp(-_CUTOFF)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import InfeasibleError, OnnxPruneError

DEFAULT_T0 = 1e-4
DEFAULT_LR = 0.02
DEFAULT_STEPS = 300

_CUTOFF = 8.0  # |(w^2 - tau) / T| beyond which m is 0 or 1: m (1 - m) < 3.4e-4
_MIN_SOFT = 150.0  # small layers: T at least this many weights' worth of w^2 spread
_LOG_LAM_RANGE = (math.log(1e-8), math.log(1e8))
_MAX_PROBES = 40
_COUNT_TOLERANCE = 1e-3  # the search stops within this fraction of all weights of the target
_PROBE_FRACTION = 4  # a lambda probe runs steps // 4 Adam steps, the final run all of them
_PAIR_CHUNK = 1 << 21  # row pairs handled at a time (bounds memory)
_PAIR_COST = 400.0  # one explicit row pair costs about this many multiply-adds of a dense product


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for any z


def soft_mask(w: np.ndarray, tau: float, T: float) -> np.ndarray:
    """LTP's soft mask sigmoid((w^2 - tau) / T): ~1 keeps a weight, ~0 prunes it."""
    w = np.asarray(w, dtype=np.float64)
    return _sigmoid((w * w - tau) / T)


def _as_stack(name: str, a: np.ndarray, ndim: int) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == ndim - 1:
        a = a[None]
    if a.ndim != ndim:
        raise OnnxPruneError(f"{name} must have {ndim - 1} or {ndim} dimensions, got shape {a.shape}")
    return a


def ltp_objective_and_grad(W, G, tau: float, T: float, lam: float, E0: float) -> tuple[float, float]:
    """R(tau) and dR/dtau for one layer (W (k, d_out, d_in), G (k, d_in, d_in); 2-D = one block).

    dR/dV = 2 (V - W) G / E0;  dR/dtau = sum((dR/dV * w + lam / n) * dm/dtau),  dm/dtau = -m(1-m)/T.
    """
    W3, G3 = _as_stack("W", W, 3), _as_stack("G", G, 3)
    n = W3.size
    m = soft_mask(W3, tau, T)
    D = W3 * (m - 1.0)  # V - W
    DG = D @ G3
    R = float(np.sum(D * DG) / E0 + lam * m.sum() / n)
    dm_dtau = -m * (1.0 - m) / T
    grad = float(np.sum((2.0 * DG / E0 * W3 + lam / n) * dm_dtau))
    return R, grad


@dataclass
class LTPResult:
    """Learned allocation for one target (see learn_thresholds)."""

    target_zeros: int
    zeros: list[int]  # exact per-layer zero counts, summing to target_zeros
    thresholds: list[float]  # learned tau per layer (w^2 units); hard mask keeps w^2 > tau
    lam: float  # the shared L0 weight lambda
    objective: list[float]  # total R (all layers) per Adam step of the run at `lam`
    temperatures: list[float]  # T per layer
    hard_zeros: int  # total zeros of the hard masks at `thresholds`, before the exact settlement
    probes: int  # Adam runs spent by the lambda search
    levels: list["LTPResult"] = field(default_factory=list)  # trail runs: one result per level


def _sums(labels, values, size):
    """Per-label sums as float64 (np.bincount returns integers when there are no values)."""
    return np.bincount(labels, values, size).astype(np.float64, copy=False)


def _pair_sums(row, col, gbase, Gflat, full=(), earlier=()):
    """Sums over the entries of the same row, for entries listed in increasing w^2 order.

    For each entry e and each vector v in `full`: sum over e' in e's row (e itself included) of
    G[c_e, c_e'] v[e']; for each v in `earlier`: the same over the row's entries listed before e.
    `gbase[e]` is the flat index of G[c_e, 0] in Gflat. Returns (full sums, earlier sums).
    Rows are handled in buckets of alike entry counts as padded dense (rows, m, m) blocks of G.
    """
    nb = len(row)
    out_full = [np.zeros(nb) for _ in full]
    out_early = [np.zeros(nb) for _ in earlier]
    if nb == 0:
        return out_full, out_early
    # an entry alone in its row only meets itself (the common case for a narrow band)
    alone = np.bincount(row - row.min())[row - row.min()] == 1
    if alone.any():
        one = np.flatnonzero(alone)
        g = np.take(Gflat, gbase[one] + col[one])
        for v, out in zip(full, out_full):
            out[one] = g * v[one]
        if alone.all():
            return out_full, out_early
        rest = np.flatnonzero(~alone)
        sub_full, sub_early = _pair_sums(row[rest], col[rest], gbase[rest], Gflat,
                                         [v[rest] for v in full], [v[rest] for v in earlier])
        for out, sub in zip(out_full + out_early, sub_full + sub_early):
            out[rest] = sub
        return out_full, out_early
    order = np.argsort(row, kind="stable")  # keeps the w^2 order inside each row
    r = row[order]
    heads = np.flatnonzero(np.concatenate([[True], r[1:] != r[:-1]]))
    size = np.diff(np.append(heads, nb))
    col_s, gb_s = col[order], gbase[order]
    full_s, early_s = [v[order] for v in full], [v[order] for v in earlier]
    res_full = [np.empty(nb) for _ in full]
    res_early = [np.empty(nb) for _ in earlier]
    by_size = np.argsort(size, kind="stable")
    sizes = size[by_size]
    g0 = 0
    while g0 < len(sizes):
        g1 = int(np.searchsorted(sizes, int(1.25 * sizes[g0]) + 2, side="right"))
        g1 = min(g1, g0 + max(1, _PAIR_CHUNK // int(sizes[g1 - 1]) ** 2))
        m = int(sizes[g1 - 1])
        grp = by_size[g0:g1]
        valid = np.arange(m)[None, :] < size[grp][:, None]
        P = heads[grp][:, None] + np.where(valid, np.arange(m)[None, :], 0)
        Gsub = np.take(Gflat, gb_s[P][:, :, None] + col_s[P][:, None, :])  # G[c_i, c_j] in a row
        keep = P[valid]
        for v, res in zip(full_s, res_full):
            res[keep] = np.einsum("bij,bj->bi", Gsub, v[P] * valid)[valid]
        if earlier:
            Gsub *= np.tri(m, m, -1, dtype=bool)  # only partners listed before the entry
            for v, res in zip(early_s, res_early):
                res[keep] = np.einsum("bij,bj->bi", Gsub, v[P] * valid)[valid]
        g0 = g1
    for res, out in zip(res_full + res_early, out_full + out_early):
        out[order] = res
    return out_full, out_early


class _Layers:
    """All layers' weights sorted by w^2, with what makes one objective evaluation cheap.

    In w^2 order the weights below the sigmoid band (m ~ 0, so V - W = -w) are a prefix of each
    layer. Their total error is a prefix sum `Hc`, and their interaction with a band weight e is
    `q_e` (e's row's interaction with all its smaller weights) minus that with the band weights
    listed before e. What is left per step is the pairs of band weights sharing a row.
    q and Hc are filled lazily, slice by slice of the sorted weights, where the band goes: a
    slice costs one dense product (all weights below it, times G) plus its internal pairs.
    """

    def __init__(self, weights, grams, T0):
        self.L = len(weights)
        shapes, xs, ws, fs, Ws, Gs = [], [], [], [], [], []
        T, E0, scale, xmax, frozen = [], [], [], [], []
        for j, (W, G) in enumerate(zip(weights, grams)):
            W3, G3 = _as_stack(f"weights[{j}]", W, 3), _as_stack(f"grams[{j}]", G, 3)
            k, d_out, d_in = W3.shape
            if G3.shape != (k, d_in, d_in):
                raise OnnxPruneError(f"layer {j}: Gram of shape {G3.shape} does not match weights {W3.shape}")
            if not (np.all(np.isfinite(W3)) and np.all(np.isfinite(G3))):
                raise OnnxPruneError(f"layer {j}: weights and Gram must be finite")
            G3 = 0.5 * (G3 + np.swapaxes(G3, 1, 2))
            e0 = float(np.sum(W3 * (W3 @ G3)))
            if not e0 > 0:
                # no calibration signal for this layer: fall back to the weights' own error
                G3 = np.broadcast_to(np.eye(d_in), G3.shape).copy()
                e0 = float(np.sum(W3 * W3))
            x = (W3 * W3).ravel()
            n = x.size
            order = np.argsort(x)  # deterministic; the order among equal w^2 does not matter
            spread = max(float(np.var(np.abs(W3))), 1e-3 * float(x.mean())) if n else 0.0
            shapes.append((k, d_out, d_in))
            xs.append(x[order])
            ws.append(W3.ravel()[order])
            fs.append(order)
            Ws.append(W3)
            Gs.append(np.ascontiguousarray(G3))
            frozen.append(not e0 > 0)  # empty layer or all weights zero: nothing to learn
            E0.append(e0 if e0 > 0 else 1.0)
            T.append(T0 * spread if spread > 0 else 1.0)
            scale.append(float(x.mean()) if n and x.mean() > 0 else 1.0)
            xmax.append(float(x.max()) if n and x.max() > 0 else 1.0)
        self.shapes, self.W, self.G = shapes, Ws, Gs
        self.G32 = [g.astype(np.float32) for g in Gs]
        self.n = np.array([int(np.prod(s)) for s in shapes], dtype=np.int64)
        self.start = np.concatenate([[0], np.cumsum(self.n)[:-1]]).astype(np.int64)
        self.hoff = self.start + np.arange(self.L)  # where each layer's prefix sums start in Hc
        self.X = np.concatenate(xs) if xs else np.zeros(0)
        self.Wv = np.concatenate(ws) if ws else np.zeros(0)
        self.F = np.concatenate(fs).astype(np.int64) if fs else np.zeros(0, np.int64)
        self.Q = np.zeros(self.X.size)
        self.Hc = np.zeros(self.X.size + self.L)
        self.T = np.array(T)
        self.T_base = self.T.copy()  # T0 * Var(|w|), before widening for sparse regions
        self.E0 = np.array(E0)
        self.scale = np.array(scale)
        self.xmax = np.array(xmax)
        self.frozen = np.array(frozen, dtype=bool)
        # one sorted key over all layers, so band edges for every layer come from one call
        layer_of = np.repeat(np.arange(self.L), self.n)
        self.key = layer_of + 0.25 + 0.5 * self.X / np.repeat(self.xmax, self.n)
        self.Gflat = np.concatenate([g.ravel() for g in self.G32]) if Gs else np.zeros(0, np.float32)
        self.goff = np.concatenate([[0], np.cumsum([g.size for g in Gs])[:-1]]).astype(np.int64)
        self.d_in = np.array([s[2] for s in shapes], dtype=np.int64)
        self.d_out = np.array([s[1] for s in shapes], dtype=np.int64)
        self.rows = np.array([s[0] * s[1] for s in shapes], dtype=np.int64)
        self.rowbase = np.concatenate([[0], np.cumsum(self.rows)[:-1]]).astype(np.int64)
        self.dense_cost = self.rows * self.d_in * self.d_in
        # lazy slices of each layer's sorted weights (local bounds); a slice's pairs cost about
        # what its dense product costs when there are sqrt(_PAIR_COST) slices
        count = np.clip(np.minimum(int(math.sqrt(_PAIR_COST)), self.n // 64), 1, None)
        self.bounds = [np.linspace(0, n, c + 1).round().astype(np.int64) for n, c in zip(self.n, count)]
        self.done = [np.zeros(c, dtype=bool) for c in count]

    def set_temperatures(self, tau):
        """T = max(T0 Var(|w|), w^2 span of the _MIN_SOFT weights nearest tau, / 4) per layer.

        Where w^2 is sparse (high sparsity, heavy tails) a fixed T leaves only a few weights in
        the sigmoid's transition; R(tau) then is a staircase with flat steps and Adam wanders.
        """
        half = int(_MIN_SOFT) // 2
        for j in np.flatnonzero(~self.frozen):
            s, n = int(self.start[j]), int(self.n[j])
            c = int(np.searchsorted(self.X[s : s + n], tau[j], side="right"))
            a, b = max(c - half, 0), min(c + half, n - 1)
            self.T[j] = max(self.T_base[j], 0.25 * (self.X[s + b] - self.X[s + a]))

    def _find(self, values):
        """Per layer, the global index just past the sorted entries with w^2 <= value."""
        q = np.clip(values / self.xmax, -0.4, 1.4)
        return np.searchsorted(self.key, np.arange(self.L) + 0.25 + 0.5 * q, side="right")

    def _fill(self, j, lo, hi):
        """Make q and Hc available for layer j's local sorted range [lo, hi) and at lo."""
        b = self.bounds[j]
        first = int(np.searchsorted(b, min(lo, self.n[j] - 1), side="right")) - 1
        last = int(np.searchsorted(b, max(hi - 1, lo), side="right")) - 1
        for s in range(first, min(last, len(b) - 2) + 1):
            if not self.done[j][s]:
                self._fill_slice(j, int(b[s]), int(b[s + 1]))
                self.done[j][s] = True

    def _fill_slice(self, j, a, b):
        k, d_out, d_in = self.shapes[j]
        s0 = int(self.start[j])
        f = self.F[s0 + a : s0 + b]
        w = self.Wv[s0 + a : s0 + b]
        if a:
            Z = np.zeros(self.n[j], dtype=np.float32)
            Z[self.F[s0 : s0 + a]] = self.Wv[s0 : s0 + a]
            AG = (Z.reshape(k, d_out, d_in) @ self.G32[j]).ravel()
            base = float(np.dot(Z.astype(np.float64), AG))  # error of pruning all weights below a
            q = np.take(AG, f).astype(np.float64)
        else:
            base, q = 0.0, np.zeros(b - a)
        rows = f // d_in
        cols = f % d_in
        gbase = self.goff[j] + (rows // d_out) * d_in * d_in + cols * d_in
        _, (inside,) = _pair_sums(rows, cols, gbase, self.Gflat, earlier=(w,))
        q += inside
        self.Q[s0 + a : s0 + b] = q
        own = w * w * np.take(self.Gflat, gbase + cols)  # w^2 G[c, c]
        h = int(self.hoff[j])
        self.Hc[h + a] = base
        self.Hc[h + a + 1 : h + b + 1] = base + np.cumsum(own + 2.0 * w * q)

    def evaluate(self, tau, lam):
        """Per-layer R and dR/dtau at thresholds `tau` (frozen layers give 0, 0)."""
        width = _CUTOFF * self.T
        lo = self._find(tau - width)
        hi = self._find(tau + width)
        lengths = np.where(self.frozen, 0, hi - lo)
        # a band so wide that its pairs cost more than the plain product: evaluate densely
        dense = (_PAIR_COST * lengths * lengths / np.maximum(self.rows, 1) > self.dense_cost) & ~self.frozen
        lengths[dense] = 0
        for j in np.flatnonzero(~self.frozen & ~dense):
            self._fill(j, int(lo[j] - self.start[j]), int(hi[j] - self.start[j]))
        nb = int(lengths.sum())
        lay = np.repeat(np.arange(self.L), lengths)
        idx = np.arange(nb) + np.repeat(lo - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        x, w, f = self.X[idx], self.Wv[idx], self.F[idx]
        Tb = self.T[lay]
        m = _sigmoid((x - tau[lay]) / Tb)
        D = w * (m - 1.0)
        d_in = self.d_in[lay]
        row = f // d_in
        col = f % d_in
        gbase = self.goff[lay] + (row // self.d_out[lay]) * d_in * d_in + col * d_in
        (S2,), (S1,) = _pair_sums(self.rowbase[lay] + row, col, gbase, self.Gflat, full=(D,), earlier=(w,))
        below = self.Q[idx] - S1  # interaction with the weights below the band (all pruned)
        DG = S2 - below  # ((V - W) G) at the band weights
        dm = -m * (1.0 - m) / Tb
        grad = _sums(lay, (2.0 * DG * w / self.E0[lay] + lam / self.n[lay]) * dm, self.L)
        recon = self.Hc[self.hoff + (lo - self.start)] + _sums(lay, D * (S2 - 2.0 * below), self.L)
        kept = (self.start + self.n - hi) + _sums(lay, m, self.L)
        R = recon / self.E0 + lam * kept / np.maximum(self.n, 1)
        for j in np.flatnonzero(dense):
            R[j], grad[j] = ltp_objective_and_grad(self.W[j], self.G[j], tau[j], self.T[j], lam, self.E0[j])
        R[self.frozen] = 0.0
        grad[self.frozen] = 0.0
        return R, grad

    # -- hard masks --------------------------------------------------------------------------
    def hard_zeros(self, tau):
        """Per layer #(w^2 <= tau); a frozen layer (all weights zero) counts all its weights."""
        c = np.array([np.searchsorted(self.X[s : s + n], t, side="right")
                      for s, n, t in zip(self.start, self.n, tau)], dtype=np.int64)
        return np.where(self.frozen, self.n, c)

    def exact_zeros(self, tau, target, lower=None):
        """Per-layer counts summing to `target`: hard counts, settled on the boundary weights.

        Weights are ranked across layers by (w^2 - tau_l) / T_l (the soft mask's argument); a
        missing zero goes to the kept weight ranked lowest, a surplus one is restored from the
        pruned weights ranked highest. `lower` bounds each layer's count from below.
        """
        c = self.hard_zeros(tau)
        floor = np.zeros(self.L, np.int64) if lower is None else np.asarray(lower, np.int64)
        c = np.maximum(c, floor)
        diff = int(target - c.sum())
        if diff == 0:
            return c
        need = abs(diff)
        if diff > 0:
            a, b = c, np.minimum(self.n, c + need)
        else:
            a, b = np.maximum(floor, c - need), c
        lengths = b - a
        lay = np.repeat(np.arange(self.L), lengths)
        pos = np.arange(int(lengths.sum())) + np.repeat(a - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        z = (self.X[self.start[lay] + pos] - tau[lay]) / self.T[lay]
        z[self.frozen[lay]] = -np.inf
        if diff > 0:
            pick = np.lexsort((pos, lay, z))[:need]
            return c + np.bincount(lay[pick], minlength=self.L)
        pick = np.lexsort((-pos, -lay, -z))[:need]
        return c - np.bincount(lay[pick], minlength=self.L)


_LOG = True


def _tau(theta, s):
    return s * np.exp(theta) if _LOG else s * theta


def _theta(tau, s):
    return np.log(np.maximum(tau, 1e-12 * s) / s) if _LOG else tau / s


def _adam(layers, theta, lam, steps, lr):
    """Adam on theta = tau / mean(w^2), cosine-decayed step; returns theta and total R per step."""
    theta = theta.copy()
    s = layers.scale
    layers.set_temperatures(_tau(theta, s))
    # beyond these the band is empty and the gradient vanishes
    lo = _theta(-(_CUTOFF - 1.0) * layers.T, s)
    hi = _theta(layers.xmax + (_CUTOFF - 1.0) * layers.T, s)
    m1 = np.zeros_like(theta)
    m2 = np.zeros_like(theta)
    b1, b2, eps = 0.9, 0.999, 1e-12
    trajectory = []
    for t in range(1, steps + 1):
        tau = _tau(theta, s)
        R, g = layers.evaluate(tau, lam)
        trajectory.append(float(R.sum()))
        g = g * (tau if _LOG else s)
        m1 = b1 * m1 + (1 - b1) * g
        m2 = b2 * m2 + (1 - b2) * g * g
        rate = lr * 0.5 * (1.0 + math.cos(math.pi * (t - 1) / steps))
        theta -= rate * (m1 / (1 - b1**t)) / (np.sqrt(m2 / (1 - b2**t)) + eps)
        np.clip(theta, lo, hi, out=theta)
    return theta, trajectory


def _search_lambda(layers, target, theta_start, log_lam, steps, lr, history):
    """Search log(lambda) so that the hard masks zero `target` weights.

    Each probe is a short Adam run warm-started from the nearest earlier probe; the best probe's
    lambda then gets a full run of `steps`, from that probe's thresholds. Returns the final run.
    """
    probes = []

    def probe(ll, theta_from, n_steps, final=False):
        theta, traj = _adam(layers, theta_from, math.exp(ll), n_steps, lr)
        zeros = int(layers.hard_zeros(_tau(theta, layers.scale)).sum())
        p = {"log_lam": ll, "theta": theta, "zeros": zeros, "objective": traj}
        probes.append(p)
        if history is not None:
            history.append({"target": int(target), "lam": math.exp(ll), "hard_zeros": zeros,
                            "objective": traj[-1], "steps": n_steps, "final": final})
        return p

    short = max(steps // _PROBE_FRACTION, 1)

    # Adam runs of a few dozen steps leave the count noisy by ~0.1 %: closer is not meaningful
    tol = int(_COUNT_TOLERANCE * layers.n.sum())
    lo_lim, hi_lim = _LOG_LAM_RANGE
    p = probe(min(max(log_lam, lo_lim), hi_lim), theta_start, short)
    below = p if p["zeros"] <= target else None
    above = p if p["zeros"] >= target else None
    # bracket: more lambda prunes more
    while below is None and p["log_lam"] > lo_lim and len(probes) < _MAX_PROBES:
        p = probe(max(p["log_lam"] - math.log(10.0), lo_lim), p["theta"], short)
        below, above = (p, above) if p["zeros"] <= target else (None, p)
    while above is None and p["log_lam"] < hi_lim and len(probes) < _MAX_PROBES:
        p = probe(min(p["log_lam"] + math.log(10.0), hi_lim), p["theta"], short)
        below, above = (below, p) if p["zeros"] >= target else (p, None)
    sides = []  # which end each interpolated probe replaced
    while (below is not None and above is not None
           and min(target - below["zeros"], above["zeros"] - target) > tol
           and above["log_lam"] - below["log_lam"] > 1e-4 and len(probes) < _MAX_PROBES):
        if len(sides) >= 2 and sides[-1] == sides[-2] != "mid":
            frac = 0.5  # interpolation keeps moving one end only: bisect instead
        else:  # interpolate the count linearly in log(lambda), away from the bracket ends
            frac = (target - below["zeros"]) / max(above["zeros"] - below["zeros"], 1)
            frac = min(max(frac, 0.1), 0.9)
        theta = below["theta"] + frac * (above["theta"] - below["theta"])
        p = probe(below["log_lam"] + frac * (above["log_lam"] - below["log_lam"]), theta, short)
        side = "below" if p["zeros"] <= target else "above"
        below, above = (p, above) if side == "below" else (below, p)
        sides.append("mid" if frac == 0.5 else side)
    best = min(probes, key=lambda q: (abs(q["zeros"] - target), probes.index(q)))
    return probe(best["log_lam"], best["theta"], steps, final=True), len(probes)


def learn_thresholds(
    weights: list[np.ndarray],
    grams: list[np.ndarray],
    target_zeros: int,
    *,
    T0: float = DEFAULT_T0,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    trail: list[int] | None = None,
    history: list | None = None,
) -> LTPResult:
    """Learn one threshold per layer; return exact per-layer zero counts summing to target_zeros.

    weights[l]: (k, d_out, d_in) (or 2-D), grams[l]: (k, d_in, d_in) unnormalised X^T X of that
    layer's calibration inputs. `steps` Adam steps per lambda probe (each warm-started from the
    nearest probe), `lr` in units of mean(w^2). The method is deterministic: `seed` exists for a
    uniform method interface and does not change the result. `trail`: increasing zero targets
    solved along one path (least sparse first, each warm-started from the previous thresholds,
    per-layer counts never decreasing); target_zeros is added to it if missing and the returned
    result is its level, with every level in `.levels`. `history`, if a list, receives one dict
    per probe (target, lam, hard_zeros, objective).
    """
    del seed  # deterministic: no random choices are made
    if len(weights) != len(grams):
        raise OnnxPruneError(f"{len(weights)} weight stacks but {len(grams)} Gram stacks")
    if not (T0 > 0 and lr > 0 and steps >= 1):
        raise OnnxPruneError(f"LTP needs T0 > 0, lr > 0 and steps >= 1 (got {T0}, {lr}, {steps})")
    layers = _Layers(weights, grams, T0)
    total = int(layers.n.sum())
    levels = sorted(set([int(t) for t in (trail or [])] + [int(target_zeros)]))
    if trail is not None and list(trail) != sorted(set(int(t) for t in trail)):
        raise OnnxPruneError("the trail must list strictly increasing zero counts")
    for t in levels:
        if not 0 <= t <= total:
            raise InfeasibleError(f"cannot zero {t} of {total} prunable weights")

    # start every layer at its w^2 quantile for half the (first) target sparsity
    frac = 0.5 * levels[0] / max(total, 1)
    tau = np.array([np.quantile(layers.X[s : s + n], frac) if n else 0.0
                    for s, n in zip(layers.start, layers.n)])
    theta = _theta(tau, layers.scale)
    log_lam, lower, results = 0.0, None, []
    for t in levels:
        best, probes = _search_lambda(layers, t, theta, log_lam, steps, lr, history)
        tau = _tau(best["theta"], layers.scale)
        zeros = layers.exact_zeros(tau, t, lower)
        results.append(LTPResult(
            target_zeros=t, zeros=[int(z) for z in zeros], thresholds=[float(v) for v in tau],
            lam=math.exp(best["log_lam"]), objective=best["objective"],
            temperatures=[float(v) for v in layers.T], hard_zeros=best["zeros"], probes=probes,
        ))
        theta, log_lam, lower = best["theta"], best["log_lam"], zeros
    main = results[levels.index(int(target_zeros))]
    if trail is not None:
        main.levels = results
    return main
