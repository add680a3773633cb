"""Chunk contrasts (`lgp_hf.chunks`, `predictor_fit_chunks`): the math on plain tensors, the hooks against chunk
gradients taken by autograd one chunk at a time, and the trainer with them (unbiased, learning, arguments)."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lgp_hf import PredictedGradientArguments, PredictedGradientTrainer
from lgp_hf.chunks import ChunkContrasts, chunk_sizes, contrast_matrix, linear_gradient_contrasts, pack_pairs, unpack_pairs
from lgp_hf.heads import ModelPartition, capture_head
from conftest import image_dataset, tiny_vit
from test_model_families import BATCH, FAMILIES, gpt2, lm_data
from test_unbiased import Z_LIMIT, max_z_score


@pytest.mark.parametrize("sizes", [[4, 4], [3, 3, 2], [1, 1, 1, 1, 1], [5, 2, 2, 1]])
def test_contrasts_are_orthonormal_and_cancel_the_mean(sizes):
    matrix = contrast_matrix(sizes)
    root = torch.tensor(sizes, dtype=torch.float64).sqrt()
    assert matrix.shape == (len(sizes) - 1, len(sizes))
    torch.testing.assert_close((matrix * root) @ (matrix * root).T, torch.eye(len(sizes) - 1, dtype=torch.float64))
    torch.testing.assert_close(matrix @ torch.tensor(sizes, dtype=torch.float64), torch.zeros(len(sizes) - 1, dtype=torch.float64))


def test_contrasts_of_iid_examples_have_one_examples_covariance():
    """E c_j c_j^T = Var(one example) and E c_j = 0 whatever the mean: what makes them fit data for the spread."""
    sizes = chunk_sizes(10, 4)
    assert sizes == [3, 3, 2, 2]
    generator = torch.Generator().manual_seed(0)
    examples = 5.0 + 2.0 * torch.randn(20000, 10, 1, generator=generator, dtype=torch.float64)  # mean 5, variance 4
    sums = torch.stack([chunk.sum(1) for chunk in examples.split(sizes, dim=1)], 1)  # (draws, K, 1)
    contrasts = torch.einsum("jk,dkw->djw", contrast_matrix(sizes), sums)
    assert contrasts.mean().abs() < 0.05
    torch.testing.assert_close(contrasts.pow(2).mean((0, 2)), torch.full((3,), 4.0, dtype=torch.float64), rtol=0.05, atol=0)


@pytest.mark.parametrize("layer", [nn.Linear(5, 3), Conv1D(3, 5)])
def test_linear_contrasts_equal_chunk_gradients_by_autograd(layer):
    torch.manual_seed(0)
    inputs, target = torch.randn(7, 4, 5), torch.randn(7, 4, 3)
    sizes = chunk_sizes(7, 3)
    chunk_gradients = []
    for x, y in zip(inputs.split(sizes), target.split(sizes)):
        layer.zero_grad()
        (layer(x) - y).pow(2).sum().backward()
        chunk_gradients.append((layer.weight.grad.clone(), layer.bias.grad.clone()))
    output = layer(inputs)
    errors = torch.autograd.grad((output - target).pow(2).sum(), output)[0]
    weight, bias = linear_gradient_contrasts(inputs, errors, contrast_matrix(sizes), sizes, transposed=isinstance(layer, Conv1D))
    matrix = contrast_matrix(sizes).float()
    torch.testing.assert_close(weight, torch.einsum("jk,k...->j...", matrix, torch.stack([w for w, _ in chunk_gradients])))
    torch.testing.assert_close(bias, matrix @ torch.stack([b for _, b in chunk_gradients]))


def test_packed_pairs_unpack_to_the_same_pairs_without_the_missing_ones():
    """The rows that DDP ranks gather: a compressed tensor (U, V) and a dense one per pair; a missing pair is NaN."""
    generator = torch.Generator().manual_seed(0)

    def pair():
        return torch.randn(3, generator=generator), [(torch.randn(4, 2, generator=generator), torch.randn(5, 2, generator=generator)), torch.randn(6, generator=generator)]

    pairs = [pair(), (None, None), pair()]
    rows = pack_pairs(pairs, pairs[0][1], 3)
    assert rows.shape == (3, 3 + 8 + 10 + 6) and torch.isnan(rows[1]).all()
    unpacked = unpack_pairs(rows, pairs[0][1], 3)
    assert len(unpacked) == 2
    for (signal, parts), (expected_signal, expected_parts) in zip(unpacked, [pairs[0], pairs[2]]):
        assert torch.equal(signal, expected_signal)
        assert torch.equal(parts[0][0], expected_parts[0][0]) and torch.equal(parts[0][1], expected_parts[0][1])
        assert torch.equal(parts[1], expected_parts[1])


def keep_raw(index, rows):
    """An `encode` for ChunkContrasts that keeps the contrasts as they are (J tensors of the parameter's shape)."""
    return list(rows)


def _chunk_gradients_by_autograd(model, partition, batch, sizes, loss_of):
    """Per chunk: the trunk gradients and the signal rows (logit error summed, head gradient) of its share
    (n_k / n) x its mean loss, i.e. of its part of the batch's mean loss, one backward per chunk."""
    trunk, logit_errors, heads = [], [], []
    start = 0
    for size in sizes:
        chunk = {key: value[start : start + size] for key, value in batch.items()}
        start += size
        model.zero_grad()
        outputs = model(**chunk)
        outputs.logits.retain_grad()
        (loss_of(outputs, chunk) * size / sum(sizes)).backward()
        trunk.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in partition.trunk_params])
        logit_errors.append(outputs.logits.grad.reshape(-1, outputs.logits.shape[-1]).sum(0))
        heads.append(torch.cat([p.grad.reshape(-1) for p in partition.head_params]))
    return trunk, torch.stack(logit_errors), torch.stack(heads)


