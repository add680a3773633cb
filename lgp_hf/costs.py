"""Run-time measurement of what a backward pass costs, the input of the break-even alignment."""

from __future__ import annotations

import time

import torch

from .theory import cost_ratio_from_backward_forward


class CostMeter:
    """Exponential moving averages of measured pass times, per example.

    - backward/forward ratio: control micro-batch backward time over its forward time;
    - cost ratio c: time per prediction example (no-grad trunk forward, head forward and backward) over time per
      control example (forward and backward). Both passes run at their own batch sizes, so c includes what
      smaller batches cost on this hardware; it is the c of `theory.break_even_rho2`.
      A step without a prediction micro-batch (f = 1 under `control_fraction="auto"`) estimates c as
      t_forward / (t_forward + t_backward) of its control pass (`theory.cost_ratio_from_backward_forward`), so that
      "auto" can tell when lowering f would pay. Its forward runs under autograd, slower than the prediction
      pass's no-grad forward, so this errs high: towards plain backprop.
    - overhead ratio o: the predictor's own work in a step (predicting the correction, the fit and the statistics of
      `_observe`) over a full step's passes (n examples at the control pass's cost per example). Timed apart from
      the passes, so that c stays the passes' cost, and added to the step cost that "auto" compares
      (`theory.relative_efficiency`). Measured on observed steps only: at f = 1 under "auto" most steps are not
      observed and pay none of it, so this errs high too.
    """

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.backward_forward_ratio: float | None = None
        self.cost_ratio: float | None = None
        self.overhead_ratio: float | None = None
        self.overhead_seconds: float | None = None

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * new

    def update(
        self, prediction_seconds: float, num_prediction: int, forward_seconds: float, backward_seconds: float, num_control: int,
        overhead_seconds: float = 0.0,
    ) -> None:
        if forward_seconds <= 0:
            return
        ratio = backward_seconds / forward_seconds
        self.backward_forward_ratio = self._average(self.backward_forward_ratio, ratio)
        per_control = (forward_seconds + backward_seconds) / num_control
        self.overhead_seconds = self._average(self.overhead_seconds, overhead_seconds)
        self.overhead_ratio = self._average(self.overhead_ratio, overhead_seconds / (per_control * (num_control + num_prediction)))
        if num_prediction > 0:
            cost_ratio = min(1.0, (prediction_seconds / num_prediction) / per_control)
        else:
            cost_ratio = cost_ratio_from_backward_forward(ratio)
        self.cost_ratio = self._average(self.cost_ratio, cost_ratio)

    def state_dict(self) -> dict:
        return {
            "backward_forward_ratio": self.backward_forward_ratio, "cost_ratio": self.cost_ratio,
            "overhead_ratio": self.overhead_ratio, "overhead_seconds": self.overhead_seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class Stopwatch:
    """Wall-clock laps that wait for the accelerator first when `synchronize` is set (CUDA runs asynchronously)."""

    def __init__(self, device: torch.device, synchronize: bool):
        self.synchronize = synchronize and device.type == "cuda"
        self.device = device
        self.last = self._now()

    def _now(self) -> float:
        if self.synchronize:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self) -> float:
        now = self._now()
        elapsed, self.last = now - self.last, now
        return elapsed
