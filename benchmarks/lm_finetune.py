#!/usr/bin/env python
"""Language-model fine-tuning: a byte-level GPT-2 pre-trained on tinyshakespeare, fine-tuned to answer a speaker's turn.

Pre-training: transformers.Trainer trains the GPT-2 of `--model_config` (default: 4 layers, hidden size 128, 4 heads,
context 256, no dropout; 0.86 M parameters) from scratch on the training part of the text, cut into blocks of the
context length, with the byte-level tokenizer of `examples/run_clm.py` (259 tokens), for `--pretrain_steps` (1000)
steps of batch `--pretrain_batch_size` (16) at `--pretrain_learning_rate` (1e-3, cosine after 5 % warm-up): a step
count, not seconds, so that the checkpoint does not depend on the machine's load. It is saved under `--output_dir` in
a folder named by these settings (`pretrained_<text>_held<share>_<steps>steps_b<batch>_lr<lr>_seed<seed>_config<hash
of --model_config>`, with `pretrain.json`: the settings, seconds, held-out loss) and reused by later calls with the
same settings.

Fine-tuning (supervised, on prompt/response pairs made from the same text): the text's turns (blocks separated by
a blank line, "SPEAKER:\\n" then the speech) are paired with the turn that follows: prompt = a turn and the blank
line, at most `--max_prompt_length` bytes (its end kept), response = the next turn with its speaker's name and the
end-of-sequence token, cut so that the pair has at most `--max_length` bytes. The loss is the next-token
cross-entropy on the response's tokens only: the prompt's labels are -100, and so is the padding (to the longest
pair of a batch). The last `--held_out` share of the turns (a contiguous stretch of the plays, never seen in
pre-training either) gives the held-out pairs: the eval loss is measured on a fixed random `--eval_samples` of them.
Full fine-tuning by default; `--lora`: peft LoRA (rank `--lora_rank`, alpha `--lora_alpha`, no dropout) on the
attention and MLP projections (c_attn, c_proj, c_fc), the rest frozen.

The race is `time_to_accuracy.py`'s, on the eval loss: every run starts from the checkpoint and trains for
`--budget_seconds` (150) of training time, evaluated every `--eval_every_seconds` (50) and at the end, the runs of a
seed interleaved in turns of `--seconds_per_turn` (`common.run_interleaved`), `--seeds` 2. Runs (`--runs`; run names
of `common.parse_run`): default trainer (batch `--batch_size` 16), trainer_b8 (the equal-cost smaller batch),
lgp_fauto (the library's defaults), lgp_f<f> for each of `--fractions` (0.25, 0.5). Learning rate `--learning_rate`
(default 3e-4; 1e-3 with --lora), constant after `--warmup_steps` 10.

Reported per run: steps, seconds per step, the eval loss (mean and per seed), the training seconds to reach the best
Trainer run's mean final eval loss, and the sampling statistics of `time_to_accuracy.lgp_columns` (final f, rows and
token positions backpropagated, F, the trainer's step cost, F x cost, the measured cost against `trainer`).
Writes `--output_dir` (benchmarks/results/lm_finetune)/results.json, loss_vs_seconds.png and lgp_vs_step.png
(with `--lora`: results_lora.json, ..._lora.png; the pre-trained checkpoint is shared).

    python benchmarks/lm_finetune.py             # 1000 pre-training steps once + 5 runs x 2 seeds x 150 s
    python benchmarks/lm_finetune.py --lora
    python benchmarks/lm_finetune.py --pretrain_steps 20 --seeds 1 --budget_seconds 5 --eval_every_seconds 3 \\
        --eval_samples 32 --runs trainer lgp_f0.5 lgp_fauto --output_dir /tmp/smoke/lm_finetune     # smoke test
"""

from __future__ import annotations

import functools
import hashlib
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, default_data_collator, set_seed

import common
import time_to_accuracy

sys.path.insert(0, str(common.REPO_ROOT / "examples"))
import run_clm  # noqa: E402  (examples/ is not a package)

PRETRAIN_RECORD = "pretrain.json"
#: The default model: GPT-2 from its config with these settings, dropout off (the rows' gradients are then
#: deterministic, and the offline variance measurement sees the trainer's gradients).
MODEL_CONFIG = "n_embd=128,n_layer=4,n_head=4,n_positions=256,resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0"
#: GPT-2's attention (c_attn, attn.c_proj) and MLP (c_fc, mlp.c_proj) projections, transformers' Conv1D (x W + b).
LORA_MODULES = ["c_attn", "c_proj", "c_fc"]
LEARNING_RATE = {"full": 3e-4, "lora": 1e-3}
IGNORE = -100  # labels of the prompt and the padding: no loss


