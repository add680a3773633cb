#!/usr/bin/env python
"""The fine-tuning regime: a ViT pretrained on some CIFAR-10 classes, fine-tuned on all ten with each method.

Pre-training: transformers.Trainer trains the example's ViT from scratch on the classes `--pretrain_classes`
(default 0-4: airplane, automobile, bird, cat, deer) for `--pretrain_seconds` of training time at
`--pretrain_learning_rate`, and saves it under `--output_dir` in a folder named by the data, classes, seconds and
seed. A later call with the same settings reuses that checkpoint instead of training again.

Fine-tuning: every run of `time_to_accuracy.py` (same options, same run names, same report, same plots), each
starting from the checkpoint with a freshly initialised classifier (seeded per run), trained on all ten classes
and evaluated on `--eval_samples` test images of all ten. This is where the predictors' linear (NTK) picture of
the trunk should be closest to true, so alignment is reported alongside time to accuracy.

    python benchmarks/finetune.py        # 300 s pre-training once + 9 runs x 2 seeds x 60 s: about 33 minutes on 2 CPU cores
    python benchmarks/finetune.py --subset --pretrain_seconds 5 --seeds 1 --budget_seconds 5 \\
        --eval_every_seconds 2 --eval_samples 100 --batch_size 16 --runs trainer lgp_ntk_f0.25   # smoke test
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import set_seed

import common
import time_to_accuracy

PRETRAIN_RECORD = "pretrain.json"


def build_parser():
    parser = time_to_accuracy.build_parser(__doc__.split("\n\n")[0])
    group = parser.add_argument_group("pre-training")
    group.add_argument("--pretrain_classes", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="Label ids pre-trained on.")
    group.add_argument("--pretrain_seconds", type=float, default=300.0, help="Training seconds of the pre-training.")
    group.add_argument("--pretrain_learning_rate", type=float, default=1e-3)
    group.add_argument("--pretrain_seed", type=int, default=0)
    parser.set_defaults(
        output_dir=common.RESULTS_DIR / "finetune", budget_seconds=60.0, eval_every_seconds=20.0, learning_rate=3e-4
    )
    return parser


def pretrained_checkpoint(args) -> Path:
    """The pre-trained checkpoint for these settings: reused when present, trained and saved otherwise."""
    data_tag = "subset" if args.subset else (args.dataset_name or "full").replace("/", "_")
    classes = "".join(map(str, args.pretrain_classes))
    directory = args.output_dir / f"pretrained_{data_tag}_classes{classes}_{args.pretrain_seconds:g}s_seed{args.pretrain_seed}"
    if (directory / "model.safetensors").is_file():
        print(f"Reusing the pre-trained checkpoint {directory}", flush=True)
        return directory
    data = common.load_data(args, eval_samples=args.eval_samples, classes=args.pretrain_classes)
    print(f"Pre-training on classes {args.pretrain_classes} ({len(data.train)} images) for {args.pretrain_seconds:g} s", flush=True)
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
    )
    trainer = common.make_trainer(spec, model, training_args, data.train, data.eval, callbacks=[budget])
    trainer.train()
    record = {
        "classes": args.pretrain_classes,
        "data": data.source,
        "steps": trainer.state.global_step,
        "training_seconds": budget.training_seconds,
        "test_accuracy_on_these_classes": budget.evaluations[-1]["accuracy"],
    }
    print(f"    {record['steps']} steps, test accuracy on these classes {record['test_accuracy_on_these_classes']:.4f}")
    # model.safetensors last: its presence marks a complete checkpoint.
    common.write_json(directory / PRETRAIN_RECORD, record)
    image_processor.save_pretrained(directory)
    trainer.save_model(str(directory))
    return directory


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    checkpoint = pretrained_checkpoint(args)
    extra = {"pretraining": {"checkpoint": str(checkpoint), **json.loads((checkpoint / PRETRAIN_RECORD).read_text())}}
    data = common.load_data(args, eval_samples=args.eval_samples)
    print(f"Fine-tuning on {data.source}, {len(data.train)} training images, {len(data.eval)} test images; "
          f"{common.device_description()}", flush=True)
    results_path = args.output_dir / "results.json"
    results = time_to_accuracy.run_suite(
        args, data, lambda: common.build_model(data.labels, str(checkpoint))[0], results_path, extra
    )
    title = f"CIFAR-10 fine-tuning from classes {args.pretrain_classes}, {args.budget_seconds:g} s per run"
    time_to_accuracy.report(results, args, results_path, title, extra)


if __name__ == "__main__":
    main()
