"""Weight gradients from sampled token rows (`weight_gradient_keep`): the math exactly, by enumerating every draw of a
few token rows; the linear layers' backward (dX exact, dW unbiased, autograd's memory); and the trainer's update,
z-tested for unbiasedness through the training loop on several model families at f = 0.5 and f = 1, its F, and its
resume."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lgp_hf.token_sampling
import lgp_hf.trainer
from lgp_hf import PredictedGradientArguments, PredictedGradientTrainer, verify_unbiased
from lgp_hf.model_card import STATISTICS_ROWS, format_number
from lgp_hf.row_norms import trunk_linear_layers
from lgp_hf.sampling import inclusion_probabilities, poisson_draw
from lgp_hf.token_sampling import (
    SampledWeightGradients,
    WeightGradientSampler,
    row_token_variances,
    sampled_weight_gradient,
    token_probabilities,
    token_scores,
    token_seed,
    token_variance_sums,
    token_variances,
)
from conftest import image_dataset, tiny_vit
from test_model_families import BATCH, FAMILIES, gpt2, lm_data, lora
from test_sampling import expectation
from test_unbiased import GradientRecorder, loop_z_test


def layer_terms(rows=6, zero=(1, 4), seed=0):
    """dY (rows x 3) and X (rows x 4) in float64, token rows `zero` without a gradient (score 0)."""
    generator = torch.Generator().manual_seed(seed)
    errors = torch.randn(rows, 3, generator=generator, dtype=torch.float64) * torch.logspace(0, 1.5, rows, dtype=torch.float64)[:, None]
    errors[list(zero)] = 0
    return errors, torch.randn(rows, 4, generator=generator, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- the math, exactly


@pytest.mark.parametrize("mix", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_zero_gradient_tokens_are_skipped_and_the_share_and_mix_are_among_the_others(keep, mix):
    errors, inputs = layer_terms()
    scores = token_scores(errors, inputs)
    p = token_probabilities(scores, keep, mix)
    active = scores > 0
    assert bool((p[~active] == 0).all())
    assert float(p.sum()) == pytest.approx(keep * int(active.sum()), rel=1e-12)
    torch.testing.assert_close(p[active], inclusion_probabilities(scores[active], keep, mix))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("mix", [0.0, 0.1])
@pytest.mark.parametrize("keep", [0.25, 0.5, 0.8])
def test_sampled_weight_gradient_is_exactly_unbiased_with_the_stated_variance(keep, mix, transposed):
    """Over all 2^n token draws: E[dW_hat] = dY^T X, E||dW_hat - dW||^2 = sum_t (1 - p_t)/p_t ||dy_t||^2 ||x_t||^2."""
    errors, inputs = layer_terms()
    p = token_probabilities(token_scores(errors, inputs), keep, mix)
    exact = inputs.mT @ errors if transposed else errors.mT @ inputs
    estimate = lambda mask: sampled_weight_gradient(errors, inputs, p, mask, transposed)  # noqa: E731
    torch.testing.assert_close(expectation(p, estimate), exact, rtol=1e-12, atol=1e-12)
    variance = expectation(p, lambda mask: float((estimate(mask) - exact).pow(2).sum()))
    expected = float(token_variances(p, token_scores(errors, inputs)).sum())
    assert variance == pytest.approx(expected, rel=1e-10)
    squares = errors.pow(2).sum(1) * inputs.pow(2).sum(1)
    assert expected == pytest.approx(float(torch.where(p > 0, (1 - p) / p.where(p > 0, 1.0) * squares, 0.0).sum()), rel=1e-12)


def test_non_finite_scores_compute_the_weight_gradient_exactly():
    errors, inputs = layer_terms()
    errors[0, 0] = float("inf")
    p = token_probabilities(token_scores(errors, inputs), 0.5, 0.1)
    assert bool((p == 1).all()) and float(token_variances(p, token_scores(errors, inputs)).sum()) == 0


def test_sampler_reuses_an_inputs_norms_only_while_its_values_are_unchanged():
    """Each call draws as from its own scores: a second layer reading the same input (a view of it, as q, k and v do)
    and a call after the input was changed in place (its norms taken again) alike."""
    errors, inputs = layer_terms(rows=40, zero=(3,))
    sampler, seed = WeightGradientSampler([], 0.5, 0.1), 11
    sampler.start(seed)
    calls = [lambda: (errors, inputs), lambda: (errors.flip(0), inputs.view(40, 4)), lambda: (errors, inputs.mul_(torch.linspace(0.1, 9, 40, dtype=torch.float64)[:, None]))]
    for call, terms in enumerate(calls):
        call_errors, call_inputs = terms()
        p = token_probabilities(token_scores(call_errors, call_inputs), 0.5, 0.1)
        drawn = poisson_draw(p, torch.Generator().manual_seed(token_seed(seed, call)))
        expected = sampled_weight_gradient(call_errors, call_inputs, p, drawn)
        torch.testing.assert_close(sampler.weight_gradient(call_errors, call_inputs, False), expected, rtol=0, atol=0)


def test_row_token_variances_sum_each_rows_token_rows():
    generator = torch.Generator().manual_seed(1)
    inputs, errors = torch.randn(3, 5, 4, generator=generator), torch.randn(3, 5, 2, generator=generator)
    errors[1, 2:] = 0
    scores = token_scores(errors.reshape(15, 2), inputs.reshape(15, 4))
    per_token = token_variances(token_probabilities(scores, 0.5, 0.1), scores)
    torch.testing.assert_close(row_token_variances(scores, 3, 0.5, 0.1), per_token.reshape(3, 5).sum(1))


@pytest.mark.parametrize("case", ["skewed", "zeros"])
def test_token_variance_sums_are_unbiased_for_every_row_design(case):
    """Rows drawn at pi read their token variance with the gradient weighted 1 / pi_i: V_i = T_i / pi_i^2. Over all row
    draws the sums estimate sum_i T_i / q_i of each candidate design q exactly (T_i: the variance at weight 1)."""
    from test_sampling import SCORES

    scores = torch.tensor(SCORES[case], dtype=torch.float64)
    p = inclusion_probabilities(scores, 0.5, 0.1)
    candidates = torch.stack([inclusion_probabilities(scores, f, 0.1) for f in (0.25, 0.5, 1.0)])
    at_weight_one = torch.rand(len(scores), generator=torch.Generator().manual_seed(2), dtype=torch.float64) * (scores > 0)
    read = at_weight_one / p**2
    sums = expectation(p, lambda mask: token_variance_sums(candidates, p, mask, torch.where(mask, read, 0.0)))
    torch.testing.assert_close(sums, (at_weight_one / candidates).sum(1), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- the layers' backward


def linear_layers():
    torch.manual_seed(0)
    return {"linear": nn.Linear(6, 3), "conv1d": Conv1D(3, 6)}


@pytest.mark.parametrize("layer_type", ["linear", "conv1d"])
def test_sampled_layer_has_autograds_dx_and_db_and_an_unbiased_dw(layer_type):
    """dX and db equal autograd's in every draw; the mean of 400 draws of dW is within a Bonferroni z-test of autograd's
    (the standard error from the draws themselves)."""
    layer = linear_layers()[layer_type]
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 6, generator=generator)
    upstream = torch.randn(4, 5, 3, generator=generator)
    upstream[:, 3:] = 0  # token rows without a gradient
    x.requires_grad_(True)
    exact = torch.autograd.grad(layer(x), (x, layer.weight, layer.bias), upstream)
    sampler = WeightGradientSampler([layer.weight], keep=0.3, uniform_mix=0.1)
    sampler.start(7)
    draws = []
    for _ in range(400):
        with SampledWeightGradients(sampler):
            y = layer(x)
        grad_x, grad_w, grad_b = torch.autograd.grad(y, (x, layer.weight, layer.bias), upstream)
        torch.testing.assert_close(grad_x, exact[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad_b, exact[2], rtol=1e-6, atol=1e-7)
        draws.append(grad_w.double())
    computed, total = sampler.take_counts()
    assert total == 400 * 4 * 3 and 0.25 < computed / total < 0.35  # about 0.3 of the token rows with a gradient
    draws = torch.stack(draws)
    error = (draws.mean(0) - exact[1].double()) / (draws.std(0) / math.sqrt(len(draws))).clamp_min(1e-12)
    assert float(error.abs().max()) < 4.0, error


def test_sampled_layer_saves_what_autograd_saves_also_under_bf16_autocast():
    layer = linear_layers()["linear"]
    x = torch.randn(8, 6, requires_grad=True)
    sampler = WeightGradientSampler([layer.weight], keep=0.5, uniform_mix=0.1)

    def saved(sampled: bool, autocast: bool) -> list[tuple]:
        tensors = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: tensors.append((t.numel(), t.dtype)) or t, lambda t: t):
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast), SampledWeightGradients(sampler) if sampled else torch.enable_grad():
                y = layer(x)
        assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
        return sorted(tensors, key=str)

    for autocast in (False, True):
        assert saved(True, autocast) == saved(False, autocast)


def test_layers_whose_weight_is_not_sampled_keep_autograds_gradients():
    """Frozen weights and the head's are not in the sampler's weights (`row_norms.trunk_linear_layers`): untouched."""
    layers = linear_layers()
    sampler = WeightGradientSampler([], keep=0.5, uniform_mix=0.1)
    x = torch.randn(4, 6, requires_grad=True)
    parameters = [x, *layers["linear"].parameters(), *layers["conv1d"].parameters()]
    exact = torch.autograd.grad(layers["linear"](x).sum() + layers["conv1d"](x).sum(), parameters)
    with SampledWeightGradients(sampler):
        y = layers["linear"](x).sum() + layers["conv1d"](x).sum()
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(y, parameters), exact))
    assert sampler.take_counts() == (0, 0)


# ---------------------------------------------------------------------------------------------- the trainer


TOKEN_FAMILIES = {
    "vit": (tiny_vit, lambda: image_dataset(BATCH)),
    **{name: FAMILIES[name] for name in ("gpt2-lm-tied", "bert-token-classification", "t5-seq2seq")},
    "lora-gpt2": (lora(gpt2, target_modules=["c_attn"], fan_in_fan_out=True), lm_data),  # a frozen Conv1D, LoRA's nn.Linear
}


def drew_about_half_the_token_rows(trainer):
    share = trainer.lgp_summary()["lgp_weight_gradient_tokens_computed"]
    assert 0.3 < share < 0.7, share


@pytest.mark.parametrize("fraction", [0.5, 1.0])
@pytest.mark.parametrize("family", list(TOKEN_FAMILIES))
def test_update_with_sampled_weight_gradients_is_unbiased(family, fraction, tmp_path):
    model_factory, dataset_factory = TOKEN_FAMILIES[family]
    report = loop_z_test(model_factory, dataset_factory(), tmp_path, steps=200, control_fraction=fraction, weight_gradient_keep=0.5,
                         after=drew_about_half_the_token_rows)
    assert report.passed, f"{family} at f = {fraction}: {report}"


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_update_with_sampled_weight_gradients_is_unbiased_under_gradient_checkpointing(fraction, tmp_path):
    """f = 0.5: the replays draw; f = 1: the blocks' recomputation in the backward draws (the same function as their
    forward's, or checkpointing would find other saved tensors)."""
    model_factory, dataset_factory = FAMILIES["gpt2-lm-tied"]
    report = loop_z_test(model_factory, dataset_factory(), tmp_path, steps=200, control_fraction=fraction, weight_gradient_keep=0.5,
                         args_kwargs={"gradient_checkpointing": True}, after=drew_about_half_the_token_rows)
    assert report.passed, report


