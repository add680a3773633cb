"""lgp_hf: a drop-in `transformers.Trainer` whose trunk backward runs on an importance-sampled share of each batch,
unbiased by construction (arXiv 2511.05187's control-set estimator, drawn inside the backward)."""

from .arguments import PredictedGradientArguments, PredictedGradientSettings
from .trainer import PredictedGradientMixin, PredictedGradientTrainer
from .verification import UnbiasednessReport, verify_unbiased

__all__ = [
    "PredictedGradientArguments", "PredictedGradientMixin", "PredictedGradientSettings", "PredictedGradientTrainer",
    "UnbiasednessReport", "verify_unbiased",
]
__version__ = "0.2.0"
