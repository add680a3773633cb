"""PredictedGradientTrainer against transformers.Trainer: where it must equal it, where it must learn, and its errors."""


import numpy as np
import pytest
import torch
from datasets import load_dataset
from transformers import HfArgumentParser, Trainer, TrainingArguments

from lgp_hf import PredictedGradientArguments, PredictedGradientTrainer
from lgp_hf.monitor import CANDIDATE_FRACTIONS
from conftest import CIFAR10_SUBSET, image_dataset, tiny_vit


def train(trainer_class, args_class, model, dataset, **kwargs):
    args = args_class(**kwargs)
    trainer = trainer_class(model=model, args=args, train_dataset=dataset)
    trainer.train()
    return trainer


def test_control_fraction_one_is_bit_identical_to_trainer(quiet_args):
    settings = dict(quiet_args, per_device_train_batch_size=8, max_steps=6, learning_rate=1e-2, seed=3)
    dataset = image_dataset(32)
    reference = train(Trainer, TrainingArguments, tiny_vit(seed=1), dataset, **settings)
    ours = train(PredictedGradientTrainer, PredictedGradientArguments, tiny_vit(seed=1), dataset, control_fraction=1.0, **settings)
    for (name, a), b in zip(reference.model.state_dict().items(), ours.model.state_dict().values()):
        assert torch.equal(a, b), name
    callbacks = lambda trainer: [type(c) for c in trainer.callback_handler.callbacks]  # noqa: E731
    assert callbacks(ours) == callbacks(reference)  # nothing added where nothing is sampled or timed


def test_two_accumulation_steps_equal_one_double_batch(quiet_args):
    dataset = image_dataset(32)
    # SGD: Adam would blow float rounding in gradients that are zero in exact arithmetic (attention key biases)
    # up to full-size updates, and summation order differs between the two runs.
    settings = dict(quiet_args, max_steps=4, learning_rate=1e-1, optim="sgd", control_fraction=1.0, seed=3)
    accumulated = train(PredictedGradientTrainer, PredictedGradientArguments, tiny_vit(seed=1), dataset,
                        per_device_train_batch_size=8, gradient_accumulation_steps=2, **settings).model
    single = train(PredictedGradientTrainer, PredictedGradientArguments, tiny_vit(seed=1), dataset,
                   per_device_train_batch_size=16, **settings).model
    for (name, a), b in zip(accumulated.state_dict().items(), single.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_loss_falls_on_real_cifar10(quiet_args):
    data = load_dataset("parquet", data_files={"train": str(CIFAR10_SUBSET / "train.parquet")})["train"].select(range(512))
    mean, std = torch.tensor([0.49, 0.48, 0.45]).view(3, 1, 1), torch.tensor([0.25, 0.24, 0.26]).view(3, 1, 1)

    def to_tensors(batch):
        pixels = [torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 255 for img in batch["img"]]
        return {"pixel_values": [(p - mean) / std for p in pixels], "labels": batch["label"]}

    data.set_transform(to_tensors)
    args = PredictedGradientArguments(
        **quiet_args, per_device_train_batch_size=32, num_train_epochs=4, learning_rate=2e-3, logging_steps=4,
        remove_unused_columns=False, control_fraction=0.25,
    )
    trainer = PredictedGradientTrainer(model=tiny_vit(num_labels=10, image_size=32), args=args, train_dataset=data)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05, losses
    summary = trainer.lgp_summary()
    assert summary["lgp_unbiasedness_check"] == "passed" and summary["lgp_dense_blocks"] == 0
    assert 0.1 < summary["lgp_trunk_rows_computed"] < 0.4  # the trunk's backward ran on about a quarter of the rows
    assert summary["lgp_step_cost"] is not None  # timed against a plain step of the same run
    logged = [log for log in trainer.state.log_history if "lgp/drawn_fraction" in log]
    assert logged and all(log["lgp/control_fraction"] == 0.25 for log in logged)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"control_fraction": 0.0}, "control_fraction"),
        ({"control_fraction": 1.5}, "control_fraction"),
        ({"control_fraction": "most"}, "control_fraction"),
        ({"sampling_uniform_mix": 1.5}, "sampling_uniform_mix"),
        ({"sampling_uniform_mix": -0.1}, "sampling_uniform_mix"),
        ({"auto_min_control_fraction": 0.0}, "auto_min_control_fraction"),
        ({"auto_decision_steps": 0}, "auto_decision_steps"),
        ({"auto_observation_budget": 0}, "auto_observation_budget"),
        ({"unbiasedness_check_draws": 4}, "unbiasedness_check_draws"),
        ({"unbiasedness_check_budget": 2.0}, "unbiasedness_check_budget"),
        ({"unbiasedness_check": "yes"}, "unbiasedness_check"),
    ],
)
def test_bad_arguments_name_the_argument(overrides, message, quiet_args):
    with pytest.raises(ValueError, match=message) as error:
        PredictedGradientArguments(**quiet_args, **overrides)
    assert "allowed" in str(error.value) or "use" in str(error.value)


