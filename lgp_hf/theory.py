"""When sampling pays: the time to a given loss against plain backprop, from F, the step cost and the noise scale.

A step that draws the trunk rows with inclusion probabilities pi (sum pi = f n) costs cost(f) of a `Trainer` step
and leaves an update F(f) times as variable as the full batch's (`sampling.variance_factor`): it behaves as the
full update of a batch B / F. In the empirical model of large-batch training (McCandlish, Kaplan, Amodei et al.
2018, "An Empirical Model of Large-Batch Training"), the optimizer steps to a given loss grow as 1 + B_noise / B
with the gradient noise scale B_noise = tr(Sigma) / |G|^2 (`noise_scale`), so the time to that loss, relative to
`Trainer` at the same batch, is

    cost(f) (1 + F(f) B_noise / B) / (1 + B_noise / B)                               (`relative_time`).

Where noise limits progress (B << B_noise) that is F cost: the method beats `Trainer` at the same batch, and at the
equal-cost smaller batch too (F = 1 / cost there, F cost = 1), when F cost < 1. Where it does not (B >> B_noise),
only the cost counts, and a smaller batch would reach the loss with fewer examples (`batch_size_advice`).

B is the batch of the optimizer step: per-device batch x gradient accumulation x processes, since every micro-batch
of the update is sampled at the same f and F is the variance of the whole update over the full one's. What the
model leaves out: optimizer effects (Adam's normalisation, momentum, schedules), which make "a batch B / F"
approximate; that the sampled update's noise is F times the full batch's second moment, not its covariance (the
difference, (F - 1) / B more steps, is small against 1 + F B_noise / B for the batches used); and that B_noise
changes during training (it is re-estimated, averaged over recent observed steps). The benchmarks measure accuracy
at equal time for what the model cannot say.
"""

from __future__ import annotations

import math

#: `batch_size_advice` speaks when the batch is more than this many times the noise scale.
LARGE_BATCH_RATIO = 2.0


def relative_efficiency(variance_factor: float, step_cost: float) -> float:
    """(Variance x compute) relative to plain backprop: F cost. Below 1 the method reaches a given gradient noise
    with less compute."""
    return variance_factor * step_cost


def relative_time(variance_factor: float, step_cost: float, noise_ratio: float | None = None) -> float:
    """Time to a given loss relative to plain backprop at the same batch: cost (1 + F r) / (1 + r), r = B_noise / B;
    F cost when r is unknown (None) or infinite (the limit B << B_noise), cost at r = 0."""
    if noise_ratio is None or math.isinf(noise_ratio):
        return relative_efficiency(variance_factor, step_cost)
    return step_cost * (1 + variance_factor * noise_ratio) / (1 + noise_ratio)


def best_setting(settings, variance_factors, step_costs, margin: float = 0.0, noise_ratio: float | None = None, baseline=(1.0, 1.0)):
    """The setting (a control fraction, or a tuple such as (f, keep, predictor)) with the smallest `relative_time` (F
    cost without `noise_ratio` = B_noise / B), and that time, when it is below (1 - `margin`) x the time of `baseline`
    (setting, time); else `baseline`: by default plain backprop (f = 1, F = cost = 1). Candidates whose F is unknown
    (None or not finite) are skipped."""
    best = baseline
    for setting, factor, cost in zip(settings, variance_factors, step_costs):
        if factor is None or not math.isfinite(factor):
            continue
        time = relative_time(factor, cost, noise_ratio)
        if time < baseline[1] * (1 - margin) and time < best[1]:
            best = (setting, time)
    return best


def decision_margin(at_baseline: bool, margin: float) -> float:
    """How far below the baseline's the predicted time (`relative_time`) must be for "auto" to leave it: `margin` to
    start (at the baseline now: f = 1, `Trainer`'s own step), 0 to go on. Hysteresis: with one threshold, estimates
    that scatter around 1 - margin switch f between 1 and the best fraction from one decision to the next; once
    sampling, only an estimate that it loses (a time >= 1) ends it."""
    return margin if at_baseline else 0.0


def batch_size_advice(batch_size: int | None, noise_scale: float | None) -> str | None:
    """A sentence when the batch B is above LARGE_BATCH_RATIO noise scales, None otherwise or without an estimate.
    At batch B a run needs E/E_min = 1 + B / B_noise times the fewest examples to a given loss and S/S_min =
    1 + B_noise / B times the fewest steps; a batch of B_noise needs 2 and 2."""
    if batch_size is None or noise_scale is None or not batch_size > LARGE_BATCH_RATIO * noise_scale:
        return None
    ratio = batch_size / noise_scale if noise_scale > 0 else math.inf
    return (
        f"The batch of {batch_size} examples per optimizer step is {ratio:.1f} times the measured gradient noise scale "
        f"B_noise = {noise_scale:.3g} examples: it needs {1 + ratio:.2f} times the fewest examples to reach a given "
        f"loss (E/E_min = 1 + B/B_noise), where a batch of about B_noise needs 2, in {2 / (1 + noise_scale / batch_size):.2f} "
        f"times as many steps. Where a step's time grows with its batch, a smaller batch would reach the same loss sooner."
    )
