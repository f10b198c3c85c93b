"""DC-programming smart pruning (FeTa, ALGORITHMS.md section 3), one block of a layer at a time.

A block is a dense weight `W` (d_out, d_in) and an optional bias `b`. The pruned block keeps
exactly `n_keep` weights (plus a refitted bias) chosen so that the block's OUTPUT on calibration
data matches the dense block's output:
- `dc_relu_block`: blocks followed by ReLU. Needs per-sample inputs X; targets Y = relu(X W^T + b);
  the softplus fit F(U) = (1/n)||s(X_a U^T) - Y||^2 + lam ||U||_1 is minimised by DCA.
- `dc_linear_block`: other blocks. The convex quadratic (1/n)||X_a (U - [W b])^T||^2 + lam ||U||_1
  needs only the Gram matrix of X_a; solved by FISTA.
Both (ours): `lam` is set by a log-space bisection so that the L1 solution keeps about `n_keep`
weights, then exactly the `n_keep` largest |U| are kept and refitted with the support fixed.

U = [W_u b_u] has the bias as its LAST column; X_a = [X 1]. The bias is never L1-penalised and is
not counted in `n_keep`. A block without bias has no ones column and returns `None` as bias.
"""

from __future__ import annotations

import math

import numpy as np

from onnxprune.errors import OnnxPruneError

# Curvature bound of z -> s(z)^2 / 2 for softplus s: s'^2 + s s'' <= 1.046 for every theta (the
# maximum sits at theta z ~ 3.2). It bounds the minibatch Lipschitz constant of grad g.
_SOFTPLUS_SQ_CURVATURE = 1.05


# --- the DC pieces (reference forms on X_a, used by the tests and for the recorded objective) ----

def _softplus_sigmoid(z, theta):
    """softplus s(z) = log(1 + exp(theta z)) / theta and its slope sigmoid(theta z), overflow-free."""
    t = z * theta
    e = np.exp(-np.abs(t))
    s = (np.maximum(t, 0) + np.log1p(e)) / theta
    sig = np.where(t >= 0, 1.0, e) / (1.0 + e)
    return s, sig.astype(s.dtype, copy=False)


def softplus(z, theta=10.0):
    """Smooth ReLU s(z) = log(1 + exp(theta z)) / theta; `theta` may be per output column."""
    return _softplus_sigmoid(np.asarray(z), theta)[0]


def _l1(U, bias_last):
    """L1 norm of the weights of U, leaving out the bias column."""
    weights = U[:, :-1] if bias_last else U
    return float(np.abs(weights).sum(dtype=np.float64))


def dc_objective(U, Xa, Y, lam, theta=10.0, *, bias_last=True):
    """F(U) = (1/n) ||s(X_a U^T) - Y||^2 + lam ||U||_1 (bias column not penalised)."""
    s, _ = _softplus_sigmoid(Xa @ U.T, theta)
    return float(np.sum((s - Y) ** 2, dtype=np.float64) / len(Xa) + lam * _l1(U, bias_last))


def dc_g(U, Xa, lam, theta=10.0, *, bias_last=True):
    """Convex part g(U) = (1/n) sum s(X_a U^T)^2 + lam ||U||_1."""
    s, _ = _softplus_sigmoid(Xa @ U.T, theta)
    return float(np.sum(s * s, dtype=np.float64) / len(Xa) + lam * _l1(U, bias_last))


def dc_h(U, Xa, Y, theta=10.0):
    """Concave part's negation h(U) = (2/n) sum Y * s(X_a U^T); convex because Y >= 0."""
    s, _ = _softplus_sigmoid(Xa @ U.T, theta)
    return float(2.0 * np.sum(Y * s, dtype=np.float64) / len(Xa))


def grad_g_smooth(U, Xa, theta=10.0):
    """Gradient of the smooth part of g: (2/n) [s(Z) * sigmoid(theta Z)]^T X_a, Z = X_a U^T."""
    s, sig = _softplus_sigmoid(Xa @ U.T, theta)
    return (2.0 / len(Xa)) * (s * sig).T @ Xa


