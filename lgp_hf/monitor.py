"""`PredictorMonitor`: the online statistics of a run (pairing, scoring, what is logged and summarised).

Consecutive observed optimizer steps form pairs. The first keeps its control batch aside (`keep_pending`); the
second scores the pair: in the difference of the two control gradients the mean gradient cancels, so summed over
pairs 1 - sum ||dR||^2 / sum ||dG||^2 (R = true - predicted) estimates E, the per-example variance the prediction
removes (`estimator.variance_explained`). The differences are taken between count sketches of the gradients
(`GradientSketch`): what is kept of the first batch is D floats, not a parameter-sized vector, and the sketched
squared norms are unbiased. Sums are kept since the last log (`lgp/variance_explained`), since the
last control fraction update (what "auto" decides on) and over the run (`summary`). Everything here is a float or
a tensor that every DDP rank holds identically, and all of it travels in checkpoints.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .estimator import alignment_and_residual, paired_squared_differences, variance_explained
from .predictors import CountSketch, largest_prime_at_most

#: Width of the count sketch of trunk gradients that pairs are scored on: the relative error of a sketched
#: squared norm is about sqrt(2 / D) = 0.6 % per pair, and it averages out over pairs.
SCORE_SKETCH_WIDTH = largest_prime_at_most(1 << 16)

#: Pairs needed before "auto" may change the control fraction: fewer give too noisy an estimate of E.
MIN_PAIRS_PER_DECISION = 2


class PredictorMonitor:
    def __init__(self) -> None:
        self.metrics: dict[str, list[float]] = defaultdict(list)
        self.totals = {
            "alignment_sum": 0.0, "observations": 0, "last_alignment": None, "control_examples": 0, "examples": 0,
            "fallback_steps": 0, "residual_squares": 0.0, "gradient_squares": 0.0,
        }
        self.pending: dict | None = None  # the first control batch of a pair (`keep_pending`)
        self.log_pairs = [0.0, 0.0]  # summed (||dR||^2, ||dG||^2) since the last log
        self.recent_pairs = [0.0, 0.0, 0]  # the same and the pair count since the last control fraction update

    def count_examples(self, num_control: int, batch_size: int) -> None:
        self.totals["control_examples"] += num_control
        self.totals["examples"] += batch_size

    def count_fallback_step(self) -> None:
        self.totals["fallback_steps"] += 1

    def record_alignment(self, true_squares: torch.Tensor, product: torch.Tensor | None, predicted_squares: torch.Tensor | None) -> None:
        """The batch-level cosine and relative residual of one observed control batch (monitoring numbers), from
        ||g||^2, <g, p> and ||p||^2 (None: no prediction)."""
        if product is None:
            alignment, residual = 0.0, 1.0
        else:
            alignment, residual = alignment_and_residual(float(true_squares.sum()), float(product), float(predicted_squares))
        self.metrics["lgp/alignment"].append(alignment)
        self.metrics["lgp/predictor_residual"].append(residual)
        self.totals["alignment_sum"] += alignment
        self.totals["observations"] += 1
        self.totals["last_alignment"] = alignment

    def take_pending(self) -> dict | None:
        pending, self.pending = self.pending, None
        return pending

    def keep_pending(self, observation: dict) -> None:
        """The first control batch of a pair: {"sketch", "step", "fit"} ("fit": the (signal, encoded trunk
        gradient) pairs the predictor will learn from) and, when there was a prediction, {"predicted_sketch",
        "products", "squares"} (`PredictedGradientMixin._observe`)."""
        self.pending = observation

    def score_pair(self, first: dict, second: dict) -> None:
        """Adds the pair's sketched (||dR||^2, ||dG||^2); the zero predictor's residual unless both were predicted."""
        predicted = None
        if "predicted_sketch" in first and "predicted_sketch" in second:
            predicted = (first["predicted_sketch"], second["predicted_sketch"])
        residual_squares, gradient_squares = paired_squared_differences((first["sketch"], second["sketch"]), predicted)
        for sums in (self.log_pairs, self.recent_pairs):
            sums[0] += residual_squares
            sums[1] += gradient_squares
        self.recent_pairs[2] += 1
        self.totals["residual_squares"] += residual_squares
        self.totals["gradient_squares"] += gradient_squares

    def take_recent_variance_explained(self) -> float | None:
        """E since the last call, once at least `MIN_PAIRS_PER_DECISION` pairs were scored (then the sums restart);
        None before."""
        if self.recent_pairs[2] < MIN_PAIRS_PER_DECISION:
            return None
        explained = variance_explained(*self.recent_pairs[:2])
        self.recent_pairs = [0.0, 0.0, 0]
        return explained

    def take_log_values(self) -> dict[str, float]:
        """Means since the last log of the recorded metrics, and E of the pairs scored since then."""
        logs = {key: sum(values) / len(values) for key, values in self.metrics.items() if values}
        self.metrics.clear()
        explained = variance_explained(*self.log_pairs)
        if explained is not None:
            logs["lgp/variance_explained"] = explained
        self.log_pairs = [0.0, 0.0]
        logs["lgp/fallback_steps"] = self.totals["fallback_steps"]
        return logs

    def summary(self) -> dict[str, float | None]:
        totals = self.totals
        return {
            "lgp_mean_alignment": totals["alignment_sum"] / totals["observations"] if totals["observations"] else None,
            "lgp_final_alignment": totals["last_alignment"],
            "lgp_variance_explained": variance_explained(totals["residual_squares"], totals["gradient_squares"]),
            "lgp_backward_work_skipped": 1 - totals["control_examples"] / totals["examples"] if totals["examples"] else 0.0,
            "lgp_fallback_steps": totals["fallback_steps"],
        }

    def state_dict(self) -> dict:
        return {
            "pending_batch": self.pending, "log_pairs": list(self.log_pairs), "recent_pairs": list(self.recent_pairs),
            "totals": dict(self.totals),
        }

    def load_state_dict(self, state: dict) -> None:
        self.pending = state["pending_batch"]
        if self.pending is not None and "encoded" in self.pending:  # written before chunk contrasts (issue 14)
            self.pending["fit"] = [(self.pending.pop("signal"), self.pending.pop("encoded"))]
        self.log_pairs, self.recent_pairs = list(state["log_pairs"]), list(state["recent_pairs"])
        if len(self.recent_pairs) == 2:  # written before pairs were counted
            self.recent_pairs.append(MIN_PAIRS_PER_DECISION)
        self.totals.update(state["totals"])


class GradientSketch:
    """Count sketch (`predictors.CountSketch`, width D = `SCORE_SKETCH_WIDTH`, its own seed) of flat trunk
    gradients, taken one tensor at a time at its offset in the flat vector: E <S x, S y> = <x, y>, so squared
    norms of sketched differences are unbiased estimates of the true ones. Exact (no two coordinates share a
    bucket) when the trunk has at most D parameters."""

    def __init__(self, numels: list[int], width: int = SCORE_SKETCH_WIDTH, seed: int = 1):
        self.count_sketch = CountSketch(width, seed)
        self.offsets = [0]
        for numel in numels[:-1]:
            self.offsets.append(self.offsets[-1] + numel)

    def zeros(self, device: torch.device | str) -> torch.Tensor:
        return torch.zeros(self.count_sketch.width, dtype=torch.float32, device=device)

    def add(self, sketch: torch.Tensor, index: int, tensor: torch.Tensor, scale: float = 1.0) -> None:
        """sketch += scale S(tensor `index` of the flat vector) (S is linear: no scaled copy of the tensor)."""
        sketch.add_(self.count_sketch(tensor.reshape(-1), offset=self.offsets[index]), alpha=scale)