@pytest.mark.parametrize("head_modules", [["classifer"], "classifer"])
def test_unknown_head_modules_are_refused_at_construction(head_modules, quiet_args):
    args = PredictedGradientArguments(**quiet_args, head_modules=head_modules)
    with pytest.raises(ValueError, match=r"head_modules: \['classifer'\] are not modules of"):
        PredictedGradientTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(8))


def test_one_head_module_may_be_given_as_a_string(quiet_args):
    args = PredictedGradientArguments(**quiet_args, head_modules="classifier")
    assert args.head_modules == ["classifier"]
    trainer = PredictedGradientTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(8))
    assert trainer.head_module_names == ["classifier"]


@pytest.mark.parametrize("value", [True, False])
def test_booleans_are_refused_as_control_fraction(value, quiet_args):
    with pytest.raises(ValueError, match=r"control_fraction: .*\(booleans are refused\)"):
        PredictedGradientArguments(**quiet_args, control_fraction=value)


def test_plain_training_arguments_train_with_the_estimators_defaults(quiet_args):
    """Changing only the class name: `TrainingArguments` are accepted, the estimator runs at its defaults ("auto")."""
    settings = dict(quiet_args, per_device_train_batch_size=8, max_steps=4, learning_rate=1e-2, seed=3)
    reference = train(Trainer, TrainingArguments, tiny_vit(seed=1), image_dataset(32), **settings)
    ours = train(PredictedGradientTrainer, TrainingArguments, tiny_vit(seed=1), image_dataset(32), **settings)
    assert ours.lgp_settings.control_fraction == "auto" and ours.lgp_summary()["lgp_control_fraction"] == 1.0
    for (name, a), b in zip(reference.model.state_dict().items(), ours.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_batch_of_one_samples_its_one_row(quiet_args):
    """One example per batch: drawn with probability f (weight 1 / f) or not at all, still unbiased and training."""
    args = PredictedGradientArguments(**quiet_args, per_device_train_batch_size=1, max_steps=12, control_fraction="0.5", unbiasedness_check=False)
    trainer = PredictedGradientTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(16))
    trainer.train()
    summary = trainer.lgp_summary()
    assert 0 < summary["lgp_drawn_fraction"] < 1 and all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_arguments_parse_from_the_command_line():
    parser = HfArgumentParser(PredictedGradientArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "x", "--control_fraction", "auto", "--sampling_uniform_mix", "0.3", "--head_modules", "vit.layernorm", "classifier",
         "--unbiasedness_check", "false"]
    )
    assert args.control_fraction == "auto" and args.sampling_uniform_mix == 0.3 and args.head_modules == ["vit.layernorm", "classifier"]
    assert args.unbiasedness_check is False
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", "x", "--control_fraction", "0.5"])
    assert args.control_fraction == 0.5


def test_variance_factor_of_sampled_steps_estimates_the_one_from_every_row(quiet_args):
    """lr 0, one batch: F at f = 0.5 as sampled steps estimate it (drawn rows only, their norms read below the
    boundary's 1 / pi weights) against F of the same design from every row's exact norm (observed steps at f = 1).
    A classifier scaled up makes the rows' gradients unequal, so that reading the weighted norms as they are
    would show (by about +20 %)."""
    def model():
        vit = tiny_vit(seed=1)
        with torch.no_grad():
            vit.classifier.weight.mul_(30)
        return vit

    settings = dict(quiet_args, per_device_train_batch_size=16, learning_rate=0.0, sampling_uniform_mix=0.0, auto_observation_period=1,
                    unbiasedness_check=False)
    dataset = image_dataset(16)
    exact = train(PredictedGradientTrainer, PredictedGradientArguments, model(), dataset, **settings, max_steps=3, control_fraction="auto",
                  auto_decision_steps=1000)
    expected = exact.monitor.run_factors.factors()[1 + CANDIDATE_FRACTIONS.index(0.5)][0]
    sampled = train(PredictedGradientTrainer, PredictedGradientArguments, model(), dataset, **settings, max_steps=100, control_fraction=0.5)
    assert sampled.monitor.run_factors.rows > 700
    assert sampled.monitor.run_factors.factors()[0][0] == pytest.approx(expected, rel=0.06)