def grad_h(U, Xa, Y, theta=10.0):
    """Gradient of h: (2/n) [Y * sigmoid(theta Z)]^T X_a, Z = X_a U^T."""
    _, sig = _softplus_sigmoid(Xa @ U.T, theta)
    return (2.0 / len(Xa)) * (Y * sig).T @ Xa


# --- shared: the L1 weight that keeps n_keep, and exact top-k -----------------------------------

def _keep_threshold(pre_prox, n_keep):
    """Soft-threshold level that keeps exactly the n_keep largest |pre_prox| (midpoint of the
    n_keep-th and next magnitude, so an exact tie at the boundary is cut on both sides)."""
    mags = np.abs(pre_prox).ravel()
    if n_keep >= mags.size:
        return 0.0
    part = np.partition(mags, (mags.size - n_keep - 1, mags.size - n_keep))
    return 0.5 * float(part[mags.size - n_keep - 1] + part[mags.size - n_keep])


def _top_k_mask(U, W, n_keep):
    """Boolean mask of the n_keep largest |U|; ties and U == 0 ordered by |W|, then flat index.

    Same total order as the magnitude pruner (higher flat index kept among exact ties). Entries the
    L1 solution zeroed can only be chosen when it kept fewer than n_keep; then the largest dense
    weights fill the gap.
    """
    order = np.lexsort((np.arange(U.size), np.abs(W).ravel(), np.abs(U).ravel()))
    mask = np.zeros(U.size, dtype=bool)
    if n_keep:
        mask[order[-n_keep:]] = True
    return mask.reshape(U.shape)


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


# --- ReLU blocks: DCA with diagonally preconditioned proximal SVRG inner steps ------------------

class _ReluFit:
    """Data of one ReLU block fit and its parametrisation.

    Inputs are centred when the block has a bias: z = (X - m) U^T + c with c = b + U m, which
    changes nothing in F but removes the dominant mean direction from the curvature. Steps use the
    diagonal metric d_j = var(x_j) (the L1 prox then thresholds column j at step * lam / d_j),
    so that features of different scale converge alike.
    """

    def __init__(self, X, Y, theta, has_bias):
        self.X, self.Y, self.theta, self.n = X, Y, theta, len(X)
        self.mean = X.mean(axis=0, dtype=np.float64) if has_bias else np.zeros(X.shape[1])
        var = np.zeros(X.shape[1])
        for start in range(0, self.n, 4096):
            var += np.sum((X[start:start + 4096] - self.mean) ** 2, axis=0, dtype=np.float64)
        var /= self.n
        floor = 1e-3 * float(var.mean()) if var.mean() > 0 else 1.0
        self.metric = np.maximum(var, floor).astype(np.float32)
        self.inv_metric = (1.0 / self.metric).astype(np.float32)
        self.mean = self.mean.astype(np.float32)

    def batch(self, rows):
        return self.X[rows] - self.mean

    def activations(self, Uw, c):
        z = self.X @ Uw.T
        if c is not None:
            z += c - Uw @ self.mean
        return _softplus_sigmoid(z, self.theta)

    def objective(self, s, Uw, lam):
        return float(np.sum((s - self.Y) ** 2, dtype=np.float64) / self.n
                     + lam * np.abs(Uw).sum(dtype=np.float64))

    def snapshot(self, s, sig, has_bias):
        """SVRG anchor at U_k: per-row g factors s*sigmoid and grad F_smooth(U_k) = grad g - C_k."""
        resid = (s - self.Y) * sig
        sums = resid.sum(axis=0, dtype=np.float64)
        mu_w = (2.0 / self.n) * (resid.T @ self.X - np.outer(sums, self.mean))
        mu_c = (2.0 / self.n) * sums if has_bias else None
        return s * sig, mu_w, mu_c


def _minibatch_step(fit, batch, has_bias, rng, n_batches=8, power_iters=30):
    """Step 1/L with L an upper estimate of the minibatch Lipschitz constant of grad g (metric).

    L <= 2 * 1.05 * lambda_max(D^-1/2 X_b,a^T X_b,a D^-1/2 / B) for centred, metric-scaled
    batches; the max over a few batches, from the small B x B kernels by batched power iteration
    (10 % margin).
    """
    rows = np.stack([rng.choice(fit.n, size=min(batch, fit.n), replace=False) for _ in range(n_batches)])
    xb = fit.batch(rows).astype(np.float64)
    k = (xb * fit.inv_metric) @ xb.transpose(0, 2, 1) + (1.0 if has_bias else 0.0)
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


