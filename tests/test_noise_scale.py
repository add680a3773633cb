"""The gradient noise scale: B_simple's estimates (exact enumeration), the monitor's correction at f < 1 (exact
enumeration of the draws), the trainer's estimate against per-example autograd, and the batch size advice."""

import itertools
import logging
from pathlib import Path

import pytest
import torch

from conftest import image_dataset, tiny_vit
from lgp_hf import PredictedGradientArguments, PredictedGradientTrainer
from lgp_hf.boundary import BoundaryDraw
from lgp_hf.monitor import SamplingMonitor
from lgp_hf.noise_scale import NoiseScaleAverages, noise_scale, noise_scale_estimates
from lgp_hf.replay import find_blocks
from lgp_hf.row_norms import RowGradientNorms
from lgp_hf.sampling import inclusion_probabilities
from lgp_hf.token_sampling import token_probabilities, token_variances
from lgp_hf.trainer import ADVICE_OBSERVATIONS
from test_resume_and_faults import auto_settings, prior_costs


def test_b_simple_estimates_are_unbiased_over_every_batch():
    """Batches of B examples drawn independently from a population of N per-example gradients, every one of the N^B
    ordered batches enumerated: the mean of the estimates is the population's tr(Sigma) and |G|^2 exactly."""
    generator = torch.Generator().manual_seed(0)
    population = torch.randn(5, 3, generator=generator, dtype=torch.float64) + torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64)
    mean = population.mean(0)
    trace, squared_mean = (population - mean).pow(2).sum(1).mean(), mean.pow(2).sum()
    for rows in (2, 3, 4):
        estimates = []
        for batch in itertools.product(range(len(population)), repeat=rows):
            contributions = population[list(batch)] / rows  # the loss is the batch mean
            estimates.append(noise_scale_estimates(float(contributions.pow(2).sum()), float(contributions.sum(0).pow(2).sum()), rows))
        expected = torch.tensor(estimates, dtype=torch.float64).mean(0)
        torch.testing.assert_close(expected, torch.stack([trace, squared_mean]), rtol=1e-12, atol=1e-12)
    assert noise_scale(float(trace), float(squared_mean)) == pytest.approx(float(trace / squared_mean))


class _Recorded:
    def __init__(self):
        self.values = []

    def add(self, trace, squared_mean):
        self.values.append((trace, squared_mean))


