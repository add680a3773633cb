"""`PredictedGradientArguments`: `TrainingArguments` plus the settings of the control-variate estimator."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .predictors import PREDICTOR_NAMES

COEFFICIENT_MODES = ("fitted", "fixed")


@dataclass
class PredictedGradientArguments(TrainingArguments):
    r"""
    Arguments of [`PredictedGradientTrainer`]. Every [`~transformers.TrainingArguments`] field works as usual;
    these fields configure the estimator (arXiv 2511.05187). Each per-device batch of n examples is split into a
    control micro-batch (full forward and backward) and a prediction micro-batch (no-grad trunk forward, head
    forward and backward); the trunk gets r g(C) + beta A(S_B - r S_C), the head its exact gradient.

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
            `Trainer`, while "auto" stays at plain backprop until the predictor pays. Given as a string on the command line (`--control_fraction 0.25`,
            `--control_fraction auto`).
        auto_initial_control_fraction (`float`, defaults to `1.0`):
            f used by `control_fraction="auto"` until the first refit point has measured the predictor (1: start
            as plain backprop; the predictor learns from the control batches whatever f is).
        auto_min_control_fraction (`float`, defaults to `0.1`):
            The smallest f that `control_fraction="auto"` may choose.
        predictor (`str`, defaults to `"ntk"`):
            The linear predictor of trunk gradients: `"ntk"` (trunk gradient ~ J^T e, the summed logit errors e
            times one logit Jacobian J, fitted by least squares from earlier control batches, k x P memory),
            `"window"` (ridge regression from head gradient over the last `predictor_window_size` control batches,
            m x P memory) or `"zero"` (no prediction, the ablation). `"ntk"` is the default: where both were
            measured it explained as much variance as `"window"`, with k x P instead of m x P memory.
        predictor_refit_steps (`int`, defaults to `25`):
            Optimizer steps between updates of the automatic control fraction (`control_fraction="auto"`). The
            predictors learn from every control batch and need no refit schedule.
        predictor_window_size (`int`, defaults to `64`):
            m, the number of (head gradient, trunk gradient) pairs the `"window"` predictor keeps (one per
            optimizer step; memory m times the number of trunk parameters, in float32), and the memory of the
            `"ntk"` least-squares fit (control batches are forgotten by a factor 1 - 1/m per step).
        predictor_ridge (`float`, defaults to `1.0`):
            lambda of the `"window"` ridge regression, relative to the mean diagonal of the signals' Gram matrix.
            Too small a value makes predictions noisy enough to raise the variance above the zero predictor's.
        control_variate_coefficient (`str`, defaults to `"fitted"`):
            `"fitted"`: a coefficient beta per trunk parameter tensor, the variance-optimal Cov/Var estimated from
            earlier control batches (beta = 0 until the first one). `"fixed"`: beta = 1, the paper's estimator.
        head_modules (`list[str]`, *optional*):
            Names (from `model.named_modules()`) of the modules whose parameters get exact gradients on every
            example. Defaults to the model's final layer (`classifier`, `score`, `head`, `lm_head` or
            `get_output_embeddings()`). Naming earlier modules too (e.g. the last transformer block, its norm and
            the classifier) moves the split point: exact gradients for more parameters and a richer signal for the
            `"window"` predictor, for the cost of backpropagating through those modules on every example. List
            them all: modules that run between two named ones count as trunk.
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
    predictor: str = field(default="ntk", metadata={"help": "Trunk-gradient predictor.", "choices": list(PREDICTOR_NAMES)})
    predictor_refit_steps: int = field(default=25, metadata={"help": "Optimizer steps between updates of the automatic control fraction."})
    predictor_window_size: int = field(default=64, metadata={"help": "Pairs kept by the 'window' predictor."})
    predictor_ridge: float = field(default=1.0, metadata={"help": "Relative ridge strength of the 'window' predictor."})
    control_variate_coefficient: str = field(
        default="fitted",
        metadata={"help": "'fitted' (beta per tensor) or 'fixed' (beta = 1).", "choices": list(COEFFICIENT_MODES)},
    )
    head_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules whose parameters get exact gradients (default: the final layer)."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.control_fraction = parse_control_fraction(self.control_fraction)
        for name in ("auto_initial_control_fraction", "auto_min_control_fraction"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name}: {value!r} is not allowed; use a number in (0, 1].")
        if self.predictor not in PREDICTOR_NAMES:
            raise ValueError(f"predictor: unknown value {self.predictor!r}; allowed values are {list(PREDICTOR_NAMES)}.")
        if self.predictor_refit_steps < 1:
            raise ValueError(f"predictor_refit_steps: {self.predictor_refit_steps} is not allowed; use an integer >= 1.")
        if self.predictor_window_size < 1:
            raise ValueError(f"predictor_window_size: {self.predictor_window_size} is not allowed; use an integer m >= 1.")
        if not self.predictor_ridge >= 0:
            raise ValueError(f"predictor_ridge: {self.predictor_ridge} is not allowed; use a number lambda >= 0.")
        if self.control_variate_coefficient not in COEFFICIENT_MODES:
            raise ValueError(
                f"control_variate_coefficient: unknown value {self.control_variate_coefficient!r}; "
                f"allowed values are {list(COEFFICIENT_MODES)}."
            )


def parse_control_fraction(value) -> float | str:
    """`"auto"`, or a float in (0, 1] (given as a number or a string)."""
    if value == "auto":
        return value
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = None
    if fraction is None or not 0 < fraction <= 1:
        raise ValueError(f"control_fraction: {value!r} is not allowed; use a number in (0, 1] or 'auto'.")
    return fraction