def test_z_test_detects_token_rows_drawn_without_their_weights(tmp_path, monkeypatch):
    """Drawn token rows summed unweighted (1 instead of 1 / p_t) shrink the weight gradients: the test must see it."""
    def unweighted(errors, inputs, probabilities, drawn, transposed=False):
        return sampled_weight_gradient(errors, inputs, torch.ones_like(probabilities), drawn, transposed)

    monkeypatch.setattr(lgp_hf.token_sampling, "sampled_weight_gradient", unweighted)
    report = loop_z_test(tiny_vit, image_dataset(BATCH), tmp_path, steps=60, control_fraction=1.0, weight_gradient_keep=0.5)
    assert not report.passed, report


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_verify_unbiased_checks_the_token_draws(fraction, bf16, tmp_path):
    """Also under bf16 autocast (on the CPU), where the layers save and draw from the autocast casts."""
    model_factory, dataset_factory = FAMILIES["gpt2-lm-tied"]
    args = PredictedGradientArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=BATCH,
                                      control_fraction=fraction, weight_gradient_keep=0.5, bf16=bf16)
    trainer = PredictedGradientTrainer(model=model_factory(), args=args, train_dataset=dataset_factory())
    assert trainer.sampling_fraction() == fraction
    report = verify_unbiased(trainer, draws=48, verbose=False)
    assert report.passed, report


