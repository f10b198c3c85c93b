"""LTP's weight learning within a layer's budget (methods/ltp_weights.py)."""
import numpy as np
import pytest

from onnxprune.methods.ltp_weights import inverse_diagonal, learn_weights, ltp_support_weights
from onnxprune.methods.magnitude import top_k_mask
from onnxprune.methods.refit import damped_gram, low_rank_factor, output_error, refit_on_support


def correlated_layer(seed=0, n=400, d_in=40, d_out=12):
    """Inputs in near-duplicate column pairs: the dense top-k keeps both halves of a pair where
    one of them (carrying their sum) would do, which is what learning the weights can find."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, d_in // 2))
    X = np.repeat(base, 2, axis=1) + 0.05 * rng.standard_normal((n, d_in))
    W = rng.standard_normal((1, d_out, d_in))
    return W, (X.T @ X)[None]


def test_low_rank_factor_is_exact_for_a_rank_deficient_gram():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((2, 30, 80))  # 30 rows, 80 inputs: rank 30
    G = np.swapaxes(X, 1, 2) @ X
    F = low_rank_factor(G, 30)
    assert F.shape[:2] == (2, 80)
    np.testing.assert_allclose(F @ np.swapaxes(F, 1, 2), G, atol=1e-8 * np.abs(G).max())


@pytest.mark.parametrize("refit", [False, True])
def test_exact_budget_and_zeros_stay_zero(refit):
    W, G = correlated_layer()
    W[0, 0, :5] = 0.0  # already pruned weights
    for n_keep in (1, 100, 300, int(np.count_nonzero(W)) - 1):
        new, _, _ = ltp_support_weights(W, G, n_keep, refit=refit)
        assert np.count_nonzero(new) == n_keep
        assert np.all(new[W == 0] == 0)


def test_learned_support_beats_the_dense_top_k():
    W, G = correlated_layer()
    n_keep = W.size // 4
    new, _, learned = ltp_support_weights(W, G, n_keep, refit=True)
    dense = refit_on_support(W, top_k_mask(W, n_keep), G)
    H = damped_gram(G, 0.03)
    assert learned
    assert output_error(W, new, H) < 0.9 * output_error(W, dense, H)  # measured: 0.75


@pytest.mark.parametrize("refit", [False, True])
def test_never_worse_than_masking_the_dense_top_k(refit):
    """...in saliency units, the candidate ltp_support_weights falls back to."""
    for seed in range(4):
        W, G = correlated_layer(seed, d_out=3, d_in=8)  # tiny layers: Adam's steps are coarse
        unit = 1.0 / np.sqrt(inverse_diagonal(G))[:, None, :]
        H = damped_gram(G, 0.03)
        for n_keep in (2, 12, 20):
            new, _, _ = ltp_support_weights(W, G, n_keep, refit=refit)
            masked = W * top_k_mask(W * unit, n_keep)
            assert output_error(W, new, H) <= output_error(W, masked, H) * (1 + 1e-12)


def test_the_mask_weighs_a_weight_by_its_input():
    """A small weight on a strong input outweighs a large one on a weak input: pruning 0.5 on
    an input of scale 10 costs 25 per sample, pruning 2 on an input of scale 1 costs 4."""
    rng = np.random.default_rng(7)
    X = rng.standard_normal((300, 2)) * [10.0, 1.0]
    W = np.array([[[0.5, 2.0]]])
    for refit in (False, True):
        new, _, _ = ltp_support_weights(W, (X.T @ X)[None], 1, refit=refit)
        assert new[0, 0, 0] != 0 and new[0, 0, 1] == 0


def test_inverse_diagonal_through_the_factor_equals_the_inverse():
    rng = np.random.default_rng(8)
    X = rng.standard_normal((2, 20, 50))  # rank 20 of 50
    G = np.swapaxes(X, 1, 2) @ X
    H = G + 0.01 * (np.einsum("kii->k", G) / 50)[:, None, None] * np.eye(50)
    exact = np.stack([np.diagonal(np.linalg.inv(h)) for h in H])
    np.testing.assert_allclose(inverse_diagonal(G), exact, rtol=1e-8)
    np.testing.assert_allclose(inverse_diagonal(G, factor=low_rank_factor(G, 20)), exact, rtol=1e-6)
    assert np.array_equal(inverse_diagonal(np.zeros((1, 3, 3))), np.ones((1, 3)))


def test_factored_steps_match_the_dense_gram():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((25, 60))  # fewer rows than inputs
    G = (X.T @ X)[None]
    W = rng.standard_normal((1, 10, 60))
    a = learn_weights(W, G, 150)
    b = learn_weights(W, G, 150, factor=low_rank_factor(G, 25))
    # float32 rounding differs between the two products and 200 steps carry it along
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2 * np.abs(W).max())
    assert np.array_equal(top_k_mask(a, 150), top_k_mask(b, 150))


def test_deterministic_and_untouched_input():
    W, G = correlated_layer(5)
    before = W.copy()
    a, _, _ = ltp_support_weights(W, G, 120, refit=False)
    b, _, _ = ltp_support_weights(W, G, 120, refit=False)
    assert np.array_equal(a, b)
    assert np.array_equal(W, before)


@pytest.mark.parametrize("refit, ratio", [(False, 0.5), (True, 1.0)])
def test_the_bias_learns_with_the_weights(refit, ratio):
    """Inputs with a mean: pruning shifts the output's mean, which the bias can take back (the
    least-squares refit without it absorbs most of the shift through the kept weights)."""
    rng = np.random.default_rng(6)
    X = rng.standard_normal((500, 30)) + 2.0
    W, b = rng.standard_normal((1, 8, 30)), rng.standard_normal((1, 8))
    Xa = np.hstack([X, np.ones((500, 1))])
    dense_out = X @ W[0].T + b[0]

    def error(W_new, b_new):
        return float(np.sum((X @ W_new[0].T + b_new[0] - dense_out) ** 2))

    new_w, new_b, _ = ltp_support_weights(W, (Xa.T @ Xa)[None], 60, refit=refit, bias=b)
    alone, _, _ = ltp_support_weights(W, (X.T @ X)[None], 60, refit=refit)
    assert np.count_nonzero(new_w) == 60 and new_b.shape == b.shape
    assert error(new_w, new_b) < ratio * error(alone, b)  # measured: 0.29 and 0.97


@pytest.mark.parametrize("refit", [False, True])
def test_ties_are_pruned_at_lower_indices_first(refit):
    """Equal weights on equal inputs: the support keeps the higher flat indices, as magnitude
    pruning (and DC) would."""
    W = np.full((1, 3, 4), 0.5)
    W[0, 0, 0] = -0.5
    new, _, _ = ltp_support_weights(W, 10.0 * np.eye(4)[None], 5, refit=refit)
    assert np.flatnonzero(new).tolist() == [7, 8, 9, 10, 11]
