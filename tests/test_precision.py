"""Mixed precision: bf16 autocast on CPU, the fp16 GradScaler's scale, overflow skips, and what trains as Trainer
(FSDP, DeepSpeed, DDP's static graph mode, compiled models).

A CPU cannot run accelerate's fp16 mode (it creates no GradScaler there), so the fp16 tests put a real
`torch.amp.GradScaler("cpu")` where accelerate keeps its own (`accelerator.scaler`, which `backward`, the prepared
optimizer and the trainer read) and compute in float32. Multiplying by a power of two is exact in floating point, so
training with the scale at 1024 must give the very weights of training without a scaler: a draw that depended on the
scale, or a gradient part that missed it, would change them.
"""

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from lgp_hf import PredictedGradientArguments, PredictedGradientTrainer
from conftest import image_dataset, tiny_vit


class LogitDtype(TrainerCallback):
    """Records the dtype of the classifier's output in training forwards (autocast on or off)."""

    def __init__(self):
        self.dtypes = set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.classifier.register_forward_hook(lambda module, inputs, output: self.dtypes.add(output.dtype))


def test_bf16_autocast_on_cpu_trains_with_replayed_blocks(quiet_args):
    args = PredictedGradientArguments(
        **quiet_args, bf16=True, per_device_train_batch_size=16, max_steps=60, learning_rate=3e-3, logging_steps=5,
        control_fraction=0.5, seed=0,
    )
    dtypes = LogitDtype()
    trainer = PredictedGradientTrainer(model=tiny_vit(seed=0), args=args, train_dataset=image_dataset(32), callbacks=[dtypes])
    trainer.train()
    assert torch.bfloat16 in dtypes.dtypes, dtypes.dtypes  # the forwards did run under bf16 autocast
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses
    summary = trainer.lgp_summary()
    assert summary["lgp_unbiasedness_check"] == "passed" and summary["lgp_dense_blocks"] == 0 and summary["lgp_trunk_rows_computed"] < 0.8
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def _with_scaler(trainer, init_scale, **scaler_kwargs):
    """Gives the trainer a real CPU GradScaler, used as accelerate uses its own under fp16: `backward` scales the loss,
    clipping unscales first (`unscale_gradients`), the prepared optimizer steps through the scaler (skipping on inf)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=10**6, **scaler_kwargs)
    accelerator = trainer.accelerator
    accelerator.scaler = scaler

    def unscale_gradients(optimizer=None):
        for opt in accelerator._optimizers:
            scaler.unscale_(opt.optimizer)

    accelerator.unscale_gradients = unscale_gradients
    return scaler


class StepRecorder(TrainerCallback):
    def __init__(self):
        self.params, self.skipped = [], []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.params.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))
        self.skipped.append(self.trainer.accelerator.optimizer_step_was_skipped)


def _run(trainer_class, args_class, dataset, scale=None, seed=1, **kwargs):
    args = args_class(**kwargs)
    recorder = StepRecorder()
    trainer = trainer_class(model=tiny_vit(seed=seed), args=args, train_dataset=dataset, callbacks=[recorder])
    recorder.trainer = trainer
    scaler = _with_scaler(trainer, scale, backoff_factor=0.5) if scale is not None else None
    trainer.train()
    return trainer, recorder, scaler


def _fp16_settings(quiet_args, accumulation=1):
    return dict(
        quiet_args, per_device_train_batch_size=8, gradient_accumulation_steps=accumulation, max_steps=8,
        learning_rate=0.05, optim="sgd", max_grad_norm=0.5, logging_steps=1, control_fraction=0.25,
        train_sampling_strategy="sequential", seed=3,
    )


@pytest.mark.parametrize("accumulation", [1, 2])
def test_fp16_scale_leaves_the_sampled_update_unchanged(accumulation, quiet_args):
    """Scaled (1024) and unscaled training give the same weights, with clipping active: the scores scale with the
    loss, so the inclusion probabilities and the draws do not change, and the backward is the base class's."""
    settings = _fp16_settings(quiet_args, accumulation)
    dataset = image_dataset(64 * accumulation)
    plain, plain_steps, _ = _run(PredictedGradientTrainer, PredictedGradientArguments, dataset, **settings)
    scaled, scaled_steps, scaler = _run(PredictedGradientTrainer, PredictedGradientArguments, dataset, scale=1024.0, **settings)
    assert scaler.get_scale() == 1024.0 and not any(scaled_steps.skipped)
    assert scaled.lgp_summary()["lgp_drawn_fraction"] == plain.lgp_summary()["lgp_drawn_fraction"] < 1
    for step, (a, b) in enumerate(zip(plain_steps.params, scaled_steps.params)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=f"step {step}")


