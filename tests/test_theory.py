"""When sampling pays (`theory`): the pure functions "auto" decides with (what a step costs: `test_costs.py`)."""

import math

import pytest

from lgp_hf.theory import LARGE_BATCH_RATIO, batch_size_advice, best_setting, decision_margin, relative_efficiency, relative_time
from lgp_hf.trainer import AUTO_MARGIN


def test_best_fraction_minimises_variance_times_cost_below_the_margin():
    fractions = [0.25, 0.5, 0.75]
    assert best_setting(fractions, [1.6, 1.1, 1.02], [0.55, 0.8, 1.05]) == (0.25, pytest.approx(0.88))
    assert best_setting(fractions, [1.6, 1.1, 1.02], [0.55, 0.8, 1.05], margin=0.15) == (1.0, 1.0)
    assert best_setting(fractions, [4.0, 2.0, 1.33], [0.5, 0.75, 1.0]) == (1.0, 1.0)  # uniform: F cost >= 1
    assert best_setting(fractions, [None, math.nan, 1.0], [0.1, 0.1, 0.9]) == (0.75, pytest.approx(0.9))


def test_best_setting_beats_its_baseline_by_the_margin():
    """Settings of (f, keep): against a baseline that samples tokens at f = 1 (time 0.96), not against Trainer's 1."""
    settings = [(1.0, 0.5), (0.5, 0.5), (0.25, 0.5)]
    factors, costs = [1.2, 1.5, 2.5], [0.8, 0.6, 0.4]
    assert best_setting(settings, factors, costs, 0.0, baseline=((1.0, 0.5), 0.96)) == ((0.5, 0.5), pytest.approx(0.9))
    assert best_setting(settings, factors, costs, 0.1, baseline=((1.0, 0.5), 0.96)) == ((1.0, 0.5), 0.96)  # 0.9 > 0.864


def test_relative_efficiency_of_the_equal_cost_smaller_batch_is_one():
    """Trainer at a fraction f of the batch: F = 1 / f at cost f."""
    assert relative_efficiency(1 / 0.5, 0.5) == 1.0


def decisions(efficiencies, margin_of):
    """The fractions "auto" takes, deciding between f = 1 and 0.35 on a sequence of F x cost estimates at 0.35."""
    fraction, taken = 1.0, []
    for efficiency in efficiencies:
        fraction, _ = best_setting([0.35], [efficiency], [1.0], margin_of(fraction))
        taken.append(fraction)
    return taken


def test_decisions_around_the_margin_do_not_bounce():
    """Estimates scattered around 1 - AUTO_MARGIN (0.95): once f is lowered it stays, until F x cost is above 1."""
    around = [0.94, 0.97, 0.955, 0.99, 0.93, 0.96, 0.98, 0.945, 0.965]
    hysteresis = lambda fraction: decision_margin(fraction >= 1, AUTO_MARGIN)  # noqa: E731
    assert decisions(around, hysteresis) == [0.35] * len(around)
    assert len(set(decisions(around, lambda fraction: AUTO_MARGIN))) == 2  # one threshold: it bounces
    assert decisions([0.96, 0.97, 0.951, 0.99], hysteresis) == [1.0] * 4  # starting needs the margin
    assert decisions([0.94, 0.99, 1.01, 0.97, 0.94], hysteresis) == [0.35, 0.35, 1.0, 1.0, 0.35]  # a loss ends it


def test_relative_time_is_f_cost_where_noise_binds_and_cost_where_it_does_not():
    factor, cost = 1.8, 0.6
    assert relative_time(factor, cost) == relative_time(factor, cost, math.inf) == pytest.approx(factor * cost)
    assert relative_time(factor, cost, 1e9) == pytest.approx(factor * cost, rel=1e-8)  # B_noise >> B
    assert relative_time(factor, cost, 0.0) == cost and relative_time(factor, cost, 1e-9) == pytest.approx(cost, rel=1e-8)
    # steps to a loss (1 + F B_noise / B) against Trainer's (1 + B_noise / B), times the step's cost
    assert relative_time(factor, cost, 0.5) == pytest.approx(cost * (1 + factor * 0.5) / 1.5)
    assert relative_time(1.0, 1.0, 0.5) == 1.0  # Trainer itself


def test_best_fraction_weighs_variance_by_the_noise_scale():
    """Uniform draws (F = 1 / f): never worth it where noise binds, the cheapest f where the batch is far above
    the noise scale."""
    fractions, costs = [0.25, 0.5, 0.75], [0.45, 0.7, 0.9]
    factors = [1 / f for f in fractions]
    assert best_setting(fractions, factors, costs, 0.05) == (1.0, 1.0)
    assert best_setting(fractions, factors, costs, 0.05, noise_ratio=1e6) == (1.0, 1.0)
    assert best_setting(fractions, factors, costs, 0.05, noise_ratio=0.01) == (0.25, pytest.approx(0.45 * 1.04 / 1.01))
    # B_noise = B / 2: 0.45 x 3 / 1.5 = 0.9, 0.7 x 2 / 1.5 = 0.93, 0.9 x 1.67 / 1.5 = 1.0
    assert best_setting(fractions, factors, costs, 0.05, noise_ratio=0.5) == (0.25, pytest.approx(0.9))


def test_batch_size_advice_when_the_batch_is_well_above_the_noise_scale():
    assert batch_size_advice(128, None) is None and batch_size_advice(None, 10.0) is None
    assert batch_size_advice(128, 128 / LARGE_BATCH_RATIO) is None
    advice = batch_size_advice(128, 32.0)
    assert "4.0 times" in advice and "B_noise = 32 examples" in advice and "5.00 times the fewest examples" in advice
