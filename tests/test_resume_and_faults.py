"""Exact resume, faults that never reach the optimizer, the decisions of "auto" and its unbiasedness check."""

import logging
import statistics

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

import lgp_hf.boundary
import lgp_hf.costs
from lgp_hf import PredictedGradientArguments, PredictedGradientTrainer
from lgp_hf.boundary import BoundarySampler
from conftest import image_dataset, tiny_vit

STEPS = 5


class StopAt(TrainerCallback):
    """Interrupts training after `step` optimizer steps, as a crash after a checkpoint would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def prior_costs(monkeypatch):
    """cost(f, k) = 1/3 + f (1 at f = 1), less the keep's saving, whatever the timings: toy models' timings say nothing
    about real ones, and decisions made from them would not repeat."""
    prior = lambda self, f, saving=0.0, tokens=False: (1.0 if f >= 1 else lgp_hf.costs.PRIOR_INTERCEPT + f) - min(f, 1.0) * saving  # noqa: E731
    monkeypatch.setattr(lgp_hf.costs.StepCostModel, "cost", prior)


class FewExamplesLossTrainer(PredictedGradientTrainer):
    """Only 2 of every 16 examples carry loss: most rows have a zero gradient at the boundary (a model that fits most
    of its data, taken to the extreme), where importance sampling pays."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        losses = nn.functional.cross_entropy(outputs.logits, labels, reduction="none")
        weights = (torch.arange(len(labels), device=labels.device) % 8 == 0).float()
        loss = (losses * weights).sum() / weights.sum()
        return (loss, outputs) if return_outputs else loss


def auto_settings(quiet_args, **overrides):
    settings = dict(
        quiet_args, per_device_train_batch_size=16, max_steps=2 * STEPS, learning_rate=1e-2, seed=5, logging_steps=1,
        control_fraction="auto", auto_decision_steps=2, auto_observation_period=1, auto_observation_budget=1e9,
        unbiasedness_check_budget=1.0, unbiasedness_check_draws=16,
    )
    return {**settings, **overrides}


def straight_and_resumed(trainer_class, settings: dict, dataset):
    """The run of `settings` trained straight through, and the same run stopped after STEPS steps and resumed from
    that checkpoint by a new trainer whose model starts from other weights (only the checkpoint can make the two equal):
    (straight, resumed)."""
    straight = trainer_class(model=tiny_vit(seed=2), args=PredictedGradientArguments(**settings), train_dataset=dataset)
    straight.train()
    resumed = dict(settings, output_dir=settings["output_dir"] + "-resumed")
    first = trainer_class(model=tiny_vit(seed=2), args=PredictedGradientArguments(**resumed), train_dataset=dataset, callbacks=[StopAt(STEPS)])
    first.train()
    second = trainer_class(model=tiny_vit(seed=9), args=PredictedGradientArguments(**resumed), train_dataset=dataset)
    second.train(resume_from_checkpoint=f"{resumed['output_dir']}/checkpoint-{STEPS}")
    return straight, second


