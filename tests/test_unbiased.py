"""The trainer's update is an unbiased estimate of the exact full-batch gradient.

With learning rate 0 the model never moves, so every step estimates the same full-batch gradient; the mean of
the gradients the trainer leaves before the optimizer step, over many steps, is compared with the exact gradient
along fixed directions by a z-test with the empirical standard error.
"""

import math

import pytest
import torch
from transformers import TrainerCallback

import lgp_hf.trainer
from lgp_hf import PredictedGradientArguments, PredictedGradientTrainer
from lgp_hf.estimator import signal_difference
from conftest import image_dataset, text_regression_dataset, tiny_bert_regressor, tiny_vit

BATCH = 8
STEPS = 240
Z_LIMIT = 4.5  # about 60 directions at once: a family-wise false alarm rate below 0.1 %


class GradientRecorder(TrainerCallback):
    """Keeps the flat gradient the optimizer is about to use, at every step."""

    def __init__(self):
        self.gradients = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients.append(
            torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double() for p in model.parameters() if p.requires_grad])
        )


def directions(model, truth, count=12, seed=0):
    """Random Gaussian directions and, per parameter tensor, the exact gradient restricted to that tensor.

    Tensors whose exact gradient is zero up to rounding (attention key biases: softmax ignores them) are left
    out: their float32 rounding is systematic, not noise, and would dominate a z-score.
    """
    generator = torch.Generator().manual_seed(seed)
    result = [torch.randn(truth.numel(), generator=generator, dtype=torch.float64) for _ in range(count)]
    offset = 0
    for param in (p for p in model.parameters() if p.requires_grad):
        direction = torch.zeros_like(truth)
        direction[offset : offset + param.numel()] = truth[offset : offset + param.numel()]
        if direction.norm() > 1e-6 * truth.norm():
            result.append(direction)
        offset += param.numel()
    return torch.stack(result)


def max_z_score(model_factory, dataset, tmp_path, steps=STEPS, trainer_class=PredictedGradientTrainer,
                args_class=PredictedGradientArguments, trainer_kwargs=None, args_kwargs=None, **lgp_args):
    """Max |z| over directions of the mean recorded update against the exact gradient that the same trainer takes at
    control_fraction=1 (bit-identical to the base class's, tests/test_trainer.py) on the same fixed batch.

    The data set is one batch, so every step sees the same examples. Tiny models get a generous predictor memory
    (`predictor_memory_fraction`), so that the predictor is not trivially small; `lgp_args` may override it.
    """
    lgp_args = {"predictor_memory_fraction": 8.0, **lgp_args}
    trainer_kwargs, args_kwargs = dict(trainer_kwargs or {}), dict(args_kwargs or {})

    def run(run_steps, **estimator_args):
        recorder = GradientRecorder()
        args = args_class(
            output_dir=str(tmp_path), report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True,
            per_device_train_batch_size=len(dataset), max_steps=run_steps, learning_rate=0.0, max_grad_norm=0.0,
            logging_steps=50, predictor_refit_steps=10, **args_kwargs, **estimator_args,
        )
        model = {} if "model_init" in trainer_kwargs else {"model": model_factory()}
        trainer = trainer_class(**model, args=args, train_dataset=dataset, callbacks=[recorder], **trainer_kwargs)
        trainer.train()
        return trainer, torch.stack(recorder.gradients)

    _, exact = run(1, control_fraction=1.0)
    truth = exact[0]
    trainer, gradients = run(steps, **lgp_args)
    model = trainer.model
    projections = gradients @ directions(model, truth).T  # (steps, directions)
    expected = directions(model, truth) @ truth
    # The head's gradient is exact at every step, so along head directions the spread is float32 rounding
    # only: a floor of 1e-5 relative keeps rounding from counting as bias.
    standard_error = (projections.var(dim=0) / len(gradients) + (1e-5 * expected) ** 2).sqrt()
    z = (projections.mean(dim=0) - expected) / standard_error
    return z.abs().max().item()


MODELS = {
    "vit": (lambda: tiny_vit(num_labels=3), lambda: image_dataset(BATCH, num_labels=3)),
    "bert-regression": (tiny_bert_regressor, lambda: text_regression_dataset(BATCH)),
}


@pytest.mark.parametrize("predictor", ["ntk", "window", "zero"])
@pytest.mark.parametrize("family", list(MODELS))
def test_update_is_unbiased(family, predictor, tmp_path):
    model_factory, dataset_factory = MODELS[family]
    z = max_z_score(model_factory, dataset_factory(), tmp_path, predictor=predictor, control_fraction=0.25)
    assert z < Z_LIMIT, f"{family}/{predictor}: the mean update is {z:.1f} standard errors from the exact gradient"


def test_fixed_coefficient_and_later_split_are_unbiased(tmp_path):
    """beta = 1 (the paper's estimator) and the last block counted as head."""
    head = ["vit.layers.1", "vit.layernorm", "classifier"]
    z = max_z_score(
        lambda: tiny_vit(num_labels=3), image_dataset(BATCH, num_labels=3), tmp_path,
        predictor="window", control_fraction=0.5, control_variate_coefficient="fixed", head_modules=head,
    )
    assert z < Z_LIMIT


def test_z_test_detects_a_biased_estimator(tmp_path, monkeypatch):
    """Forgetting the control scale r in the correction (A(S_B - S_C)) biases the update; the test must see it."""
    monkeypatch.setattr(lgp_hf.trainer, "signal_difference", lambda batch, control, scale: signal_difference(batch, control, 1.0))
    z = max_z_score(lambda: tiny_vit(num_labels=3), image_dataset(BATCH, num_labels=3), tmp_path, predictor="ntk", control_fraction=0.25)
    assert z > Z_LIMIT


@pytest.mark.slow
@pytest.mark.parametrize("predictor", ["ntk", "window"])
@pytest.mark.parametrize("control_fraction", [0.125, 0.5])
def test_update_is_unbiased_over_long_runs(predictor, control_fraction, tmp_path):
    """Ten times the steps: a bias ten times smaller than the default test can see would show here."""
    model_factory, dataset_factory = MODELS["vit"]
    z = max_z_score(model_factory, dataset_factory(), tmp_path, steps=2400, predictor=predictor, control_fraction=control_fraction)
    assert z < Z_LIMIT
