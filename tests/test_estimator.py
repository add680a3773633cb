"""The estimator's math on plain tensors: exact unbiasedness over every possible control set, and its parts."""

import itertools

import pytest
import torch

from lgp_hf.estimator import (
    ControlVariateCoefficients,
    control_size,
    control_variate_estimate,
    paired_squared_differences,
    split_batch_indices,
    split_generator,
    subset_loss_weights,
    variance_explained,
)
from lgp_hf.monitor import GradientSketch

NUMELS = [3, 5]  # two "parameter tensors"


def population(n=6, signal_dim=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    signals = torch.randn(n, signal_dim, generator=generator, dtype=torch.float64)
    mixing = torch.randn(signal_dim, sum(NUMELS), generator=generator, dtype=torch.float64)
    trunk = signals @ mixing + 0.5 * torch.randn(n, sum(NUMELS), generator=generator, dtype=torch.float64)
    return signals, trunk, mixing


def estimate(signals, trunk, control, predict, beta):
    n, n_c = len(signals), len(control)
    return control_variate_estimate(
        trunk[control].sum(0), predict, signals.sum(0), signals[control].sum(0), n / n_c, beta, NUMELS
    )


@pytest.mark.parametrize("beta", [torch.tensor([1.0, 1.0]), torch.tensor([0.3, 1.7]), torch.tensor([0.0, 0.0])])
def test_average_over_every_control_set_is_the_batch_gradient(beta):
    """Exact, not statistical: a uniform C makes E_C[estimate] = sum_B g for any fixed linear A and beta."""
    signals, trunk, mixing = population()
    predict = lambda s: s @ (0.7 * mixing)  # a deliberately imperfect predictor
    subsets = [list(c) for c in itertools.combinations(range(len(signals)), 2)]
    mean = torch.stack([estimate(signals, trunk, c, predict, beta.double()) for c in subsets]).mean(0)
    torch.testing.assert_close(mean, trunk.sum(0))


def test_a_predictor_fitted_on_the_control_set_is_biased():
    """The reason refits use only earlier batches: a predictor that saw C makes the average miss the truth."""
    signals, trunk, _ = population()
    subsets = [list(c) for c in itertools.combinations(range(len(signals)), 2)]

    def fitted_on(control):
        coefficients = torch.linalg.lstsq(signals[control], trunk[control]).solution
        return lambda s: s @ coefficients

    mean = torch.stack([estimate(signals, trunk, c, fitted_on(c), torch.ones(2, dtype=torch.float64)) for c in subsets]).mean(0)
    assert (mean - trunk.sum(0)).norm() > 0.05 * trunk.sum(0).norm()


def test_a_good_predictor_reduces_the_variance_over_control_sets():
    signals, trunk, mixing = population()
    subsets = [list(c) for c in itertools.combinations(range(len(signals)), 2)]
    beta = torch.ones(2, dtype=torch.float64)
    spread = lambda predict: torch.stack([estimate(signals, trunk, c, predict, beta) for c in subsets]).var(0).sum()
    assert spread(lambda s: s @ mixing) < 0.2 * spread(lambda s: None)


def test_control_size_and_split():
    assert [control_size(n, 0.25) for n in (1, 2, 8, 10, 128)] == [1, 1, 2, 2, 32]
    assert control_size(8, 1.0) == 8
    first = split_batch_indices(10, 3, split_generator(seed=1, step=4, micro_step=0))
    again = split_batch_indices(10, 3, split_generator(seed=1, step=4, micro_step=0))
    other = split_batch_indices(10, 3, split_generator(seed=1, step=5, micro_step=0))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    assert sorted(torch.cat(first).tolist()) == list(range(10))


def test_subset_loss_weights():
    assert subset_loss_weights(True, 8, 2) == (1.0, 1.0)
    assert subset_loss_weights(False, 8, 2) == (0.25, 0.75)


def test_fitted_coefficients_approach_the_optimal_beta():
    """beta per tensor converges to Cov(g, g_hat)/Var(g_hat): 0.5 for the first tensor, 2 (the clip) for the second."""
    generator = torch.Generator().manual_seed(0)
    coefficients = ControlVariateCoefficients(2, decay=0.99)
    for _ in range(400):
        predicted = torch.randn(8, generator=generator)
        true = torch.cat([0.5 * predicted[:3], 3.0 * predicted[3:]]) + 0.1 * torch.randn(8, generator=generator)
        pairs = list(zip(true.split(NUMELS), predicted.split(NUMELS)))
        coefficients.update(torch.stack([t.dot(p) for t, p in pairs]), torch.stack([p.dot(p) for _, p in pairs]))
    torch.testing.assert_close(coefficients.values, torch.tensor([0.5, 2.0]), atol=0.05, rtol=0)
    assert torch.equal(ControlVariateCoefficients(2).values, torch.zeros(2))  # nothing observed: no prediction used


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.0, 2.0])
def test_paired_control_batches_estimate_the_per_example_variance_explained(scale):
    """Per-example trunk gradients g = mu + M^T s + noise with a large mean mu; prediction p = scale M^T s.
    Exact value: E = 1 - tr Var(g - p) / tr Var(g) = 1 - ((1 - scale)^2 m + v) / (m + v), m = ||M||^2 (tr of the
    signal part's variance, s ~ N(0, I)), v = the noise's variance. The paired estimate must match it (to Monte
    Carlo error: 400 pairs of control batches of 16) although the mean dominates each control batch's gradient."""
    generator = torch.Generator().manual_seed(1)
    dim, signal_dim, n_c, pairs = 400, 4, 16, 400
    mixing = torch.randn(signal_dim, dim, generator=generator, dtype=torch.float64) / dim**0.5
    noise_std = 0.5 / dim**0.5
    mean = 2.0 * torch.ones(dim, dtype=torch.float64) / dim**0.5  # ||mu||^2 = 4, far above tr Var(g)/n_c
    m, v = float(mixing.pow(2).sum()), noise_std**2 * dim
    exact = 1 - ((1 - scale) ** 2 * m + v) / (m + v)

    def control_batch():
        signals = torch.randn(n_c, signal_dim, generator=generator, dtype=torch.float64)
        g = mean + signals @ mixing + noise_std * torch.randn(n_c, dim, generator=generator, dtype=torch.float64)
        return g.mean(0), scale * (signals @ mixing).mean(0)

    residual_squares = gradient_squares = 0.0
    for _ in range(pairs):
        (g1, p1), (g2, p2) = control_batch(), control_batch()
        r, g = paired_squared_differences((g1, g2), (p1, p2))
        residual_squares, gradient_squares = residual_squares + r, gradient_squares + g
    estimate = variance_explained(residual_squares, gradient_squares)
    assert estimate == pytest.approx(exact, abs=0.05), (estimate, exact)


