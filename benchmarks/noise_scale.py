#!/usr/bin/env python
"""The trainer's in-run gradient noise scale against the exact one of `sampling_variance.py`, same weights and data.

`sampling_variance.py` measures B_noise = tr(Sigma) / |G|^2 from exact per-example gradients at fixed weights and
caches those weights (`--output_dir`/cache). This script loads the weights of one of its regimes (`--regime`,
run it there first with the same options) and trains `PredictedGradientTrainer` from them on the same training
data (the example's training transform, random batches of `--batch_size`) for `--steps` optimizer steps, every step
observed (`auto_observation_period=1`), at each of `--fractions` ("auto" with no decision in the run: f = 1; a
number: that f, the sampling variance removed from the estimate). `--train_learning_rate` 0 (the default) keeps the
weights fixed, so the estimate is comparable with the offline one; a positive value trains (AdamW, constant lr).
Printed per fraction: the run's smoothed estimate (`lgp_noise_scale`, what "auto" uses), the ratio of the means of
the per-step estimates of tr(Sigma) and |G|^2 over all observed steps, and their count. The options after these
are `sampling_variance.py`'s (they locate the cache and the data).

    python benchmarks/sampling_variance.py --regimes scratch_30 --scratch_steps 30 --batches 2
    python benchmarks/noise_scale.py --regime scratch_30 --steps 20 -- --scratch_steps 30
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import sampling_variance
from lgp_hf.noise_scale import noise_scale
from sampling_variance import binary_labels, load_train_split


def parse_args(argv=None) -> tuple[argparse.Namespace, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regime", required=True, help="scratch_<k> or finetune_<k>, measured by sampling_variance.py")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--fractions", nargs="+", default=["auto", "0.5"])
    parser.add_argument("--train_learning_rate", type=float, default=0.0)
    args, rest = parser.parse_known_args(argv)
    return args, sampling_variance.parse_args([r for r in rest if r != "--"])


def in_run_estimate(model, dataset, label_map, fraction: str, args, offline_args) -> dict:
    """Trains a copy of `model` for `args.steps` observed steps at `fraction`; the trainer's estimates."""
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = sampling_variance.observed_trainer(
            model, dataset, label_map, offline_args, output_dir, args.steps, args.train_learning_rate,
            logging_steps=max(1, args.steps // 4), control_fraction=fraction, auto_decision_steps=args.steps + 1,
        )
        steps, add = [], trainer.monitor.noise.add
        trainer.monitor.noise.add = lambda trace, squared_mean: (steps.append((trace, squared_mean)), add(trace, squared_mean))
        start = time.time()
        trainer.train()
    traces, squared_means = zip(*steps)
    trace, squared_mean = sum(traces) / len(steps), sum(squared_means) / len(steps)
    return {
        "fraction": fraction, "smoothed": trainer.lgp_summary()["lgp_noise_scale"], "mean_of_steps": noise_scale(trace, squared_mean),
        "trace": trace, "squared_mean": squared_mean, "observed": len(steps), "steps": steps, "seconds": time.time() - start,
        "logged": [log["lgp/noise_scale"] for log in trainer.state.log_history if "lgp/noise_scale" in log],
    }


def main(argv=None) -> None:
    args, offline_args = parse_args(argv)
    dataset, label_names, source = load_train_split(offline_args)
    model, finetune = sampling_variance.cached_regime_model(offline_args, args.regime, label_names)
    results = {"regime": args.regime, "data": source, "runs": []}
    offline = offline_args.output_dir / "sampling_variance.json"
    if offline.is_file():
        results["offline"] = json.loads(offline.read_text())["regimes"].get(args.regime, {}).get("noise_scale")
    print(f"{args.regime}: {source}, batch {offline_args.batch_size}, {args.steps} steps, lr {args.train_learning_rate:g}", flush=True)
    if results.get("offline"):
        print("offline (sampling_variance.py): " + ", ".join(
            f"{key} {value['pooled']:.1f} pooled (tr(Sigma) {value['pooled_trace']:.4g}, |G|^2 {value['pooled_squared_mean']:.4g}), "
            f"{value['per_batch']:.1f} per batch" for key, value in results["offline"].items()))
    for fraction in args.fractions:
        run = in_run_estimate(model, dataset, binary_labels if finetune else None, fraction, args, offline_args)
        results["runs"].append(run)
        print(
            f"in run, control_fraction={fraction}: smoothed {run['smoothed']:.1f}, mean of the {run['observed']} observed "
            f"steps {run['mean_of_steps']:.1f} (tr(Sigma) {run['trace']:.4g}, |G|^2 {run['squared_mean']:.4g}; {run['seconds']:.0f} s)", flush=True,
        )
    path = offline_args.output_dir / f"noise_scale_{args.regime}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