@pytest.mark.parametrize("mode", ["fixed", "auto", "predictor"])
def test_resume_is_bit_identical(mode, quiet_args, monkeypatch):
    """Weights, statistics and the decisions of "auto" (which lowers f mid-run here, after its check); the gradient
    predictor's fitted sums (in use from the third step: the resumed half applies the map fitted before the save)."""
    prior_costs(monkeypatch)
    settings = auto_settings(quiet_args, save_strategy="steps", save_steps=STEPS)
    if mode in ("fixed", "predictor"):
        settings.update(control_fraction="0.5", auto_observation_period=2)
    if mode == "predictor":
        settings.update(gradient_predictor="linear", predictor_signal_dims=4)
    dataset = image_dataset(80)
    # every row carries loss with the predictor (rows drawn with pi = 1 or without a gradient give it nothing to fit)
    trainer_class = PredictedGradientTrainer if mode == "predictor" else FewExamplesLossTrainer
    straight, second = straight_and_resumed(trainer_class, settings, dataset)
    if mode == "auto":
        assert straight.lgp_summary()["lgp_control_fraction"] < 1  # the resumed half starts from a lowered f

    for (name, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    summary, expected = second.lgp_summary(), straight.lgp_summary()
    for key in ("lgp_control_fraction", "lgp_variance_factor", "lgp_drawn_fraction", "lgp_noise_scale", "lgp_unbiasedness_check"):
        assert summary[key] == expected[key], key
    if mode == "predictor":
        assert summary["lgp_predictor_variance_ratio"] == expected["lgp_predictor_variance_ratio"] < 1
        for key, value in straight.predictor.state_dict().items():
            resumed_value = second.predictor.state_dict()[key]
            pairs = zip(value, resumed_value) if isinstance(value, list) else [(value, resumed_value)]
            assert all(torch.equal(a, b) for a, b in pairs), key
    windows = lambda trainer: (len(trainer.cost_model.references), len(trainer.cost_model.sampled))  # noqa: E731 (times differ)
    assert windows(second) == windows(straight) and windows(straight)[0] >= 1


def test_checkpoint_of_plain_trainer_resumes_with_fresh_statistics(quiet_args, caplog):
    dataset = image_dataset(40)
    plain = TrainingArguments(**dict(quiet_args, per_device_train_batch_size=8, max_steps=STEPS, save_strategy="steps", save_steps=STEPS))
    Trainer(model=tiny_vit(seed=2), args=plain, train_dataset=dataset).train()
    args = PredictedGradientArguments(**dict(quiet_args, per_device_train_batch_size=8, max_steps=2 * STEPS))
    trainer = PredictedGradientTrainer(model=tiny_vit(seed=2), args=args, train_dataset=dataset)
    with caplog.at_level(logging.WARNING, logger="lgp_hf.trainer"):
        trainer.train(resume_from_checkpoint=f"{quiet_args['output_dir']}/checkpoint-{STEPS}")
    assert sum("statistics start fresh" in r.getMessage() for r in caplog.records) == 1
    assert trainer.state.global_step == 2 * STEPS


def test_non_finite_scores_draw_uniformly_and_are_counted(quiet_args, monkeypatch):
    scores = BoundarySampler.row_scores
    calls = []

    def sometimes_nan(gradient):
        calls.append(1)
        values = scores(gradient)
        return values * float("nan") if len(calls) % 3 == 0 else values

    monkeypatch.setattr(BoundarySampler, "row_scores", staticmethod(sometimes_nan))
    args = PredictedGradientArguments(**quiet_args, per_device_train_batch_size=8, max_steps=9, logging_steps=3, control_fraction="0.5",
                                      unbiasedness_check=False)
    trainer = PredictedGradientTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(32))
    trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert len(calls) >= 6 and trainer.lgp_summary()["lgp_uniform_draws"] == len(calls) // 3
    logged = [log["lgp/uniform_draws"] for log in trainer.state.log_history if "lgp/uniform_draws" in log]
    assert logged[-1] == len(calls) // 3 and logged == sorted(logged)


def test_auto_lowers_the_fraction_where_sampling_pays_after_its_check(quiet_args, monkeypatch):
    prior_costs(monkeypatch)
    args = PredictedGradientArguments(**auto_settings(quiet_args, max_steps=12, auto_min_control_fraction=0.125))
    trainer = FewExamplesLossTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(16 * 12))
    trainer.train()
    summary = trainer.lgp_summary()
    assert summary["lgp_unbiasedness_check"] == "passed"
    assert summary["lgp_control_fraction"] <= 0.25 and summary["lgp_predicted_efficiency"] < 0.95
    fractions = [log["lgp/control_fraction"] for log in trainer.state.log_history if "lgp/control_fraction" in log]
    assert fractions[0] == 1.0 and fractions[-1] == summary["lgp_control_fraction"]


def test_auto_decides_within_the_first_steps(quiet_args, monkeypatch):
    """Default auto_decision_steps (25) and observation period (10): steps 0 to 3 observed (64 rows at batch 16),
    steps 4 to 6 timed as references (a CPU times steps from 3 on), the first decision after step 6."""
    prior_costs(monkeypatch)
    args = PredictedGradientArguments(**quiet_args, per_device_train_batch_size=16, max_steps=12, learning_rate=1e-2, seed=5,
                                      logging_steps=1, unbiasedness_check_budget=1.0, unbiasedness_check_draws=16)
    trainer = FewExamplesLossTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(16 * 12))
    trainer.train()
    fractions = {log["step"]: log["lgp/control_fraction"] for log in trainer.state.log_history if "lgp/control_fraction" in log}
    assert trainer.lgp_summary()["lgp_unbiasedness_check"] == "passed"
    assert fractions[6] == 1.0 and all(fractions[step] < 1 for step in range(8, 13)), fractions  # step n logs after n steps


