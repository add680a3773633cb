"""The control-variate estimator as pure functions on tensors.

Notation (loss units: the gradient of the loss the model returns for a micro-batch):
    B   the per-device micro-batch of n examples, split at random into control C (n_c) and prediction P (n_p)
    r   = n / n_c, the control scale: E_C[r * sum_{i in C} x_i] = sum_{i in B} x_i for a uniformly random C
    S_X the head-side signal of X (head gradient, or summed logit errors), exact and cheap for every example
    A   a linear predictor, signal -> trunk gradient; beta a coefficient per trunk parameter tensor

Trunk estimate:  r * g_trunk(C) + beta * A(S_B - r * S_C)
Head:            the exact gradient of B (control and prediction micro-batches together)

Unbiasedness in one line: A and beta are fixed before C is drawn, so
E_C[r g(C) - beta A(r S_C)] + beta A(S_B) = g(B) - beta A(S_B) + beta A(S_B) = g(B).
A predictor fitted on the current C would break the first equality, which is why refits only ever use
earlier control batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def control_size(batch_size: int, control_fraction: float) -> int:
    """Examples in the control micro-batch: max(1, round(f n)), never more than n."""
    return min(batch_size, max(1, round(control_fraction * batch_size)))


def split_batch_indices(batch_size: int, num_control: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A uniformly random split of range(n) into control and prediction indices, each sorted."""
    order = torch.randperm(batch_size, generator=generator)
    return order[:num_control].sort().values, order[num_control:].sort().values


def split_generator(seed: int, step: int, micro_step: int) -> torch.Generator:
    """A generator determined by (seed, optimizer step, micro-batch): reproducible, identical on every rank,
    and with no state to checkpoint."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + micro_step)


def subset_loss_weights(loss_is_sum_normalised: bool, batch_size: int, num_control: int) -> tuple[float, float]:
    """Weights (w_C, w_P) with loss(B) = w_C loss(C) + w_P loss(P).

    A loss normalised by `num_items_in_batch` is a sum over examples divided by a constant, so it is additive
    (weights 1, 1); a per-micro-batch mean is not, and each part is weighted by its share of the examples.
    """
    if loss_is_sum_normalised:
        return 1.0, 1.0
    return num_control / batch_size, (batch_size - num_control) / batch_size


def running_sum(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """A running sum over micro-batches (or calls); the first value is kept as it is (not copied: sums can be
    parameter-sized)."""
    return value if total is None else total + value


def signal_difference(batch_signal: torch.Tensor, control_signal: torch.Tensor, control_scale: float) -> torch.Tensor:
    """S_B - r S_C: what the predictor maps to the trunk correction."""
    return batch_signal - control_scale * control_signal


def expand_coefficients(coefficients: torch.Tensor, numels: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """One coefficient per parameter tensor, repeated over that tensor's elements of a flat float32 vector."""
    return torch.repeat_interleave(coefficients.float().to(device), torch.tensor(numels, device=device))


def apply_coefficients(prediction: torch.Tensor, coefficients: torch.Tensor, numels: Sequence[int]) -> torch.Tensor:
    """beta * prediction, one coefficient per parameter tensor (the flat vector is split by `numels`)."""
    return prediction * expand_coefficients(coefficients, numels, prediction.device).to(prediction.dtype)


def control_variate_estimate(
    control_trunk_grad: torch.Tensor,
    predict: Callable[[torch.Tensor], torch.Tensor | None],
    batch_signal: torch.Tensor,
    control_signal: torch.Tensor,
    control_scale: float,
    coefficients: torch.Tensor,
    numels: Sequence[int],
) -> torch.Tensor:
    """The trunk estimate r g(C) + beta A(S_B - r S_C) from the control micro-batch's (summed) trunk gradient."""
    prediction = predict(signal_difference(batch_signal, control_signal, control_scale))
    estimate = control_scale * control_trunk_grad
    return estimate if prediction is None else estimate + apply_coefficients(prediction, coefficients, numels)


def alignment_and_residual(true_squares: float, product: float, predicted_squares: float) -> tuple[float, float]:
    """(cos(g, p), ||g - p||^2 / ||g||^2) from ||g||^2, <g, p> and ||p||^2 (sums that can be taken tensor by
    tensor): the batch-level cosine (0 when either is zero) and relative residual (1 for the zero predictor, 0
    for a perfect one; 0 when g = 0) of a true and a predicted control gradient."""
    norms = (true_squares * predicted_squares) ** 0.5
    alignment = product / norms if norms > 0 else 0.0
    residual = (true_squares - 2 * product + predicted_squares) / true_squares if true_squares > 0 else 0.0
    return alignment, residual


