"""Model cards: what `create_model_card` writes after a run, the card of every save, and `push_to_hub` up to the
network boundary (the Hub API is replaced, and any attempt to open a connection fails the test)."""

import re
import socket
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import HfApi, ModelCard, RepoUrl

from transformers import ViTModel

from conftest import image_dataset, tiny_vit
from lgp_hf import PredictedGradientArguments, PredictedGradientTrainer
from lgp_hf.theory import batch_size_advice
from lgp_hf.model_card import (
    AUTO_STATISTICS,
    KEEP_STATISTICS,
    PREDICTOR_STATISTICS,
    LGP_TAGS,
    NOT_MEASURED,
    STATISTICS_ROWS,
    TEMPLATE_PATH,
    build_model_card,
    default_reproduce_command,
    efficiency_verdict,
    format_duration,
    format_number,
    format_percent,
    unbiasedness_text,
)

REPO_ID = "someone/tiny-vit-lgp"
FAKE_TOKEN = "hf_fake_token_for_tests"


def accuracy(prediction):
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


def make_trainer(quiet_args, train_examples=32, **overrides):
    settings = dict(
        quiet_args, per_device_train_batch_size=8, max_steps=4, logging_steps=1, control_fraction=0.5,
        learning_rate=1e-3, seed=0,
    )
    settings.update(overrides)
    return PredictedGradientTrainer(
        model=tiny_vit(), args=PredictedGradientArguments(**settings), train_dataset=image_dataset(train_examples),
        eval_dataset=image_dataset(16, seed=1), compute_metrics=accuracy,
    )


LABELS = {key: label for key, label, _ in STATISTICS_ROWS}


def statistics_section(text: str) -> str:
    return text.split("### Training statistics", 1)[1].split("\n#", 1)[0]


def statistic_lines(text: str) -> dict[str, str]:
    """The card's statistics list: label -> value."""
    lines = [line[2:] for line in statistics_section(text).splitlines() if line.startswith("- ")]
    return dict(line.split(": ", 1) for line in lines)


