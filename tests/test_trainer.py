"""PredictedGradientTrainer against transformers.Trainer: where it must equal it, where it must learn, and its errors."""

import logging

import numpy as np
import pytest
import torch
from datasets import load_dataset
from torch import nn
from transformers import HfArgumentParser, Trainer, TrainingArguments

from lgp_hf import PredictedGradientArguments, PredictedGradientTrainer
from conftest import CIFAR10_SUBSET, image_dataset, tiny_vit


def train(trainer_class, args_class, model, dataset, **kwargs):
    args = args_class(**kwargs)
    trainer = trainer_class(model=model, args=args, train_dataset=dataset)
    trainer.train()
    return trainer


def test_control_fraction_one_is_bit_identical_to_trainer(quiet_args):
    settings = dict(quiet_args, per_device_train_batch_size=8, max_steps=6, learning_rate=1e-2, seed=3)
    dataset = image_dataset(32)
    reference = train(Trainer, TrainingArguments, tiny_vit(seed=1), dataset, **settings).model
    ours = train(PredictedGradientTrainer, PredictedGradientArguments, tiny_vit(seed=1), dataset, control_fraction=1.0, **settings).model
    for (name, a), b in zip(reference.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name


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


class LinearTrunkRegressor(nn.Module):
    """logits = w^T (W x): the trunk gradient e w x^T is exactly linear in the head gradient e W x when W is
    invertible, and, for a shared input x, exactly J^T e with one Jacobian J for every example."""

    def __init__(self, dim=4):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(dim, dim, bias=False)
        self.head = nn.Linear(dim, 1, bias=False)

    def forward(self, features, labels=None):
        logits = self.head(self.trunk(features))
        loss = nn.functional.mse_loss(logits.squeeze(-1), labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def linear_dataset(shared_input: bool, size=64):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1 if shared_input else size, 4, generator=generator).expand(size, 4)
    from datasets import Dataset

    return Dataset.from_dict({"features": features.numpy(), "labels": torch.randn(size, generator=generator).numpy()}).with_format("torch")


@pytest.mark.parametrize("predictor,shared_input", [("window", False), ("ntk", True)])
def test_predictor_is_exact_when_trunk_gradients_are_linear(predictor, shared_input, quiet_args):
    args = PredictedGradientArguments(
        **quiet_args, per_device_train_batch_size=16, max_steps=60, learning_rate=0.0, logging_steps=10,
        predictor=predictor, predictor_ridge=1e-6, predictor_window_size=16, control_fraction=0.25,
        predictor_memory_fraction=64.0,  # a 4 x 4 trunk: keep 16 dense pairs (the default budget keeps one)
    )
    trainer = PredictedGradientTrainer(model=LinearTrunkRegressor(), args=args, train_dataset=linear_dataset(shared_input))
    trainer.train()
    late_alignment = [log["lgp/alignment"] for log in trainer.state.log_history if "lgp/alignment" in log][-3:]
    assert min(late_alignment) > 0.99, late_alignment
    late_explained = [log["lgp/variance_explained"] for log in trainer.state.log_history if "lgp/variance_explained" in log][-3:]
    assert min(late_explained) > 0.99, late_explained


def test_zero_predictor_explains_no_variance(quiet_args):
    args = PredictedGradientArguments(
        **quiet_args, per_device_train_batch_size=16, max_steps=8, learning_rate=0.0, logging_steps=2,
        predictor="zero", control_fraction=0.25,
    )
    trainer = PredictedGradientTrainer(model=LinearTrunkRegressor(), args=args, train_dataset=linear_dataset(False))
    trainer.train()
    explained = [log["lgp/variance_explained"] for log in trainer.state.log_history if "lgp/variance_explained" in log]
    assert explained == [0.0] * 4 and trainer.lgp_summary()["lgp_variance_explained"] == 0.0


def test_loss_falls_on_real_cifar10(quiet_args):
    data = load_dataset("parquet", data_files={"train": str(CIFAR10_SUBSET / "train.parquet")})["train"].select(range(512))
    mean, std = torch.tensor([0.49, 0.48, 0.45]).view(3, 1, 1), torch.tensor([0.25, 0.24, 0.26]).view(3, 1, 1)

    def to_tensors(batch):
        pixels = [torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 255 for img in batch["img"]]
        return {"pixel_values": [(p - mean) / std for p in pixels], "labels": batch["label"]}

    data.set_transform(to_tensors)
    args = PredictedGradientArguments(
        **quiet_args, per_device_train_batch_size=32, num_train_epochs=4, learning_rate=2e-3, logging_steps=4,
        remove_unused_columns=False, control_fraction=0.25, predictor="ntk", predictor_refit_steps=8,
    )
    trainer = PredictedGradientTrainer(model=tiny_vit(num_labels=10, image_size=32), args=args, train_dataset=data)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05, losses


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"control_fraction": 0.0}, "control_fraction"),
        ({"control_fraction": 1.5}, "control_fraction"),
        ({"control_fraction": "most"}, "control_fraction"),
        ({"predictor_window_size": 0}, "predictor_window_size"),
        ({"predictor_ridge": -1.0}, "predictor_ridge"),
        ({"predictor": "oracle"}, "predictor"),
        ({"predictor_refit_steps": 0}, "predictor_refit_steps"),
        ({"control_variate_coefficient": "guess"}, "control_variate_coefficient"),
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
    assert trainer.partition.head_module_names == ["classifier"]


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


def test_batch_of_one_runs_a_full_backward_with_one_warning(quiet_args, caplog):
    args = PredictedGradientArguments(**quiet_args, per_device_train_batch_size=1, max_steps=3, control_fraction="0.5")
    trainer = PredictedGradientTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(8))
    with caplog.at_level(logging.WARNING, logger="lgp_hf.trainer"):
        trainer.train()
    warnings = [r for r in caplog.records if "cannot be split" in r.getMessage()]
    assert len(warnings) == 1
    assert trainer.lgp_summary()["lgp_backward_work_skipped"] == 0.0


def test_arguments_parse_from_the_command_line():
    parser = HfArgumentParser(PredictedGradientArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "x", "--control_fraction", "auto", "--predictor", "window", "--head_modules", "vit.layernorm", "classifier"]
    )
    assert args.control_fraction == "auto" and args.predictor == "window" and args.head_modules == ["vit.layernorm", "classifier"]
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", "x", "--control_fraction", "0.5"])
    assert args.control_fraction == 0.5
