#!/usr/bin/env python
"""Time per optimizer step of PredictedGradientTrainer against transformers.Trainer, and against its floor.

Model and data: the ViT of `examples/run_vit.py` (its default sizes, CIFAR-10 at 32x32) on real images (the
embedded CIFAR-10 subset by default), or with `--model gpt2_small` GPT-2 small from its config (124 M parameters) on
fixed random tokens, `--sequence_length` each; batch size `--batch_size`, the example's optimizer settings (`--bf16`:
bf16 autocast, for a GPU).

Configurations: Trainer; `lgp_f<f>` (PredictedGradientTrainer at control_fraction f) for each of `--fractions`
(default 0.125, 0.25, 0.5, 1); `auto` in `--fractions` adds `lgp_fauto` (control_fraction="auto": it starts at
f = 1 and may lower f at its first decision, after 25 steps, so its median mixes both; it is reported at the f
it ended with). Each k < 1 of `--weight_gradient_keep` adds `lgp_f<f>_keep<k>` for every f: the trunk's linear
layers' weight gradients from a share k of their token rows (`weight_gradient_keep`). `--runs` adds configurations
by run name (`lgp_f0.25_linear`: with the gradient predictor, whose own share of a step the trainer times,
`lgp_predictor_cost`). Every lgp configuration runs with `unbiasedness_check=False`: the check is a one-off cost (an
exact and 32 sampled backwards, at the first step of an explicit f < 1, or mid-run when "auto" first lowers f) that
would land inside one timed step, and this script measures the steady-state step; the time-to-accuracy benchmarks
keep it, as users pay it.

What is timed, and why this way. Each configuration runs `trainer.train()` in the main thread of its own
process, as a user runs it; a TrainerCallback takes the time at `on_step_begin` and `on_step_end` (after
`torch.cuda.synchronize` on a GPU). That interval is what the training loop spends per optimizer step on the
trainer's work: `training_step` (for PredictedGradientTrainer also the draw at the head's input, the trunk's
no-grad forward and its replayed backward on the drawn rows, and the statistics of observed steps), gradient
clipping, the optimizer and scheduler step and `zero_grad`. Timing `trainer.training_step` in a loop on fixed
batches would be more precise but would leave out the work around it that the user also pays for, and a
different code path (no logging state, no step counter driving the trainer's schedules) could flatter the
method. What the interval leaves out, the gap between steps (logging, fetching and transforming the next batch),
does not depend on the trainer; it is measured too (`gap`) and reported as the ratio including the input pipeline.

Interleaving. The configurations and the pass measurements below take turns (A B C ... A B C ...): after
`--steps_per_turn` optimizer steps a callback hands the turn to the next process and waits, outside the timed
interval, so exactly one process computes at a time and slow phases of the machine hit every configuration
alike. No turn starts before every process is set up. The first `--warmup_rounds` rounds are discarded;
statistics are medians over the remaining steps (the mean, which includes occasional expensive steps, is
reported too). Processes rather than threads: PyTorch's intra-op thread pool behaves differently when it is
driven from a secondary Python thread (on a loaded 2-core machine a step there ran 5x faster than the same step
in a main thread), and users train in the main thread.

Floor. In its own process of the same rotation ("pass measurement"), on the same initial model and one fixed
batch of `--batch_size` examples: t_f = the whole model's forward with autograd, t_b = its backward, t_n = the
same forward under torch.no_grad(). c = t_n / (t_f + t_b), and the floor of a step that backpropagates a share f
of the rows through the trunk is f + (1 - f) c, in units of a Trainer step: the no-grad forward on every row,
and a full forward and backward on the drawn ones; it ignores the optimizer step and every overhead of the
method. The f of the floor is f_eff, the share of trunk rows the trainer actually backpropagated
(`lgp_trunk_rows_computed` of `trainer.lgp_summary()`: Poisson sampling draws f n rows in expectation, not
exactly); 1 where nothing was sampled (f = 1, and "auto" while it stays there). The token floor f_tok + (1 - f_tok) c
counts (row, position) pairs instead of rows: f_tok is the share of the replayed blocks' token positions whose
output gradient is not zero (`lgp_trunk_tokens_computed`; a classifier's top block has one per drawn row), whose
taped backwards skip the others. With `weight_gradient_keep` k, the keep floor takes off the weight gradients' token
rows not computed: token floor - f_tok b (1 - k_eff) / 2, b the backward's share of a Trainer step (t_b / (t_f + t_b)),
half of it taken as the linear layers' weight gradients (dW = dY^T X costs what dX = dY W costs), k_eff the share of
token rows with a term whose term was computed (`lgp_weight_gradient_tokens_computed`). The goal: the ratio to
Trainer is at most the row floor + `--goal_margin` (0.03) at every f, and below it where tokens carry no gradient;
the script prints whether it holds per configuration, and with `--half_batch` whether the step is cheaper than the
equal-cost smaller batch's.
`lgp_step_cost` is the trainer's own measured step cost (a sampled optimizer step's time over a plain Trainer
step's, both timed by the trainer itself on the steps it picks; "-" when it measured none in the run). At f < 1
the trainer makes two plain Trainer steps every 200, the second timed as its cost reference (every 25 until it has
timed 3: pairs at steps 3 and 4, with the defaults inside the discarded warm-up round, and 28 and 29); the medians
are robust to those. `lgp_observation_overhead` is the trainer's own measure of an observed step at f = 1 under
"auto" (its time over a plain Trainer step's, less 1).

Memory. Each process holds one configuration, so its peaks do not mix with others': peak RSS (VmHWM) on CPU or
peak CUDA memory allocated on a GPU over the whole run, and the part added by training (peak minus the value
once the model, data and trainer were built).

`--profile` then runs `--profile_steps` steps of PredictedGradientTrainer at f = `--goal_fraction` under cProfile,
enabled only inside `training_step`, and prints the top entries by cumulative and by own time.

Writes `--output_dir`/step_cost.json (settings, every step and pass time, the table) and step_cost.png (ratio to
Trainer against f_eff with the floor; memory); with --profile also profile.txt.

    python benchmarks/step_cost.py                  # defaults: about 5 minutes on 2 CPU cores (6 with --profile)
    python benchmarks/step_cost.py --fractions 0.25 1.0 auto --profile
    python benchmarks/step_cost.py --model gpt2_small --batch_size 4 --fractions auto --rounds 6 --steps_per_turn 5
    python benchmarks/step_cost.py --rounds 2 --steps_per_turn 1 --batch_size 16 --fractions 0.5 1.0   # smoke test
    python benchmarks/step_cost.py --fractions 0.25 0.5 1.0 --weight_gradient_keep 1.0 0.5 0.25   # with token sampling
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import traceback
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, default_data_collator, set_seed

import common
import run_vit
PASSES = "passes"
#: Share of the backward taken as the linear layers' weight gradients, for the keep floor (dW = dY^T X and dX = dY W
#: are products of the same size).
WEIGHT_GRADIENT_SHARE = 0.5


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--batch_size", type=int, default=128, help="Per-device batch size n of every trainer.")
    parser.add_argument(
        "--model", choices=["vit", "gpt2_small"], default="vit",
        help="The example's ViT on CIFAR-10, or GPT-2 small from its config on random tokens (--sequence_length each).",
    )
    parser.add_argument("--sequence_length", type=int, default=128, help="Tokens per example of --model gpt2_small.")
    parser.add_argument(
        "--fractions", type=fraction_argument, nargs="+", default=[0.125, 0.25, 0.5, 1.0],
        help="Control fractions f, or 'auto' (control_fraction='auto', reported at the f it ended with).",
    )
    parser.add_argument(
        "--weight_gradient_keep", type=float, nargs="+", default=[1.0],
        help="Shares k of token rows for the weight gradients (weight_gradient_keep): each k < 1 adds lgp_f<f>_keep<k> for every f.",
    )
    parser.add_argument(
        "--runs", nargs="+", default=[],
        help="Further configurations by run name (benchmarks/common.py), e.g. lgp_f0.25_linear (with the gradient predictor).",
    )
    parser.add_argument("--rounds", type=int, default=8, help="Rounds of the rotation (every configuration once per round).")
    parser.add_argument("--steps_per_turn", type=int, default=4, help="Optimizer steps per configuration per round.")
    parser.add_argument("--warmup_rounds", type=int, default=1, help="First rounds left out of the statistics.")
    parser.add_argument("--goal_margin", type=float, default=0.03, help="Goal: ratio to Trainer at most the row floor plus this.")
    parser.add_argument(
        "--half_batch", action="store_true",
        help="Also time Trainer at half the batch (trainer_b<n/2>), the equal-cost smaller batch a sampled step competes with.",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in every configuration and pass (for a GPU).")
    parser.add_argument("--profile", action="store_true", help="Profile PredictedGradientTrainer.training_step.")
    parser.add_argument("--goal_fraction", type=float, default=0.25, help="Control fraction of the --profile run.")
    parser.add_argument("--profile_steps", type=int, default=25, help="Steps profiled.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", type=Path, default=common.RESULTS_DIR / "step_cost")
    common.add_data_arguments(parser, subset_default=True)
    args = parser.parse_args(argv)
    if not all(0 < keep <= 1 for keep in args.weight_gradient_keep):
        parser.error(f"--weight_gradient_keep {args.weight_gradient_keep}: use numbers in (0, 1].")
    if args.rounds <= args.warmup_rounds:
        parser.error(f"--rounds ({args.rounds}) must exceed --warmup_rounds ({args.warmup_rounds}).")
    return args


def fraction_argument(text: str) -> float | str:
    return text if text == "auto" else float(text)


def lgp_name(fraction, keep: float = 1.0) -> str:
    return common.lgp_run_name(fraction) + ("" if keep >= 1 else f"_keep{keep:g}")


def lgp_spec(fraction, args) -> common.RunSpec:
    """The profiled configuration: at `fraction`, with the smallest `--weight_gradient_keep`."""
    return common.parse_run(lgp_name(fraction, min(args.weight_gradient_keep)), args.batch_size)


def run_specs(args) -> list[common.RunSpec]:
    names = dict.fromkeys(lgp_name(fraction, keep) for keep in args.weight_gradient_keep for fraction in args.fractions)  # once each
    names.update(dict.fromkeys(args.runs))
    if args.half_batch:
        names[f"trainer_b{args.batch_size // 2}"] = None
    return [common.parse_run("trainer", args.batch_size), *(common.parse_run(name, args.batch_size) for name in names)]


def trainer_arguments(spec: common.RunSpec, args, max_steps: int):
    """Constant learning rate, bf16 if asked; no unbiasedness check (the module docstring says why)."""
    return common.training_arguments(
        spec, str(args.output_dir / "trainer_output"), args.seed, max_steps=max_steps, lr_scheduler_type="constant",
        bf16=args.bf16, unbiasedness_check=False,
    )


# ---------------------------------------------------------------- the rotation


class TurnTimer(common.StepTimer):
    """StepTimer that takes part in a Rotation: signals that it is ready and waits for its turn before the first
    step, and hands the turn on after every `steps_per_turn` steps (outside the timed interval) and at the end."""

    def __init__(self, index: int, rotation: common.Rotation, steps_per_turn: int):
        super().__init__()
        self.index, self.rotation, self.steps_per_turn = index, rotation, steps_per_turn

    def on_train_begin(self, args, state, control, **kwargs):
        self.rotation.arrive(self.index)
        self.rotation.wait(self.index)

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if len(self.steps) % self.steps_per_turn == 0 and state.global_step < state.max_steps:
            self.rotation.pass_turn(self.index)
            self.rotation.wait(self.index)
            self.restart_gap()

    def on_train_end(self, args, state, control, **kwargs):
        self.rotation.pass_turn(self.index, finished=True)


def time_passes(model, batch: dict, device: torch.device, bf16: bool) -> dict[str, float]:
    """Seconds of the whole model's forward with autograd, its backward, and the same forward under
    torch.no_grad() (what PredictedGradientTrainer's trunk runs on every row), on `batch`; under bf16 autocast if
    `bf16` (the backward outside it, as Trainer runs it)."""
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    start = common.clock(device)
    with autocast():
        loss = model(**batch).loss
    forward_end = common.clock(device)
    loss.backward()
    backward_end = common.clock(device)
    model.zero_grad(set_to_none=True)
    nograd_start = common.clock(device)
    with torch.no_grad(), autocast():
        model(**batch)
    nograd_end = common.clock(device)
    return {"forward": forward_end - start, "backward": backward_end - forward_end, "nograd_forward": nograd_end - nograd_start}


def measure_passes(model, batch: dict, index: int, rotation: common.Rotation, args) -> list[dict]:
    """`--steps_per_turn` pass timings per turn, for `--rounds` turns of the rotation."""
    device = PartialState().device
    model.to(device).train()
    batch = {key: value.to(device) for key, value in batch.items()}
    records = []
    rotation.arrive(index)
    for round_index in range(args.rounds):
        rotation.wait(index)
        records += [{"round": round_index, **time_passes(model, batch, device, args.bf16)} for _ in range(args.steps_per_turn)]
        rotation.pass_turn(index, finished=round_index == args.rounds - 1)
    return records


def memory_now(device: torch.device) -> float:
    """MiB: peak RSS of this process on CPU, peak CUDA memory allocated on a GPU."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else common.peak_rss_mib()


def model_and_data(args):
    """(model, training set, collator) of `--model`, the model built from its config with `--seed`: the example's ViT
    on CIFAR-10, or GPT-2 small (124 M parameters, `GPT2Config()`) on fixed random tokens, `--sequence_length` per
    example, labels = inputs."""
    if args.model == "vit":
        data = common.load_data(args)
        set_seed(args.seed)
        return common.build_model(data.labels)[0], data.train, run_vit.collate_fn
    tokens = torch.randint(0, GPT2Config().vocab_size, (args.batch_size * args.rounds * args.steps_per_turn, args.sequence_length),
                           generator=torch.Generator().manual_seed(args.seed))
    set_seed(args.seed)
    train = Dataset.from_dict({"input_ids": tokens, "labels": tokens}).with_format("torch")
    return GPT2LMHeadModel(GPT2Config()), train, default_data_collator


def participant(index: int, spec: common.RunSpec | None, args, rotation: common.Rotation) -> None:
    """One process of the rotation: the trainer of `spec`, or the pass measurements when `spec` is None. Every
    process builds the same initial model (same seed)."""
    try:
        model, train, collator = model_and_data(args)
        if spec is None:
            result = {"passes": measure_passes(model, collator([train[i] for i in range(args.batch_size)]), index, rotation, args)}
        else:
            timer = TurnTimer(index, rotation, args.steps_per_turn)
            trainer = common.make_trainer(
                spec, model, trainer_arguments(spec, args, args.rounds * args.steps_per_turn), train, callbacks=[timer],
                data_collator=collator,
            )
            device = trainer.args.device
            before = memory_now(device)
            trainer.train()
            result = {
                "steps": timer.steps,
                "lgp_summary": trainer.lgp_summary() if spec.is_lgp else None,
                "memory_before_mib": before,
                "memory_peak_mib": memory_now(device),
            }
        rotation.messages.put(("result", index, result))
    except BaseException:  # noqa: BLE001 - reported to the parent, which stops the rotation
        rotation.messages.put(("error", index, traceback.format_exc()))
        rotation.abort()


def run_rotation(specs: list[common.RunSpec], args) -> tuple[dict[str, dict], list[dict]]:
    """Runs every configuration and the pass measurements interleaved, one process each; returns (per
    configuration: steps, lgp_summary, memory), pass records."""
    participants = [*specs, None]
    names = [spec.name for spec in specs] + [PASSES]
    results = common.run_interleaved(participant, [(spec, args) for spec in participants], names, "step_cost")
    return {spec.name: results[spec.name] for spec in specs}, results[PASSES]["passes"]


# ---------------------------------------------------------------- profile and report


def profile_training_step(args) -> str:
    """cProfile statistics of PredictedGradientTrainer.training_step over `--profile_steps` steps."""
    spec = lgp_spec(args.goal_fraction, args)
    model, train, collator = model_and_data(args)
    trainer = common.make_trainer(spec, model, trainer_arguments(spec, args, args.profile_steps), train, data_collator=collator)
    profiler = cProfile.Profile()
    training_step = trainer.training_step

    def profiled_training_step(*step_args, **step_kwargs):
        profiler.enable()
        try:
            return training_step(*step_args, **step_kwargs)
        finally:
            profiler.disable()

    trainer.training_step = profiled_training_step
    trainer.train()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    out.write(f"cProfile of {spec.name}: training_step over {args.profile_steps} steps, by cumulative time\n")
    stats.sort_stats("cumulative").print_stats(25)
    out.write("by own time\n")
    stats.sort_stats("tottime").print_stats(25)
    return out.getvalue()


def median_of(records: list[dict], key: str) -> float | None:
    values = [record[key] for record in records if record[key] is not None]
    return statistics.median(values) if values else None


def summarize(specs, runs: dict[str, dict], passes: list[dict], args) -> tuple[list[dict], dict]:
    kept_passes = [record for record in passes if record["round"] >= args.warmup_rounds]
    forward, backward, nograd = (median_of(kept_passes, key) for key in ("forward", "backward", "nograd_forward"))
    cost_ratio = nograd / (forward + backward)
    costs = {
        "forward_s": forward,
        "backward_s": backward,
        "nograd_forward_s": nograd,
        "backward_forward_ratio": backward / forward,
        "cost_ratio_c": cost_ratio,
    }
    skip = args.warmup_rounds * args.steps_per_turn
    rows = []
    for spec in specs:
        run = runs[spec.name]
        steps = run["steps"][skip:]
        summary = run["lgp_summary"] or {}
        # "auto" is reported at the f (and keep) it ended with; Trainer and f = 1 sample nothing
        fraction = summary.get("lgp_control_fraction", 1.0)
        computed = summary.get("lgp_trunk_rows_computed")
        effective = 1.0 if computed is None else computed
        tokens = summary.get("lgp_trunk_tokens_computed")
        effective_tokens = effective if tokens is None else tokens
        token_floor = effective_tokens + (1 - effective_tokens) * cost_ratio
        kept = summary.get("lgp_weight_gradient_tokens_computed")
        effective_keep = 1.0 if kept is None else kept
        backward_share = backward / (forward + backward)
        rows.append({
            "run": spec.name,
            "f": fraction,
            "f_eff": effective,
            "median_step_s": median_of(steps, "seconds"),
            "mean_step_s": statistics.fmean(step["seconds"] for step in steps),
            "median_gap_s": median_of(steps, "gap"),
            "floor": effective + (1 - effective) * cost_ratio,
            "f_tok": effective_tokens,
            "token_floor": token_floor,
            "keep": summary.get("lgp_weight_gradient_keep", 1.0),
            "k_eff": effective_keep,
            "keep_floor": token_floor - effective_tokens * backward_share * WEIGHT_GRADIENT_SHARE * (1 - effective_keep),
            "lgp_step_cost": summary.get("lgp_step_cost"),
            "lgp_predictor_cost": summary.get("lgp_predictor_cost"),
            "lgp_observation_overhead": summary.get("lgp_observation_overhead"),
            "steps_timed": len(steps),
            "peak_mib": run["memory_peak_mib"],
            "train_mib": run["memory_peak_mib"] - run["memory_before_mib"],
        })
    base = rows[0]
    for spec, row in zip(specs, rows):
        row["ratio"] = row["median_step_s"] / base["median_step_s"]
        row["ratio_mean"] = row["mean_step_s"] / base["mean_step_s"]
        gaps = (row["median_gap_s"], base["median_gap_s"])
        row["ratio_with_gap"] = None if None in gaps else (row["median_step_s"] + gaps[0]) / (base["median_step_s"] + gaps[1])
        row["ratio_minus_floor"] = row["ratio"] - row["floor"]
        row["goal"] = None if not spec.is_lgp else ("holds" if row["ratio_minus_floor"] <= args.goal_margin else "NO")
        row["peak_vs_trainer_mib"] = row["peak_mib"] - base["peak_mib"]
    return rows, costs


def goal_lines(specs, rows, args) -> list[str]:
    """Per lgp configuration: its ratio to Trainer against the row floor (+ `--goal_margin`), the token floor, and
    the half batch's ratio where it was timed."""
    half = next((row for spec, row in zip(specs, rows) if not spec.is_lgp and spec.batch_size < args.batch_size), None)
    lines = []
    for spec, row in zip(specs, rows):
        if spec.is_lgp:
            against_half = "" if half is None else (
                f"; {'cheaper' if row['ratio'] < half['ratio'] else 'NOT cheaper'} than the half batch ({half['ratio']:.3f})"
            )
            lines.append(
                f"goal at f = {row['f']:g} ({spec.name}, f_eff {row['f_eff']:.3f}): ratio to Trainer {row['ratio']:.3f}, "
                f"floor {row['floor']:.3f}, ratio - floor {row['ratio_minus_floor']:+.3f}: "
                f"{'HOLDS' if row['goal'] == 'holds' else 'DOES NOT HOLD'} (<= floor + {args.goal_margin:g}); "
                f"token floor {row['token_floor']:.3f} (f_tok {row['f_tok']:.3f})"
                + (f", keep floor {row['keep_floor']:.3f} (k_eff {row['k_eff']:.3f})" if row["keep"] < 1 else "") + against_half
            )
    return lines


def plot(specs, rows, costs, args, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.5), layout="tight")
    ratio_axes, memory_axes = figure.subplots(1, 2)
    grid = [i / 100 for i in range(1, 101)]
    c = costs["cost_ratio_c"]
    ratio_axes.plot(grid, [f + (1 - f) * c for f in grid], color="black", label=f"floor f + (1 - f) c, c = {c:.2f}")
    ratio_axes.plot(grid, [f + (1 - f) * c + args.goal_margin for f in grid], color="black", ls="--", label=f"floor + {args.goal_margin:g} (goal)")
    for keep in sorted({row["keep"] for spec, row in zip(specs, rows) if spec.is_lgp}, reverse=True):
        points = sorted((row["f_eff"], row["ratio"]) for spec, row in zip(specs, rows) if spec.is_lgp and row["keep"] == keep)
        label = "PredictedGradientTrainer, median step" + ("" if keep >= 1 else f", weight_gradient_keep {keep:g}")
        ratio_axes.plot(*zip(*points), marker="o", label=label)
    for spec, row in zip(specs, rows):
        if spec.is_lgp:
            ratio_axes.annotate(spec.name, (row["f_eff"], row["ratio"]), fontsize=7, textcoords="offset points", xytext=(4, -10))
    ratio_axes.axhline(1, color="gray", lw=0.8)
    ratio_axes.set(xlabel="share of trunk rows backpropagated, f_eff", ylabel="step time / Trainer step time",
                   title=f"step cost, batch {args.batch_size}{', bf16' if args.bf16 else ''}")
    ratio_axes.legend(fontsize=8)
    ratio_axes.grid(alpha=0.3)
    names = [row["run"] for row in rows]
    before = [row["peak_mib"] - row["train_mib"] for row in rows]
    memory_axes.bar(names, before, color="lightgray", label="model, data, libraries (before training)")
    memory_axes.bar(names, [row["train_mib"] for row in rows], bottom=before, label="added by training")
    kind = "peak CUDA memory allocated" if torch.cuda.is_available() else "peak RSS"
    memory_axes.set(ylabel=f"{kind} (MiB)", title="memory, one process per configuration")
    memory_axes.legend(fontsize=8)
    memory_axes.tick_params(axis="x", rotation=45, labelsize=8)
    figure.savefig(path, dpi=120)