def test_variance_explained_of_the_zero_predictor_is_zero_and_none_before_any_pair():
    g1, g2 = torch.randn(10), torch.randn(10)
    assert variance_explained(*paired_squared_differences((g1, g2), None)) == 0.0
    assert variance_explained(0.0, 0.0) is None


def test_gradient_sketch_is_exact_for_small_trunks_and_unbiased_for_large_ones():
    """Pairs are scored on count sketches (monitor.GradientSketch), taken tensor by tensor: exact squared norms when
    the trunk fits in the sketch, unbiased ones (over the sketch's seed) when it does not."""
    generator = torch.Generator().manual_seed(0)
    numels = [300, 1, 2000, 77]
    vector = torch.randn(sum(numels), generator=generator) * torch.linspace(0.1, 3.0, sum(numels))  # uneven scales

    def sketched(sketch):
        total = sketch.zeros("cpu")
        for index, piece in enumerate(vector.split(numels)):
            sketch.add(total, index, piece)
        return total

    exact = sketched(GradientSketch(numels))
    assert float(exact.dot(exact)) == pytest.approx(float(vector.dot(vector)), rel=1e-5)
    estimates = torch.tensor([float(s.dot(s)) for s in (sketched(GradientSketch(numels, width=101, seed=seed)) for seed in range(300))])
    z = (estimates.mean() - vector.dot(vector)) / (estimates.std() / len(estimates) ** 0.5)
    assert abs(float(z)) < 4, float(z)
    assert float(estimates.std() / vector.dot(vector)) > 0.01  # the narrow sketch does collide: the test has power
