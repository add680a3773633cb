"""Exact resume, faults that never reach the optimizer, the automatic control fraction, run-time errors."""

import logging

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import lgp_hf.costs
from lgp_hf import PredictedGradientArguments, PredictedGradientTrainer
from conftest import image_dataset, tiny_vit
from test_trainer import LinearTrunkRegressor, linear_dataset
from test_unbiased import MODELS, Z_LIMIT, max_z_score

STEPS = 5  # odd: the checkpoint falls between the two control batches of a pair (PredictedGradientTrainer._observe)


class StopAt(TrainerCallback):
    """Interrupts training after `step` optimizer steps, as a crash after a checkpoint would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def resume_settings(quiet_args, predictor):
    return dict(
        quiet_args, per_device_train_batch_size=8, max_steps=2 * STEPS, learning_rate=1e-2, seed=5, save_strategy="steps",
        save_steps=STEPS, predictor=predictor, predictor_refit_steps=2, predictor_window_size=4, logging_steps=2,
        control_fraction="0.5",
    )


@pytest.mark.parametrize("predictor,control_fraction,chunks", [
    ("ntk", "0.5", 1), ("window", "0.5", 1), ("zero", "0.5", 1), ("ntk", "auto", 1), ("window", "0.5", 3), ("ntk", "auto", 2),
])
def test_resume_is_bit_identical(predictor, control_fraction, chunks, quiet_args):
    """Weights and statistics; "auto" (at f = 1, pairs every 3 steps) also resumes which steps it observes; with
    chunk contrasts the pending batch's pairs travel in the checkpoint."""
    settings = resume_settings(quiet_args, predictor)
    settings.update(control_fraction=control_fraction, auto_observation_period=3, auto_observation_budget=1e9, predictor_fit_chunks=chunks)
    dataset = image_dataset(40)
    straight = PredictedGradientTrainer(model=tiny_vit(seed=2), args=PredictedGradientArguments(**settings), train_dataset=dataset)
    straight.train()

    resumed_settings = dict(settings, output_dir=settings["output_dir"] + "-resumed")
    first = PredictedGradientTrainer(
        model=tiny_vit(seed=2), args=PredictedGradientArguments(**resumed_settings), train_dataset=dataset, callbacks=[StopAt(STEPS)]
    )
    first.train()
    second = PredictedGradientTrainer(model=tiny_vit(seed=9), args=PredictedGradientArguments(**resumed_settings), train_dataset=dataset)
    second.train(resume_from_checkpoint=f"{resumed_settings['output_dir']}/checkpoint-{STEPS}")

    for (name, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    for key in ("lgp_mean_alignment", "lgp_variance_explained"):
        assert second.lgp_summary()[key] == pytest.approx(straight.lgp_summary()[key]), key


def test_checkpoint_of_plain_trainer_resumes_with_a_fresh_predictor(quiet_args, caplog):
    dataset = image_dataset(40)
    plain = TrainingArguments(**dict(quiet_args, per_device_train_batch_size=8, max_steps=STEPS, save_strategy="steps", save_steps=STEPS))
    Trainer(model=tiny_vit(seed=2), args=plain, train_dataset=dataset).train()
    args = PredictedGradientArguments(**dict(quiet_args, per_device_train_batch_size=8, max_steps=2 * STEPS))
    trainer = PredictedGradientTrainer(model=tiny_vit(seed=2), args=args, train_dataset=dataset)
    with caplog.at_level(logging.WARNING, logger="lgp_hf.trainer"):
        trainer.train(resume_from_checkpoint=f"{quiet_args['output_dir']}/checkpoint-{STEPS}")
    assert sum("predictor starts fresh" in r.getMessage() for r in caplog.records) == 1
    assert trainer.state.global_step == 2 * STEPS


def all_finite(model):
    return all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_prediction_falls_back_to_the_control_estimate(quiet_args):
    args = PredictedGradientArguments(
        **quiet_args, per_device_train_batch_size=8, max_steps=8, logging_steps=4, predictor="window", control_fraction="0.5"
    )
    trainer = PredictedGradientTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(32))
    predict_tensors = trainer.predictor.predict_tensors
    trainer.predictor.predict_tensors = lambda signal: None if (parts := predict_tensors(signal)) is None else (p * float("nan") for p in parts)
    trainer.train()
    assert all_finite(trainer.model)
    assert trainer.lgp_summary()["lgp_fallback_steps"] > 0
    assert any(log.get("lgp/fallback_steps", 0) > 0 for log in trainer.state.log_history)


def test_failed_predictor_fit_falls_back_and_training_continues(quiet_args, monkeypatch):
    args = PredictedGradientArguments(
        **quiet_args, per_device_train_batch_size=8, max_steps=8, predictor="window", control_fraction="0.5"
    )
    trainer = PredictedGradientTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(32))

    def singular(*args, **kwargs):
        raise torch.linalg.LinAlgError("singular system (injected)")

    monkeypatch.setattr(torch.linalg, "solve", singular)
    trainer.train()
    assert all_finite(trainer.model)
    assert trainer.state.global_step == 8
    # every step once the predictor has data: from the third on (the first pair of control batches closes at the second)
    assert trainer.lgp_summary()["lgp_fallback_steps"] == 6


