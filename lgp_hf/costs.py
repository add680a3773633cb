"""What a step costs at each control fraction and weight gradient keep, from the step times the run measures, and
what sampling a layer's weight gradient saves, from timing it on the run's own tensors."""

from __future__ import annotations

import math
import statistics
import time

import torch
from transformers import TrainerCallback

from .replay import linear_weight_gradient
from .token_sampling import WeightGradientSampler

#: cost(f) = intercept + f before a sampled step has been timed: a forward without autograd is about a third of a
#: forward and backward, and each drawn row then costs its block's forward and backward again (`replay`).
PRIOR_INTERCEPT = 1 / 3
#: Timed `Trainer` steps whose median is the reference time: several, so that no single slow or fast step sets it.
REFERENCE_WINDOW = 5
#: References timed before the reference is trusted (the first decision of "auto" waits for them).
MIN_REFERENCES = 3
#: Timed sampled steps whose median gives the intercept and the step cost: one slow step in many moves neither.
SAMPLED_WINDOW = 25
#: Timed observed steps at f = 1 whose median gives the observation overhead: one slow step does not space them out.
OBSERVED_WINDOW = 5
#: Timings of each layer shape's weight gradient, exact and sampled at each keep, in its calibration: the median counts.
CALIBRATION_REPEATS = 3


