"""What a step costs (`costs`): robust estimates from timed steps, and what the unbiasedness check can afford."""

import pytest
import torch

from lgp_hf.costs import OBSERVED_WINDOW, PRIOR_INTERCEPT, REFERENCE_WINDOW, SAMPLED_WINDOW, StepCostModel, WeightGradientCalibration, affordable_check_draws
from lgp_hf.trainer import MIN_CHECK_DRAWS


def test_cost_model_starts_from_its_prior_and_learns_the_intercept_from_sampled_steps():
    model = StepCostModel()
    assert model.cost(1.0) == 1.0 and model.cost(0.5) == pytest.approx(PRIOR_INTERCEPT + 0.5) and not model.measured
    assert model.observe_sampled(0.5, 1.0) is None and not model.measured  # no reference time yet: nothing learned
    model.observe_plain(2.0)
    assert model.observe_sampled(0.5, 1.4) == pytest.approx(0.7)  # 0.7 of a plain step at half the rows
    assert model.measured and model.cost(0.5) == pytest.approx(0.7) and model.cost(0.25) == pytest.approx(0.45)
    assert model.step_cost() == pytest.approx(0.7)
    restored = StepCostModel()
    restored.load_state_dict(model.state_dict())
    assert restored.cost(0.25) == model.cost(0.25) and restored.references == model.references