def test_variance_factor_counts_the_token_draws_variance(quiet_args, monkeypatch):
    """At f = 1 (no row sampling) and lr 0 on one batch, F - 1 = token variance / sum_i ||g_i||^2, every step observed:
    its numerator must be the variance of the trunk linear weights' gradients over the steps (400 draws: within 20 %).
    No reference steps (`Trainer`'s own, exact), so that every step draws."""
    monkeypatch.setattr(lgp_hf.trainer, "REFERENCE_START", 10**9)
    recorder = GradientRecorder()
    args = PredictedGradientArguments(**quiet_args, per_device_train_batch_size=BATCH, max_steps=400, learning_rate=0.0, max_grad_norm=0.0,
                                      control_fraction=1.0, auto_observation_period=1, unbiasedness_check=False,
                                      weight_gradient_keep=0.5, logging_steps=50)
    trainer = PredictedGradientTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(BATCH), callbacks=[recorder])
    trainer.train()
    sums = trainer.monitor.run_factors
    assert sums.rows == 400 * BATCH and trainer.lgp_summary()["lgp_token_variance_share"] == pytest.approx(1.0)
    weights = {id(layer.weight) for layer in trunk_linear_layers(trainer.replay.blocks)}
    positions = [i for i, p in enumerate(p for p in trainer.model.parameters() if p.requires_grad) if id(p) in weights]
    draws = torch.stack([torch.cat([step[i].reshape(-1) for i in positions]).double() for step in recorder.gradients])
    measured = float((draws - draws.mean(0)).pow(2).sum(1).mean()) * len(draws) / (len(draws) - 1)
    token = float(sums.token[0])
    print(f"token variance: measured {measured:.4g}, predicted {token / 400:.4g}")
    assert measured == pytest.approx(token / 400, rel=0.2)
    assert float(sums.numerators[0, 0]) == pytest.approx(token, rel=1e-9)  # f = 1: no row variance
    logged = [log for log in trainer.state.log_history if "lgp/token_variance_share" in log]
    assert logged and all(0 < log["lgp/weight_gradient_tokens_computed"] < 0.8 for log in logged)