def _inner_solve(fit, snap, Uw, c, lam, mask, sched, step, rng, keep=None):
    """Approximately minimise g(U) - <C_k, U> by accelerated proximal SVRG from U_k.

    SVRG direction: grad_b g(V) - grad_b g(U_k) + grad F_smooth(U_k); the anchor terms come from
    the outer pass for free, so a step costs two (B x d_in x d_out) products, like plain SGD.
    Nesterov look-ahead with constant momentum; weights step in the metric D and are
    soft-thresholded after every step (bias: plain step, no threshold).
    With `keep`, lam is re-chosen at every step so that the step keeps exactly `keep` weights;
    the returned lam is then the geometric mean over the last half of the steps.
    """
    r_snap, mu_w, mu_c = snap
    theta, beta, inv_metric = fit.theta, sched.momentum, fit.inv_metric
    v, v_prev = Uw.copy(), Uw.copy()
    look, grad = np.empty_like(v), np.empty_like(v)
    vc = vc_prev = c
    eta_mu_w = (step * mu_w * inv_metric).astype(np.float32)
    eta_mu_c = None if c is None else (step * mu_c).astype(np.float32)
    thr = (step * lam * inv_metric).astype(np.float32)
    log_lam = []
    order = np.empty(0, dtype=np.int64)
    for it in range(sched.steps):
        if len(order) < sched.batch:
            order = np.concatenate([order, rng.permutation(fit.n)])
        rows, order = order[:sched.batch], order[sched.batch:]
        xb = fit.batch(rows)
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
        grad *= inv_metric
        look -= grad
        look -= eta_mu_w
        if keep is not None:
            level = _keep_threshold(look * fit.metric, keep)  # = step * lam keeping `keep`
            thr = (level * inv_metric).astype(np.float32)
            if 2 * it >= sched.steps:
                log_lam.append(math.log(max(level / step, 1e-30)))
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
        lam = math.exp(sum(log_lam) / len(log_lam))
    return v, vc, lam


def _dca(fit, Uw, c, lam, mask, outer_iters, sched, step, rng, history):
    """DCA: linearise h at U_k, solve the convex rest approximately, accept only if F decreases.

    A rejected inner solve (stochastic overshoot) is redone from U_k with half the step, so the
    recorded objective never increases. Returns the last accepted U and the step in use.
    """
    s, sig = fit.activations(Uw, c)
    f = fit.objective(s, Uw, lam)
    history.append(f)
    for _ in range(outer_iters):
        snap = fit.snapshot(s, sig, c is not None)
        for _attempt in range(4):
            vw, vc, _ = _inner_solve(fit, snap, Uw, c, lam, mask, sched, step, rng)
            s_new, sig_new = fit.activations(vw, vc)
            f_new = fit.objective(s_new, vw, lam)
            if f_new <= f:
                break
            step *= 0.5
        else:
            break  # no decrease at four step sizes: U_k is stationary to sampling accuracy
        Uw, c, s, sig, f = vw, vc, s_new, sig_new, f_new
        history.append(f)
    return Uw, c, step


