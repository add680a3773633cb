#!/usr/bin/env python
"""Train and evaluate a small Vision Transformer on CIFAR-10 with `PredictedGradientTrainer`.

The structure follows transformers' `examples/pytorch/image-classification/run_image_classification.py`.
With no arguments it trains a ViT from scratch on the CIFAR-10 subset embedded in `examples/data`, offline,
in a few minutes on a laptop CPU:

    accelerate launch examples/run_vit.py --output_dir runs/vit

`--trainer baseline` runs plain `transformers.Trainer` with otherwise identical settings, for comparison:

    accelerate launch examples/run_vit.py --output_dir runs/vit-baseline --trainer baseline

Every `TrainingArguments` / `PredictedGradientArguments` field is an option (`--control_fraction 0.5`,
`--sampling_uniform_mix 0.2`, `--num_train_epochs 10`, ...), and a single `.json` file of options works too. Other data:
`--dataset_name uoft-cs/cifar10` (Hugging Face Hub), or `--train_file/--validation_file` (parquet files or image
folders). A pretrained model: `--model_name_or_path google/vit-base-patch16-224-in21k`, whose image processor
sets the input size and normalisation.

Writes to `output_dir`: the model and its image processor, `all_results.json` (train runtime and throughput,
eval accuracy and, with the lgp trainer, `trainer.lgp_summary()`), `trainer_state.json` (the log history, each
entry with `wall_time`, seconds since training began), `training_curves.png` (loss and accuracy against time; the
variance factor F of the sampled update and F x step cost, which must be below 1 for sampling to save compute, and
the control fraction against step) and the model card, README.md.
"""

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import datasets
import evaluate
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from datasets import DatasetDict, load_dataset
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
)

from lgp_hf import PredictedGradientArguments, PredictedGradientTrainer

logger = logging.getLogger(__name__)

EXAMPLES_DIR = os.path.dirname(os.path.abspath(__file__))
EMBEDDED_DATA_DIR = os.path.join(EXAMPLES_DIR, "data", "cifar10_subset")
# Loaded by path, so computing accuracy goes through `evaluate` without fetching a script from the Hub.
ACCURACY_METRIC_PATH = os.path.join(EXAMPLES_DIR, "metrics", "accuracy")

IMAGE_COLUMNS = ("img", "image")  # "img" in the Hub's cifar10, "image" in image folders and most other data sets
LABEL_COLUMN = "label"
CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2470, 0.2435, 0.2616]

# Defaults for TrainingArguments fields, chosen so that the command without options trains and evaluates in
# about 3-5 minutes on 2 CPU cores. They apply to the command line and to .json argument files alike.
TRAINING_DEFAULTS = {
    "output_dir": "runs/vit",
    "do_train": True,
    "do_eval": True,
    "num_train_epochs": 3,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 250,
    "learning_rate": 1e-3,
    "weight_decay": 0.05,
    "warmup_steps": 0.1,
    "lr_scheduler_type": "cosine",
    "eval_strategy": "epoch",
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "dataloader_num_workers": 0,
    "remove_unused_columns": False,  # the transforms need the image column, which the model's forward lacks
    "seed": 42,
}


@dataclass
class ModelArguments:
    """Which trainer, and which model: a new ViT (sizes below) or a pretrained one."""

    trainer: Literal["lgp", "baseline"] = field(
        default="lgp",
        metadata={"help": "lgp: lgp_hf.PredictedGradientTrainer; baseline: transformers.Trainer, same settings."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A pretrained image classifier (Hub name or local directory) to fine-tune; its image processor "
            "sets the input size and normalisation, and the ViT sizes below are ignored. Default: a new ViT."
        },
    )
    image_size: int = field(default=32, metadata={"help": "Input resolution of the new ViT."})
    patch_size: int = field(default=4, metadata={"help": "Patch size of the new ViT."})
    hidden_size: int = field(default=192, metadata={"help": "Hidden size of the new ViT."})
    num_hidden_layers: int = field(default=6, metadata={"help": "Number of transformer blocks of the new ViT."})
    num_attention_heads: int = field(default=3, metadata={"help": "Attention heads per block of the new ViT."})
    intermediate_size: int = field(default=768, metadata={"help": "MLP width of the new ViT."})


