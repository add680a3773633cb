#!/usr/bin/env python
"""Checks of PredictedGradientTrainer on one CUDA GPU: mixed precision, the fp16 GradScaler, unbiasedness.

The CPU test suite cannot run accelerate's fp16 mode (there is no GradScaler on a CPU) nor CUDA kernels; this
script runs the same checks on a GPU, in about a minute, and prints the figures:

  f1_equals_trainer   control_fraction=1 against transformers.Trainer, fp32 (TF32 off): max |weight difference|
  bf16_trains         bf16 autocast, f=0.25, ntk: loss falls; logits were bf16, the predictor's state float32
  fp16_trains         accelerate's fp16 (its own GradScaler), f=0.25, ntk: loss falls, few skipped steps
  fp16_overflow_skip  accelerate's fp16, one batch of infinite pixels: that step (only) is skipped, the weights do
                      not move, the scale backs off, for PredictedGradientTrainer as for Trainer
  fp16_scale_exact    fp32 compute with a GradScaler at 2^10 vs none (power-of-two scaling is exact): the weights
                      must agree, so every part of `.grad` (control, head, predicted) is in the scaler's scale
  unbiased            learning rate 0, f=0.25, ntk, fp32: the mean update over many random splits against the exact
                      full-batch gradient, z-scores along random and per-tensor directions (|z| < 4.5)

Then (unless --race_seconds 0) a short equal-time race under bf16 on the example's ViT and the CIFAR-10 subset the
repository ships (`time_to_accuracy.py --subset --bf16`, one seed, `--race_seconds` of training per run): Trainer
at batch 128 and 64, the default ("auto"), ntk at f = 0.25 and window at f = 0.25 with per-example chunk contrasts;
its table gives, per run, steps, seconds per step, test accuracy, the measured variance explained E and its
break-even (from the measured cost ratio c and overhead), and the control fraction "auto" ended at. About 6
minutes on a GPU at the default.

    python benchmarks/gpu_check.py               # on a machine with CUDA; prints a table, exit status 1 on a failure
    python benchmarks/gpu_check.py --race_seconds 0                  # the checks only
    python benchmarks/gpu_check.py --allow_cpu   # the checks that do not need CUDA, on the CPU (slow, for the script)

Without a CUDA device (and without --allow_cpu) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments, ViTConfig, ViTForImageClassification  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from lgp_hf import PredictedGradientArguments, PredictedGradientTrainer  # noqa: E402

Z_LIMIT = 4.5


def tiny_vit(seed: int, num_labels: int = 4) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config)


def image_dataset(size: int, seed: int = 0, num_labels: int = 4, poisoned_batch: int | None = None, batch: int = 16) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(size, 3, 16, 16, generator=generator)
    labels = torch.randint(0, num_labels, (size,), generator=generator)
    if poisoned_batch is not None:
        pixels[poisoned_batch * batch : (poisoned_batch + 1) * batch, 0, 0, 0] = float("inf")
    return Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": labels.numpy()}).with_format("torch")


class Recorder(TrainerCallback):
    """Per optimizer step: the weights after it, whether it was skipped, and (optionally) the gradient before it."""

    def __init__(self, keep_gradients: bool = False):
        self.trainer = None
        self.keep_gradients = keep_gradients
        self.params, self.skipped, self.gradients, self.logit_dtypes = [], [], [], set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.classifier.register_forward_hook(lambda module, inputs, output: self.logit_dtypes.add(output.dtype))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.keep_gradients:
            self.gradients.append(torch.cat([p.grad.reshape(-1).double().cpu() for p in model.parameters() if p.requires_grad]))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.params.append(torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()]))
        self.skipped.append(bool(self.trainer.accelerator.optimizer_step_was_skipped))


def train(kind: str, dataset: Dataset, output_dir: str, model_seed: int = 1, scaler_scale: float | None = None,
          keep_gradients: bool = False, use_cpu: bool = False, **settings):
    """Trains `kind` ("lgp" or "trainer"); `scaler_scale` gives it a GradScaler as accelerate's fp16 would (fp32 compute)."""
    common = dict(
        output_dir=output_dir, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=use_cpu,
        train_sampling_strategy="sequential", logging_steps=5, seed=3,
    )
    common.update(settings)
    if kind == "lgp":
        trainer_class, args = PredictedGradientTrainer, PredictedGradientArguments(**common)
    else:
        common = {k: v for k, v in common.items() if k not in {"control_fraction", "predictor", "predictor_window_size"}}
        trainer_class, args = Trainer, TrainingArguments(**common)
    recorder = Recorder(keep_gradients)
    trainer = trainer_class(model=tiny_vit(model_seed), args=args, train_dataset=dataset, callbacks=[recorder])
    recorder.trainer = trainer
    scaler = None
    if scaler_scale is not None:
        scaler = torch.amp.GradScaler(trainer.args.device.type, init_scale=scaler_scale, growth_interval=10**6)
        accelerator = trainer.accelerator
        accelerator.scaler = scaler

        def unscale_gradients(optimizer=None):
            for opt in accelerator._optimizers:
                scaler.unscale_(opt.optimizer)

        accelerator.unscale_gradients = unscale_gradients
    trainer.train()
    return trainer, recorder, scaler or trainer.accelerator.scaler


