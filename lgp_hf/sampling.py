"""Importance sampling of the rows whose trunk gradient is computed: the pure math, on plain tensors.

At the head/trunk boundary h (the input of the head modules) the backward has, for every row i of a micro-batch
(an example), the gradient dL/dh_i before any trunk backward runs. Its norm is the row's score s_i. The control
set C is drawn by Poisson sampling with inclusion probabilities pi_i (sum_i pi_i = f n, `inclusion_probabilities`),
and the backward goes on with w_i dL/dh_i, w_i = 1{i in C} / pi_i (`horvitz_thompson_weights`).

Unbiased by the chain rule: the trunk gradient is linear in the gradient at the boundary,
g = (dh/dtheta)^T dL/dh, and E[w_i] = 1 for every row, so E[(dh/dtheta)^T diag(w) dL/dh] = g for any loss
(token-level, weighted, contrastive), any parameter sharing (a tied embedding's input use is trunk) and any trunk,
BatchNorm included (its backward gives the total derivative of whatever reaches it). Paths to the loss that do not
cross the boundary keep their exact gradient.

Variance (Poisson sampling, rows i with trunk gradient contributions g_i = (dh_i/dtheta)^T dL/dh_i):
    Var = sum_i (1 - pi_i) / pi_i ||g_i||^2,
smallest for pi_i proportional to ||g_i||; the score ||dL/dh_i|| stands in for ||g_i||, and mixing it with the
uniform distribution bounds 1 / pi_i <= 1 / (uniform_mix f) where the score misjudges a row. Against the
full-batch gradient's own variance over batches, n tr Var(g), the update's variance is F times larger,
    F = 1 + sum_i (1 - pi_i)/pi_i ||g_i||^2 / sum_i ||g_i||^2        (`variance_factor`),
with second moments in place of variances: the mean gradient is small against the spread of per-example gradients
(gradient noise scales of 36 to 170 examples on the example's ViT), and the difference errs towards F larger.
Uniform sampling gives F = 1 / f exactly. The method beats plain backprop at equal compute when F x cost < 1.
"""

from __future__ import annotations

import torch


def inclusion_probabilities(scores: torch.Tensor, fraction: float, uniform_mix: float = 0.0) -> torch.Tensor:
    """pi_i = min(1, lam q_i), q_i = (1 - a) s_i / sum s + a / n (a = `uniform_mix`), lam such that sum pi = f n
    (`capped_probabilities`).

    Scores must be finite and >= 0; when they sum to 0 the draw is uniform. Without a mix, rows with a zero score (a
    zero gradient at the boundary: nothing to compute) get pi = 0, and when fewer than f n rows have a score the others
    all get 1 (then sum pi < f n). Returns float64 on the CPU (probabilities are divided by, and the exact tests
    enumerate them).
    """
    scores = scores.detach().double().cpu()
    count = scores.numel()
    if fraction * count >= count:
        return torch.ones(count, dtype=torch.float64)
    total = float(scores.sum())
    uniform = torch.full((count,), 1.0 / count, dtype=torch.float64)
    weights = uniform if total <= 0 else (1 - uniform_mix) * scores / total + uniform_mix * uniform
    return capped_probabilities(weights, fraction * count)


def capped_probabilities(weights: torch.Tensor, target: float | torch.Tensor) -> torch.Tensor:
    """min(1, lam w_i) with lam such that they sum to `target`, for weights w_i >= 0 (float64, on their device).

    Units whose share would exceed 1 are kept with probability 1 and the rest share the target minus their count in
    proportion to w, repeated until no new unit is capped; when no weight is left uncapped, the capped units get 1 and
    the others 0 (the sum is then below the target)."""
    capped = torch.zeros_like(weights, dtype=torch.bool)
    while True:
        free = weights.masked_fill(capped, 0.0)
        free_sum = free.sum()
        if not bool(free_sum > 0):
            return capped.double()
        probabilities = torch.where(capped, 1.0, (target - capped.sum(dtype=weights.dtype)) / free_sum * weights)
        newly = (probabilities >= 1) & ~capped
        if not bool(newly.any()):
            return probabilities.clamp_(max=1.0)
        capped |= newly


def poisson_draw(probabilities: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Row i drawn independently with probability pi_i (a bool mask): Poisson sampling."""
    return torch.rand(probabilities.shape, generator=generator, dtype=torch.float64, device=probabilities.device) < probabilities


def horvitz_thompson_weights(drawn: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
    """w_i = 1{drawn} / pi_i: E[w_i] = 1 for every row with pi_i > 0."""
    return torch.where(drawn, 1.0 / probabilities, torch.zeros_like(probabilities))


def sampling_variance(probabilities: torch.Tensor, squared_norms: torch.Tensor) -> torch.Tensor:
    """sum_i (1 - pi_i) / pi_i ||g_i||^2: the variance the draw adds to sum_i g_i (Poisson sampling). A row with
    pi_i = 0 (a zero score without a uniform mix: its gradient at the boundary is zero) adds nothing."""
    return skip_odds(probabilities, squared_norms).sum()


def skip_odds(probabilities: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(1 - pi) / pi * values elementwise, 0 where pi = 0: each unit's share of `sampling_variance`."""
    positive = probabilities > 0
    return torch.where(positive, (1 - probabilities) / probabilities.where(positive, 1.0) * values, 0.0)


def variance_factor(probabilities: torch.Tensor, squared_norms: torch.Tensor) -> float:
    """F = 1 + `sampling_variance` / sum_i ||g_i||^2 (1 when every gradient is zero)."""
    total = float(squared_norms.sum())
    return 1.0 if total <= 0 else 1.0 + float(sampling_variance(probabilities, squared_norms)) / total


def variance_factor_sums(
    candidates: torch.Tensor, probabilities: torch.Tensor, drawn: torch.Tensor, squared_norms: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Horvitz-Thompson estimates, from the rows drawn at `probabilities`, of the two sums of `variance_factor`
    under each row of `candidates` (k x n inclusion probabilities of other designs): (k numerators, denominator).

    Only the drawn rows' squared norms are needed (`squared_norms` may be anything elsewhere); each drawn row
    counts 1 / pi_i times, so both sums are unbiased for their full-batch values. Summed over micro-batches,
    1 + numerator / denominator estimates F of each candidate (a ratio estimate).
    """
    weights = horvitz_thompson_weights(drawn, probabilities)
    norms = torch.where(drawn, squared_norms.double(), torch.zeros_like(weights))
    numerators = skip_odds(candidates, weights * norms).sum(-1)
    return numerators, float((weights * norms).sum())


def draw_generator(seed: int, step: int, micro_step: int, rank: int) -> torch.Generator:
    """The generator of one micro-batch's draw, determined by (seed, optimizer step, micro-batch, rank):
    reproducible (resumes redraw the same rows), independent between ranks, and with no state to checkpoint."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + micro_step) * 10_007 + rank)
