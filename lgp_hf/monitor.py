"""`SamplingMonitor`: the run's statistics of the draws, and the variance factor F it estimates for "auto".

Every sampled or observed micro-batch reports its boundary draw (`boundary.BoundaryDraw`); an observed one also the
squared trunk-gradient norm of each drawn row (`row_norms`). From those, the Horvitz-Thompson sums of
`sampling.variance_factor_sums` estimate F at the current fraction and at every candidate fraction of "auto"
(`CANDIDATE_FRACTIONS`), as the scores of the very same rows would have drawn them. Sums are kept since the last log
(`lgp/*`), since the last decision of "auto" and over the run (`summary`). The rows' squared norms and that of the
update, less its sampling variance, also give the gradient noise scale (`noise_scale`), averaged over the run's
observed micro-batches;
everything travels in checkpoints. With a gradient predictor (`predictor`) each observed row also reports the change of
its squared norm under the control variate, ||g_i - beta p_i||^2 - ||g_i||^2: F with the predictor is then estimated
with the residuals in the numerators, and F without it is kept beside it, for their ratio
(`lgp/predictor_variance_ratio`) and for "auto", which chooses between them; the F logged is the update's: with the
residuals while the predictor is applied (`predicting`), without them while it is only measured. With weight gradients
from sampled token rows (`token_sampling`) each observed row also reports the variance its token draws add: it joins
every numerator (`token_sampling.token_variance_sums`), so that F = 1 + (row sampling variance + token sampling
variance) / sum_i ||g_i||^2, and its share of the current design's numerator is logged (`lgp/token_variance_share`).
The sums are kept per keep of `keeps` (a column each: the set one, or under `weight_gradient_keep="auto"` 1 and each
candidate), and per fraction: the current one, each candidate, and f = 1 (every row kept: the token draws' variance
alone), so that "auto" sees F(f, k) of every setting it chooses from; the F logged is that of the current keep
(`keep_index`).
"""

from __future__ import annotations

import statistics

import torch

from .boundary import BoundaryDraw
from .noise_scale import NoiseScaleAverages, noise_scale_estimates
from .sampling import inclusion_probabilities, variance_factor_sums
from .token_sampling import token_variance_sums

