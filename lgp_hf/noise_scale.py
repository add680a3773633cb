"""The gradient noise scale B_noise = tr(Sigma) / |G|^2, estimated from what an observed step reads: the pure math.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training"): with per-example gradients of mean G and
covariance Sigma, the optimizer steps to a given loss grow as 1 + B_noise / B at batch B (`theory.relative_time`).
A micro-batch of B rows whose loss is the batch mean has row contributions g_i = G_i / B to its gradient
G_B = sum_i g_i. From S = sum_i ||g_i||^2 and G2 = ||G_B||^2,

    E[G2] = |G|^2 + tr(Sigma) / B,    E[S] = (|G|^2 + tr(Sigma)) / B,

so |G|^2 = B (G2 - S) / (B - 1) and tr(Sigma) = B (B S - G2) / (B - 1) are unbiased ("B_simple" in that paper's
appendix A). Their ratio is very noisy from one batch: both are smoothed over observed micro-batches separately
(exponential moving averages) before dividing, as the paper advises. At f < 1 the hooks read the Horvitz-Thompson
sum sum_{i drawn} g_i / pi_i, whose squared norm exceeds G2 by the sampling variance sum_i (1 - pi_i) / pi_i ||g_i||^2
on average; subtracting that variance's Horvitz-Thompson estimate (`sampling.variance_factor_sums`) leaves G2's.
"""

from __future__ import annotations

import math

#: Weight of the past in the moving averages, per observed micro-batch.
NOISE_SCALE_DECAY = 0.9
#: Observed micro-batches before the estimate is reported or used.
MIN_NOISE_SCALE_OBSERVATIONS = 4


def noise_scale_estimates(squared_norm_sum: float, batch_squared_norm: float, rows: int) -> tuple[float, float]:
    """(tr(Sigma), |G|^2), unbiased, from S = sum_i ||g_i||^2 and G2 = ||sum_i g_i||^2 over `rows` >= 2 rows whose
    loss is their mean (per-example gradients B g_i): tr(Sigma) = B (B S - G2) / (B - 1), |G|^2 = B (G2 - S) / (B - 1)."""
    b = rows
    return b * (b * squared_norm_sum - batch_squared_norm) / (b - 1), b * (batch_squared_norm - squared_norm_sum) / (b - 1)


def noise_scale(trace: float, squared_mean: float) -> float:
    """B_noise = tr(Sigma) / |G|^2, in examples: inf when the estimate of |G|^2 is not positive (the mean gradient
    is lost in the noise: B_noise is far above the batches it came from), 0 when that of tr(Sigma) is not."""
    return max(trace, 0.0) / squared_mean if squared_mean > 0 else math.inf


class NoiseScaleAverages:
    """Exponential moving averages of tr(Sigma) and |G|^2 over observed micro-batches (their ratio needs no bias
    correction: both averages start at 0 with the same weights)."""

    def __init__(self, decay: float = NOISE_SCALE_DECAY):
        self.decay = decay
        self.trace = self.squared_mean = 0.0
        self.observations = 0

    def add(self, trace: float, squared_mean: float) -> None:
        self.trace = self.decay * self.trace + (1 - self.decay) * trace
        self.squared_mean = self.decay * self.squared_mean + (1 - self.decay) * squared_mean
        self.observations += 1

    def value(self) -> float | None:
        """B_noise of the averages, None before MIN_NOISE_SCALE_OBSERVATIONS observed micro-batches."""
        if self.observations < MIN_NOISE_SCALE_OBSERVATIONS:
            return None
        return noise_scale(self.trace, self.squared_mean)

    def state_dict(self) -> dict:
        return {"trace": self.trace, "squared_mean": self.squared_mean, "observations": self.observations}

    def load_state_dict(self, state: dict) -> None:
        self.trace, self.squared_mean, self.observations = state["trace"], state["squared_mean"], state["observations"]
