"""Per-row squared gradient norms of the trunk's linear layers, read in the backward, against per-example autograd."""

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from lgp_hf.boundary import sampled_boundary
from lgp_hf.replay import BlockReplay, find_blocks
from lgp_hf.row_norms import RowGradientNorms, linear_row_squared_norms
from conftest import image_dataset, tiny_vit
from test_replay import KEEP, FixedRows


@pytest.mark.parametrize("positions,width_in,width_out", [(3, 4, 5), (20, 2, 3)])  # the direct product, then the Gram form
@pytest.mark.parametrize("layer_type", ["linear", "conv1d"])
def test_row_norms_equal_per_example_gradient_norms(positions, width_in, width_out, layer_type):
    torch.manual_seed(0)
    layer = torch.nn.Linear(width_in, width_out) if layer_type == "linear" else Conv1D(width_out, width_in)
    inputs = torch.randn(6, positions, width_in)
    errors = torch.randn(6, positions, width_out)
    expected = []
    for row in range(6):
        layer.zero_grad()
        (layer(inputs[row : row + 1]) * errors[row : row + 1]).sum().backward()
        expected.append(layer.weight.grad.pow(2).sum() + layer.bias.grad.pow(2).sum())
    torch.testing.assert_close(linear_row_squared_norms(inputs, errors, bias=True), torch.stack(expected), rtol=1e-5, atol=1e-6)


def per_example_linear_norms(model, batch, blocks):
    """sum over the blocks' linear layers of ||d(loss_i / n) / dW||^2, example by example (plain autograd)."""
    layers = RowGradientNorms(blocks).layers
    rows = len(batch["labels"])
    norms = []
    for row in range(rows):
        model.zero_grad()
        single = {key: value[row : row + 1] for key, value in batch.items()}
        (model(**single).loss / rows).backward()
        norms.append(sum(float(p.grad.pow(2).sum()) for layer in layers for p in layer.parameters()))
    return torch.tensor(norms, dtype=torch.float64)


def test_hooks_read_the_rows_norms_in_a_plain_and_in_a_replayed_backward():
    model, batch = tiny_vit(), image_dataset(8)[:8]
    blocks = find_blocks(model, [model.classifier])
    exact = per_example_linear_norms(model, batch, blocks)
    recorder = RowGradientNorms(blocks)
    replay = BlockReplay(blocks)

    model.zero_grad()
    with recorder.recording(lambda: 8, replay.row_index):
        model(**batch).loss.backward()
    torch.testing.assert_close(recorder.squared_norms, exact, rtol=1e-4, atol=0)

    model.zero_grad()
    with sampled_boundary([model.classifier], FixedRows()), replay.active(), recorder.recording(lambda: 8, replay.row_index):
        model(**batch).loss.backward()
    expected = torch.zeros(8, dtype=torch.float64)
    expected[KEEP] = 1.7**2 * exact[KEEP]
    torch.testing.assert_close(recorder.squared_norms, expected, rtol=1e-4, atol=0)