def verdict_of(text: str) -> str | None:
    """The paragraph after the statistics list (the F x cost verdict), or None."""
    paragraphs = [p.strip() for p in statistics_section(text).split("\n\n") if p.strip()]
    assert paragraphs[0].startswith("Measured during training.")  # the template's explanation
    rest = [p for p in paragraphs[1:] if not p.startswith("- ")]
    assert len(rest) <= 1, rest
    return rest[0] if rest else None


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"the test tried to open a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def fake_hub(monkeypatch, no_network):
    """`HfApi.create_repo` and `HfApi.upload_folder` (what `Trainer.init_hf_repo`, `push_to_hub` and
    `_push_from_checkpoint` call, through transformers' shared `hf_api()`) record their calls and, for uploads,
    what the folder holds at that moment."""
    calls = {"create_repo": [], "upload_folder": []}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append(dict(kwargs, repo_id=repo_id))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        readme = folder / "README.md"
        calls["upload_folder"].append(
            dict(
                kwargs,
                files=sorted(p.name for p in folder.iterdir()),
                readme=readme.read_text(encoding="utf-8") if readme.is_file() else None,
            )
        )
        if kwargs.get("run_as_future"):
            future = Future()
            future.set_result(f"https://huggingface.co/{kwargs['repo_id']}/commit/0")
            return future
        return f"https://huggingface.co/{kwargs['repo_id']}/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_create_model_card_records_the_run(quiet_args, no_network):
    trainer = make_trainer(quiet_args, eval_strategy="steps", eval_steps=2)
    trainer.train()
    final_eval = trainer.evaluate()
    command = "python examples/run_vit.py --control_fraction 0.5 --max_steps 4"
    trainer.create_model_card(reproduce_command=command)

    path = Path(trainer.args.output_dir) / "README.md"
    card = ModelCard.load(path)
    data = card.data
    assert data.library_name == "transformers"
    assert data.tags[:2] == list(LGP_TAGS) and "generated_from_trainer" in data.tags
    assert data.metrics == ["accuracy"]
    assert data.get("base_model") is None  # trained from scratch
    [result] = data.eval_results
    assert (result.task_type, result.metric_type) == ("image-classification", "accuracy")
    assert result.metric_value == pytest.approx(final_eval["eval_accuracy"])
    assert data.model_name == Path(trainer.args.output_dir).name

    text = card.text
    assert "arXiv 2511.05187" in text and "https://arxiv.org/abs/2511.05187" in text
    assert "importance-sampled backward" in text and "variance factor F" in text
    for line in (
        "- control_fraction: 0.5", "- sampling_uniform_mix: 0.1", "- auto_observation_period: 10",
        "- auto_observation_budget: 0.03", "- unbiasedness_check: True", "- unbiasedness_check_draws: 32",
        "- head_modules: classifier",
        "- learning_rate: 0.001", "- train_batch_size: 8", "- seed: 0", "- training_steps: 4",
    ):
        assert line in text, line
    # A fixed fraction: the settings and statistics of "auto", and the removed predictor, are not listed.
    for absent in ("auto_min_control_fraction", "auto_decision_steps", "unbiasedness_check_budget", "predictor", "alignment"):
        assert absent not in text, absent
    assert not any(LABELS[key] in text for key in AUTO_STATISTICS + KEEP_STATISTICS)  # exact weight gradients: no keep rows

    summary = trainer.lgp_summary()
    assert summary["lgp_unbiasedness_check"] == "passed"
    assert 0 < summary["lgp_drawn_fraction"] < 1 and 0 < summary["lgp_trunk_rows_computed"] < 1
    assert summary["lgp_variance_factor"] > 1  # drawing half of the rows adds variance
    runtime = next(entry["train_runtime"] for entry in trainer.state.log_history if "train_runtime" in entry)
    for line in (
        "- Control fraction (final): 0.5000",
        f"- Rows drawn for the trunk's backward: {format_percent(summary['lgp_drawn_fraction'])}",
        f"- Rows backpropagated through the trunk's blocks: {format_percent(summary['lgp_trunk_rows_computed'])}",
        f"- {LABELS['lgp_variance_factor']}: {format_number(summary['lgp_variance_factor'])}",
        f"- {LABELS['lgp_step_cost']}: {format_number(summary['lgp_step_cost'])}",
        "- Trunk blocks (backward replayed on the drawn rows): 2",
        "- Trunk blocks run dense (not replayable on a subset of rows): 0",
        "- Draws made uniform (gradient not finite): 0",
        "- Optimizer steps: 4",
        f"- Wall-clock training time: {format_duration(runtime)}",
        f"- Accuracy: {format_number(final_eval['eval_accuracy'])}",
        f"- Loss: {format_number(final_eval['eval_loss'])}",
    ):
        assert line in text, line
    # The check's status comes with its numbers.
    assert re.search(
        r"^- Unbiasedness check: passed \(largest \|z\| \d+\.\d\d against a threshold of \d+\.\d\d, 32 draws at control fraction 0\.5\)$",
        text, re.MULTILINE,
    ), statistic_lines(text)["Unbiasedness check"]
    # "not measured" only where the run measured nothing.
    unmeasured = {LABELS[key] for key in LABELS if key in summary and summary[key] is None and key not in AUTO_STATISTICS + PREDICTOR_STATISTICS + KEEP_STATISTICS}
    assert {label for label, value in statistic_lines(text).items() if value == NOT_MEASURED} == unmeasured

    factor, cost = summary["lgp_variance_factor"], summary["lgp_step_cost"]
    if cost is None:  # timed against plain Trainer steps, which a run at a fixed f < 1 may not take
        assert verdict_of(text) == (
            f"The step cost was not measured (it is timed against plain `Trainer` steps of the same run), so F x cost "
            f"is unknown: with F = {format_number(factor)}, the sampled backward saves compute only where its step "
            f"costs less than 1 / F = {format_number(1 / factor)} of a `Trainer` step."
        )
    else:
        assert verdict_of(text).startswith(f"F x cost = {format_number(factor)} x {format_number(cost)} = {format_number(factor * cost)}: ")
    assert f"```bash\n{command}\n```" in text
    assert "| Step | Epoch | Training loss | Control fraction | Rows drawn | Variance factor F |" in text  # the training log
    assert "None" not in card.content and "{{" not in text


