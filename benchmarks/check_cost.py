#!/usr/bin/env python
"""What `lgp_hf.verify_unbiased` costs and what it can see, on the example's ViT and on GPT-2 small.

For each model (the ViT of `examples/run_vit.py` at batch 128 on CIFAR-10 images; GPT-2 small, 124 M parameters,
built from its config, at 4 sequences of 128 random tokens), at control fraction `--fraction`:
- the check's wall time for `--draws` sampled backwards, against one `Trainer` step (forward and backward) on the
  same batch: the check costs two forwards, one full backward and the draws;
- its power: z-tests find a mean error of `threshold / sqrt(draws)` standard deviations of one draw along a tested
  direction half the time. Along the exact gradient, one draw's standard deviation sigma is measured, so the
  smallest detectable relative bias along it is eps_min = threshold sigma / (sqrt(draws) ||g||^2); faults of 0.5, 1
  and 2 eps_min are then injected (every drawn row's weight scaled by 1 + eps, which biases the trunk's part of g by
  eps, so somewhat less than eps along g) and the check's verdicts printed.

    python benchmarks/check_cost.py                      # both models, about 10 minutes on 2 CPU cores
    python benchmarks/check_cost.py --models vit --draws 16 --batch_size 16   # smoke test

Writes `--output_dir`/check_cost.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import lgp_hf.boundary
from lgp_hf import PredictedGradientArguments, PredictedGradientTrainer
from lgp_hf.verification import RANDOM_DIRECTIONS, gradient_error_statistics, report_from_statistics, z_scores

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "examples"))
import run_vit  # noqa: E402  (examples/ is not a package)


def vit_setup(batch_size: int):
    data = run_vit.load_image_dataset(run_vit.DataTrainingArguments(), seed=0)[0]["train"]
    data.set_transform(run_vit.make_transform("img", (32, 32), run_vit.CIFAR10_MEAN, run_vit.CIFAR10_STD, train=False, padding=0))
    torch.manual_seed(0)
    model, _ = run_vit.build_model(run_vit.ModelArguments(), [str(i) for i in range(10)])
    return model, run_vit.collate_fn([data[i] for i in range(batch_size)])


def gpt2_setup(batch_size: int):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())
    ids = torch.randint(0, model.config.vocab_size, (max(1, batch_size // 32), 128), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids.clone()}


def trainer_for(model, fraction: float) -> PredictedGradientTrainer:
    args = PredictedGradientArguments(output_dir="/tmp/check_cost", report_to=[], use_cpu=not torch.cuda.is_available(),
                                      control_fraction=fraction, unbiasedness_check=False)
    return PredictedGradientTrainer(model=model, args=args)


def check(trainer, batch, fraction, draws, seed=0):
    inputs = trainer._prepare_inputs(batch)
    start = time.perf_counter()
    directions, sums, squares, names = gradient_error_statistics(trainer, trainer.model, inputs, None, fraction, draws, seed)
    seconds = time.perf_counter() - start
    report = report_from_statistics(directions, sums, squares, draws, names, fraction, 1e-3, trainer.args, seconds)
    return report, directions, sums, squares


def step_seconds(trainer, batch, repeats=3) -> float:
    inputs = trainer._prepare_inputs(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        trainer.compute_loss(trainer.model, dict(inputs)).backward()
        trainer.model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit", "gpt2"], choices=["vit", "gpt2"])
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--draws", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=128, help="ViT images; GPT-2 gets batch_size / 32 sequences of 128 tokens.")
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "benchmarks" / "results" / "check_cost"))
    cli = parser.parse_args()
    results = []
    for name in cli.models:
        model, batch = (vit_setup if name == "vit" else gpt2_setup)(cli.batch_size)
        trainer = trainer_for(model, cli.fraction)
        step = step_seconds(trainer, batch)
        report, directions, sums, squares = check(trainer, batch, cli.fraction, cli.draws)
        # one draw's standard deviation along the exact gradient, against the squared norm of that gradient
        variance = (squares[0] - sums[0] ** 2 / cli.draws) / (cli.draws - 1)
        norm_squared = float(directions.project(directions.exact)[0])
        eps_min = report.threshold * float(variance.sqrt()) / cli.draws**0.5 / norm_squared
        row = {"model": name, "parameters": sum(p.numel() for p in model.parameters()), "draws": cli.draws,
               "check_seconds": report.seconds, "step_seconds": step, "check_in_steps": report.seconds / step,
               "passed": report.passed, "worst_z": report.worst_z, "threshold": report.threshold,
               "detectable_in_sds": report.threshold / cli.draws**0.5, "eps_min": eps_min, "faults": []}
        print(f"{name}: {report}; a Trainer step {step:.2f} s, the check {row['check_in_steps']:.1f} steps; "
              f"smallest detectable bias {row['detectable_in_sds']:.2f} SD of a draw, along the gradient a relative {eps_min:.3g}")
        original = lgp_hf.boundary.horvitz_thompson_weights
        for multiple in (0.5, 1.0, 2.0):
            eps = multiple * eps_min
            lgp_hf.boundary.horvitz_thompson_weights = lambda drawn, p, eps=eps: original(drawn, p) * (1 + eps)
            faulty, _, fsums, fsquares = check(trainer, batch, cli.fraction, cli.draws, seed=1)
            z_exact = float(z_scores(fsums, fsquares, cli.draws, directions.floors(1e-4))[0])
            row["faults"].append({"eps": eps, "multiple_of_eps_min": multiple, "detected": not faulty.passed,
                                  "worst_z": faulty.worst_z, "z_along_gradient": z_exact})
            print(f"  weights x (1 + {eps:.3g}) [{multiple} eps_min]: {'detected' if not faulty.passed else 'not detected'} "
                  f"(largest |z| {faulty.worst_z:.2f}, along the gradient {z_exact:.2f}, threshold {faulty.threshold:.2f})")
        lgp_hf.boundary.horvitz_thompson_weights = original
        results.append(row)
    out = Path(cli.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "check_cost.json").write_text(json.dumps({"settings": vars(cli), "random_directions": RANDOM_DIRECTIONS, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
