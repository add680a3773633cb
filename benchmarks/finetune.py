#!/usr/bin/env python
"""The fine-tuning regime: a ViT pre-trained on CIFAR-10, fine-tuned with a new head on vehicles against animals.

Pre-training: transformers.Trainer trains the example's ViT from scratch on all ten CIFAR-10 classes for
`--pretrain_seconds` of training time at `--pretrain_learning_rate` (batch `--batch_size`), and saves it under
`--output_dir` in a folder named by the data, seconds and seed (`pretrained_<data>_<seconds>s_seed<seed>`, with
`pretrain.json`: steps, seconds, test accuracy on the ten classes, batch size, learning rate, bf16). A later call with
the same data, seconds and seed reuses that checkpoint instead of training again (it prints the settings it was
trained with).

Fine-tuning: a binary task the pre-trained trunk already separates well, so that runs reach high accuracy and
differ in how fast they get there: vehicles (airplane 0, automobile 1, ship 8, truck 9) against animals (the
other six classes), relabelled 1 and 0 in the training and test splits alike (`common.VEHICLES_VS_ANIMALS`; 40 %
vehicles, so always answering "animal" scores 0.6). Every run starts from the checkpoint with a new 2-way head
(config num_labels 2, id2label {0: 'animal', 1: 'vehicle'}; the classifier initialised afresh for each seed) and
trains the whole model. The suite is `time_to_accuracy.py`'s: the same options, run names (default: trainer,
trainer_b<batch/2>, lgp_fauto, lgp_f0.25, lgp_f0.5), table and plots; defaults here: 60 s per run, evaluations
every 20 s, learning rate `--learning_rate` 3e-4.

Writes `--output_dir` (benchmarks/results/finetune)/results.json (with the pre-training record),
accuracy_vs_seconds.png and lgp_vs_step.png.

    python benchmarks/finetune.py        # 300 s pre-training once + 5 runs x 2 seeds x 60 s: about 25 minutes on 2 CPU cores
    python benchmarks/finetune.py --subset --pretrain_seconds 5 --seeds 1 --budget_seconds 5 --eval_every_seconds 3 \\
        --eval_samples 64 --batch_size 16 --runs trainer lgp_f0.5 lgp_fauto   # smoke test
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from transformers import set_seed

import common
import time_to_accuracy

PRETRAIN_RECORD = "pretrain.json"


def build_parser():
    parser = time_to_accuracy.build_parser(__doc__.split("\n\n")[0])
    group = parser.add_argument_group("pre-training")
    group.add_argument("--pretrain_seconds", type=float, default=300.0, help="Training seconds of the pre-training (all ten classes).")
    group.add_argument("--pretrain_learning_rate", type=float, default=1e-3)
    group.add_argument("--pretrain_seed", type=int, default=0)
    parser.set_defaults(
        output_dir=common.RESULTS_DIR / "finetune", budget_seconds=60.0, eval_every_seconds=20.0, learning_rate=3e-4
    )
    return parser


def pretrained_checkpoint(args) -> Path:
    """The pre-trained checkpoint for these settings: reused when present, trained and saved otherwise."""
    data_tag = "subset" if args.subset else (args.dataset_name or "full").replace("/", "_")
    directory = args.output_dir / f"pretrained_{data_tag}_{args.pretrain_seconds:g}s_seed{args.pretrain_seed}"
    if (directory / "model.safetensors").is_file():
        record = json.loads((directory / PRETRAIN_RECORD).read_text())
        print(f"Reusing the pre-trained checkpoint {directory} (batch {record.get('batch_size')}, learning rate "
              f"{record.get('learning_rate')}, {record['steps']} steps)", flush=True)
        return directory
    data = common.load_data(args, eval_samples=args.eval_samples)
    print(f"Pre-training on all {len(data.labels)} classes ({len(data.train)} images) for {args.pretrain_seconds:g} s", flush=True)
    set_seed(args.pretrain_seed)
    model, image_processor = common.build_model(data.labels)
    budget = common.TrainingBudget(args.pretrain_seconds)
    spec = common.parse_run("trainer", args.batch_size)
    training_args = common.training_arguments(
        spec,
        str(directory),
        args.pretrain_seed,
        max_steps=time_to_accuracy.MAX_STEPS,
        learning_rate=args.pretrain_learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=args.warmup_steps,
        logging_steps=args.logging_steps,
        bf16=args.bf16,
    )
    trainer = common.make_trainer(spec, model, training_args, data.train, data.eval, callbacks=[budget])
    trainer.train()
    record = {
        "classes": data.labels,
        "data": data.source,
        "batch_size": args.batch_size,
        "learning_rate": args.pretrain_learning_rate,
        "bf16": args.bf16,
        "steps": trainer.state.global_step,
        "training_seconds": budget.training_seconds,
        "test_accuracy_ten_classes": budget.evaluations[-1]["accuracy"],
    }
    print(f"    {record['steps']} steps, test accuracy on the ten classes {record['test_accuracy_ten_classes']:.4f}")
    # model.safetensors last: its presence marks a complete checkpoint.
    common.write_json(directory / PRETRAIN_RECORD, record)
    image_processor.save_pretrained(directory)
    trainer.save_model(str(directory))
    return directory


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    checkpoint = pretrained_checkpoint(args)
    extra = {
        "pretraining": {"checkpoint": str(checkpoint), **json.loads((checkpoint / PRETRAIN_RECORD).read_text())},
        "task": {name: list(members) for name, members in zip(common.VEHICLES_VS_ANIMALS.names, common.VEHICLES_VS_ANIMALS.members)},
    }
    data = common.load_data(args, eval_samples=args.eval_samples, relabelling=common.VEHICLES_VS_ANIMALS)
    print(f"Fine-tuning on {data.source}, vehicles against animals: {len(data.train)} training images, "
          f"{len(data.eval)} test images; {common.device_description()}", flush=True)
    results_path = args.output_dir / "results.json"
    loader = functools.partial(common.load_data, args, eval_samples=args.eval_samples, relabelling=common.VEHICLES_VS_ANIMALS)
    results = time_to_accuracy.run_suite(args, loader, functools.partial(common.new_model, data.labels, str(checkpoint)), results_path, extra)
    title = f"CIFAR-10 vehicles vs animals, fine-tuned from {args.pretrain_seconds:g} s of 10-class pre-training, {args.budget_seconds:g} s per run"
    time_to_accuracy.report(results, args, results_path, title, extra)


if __name__ == "__main__":
    main()