def losses(trainer) -> list[float]:
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def falls(values: list[float]) -> bool:
    return len(values) >= 4 and sum(values[-2:]) / 2 < 0.85 * sum(values[:2]) / 2


# ---------------------------------------------------------------- checks: each returns (passed, figures)


def check_f1_equals_trainer(tmp, use_cpu):
    # SGD: Adam would turn the rounding noise of gradients that are zero in exact arithmetic into full-size steps.
    settings = dict(per_device_train_batch_size=16, max_steps=10, learning_rate=0.05, optim="sgd", use_cpu=use_cpu)
    dataset = image_dataset(160)
    reference, reference_steps, _ = train("trainer", dataset, f"{tmp}/f1_ref", **settings)
    ours, our_steps, _ = train("lgp", dataset, f"{tmp}/f1_lgp", control_fraction=1.0, **settings)
    difference = (reference_steps.params[-1] - our_steps.params[-1]).abs().max().item()
    moved = (reference_steps.params[-1] - reference_steps.params[0]).abs().max().item()
    return difference <= 1e-6 * max(1.0, moved), f"max |dw| {difference:.2e} (weights moved {moved:.2e})"


def check_bf16(tmp, use_cpu):
    trainer, recorder, _ = train(
        "lgp", image_dataset(64), f"{tmp}/bf16", bf16=True, use_cpu=use_cpu, per_device_train_batch_size=32,
        max_steps=80, learning_rate=3e-3, control_fraction=0.25, predictor="ntk",
    )
    values = losses(trainer)
    state = trainer.predictor.state_dict()
    dtypes_ok = torch.bfloat16 in recorder.logit_dtypes and state["cross"].dtype == torch.float32
    summary = trainer.lgp_summary()
    ok = falls(values) and dtypes_ok and summary["lgp_fallback_steps"] == 0
    return ok, (
        f"loss {values[0]:.3f} -> {values[-1]:.3f}, logits {sorted(str(d) for d in recorder.logit_dtypes)}, "
        f"predictor {state['cross'].dtype}, alignment {summary['lgp_final_alignment']:.2f}, fallbacks {summary['lgp_fallback_steps']}"
    )


def check_fp16(tmp, use_cpu):
    trainer, recorder, scaler = train(
        "lgp", image_dataset(64), f"{tmp}/fp16", fp16=True, per_device_train_batch_size=32, max_steps=80,
        learning_rate=3e-3, control_fraction=0.25, predictor="ntk",
    )
    values = losses(trainer)
    skipped = sum(recorder.skipped)
    ok = scaler is not None and falls(values) and skipped <= 5
    return ok, f"loss {values[0]:.3f} -> {values[-1]:.3f}, skipped steps {skipped}, final scale {scaler.get_scale():.0f}"


def check_fp16_overflow(tmp, use_cpu):
    figures, ok = [], True
    for kind in ("lgp", "trainer"):
        extra = dict(control_fraction=0.5, predictor="ntk") if kind == "lgp" else {}
        trainer, recorder, scaler = train(
            kind, image_dataset(96, poisoned_batch=2, batch=16), f"{tmp}/overflow_{kind}", fp16=True,
            per_device_train_batch_size=16, max_steps=5, learning_rate=0.05, max_grad_norm=1.0, **extra,
            optim="sgd",  # a fused optimizer skips inside its kernel, and accelerate then does not report the skip
        )
        # the scale may also back off at a genuine fp16 overflow in step 0 (a fresh scaler starts at 2^16)
        poisoned_skipped = recorder.skipped[2] and torch.equal(recorder.params[2], recorder.params[1])
        moved_after = not torch.equal(recorder.params[-1], recorder.params[2])
        finite = all(torch.isfinite(p).all() for p in trainer.model.parameters())
        ok &= poisoned_skipped and moved_after and finite and not all(recorder.skipped[3:])
        figures.append(f"{kind}: skipped {recorder.skipped}, scale {scaler.get_scale():.0f}")
    return ok, "; ".join(figures)


def check_fp16_scale_exact(tmp, use_cpu):
    settings = dict(
        use_cpu=use_cpu, per_device_train_batch_size=16, gradient_accumulation_steps=2, max_steps=10,
        learning_rate=0.05, optim="sgd", max_grad_norm=0.5, control_fraction=0.25, predictor="ntk",
    )
    dataset = image_dataset(320)
    _, plain, _ = train("lgp", dataset, f"{tmp}/scale_plain", **settings)
    scaled_trainer, scaled, _ = train("lgp", dataset, f"{tmp}/scale_1024", scaler_scale=1024.0, **settings)
    difference = max((a - b).abs().max().item() for a, b in zip(plain.params, scaled.params))
    beta = scaled_trainer.coefficients.values.max().item()
    return difference <= 1e-5 and beta > 0 and not any(scaled.skipped), f"max |dw| {difference:.2e}, max beta {beta:.2f}"