COLUMNS = [
    "run", "f", "f_eff", "f_tok", "k_eff", "median_step_s", "mean_step_s", "ratio", "ratio_mean", "ratio_with_gap", "floor",
    "token_floor", "keep_floor", "ratio_minus_floor", "goal", "lgp_step_cost", "lgp_predictor_cost", "lgp_observation_overhead", "peak_mib", "train_mib",
    "peak_vs_trainer_mib",
]


def main(argv=None) -> None:
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    specs = run_specs(args)
    print(f"Interleaving {[spec.name for spec in specs]} and the pass measurements, one process each: "
          f"{args.rounds} rounds of {args.steps_per_turn} steps, batch {args.batch_size}{', bf16' if args.bf16 else ''}, "
          f"on {common.device_description()}",
          flush=True)
    runs, passes = run_rotation(specs, args)
    rows, costs = summarize(specs, runs, passes, args)

    print(f"\nPer batch of {args.batch_size} (medians): forward {costs['forward_s']:.4f} s, backward "
          f"{costs['backward_s']:.4f} s (backward/forward {costs['backward_forward_ratio']:.2f}), no-grad forward "
          f"{costs['nograd_forward_s']:.4f} s -> c = {costs['cost_ratio_c']:.3f}")
    print(common.format_table(rows, COLUMNS))
    goals = goal_lines(specs, rows, args)
    print("\n".join(goals))
    common.write_json(
        args.output_dir / "step_cost.json",
        {
            "settings": vars(args),
            "device": common.device_description(),
            "costs": costs,
            "rows": rows,
            "goal": goals,
            "step_times": {name: run["steps"] for name, run in runs.items()},
            "pass_times": passes,
        },
    )
    plot(specs, rows, costs, args, args.output_dir / "step_cost.png")
    print(f"Wrote {args.output_dir / 'step_cost.json'} and {args.output_dir / 'step_cost.png'}")
    if args.profile:
        profile = profile_training_step(args)
        print(profile)
        (args.output_dir / "profile.txt").write_text(profile)
        print(f"Wrote {args.output_dir / 'profile.txt'}")


if __name__ == "__main__":
    main()
