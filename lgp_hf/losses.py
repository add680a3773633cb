"""How the loss of a micro-batch splits over a partition of its examples: loss(B) = w_C loss(C) + w_P loss(P).

The estimator needs these weights: the control backward is scaled by r w_C (r = n / n_c) so that its expectation
over the random split is the trunk gradient of loss(B), and the head gets w_C head(C) + w_P head(P) exactly. Which
rule holds depends on the model, the loss and the Trainer's own step, so it is measured, not assumed:

- `"sum"`: a sum over examples divided by a constant (losses normalised by `num_items_in_batch`, as `Trainer`
  passes it to models that accept loss kwargs, to `compute_loss_func` and to the label smoother): w = (1, 1).
- a mean over items, loss(X) = sum_{i in X} l_i / N(X), with N(X) the number of items of X counted as
  `"examples"` (one per example: classification, regression, QA, multiple choice), `"labels"` (label entries other
  than -100: token classification, seq2seq) or `"shifted_labels"` (the same after dropping each sequence's first
  label: causal language models, which predict token t + 1 from position t): w_X = N(X) / N(B). A part with no
  item has weight 0 (its loss, 0 / 0, is never used).

The candidates that give different weights on a batch are told apart by evaluating the loss of B, C and P once
(no autograd, eval mode); a loss that follows none of them (an in-batch contrastive loss) cannot be split.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100
MEAN_RULES = ("examples", "labels", "shifted_labels")
RULES = ("sum", *MEAN_RULES)


def item_counts(rule: str, labels: torch.Tensor | None, batch_size: int) -> torch.Tensor:
    """Items per example under a mean rule (float64, length n)."""
    if rule == "examples" or labels is None or labels.dim() < 2:
        return torch.ones(batch_size, dtype=torch.float64)
    if rule == "shifted_labels":
        labels = labels[:, 1:]
    return labels.ne(IGNORE_INDEX).reshape(batch_size, -1).sum(1).double().cpu()


def split_weights(rule: str, labels: torch.Tensor | None, control_index: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(w_C, w_P) of a rule for the control examples `control_index` of a batch of `batch_size`."""
    if rule == "sum":
        return 1.0, 1.0
    counts = item_counts(rule, labels, batch_size)
    total = float(counts.sum())
    if total == 0:
        return 0.0, 0.0
    control = float(counts[control_index.cpu()].sum())
    return control / total, (total - control) / total


def follows_rule(loss_batch: float, loss_control: float, loss_prediction: float, weights: tuple[float, float], rtol: float = 1e-3) -> bool:
    """Whether loss(B) = w_C loss(C) + w_P loss(P) within float32 rounding (a weight-0 part, whose loss may be
    0 / 0, is left out)."""
    parts = [w * loss for w, loss in zip(weights, (loss_control, loss_prediction)) if w != 0]
    if not all(map(math.isfinite, [loss_batch, *parts])):
        return False
    combined = sum(parts)
    return abs(loss_batch - combined) <= rtol * max(abs(loss_batch), sum(abs(p) for p in parts), 1e-12)


class LossDecomposition:
    """The rules still consistent with every batch probed so far, and the weights they give.

    `rules` starts with every candidate (`"sum"` only when `num_items_in_batch` is passed); `weights` answers with
    the common weights when the remaining rules agree on the batch, else None (the caller probes the batch and
    calls `keep_consistent`). `splittable` turns False when no rule is left.
    """

    def __init__(self) -> None:
        self.rules: list[str] = list(RULES)

    @property
    def splittable(self) -> bool:
        return bool(self.rules)

    def candidates(self, has_num_items: bool, labels: torch.Tensor | None) -> list[str]:
        """The rules that can apply to a batch: `"sum"` only with `num_items_in_batch`; the label-counting rules only
        with per-token labels (with one label per example they are `"examples"`)."""
        per_token = labels is not None and labels.dim() >= 2
        return [rule for rule in self.rules if (has_num_items or rule != "sum") and (per_token or rule in ("sum", "examples"))]

    def weights(self, has_num_items: bool, labels, control_index, batch_size) -> tuple[float, float] | None:
        options = {split_weights(rule, labels, control_index, batch_size) for rule in self.candidates(has_num_items, labels)}
        if len(options) == 1:
            return options.pop()
        return None

    def first_weights(self, has_num_items: bool, labels, control_index, batch_size) -> tuple[float, float]:
        """The weights of the first rule left (for a batch on which several rules fit exactly)."""
        return split_weights(self.candidates(has_num_items, labels)[0], labels, control_index, batch_size)

    def consistent_mask(self, has_num_items, labels, control_index, batch_size, losses: tuple[float, float, float]) -> torch.Tensor:
        """1 for each rule (in `RULES` order) that the probed losses (B, C, P) follow, 0 otherwise."""
        return torch.tensor(
            [
                float(rule in self.candidates(has_num_items, labels) and follows_rule(*losses, split_weights(rule, labels, control_index, batch_size)))
                for rule in RULES
            ]
        )

    def keep_consistent(self, mask: torch.Tensor) -> None:
        """Drop the rules that a probe ruled out (`mask` from `consistent_mask`, min-reduced over ranks)."""
        self.rules = [rule for rule, keep in zip(RULES, mask.tolist()) if keep > 0.5 and rule in self.rules]

    def state_dict(self) -> dict:
        return {"rules": list(self.rules)}

    def load_state_dict(self, state: dict) -> None:
        self.rules = list(state["rules"])
