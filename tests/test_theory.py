"""When sampling pays (`theory`) and what a step costs (`costs`): the pure functions "auto" decides with."""

import math

import pytest

from lgp_hf.costs import PRIOR_INTERCEPT, StepCostModel
from lgp_hf.theory import best_control_fraction, relative_efficiency


def test_best_fraction_minimises_variance_times_cost_below_the_margin():
    fractions = [0.25, 0.5, 0.75]
    assert best_control_fraction(fractions, [1.6, 1.1, 1.02], [0.55, 0.8, 1.05]) == (0.25, pytest.approx(0.88))
    assert best_control_fraction(fractions, [1.6, 1.1, 1.02], [0.55, 0.8, 1.05], margin=0.15) == (1.0, 1.0)
    assert best_control_fraction(fractions, [4.0, 2.0, 1.33], [0.5, 0.75, 1.0]) == (1.0, 1.0)  # uniform: F cost >= 1
    assert best_control_fraction(fractions, [None, math.nan, 1.0], [0.1, 0.1, 0.9]) == (0.75, pytest.approx(0.9))


def test_relative_efficiency_of_the_equal_cost_smaller_batch_is_one():
    """Trainer at a fraction f of the batch: F = 1 / f at cost f."""
    assert relative_efficiency(1 / 0.5, 0.5) == 1.0


def test_cost_model_starts_from_its_prior_and_learns_the_intercept_from_sampled_steps():
    model = StepCostModel(decay=0.0)
    assert model.cost(1.0) == 1.0 and model.cost(0.5) == pytest.approx(PRIOR_INTERCEPT + 0.5) and not model.measured
    model.observe_sampled(0.5, 1.0)  # no reference time yet: nothing learned
    assert not model.measured
    model.observe_plain(2.0)
    model.observe_sampled(0.5, 1.4)  # 0.7 of a plain step at half the rows
    assert model.measured and model.cost(0.5) == pytest.approx(0.7) and model.cost(0.25) == pytest.approx(0.45)
    restored = StepCostModel()
    restored.load_state_dict(model.state_dict())
    assert restored.cost(0.25) == model.cost(0.25)
