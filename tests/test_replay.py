"""The trunk's replayed backward is the exact backward: for fixed row weights at the boundary (some 0), every
parameter's gradient equals plain autograd's, on every family; blocks that cannot be replayed on a subset of rows
(dropout, BatchNorm) are found, replayed exactly on all rows, and then left to plain autograd."""

import contextlib

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification
from transformers.modeling_layers import GradientCheckpointingLayer

from lgp_hf.boundary import BoundarySampler, find_head_module_names, sampled_boundary
from lgp_hf.replay import BlockReplay, find_blocks
from conftest import image_dataset, tiny_vit
from test_model_families import FAMILIES, lora, gpt2

KEEP = [1, 4, 6]


class FixedRows(BoundarySampler):
    """Weights 1.7 on the rows KEEP, 0 elsewhere: a draw fixed in advance."""

    def reweight(self, gradient):
        weights = torch.zeros(gradient.shape[0], dtype=gradient.dtype, device=gradient.device)
        weights[KEEP] = 1.7
        return gradient * weights.view(-1, *([1] * (gradient.dim() - 1)))


def gradients(model, batch, replayed: bool, autocast: bool = False):
    """Every parameter's gradient after a backward through the fixed draw, with or without the blocks' replay."""
    model.zero_grad(set_to_none=True)
    modules = dict(model.named_modules())
    heads = [modules[name] for name in find_head_module_names(model)]
    replay = BlockReplay(find_blocks(model, heads))
    torch.manual_seed(123)  # the same dropout masks in both forwards
    with sampled_boundary(heads, FixedRows()), replay.active() if replayed else torch.enable_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss = model(**batch).loss
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, replay


def assert_same_gradients(plain, replayed, tolerance):
    assert plain.keys() == replayed.keys()
    largest = max(float(g.abs().max()) for g in plain.values())
    for name, value in plain.items():
        # relative to the largest gradient: tensors whose exact gradient cancels to 0 (attention key biases) are rounding
        torch.testing.assert_close(replayed[name], value, rtol=tolerance, atol=tolerance * largest, msg=name)


def checkpointed_gpt2():
    """Under the user's gradient checkpointing the replay records nothing and recomputes the drawn rows."""
    model = gpt2()
    model.gradient_checkpointing_enable()
    return model


def padded_gpt2_batch():
    """Right padding to 8 positions (5 to 8 tokens), with its attention mask: SDPA gets a boolean mask."""
    batch = FAMILIES["gpt2-lm-tied"][1]()[:8]
    mask = (torch.arange(batch["input_ids"].shape[1])[None] < (torch.arange(8) % 4 + 5)[:, None]).long()
    return {**batch, "attention_mask": mask, "labels": batch["labels"].masked_fill(mask == 0, -100)}


CASES = {"vit": (tiny_vit, lambda: image_dataset(8)[:8]), **{name: (m, lambda d=d: d()[:8]) for name, (m, d) in FAMILIES.items()},
         "lora-gpt2": (lora(gpt2, target_modules=["c_attn"], fan_in_fan_out=True), lambda: FAMILIES["gpt2-lm-tied"][1]()[:8]),
         "gpt2-checkpointed": (checkpointed_gpt2, lambda: FAMILIES["gpt2-lm-tied"][1]()[:8]),
         "gpt2-padded": (gpt2, padded_gpt2_batch)}


@pytest.mark.parametrize("case", list(CASES))
def test_replayed_backward_equals_autograd_and_computes_only_the_drawn_rows(case):
    model_factory, batch_factory = CASES[case]
    model, batch = model_factory(), batch_factory()
    model.train()
    plain, _ = gradients(model, batch, replayed=False)
    replayed, replay = gradients(model, batch, replayed=True)
    assert_same_gradients(plain, replayed, 1e-5)
    if replay.blocks:  # (ResNet has no transformers layer to replay)
        assert not replay.dense
        assert replay.computed_rows <= len(KEEP) * len(replay.blocks) < replay.total_rows