def build_parser():
    parser = time_to_accuracy.race_parser(__doc__.split("\n\n")[0])
    group = parser.add_argument_group("data")
    group.add_argument("--text_file", type=Path, default=Path(run_clm.DEFAULT_TRAIN_FILE), help="The text (tinyshakespeare).")
    group.add_argument("--held_out", type=float, default=0.1, help="Share of the turns (the text's end) held out.")
    group.add_argument("--max_length", type=int, default=256, help="Bytes per pair at most (the model's context).")
    group.add_argument("--max_prompt_length", type=int, default=128, help="Bytes of a prompt at most (its end kept).")
    group = parser.add_argument_group("model and pre-training")
    group.add_argument("--model_config", default=MODEL_CONFIG, help="GPT-2 config settings, 'key=value,...'.")
    group.add_argument("--pretrain_steps", type=int, default=1000, help="Optimizer steps of the pre-training.")
    group.add_argument("--pretrain_batch_size", type=int, default=16, help="Blocks of the context length per step.")
    group.add_argument("--pretrain_learning_rate", type=float, default=1e-3)
    group.add_argument("--pretrain_seed", type=int, default=0)
    group = parser.add_argument_group("LoRA")
    group.add_argument("--lora", action="store_true", help="Fine-tune peft LoRA adapters on the projections instead.")
    group.add_argument("--lora_rank", type=int, default=8)
    group.add_argument("--lora_alpha", type=float, default=16.0)
    parser.set_defaults(
        output_dir=common.RESULTS_DIR / "lm_finetune", batch_size=16, budget_seconds=150.0, eval_every_seconds=50.0,
        eval_samples=512, learning_rate=None, warmup_steps=10,
    )
    return parser


def parse_args(argv=None, parser=None):
    """`parser`'s (default `build_parser()`'s) arguments, the learning rate resolved (full or LoRA's default)."""
    args = (parser or build_parser()).parse_args(argv)
    if args.learning_rate is None:
        args.learning_rate = LEARNING_RATE["lora" if args.lora else "full"]
    return args


# ---------------------------------------------------------------- data


def split_turns(text: str, held_out: float) -> tuple[list[str], list[str]]:
    """The text's turns (blocks separated by a blank line), cut into (training, held-out): the last `held_out`
    share of the turns is held out, a contiguous stretch of the text."""
    turns = [turn.strip("\n") for turn in text.split("\n\n") if turn.strip()]
    cut = round(len(turns) * (1 - held_out))
    return turns[:cut], turns[cut:]


def pairs_dataset(turns: list[str], tokenizer, max_length: int, max_prompt_length: int) -> Dataset:
    """One pair per two consecutive turns: input_ids = prompt + response, labels = IGNORE on the prompt and the
    response's ids on the response (the model shifts them: each response token is predicted from all before it)."""
    input_ids, labels = [], []
    for prompt, response in zip(turns, turns[1:]):
        prompt_ids = tokenizer(prompt + "\n\n", add_special_tokens=False)["input_ids"][-max_prompt_length:]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        response_ids = response_ids[: max_length - len(prompt_ids)]
        input_ids.append(prompt_ids + response_ids)
        labels.append([IGNORE] * len(prompt_ids) + response_ids)
    return Dataset.from_dict({"input_ids": input_ids, "labels": labels})


