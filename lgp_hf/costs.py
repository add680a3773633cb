"""What a step costs at each control fraction, from the step times the run measures."""

from __future__ import annotations

import math
import statistics
import time

import torch
from transformers import TrainerCallback

#: cost(f) = intercept + f before a sampled step has been timed: a forward without autograd is about a third of a
#: forward and backward, and each drawn row then costs its block's forward and backward again (`replay`).
PRIOR_INTERCEPT = 1 / 3
#: Timed `Trainer` steps whose median is the reference time: several, so that no single slow or fast step sets it.
REFERENCE_WINDOW = 5
#: References timed before the reference is trusted (the first decision of "auto" waits for them).
MIN_REFERENCES = 3
#: Timed sampled steps whose median gives the intercept and the step cost: one slow step in many moves neither.
SAMPLED_WINDOW = 25


class StepCostModel:
    """cost(f) = step time at control fraction f over a `Trainer` step (f = 1), as intercept + f, from medians.

    The reference time is the median of the last REFERENCE_WINDOW timed plain steps. A timed sampled step that
    backpropagated a share q of its trunk rows (`replay`) in t seconds costs c = t / reference, against the current
    median reference; the intercept is the median of c - q over the last SAMPLED_WINDOW sampled steps: the work
    that does not shrink with f (the forward, the head, the checks). The slope 1 is what a drawn row costs in
    replayed blocks (their forward and backward), slightly more than the rest of the step's per-row work, so the
    model errs towards plain backprop for fractions below the ones measured. Medians, not averages: a step slowed
    by something else (an evaluation, a checkpoint, a data-loader stall, another process) is an outlier of a
    window, and must not make sampling look dearer than it is, nor a fast reference make it look cheaper.

    The gradient predictor's own work (`predictor`, timed apart) is left out of the sampled steps' times and kept as
    its own share of a `Trainer` step (`predictor_cost`): cost(f) is the step without it, cost(f) + predictor_cost
    the step with it, whether the predictor is in use or only measured.
    """

    def __init__(self):
        self.references: list[float] = []  # seconds of the last timed plain steps
        self.sampled: list[tuple[float, float]] = []  # (computed share q, seconds without the predictor) of the last timed sampled steps
        self.predictor: list[float] = []  # the predictor's share of the median reference, last timed steps that ran it

    @property
    def reference_seconds(self) -> float | None:
        """The median of the recent `Trainer` step times; None before any."""
        return statistics.median(self.references) if self.references else None

    def observe_plain(self, seconds: float) -> None:
        self.references = (self.references + [seconds])[-REFERENCE_WINDOW:]

    def observe_sampled(self, computed_share: float, seconds: float, predictor_seconds: float = 0.0) -> float | None:
        """Records a sampled step, `predictor_seconds` of its `seconds` spent in the predictor; returns its cost against
        the median reference (None before any reference, and then it is not kept: its cost cannot be told)."""
        reference = self.reference_seconds
        if not reference:
            return None
        self.sampled = (self.sampled + [(computed_share, seconds - predictor_seconds)])[-SAMPLED_WINDOW:]
        if predictor_seconds > 0:
            self.observe_predictor(predictor_seconds)
        return seconds / reference

    def observe_predictor(self, seconds: float) -> None:
        """The predictor's seconds in a timed step (sampled, or observed with the predictor measured only)."""
        reference = self.reference_seconds
        if reference:
            self.predictor = (self.predictor + [seconds / reference])[-SAMPLED_WINDOW:]

    def predictor_cost(self) -> float | None:
        """The predictor's work per step, as a share of a `Trainer` step: the median of recent timed steps; None
        before any."""
        return statistics.median(self.predictor) if self.predictor else None

    @property
    def intercept(self) -> float | None:
        """median(t / reference - q) over the recent sampled steps; None before any."""
        reference = self.reference_seconds
        if not self.sampled or not reference:
            return None
        return statistics.median(seconds / reference - share for share, seconds in self.sampled)

    def step_cost(self) -> float | None:
        """What a recent sampled step cost, robustly: median(t) / reference over the recent sampled steps (what
        `lgp_step_cost` reports); None before any."""
        reference = self.reference_seconds
        if not self.sampled or not reference:
            return None
        return statistics.median(seconds for _, seconds in self.sampled) / reference

    def cost(self, fraction: float) -> float:
        """Relative cost of a step at `fraction` (1 at f = 1: `Trainer`'s own step)."""
        if fraction >= 1:
            return 1.0
        intercept = self.intercept
        return (PRIOR_INTERCEPT if intercept is None else intercept) + fraction

    @property
    def measured(self) -> bool:
        return self.intercept is not None

    def state_dict(self) -> dict:
        return {"references": list(self.references), "sampled": [list(entry) for entry in self.sampled], "predictor": list(self.predictor)}

    def load_state_dict(self, state: dict) -> None:
        """The windows of a checkpoint (one from before the windows, with averages only, leaves them empty: the
        cost is measured again)."""
        self.references = list(state.get("references", []))
        self.sampled = [tuple(entry) for entry in state.get("sampled", [])]
        self.predictor = list(state.get("predictor", []))


def affordable_check_draws(budget: float, row_share: float, fraction: float, cost: float) -> int:
    """Sampled backwards of the unbiasedness check that fit in `budget` micro-batches of compute, the check running
    on `row_share` of a micro-batch's rows: it costs row_share x (1 + cost + draws x fraction) micro-batches, the
    exact forward and backward (1), the sampled forward (at most a whole sampled step, `cost`), and per draw a
    backward that replays the drawn rows (`fraction` of a step: the cost model's slope; the draws share the forward)."""
    return math.floor((budget / row_share - 1 - cost) / fraction)


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
