"""`verify_unbiased`: its statistics (calibrated false alarms, power), its verdicts on the user's model, and that it
leaves the model as it found it."""

import pytest
import torch

import lgp_hf.boundary
from lgp_hf import PredictedGradientArguments, PredictedGradientTrainer, verify_unbiased
from lgp_hf.verification import t_quantile, z_scores, z_threshold
from conftest import image_dataset, tiny_vit


@pytest.mark.parametrize(
    "probability,dof,table",
    [(0.975, 10, 2.228), (0.975, 30, 2.042), (0.995, 20, 2.845), (0.9995, 10, 4.587), (0.9995, 30, 3.646), (0.9995, 60, 3.460)],
)
def test_t_quantile_matches_the_tables(probability, dof, table):
    assert t_quantile(probability, dof) == pytest.approx(table, rel=5e-3)


def test_z_test_false_alarm_rate_and_power_on_gaussian_draws():
    """Unbiased draws (iid normal errors along 40 directions, 32 draws): the family-wise false alarm rate at
    alpha = 0.05 stays within its binomial bounds over 4000 trials; a mean error of 1.2 threshold / sqrt(draws)
    standard deviations along one direction is found in most trials."""
    generator = torch.Generator().manual_seed(0)
    trials, directions, draws, alpha = 4000, 40, 32, 0.05
    threshold = z_threshold(draws, directions, alpha)
    errors = torch.randn(trials, draws, directions, generator=generator, dtype=torch.float64)

    def alarms(values):
        z = z_scores(values.sum(1), values.pow(2).sum(1), draws, torch.zeros(directions, dtype=torch.float64))
        return (z.abs().amax(-1) > threshold).double().mean().item()

    rate = alarms(errors)
    assert rate <= alpha + 3 * (alpha / trials) ** 0.5, rate  # Bonferroni: at most alpha (up to noise)
    assert rate >= 0.5 * alpha, rate  # and not so conservative that the threshold means nothing
    biased = errors.clone()
    biased[..., 0] += 1.2 * threshold / draws**0.5
    assert alarms(biased) > 0.6


def vit_trainer(tmp_path, **settings):
    args = PredictedGradientArguments(
        output_dir=str(tmp_path), report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True,
        per_device_train_batch_size=16, **settings,
    )
    return PredictedGradientTrainer(model=tiny_vit(num_labels=3), args=args, train_dataset=image_dataset(64, num_labels=3))


@pytest.mark.parametrize("fraction,mix", [(0.5, 0.1), (0.125, 0.0)])
def test_passes_on_the_sampled_backward_and_reports_what_it_did(fraction, mix, tmp_path, capsys):
    trainer = vit_trainer(tmp_path, control_fraction=fraction, sampling_uniform_mix=mix)
    report = verify_unbiased(trainer, draws=64)
    assert report.passed and report.worst_z <= report.threshold
    assert report.draws == 64 and report.control_fraction == fraction and report.seconds > 0
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert sorted(report.per_tensor) == sorted(names) and report.directions == 1 + 8 + 2 * len(names)
    assert "unbiased: no evidence of bias" in capsys.readouterr().out


def test_fails_on_a_biased_estimator_and_names_the_tensors(tmp_path, monkeypatch):
    """Fault injection: drawn rows passed on without their 1 / pi weight."""
    monkeypatch.setattr(lgp_hf.boundary, "horvitz_thompson_weights", lambda drawn, probabilities: drawn.double())
    report = verify_unbiased(vit_trainer(tmp_path, control_fraction=0.5), draws=32, verbose=False)
    assert not report.passed
    assert "BIASED" in str(report) and report.worst_tensors()[0].split(" ")[0] in str(report)
    assert not any(name.startswith("classifier") for name in list(report.per_tensor)[:3])  # the head stays exact


def test_false_alarm_rate_on_the_real_model_is_bounded(tmp_path):
    """Twelve independent batches at a family-wise alpha of 0.05: more than 3 alarms has probability 0.2 % if the
    rate is right (the floors and the t threshold must not make the real check anti-conservative)."""
    alarms = 0
    for seed in range(12):
        trainer = vit_trainer(tmp_path, control_fraction=0.25, seed=seed)
        batch = trainer.data_collator([image_dataset(16, num_labels=3, seed=100 + seed)[i] for i in range(16)])
        alarms += not verify_unbiased(trainer, batch=batch, draws=24, alpha=0.05, seed=seed, verbose=False).passed
    assert alarms <= 3, alarms


def test_leaves_the_model_as_it_was(tmp_path):
    trainer = vit_trainer(tmp_path, control_fraction=0.5)
    model = trainer.model
    model.vit.layers[0].attention.q_proj.weight.grad = torch.ones_like(model.vit.layers[0].attention.q_proj.weight)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    rng = torch.get_rng_state()
    verify_unbiased(trainer, draws=8, verbose=False)
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert torch.equal(model.vit.layers[0].attention.q_proj.weight.grad, torch.ones_like(before["vit.layers.0.attention.q_proj.weight"]))
    assert sum(p.grad is not None for p in model.parameters()) == 1
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("overrides,message", [({"draws": 3}, "draws"), ({"control_fraction": 1.0}, "control_fraction")])
def test_bad_input_names_the_argument(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        verify_unbiased(vit_trainer(tmp_path), verbose=False, **overrides)
