"""Tests for onnxprune.methods.ltp: gradient, soft/hard counts, exact targets, trails, allocation."""

import numpy as np
import pytest

from onnxprune.errors import InfeasibleError, OnnxPruneError
from onnxprune.methods import ltp
from onnxprune.methods.ltp import learn_thresholds


def soft_mask(w, tau, T):
    """LTP's soft mask sigmoid((w^2 - tau) / T): ~1 keeps a weight, ~0 prunes it."""
    w = np.asarray(w, dtype=np.float64)
    return ltp._sigmoid((w * w - tau) / T)


def ltp_objective_and_grad(W, G, tau, T, lam, E0, loss="sum"):
    """Reference: R(tau) and dR/dtau for one layer by the direct formula (2-D = one block).

    With e = trace((V - W) G (V - W)^T) / E0 and R = phi(e) + lam * sum(m) / n (phi: _chain):
    de/dV = 2 (V - W) G / E0;  dR/dtau = sum((phi'(e) de/dV * w + lam / n) * dm/dtau),
    dm/dtau = -m(1-m)/T.
    """
    W3 = W if W.ndim == 3 else W[None]
    G3 = G if G.ndim == 3 else G[None]
    n = W3.size
    m = soft_mask(W3, tau, T)
    D = W3 * (m - 1.0)  # V - W
    DG = D @ G3
    err, slope = ltp._chain(np.sum(D * DG) / E0, loss)
    R = float(err + lam * m.sum() / n)
    dm_dtau = -m * (1.0 - m) / T
    grad = float(np.sum((2.0 * float(slope) * DG / E0 * W3 + lam / n) * dm_dtau))
    return R, grad


def gram(rng, k, d, n=300, scales=None):
    X = rng.standard_normal((k, n, d)) @ rng.standard_normal((k, d, d)) / np.sqrt(d)
    if scales is not None:
        X = X * scales
    return X.transpose(0, 2, 1) @ X


def problem(seed=0):
    """Five layers of different shapes (one with 3 blocks), correlated inputs."""
    rng = np.random.default_rng(seed)
    shapes = [(1, 16, 9), (1, 32, 72), (1, 48, 150), (1, 10, 48), (3, 8, 12)]
    weights = [rng.standard_normal(s) * rng.uniform(0.2, 2.0) for s in shapes]
    grams = [gram(rng, k, d) for k, _, d in shapes]
    return weights, grams


@pytest.mark.parametrize("loss", ["sum", "nsr"])
def test_gradient_matches_finite_difference(loss):
    """dR/dtau against central differences; with loss="nsr", R = e / (1 - e) + the L0 term."""
    rng = np.random.default_rng(1)
    W = rng.standard_normal((2, 7, 11))
    G = gram(rng, 2, 11)
    E0 = float(np.sum(W * (W @ G)))
    T = 0.05 * np.var(np.abs(W))
    for q in (0.2, 0.5, 0.8):
        tau = float(np.quantile(W * W, q))
        h = 1e-6 * float(np.mean(W * W))
        R, grad = ltp_objective_and_grad(W, G, tau, T, 0.7, E0, loss=loss)
        if loss == "nsr":
            e, _ = ltp_objective_and_grad(W, G, tau, T, 0.0, E0)  # the relative error itself
            assert R == pytest.approx(e / (1 - e) + 0.7 * soft_mask(W, tau, T).mean())
        up, _ = ltp_objective_and_grad(W, G, tau + h, T, 0.7, E0, loss=loss)
        down, _ = ltp_objective_and_grad(W, G, tau - h, T, 0.7, E0, loss=loss)
        assert grad == pytest.approx((up - down) / (2 * h), rel=1e-5)


def test_objective_parts():
    """R = relative output error of V = W * m plus lam times the kept fraction."""
    rng = np.random.default_rng(2)
    W = rng.standard_normal((5, 6))
    G = gram(rng, 1, 6)[0]
    E0 = float(np.sum(W * (W @ G)))
    tau, T, lam = 0.5, 0.1, 0.3
    m = soft_mask(W, tau, T)
    D = W * m - W
    R, _ = ltp_objective_and_grad(W, G, tau, T, lam, E0)
    assert R == pytest.approx(np.trace(D @ G @ D.T) / E0 + lam * m.mean())


