"""Model cards: what `create_model_card` writes after a run, the card of every save, and `push_to_hub` up to the
network boundary (the Hub API is replaced, and any attempt to open a connection fails the test)."""

import os
import socket
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import HfApi, ModelCard, RepoUrl

from conftest import image_dataset, tiny_vit
from lgp_hf import PredictedGradientArguments, PredictedGradientTrainer
from lgp_hf.model_card import (
    LGP_TAGS,
    NOT_MEASURED,
    TEMPLATE_PATH,
    build_model_card,
    default_reproduce_command,
    format_duration,
    format_number,
    format_percent,
)

REPO_ID = "someone/tiny-vit-lgp"
FAKE_TOKEN = "hf_fake_token_for_tests"


def accuracy(prediction):
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


def make_trainer(quiet_args, **overrides):
    settings = dict(
        quiet_args, per_device_train_batch_size=8, max_steps=4, logging_steps=1, control_fraction=0.5,
        learning_rate=1e-3, seed=0,
    )
    settings.update(overrides)
    return PredictedGradientTrainer(
        model=tiny_vit(), args=PredictedGradientArguments(**settings), train_dataset=image_dataset(32),
        eval_dataset=image_dataset(16, seed=1), compute_metrics=accuracy,
    )


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
    for line in (
        "- control_fraction: 0.5", "- predictor: ntk", "- predictor_refit_steps: 25", "- predictor_fit_chunks: 1", "- predictor_window_size: 16",
        "- predictor_memory_fraction: 0.25", "- predictor_ridge: 1.0", "- control_variate_coefficient: fitted", "- head_modules: classifier",
        "- learning_rate: 0.001", "- train_batch_size: 8", "- seed: 0", "- training_steps: 4",
    ):
        assert line in text, line

    summary = trainer.lgp_summary()
    measured = ("lgp_mean_alignment", "lgp_final_alignment", "lgp_break_even_alignment", "lgp_backward_forward_ratio", "lgp_cost_ratio")
    assert all(summary[key] is not None for key in measured), summary
    runtime = next(entry["train_runtime"] for entry in trainer.state.log_history if "train_runtime" in entry)
    for line in (
        f"- Mean alignment: {format_number(summary['lgp_mean_alignment'])}",
        f"- Final alignment: {format_number(summary['lgp_final_alignment'])}",
        f"- Break-even alignment (at the final control fraction and cost ratio): {format_number(summary['lgp_break_even_alignment'])}",
        f"- Backward work skipped (examples without a full backward): {format_percent(summary['lgp_backward_work_skipped'])}",
        f"- Backward/forward time ratio: {format_number(summary['lgp_backward_forward_ratio'])}",
        f"- Cost ratio c (time per predicted example / per control example): {format_number(summary['lgp_cost_ratio'])}",
        "- Optimizer steps: 4",
        f"- Wall-clock training time: {format_duration(runtime)}",
        f"- Accuracy: {format_number(final_eval['eval_accuracy'])}",
        f"- Loss: {format_number(final_eval['eval_loss'])}",
    ):
        assert line in text, line
    assert format_percent(summary["lgp_backward_work_skipped"]) == "50.0%"
    assert f"```bash\n{command}\n```" in text
    assert "| Step | Epoch | Training loss | Alignment |" in text  # the training log
    assert "None" not in card.content and NOT_MEASURED not in text and "{{" not in text


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
        lgp_hyperparameters={"control_fraction": 1.0, "predictor": "zero"},
        training_hyperparameters={"learning_rate": 0.01},
        statistics={"lgp_mean_alignment": None, "lgp_backward_work_skipped": 0.0, "global_step": 3, "train_runtime": 3725.0},
        eval_results={"loss": 0.5},
        base_model="org/base",
        tags=["extra", "lgp-hf"],
    )
    card = ModelCard(card.content)  # survives a round trip through the file format
    assert card.data.tags == [*LGP_TAGS, "extra"] and card.data.base_model == "org/base"
    assert card.data.get("model-index") is None and card.data.get("metrics") is None  # no task, loss only
    assert f"- Mean alignment: {NOT_MEASURED}" in card.text
    assert "- Backward work skipped (examples without a full backward): 0.0%" in card.text
    assert "- Wall-clock training time: 3725.0 s (1:02:05)" in card.text
    assert "fine-tuned version of [org/base](https://huggingface.co/org/base)" in card.text
    assert "break-even alignment (" not in card.text  # no verdict without both numbers
    assert TEMPLATE_PATH.is_file() and TEMPLATE_PATH.parent.name == "templates"


def test_reproduce_command_from_argv_redacts_secrets():
    argv = ["examples/run_vit.py", "--hub_token", "hf_secret", "--token=hf_other", "--max_new_tokens", "5", "--lr", "1e-3"]
    assert default_reproduce_command(argv) == (
        "python examples/run_vit.py --hub_token '***' '--token=***' --max_new_tokens 5 --lr 1e-3"
    )
    assert default_reproduce_command(argv[:1], num_processes=2) == "accelerate launch --num_processes 2 examples/run_vit.py"
    assert default_reproduce_command(["-c"]) is None