@pytest.mark.parametrize("signal", ["logit_error", "head_gradient"])
def test_hooks_on_the_control_backward_give_the_chunk_contrasts(signal):
    """On a ViT (linear layers with a token dimension, attention, a classifier head) the contrasts the hooks read
    from one backward of the whole batch equal those of chunk gradients taken one chunk at a time."""
    model = tiny_vit(num_labels=3)
    partition = ModelPartition.from_model(model)
    batch = image_dataset(8, num_labels=3)[:8]
    sizes, matrix = chunk_sizes(8, 3), contrast_matrix(chunk_sizes(8, 3)).float()
    collector = ChunkContrasts(model, partition.trunk_params, partition.head_params, set(), 3, signal, keep_raw)
    assert 0.7 < collector.trunk_coverage < 1  # all but the patch embedding, position embeddings, norms, cls token
    with capture_head(partition) as capture, collector.recording(8):
        loss = model(**batch).loss
    collector.watch_logits(capture.logits)
    with collector.active(64.0):
        (loss * 64.0).backward()  # a loss scale, divided out
    signals, trunk = collector.take()

    expected_trunk, logit_errors, heads = _chunk_gradients_by_autograd(model, partition, batch, sizes, lambda out, chunk: out.loss)
    torch.testing.assert_close(signals, matrix @ (logit_errors if signal == "logit_error" else heads), rtol=1e-4, atol=1e-6)
    covered = 0
    for index, param in enumerate(partition.trunk_params):
        if index in trunk:
            covered += 1
            expected = torch.einsum("jk,k...->j...", matrix, torch.stack([g[index] for g in expected_trunk]))
            torch.testing.assert_close(torch.stack(trunk[index]), expected, rtol=1e-4, atol=1e-6)
    assert covered == sum(1 for side, w, b in collector.layers.values() if side == "trunk" for i in (w, b) if i is not None)