def test_one_slow_step_moves_neither_the_reference_nor_the_cost():
    """Plain steps 1 s, sampled steps at a third of the rows 0.6 s (intercept 0.267), each set with one step 10x slow
    (an evaluation, a stall, another process) and, among the references, one 3x fast."""
    model = StepCostModel()
    for seconds in [1.0, 1.0, 10.0, 0.3, 1.0, 1.0]:
        model.observe_plain(seconds)
    assert model.references == [1.0, 10.0, 0.3, 1.0, 1.0][-REFERENCE_WINDOW:] and model.reference_seconds == 1.0
    for step in range(SAMPLED_WINDOW):
        model.observe_sampled(1 / 3, 6.0 if step == SAMPLED_WINDOW // 2 else 0.6)
    assert model.intercept == pytest.approx(0.6 - 1 / 3) and model.step_cost() == pytest.approx(0.6)
    assert model.cost(0.35) == pytest.approx(0.6 - 1 / 3 + 0.35)
    for _ in range(SAMPLED_WINDOW // 2 + 1):  # a slowdown that lasts is measured: most of the window at 1.2 s
        model.observe_sampled(1 / 3, 1.2)
    assert model.step_cost() == pytest.approx(1.2) and len(model.sampled) == SAMPLED_WINDOW


def test_the_predictors_work_is_kept_apart_from_the_step_cost():
    """Sampled steps of 0.7 s at a quarter of the rows, 0.1 s of it in the predictor, against 1 s plain steps: the step
    without the predictor costs 0.35 + f, the predictor 0.1 more; an observed step that only measures it counts too."""
    model = StepCostModel()
    assert model.predictor_cost() is None
    model.observe_plain(1.0)
    model.observe_sampled(0.25, 0.7, predictor_seconds=0.1)
    assert model.intercept == pytest.approx(0.35) and model.cost(0.25) == pytest.approx(0.6)
    assert model.predictor_cost() == pytest.approx(0.1)
    model.observe_predictor(0.3)
    model.observe_predictor(0.3)
    assert model.predictor_cost() == pytest.approx(0.3)
    restored = StepCostModel()
    restored.load_state_dict(model.state_dict())
    assert restored.predictor_cost() == model.predictor_cost() and restored.cost(0.25) == model.cost(0.25)


def test_observation_overhead_is_the_median_observed_step_over_the_reference():
    """Observed steps of 1.1 s against 1 s plain steps, one of them 3 s (a stall): observing adds 0.1 of a step, not
    the stall's 2 (which would space observations 20 times further apart); never below 0 when noise makes it faster."""
    model = StepCostModel()
    model.observe_observed(1.1)
    assert model.observation_overhead() is None  # no reference yet
    model.observe_plain(1.0)
    for seconds in [1.1, 3.0, 1.1, 1.1]:
        model.observe_observed(seconds)
    assert len(model.observed) == OBSERVED_WINDOW and model.observation_overhead() == pytest.approx(0.1)
    restored = StepCostModel()
    restored.load_state_dict(model.state_dict())
    assert restored.observation_overhead() == model.observation_overhead()
    for _ in range(OBSERVED_WINDOW):
        model.observe_observed(0.9)
    assert model.observation_overhead() == 0.0


def test_old_checkpoint_state_leaves_the_windows_empty():
    model = StepCostModel()
    model.load_state_dict({"reference_seconds": 1.0, "intercept": 0.2, "last_cost": 0.7})
    assert model.references == [] and model.sampled == [] and not model.measured


@pytest.mark.parametrize("batch,fits", [(128, True), (64, True), (32, False)])
def test_the_check_fits_a_run_of_200_steps_at_the_default_budget(batch, fits):
    """2 % of 200 steps is 4 micro-batches; the check's 32 rows at f = 0.35 at the prior's cost."""
    fraction = 0.35
    draws = affordable_check_draws(0.02 * 200, min(1.0, 32 / batch), fraction, PRIOR_INTERCEPT + fraction)
    assert (draws >= MIN_CHECK_DRAWS) == fits
    assert affordable_check_draws(0.02 * 200, 0.25, 0.1, PRIOR_INTERCEPT + 0.1) > draws  # fewer rows drawn, cheaper draws


def test_calibration_fits_each_layer_shape_and_prices_each_call(monkeypatch):
    """Timed on one call of T = 10 rows, A = 4 with a term: exact 5 s, the sampled path 3 s at keep 0.5 and 2 s at 0.25,
    so s = 1 / (0.25 x 4), p = (3 - 0.5 x 4 s) / 10, e = 0.5; every call of the shape is priced (e - p) T - s k A, timed
    again only on a call with over twice the rows with a term; the fit travels in the state; the timed work is the
    exact product and the sampled one."""
    timings = iter([5.0, 3.0, 2.0, 8.0, 5.0, 3.0, 1.0, 1.0, 1.0])
    results = []
    monkeypatch.setattr(WeightGradientCalibration, "_seconds", staticmethod(lambda work, device: results.append(work()) or next(timings)))
    calibration = WeightGradientCalibration((0.5, 0.25), 0.1)
    errors, inputs = torch.randn(10, 3), torch.randn(10, 4)
    assert calibration.savings(errors, inputs, False, 4) is None  # not timed yet, and not timed without `fit`
    e, p, s = 0.5, 0.1, 1.0
    assert calibration.savings(errors, inputs, False, 4, fit=True) == pytest.approx([(e - p) * 10 - s * 0.5 * 4, (e - p) * 10 - s * 0.25 * 4])
    assert calibration.savings(errors[:6], inputs[:6], False, 6, fit=True) == pytest.approx([(e - p) * 6 - s * 3, (e - p) * 6 - s * 1.5])
    assert len(results) == 3 and [tuple(result.shape) for result in results] == [(3, 4)] * 3
    calibration.savings(errors, inputs, False, 9, fit=True)  # over twice the rows with a term: timed again (8, 5, 3 s)
    assert calibration.fits["4x3 float32 cpu"] == pytest.approx([0.8, (5 - 0.5 * 9 * 2 / 2.25) / 10, 2 / 2.25, 9])
    assert calibration.savings(errors, inputs, True, 4, fit=True) is not None and len(results) == 9  # Conv1D's layout: its own fit
    restored = WeightGradientCalibration((0.5, 0.25), 0.1)
    restored.load_state_dict(calibration.state_dict())
    assert restored.savings(errors, inputs, False, 4) == pytest.approx(calibration.savings(errors, inputs, False, 4))


def test_keep_savings_and_token_sampled_steps_at_f_one_price_each_setting():
    """cost(f, k) = cost(f) - min(f, 1) s(k); steps at f = 1 with token sampling are their own window (not the line
    of the replayed steps), recorded with what their keep saved added back."""
    model = StepCostModel()
    model.observe_plain(1.0)
    model.observe_keep_savings([0.0, 0.2, 0.3])
    assert model.keep_saving(1) == pytest.approx(0.2) and model.cost(1.0, model.keep_saving(1)) == pytest.approx(0.8)
    assert model.observe_sampled(1.0, 0.85, saved_seconds=0.2) == pytest.approx(0.85)  # f = 1, keep 0.5: 1.05 without it
    assert model.intercept is None and model.cost(1.0, 0.2, tokens=True) == pytest.approx(0.85)
    model.observe_sampled(0.5, 0.6, saved_seconds=0.1)  # f = 0.5: 0.7 without its tokens' saving
    assert model.intercept == pytest.approx(0.2) and model.cost(0.25, 0.3) == pytest.approx(0.45 - 0.25 * 0.3)
    assert model.step_cost() == pytest.approx(0.7)
    restored = StepCostModel()
    restored.load_state_dict(model.state_dict())
    assert restored.cost(1.0, 0.2, tokens=True) == model.cost(1.0, 0.2, tokens=True) and restored.keep_saving(2) == pytest.approx(0.3)