def collate_pairs(examples: list[dict], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Pads to the longest pair on the right: input ids `pad_token_id`, labels IGNORE, attention mask 0."""
    length = max(len(example["input_ids"]) for example in examples)
    batch = {
        "input_ids": torch.full((len(examples), length), pad_token_id),
        "attention_mask": torch.zeros(len(examples), length, dtype=torch.long),
        "labels": torch.full((len(examples), length), IGNORE),
    }
    for row, example in enumerate(examples):
        size = len(example["input_ids"])
        batch["input_ids"][row, :size] = torch.tensor(example["input_ids"])
        batch["attention_mask"][row, :size] = 1
        batch["labels"][row, :size] = torch.tensor(example["labels"])
    return batch


@dataclass
class PairData:
    train: Dataset  # prompt/response pairs of the training turns
    eval: Dataset  # a fixed random subset of the held-out pairs
    source: str


def load_pairs(args) -> PairData:
    """The fine-tuning pairs: every pair of the training turns, `--eval_samples` held-out ones (seed 0)."""
    train_turns, held_out_turns = split_turns(args.text_file.read_text(), args.held_out)
    tokenizer = run_clm.byte_tokenizer()
    train = pairs_dataset(train_turns, tokenizer, args.max_length, args.max_prompt_length)
    held_out = pairs_dataset(held_out_turns, tokenizer, args.max_length, args.max_prompt_length).shuffle(seed=0)
    return PairData(train, held_out.select(range(min(args.eval_samples, len(held_out)))), str(args.text_file))


# ---------------------------------------------------------------- model and pre-training


def pretrained_checkpoint(args) -> Path:
    """The pre-trained checkpoint for these settings: reused when present, trained and saved otherwise."""
    config = hashlib.sha1(args.model_config.encode()).hexdigest()[:8]  # the full settings are in pretrain.json
    directory = args.output_dir / (
        f"pretrained_{args.text_file.parent.name}-{args.text_file.stem}_held{args.held_out:g}_{args.pretrain_steps}steps_"
        f"b{args.pretrain_batch_size}_lr{args.pretrain_learning_rate:g}_seed{args.pretrain_seed}_config{config}"
    )
    if (directory / "model.safetensors").is_file():
        record = json.loads((directory / PRETRAIN_RECORD).read_text())
        print(f"Reusing the pre-trained checkpoint {directory} ({record['steps']} steps, held-out loss "
              f"{record['held_out_loss']:.4f})", flush=True)
        return directory
    train_turns, held_out_turns = split_turns(args.text_file.read_text(), args.held_out)
    tokenizer = run_clm.byte_tokenizer()
    set_seed(args.pretrain_seed)
    model = run_clm.build_model(run_clm.ModelArguments(config_overrides=args.model_config), tokenizer)
    block_size = model.config.n_positions

    def blocks(turns: list[str]) -> Dataset:
        ids = tokenizer("\n\n".join(turns) + "\n\n", add_special_tokens=False)
        return Dataset.from_dict(run_clm.group_texts({key: [value] for key, value in ids.items()}, block_size))

    train, held_out = blocks(train_turns), blocks(held_out_turns)
    print(f"Pre-training a GPT-2 of {model.num_parameters() / 1e6:.2f} M parameters ({args.model_config}) on "
          f"{len(train)} blocks of {block_size} bytes for {args.pretrain_steps} steps", flush=True)
    spec = common.parse_run("trainer", args.pretrain_batch_size)
    training_args = common.training_arguments(
        spec, str(directory), args.pretrain_seed, defaults=run_clm.TRAINING_DEFAULTS, max_steps=args.pretrain_steps,
        learning_rate=args.pretrain_learning_rate, warmup_steps=0.05, logging_steps=args.logging_steps,
    )
    trainer = common.make_trainer(spec, model, training_args, train, held_out, data_collator=default_data_collator,
                                  compute_metrics=None)
    seconds = trainer.train().metrics["train_runtime"]
    record = {
        "text": str(args.text_file),
        "held_out": args.held_out,
        "model_config": args.model_config,
        "parameters": model.num_parameters(),
        "batch_size": args.pretrain_batch_size,
        "learning_rate": args.pretrain_learning_rate,
        "steps": trainer.state.global_step,
        "training_seconds": seconds,
        "held_out_loss": trainer.evaluate()["eval_loss"],
    }
    print(f"    {record['steps']} steps, held-out loss {record['held_out_loss']:.4f}", flush=True)
    # model.safetensors last: its presence marks a complete checkpoint.
    common.write_json(directory / PRETRAIN_RECORD, record)
    tokenizer.save_pretrained(directory)
    trainer.save_model(str(directory))
    return directory


def new_model(checkpoint: str, lora_rank: int | None = None, lora_alpha: float = 16.0):
    """The pre-trained GPT-2, with peft LoRA adapters on `LORA_MODULES` (the rest frozen) when `lora_rank` is set.
    Call `transformers.set_seed` first (LoRA's A matrices are drawn)."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    if lora_rank is None:
        return model
    import peft

    config = peft.LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=LORA_MODULES,
                             fan_in_fan_out=True, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def pretrained_model_factory(args, checkpoint: Path):
    """`new_model` for these settings, picklable (for the race's spawned processes)."""
    return functools.partial(new_model, str(checkpoint), args.lora_rank if args.lora else None, args.lora_alpha)


# ---------------------------------------------------------------- the race


def run_one(spec: common.RunSpec, seed: int, data: PairData, args, model_factory, index=None, rotation=None) -> dict:
    """`time_to_accuracy.run_one` for the pairs: the same budget, turns and record, the eval loss the metric."""
    set_seed(seed)
    model = model_factory()
    training_args = common.training_arguments(
        spec, str(args.output_dir / "trainer_output"), seed, defaults=run_clm.TRAINING_DEFAULTS,
        **time_to_accuracy.budget_settings(args),
    )

    def make_trainer(callbacks):
        return common.make_trainer(spec, model, training_args, data.train, data.eval, callbacks,
                                   data_collator=collate_pairs, compute_metrics=None)

    return time_to_accuracy.train_for_budget(spec, seed, args, make_trainer, ("loss",), index, rotation)


COLUMNS = [
    "run", "batch", "steps", "s_per_step", "slowest_step_s", "final_loss", "final_loss_per_seed", "time_to_target_s",
    "time_to_target_per_seed", "final_f", "rows_computed", "tokens_computed", "weight_tokens_computed", "F", "step_cost", "F_x_cost",
    "cost_vs_trainer", "F_x_cost_vs_trainer", "auto_predicted_F_x_cost", "auto_best_f", "check",
]


def summarize(results: list[dict]) -> tuple[float | None, list[dict]]:
    """(target: the best Trainer run's mean final eval loss, one row per run)."""
    by_run = time_to_accuracy.group_by_run(results)
    finals = {name: statistics.fmean(r["final_loss"] for r in records) for name, records in by_run.items()}
    target = min((finals[name] for name, records in by_run.items() if records[0]["lgp_summary"] is None), default=None)
    rows = []
    for name, records in by_run.items():
        reach = [time_to_accuracy.time_to_reach(r, target, "loss", higher_is_better=False) for r in records] if target is not None else []
        rows.append({
            **time_to_accuracy.run_columns(records),
            "final_loss": finals[name],
            "final_loss_per_seed": " / ".join(f"{r['final_loss']:.4f}" for r in records),
            "time_to_target_s": statistics.fmean(reach) if reach and None not in reach else None,
            "time_to_target_per_seed": " / ".join("not reached" if t is None else f"{t:.0f}" for t in reach) or None,
            **time_to_accuracy.lgp_columns(records, time_to_accuracy.trainer_seconds_per_step(results)),
        })
    return target, rows


def report(results: list[dict], args, results_path: Path, title: str, extra: dict) -> None:
    """Prints the table, adds it to the results file, and writes the two plots next to it."""
    target, rows = summarize(results)
    print(f"\n{title}")
    print(f"target: the best Trainer run's mean final eval loss = {common.format_value(target)}")
    print(common.format_table(rows, COLUMNS))
    common.write_json(results_path, {"settings": vars(args), **extra, "target_loss": target, "summary": rows, "results": results})
    tag = "_lora" if args.lora else ""
    time_to_accuracy.plot_accuracy(results, target, results_path.parent / f"loss_vs_seconds{tag}.png", title, key="loss")
    time_to_accuracy.plot_lgp_statistics(results, results_path.parent / f"lgp_vs_step{tag}.png", title)
    print(f"Wrote {results_path}, loss_vs_seconds{tag}.png and lgp_vs_step{tag}.png in {results_path.parent}")


def main(argv=None) -> None:
    args = parse_args(argv)
    checkpoint = pretrained_checkpoint(args)
    data = load_pairs(args)
    mode = f"LoRA (rank {args.lora_rank}) on {', '.join(LORA_MODULES)}" if args.lora else "full fine-tuning"
    print(f"Fine-tuning on {data.source}'s turns ({mode}): {len(data.train)} training pairs, {len(data.eval)} held-out "
          f"pairs; {common.device_description()}", flush=True)
    extra = {
        "pretraining": {"checkpoint": str(checkpoint), **json.loads((checkpoint / PRETRAIN_RECORD).read_text())},
        "fine_tuning": mode,
    }
    results_path = args.output_dir / f"results{'_lora' if args.lora else ''}.json"
    loader = functools.partial(load_pairs, args)
    results = time_to_accuracy.run_suite(args, loader, pretrained_model_factory(args, checkpoint), results_path, extra, run=run_one)
    title = f"tinyshakespeare turns, {mode}, from {args.pretrain_steps} pre-training steps, {args.budget_seconds:g} s per run"
    report(results, args, results_path, title, extra)


if __name__ == "__main__":
    main()
