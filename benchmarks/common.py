"""Code the benchmarks share: data, model, trainers, timing callbacks, tables and result files.

Data loading, the image transforms, the collator and the model come from `examples/run_vit.py`, so the benchmarks
measure exactly the example's model (a ViT of `run_vit.ModelArguments`' default sizes, 2.7 M parameters, CIFAR-10
at 32x32) and input pipeline.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict
from transformers import PrinterCallback, Trainer, TrainerCallback
from transformers.utils import logging as hf_logging

from lgp_hf import PredictedGradientArguments, PredictedGradientTrainer

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "examples"))
import run_vit  # noqa: E402  (examples/ is not a package)

#: The full CIFAR-10 (50,000 train / 10,000 test parquet files) next to the repository.
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "cifar10"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


# ---------------------------------------------------------------- data and model


def add_data_arguments(parser: argparse.ArgumentParser, subset_default: bool) -> None:
    """--subset / --data_dir / --dataset_name: which CIFAR-10 to use (in that order of precedence)."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--subset",
        action=argparse.BooleanOptionalAction,
        default=subset_default,
        help="Use the CIFAR-10 subset embedded in examples/data (5,000 train / 1,000 test). "
        f"Default: {'on' if subset_default else 'off'}.",
    )
    group.add_argument(
        "--data_dir",
        default=str(DEFAULT_DATA_DIR),
        help="Directory holding train.parquet and test.parquet of the full CIFAR-10 (default: %(default)s).",
    )
    group.add_argument("--dataset_name", default=None, help="A Hugging Face Hub data set instead, e.g. uoft-cs/cifar10.")


@dataclass(frozen=True)
class Relabelling:
    """New classes made of CIFAR-10's: `names[k]` is new label k, `members[k]` the original class names it takes."""

    names: tuple[str, ...]
    members: tuple[tuple[str, ...], ...]

    def mapping(self, original_names: list[str]) -> dict[int, int]:
        """original label id -> new label id; every original class must belong to exactly one new class."""
        new_id = {name: k for k, group in enumerate(self.members) for name in group}
        if sorted(new_id) != sorted(original_names) or len(new_id) != sum(map(len, self.members)):
            raise ValueError(f"the relabelling {dict(zip(self.names, self.members))} does not partition the classes {original_names}")
        return {i: new_id[name] for i, name in enumerate(original_names)}


#: The binary fine-tuning task of finetune.py: label 0 animal (bird, cat, deer, dog, frog, horse), 1 vehicle
#: (airplane 0, automobile 1, ship 8, truck 9 in CIFAR-10's numbering).
VEHICLES_VS_ANIMALS = Relabelling(
    names=("animal", "vehicle"),
    members=(("bird", "cat", "deer", "dog", "frog", "horse"), ("airplane", "automobile", "ship", "truck")),
)


def relabel(dataset: Dataset, mapping: dict[int, int], names: tuple[str, ...]) -> Dataset:
    """`dataset` with its label column replaced by `mapping` of it, as a ClassLabel of `names`. The new column is
    added beside the memory-mapped images (no rewrite of the image data, unlike `Dataset.map`)."""
    labels = [mapping[label] for label in dataset[run_vit.LABEL_COLUMN]]
    return dataset.remove_columns(run_vit.LABEL_COLUMN).add_column(
        run_vit.LABEL_COLUMN, labels, feature=ClassLabel(names=list(names))
    )


@dataclass
class ImageData:
    train: Dataset  # with the example's training transform (random crop, flip)
    eval: Dataset  # with the evaluation transform
    labels: list[str]
    source: str


