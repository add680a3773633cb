"""lgp_hf: Linear Gradient Prediction with Control Variates (arXiv 2511.05187) as a drop-in `transformers.Trainer`."""

from .arguments import PredictedGradientArguments, PredictedGradientSettings
from .trainer import PredictedGradientMixin, PredictedGradientTrainer

__all__ = ["PredictedGradientArguments", "PredictedGradientMixin", "PredictedGradientSettings", "PredictedGradientTrainer"]
__version__ = "0.1.0"
