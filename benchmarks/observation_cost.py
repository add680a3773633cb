#!/usr/bin/env python
"""What an observed step costs: its time over a plain `Trainer` step's, at f = 1 under control_fraction="auto".

"auto" observes some steps (the rows' gradient norms of the trunk's linear layers are read in their backward, for F
and the gradient noise scale) and spaces them by what one costs (`auto_observation_budget`). Here the trainer
observes every other step (`auto_observation_period=2`, no budget) and never lowers f (`auto_min_control_fraction=1`),
so that after its first decision observed and plain steps alternate in one run, and its own measure is read at the
end: `lgp_observation_overhead` of `lgp_summary()`, the median of the last 5 observed steps over the median of the last
5 plain ones, less 1 (`costs.StepCostModel.observation_overhead`). `--repeats` runs in turn give its spread. Model,
data and optimizer settings: `step_cost.py`'s (`--model vit`: the example's ViT on the CIFAR-10 subset; `gpt2_small`:
GPT-2 small from its config on random tokens, `--sequence_length` each).

    python benchmarks/observation_cost.py                                              # the ViT at batch 128
    python benchmarks/observation_cost.py --model gpt2_small --batch_size 4 --steps 40
    python benchmarks/observation_cost.py --steps 12 --repeats 1 --batch_size 16     # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

import common
import step_cost
from lgp_hf import PredictedGradientTrainer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=["vit", "gpt2_small"], default="vit")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--sequence_length", type=int, default=128, help="Tokens per example of --model gpt2_small.")
    parser.add_argument("--steps", type=int, default=30, help="Optimizer steps per run (the first decision comes after "
                        "64 observed rows and 3 plain steps).")
    parser.add_argument("--repeats", type=int, default=2, help="Runs, one after the other.")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (for a GPU).")
    return parser.parse_args(argv)


def observation_overhead(args) -> float | None:
    """One run's `lgp_observation_overhead`."""
    setup = step_cost.parse_args(["--model", args.model, "--batch_size", str(args.batch_size), "--sequence_length",
                                  str(args.sequence_length), "--rounds", str(args.steps), "--steps_per_turn", "1"])
    model, train, collator = step_cost.model_and_data(setup)
    spec = common.parse_run("lgp_fauto", args.batch_size)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = common.training_arguments(
            spec, output_dir, setup.seed, max_steps=args.steps, lr_scheduler_type="constant", bf16=args.bf16,
            unbiasedness_check=False, auto_min_control_fraction=1.0, auto_observation_period=2,
            auto_observation_budget=1e9, report_to=[], save_strategy="no", logging_strategy="no",
        )
        trainer = PredictedGradientTrainer(model=model, args=training_args, train_dataset=train, data_collator=collator)
        trainer.train()
    return trainer.lgp_summary()["lgp_observation_overhead"]


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else common.device_description()
    overheads = [observation_overhead(args) for _ in range(args.repeats)]
    shown = ", ".join("not measured" if overhead is None else f"{overhead:.3f}" for overhead in overheads)
    print(f"{args.model}, batch {args.batch_size}{f' x {args.sequence_length} tokens' if args.model == 'gpt2_small' else ''}, "
          f"{args.steps} steps per run, {device}: an observed step costs 1 + ({shown}) plain steps"
          + (f", median 1 + {statistics.median(overheads):.3f}" if None not in overheads else ""))


if __name__ == "__main__":
    main()