def test_a_slow_step_does_not_send_auto_back_to_one(quiet_args, monkeypatch):
    """The real cost model on a clock where a plain step takes 1 s and a sampled one 0.3 s + q (q: its share of trunk
    rows computed), except one sampled step 10x slow (an evaluation, a stall, another process): f stays lowered at
    every decision after it, and the cost estimate stays the true one."""
    args = PredictedGradientArguments(**auto_settings(quiet_args, per_device_train_batch_size=64, max_steps=20, auto_decision_steps=6,
                                                      auto_observation_period=2, auto_min_control_fraction=0.5))
    trainer = FewExamplesLossTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(64 * 20))
    slow = []

    def now(self):  # 0 when a step begins; its duration when it ends
        if self.begun is None:
            return 0.0
        fraction, observed = trainer._plan
        if fraction is None or fraction == 1:
            return 1.3 if observed else 1.0
        computed, total = trainer._step_rows
        seconds = 0.3 + computed / total
        if not observed and trainer._control_fraction < 1 and not slow:  # the first timed sampled step
            slow.append(trainer.state.global_step)
            return 10 * seconds
        return seconds

    monkeypatch.setattr(lgp_hf.costs.StepClock, "now", now)
    trainer.train()
    fractions = {log["step"]: log["lgp/control_fraction"] for log in trainer.state.log_history if "lgp/control_fraction" in log}
    lowered = min(step for step, fraction in fractions.items() if fraction < 1)
    assert slow and lowered <= slow[0] < 12  # the slow step came before the decisions at steps 12 and 18
    assert all(fraction < 1 for step, fraction in fractions.items() if step >= lowered), fractions
    assert trainer._last_decision["step_cost"] < 1 and trainer._last_decision["efficiency"] < 0.95
    model = trainer.cost_model
    assert max(seconds for _, seconds in model.sampled) > 3 and model.intercept == pytest.approx(0.3)
    assert model.step_cost() == pytest.approx(0.3 + statistics.median(share for share, _ in model.sampled), abs=0.02)
    assert trainer.lgp_summary()["lgp_step_cost"] == model.step_cost()


def test_auto_stays_at_one_where_sampling_does_not_pay(quiet_args, monkeypatch):
    """Random labels on random images: every row's gradient alike, F ~ 1 / f, F x cost above 1."""
    prior_costs(monkeypatch)
    args = PredictedGradientArguments(**auto_settings(quiet_args, max_steps=12))
    trainer = PredictedGradientTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(16 * 12))
    trainer.train()
    summary = trainer.lgp_summary()
    assert summary["lgp_control_fraction"] == 1.0 and summary["lgp_predicted_efficiency"] >= 0.95
    assert summary["lgp_unbiasedness_check"] == "not run"


def test_auto_skips_sampling_when_the_check_does_not_fit_its_budget(quiet_args, monkeypatch, caplog):
    prior_costs(monkeypatch)
    args = PredictedGradientArguments(**auto_settings(quiet_args, max_steps=12, unbiasedness_check_budget=0.02))
    trainer = FewExamplesLossTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(16 * 12))
    with caplog.at_level(logging.WARNING, logger="lgp_hf.trainer"):
        trainer.train()
    assert trainer.lgp_summary()["lgp_unbiasedness_check"] == "skipped" and trainer.lgp_summary()["lgp_control_fraction"] == 1.0
    assert any("too short for the unbiasedness check" in r.getMessage() for r in caplog.records)


def biased(monkeypatch):
    """Fault injection: drawn rows passed on with half their 1 / pi weight (the trunk's gradient halved on average)."""
    monkeypatch.setattr(lgp_hf.boundary, "horvitz_thompson_weights", lambda drawn, probabilities: drawn.double() * 0.5 / probabilities)


