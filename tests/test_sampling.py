"""The sampling math, exactly: every Poisson sample of a small batch is enumerated with its probability."""

import itertools
import math

import pytest
import torch

from lgp_hf.boundary import BoundarySampler
from lgp_hf.sampling import (
    draw_generator,
    horvitz_thompson_weights,
    inclusion_probabilities,
    poisson_draw,
    sampling_variance,
    variance_factor,
    variance_factor_sums,
)

SCORES = {
    "equal": [1.0] * 6,
    "skewed": [5.0, 0.1, 0.2, 3.0, 0.05, 1.0],
    "one dominant": [100.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    "zeros": [2.0, 0.0, 1.0, 0.0, 3.0, 0.5],
}


def samples(probabilities):
    """Every subset of the rows as a bool mask, with its probability under Poisson sampling."""
    for bits in itertools.product([False, True], repeat=len(probabilities)):
        mask = torch.tensor(bits)
        yield mask, math.prod(float(p) if b else 1 - float(p) for b, p in zip(bits, probabilities))


def expectation(probabilities, function):
    return sum(weight * function(mask) for mask, weight in samples(probabilities) if weight > 0)


@pytest.mark.parametrize("mix", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("case", list(SCORES))
def test_probabilities_sum_to_f_n_capped_at_one_and_follow_the_scores(case, fraction, mix):
    scores = torch.tensor(SCORES[case])
    p = inclusion_probabilities(scores, fraction, mix)
    weights = (1 - mix) * scores.double() / scores.sum() + mix / len(scores)
    assert float(p.sum()) == pytest.approx(min(fraction * len(scores), int((weights > 0).sum())), rel=1e-12)
    assert bool((p <= 1).all() and (p >= 0).all()) and bool((p[weights == 0] == 0).all())
    uncapped = (p < 1) & (weights > 0)
    if uncapped.sum() > 1:  # proportional to the mixed scores where not capped
        ratios = p[uncapped] / weights[uncapped]
        torch.testing.assert_close(ratios, ratios[:1].expand_as(ratios))
    if mix > 0:  # the mix bounds every weight 1 / pi by 1 / (mix f)
        assert float((1 / p).max()) <= 1 / (mix * fraction) * (1 + 1e-12)


@pytest.mark.parametrize("mix", [0.0, 0.1])
@pytest.mark.parametrize("fraction", [0.25, 0.5])
@pytest.mark.parametrize("case", list(SCORES))
def test_horvitz_thompson_estimate_is_exactly_unbiased(case, fraction, mix):
    """E[sum_i w_i g_i] = sum_i g_i over all 2^n samples, for per-row vectors g_i (rows with pi = 0 have g = 0: a
    zero score means a zero gradient at the boundary)."""
    scores = torch.tensor(SCORES[case])
    p = inclusion_probabilities(scores, fraction, mix)
    g = torch.randn(len(scores), 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * (p > 0)[:, None]
    mean = expectation(p, lambda mask: (horvitz_thompson_weights(mask, p)[:, None] * g).sum(0))
    torch.testing.assert_close(mean, g.sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fraction", [0.25, 0.5])
@pytest.mark.parametrize("case", ["skewed", "zeros"])
def test_variance_formula_is_exact(case, fraction):
    scores = torch.tensor(SCORES[case])
    p = inclusion_probabilities(scores, fraction, 0.0)
    g = torch.randn(len(scores), 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * (p > 0)[:, None]
    total = g.sum(0)
    variance = expectation(p, lambda mask: float(((horvitz_thompson_weights(mask, p)[:, None] * g).sum(0) - total).pow(2).sum()))
    assert variance == pytest.approx(float(sampling_variance(p, g.pow(2).sum(1))), rel=1e-10)


def test_uniform_sampling_has_variance_factor_one_over_f():
    for fraction in (0.125, 0.25, 0.5, 1.0):
        p = inclusion_probabilities(torch.rand(16), fraction, uniform_mix=1.0)
        assert variance_factor(p, torch.rand(16)) == pytest.approx(1 / fraction)


def test_probabilities_proportional_to_gradient_norms_give_the_smallest_variance_factor():
    norms = torch.tensor([4.0, 1.0, 0.5, 2.0, 0.1, 0.3, 1.5, 0.2]).double()
    best = variance_factor(inclusion_probabilities(norms, 0.5), norms**2)
    for mix in (0.1, 0.5, 1.0):
        assert best < variance_factor(inclusion_probabilities(norms, 0.5, mix), norms**2)


@pytest.mark.parametrize("case", ["skewed", "zeros"])
def test_variance_factor_sums_are_unbiased_for_every_candidate(case):
    """From the rows drawn at pi, the sums estimate F's numerator of other designs and its denominator exactly in
    expectation."""
    scores = torch.tensor(SCORES[case])
    p = inclusion_probabilities(scores, 0.5, 0.1)
    candidates = torch.stack([inclusion_probabilities(scores, f, 0.1) for f in (0.25, 0.5, 0.75)])
    squares = torch.rand(len(scores), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    numerators = expectation(p, lambda mask: variance_factor_sums(candidates, p, mask, squares)[0])
    denominator = expectation(p, lambda mask: variance_factor_sums(candidates, p, mask, squares)[1])
    exact = torch.stack([sampling_variance(c, squares) for c in candidates])
    torch.testing.assert_close(numerators, exact, rtol=1e-12, atol=1e-12)
    assert denominator == pytest.approx(float(squares.sum()), rel=1e-12)


def test_poisson_draw_frequencies_match_the_probabilities():
    p = inclusion_probabilities(torch.tensor(SCORES["skewed"]), 0.5, 0.1)
    generator = torch.Generator().manual_seed(3)
    frequency = torch.stack([poisson_draw(p, generator) for _ in range(20000)]).double().mean(0)
    assert float((frequency - p).abs().max()) < 4 * math.sqrt(0.25 / 20000)


def test_draw_generator_is_reproducible_and_differs_by_step_micro_step_and_rank():
    def first(*key):
        return torch.rand(4, generator=draw_generator(*key))

    assert torch.equal(first(7, 3, 1, 0), first(7, 3, 1, 0))
    others = [first(7, 4, 1, 0), first(7, 3, 2, 0), first(7, 3, 1, 1), first(8, 3, 1, 0)]
    assert all(not torch.equal(first(7, 3, 1, 0), other) for other in others)


def test_boundary_reweights_rows_by_their_draw_and_records_it():
    gradient = torch.randn(8, 3, 2, generator=torch.Generator().manual_seed(4))
    sampler = BoundarySampler(fraction=0.5, uniform_mix=0.1)
    sampler.generator = torch.Generator().manual_seed(5)
    out = sampler.reweight(gradient)
    (draw,) = sampler.draws
    torch.testing.assert_close(draw.scores, gradient.reshape(8, -1).norm(dim=1).double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(draw.probabilities, inclusion_probabilities(draw.scores, 0.5, 0.1))
    expected = gradient * horvitz_thompson_weights(draw.drawn, draw.probabilities).float()[:, None, None]
    torch.testing.assert_close(out, expected)
    assert not draw.uniform


def test_boundary_at_fraction_one_passes_the_very_gradient():
    gradient = torch.randn(5, 4)
    sampler = BoundarySampler(fraction=1.0)
    assert sampler.reweight(gradient) is gradient and bool(sampler.draws[0].drawn.all())


def test_non_finite_scores_give_a_uniform_draw_that_is_recorded():
    gradient = torch.randn(6, 4)
    gradient[2, 1] = float("inf")
    sampler = BoundarySampler(fraction=0.5, uniform_mix=0.0)
    sampler.generator = torch.Generator().manual_seed(6)
    sampler.reweight(gradient)
    (draw,) = sampler.draws
    assert draw.uniform
    torch.testing.assert_close(draw.probabilities, torch.full((6,), 0.5, dtype=torch.float64))
