"""Model cards for models trained with `PredictedGradientTrainer`: the method, its settings and what the run measured.

`build_model_card` renders the card from plain values (the package's Jinja template, `templates/model_card.md`,
through `huggingface_hub.ModelCard.from_template`); `model_card_from_trainer` collects those values from a trainer
(`lgp_summary()`, its arguments and its log history) and `write_model_card` saves the result as a folder's
README.md. Nothing here contacts the Hub.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .theory import batch_size_advice

TEMPLATE_PATH = Path(__file__).resolve().parent / "templates" / "model_card.md"
PAPER_URL = "https://arxiv.org/abs/2511.05187"
LGP_TAGS = ("lgp-hf", "predicted-gradients")
NOT_MEASURED = "not measured"
TRAINER_TAG = "generated_from_trainer"

# Statistics rows: (key in `statistics`, label, formatter).
_PERCENT, _NUMBER, _INTEGER, _DURATION, _TEXT = "percent", "number", "integer", "duration", "text"
STATISTICS_ROWS = (
    ("lgp_control_fraction", "Control fraction (final)", _NUMBER),
    ("lgp_weight_gradient_keep", "Weight gradient keep (final): expected share of token rows whose weight gradient term is computed", _NUMBER),
    ("lgp_weight_gradient_tokens_computed", "Token rows whose weight gradient term was computed, in the sampled layer calls", _PERCENT),
    ("lgp_drawn_fraction", "Rows drawn for the trunk's backward", _PERCENT),
    ("lgp_trunk_rows_computed", "Rows backpropagated through the trunk's blocks", _PERCENT),
    ("lgp_trunk_tokens_computed", "Token positions with a gradient in the trunk's blocks (their taped backwards skip the others)", _PERCENT),
    ("lgp_variance_factor", "Variance factor F of the update (against the full batch's, over the observed steps)", _NUMBER),
    ("lgp_step_cost", "Step cost (median of the last 25 timed sampled steps, against the median Trainer step)", _NUMBER),
    ("lgp_predictor_applied", "Gradient predictor (the paper's control variate)", _TEXT),
    ("lgp_predictor_variance_ratio", "F with the predictor over F without it (the same observed rows)", _NUMBER),
    ("lgp_predictor_cost", "The predictor's own work per step (share of a Trainer step)", _NUMBER),
    ("lgp_observation_overhead", "Extra time of an observed step at control fraction 1 (share of a Trainer step; observed steps read the rows' gradient norms)", _NUMBER),
    ("lgp_noise_scale", "Gradient noise scale B_noise (examples, over the observed steps)", _NUMBER),
    ("lgp_batch_size", "Batch of an optimizer step (examples, over accumulation and processes)", _INTEGER),
    ("lgp_best_fraction", "Control fraction with the lowest predicted time at the last decision of auto", _NUMBER),
    ("lgp_best_keep", "Weight gradient keep of the setting with the lowest predicted time at the last decision of auto", _NUMBER),
    ("lgp_predicted_efficiency", "Its predicted time to a given loss against Trainer's", _NUMBER),
    ("lgp_unbiasedness_check", "Unbiasedness check", _TEXT),
    ("lgp_blocks", "Trunk blocks (backward replayed on the drawn rows)", _INTEGER),
    ("lgp_dense_blocks", "Trunk blocks run dense (not replayable on a subset of rows)", _INTEGER),
    ("lgp_uniform_draws", "Draws made uniform (gradient not finite)", _INTEGER),
    ("global_step", "Optimizer steps", _INTEGER),
    ("train_runtime", "Wall-clock training time", _DURATION),
)
#: Statistics that only `control_fraction="auto"` measures (left out of the card of a run at a fixed fraction).
AUTO_STATISTICS = ("lgp_best_fraction", "lgp_predicted_efficiency", "lgp_observation_overhead")
#: Statistics of the token draws (left out of the card of a run with exact weight gradients: weight_gradient_keep=1).
KEEP_STATISTICS = ("lgp_weight_gradient_keep", "lgp_weight_gradient_tokens_computed", "lgp_best_keep")
#: Statistics of the gradient predictor (left out of the card of a run without one).
PREDICTOR_STATISTICS = ("lgp_predictor_applied", "lgp_predictor_variance_ratio", "lgp_predictor_cost")
# Keys of an evaluation log entry that are not results.
_EVAL_BOOKKEEPING = {"runtime", "samples_per_second", "steps_per_second", "model_preparation_time", "epoch", "step"}
# Training log columns: (log key, column title).
TRAINING_LOG_COLUMNS = (
    ("step", "Step"),
    ("epoch", "Epoch"),
    ("loss", "Training loss"),
    ("lgp/control_fraction", "Control fraction"),
    ("lgp/drawn_fraction", "Rows drawn"),
    ("lgp/variance_factor", "Variance factor F"),
    ("lgp/step_cost", "Step cost"),
    ("lgp/efficiency", "F x cost"),
    ("lgp/noise_scale", "Noise scale"),
    ("lgp/predicted_efficiency", "Predicted time"),
)
MAX_TABLE_ROWS = 30
# Command-line options whose values must not end up in a public card.
_SECRET_OPTION = re.compile(r"^--?(\w+[_-])?(token|api[_-]key|password|secret)$")


# ---------------------------------------------------------------------------------------------------- formatting


def format_number(value: Any) -> str:
    """How the card writes a measured number: 4 decimals (scientific below 1e-3), `"not measured"` for None."""
    if value is None:
        return NOT_MEASURED
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.3e}"
    return str(value)


def format_percent(value: float | None) -> str:
    return NOT_MEASURED if value is None else f"{100 * value:.1f}%"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return NOT_MEASURED
    text = f"{seconds:.1f} s"
    if seconds >= 60:
        minutes, secs = divmod(int(round(seconds)), 60)
        hours, minutes = divmod(minutes, 60)
        text += f" ({hours}:{minutes:02d}:{secs:02d})"
    return text


def format_statistic(kind: str, value: Any) -> str:
    if kind == _TEXT:
        return NOT_MEASURED if value is None else str(value)
    if kind == _PERCENT:
        return format_percent(value)
    if kind == _DURATION:
        return format_duration(value)
    return format_number(value)


def metric_label(key: str) -> str:
    """`eval_accuracy` / `accuracy` -> `Accuracy`, `f1_macro` -> `F1 Macro` (the base Trainer's card style)."""
    return " ".join(part.capitalize() for part in key.removeprefix("eval_").split("_"))


def markdown_table(rows: Sequence[Mapping[str, Any]], max_rows: int = MAX_TABLE_ROWS) -> str:
    """A Markdown table of `rows` (columns in first-seen order; missing cells empty), at most `max_rows` rows
    evenly spread over the run, the last one always included."""
    rows = list(rows)
    if not rows:
        return ""
    note = ""
    if len(rows) > max_rows:
        keep = sorted({round(i * (len(rows) - 1) / (max_rows - 1)) for i in range(max_rows)})
        note = f"\n\n{len(keep)} of {len(rows)} logged entries shown."
        rows = [rows[i] for i in keep]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(":---:" for _ in columns) + "|"]
    for row in rows:
        cells = ["" if row.get(column) is None else format_number(row[column]) for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + note


def redact_command(argv: Sequence[str]) -> list[str]:
    """`argv` with the values of token, API key, password and secret options replaced by `***`."""
    redacted, hide_next = [], False
    for arg in argv:
        if hide_next:
            redacted.append("***")
            hide_next = False
            continue
        name, sep, _ = arg.partition("=")
        if _SECRET_OPTION.match(name):
            if sep:
                redacted.append(f"{name}=***")
            else:
                redacted.append(arg)
                hide_next = True
            continue
        redacted.append(arg)
    return redacted


def default_reproduce_command(argv: Sequence[str] | None = None, num_processes: int = 1) -> str | None:
    """The command that is running, from `sys.argv` (None in an interactive session): `python script.py ...`, or
    `accelerate launch --num_processes N script.py ...` for a multi-process run. Secrets are redacted."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or argv[0] in ("", "-c", "-"):
        return None
    if num_processes > 1:
        prefix = ["accelerate", "launch", "--num_processes", str(num_processes)]
    elif argv[0].endswith(".py"):
        prefix = ["python"]
    else:
        prefix = []
    return shlex.join(prefix + redact_command(argv))


def _as_list(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [v for v in value if v is not None]


def _merge_tags(*groups: str | Iterable[str] | None) -> list[str]:
    return list(dict.fromkeys(tag for group in groups for tag in _as_list(group)))


# ---------------------------------------------------------------------------------------------------- the card


def efficiency_verdict(statistics: Mapping[str, Any]) -> str | None:
    """What the statistics say about compute (`theory.relative_efficiency`): F x cost against 1 when both were
    measured; else why there is no such product (sampling turned off, no sampled step, the cost not timed), with
    the break-even step cost 1 / F where F is known; and when the batch is well above the measured noise scale,
    `theory.batch_size_advice`. None when nothing can be said."""
    factor, cost = statistics.get("lgp_variance_factor"), statistics.get("lgp_step_cost")
    drawn, reason = statistics.get("lgp_drawn_fraction"), statistics.get("lgp_disabled_reason")
    sentences = []
    if reason:
        sentences.append(f"Sampling was turned off in this run ({reason}); from then on every step was plain backpropagation.")
    if factor is not None and cost is not None:
        efficiency = factor * cost
        effect = "saved compute" if efficiency < 1 else "did not save compute"
        sentences.append(
            f"F x cost = {format_number(factor)} x {format_number(cost)} = {format_number(efficiency)}: at equal "
            f"gradient noise, the sampled backward {effect} compared with plain backpropagation in this run."
        )
    elif "lgp_drawn_fraction" in statistics and (drawn is None or drawn >= 1):
        sentences.append(
            "No step of this run sampled rows (the control fraction stayed at 1): it trained as plain backpropagation, "
            "so there is no F x cost to report."
        )
        best, predicted = statistics.get("lgp_best_fraction"), statistics.get("lgp_predicted_efficiency")
        if best is not None and predicted is not None:
            sentences.append(
                f"At the last decision of auto the best candidate, control fraction {format_number(best)}, had a "
                f"predicted time to a given loss of {format_number(predicted)} of Trainer's."
            )
    elif factor is not None and factor > 0:
        sentences.append(
            f"The step cost was not measured (it is timed against plain `Trainer` steps of the same run), so F x cost "
            f"is unknown: with F = {format_number(factor)}, the sampled backward saves compute only where its step "
            f"costs less than 1 / F = {format_number(1 / factor)} of a `Trainer` step."
        )
    advice = batch_size_advice(statistics.get("lgp_batch_size"), statistics.get("lgp_noise_scale"))
    if advice is not None:
        sentences.append(advice)
    return " ".join(sentences) or None


def build_model_card(
    *,
    model_name: str,
    lgp_hyperparameters: Mapping[str, Any],
    training_hyperparameters: Mapping[str, Any],
    statistics: Mapping[str, Any],
    eval_results: Mapping[str, float] | None = None,
    training_log: Sequence[Mapping[str, Any]] | None = None,
    eval_log: Sequence[Mapping[str, Any]] | None = None,
    base_model: str | None = None,
    datasets: str | Sequence[str] | None = None,
    dataset_names: str | Sequence[str] | None = None,
    tags: str | Sequence[str] | None = None,
    task: str | None = None,
    language: str | Sequence[str] | None = None,
    license: str | None = None,
    reproduce_command: str | None = None,
    framework_versions: Mapping[str, str] | None = None,
    model_description: str | None = None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """The model card of a model trained with lgp_hf, from plain values.

    Args:
        model_name: the card's title and the model-index name.
        lgp_hyperparameters: the sampling settings (`control_fraction`, `sampling_uniform_mix`, ...), written as given.
        training_hyperparameters: the usual ones (`learning_rate`, `train_batch_size`, ...), written as given.
        statistics: measured values keyed like `PredictedGradientTrainer.lgp_summary()`, plus `global_step` and
            `train_runtime` (seconds, None while training is in progress); written with `STATISTICS_ROWS`'
            formats, None as "not measured". They also give the verdict (`efficiency_verdict`): F x cost against 1.
        eval_results: the final evaluation metrics without the `eval_` prefix (`{"loss": ..., "accuracy": ...}`).
            Every metric but the loss goes to the `metrics` metadata and, with `task`, to the model-index.
        training_log / eval_log: rows of the training-log and evaluation tables (column title -> value).
        base_model: the Hub id of the model this one was fine-tuned from (metadata `base_model`).
        datasets: Hub ids of the training data (metadata `datasets`); dataset_names: their display names.
        tags: more tags; `lgp-hf` and `predicted-gradients` are always first.
        task: the task type (`image-classification`, ...) of the model-index results.
        reproduce_command: the command that trained the model.
        framework_versions: package name -> version.
        template_path: a Jinja template in `huggingface_hub.ModelCard` style; defaults to the package's.
    """
    datasets = _as_list(datasets)
    dataset_names = _as_list(dataset_names) or datasets
    metrics = {
        key: float(value)
        for key, value in (eval_results or {}).items()
        if key != "loss" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    model_index = None
    if metrics and task:
        dataset_type = datasets[0] if datasets else "custom"
        dataset_name = dataset_names[0] if dataset_names else "Evaluation set"
        model_index = [
            EvalResult(
                task_type=task, dataset_type=dataset_type, dataset_name=dataset_name, metric_type=key,
                metric_name=metric_label(key), metric_value=value,
            )
            for key, value in metrics.items()
        ]
    card_data = ModelCardData(
        language=_as_list(language) or None,
        license=license,
        library_name="transformers",
        tags=_merge_tags(LGP_TAGS, tags),
        base_model=base_model or None,
        datasets=datasets or None,
        metrics=list(metrics) or None,
        model_name=model_name,
        eval_results=model_index,
    )

    if base_model:
        summary = f"This model is a fine-tuned version of [{base_model}](https://huggingface.co/{base_model})"
    else:
        summary = "This model was trained from scratch"
    if dataset_names:
        summary += " on " + (f"the {dataset_names[0]} dataset" if len(dataset_names) == 1 else "the " + ", ".join(dataset_names[:-1]) + f" and {dataset_names[-1]} datasets")
    summary += f", with an importance-sampled backward (lgp_hf, after [arXiv 2511.05187]({PAPER_URL}))."

    statistics_rows = [
        (label, format_statistic(kind, statistics.get(key)))
        for key, label, kind in STATISTICS_ROWS
        if key in statistics
    ]
    if "train_runtime" in statistics and statistics["train_runtime"] is None:
        statistics_rows = [
            (label, "training in progress" if label == "Wall-clock training time" else value) for label, value in statistics_rows
        ]
    verdict = efficiency_verdict(statistics)

    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path or TEMPLATE_PATH),
        model_name=model_name,
        summary=summary,
        model_description=model_description,
        lgp_hyperparameters=[(name, str(value)) for name, value in lgp_hyperparameters.items()],
        training_hyperparameters=[(name, str(value)) for name, value in training_hyperparameters.items()],
        statistics=statistics_rows,
        verdict=verdict,
        training_log_table=markdown_table(training_log or []),
        eval_results=[(metric_label(key), format_number(value)) for key, value in (eval_results or {}).items()],
        eval_log_table=markdown_table(eval_log or []),
        reproduce_command=reproduce_command,
        framework_versions=list((framework_versions or {}).items()),
    )
    return card


# ---------------------------------------------------------------------------------------------------- from a trainer


def lgp_hyperparameters_from_trainer(trainer) -> dict[str, Any]:
    """The sampling settings as `PredictedGradientArguments` field names, head modules as resolved."""
    args = trainer.lgp_settings
    auto = args.control_fraction == "auto"
    settings: dict[str, Any] = {}
    if auto:
        settings["control_fraction"] = f"auto (final {format_number(trainer.lgp_summary()['lgp_control_fraction'])})"
        settings["auto_min_control_fraction"] = args.auto_min_control_fraction
        settings["auto_decision_steps"] = args.auto_decision_steps
    else:
        settings["control_fraction"] = args.control_fraction
    settings["sampling_uniform_mix"] = args.sampling_uniform_mix
    if args.weight_gradient_keep == "auto":
        settings["weight_gradient_keep"] = f"auto (final {format_number(trainer.lgp_summary()['lgp_weight_gradient_keep'])})"
    elif args.weight_gradient_keep < 1:
        settings["weight_gradient_keep"] = args.weight_gradient_keep
    settings["auto_observation_period"] = args.auto_observation_period  # observed steps (for F) at any fraction
    settings["auto_observation_budget"] = args.auto_observation_budget
    settings["unbiasedness_check"] = args.unbiasedness_check
    if args.unbiasedness_check:
        settings["unbiasedness_check_draws"] = args.unbiasedness_check_draws
        if auto:
            settings["unbiasedness_check_budget"] = args.unbiasedness_check_budget
    settings["head_modules"] = ", ".join(trainer.head_module_names) if trainer.disabled_reason is None else f"none ({trainer.disabled_reason})"
    return settings


def unbiasedness_text(check: Mapping[str, Any]) -> str:
    """The unbiasedness check's outcome (`PredictedGradientMixin.unbiasedness`) in a line: the status, and the
    largest |z| against its threshold, or why it was skipped."""
    status = str(check.get("status", "not run"))
    if status in ("passed", "failed") and check.get("worst_z") is not None and check.get("threshold") is not None:
        text = f"{status} (largest |z| {check['worst_z']:.2f} against a threshold of {check['threshold']:.2f}"
        if check.get("draws") is not None:
            text += f", {check['draws']} draws"
        if check.get("fraction") is not None:
            text += f" at control fraction {check['fraction']:g}"
        text += ")"
        if status == "failed" and check.get("worst_tensors"):
            text += "; largest in " + ", ".join(check["worst_tensors"])
        return text
    if status == "skipped" and check.get("reason"):
        return f"skipped ({check['reason']})"
    return status


def training_hyperparameters_from_trainer(trainer) -> dict[str, Any]:
    """The usual hyperparameters, as the base Trainer's model card lists them."""
    from transformers.modelcard import extract_hyperparameters_from_trainer

    hyperparameters = extract_hyperparameters_from_trainer(trainer)
    optim = trainer.args.optim
    if isinstance(hyperparameters.get("optimizer"), str) and hasattr(optim, "value"):  # OptimizerNames.X -> x
        hyperparameters["optimizer"] = hyperparameters["optimizer"].replace(f"{optim}", optim.value)
    return hyperparameters


def eval_results_from_log(log_history: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """The metrics of the last evaluation in the log history (without the `eval_` prefix), or None."""
    for entry in reversed(log_history):
        results = {
            key.removeprefix("eval_"): value
            for key, value in entry.items()
            if key.startswith("eval_") and key.removeprefix("eval_") not in _EVAL_BOOKKEEPING
        }
        if results:
            return results
    return None


def training_log_from_history(log_history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        {title: entry.get(key) for key, title in TRAINING_LOG_COLUMNS if key in entry}
        for entry in log_history
        if "loss" in entry
    ]


def eval_log_from_history(log_history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for entry in log_history:
        metrics = {
            metric_label(key): value
            for key, value in entry.items()
            if key.startswith("eval_") and key.removeprefix("eval_") not in _EVAL_BOOKKEEPING
        }
        row = {"Step": entry.get("step"), "Epoch": entry.get("epoch"), **metrics}
        if metrics and (not rows or rows[-1] != row):  # a final evaluate() repeats the last in-training one
            rows.append(row)
    return rows


def framework_versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    versions = {"lgp_hf": __version__, "Transformers": transformers.__version__, "PyTorch": torch.__version__}
    try:
        import datasets

        versions["Datasets"] = datasets.__version__
    except ImportError:
        pass
    return versions


def _infer_task(model) -> str | None:
    from transformers.modelcard import TASK_MAPPING

    name = type(model).__name__
    for task, mapping in TASK_MAPPING.items():
        for value in mapping.values():
            if name == value or (isinstance(value, (tuple, list)) and name in value):
                return task
    return None


def _infer_dataset(trainer) -> str | None:
    """The Hub name of the trainer's data set when it came from a Hub builder (not csv/json/parquet/...)."""
    dataset = trainer.eval_dataset if trainer.eval_dataset is not None else trainer.train_dataset
    if isinstance(dataset, Mapping):
        dataset = next(iter(dataset.values()), None)
    builder = getattr(getattr(dataset, "info", None), "builder_name", None)
    if isinstance(builder, str) and builder and builder not in ("csv", "json", "pandas", "parquet", "text", "arrow", "imagefolder", "audiofolder", "generator"):
        return builder
    return None


def model_card_from_trainer(
    trainer,
    language: str | list[str] | None = None,
    license: str | None = None,
    tags: str | list[str] | None = None,
    model_name: str | None = None,
    finetuned_from: str | None = None,
    tasks: str | list[str] | None = None,
    dataset_tags: str | list[str] | None = None,
    dataset: str | list[str] | None = None,
    dataset_args: str | list[str] | None = None,
    reproduce_command: str | None = None,
) -> ModelCard:
    """The card of `trainer`'s run so far; the arguments are `Trainer.create_model_card`'s (plus
    `reproduce_command`, which defaults to the running command) and default as in the base Trainer."""
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    if finetuned_from is None:
        name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
        if isinstance(name_or_path, str) and name_or_path and not os.path.isdir(name_or_path):
            finetuned_from = name_or_path
    if dataset_tags is None:
        inferred = _infer_dataset(trainer)
        dataset_tags = [inferred] if inferred else None
    if dataset is None:
        dataset = dataset_tags
    task = _as_list(tasks)[0] if _as_list(tasks) else _infer_task(model)
    if model_name is None:
        model_name = Path(trainer.args.output_dir).name or finetuned_from or "model"
    if reproduce_command is None:
        reproduce_command = default_reproduce_command(num_processes=trainer.args.world_size)

    log_history = trainer.state.log_history
    statistics = dict(trainer.lgp_summary())
    if trainer.lgp_settings.control_fraction != "auto":
        for key in AUTO_STATISTICS:
            statistics.pop(key, None)
    if trainer.lgp_settings.weight_gradient_keep != "auto":
        statistics.pop("lgp_best_keep", None)
        if trainer.lgp_settings.weight_gradient_keep == 1:
            for key in KEEP_STATISTICS:
                statistics.pop(key, None)
    if statistics.get("lgp_predictor_applied") is None:
        for key in PREDICTOR_STATISTICS:
            statistics.pop(key, None)
    else:
        statistics["lgp_predictor_applied"] = "applied" if statistics["lgp_predictor_applied"] else "fitted and measured, not applied"
    check = getattr(trainer, "unbiasedness", None)
    if isinstance(check, Mapping) and "lgp_unbiasedness_check" in statistics:
        statistics["lgp_unbiasedness_check"] = unbiasedness_text(check)  # the status with its numbers
    statistics["global_step"] = trainer.state.global_step
    statistics["train_runtime"] = next(
        (entry["train_runtime"] for entry in reversed(log_history) if "train_runtime" in entry), None
    )
    return build_model_card(
        model_name=model_name,
        lgp_hyperparameters=lgp_hyperparameters_from_trainer(trainer),
        training_hyperparameters=training_hyperparameters_from_trainer(trainer),
        statistics=statistics,
        eval_results=eval_results_from_log(log_history),
        training_log=training_log_from_history(log_history),
        eval_log=eval_log_from_history(log_history),
        base_model=finetuned_from,
        datasets=dataset_tags,
        dataset_names=dataset,
        tags=_merge_tags(tags, model.model_tags if getattr(model, "model_tags", None) else None, TRAINER_TAG),
        task=task,
        language=language,
        license=license,
        reproduce_command=reproduce_command,
        framework_versions=framework_versions(),
    )


def write_model_card(trainer, folder: str | os.PathLike, **kwargs) -> Path:
    """Writes `model_card_from_trainer(trainer, **kwargs)` as `folder`/README.md and returns its path. Tags of a
    card already there are kept (as the base Trainer does); a PEFT card is then updated by the PEFT model."""
    path = Path(folder) / "README.md"
    is_peft_library = False
    if path.is_file():
        try:
            existing = ModelCard.load(path, ignore_metadata_errors=True).data
            kwargs["tags"] = _merge_tags(kwargs.get("tags"), existing.tags)
            is_peft_library = existing.get("library_name") == "peft"
        except Exception:  # an unreadable README is replaced
            pass
    model_card_from_trainer(trainer, **kwargs).save(path)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if is_peft_library and hasattr(model, "create_or_update_model_card"):
        model.create_or_update_model_card(str(folder))
    return path