def test_auto_keeps_fraction_one_when_its_check_fails(quiet_args, monkeypatch, caplog):
    prior_costs(monkeypatch)
    biased(monkeypatch)
    args = PredictedGradientArguments(**auto_settings(quiet_args, max_steps=12))
    trainer = FewExamplesLossTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(16 * 12))
    with caplog.at_level(logging.WARNING, logger="lgp_hf.trainer"):
        trainer.train()
    assert trainer.lgp_summary()["lgp_unbiasedness_check"] == "failed" and trainer.lgp_summary()["lgp_control_fraction"] == 1.0
    assert any("stays at 1 for this run" in r.getMessage() and "BIASED" in r.getMessage() for r in caplog.records)


def unchanged(trainer, before):
    return all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters()) and all(p.grad is None for p in trainer.model.parameters())


def test_explicit_fraction_with_a_failing_check_is_refused_before_any_change(quiet_args, monkeypatch):
    biased(monkeypatch)
    args = PredictedGradientArguments(**quiet_args, per_device_train_batch_size=16, max_steps=2, control_fraction=0.5)
    trainer = PredictedGradientTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(32))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(ValueError, match=r"control_fraction=0.5: .*BIASED.*largest in vit\.") as error:
        trainer.train()
    assert "control_fraction=1 or 'auto'" in str(error.value)
    assert unchanged(trainer, before)


def test_observed_steps_are_paced_by_their_measured_overhead(quiet_args, monkeypatch):
    """An observed step timed 30 % dearer than a plain one, at a 1 % budget: one every 30 steps, once "auto" has
    observed its first 64 rows (every step until then, to decide early)."""
    args = PredictedGradientArguments(**quiet_args, per_device_train_batch_size=8, max_steps=70, logging_steps=1, auto_observation_budget=0.01)
    trainer = PredictedGradientTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(8))

    def now(self):  # a clock at 0 when a step begins, and 1.3 (observed) or 1.0 seconds later when it ends
        return 0.0 if self.begun is None else (1.3 if trainer._plan[1] else 1.0)

    monkeypatch.setattr(lgp_hf.costs.StepClock, "now", now)
    trainer.train()
    # steps 0 to 7 observed before any reference (spacing: the period, 10); step 17 timed at 0.3 over plain steps 8 to 16
    assert trainer.monitor.totals["rows"] == 8 * len([*range(8), 17, 47])


def test_step_cost_is_measured_against_a_warmed_up_trainer_step(quiet_args, monkeypatch):
    """At f < 1, steps 3 and 4 are the base class's own: the first, after sampled steps, is timed slow (warm-up) and
    left out; the second is the reference that sampled steps' cost is measured against."""
    args = PredictedGradientArguments(**quiet_args, per_device_train_batch_size=8, max_steps=8, logging_steps=1, control_fraction=0.5,
                                      unbiasedness_check=False)
    trainer = PredictedGradientTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(8))
    plans = []

    def now(self):  # plain steps take 3 s unless after a plain one (1 s); sampled steps 0.7 s
        if self.begun is None:
            return 0.0
        plans.append(trainer._plan[0])
        if plans[-1] is not None:
            return 0.7
        return 3.0 if len(plans) < 2 or plans[-2] is not None else 1.0

    monkeypatch.setattr(lgp_hf.costs.StepClock, "now", now)
    trainer.train()
    assert plans == [None, None, 0.5, 0.5, 0.5]  # steps 3 to 7 timed (not the first steps, with their one-off work)
    assert trainer.cost_model.reference_seconds == 1.0
    assert trainer.cost_model.step_cost() == pytest.approx(0.7) and trainer.lgp_summary()["lgp_step_cost"] == pytest.approx(0.7)


@pytest.mark.parametrize("control_fraction", ["auto", "0.5"])
def test_batch_without_labels_is_refused_before_any_change(control_fraction, quiet_args):
    """Trainer's own error (the model returns no loss), before any gradient is written, at any fraction."""
    args = PredictedGradientArguments(**quiet_args, per_device_train_batch_size=8, max_steps=2, control_fraction=control_fraction,
                                      unbiasedness_check=False)
    dataset = image_dataset(16).remove_columns("labels")
    trainer = PredictedGradientTrainer(model=tiny_vit(), args=args, train_dataset=dataset)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(ValueError, match="did not return a loss"):
        trainer.train()
    assert unchanged(trainer, before)