@dataclass
class DataTrainingArguments:
    """Which data, in order of precedence: a Hub data set, local files, else the embedded CIFAR-10 subset."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "A data set on the Hugging Face Hub, e.g. uoft-cs/cifar10."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_file: str | None = field(
        default=None, metadata={"help": "A .parquet file or an image folder directory (one subdirectory per class)."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "A .parquet file or an image folder directory (one subdirectory per class)."}
    )
    train_val_split: float = field(
        default=0.15,
        metadata={"help": "Fraction of the training data held out for evaluation when there is no validation split."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on a random subset of this many examples (for quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on a random subset of this many examples (for quick runs)."}
    )
    random_crop_padding: int = field(
        default=4, metadata={"help": "Training augmentation: zero-pad by this many pixels, then crop at random."}
    )

    def __post_init__(self):
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and not (os.path.isdir(path) or (os.path.isfile(path) and path.endswith(".parquet"))):
                raise ValueError(
                    f"--{name} {path!r}: expected an existing .parquet file (with an 'img' or 'image' column and a "
                    "'label' column) or an image folder directory (one subdirectory of images per class)."
                )


def parse_args() -> tuple[ModelArguments, DataTrainingArguments, PredictedGradientArguments]:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, PredictedGradientArguments))
    parser.set_defaults(**TRAINING_DEFAULTS)
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        with open(sys.argv[1]) as f:
            return parser.parse_dict({**TRAINING_DEFAULTS, **json.load(f)})
    return parser.parse_args_into_dataclasses()


def local_builder(path: str) -> tuple[str, str]:
    """The `load_dataset` builder and data_files pattern for a local parquet file or image folder."""
    return ("imagefolder", os.path.join(path, "**")) if os.path.isdir(path) else ("parquet", path)


def load_image_dataset(data_args: DataTrainingArguments, seed: int) -> tuple[DatasetDict, str, str]:
    """The "train" and "validation" splits that exist, where they came from, and the name of the image column."""
    if data_args.dataset_name is not None:
        source = data_args.dataset_name
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        if "validation" not in raw and "test" in raw:
            raw["validation"] = raw.pop("test")
    elif data_args.train_file is not None or data_args.validation_file is not None:
        files = {"train": data_args.train_file, "validation": data_args.validation_file}
        builders = {split: local_builder(path) for split, path in files.items() if path is not None}
        kinds = {kind for kind, _ in builders.values()}
        if len(kinds) > 1:
            raise ValueError(
                f"--train_file and --validation_file must both be .parquet files or both image folders; got {files}."
            )
        source = ", ".join(path for path in files.values() if path is not None)
        raw = load_dataset(kinds.pop(), data_files={split: pattern for split, (_, pattern) in builders.items()})
    else:
        source = EMBEDDED_DATA_DIR
        raw = load_dataset(
            "parquet",
            data_files={
                "train": os.path.join(EMBEDDED_DATA_DIR, "train.parquet"),
                "validation": os.path.join(EMBEDDED_DATA_DIR, "test.parquet"),
            },
        )
    dataset = DatasetDict({split: raw[split] for split in ("train", "validation") if split in raw})
    column = image_column(dataset, source)
    if "validation" not in dataset and "train" in dataset and data_args.train_val_split > 0:
        split = dataset["train"].train_test_split(test_size=data_args.train_val_split, seed=seed)
        dataset = DatasetDict(train=split["train"], validation=split["test"])
    return dataset, source, column


def image_column(dataset: DatasetDict, source: str) -> str:
    """Name of the image column; raises one clear error unless there is an image column and a class-label column."""
    features = next(iter(dataset.values())).features
    column = next((c for c in IMAGE_COLUMNS if isinstance(features.get(c), datasets.Image)), None)
    if column is None or not isinstance(features.get(LABEL_COLUMN), datasets.ClassLabel):
        raise ValueError(
            f"{source}: expected an image column named {' or '.join(map(repr, IMAGE_COLUMNS))} "
            f"(datasets.Image) and a {LABEL_COLUMN!r} column of class labels (datasets.ClassLabel), as in the "
            f"Hub's cifar10 or an image folder; found {dict(features)}."
        )
    return column


def subset(dataset: datasets.Dataset, max_samples: int, seed: int) -> datasets.Dataset:
    """A random subset (not the first rows, which may be sorted by class) of at most `max_samples` examples."""
    return dataset.shuffle(seed=seed).select(range(min(max_samples, len(dataset))))


def input_size(image_processor) -> tuple[int, int]:
    size = image_processor.size
    if "height" in size:
        return size["height"], size["width"]
    return size["shortest_edge"], size["shortest_edge"]


def make_transform(column: str, size: tuple[int, int], mean, std, train: bool, padding: int):
    """A batch transform for `set_transform`: decoded PIL images -> normalised `pixel_values` tensors.

    Tensor operations only (no torchvision): resize to the model's input size, and for training zero-pad by
    `padding` pixels, crop at a random offset and flip horizontally at random, the usual CIFAR augmentation.
    """
    mean = torch.tensor(mean).view(3, 1, 1)
    std = torch.tensor(std).view(3, 1, 1)

    def to_tensor(image) -> torch.Tensor:
        pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float().div(255)
        if pixels.shape[1:] != size:
            pixels = F.interpolate(pixels[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        return pixels

    def augment(pixels: torch.Tensor) -> torch.Tensor:
        padded = F.pad(pixels, (padding,) * 4)
        top, left = torch.randint(0, 2 * padding + 1, (2,)).tolist()
        pixels = padded[:, top : top + size[0], left : left + size[1]]
        return pixels.flip(-1) if torch.rand(()) < 0.5 else pixels

    def transform(batch: dict) -> dict:
        pixel_values = []
        for image in batch[column]:
            pixels = to_tensor(image)
            if train:
                pixels = augment(pixels)
            pixel_values.append((pixels - mean) / std)
        return {"pixel_values": pixel_values, "labels": batch[LABEL_COLUMN]}

    return transform


def collate_fn(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples]),
    }


def build_model(model_args: ModelArguments, labels: list[str]):
    """The model (pretrained, or a new ViT of the sizes in `model_args`) and the image processor that decides its
    input size and normalisation."""
    label2id = {label: i for i, label in enumerate(labels)}
    id2label = dict(enumerate(labels))
    if model_args.model_name_or_path is not None:
        model = AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path,
            num_labels=len(labels),
            id2label=id2label,
            label2id=label2id,
            ignore_mismatched_sizes=True,  # a new classifier when the label count differs from the checkpoint's
        )
        image_processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
    else:
        config = ViTConfig(
            image_size=model_args.image_size,
            patch_size=model_args.patch_size,
            hidden_size=model_args.hidden_size,
            num_hidden_layers=model_args.num_hidden_layers,
            num_attention_heads=model_args.num_attention_heads,
            intermediate_size=model_args.intermediate_size,
            num_labels=len(labels),
            id2label=id2label,
            label2id=label2id,
        )
        model = ViTForImageClassification(config)
        # Saved with the model, so that the output directory works with pipeline("image-classification").
        image_processor = ViTImageProcessorPil(
            size={"height": model_args.image_size, "width": model_args.image_size},
            image_mean=CIFAR10_MEAN,
            image_std=CIFAR10_STD,
        )
    return model, image_processor


class WallClockCallback(TrainerCallback):
    """Adds `wall_time`, seconds since training began, to each log entry.

    The point of the sampled backward is cheaper steps, so curves are compared against time rather than steps;
    storing the time in `state.log_history` keeps it in `trainer_state.json` for later comparisons too.
    """

    def __init__(self):
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.start is not None:
            state.log_history[-1]["wall_time"] = time.time() - self.start


def plot_training_curves(log_history: list[dict], path: str) -> None:
    """Training loss and eval accuracy against wall-clock seconds; the variance factor F of the sampled update, F x
    step cost (measured, and as "auto" predicted it for its best fraction) against the break-even 1, and the control
    fraction, against step."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning(
            f"matplotlib is not installed, so {path} was not written; install it with `pip install lgp_hf[plots]` "
            "or `pip install matplotlib`."
        )
        return
    panels = [
        (("loss",), "wall_time", "training loss", "wall-clock seconds"),
        (("eval_accuracy",), "wall_time", "eval accuracy", "wall-clock seconds"),
        (("lgp/variance_factor",), "step", "lgp/variance_factor (F)", "step"),
        (("lgp/efficiency", "lgp/predicted_efficiency"), "step", "F x step cost (saves compute below 1)", "step"),
        (("lgp/control_fraction",), "step", "lgp/control_fraction", "step"),
    ]
    figure = Figure(figsize=(25, 4), layout="tight")
    for axes, (keys, x_key, title, x_label) in zip(figure.subplots(1, len(panels)), panels):
        for key, style in zip(keys, ("-", "--")):
            points = [(entry[x_key], entry[key]) for entry in log_history if key in entry and x_key in entry]
            if points:
                axes.plot(*zip(*points), marker=".", ls=style, label=key)
        if not axes.lines:
            axes.text(0.5, 0.5, f"no {' or '.join(keys)} logged", ha="center", va="center", transform=axes.transAxes)
        else:
            if keys[0] == "lgp/efficiency":
                axes.axhline(1.0, color="gray", ls=":", label="break-even (plain backprop)")
            if len(keys) > 1:
                axes.legend(fontsize=8)
        axes.set(title=title, xlabel=x_label)
        axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120)
    logger.info(f"Training curves written to {path}")