def dc_relu_block(X, W, b, n_keep, *, theta=10.0, outer_iters=4, inner_epochs=3, batch_size=200,
                  momentum=0.95, step=None, seed=0, relative_theta=True, search_iters=1,
                  debias_iters=2, min_inner_steps=100, max_inner_steps=300, info=None):
    """Prune a block followed by ReLU to exactly `n_keep` weights by DC programming (FeTa).

    X: (n, d_in) calibration inputs of the block (already subsampled). W: (d_out, d_in), b: (d_out,)
    or None. Targets Y = relu(X W^T + b) come from the dense weights. With `relative_theta`
    (ours) each output's theta is divided by the RMS of its dense pre-activation, which makes the
    softplus sharpness independent of the layer's scale. Steps, all warm-started from dense [W b]:
    1. `search_iters` DCA iterations whose inner steps re-choose lam at every step so that the
       step keeps exactly n_keep weights; lam is then frozen at their late-step geometric mean;
    2. `outer_iters` DCA iterations at that fixed lam (objective recorded, never increasing);
    3. exact top-n_keep |U|; `debias_iters` DCA iterations with the support fixed and no L1.
    An inner solve runs `inner_epochs` epochs of `batch_size` rows, clipped to
    [min_inner_steps, max_inner_steps] steps (SVRG keeps a clipped solve unbiased over all rows).
    `step` is in the metric of _ReluFit (None: from a minibatch Lipschitz estimate).
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
    if relative_theta:
        rms = np.sqrt(np.mean(pre.astype(np.float64) ** 2, axis=0))
        theta_eff /= np.where(rms > 0, rms, 1.0).astype(np.float32)
    del pre
    fit = _ReluFit(X, Y, theta_eff, has_bias)
    c = (np.asarray(b, dtype=np.float32) + Uw @ fit.mean) if has_bias else None
    sched = _Schedule(fit.n, batch_size, inner_epochs, min_inner_steps, max_inner_steps, momentum)
    if step is None:
        step = _minibatch_step(fit, sched.batch, has_bias, rng)

    lam, history = 0.0, []
    if n_keep > 0:
        for _ in range(search_iters):
            s, sig = fit.activations(Uw, c)
            Uw, c, lam = _inner_solve(fit, fit.snapshot(s, sig, has_bias), Uw, c, lam, None,
                                      sched, step, rng, keep=n_keep)
        Uw, c, step = _dca(fit, Uw, c, lam, None, outer_iters, sched, step, rng, history)

    mask = _top_k_mask(Uw, W, n_keep)
    start_w = np.where(mask, np.where(Uw != 0, Uw, W), 0).astype(np.float32)
    if has_bias:  # keep the pre-activations' offset when filling in dense weights
        c = c + (start_w - Uw) @ fit.mean
    debias_history = []
    new_w, new_c, step = _dca(fit, start_w, c, 0.0, mask.astype(np.float32), debias_iters, sched,
                              step, rng, debias_history)
    if info is not None:
        info.update(lam=lam, theta=theta_eff, history=history, debias_history=debias_history,
                    U_l1=(Uw, None if c is None else c - Uw @ fit.mean),
                    support_l1=int(np.count_nonzero(Uw)), step=step)
    new_w = np.where(mask, new_w, 0).astype(W.dtype)
    if not has_bias:
        return new_w, None
    return new_w, (new_c - new_w.astype(np.float32) @ fit.mean).astype(np.asarray(b).dtype)


# --- blocks without ReLU: L1 least squares on the Gram matrix -----------------------------------

def _fista(G, P, U, lam, L, iters, n_w, keep=None):
    """FISTA on tr((U - Wa) G (U - Wa)^T) + lam ||U[:, :n_w]||_1 (P = Wa G), started at U.

    With `keep`, lam is re-chosen at every iteration so that the step keeps exactly `keep`
    weights; the returned lam is then the geometric mean over the last half of the iterations.
    """
    x, y, t, log_lam = U.copy(), U.copy(), 1.0, []
    for it in range(iters):
        pre = y - (2.0 / L) * (y @ G - P)
        if keep is not None:
            lam = _keep_threshold(pre[:, :n_w], keep) * L
            if 2 * it >= iters:
                log_lam.append(math.log(max(lam, 1e-300)))
        w = pre[:, :n_w]
        pre[:, :n_w] = np.sign(w) * np.maximum(np.abs(w) - lam / L, 0)
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        y = pre + ((t - 1.0) / t_new) * (pre - x)
        x, t = pre, t_new
    if keep is not None and log_lam:
        lam = math.exp(sum(log_lam) / len(log_lam))
    return x, lam


def _largest_eigenvalue(G, rng, iters=60):
    """Upper estimate of lambda_max(G) by block power iteration (Rayleigh-Ritz), with 5 % margin."""
    d = len(G)
    if d <= 512:
        return float(np.linalg.eigvalsh(G)[-1])
    q = np.linalg.qr(rng.standard_normal((d, 4)))[0]
    for _ in range(iters):
        q = np.linalg.qr(G @ q)[0]
    return 1.05 * float(np.linalg.eigvalsh(q.T @ G @ q)[-1])


def _masked_cg(G, rhs, x0, mask, damping, iters, tol):
    """Solve (G_SS + damping I) x_S = rhs_S for every row at once, S = the row's mask.

    Batched Jacobi-preconditioned conjugate gradient: each row of x is its own system; entries
    outside the mask stay 0. Stops when every row's residual is below tol * ||rhs_row||.
    """
    x = np.where(mask, x0, 0.0)
    apply = lambda p: np.where(mask, p @ G, 0.0) + damping * p  # noqa: E731
    r = np.where(mask, rhs, 0.0) - apply(x)
    inv_diag = np.where(mask, 1.0 / (np.diag(G) + damping), 0.0)
    z = r * inv_diag
    p = z.copy()
    rz = np.sum(r * z, axis=1)
    limit = tol * np.linalg.norm(np.where(mask, rhs, 0.0), axis=1) + 1e-300
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


def dc_linear_block(gram_aug, W, b, n_keep, *, iters=100, search_iters=100, damping=1e-6,
                    cg_iters=500, cg_tol=1e-10, seed=0, info=None):
    """Prune a block NOT followed by ReLU to exactly `n_keep` weights (quadratic DC variant).

    gram_aug: X_a^T X_a with X_a = [X 1] (ones column LAST), shape (d_in + 1, d_in + 1); when
    `b` is None the plain X^T X (d_in, d_in). Any positive multiple works (the unnormalised sum,
    or divided by n): the result does not depend on the scale (it is divided by its mean
    diagonal, and lam is set from the target count). Minimises tr((U - Wa) G (U - Wa)^T)
    + lam ||U||_1 by FISTA (step 1/L, L = 2 lambda_max(G)), warm-started from dense Wa:
    `search_iters` iterations re-choose lam at every step to keep exactly n_keep weights, then
    `iters` iterations at the frozen lam; exact top-n_keep; then every row is refitted by least
    squares on its support (batched CG), with `damping` * mean diag(G) pulling toward the start
    (it only matters where G is singular). Returns (W_new, b_new) in the input dtypes.
    """
    W, n_keep = _checked(W, b, n_keep)
    n_w = W.shape[1]
    G = np.asarray(gram_aug, dtype=np.float64)
    d_a = n_w + (b is not None)
    if G.shape != (d_a, d_a):
        raise OnnxPruneError(f"Gram shape {G.shape} does not fit weight {W.shape} "
                             f"{'with' if b is not None else 'without'} bias (expected ({d_a}, {d_a}))")
    if n_keep >= np.count_nonzero(W):
        return _unchanged(W, b)
    scale = float(np.mean(np.diag(G)))
    if not scale > 0:
        raise OnnxPruneError("the Gram matrix is zero: no calibration signal for DC pruning")
    G = 0.5 * (G + G.T) / scale
    Wa = W.astype(np.float64)
    if b is not None:
        Wa = np.hstack([Wa, np.asarray(b, dtype=np.float64)[:, None]])
    P = Wa @ G
    L = 2.0 * _largest_eigenvalue(G, np.random.default_rng(seed))

    lam, U = 0.0, Wa
    if n_keep > 0:
        U, lam = _fista(G, P, Wa, 0.0, L, search_iters, n_w, keep=n_keep)
        U, _ = _fista(G, P, U, lam, L, iters, n_w)

    mask_w = _top_k_mask(U[:, :n_w], W, n_keep)
    mask = np.hstack([mask_w, np.ones((W.shape[0], 1), bool)]) if b is not None else mask_w
    start = np.where(mask, U, 0.0)
    start[:, :n_w] = np.where(mask_w & (start[:, :n_w] == 0), Wa[:, :n_w], start[:, :n_w])
    # normal equations on the support: G_SS u_S = (Wa G)_S, damped toward the start
    new = _masked_cg(G, P + damping * start, start, mask, damping, cg_iters, cg_tol)
    if info is not None:
        info.update(lam=lam, U_l1=U, support_l1=int(np.count_nonzero(U[:, :n_w])), L=L)
    new_w = np.where(mask_w, new[:, :n_w], 0).astype(W.dtype)
    return new_w, (None if b is None else new[:, -1].astype(np.asarray(b).dtype))
