"""What a step costs at each control fraction, from the step times the run measures."""

from __future__ import annotations

import time

import torch
from transformers import TrainerCallback

#: cost(f) = intercept + f before a sampled step has been timed: a forward without autograd is about a third of a
#: forward and backward, and each drawn row then costs its block's forward and backward again (`replay`).
PRIOR_INTERCEPT = 1 / 3


class StepCostModel:
    """cost(f) = step time at control fraction f over a `Trainer` step (f = 1), as intercept + f.

    Plain steps give the reference time (an exponential moving average per micro-batch). A sampled micro-batch that
    backpropagated a share q of its trunk rows (`replay`) at cost c = time / reference gives intercept = c - q: the
    work that does not shrink with f (the forward, the head, the checks). The slope 1 is what a drawn row costs in
    replayed blocks (their forward and backward), slightly more than the rest of the step's per-row work, so the
    model errs towards plain backprop for fractions below the ones measured.
    """

    def __init__(self, decay: float = 0.8):
        self.decay = decay
        self.reference_seconds: float | None = None
        self.intercept: float | None = None
        self.last_cost: float | None = None

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * new

    def observe_plain(self, seconds: float) -> None:
        self.reference_seconds = self._average(self.reference_seconds, seconds)

    def observe_sampled(self, computed_share: float, seconds: float) -> None:
        if not self.reference_seconds:
            return
        self.last_cost = seconds / self.reference_seconds
        self.intercept = self._average(self.intercept, self.last_cost - computed_share)

    def cost(self, fraction: float) -> float:
        """Relative cost of a step at `fraction` (1 at f = 1: `Trainer`'s own step)."""
        if fraction >= 1:
            return 1.0
        return (PRIOR_INTERCEPT if self.intercept is None else self.intercept) + fraction

    @property
    def measured(self) -> bool:
        return self.intercept is not None

    def state_dict(self) -> dict:
        return {"reference_seconds": self.reference_seconds, "intercept": self.intercept, "last_cost": self.last_cost}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class StepClock:
    """Times whole optimizer steps, `on_step_begin` to `on_step_end` (training steps, clipping, optimizer step,
    zero_grad: what a user pays per step), for the steps `wanted(step)` selects, waiting for CUDA at both ends of
    those; at every step's end calls `record(seconds)`, None for a step not timed. Two callbacks: `start`, to run
    after the other callbacks' `on_step_begin`, and `stop`, to run before the others' `on_step_end`, so that their
    work is not counted."""

    def __init__(self, device: torch.device, wanted, record):
        self.device, self.wanted, self.record = device, wanted, record
        self.begun: float | None = None
        self.start, self.stop = _ClockStart(self), _ClockStop(self)

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


class _ClockStart(TrainerCallback):
    def __init__(self, clock: StepClock):
        self.clock = clock

    def on_step_begin(self, args, state, control, **kwargs):
        self.clock.begun = self.clock.now() if self.clock.wanted(state.global_step) else None


class _ClockStop(TrainerCallback):
    def __init__(self, clock: StepClock):
        self.clock = clock

    def on_step_end(self, args, state, control, **kwargs):
        clock = self.clock
        seconds = None if clock.begun is None else clock.now() - clock.begun
        clock.begun = None
        clock.record(seconds)
