"""Tests for onnxprune.methods.refit: exact least squares on the support, never worse than masking."""

import numpy as np
import pytest

from onnxprune.errors import OnnxPruneError
from onnxprune.methods.refit import (as_stack, damped_gram, low_rank_factor, masked_cg, output_error,
                                     refit_on_support)


def gram(rng, k, d, n):
    X = rng.standard_normal((k, n, d)) @ rng.standard_normal((k, d, d))
    return X.transpose(0, 2, 1) @ X


def mixed_mask(rng, shape):
    """Rows kept at every density, including all-kept and none-kept rows."""
    k, d_out, d_in = shape
    density = np.linspace(0.0, 1.0, d_out)[None, :, None]
    mask = rng.random(shape) < density
    mask[:, 0] = False
    mask[:, -1] = True
    return mask


def reference(W, mask, G, damping):
    """One dense solve per row: v_S = H_SS^-1 (H w)_S, H = G + damping * mean(diag G) * I."""
    H = damped_gram(G, damping)
    V = np.zeros_like(W)
    for b in range(W.shape[0]):
        for r in range(W.shape[1]):
            S = np.flatnonzero(mask[b, r])
            if len(S):
                V[b, r, S] = np.linalg.solve(H[b][np.ix_(S, S)], (H[b] @ W[b, r])[S])
    return V


@pytest.mark.parametrize("n_samples", [200, 15])  # full-rank and rank-deficient Grams
def test_exact_against_per_row_solve(n_samples):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((3, 17, 24))
    G = gram(rng, 3, 24, n_samples)
    mask = mixed_mask(rng, W.shape)
    V = refit_on_support(W, mask, G)
    np.testing.assert_allclose(V, reference(W, mask, G, 0.01), rtol=1e-8, atol=1e-10)
    assert np.all(V[~mask] == 0) and not np.signbit(V[~mask]).any()  # +0.0: no bytes depend on signs


def test_low_rank_factor_gives_the_same_refit():
    """With G = F F^T of rank 6 on 60 inputs, the rows whose systems are large go through
    Woodbury's 6 x 6 systems: the same weights as the direct solves (an empty block included)."""
    rng = np.random.default_rng(7)
    W = rng.standard_normal((3, 40, 60))
    G = gram(rng, 3, 60, 6)
    G[2] = 0.0
    factor = low_rank_factor(G, 6)
    mask = mixed_mask(rng, W.shape)
    V = refit_on_support(W, mask, G, factor=factor)
    np.testing.assert_allclose(V, reference(W, mask, G, 0.01), rtol=1e-7, atol=1e-9)
    assert np.all(V[~mask] == 0)


def test_low_rank_factor_is_not_used_without_damping():
    """Undamped, H_SS can be singular: the factor changes nothing (no division by a zero ridge)."""
    rng = np.random.default_rng(8)
    W = rng.standard_normal((1, 12, 60))
    G = gram(rng, 1, 60, 6)
    mask = mixed_mask(rng, W.shape)

    def run(**kw):
        try:
            return refit_on_support(W, mask, G, damping=0.0, **kw)
        except OnnxPruneError as e:
            return str(e)

    plain, factored = run(), run(factor=low_rank_factor(G, 6))
    if isinstance(plain, str):
        assert factored == plain
    else:
        np.testing.assert_array_equal(factored, plain)