def test_card_of_an_auto_run_that_kept_plain_backprop(quiet_args, no_network):
    # Four steps: too short for the unbiasedness check's budget, so "auto" cannot lower f; it still decides twice.
    trainer = make_trainer(
        quiet_args, control_fraction="auto", auto_decision_steps=2, auto_observation_period=1,
        per_device_train_batch_size=32, train_examples=64,
    )
    trainer.train()
    trainer.create_model_card()
    text = (Path(trainer.args.output_dir) / "README.md").read_text(encoding="utf-8")

    summary = trainer.lgp_summary()
    assert summary["lgp_control_fraction"] == 1.0 and summary["lgp_drawn_fraction"] == 1.0
    assert summary["lgp_variance_factor"] == 1.0 and summary["lgp_step_cost"] is None
    best, predicted = summary["lgp_best_fraction"], summary["lgp_predicted_efficiency"]
    assert best is not None and best < 1 and predicted is not None
    for line in (
        "- control_fraction: auto (final 1.0000)", "- auto_min_control_fraction: 0.1", "- auto_decision_steps: 2",
        "- auto_observation_period: 1", "- unbiasedness_check_budget: 0.02",
        "- Control fraction (final): 1.0000",
        "- Rows drawn for the trunk's backward: 100.0%",
        f"- {LABELS['lgp_variance_factor']}: 1.0000",
        f"- {LABELS['lgp_best_fraction']}: {format_number(best)}",
        f"- {LABELS['lgp_predicted_efficiency']}: {format_number(predicted)}",
    ):
        assert line in text, line
    assert re.search(r"^- Unbiasedness check: (not run|skipped \(the run \(4 steps\) is too short)", text, re.MULTILINE)
    assert verdict_of(text) == (
        "No step of this run sampled rows (the control fraction stayed at 1): it trained as plain backpropagation, "
        f"so there is no F x cost to report. At the last decision of auto the best candidate, control fraction "
        f"{format_number(best)}, had a predicted time to a given loss of {format_number(predicted)} of Trainer's."
    )
    assert "| Control fraction | Rows drawn | Variance factor F | Predicted time | Noise scale |" in text
    assert f"- {LABELS['lgp_noise_scale']}: {format_number(summary['lgp_noise_scale'])}" in text
    assert f"- {LABELS['lgp_batch_size']}: 32" in text


def test_card_of_a_model_without_a_head_says_sampling_was_off(quiet_args, no_network):
    model = ViTModel(tiny_vit().config, add_pooling_layer=False)  # no classifier: nothing to sample at
    trainer = PredictedGradientTrainer(model=model, args=PredictedGradientArguments(**quiet_args, control_fraction=0.5))
    assert trainer.disabled_reason is not None and "has no head" in trainer.disabled_reason
    trainer.create_model_card(reproduce_command="python train.py")
    text = (Path(trainer.args.output_dir) / "README.md").read_text(encoding="utf-8")
    assert f"- head_modules: none ({trainer.disabled_reason})" in text
    assert "- Control fraction (final): 1.0000" in text  # trains as Trainer although 0.5 was asked for
    assert f"- {LABELS['lgp_variance_factor']}: {NOT_MEASURED}" in text
    assert verdict_of(text) == (
        f"Sampling was turned off in this run ({trainer.disabled_reason}); from then on every step was plain "
        "backpropagation. No step of this run sampled rows (the control fraction stayed at 1): it trained as plain "
        "backpropagation, so there is no F x cost to report."
    )
    assert "- Optimizer steps: 0" in text and "- Wall-clock training time: training in progress" in text


def test_every_save_writes_the_card_and_remembers_its_arguments(quiet_args, no_network):
    trainer = make_trainer(quiet_args, save_strategy="steps", save_steps=2)
    output_dir = Path(trainer.args.output_dir)
    trainer.train()
    for step in (2, 4):
        card = ModelCard.load(output_dir / f"checkpoint-{step}" / "README.md")
        assert card.data.tags[:2] == list(LGP_TAGS)
        assert f"- Optimizer steps: {step}" in card.text
    # Saved inside train(), before its final log: the run is still in progress.
    assert "- Wall-clock training time: training in progress" in (output_dir / "checkpoint-4" / "README.md").read_text()

    trainer.create_model_card(
        finetuned_from="google/vit-base-patch16-224-in21k", dataset_tags="uoft-cs/cifar10", dataset="CIFAR-10",
        license="apache-2.0", reproduce_command="python train.py",
    )
    (output_dir / "README.md").unlink()
    trainer.save_model()
    card = ModelCard.load(output_dir / "README.md")
    assert card.data.base_model == "google/vit-base-patch16-224-in21k"
    assert card.data.datasets == ["uoft-cs/cifar10"] and card.data.license == "apache-2.0"
    assert "on the CIFAR-10 dataset" in card.text and "```bash\npython train.py\n```" in card.text
    runtime = next(entry["train_runtime"] for entry in trainer.state.log_history if "train_runtime" in entry)
    assert f"- Wall-clock training time: {format_duration(runtime)}" in card.text