def load_data(
    args: argparse.Namespace, eval_samples: int | None = None, classes: list[int] | None = None,
    relabelling: Relabelling | None = None,
) -> ImageData:
    """The train and test splits chosen by `add_data_arguments`, with the example's transforms.

    `eval_samples`: a fixed random subset (seed 0, the same for every run) of the test split. `classes`: keep only
    these label ids, in both splits. `relabelling`: replace the labels by the new classes' ids in both splits
    (`labels` are then the new names).
    """
    if args.subset:
        data_args = run_vit.DataTrainingArguments()
    elif args.dataset_name is not None:
        data_args = run_vit.DataTrainingArguments(dataset_name=args.dataset_name)
    else:
        files = [os.path.join(args.data_dir, name) for name in ("train.parquet", "test.parquet")]
        missing = [path for path in files if not os.path.isfile(path)]
        if missing:
            raise FileNotFoundError(f"{missing} not found: pass --data_dir, --dataset_name, or --subset.")
        data_args = run_vit.DataTrainingArguments(train_file=files[0], validation_file=files[1])
    dataset, source, column = run_vit.load_image_dataset(data_args, seed=0)
    labels = dataset["train"].features[run_vit.LABEL_COLUMN].names
    if classes is not None:
        keep = set(classes)
        dataset = dataset.filter(lambda label: label in keep, input_columns=run_vit.LABEL_COLUMN)
    if relabelling is not None:
        mapping = relabelling.mapping(labels)
        dataset = DatasetDict({split: relabel(part, mapping, relabelling.names) for split, part in dataset.items()})
        labels = list(relabelling.names)
    eval_split = dataset["validation"].shuffle(seed=0)
    if eval_samples is not None:
        eval_split = eval_split.select(range(min(eval_samples, len(eval_split))))
    size = (run_vit.ModelArguments.image_size,) * 2
    transform = (column, size, run_vit.CIFAR10_MEAN, run_vit.CIFAR10_STD)
    train = dataset["train"]
    train.set_transform(run_vit.make_transform(*transform, train=True, padding=4))
    eval_split.set_transform(run_vit.make_transform(*transform, train=False, padding=0))
    return ImageData(train=train, eval=eval_split, labels=labels, source=source)


def build_model(labels: list[str], checkpoint: str | None = None):
    """(model, image processor): a new ViT of the example's default sizes, or the ViT saved at `checkpoint` with a
    freshly initialised classifier for `labels` (the fine-tuning regime; the config gets num_labels and id2label of
    `labels`, whatever the checkpoint's). Call `transformers.set_seed` first."""
    verbosity = hf_logging.get_verbosity()
    if checkpoint is not None:  # the classifier's size mismatch is intended: not reported on every run
        hf_logging.set_verbosity_error()
    try:
        model, processor = run_vit.build_model(run_vit.ModelArguments(model_name_or_path=checkpoint), labels)
    finally:
        hf_logging.set_verbosity(verbosity)
    if checkpoint is not None:  # ViT's own initialisation of a linear layer
        torch.nn.init.trunc_normal_(model.classifier.weight, std=model.config.initializer_range)
        torch.nn.init.zeros_(model.classifier.bias)
    return model, processor


def new_model(labels: list[str], checkpoint: str | None = None):
    """`build_model`'s model alone (a picklable model factory with `functools.partial`, for spawned processes)."""
    return build_model(labels, checkpoint)[0]


def first_batch(dataset: Dataset, batch_size: int) -> dict[str, torch.Tensor]:
    return run_vit.collate_fn([dataset[i] for i in range(batch_size)])


# ---------------------------------------------------------------- trainers


@dataclass(frozen=True)
class RunSpec:
    """One trainer configuration. Names: `trainer` (transformers.Trainer at the run's batch size), `trainer_b<n>`
    (transformers.Trainer at batch size n), `lgp_f<fraction>` (PredictedGradientTrainer at a fixed control
    fraction in (0, 1]) and `lgp_fauto` (at `control_fraction="auto"`, the library's default); an lgp name may end
    in options (`RUN_OPTIONS`, `RUN_FLAGS`), e.g. `lgp_f0.25_mix0.3`: sampling_uniform_mix 0.3, `lgp_f0.5_keep0.5`:
    weight_gradient_keep 0.5, `lgp_fauto_keepauto`: both chosen by "auto", `lgp_f0.25_mix1_linear`: the paper's configuration (uniform draws and the linear gradient
    predictor)."""

    name: str
    batch_size: int
    control_fraction: float | str | None = None  # a number in (0, 1] or "auto"; None: transformers.Trainer
    settings: tuple[tuple[str, int | float], ...] = ()  # (PredictedGradientArguments field, value) from the name's options

    @property
    def is_lgp(self) -> bool:
        return self.control_fraction is not None


#: option of an lgp run name -> (the PredictedGradientArguments field it sets, its type)
RUN_OPTIONS = {"mix": ("sampling_uniform_mix", float), "keep": ("weight_gradient_keep", lambda value: value if value == "auto" else float(value))}
#: flag of an lgp run name -> (the PredictedGradientArguments field it sets, its value)
RUN_FLAGS = {"linear": ("gradient_predictor", "linear")}


