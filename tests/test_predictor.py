"""The linear gradient predictor (`lgp_hf.predictor`): its math exactly, its estimate unbiased, its F measured right.

Pure functions on plain tensors (the fit, the correction term, unbiasedness and variance by enumerating every Poisson
sample of a small batch), then through the trainer: the F it reports against the exact F from per-example gradients,
and a model whose trunk gradient the boundary's signal predicts exactly, where the predictor must remove most of the
sampling variance. The z-tests of the update with the predictor on are in `test_model_families.py`.
"""

import pytest
import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import SequenceClassifierOutput

import lgp_hf.costs
import lgp_hf.predictor
from lgp_hf import PredictedGradientArguments, PredictedGradientTrainer, verify_unbiased
from lgp_hf.monitor import CANDIDATE_FRACTIONS, SamplingMonitor
from lgp_hf.predictor import (
    boundary_signals,
    fit_sums,
    input_sums,
    predicted_squared_norm_change,
    predicted_sum,
    predictor_map,
    row_alignment,
    row_products,
    signal_projection,
    variance_weights,
)
from lgp_hf.row_norms import trunk_linear_layers
from lgp_hf.sampling import inclusion_probabilities, sampling_variance
from conftest import image_dataset, tiny_vit
from test_sampling import expectation

ROWS, POSITIONS, D_IN, D_OUT, K = 5, 3, 4, 3, 2