def fixed_cost_ratio(monkeypatch, cost_ratio):
    """Pin the measured cost ratio: timings of toy models say nothing about real ones."""

    def update(self, *args, **kwargs):
        self.cost_ratio, self.backward_forward_ratio = cost_ratio, 2.0

    monkeypatch.setattr(lgp_hf.costs.CostMeter, "update", update)


@pytest.mark.parametrize("predictor,expected", [("window", "low"), ("zero", "one")])
def test_auto_control_fraction_follows_the_predictor(predictor, expected, quiet_args, monkeypatch):
    fixed_cost_ratio(monkeypatch, 0.3)
    args = PredictedGradientArguments(
        **quiet_args, per_device_train_batch_size=16, max_steps=60, learning_rate=0.0, predictor=predictor,
        predictor_ridge=1e-6, predictor_window_size=16, predictor_refit_steps=10, control_fraction="auto",
        auto_min_control_fraction=0.125, logging_steps=10, auto_observation_period=4, predictor_memory_fraction=64.0,
    )
    trainer = PredictedGradientTrainer(model=LinearTrunkRegressor(), args=args, train_dataset=linear_dataset(shared_input=False))
    trainer.train()
    fraction = trainer.lgp_summary()["lgp_control_fraction"]
    assert fraction == (0.125 if expected == "low" else 1.0), fraction


@pytest.mark.parametrize("overhead,expected_spacing", [(None, 10), (0.06, 10), (0.3, 20)])
def test_observation_at_fraction_one_is_paced_by_its_measured_overhead(overhead, expected_spacing, quiet_args, monkeypatch):
    """Under "auto" at f = 1 pairs start every max(auto_observation_period, ceil(2 o / auto_observation_budget))
    steps: o = 0.3 of a step's passes at a 3 % budget spaces them 20 apart."""

    def update(self, *args, **kwargs):
        self.cost_ratio, self.backward_forward_ratio, self.overhead_ratio = 0.3, 2.0, overhead

    monkeypatch.setattr(lgp_hf.costs.CostMeter, "update", update)
    args = PredictedGradientArguments(
        **quiet_args, per_device_train_batch_size=8, max_steps=45, predictor="zero", control_fraction="auto", logging_steps=50,
    )
    trainer = PredictedGradientTrainer(model=LinearTrunkRegressor(), args=args, train_dataset=linear_dataset(shared_input=False))
    trainer.train()
    assert trainer.lgp_summary()["lgp_control_fraction"] == 1.0
    pair_starts = range(0, 45, expected_spacing)
    assert trainer.monitor.totals["observations"] == sum(min(2, 45 - start) for start in pair_starts)
    assert trainer._next_observation == pair_starts[-1] + expected_spacing


def test_auto_control_fraction_keeps_every_step_unbiased(tmp_path, monkeypatch):
    fixed_cost_ratio(monkeypatch, 0.3)
    model_factory, dataset_factory = MODELS["vit"]
    z = max_z_score(model_factory, dataset_factory(), tmp_path, predictor="ntk", control_fraction="auto")
    assert z < Z_LIMIT


def unchanged(trainer, before):
    return all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters()) and all(
        p.grad is None for p in trainer.model.parameters()
    )


@pytest.mark.parametrize("control_fraction", ["auto", "0.5"])
def test_batch_without_labels_is_refused_before_any_change(control_fraction, quiet_args):
    """Trainer's own error (the model returns no loss), before any gradient is written, at any fraction."""
    args = PredictedGradientArguments(**quiet_args, per_device_train_batch_size=8, max_steps=2, control_fraction=control_fraction)
    dataset = image_dataset(16).remove_columns("labels")
    trainer = PredictedGradientTrainer(model=tiny_vit(), args=args, train_dataset=dataset)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(ValueError, match="did not return a loss"):
        trainer.train()
    assert unchanged(trainer, before)


class NoLossModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk, self.classifier = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

    def forward(self, features, labels=None):
        return {"logits": self.classifier(self.trunk(features))}


class HeadBypassModel(NoLossModel):
    """Has a `classifier` that its forward never calls: there is no head input to capture."""

    def forward(self, features, labels=None):
        logits = self.trunk(features)[:, :2]
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


@pytest.mark.parametrize("model_class,message", [(NoLossModel, "did not return a loss"), (HeadBypassModel, "did not run as modules under autograd")])
def test_run_time_model_faults_are_refused_before_any_change(model_class, message, quiet_args):
    """At an explicit f < 1; under "auto" a head that never runs makes the trainer train as Trainer
    (tests/test_model_families.py: models that cannot be split)."""
    args = PredictedGradientArguments(**quiet_args, per_device_train_batch_size=8, max_steps=2, control_fraction=0.5)
    torch.manual_seed(0)
    model = model_class()
    from datasets import Dataset

    dataset = Dataset.from_dict({"features": torch.randn(16, 4).numpy(), "labels": torch.randint(0, 2, (16,)).numpy()}).with_format("torch")
    trainer = PredictedGradientTrainer(model=model, args=args, train_dataset=dataset)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises((ValueError, RuntimeError), match=message):
        trainer.train()
    assert unchanged(trainer, before)
