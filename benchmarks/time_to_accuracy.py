#!/usr/bin/env python
"""Test accuracy against training time: PredictedGradientTrainer and transformers.Trainer at equal wall-clock budgets.

Every run trains the ViT of `examples/run_vit.py` from scratch (from the same initial weights for a given seed)
on CIFAR-10 (the full 50,000 / 10,000 images by default) for `--budget_seconds` of training time, evaluating on
`--eval_samples` test images every `--eval_every_seconds` and at the end (`common.TrainingBudget`; evaluation
time is not counted in the budget). Per seed, every run has its own process and they take turns of
`--seconds_per_turn` training seconds (`common.run_interleaved`): one computes at a time, and the machine's slow
and fast phases (on this project's machine a configuration's steps were 25 % faster in one run than in the same
configuration's run a few minutes earlier) hit every run alike, which running them one after the other does not.

Runs (`--runs`; the default is the first four lines, with lgp_f<f> for each of `--fractions`, 0.25 and 0.5):
  trainer           transformers.Trainer at `--batch_size` (128)
  trainer_b<n>      transformers.Trainer at batch size n; the default adds the half batch (64): at about half a
                    step's cost it is the equal-cost smaller-batch baseline (its F x cost is about 1, as for
                    Trainer at the full batch)
  lgp_fauto         PredictedGradientTrainer at control_fraction="auto", the library's default: starts at f = 1 and
                    lowers f where its estimated F x cost is below 0.95
  lgp_f<f>          PredictedGradientTrainer at a fixed control fraction f in (0, 1]
  lgp_..._mix<a>    either lgp name with sampling_uniform_mix a (`common.RUN_OPTIONS`), e.g. lgp_f0.25_mix0.3

Every lgp run keeps the library's other defaults, its unbiasedness check included (its time counts in the
budget, as users pay it). All runs use the example's optimizer settings (AdamW, weight decay 0.05) at
`--learning_rate` for every batch size, constant after `--warmup_steps` warm-up steps (a schedule over a fixed
number of steps would differ between runs that reach different step counts in the same time).

Reported per run: steps, seconds per step (training time over steps) and the slowest step's seconds (in lgp runs
that checked, the step that ran the unbiasedness check: its cost against a step's); final test accuracy (mean
and per seed); training seconds to reach the target, the best Trainer run's mean final accuracy (first
evaluation at or above it; per seed, and the mean when every seed reached it); and from `trainer.lgp_summary()`
(means over seeds): the final control fraction, the share of trunk rows backpropagated, F
(`lgp_variance_factor`: the update's variance relative to the full batch's, estimated from the observed steps,
at the f they ran at), the trainer's own measured step cost (`lgp_step_cost`, a sampled step's time over a plain
Trainer step's, both timed inside the run; "-" where it measured none) and F x cost; the same with the cost
measured here (seconds per step over the `trainer` run's of the same seed, data loading and the unbiasedness
check included); with a gradient predictor, F with it over F without it (`lgp_predictor_variance_ratio`) and its
own work as a share of a Trainer step (`lgp_predictor_cost`); the predicted F x cost and best f of "auto"'s last
decision; and the unbiasedness check's status per seed. The method pays when F x cost < 1.

Plots: test accuracy against training seconds (accuracy_vs_seconds.png); for lgp runs, the logged
`lgp/control_fraction` and `lgp/variance_factor` against step (lgp_vs_step.png). results.json holds every
evaluation, the lgp summaries and log history, and is rewritten after each seed, so an interrupted suite keeps
what it finished.

    python benchmarks/time_to_accuracy.py       # 5 runs x 2 seeds x 90 s: about 20 minutes on 2 CPU cores
    python benchmarks/time_to_accuracy.py --runs trainer lgp_fauto lgp_f0.25_mix0.3 --budget_seconds 600 --seeds 3
    python benchmarks/time_to_accuracy.py --subset --seeds 1 --budget_seconds 5 --eval_every_seconds 3 \\
        --eval_samples 64 --batch_size 16 --runs trainer lgp_f0.5 lgp_fauto      # smoke test
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import traceback
from pathlib import Path

from transformers import TrainerCallback, set_seed

import common

#: Training stops on the time budget; this only has to be out of reach.
MAX_STEPS = 10**7


def build_parser(description: str = __doc__.split("\n\n")[0]) -> argparse.ArgumentParser:
    parser = race_parser(description)
    parser.set_defaults(output_dir=common.RESULTS_DIR / "time_to_accuracy")
    common.add_data_arguments(parser, subset_default=False)
    return parser


def race_parser(description: str) -> argparse.ArgumentParser:
    """The options of an equal-time race (runs, seeds, budget, turns, evaluation, optimizer), any task's."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=128, help="Per-device batch size of `trainer` and lgp runs.")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5], help="Fixed control fractions of the default runs.")
    parser.add_argument(
        "--runs",
        nargs="+",
        default=None,
        help="Run names: trainer, trainer_b<batch size>, lgp_fauto, lgp_f<fraction>, an lgp name optionally followed by "
        "_mix<sampling_uniform_mix> (e.g. lgp_f0.25_mix0.3). Default: trainer, trainer_b<batch_size / 2>, lgp_fauto, and "
        "lgp_f<f> for every --fractions f.",
    )
    parser.add_argument("--seeds", type=int, default=2, help="Seeds 0 .. seeds-1 per run.")
    parser.add_argument("--budget_seconds", type=float, default=90.0, help="Training seconds per run (evaluation excluded).")
    parser.add_argument("--eval_every_seconds", type=float, default=30.0, help="Training seconds between evaluations.")
    parser.add_argument("--seconds_per_turn", type=float, default=10.0, help="Training seconds of a run per turn of the rotation.")
    parser.add_argument("--eval_samples", type=int, default=2000, help="Test examples per evaluation (a fixed random subset).")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--warmup_steps", type=int, default=20, help="Linear warm-up steps, then a constant rate.")
    parser.add_argument("--logging_steps", type=int, default=10, help="Steps between log entries (and lgp/* statistics).")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in every run (TrainingArguments.bf16; for a GPU).")
    parser.add_argument("--output_dir", type=Path)
    return parser


