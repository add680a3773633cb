"""`PredictorMonitor`: the online statistics of a run (pairing, scoring, what is logged and summarised).

Consecutive observed optimizer steps form pairs. The first keeps its control batch aside (`keep_pending`); the
second scores the pair: in the difference of the two control gradients the mean gradient cancels, so summed over
pairs 1 - sum ||dR||^2 / sum ||dG||^2 (R = true - predicted) estimates E, the per-example variance the prediction
removes (`estimator.variance_explained`). Sums are kept since the last log (`lgp/variance_explained`), since the
last control fraction update (what "auto" decides on) and over the run (`summary`). Everything here is a float or
a tensor that every DDP rank holds identically, and all of it travels in checkpoints.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .estimator import paired_squared_differences, variance_explained

#: Pairs needed before "auto" may change the control fraction: fewer give too noisy an estimate of E.
MIN_PAIRS_PER_DECISION = 2


class PredictorMonitor:
    def __init__(self) -> None:
        self.metrics: dict[str, list[float]] = defaultdict(list)
        self.totals = {
            "alignment_sum": 0.0, "observations": 0, "last_alignment": None, "control_examples": 0, "examples": 0,
            "fallback_steps": 0, "residual_squares": 0.0, "gradient_squares": 0.0,
        }
        self.pending: dict | None = None  # the first control batch of a pair: {"signal", "trunk_gradient", "step"}
        self.log_pairs = [0.0, 0.0]  # summed (||dR||^2, ||dG||^2) since the last log
        self.recent_pairs = [0.0, 0.0, 0]  # the same and the pair count since the last control fraction update

    def count_examples(self, num_control: int, batch_size: int) -> None:
        self.totals["control_examples"] += num_control
        self.totals["examples"] += batch_size

    def count_fallback_step(self) -> None:
        self.totals["fallback_steps"] += 1

    def record_alignment(self, alignment: float, residual: float) -> None:
        """The batch-level cosine and relative residual of one observed control batch (monitoring numbers)."""
        self.metrics["lgp/alignment"].append(alignment)
        self.metrics["lgp/predictor_residual"].append(residual)
        self.totals["alignment_sum"] += alignment
        self.totals["observations"] += 1
        self.totals["last_alignment"] = alignment

    def take_pending(self) -> dict | None:
        pending, self.pending = self.pending, None
        return pending

    def keep_pending(self, signal: torch.Tensor, trunk_gradient: torch.Tensor, step: int) -> None:
        self.pending = {"signal": signal, "trunk_gradient": trunk_gradient, "step": step}

    def score_pair(self, first: torch.Tensor, second: torch.Tensor, predicted: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        residual_squares, gradient_squares = paired_squared_differences((first, second), predicted)
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
        self.log_pairs, self.recent_pairs = list(state["log_pairs"]), list(state["recent_pairs"])
        if len(self.recent_pairs) == 2:  # written before pairs were counted
            self.recent_pairs.append(MIN_PAIRS_PER_DECISION)
        self.totals.update(state["totals"])