def _poisoned_dataset(size, poisoned_step, batch):
    """Images whose batch `poisoned_step` (sequential order) has an infinite pixel in every image: non-finite scores
    at the boundary and a non-finite gradient."""
    data = image_dataset(size)[:]
    pixels = data["pixel_values"].clone()
    pixels[poisoned_step * batch : (poisoned_step + 1) * batch, 0, 0, 0] = float("inf")
    from datasets import Dataset

    return Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": data["labels"].numpy()}).with_format("torch")


@pytest.mark.parametrize("trainer_name", ["lgp", "transformers"])
def test_fp16_overflow_skips_the_step_like_trainer(trainer_name, quiet_args):
    classes = {"lgp": (PredictedGradientTrainer, PredictedGradientArguments), "transformers": (Trainer, TrainingArguments)}
    extra = {"control_fraction": 0.5, "unbiasedness_check": False} if trainer_name == "lgp" else {}
    batch, poisoned = 8, 2
    trainer, steps, scaler = _run(
        *classes[trainer_name], _poisoned_dataset(48, poisoned, batch), scale=1024.0,
        **quiet_args, per_device_train_batch_size=batch, max_steps=5, learning_rate=0.05, optim="sgd",
        max_grad_norm=1.0, train_sampling_strategy="sequential", seed=3, **extra,
    )
    assert steps.skipped == [step == poisoned for step in range(5)]
    assert torch.equal(steps.params[poisoned], steps.params[poisoned - 1])  # the weights did not move
    assert not torch.equal(steps.params[poisoned + 1], steps.params[poisoned])  # and training went on
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert scaler.get_scale() == 512.0  # backed off once
    if trainer_name == "lgp":
        assert trainer.lgp_summary()["lgp_uniform_draws"] == 1  # the poisoned batch was drawn uniformly


def assert_trains_as_trainer(trainer, reason, caplog):
    assert trainer.disabled_reason is not None and reason in trainer.disabled_reason
    assert any("trains as its base class does" in r.getMessage() and "although control_fraction=0.5 was asked for" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("flag", ["is_fsdp_enabled", "is_deepspeed_enabled"])
def test_fsdp_and_deepspeed_train_as_trainer_saying_what_is_supported(flag, quiet_args, monkeypatch, caplog):
    original = Trainer.create_accelerator_and_postprocess

    def pretend(self):
        original(self)
        setattr(self, flag, True)

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", pretend)
    with caplog.at_level("WARNING"):
        trainer = PredictedGradientTrainer(model=tiny_vit(), args=PredictedGradientArguments(**quiet_args, control_fraction=0.5), train_dataset=image_dataset(8))
    assert_trains_as_trainer(trainer, "DeepSpeed and FSDP", caplog)
    assert "DDP" in trainer.disabled_reason


def test_ddp_static_graph_trains_as_trainer(quiet_args, caplog):
    """DDP's static graph mode replays the first step's autograd graph; sampled steps change it."""
    with caplog.at_level("WARNING"):
        trainer = PredictedGradientTrainer(
            model=tiny_vit(), args=PredictedGradientArguments(**quiet_args, ddp_static_graph=True, control_fraction=0.5), train_dataset=image_dataset(8)
        )
    assert_trains_as_trainer(trainer, "ddp_static_graph", caplog)


@pytest.mark.parametrize("compile_how", ["argument", "module"])
def test_compiled_models_train_as_trainer(compile_how, quiet_args, caplog):
    """A compiled graph has no place for the boundary or the blocks' replay."""
    if compile_how == "argument":
        model, extra = tiny_vit(), {"torch_compile": True}
    else:
        model, extra = torch.compile(tiny_vit()), {}
    with caplog.at_level("WARNING"):
        trainer = PredictedGradientTrainer(model=model, args=PredictedGradientArguments(**quiet_args, **extra, control_fraction=0.5), train_dataset=image_dataset(8))
    assert_trains_as_trainer(trainer, "compiled model", caplog)