def test_monitor_removes_the_sampling_variance_from_the_sampled_batch_gradient():
    """At f < 1 the hooks read the rows drawn, weighted 1 / pi_i. Over every subset the Poisson draw can make
    (weighted by its probability), the monitor's estimates average to those of the full batch."""
    generator = torch.Generator().manual_seed(1)
    contributions = torch.randn(5, 4, generator=generator, dtype=torch.float64) / 5 + 0.1
    squared = contributions.pow(2).sum(1)
    scores = squared.sqrt() + torch.rand(5, generator=generator, dtype=torch.float64)
    probabilities = inclusion_probabilities(scores, 0.5, 0.1)
    monitor = SamplingMonitor(uniform_mix=0.1)
    monitor.noise = _Recorded()
    weights = []
    for pattern in itertools.product([False, True], repeat=5):
        drawn = torch.tensor(pattern)
        weights.append(float(torch.where(drawn, probabilities, 1 - probabilities).prod()))
        read = torch.where(drawn, squared / probabilities**2, torch.zeros_like(squared))  # what the hooks read
        summed = (contributions * torch.where(drawn, 1 / probabilities, torch.zeros_like(probabilities))[:, None]).sum(0)
        monitor.record([BoundaryDraw(scores, probabilities, drawn, False)], 0.5, read, float(summed.pow(2).sum()), (0, 0))
    expected = torch.tensor(weights, dtype=torch.float64) @ torch.tensor(monitor.noise.values, dtype=torch.float64)
    full = noise_scale_estimates(float(squared.sum()), float(contributions.sum(0).pow(2).sum()), 5)
    torch.testing.assert_close(expected, torch.tensor(full, dtype=torch.float64), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("predictor", ["none", "measured", "applied"])
def test_monitor_removes_the_token_draws_and_the_predictors_variance_too(predictor):
    """With weight gradients from sampled token rows the update read at the parameters is sum over the drawn rows and
    tokens of u_it / (pi_i p_t) (u_it: token t's term of row i's gradient g_i = sum_t u_it), plus, with the predictor
    applied, its correction sum_i (1 - w_i) q_i (q_i = beta p_i: the rows' predictions). Over every row draw and,
    given it, every token draw (p_t from the weighted terms' norms, as the backward draws them), weighted by their
    probabilities, the monitor's estimates average to those of the full batch, whether the predictor is off,
    measured only (its residuals reported, not in the update) or applied."""
    generator = torch.Generator().manual_seed(2)
    terms = torch.randn(4, 2, 3, generator=generator, dtype=torch.float64) / 4 + 0.05  # rows x tokens x gradient
    contributions = terms.sum(1)
    squared = contributions.pow(2).sum(1)
    scores = squared.sqrt() + torch.rand(4, generator=generator, dtype=torch.float64)
    probabilities = inclusion_probabilities(scores, 0.5, 0.1)
    predictions = contributions + torch.randn(4, 3, generator=generator, dtype=torch.float64) / 20
    change = (contributions - predictions).pow(2).sum(1) - squared if predictor != "none" else None
    monitor = SamplingMonitor(uniform_mix=0.1, keeps=(0.5,))
    monitor.noise, monitor.predicting = _Recorded(), predictor == "applied"
    weights = []
    for pattern in itertools.product([False, True], repeat=4):
        drawn = torch.tensor(pattern)
        row_weights = torch.where(drawn, 1 / probabilities, torch.zeros_like(probabilities))
        weighted = terms * row_weights[:, None, None]  # what reaches the layer below the boundary
        token_scores = weighted.norm(dim=2).reshape(-1)
        token_p = token_probabilities(token_scores, 0.5, 0.1)
        variances = token_variances(token_p, token_scores).reshape(4, 2).sum(1)  # each row's, as the hooks read it
        read = torch.where(drawn, squared / probabilities**2, torch.zeros_like(squared))
        row_probability = float(torch.where(drawn, probabilities, 1 - probabilities).prod())
        active = token_p > 0
        for tokens in itertools.product([False, True], repeat=int(active.sum())):
            token_drawn = torch.zeros(8, dtype=torch.bool)
            token_drawn[active] = torch.tensor(tokens, dtype=torch.bool)
            weights.append(row_probability * float(torch.where(token_drawn, token_p, 1 - token_p)[active].prod()))
            token_weights = torch.where(token_drawn, 1 / token_p.where(active, 1.0), 0.0).reshape(4, 2)
            update = (weighted * token_weights[:, :, None]).sum((0, 1))
            if predictor == "applied":
                update = update + ((1 - row_weights)[:, None] * predictions).sum(0)
            monitor.record([BoundaryDraw(scores, probabilities, drawn, False)], 0.5, read, float(update.pow(2).sum()), (0, 0),
                           change, token_variances=variances[:, None])
    assert sum(weights) == pytest.approx(1.0)
    expected = torch.tensor(weights, dtype=torch.float64) @ torch.tensor(monitor.noise.values, dtype=torch.float64)
    full = noise_scale_estimates(float(squared.sum()), float(contributions.sum(0).pow(2).sum()), 4)
    torch.testing.assert_close(expected, torch.tensor(full, dtype=torch.float64), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "settings",
    [dict(control_fraction=0.5), dict(control_fraction=0.5, weight_gradient_keep=0.5, gradient_predictor="linear")],
    ids=["replay", "replay-tokens-predictor"],
)
def test_observed_update_is_read_once_where_the_parameters_receive_it(quiet_args, settings, monkeypatch):
    """G2 is read from the gradient the trunk layers' parameters receive: once per backward, not again where a
    replayed block differentiates itself with torch.autograd.grad (f < 1), and with what token sampling and the
    predictor's correction give them: on every observed step it is the squared norm of their .grad (one micro-batch
    per step: .grad is that backward's)."""
    args = PredictedGradientArguments(
        **quiet_args, per_device_train_batch_size=8, max_steps=8, learning_rate=1e-3, seed=0,
        auto_observation_period=1, auto_observation_budget=1e9, **settings,
    )
    trainer = PredictedGradientTrainer(model=tiny_vit(seed=4), args=args, train_dataset=image_dataset(64, seed=3))
    record, seen = trainer.monitor.record, []

    def checked(draws, fraction, squared_norms, batch_squared_norm, *rest, **kwargs):
        if squared_norms is not None:
            grads = [p.grad for p in trainer.row_norms.parameters() if p.grad is not None]
            seen.append((batch_squared_norm, sum(float(g.double().pow(2).sum()) for g in grads)))
        return record(draws, fraction, squared_norms, batch_squared_norm, *rest, **kwargs)

    monkeypatch.setattr(trainer.monitor, "record", checked)
    trainer.train()
    assert len(seen) >= 4 and all(received > 0 for _, received in seen)
    for read, received in seen:
        assert read == pytest.approx(received, rel=1e-6)


def test_averages_divide_smoothed_sums_and_wait_for_enough_observations():
    averages = NoiseScaleAverages(decay=0.5)
    for trace, squared_mean in [(8.0, 1.0), (4.0, 3.0), (6.0, -1.0)]:
        averages.add(trace, squared_mean)
    assert averages.value() is None
    averages.add(2.0, 2.0)
    # weights 1/16, 1/8, 1/4, 1/2 (times 1/2): the ratio of the weighted sums, not the mean of the ratios
    assert averages.value() == pytest.approx((8 / 16 + 4 / 8 + 6 / 4 + 2 / 2) / (1 / 16 + 3 / 8 - 1 / 4 + 2 / 2))
    restored = NoiseScaleAverages(decay=0.5)
    restored.load_state_dict(averages.state_dict())
    assert restored.value() == averages.value()


def exact_noise_scale(model, batch, layers) -> float:
    """B_noise of one batch over the parameters of `layers`, from per-example gradients (plain autograd)."""
    rows = len(batch["labels"])
    parameters = [p for layer in layers for p in layer.parameters()]
    gradients = []
    for row in range(rows):
        single = {key: value[row : row + 1] for key, value in batch.items()}
        loss = model(**single).loss / rows
        gradients.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, parameters)]).double())
    gradients = torch.stack(gradients)
    return noise_scale(*noise_scale_estimates(float(gradients.pow(2).sum()), float(gradients.sum(0).pow(2).sum()), rows))