def test_push_to_hub_uploads_the_card_with_the_tags(quiet_args, fake_hub):
    trainer = make_trainer(
        quiet_args, save_strategy="steps", save_steps=2, push_to_hub=True, hub_model_id=REPO_ID,
        hub_token=FAKE_TOKEN, hub_strategy="every_save",
    )
    # transformers' Trainer does not tag the model itself; PredictedGradientTrainer does, so the pushed card has them.
    assert set(LGP_TAGS) <= set(trainer.model.model_tags)
    assert fake_hub["create_repo"] == [dict(repo_id=REPO_ID, token=FAKE_TOKEN, private=None, exist_ok=True)]

    trainer.train()
    checkpoint_pushes = [call for call in fake_hub["upload_folder"] if call["commit_message"].startswith("Training in progress")]
    assert [call["commit_message"] for call in checkpoint_pushes] == ["Training in progress, step 2", "Training in progress, step 4"]
    first = checkpoint_pushes[0]
    assert first["folder_path"] == trainer.args.output_dir and "README.md" in first["files"]
    assert ModelCard(first["readme"]).data.tags[:2] == list(LGP_TAGS) and "- Optimizer steps: 2" in first["readme"]

    trainer.push_to_hub(commit_message="End of training", tags="vision")
    push = fake_hub["upload_folder"][-1]
    assert (push["repo_id"], push["folder_path"], push["token"]) == (REPO_ID, trainer.args.output_dir, FAKE_TOKEN)
    assert push["commit_message"] == "End of training" and not push["run_as_future"]
    assert {"README.md", "config.json", "model.safetensors"} <= set(push["files"])
    card = ModelCard(push["readme"])
    assert card.data.tags[:2] == list(LGP_TAGS) and {"vision", "generated_from_trainer"} <= set(card.data.tags)
    assert card.data.library_name == "transformers"
    assert card.text.lstrip("\n").count("# tiny-vit-lgp") >= 1  # push_to_hub names the model after the repo
    assert "- Optimizer steps: 4" in card.text and FAKE_TOKEN not in push["readme"]


def test_build_model_card_from_plain_values():
    card = build_model_card(
        model_name="plain",
        lgp_hyperparameters={"control_fraction": 0.25, "sampling_uniform_mix": 0.1},
        training_hyperparameters={"learning_rate": 0.01},
        statistics={
            "lgp_variance_factor": None, "lgp_drawn_fraction": 0.25, "lgp_unbiasedness_check": "passed",
            "lgp_uniform_draws": 2, "global_step": 3, "train_runtime": 3725.0,
        },
        eval_results={"loss": 0.5},
        base_model="org/base",
        tags=["extra", "lgp-hf"],
    )
    card = ModelCard(card.content)  # survives a round trip through the file format
    assert card.data.tags == [*LGP_TAGS, "extra"] and card.data.base_model == "org/base"
    assert card.data.get("model-index") is None and card.data.get("metrics") is None  # no task, loss only
    assert "- control_fraction: 0.25" in card.text and "- sampling_uniform_mix: 0.1" in card.text
    assert statistic_lines(card.text) == {
        "Rows drawn for the trunk's backward": "25.0%",
        LABELS["lgp_variance_factor"]: NOT_MEASURED,
        "Unbiasedness check": "passed",
        "Draws made uniform (gradient not finite)": "2",
        "Optimizer steps": "3",
        "Wall-clock training time": "3725.0 s (1:02:05)",
    }  # only the statistics given, in STATISTICS_ROWS' order and formats
    assert list(statistic_lines(card.text)) == [label for key, label, _ in STATISTICS_ROWS if label in statistic_lines(card.text)]
    assert "fine-tuned version of [org/base](https://huggingface.co/org/base)" in card.text
    assert "- Loss: 0.5000" in card.text and "No evaluation results" not in card.text
    assert verdict_of(card.text) is None  # no F, no cost: nothing to conclude
    assert TEMPLATE_PATH.is_file() and TEMPLATE_PATH.parent.name == "templates"


