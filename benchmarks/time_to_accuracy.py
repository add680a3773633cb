#!/usr/bin/env python
"""Test accuracy against training time: PredictedGradientTrainer and transformers.Trainer at equal wall-clock budgets.

Every run trains the ViT of `examples/run_vit.py` from scratch (from the same initial weights for a given seed)
on CIFAR-10 for `--budget_seconds` of training time, evaluating on `--eval_samples` test images every
`--eval_every_seconds` and at the end (`common.TrainingBudget`; evaluation time is not counted in the budget).
Runs go one after the other in this process, never two at once, seeds in the outer loop.

Runs (`--runs`; the default is all of them for `--fractions` and `--predictors`):
  trainer                 transformers.Trainer at `--batch_size`
  trainer_b<n>            transformers.Trainer at batch size n; the defaults add n = each control micro-batch size
                          round(f * batch_size), the fair baseline (the same number of full backward examples per step)
  lgp_<predictor>_f<f>    PredictedGradientTrainer with that predictor and control fraction
  lgp_<predictor>_fauto   PredictedGradientTrainer at control_fraction="auto" (the library's default); the
                          defaults add it for the first of `--predictors`
  lgp_..._k<K>_m<m>       either lgp name with options: predictor_fit_chunks K, predictor_window_size m
                          (`common.RUN_OPTIONS`; _mem<f>: predictor_memory_fraction), e.g. lgp_window_fauto_k32_m128_mem2

All runs use the example's optimizer settings (AdamW, weight decay 0.05) at `--learning_rate` for every batch
size, constant after `--warmup_steps` warm-up steps (a schedule over a fixed number of steps would differ
between runs that reach different step counts in the same time).

Reported per run: time to reach the target accuracy, the best Trainer run's final test accuracy (mean over seeds),
per seed and as mean when every seed reached it; final accuracy (mean and per seed); steps and seconds per
step; the measured cost ratio c and predictor overhead o, the per-example variance explained with its break-even, the mean (batch) alignment and the final control
fraction (`trainer.lgp_summary()`). Plots: test accuracy against training seconds (accuracy_vs_seconds.png) and
`lgp/variance_explained` with `lgp/break_even_variance_explained` against step (alignment_vs_step.png). results.json holds every evaluation and the lgp log history, and is rewritten after
each run, so an interrupted suite keeps what it finished.

    python benchmarks/time_to_accuracy.py       # 10 runs x 2 seeds x 90 s: about 42 minutes on 2 CPU cores
    python benchmarks/time_to_accuracy.py --runs trainer lgp_ntk_f0.25 --budget_seconds 600 --seeds 3
    python benchmarks/time_to_accuracy.py --subset --seeds 1 --budget_seconds 5 --eval_every_seconds 2 \\
        --eval_samples 100 --batch_size 16 --runs trainer lgp_ntk_f0.25      # smoke test
"""

from __future__ import annotations

import argparse
import gc
import statistics
from pathlib import Path

from transformers import set_seed

import common
from lgp_hf.estimator import control_size

#: Training stops on the time budget; this only has to be out of reach.
MAX_STEPS = 10**7


def build_parser(description: str = __doc__.split("\n\n")[0]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=128, help="Per-device batch size of `trainer` and lgp runs.")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5], help="Control fractions of the default runs.")
    parser.add_argument("--predictors", nargs="+", default=["ntk", "window", "zero"], help="Predictors of the default runs.")
    parser.add_argument(
        "--runs",
        nargs="+",
        default=None,
        help="Run names: trainer, trainer_b<batch size>, lgp_<predictor>_f<fraction>, lgp_<predictor>_fauto, either lgp name "
        "followed by options _k<chunks>_m<window>_mem<memory fraction> (e.g. lgp_window_f0.25_k32_m128_mem2). Default: "
        "trainer, trainer_b<n> for each control micro-batch size n, lgp_<p>_f<f> for every --predictors p and "
        "--fractions f, and lgp_<first predictor>_fauto.",
    )
    parser.add_argument("--seeds", type=int, default=2, help="Seeds 0 .. seeds-1 per run.")
    parser.add_argument("--budget_seconds", type=float, default=90.0, help="Training seconds per run (evaluation excluded).")
    parser.add_argument("--eval_every_seconds", type=float, default=30.0, help="Training seconds between evaluations.")
    parser.add_argument("--eval_samples", type=int, default=2000, help="Test images per evaluation (a fixed random subset).")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--warmup_steps", type=int, default=20, help="Linear warm-up steps, then a constant rate.")
    parser.add_argument("--logging_steps", type=int, default=10, help="Steps between log entries (and lgp/* statistics).")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in every run (TrainingArguments.bf16; for a GPU).")
    parser.add_argument("--output_dir", type=Path, default=common.RESULTS_DIR / "time_to_accuracy")
    common.add_data_arguments(parser, subset_default=False)
    return parser


