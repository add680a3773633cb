"""Accuracy, as an `evaluate` metric module loaded from this directory.

The examples compute accuracy through `evaluate` like the transformers examples do,
but `evaluate.load("accuracy")` fetches its script from the Hugging Face Hub. This
local module is loaded by path instead, so the code path is the real `evaluate` one
and needs no network:

    metric = evaluate.load("examples/metrics/accuracy")
    metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])  # {'accuracy': 0.666...}

It mirrors the Hub's `accuracy` metric (same inputs, same `multilabel` config, same
output) but uses numpy rather than scikit-learn, so it adds no dependency.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among the examples processed:
Accuracy = (TP + TN) / (TP + TN + FP + FN). With the `multilabel` config, an example
counts as correct only if its whole label vector matches (subset accuracy).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted labels (a list of label lists with the `multilabel` config).
    references (`list` of `int`): Ground truth labels, in the same shape as `predictions`.
    normalize (`bool`, defaults to `True`): If `False`, return the number of correctly
        classified examples instead of their (weighted) proportion.
    sample_weight (`list` of `float`, defaults to `None`): Weight of each example.

Returns:
    accuracy (`float`): In [0, 1] when `normalize` is `True`, else the (weighted) count of
        correct examples.

Examples:
    >>> accuracy_metric = evaluate.load("examples/metrics/accuracy")
    >>> accuracy_metric.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0])
    {'accuracy': 0.5}
    >>> accuracy_metric.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0], normalize=False)
    {'accuracy': 3.0}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and Grisel, O. and
          Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V. and Vanderplas, J. and Passos, A. and
          Cournapeau, D. and Brucher, M. and Perrot, M. and Duchesnay, E.},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        label = datasets.Value("int32")
        if self.config_name == "multilabel":
            features = {"predictions": datasets.Sequence(label), "references": datasets.Sequence(label)}
        else:
            features = {"predictions": label, "references": label}
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(features),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(f"predictions {predictions.shape} and references {references.shape} differ in shape")
        correct = predictions == references
        if correct.ndim > 1:
            correct = correct.all(axis=tuple(range(1, correct.ndim)))
        weights = np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        total = float(np.dot(correct, weights))
        return {"accuracy": total / float(weights.sum()) if normalize else total}