def parse_run(name: str, batch_size: int) -> RunSpec:
    if name == "trainer":
        return RunSpec(name, batch_size)
    if match := re.fullmatch(r"trainer_b(\d+)", name):
        return RunSpec(name, int(match.group(1)))
    option = "_(" + "|".join(RUN_OPTIONS) + r")(auto|[0-9.]+)"
    flag = "_(" + "|".join(RUN_FLAGS) + ")"
    if match := re.fullmatch(r"lgp_f(auto|[0-9.]+)((?:" + option + ")*)((?:" + flag + ")*)", name):
        try:
            fraction = match.group(1) if match.group(1) == "auto" else float(match.group(1))
            settings = tuple(
                (RUN_OPTIONS[key][0], RUN_OPTIONS[key][1](value)) for key, value in re.findall(option, match.group(2))
            ) + tuple(RUN_FLAGS[key] for key in re.findall(flag, match.group(5)))
        except ValueError:  # "0.2.5"
            fraction = None
        if fraction == "auto" or (fraction is not None and 0 < fraction <= 1):
            return RunSpec(name, batch_size, fraction, settings)
    raise ValueError(
        f"run {name!r}: use 'trainer', 'trainer_b<batch size>', 'lgp_f<fraction in (0, 1]>' or 'lgp_fauto', an lgp name "
        f"optionally followed by {', '.join(f'_{k}<{v[0]}>' for k, v in RUN_OPTIONS.items())}, then by "
        f"{', '.join(f'_{k} ({v[0]}={v[1]!r})' for k, v in RUN_FLAGS.items())}, e.g. lgp_f0.25, lgp_fauto_mix0.3 or lgp_f0.25_mix1_linear."
    )


def lgp_run_name(fraction: float | str) -> str:
    return f"lgp_f{fraction if fraction == 'auto' else format(fraction, 'g')}"


def training_arguments(
    spec: RunSpec, output_dir: str, seed: int, defaults: dict = run_vit.TRAINING_DEFAULTS, **overrides
) -> PredictedGradientArguments:
    """An example's TrainingArguments `defaults` (the ViT's: AdamW, lr 1e-3, weight decay 0.05, ...) for `spec`,
    with no evaluation, saving, progress bar or reporting unless `overrides` say otherwise. Every run gets
    PredictedGradientArguments (transformers.Trainer ignores its sampling fields); the sampling settings are the
    library's defaults (unbiasedness check included) unless the run name's options or `overrides` set them."""
    settings = {
        **defaults,
        "do_train": True,
        "do_eval": False,
        "eval_strategy": "no",
        "disable_tqdm": True,
        "output_dir": output_dir,
        "seed": seed,
        "per_device_train_batch_size": spec.batch_size,
        **overrides,
    }
    if spec.is_lgp:
        settings.update(control_fraction=str(spec.control_fraction), **dict(spec.settings))
    return PredictedGradientArguments(**settings)


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, axis=1) == prediction.label_ids).mean())}


def make_trainer(
    spec: RunSpec, model, args, train_dataset, eval_dataset=None, callbacks=(), data_collator=run_vit.collate_fn,
    compute_metrics=accuracy,
) -> Trainer:
    """PredictedGradientTrainer for lgp runs, transformers.Trainer otherwise, with the example's collator and
    accuracy (other tasks pass theirs; `compute_metrics` None: the eval loss alone); the printing of every log entry
    is turned off (the benchmarks print their own tables)."""
    trainer_class = PredictedGradientTrainer if spec.is_lgp else Trainer
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        compute_metrics=compute_metrics if eval_dataset is not None else None,
        callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


# ---------------------------------------------------------------- timing