@pytest.mark.parametrize("mode", ["fixed", "auto"])
def test_resume_with_sampled_weight_gradients_is_bit_identical(mode, quiet_args, monkeypatch):
    """At f = 0.5, and under "auto" (tokens sampled from the start, f lowered mid-run after its second check)."""
    from test_resume_and_faults import STEPS, FewExamplesLossTrainer, auto_settings, prior_costs, straight_and_resumed

    prior_costs(monkeypatch)
    # 20 steps: the check at f = 1 (a full backward per draw) fits the budget of "auto"
    settings = auto_settings(quiet_args, save_strategy="steps", save_steps=STEPS, weight_gradient_keep=0.5, max_steps=20)
    if mode == "fixed":
        settings.update(control_fraction="0.5", auto_observation_period=2)
    straight, second = straight_and_resumed(FewExamplesLossTrainer, settings, image_dataset(80))
    for (name, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    summary, expected = second.lgp_summary(), straight.lgp_summary()
    for key in ("lgp_control_fraction", "lgp_variance_factor", "lgp_token_variance_share", "lgp_weight_gradient_tokens_computed",
                "lgp_unbiasedness_check"):
        assert summary[key] == expected[key], key
    # (two rows in 16 carry loss: at f = 0.5 both are drawn with pi = 1, the row draw adds no variance)
    assert 0 < expected["lgp_token_variance_share"] <= 1 and expected["lgp_unbiasedness_check"] == "passed"
    assert expected["lgp_control_fraction"] < 1 and straight.unbiasedness["fraction"] < 1  # auto: checked again at its f


def test_auto_checks_the_token_draws_at_the_start_and_the_rows_when_it_lowers_f(quiet_args, monkeypatch):
    from test_resume_and_faults import FewExamplesLossTrainer, auto_settings, prior_costs

    prior_costs(monkeypatch)
    checked = []
    statistics = lgp_hf.trainer.gradient_error_statistics
    monkeypatch.setattr(lgp_hf.trainer, "gradient_error_statistics", lambda *args, **kwargs: checked.append(args[4]) or statistics(*args, **kwargs))
    args = PredictedGradientArguments(**auto_settings(quiet_args, max_steps=20, auto_min_control_fraction=0.125, weight_gradient_keep=0.5))
    trainer = FewExamplesLossTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(16 * 20))
    trainer.train()
    summary = trainer.lgp_summary()
    assert checked[0] == 1.0 and len(checked) == 2 and checked[1] == summary["lgp_control_fraction"] < 1, checked
    assert summary["lgp_unbiasedness_check"] == "passed" and trainer.token_sampler is not None