def check_unbiased(tmp, use_cpu, steps: int):
    batch = 16
    dataset = image_dataset(batch, seed=5)
    model = tiny_vit(1)
    device = torch.device("cpu" if use_cpu else "cuda")
    model.to(device)
    inputs = {k: dataset[:][k].to(device) for k in dataset.column_names}
    model.zero_grad()
    model(**inputs).loss.backward()
    truth = torch.cat([p.grad.reshape(-1).double().cpu() for p in model.parameters() if p.requires_grad])
    trainer, recorder, _ = train(
        "lgp", dataset, f"{tmp}/unbiased", use_cpu=use_cpu, keep_gradients=True, per_device_train_batch_size=batch,
        max_steps=steps, learning_rate=0.0, max_grad_norm=0.0, control_fraction=0.25, predictor="ntk", logging_steps=50,
    )
    generator = torch.Generator().manual_seed(0)
    directions = [torch.randn(truth.numel(), generator=generator, dtype=torch.float64) for _ in range(12)]
    offset = 0
    for param in (p for p in trainer.model.parameters() if p.requires_grad):
        direction = torch.zeros_like(truth)
        direction[offset : offset + param.numel()] = truth[offset : offset + param.numel()]
        if direction.norm() > 1e-6 * truth.norm():
            directions.append(direction)
        offset += param.numel()
    directions = torch.stack(directions)
    projections = torch.stack(recorder.gradients) @ directions.T
    expected = directions @ truth
    standard_error = (projections.var(dim=0) / len(recorder.gradients) + (1e-5 * expected) ** 2).sqrt()
    z = ((projections.mean(dim=0) - expected) / standard_error).abs().max().item()
    alignment = trainer.lgp_summary()["lgp_mean_alignment"]
    return z < Z_LIMIT, f"max |z| {z:.2f} over {len(directions)} directions, {steps} steps, mean alignment {alignment:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--allow_cpu", action="store_true", help="Without CUDA, run the checks that do not need it on the CPU.")
    parser.add_argument("--unbiased_steps", type=int, default=400, help="Steps of the unbiasedness check (default: %(default)s).")
    parser.add_argument("--race_seconds", type=float, default=45.0, help="Training seconds per run of the bf16 race (0: no race).")
    cli = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not cli.allow_cpu:
        print("gpu_check: no CUDA device here, so nothing was checked (the CPU parts of these checks are in "
              "tests/test_precision.py and tests/test_distributed.py; --allow_cpu runs this script's CUDA-free checks on the CPU).")
        return 0
    use_cpu = not cuda
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        print("device: CPU (--allow_cpu): the checks that need CUDA are skipped")
    hf_logging.set_verbosity_error()
    checks = [
        ("f1_equals_trainer", check_f1_equals_trainer, False),
        ("bf16_trains", check_bf16, False),
        ("fp16_trains", check_fp16, True),
        ("fp16_overflow_skip", check_fp16_overflow, True),
        ("fp16_scale_exact", check_fp16_scale_exact, False),
        ("unbiased", lambda tmp, cpu: check_unbiased(tmp, cpu, cli.unbiased_steps), False),
    ]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, check, needs_cuda in checks:
            if needs_cuda and not cuda:
                print(f"{name:20s} SKIP  needs CUDA (accelerate has no fp16 GradScaler on a CPU)")
                continue
            start = time.perf_counter()
            try:
                ok, figures = check(tmp, use_cpu)
            except Exception as error:  # noqa: BLE001 - report every check, then fail
                ok, figures = False, f"raised {error!r}"
            failures += not ok
            print(f"{name:20s} {'PASS' if ok else 'FAIL'}  {figures}  ({time.perf_counter() - start:.1f} s)", flush=True)
    print("all checks passed" if not failures else f"{failures} check(s) failed")
    if cli.race_seconds > 0:
        race(cli.race_seconds, cuda)
    return 1 if failures else 0


RACE_RUNS = ["trainer", "trainer_b64", "lgp_ntk_fauto", "lgp_ntk_f0.25", "lgp_window_f0.25_k32_m128_mem2"]


def race(seconds: float, cuda: bool) -> None:
    """The equal-time race of the module docstring (`time_to_accuracy.py`, in this process); bf16 needs CUDA here:
    on the CPU (--allow_cpu) it runs in fp32, only to check the script."""
    import time_to_accuracy  # benchmarks/, next to this script

    print(f"race: {seconds:g} s per run, {'bf16' if cuda else 'fp32 (CPU)'}, CIFAR-10 subset, one seed", flush=True)
    time_to_accuracy.main([
        "--subset", "--seeds", "1", "--budget_seconds", str(seconds), "--eval_every_seconds", str(seconds / 3),
        "--eval_samples", "1000", "--runs", *RACE_RUNS, "--output_dir", tempfile.mkdtemp(prefix="gpu_race_"),
        *(["--bf16"] if cuda else []),
    ])


if __name__ == "__main__":
    sys.exit(main())