def random_case(seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(ROWS, POSITIONS, D_IN, generator=generator, dtype=torch.float64)
    errors = torch.randn(ROWS, POSITIONS, D_OUT, generator=generator, dtype=torch.float64)
    signals = torch.randn(ROWS, K, generator=generator, dtype=torch.float64)
    prediction_map = torch.randn(D_OUT, K, generator=generator, dtype=torch.float64)
    probabilities = torch.tensor([0.3, 0.9, 0.5, 1.0, 0.15], dtype=torch.float64)
    return inputs, errors, signals, prediction_map, probabilities


def with_ones(inputs):
    return torch.cat([inputs, torch.ones(*inputs.shape[:-1], 1, dtype=inputs.dtype)], -1)


def row_gradients(inputs, errors):
    """g_i = sum_t delta_it x'_it^T (rows x d_out x (d_in + 1)), directly."""
    return torch.einsum("rto,rti->roi", errors, with_ones(inputs))


def predictions(prediction_map, signals, sums):
    """p_i = M s_i xbar_i^T, directly."""
    return torch.einsum("ok,rk,ri->roi", prediction_map, signals, sums)


def test_row_products_and_sums_equal_their_definitions():
    inputs, errors, *_ = random_case()
    sums = input_sums(inputs, bias=True).double()
    assert torch.allclose(sums, with_ones(inputs).sum(1))
    expected = torch.einsum("roi,ri->ro", row_gradients(inputs, errors), sums)
    assert torch.allclose(row_products(inputs, errors, sums).double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(row_products(inputs, errors, sums[:, :-1]).double(),
                          torch.einsum("rto,rti,ri->ro", errors, inputs, sums[:, :-1]), rtol=1e-5, atol=1e-5)


def test_fit_recovers_a_planted_linear_map():
    """One position per row and delta_i = M* s_i: g_i = M* s_i x_i^T is exactly linear in s_i x_i^T."""
    generator = torch.Generator().manual_seed(1)
    planted = torch.randn(D_OUT, K, generator=generator)
    signals = torch.randn(64, K, generator=generator)
    inputs = torch.randn(64, 1, D_IN, generator=generator)
    errors = (signals @ planted.mT)[:, None, :]
    sums = input_sums(inputs, bias=False)
    weights = torch.rand(64, generator=generator) + 0.5
    correlation, covariance = fit_sums(row_products(inputs, errors, sums), signals, sums, weights)
    assert torch.allclose(predictor_map(correlation, covariance, ridge=1e-8), planted, atol=1e-4)
    shrunk = predictor_map(correlation, covariance, ridge=1.0)
    assert shrunk.norm() < 0.9 * planted.norm()  # the ridge shrinks: the fitted beta makes up for it


def test_correction_term_equals_the_sum_of_the_undrawn_predictions():
    inputs, _, signals, prediction_map, probabilities = random_case()
    sums = input_sums(inputs, bias=True).double()
    drawn = torch.tensor([True, False, True, True, False])
    weights = torch.where(drawn, 1 / probabilities, 0.0)
    naive = ((1 - weights)[:, None, None] * predictions(prediction_map, signals, sums)).sum(0)
    assert torch.allclose(predicted_sum(prediction_map, signals, sums, weights), naive)


def test_difference_estimator_is_exactly_unbiased_and_its_variance_formula_exact():
    """Every Poisson sample enumerated: E[sum_i w_i g_i + beta sum_i (1 - w_i) p_i] = sum_i g_i, and its variance is
    sum_i (1 - pi_i) / pi_i ||g_i - beta p_i||^2, which `row_alignment` and `predicted_squared_norm_change` give."""
    inputs, errors, signals, prediction_map, probabilities = random_case()
    sums = input_sums(inputs, bias=True).double()
    gradients, predicted, beta = row_gradients(inputs, errors), predictions(prediction_map, signals, sums), 0.7
    exact = gradients.sum(0)

    def estimate(mask):
        weights = torch.where(mask, 1 / probabilities, 0.0)
        return (weights[:, None, None] * gradients).sum(0) + beta * predicted_sum(prediction_map, signals, sums, weights)

    assert torch.allclose(expectation(probabilities, estimate), exact)
    variance = expectation(probabilities, lambda mask: float((estimate(mask) - exact).pow(2).sum()))
    residuals = (gradients - beta * predicted).pow(2).sum((1, 2))
    assert variance == pytest.approx(float(sampling_variance(probabilities, residuals)), rel=1e-9)
    cross, squares = row_alignment(signals @ prediction_map.mT, row_products(inputs, errors, sums).double(), sums)
    change = predicted_squared_norm_change(cross[None], squares[None], torch.tensor([beta]))
    assert torch.allclose(gradients.pow(2).sum((1, 2)) + change, residuals, rtol=1e-5)


def test_variance_weights_are_horvitz_thompson_for_the_variance_weighted_sum():
    _, _, _, _, probabilities = random_case()
    values = torch.arange(1.0, ROWS + 1, dtype=torch.float64)
    target = ((1 - probabilities) / probabilities * values).sum()
    assert float(expectation(probabilities, lambda mask: (variance_weights(probabilities, mask) * values).sum())) == pytest.approx(float(target))


def test_variance_weights_fit_another_design_from_a_draw_that_kept_every_row():
    """At f = 1 every row is drawn with pi = 1 (no variance to reduce): the fit weights rows for the design q "auto"
    considers, (1 - q_i) / q_i; at f < 1 the same weights are a Horvitz-Thompson sum over the draw, by enumeration."""
    _, _, _, _, probabilities = random_case()
    design = torch.tensor([0.2, 0.5, 0.25, 0.8, 0.1], dtype=torch.float64)
    kept = torch.ones(ROWS, dtype=torch.bool)
    assert torch.allclose(variance_weights(torch.ones(ROWS, dtype=torch.float64), kept, design), (1 - design) / design)
    assert torch.equal(variance_weights(probabilities, kept), variance_weights(probabilities, kept, probabilities))
    values = torch.arange(1.0, ROWS + 1, dtype=torch.float64)
    target = ((1 - design) / design * values).sum()
    assert float(expectation(probabilities, lambda mask: (variance_weights(probabilities, mask, design) * values).sum())) == pytest.approx(float(target))


def test_signals_sketch_the_heads_per_row_gradient():
    """s_i = vec(R^T (sum_t dL/dh_it [h_it, 1]^T) Q): the sketch of the per-row outer product, summed over positions."""
    gradient, hidden = torch.randn(4, 5, 8), torch.randn(4, 5, 8)
    left, right = signal_projection(8, 3, "cpu"), signal_projection(9, 3, "cpu")
    assert torch.equal(left, signal_projection(8, 3, "cpu")) and left.shape == (8, 3) and not torch.equal(left, right[:8])
    outer = torch.einsum("rtd,rte->rde", gradient, torch.cat([hidden, torch.ones(4, 5, 1)], -1))
    expected = (left.T @ outer @ right).reshape(4, 9)
    assert torch.allclose(boundary_signals(gradient, hidden, 3), expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------ in the trainer


def predictor_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=3,
                    per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=1, control_fraction=0.5,
                    gradient_predictor="linear", unbiasedness_check=False, auto_observation_period=1)
    return PredictedGradientArguments(**{**settings, **overrides})


def exact_row_gradients(model, batch, layers):
    """Per row i, the gradient of the trunk's linear layers when only row i's gradient passes the head's input
    (the chain rule's g_i), flattened per layer; and dL/dh of all rows."""
    boundary = {}

    def keep(module, args):
        hidden = args[0]
        hidden.retain_grad()
        boundary["h"] = hidden
        return None

    handle = model.classifier.register_forward_pre_hook(keep)
    parameters = [p for layer in layers for p in layer.parameters() if p.requires_grad]
    rows = batch["labels"].shape[0]
    per_row = []
    try:
        for row in range(rows):
            mask = torch.zeros(rows, 1)
            mask[row] = 1

            def only_row(module, args):
                (hidden,) = args
                return (hidden * mask + (hidden * (1 - mask)).detach(),)

            masking = model.classifier.register_forward_pre_hook(only_row)
            loss = model(**batch).loss
            masking.remove()
            per_row.append(torch.autograd.grad(loss, parameters))
        loss = model(**batch).loss
        full = torch.autograd.grad(loss, [boundary["h"]])[0]
    finally:
        handle.remove()
    return per_row, full, boundary["h"].detach()


def test_reported_variance_factor_equals_the_exact_one_with_the_predictor(tmp_path):
    """After 6 steps at f = 0.5 (the map fitted, beta != 0), one observed step at f = 1 on a fixed batch: its estimate
    of F at every candidate fraction uses every row (pi = 1), so it must equal the exact
    1 + sum_i (1 - pi_i)/pi_i ||g_i - beta p_i||^2 / sum_i ||g_i||^2 from per-example gradients and the predictor's
    own map; and its F without the predictor the same with p = 0."""
    dataset = image_dataset(48)
    trainer = PredictedGradientTrainer(model=tiny_vit(), args=predictor_args(tmp_path, max_steps=6, predictor_signal_dims=2), train_dataset=dataset)
    trainer.train()
    predictor = trainer.predictor
    assert (predictor.coefficients() != 0).any()
    model = trainer.model
    model.eval()  # no dropout in the tiny ViT; eval keeps the forwards identical
    batch = {k: v for k, v in dataset[:8].items()}
    layers = predictor.layers
    sums = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: sums.__setitem__(i, input_sums(a[0], True))) for i, layer in enumerate(layers)]
    per_row, boundary_gradient, boundary_input = exact_row_gradients(model, batch, layers)
    for hook in hooks:
        hook.remove()
    signals = boundary_signals(boundary_gradient, boundary_input, 2)
    beta = predictor.coefficients()
    squared, residual = torch.zeros(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    for row, gradients in enumerate(per_row):
        for index, layer in enumerate(layers):
            weight, bias = gradients[2 * index], gradients[2 * index + 1]
            g = torch.cat([weight, bias[:, None]], 1).double()
            prediction_map = predictor_map(predictor.correlations[index], predictor.covariances[index], predictor.ridge)
            p = torch.outer(prediction_map @ signals[row], sums[index][row]).double()
            squared[row] += g.pow(2).sum()
            residual[row] += (g - float(beta[index]) * p).pow(2).sum()

    trainer.monitor = SamplingMonitor(trainer.lgp_settings.sampling_uniform_mix)
    model.train()
    trainer._sampled_step(model, dict(batch), None, 1.0, True)
    candidates = slice(1, 1 + len(CANDIDATE_FRACTIONS))  # the current fraction's row first, f = 1's last
    reported = [row[0] for row in trainer.monitor.run_factors.factors()[candidates]]
    unpredicted = [row[0] for row in trainer.monitor.run_unpredicted.factors()[candidates]]
    scores = boundary_gradient.norm(dim=1).double()
    for fraction, value, plain in zip(CANDIDATE_FRACTIONS, reported, unpredicted):
        pi = inclusion_probabilities(scores, fraction, trainer.lgp_settings.sampling_uniform_mix)
        assert value == pytest.approx(1 + float(sampling_variance(pi, residual)) / float(squared.sum()), rel=2e-3), fraction
        assert plain == pytest.approx(1 + float(sampling_variance(pi, squared)) / float(squared.sum()), rel=2e-3), fraction
    assert reported[CANDIDATE_FRACTIONS.index(0.5)] < unpredicted[CANDIDATE_FRACTIONS.index(0.5)]


class LinearBlock(GradientCheckpointingLayer):
    def __init__(self, width):
        super().__init__()
        self.dense = nn.Linear(width, width)

    def forward(self, hidden):
        return self.dense(hidden)


class OneLayerTrunk(nn.Module):
    """A trunk of one linear layer under a linear classifier: row i's trunk gradient is delta_i [x_i, 1]^T with delta_i
    its gradient at the head's input: the signal (R^T delta_i) (Q^T [h_i, 1])^T carries delta_i, and the predictor
    should remove most of the sampling variance."""

    def __init__(self, width=4, labels=3):
        super().__init__()
        torch.manual_seed(0)
        self.block = LinearBlock(width)
        self.classifier = nn.Linear(width, labels)

    def forward(self, pixel_values, labels=None):
        logits = self.classifier(self.block(pixel_values.flatten(1)[:, :4]))
        return SequenceClassifierOutput(loss=nn.functional.cross_entropy(logits, labels), logits=logits)


def test_predictor_removes_the_variance_where_the_signal_predicts_the_gradient(tmp_path):
    """Uniform draws at f = 0.25 (F = 4 without a predictor); the predictor, fitted on earlier steps, must bring the
    in-run F close to 1."""
    args = predictor_args(tmp_path, max_steps=40, control_fraction=0.25, sampling_uniform_mix=1.0, predictor_signal_dims=3,
                          predictor_ridge=1e-4, per_device_train_batch_size=32, learning_rate=1e-2)
    trainer = PredictedGradientTrainer(model=OneLayerTrunk(), args=args, train_dataset=image_dataset(32 * 40))
    trainer.train()
    late = [log for log in trainer.state.log_history if "lgp/predictor_variance_ratio" in log][-10:]
    ratios = [log["lgp/predictor_variance_ratio"] for log in late]
    assert len(late) == 10 and max(ratios) < 0.3, ratios
    assert all(log["lgp/variance_factor"] < 1.6 for log in late), late


def predictor_choice_run(tmp_path, steps=48):
    """OneLayerTrunk under uniform draws at f = 0.25 with `gradient_predictor="auto"`, every step observed, a decision
    every 8 steps."""
    args = predictor_args(tmp_path, max_steps=steps, control_fraction=0.25, sampling_uniform_mix=1.0, predictor_signal_dims=3,
                          predictor_ridge=1e-4, per_device_train_batch_size=32, learning_rate=1e-2, gradient_predictor="auto",
                          auto_decision_steps=8)
    trainer = PredictedGradientTrainer(model=OneLayerTrunk(), args=args, train_dataset=image_dataset(32 * steps))
    trainer.train()
    return trainer, [log for log in trainer.state.log_history if "lgp/predictor_applied" in log]


def test_auto_applies_the_predictor_where_it_pays_for_its_cost(tmp_path):
    """Measured first (not applied before a decision), then applied: F with it far below F without it, at a measured
    cost of a small share of a step."""
    trainer, logs = predictor_choice_run(tmp_path)
    applied = [log["lgp/predictor_applied"] for log in logs]
    assert applied[:7] == [0.0] * 7 and applied[-1] == 1.0 and trainer._predicting, applied
    assert logs[-1]["lgp/predictor_variance_ratio"] < 0.3 and 0 < logs[-1]["lgp/predictor_cost"] < 1
    assert logs[-1]["lgp/variance_factor"] < 1.6  # the update's F: with the correction in it
    summary = trainer.lgp_summary()
    assert summary["lgp_predictor_applied"] is True and summary["lgp_predictor_cost"] == trainer.cost_model.predictor_cost()
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "- Gradient predictor (the paper's control variate): applied" in card
    assert "- F with the predictor over F without it (the same observed rows): " in card


def test_auto_leaves_out_a_predictor_that_costs_more_than_it_saves(tmp_path, monkeypatch):
    """The same run with the predictor's measured work at 50 Trainer steps: measured all along, never applied, and the
    F logged is the update's, without the correction."""
    monkeypatch.setattr(lgp_hf.costs.StepCostModel, "predictor_cost", lambda self: 50.0)
    trainer, logs = predictor_choice_run(tmp_path)
    assert all(log["lgp/predictor_applied"] == 0.0 for log in logs) and not trainer._predicting
    late = logs[-1]
    assert late["lgp/predictor_variance_ratio"] < 0.3 and late["lgp/variance_factor"] > 2.5  # uniform at f = 0.25: F = 4


def test_a_measured_predictor_leaves_the_update_as_without_one(tmp_path):
    """`gradient_predictor="auto"` before it is applied reads and fits only: the weights equal those of "none"."""
    weights = []
    for predictor in ("none", "auto"):
        args = predictor_args(tmp_path / predictor, max_steps=4, gradient_predictor=predictor, predictor_signal_dims=2)
        trainer = PredictedGradientTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(32))
        trainer.train()
        weights.append([p.detach().clone() for p in trainer.model.parameters()])
    assert trainer.predictor is not None and trainer.predictor.correlations[0] is not None and not trainer._predicting
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_verify_unbiased_passes_with_a_fitted_predictor(tmp_path):
    dataset = image_dataset(64)
    trainer = PredictedGradientTrainer(model=tiny_vit(), args=predictor_args(tmp_path, max_steps=6, predictor_signal_dims=4), train_dataset=dataset)
    trainer.train()
    assert (trainer.predictor.coefficients() != 0).any()
    state = trainer.predictor.state_dict()
    report = verify_unbiased(trainer, draws=48, verbose=False)
    assert report.passed, report
    assert all(torch.equal(a, b) for a, b in zip(state["correlations"], trainer.predictor.correlations))  # the check fits nothing


def test_settings_are_validated():
    for name, value in (("gradient_predictor", "quadratic"), ("gradient_predictor", None), ("predictor_decay", 1.0), ("predictor_ridge", 0.0), ("predictor_signal_dims", 0)):
        with pytest.raises(ValueError, match=name):
            PredictedGradientArguments(output_dir="unused", **{name: value})


def test_state_is_far_below_the_trunk_parameters_of_the_example_vit():
    """The example's ViT (hidden 192, MLP 768) at the default k = 4: the fitted sums against the trunk's weights."""
    from transformers import ViTConfig, ViTForImageClassification

    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=4, hidden_size=192, num_hidden_layers=1, num_attention_heads=3,
                                                intermediate_size=768, num_labels=10))
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    layers = trunk_linear_layers(blocks)
    predictor = lgp_hf.predictor.LinearGradientPredictor(blocks, 4, 0.1, 0.9)
    trunk = sum(p.numel() for layer in layers for p in layer.parameters())
    assert predictor.state_size() < 0.25 * trunk