def test_auto_whose_check_fails_computes_every_gradient_exactly(quiet_args, monkeypatch, caplog):
    from test_resume_and_faults import auto_settings, prior_costs

    prior_costs(monkeypatch)
    def unweighted(errors, inputs, probabilities, drawn, transposed=False):
        return sampled_weight_gradient(errors, inputs, torch.ones_like(probabilities), drawn, transposed)

    monkeypatch.setattr(lgp_hf.token_sampling, "sampled_weight_gradient", unweighted)
    args = PredictedGradientArguments(**auto_settings(quiet_args, max_steps=20, weight_gradient_keep=0.5))
    trainer = PredictedGradientTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(16 * 20))
    with caplog.at_level("WARNING", logger="lgp_hf.trainer"):
        trainer.train()
    assert trainer.lgp_summary()["lgp_unbiasedness_check"] == "failed" and trainer.token_sampler is None
    assert trainer.lgp_summary()["lgp_weight_gradient_tokens_computed"] is None  # no step drew
    assert any("with exact weight gradients" in r.getMessage() and "BIASED" in r.getMessage() for r in caplog.records)


def test_explicit_keep_with_a_failing_check_is_refused_naming_the_setting(quiet_args, monkeypatch):
    def unweighted(errors, inputs, probabilities, drawn, transposed=False):
        return sampled_weight_gradient(errors, inputs, torch.ones_like(probabilities), drawn, transposed)

    monkeypatch.setattr(lgp_hf.token_sampling, "sampled_weight_gradient", unweighted)
    args = PredictedGradientArguments(**quiet_args, per_device_train_batch_size=16, max_steps=2, control_fraction=1.0, weight_gradient_keep=0.5)
    trainer = PredictedGradientTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(32))
    with pytest.raises(ValueError, match=r"control_fraction=1.0, weight_gradient_keep=0.5: .*BIASED") as error:
        trainer.train()
    assert "control_fraction=1 and weight_gradient_keep=1 or 'auto'" in str(error.value)