def test_replay_under_bf16_autocast_matches_autograd_to_bf16_rounding():
    model, batch = tiny_vit(), image_dataset(8)[:8]
    plain, _ = gradients(model, batch, replayed=False, autocast=True)
    replayed, replay = gradients(model, batch, replayed=True, autocast=True)
    assert not replay.dense
    assert_same_gradients(plain, replayed, 2e-2)


def test_dropout_masks_are_recorded_and_replayed_on_the_drawn_rows():
    """Dropout (hidden and attention, through SDPA): the forward draws and records the masks; the replay on the drawn
    rows applies them again and equals the replay on all rows, the exact gradient of that same forward."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        num_labels=3, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    model = BertForSequenceClassification(config)
    model.train()
    batch = {"input_ids": torch.randint(1, 50, (8, 6), generator=torch.Generator().manual_seed(1)), "labels": torch.arange(8) % 3}
    replay = BlockReplay(find_blocks(model, [model.classifier]))
    with sampled_boundary([model.classifier], FixedRows()), replay.active():
        loss = model(**batch).loss
    params = [p for p in model.parameters() if p.requires_grad]
    drawn_rows = torch.autograd.grad(loss, params, retain_graph=True)
    assert not replay.dense and replay.computed_rows == len(KEEP) * 2
    replay.dense.update({0, 1})  # the same forward, backpropagated on all rows
    all_rows = torch.autograd.grad(loss, params)
    largest = max(float(g.abs().max()) for g in all_rows)
    for a, b in zip(drawn_rows, all_rows):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * largest)
    assert max(float((a - b).abs().max()) for a, b in zip(drawn_rows, all_rows)) < 1e-5 * largest


class NormalisedLayer(GradientCheckpointingLayer):
    """A layer whose rows interact: BatchNorm over the batch."""

    def __init__(self):
        super().__init__()
        self.linear, self.norm = nn.Linear(6, 6), nn.BatchNorm1d(6)

    def forward(self, hidden):
        return hidden + self.norm(self.linear(hidden))


class NormalisedModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([NormalisedLayer(), NormalisedLayer()])
        self.classifier = nn.Linear(6, 3)

    def forward(self, features, labels):
        for layer in self.layers:
            features = layer(features)
        logits = self.classifier(features)
        return type("Output", (), {"loss": nn.functional.cross_entropy(logits, labels)})


def test_blocks_whose_rows_interact_are_replayed_on_all_rows():
    """BatchNorm: the rows not drawn have a non-zero gradient below the first block, and the replay of the drawn
    rows alone differs from the forward (other batch statistics): both are found, and the backward stays exact."""
    model = NormalisedModel()
    batch = {"features": torch.randn(8, 6, generator=torch.Generator().manual_seed(2)), "labels": torch.arange(8) % 3}
    plain, _ = gradients(model, batch, replayed=False)
    replayed, replay = gradients(model, batch, replayed=True)
    assert_same_gradients(plain, replayed, 1e-5)
    assert replay.dense == {1}  # the top block failed its check; below it every row carries a gradient
    assert replay.computed_rows == replay.total_rows


def test_no_drawn_row_gives_zero_trunk_gradients():
    model, batch = tiny_vit(), image_dataset(8)[:8]
    sampler = BoundarySampler(fraction=0.5)
    sampler.reweight = lambda gradient: gradient * 0
    replay = BlockReplay(find_blocks(model, [model.classifier]))
    with sampled_boundary([model.classifier], sampler), replay.active():
        model(**batch).loss.backward()
    assert replay.computed_rows == 0
    # zeros, not missing gradients: DDP expects every parameter to get one
    assert all(p.grad is not None and float(p.grad.abs().max()) == 0 for name, p in model.named_parameters() if not name.startswith(("classifier", "vit.layernorm")))
    assert float(model.classifier.weight.grad.abs().max()) > 0


def test_the_check_runs_on_the_first_second_fourth_eighth_replays_of_each_signature():
    replay = BlockReplay([])
    checked = [count for count in range(1, 21) if replay.should_check(0, ("shape",))]
    assert checked == [1, 2, 4, 8, 16]
    assert replay.should_check(0, ("other shape",)) and replay.should_check(1, ("shape",))  # each block and signature anew


class SwitchableLayer(GradientCheckpointingLayer):
    """Row-wise until `interacting` is set, then it subtracts the batch mean (its rows interact, as BatchNorm's);
    with `noisy`, it adds random numbers drawn outside the tape."""

    def __init__(self, noisy=False):
        super().__init__()
        self.linear, self.interacting, self.noisy = nn.Linear(6, 6), False, noisy

    def forward(self, hidden):
        out = torch.tanh(self.linear(hidden))
        if self.interacting:
            out = out - out.mean(0, keepdim=True)
        if self.noisy:
            out = out + torch.rand_like(out)
        return hidden + out


class SwitchableModel(NormalisedModel):
    def __init__(self, noisy=False):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([SwitchableLayer(noisy), SwitchableLayer(noisy)])


def test_a_block_that_starts_interacting_is_caught_at_its_next_check():
    """Checked at the 1st, 2nd and 4th replay: a block whose rows start to interact before its 4th replay fails that
    check, is replayed on all rows (exact) and runs with plain autograd from then on."""
    model = SwitchableModel()
    batch = {"features": torch.randn(8, 6, generator=torch.Generator().manual_seed(2)), "labels": torch.arange(8) % 3}
    replay = BlockReplay(find_blocks(model, [model.classifier]))
    for _ in range(3):
        model.zero_grad()
        with sampled_boundary([model.classifier], FixedRows()), replay.active():
            model(**batch).loss.backward()
    assert not replay.dense and replay.computed_rows == 3 * len(KEEP)  # the top block's (the lower one's input is data)
    for layer in model.layers:
        layer.interacting = True
    plain, _ = gradients(model, batch, replayed=False)
    model.zero_grad()
    with sampled_boundary([model.classifier], FixedRows()), replay.active():
        model(**batch).loss.backward()
    assert replay.dense == {1}
    assert_same_gradients(plain, {name: p.grad for name, p in model.named_parameters()}, 1e-5)


def test_a_block_drawing_random_numbers_outside_the_tape_fails_its_first_check():
    model = SwitchableModel(noisy=True)
    batch = {"features": torch.randn(8, 6, generator=torch.Generator().manual_seed(2)), "labels": torch.arange(8) % 3}
    plain, _ = gradients(model, batch, replayed=False)
    replayed, replay = gradients(model, batch, replayed=True)
    assert 1 in replay.dense
    assert_same_gradients(plain, replayed, 1e-5)


def test_the_check_is_not_repeated_on_every_replay(monkeypatch):
    """Eight sampled backwards of a ViT: its blocks compare the replay with the forward on the 1st, 2nd, 4th and 8th
    only."""
    import lgp_hf.replay

    comparisons = []
    close = lgp_hf.replay._close
    monkeypatch.setattr(lgp_hf.replay, "_close", lambda *args: comparisons.append(step) or close(*args))
    model, batch = tiny_vit(), image_dataset(8)[:8]
    model.train()
    replay = BlockReplay(find_blocks(model, [model.classifier]))
    for step in range(1, 9):
        with sampled_boundary([model.classifier], FixedRows()), replay.active():
            model(**batch).loss.backward()
    assert sorted(set(comparisons)) == [1, 2, 4, 8] and not replay.dense


@pytest.mark.parametrize("transposed", [False, True])
def test_taped_linear_backward_on_the_token_rows_with_a_gradient_equals_the_dense_one(transposed):
    """dX = dY W is 0 on the token rows where dY is, dW = dY^T X gets nothing from them: the sparse backward skips
    them and gives the dense backward's gradients (up to the summation order of the kernels)."""
    from lgp_hf.replay import _TapedLinear

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 6, generator=generator, requires_grad=True)
    weight = torch.randn(*((6, 3) if transposed else (3, 6)), generator=generator, requires_grad=True)
    bias = torch.randn(3, generator=generator, requires_grad=True)
    output = x.detach() @ weight.detach() + bias.detach() if transposed else x.detach() @ weight.detach().T + bias.detach()
    upstream = torch.randn(4, 5, 3, generator=generator)
    upstream[:, 1:] = 0  # one token per row carries a gradient (a classifier's CLS)
    results = []
    for sparse in (False, True):
        y = _TapedLinear.apply(x, weight, bias, output, transposed, sparse)
        results.append(torch.autograd.grad(y, (x, weight, bias), upstream))
    (dense_x, dense_w, dense_b), (sparse_x, sparse_w, sparse_b) = results
    assert float(sparse_x[:, 1:].abs().max()) == 0
    torch.testing.assert_close(sparse_x, dense_x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sparse_w, dense_w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sparse_b, dense_b, rtol=1e-6, atol=1e-6)
    expected = torch.autograd.grad((x @ weight + bias) if transposed else torch.nn.functional.linear(x, weight, bias), (x, weight, bias), upstream)
    for got, want in zip(results[1], expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_top_block_of_a_classifier_backpropagates_the_read_token_alone(monkeypatch):
    """ViT's classifier reads the CLS token: in the top block only that position of each drawn row has a gradient,
    and the taped backwards (MLP, output projection, query) run on it alone; the gradients stay autograd's."""
    import lgp_hf.replay

    found = []
    rows = lgp_hf.replay._nonzero_token_rows
    monkeypatch.setattr(lgp_hf.replay, "_nonzero_token_rows", lambda flat: found.append(rows(flat)) or found[-1])
    model, batch = tiny_vit(), image_dataset(8)[:8]
    model.train()
    plain, _ = gradients(model, batch, replayed=False)
    replayed, replay = gradients(model, batch, replayed=True)
    assert_same_gradients(plain, replayed, 1e-5)
    positions = model.vit.embeddings.patch_embeddings.num_patches + 1
    assert replay.computed_tokens == len(KEEP) * positions + len(KEEP)  # the lower block: every position of the drawn rows
    sparse = [r for r in found if r is not None]
    assert len(sparse) >= 4 and all(r.numel() == len(KEEP) for r in sparse)  # fc2, GELU, fc1, output projection, ...


@pytest.mark.parametrize("case", ["vit", "gpt2-lm-tied", "bert-token-classification"])
def test_the_tape_keeps_about_what_autograd_keeps(case):
    """Memory: the tensors a replayed forward saves for its backward (the blocks' inputs and tapes, through autograd's
    saved tensors) take at most 10 % more than plain autograd saves for the same forward."""
    model_factory, batch_factory = CASES[case]
    model, batch = model_factory(), batch_factory()
    model.train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes(replayed: bool) -> int:
        storages = {}

        def pack(tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        heads = [dict(model.named_modules())[name] for name in find_head_module_names(model)]
        replay = BlockReplay(find_blocks(model, heads))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), sampled_boundary(heads, FixedRows()):
            with replay.active() if replayed else contextlib.nullcontext():
                model(**batch)
        return sum(size for pointer, size in storages.items() if pointer not in parameters)

    assert saved_bytes(replayed=True) <= 1.1 * saved_bytes(replayed=False)


class ParameterTableLayer(GradientCheckpointingLayer):
    """A layer with a linear map of a parameter table alone (a position-bias MLP, as SwinV2's): an operation without
    the rows' dimension."""

    def __init__(self):
        super().__init__()
        self.linear, self.table, self.project = nn.Linear(6, 6), nn.Parameter(torch.randn(5, 6)), nn.Linear(6, 1)

    def forward(self, hidden):
        bias = self.project(self.table).mean()
        return hidden + torch.tanh(self.linear(hidden)) + bias


def test_a_block_with_an_operation_on_parameters_alone_is_replayed_dense_and_exact():
    """On 3 of 8 rows the table's linear map does not take the recorded rows (it has none): the check fails, the
    block is replayed on all rows (where the recorded output is taken whole) and the gradients stay autograd's."""
    model = NormalisedModel()
    torch.manual_seed(0)
    model.layers = nn.ModuleList([ParameterTableLayer(), ParameterTableLayer()])
    batch = {"features": torch.randn(8, 6, generator=torch.Generator().manual_seed(2)), "labels": torch.arange(8) % 3}
    plain, _ = gradients(model, batch, replayed=False)
    replayed, replay = gradients(model, batch, replayed=True)
    assert replay.dense == {1}
    assert_same_gradients(plain, replayed, 1e-5)