def run_specs(args) -> list[common.RunSpec]:
    if args.runs is not None:
        names = args.runs
    else:
        names = ["trainer", f"trainer_b{max(1, args.batch_size // 2)}", common.lgp_run_name("auto")]
        names += [common.lgp_run_name(f) for f in args.fractions]
    return [common.parse_run(name, args.batch_size) for name in dict.fromkeys(names)]


class TurnTaker(TrainerCallback):
    """Takes part in a `common.Rotation`: waits for its turn before training begins, and at the beginning of a step
    hands the turn on once it has trained `seconds_per_turn` in this turn (so that an evaluation the previous step
    asked for runs in this process's turn); time spent waiting is not training time (`TrainingBudget.exclude`)."""

    def __init__(self, index: int, rotation: common.Rotation, seconds_per_turn: float, budget: common.TrainingBudget, timer):
        self.index, self.rotation, self.seconds_per_turn, self.budget, self.timer = index, rotation, seconds_per_turn, budget, timer
        self.turn_began = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.rotation.arrive(self.index)
        self.rotation.wait(self.index)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.budget.elapsed(args.device) - self.turn_began >= self.seconds_per_turn:
            waiting = time.perf_counter()
            self.rotation.pass_turn(self.index)
            self.rotation.wait(self.index)
            self.budget.exclude(time.perf_counter() - waiting)
            self.timer.restart_gap()
            self.turn_began = self.budget.elapsed(args.device)

    def on_train_end(self, args, state, control, **kwargs):
        self.rotation.pass_turn(self.index, finished=True)


def run_one(spec: common.RunSpec, seed: int, data: common.ImageData, args, model_factory, index=None, rotation=None) -> dict:
    """Trains `model_factory()` (called after `set_seed(seed)`) with `spec` for the time budget, taking turns in
    `rotation` when given; returns the record."""
    set_seed(seed)
    model = model_factory()
    training_args = common.training_arguments(spec, str(args.output_dir / "trainer_output"), seed, **budget_settings(args))

    def make_trainer(callbacks):
        return common.make_trainer(spec, model, training_args, data.train, data.eval, callbacks=callbacks)

    record = train_for_budget(spec, seed, args, make_trainer, ("accuracy", "loss"), index, rotation)
    return {**record, "final_accuracy": record["evaluations"][-1]["accuracy"]}