class StepCostModel:
    """cost(f, k) = step time at control fraction f and weight gradient keep k over a `Trainer` step (f = k = 1).

    The reference time is the median of the last REFERENCE_WINDOW timed plain steps. A timed sampled step that
    backpropagated a share q < 1 of its trunk rows (`replay`) in t seconds costs c = t / reference, against the current
    median reference; the intercept is the median of c - q over the last SAMPLED_WINDOW such steps: the work that does
    not shrink with f (the forward, the head, the checks), and cost(f) = intercept + f. The slope 1 is what a drawn row
    costs in replayed blocks (their forward and backward), slightly more than the rest of the step's per-row work, so
    the model errs towards plain backprop for fractions below the ones measured. Medians, not averages: a step slowed
    by something else (an evaluation, a checkpoint, a data-loader stall, another process) is an outlier of a window,
    and must not make sampling look dearer than it is, nor a fast reference make it look cheaper.

    Sampled weight gradients (`token_sampling`): a step at f = 1 that samples them is timed in its own window (its
    median over the reference is cost(1) with them; it would not fit the line of the replayed steps). Under
    `weight_gradient_keep="auto"` what each keep saves per step is measured apart (`observe_keep_savings`, from
    `WeightGradientCalibration`, as a share of the reference: s(k)); the sampled steps are then recorded with what their
    keep saved added back (`saved_seconds`), so that the windows hold the step without token sampling, and
    cost(f, k) = cost(f) - min(f, 1) s(k): the weight gradients of a share f of the rows are computed.

    Observed steps at f = 1 (under "auto": the rows' gradient norms read in the backward) are timed in their own
    window: `observation_overhead` is what observing adds to a `Trainer` step.

    The gradient predictor's own work (`predictor`, timed apart) is left out of the sampled steps' times and kept as
    its own share of a `Trainer` step (`predictor_cost`): cost(f) is the step without it, cost(f) + predictor_cost
    the step with it, whether the predictor is in use or only measured.
    """

    def __init__(self):
        self.references: list[float] = []  # seconds of the last timed plain steps
        self.sampled: list[tuple[float, float]] = []  # (computed share q < 1, seconds without the predictor) of the last timed sampled steps
        self.full: list[float] = []  # seconds (without the predictor) of the last timed steps at f = 1 with token sampling
        self.predictor: list[float] = []  # the predictor's share of the median reference, last timed steps that ran it
        self.keep_savings: list[list[float]] = []  # seconds saved per step at each candidate keep, last observed steps
        self.observed: list[float] = []  # seconds of the last timed observed steps at f = 1

    @property
    def reference_seconds(self) -> float | None:
        """The median of the recent `Trainer` step times; None before any."""
        return statistics.median(self.references) if self.references else None

    def observe_plain(self, seconds: float) -> None:
        self.references = (self.references + [seconds])[-REFERENCE_WINDOW:]

    def observe_sampled(self, computed_share: float, seconds: float, predictor_seconds: float = 0.0, saved_seconds: float = 0.0) -> float | None:
        """Records a sampled step (at f = 1 when `computed_share` is 1: token sampling alone), `predictor_seconds` of its
        `seconds` spent in the predictor, `saved_seconds` saved by its token sampling as calibrated (0 when not known);
        returns its cost against the median reference (None before any reference, and then it is not kept: its cost
        cannot be told)."""
        reference = self.reference_seconds
        if not reference:
            return None
        untokened = seconds - predictor_seconds + saved_seconds
        if computed_share >= 1:
            self.full = (self.full + [untokened])[-SAMPLED_WINDOW:]
        else:
            self.sampled = (self.sampled + [(computed_share, untokened)])[-SAMPLED_WINDOW:]
        if predictor_seconds > 0:
            self.observe_predictor(predictor_seconds)
        return seconds / reference

    def observe_observed(self, seconds: float) -> None:
        """An observed step at f = 1 without token sampling (its predictor's work, if measured, included)."""
        self.observed = (self.observed + [seconds])[-OBSERVED_WINDOW:]

    def observation_overhead(self) -> float | None:
        """max(0, median(observed step) / reference - 1): observing's share of a `Trainer` step; None before either."""
        reference = self.reference_seconds
        if not self.observed or not reference:
            return None
        return max(0.0, statistics.median(self.observed) / reference - 1)

    def observe_predictor(self, seconds: float) -> None:
        """The predictor's seconds in a timed step (sampled, or observed with the predictor measured only)."""
        reference = self.reference_seconds
        if reference:
            self.predictor = (self.predictor + [seconds / reference])[-SAMPLED_WINDOW:]

    def observe_keep_savings(self, seconds: list[float]) -> None:
        """The seconds an observed step would have saved at each candidate keep (`WeightGradientCalibration`)."""
        self.keep_savings = (self.keep_savings + [list(seconds)])[-SAMPLED_WINDOW:]

    def keep_saving(self, index: int) -> float:
        """s(k) of the `index`-th candidate keep: the median of its recent savings over the reference (0 before any)."""
        reference = self.reference_seconds
        if not self.keep_savings or not reference:
            return 0.0
        return statistics.median(saving[index] for saving in self.keep_savings) / reference

    def predictor_cost(self) -> float | None:
        """The predictor's work per step, as a share of a `Trainer` step: the median of recent timed steps; None
        before any."""
        return statistics.median(self.predictor) if self.predictor else None

    @property
    def intercept(self) -> float | None:
        """median(t / reference - q) over the recent sampled steps at f < 1; None before any."""
        reference = self.reference_seconds
        if not self.sampled or not reference:
            return None
        return statistics.median(seconds / reference - share for share, seconds in self.sampled)

    def step_cost(self) -> float | None:
        """What a recent sampled step cost, robustly: median(t) / reference over the recent sampled steps at f < 1, else
        at f = 1 (what `lgp_step_cost` reports; with token sampling under "auto", without what it saved); None before
        any."""
        reference = self.reference_seconds
        if not (self.sampled or self.full) or not reference:
            return None
        return statistics.median([seconds for _, seconds in self.sampled] or self.full) / reference

    def cost(self, fraction: float, saving: float = 0.0, tokens: bool = False) -> float:
        """Relative cost of a step at `fraction`, less min(f, 1) `saving` (s(k)); at f = 1 `Trainer`'s own step (1)
        unless it samples weight gradients (`tokens`): then its measured median, 1 before any."""
        if fraction >= 1:
            base = statistics.median(self.full) / self.reference_seconds if tokens and self.full and self.reference_seconds else 1.0
        else:
            intercept = self.intercept
            base = (PRIOR_INTERCEPT if intercept is None else intercept) + fraction
        return base - min(fraction, 1.0) * saving

    @property
    def measured(self) -> bool:
        return self.intercept is not None

    def state_dict(self) -> dict:
        return {"references": list(self.references), "sampled": [list(entry) for entry in self.sampled], "full": list(self.full),
                "predictor": list(self.predictor), "keep_savings": [list(entry) for entry in self.keep_savings],
                "observed": list(self.observed)}

    def load_state_dict(self, state: dict) -> None:
        """The windows of a checkpoint (one from before the windows, with averages only, leaves them empty: the
        cost is measured again)."""
        self.references = list(state.get("references", []))
        self.sampled = [tuple(entry) for entry in state.get("sampled", [])]
        self.full = list(state.get("full", []))
        self.predictor = list(state.get("predictor", []))
        self.keep_savings = [list(entry) for entry in state.get("keep_savings", [])]
        self.observed = list(state.get("observed", []))