def main():
    model_args, data_args, training_args = parse_args()

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        # The default of training_args.log_level is passive, so we set log level at info here to have that default.
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(
        f"Process rank: {training_args.local_process_index}, device: {training_args.device}, "
        f"distributed training: {training_args.parallel_mode.value == 'distributed'}, trainer: {model_args.trainer}"
    )
    logger.info(f"Training/evaluation parameters {training_args}")

    # Set the seed before the model is initialised, so that runs with either trainer start from the same weights.
    transformers.set_seed(training_args.seed)

    # Data: a Hub data set, local files, or the embedded CIFAR-10 subset.
    dataset, source, column = load_image_dataset(data_args, training_args.seed)
    if training_args.do_train and "train" not in dataset:
        raise ValueError(f"--do_train needs a training split; {source} has only {list(dataset)}.")
    if training_args.do_eval and "validation" not in dataset:
        raise ValueError(f"--do_eval needs a validation split; {source} has only {list(dataset)}.")
    labels = next(iter(dataset.values())).features[LABEL_COLUMN].names
    logger.info(f"Data from {source}: {dict(dataset.num_rows)} examples, {len(labels)} classes")

    # Model and the image processor that decides its input size and normalisation.
    model, image_processor = build_model(model_args, labels)
    size = input_size(image_processor)
    logger.info(f"Model: {type(model).__name__}, {model.num_parameters() / 1e6:.2f}M parameters, input {size}")

    transform_args = (column, size, image_processor.image_mean, image_processor.image_std)
    if training_args.do_train:
        if data_args.max_train_samples is not None:
            dataset["train"] = subset(dataset["train"], data_args.max_train_samples, training_args.seed)
        train_transform = make_transform(*transform_args, train=True, padding=data_args.random_crop_padding)
        dataset["train"].set_transform(train_transform)
    if training_args.do_eval:
        if data_args.max_eval_samples is not None:
            dataset["validation"] = subset(dataset["validation"], data_args.max_eval_samples, training_args.seed)
        dataset["validation"].set_transform(make_transform(*transform_args, train=False, padding=0))

    metric = evaluate.load(ACCURACY_METRIC_PATH)

    def compute_metrics(prediction: transformers.EvalPrediction) -> dict[str, float]:
        return metric.compute(predictions=np.argmax(prediction.predictions, axis=1), references=prediction.label_ids)

    # PredictedGradientArguments is a TrainingArguments, so plain Trainer takes the same arguments object.
    trainer_class = PredictedGradientTrainer if model_args.trainer == "lgp" else Trainer
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=dataset["train"] if training_args.do_train else None,
        eval_dataset=dataset["validation"] if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        data_collator=collate_fn,
        callbacks=[WallClockCallback()],
    )

    # Training
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        metrics = train_result.metrics
        metrics["train_samples"] = len(dataset["train"])
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        if isinstance(trainer, PredictedGradientTrainer):
            summary = trainer.lgp_summary()
            # log_metrics cannot print None, which lgp_summary uses for statistics not measured yet.
            trainer.log_metrics("lgp", {key: value for key, value in summary.items() if value is not None})
            trainer.save_metrics("lgp", summary)

    # Evaluation
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(dataset["validation"])
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if training_args.do_train and trainer.is_world_process_zero():
        plot_training_curves(trainer.state.log_history, os.path.join(training_args.output_dir, "training_curves.png"))

    # Model card (with the eval results, written last) and, with --push_to_hub, the upload
    card = {"tasks": "image-classification", "tags": ["image-classification", "vision"]}
    if model_args.model_name_or_path:
        card["finetuned_from"] = model_args.model_name_or_path
    if data_args.dataset_name:
        card["dataset"] = data_args.dataset_name
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)


if __name__ == "__main__":
    main()