def paired_squared_differences(
    true: tuple[torch.Tensor, torch.Tensor], predicted: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[float, float]:
    """(||dR||^2, ||dG||^2) of two independent control batches scored with the same predictor and beta.

    dG = G_2 - G_1 (their true trunk gradients, each a mean over its examples up to a common factor) and
    dR = dG - (p_2 - p_1), p the applied prediction beta A(S); `predicted=None` is the zero predictor. For
    per-example residuals r = g - p, the mean gradient cancels in the differences:
        E ||dG||^2 = tr Var(g) (1/n_1 + 1/n_2) + ||mu_g,2 - mu_g,1||^2,    the same for dR with r,
    where the last term is how far the mean moved between the two batches (small for consecutive steps).
    Summed over many pairs, 1 - sum ||dR||^2 / sum ||dG||^2 estimates `variance_explained`.
    """
    difference = (true[1] - true[0]).float()
    residual = difference if predicted is None else difference - (predicted[1] - predicted[0]).float()
    return float(residual.dot(residual)), float(difference.dot(difference))


def variance_explained(residual_squares: float, gradient_squares: float) -> float | None:
    """E = 1 - tr Var(g - p) / tr Var(g) from summed `paired_squared_differences` (None before any pair).

    E is the per-example variance of trunk gradients that the applied prediction p = beta A(s) removes. It is
    what the estimator's variance depends on, exactly and for any beta (theory module):
        Var(estimate) = tr Var(g) / n * [E + (1 - E) / f],
    so the method beats plain backprop at equal compute iff E > theory.break_even_rho2(f, c). E < 0 when the
    prediction adds variance. The batch-level cosine of predicted and true control gradients cannot stand in for
    it: control-batch sums are dominated by the mean gradient, which even a poor predictor follows.
    """
    if gradient_squares <= 0:
        return None
    return 1.0 - residual_squares / gradient_squares


class ControlVariateCoefficients:
    """beta per trunk parameter tensor, fitted online from earlier control batches.

    The variance-optimal coefficient of a control variate is beta* = Cov(g, g_hat) / Var(g_hat); per tensor it
    is estimated as sum_t <g_t, g_hat_t> / sum_t ||g_hat_t||^2 over past control batches t, with exponential
    forgetting (`decay`) since the predictor and the gradients move during training. It is clipped to
    [0, `max_value`]: a negative beta means the predictor is worse than useless for that tensor, and large
    values come only from noise. Fixed before each C is drawn, so the estimator stays unbiased.
    `mode="fixed"` keeps beta = `fixed_value` (1 is the paper's plain control variate).

    Fitting on differences of paired control batches instead (the mean gradient cancels in them, so they target
    the per-example covariance exactly) was tried and dropped: with about 20 pairs in memory the ratio is noisy, and
    on the example's ViT (ntk, f = 0.25, steps 65 to 80) it kept beta high through a transient misprediction that
    the batch-sum fit damped (trainer's variance explained -10 against about 0).
    """

    def __init__(self, num_tensors: int, mode: str = "fitted", fixed_value: float = 1.0, decay: float = 0.95, max_value: float = 2.0):
        self.mode = mode
        self.fixed_value = fixed_value
        self.decay = decay
        self.max_value = max_value
        self.numerator = torch.zeros(num_tensors, dtype=torch.float64)
        self.denominator = torch.zeros(num_tensors, dtype=torch.float64)

    @property
    def values(self) -> torch.Tensor:
        if self.mode == "fixed":
            return torch.full_like(self.numerator, self.fixed_value, dtype=torch.float32)
        beta = torch.where(self.denominator > 0, self.numerator / self.denominator.clamp_min(1e-300), torch.zeros_like(self.numerator))
        return beta.clamp(0.0, self.max_value).float()

    def update(self, products: torch.Tensor, squares: torch.Tensor) -> None:
        """Add one control batch: per tensor, <g, g_hat> and ||g_hat||^2 of its true and raw predicted trunk
        gradients, from which beta = sum <g, g_hat> / sum ||g_hat||^2 per tensor."""
        self.numerator.mul_(self.decay).add_(products.double().cpu())
        self.denominator.mul_(self.decay).add_(squares.double().cpu())

    def state_dict(self) -> dict:
        return {"numerator": self.numerator.clone(), "denominator": self.denominator.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.numerator.copy_(state["numerator"])
        self.denominator.copy_(state["denominator"])