def test_soft_count_tends_to_hard_count():
    rng = np.random.default_rng(3)
    w = rng.standard_normal(5000)
    tau = float(np.quantile(w * w, 0.6)) * 1.0001  # not exactly on a weight
    hard = int(np.sum(w * w > tau))
    gaps = [abs(float(soft_mask(w, tau, T).sum()) - hard) for T in (1e-1, 1e-2, 1e-3, 1e-4, 1e-6, 1e-9)]
    assert all(b <= a + 1e-9 for a, b in zip(gaps, gaps[1:]))
    assert gaps[0] > 10 and gaps[-1] < 1e-6


@pytest.mark.parametrize("loss, cutoff", [("sum", None), ("sum", 20.0), ("nsr", 20.0)])
def test_fast_evaluation_matches_direct(monkeypatch, loss, cutoff):
    """The band/prefix evaluation used by Adam equals the direct formula (to the cutoff)."""
    if cutoff is not None:
        monkeypatch.setattr(ltp, "_CUTOFF", cutoff)
    weights, grams = problem(4)
    layers = ltp._Layers(weights, grams, 0.01)
    layers.loss = loss
    rng = np.random.default_rng(5)
    for _ in range(8):
        tau = np.array([np.quantile(w * w, rng.uniform(0.05, 0.97)) for w in weights])
        layers.set_temperatures(tau)
        R, grad = layers.evaluate(tau, 0.8)
        for j, (W, G) in enumerate(zip(weights, grams)):
            r, g = ltp_objective_and_grad(W, G, tau[j], layers.T[j], 0.8, layers.E0[j], loss=loss)
            if cutoff is None:
                # m taken as 0 / 1 beyond 8 T: small errors next to the size of either term
                _, g_count = ltp_objective_and_grad(W, G, tau[j], layers.T[j], 0.8, np.inf)
                assert R[j] == pytest.approx(r, rel=1e-4)
                assert grad[j] == pytest.approx(g, abs=0.02 * (abs(g) + abs(g_count)))
            else:
                assert R[j] == pytest.approx(r, rel=1e-7)
                assert grad[j] == pytest.approx(g, rel=1e-5)


@pytest.mark.parametrize("max_pairs", [1 << 22, 0])
def test_cached_band_equals_a_fresh_one(monkeypatch, max_pairs):
    """Adam's small moves reuse the band built at an earlier tau (and large moves rebuild it):
    both give what a fresh evaluation gives. max_pairs=0: the G blocks are gathered per call."""
    monkeypatch.setattr(ltp, "_MAX_PAIRS", max_pairs)
    weights, grams = problem(4)
    layers = ltp._Layers(weights, grams, 0.01)
    tau0 = np.array([np.quantile(w * w, 0.5) for w in weights])
    layers.set_temperatures(tau0)
    layers.evaluate(tau0, 0.8)
    built = layers._band
    for shift, reused in ((0.5, True), (-1.0, True), (40.0, False), (0.0, False)):
        if shift == 0.0:  # same tau, new temperatures: the band's sigmoid widths are stale
            layers.evaluate(tau0, 0.8)
            built = layers._band
            layers.T = layers.T * 1.1  # (the band would still cover the new width)
            tau = tau0
        else:
            tau = tau0 + shift * layers.T
        R, grad = layers.evaluate(tau, 0.8)
        assert (layers._band is built) == reused
        fresh = ltp._Layers(weights, grams, 0.01)
        fresh.T = layers.T.copy()
        R1, grad1 = fresh.evaluate(tau, 0.8)
        assert np.allclose(R, R1, rtol=1e-10, atol=0) and np.allclose(grad, grad1, rtol=1e-8, atol=0)


