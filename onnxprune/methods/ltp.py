"""Learned Threshold Pruning (LTP), adapted to one-shot pruning from calibration Gram matrices.

The LTP paper learns one threshold `tau_l` per layer during training, through the soft mask
`m = sigmoid((w^2 - tau_l) / T_l)` and a differentiable L0 penalty `lambda * sum(m)`. onnxprune
cannot train, so this is an LTP-STYLE ADAPTATION, not the paper's training run: the task loss is
replaced by each layer's relative output error on the calibration data (ALGORITHMS.md section 4),

    R_l(tau) = trace((V - W) G (V - W)^T) / E0 + lambda * sum(m) / n_l,   V = W * m,
    E0 = trace(W G W^T),

summed over a layer's blocks. Given lambda the layers decouple. One lambda, shared by all layers,
is searched on log scale so that the HARD masks (keep w^2 > tau_l) zero the requested total; the
per-layer allocation therefore comes out of the learned thresholds. R is normalised per layer,
so scaling a layer's G changes nothing; what counts is how G weighs the small weights against
the large ones. The search stops within 0.2 % of the target (R is flat near its minimum: the
count drifts by that much at no visible cost); the rest is settled on the weights nearest the
thresholds, spread over the layers in proportion to their sizes, so the counts sum exactly.

Choices (ours):
- Adam works on log(tau / mean(w^2)), lr 0.02 (2 % of tau per step), cosine-decayed over
  `steps`: thresholds span orders of magnitude (transformer weights are heavy-tailed, and some
  layers end up 99 % sparse), so relative steps suit every layer.
- Temperature, in w^2 units like tau: T_l = T0 * Var(|w_l|) with T0 = 1e-4 (Var(|w|) is a
  squared weight), widened to a quarter of the w^2 span of the _MIN_SOFT = 150 weights nearest
  the starting threshold, capped at 0.05 Var(|w|) in large layers. A fixed T0 cannot serve all
  layers: at the median of a Gaussian layer ~0.7 T0 n weights lie within +-2T, at its 97th
  percentile ~25 times fewer. With too few, R(tau) is a staircase with flat steps where Adam
  stalls; with too many, the soft objective drifts from the hard one and every step costs more.
  The count-based width keeps ~150 weights in every transition; T0 * Var(|w|) only decides for
  layers over ~1.5 M weights.
- Each Adam run starts at the minimiser of the layer's HARD objective on a grid of quantiles
  (_KNOTS; the hard error there is computed exactly anyway), not at one common quantile (half
  the target): per-layer optima range from ~25 % to ~99 %, and from a common start the result
  depended on how far Adam got. Every probe of the lambda search is then a function of lambda
  alone, and the grid predicts where to probe next.

Speed: evaluating R directly costs one (d_out, d_in) x (d_in, d_in) product per layer and step
(~0.2 s for MiniLM's 36 matrices, far too slow for hundreds of steps times the probes). Here, in
w^2 order, the weights below the sigmoid band (m ~ 0, V - W = -w) are a prefix, their error a
prefix sum, and their interaction with a band weight a precomputed per-weight number; a step
only sums the pairs of band weights sharing a row. Outside the band (|w^2 - tau| > _CUTOFF * T)
m is taken as exactly 0 or 1 (m (1 - m) < 3.4e-4 there). The band is kept between steps with a
margin, and with it everything about it that does not depend on tau (its rows' blocks of G, its
interaction with the weights below it): Adam's steps are small, so a step is then a few gathers
and one batched product per bucket of rows (the deep CNN's 5-level trail at 300 steps per probe:
11.8 -> 3.5 s).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from ..errors import InfeasibleError, OnnxPruneError
from .ltp_weights import inverse_diagonal
from .refit import as_stack, low_rank_factor

DEFAULT_T0 = 1e-4
DEFAULT_LR = 0.02
DEFAULT_STEPS = 150  # per lambda probe; the runs settle within ~100 (300 gave the same counts
# to within the search's own noise on the reference models, at twice the time)

_CUTOFF = 8.0  # |(w^2 - tau) / T| beyond which m is 0 or 1: m (1 - m) < 3.4e-4
_MIN_SOFT = 150  # weights that the sigmoid's transition (about 4 T wide) should hold at least
_MAX_T = 0.05  # ... but T at most this times Var(|w|) (far tails of large layers)
# quantiles at which each layer's hard error is computed exactly (one dense product each)
_KNOTS = (0.0, 0.2, 0.4, 0.55, 0.7, 0.8, 0.88, 0.94, 0.975, 0.995, 1.0)
_LOG_LAM_RANGE = (math.log(1e-8), math.log(1e8))
_MAX_PROBES = 12
_COUNT_TOLERANCE = 2e-3  # the search stops within this fraction of all weights of the target
_LOG_LAM_WIDTH = 0.02  # ... or when lambda is pinned to 2 % (the count can jump there)
_MIN_KEPT_SIGNAL = 1e-3  # nsr: 1 - e floored here (e can reach 1: all pruned)
_PAIR_CHUNK = 1 << 21  # row pairs handled at a time (bounds memory)
_PAIR_COST = 1000.0  # an explicit row pair costs about this many multiply-adds of a dense product
_BAND_MARGIN = 2.0  # the cached band reaches this many T beyond the _CUTOFF band (see _band_at)
_MAX_PAIRS = 1 << 22  # the cached band keeps its rows' G blocks up to this many entries


LOSSES = ("sum", "nsr")


def _chain(e, loss: str):
    """A layer's error term as a function of its relative error e (array), and d/de.

    "sum": e itself (ALGORITHMS.md). "nsr" (ours): e / (1 - e), the layer's noise-to-signal
    ratio if the pruned output is seen as the part of the signal that survived (1 - e) plus an
    error of e. Through a chain of layers that each add an error, it is the noise-to-signal
    ratios that add up (the first-order cascade rule), not the errors: e / (1 - e) equals e for
    small errors but grows without bound as a layer loses all its signal, so the sum no
    longer lets one layer lose most of it because the others lose nothing.
    """
    e = np.asarray(e, dtype=np.float64)
    if loss == "sum":
        return e, np.ones_like(e)
    r = np.clip(1.0 - e, _MIN_KEPT_SIGNAL, None)
    return e / r, 1.0 / (r * r)


def obs_gram(gram: np.ndarray, damping: float = 0.01, rank: int | None = None) -> np.ndarray:
    """Diagonal metric diag(1 / [H^-1]_ii) per block, H = G + damping * mean(diag G) * I.

    w_i^2 / [H^-1]_ii is the Optimal-Brain-Surgeon saliency: the output error of pruning weight
    i after the other weights of its row were re-fitted by least squares (what --refit does,
    with the same damping). In place of G it makes R price each pruned weight at its error
    after compensation, not at its error when merely masked (pairs are ignored).
    An all-zero block (no calibration signal) becomes the identity, as in the refit.
    `rank`: the rows G was summed from, when fewer than its size (else None): [H^-1]_ii then
    comes from G's low-rank factor by the Woodbury identity (animal_cnn's fc1: 3136 wide, 512
    rows).
    """
    g = as_stack("gram", np.asarray(gram, dtype=np.float64))
    factor = None if rank is None else low_rank_factor(g, rank)
    out = np.zeros_like(g)
    np.einsum("kii->ki", out)[:] = 1.0 / inverse_diagonal(g, damping, factor)
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for any z


@dataclass
class LTPResult:
    """Learned allocation for one target (see learn_thresholds)."""

    target_zeros: int
    zeros: list[int]  # exact per-layer zero counts, summing to target_zeros
    thresholds: list[float]  # learned tau per layer (w^2 units); the hard mask keeps w^2 > tau
    lam: float  # the shared L0 weight lambda
    objective: list[float]  # total R (all layers) per Adam step of the run at `lam`
    temperatures: list[float]  # T per layer in that run
    hard_zeros: int  # total zeros of the hard masks at `thresholds`, before the exact settlement
    probes: int  # Adam runs (lambda probes) spent by the search
    levels: list["LTPResult"] = field(default_factory=list)  # trail runs: one result per level


def _sums(labels, values, size):
    """Per-label sums as float64 (np.bincount returns integers when there are no values)."""
    return np.bincount(labels, values, size).astype(np.float64, copy=False)


class _RowPairs:
    """Sums over the entries sharing a row, for entries listed in increasing w^2 order.

    sums(v)[e] = sum over e' in e's row of G[c_e, c_e'] v[e'] (e itself included);
    sums(v, earlier=True) the same over the row's entries listed before e. `gbase[e]` is the
    flat index of G[c_e, 0] in Gflat. Rows are handled in buckets of alike entry counts as padded
    dense (rows, m, m) blocks of G; the blocks are kept (one gather, reused by every later call)
    while they hold at most `keep` entries in all, and gathered afresh per call otherwise.
    """

    def __init__(self, row, col, gbase, Gflat, keep=0):
        self.col, self.gbase, self.Gflat, self.groups = col, gbase, Gflat, []
        self.n = len(row)
        if self.n == 0:
            return
        order = np.argsort(row, kind="stable")  # keeps the w^2 order inside each row
        r = row[order]
        heads = np.flatnonzero(np.concatenate([[True], r[1:] != r[:-1]]))
        size = np.diff(np.append(heads, self.n))
        by_size = np.argsort(size, kind="stable")
        sizes = size[by_size]
        g0 = 0
        while g0 < len(sizes):
            g1 = int(np.searchsorted(sizes, int(1.25 * sizes[g0]) + 2, side="right"))
            g1 = min(g1, g0 + max(1, _PAIR_CHUNK // int(sizes[g1 - 1]) ** 2))
            m = int(sizes[g1 - 1])
            grp = by_size[g0:g1]
            valid = np.arange(m)[None, :] < size[grp][:, None]
            P = order[heads[grp][:, None] + np.where(valid, np.arange(m)[None, :], 0)]
            self.groups.append((P, valid, P[valid]))
            g0 = g1
        kept = sum(P.size * P.shape[1] for P, _, _ in self.groups) <= keep
        self.blocks = [self._block(P).astype(np.float64) for P, _, _ in self.groups] if kept else None

    def _block(self, P):
        """G[c_i, c_j] for the entries i, j of each padded row of P."""
        return np.take(self.Gflat, self.gbase[P][:, :, None] + self.col[P][:, None, :])

    def sums(self, v, earlier=False):
        out = np.zeros(self.n)
        for i, (P, valid, keep) in enumerate(self.groups):
            G = self._block(P) if self.blocks is None else self.blocks[i]
            if earlier:
                G = G * np.tri(G.shape[1], G.shape[1], -1, dtype=bool)  # partners listed before
            out[keep] = np.einsum("bij,bj->bi", G, v[P] * valid)[valid]
        return out


class _Band(SimpleNamespace):
    """What evaluate() needs of the entries near the thresholds (built by _Layers._band_at)."""


class _Layers:
    """All layers' weights sorted by w^2, with what makes one objective evaluation cheap.

    Per layer, in w^2 order (entries e = 0..n-1): Q[e] = sum over the smaller weights e' of e's
    row of w_e' G[c_e', c_e], and Hc[c] = the error of pruning the c smallest weights. Each
    layer's sorted weights are cut at the _KNOTS quantiles; one dense product per knot (all
    weights below it, times G) gives Hc at the knot and the part of Q from below the slice; the
    part from inside a slice (explicit pairs) is added lazily, where the band goes.
    """

    def __init__(self, weights, grams, T0):
        self.L = len(weights)
        shapes, xs, ws, fs, Gs = [], [], [], [], []
        E0, spread, frozen = [], [], []
        for j, (W, G) in enumerate(zip(weights, grams)):
            W3 = as_stack(f"weights[{j}]", np.asarray(W, dtype=np.float64))
            G3 = as_stack(f"grams[{j}]", np.asarray(G, dtype=np.float64))
            k, d_out, d_in = W3.shape
            if G3.shape != (k, d_in, d_in):
                raise OnnxPruneError(
                    f"layer {j}: Gram of shape {G3.shape} does not match weights {W3.shape}")
            if not (np.all(np.isfinite(W3)) and np.all(np.isfinite(G3))):
                raise OnnxPruneError(f"layer {j}: weights and Gram must be finite")
            G3 = 0.5 * (G3 + np.swapaxes(G3, 1, 2))
            e0 = float(np.sum(W3 * (W3 @ G3)))
            if not e0 > 0:
                # no calibration signal for this layer: fall back to the weights' own error
                G3 = np.broadcast_to(np.eye(d_in), G3.shape).copy()
                e0 = float(np.sum(W3 * W3))
            x = (W3 * W3).ravel()
            order = np.argsort(x)  # deterministic; the order among equal w^2 does not matter
            shapes.append((k, d_out, d_in))
            xs.append(x[order])
            ws.append(W3.ravel()[order])
            fs.append(order)
            Gs.append(G3)
            frozen.append(not e0 > 0)  # empty layer or all weights zero: nothing to learn
            E0.append(e0 if e0 > 0 else 1.0)
            spread.append(max(float(np.var(np.abs(W3))), 1e-3 * float(x.mean())) if x.size else 0.0)
        self.shapes = shapes
        self.n = np.array([int(np.prod(s)) for s in shapes], dtype=np.int64)
        self.start = np.concatenate([[0], np.cumsum(self.n)[:-1]]).astype(np.int64)
        self.l0_norm = np.maximum(self.n, 1).astype(np.float64)  # L0 term: kept / l0_norm
        self.hoff = self.start + np.arange(self.L)  # where each layer's Hc starts
        self.X = np.concatenate(xs) if xs else np.zeros(0)
        self.Wv = np.concatenate(ws) if ws else np.zeros(0)
        self.F = np.concatenate(fs).astype(np.int64) if fs else np.zeros(0, np.int64)
        self.E0 = np.array(E0)
        self.frozen = np.array(frozen, dtype=bool)
        self.spread = np.array(spread)
        self.T_base = np.where(self.spread > 0, T0 * self.spread, 1.0)
        self.T = self.T_base.copy()
        self.scale = np.array([float(x.mean()) if x.size and x.mean() > 0 else 1.0 for x in xs])
        self.xmax = np.array([float(x[-1]) if x.size and x[-1] > 0 else 1.0 for x in xs])
        # one sorted key over all layers, so band edges for every layer come from one call
        layer_of = np.repeat(np.arange(self.L), self.n)
        self.key = layer_of + 0.25 + 0.5 * self.X / np.repeat(self.xmax, self.n)
        # float32 G: the dense products run twice as fast; the per-weight sums stay float64
        flat = [g.ravel() for g in Gs] or [np.zeros(0)]
        self.Gflat = np.concatenate(flat).astype(np.float32)
        self.goff = np.concatenate([[0], np.cumsum([g.size for g in Gs])[:-1]]).astype(np.int64)
        self.G32 = [self.Gflat[o : o + g.size].reshape(g.shape) for o, g in zip(self.goff, Gs)]
        self.d_in = np.array([s[2] for s in shapes], dtype=np.int64)
        self.d_out = np.array([s[1] for s in shapes], dtype=np.int64)
        rows = np.array([s[0] * s[1] for s in shapes], dtype=np.int64)
        self.rowbase = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
        self.Q = np.zeros(self.X.size)
        self._band = None  # see _band_at
        self.Hc = np.zeros(self.X.size + self.L)
        self.knots = [np.unique(np.round(np.array(_KNOTS) * n).astype(np.int64)) for n in self.n]
        self.knot_error = [np.zeros(len(c)) for c in self.knots]  # Hc at the knots, / E0
        self.done = [np.zeros(max(len(c) - 1, 0), dtype=bool) for c in self.knots]
        for j in np.flatnonzero(~self.frozen):
            self._knot_products(j)

    # -- precomputation ---------------------------------------------------------------------
    def _knot_products(self, j):
        k, d_out, d_in = self.shapes[j]
        s0, n = int(self.start[j]), int(self.n[j])
        knots = self.knots[j]
        Z = np.zeros(n, dtype=np.float32)  # the weights below the current knot, in place
        for i in range(1, len(knots) - 1):
            a, b, c = int(knots[i - 1]), int(knots[i]), int(knots[i + 1])
            Z[self.F[s0 + a : s0 + b]] = self.Wv[s0 + a : s0 + b]
            AG = (Z.reshape(k, d_out, d_in) @ self.G32[j]).ravel()
            self.knot_error[j][i] = float(np.dot(Z.astype(np.float64), AG)) / self.E0[j]
            self.Q[s0 + b : s0 + c] = np.take(AG, self.F[s0 + b : s0 + c])
        self.knot_error[j][-1] = 1.0  # pruning everything costs E0

    def _fill(self, j, lo, hi):
        """Complete Q and Hc for layer j's local sorted range [lo, hi) and at lo."""
        knots = self.knots[j]
        first = int(np.searchsorted(knots, min(lo, self.n[j] - 1), side="right")) - 1
        last = int(np.searchsorted(knots, max(hi - 1, lo), side="right")) - 1
        for s in range(max(first, 0), min(last, len(knots) - 2) + 1):
            if not self.done[j][s]:
                self._fill_slice(j, int(knots[s]), int(knots[s + 1]), self.knot_error[j][s])
                self.done[j][s] = True

    def _fill_slice(self, j, a, b, base):
        """Q and Hc on [a, b): Q already holds the part from below a (the knot's product).

        The slice is cut into parts, each but the first with its own dense product, so that
        the pairs left inside the parts cost about as much as the products.
        """
        k, d_out, d_in = self.shapes[j]
        s0, n = int(self.start[j]), int(self.n[j])
        per_row = (b - a) / (k * d_out)
        parts = int(min(max(round(per_row / d_in * math.sqrt(_PAIR_COST)), 1), max((b - a) // 64, 1)))
        cuts = np.linspace(a, b, parts + 1).round().astype(np.int64)
        base = base * self.E0[j]
        h = int(self.hoff[j])
        for i in range(parts):
            u, v = int(cuts[i]), int(cuts[i + 1])
            f = self.F[s0 + u : s0 + v]
            w = self.Wv[s0 + u : s0 + v]
            if i:  # interaction with everything below u, from one product
                Z = np.zeros(n, dtype=np.float32)
                Z[self.F[s0 : s0 + u]] = self.Wv[s0 : s0 + u]
                AG = (Z.reshape(k, d_out, d_in) @ self.G32[j]).ravel()
                self.Q[s0 + u : s0 + v] = np.take(AG, f)
                base = float(np.dot(Z.astype(np.float64), AG))
            rows = f // d_in
            cols = f % d_in
            gbase = self.goff[j] + (rows // d_out) * d_in * d_in + cols * d_in
            inside = _RowPairs(rows, cols, gbase, self.Gflat).sums(w, earlier=True)
            q = self.Q[s0 + u : s0 + v] + inside
            self.Q[s0 + u : s0 + v] = q
            own = w * w * np.take(self.Gflat, gbase + cols)  # w^2 G[c, c]
            self.Hc[h + u] = base
            self.Hc[h + u + 1 : h + v + 1] = base + np.cumsum(own + 2.0 * w * q)
            base = self.Hc[h + v]

    # -- the soft objective ----------------------------------------------------------------
    loss = "sum"  # see LOSSES

    def set_temperatures(self, tau):
        """T = max(T0 Var(|w|), w^2 span of the _MIN_SOFT weights nearest tau / 4) per layer.

        In a layer's far tail that span can be huge; there T stays below _MAX_T * Var(|w|)
        (unless the layer is small), or the band would take in most of the layer.
        """
        half = _MIN_SOFT // 2
        for j in np.flatnonzero(~self.frozen):
            s, n = int(self.start[j]), int(self.n[j])
            c = int(np.searchsorted(self.X[s : s + n], tau[j], side="right"))
            a, b = max(c - half, 0), min(c + half, n - 1)
            wide = 0.25 * (self.X[s + b] - self.X[s + a])
            if n > 20 * _MIN_SOFT:
                wide = min(wide, _MAX_T * self.spread[j])
            self.T[j] = max(self.T_base[j], wide)

    def _find(self, values):
        """Per layer, the global index just past the sorted entries with w^2 <= value."""
        q = np.clip(values / self.xmax, -0.4, 1.4)
        return np.searchsorted(self.key, np.arange(self.L) + 0.25 + 0.5 * q, side="right")

    def _band_at(self, tau):
        """The band entries for thresholds `tau`, from the cache while it still covers them.

        The cache holds every entry within (_CUTOFF + _BAND_MARGIN) T of the thresholds it was
        built at, with what does not change while tau moves inside it: the interactions with the
        weights below it, its rows' pairs and their G entries. Adam moves tau a little per step,
        so most steps reuse it; entries beyond _CUTOFF T get m = 0 or 1 exactly, as before.
        """
        band = self._band
        if band is not None and np.array_equal(band.T_layers, self.T):
            width = _CUTOFF * self.T
            lo, hi = self._find(tau - width), self._find(tau + width)
            if np.all((lo >= band.lo) & (hi <= band.hi) | self.frozen):
                return band
        width = (_CUTOFF + _BAND_MARGIN) * self.T
        lo, hi = self._find(tau - width), self._find(tau + width)
        lengths = np.where(self.frozen, 0, hi - lo)
        for j in np.flatnonzero(~self.frozen):
            self._fill(j, int(lo[j] - self.start[j]), int(hi[j] - self.start[j]))
        band = _Band(lo=lo, hi=hi, T_layers=self.T.copy())
        nb = int(lengths.sum())
        lay = np.repeat(np.arange(self.L), lengths)
        idx = np.arange(nb) + np.repeat(lo - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        band.lay, band.x, band.w = lay, self.X[idx], self.Wv[idx]
        band.T = self.T[lay]
        f, d_in = self.F[idx], self.d_in[lay]
        row, col = f // d_in, f % d_in
        gbase = self.goff[lay] + (row // self.d_out[lay]) * d_in * d_in + col * d_in
        band.pairs = _RowPairs(self.rowbase[lay] + row, col, gbase, self.Gflat, keep=_MAX_PAIRS)
        # interaction with the weights below the band (all pruned)
        band.below = self.Q[idx] - band.pairs.sums(band.w, earlier=True)
        band.base = self.Hc[self.hoff + (lo - self.start)]  # their own error
        band.tail = self.start + self.n - hi  # the weights above the band (all kept)
        self._band = band
        return band

    def evaluate(self, tau, lam):
        """Per-layer R and dR/dtau at thresholds `tau` (frozen layers give 0, 0)."""
        b = self._band_at(tau)
        z = (b.x - tau[b.lay]) / b.T
        m = np.where(z > _CUTOFF, 1.0, np.where(z <= -_CUTOFF, 0.0, _sigmoid(z)))
        D = b.w * (m - 1.0)
        S2 = b.pairs.sums(D)
        DG = S2 - b.below  # ((V - W) G) at the band weights
        dm = -m * (1.0 - m) / b.T
        g_err = _sums(b.lay, 2.0 * DG * b.w * dm, self.L) / self.E0
        g_l0 = _sums(b.lay, dm, self.L) * (lam / self.l0_norm)
        recon = b.base + _sums(b.lay, D * (S2 - 2.0 * b.below), self.L)
        kept = b.tail + _sums(b.lay, m, self.L)
        err, slope = _chain(recon / self.E0, self.loss)
        grad = slope * g_err + g_l0
        R = err + lam * kept / self.l0_norm
        R[self.frozen] = 0.0
        grad[self.frozen] = 0.0
        return R, grad

    # -- hard masks --------------------------------------------------------------------------
    def warm_start(self, lam, floor=None):
        """Per layer, the threshold minimising the HARD objective on the knot grid (refined by
        a parabola through the best knot and its neighbours); at least `floor` if given."""
        tau = np.zeros(self.L)
        for j in range(self.L):
            s, n = int(self.start[j]), int(self.n[j])
            if self.frozen[j] or n == 0:
                continue
            c = self.knots[j].astype(np.float64)
            o = _chain(self.knot_error[j], self.loss)[0] + lam * (n - c) / self.l0_norm[j]
            i = int(np.argmin(o))
            best = c[i]
            if 0 < i < len(c) - 1:
                # vertex of the parabola through the three knots around the minimum
                x0, x1, x2 = c[i - 1 : i + 2]
                y0, y1, y2 = o[i - 1 : i + 2]
                den = (x0 - x1) * (x0 - x2) * (x1 - x2)
                A = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / den
                B = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / den
                if A > 0:
                    best = min(max(-B / (2 * A), x0), x2)
            cnt = int(round(best))
            if cnt <= 0:
                tau[j] = 0.5 * self.X[s]
            elif cnt >= n:
                tau[j] = self.X[s + n - 1] * (1 + 1e-6) + self.T_base[j]
            else:
                tau[j] = 0.5 * (self.X[s + cnt - 1] + self.X[s + cnt])
        return tau if floor is None else np.maximum(tau, floor)

    def hard_zeros(self, tau):
        """Per layer #(w^2 <= tau); a frozen layer (all weights zero) counts all its weights."""
        c = np.array([np.searchsorted(self.X[s : s + n], t, side="right")
                      for s, n, t in zip(self.start, self.n, tau)], dtype=np.int64)
        return np.where(self.frozen, self.n, c)

    def exact_zeros(self, tau, target, lower=None):
        """Per-layer counts summing to `target`: hard counts, settled on the boundary weights.

        The difference is spread over the layers in proportion to their sizes, each layer
        giving up (or getting back) the weights nearest its threshold: candidates are ranked by
        (their rank from the threshold) / n_l, ties to the lower layer index. `lower` bounds
        each layer's count from below.
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
        rank = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        key = (rank + 1) / self.n[lay] + 2.0 * self.frozen[lay]  # all-zero layers last
        if len(key) < need:
            raise InfeasibleError(f"cannot settle {need} weights within the per-layer bounds")
        # the `need` smallest keys; ties at the cut go to the lower layer index
        cut = np.partition(key, need - 1)[need - 1]
        pick = np.flatnonzero(key < cut)
        tied = np.flatnonzero(key == cut)[: need - len(pick)]  # already in layer order
        moved = np.bincount(lay[np.concatenate([pick, tied])], minlength=self.L)
        return c + moved if diff > 0 else c - moved


def _adam(layers, tau, lam, steps, lr):
    """Adam on theta = log(tau / mean(w^2)), cosine-decayed step; returns tau and R per step."""
    s = layers.scale
    layers.set_temperatures(tau)
    # beyond these the band is empty and the gradient vanishes
    lo = np.log(np.maximum(-(_CUTOFF - 1.0) * layers.T, 1e-12 * s) / s)
    hi = np.log((layers.xmax + (_CUTOFF - 1.0) * layers.T) / s)
    theta = np.clip(np.log(np.maximum(tau, 1e-12 * s) / s), lo, hi)
    m1 = np.zeros_like(theta)
    m2 = np.zeros_like(theta)
    b1, b2, eps = 0.9, 0.999, 1e-12
    trajectory = []
    for t in range(1, steps + 1):
        tau = s * np.exp(theta)
        R, g = layers.evaluate(tau, lam)
        trajectory.append(float(R.sum()))
        g = g * tau  # d/dtheta
        m1 = b1 * m1 + (1 - b1) * g
        m2 = b2 * m2 + (1 - b2) * g * g
        rate = lr * 0.5 * (1.0 + math.cos(math.pi * (t - 1) / steps))
        theta -= rate * (m1 / (1 - b1**t)) / (np.sqrt(m2 / (1 - b2**t)) + eps)
        np.clip(theta, lo, hi, out=theta)
    return s * np.exp(theta), trajectory


def _coarse_log_lam(layers, target, floor):
    """log(lambda) at which the knot-grid hard objective's minimisers zero about `target`."""
    a, b = _LOG_LAM_RANGE
    for _ in range(50):
        mid = 0.5 * (a + b)
        zeros = int(layers.hard_zeros(layers.warm_start(math.exp(mid), floor)).sum())
        a, b = (mid, b) if zeros < target else (a, mid)
    return 0.5 * (a + b)


def _search_lambda(layers, target, floor, steps, lr, on_probe, offset=0):
    """Search log(lambda) so that the hard masks zero `target` weights; returns the best probe.

    Each probe is an Adam run of `steps` from the knot-grid minimiser for its lambda, so its
    count is a function of lambda alone. The knot grid also predicts where to probe next: the
    Adam count minus the grid's count at the same lambda is taken as a constant offset (the
    first probe of a trail level takes the previous level's: ~1 probe fewer per level).
    R is flat near its minimum (the count moves by ~0.5 % at no visible cost), so the search
    stops within _COUNT_TOLERANCE of the target rather than chasing noise.
    """
    lo_lim, hi_lim = _LOG_LAM_RANGE
    probes = []

    def probe(ll):
        ll = min(max(ll, lo_lim), hi_lim)
        tau, traj = _adam(layers, layers.warm_start(math.exp(ll), floor), math.exp(ll), steps, lr)
        zeros = int(layers.hard_zeros(tau).sum())
        grid = int(layers.hard_zeros(layers.warm_start(math.exp(ll), floor)).sum())
        p = {"log_lam": ll, "tau": tau, "zeros": zeros, "offset": zeros - grid, "objective": traj,
             "T": layers.T.copy()}
        probes.append(p)
        if on_probe is not None:
            on_probe({"target": int(target), "lam": math.exp(ll), "hard_zeros": zeros,
                      "objective": traj[-1]})
        return p

    tol = int(_COUNT_TOLERANCE * layers.n.sum())
    p = probe(_coarse_log_lam(layers, target - offset, floor))
    below = p if p["zeros"] <= target else None
    above = p if p["zeros"] >= target else None
    step = 0.05
    while (below is None or above is None) and len(probes) < _MAX_PROBES:
        # predicted from the grid; at least `step` further in the right direction
        ll = _coarse_log_lam(layers, target - p["offset"], floor)
        ll = max(ll, p["log_lam"] + step) if below is not None else min(ll, p["log_lam"] - step)
        step *= 2
        p = probe(ll)
        if p["zeros"] <= target and (below is None or p["log_lam"] > below["log_lam"]):
            below = p
        if p["zeros"] >= target and (above is None or p["log_lam"] < above["log_lam"]):
            above = p
        if p["log_lam"] in (lo_lim, hi_lim):
            break
    sides = []  # which end each interpolated probe replaced
    while (below is not None and above is not None
           and min(target - below["zeros"], above["zeros"] - target) > tol
           and above["log_lam"] - below["log_lam"] > _LOG_LAM_WIDTH and len(probes) < _MAX_PROBES):
        if len(sides) >= 2 and sides[-1] == sides[-2] != "mid":
            frac = 0.5  # interpolation keeps moving one end only: bisect instead
        else:  # interpolate the count linearly in log(lambda), away from the bracket ends
            frac = (target - below["zeros"]) / max(above["zeros"] - below["zeros"], 1)
            frac = min(max(frac, 0.1), 0.9)
        p = probe(below["log_lam"] + frac * (above["log_lam"] - below["log_lam"]))
        side = "below" if p["zeros"] <= target else "above"
        below, above = (p, above) if side == "below" else (below, p)
        sides.append("mid" if frac == 0.5 else side)
    best = min(probes, key=lambda q: (abs(q["zeros"] - target), probes.index(q)))
    return best, len(probes)


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
    on_probe: Callable[[dict], None] | None = None,
    l0: str = "layer",
    loss: str = "sum",
) -> LTPResult:
    """Learn one threshold per layer; return exact per-layer zero counts summing to target_zeros.

    weights[l]: (k, d_out, d_in) (or 2-D), grams[l]: (k, d_in, d_in) unnormalised X^T X of that
    layer's calibration inputs. Every lambda probe is an Adam run of `steps` steps; `lr` is
    relative to tau (Adam on log tau). The method is deterministic: `seed` exists for a uniform
    method interface and changes nothing. `trail`: increasing zero targets solved along one
    path (least sparse first; each level's thresholds start no lower than the previous level's,
    and per-layer counts never decrease); target_zeros is added to it if missing, the returned
    result is its level, and `.levels` holds them all. `on_probe`, if given, is called with one
    dict per probe (target, lam, hard_zeros, objective = final R). `l0`: "layer" divides each
    layer's soft count by its size, as in ALGORITHMS.md; "total" (ours) by the number of all
    weights, so lambda prices every weight the same and the budget is a total count. `loss`:
    how a layer's relative error e enters R: "sum" (e, ALGORITHMS.md) or "nsr" (ours,
    e / (1 - e): see _chain).
    """
    del seed  # deterministic: no random choices are made
    if len(weights) != len(grams):
        raise OnnxPruneError(f"{len(weights)} weight stacks but {len(grams)} Gram stacks")
    if not (T0 > 0 and lr > 0 and steps >= 1):
        raise OnnxPruneError(f"LTP needs T0 > 0, lr > 0 and steps >= 1 (got {T0}, {lr}, {steps})")
    if trail is not None and list(trail) != sorted(set(int(t) for t in trail)):
        raise OnnxPruneError("the trail must list strictly increasing zero counts")
    if loss not in LOSSES:
        raise OnnxPruneError(f"unknown LTP loss {loss!r} ({' or '.join(LOSSES)})")
    layers = _Layers(weights, grams, T0)
    layers.loss = loss
    if l0 == "total":
        layers.l0_norm[:] = max(int(layers.n.sum()), 1)
    elif l0 != "layer":
        raise OnnxPruneError(f"unknown LTP L0 normalisation {l0!r} (layer or total)")
    total = int(layers.n.sum())
    levels = sorted(set([int(t) for t in (trail or [])] + [int(target_zeros)]))
    for t in levels:
        if not 0 <= t <= total:
            raise InfeasibleError(f"cannot zero {t} of {total} prunable weights")
    floor, lower, results, offset = None, None, [], 0
    for t in levels:
        final, probes = _search_lambda(layers, t, floor, steps, lr, on_probe, offset)
        layers.T = final["T"]
        zeros = layers.exact_zeros(final["tau"], t, lower)
        results.append(LTPResult(
            target_zeros=t, zeros=[int(z) for z in zeros], thresholds=[float(v) for v in final["tau"]],
            lam=math.exp(final["log_lam"]), objective=final["objective"],
            temperatures=[float(v) for v in layers.T], hard_zeros=final["zeros"], probes=probes,
        ))
        floor, lower, offset = final["tau"], zeros, final["offset"]
    main = results[levels.index(int(target_zeros))]
    if trail is not None:
        main.levels = results
    return main
