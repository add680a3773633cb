#!/usr/bin/env python
"""Train and evaluate a causal language model with `PredictedGradientTrainer`.

The structure follows transformers' `examples/pytorch/language-modeling/run_clm.py`: the text is tokenized,
concatenated and cut into blocks of `--block_size` tokens, and the model learns to predict each next token. With no
arguments it trains a small GPT-2 (4 layers, hidden size 128, 0.9 M parameters) from scratch on tinyshakespeare with
a byte-level tokenizer (`ByT5Tokenizer`: 256 bytes and 3 special tokens, nothing to download), offline:

    python examples/run_clm.py --output_dir runs/clm

Other data: `--dataset_name wikitext --dataset_config_name wikitext-2-raw-v1` (Hugging Face Hub) or `--train_file` /
`--validation_file` (.txt files). Another model: `--model_name_or_path gpt2` fine-tunes a pretrained one with its own
tokenizer; from scratch, `--model_type` and `--config_overrides` ("n_embd=256,n_layer=6") set the architecture.
Every `TrainingArguments` / `PredictedGradientArguments` field is an option (`--control_fraction 0.5`, ...);
`--trainer baseline` runs plain `transformers.Trainer` with otherwise identical settings.

Writes to `output_dir`: the model and tokenizer, `all_results.json` (train runtime, eval loss and perplexity and,
with the lgp trainer, `trainer.lgp_summary()`), `trainer_state.json` and the model card, README.md.
"""

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from itertools import chain
from typing import Literal

import datasets
import transformers
from datasets import DatasetDict, load_dataset
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    ByT5Tokenizer,
    HfArgumentParser,
    Trainer,
    default_data_collator,
)

from lgp_hf import PredictedGradientArguments, PredictedGradientTrainer

logger = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: tinyshakespeare (1.1 MB of plays) next to the repository, the default training text.
DEFAULT_TRAIN_FILE = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "tinyshakespeare", "input.txt")

# Defaults for TrainingArguments fields: one epoch of tinyshakespeare in a few minutes on 2 CPU cores.
TRAINING_DEFAULTS = {
    "output_dir": "runs/clm",
    "do_train": True,
    "do_eval": True,
    "num_train_epochs": 1,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 64,
    "learning_rate": 1e-3,
    "weight_decay": 0.05,
    "warmup_steps": 0.1,
    "lr_scheduler_type": "cosine",
    "eval_strategy": "epoch",
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "label_names": ["labels"],  # also for PEFT-wrapped models, whose forward signature hides them
    "seed": 42,
}


@dataclass
class ModelArguments:
    """Which trainer, and which model: a pretrained one, or a new one of `model_type` and `config_overrides`."""

    trainer: Literal["lgp", "baseline"] = field(
        default="lgp",
        metadata={"help": "lgp: lgp_hf.PredictedGradientTrainer; baseline: transformers.Trainer, same settings."},
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A pretrained causal LM (Hub name or local directory). Default: a new model."}
    )
    model_type: str = field(default="gpt2", metadata={"help": "Architecture of a new model (a transformers model type)."})
    config_overrides: str | None = field(
        default="n_embd=128,n_layer=4,n_head=4,n_positions=256",
        metadata={"help": "Settings of a new model's config, 'key=value,key=value' (the config's own names)."},
    )
    config_name: str | None = field(default=None, metadata={"help": "A config (name or path) for a new model instead."})
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "A tokenizer (name or path). Default: the pretrained model's, else byte-level (ByT5Tokenizer)."},
    )


@dataclass
class DataTrainingArguments:
    """Which text, in order of precedence: a Hub data set, else text files (default: tinyshakespeare)."""

    dataset_name: str | None = field(default=None, metadata={"help": "A data set on the Hub, e.g. wikitext."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration, e.g. wikitext-2-raw-v1."})
    train_file: str = field(default=DEFAULT_TRAIN_FILE, metadata={"help": "A .txt file of training text."})
    validation_file: str | None = field(
        default=None, metadata={"help": "A .txt file of evaluation text. Default: the start of the training text."}
    )
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Percentage of the training text held out when there is no validation split."}
    )
    block_size: int | None = field(
        default=None, metadata={"help": "Tokens per training example. Default: the model's context length (at most 1024)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first this many training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first this many evaluation blocks."})
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep the line breaks of .txt files."})

    def __post_init__(self):
        if self.dataset_name is None and not os.path.isfile(self.train_file):
            raise ValueError(f"--train_file {self.train_file!r} not found: pass a .txt file, or --dataset_name.")


def parse_args() -> tuple[ModelArguments, DataTrainingArguments, PredictedGradientArguments]:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, PredictedGradientArguments))
    parser.set_defaults(**TRAINING_DEFAULTS)
    return parser.parse_args_into_dataclasses()