@pytest.mark.parametrize(
    ("statistics", "verdict"),
    [
        (
            {"lgp_variance_factor": 1.5, "lgp_step_cost": 0.5},
            "F x cost = 1.5000 x 0.5000 = 0.7500: at equal gradient noise, the sampled backward saved compute "
            "compared with plain backpropagation in this run.",
        ),
        (
            {"lgp_variance_factor": 2.0, "lgp_step_cost": 0.6, "lgp_drawn_fraction": 0.4},
            "F x cost = 2.0000 x 0.6000 = 1.2000: at equal gradient noise, the sampled backward did not save compute "
            "compared with plain backpropagation in this run.",
        ),
        (  # break-even exactly: no saving
            {"lgp_variance_factor": 2.0, "lgp_step_cost": 0.5},
            "F x cost = 2.0000 x 0.5000 = 1.0000: at equal gradient noise, the sampled backward did not save compute "
            "compared with plain backpropagation in this run.",
        ),
        (
            {"lgp_variance_factor": 4.0, "lgp_step_cost": None, "lgp_drawn_fraction": 0.25},
            "The step cost was not measured (it is timed against plain `Trainer` steps of the same run), so F x cost "
            "is unknown: with F = 4.0000, the sampled backward saves compute only where its step costs less than "
            "1 / F = 0.2500 of a `Trainer` step.",
        ),
        (
            {"lgp_variance_factor": 1.0, "lgp_step_cost": None, "lgp_drawn_fraction": 1.0},
            "No step of this run sampled rows (the control fraction stayed at 1): it trained as plain backpropagation, "
            "so there is no F x cost to report.",
        ),
        (
            {"lgp_variance_factor": None, "lgp_drawn_fraction": None, "lgp_disabled_reason": "a compiled model"},
            "Sampling was turned off in this run (a compiled model); from then on every step was plain backpropagation. "
            "No step of this run sampled rows (the control fraction stayed at 1): it trained as plain backpropagation, "
            "so there is no F x cost to report.",
        ),
        (  # the batch 4 times the noise scale: the advice follows the verdict
            {"lgp_variance_factor": 1.5, "lgp_step_cost": 0.5, "lgp_noise_scale": 16.0, "lgp_batch_size": 64},
            "F x cost = 1.5000 x 0.5000 = 0.7500: at equal gradient noise, the sampled backward saved compute "
            "compared with plain backpropagation in this run. " + batch_size_advice(64, 16.0),
        ),
        ({"lgp_variance_factor": 1.5, "lgp_step_cost": 0.5, "lgp_noise_scale": 40.0, "lgp_batch_size": 64},
         "F x cost = 1.5000 x 0.5000 = 0.7500: at equal gradient noise, the sampled backward saved compute "
         "compared with plain backpropagation in this run."),
        ({"lgp_variance_factor": None, "lgp_step_cost": 0.7}, None),
        ({}, None),
    ],
)
def test_verdict_compares_f_times_cost_with_one(statistics, verdict):
    assert efficiency_verdict(statistics) == verdict
    card = build_model_card(model_name="v", lgp_hyperparameters={}, training_hyperparameters={}, statistics=statistics)
    assert verdict_of(card.text) == verdict
    if statistics.get("lgp_step_cost") is not None:
        assert f"- {LABELS['lgp_step_cost']}: {format_number(statistics['lgp_step_cost'])}" in card.text


def test_unbiasedness_text():
    passed = {"status": "passed", "worst_z": 2.3456, "threshold": 5.2, "draws": 32, "fraction": 0.25, "worst_tensors": ["a (|z| 2.3)"]}
    assert unbiasedness_text(passed) == "passed (largest |z| 2.35 against a threshold of 5.20, 32 draws at control fraction 0.25)"
    failed = {**passed, "status": "failed", "worst_z": 9.0, "worst_tensors": ["w1 (|z| 9.0)", "w2 (|z| 6.1)"]}
    assert unbiasedness_text(failed) == (
        "failed (largest |z| 9.00 against a threshold of 5.20, 32 draws at control fraction 0.25); largest in w1 (|z| 9.0), w2 (|z| 6.1)"
    )
    assert unbiasedness_text({"status": "skipped", "reason": "the run is too short"}) == "skipped (the run is too short)"
    assert unbiasedness_text({"status": "not run"}) == "not run"


def test_reproduce_command_from_argv_redacts_secrets():
    argv = ["examples/run_vit.py", "--hub_token", "hf_secret", "--token=hf_other", "--max_new_tokens", "5", "--lr", "1e-3"]
    assert default_reproduce_command(argv) == (
        "python examples/run_vit.py --hub_token '***' '--token=***' --max_new_tokens 5 --lr 1e-3"
    )
    assert default_reproduce_command(argv[:1], num_processes=2) == "accelerate launch --num_processes 2 examples/run_vit.py"
    assert default_reproduce_command(["-c"]) is None
