"""DC-programming smart pruning (FeTa, ALGORITHMS.md section 3), one block of a layer at a time.

A block is a dense weight `W` (d_out, d_in) and an optional bias `b`. The pruned block keeps
exactly `n_keep` weights (plus a refitted bias) chosen so that the block's OUTPUT on calibration
data matches the dense block's output:
- `dc_relu_block`: blocks followed by ReLU. Needs per-sample inputs X; targets Y = relu(X W^T + b);
  the softplus fit F(U) = (1/n)||s(X_a U^T) - Y||^2 + lam ||U||_1 is minimised by DCA.
- `dc_linear_block`: other blocks. The convex quadratic (1/n)||X_a (U - [W b])^T||^2 + lam ||U||_1
  needs only the Gram matrix of X_a; solved by FISTA.
Both (ours): warm start from dense; `lam` is chosen so that the L1 solution keeps n_keep weights
(re-chosen at every step of a first phase, where it is the exact root of "this step keeps n_keep",
then frozen), then exactly the `n_keep` largest |U| are kept and refitted with the support fixed.

U = [W_u b_u] has the bias as its LAST column; X_a = [X 1]. The bias is never L1-penalised and is
not counted in `n_keep`. A block without bias has no ones column and returns `None` as bias.
"""

from __future__ import annotations

import math

import numpy as np

from onnxprune.errors import OnnxPruneError
from onnxprune.methods.magnitude import keep_threshold, top_k_mask
from onnxprune.methods.refit import masked_cg

# Curvature bound of z -> s(z)^2 / 2 for softplus s: s'^2 + s s'' <= 1.046 for every theta (the
# maximum sits at theta z ~ 3.2). It bounds the minibatch Lipschitz constant of grad g.
_SOFTPLUS_SQ_CURVATURE = 1.05
# d_out * d_in^2 above which the refit's products with the covariance run in float32 (speed)
_BIG_PRODUCT = 5e7


# --- shared pieces ---------------------------------------------------------------------------

def _softplus_sigmoid(z, theta):
    """softplus s(z) = log(1 + exp(theta z)) / theta and its slope sigmoid(theta z), overflow-free."""
    t = z * theta
    e = np.exp(-np.abs(t))
    s = (np.maximum(t, 0) + np.log1p(e)) / theta
    sig = np.where(t >= 0, 1.0, e) / (1.0 + e)
    return s, sig.astype(s.dtype, copy=False)


class _FrozenLam:
    """The lam a search phase freezes: the geometric mean of its values over the last tenth of
    the phase's steps (the last step always counts, so a phase of fewer than ten has one)."""

    def __init__(self, steps):
        self.steps, self.logs = steps, []

    def record(self, it, lam):
        if 10 * it >= 9 * self.steps or it == self.steps - 1:
            self.logs.append(math.log(max(lam, 1e-300)))

    def value(self, default):
        """The frozen lam; `default` when no step ran."""
        return math.exp(sum(self.logs) / len(self.logs)) if self.logs else default


def _reweight(W, gamma):
    """Adaptive-lasso factors (mean|W| / |W_ij|)^gamma, capped at 1e12 (dense zeros hit the cap)."""
    mags = np.abs(W).astype(np.float64)
    with np.errstate(divide="ignore"):
        return np.minimum((mags.mean() / mags) ** gamma, 1e12)


def _checked(W, b, n_keep):
    W = np.asarray(W)
    if W.ndim != 2:
        raise OnnxPruneError(f"DC pruning needs a 2-D block weight, got shape {W.shape}")
    if b is not None and np.shape(b) != (W.shape[0],):
        raise OnnxPruneError(f"bias shape {np.shape(b)} does not match weight rows {W.shape[0]}")
    if not 0 <= int(n_keep) <= W.size:
        raise OnnxPruneError(f"n_keep={n_keep} outside [0, {W.size}] for a block of {W.size} weights")
    return W, int(n_keep)


