"""`PredictedGradientMixin`: an importance-sampled backward in `training_step` of any `transformers.Trainer`.

`PredictedGradientTrainer` is the mixin plus `Trainer`; other trainers of the family get it the same way
(`class Seq2SeqPredictedGradientTrainer(PredictedGradientMixin, Seq2SeqTrainer)`, TRL's `SFTTrainer`).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy
from transformers.utils import logging

from .arguments import PredictedGradientArguments, PredictedGradientSettings
from .boundary import HEAD_ATTRIBUTE_NAMES, BoundarySampler, find_head_module_names, sampled_boundary
from .checkpoints import reload_renamed_weights
from .costs import MIN_REFERENCES, StepClock, StepCostModel, WeightGradientCalibration, affordable_check_draws
from .model_card import write_model_card
from .monitor import CANDIDATE_FRACTIONS, MIN_OBSERVED_ROWS, SamplingMonitor
from .noise_scale import noise_scale
from .predictor import LinearGradientPredictor
from .replay import BlockReplay, find_blocks
from .row_norms import RowGradientNorms, trunk_linear_layers
from .sampling import draw_generator, inclusion_probabilities
from .token_sampling import KEEP_CANDIDATES, WeightGradientSampler, sampled_weight_gradients
from .theory import batch_size_advice, best_setting, decision_margin, relative_time
from .verification import gradient_error_statistics, report_from_statistics

logger = logging.get_logger(__name__)

LGP_STATE_NAME = "lgp_state.pt"
#: "auto" lowers f only where the predicted F x cost is below 1 - AUTO_MARGIN: estimates are noisy, and a step
#: that does not pay must not cost more than a few percent over `Trainer`'s (once sampling, it goes back to 1 only
#: above 1: `theory.decision_margin`).
AUTO_MARGIN = 0.05
#: Observed micro-batches in the noise scale's moving average before the batch-size advice may speak: twice its
#: window (1 / (1 - decay)).
ADVICE_OBSERVATIONS = 20
#: Fewest sampled backwards for a meaningful unbiasedness check.
MIN_CHECK_DRAWS = 16
#: The check in a run takes the first this many rows of its micro-batch: its draws cost a fraction of a step each,
#: and the estimator's machinery (boundary, replay, the model's loss) is the same on them.
CHECK_ROWS = 32
#: At f < 1, every REFERENCE_PERIOD optimizer steps (the first at step REFERENCE_START, after the first steps'
#: one-off work) REFERENCE_STEPS steps are the base class's own, the last one timed, so that the step cost is measured
#: against a current `Trainer` step (the first, after sampled steps, pays the allocator's and caches' warm-up for
#: the full backward's buffers): at most 2 (1 - cost) / 200 of the compute. Every REFERENCE_PERIOD // 8 steps
#: while fewer than `costs.MIN_REFERENCES` were timed (the plain steps timed at f = 1 before "auto" lowered f count).
REFERENCE_PERIOD = 200
REFERENCE_STEPS = 2
REFERENCE_START = 3
#: At f = 1 (every row kept: no variance to reduce) the predictor is fitted for the draw at this fraction until "auto"
#: has found a best one: the middle of the fractions it chooses when fine-tuning.
PREDICTOR_FIT_FRACTION = 0.25


class PredictedGradientMixin:
    """Mixin for a `transformers.Trainer` (sub)class: the trunk's backward on an importance-sampled share of rows.

    A step is the base class's own `training_step` (forward, the model's loss over the whole batch, one
    `accelerator.backward`), run with two things in place (`sampled_backward`):
    - at the input of the head (`boundary`), an identity autograd function that, in the backward, scores each row by
      the norm of its gradient there, draws rows with probabilities pi_i (sum pi = f n) and passes the drawn ones on
      weighted 1 / pi_i, the others as 0: unbiased by the chain rule (`sampling`), the head exact;
    - the trunk's blocks run without autograd and replay their backward on the rows that carry a gradient (`replay`),
      which is where the compute is saved; every block's backward stays exact;
    - with `gradient_predictor="linear"`, the boundary's backward also adds beta sum_i (1 - w_i) p_i to the trunk's
      linear layers, a control variate fitted on earlier steps' drawn rows (`predictor`): still unbiased;
    - with `weight_gradient_keep` < 1, the trunk's linear layers compute their weight gradients from sampled token
      rows (`token_sampling`), at every step (f = 1 too): still unbiased, dX exact; with "auto", at the keep "auto"
      chose, in the layer calls where that saves time (`costs.WeightGradientCalibration`).
    Nothing is written into `.grad` by hand: DDP, the fp16 scaler, clipping and accumulation are the base class's.

    At f = 1 (`control_fraction=1`, and "auto" until it lowers f) every step is the base class's own, except
    observed steps under "auto", which run the same computation with read-only hooks (the rows' scores and
    gradient norms, for F): the weights stay bit-identical to the base class's. "auto" lowers f when the estimated
    F(f) x cost(f) (`theory`) is below 1 - AUTO_MARGIN, after an unbiasedness check on the run (`verification`);
    `weight_gradient_keep="auto"` chooses the keep with it.
    What cannot be sampled trains as the base class (a log line says why): no identifiable head, a compiled model,
    DeepSpeed, FSDP, `torch.nn.DataParallel`, `ddp_static_graph`.

    Distributed (DDP through `accelerate launch`): each rank draws its rows with a generator seeded by (seed, step,
    micro-step, rank); the rank average of unbiased estimates is unbiased. Besides DDP's own all-reduce, ranks
    exchange only a few floats: the F and cost estimates at each decision of "auto", the observation overhead and
    the check's verdict, so that every rank takes the same decisions.

    Overridden hooks: `training_step`, `call_model_init` (a new model gets a new boundary and blocks), `log` (adds
    `lgp/*`), `_save_checkpoint` and `_load_from_checkpoint` (the sampling state travels with checkpoints),
    `create_model_card` and `_save` (lgp_hf's model card).
    """

    _tag_names = ["lgp-hf", "predicted-gradients"]

    def __init__(self, model=None, args=None, *pargs, **kwargs):
        if args is None:
            args = PredictedGradientArguments(output_dir="trainer_output")
        self._default_settings = PredictedGradientSettings()  # for plain TrainingArguments
        self._model_card_kwargs: dict = {}  # arguments of the last create_model_card, reused by later saves
        super().__init__(model, args, *pargs, **kwargs)
        if hasattr(self.model, "add_model_tags"):  # transformers' Trainer does not: push_to_hub's card gets them
            self.model.add_model_tags(self._tag_names)
        self._setup_sampling(self.model)

    @property
    def lgp_settings(self) -> PredictedGradientSettings:
        """The sampling settings: `args` when it carries them, else their defaults."""
        return self.args if isinstance(self.args, PredictedGradientSettings) else self._default_settings

    def call_model_init(self, trial=None):
        """The base class's, plus a new boundary, blocks and statistics for the new model (`model_init`,
        `hyperparameter_search`)."""
        model = super().call_model_init(trial)
        if hasattr(self, "monitor"):  # not during the base class's __init__: ours sets up after it
            self._setup_sampling(model)
        return model

    def _setup_sampling(self, model) -> None:
        settings = self.lgp_settings
        self._auto = settings.control_fraction == "auto"
        self._control_fraction = 1.0 if self._auto else settings.control_fraction
        self._keep_auto = settings.weight_gradient_keep == "auto"
        self._keeps = (1.0, *KEEP_CANDIDATES) if self._keep_auto else (settings.weight_gradient_keep,)  # F is estimated at each
        self._keep = self._keeps[0]
        self._pending: tuple[float, float] | None = None  # (f, keep) chosen by "auto", waiting for the unbiasedness check
        self._first_rows_observed = False  # every rank observed MIN_OBSERVED_ROWS rows for the first decision
        self._last_decision: dict | None = None
        self._batch_advice: str | None = None  # logged once, when the batch is first measured well above the noise scale
        self.sampler = BoundarySampler(uniform_mix=settings.sampling_uniform_mix)
        self.monitor = SamplingMonitor(settings.sampling_uniform_mix, self._keeps)
        self.cost_model = StepCostModel()
        self.unbiasedness: dict = {"status": "not run"}
        self._micro_step = 0
        self._next_observation = 0  # the optimizer step at which the next observed step is due
        self._last_reference: int | None = None  # the last optimizer step timed as the base class's own
        self._step_rows = [0, 0]  # trunk rows backpropagated and present in the replayed blocks, this optimizer step
        self._checked_in_step = False  # the unbiasedness check ran in this step (its time is not a step's)
        self._plan: tuple[float | None, bool] = (None, False)
        self.head_module_names: list[str] = []
        self.head_modules: list[torch.nn.Module] = []
        self.replay = BlockReplay([])
        self.disabled_reason = self._unsupported_reason(model)
        if self.disabled_reason is None:
            unwrapped = self.accelerator.unwrap_model(model)
            names = find_head_module_names(unwrapped, settings.head_modules)
            if names is None:
                self.disabled_reason = (
                    f"{type(unwrapped).__name__} has no head to sample at (looked for the attributes {list(HEAD_ATTRIBUTE_NAMES)} "
                    "and get_output_embeddings()); name it with head_modules=[...]"
                )
            else:
                modules = dict(unwrapped.named_modules())
                self.head_module_names, self.head_modules = names, [modules[name] for name in names]
                self.replay = BlockReplay(find_blocks(unwrapped, self.head_modules))
                if not self.replay.blocks:
                    logger.warning(
                        f"{type(unwrapped).__name__} has no transformers GradientCheckpointingLayer below its head: sampled rows "
                        "stay unbiased, but the trunk's backward is not made cheaper, so control_fraction='auto' stays at 1."
                    )
        self.calibration = WeightGradientCalibration(KEEP_CANDIDATES, settings.sampling_uniform_mix) if self._keep_auto else None
        self.row_norms = RowGradientNorms(self.replay.blocks, self._keeps, settings.sampling_uniform_mix, self.calibration)
        self._set_keep(self._keep)
        self.predictor = None
        if settings.gradient_predictor != "none" and self.disabled_reason is None:
            self.predictor = LinearGradientPredictor(self.replay.blocks, settings.predictor_signal_dims, settings.predictor_ridge, settings.predictor_decay)
        self._set_predicting(settings.gradient_predictor == "linear")
        if self.disabled_reason is not None:
            self._disable(self.disabled_reason)
        elif (self._choosing() or self._samples()) and not hasattr(self, "_step_clock"):
            self._step_clock = StepClock(self.args.device, self._times_step, self._end_optimizer_step)
            self.add_callback(self._step_clock.start)  # last to begin a step, first to end it: others' work is not timed
            self.callback_handler.callbacks.insert(0, self._step_clock.stop)

    def _set_keep(self, keep: float) -> None:
        """The weight gradient keep of the steps from now on (one of `_keeps`): below 1, a token sampler on the trunk's
        trainable linear weights (under "auto", those whose sampling saves time: `calibration`)."""
        self._keep = keep
        self.monitor.keep_index = self._keeps.index(keep)
        self.token_sampler = None
        if keep < 1 and self.disabled_reason is None:
            weights = [layer.weight for layer in trunk_linear_layers(self.replay.blocks)]
            self.token_sampler = WeightGradientSampler(weights, keep, self.lgp_settings.sampling_uniform_mix, self.calibration)
        self.replay.weight_sampler = self.token_sampler

    def _choosing(self) -> bool:
        """Whether decisions of "auto" choose f or the weight gradient keep."""
        return self._auto or self._keep_auto

    def _set_predicting(self, on: bool) -> None:
        """Whether the predictor's correction is in the update (`gradient_predictor="linear"`, or chosen by "auto")."""
        self._predicting = on and self.predictor is not None
        self.monitor.predicting = self._predicting
        if self.predictor is not None:
            self.predictor.applying = self._predicting

    def _unsupported_reason(self, model) -> str | None:
        if self.args.torch_compile or hasattr(model, "_orig_mod"):  # `_orig_mod`: a module torch.compile returned
            return "a compiled model (torch_compile=True or torch.compile) runs its forward as one graph, where the boundary and the blocks' replay cannot be put"
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return "DeepSpeed and FSDP shard the parameters that the trunk's replay runs with; single-device and DDP training are supported"
        if self.args.n_gpu > 1:
            return "torch.nn.DataParallel (several GPUs in one process) is not supported; launch one process per GPU with `accelerate launch --multi_gpu`"
        if self.args.ddp_static_graph:
            return "ddp_static_graph=True replays the autograd graph of the first step, and sampled steps change it; leave ddp_static_graph unset"
        return None

    def _samples(self) -> bool:
        """Whether steps sample (those that are not `Trainer`'s references): rows (f < 1) or weight gradient tokens."""
        return self._control_fraction < 1 or self.token_sampler is not None

    def _disable(self, reason: str) -> None:
        """Train as the base class from now on, and say so (also when f < 1 was asked for: it trains as `Trainer`
        would, rather than refuse)."""
        asked = "" if self._auto else f" although control_fraction={self._control_fraction} was asked for"
        logger.warning(f"{type(self).__name__} trains as its base class does (control fraction 1){asked}: {reason}.")
        self.disabled_reason = reason
        self._control_fraction = 1.0
        self.token_sampler = self.replay.weight_sampler = None

    # ------------------------------------------------------------------ the step

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One micro-batch: the base class's own step, with the boundary and the trunk's replay in place when this
        optimizer step samples (f < 1) or is observed."""
        if self._micro_step == 0:
            self._step_rows, self._checked_in_step = [0, 0], False
            self._plan = self._plan_step(model, inputs, num_items_in_batch)
        fraction, observe = self._plan
        if fraction is None:
            loss = super().training_step(model, inputs, num_items_in_batch)
        else:
            loss = self._sampled_step(model, inputs, num_items_in_batch, fraction, observe)
        self._micro_step = 0 if self.accelerator.sync_gradients else self._micro_step + 1
        return loss

    def _sampled_step(self, model, inputs, num_items_in_batch, fraction: float, observe: bool):
        """Forward, draw (in the backward, at the boundary), backward (replayed blocks), observe."""
        generator = draw_generator(self.args.seed, self.state.global_step, self._micro_step, self.args.process_index)
        rows = lambda: self.sampler.draws[-1].drawn.numel() if self.sampler.draws else None  # noqa: E731
        recording = self.row_norms.recording(rows, self.replay.row_index) if observe else contextlib.nullcontext()
        if self.predictor is not None:  # its work timed on the steps that are timed
            step_clock = getattr(self, "_step_clock", None)
            self.predictor.clock = step_clock.now if step_clock is not None and step_clock.begun is not None else None
        with self.sampled_backward(fraction, generator, measure_predictor=observe) as placed, recording:
            loss = super().training_step(model, inputs, num_items_in_batch)
        if not placed[0]:
            self._disable(
                f"the head modules {self.head_module_names} did not run as modules on an input that requires a gradient (a fused "
                "head, a loss computed from the weights directly, or a frozen trunk): there is no boundary to sample at "
                "(this step's gradient was exact); name the model's final layers with head_modules=[...]"
            )
        work = self.replay.take_counts() + (self.token_sampler.take_counts() if self.token_sampler is not None else (0, 0))
        self._step_rows = [self._step_rows[0] + work[0], self._step_rows[1] + work[1]]
        norms = (self.row_norms.squared_norms, self.row_norms.take_batch_squared_norm()) if observe else (None, None)
        predictor = self.sampler.predictor  # applied or measured in this step
        predicted = predictor.finish_micro_batch(self._fit_design(fraction)) if predictor is not None else None
        tokens = self.row_norms.token_variances if observe else None
        self.monitor.record(self.sampler.draws, fraction, *norms, work, predicted if observe else None, tokens)
        if predictor is not None and self.accelerator.sync_gradients:  # the step's rows fit the next steps' map
            predictor.end_step(lambda values: self._all_ranks_mean(values.to(self.args.device)).cpu() * self.accelerator.num_processes)
        return loss

    def _fit_design(self, fraction: float) -> torch.Tensor | None:
        """The inclusion probabilities whose variance the predictor's fit reduces: the draw's own at f < 1; at f = 1
        (every row kept, nothing to reduce) those of the fraction "auto" found best, else PREDICTOR_FIT_FRACTION."""
        if fraction < 1 or not self.sampler.draws:
            return None
        best = (self._last_decision or {}).get("best_fraction", 1.0)
        design_fraction = best if best < 1 else PREDICTOR_FIT_FRACTION
        return inclusion_probabilities(self.sampler.draws[-1].scores, design_fraction, self.lgp_settings.sampling_uniform_mix)

    def _times_step(self, step: int) -> bool:
        """Whether optimizer step `step` is timed (synchronising CUDA): after the first steps' one-off work, every
        step whose time is wanted, at most one in each logging or decision period, plus observed and reference
        steps, and every step before the first decision of "auto" (its references). On a CPU every step after the
        first is timed (timing costs nothing there)."""
        if self.disabled_reason is not None or step < REFERENCE_START:
            return False
        if self.args.device.type == "cpu" or self._before_first_decision():
            return True
        period = max(1, min(int(self.args.logging_steps), self.lgp_settings.auto_decision_steps))
        return step % period == 0 or step >= self._next_observation or self._reference_step(step)

    def _end_optimizer_step(self, seconds: float | None) -> None:
        """After the optimizer step (`StepClock`): its time, if timed, then the next observation and, at a decision
        point, the decision of "auto"."""
        if self.disabled_reason is None:
            self._record_step_time(seconds)
            self._schedule(self._plan[1])

    def _record_step_time(self, seconds: float | None) -> None:
        """A timed optimizer step (its training steps, clipping, optimizer step and zero_grad: what a user pays): the
        base class's own steps give the reference, sampled ones the step cost at the share of trunk rows they
        backpropagated, observed steps at f = 1 the overhead of observing; under `weight_gradient_keep="auto"` observed
        steps also give what each keep would save (`costs.WeightGradientCalibration`), and sampled ones are recorded
        with what their keep saved added back (`costs.StepCostModel`)."""
        fraction, observe = self._plan
        predictor_seconds = self.predictor.take_seconds() if self.predictor is not None else 0.0
        if observe and self.calibration is not None:
            self.cost_model.observe_keep_savings(self.row_norms.take_keep_savings())
        if seconds is None or self._checked_in_step:
            return
        if fraction is None:
            step = self.state.global_step - 1  # the step that ended
            if not self._samples() or step - self._last_reference == REFERENCE_STEPS - 1:  # not a warm-up
                self.cost_model.observe_plain(seconds)
        elif observe:
            if fraction == 1 and self.token_sampler is None and self.cost_model.reference_seconds:
                self.cost_model.observe_observed(seconds)
            if predictor_seconds > 0:
                self.cost_model.observe_predictor(predictor_seconds)
        else:
            computed, total = self._step_rows
            share = computed / total if total else 1.0
            saved = share * self.cost_model.keep_saving(self._keeps.index(self._keep)) * self.cost_model.reference_seconds if self.calibration else 0.0
            cost = self.cost_model.observe_sampled(share, seconds, predictor_seconds, saved)
            if cost is not None:
                self.monitor.record_cost(cost)

    def _reference_due(self, step: int) -> bool:
        """Whether optimizer step `step` at f < 1 (or with token sampling) starts the base class's own steps that time a
        `Trainer` step: back to back before the first decision of "auto" (which waits for them), while they are too few."""
        if len(self.cost_model.references) >= MIN_REFERENCES:
            period = REFERENCE_PERIOD
        else:
            period = REFERENCE_STEPS if self._before_first_decision() else REFERENCE_PERIOD // 8
        return step >= REFERENCE_START and (self._last_reference is None or step - self._last_reference >= period)

    def _reference_step(self, step: int) -> bool:
        """Whether optimizer step `step` at f < 1 is one of those REFERENCE_STEPS plain steps."""
        return self._reference_due(step) or (self._last_reference is not None and step - self._last_reference < REFERENCE_STEPS)

    @contextlib.contextmanager
    def sampled_backward(self, fraction: float, generator: torch.Generator, measure_predictor: bool = False):
        """While inside, forwards put the boundary at the head's input, whose backward draws rows at `fraction` with
        `generator`, (f < 1) the trunk's blocks replay their backward on the drawn rows, (`weight_gradient_keep` < 1) the
        trunk's linear layers draw the token rows of their weight gradients, seeded from `generator` first, and the
        predictor runs when it is applied, or (`measure_predictor`) to be fitted and measured. Yields a list holding True
        once a forward has placed the boundary."""
        self.sampler.fraction, self.sampler.generator, self.sampler.draws = fraction, generator, []
        running = self.predictor is not None and (self._predicting or measure_predictor)
        self.sampler.predictor = self.predictor if running else None
        predicting = self.predictor.active(self.replay.row_index) if running else contextlib.nullcontext()
        tokens = contextlib.nullcontext()
        if self.token_sampler is not None:
            self.token_sampler.start(int(torch.randint(2**62, (1,), generator=generator)))
            tokens = sampled_weight_gradients(self.replay.blocks, self.token_sampler)
        with sampled_boundary(self.head_modules, self.sampler) as placed, self.replay.active() if fraction < 1 else contextlib.nullcontext(), predicting, tokens:
            yield placed

    def sampling_fraction(self) -> float:
        """The fraction `verify_unbiased` checks by default: the current one, or 0.5 at f = 1 without token sampling."""
        return self._control_fraction if self._samples() else 0.5

    def _plan_step(self, model, inputs, num_items_in_batch) -> tuple[float | None, bool]:
        """(fraction, observed) of the optimizer step that starts: fraction None is the base class's own step. Runs
        the unbiasedness check when sampling is about to start."""
        if self.disabled_reason is not None:
            return None, False
        settings = self.lgp_settings
        explicit = self._samples() and (not self._auto or self.token_sampler is not None)  # keep < 1 is explicit
        if self._pending is not None or (explicit and self.unbiasedness["status"] == "not run" and settings.unbiasedness_check):
            self._check_unbiasedness(model, inputs, num_items_in_batch)
            self._checked_in_step = True
        step = self.state.global_step
        observe = self._observation_due(step)
        if self._samples():
            if self._last_reference is None and len(self.cost_model.references) >= MIN_REFERENCES:
                self._last_reference = step - REFERENCE_STEPS  # f = 1's plain steps were the references: next in a period
            if self._reference_due(step):
                self._last_reference = step  # the first of REFERENCE_STEPS of the base class's own
            if self._reference_step(step):
                return None, False
            return self._control_fraction, observe
        return (1.0, True) if self._choosing() and observe else (None, False)

    def _before_first_decision(self) -> bool:
        return self._choosing() and self._last_decision is None

    def _observation_due(self, step: int) -> bool:
        """Whether optimizer step `step` is observed: under "auto" before its first decision, every step until
        MIN_OBSERVED_ROWS rows are observed on every rank (the plain steps after them time the reference), so that
        it decides within the first steps; else from `_next_observation` on."""
        if self._before_first_decision():
            return not self._first_rows_observed
        return step >= self._next_observation

    def _schedule(self, observed: bool) -> None:
        """After an optimizer step (`state.global_step` counts it): after an observed one, the next observation, spaced by
        the measured overhead (averaged over ranks, so that every rank observes the same steps), and the batch size
        advice; at a decision point (every `auto_decision_steps` steps, and the first as soon as MIN_OBSERVED_ROWS
        rows and MIN_REFERENCES reference step times are in), the decision of "auto"."""
        settings = self.lgp_settings
        step = self.state.global_step
        if observed:
            spacing = settings.auto_observation_period
            overhead = self.cost_model.observation_overhead()
            if overhead is not None:
                overhead = float(self._all_ranks_mean(torch.tensor([overhead], dtype=torch.float64, device=self.args.device)))
                spacing = max(spacing, math.ceil(overhead / settings.auto_observation_budget))
            self._next_observation = step - 1 + spacing
            self._advise_batch_size()
        first = False
        if self._before_first_decision():
            # the same on every rank (a draw made uniform by an overflow observes no rows on its rank): ranks that
            # decided apart would wait for each other's collectives
            if not self._first_rows_observed:
                enough = float(self.monitor.decision_factors.rows >= MIN_OBSERVED_ROWS)
                self._first_rows_observed = float(self._all_ranks_mean(torch.tensor([enough], device=self.args.device))) == 1.0
            first = self._first_rows_observed and len(self.cost_model.references) >= MIN_REFERENCES
        predictor_choice = settings.gradient_predictor == "auto" and self._control_fraction < 1
        if (self._choosing() or predictor_choice) and (first or step % settings.auto_decision_steps == 0):
            self._decide_control_fraction()

    def _decide_control_fraction(self) -> None:
        """The decision of "auto": the setting (f, weight gradient keep k, predictor applied) with the smallest predicted
        time to a given loss (`theory.relative_time`, F(f, k) cost(f, k) before the noise scale is known), from the rows
        observed since the last decision (`monitor`), the measured step cost and savings (`costs`) and the run's noise
        scale, averaged over ranks. f is chosen under `control_fraction="auto"` (else it stays), k under
        `weight_gradient_keep="auto"`, and with `gradient_predictor="auto"` whether the predictor is applied (its F and its
        measured cost). The baseline is f = 1 (the explicit f), k = 1 (the explicit k), without the predictor (with it
        under "linear"); another setting is taken when its time is below (1 - AUTO_MARGIN) x the baseline's (below the
        baseline's once away from it: `theory.decision_margin`). Changed only between optimizer steps. Drawing rows or
        tokens for the first time waits for the check."""
        settings = self.lgp_settings
        plain, predicted = self.monitor.take_decision_factors()
        if self._auto:  # the monitor's sums: the current fraction, the candidates, then f = 1
            fractions = [f for f in CANDIDATE_FRACTIONS if f >= settings.auto_min_control_fraction] + [1.0]
            rows = [1 + CANDIDATE_FRACTIONS.index(f) for f in fractions[:-1]] + [1 + len(CANDIDATE_FRACTIONS)]
        else:
            fractions, rows = [self._control_fraction], [0]
        keeps = self._keeps if self._keep_auto else (self._keep,)
        columns = [self._keeps.index(keep) for keep in keeps]
        grid = [(fraction, keep) for fraction in fractions for keep in keeps]
        count = len(grid)
        # every rank joins the average, a rank without enough observed rows (or predictions) with NaN: then no rank
        # decides (or none uses the predictor)
        pick = lambda factors: [math.nan] * count if factors is None else [factors[r][c] for r in rows for c in columns]  # noqa: E731
        savings = {keep: self.cost_model.keep_saving(self._keeps.index(keep)) if self.calibration is not None else 0.0 for keep in keeps}
        predictor_cost = self.cost_model.predictor_cost()
        local = pick(plain) + pick(predicted) + [self.cost_model.cost(f, savings[k], tokens=k < 1) for f, k in grid]
        local.append(math.nan if predictor_cost is None else predictor_cost)
        values = self._all_ranks_mean(torch.tensor(local, dtype=torch.float64, device=self.args.device)).tolist()
        plain, predicted, costs, predictor_cost = values[:count], values[count : 2 * count], values[2 * count : 3 * count], values[-1]
        if not all(map(math.isfinite, plain)):
            return
        ratio = self._noise_ratio()
        predictor = settings.gradient_predictor
        # the estimators to choose from: (predictor applied, F per setting); the predictor's cost where rows are drawn
        estimators = [] if predictor == "linear" else [(False, plain)]
        if self.predictor is not None and all(map(math.isfinite, predicted)) and (predictor == "linear" or math.isfinite(predictor_cost)):
            estimators.append((True, predicted))
        if not estimators:  # "linear" before its first observed step: F without it
            estimators = [(True, plain)]
        extra = predictor_cost if math.isfinite(predictor_cost) else 0.0  # "auto" waits for its cost
        options, factors, option_costs = [], [], []
        for predicting, estimates in estimators:
            for (fraction, keep), factor, cost in zip(grid, estimates, costs):
                options.append((fraction, keep, predicting))
                factors.append(factor)
                option_costs.append(cost + (extra if predicting and fraction < 1 else 0.0))
        times = [relative_time(factor, cost, ratio) for factor, cost in zip(factors, option_costs)]
        base = options.index((fractions[-1] if self._auto else self._control_fraction, keeps[0], predictor == "linear"))
        at_base = (self._control_fraction, self._keep, self._predicting) == options[base]
        margin = decision_margin(at_base, AUTO_MARGIN)
        (fraction, keep, predicting), _ = best_setting(options, factors, option_costs, margin, ratio, (options[base], times[base]))
        others = [i for i in range(len(options)) if i != base] or [base]  # the best setting besides the baseline, for the logs
        best = min(others, key=times.__getitem__)
        self._last_decision = {"fraction": fraction, "keep": keep, "best_fraction": options[best][0], "best_keep": options[best][1],
                               "variance_factor": factors[best], "step_cost": option_costs[best], "efficiency": times[best],
                               "predictor": predicting}
        if predictor == "auto":
            self._set_predicting(predicting and fraction < 1)
        # rows or tokens drawn for the first time: a passed check must have drawn them (one at f = 1 drew no rows)
        status = self.unbiasedness["status"]
        rows_checked = status == "passed" and self.unbiasedness["fraction"] < 1
        tokens_checked = status == "passed" and self.unbiasedness.get("keep", 1.0) < 1
        if (fraction < 1 and self._control_fraction == 1 and not rows_checked) or (keep < 1 and self._keep == 1 and not tokens_checked):
            if status in ("not run", "passed") and settings.unbiasedness_check:
                self._pending = (fraction, keep)
                return
            if status in ("failed", "skipped"):
                return
        self._control_fraction = fraction
        if keep != self._keep:
            self._set_keep(keep)

    def _noise_ratio(self) -> float | None:
        """B_noise / B (`theory.relative_time`), B the optimizer step's batch, from the run's averages of tr(Sigma) and
        |G|^2 over ranks; None until every rank has an estimate."""
        noise = self.monitor.noise
        values = torch.tensor([noise.trace, noise.squared_mean, float(noise.value() is not None)], dtype=torch.float64, device=self.args.device)
        trace, squared_mean, known = self._all_ranks_mean(values).tolist()
        return noise_scale(trace, squared_mean) / self._optimizer_batch_size() if known == 1 else None

    def _optimizer_batch_size(self) -> int:
        """B of the noise scale's model: the examples (rows) of an optimizer step, over accumulation and processes."""
        return self.get_total_train_batch_size(self.args)

    def _advise_batch_size(self) -> None:
        """Once per run, on the main process: a warning when the measured noise scale says a smaller batch would reach
        the same loss sooner (`theory.batch_size_advice`), once ADVICE_OBSERVATIONS micro-batches are averaged (the
        first estimates, of a new head's large early gradients, read 5 to 10 times under the run's). Nothing changes
        the batch."""
        if self._batch_advice is None and self.is_world_process_zero() and self.monitor.noise.observations >= ADVICE_OBSERVATIONS:
            self._batch_advice = batch_size_advice(self._optimizer_batch_size(), self.monitor.noise.value())
            if self._batch_advice is not None:
                logger.warning(self._batch_advice)

    def _check_unbiasedness(self, model, inputs, num_items_in_batch) -> None:
        """`verification` on this micro-batch, before sampling starts (under "auto" with `weight_gradient_keep` < 1: at
        f = 1 first, then again at the f it first lowers to), or before "auto" first draws rows or tokens (the setting
        it chose, `_pending`, with its keep in place). An explicit f < 1 or keep < 1 raises on failure; "auto" keeps
        f = 1 and every weight gradient exact for the rest of the run on failure, or when the check does not fit its
        budget: its draws (`costs.affordable_check_draws`) in `unbiasedness_check_budget` of the run's
        `max_steps` micro-batches. The run is taken to be `max_steps` long (Trainer's, from max_steps or num_train_epochs): one stopped earlier by
        a callback (a time budget, with max_steps far out of reach, as in the benchmarks) gets the full check,
        which costs its 32 rows' share of 1 + cost + 32 f micro-batches (about 3.2 steps at batch 128, f = 0.35)."""
        settings = self.lgp_settings
        automatic = self._auto or self._pending is not None
        fraction, keep = self._pending if self._pending is not None else (self._control_fraction, self._keep)
        self._pending = None
        if keep != self._keep:
            self._set_keep(keep)  # the check draws with it, and, once it passes, the steps
        draws = settings.unbiasedness_check_draws
        if automatic:
            budget = settings.unbiasedness_check_budget * max(self.state.max_steps, 1) * self.args.gradient_accumulation_steps
            share = min(1.0, CHECK_ROWS / _batch_size(inputs))  # of a micro-batch's compute, per pass of the check
            affordable = affordable_check_draws(budget, share, fraction, self.cost_model.cost(fraction))
            if affordable < MIN_CHECK_DRAWS:
                self.unbiasedness = {"status": "skipped", "reason": (
                    f"the run ({self.state.max_steps} steps) is too short for the unbiasedness check ({MIN_CHECK_DRAWS} sampled "
                    f"backwards, a full step and a sampled forward) to fit in unbiasedness_check_budget={settings.unbiasedness_check_budget}")}
                logger.warning(f"{self._auto_name()} stays at {self._control_fraction:g}{self._exact_weight_gradients()}: {self.unbiasedness['reason']}.")
                return
            draws = min(draws, affordable)
        module = _without_ddp(model)
        generator_seed = self.args.seed + 1 + self.args.process_index
        directions, sums, squares, names = gradient_error_statistics(
            self, module, _first_rows(self._prepare_inputs(inputs), CHECK_ROWS), num_items_in_batch, fraction, draws, seed=generator_seed
        )
        self.replay.take_counts()  # the check's backwards are not the run's work
        if self.token_sampler is not None:
            self.token_sampler.take_counts()
        report = report_from_statistics(directions, sums, squares, draws, names, fraction, 1e-3, self.args, 0.0)
        passed = float(self._all_ranks_mean(torch.tensor([float(report.passed)], device=self.args.device))) == 1.0
        self.unbiasedness = {"status": "passed" if passed else "failed", "worst_z": report.worst_z, "threshold": report.threshold,
                             "draws": draws, "fraction": fraction, "keep": keep, "worst_tensors": report.worst_tensors()}
        if passed:
            logger.info(str(report))
            if self._auto:
                self._control_fraction = fraction
            return
        if not automatic:
            keep = "" if self.token_sampler is None else f", weight_gradient_keep={self.token_sampler.keep}"
            raise ValueError(
                f"control_fraction={fraction}{keep}: {report}. The sampled update is not an unbiased estimate of this model's "
                f"gradient here; train with control_fraction=1{' and weight_gradient_keep=1' if keep else ''} or 'auto', and "
                "please report this model and loss."
            )
        logger.warning(f"{self._auto_name()} stays at {self._control_fraction:g}{self._exact_weight_gradients()} for this run: {report}.")

    def _auto_name(self) -> str:
        return "control_fraction='auto'" if self._auto else "weight_gradient_keep='auto' at control_fraction"

    def _exact_weight_gradients(self) -> str:
        """Under "auto" once its check failed or was skipped: no token sampling either (the check covered it), and none
        in F; the words that say so in the warning."""
        words = " with exact weight gradients (weight_gradient_keep is not used)" if self.token_sampler is not None else ""
        if self._keep_auto:
            self._set_keep(1.0)
        else:
            self.token_sampler = self.replay.weight_sampler = None
            self.row_norms.token_keeps = (1.0,) * len(self._keeps)
        return words

    def _all_ranks_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.contiguous(), reduction="mean")

    # ------------------------------------------------------------------ reporting

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the `lgp/*` statistics (since the last log) to training logs."""
        if "loss" in logs and self.disabled_reason is None:
            values = self.monitor.take_log_values()
            values["lgp/control_fraction"] = self._control_fraction
            if self._keep_auto or self._keep < 1:
                values["lgp/weight_gradient_keep"] = self._keep if self.token_sampler is not None else 1.0
            if self.predictor is not None:
                values["lgp/predictor_applied"] = float(self._predicting)
                if self.cost_model.predictor_cost() is not None:
                    values["lgp/predictor_cost"] = self.cost_model.predictor_cost()
            if "lgp/variance_factor" in values and "lgp/step_cost" in values:
                values["lgp/efficiency"] = values["lgp/variance_factor"] * values["lgp/step_cost"]
            if self._last_decision is not None:
                values["lgp/predicted_efficiency"] = self._last_decision["efficiency"]
            logs.update(values)
        super().log(logs, start_time)

    def lgp_summary(self) -> dict[str, float | str | None]:
        """Statistics of the run so far: control fraction, rows drawn and computed, the variance factor F, the step
        cost (`costs.StepCostModel.step_cost`: medians of recent timed steps), an observed step's extra time at
        f = 1 (`costs.StepCostModel.observation_overhead`), the gradient noise scale and the optimizer step's batch, the last decision of "auto" and the
        unbiasedness check."""
        decision = self._last_decision or {}
        return {
            "lgp_control_fraction": self._control_fraction,
            "lgp_weight_gradient_keep": self._keep if self.token_sampler is not None else 1.0,
            "lgp_disabled_reason": self.disabled_reason,
            **self.monitor.summary(),
            "lgp_step_cost": self.cost_model.step_cost(),
            "lgp_predictor_applied": None if self.predictor is None else self._predicting,
            "lgp_predictor_cost": self.cost_model.predictor_cost(),
            "lgp_observation_overhead": self.cost_model.observation_overhead(),
            "lgp_batch_size": self._optimizer_batch_size(),
            "lgp_predicted_efficiency": decision.get("efficiency"),
            "lgp_best_fraction": decision.get("best_fraction"),
            "lgp_best_keep": decision.get("best_keep"),
            "lgp_unbiasedness_check": self.unbiasedness["status"],
            "lgp_blocks": len(self.replay.blocks),
            "lgp_dense_blocks": len(self.replay.dense),
        }

    # ------------------------------------------------------------------ model card

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        reproduce_command: str | None = None,
    ) -> None:
        """Writes `args.output_dir`/README.md: the base class's card (same arguments, same defaults) in lgp_hf's
        template (`lgp_hf/templates/model_card.md`), with the sampling settings, the statistics measured so far
        (`lgp_summary()`, the log history), evaluation results and `reproduce_command` (default: the running
        command). Main process only. The arguments given are remembered for the cards that later saves write
        (`save_model`, checkpoints, `push_to_hub`, which calls this method)."""
        if not self.is_world_process_zero():
            return
        given = dict(
            language=language, license=license, tags=tags, model_name=model_name, finetuned_from=finetuned_from,
            tasks=tasks, dataset_tags=dataset_tags, dataset=dataset, dataset_args=dataset_args,
            reproduce_command=reproduce_command,
        )
        self._model_card_kwargs = {**self._model_card_kwargs, **{k: v for k, v in given.items() if v is not None}}
        write_model_card(self, self.args.output_dir, **self._model_card_kwargs)

    def _write_model_card_quietly(self, folder: str) -> None:
        """The card of an automatic save: a failure is logged, never allowed to break the save."""
        try:
            write_model_card(self, folder, **self._model_card_kwargs)
        except Exception as error:  # noqa: BLE001 - a model card is documentation, not part of the checkpoint
            logger.warning(f"Could not write the model card in {folder}: {error!r}")

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The base class's save, plus the model card (README.md) in the same folder: checkpoints and `save_model`."""
        super()._save(output_dir, state_dict)
        if self.args.should_save and self.is_world_process_zero():
            self._write_model_card_quietly(output_dir if output_dir is not None else self.args.output_dir)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Refreshes `output_dir`/README.md before a checkpoint push uploads that folder (when the base class will
        push: not with hub_strategy="end", nor while an earlier push is running unless hub_always_push)."""
        if (
            self.is_world_process_zero()
            and self.args.hub_strategy != HubStrategy.END
            and (self.args.hub_always_push or getattr(self, "push_in_progress", None) is None or self.push_in_progress.is_done())
        ):
            self._write_model_card_quietly(self.args.output_dir)
        super()._push_from_checkpoint(checkpoint_folder)

    # ------------------------------------------------------------------ checkpoints

    def _lgp_state(self) -> dict:
        return {
            "control_fraction": self._control_fraction,
            "pending": self._pending,
            "keep": self._keep,
            "calibration": None if self.calibration is None else self.calibration.state_dict(),
            "first_rows_observed": self._first_rows_observed,
            "next_observation": self._next_observation,
            "last_reference": self._last_reference,
            "last_decision": self._last_decision,
            "batch_advice": self._batch_advice,
            "unbiasedness": dict(self.unbiasedness),
            "costs": self.cost_model.state_dict(),
            "monitor": self.monitor.state_dict(),
            "dense_blocks": dict(self.replay.dense_reasons),
            "predictor": None if self.predictor is None else self.predictor.state_dict(),
            "predicting": self._predicting,
        }

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save and self.disabled_reason is None:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            torch.save(self._lgp_state(), os.path.join(folder, LGP_STATE_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        reload_renamed_weights(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)
        path = os.path.join(resume_from_checkpoint, LGP_STATE_NAME)
        if self.disabled_reason is not None:
            return
        if not os.path.isfile(path):
            logger.warning(f"{resume_from_checkpoint} holds no {LGP_STATE_NAME} (not an lgp_hf checkpoint): the sampling statistics start fresh.")
            return
        state = torch.load(path, map_location="cpu", weights_only=False)
        if "monitor" not in state:
            logger.warning(f"{path} was written by an lgp_hf before the sampled backward (0.1): the sampling statistics start fresh.")
            return
        self._control_fraction = state["control_fraction"]
        pending = state.get("pending_fraction")  # written before keeps were chosen
        self._pending = state.get("pending", None if pending is None else (pending, self._keep))
        if self.calibration is not None and state.get("calibration") is not None:
            self.calibration.load_state_dict(state["calibration"])
        if state.get("keep", self._keep) in self._keeps:
            self._set_keep(state.get("keep", self._keep))
        self._first_rows_observed = state.get("first_rows_observed", state["last_decision"] is not None)
        self._next_observation = state["next_observation"]
        self._last_reference = state["last_reference"]
        self._last_decision = state["last_decision"]
        self._batch_advice = state.get("batch_advice")
        self.unbiasedness = state["unbiasedness"]
        if self._choosing() and self.unbiasedness["status"] in ("failed", "skipped"):
            self._exact_weight_gradients()
        self.cost_model.load_state_dict(state["costs"])
        self.monitor.load_state_dict(state["monitor"])
        for index, reason in state["dense_blocks"].items():
            self.replay.mark_dense(index, reason)
        if self.predictor is not None and state.get("predictor") is not None:
            self.predictor.load_state_dict(state["predictor"])
        self._set_predicting(state.get("predicting", self.lgp_settings.gradient_predictor == "linear"))


def _batch_size(inputs: dict) -> int:
    labels = inputs.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() > 0:
        return labels.shape[0]
    return next((v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0), 1)


def _first_rows(inputs: dict, rows: int) -> dict:
    """The first `rows` examples of every per-example tensor (first dimension = batch size); others as they are."""
    size = _batch_size(inputs)
    return {k: v[:rows] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size else v for k, v in inputs.items()}


def _without_ddp(model):
    """The module inside a DDP wrapper (accelerate's autocast, applied to it before wrapping, stays): the
    unbiasedness check differentiates it with `torch.autograd.grad`, which DDP must not see as a training step."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class PredictedGradientTrainer(PredictedGradientMixin, Trainer):
    """`transformers.Trainer` with the importance-sampled backward (`PredictedGradientMixin`): change the class
    name, keep everything else. Arguments: `PredictedGradientArguments` (or plain `TrainingArguments`, for the
    defaults)."""
