"""The trainer's update is an unbiased estimate of the exact full-batch gradient, through the whole training loop.

With learning rate 0 the model never moves, so every step estimates the same full-batch gradient. The gradients the
trainer leaves before each optimizer step are compared with the exact one (the same trainer at control_fraction=1,
bit-identical to Trainer's, tests/test_trainer.py) by `lgp_hf.verification`'s z-test: its directions (the exact
gradient, random sparse directions, each parameter tensor), its rounding floor and its Bonferroni threshold at a
family-wise false alarm rate of 1e-3. `verify_unbiased` draws many backwards of one forward; this drives the real
training loop (accelerate's backward, accumulation, the optimizer hook) one step per draw.
"""

import pytest
import torch
from transformers import TrainerCallback

import lgp_hf.boundary
from lgp_hf import PredictedGradientArguments, PredictedGradientTrainer, UnbiasednessReport
from lgp_hf.verification import Directions, report_from_statistics
from conftest import image_dataset, text_regression_dataset, tiny_bert_regressor, tiny_vit

BATCH = 8
STEPS = 240


class GradientRecorder(TrainerCallback):
    """Keeps the gradient of every trainable parameter the optimizer is about to use, at every step."""

    def __init__(self):
        self.gradients = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters() if p.requires_grad])


def loop_z_test(model_factory, dataset, tmp_path, steps=STEPS, trainer_class=PredictedGradientTrainer,
                args_class=PredictedGradientArguments, trainer_kwargs=None, args_kwargs=None, after=None, **lgp_args) -> UnbiasednessReport:
    """`steps` training steps at lr 0 on the one batch `dataset` holds, z-tested against the exact gradient; `after`,
    if given, is called with the sampled run's trainer."""
    trainer_kwargs, args_kwargs = dict(trainer_kwargs or {}), dict(args_kwargs or {})
    lgp_args = {"unbiasedness_check": False, **lgp_args}

    def run(run_steps, **settings):
        recorder = GradientRecorder()
        args = args_class(
            output_dir=str(tmp_path), report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True,
            per_device_train_batch_size=len(dataset), max_steps=run_steps, learning_rate=0.0, max_grad_norm=0.0,
            logging_steps=50, **args_kwargs, **settings,
        )
        model = {} if "model_init" in trainer_kwargs else {"model": model_factory()}
        trainer = trainer_class(**model, args=args, train_dataset=dataset, callbacks=[recorder], **trainer_kwargs)
        trainer.train()
        return trainer, recorder.gradients

    _, (exact,) = run(1, control_fraction=1.0)
    trainer, draws = run(steps, **lgp_args)
    if after is not None:
        after(trainer)
    names = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    directions = Directions(exact, torch.Generator().manual_seed(0))
    reference = directions.project(exact)
    errors = torch.stack([directions.project(gradients) - reference for gradients in draws])
    fraction = trainer.lgp_summary()["lgp_control_fraction"]
    return report_from_statistics(directions, errors.sum(0), errors.pow(2).sum(0), len(draws), names, fraction, 1e-3, trainer.args, 0.0)


MODELS = {
    "vit": (lambda: tiny_vit(num_labels=3), lambda: image_dataset(BATCH, num_labels=3)),
    "bert-regression": (tiny_bert_regressor, lambda: text_regression_dataset(BATCH)),
}


@pytest.mark.parametrize("fraction,mix", [(0.5, 0.1), (0.25, 0.0), (0.125, 1.0)])
@pytest.mark.parametrize("family", list(MODELS))
def test_update_is_unbiased(family, fraction, mix, tmp_path):
    model_factory, dataset_factory = MODELS[family]
    report = loop_z_test(model_factory, dataset_factory(), tmp_path, control_fraction=fraction, sampling_uniform_mix=mix)
    assert report.passed, report


def test_a_later_boundary_is_unbiased(tmp_path):
    """The last block counted as head: rows are drawn at the last block's input."""
    head = ["vit.layers.1", "vit.layernorm", "classifier"]
    report = loop_z_test(lambda: tiny_vit(num_labels=3), image_dataset(BATCH, num_labels=3), tmp_path, control_fraction=0.5, head_modules=head)
    assert report.passed, report


def test_z_test_detects_an_estimator_that_forgets_the_weights(tmp_path, monkeypatch):
    """Drawn rows passed on unweighted (1 instead of 1 / pi) make the trunk gradient too small: the test must see it."""
    monkeypatch.setattr(lgp_hf.boundary, "horvitz_thompson_weights", lambda drawn, probabilities: drawn.double())
    report = loop_z_test(lambda: tiny_vit(num_labels=3), image_dataset(BATCH, num_labels=3), tmp_path, steps=60, control_fraction=0.5)
    assert not report.passed and report.worst_z > 2 * report.threshold, report
    assert not report.worst_tensors()[0].startswith("classifier")  # the head's gradient stays exact


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.125, 0.5])
def test_update_is_unbiased_over_long_runs(fraction, tmp_path):
    """Ten times the steps: a bias three times smaller than the default test can see would show here."""
    model_factory, dataset_factory = MODELS["vit"]
    report = loop_z_test(model_factory, dataset_factory(), tmp_path, steps=2400, control_fraction=fraction)
    assert report.passed, report