def budget_settings(args) -> dict:
    """TrainingArguments of a run stopped by its time budget: a constant learning rate after the warm-up (a schedule
    over a fixed number of steps would differ between runs that reach different step counts in the same time)."""
    return {
        "max_steps": MAX_STEPS, "learning_rate": args.learning_rate, "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": args.warmup_steps, "logging_steps": args.logging_steps, "bf16": args.bf16,
    }


def train_for_budget(spec: common.RunSpec, seed: int, args, make_trainer, metrics: tuple[str, ...], index=None, rotation=None) -> dict:
    """Trains `make_trainer(callbacks)` for `args.budget_seconds` of training time, evaluating every
    `args.eval_every_seconds` and at the end, taking turns in `rotation` when given; returns the record (each
    evaluation's `metrics`, and final_loss)."""
    budget = common.TrainingBudget(args.budget_seconds, args.eval_every_seconds)
    timer = common.StepTimer()
    turns = [] if rotation is None else [TurnTaker(index, rotation, args.seconds_per_turn, budget, timer)]
    trainer = make_trainer([*turns, budget, timer])
    trainer.train()
    steps = trainer.state.global_step
    slowest = max(range(len(timer.steps)), key=lambda i: timer.steps[i]["seconds"])
    log = [
        {key: value for key, value in entry.items() if key == "step" or key == "loss" or key.startswith("lgp/")}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    return {
        "run": spec.name,
        "seed": seed,
        "batch_size": spec.batch_size,
        "control_fraction": spec.control_fraction,
        "steps": steps,
        "training_seconds": budget.training_seconds,
        "seconds_per_step": budget.training_seconds / steps,
        "median_step_seconds": statistics.median(step["seconds"] for step in timer.steps),
        "slowest_step": {"step": slowest + 1, "seconds": timer.steps[slowest]["seconds"]},  # where a check ran
        "evaluations": [{key: entry[key] for key in ("seconds", "step", *metrics)} for entry in budget.evaluations],
        "final_loss": budget.evaluations[-1]["loss"],
        "lgp_summary": trainer.lgp_summary() if spec.is_lgp else None,
        "log": log,
    }


def participant(index: int, spec: common.RunSpec, seed: int, args, data_loader, model_factory, run, rotation: common.Rotation) -> None:
    """One process of a seed's rotation: loads the data, trains `spec` with `run` (`run_one`'s signature), reports
    its record."""
    try:
        record = run(spec, seed, data_loader(), args, model_factory, index, rotation)
        rotation.messages.put(("result", index, record))
    except BaseException:  # noqa: BLE001 - reported to the parent, which stops the rotation
        rotation.messages.put(("error", index, traceback.format_exc()))
        rotation.abort()


def run_suite(args, data_loader, model_factory, results_path: Path, extra: dict | None = None, run=run_one) -> list[dict]:
    """Every run of `run_specs(args)` for every seed: per seed, all runs at once in their own processes, taking
    turns of `--seconds_per_turn` training seconds (`common.run_interleaved`), so that the machine's slow and fast
    phases (steps 25 % slower or faster from one minute to the next were seen here) hit every run alike; results.json
    is rewritten after each seed. `data_loader`, `model_factory` and `run` (`run_one` or a function of its signature
    for another task) are picklable callables (functools.partial, module-level functions)."""
    specs = run_specs(args)
    results = []
    for seed in range(args.seeds):
        print(f"seed {seed}: {', '.join(spec.name for spec in specs)}, interleaved in turns of {args.seconds_per_turn:g} s", flush=True)
        jobs = [(spec, seed, args, data_loader, model_factory, run) for spec in specs]
        records = common.run_interleaved(participant, jobs, [spec.name for spec in specs], "time_to_accuracy")
        for spec in specs:
            record = records[spec.name]
            results.append(record)
            accuracy = f"test accuracy {record['final_accuracy']:.4f}, " if "final_accuracy" in record else ""
            print(f"    {spec.name}: {record['steps']} steps, {record['seconds_per_step']:.3f} s/step, "
                  f"{accuracy}eval loss {record['final_loss']:.4f}", flush=True)
        common.write_json(results_path, {"settings": vars(args), **(extra or {}), "results": results})
    return results


def summarize(results: list[dict]) -> tuple[float | None, list[dict]]:
    """(target accuracy, one row per run)."""
    by_run = group_by_run(results)
    finals = {name: statistics.fmean(r["final_accuracy"] for r in records) for name, records in by_run.items()}
    baselines = [name for name, records in by_run.items() if records[0]["lgp_summary"] is None]
    target = max((finals[name] for name in baselines), default=None)
    rows = []
    for name, records in by_run.items():
        reach = [time_to_reach(record, target) for record in records] if target is not None else []
        rows.append({
            **run_columns(records),
            "final_acc": finals[name],
            "final_acc_per_seed": " / ".join(f"{r['final_accuracy']:.4f}" for r in records),
            "final_loss": statistics.fmean(r["final_loss"] for r in records),
            "final_loss_per_seed": " / ".join(f"{r['final_loss']:.4f}" for r in records),
            "time_to_target_s": statistics.fmean(reach) if reach and None not in reach else None,
            "time_to_target_per_seed": " / ".join("not reached" if t is None else f"{t:.0f}" for t in reach) or None,
            **lgp_columns(records, trainer_seconds_per_step(results)),
        })
    return target, rows


def group_by_run(results: list[dict]) -> dict[str, list[dict]]:
    """run name -> its records (one per seed), in the order the runs first appear."""
    by_run: dict[str, list[dict]] = {}
    for record in results:
        by_run.setdefault(record["run"], []).append(record)
    return by_run


def trainer_seconds_per_step(results: list[dict]) -> dict[int, float]:
    """seed -> seconds per step of the `trainer` run: the reference of the measured cost."""
    return {r["seed"]: r["seconds_per_step"] for r in results if r["run"] == "trainer"}


def run_columns(records: list[dict]) -> dict:
    """The columns every run has, from one run's records (one per seed): name, batch, steps, seconds per step."""
    return {
        "run": records[0]["run"],
        "batch": records[0]["batch_size"],
        "steps": statistics.fmean(r["steps"] for r in records),
        "s_per_step": statistics.fmean(r["seconds_per_step"] for r in records),
        "slowest_step_s": statistics.fmean(r["slowest_step"]["seconds"] for r in records),
    }


def lgp_columns(records: list[dict], reference: dict[int, float]) -> dict:
    """The sampling statistics of one run's records (means over seeds; None for Trainer runs): from
    `lgp_summary()`, and the cost measured here (seconds per step over `reference[seed]`, the trainer run's)."""
    lgp = [record["lgp_summary"] for record in records if record["lgp_summary"] is not None]
    measured = [r["seconds_per_step"] / reference[r["seed"]] if r["seed"] in reference else None for r in records]
    factors = [None if s is None else s["lgp_variance_factor"] for s in (r["lgp_summary"] for r in records)]
    return {
        "final_f": mean_of(lgp, "lgp_control_fraction"),
        "rows_computed": mean_of(lgp, "lgp_trunk_rows_computed"),
        "tokens_computed": mean_of(lgp, "lgp_trunk_tokens_computed"),
        "F": mean_of(lgp, "lgp_variance_factor"),
        "step_cost": mean_of(lgp, "lgp_step_cost"),
        "F_x_cost": mean_or_none([s["lgp_variance_factor"] * s["lgp_step_cost"] for s in lgp
                                  if s["lgp_variance_factor"] is not None and s["lgp_step_cost"] is not None]),
        "cost_vs_trainer": mean_or_none([m for m in measured if m is not None]),
        "F_x_cost_vs_trainer": mean_or_none([f * m for f, m in zip(factors, measured) if f is not None and m is not None]),
        "F_cv_over_F_is": mean_of(lgp, "lgp_predictor_variance_ratio"),
        "predictor_cost": mean_of(lgp, "lgp_predictor_cost"),
        "weight_tokens_computed": mean_of(lgp, "lgp_weight_gradient_tokens_computed"),
        "auto_predicted_F_x_cost": mean_of(lgp, "lgp_predicted_efficiency"),
        "auto_best_f": mean_of(lgp, "lgp_best_fraction"),
        "check": " / ".join(s["lgp_unbiasedness_check"] for s in lgp) or None,
    }


def time_to_reach(record: dict, target: float, key: str = "accuracy", higher_is_better: bool = True) -> float | None:
    """Training seconds of the first evaluation whose `key` is at `target` or better, None if none was."""
    return next((e["seconds"] for e in record["evaluations"] if (e[key] >= target if higher_is_better else e[key] <= target)), None)


def mean_of(summaries: list[dict], key: str) -> float | None:
    return mean_or_none([summary[key] for summary in summaries if summary.get(key) is not None])


def mean_or_none(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


COLUMNS = [
    "run", "batch", "steps", "s_per_step", "slowest_step_s", "final_acc", "final_acc_per_seed", "final_loss",
    "final_loss_per_seed", "time_to_target_s",
    "time_to_target_per_seed", "final_f", "rows_computed", "F", "step_cost", "F_x_cost", "cost_vs_trainer",
    "F_x_cost_vs_trainer", "F_cv_over_F_is", "predictor_cost", "auto_predicted_F_x_cost", "auto_best_f", "check",
]


def report(results: list[dict], args, results_path: Path, title: str, extra: dict | None = None) -> None:
    """Prints the table, adds it to results.json, and writes the two plots next to it."""
    target, rows = summarize(results)
    print(f"\n{title}")
    print(f"target: the best Trainer run's final test accuracy = {common.format_value(target)}")
    print(common.format_table(rows, COLUMNS))
    common.write_json(
        results_path,
        {"settings": vars(args), **(extra or {}), "target_accuracy": target, "summary": rows, "results": results},
    )
    plot_accuracy(results, target, results_path.parent / "accuracy_vs_seconds.png", title)
    plot_lgp_statistics(results, results_path.parent / "lgp_vs_step.png", title)
    print(f"Wrote {results_path}, accuracy_vs_seconds.png and lgp_vs_step.png in {results_path.parent}")


def run_colors(results: list[dict]) -> dict[str, str]:
    names = list(dict.fromkeys(record["run"] for record in results))
    return {name: f"C{i % 10}" for i, name in enumerate(names)}


def plot_accuracy(results: list[dict], target: float | None, path: Path, title: str, key: str = "accuracy") -> None:
    """Each run's evaluations of `key` (test accuracy; "loss" for eval loss) against training seconds."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), layout="tight")
    axes = figure.subplots()
    colors, labelled = run_colors(results), set()
    for record in results:
        points = [(e["seconds"], e[key]) for e in record["evaluations"]]
        label = None if record["run"] in labelled else record["run"]
        labelled.add(record["run"])
        axes.plot(*zip(*points), marker="o", ms=3, color=colors[record["run"]], alpha=0.8, label=label,
                  ls="-" if record["lgp_summary"] is not None else "--")
    if target is not None:
        axes.axhline(target, color="black", lw=0.8, ls=":", label="target (best Trainer run, final)")
    axes.set(xlabel="training seconds (evaluation excluded)", ylabel="test accuracy" if key == "accuracy" else f"eval {key}", title=title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=120)


def plot_lgp_statistics(results: list[dict], path: Path, title: str) -> None:
    """The logged lgp/control_fraction and lgp/variance_factor of every lgp run against step, one line per seed."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.5), layout="tight")
    colors = run_colors(results)
    panels = (
        ("lgp/control_fraction", "control fraction f"),
        ("lgp/variance_factor", "F, variance of the update / full batch's\n(observed steps since the previous log)"),
    )
    for axes, (key, ylabel) in zip(figure.subplots(1, 2), panels):
        labelled = set()
        for record in results:
            points = [(entry["step"], entry[key]) for entry in record["log"] if key in entry]
            if points:
                label = None if record["run"] in labelled else record["run"]
                labelled.add(record["run"])
                axes.plot(*zip(*points), marker=".", ms=3, color=colors[record["run"]], alpha=0.8, label=label)
        axes.set(xlabel="optimizer step", ylabel=ylabel, title=key)
        axes.grid(alpha=0.3)
        if labelled:
            axes.legend(fontsize=8)
        else:
            axes.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=axes.transAxes)
    figure.suptitle(title)
    figure.savefig(path, dpi=120)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    data = common.load_data(args, eval_samples=args.eval_samples)
    print(f"Data: {data.source}, {len(data.train)} training images, {len(data.eval)} test images; "
          f"{common.device_description()}", flush=True)
    results_path = args.output_dir / "results.json"
    loader = functools.partial(common.load_data, args, eval_samples=args.eval_samples)
    results = run_suite(args, loader, functools.partial(common.new_model, data.labels), results_path)
    report(results, args, results_path, f"CIFAR-10 from scratch, {args.budget_seconds:g} s per run")


if __name__ == "__main__":
    main()
