"""Linear predictors A: head-side signal -> trunk gradient.

Every predictor sees only *earlier* control batches (`observe` comes after the step's update is built), so the
control-variate estimator stays unbiased whatever its quality. All state is float32 and flat over the trunk
parameters, in `ModelPartition.trunk_params` order.

- `NTKPredictor` (`predictor="ntk"`): per-example trunk gradient g_i = J_i^T e_i, with J_i the Jacobian of the
  logits w.r.t. the trunk and e_i = dloss/dlogits. When the NTK has low effective rank, J_i stays close to a
  shared mean Jacobian J, so g ~ J^T (sum_i e_i): linear in the summed logit errors. J is measured on a control
  micro-batch with k vector-Jacobian products (k outputs) and refreshed every `predictor_refit_steps`.
  Memory k x P. Works for regression (k = 1, e = prediction error) and softmax cross-entropy
  (e = softmax - onehot).
- `WindowPredictor` (`predictor="window"`): ridge regression from head gradient to trunk gradient over the last
  m (head gradient, trunk gradient) pairs of control batches, in dual form: A s = G^T (H H^T + lambda I)^-1 H s,
  O(m P) per prediction and O(m^2 d) per refit. Memory m x P floats (m = 64 and 2.7 M trunk parameters:
  0.7 GB). lambda is relative to the mean diagonal of H H^T, so it does not depend on the loss scale.
- `ZeroPredictor` (`predictor="zero"`): predicts nothing; the trunk gets only the rescaled control gradient.
  The ablation that shows what a predictor adds.
"""

from __future__ import annotations

import torch

PREDICTOR_NAMES = ("ntk", "window", "zero")


class GradientPredictor:
    """Interface: `signal` names the input ("head_gradient" or "logit_error")."""

    signal: str = "head_gradient"

    def needs_jacobian(self, step: int) -> bool:
        """Whether `observe` at this optimizer step wants the control batch's mean logit Jacobian."""
        return False

    def observe(self, signal: torch.Tensor, trunk_grad: torch.Tensor, jacobian: torch.Tensor | None = None) -> None:
        """Record one control batch: its signal and its true (flat) trunk gradient."""

    def predict(self, signal: torch.Tensor) -> torch.Tensor | None:
        """The predicted flat trunk gradient for `signal`, or None for no prediction."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ZeroPredictor(GradientPredictor):
    """No prediction: the trunk gradient comes from the control micro-batch alone."""


class NTKPredictor(GradientPredictor):
    """g ~ J^T e with J the mean logit Jacobian of a recent control micro-batch (see the module docstring)."""

    signal = "logit_error"

    def __init__(self, refit_steps: int):
        self.refit_steps = refit_steps
        self.jacobian: torch.Tensor | None = None  # (k, P)

    def needs_jacobian(self, step: int) -> bool:
        return self.jacobian is None or step % self.refit_steps == 0

    def observe(self, signal, trunk_grad, jacobian=None):
        if jacobian is not None:
            if not torch.isfinite(jacobian).all():
                raise FloatingPointError("the measured logit Jacobian is not finite")
            self.jacobian = jacobian.float()

    def predict(self, signal):
        if self.jacobian is None:
            return None
        return signal.to(self.jacobian) @ self.jacobian

    def state_dict(self):
        return {"jacobian": self.jacobian}

    def load_state_dict(self, state):
        self.jacobian = state["jacobian"]


class WindowPredictor(GradientPredictor):
    """Ridge regression from head gradient to trunk gradient over the last m control batches (dual form)."""

    signal = "head_gradient"

    def __init__(self, window_size: int, ridge: float):
        self.window_size = window_size
        self.ridge = ridge
        self.signals: torch.Tensor | None = None  # (m, d), contiguous ring buffer
        self.gradients: torch.Tensor | None = None  # (m, P), contiguous ring buffer
        self.count = 0
        self._dual_map: torch.Tensor | None = None  # (n, d): (H H^T + lambda I)^-1 H, refitted lazily

    def observe(self, signal, trunk_grad, jacobian=None):
        if not (torch.isfinite(signal).all() and torch.isfinite(trunk_grad).all()):
            raise FloatingPointError("a control batch's signal or trunk gradient is not finite; the pair is not kept")
        if self.signals is None:
            self.signals = signal.new_zeros(self.window_size, signal.numel(), dtype=torch.float32)
            self.gradients = trunk_grad.new_zeros(self.window_size, trunk_grad.numel(), dtype=torch.float32)
        slot = self.count % self.window_size
        self.signals[slot].copy_(signal.reshape(-1))
        self.gradients[slot].copy_(trunk_grad.reshape(-1))
        self.count += 1
        self._dual_map = None

    def _fit(self) -> torch.Tensor:
        filled = min(self.count, self.window_size)
        signals = self.signals[:filled].double()
        gram = signals @ signals.T
        penalty = self.ridge * gram.diagonal().mean().clamp_min(1e-30)
        system = gram + penalty * torch.eye(filled, dtype=gram.dtype, device=gram.device)
        dual_map = torch.linalg.solve(system, signals)
        if not torch.isfinite(dual_map).all():
            raise FloatingPointError("the window predictor's ridge system has no finite solution")
        return dual_map.float()

    def predict(self, signal):
        if self.count == 0:
            return None
        if self._dual_map is None:
            self._dual_map = self._fit()
        filled = self._dual_map.shape[0]
        weights = self._dual_map @ signal.to(self._dual_map).reshape(-1)
        return weights @ self.gradients[:filled]

    def state_dict(self):
        return {"signals": self.signals, "gradients": self.gradients, "count": self.count}

    def load_state_dict(self, state):
        self.signals, self.gradients, self.count = state["signals"], state["gradients"], state["count"]
        self._dual_map = None


def mean_logit_jacobian(logits: torch.Tensor, params: list[torch.Tensor], num_examples: int, max_outputs: int = 1024) -> torch.Tensor:
    """J = (1/n) sum_i d logits_i / d params, flat (k, P): k vector-Jacobian products through a kept graph."""
    num_outputs = logits.shape[-1]
    if num_outputs > max_outputs:
        raise ValueError(
            f"predictor: 'ntk' keeps a k x P Jacobian and the head has k = {num_outputs} outputs (at most {max_outputs}); "
            "use predictor='window' for heads this wide."
        )
    summed = logits.reshape(-1, num_outputs).sum(0) / num_examples
    rows = []
    for output in range(num_outputs):
        grads = torch.autograd.grad(summed[output], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float() for p, g in zip(params, grads)]))
    return torch.stack(rows)


def make_predictor(name: str, window_size: int = 64, ridge: float = 1.0, refit_steps: int = 25) -> GradientPredictor:
    """The predictor named by `PredictedGradientArguments.predictor`."""
    if name == "ntk":
        return NTKPredictor(refit_steps)
    if name == "window":
        return WindowPredictor(window_size, ridge)
    if name == "zero":
        return ZeroPredictor()
    raise ValueError(f"predictor: unknown value {name!r}; allowed values are {list(PREDICTOR_NAMES)}.")