def _unchanged(W, b):
    return W.copy(), (None if b is None else np.array(b, copy=True))


# inputs whose variation over the calibration rows is below this fraction of their size are
# constant up to rounding (a dead channel after ReLU, identical rows)
_CONSTANT_INPUTS = 1e-9


def _constant_inputs(var, square_mean) -> bool:
    return float(np.max(var, initial=0.0)) <= _CONSTANT_INPUTS * max(float(np.max(square_mean, initial=0.0)), 1e-300)


def _by_magnitude(W, b, n_keep, mean):
    """The block's inputs do not vary on the calibration data, so they cannot choose weights:
    keep the n_keep largest |W| and move what the pruned weights added on those inputs (W m)
    into the bias, so the outputs there stay exact."""
    new_w = np.where(top_k_mask(W, n_keep), W, 0).astype(W.dtype)
    if b is None:
        return new_w, None
    shift = (W.astype(np.float64) - new_w) @ np.asarray(mean, dtype=np.float64)
    return new_w, (np.asarray(b, dtype=np.float64) + shift).astype(np.asarray(b).dtype)


def _finite_or_magnitude(new_w, new_b, W, b, n_keep, mean):
    """A solve that overflowed (badly conditioned inputs) gives way to magnitude pruning."""
    if np.isfinite(new_w).all() and (new_b is None or np.isfinite(new_b).all()):
        return new_w, new_b
    return _by_magnitude(W, b, n_keep, mean)


# --- ReLU blocks: DCA with diagonally preconditioned proximal SVRG inner steps ------------------

class _ReluFit:
    """Data of one ReLU block fit, in scaled coordinates.

    Each input column is centred (when the block has a bias, which absorbs the shift) and divided
    by its standard deviation: X_s = (X - m) / sqrt(d), weights V = U * sqrt(d), bias c = b + U m.
    F is unchanged (its L1 term becomes sum_j |V_ij| / sqrt(d_j)), but the curvature loses the
    dominant mean direction and the scale spread of the features, so steps converge alike.
    """

    def __init__(self, X, Y, theta, has_bias):
        self.Y, self.theta, self.n = Y, theta, len(X)
        self.mean = X.mean(axis=0, dtype=np.float64) if has_bias else np.zeros(X.shape[1])
        self.Xs = X - self.mean.astype(np.float32)
        self.var = var = np.einsum("ij,ij->j", self.Xs, self.Xs, dtype=np.float64) / self.n
        floor = 1e-3 * float(var.mean()) if var.mean() > 0 else 1.0
        self.sqrt_d = np.sqrt(np.maximum(var, floor))
        self.Xs /= self.sqrt_d.astype(np.float32)
        self.l1_weight = (1.0 / self.sqrt_d).astype(np.float32)  # per column, on V

    def to_scaled(self, Uw, b):
        V = (Uw * self.sqrt_d).astype(np.float32)
        return V, (None if b is None else (b + Uw @ self.mean).astype(np.float32))

    def from_scaled(self, V, c):
        Uw = V / self.sqrt_d
        return Uw, (None if c is None else c - Uw @ self.mean)

    def activations(self, V, c):
        z = self.Xs @ V.T
        if c is not None:
            z += c
        return _softplus_sigmoid(z, self.theta)

    def objective(self, s, V, lam):
        return float(np.sum((s - self.Y) ** 2, dtype=np.float64) / self.n
                     + lam * (np.abs(V) * self.l1_weight).sum(dtype=np.float64))

    def snapshot(self, s, sig, has_bias):
        """SVRG anchor at V_k: per-row g factors s*sigmoid and grad F_smooth(V_k) = grad g - C_k."""
        resid = (s - self.Y) * sig
        mu_w = (2.0 / self.n) * (resid.T @ self.Xs)
        mu_c = (2.0 / self.n) * resid.sum(axis=0, dtype=np.float64) if has_bias else None
        return s * sig, mu_w, mu_c


