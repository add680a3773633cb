"""Tiny models built from configs (nothing from the Hub) and the data sets the tests share."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# The tests' models are tiny: one thread is faster for them than two, and keeps them fast on a shared machine.
torch.set_num_threads(1)
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR10_SUBSET = REPO_ROOT / "examples" / "data" / "cifar10_subset"


def tiny_vit(num_labels: int = 3, seed: int = 0, image_size: int = 8) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=image_size, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=num_labels,
    )
    return ViTForImageClassification(config)


def tiny_bert_regressor(seed: int = 0) -> BertForSequenceClassification:
    """A BERT regressor (num_labels=1: MSE loss), dropout off so that gradients are deterministic."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def image_dataset(num_examples: int, num_labels: int = 3, seed: int = 0, image_size: int = 8) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(num_examples, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, num_labels, (num_examples,), generator=generator)
    return Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": labels.numpy()}).with_format("torch")


def text_regression_dataset(num_examples: int, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 50, (num_examples, 6), generator=generator)
    labels = torch.randn(num_examples, generator=generator)
    return Dataset.from_dict({"input_ids": input_ids.numpy(), "labels": labels.numpy()}).with_format("torch")


@pytest.fixture
def quiet_args(tmp_path):
    """Keyword arguments every test trainer shares: CPU, no reports, no saving, no progress bars."""
    return dict(output_dir=str(tmp_path / "out"), report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True)