@pytest.mark.parametrize("value", [0.0, 1.5, -0.5, True, "half"])
def test_bad_weight_gradient_keep_names_the_argument_and_the_allowed_values(value, quiet_args):
    with pytest.raises(ValueError, match=r"weight_gradient_keep: .* is not allowed; use a number in \(0, 1\]"):
        PredictedGradientArguments(**quiet_args, weight_gradient_keep=value)


# ------------------------------------------------------------------------------------- weight_gradient_keep="auto"


def paying_keeps(monkeypatch, per_token_seconds, saving_shares=None):
    """Every layer call's calibration gives `per_token_seconds` saved per token row at each candidate keep (toy models'
    timings say nothing about real ones), and, with `saving_shares`, each keep column's saving of a step is that share
    (keep 1 first); the costs are the prior's."""
    from test_resume_and_faults import prior_costs

    prior_costs(monkeypatch)
    savings = lambda self, errors, inputs, transposed, active, fit=False: [seconds * len(errors) for seconds in per_token_seconds]  # noqa: E731
    monkeypatch.setattr(lgp_hf.costs.WeightGradientCalibration, "savings", savings)
    if saving_shares is not None:
        monkeypatch.setattr(lgp_hf.costs.StepCostModel, "keep_saving", lambda self, index: saving_shares[index])


def test_keep_auto_samples_tokens_where_they_pay_after_checking_them(quiet_args, monkeypatch):
    """At an explicit f = 1: the first decision takes the keep with the smallest F x cost (saving 0.5 of a step at keep
    0.5, 0.55 at 0.25), checks it with its token draws first (once: the other keep needs no check of its own), and
    samples the weight gradients from then on."""
    from test_resume_and_faults import auto_settings

    paying_keeps(monkeypatch, [1e-6, 2e-6], saving_shares=[0.0, 0.5, 0.55])
    checked = []
    statistics = lgp_hf.trainer.gradient_error_statistics
    monkeypatch.setattr(lgp_hf.trainer, "gradient_error_statistics",
                        lambda trainer, *args, **kwargs: checked.append(trainer.token_sampler.keep) or statistics(trainer, *args, **kwargs))
    args = PredictedGradientArguments(**auto_settings(quiet_args, max_steps=20, control_fraction=1.0, weight_gradient_keep="auto"))
    trainer = PredictedGradientTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(16 * 20))
    trainer.train()
    decision, summary = trainer._last_decision, trainer.lgp_summary()
    assert decision["keep"] < 1 and decision["fraction"] == 1.0 and summary["lgp_weight_gradient_keep"] == decision["keep"]
    assert len(checked) == 1 and checked[0] < 1 and trainer.unbiasedness["keep"] == checked[0] and summary["lgp_unbiasedness_check"] == "passed"
    assert 0 < summary["lgp_weight_gradient_tokens_computed"] < 0.8
    kept = [log["lgp/weight_gradient_keep"] for log in trainer.state.log_history if "lgp/weight_gradient_keep" in log]
    assert kept[0] == 1.0 and kept[-1] == decision["keep"]
    assert decision["step_cost"] == pytest.approx(1 - {0.5: 0.5, 0.25: 0.55}[decision["keep"]]) and decision["variance_factor"] > 1
    trainer.create_model_card()
    LABELS = {key: label for key, label, _ in STATISTICS_ROWS}
    card = (Path(args.output_dir) / "README.md").read_text(encoding="utf-8")
    for line in (f"- weight_gradient_keep: auto (final {format_number(decision['keep'])})",
                 f"- {LABELS['lgp_best_keep']}: {format_number(decision['best_keep'])}"):
        assert line in card, line


