"""`PredictedGradientArguments`: `TrainingArguments` plus the settings of the sampled backward."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


#: Allowed values of `gradient_predictor`.
GRADIENT_PREDICTORS = ("none", "linear", "auto")


@dataclass
class PredictedGradientSettings:
    r"""
    The sampled backward's settings, as a dataclass to combine with any `TrainingArguments` subclass:
    [`PredictedGradientArguments`] is `PredictedGradientSettings` + `TrainingArguments`; for another trainer's
    config, list it first so that its own defaults win, e.g.
    `@dataclass class SFTPredictedGradientConfig(SFTConfig, PredictedGradientSettings)`. A trainer given plain
    `TrainingArguments` uses these defaults.

    In the backward, at the input of the head, each row (example) of a micro-batch is drawn with inclusion
    probability pi_i proportional to the norm of its gradient there (mixed with uniform), sum_i pi_i = f n; the
    trunk's backward continues on the drawn rows only, each weighted 1 / pi_i: an unbiased estimate of the full
    gradient for any model and loss. The head's gradient is exact.

    Parameters:
        control_fraction (`float` or `"auto"`, defaults to `"auto"`):
            f, the expected share of each micro-batch's rows whose trunk gradient is computed. Must be in (0, 1]; 1
            is plain backprop, exactly `transformers.Trainer`'s computation. `"auto"` (the default) starts at 1,
            decides first as soon as 64 rows are observed and 3 `Trainer` steps timed (within the first ~10 steps),
            then every `auto_decision_steps` steps: it takes the f that minimises the predicted time to a given loss,
            cost(f) (1 + F(f) B_noise / B) / (1 + B_noise / B) (`lgp_hf.theory.relative_time`): F is the variance
            factor of the update (estimated from the rows' own gradient norms, `lgp/variance_factor`), cost the
            measured step cost (`lgp/step_cost`, from medians of recent step times), B_noise the gradient noise
            scale (`lgp/noise_scale`; until it is measured, F(f) x cost(f)) and B the optimizer step's batch; when
            that time is below 0.95 of `Trainer`'s (once sampling, below 1: estimates near 0.95 do not switch f back
            and forth); otherwise it trains as `Trainer`. Before it first lowers f it checks unbiasedness on the run
            (`unbiasedness_check`). On the command line: `--control_fraction 0.5`, `--control_fraction auto`.
        sampling_uniform_mix (`float`, defaults to `0.1`):
            a in [0, 1]: inclusion probabilities proportional to (1 - a) s_i / sum s + a / n, s_i the norm of row i's
            gradient at the head's input. 0 is pure importance sampling; 1 is uniform sampling. A mix bounds the
            weight 1 / pi_i <= 1 / (a f) of a row whose score underrates its trunk gradient.
        weight_gradient_keep (`float` or `"auto"`, defaults to `1.0`):
            k in (0, 1]: the expected share of token rows (batch x positions) whose term of the weight gradient
            dW = sum_t dy_t x_t^T is computed, per call of a trunk linear layer (`nn.Linear`, LoRA's adapters included,
            and transformers' `Conv1D`, in the trunk's blocks; frozen weights and the head stay exact). Token rows are
            drawn with probabilities p_t proportional to ||dy_t|| ||x_t|| mixed with uniform (`sampling_uniform_mix`),
            among the token rows with a nonzero term (sum p_t = k times their count; those without one are skipped
            exactly), and dW_hat = sum_t 1{drawn} dy_t x_t^T / p_t: unbiased, adding sum_t (1 - p_t) / p_t
            ||dy_t||^2 ||x_t||^2 to the update's variance, which F (`lgp/variance_factor`) includes. The reason: dW
            is about half a linear layer's backward and, unlike dX = dY W (kept exact, it carries the gradient on
            down), ends at the layer, so sampling it leaves every other gradient exact. 1 (the default) computes dW
            exactly; below 1 every step samples its tokens, at f = 1 too, after the unbiasedness check (under "auto",
            which chooses f with k fixed: checked at f = 1 first, and again at the f it first lowers to; a failed or
            skipped check there keeps every gradient exact). `"auto"`: k is chosen with f (or, at an explicit f, alone)
            at each decision of "auto", among 1, 0.5 and 0.25, by the same predicted time to a given loss, with F
            measured at each k and the time each k saves measured on the run: on an observed step, each layer shape's
            exact weight gradient is timed once against the sampled one at each k (`costs.WeightGradientCalibration`),
            and a layer is sampled at k only where that saves time (its passes over the token rows grow with
            d_in + d_out, the saved products with d_in x d_out: wide layers pay, narrow ones do not). It starts at 1,
            and checks unbiasedness before it first samples tokens. On the command line:
            `--weight_gradient_keep 0.5`, `--weight_gradient_keep auto`.
        auto_min_control_fraction (`float`, defaults to `0.1`):
            The smallest f that `control_fraction="auto"` may choose.
        auto_decision_steps (`int`, defaults to `25`):
            Optimizer steps between the decisions of `control_fraction="auto"` after its first (each needs the
            gradient norms of at least 64 observed rows since the last).
        auto_observation_period (`int`, defaults to `10`):
            After the first decision of "auto", at most one optimizer step in every this many is observed (the
            per-row gradient norms of the trunk's linear layers are read in its backward, for F); before it, every
            step until 64 rows are observed. At f = 1 under "auto" the other steps are `Trainer`'s own.
        auto_observation_budget (`float`, defaults to `0.03`):
            The fraction of training compute that observing may take: observed steps are spaced further than
            `auto_observation_period` when the measured overhead of one needs it.
        unbiasedness_check (`bool`, defaults to `True`):
            Run `lgp_hf.verify_unbiased` on the run's own batch (its first 32 rows) before sampling: at the first step for an explicit
            f < 1 (a failure raises an error naming the parameter tensors with the largest bias), and before
            "auto" first lowers f (a failure keeps f = 1 for the rest of the run, and says why). Under "auto" the
            check must fit in `unbiasedness_check_budget` of the run's compute, or f stays 1.
        unbiasedness_check_draws (`int`, defaults to `32`):
            Sampled backwards of the check (at least 16). Under "auto" fewer when the budget allows only fewer (at
            least 16).
        unbiasedness_check_budget (`float`, defaults to `0.02`):
            Under "auto", the largest share of the run's compute (its `max_steps`) that the check may take (a
            200-step run fits it at batch 64 or more). A run stopped before `max_steps` by a callback (a time
            budget) is taken at `max_steps`: set `max_steps` near the expected length to bound the check's share.
        gradient_predictor (`str`, defaults to `"none"`):
            `"none"`: the importance-sampled update sum_i w_i g_i, w_i = 1{drawn} / pi_i. `"linear"`: the difference
            estimator sum_i w_i g_i + beta sum_i (1 - w_i) p_i (the control variate of arXiv 2511.05187), unbiased for
            any prediction p_i fixed before the draw; per trunk linear layer p_i = M s_i xbar_i^T, s_i the row's
            boundary gradient and input sketched (`predictor_signal_dims`), xbar_i its summed
            input to the layer, M and beta fitted online on earlier steps' drawn rows (`lgp_hf.predictor`). The paper's
            own configuration: `sampling_uniform_mix=1, gradient_predictor="linear"`. `"auto"`: fitted and measured on
            the observed steps, and applied from a decision of `control_fraction="auto"` on only while the predicted
            time to a given loss with it (its F, and its own measured work added to the step cost) is below that without
            it. Under "linear" it is always applied and "auto" chooses f with its F and cost.
        predictor_signal_dims (`int`, defaults to `4`):
            k: the predictor maps from a k x k sketch of the head's per-row gradient (the boundary gradient and the
            boundary input, each projected to k numbers). It holds d_out k^2 + k^4 numbers per trunk linear layer
            (k^2 / d_in of its weight).
        predictor_ridge (`float`, defaults to `0.1`):
            The ridge penalty of the predictor's fit, relative to the mean diagonal of its normal equations.
        predictor_decay (`float`, defaults to `0.9`):
            Weight of the past in the predictor's moving averages, per optimizer step, in [0, 1).
        head_modules (`list[str]` or `str`, *optional*):
            Names (from `model.named_modules()`) of the modules whose parameters get exact gradients on every row;
            the input of the first of them to run in a forward is where rows are drawn. One name may be given as a
            string. Defaults to the model's final layer (`boundary.find_head_module_names`: the first of
            `classifier`, `score`, `qa_outputs`, `head`, `lm_head`, else `get_output_embeddings()`).
    """

    control_fraction: str = field(
        default="auto",
        metadata={"help": "Expected share of each batch's rows whose trunk gradient is computed, in (0, 1], or 'auto' (the default)."},
    )
    sampling_uniform_mix: float = field(
        default=0.1, metadata={"help": "Share of the uniform distribution in the inclusion probabilities, in [0, 1]."}
    )
    weight_gradient_keep: str = field(
        default=1.0,
        metadata={"help": "Expected share of token rows whose weight gradient term is computed in the trunk's linear layers, in (0, 1] (1: exact), or 'auto'."},
    )
    auto_min_control_fraction: float = field(
        default=0.1, metadata={"help": "Smallest control fraction that control_fraction='auto' may choose."}
    )
    auto_decision_steps: int = field(default=25, metadata={"help": "Optimizer steps between decisions of control_fraction='auto'."})
    auto_observation_period: int = field(default=10, metadata={"help": "At most one optimizer step in this many is observed."})
    auto_observation_budget: float = field(
        default=0.03, metadata={"help": "Fraction of the training compute that observation may take."}
    )
    unbiasedness_check: bool = field(default=True, metadata={"help": "Check unbiasedness on the run's batch before sampling."})
    unbiasedness_check_draws: int = field(default=32, metadata={"help": "Sampled backwards of the unbiasedness check."})
    unbiasedness_check_budget: float = field(
        default=0.02, metadata={"help": "Under 'auto', the largest share of the run's compute the check may take."}
    )
    gradient_predictor: str = field(
        default="none", metadata={"help": "'none' (importance sampling alone), 'linear' (a fitted control variate on top) or 'auto' (applied where it pays)."}
    )
    predictor_signal_dims: int = field(default=4, metadata={"help": "k: the predictor maps from a k x k sketch of the head's per-row gradient."})
    predictor_ridge: float = field(default=0.1, metadata={"help": "Ridge penalty of the predictor's fit, relative to its mean diagonal."})
    predictor_decay: float = field(default=0.9, metadata={"help": "Weight of the past in the predictor's moving averages, in [0, 1)."})
    head_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules whose parameters get exact gradients (default: the final layer)."}
    )

    def __post_init__(self):
        if hasattr(super(), "__post_init__"):
            super().__post_init__()
        self.control_fraction = parse_share_or_auto("control_fraction", self.control_fraction)
        self.weight_gradient_keep = parse_share_or_auto("weight_gradient_keep", self.weight_gradient_keep)
        for name, low, high, low_open in (
            ("sampling_uniform_mix", 0.0, 1.0, False),
            ("auto_min_control_fraction", 0.0, 1.0, True),
            ("unbiasedness_check_budget", 0.0, 1.0, True),
        ):
            value = getattr(self, name)
            inside = isinstance(value, (int, float)) and not isinstance(value, bool) and (low < value if low_open else low <= value) and value <= high
            if not inside:
                raise ValueError(f"{name}: {value!r} is not allowed; use a number in {'(' if low_open else '['}{low:g}, {high:g}].")
        if self.gradient_predictor not in GRADIENT_PREDICTORS:
            raise ValueError(f"gradient_predictor: {self.gradient_predictor!r} is not allowed; use one of {list(GRADIENT_PREDICTORS)}.")
        decay = self.predictor_decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise ValueError(f"predictor_decay: {decay!r} is not allowed; use a number in [0, 1).")
        ridge = self.predictor_ridge
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge > 0:
            raise ValueError(f"predictor_ridge: {ridge!r} is not allowed; use a number > 0.")
        for name, minimum in (("auto_decision_steps", 1), ("auto_observation_period", 1), ("unbiasedness_check_draws", 16),
                              ("predictor_signal_dims", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name}: {value!r} is not allowed; use an integer >= {minimum}.")
        budget = self.auto_observation_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
            raise ValueError(f"auto_observation_budget: {budget!r} is not allowed; use a number > 0.")
        if not isinstance(self.unbiasedness_check, bool):
            raise ValueError(f"unbiasedness_check: {self.unbiasedness_check!r} is not allowed; use True or False.")
        if isinstance(self.head_modules, str):
            self.head_modules = [self.head_modules]
        if self.head_modules is not None and not (
            isinstance(self.head_modules, (list, tuple)) and all(isinstance(name, str) and name for name in self.head_modules)
        ):
            raise ValueError(
                f"head_modules: {self.head_modules!r} is not allowed; use a module name or a list of module names "
                "from model.named_modules()."
            )


@dataclass
class PredictedGradientArguments(PredictedGradientSettings, TrainingArguments):
    r"""
    Arguments of [`PredictedGradientTrainer`]: every [`~transformers.TrainingArguments`] field, plus the sampled
    backward's settings documented in [`PredictedGradientSettings`].
    """


def parse_share_or_auto(name: str, value) -> float | str:
    """`"auto"`, or a float in (0, 1] (given as a number or a string), for the setting `name`."""
    if value == "auto":
        return value
    if isinstance(value, bool):
        raise ValueError(f"{name}: {value!r} is not allowed; use a number in (0, 1] or 'auto' (booleans are refused).")
    try:
        share = float(value)
    except (TypeError, ValueError):
        share = None
    if share is None or not 0 < share <= 1:
        raise ValueError(f"{name}: {value!r} is not allowed; use a number in (0, 1] or 'auto'.")
    return share
