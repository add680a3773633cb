"""`PredictedGradientArguments`: `TrainingArguments` plus the settings of the control-variate estimator."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .predictors import PREDICTOR_NAMES

COEFFICIENT_MODES = ("fitted", "fixed")


@dataclass
class PredictedGradientSettings:
    r"""
    The estimator's settings (arXiv 2511.05187), as a dataclass to combine with any `TrainingArguments` subclass:
    [`PredictedGradientArguments`] is `PredictedGradientSettings` + `TrainingArguments`; for another trainer's
    config, list it first so that its own defaults win, e.g.
    `@dataclass class SFTPredictedGradientConfig(SFTConfig, PredictedGradientSettings)`. A trainer given plain
    `TrainingArguments` uses these defaults.

    Each per-device batch of n examples is split into a control micro-batch (full forward and backward) and a
    prediction micro-batch (no-grad trunk forward, head forward and backward); the trunk gets
    r g(C) + beta A(S_B - r S_C), the head its exact gradient.

    Parameters:
        control_fraction (`float` or `"auto"`, defaults to `"auto"`):
            Fraction f of each per-device batch that gets a full backward: the control micro-batch has
            max(1, round(f n)) examples. Must be in (0, 1]; 1 is plain backprop and gives exactly the weights of
            `transformers.Trainer`. `"auto"` (the default) sets f every `predictor_refit_steps` steps to the value
            that minimises gradient variance per unit of compute for the measured per-example variance explained E
            and cost ratio c (`theory.optimal_control_fraction`): below 1 only when E > c, where predicted
            gradients pay. It is the default because the paper's fixed f = 0.25 needs E above about 0.64 (CPU
            costs) while the measured E of the predictors on the example's ViT stays under 0.1 in the first 100
            steps and under 0.3 over 8 epochs (README, Results): a fixed f then trains worse per second than
            `Trainer`, while "auto" stays at plain backprop until the predictor pays. A model with no head, or a
            loss that does not split over examples, trains as `Trainer` under "auto" and is refused at f < 1.
            Given as a string on the command line (`--control_fraction 0.25`, `--control_fraction auto`).
        auto_initial_control_fraction (`float`, defaults to `1.0`):
            f used by `control_fraction="auto"` until the first refit point has measured the predictor (1: start
            as plain backprop; the predictor learns from the control batches whatever f is).
        auto_min_control_fraction (`float`, defaults to `0.1`):
            The smallest f that `control_fraction="auto"` may choose.
        auto_observation_period (`int`, defaults to `10`):
            While `control_fraction="auto"` runs at f = 1, at most one pair of consecutive optimizer steps in every
            `auto_observation_period` is observed (head gradient, predictor fit, variance explained); the other
            steps are `Trainer`'s own `training_step`. At f < 1 every step is observed.
        auto_observation_budget (`float`, defaults to `0.03`):
            While `control_fraction="auto"` runs at f = 1, the fraction of the training compute that observing may
            take: pairs are spaced further than `auto_observation_period` when the measured overhead of an observed
            step o (`lgp/overhead_ratio`) needs it, at L = max(period, ceil(2 o / budget)) steps.
        predictor (`str`, defaults to `"ntk"`):
            The linear predictor of trunk gradients, a ridge regression over the last `predictor_window_size`
            control batches (`predictors` module): `"ntk"` maps the summed logit errors (the NTK picture,
            g ~ J^T e), `"window"` the head gradient, `"zero"` predicts nothing (the ablation). Signals wider than
            4096 (a language model's vocabulary) are count-sketched.
        predictor_fit_chunks (`int`, defaults to `1`):
            K. With K > 1 the predictor learns, from each observed control micro-batch, K - 1 orthonormal contrasts
            of the gradients of K chunks of its examples instead of one (signal, gradient) pair: fit data on the
            within-batch spread of gradients, which is what the control variate removes (`chunks` module). The
            chunk gradients of linear layers (`nn.Linear`, GPT-2's `Conv1D`, LoRA's adapters) come from hooks on
            the same backward, at the cost of one more weight-gradient product per layer and K - 1 compressions per
            control batch; other trunk tensors get zero in the contrasts. Each pair takes a slot of
            `predictor_window_size`, so the window covers fewer control batches: raise it with K. On the example's
            ViT, per-example contrasts (K = the control batch size) explain 4 times more variance than one pair
            per batch (0.14 against 0.03) but cost about half a step on CPU (README, Results).
        predictor_refit_steps (`int`, defaults to `25`):
            Optimizer steps between updates of the automatic control fraction (`control_fraction="auto"`). The
            predictors learn from every observed control batch and need no refit schedule.
        predictor_window_size (`int`, defaults to `16`):
            m, the number of (signal, trunk gradient) pairs the predictor keeps (one per observed optimizer step),
            each compressed to low rank per weight matrix; fewer are kept if m pairs do not fit
            `predictor_memory_fraction`.
        predictor_memory_fraction (`float`, defaults to `0.25`):
            Upper bound on the predictor's state (memory and `lgp_state.pt`), as a fraction of the trainable
            parameters' size: the rank of the stored gradients (and, if needed, the window) is chosen to fit. More
            memory keeps more of each gradient.
        predictor_ridge (`float`, *optional*):
            lambda of the ridge regression, relative to the mean diagonal of the signals' Gram matrix (default: the
            predictor's, 1.0 for both; 0.01 made `"ntk"` predictions add variance on the example's ViT). Too small a value makes predictions noisy enough to raise the variance
            above the zero predictor's.
        control_variate_coefficient (`str`, defaults to `"fitted"`):
            `"fitted"`: a coefficient beta per trunk parameter tensor, the variance-optimal Cov/Var estimated from
            earlier control batches (beta = 0 until the first one). `"fixed"`: beta = 1, the paper's estimator.
        head_modules (`list[str]` or `str`, *optional*):
            Names (from `model.named_modules()`) of the modules whose parameters get exact gradients on every
            example; one name may be given as a string. Defaults to the model's final layer (`heads` module: the
            first of `classifier`, `score`, `qa_outputs`, `head`, `lm_head`, else `get_output_embeddings()`).
            Naming earlier modules too (e.g. the last transformer block, its norm and the classifier) moves the
            split point: exact gradients for more parameters and a richer signal for the `"window"` predictor, for
            the cost of backpropagating through those modules on every example. List them all: modules that run
            between two named ones count as trunk. A parameter also used outside the head (tied input and output
            embeddings) gets the exact gradient of its head use and a predicted gradient of the rest.
    """

    control_fraction: str = field(
        default="auto",
        metadata={"help": "Fraction of each batch with a full backward, in (0, 1], or 'auto' (the default: f < 1 only when the predictor pays)."},
    )
    auto_initial_control_fraction: float = field(
        default=1.0, metadata={"help": "Control fraction used by control_fraction='auto' before its first refit point."}
    )
    auto_min_control_fraction: float = field(
        default=0.1, metadata={"help": "Smallest control fraction that control_fraction='auto' may choose."}
    )
    auto_observation_period: int = field(
        default=10, metadata={"help": "At f = 1 under 'auto', one pair of steps in every this many is observed."}
    )
    auto_observation_budget: float = field(
        default=0.03, metadata={"help": "At f = 1 under 'auto', the fraction of training compute that observation may take."}
    )
    predictor: str = field(default="ntk", metadata={"help": "Trunk-gradient predictor.", "choices": list(PREDICTOR_NAMES)})
    predictor_fit_chunks: int = field(
        default=1, metadata={"help": "Chunks per control batch whose gradient contrasts the predictor learns from (1: the batch's sum)."}
    )
    predictor_refit_steps: int = field(default=25, metadata={"help": "Optimizer steps between updates of the automatic control fraction."})
    predictor_window_size: int = field(default=16, metadata={"help": "Control batches the predictor keeps."})
    predictor_memory_fraction: float = field(
        default=0.25, metadata={"help": "Largest predictor state, as a fraction of the trainable parameters' size."}
    )
    predictor_ridge: float | None = field(default=None, metadata={"help": "Relative ridge strength of the predictor."})
    control_variate_coefficient: str = field(
        default="fitted",
        metadata={"help": "'fitted' (beta per tensor) or 'fixed' (beta = 1).", "choices": list(COEFFICIENT_MODES)},
    )
    head_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules whose parameters get exact gradients (default: the final layer)."}
    )

    def __post_init__(self):
        if hasattr(super(), "__post_init__"):
            super().__post_init__()
        self.control_fraction = parse_control_fraction(self.control_fraction)
        for name in ("auto_initial_control_fraction", "auto_min_control_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"{name}: {value!r} is not allowed; use a number in (0, 1].")
        for name in ("auto_observation_period", "predictor_fit_chunks", "predictor_refit_steps", "predictor_window_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {value!r} is not allowed; use an integer >= 1.")
        budget = self.auto_observation_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
            raise ValueError(f"auto_observation_budget: {budget!r} is not allowed; use a number > 0.")
        if self.predictor not in PREDICTOR_NAMES:
            raise ValueError(f"predictor: unknown value {self.predictor!r}; allowed values are {list(PREDICTOR_NAMES)}.")
        if self.predictor == "zero" and self.predictor_fit_chunks != 1:
            raise ValueError(
                f"predictor_fit_chunks: {self.predictor_fit_chunks} is not allowed with predictor='zero', which learns nothing; "
                "use 1 or another predictor."
            )
        if not (isinstance(self.predictor_memory_fraction, (int, float)) and 0 < self.predictor_memory_fraction):
            raise ValueError(f"predictor_memory_fraction: {self.predictor_memory_fraction!r} is not allowed; use a number > 0.")
        if self.predictor_ridge is not None and not self.predictor_ridge >= 0:
            raise ValueError(f"predictor_ridge: {self.predictor_ridge} is not allowed; use a number lambda >= 0 or leave it unset.")
        if self.control_variate_coefficient not in COEFFICIENT_MODES:
            raise ValueError(
                f"control_variate_coefficient: unknown value {self.control_variate_coefficient!r}; "
                f"allowed values are {list(COEFFICIENT_MODES)}."
            )
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
    Arguments of [`PredictedGradientTrainer`]: every [`~transformers.TrainingArguments`] field, plus the
    estimator's settings documented in [`PredictedGradientSettings`].
    """


def parse_control_fraction(value) -> float | str:
    """`"auto"`, or a float in (0, 1] (given as a number or a string)."""
    if value == "auto":
        return value
    if isinstance(value, bool):
        raise ValueError(f"control_fraction: {value!r} is not allowed; use a number in (0, 1] or 'auto' (booleans are refused).")
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = None
    if fraction is None or not 0 < fraction <= 1:
        raise ValueError(f"control_fraction: {value!r} is not allowed; use a number in (0, 1] or 'auto'.")
    return fraction