def test_keep_auto_where_sampling_does_not_pay_trains_as_trainer(quiet_args, monkeypatch):
    """No layer's sampling saves time: no token variance in F, no saving, the keep stays 1 and the weights are
    `Trainer`'s, bit for bit (observed steps only read)."""
    from transformers import Trainer
    from test_resume_and_faults import auto_settings

    paying_keeps(monkeypatch, [-1e-6, -1e-6])
    settings = auto_settings(quiet_args, max_steps=8, control_fraction=1.0)
    ours = PredictedGradientTrainer(model=tiny_vit(), args=PredictedGradientArguments(**settings, weight_gradient_keep="auto"),
                                    train_dataset=image_dataset(16 * 8))
    ours.train()
    theirs = Trainer(model=tiny_vit(), args=PredictedGradientArguments(**settings), train_dataset=image_dataset(16 * 8))
    theirs.train()
    assert ours._last_decision is not None and ours._last_decision["keep"] == 1.0 and ours.token_sampler is None
    assert ours._last_decision["variance_factor"] == 1.0
    for (name, a), b in zip(ours.model.state_dict().items(), theirs.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_with_keep_auto_is_bit_identical(quiet_args, monkeypatch):
    """Under "auto" for f and k: the keep chosen before the save, and the calibration, travel with the checkpoint."""
    from test_resume_and_faults import STEPS, FewExamplesLossTrainer, auto_settings, straight_and_resumed

    paying_keeps(monkeypatch, [1e-6, 2e-6], saving_shares=[0.0, 0.5, 0.55])
    settings = auto_settings(quiet_args, save_strategy="steps", save_steps=STEPS, weight_gradient_keep="auto", max_steps=20)
    straight, second = straight_and_resumed(FewExamplesLossTrainer, settings, image_dataset(80))
    for (name, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    summary, expected = second.lgp_summary(), straight.lgp_summary()
    for key in ("lgp_control_fraction", "lgp_weight_gradient_keep", "lgp_variance_factor", "lgp_token_variance_share",
                "lgp_weight_gradient_tokens_computed", "lgp_unbiasedness_check"):
        assert summary[key] == expected[key], key
    assert expected["lgp_weight_gradient_keep"] < 1 and expected["lgp_unbiasedness_check"] == "passed"


def test_keep_auto_whose_check_fails_keeps_every_weight_gradient_exact(quiet_args, monkeypatch, caplog):
    from test_resume_and_faults import auto_settings

    paying_keeps(monkeypatch, [1e-6, 2e-6], saving_shares=[0.0, 0.5, 0.55])

    def unweighted(errors, inputs, probabilities, drawn, transposed=False):
        return sampled_weight_gradient(errors, inputs, torch.ones_like(probabilities), drawn, transposed)

    monkeypatch.setattr(lgp_hf.token_sampling, "sampled_weight_gradient", unweighted)
    args = PredictedGradientArguments(**auto_settings(quiet_args, max_steps=20, control_fraction=1.0, weight_gradient_keep="auto"))
    trainer = PredictedGradientTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(16 * 20))
    with caplog.at_level("WARNING", logger="lgp_hf.trainer"):
        trainer.train()  # not raised: "auto" chose the keep
    assert trainer.lgp_summary()["lgp_unbiasedness_check"] == "failed" and trainer.token_sampler is None
    assert trainer.lgp_summary()["lgp_weight_gradient_keep"] == 1.0
    assert any("weight_gradient_keep='auto'" in r.getMessage() and "BIASED" in r.getMessage() for r in caplog.records)