#: Fractions "auto" may choose (those at or above its `auto_min_control_fraction`).
CANDIDATE_FRACTIONS = (0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

#: The trunk's backward work: the replayed blocks' (`replay.BlockReplay.take_counts`: rows backpropagated and present,
#: (row, position) pairs with a gradient and present), and the token rows whose weight gradient term was computed and
#: those with a term (`token_sampling.WeightGradientSampler.take_counts`).
BACKWARD_WORK = ("computed_rows", "block_rows", "computed_tokens", "block_tokens", "weight_gradient_tokens", "weight_gradient_token_rows")

#: The monitor's sums of F (with the predictor's residuals where one is fitted; `*_unpredicted`: without).
FACTOR_SUMS = ("log_factors", "decision_factors", "run_factors", "log_unpredicted", "decision_unpredicted", "run_unpredicted")

#: Observed rows needed before "auto" trusts an F estimate.
MIN_OBSERVED_ROWS = 64


class _FactorSums:
    """Summed numerators of F (a row per fraction: the current one, each candidate, then f = 1; a column per keep) and
    its denominator, the rows behind them, and the token sampling variance in the current fraction's numerator per
    keep (`token`)."""

    def __init__(self, keeps: int = 1):
        self.numerators = torch.zeros(2 + len(CANDIDATE_FRACTIONS), keeps, dtype=torch.float64)
        self.denominator = 0.0
        self.rows = 0
        self.token = torch.zeros(keeps, dtype=torch.float64)

    def add(self, numerators: torch.Tensor, denominator: float, rows: int, token: torch.Tensor | None = None) -> None:
        self.numerators += numerators
        self.denominator += denominator
        self.rows += rows
        if token is not None:
            self.token += token

    def factors(self) -> list[list[float]] | None:
        """1 + numerator / denominator, per fraction (current, candidates, 1) and keep; None before any gradient."""
        if self.denominator <= 0:
            return None
        return (1 + self.numerators / self.denominator).tolist()

    def token_share(self, keep: int) -> float | None:
        """The token draws' share of the current design's numerator at the `keep`-th keep; None without token draws."""
        return float(self.token[keep] / self.numerators[0, keep]) if self.token[keep] > 0 else None

    def state_dict(self) -> dict:
        return {"numerators": self.numerators.clone(), "denominator": self.denominator, "rows": self.rows, "token": self.token.clone()}

    def load_state_dict(self, state: dict) -> None:
        """The sums of a checkpoint; those of another layout (an earlier version, other keeps) start fresh."""
        if state["numerators"].shape != self.numerators.shape:
            return
        self.numerators.copy_(state["numerators"])
        self.denominator, self.rows = state["denominator"], state["rows"]
        self.token.copy_(state["token"])


class SamplingMonitor:
    def __init__(self, uniform_mix: float, keeps: tuple[float, ...] = (1.0,)):
        self.uniform_mix, self.keeps = uniform_mix, tuple(keeps)
        self.keep_index = 0  # the column of the keep in use (set by the trainer)
        self.totals = {"rows": 0, "drawn_rows": 0, "uniform_draws": 0, **dict.fromkeys(BACKWARD_WORK, 0)}
        self.log = {"rows": 0, "drawn_rows": 0, **dict.fromkeys(BACKWARD_WORK, 0), "costs": []}
        for name in FACTOR_SUMS:  # `*_unpredicted`: F without the predictor, from the same rows (only while one is fitted)
            setattr(self, name, self._sums())
        self.predicting = False  # the predictor's correction is in the update (set by the trainer)
        self.noise = NoiseScaleAverages()

    def record(
        self, draws: list[BoundaryDraw], fraction: float, squared_norms: torch.Tensor | None, batch_squared_norm: float | None,
        backward_work: tuple[int, ...], predicted_change: torch.Tensor | None = None, token_variances: torch.Tensor | None = None,
    ) -> None:
        """One micro-batch: its draws, the fraction they were made at, its rows' squared trunk-gradient norms as read
        below the boundary and the squared norm of the update the trunk's linear layers received when it was observed
        (one draw only: rows are attributed to it), the trunk's backward work (`BACKWARD_WORK`), with a predictor each row's
        ||g_i - beta p_i||^2 - ||g_i||^2 (unweighted: `predictor.LinearGradientPredictor.finish_micro_batch`), and with
        token sampling each row's token variance as read at each keep (rows x keeps: `row_norms`)."""
        for draw in draws:
            for sums in (self.totals, self.log):
                sums["rows"] += draw.drawn.numel()
                sums["drawn_rows"] += int(draw.drawn.sum())
            self.totals["uniform_draws"] += int(draw.uniform)
        for sums in (self.totals, self.log):
            for key, value in zip(BACKWARD_WORK, backward_work):
                sums[key] += value
        if squared_norms is None or len(draws) != 1 or draws[0].uniform:
            return
        draw = draws[0]
        # the hooks read the gradient below the boundary, where a drawn row's was weighted 1 / pi_i: ||g_i||^2 is
        # pi_i^2 times what they read (at f = 1, pi_i = 1)
        squared_norms = squared_norms * draw.probabilities.double() ** 2
        candidates = torch.stack([draw.probabilities] + [inclusion_probabilities(draw.scores, f, self.uniform_mix) for f in CANDIDATE_FRACTIONS]
                                 + [torch.ones_like(draw.probabilities)])
        # the current design's own F: the probabilities it drew with (all 1 at f = 1)
        numerators, denominator = variance_factor_sums(candidates, draw.probabilities, draw.drawn, squared_norms)
        # the token draws' variance adds to the rows' (independent draws given the rows), per keep
        tokens = torch.zeros(len(candidates), len(self.keeps), dtype=torch.float64)
        if token_variances is not None:
            tokens = token_variance_sums(candidates, draw.probabilities, draw.drawn, token_variances.reshape(len(draw.drawn), -1))
        factors = update = numerators[:, None] + tokens
        if predicted_change is not None:
            for sums in (self.log_unpredicted, self.decision_unpredicted, self.run_unpredicted):
                sums.add(factors, denominator, int(draw.drawn.sum()), tokens[0])
            # the update's variance: the residuals g_i - beta p_i in the numerators, against the same sum of ||g_i||^2
            factors = variance_factor_sums(candidates, draw.probabilities, draw.drawn, squared_norms + predicted_change)[0][:, None] + tokens
            update = factors if self.predicting else update
        for sums in (self.log_factors, self.decision_factors, self.run_factors):
            sums.add(factors, denominator, int(draw.drawn.sum()), tokens[0])
        # S and G2 of the batch, estimated from the drawn rows: the squared norm of the update read (the drawn rows'
        # g_i / pi_i, their sampled weight gradients, the predictor's correction while applied) has the update's
        # variance (the current design's numerator at the keep in use) on top of G2
        if draw.drawn.numel() > 1:
            variance = float(update[0, self.keep_index])
            self.noise.add(*noise_scale_estimates(denominator, batch_squared_norm - variance, draw.drawn.numel()))

    def record_cost(self, cost: float) -> None:
        """A timed sampled step's cost against the median `Trainer` step (`costs.StepCostModel`)."""
        self.log["costs"].append(cost)

    def _sums(self) -> _FactorSums:
        return _FactorSums(len(self.keeps))

    def take_decision_factors(self) -> tuple[list[list[float]] | None, list[list[float]] | None]:
        """F at the current fraction, at each candidate fraction (`CANDIDATE_FRACTIONS` order) and at f = 1, each at
        every keep of `keeps`, from the rows observed since the last call, once there are `MIN_OBSERVED_ROWS` of them
        (then the sums restart): (without the predictor, with it); None for what was not measured, both None before."""
        if self.decision_factors.rows < MIN_OBSERVED_ROWS:
            return None, None
        predicted, plain = self.decision_factors.factors(), self.decision_unpredicted.factors()
        self.decision_factors, self.decision_unpredicted = self._sums(), self._sums()
        if plain is None:  # no predictor: the sums are the plain estimator's
            predicted, plain = None, predicted
        return plain, predicted

    def _update_factor(self, factors: list[list[float]] | None, unpredicted: list[list[float]] | None) -> float | None:
        """F of the update at the current fraction and keep: with the predictor's residuals only while it is applied."""
        chosen = factors if unpredicted is None or self.predicting else unpredicted
        return None if chosen is None else chosen[0][self.keep_index]

    def take_log_values(self) -> dict[str, float]:
        """Since the last log: the share of rows drawn, of trunk block rows backpropagated, F at the current fraction
        and the median measured step cost (robust to a step slowed by something else); the run's count of uniform
        draws and its gradient noise scale."""
        log, logs = self.log, {"lgp/uniform_draws": self.totals["uniform_draws"]}
        if log["rows"]:
            logs["lgp/drawn_fraction"] = log["drawn_rows"] / log["rows"]
        if log["block_rows"]:
            logs["lgp/trunk_rows_computed"] = log["computed_rows"] / log["block_rows"]
        if log["block_tokens"]:
            logs["lgp/trunk_tokens_computed"] = log["computed_tokens"] / log["block_tokens"]
        if log["weight_gradient_token_rows"]:
            logs["lgp/weight_gradient_tokens_computed"] = log["weight_gradient_tokens"] / log["weight_gradient_token_rows"]
        factors, unpredicted = self.log_factors.factors(), self.log_unpredicted.factors()
        if factors is not None:
            logs["lgp/variance_factor"] = self._update_factor(factors, unpredicted)
        share = self.log_factors.token_share(self.keep_index)
        if share is not None:
            logs["lgp/token_variance_share"] = share
        if factors is not None and unpredicted is not None:
            logs["lgp/predictor_variance_ratio"] = factors[0][self.keep_index] / unpredicted[0][self.keep_index]
        if log["costs"]:
            logs["lgp/step_cost"] = statistics.median(log["costs"])
        if self.noise.value() is not None:
            logs["lgp/noise_scale"] = self.noise.value()
        self.log = {"rows": 0, "drawn_rows": 0, **dict.fromkeys(BACKWARD_WORK, 0), "costs": []}
        self.log_factors, self.log_unpredicted = self._sums(), self._sums()
        return logs

    def summary(self) -> dict[str, float | None]:
        totals = self.totals
        factors, unpredicted = self.run_factors.factors(), self.run_unpredicted.factors()
        return {
            "lgp_drawn_fraction": totals["drawn_rows"] / totals["rows"] if totals["rows"] else None,
            "lgp_trunk_rows_computed": totals["computed_rows"] / totals["block_rows"] if totals["block_rows"] else None,
            "lgp_trunk_tokens_computed": totals["computed_tokens"] / totals["block_tokens"] if totals["block_tokens"] else None,
            "lgp_weight_gradient_tokens_computed": (
                totals["weight_gradient_tokens"] / totals["weight_gradient_token_rows"] if totals["weight_gradient_token_rows"] else None),
            "lgp_token_variance_share": self.run_factors.token_share(self.keep_index),
            "lgp_variance_factor": None if factors is None else self._update_factor(factors, unpredicted),
            "lgp_predictor_variance_ratio": (
                None if factors is None or unpredicted is None else factors[0][self.keep_index] / unpredicted[0][self.keep_index]),
            "lgp_uniform_draws": totals["uniform_draws"],
            "lgp_noise_scale": self.noise.value(),
        }

    def state_dict(self) -> dict:
        return {
            "totals": dict(self.totals), "log": {**self.log, "costs": list(self.log["costs"])},
            "factors": {name: getattr(self, name).state_dict() for name in FACTOR_SUMS},
            "noise": self.noise.state_dict(), "keep_index": self.keep_index,
        }

    def load_state_dict(self, state: dict) -> None:
        self.totals.update(state["totals"])
        self.log = {**dict.fromkeys(BACKWARD_WORK, 0), **state["log"], "costs": list(state["log"]["costs"])}
        for name, sums in state["factors"].items():
            getattr(self, name).load_state_dict(sums)
        self.keep_index = state.get("keep_index", 0)
        if "noise" in state:  # written before the noise scale: it starts fresh
            self.noise.load_state_dict(state["noise"])