def test_optimal_on_the_support():
    """The damped objective's gradient vanishes on the support (first-order optimality)."""
    rng = np.random.default_rng(1)
    W = rng.standard_normal((1, 30, 50))
    G = gram(rng, 1, 50, 400)
    mask = rng.random(W.shape) < 0.3
    V = refit_on_support(W, mask, G, damping=0.0)
    grad = (V - W) @ G
    assert np.abs(grad[mask]).max() < 1e-8 * np.abs(W @ G).max()


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_lower_error_than_masking(keep):
    rng = np.random.default_rng(2)
    W = rng.standard_normal((2, 20, 40))
    G = gram(rng, 2, 40, 500)
    mask = W * W > np.quantile(W * W, 1 - keep)
    masked = output_error(W, W * mask, G)
    refit = output_error(W, refit_on_support(W, mask, G), G)
    assert refit < 0.9 * masked


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_few_cg_iterations_are_safe_and_converge(dtype):
    """masked_cg on the refit's normal equations, from the masked weights: every iteration
    lowers the error and it reaches the exact refit (products in float32 too, as DC's big
    blocks run them)."""
    rng = np.random.default_rng(3)
    W = rng.standard_normal((1, 12, 30))
    G = gram(rng, 1, 30, 300)
    mask = rng.random(W.shape) < 0.5
    H = damped_gram(G, 0.01)
    exact = refit_on_support(W, mask, G)
    C = H[0].astype(dtype)

    def cg(iters, tol=0.0):
        return masked_cg(C, W[0] @ H[0], W[0], mask[0], 0.0, iters, tol)[None]

    damped = [output_error(W, W * mask, H)]
    for iters in (1, 3, 10):
        V = cg(iters)
        assert np.all(V[~mask] == 0)
        damped.append(output_error(W, V, H))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(damped, damped[1:]))
    close = 1e-6 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(cg(200), exact, rtol=close, atol=close)
    np.testing.assert_allclose(cg(200, tol=1e-10), exact, rtol=close, atol=close)  # DC's tolerance


def test_as_stack():
    assert as_stack("W", np.ones((2, 3))).shape == (1, 2, 3)
    assert as_stack("W", np.ones((4, 2, 3))).shape == (4, 2, 3)
    with pytest.raises(OnnxPruneError, match="W must have 2 or 3 dimensions"):
        as_stack("W", np.ones(3))


def test_bias_refit_by_augmentation():
    """[W | b] with the Gram of [X | 1] and the bias column kept refits the bias too."""
    rng = np.random.default_rng(4)
    X = rng.standard_normal((500, 16)) + 2.0  # not centred: the bias can absorb the mean
    W = rng.standard_normal((1, 8, 16))
    b = rng.standard_normal((1, 8, 1))
    mask = rng.random(W.shape) < 0.5
    Xa = np.hstack([X, np.ones((500, 1))])
    Ga = (Xa.T @ Xa)[None]
    Wa = np.concatenate([W, b], axis=2)
    Va = refit_on_support(Wa, np.concatenate([mask, np.ones((1, 8, 1), bool)], axis=2), Ga)
    Vw = refit_on_support(W, mask, (X.T @ X)[None])
    with_bias = output_error(Wa, Va, Ga)
    weights_only = output_error(Wa, np.concatenate([Vw, b], axis=2), Ga)
    assert with_bias < 0.9 * weights_only


def test_no_signal_block_keeps_masked_weights():
    rng = np.random.default_rng(5)
    W = rng.standard_normal((2, 5, 6))
    G = np.stack([np.zeros((6, 6)), gram(rng, 1, 6, 50)[0]])
    mask = rng.random(W.shape) < 0.5
    V = refit_on_support(W, mask, G)
    np.testing.assert_array_equal(V[0], W[0] * mask[0])


def test_two_dimensional_input_and_bad_shapes():
    rng = np.random.default_rng(6)
    W = rng.standard_normal((5, 7))
    G = gram(rng, 1, 7, 40)[0]
    mask = rng.random(W.shape) < 0.5
    V = refit_on_support(W, mask, G)
    assert V.shape == W.shape
    np.testing.assert_allclose(V, refit_on_support(W[None], mask[None], G[None])[0])
    with pytest.raises(OnnxPruneError):
        refit_on_support(W, mask[:, :-1], G)
    with pytest.raises(OnnxPruneError):
        refit_on_support(W, mask, G[:-1, :-1])
    with pytest.raises(OnnxPruneError):
        refit_on_support(W, mask, G, damping=-1.0)