def load_text(data_args: DataTrainingArguments) -> tuple[DatasetDict, str]:
    """The "train" and "validation" splits (a "text" column) and where they came from. Without a validation split,
    the first `validation_split_percentage` % of the training text is held out."""
    if data_args.dataset_name is not None:
        source, name, options = data_args.dataset_name, data_args.dataset_name, {"name": data_args.dataset_config_name}
    else:
        files = {"train": data_args.train_file}
        if data_args.validation_file is not None:
            files["validation"] = data_args.validation_file
        source, name = ", ".join(files.values()), "text"
        options = {"data_files": files, "keep_linebreaks": data_args.keep_linebreaks}
    raw = load_dataset(name, **options)
    if "validation" not in raw:
        percentage = data_args.validation_split_percentage
        raw["validation"] = load_dataset(name, split=f"train[:{percentage}%]", **options)
        raw["train"] = load_dataset(name, split=f"train[{percentage}%:]", **options)
    return DatasetDict(train=raw["train"], validation=raw["validation"]), source


def byte_tokenizer() -> ByT5Tokenizer:
    """Byte-level: token id = byte + 3 (0 pad, 1 end of sequence, 2 unknown), no extra ids; 259 tokens."""
    return ByT5Tokenizer(extra_ids=0)


def build_tokenizer(model_args: ModelArguments):
    name = model_args.tokenizer_name or model_args.model_name_or_path
    return byte_tokenizer() if name is None else AutoTokenizer.from_pretrained(name)


def build_model(model_args: ModelArguments, tokenizer):
    """A pretrained causal LM, or a new one from `config_name` or `model_type` with `config_overrides`, its
    vocabulary and special tokens the tokenizer's."""
    if model_args.model_name_or_path is not None:
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    if model_args.config_name is not None:
        config = AutoConfig.from_pretrained(model_args.config_name)
    else:
        config = CONFIG_MAPPING[model_args.model_type]()
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
    config.vocab_size = len(tokenizer)
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return AutoModelForCausalLM.from_config(config)


def group_texts(examples: dict[str, list], block_size: int) -> dict[str, list]:
    """Concatenates the token lists of each column and cuts them into blocks of `block_size` (the remainder is
    dropped); labels are the input ids (the model shifts them)."""
    concatenated = {key: list(chain(*examples[key])) for key in examples}
    total = len(concatenated["input_ids"]) // block_size * block_size
    blocks = {key: [values[i : i + block_size] for i in range(0, total, block_size)] for key, values in concatenated.items()}
    blocks["labels"] = [list(block) for block in blocks["input_ids"]]
    return blocks


def default_block_size(tokenizer, config) -> int:
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 1024)
    return min(1024, context, tokenizer.model_max_length)


def main():
    model_args, data_args, training_args = parse_args()

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
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

    # Set the seed before the model is initialised, so that runs with either trainer start from the same weights.
    transformers.set_seed(training_args.seed)

    # Data and tokenizer: every text tokenized, then concatenated and cut into blocks.
    raw, source = load_text(data_args)
    tokenizer = build_tokenizer(model_args)
    model = build_model(model_args, tokenizer)
    block_size = data_args.block_size or default_block_size(tokenizer, model.config)
    logger.info(f"Model: {type(model).__name__}, {model.num_parameters() / 1e6:.2f}M parameters, blocks of {block_size} tokens")

    def tokenize(examples):  # one stream of text: no special tokens around each line
        return tokenizer(examples["text"], add_special_tokens=False)

    with training_args.main_process_first(desc="tokenizing and grouping"):
        tokenized = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names)
        blocks = tokenized.map(group_texts, batched=True, fn_kwargs={"block_size": block_size})
    if data_args.max_train_samples is not None:
        blocks["train"] = blocks["train"].select(range(min(data_args.max_train_samples, len(blocks["train"]))))
    if data_args.max_eval_samples is not None:
        blocks["validation"] = blocks["validation"].select(range(min(data_args.max_eval_samples, len(blocks["validation"]))))
    logger.info(f"Data from {source}: {dict(blocks.num_rows)} blocks of {block_size} tokens")

    # PredictedGradientArguments is a TrainingArguments, so plain Trainer takes the same arguments object.
    trainer_class = PredictedGradientTrainer if model_args.trainer == "lgp" else Trainer
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=blocks["train"] if training_args.do_train else None,
        eval_dataset=blocks["validation"] if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )

    # Training
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        metrics = train_result.metrics
        metrics["train_samples"] = len(blocks["train"])
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        if isinstance(trainer, PredictedGradientTrainer):
            summary = trainer.lgp_summary()
            # log_metrics cannot print None, which lgp_summary uses for statistics not measured yet.
            trainer.log_metrics("lgp", {key: value for key, value in summary.items() if value is not None})
            trainer.save_metrics("lgp", summary)

    # Evaluation: loss and perplexity on the held-out blocks
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(blocks["validation"])
        metrics["perplexity"] = math.exp(metrics["eval_loss"]) if metrics["eval_loss"] < 700 else math.inf
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    card = {"tasks": "text-generation", "tags": ["text-generation"]}
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
