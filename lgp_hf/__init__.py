"""lgp_hf: Linear Gradient Prediction with Control Variates (arXiv 2511.05187) as a drop-in `transformers.Trainer`."""

from .arguments import PredictedGradientArguments
from .trainer import PredictedGradientTrainer

__all__ = ["PredictedGradientArguments", "PredictedGradientTrainer"]
__version__ = "0.1.0"
