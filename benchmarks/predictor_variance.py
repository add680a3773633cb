#!/usr/bin/env python
"""How much sampling variance the linear gradient predictor removes in a run: F with it against F without it.

`sampling_variance.py` measures offline, from exact per-example gradients at fixed weights, how far a control variate
fitted on the previous batch lowers F (its `F_cv / F_is`), and caches those weights (`--output_dir`/cache). This
script loads the weights of one of its regimes (`--regime`; run it there first with the same options) and trains
`PredictedGradientTrainer` from them with `gradient_predictor="linear"` on the same training data for `--steps`
optimizer steps (AdamW, constant `--train_learning_rate`), every step observed, at each of `--fractions` and
`--mixes` (`sampling_uniform_mix`; 1 is the paper's uniform control set). The trainer logs, per step, F of its
update (`lgp/variance_factor`, the control variate's residuals in it) and F_cv / F_is (`lgp/predictor_variance_ratio`,
F_is from the same rows without the predictor). Printed per run: the ratio of the mean F_cv to the mean F_is over
the steps from `--warmup` on (the map is fitted from the first step's rows and applied from the third), and those
means. No timing: the predictor's cost is measured by `step_cost.py`.

    python benchmarks/sampling_variance.py --pretrain_steps 100 --finetune_steps 30 --regimes finetune_30 \\
        --batches 6 --output_dir benchmarks/results/noise_scale_ft          # the cached weights and the offline F_cv
    python benchmarks/predictor_variance.py --regime finetune_30 -- --pretrain_steps 100 --finetune_steps 30 \\
        --output_dir benchmarks/results/noise_scale_ft
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

import sampling_variance
from sampling_variance import binary_labels, load_train_split


def parse_args(argv=None) -> tuple[argparse.Namespace, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regime", required=True, help="scratch_<k> or finetune_<k>, measured by sampling_variance.py")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8, help="Steps left out of the means (the predictor's first fits).")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument("--mixes", nargs="+", type=float, default=[0.1])
    parser.add_argument("--train_learning_rate", type=float, default=None, help="Default: the regime's (sampling_variance's).")
    parser.add_argument("--signal_dims", type=int, default=4)
    parser.add_argument("--ridge", type=float, default=0.1)
    parser.add_argument("--decay", type=float, default=0.9)
    args, rest = parser.parse_known_args(argv)
    return args, sampling_variance.parse_args([r for r in rest if r != "--"])


def in_run_factors(model, dataset, label_map, fraction: float, mix: float, learning_rate: float, args, offline_args) -> dict:
    """Trains a copy of `model` for `args.steps` observed steps; the logged F and F_cv / F_is of every step."""
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = sampling_variance.observed_trainer(
            model, dataset, label_map, offline_args, output_dir, args.steps, learning_rate, logging_steps=1,
            control_fraction=fraction, sampling_uniform_mix=mix, gradient_predictor="linear", predictor_signal_dims=args.signal_dims,
            predictor_ridge=args.ridge, predictor_decay=args.decay,
        )
        start = time.time()
        trainer.train()
    logs = [log for log in trainer.state.log_history if "lgp/predictor_variance_ratio" in log]
    late = [log for log in logs if log["step"] > args.warmup]
    with_predictor = statistics.mean(log["lgp/variance_factor"] for log in late)
    without = statistics.mean(log["lgp/variance_factor"] / log["lgp/predictor_variance_ratio"] for log in late)
    return {
        "fraction": fraction, "mix": mix, "learning_rate": learning_rate, "steps": len(late), "F_cv": with_predictor, "F_is": without,
        "ratio": with_predictor / without, "per_step": [(log["step"], log["lgp/variance_factor"], log["lgp/predictor_variance_ratio"]) for log in logs],
        "coefficients": trainer.predictor.coefficients().tolist(), "seconds": time.time() - start,
    }


def main(argv=None) -> None:
    args, offline_args = parse_args(argv)
    torch.set_num_threads(2)
    dataset, label_names, source = load_train_split(offline_args)
    model, finetune = sampling_variance.cached_regime_model(offline_args, args.regime, label_names)
    learning_rate = args.train_learning_rate
    if learning_rate is None:
        learning_rate = offline_args.finetune_learning_rate if finetune else offline_args.learning_rate
    results = {"regime": args.regime, "data": source, "settings": vars(args), "runs": []}
    offline = offline_args.output_dir / "sampling_variance.json"
    if offline.is_file():
        results["offline"] = json.loads(offline.read_text())["regimes"].get(args.regime, {}).get("mean", {}).get("control_variate")
    print(f"{args.regime}: {source}, batch {offline_args.batch_size}, {args.steps} steps, lr {learning_rate:g}", flush=True)
    for signal, numbers in (results.get("offline") or {}).items():
        print(f"offline (sampling_variance.py), {signal}: " + ", ".join(
            f"f {f}: F_cv / F_is {numbers[f]['F_cv'] / numbers[f]['F_is']:.3f} ({numbers[f]['F_cv']:.3f} / {numbers[f]['F_is']:.3f})"
            for f in numbers if f[0].isdigit()))
    for mix in args.mixes:
        for fraction in args.fractions:
            run = in_run_factors(model, dataset, binary_labels if finetune else None, fraction, mix, learning_rate, args, offline_args)
            results["runs"].append(run)
            print(f"in run, f {fraction}, mix {mix}: F_cv / F_is {run['ratio']:.3f} (F_cv {run['F_cv']:.3f}, F_is {run['F_is']:.3f}; "
                  f"steps {args.warmup + 1}-{args.steps}; {run['seconds']:.0f} s)", flush=True)
    path = offline_args.output_dir / f"predictor_variance_{args.regime}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