def run_specs(args) -> list[common.RunSpec]:
    if args.runs is not None:
        names = args.runs
    else:
        control_sizes = dict.fromkeys(control_size(args.batch_size, f) for f in args.fractions)
        names = ["trainer", *(f"trainer_b{size}" for size in control_sizes if size != args.batch_size)]
        names += [common.lgp_run_name(predictor, f) for predictor in args.predictors for f in args.fractions]
        names.append(common.lgp_run_name(args.predictors[0], "auto"))
    return [common.parse_run(name, args.batch_size) for name in names]


def run_one(spec: common.RunSpec, seed: int, data: common.ImageData, args, model_init) -> dict:
    """Trains `model_init()` (called after `set_seed(seed)`) with `spec` for the time budget; returns the record."""
    set_seed(seed)
    model = model_init()
    budget = common.TrainingBudget(args.budget_seconds, args.eval_every_seconds)
    training_args = common.training_arguments(
        spec,
        str(args.output_dir / "trainer_output"),
        seed,
        max_steps=MAX_STEPS,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=args.warmup_steps,
        logging_steps=args.logging_steps,
        bf16=args.bf16,
    )
    trainer = common.make_trainer(spec, model, training_args, data.train, data.eval, callbacks=[budget])
    trainer.train()
    steps = trainer.state.global_step
    log = [
        {key: value for key, value in entry.items() if key == "step" or key == "loss" or key.startswith("lgp/")}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    return {
        "run": spec.name,
        "seed": seed,
        "batch_size": spec.batch_size,
        "control_size": spec.control_size,
        "steps": steps,
        "training_seconds": budget.training_seconds,
        "seconds_per_step": budget.training_seconds / steps,
        "evaluations": [{key: entry[key] for key in ("seconds", "step", "accuracy")} for entry in budget.evaluations],
        "final_accuracy": budget.evaluations[-1]["accuracy"],
        "lgp_summary": trainer.lgp_summary() if spec.is_lgp else None,
        "log": log,
    }


def run_suite(args, data: common.ImageData, model_init, results_path: Path, extra: dict | None = None) -> list[dict]:
    """Every run of `run_specs(args)` for every seed, one at a time; results.json is rewritten after each."""
    specs = run_specs(args)
    results = []
    for seed in range(args.seeds):
        for spec in specs:
            print(f"[{len(results) + 1}/{len(specs) * args.seeds}] {spec.name}, seed {seed}", flush=True)
            record = run_one(spec, seed, data, args, model_init)
            results.append(record)
            print(f"    {record['steps']} steps, {record['seconds_per_step']:.3f} s/step, "
                  f"test accuracy {record['final_accuracy']:.4f}", flush=True)
            common.write_json(results_path, {"settings": vars(args), "data": data.source, **(extra or {}), "results": results})
            gc.collect()
    return results


def summarize(results: list[dict]) -> tuple[float | None, list[dict]]:
    """(target accuracy, one row per run)."""
    by_run: dict[str, list[dict]] = {}
    for record in results:
        by_run.setdefault(record["run"], []).append(record)
    finals = {name: statistics.fmean(r["final_accuracy"] for r in records) for name, records in by_run.items()}
    baselines = [name for name, records in by_run.items() if records[0]["lgp_summary"] is None]
    target = max((finals[name] for name in baselines), default=None)
    rows = []
    for name, records in by_run.items():
        reach = [time_to_reach(record, target) for record in records] if target is not None else []
        lgp = [record["lgp_summary"] for record in records if record["lgp_summary"] is not None]
        rows.append({
            "run": name,
            "batch": records[0]["batch_size"],
            "full_bwd_examples": records[0]["control_size"],
            "steps": statistics.fmean(r["steps"] for r in records),
            "s_per_step": statistics.fmean(r["seconds_per_step"] for r in records),
            "final_acc": finals[name],
            "final_acc_per_seed": " / ".join(f"{r['final_accuracy']:.4f}" for r in records),
            "time_to_target_s": statistics.fmean(reach) if reach and None not in reach else None,
            "time_to_target_per_seed": " / ".join("not reached" if t is None else f"{t:.0f}" for t in reach) or None,
            "cost_ratio": mean_of(lgp, "lgp_cost_ratio"),
            "overhead": mean_of(lgp, "lgp_overhead_ratio"),
            "variance_explained": mean_of(lgp, "lgp_variance_explained"),
            "break_even_ve": mean_of(lgp, "lgp_break_even_variance_explained"),
            "mean_alignment": mean_of(lgp, "lgp_mean_alignment"),
            "final_f": mean_of(lgp, "lgp_control_fraction"),
        })
    return target, rows


def time_to_reach(record: dict, target: float) -> float | None:
    """Training seconds of the first evaluation at or above `target`, None if none was."""
    return next((e["seconds"] for e in record["evaluations"] if e["accuracy"] >= target), None)


def mean_of(summaries: list[dict], key: str) -> float | None:
    values = [summary[key] for summary in summaries if summary[key] is not None]
    return statistics.fmean(values) if values else None


COLUMNS = [
    "run", "batch", "full_bwd_examples", "steps", "s_per_step", "final_acc", "final_acc_per_seed",
    "time_to_target_s", "time_to_target_per_seed", "cost_ratio", "overhead", "variance_explained", "break_even_ve",
    "mean_alignment", "final_f",
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
    plot_alignment(results, results_path.parent / "alignment_vs_step.png", title)
    print(f"Wrote {results_path}, accuracy_vs_seconds.png and alignment_vs_step.png in {results_path.parent}")


def run_colors(results: list[dict]) -> dict[str, str]:
    names = list(dict.fromkeys(record["run"] for record in results))
    return {name: f"C{i % 10}" for i, name in enumerate(names)}


def plot_accuracy(results: list[dict], target: float | None, path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), layout="tight")
    axes = figure.subplots()
    colors, labelled = run_colors(results), set()
    for record in results:
        points = [(e["seconds"], e["accuracy"]) for e in record["evaluations"]]
        label = None if record["run"] in labelled else record["run"]
        labelled.add(record["run"])
        axes.plot(*zip(*points), marker="o", ms=3, color=colors[record["run"]], alpha=0.8, label=label,
                  ls="-" if record["lgp_summary"] is not None else "--")
    if target is not None:
        axes.axhline(target, color="black", lw=0.8, ls=":", label="target (best Trainer run, final)")
    axes.set(xlabel="training seconds (evaluation excluded)", ylabel="test accuracy", title=title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=120)


def plot_alignment(results: list[dict], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), layout="tight")
    axes = figure.subplots()
    colors, labelled = run_colors(results), set()
    for record in results:
        for key, style, suffix in (("lgp/variance_explained", "-", "variance explained"), ("lgp/break_even_variance_explained", "--", "break-even")):
            points = [(entry["step"], entry[key]) for entry in record["log"] if key in entry]
            if points:
                label = f"{record['run']} {suffix}"
                axes.plot(*zip(*points), ls=style, color=colors[record["run"]], alpha=0.8, label=None if label in labelled else label)
                labelled.add(label)
    axes.set(
        xlabel="optimizer step",
        ylabel="per-example variance explained",
        title=f"{title}\nlgp/variance_explained (per example, from pairs of control batches) and its break-even\n"
        "(at f = 1, under auto: the cost ratio c, above which lowering f pays)",
    )
    axes.grid(alpha=0.3)
    if labelled:
        axes.legend(fontsize=7)
    else:
        axes.text(0.5, 0.5, "no lgp/variance_explained logged", ha="center", va="center", transform=axes.transAxes)
    figure.savefig(path, dpi=120)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    data = common.load_data(args, eval_samples=args.eval_samples)
    print(f"Data: {data.source}, {len(data.train)} training images, {len(data.eval)} test images; "
          f"{common.device_description()}", flush=True)
    results_path = args.output_dir / "results.json"
    results = run_suite(args, data, lambda: common.build_model(data.labels)[0], results_path)
    report(results, args, results_path, f"CIFAR-10 from scratch, {args.budget_seconds:g} s per run")


if __name__ == "__main__":
    main()
