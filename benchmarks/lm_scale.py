#!/usr/bin/env python
"""PredictedGradientTrainer on a GPT-2-small-sized causal LM: step time, peak memory, predictor state, E.

Model: `GPT2LMHeadModel(GPT2Config())` (124 M parameters, vocabulary 50257, tied embeddings), random init, built
from its config (nothing from the Hub). Data: token sequences of a fixed random bigram "language" (Zipf-distributed
successors), so that there is something to learn. Batch `--batch_size` x `--seq_len` tokens, AdamW, lr 3e-4.

Each run trains in a process of its own (so that peak memory is its own), in rounds: A B C ... A B C ...
(`--rounds`), so that slow phases of the machine hit every run alike: `--steps` optimizer steps for `trainer` and
the "auto" runs, `--split_steps` for runs at a fixed f < 1 (slower, and in steady state from the start). Seconds
per step are the mean over the steps after `--warmup_steps`, not the median: under "auto" at f = 1 the observed
pairs carry the observation's cost (`observed` counts the observed steps of a run; the first pair is steps 0 and 1,
and the next comes after the spacing that `auto_observation_budget` sets). `--pretrain_steps N` first trains the
model N steps with Trainer (once, cached under `--output_dir`) and starts every run from it: E after some
training instead of at random init. Runs: `trainer`
(transformers.Trainer), `lgp_<predictor>_fauto` (the library defaults with that predictor) and
`lgp_<predictor>_f<fraction>`. Reported per run (medians over rounds): seconds per step
(StepTimer: on_step_begin to on_step_end), the ratio to Trainer's, peak RSS (VmHWM; on a GPU peak CUDA memory
allocated) and its ratio to Trainer's, the predictor's state (floats held, and the size of `lgp_state.pt` as
written by a checkpoint) against the trainable parameters, the logged overhead, c, E and break-even.

    python benchmarks/lm_scale.py                                  # defaults: about 20 minutes on 2 CPU cores
    python benchmarks/lm_scale.py --runs lgp_ntk_f0.25 lgp_window_f0.25 --pretrain_steps 100 --split_steps 21 --rounds 1
    python benchmarks/lm_scale.py --steps 4 --rounds 1 --n_layer 2 --runs trainer lgp_ntk_fauto   # smoke test

On a GPU the same command runs there (`--bf16` for bf16 autocast).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from lgp_hf import PredictedGradientArguments, PredictedGradientTrainer  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=["trainer", "lgp_ntk_fauto", "lgp_ntk_f0.25", "lgp_window_f0.25"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=31, help="optimizer steps of trainer and the 'auto' runs")
    parser.add_argument("--split_steps", type=int, default=11, help="optimizer steps of the runs at a fixed f < 1")
    parser.add_argument("--pretrain_steps", type=int, default=0, help="Trainer steps before every run (E after training)")
    parser.add_argument("--warmup_steps", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--n_layer", type=int, default=12, help="12: GPT-2 small")
    parser.add_argument("--auto_observation_period", type=int, default=None, help="default: the library's")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--output_dir", default="benchmarks/results/lm_scale")
    parser.add_argument("--run_one", default=None, help=argparse.SUPPRESS)  # internal: one run in this process
    return parser.parse_args(argv)


def bigram_dataset(num_sequences: int, seq_len: int, vocab: int, sequence_seed: int = 0) -> Dataset:
    """Sequences of a fixed random bigram model (each token has 16 successors with Zipf probabilities), drawn with
    `sequence_seed`."""
    successors = torch.randint(0, vocab, (vocab, 16), generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1000 + sequence_seed)
    weights = 1.0 / torch.arange(1, 17, dtype=torch.float)
    tokens = torch.empty(num_sequences, seq_len, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (num_sequences,), generator=generator)
    for position in range(1, seq_len):
        choice = torch.multinomial(weights, num_sequences, replacement=True, generator=generator)
        tokens[:, position] = successors[tokens[:, position - 1], choice]
    return Dataset.from_dict({"input_ids": tokens.numpy(), "labels": tokens.numpy()}).with_format("torch")


def training_settings(args: argparse.Namespace, steps: int) -> dict:
    return dict(
        output_dir=tempfile.mkdtemp(), report_to=[], save_strategy="no", disable_tqdm=True, per_device_train_batch_size=args.batch_size,
        max_steps=steps, learning_rate=3e-4, logging_steps=1, seed=0, bf16=args.bf16, use_cpu=not torch.cuda.is_available(),
    )


def pretrained_model(args: argparse.Namespace, config: GPT2Config) -> GPT2LMHeadModel:
    """GPT-2 at random init, or after `--pretrain_steps` Trainer steps on other sequences of the same language
    (trained once, then loaded from `--output_dir`)."""
    torch.manual_seed(0)
    if not args.pretrain_steps:
        return GPT2LMHeadModel(config)
    folder = Path(args.output_dir) / f"pretrained_l{args.n_layer}_s{args.pretrain_steps}"
    if not (folder / "config.json").exists():
        model = GPT2LMHeadModel(config)
        dataset = bigram_dataset(args.batch_size * args.pretrain_steps, args.seq_len, config.vocab_size, sequence_seed=1)
        trainer = Trainer(model=model, args=TrainingArguments(**training_settings(args, args.pretrain_steps)), train_dataset=dataset)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        model.save_pretrained(folder)
    return GPT2LMHeadModel.from_pretrained(folder)


def run_one(name: str, args: argparse.Namespace) -> dict:
    config = GPT2Config(n_layer=args.n_layer, n_positions=max(1024, args.seq_len))
    model = pretrained_model(args, config)
    steps = args.steps if name == "trainer" or name.endswith("fauto") else args.split_steps
    dataset = bigram_dataset(args.batch_size * (steps + 1), args.seq_len, config.vocab_size)
    base_rss = common.peak_rss_mib()
    settings = training_settings(args, steps)
    timer = common.StepTimer()
    if name == "trainer":
        trainer = Trainer(model=model, args=TrainingArguments(**settings), train_dataset=dataset, callbacks=[timer])
    else:
        spec = common.parse_run(name, args.batch_size)
        extra = {} if args.auto_observation_period is None else {"auto_observation_period": args.auto_observation_period}
        trainer = PredictedGradientTrainer(
            model=model, train_dataset=dataset, callbacks=[timer],
            args=PredictedGradientArguments(**settings, predictor=spec.predictor, control_fraction=str(spec.control_fraction), **extra),
        )
    trainer.remove_callback(PrinterCallback)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    seconds = [step["seconds"] for step in timer.steps[args.warmup_steps :]]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = {
        "run": name, "seconds_per_step": statistics.fmean(seconds), "step_seconds": [s["seconds"] for s in timer.steps],
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else common.peak_rss_mib(),
        "base_mib": base_rss, "trainable_parameters": trainable,
    }
    if isinstance(trainer, PredictedGradientTrainer):
        path = Path(settings["output_dir"]) / "lgp_state.pt"
        torch.save(trainer._lgp_state(), path)
        summary = trainer.lgp_summary()
        logs = [log for log in trainer.state.log_history if "lgp/control_fraction" in log]
        result.update(
            state_fraction=summary["lgp_predictor_state_numel"] / trainable, state_file_mib=path.stat().st_size / 2**20,
            variance_explained=summary["lgp_variance_explained"], break_even=summary["lgp_break_even_variance_explained"],
            cost_ratio=summary["lgp_cost_ratio"], overhead_ratio=summary["lgp_overhead_ratio"],
            overhead_seconds=logs[-1].get("lgp/overhead_seconds") if logs else None, control_fraction=summary["lgp_control_fraction"],
            window=getattr(trainer.predictor, "window_size", None), rank=getattr(trainer.predictor, "rank", None),
            observed=trainer.monitor.totals["observations"],
        )
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.run_one:
        print(json.dumps(run_one(args.run_one, args)))
        return
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if args.pretrain_steps:  # here, so that no run's peak memory includes it
        pretrained_model(args, GPT2Config(n_layer=args.n_layer, n_positions=max(1024, args.seq_len)))
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    results: dict[str, list[dict]] = {name: [] for name in args.runs}
    for round_index in range(args.rounds):
        for name in args.runs:
            completed = subprocess.run(
                [sys.executable, __file__, *forwarded, "--run_one", name], capture_output=True, text=True, env=os.environ.copy()
            )
            if completed.returncode != 0:
                raise RuntimeError(f"run {name} failed:\n{completed.stderr[-3000:]}")
            record = json.loads(completed.stdout.strip().splitlines()[-1])
            results[name].append(record)
            print(f"round {round_index + 1} {name}: {record['seconds_per_step']:.2f} s/step, peak {record['peak_mib']:.0f} MiB", flush=True)
    reference_seconds = statistics.median(r["seconds_per_step"] for r in results["trainer"]) if "trainer" in results else None
    reference_peak = statistics.median(r["peak_mib"] for r in results["trainer"]) if "trainer" in results else None
    rows = []
    for name, records in results.items():
        row = {"run": name}
        for key in ("seconds_per_step", "peak_mib", "state_fraction", "state_file_mib", "overhead_seconds", "overhead_ratio",
                    "cost_ratio", "variance_explained", "break_even", "control_fraction", "window", "rank", "observed"):
            values = [r[key] for r in records if r.get(key) is not None]
            row[key] = statistics.median(values) if values else None
        if reference_seconds:
            row["step_ratio"] = row["seconds_per_step"] / reference_seconds
            row["peak_ratio"] = row["peak_mib"] / reference_peak
        rows.append(row)
    columns = ["run", "seconds_per_step", "step_ratio", "peak_mib", "peak_ratio", "state_fraction", "state_file_mib", "overhead_seconds",
               "cost_ratio", "overhead_ratio", "variance_explained", "break_even", "control_fraction", "window", "rank", "observed"]
    table = common.format_table(rows, columns)
    print(f"\n{common.device_description()}, GPT-2 n_layer={args.n_layer}, batch {args.batch_size} x {args.seq_len} tokens, "
          f"{args.steps} steps (f < 1: {args.split_steps}; {args.warmup_steps} warm-up), {args.pretrain_steps} pre-training steps, "
          f"{args.rounds} rounds\n{table}")
    common.write_json(output / "lm_scale.json", {"settings": vars(args), "results": results, "table": rows})


if __name__ == "__main__":
    main()