def test_prefix_errors_are_exact():
    """Hc[c]: the error of zeroing the c smallest weights, here against a direct product."""
    rng = np.random.default_rng(6)
    W = rng.standard_normal((2, 9, 131))
    G = gram(rng, 2, 131)
    layers = ltp._Layers([W], [G], 1e-3)
    layers._fill(0, 0, W.size)
    for c in (0, 1, 7, 300, 1100, W.size - 2, W.size):
        D = np.zeros(W.size)
        D[layers.F[:c]] = W.ravel()[layers.F[:c]]
        D = D.reshape(W.shape)
        assert layers.Hc[c] == pytest.approx(np.sum(D * (D @ G)), rel=1e-6, abs=1e-9 * layers.E0[0])


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_counts_sum_exactly_to_target(fraction):
    weights, grams = problem()
    total = sum(w.size for w in weights)
    target = int(round(fraction * total))
    res = learn_thresholds(weights, grams, target, steps=100)
    assert sum(res.zeros) == target == res.target_zeros
    assert all(0 <= z <= w.size for z, w in zip(res.zeros, weights))
    assert len(res.thresholds) == len(res.temperatures) == len(weights)
    assert len(res.objective) == 100 and res.lam > 0
    # the search itself gets close; the settlement only fixes the last few weights
    assert abs(res.hard_zeros - target) <= 0.02 * total