def _minibatch_step(fit, batch, has_bias, rng, n_batches=8, power_iters=30):
    """Step 1/L with L an upper estimate of the minibatch Lipschitz constant of grad g.

    L <= 2 * 1.05 * lambda_max(X_b,a^T X_b,a / B) (scaled inputs plus the ones column); the max
    over a few batches, from the small B x B kernels by batched power iteration (10 % margin).
    """
    rows = np.stack([rng.choice(fit.n, size=min(batch, fit.n), replace=False) for _ in range(n_batches)])
    xb = fit.Xs[rows].astype(np.float64)
    k = xb @ xb.transpose(0, 2, 1) + (1.0 if has_bias else 0.0)
    v = np.ones(k.shape[:2])
    for _ in range(power_iters):
        v = np.einsum("bij,bj->bi", k, v)
        v /= np.linalg.norm(v, axis=1, keepdims=True) + 1e-300
    lmax = float(np.max(np.einsum("bi,bij,bj->b", v, k, v))) * 1.1 / rows.shape[1]
    return 1.0 / (2.0 * _SOFTPLUS_SQ_CURVATURE * max(lmax, 1e-12))


class _Schedule:
    """Minibatch size and the number of steps of one inner solve."""

    def __init__(self, n, batch, inner_epochs, min_steps, max_steps, momentum):
        self.batch = min(batch, n)
        per_epoch = -(-n // self.batch)
        self.steps = int(min(max(inner_epochs * per_epoch, min_steps), max_steps))
        self.momentum = momentum


def _inner_solve(fit, snap, V, c, lam, mask, sched, step, rng, keep=None):
    """Approximately minimise g(V) - <C_k, V> by accelerated proximal SVRG from V_k.

    SVRG direction: grad_b g(.) - grad_b g(V_k) + grad F_smooth(V_k); the anchor terms come from
    the outer pass for free, so a step costs two (B x d_in x d_out) products, like plain SGD.
    Nesterov look-ahead with constant momentum; weights are soft-thresholded after every step
    (column j at step * lam * l1_weight_j; the bias is not thresholded).
    With `keep`, lam is re-chosen every few steps so that the step keeps exactly `keep` weights;
    the returned lam is then the one _FrozenLam freezes.
    """
    r_snap, mu_w, mu_c = snap
    theta, beta, Xs = fit.theta, sched.momentum, fit.Xs
    v, v_prev = V.copy(), V.copy()
    look, grad = np.empty_like(v), np.empty_like(v)
    vc = vc_prev = c
    eta_mu_w = (step * mu_w).astype(np.float32)
    eta_mu_c = None if c is None else (step * mu_c).astype(np.float32)
    thr = (step * lam * fit.l1_weight).astype(np.float32)
    frozen = _FrozenLam(sched.steps)
    order = np.empty(0, dtype=np.int64)
    for it in range(sched.steps):
        if len(order) < sched.batch:
            order = np.concatenate([order, rng.permutation(fit.n)])
        rows, order = order[:sched.batch], order[sched.batch:]
        xb = Xs[rows]
        np.subtract(v, v_prev, out=look)
        look *= beta
        look += v
        z = xb @ look.T
        if c is not None:
            look_c = vc + beta * (vc - vc_prev)
            z += look_c
        s, sig = _softplus_sigmoid(z, theta)
        r = s * sig
        r -= r_snap[rows]
        r *= np.float32(2.0 * step / len(rows))
        np.matmul(r.T, xb, out=grad)
        look -= grad
        look -= eta_mu_w
        if keep is not None and (it % 4 == 0 or it == sched.steps - 1):
            level = keep_threshold(np.abs(look / fit.l1_weight), keep)  # = step * lam keeping `keep`
            thr = (level * fit.l1_weight).astype(np.float32)
            frozen.record(it, level / step)  # the last step always re-chooses lam
        v, v_prev = v_prev, v  # the new iterate overwrites the buffer of the one before last
        if lam > 0 or keep is not None:
            np.abs(look, out=v)
            v -= thr
            np.maximum(v, 0, out=v)
            np.copysign(v, look, out=v)
        else:
            v[...] = look
        if mask is not None:
            v *= mask
        if c is not None:
            vc, vc_prev = look_c - r.sum(axis=0) - eta_mu_c, vc
    if keep is not None:
        lam = frozen.value(lam)
    return v, vc, lam


def _dca(fit, V, c, lam, mask, outer_iters, sched, step, rng, history):
    """DCA: linearise h at V_k, solve the convex rest approximately, accept only if F decreases.

    A rejected inner solve (stochastic overshoot) is redone from V_k with half the step, so the
    recorded objective never increases. Returns the last accepted (V, c) and the step in use.
    """
    s, sig = fit.activations(V, c)
    f = fit.objective(s, V, lam)
    history.append(f)
    for _ in range(outer_iters):
        snap = fit.snapshot(s, sig, c is not None)
        for _attempt in range(4):
            vw, vc, _ = _inner_solve(fit, snap, V, c, lam, mask, sched, step, rng)
            s_new, sig_new = fit.activations(vw, vc)
            f_new = fit.objective(s_new, vw, lam)
            if f_new <= f:
                break
            step *= 0.5
        else:
            break  # no decrease at four step sizes: V_k is stationary to sampling accuracy
        V, c, s, sig, f = vw, vc, s_new, sig_new, f_new
        history.append(f)
    return V, c, step


def dc_relu_block(X, W, b, n_keep, *, theta=10.0, outer_iters=4, inner_epochs=3, batch_size=200,
                  momentum=0.95, step=None, seed=0, search_iters=3,
                  debias_iters=2, min_inner_steps=100, max_inner_steps=100, l1_reweight=0.0,
                  info=None):
    """Prune a block followed by ReLU to exactly `n_keep` weights by DC programming (FeTa).

    X: (n, d_in) calibration inputs of the block (already subsampled). W: (d_out, d_in), b: (d_out,)
    or None. Targets Y = relu(X W^T + b) come from the dense weights. (Ours) each output's theta
    is divided by the RMS of its dense pre-activation, which makes the softplus sharpness
    independent of the layer's scale. Steps, warm-started from dense [W b]:
    1. DCA, `outer_iters` outer iterations (K). In the first `search_iters` of them every inner
       step re-chooses lam so that the step keeps exactly n_keep weights (this replaces a
       bisection on lam: the root is found exactly, by a partition of the step's magnitudes);
       lam is then frozen at the geometric mean of its last values, and the remaining
       iterations minimise F at that fixed lam (recorded in info["history"], never increasing);
    2. exact top-n_keep |U| (dense |W| breaks ties and fills a support the L1 left short);
    3. `debias_iters` DCA iterations with the support fixed and no L1.
    An inner solve runs `inner_epochs` epochs of `batch_size` rows, clipped to
    [min_inner_steps, max_inner_steps] steps; with the defaults that is always 100 steps (3 epochs
    would be 1.5 k steps at n = 20 k rows, too slow, and 8 at n = 512, too few). Its SVRG anchor
    is a full pass, so a clipped solve stays unbiased over all rows. `step` is the step in the
    scaled coordinates of _ReluFit (None: from a minibatch Lipschitz estimate).
    `l1_reweight` = gamma > 0 (ours, off by default: the paper uses plain L1) weights the L1 term
    of weight ij by (mean|W| / |W_ij|)^gamma, an adaptive lasso: the data still decide, but small
    dense weights pay more to stay. It chose better supports at every sparsity we tried.
    Returns (W_new, b_new) in the input dtypes. Pass a dict as `info` to receive diagnostics
    (lam, theta, history of F per outer iteration, U_l1, support_l1, step).
    """
    W, n_keep = _checked(W, b, n_keep)
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[1] != W.shape[1] or len(X) == 0:
        raise OnnxPruneError(f"calibration inputs of shape {X.shape} do not fit a weight {W.shape}")
    if n_keep >= np.count_nonzero(W):
        return _unchanged(W, b)  # already within budget: nothing to prune
    rng = np.random.default_rng(seed)
    has_bias = b is not None
    Uw = W.astype(np.float32)
    pre = X @ Uw.T
    if has_bias:
        pre += np.asarray(b, dtype=np.float32)
    Y = np.maximum(pre, 0)
    theta_eff = np.full(W.shape[0], theta, dtype=np.float32)
    rms = np.sqrt(np.mean(pre.astype(np.float64) ** 2, axis=0))
    theta_eff /= np.where(rms > 0, rms, 1.0).astype(np.float32)
    del pre
    fit = _ReluFit(X, Y, theta_eff, has_bias)
    # per column: the variance and the raw second moment (no second pass over X); without a
    # bias the fit does not centre, and _by_magnitude needs no mean
    if _constant_inputs(fit.var, fit.var + fit.mean ** 2):
        return _by_magnitude(W, b, n_keep, fit.mean)
    if l1_reweight:
        fit.l1_weight = (fit.l1_weight * _reweight(W, l1_reweight)).astype(np.float32)
    V, c = fit.to_scaled(Uw, None if b is None else np.asarray(b, dtype=np.float64))
    sched = _Schedule(fit.n, batch_size, inner_epochs, min_inner_steps, max_inner_steps, momentum)
    if step is None:
        step = _minibatch_step(fit, sched.batch, has_bias, rng)

    lam, history = 0.0, []
    if n_keep > 0:
        searches = min(search_iters, outer_iters)
        for _ in range(searches):
            s, sig = fit.activations(V, c)
            V, c, lam = _inner_solve(fit, fit.snapshot(s, sig, has_bias), V, c, lam, None,
                                     sched, step, rng, keep=n_keep)
        V, c, step = _dca(fit, V, c, lam, None, outer_iters - searches, sched, step, rng, history)
    l1_w, l1_b = fit.from_scaled(V, c)

    mask = top_k_mask(l1_w, n_keep, tiebreak=W)
    start_w = np.where(mask, np.where(l1_w != 0, l1_w, W), 0)
    # filled-in dense weights keep their offset: the bias is unchanged in original units
    V, c = fit.to_scaled(start_w, l1_b)
    debias_history = []
    V, c, step = _dca(fit, V, c, 0.0, mask.astype(np.float32), debias_iters, sched, step, rng,
                      debias_history)
    new_w, new_b = fit.from_scaled(V, c)
    if info is not None:
        info.update(lam=lam, theta=theta_eff, history=history, debias_history=debias_history,
                    U_l1=(l1_w, l1_b), support_l1=int(np.count_nonzero(l1_w)), step=step)
    new_w = np.where(mask, new_w, 0).astype(W.dtype)
    # a kept weight refitted to exactly 0 carries no calibration signal: keep its dense value
    new_w = np.where(mask & (new_w == 0), W, new_w)
    return _finite_or_magnitude(new_w, None if b is None else new_b.astype(np.asarray(b).dtype),
                                W, b, n_keep, fit.mean)


def nearest_on_rows(X, W, b, candidates):
    """Index of the candidate (weights, bias) whose ReLU outputs on the rows X are nearest the
    dense block's (W, b): DCA follows its stochastic steps and can end far from the best fit on
    its support, which a least-squares refit of that support may then beat."""
    X = np.asarray(X, dtype=np.float32)

    def outputs(w, c):
        z = X @ np.asarray(w, dtype=np.float32).T
        return np.maximum(z + np.asarray(c, dtype=np.float32) if c is not None else z, 0)

    dense = outputs(W, b)
    errors = [float(np.sum((outputs(w, c) - dense) ** 2, dtype=np.float64)) for w, c in candidates]
    return int(np.argmin(errors))


# --- blocks without ReLU: L1 least squares on the Gram matrix -----------------------------------

def _fista(C, P, V, lam, L, iters, l1_weight, keep=None):
    """FISTA on tr((V - V0) C (V - V0)^T) + lam sum_ij l1_weight_j |V_ij| (P = V0 C), from V.

    With `keep`, lam is re-chosen at every iteration so that the step keeps exactly `keep`
    weights; the returned lam is then the one _FrozenLam freezes.
    """
    x, y, t, frozen = V.copy(), V.copy(), 1.0, _FrozenLam(iters)
    for it in range(iters):
        pre = y - (2.0 / L) * (y @ C - P)
        if keep is not None:
            level = keep_threshold(np.abs(pre / l1_weight), keep)  # = lam / L keeping `keep`
            lam = level * L
            frozen.record(it, lam)
        x_new = np.sign(pre) * np.maximum(np.abs(pre) - (lam / L) * l1_weight, 0)
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        y = x_new + ((t - 1.0) / t_new) * (x_new - x)
        x, t = x_new, t_new
    if keep is not None:
        lam = frozen.value(lam)
    return x, lam


def _largest_eigenvalue(C, rng, iters=60):
    """Upper estimate of lambda_max(C) by block power iteration (Rayleigh-Ritz), 5 % margin."""
    d = len(C)
    if d <= 512:
        return float(np.linalg.eigvalsh(C.astype(np.float64))[-1])
    q = np.linalg.qr(rng.standard_normal((d, 4)).astype(C.dtype))[0]
    for _ in range(iters):
        q = np.linalg.qr(C @ q)[0]
    return 1.05 * float(np.linalg.eigvalsh((q.T @ C @ q).astype(np.float64))[-1])


def _scaled_covariance(G, has_bias):
    """Covariance-type matrix of the inputs from the Gram, and the scaling that makes it unit-diagonal.

    With a bias: C = G_xx / G_11 - m m^T with m = G_x1 / G_11 (the input covariance; the bias then
    decouples, see dc_linear_block). Without: C = G / mean diag(G). Returns (C_s, sqrt_d, m) with
    C_s = C / (sqrt_d sqrt_d^T); sqrt_d = sqrt(diag C), floored at 1e-3 of its mean (dead inputs).
    """
    if has_bias:
        count = G[-1, -1]
        if not count > 0:
            raise OnnxPruneError("the Gram matrix's ones-column entry (last diagonal) must be > 0")
        m = G[:-1, -1] / count
        C = G[:-1, :-1] / count
        C -= np.outer(m, m)
    else:
        scale = float(np.mean(np.diag(G)))
        m, C = None, G / (scale if scale > 0 else 1.0)  # all-zero inputs: C = 0, see the caller
    var = np.maximum(np.diag(C), 0.0)
    floor = 1e-3 * float(var.mean()) if var.mean() > 0 else 1.0
    sqrt_d = np.sqrt(np.maximum(var, floor))
    C /= sqrt_d[:, None]
    C /= sqrt_d[None, :]
    C += C.T  # symmetrise exactly (the accumulated Gram may be off by rounding)
    C *= 0.5
    return C, sqrt_d, m


def dc_linear_block(gram_aug, W, b, n_keep, *, iters=100, search_iters=100, damping=1e-6,
                    cg_iters=100, cg_tol=1e-10, seed=0, l1_reweight=0.0, info=None):
    """Prune a block NOT followed by ReLU to exactly `n_keep` weights (quadratic DC variant).

    gram_aug: X_a^T X_a with X_a = [X 1] (ones column LAST), shape (d_in + 1, d_in + 1), either
    the unnormalised sum (last diagonal entry = n) or divided by n (last entry 1): both give the
    same result. Without bias (`b` None) the plain X^T X (d_in, d_in), any positive scale.
    The objective (1/n)||X_a (U - [W b])^T||^2 + lam ||U||_1 (weighted as in dc_relu_block when
    `l1_reweight` > 0) splits, with c = b + U m
    (m = input mean, C = input covariance), into tr((U - W) C (U - W)^T) + ||c - c_dense||^2
    + lam ||U||_1: the bias is exactly c_dense - U m and only the weights need solving.
    FISTA (step 1/L, L = 2 lambda_max) runs on the unit-diagonal scaling of C, from dense W:
    `search_iters` iterations re-choose lam at every step to keep exactly n_keep weights, then
    `iters` iterations at the frozen lam; exact top-n_keep |U| (|W| breaks ties); every row is
    refitted by least squares on its support (batched CG, at most `cg_iters` iterations), with
    `damping` (relative to the unit diagonal) pulling toward the start, which only matters where
    C is singular. Returns (W_new, b_new) in the input dtypes.
    """
    W, n_keep = _checked(W, b, n_keep)
    has_bias = b is not None
    G = np.asarray(gram_aug, dtype=np.float64)
    d_a = W.shape[1] + has_bias
    if G.shape != (d_a, d_a):
        raise OnnxPruneError(f"Gram shape {G.shape} does not fit weight {W.shape} "
                             f"{'with' if has_bias else 'without'} bias (expected ({d_a}, {d_a}))")
    if n_keep >= np.count_nonzero(W):
        return _unchanged(W, b)
    Cs, sqrt_d, m = _scaled_covariance(G, has_bias)
    mean = np.zeros(W.shape[1]) if m is None else m
    raw_square = np.diag(G)[:W.shape[1]] / (G[-1, -1] if has_bias else 1.0)
    # centred variances with a bias; without one only all-zero inputs carry no signal
    var = np.diag(Cs) * sqrt_d ** 2 if has_bias else raw_square
    if _constant_inputs(var, raw_square):
        return _by_magnitude(W, b, n_keep, mean)
    l1_weight = 1.0 / sqrt_d
    if l1_reweight:
        l1_weight = l1_weight * _reweight(W, l1_reweight)
    V0 = W.astype(np.float64) * sqrt_d
    P = V0 @ Cs
    L = 2.0 * _largest_eigenvalue(Cs, np.random.default_rng(seed))

    lam, U = 0.0, W.astype(np.float64)
    if n_keep > 0:
        # float32 is ample for choosing the support; the refit below is float64
        C32, P32, w32 = Cs.astype(np.float32), P.astype(np.float32), l1_weight.astype(np.float32)
        V, lam = _fista(C32, P32, V0.astype(np.float32), 0.0, L, search_iters, w32, keep=n_keep)
        V, _ = _fista(C32, P32, V, lam, L, iters, w32)
        U = V.astype(np.float64) / sqrt_d

    mask = top_k_mask(U, n_keep, tiebreak=W)
    start = np.where(mask, np.where(U != 0, U, W), 0.0) * sqrt_d
    # normal equations on the support: C_SS v_S = (V0 C)_S, damped toward the start
    big = W.shape[0] * Cs.shape[0] ** 2 > _BIG_PRODUCT
    V_new = masked_cg(Cs.astype(np.float32) if big else Cs, P + damping * start, start, mask,
                      damping, cg_iters, cg_tol)
    new_w = np.where(mask, V_new / sqrt_d, 0.0)
    new_w = np.where(mask & (new_w == 0), W, new_w)  # as in dc_relu_block
    if info is not None:
        info.update(lam=lam, U_l1=U, support_l1=int(np.count_nonzero(U)), L=L)
    if not has_bias:
        return _finite_or_magnitude(new_w.astype(W.dtype), None, W, b, n_keep, mean)
    c_dense = np.asarray(b, dtype=np.float64) + W.astype(np.float64) @ m
    return _finite_or_magnitude(new_w.astype(W.dtype),
                                (c_dense - new_w @ m).astype(np.asarray(b).dtype), W, b, n_keep, mean)