def test_hooks_leave_out_a_tied_embedding_and_read_gpt2_conv1d_layers():
    """GPT-2: its Conv1D layers are covered; the tied input embedding (shared with the head) is not."""
    model = gpt2()
    partition = ModelPartition.from_model(model)
    shared = {id(p) for p in partition.shared_params}
    collector = ChunkContrasts(model, partition.trunk_params, partition.head_params, shared, 4, "logit_error", keep_raw)
    batch = lm_data()[:BATCH]
    with capture_head(partition) as capture, collector.recording(BATCH):
        loss = model(**batch).loss
    collector.watch_logits(capture.logits)
    with collector.active():
        loss.backward()
    signals, trunk = collector.take()
    sizes = chunk_sizes(BATCH, 4)
    # the per-chunk losses of a token-mean loss are not shares of it: compare with the sum loss instead
    model.zero_grad()

    def token_sum_loss(outputs, chunk):
        logits, labels = outputs.logits[:, :-1], chunk["labels"][:, 1:]
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")

    count = (batch["labels"][:, 1:] != -100).sum()
    expected_trunk, logit_errors, _ = _chunk_gradients_by_autograd(
        model, partition, batch, sizes, lambda out, chunk: token_sum_loss(out, chunk) / count * sum(sizes) / len(chunk["labels"])
    )
    matrix = contrast_matrix(sizes).float()
    torch.testing.assert_close(signals, matrix @ logit_errors, rtol=1e-4, atol=1e-6)
    wte = [i for i, p in enumerate(partition.trunk_params) if p is model.transformer.wte.weight]
    assert wte and wte[0] not in trunk
    conv = [i for i, name in enumerate(partition.trunk_names) if name.endswith("c_attn.weight")]
    assert conv and all(i in trunk for i in conv)
    for index in conv:
        expected = torch.einsum("jk,k...->j...", matrix, torch.stack([g[index] for g in expected_trunk]))
        torch.testing.assert_close(torch.stack(trunk[index]), expected, rtol=1e-4, atol=1e-6)


def _train(tmp_path, **settings):
    args = PredictedGradientArguments(
        output_dir=str(tmp_path), report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True,
        per_device_train_batch_size=16, max_steps=12, predictor_memory_fraction=8.0, predictor_window_size=32,
        logging_steps=4, **settings,
    )
    trainer = PredictedGradientTrainer(model=tiny_vit(num_labels=3), args=args, train_dataset=image_dataset(64, num_labels=3))
    trainer.train()
    return trainer


@pytest.mark.parametrize("control_fraction,gradient_accumulation_steps", [("0.5", 1), ("0.5", 2), ("auto", 1)])
def test_predictor_learns_k_minus_one_pairs_per_control_batch(control_fraction, gradient_accumulation_steps, tmp_path):
    trainer = _train(tmp_path, control_fraction=control_fraction, predictor_fit_chunks=4, predictor="window",
                     gradient_accumulation_steps=gradient_accumulation_steps, auto_observation_period=2, predictor_refit_steps=4)
    per_step = 3 * gradient_accumulation_steps  # K - 1 = 3 pairs per micro-batch
    if control_fraction == "auto":  # observed pairs of steps at f = 1 (then perhaps f < 1)
        assert trainer.predictor.count > 0 and trainer.predictor.count % per_step == 0
    else:  # every step observed; the last one may wait for its pair
        assert trainer.predictor.count == per_step * (12 - (trainer.monitor.pending is not None))
    assert torch.isfinite(trainer.predictor.signals).all()


@pytest.mark.parametrize("predictor", ["ntk", "window"])
def test_update_is_unbiased_with_chunk_contrasts(predictor, tmp_path):
    z = max_z_score(lambda: tiny_vit(num_labels=3), image_dataset(8, num_labels=3), tmp_path, predictor=predictor,
                    control_fraction=0.5, predictor_fit_chunks=2, predictor_window_size=32)
    assert z < Z_LIMIT


def test_update_is_unbiased_with_chunk_contrasts_on_tied_gpt2(tmp_path):
    model_factory, dataset_factory = FAMILIES["gpt2-lm-tied"]
    z = max_z_score(model_factory, dataset_factory(), tmp_path, steps=200, control_fraction=0.5, predictor_fit_chunks=2)
    assert z < Z_LIMIT


@pytest.mark.parametrize("settings,message", [
    (dict(predictor_fit_chunks=0), "predictor_fit_chunks: 0 is not allowed"),
    (dict(predictor_fit_chunks=4, predictor="zero"), "predictor_fit_chunks: 4 is not allowed with predictor='zero'"),
])
def test_bad_chunk_settings_are_refused(settings, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        PredictedGradientArguments(output_dir=str(tmp_path), **settings)