def clock(device: torch.device) -> float:
    """time.perf_counter() after the accelerator has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class StepTimer(TrainerCallback):
    """Per optimizer step: `seconds` from on_step_begin to on_step_end (training_step on every micro-batch,
    clipping, optimizer and scheduler step, zero_grad; waits for the GPU at both ends), and `gap`, the time since
    the previous step ended (logging, fetching and transforming the next batch); None for the first step."""

    def __init__(self):
        self.steps: list[dict] = []
        self._begin: float | None = None
        self._previous_end: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._begin = clock(args.device)

    def on_step_end(self, args, state, control, **kwargs):
        end = clock(args.device)
        gap = None if self._previous_end is None else self._begin - self._previous_end
        self.steps.append({"seconds": end - self._begin, "gap": gap})
        self._previous_end = end

    def restart_gap(self) -> None:
        """The next gap starts now (time spent paused, e.g. waiting for another trainer's turn, is not a gap)."""
        self._previous_end = time.perf_counter()


class TrainingBudget(TrainerCallback):
    """Stops training after `budget_seconds` of training time, evaluating at the end and every
    `eval_every_seconds` (None: only at the end). Training time is wall-clock time since training began minus the
    time spent evaluating (and logging at evaluation points). `evaluations` holds, per evaluation, the training
    seconds and step at which it was asked for, and the metrics."""

    def __init__(self, budget_seconds: float, eval_every_seconds: float | None = None):
        self.budget_seconds = budget_seconds
        self.eval_every_seconds = eval_every_seconds
        self.evaluations: list[dict] = []
        self.training_seconds = 0.0
        self._start = self._paused_since = None
        self._paused = 0.0
        self._next_eval = eval_every_seconds
        self._pending: dict | None = None

    def _elapsed(self, device) -> float:
        return clock(device) - self._start - self._paused

    def elapsed(self, device) -> float:
        """Training seconds so far (0 before training began)."""
        return 0.0 if self._start is None else self._elapsed(device)

    def exclude(self, seconds: float) -> None:
        """Time that was not training (waiting for another process's turn)."""
        self._paused += seconds

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = clock(args.device)

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = self._elapsed(args.device)
        self.training_seconds = elapsed
        if elapsed >= self.budget_seconds:
            control.should_training_stop = True
            control.should_evaluate = True
        elif self._next_eval is not None and elapsed >= self._next_eval:
            control.should_evaluate = True
            while self._next_eval <= elapsed:
                self._next_eval += self.eval_every_seconds
        if control.should_evaluate:
            self._pending = {"seconds": elapsed, "step": state.global_step}
            self._paused_since = time.perf_counter()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self._pending is None:  # an evaluation this callback did not ask for
            return
        self.evaluations.append({**self._pending, **{k.removeprefix("eval_"): v for k, v in (metrics or {}).items()}})
        self._pending = None
        self._paused += time.perf_counter() - self._paused_since
        control.should_evaluate = False  # the epoch-end hook would otherwise evaluate the final model twice


# ---------------------------------------------------------------- interleaved processes


class Rotation:
    """Turn-taking between processes: participant i computes only between `wait(i)` and `pass_turn(i)`, and the
    turn goes round in index order, skipping finished participants. Made before the processes start, which
    inherit its semaphores; `messages` carries their ready signals, results and errors to the parent."""

    def __init__(self, context, size: int):
        self._turns = [context.Semaphore(0) for _ in range(size)]
        self._finished = context.Array("b", size)
        self._aborted = context.Value("b", 0)
        self.messages = context.Queue()

    def arrive(self, index: int) -> None:
        self.messages.put(("ready", index, None))

    def start(self) -> None:
        self._turns[0].release()

    def wait(self, index: int) -> None:
        self._turns[index].acquire()
        if self._aborted.value:
            raise RuntimeError("another process of the rotation failed")

    def pass_turn(self, index: int, finished: bool = False) -> None:
        if finished:
            self._finished[index] = 1
        size = len(self._turns)
        for offset in range(1, size + 1):
            following = (index + offset) % size
            if not self._finished[following]:
                self._turns[following].release()
                return

    def abort(self) -> None:
        self._aborted.value = 1
        for turn in self._turns:
            turn.release()


def run_interleaved(target, jobs: list[tuple], names: list[str], label: str) -> dict[str, object]:
    """Runs `target(index, *job, rotation)` in one spawned process per job, the processes taking turns through a
    `Rotation` (started once every one has arrived), so that one computes at a time and slow phases of the machine
    hit all of them; returns {name: the result each put on `rotation.messages`}."""
    context = multiprocessing.get_context("spawn")
    rotation = Rotation(context, len(jobs))
    processes = [
        context.Process(target=target, args=(index, *job, rotation), name=name) for index, (job, name) in enumerate(zip(jobs, names))
    ]
    for process in processes:
        process.start()
    ready, results = set(), {}
    try:
        while len(results) < len(processes):
            try:
                kind, index, payload = rotation.messages.get(timeout=10)
            except queue.Empty:
                dead = [p.name for p in processes if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"{label}: the processes of {dead} died without a report") from None
                continue
            if kind == "error":
                raise RuntimeError(f"{label}: {names[index]} failed:\n{payload}")
            if kind == "ready":
                ready.add(index)
                if len(ready) == len(processes):
                    rotation.start()
            else:
                results[names[index]] = payload
    except BaseException:
        rotation.abort()
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
        raise
    for process in processes:
        process.join()
    return results


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB): VmHWM on Linux, which starts afresh in a new program
    (ru_maxrss carries the parent's peak over fork and exec, so every spawned child would report at least that)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- output


def format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of `rows` (missing values print as '-')."""
    cells = [[format_value(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(row[i]) for row in cells)) for i, column in enumerate(columns)]
    lines = [
        "| " + " | ".join(column.ljust(width) for column, width in zip(columns, widths)) + " |",
        "|" + "|".join("-" * (width + 2) for width in widths) + "|",
    ]
    lines += ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def device_description() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} logical cores"
