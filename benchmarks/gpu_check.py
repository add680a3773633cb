#!/usr/bin/env python
"""Checks of PredictedGradientTrainer on one CUDA GPU, its step cost there, and a short bf16 equal-time race.

The CPU test suite cannot run CUDA kernels (cuBLAS, cuDNN, the fused attention kernels) nor bf16 on GPU matrix
units; this script runs on them and prints everything, in one process (the step cost in processes of its own).
Sized for about 7 minutes on an H100 at the defaults (an estimate: not yet timed on one):

  (a) unbiased      `lgp_hf.verify_unbiased` at control_fraction 0.5 (`--draws` 64 sampled backwards against the
                    exact gradient, z-tests along the exact gradient, random and per-tensor directions) on the
                    example's ViT (batch `--check_batch` 64 of the shipped CIFAR-10 subset) and on a small GPT-2
                    (`GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4))`, vocabulary `--gpt2_vocab` 50257,
                    tied embeddings, dropout 0 so that its blocks are replayed rather than run dense, batch 16 x 128
                    random tokens), the GPT-2 also with its weight gradients from half its token rows
                    (`weight_gradient_keep=0.5`), each in fp32 and under bf16 autocast: prints each report and the
                    blocks replayed and dense. Fails on a report that is not "unbiased".
  (b) f1_identical  control_fraction=1 against transformers.Trainer: `--identity_steps` 5 steps of the example's
                    ViT (AdamW, batch 32, the library's defaults, unbiasedness check included), fp32 and bf16; the
                    weights must be bit-identical (torch.equal) after every step. Trainer is first run twice: if it
                    does not reproduce itself (non-deterministic kernels), the comparison is undetermined, not failed.
                    cuDNN runs deterministic algorithms during (b).
  (c) step cost     `step_cost.py` at batch `--batch_size` 128 under bf16: Trainer, lgp_f0.5 and lgp_f0.25 (each also
                    with `_keep0.5`: token-sampled weight gradients), lgp_f0.25_linear (the gradient predictor),
                    lgp_f1_keepauto (the keep chosen by "auto" from the layers' timed savings on this GPU: k_eff), with
                    each run's share of trunk rows backpropagated (f_eff, `lgp_trunk_rows_computed`), the floor
                    f_eff + (1 - f_eff) c and ratio - floor (goal: at most 0.05); `--step_rounds` 6 rounds of 4 steps.
  (d) race          `time_to_accuracy.py --subset --bf16`, one seed, `--race_seconds` 45 s of training per run:
                    Trainer at batch 128 and 64, lgp_fauto, lgp_f0.5; its table gives per run steps, seconds per
                    step, test accuracy, F (`lgp_variance_factor`), the step cost and F x cost.
  (e) LM step cost  `step_cost.py --model gpt2_small` (124 M parameters, random tokens) at `--lm_batch_size` 8 x
                    `--lm_sequence_length` 512 under bf16: Trainer, f = 1 with the weight gradients at keep 1, 0.5
                    and 0.25, the defaults (lgp_fauto) and lgp_f1_keepauto. The open question of issue 25: whether
                    the token draw makes a language model's step cheaper on a GPU by more than its F (1.06-1.07 at
                    keep 0.5, 1.54-1.59 at 0.25 on `lm_finetune.py`'s task) makes it dearer.

    python benchmarks/gpu_check.py               # on a machine with CUDA; exit status 1 when (a) or (b) fails
    python benchmarks/gpu_check.py --parts a b   # the checks only
    python benchmarks/gpu_check.py --allow_cpu --check_batch 8 --draws 16 --gpt2_vocab 1000 --identity_steps 2 \\
        --batch_size 16 --step_rounds 2 --race_seconds 5 --race_eval_samples 64 --lm_batch_size 1 \
        --lm_sequence_length 64   # smoke test on the CPU (several minutes)

Without a CUDA device (and without --allow_cpu) it says so and exits 0. On the CPU (--allow_cpu) bf16 autocast is
the CPU's, and (c), (d) and (e) run in fp32: only to check the script.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, set_seed  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import common  # noqa: E402  (benchmarks/, next to this script)
from lgp_hf import PredictedGradientArguments, PredictedGradientTrainer, verify_unbiased  # noqa: E402

FRACTION = 0.5
GPT2_SHAPE = {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 128}
GPT2_BATCH = (16, 128)  # sequences x tokens


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--allow_cpu", action="store_true", help="Without CUDA, run everything on the CPU (slow, for the script).")
    parser.add_argument("--parts", nargs="+", choices=list("abcde"), default=list("abcde"), help="Which parts to run (default: all).")
    parser.add_argument("--draws", type=int, default=64, help="(a) sampled backwards per unbiasedness check.")
    parser.add_argument("--check_batch", type=int, default=64, help="(a) ViT images per unbiasedness check.")
    parser.add_argument("--gpt2_vocab", type=int, default=50257, help="(a) vocabulary of the small GPT-2.")
    parser.add_argument("--identity_steps", type=int, default=5, help="(b) optimizer steps compared.")
    parser.add_argument("--batch_size", type=int, default=128, help="(c), (d) batch size of Trainer and the lgp runs.")
    parser.add_argument("--step_rounds", type=int, default=6, help="(c), (e) rounds of step_cost.py's rotation (the first discarded).")
    parser.add_argument("--race_seconds", type=float, default=45.0, help="(d) training seconds per run of the race.")
    parser.add_argument("--race_eval_samples", type=int, default=1000, help="(d) test images per evaluation (3 per run and a final one).")
    parser.add_argument("--lm_batch_size", type=int, default=8, help="(e) sequences per batch of GPT-2 small.")
    parser.add_argument("--lm_sequence_length", type=int, default=512, help="(e) tokens per sequence of GPT-2 small.")
    return parser.parse_args(argv)


def subset_data() -> common.ImageData:
    return common.load_data(argparse.Namespace(subset=True, data_dir=None, dataset_name=None))


def precision_settings(bf16: bool, cuda: bool) -> dict:
    return {"bf16": bf16, "use_cpu": not cuda}


# ---------------------------------------------------------------- (a) unbiasedness


def small_gpt2(vocab: int) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **GPT2_SHAPE)
    return GPT2LMHeadModel(config)


def check_unbiased(cli, cuda: bool, data: common.ImageData, tmp: str) -> int:
    """(a): one verify_unbiased report per model and precision; returns the number of failures."""
    vit_batch = common.first_batch(data.train, cli.check_batch)
    tokens = torch.randint(0, cli.gpt2_vocab, GPT2_BATCH, generator=torch.Generator().manual_seed(0))
    gpt2_batch = {"input_ids": tokens, "labels": tokens}
    failures = 0
    for model_name, keep in (("vit", 1.0), ("gpt2", 1.0), ("gpt2_keep0.5", 0.5)):
        for bf16 in (False, True):
            name = f"unbiased_{model_name}_{'bf16' if bf16 else 'fp32'}"
            set_seed(0)
            spec = common.parse_run(common.lgp_run_name(FRACTION), cli.check_batch)
            if model_name == "vit":
                model, batch = common.build_model(data.labels)[0], vit_batch
                args = common.training_arguments(spec, f"{tmp}/{name}", 0, **precision_settings(bf16, cuda))
            else:
                model, batch = small_gpt2(cli.gpt2_vocab), gpt2_batch
                args = PredictedGradientArguments(
                    output_dir=f"{tmp}/{name}", report_to="none", control_fraction=FRACTION, weight_gradient_keep=keep,
                    **precision_settings(bf16, cuda),
                )
            trainer = PredictedGradientTrainer(model=model, args=args)
            print(f"{name}: ", end="", flush=True)
            try:
                report = verify_unbiased(trainer, batch, draws=cli.draws, control_fraction=FRACTION)
            except Exception as error:  # noqa: BLE001 - report every check, then fail
                print(f"FAIL  raised {error!r}", flush=True)
                failures += 1
                continue
            summary = trainer.lgp_summary()
            print(f"    {'PASS' if report.passed else 'FAIL'}  blocks replayed {summary['lgp_blocks'] - summary['lgp_dense_blocks']}, "
                  f"dense {summary['lgp_dense_blocks']}; largest |z| per tensor: {', '.join(report.worst_tensors())}", flush=True)
            failures += not report.passed
    return failures


# ---------------------------------------------------------------- (b) f = 1 is Trainer


class WeightRecorder(TrainerCallback):
    """A CPU copy of all the weights after every optimizer step."""

    def __init__(self):
        self.weights: list[torch.Tensor] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append(torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()]))


def weights_after_steps(run: str, cli, cuda: bool, bf16: bool, data: common.ImageData, tmp: str) -> list[torch.Tensor]:
    spec = common.parse_run(run, 32)
    set_seed(0)
    model = common.build_model(data.labels)[0]
    args = common.training_arguments(
        spec, f"{tmp}/identity_{run}", 0, max_steps=cli.identity_steps, lr_scheduler_type="constant", logging_steps=1,
        **precision_settings(bf16, cuda),
    )
    recorder = WeightRecorder()
    common.make_trainer(spec, model, args, data.train, callbacks=[recorder]).train()
    return recorder.weights


def first_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[int | None, float]:
    """(first step whose weights differ, None if none; max |difference| over all steps)."""
    first = next((i + 1 for i, (x, y) in enumerate(zip(a, b)) if not torch.equal(x, y)), None)
    return first, max(float((x - y).abs().max()) for x, y in zip(a, b))


def check_f1_identical(cli, cuda: bool, data: common.ImageData, tmp: str) -> int:
    """(b): returns the number of failures (an undetermined comparison is not one)."""
    failures = 0
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        for bf16 in (False, True):
            name = f"f1_identical_{'bf16' if bf16 else 'fp32'}"
            reference = weights_after_steps("trainer", cli, cuda, bf16, data, tmp)
            again = weights_after_steps("trainer", cli, cuda, bf16, data, tmp)
            ours = weights_after_steps("lgp_f1", cli, cuda, bf16, data, tmp)
            moved = float((reference[-1] - reference[0]).abs().max())
            self_first, self_max = first_difference(reference, again)
            first, largest = first_difference(reference, ours)
            if first is None:
                verdict = "PASS"
            elif self_first is not None:
                verdict = "UNDETERMINED (Trainer does not reproduce itself)"
            else:
                verdict, failures = "FAIL", failures + 1
            print(f"{name}: {verdict}  {len(ours)} steps, lgp_f1 vs Trainer: "
                  f"{'identical' if first is None else f'first differs at step {first}, max |dw| {largest:.2e}'}; Trainer vs "
                  f"Trainer: {'identical' if self_first is None else f'max |dw| {self_max:.2e}'} (weights moved {moved:.2e})",
                  flush=True)
    finally:
        torch.backends.cudnn.deterministic = deterministic
    return failures


# ---------------------------------------------------------------- (c) step cost, (d) race, (e) the LM's step cost


def step_cost(cli, cuda: bool) -> None:
    import step_cost as step_cost_script  # benchmarks/, next to this script

    step_cost_script.main([
        "--batch_size", str(cli.batch_size), "--fractions", "0.5", "0.25", "--weight_gradient_keep", "1.0", "0.5",
        "--runs", "lgp_f0.25_linear", "lgp_f1_keepauto", "--rounds", str(cli.step_rounds),
        "--steps_per_turn", "4", "--output_dir", tempfile.mkdtemp(prefix="gpu_step_cost_"), *(["--bf16"] if cuda else []),
    ])


def lm_step_cost(cli, cuda: bool) -> None:
    import step_cost as step_cost_script  # benchmarks/, next to this script

    step_cost_script.main([
        "--model", "gpt2_small", "--batch_size", str(cli.lm_batch_size), "--sequence_length", str(cli.lm_sequence_length),
        "--fractions", "1.0", "--weight_gradient_keep", "1.0", "0.5", "0.25", "--runs", "lgp_fauto", "lgp_f1_keepauto",
        "--rounds", str(cli.step_rounds), "--steps_per_turn", "4", "--output_dir", tempfile.mkdtemp(prefix="gpu_lm_step_cost_"),
        *(["--bf16"] if cuda else []),
    ])


def race(cli, cuda: bool) -> None:
    import time_to_accuracy  # benchmarks/, next to this script

    seconds = cli.race_seconds
    runs = ["trainer", f"trainer_b{cli.batch_size // 2}", "lgp_fauto", common.lgp_run_name(FRACTION)]
    print(f"race: {seconds:g} s per run, {'bf16' if cuda else 'fp32 (CPU)'}, CIFAR-10 subset, one seed", flush=True)
    time_to_accuracy.main([
        "--subset", "--seeds", "1", "--budget_seconds", str(seconds), "--eval_every_seconds", str(seconds / 3),
        "--eval_samples", str(cli.race_eval_samples), "--batch_size", str(cli.batch_size), "--runs", *runs,
        "--output_dir", tempfile.mkdtemp(prefix="gpu_race_"), *(["--bf16"] if cuda else []),
    ])


def main(argv=None) -> int:
    cli = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not cli.allow_cpu:
        print("gpu_check: no CUDA device here, so nothing was checked (--allow_cpu runs the script on the CPU).")
        return 0
    if cuda:
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        print(f"device: {common.device_description()} (--allow_cpu): CPU kernels, (c) and (d) in fp32")
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    failures = 0
    start = time.perf_counter()
    data = subset_data() if {"a", "b"} & set(cli.parts) else None
    with tempfile.TemporaryDirectory() as tmp:
        if "a" in cli.parts:
            print(f"\n(a) verify_unbiased at control_fraction {FRACTION}, {cli.draws} draws", flush=True)
            failures += check_unbiased(cli, cuda, data, tmp)
        if "b" in cli.parts:
            print(f"\n(b) control_fraction=1 against transformers.Trainer, {cli.identity_steps} steps", flush=True)
            failures += check_f1_identical(cli, cuda, data, tmp)
    if "c" in cli.parts:
        print(f"\n(c) step cost, batch {cli.batch_size}", flush=True)
        step_cost(cli, cuda)
    if "d" in cli.parts:
        print("\n(d) equal-time race", flush=True)
        race(cli, cuda)
    if "e" in cli.parts:
        print(f"\n(e) GPT-2 small step cost, {cli.lm_batch_size} x {cli.lm_sequence_length} tokens", flush=True)
        lm_step_cost(cli, cuda)
    checked = "(a) and (b)" if {"a", "b"} <= set(cli.parts) else "the checks run"
    print(f"\n{f'{failures} check(s) failed' if failures else f'{checked}: no failure'}; {time.perf_counter() - start:.0f} s in all")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