def test_odd_targets_and_layers():
    """Target 1 and N - 1; a layer without calibration signal; an all-zero layer."""
    weights, grams = problem(7)
    weights.append(np.random.default_rng(8).standard_normal((6, 7)))
    grams.append(np.zeros((7, 7)))  # inputs always zero: falls back to the weights' own error
    weights.append(np.zeros((3, 5)))
    grams.append(np.eye(5))
    total = sum(w.size for w in weights)
    for target in (1, total // 3, total - 1):
        res = learn_thresholds(weights, grams, target, steps=60)
        assert sum(res.zeros) == target
        assert all(0 <= z <= w.size for z, w in zip(res.zeros, weights))
    assert res.zeros[-1] == 15  # the all-zero layer counts as zeroed, except at tiny targets


def test_reproducible():
    weights, grams = problem(9)
    target = sum(w.size for w in weights) // 2
    a = learn_thresholds(weights, grams, target, steps=80, seed=0)
    b = learn_thresholds(weights, grams, target, steps=80, seed=0)
    c = learn_thresholds(weights, grams, target, steps=80, seed=123)
    assert a.zeros == b.zeros == c.zeros
    assert a.thresholds == b.thresholds == c.thresholds
    assert a.objective == b.objective and a.lam == b.lam


def test_trail_monotone_and_exact():
    weights, grams = problem(10)
    total = sum(w.size for w in weights)
    trail = [total // 10, total // 3, total // 2, (4 * total) // 5]
    res = learn_thresholds(weights, grams, total // 2, trail=trail, steps=80)
    assert [lvl.target_zeros for lvl in res.levels] == trail
    counts = np.array([lvl.zeros for lvl in res.levels])
    assert (counts.sum(axis=1) == trail).all()
    assert (np.diff(counts, axis=0) >= 0).all()
    assert res.zeros == res.levels[2].zeros
    # a target missing from the trail is added to it
    extra = learn_thresholds(weights, grams, total // 4, trail=trail[:2], steps=40)
    assert [lvl.target_zeros for lvl in extra.levels] == sorted(trail[:2] + [total // 4])


def column_scaled_layer(rng, d_out, d_in, input_power):
    """Column j of W has scale s_j; its input has scale s_j ** input_power."""
    s = np.geomspace(0.1, 3.0, d_in)
    W = rng.standard_normal((d_out, d_in)) * s
    X = rng.standard_normal((400, d_in)) * s**input_power
    return W, X.T @ X


def test_allocation_is_learned_from_the_gram():
    """Same weight statistics, different inputs: where small weights meet large inputs, their
    errors cost more and LTP keeps more of that layer; scaling a Gram changes nothing."""
    rng = np.random.default_rng(11)
    costly = column_scaled_layer(rng, 24, 40, -1.0)  # small weights x large inputs
    cheap = column_scaled_layer(rng, 24, 40, 1.0)  # small weights x small inputs
    weights, grams = [costly[0], cheap[0]], [costly[1], cheap[1]]
    target = sum(w.size for w in weights) // 2
    res = learn_thresholds(weights, grams, target, steps=150)
    assert res.zeros[0] < 0.6 * res.zeros[1]
    scaled = learn_thresholds(weights, [1e4 * grams[0], grams[1]], target, steps=150)
    assert abs(scaled.zeros[0] - res.zeros[0]) <= 0.02 * target


def test_history_records_each_probe():
    weights, grams = problem(12)
    history = []
    res = learn_thresholds(weights, grams, sum(w.size for w in weights) // 2, steps=50, on_probe=history.append)
    assert len(history) == res.probes >= 1
    assert {"target", "lam", "hard_zeros", "objective"} <= set(history[0])
    assert any(h["lam"] == pytest.approx(res.lam) and h["hard_zeros"] == res.hard_zeros for h in history)


def test_bad_requests():
    weights, grams = problem(13)
    total = sum(w.size for w in weights)
    with pytest.raises(InfeasibleError):
        learn_thresholds(weights, grams, total + 1)
    with pytest.raises(InfeasibleError):
        learn_thresholds(weights, grams, -1)
    with pytest.raises(OnnxPruneError):
        learn_thresholds(weights, grams[:-1], 10)
    with pytest.raises(OnnxPruneError):
        learn_thresholds(weights, [g[..., :-1] for g in grams], 10)
    with pytest.raises(OnnxPruneError):
        learn_thresholds(weights, grams, 10, trail=[20, 10])
    with pytest.raises(OnnxPruneError):
        learn_thresholds(weights, grams, 10, T0=0.0)


def test_obs_gram_prices_the_error_left_after_refit():
    """w_i^2 * obs_gram_ii = error of pruning weight i alone and refitting the rest of its row."""
    from onnxprune.methods.refit import damped_gram, output_error, refit_on_support
    rng = np.random.default_rng(9)
    W = rng.standard_normal((4, 10))
    G = gram(rng, 1, 10, n=6)[0]  # rank-deficient: damping keeps every saliency finite
    O = ltp.obs_gram(G)[0]
    assert np.allclose(O, np.diag(np.diag(O)))
    H = damped_gram(G[None], 0.01)[0]
    for r, i in ((0, 3), (2, 7)):
        keep = np.ones_like(W, dtype=bool)
        keep[r, i] = False
        V = refit_on_support(W, keep, G, damping=0.01)
        assert output_error(W, V, H) == pytest.approx(W[r, i] ** 2 * O[i, i], rel=1e-8)
    assert np.array_equal(ltp.obs_gram(np.zeros((2, 3, 3))), np.broadcast_to(np.eye(3), (2, 3, 3)))


def test_nsr_spreads_the_error_over_layers():
    """e / (1 - e) stops one layer from losing most of its signal while the others lose none."""
    weights, grams = problem(3)
    target = int(0.8 * sum(w.size for w in weights))
    worst = []
    for loss in ("sum", "nsr"):
        res = learn_thresholds(weights, grams, target, l0="total", loss=loss)
        errs = []
        for W, G, z in zip(weights, grams, res.zeros):
            W3 = W if W.ndim == 3 else W[None]
            flat = np.abs(W3).ravel()
            keep = np.zeros(flat.size, bool)
            keep[np.argsort(flat, kind="stable")[z:]] = True
            D = W3 * ~keep.reshape(W3.shape)
            errs.append(np.sum(D * (D @ G)) / np.sum(W3 * (W3 @ G)))
        worst.append(max(errs))
    assert worst[1] < worst[0]
    with pytest.raises(OnnxPruneError):
        learn_thresholds(weights, grams, target, loss="log")


def test_obs_gram_from_a_low_rank_factor_equals_the_inverse():
    rng = np.random.default_rng(7)
    X = rng.standard_normal((2, 40, 120))  # 40 rows, 120 inputs
    G = np.swapaxes(X, 1, 2) @ X
    np.testing.assert_allclose(ltp.obs_gram(G, rank=40), ltp.obs_gram(G), rtol=1e-9, atol=0)