def test_trainer_estimate_equals_the_per_example_autograd_value(quiet_args):
    """Learning rate 0 and a data set of exactly one batch: every observed step sees the same rows at the same
    weights, so the run's smoothed estimate is that batch's B_noise, which per-example autograd gives."""
    dataset = image_dataset(8, seed=3)
    model = tiny_vit(seed=4)
    blocks = find_blocks(model, [model.classifier])
    expected = exact_noise_scale(model, dataset[:8], RowGradientNorms(blocks).layers)
    args = PredictedGradientArguments(
        **quiet_args, per_device_train_batch_size=8, max_steps=6, learning_rate=0.0, logging_steps=1, seed=0,
        control_fraction="auto", auto_observation_period=1, auto_observation_budget=1e9, auto_decision_steps=100,
    )
    trainer = PredictedGradientTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    assert trainer.monitor.noise.observations == 6
    assert trainer.lgp_summary()["lgp_noise_scale"] == pytest.approx(expected, rel=1e-4)
    logged = [log["lgp/noise_scale"] for log in trainer.state.log_history if "lgp/noise_scale" in log]
    assert len(logged) == 3 and logged[-1] == pytest.approx(expected, rel=1e-4)  # from the 4th observed step on


def advice_run(quiet_args, dataset, caplog, output_dir, max_steps=ADVICE_OBSERVATIONS + 4):
    args = PredictedGradientArguments(
        **dict(quiet_args, output_dir=str(output_dir)), per_device_train_batch_size=16, max_steps=max_steps, learning_rate=1e-3,
        logging_steps=4, seed=0, control_fraction="auto", auto_observation_period=1, auto_observation_budget=1e9,
        auto_decision_steps=100,
    )
    trainer = PredictedGradientTrainer(model=tiny_vit(seed=1), args=args, train_dataset=dataset)
    with caplog.at_level(logging.WARNING, logger="lgp_hf.trainer"):
        trainer.train()
    trainer.create_model_card()
    card = (Path(output_dir) / "README.md").read_text()
    lines = [r.getMessage() for r in caplog.records if "gradient noise scale" in r.getMessage()]
    caplog.clear()
    return trainer, lines, card


def test_batch_far_above_the_noise_scale_is_reported_once(quiet_args, caplog, tmp_path):
    """Two images of one class repeated: the per-example gradients barely vary and the batch of 16 is far above
    B_noise, said once ADVICE_OBSERVATIONS observed steps are averaged (not before); random images with random
    labels: B_noise is above the batch, and nothing is said."""
    two = image_dataset(2, seed=5).with_format(None).map(lambda example: {"labels": 0}).with_format("torch")
    repeated = two.select([i % 2 for i in range(64)])
    _, lines, _ = advice_run(quiet_args, repeated, caplog, tmp_path / "short", max_steps=ADVICE_OBSERVATIONS - 2)
    assert lines == []
    trainer, lines, card = advice_run(quiet_args, repeated, caplog, tmp_path / "repeated")
    noise = trainer.lgp_summary()["lgp_noise_scale"]
    assert noise < 16 / 2
    assert len(lines) == 1 and "The batch of 16 examples per optimizer step" in lines[0]
    assert "a smaller batch would reach the same loss sooner" in card and "Gradient noise scale B_noise" in card

    trainer, lines, card = advice_run(quiet_args, image_dataset(64, seed=6), caplog, tmp_path / "random")
    assert trainer.lgp_summary()["lgp_noise_scale"] > 16 / 2
    assert lines == [] and "smaller batch" not in card


def test_auto_lowers_f_on_cost_alone_where_the_batch_is_far_above_the_noise_scale(quiet_args, monkeypatch):
    """Two images of one class repeated: every row scores alike, so F = 1 / f and F x cost > 1 at every f (the old
    criterion keeps f = 1), but B_noise << B: only the cost counts, and "auto" lowers f."""
    prior_costs(monkeypatch)
    two = image_dataset(2, seed=5).with_format(None).map(lambda example: {"labels": 0}).with_format("torch")
    args = PredictedGradientArguments(**auto_settings(quiet_args, max_steps=12))
    trainer = PredictedGradientTrainer(model=tiny_vit(seed=1), args=args, train_dataset=two.select([i % 2 for i in range(16 * 12)]))
    trainer.train()
    summary = trainer.lgp_summary()
    assert summary["lgp_noise_scale"] < 1 and summary["lgp_unbiasedness_check"] == "passed"
    assert summary["lgp_control_fraction"] < 1 and summary["lgp_predicted_efficiency"] < 0.95
    decision = trainer._last_decision
    assert decision["variance_factor"] * decision["step_cost"] > 1  # F x cost would not pay
