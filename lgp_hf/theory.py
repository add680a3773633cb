"""When sampling pays: the variance factor F times the step cost, against plain backprop.

A step that draws the trunk rows with inclusion probabilities pi (sum pi = f n) costs cost(f) of a `Trainer` step
and leaves an update F(f) times as variable as the full batch's (`sampling.variance_factor`). Reaching a given
gradient noise takes F times as many steps, so at equal compute the method beats plain backprop at the same batch
when F(f) cost(f) < 1, and `Trainer` at the equal-cost smaller batch too (its F is 1 / cost there, F cost = 1).
What this leaves out: it counts gradient noise, not the mean gradient (the same for both), nor optimizer effects
(Adam's normalisation, momentum, schedules); the benchmarks measure accuracy at equal time for that.
"""

from __future__ import annotations

import math


def relative_efficiency(variance_factor: float, step_cost: float) -> float:
    """(Variance x compute) relative to plain backprop: F cost. Below 1 the method reaches a given gradient noise
    with less compute."""
    return variance_factor * step_cost


def best_control_fraction(fractions, variance_factors, step_costs, margin: float = 0.0) -> tuple[float, float]:
    """The fraction f < 1 with the smallest F(f) cost(f), and that product, when it is below 1 - `margin`; else
    (1.0, 1.0), plain backprop (F = cost = 1). Candidates whose F is unknown (None or not finite) are skipped."""
    best = (1.0, 1.0)
    for fraction, factor, cost in zip(fractions, variance_factors, step_costs):
        if factor is None or not math.isfinite(factor) or fraction >= 1:
            continue
        efficiency = relative_efficiency(factor, cost)
        if efficiency < 1 - margin and efficiency < best[1]:
            best = (fraction, efficiency)
    return best


def decision_margin(current_fraction: float, margin: float) -> float:
    """How far below 1 F x cost must be for "auto" to sample: `margin` to start (f = 1 now), 0 to go on (f < 1 now).
    Hysteresis: with one threshold, estimates that scatter around 1 - margin switch f between 1 and the best
    fraction from one decision to the next; once sampling, only an estimate that it loses (F x cost >= 1) ends it."""
    return margin if current_fraction >= 1 else 0.0