class WeightGradientCalibration:
    """What sampling a layer call's weight gradient saves at each keep of `keeps` (two or more): a model per layer shape
    (d_in, d_out, layout, dtype, device), fitted to timings on the run's own tensors.

    Over a call's T token rows, A of them with a term (dy_t != 0), the exact product dY^T X takes e T seconds, and the
    sampled path (`token_sampling`: both norms, the probabilities and the draw over the T rows, then the gathers and the
    product on about k A drawn rows) p T + s k A: sampling saves (e - p) T - s k A (`savings`). A call whose rows mostly
    have no term (a classifier's top block reads one position) saves nearly its whole product; one where all have a term
    saves only where the products outweigh the passes over the rows (wide layers: the products grow with d_in x d_out,
    the passes with d_in + d_out). e, p and s come from timing, on one call, the exact product and the path at the
    first two keeps (the median of CALIBRATION_REPEATS timings each): on an observed step's first call of a shape, and
    again on a call with over twice the rows with a term (s is then measured on more products). Kept in checkpoints, so
    that a resumed run decides alike.
    """

    def __init__(self, keeps: tuple[float, ...], uniform_mix: float):
        self.keeps, self.uniform_mix = tuple(keeps), uniform_mix
        self.fits: dict[str, list[float]] = {}  # per layer shape: e, p, s (seconds per token row) and the A they were timed at

    def savings(self, errors: torch.Tensor, inputs: torch.Tensor, transposed: bool, active: int, fit: bool = False) -> list[float] | None:
        """Seconds that sampling this call's weight gradient would save at each keep, for its 2-D `errors` and `inputs`
        with `active` token rows with a term; None for a shape not timed yet. With `fit`, the call is timed first where
        its shape is new or it has over twice the rows with a term of the shape's last timing."""
        key = f"{inputs.shape[-1]}x{errors.shape[-1]}{'t' if transposed else ''} {str(errors.dtype).removeprefix('torch.')} {errors.device.type}"
        fitted = self.fits.get(key)
        if fit and active > 0 and (fitted is None or active > 2 * fitted[3]):
            fitted = self.fits[key] = self._fit(errors.detach(), inputs.detach().to(errors.dtype), transposed, active)
        if fitted is None:
            return None
        exact, passes, product, _ = fitted
        return [(exact - passes) * errors.shape[0] - product * keep * active for keep in self.keeps]

    def _fit(self, errors: torch.Tensor, inputs: torch.Tensor, transposed: bool, active: int) -> list[float]:
        """[e, p, s, A] from timing this call (`savings`): t_k = p T + s k A at the first two keeps."""
        rows = max(errors.shape[0], 1)
        exact = self._seconds(lambda: linear_weight_gradient(errors, inputs, transposed), errors.device)

        def sampled(keep):
            sampler = WeightGradientSampler([], keep, self.uniform_mix)
            sampler.start(0)  # each run takes the input's norms, as a layer that shares no input does
            return sampler.weight_gradient(errors, inputs, transposed)

        (first, second), times = self.keeps[:2], [self._seconds(lambda: sampled(keep), errors.device) for keep in self.keeps[:2]]
        product = max(0.0, (times[0] - times[1]) / ((first - second) * active))
        passes = max(0.0, (times[0] - product * first * active) / rows)
        return [exact / rows, passes, product, active]

    @staticmethod
    def _seconds(work, device: torch.device) -> float:
        """The median time of `work()` over CALIBRATION_REPEATS runs after one to warm up (waiting for CUDA)."""
        times = []
        for repeat in range(CALIBRATION_REPEATS + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            work()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if repeat:
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    def state_dict(self) -> dict:
        return {"fits": {key: list(values) for key, values in self.fits.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.fits = {key: list(values) for key, values in state.get("fits", {}).items()}


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
