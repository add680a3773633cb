"""`PredictedGradientMixin`: the control-variate estimator in `training_step` of any `transformers.Trainer`.

`PredictedGradientTrainer` is the mixin plus `Trainer`; other trainers of the family get it the same way
(`class Seq2SeqPredictedGradientTrainer(PredictedGradientMixin, Seq2SeqTrainer)`, TRL's `SFTTrainer`).
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy
from transformers.utils import logging

from . import theory
from .arguments import PredictedGradientArguments, PredictedGradientSettings
from .checkpoints import reload_renamed_weights
from .chunks import ChunkContrasts, pack_pairs, unpack_pairs
from .costs import CostMeter, Stopwatch
from .estimator import ControlVariateCoefficients, control_size, running_sum, signal_difference, split_batch_indices, split_generator
from .heads import HEAD_ATTRIBUTE_NAMES, ModelPartition, capture_head
from .losses import LossDecomposition
from .model_card import write_model_card
from .monitor import GradientSketch, PredictorMonitor
from .predictors import make_predictor

logger = logging.get_logger(__name__)

LGP_STATE_NAME = "lgp_state.pt"


class HeadNotCaptured(RuntimeError):
    """The head modules did not run as modules under autograd (a fused head, a loss outside the model's forward
    graph): this model's batches cannot be split."""


class PredictedGradientMixin:
    """Mixin for a `transformers.Trainer` (sub)class: a full backward on a random control fraction of each batch only.

    Each per-device micro-batch B is split at random into a control part C (forward and backward) and a prediction
    part P (trunk forward without autograd, head forward and backward with the model's own loss). The head gets its
    exact gradient over B; the trunk gets r w_C g(C) + beta A(S_B - r S_C) (`estimator`), an unbiased estimate of
    the trunk gradient of B because the predictor A and the coefficients beta are fitted from earlier control
    batches only, and w_C (`losses`) is how the loss of B splits over C and P, measured on the model's own loss.
    Everything else (callbacks, logging, evaluation, saving, accumulation, DDP, mixed precision) is the base class's:
    the extra gradient terms are written into `.grad` before the control backward, so DDP's reducer, the fp16 scaler
    (they are pre-multiplied by its scale) and clipping see one ordinary gradient.

    When it trains exactly as the base class. At f = 1 (`control_fraction=1`, and "auto" until it lowers f) every
    step is the base class's own `training_step`, except, under "auto", pairs of consecutive steps that are observed
    (head gradient, predictor fit), paced so that they take at most `auto_observation_budget` of the compute
    (`_schedule_observation`): those run the same forward and the same backward of the same loss, with read-only
    hooks, so the weights stay bit-identical to the base class's.
    A model that cannot be split trains as the base class under "auto" (one log line says why) and is refused at
    f < 1: no identifiable head, a head whose output the model's loss does not go through (a fused LM head), a loss
    that does not split over examples (`losses`), a compiled model (`torch_compile`), DeepSpeed, FSDP,
    `torch.nn.DataParallel`, `ddp_static_graph`.

    Distributed (DDP through `accelerate launch`). Each rank splits its own per-device batch with a generator seeded
    by (seed, optimizer step, micro-step), so all ranks take the same decisions without communicating; the update is
    the rank average of per-rank unbiased estimates, hence unbiased for the global batch. What is sent between ranks,
    per observed optimizer step and only on its last (sync) micro-batch: DDP's own gradient all-reduce, once, as for
    `Trainer` (the head and predicted trunk corrections already in `.grad` travel with it); the summed control
    signal and the summed signal difference S_B - r S_C that the applied corrections came from (signal-sized); for a
    parameter shared by head and trunk, the exact head part of its gradient (its size), so that the trunk part can be
    isolated; with `predictor_fit_chunks` > 1, each rank's compressed chunk pairs (one gather), so that every rank
    learns from all of them. The predictor and beta are fitted from inputs identical on every rank, so their state is identical on
    every rank and equal to one process's on the same global batches (tests/test_distributed.py). The prediction
    forward runs on the module inside the DDP wrapper (it has no backward for DDP to reduce).

    Mixed precision. bf16/fp16 autocast applies to both forwards; head gradients and signals are taken in float32
    and the predictors fit and predict in float32. Under fp16 every term written into `.grad` is in the GradScaler's
    scale, and `_observe` divides it out; an overflow makes the scaler skip the step, as in `Trainer`, and the
    predictor learns nothing from it.

    Overridden hooks: `training_step` (the estimator), `call_model_init` (a new model gets a new partition), `log`
    (adds the `lgp/*` statistics), `_save_checkpoint` and `_load_from_checkpoint` (the estimator's state travels with
    checkpoints), `create_model_card` and `_save` (lgp_hf's model card).
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
        self._setup_estimator(self.model)

    @property
    def lgp_settings(self) -> PredictedGradientSettings:
        """The estimator's settings: `args` when it carries them, else their defaults."""
        return self.args if isinstance(self.args, PredictedGradientSettings) else self._default_settings

    def call_model_init(self, trial=None):
        """The base class's, plus a new partition, predictor and statistics for the new model (`model_init`,
        `hyperparameter_search`)."""
        model = super().call_model_init(trial)
        if hasattr(self, "monitor"):  # not during the base class's __init__: ours sets up after it
            self._setup_estimator(model)
        return model

    def _setup_estimator(self, model) -> None:
        settings = self.lgp_settings
        self._auto = settings.control_fraction == "auto"
        self._control_fraction = settings.auto_initial_control_fraction if self._auto else settings.control_fraction
        self.partition = self.predictor = self.coefficients = None
        self.disabled_reason = self._unsupported_reason(model)
        if self.disabled_reason is None:
            self.partition = ModelPartition.from_model(self.accelerator.unwrap_model(model), settings.head_modules)
            if self.partition is None:
                self.disabled_reason = (
                    f"{type(model).__name__} has no head to split at (looked for the attributes {list(HEAD_ATTRIBUTE_NAMES)} "
                    "and get_output_embeddings(), and for trainable parameters outside it); name it with head_modules=[...]"
                )
            elif settings.predictor == "window" and not self.partition.head_params:
                self.disabled_reason = "predictor='window' maps the head gradient, and the head has no trainable parameter; use predictor='ntk'"
        self.cost_meter = CostMeter()
        self.monitor = PredictorMonitor()
        self.loss_decomposition = LossDecomposition()
        self._micro_step = 0
        self._next_observation = 0  # under "auto" at f = 1: the optimizer step at which the next observed pair starts
        self._step_sums: dict | None = None
        self._step_fell_back = False
        self._warned_single_example = False
        if self.disabled_reason is not None:
            self._disable(self.disabled_reason)
            return
        shapes = [p.shape for p in self.partition.trunk_params]
        self.predictor = make_predictor(
            settings.predictor, shapes, window_size=settings.predictor_window_size, ridge=settings.predictor_ridge,
            memory_fraction=settings.predictor_memory_fraction,
        )
        self.coefficients = ControlVariateCoefficients(len(shapes), mode=settings.control_variate_coefficient)
        self.gradient_sketch = GradientSketch([p.numel() for p in self.partition.trunk_params])
        head_index = {id(p): i for i, p in enumerate(self.partition.head_params)}
        shared = {id(p) for p in self.partition.shared_params}
        # trunk index -> head index of each parameter used by both
        self._shared_heads = {i: head_index[id(p)] for i, p in enumerate(self.partition.trunk_params) if id(p) in shared}
        # head gradients the f = 1 hooks keep: the shared parameters', and all for a head-gradient signal
        self._recorded_heads = None if self.predictor.signal == "head_gradient" else set(self._shared_heads.values())
        self.chunk_contrasts = None
        if settings.predictor_fit_chunks > 1:
            self.chunk_contrasts = ChunkContrasts(
                self.accelerator.unwrap_model(model), self.partition.trunk_params, self.partition.head_params, shared,
                settings.predictor_fit_chunks, self.predictor.signal, self.predictor.encode_stack,
            )
            logger.info(
                f"predictor_fit_chunks={settings.predictor_fit_chunks}: chunk gradients from {len(self.chunk_contrasts.layers)} linear "
                f"layers, {self.chunk_contrasts.trunk_coverage:.0%} of the trunk's parameters (the rest get zero contrasts)."
            )

    def _unsupported_reason(self, model) -> str | None:
        if self.args.torch_compile or hasattr(model, "_orig_mod"):  # `_orig_mod`: a module torch.compile returned
            return (
                "a compiled model (torch_compile=True or torch.compile) runs its head and loss inside one graph, where the "
                "estimator's hooks cannot see the head's output and parameters; train it uncompiled for f < 1"
            )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return "DeepSpeed and FSDP shard or hide `.grad`, which the estimator writes; single-device and DDP training are supported"
        if self.args.n_gpu > 1:
            return "torch.nn.DataParallel (several GPUs in one process) is not supported; launch one process per GPU with `accelerate launch --multi_gpu`"
        if self.args.ddp_static_graph:
            return (
                "ddp_static_graph=True replays the autograd passes of the first step, and the estimator's extra head-gradient "
                "pass breaks it; leave ddp_static_graph unset"
            )
        return None

    def _disable(self, reason: str) -> None:
        """Train as the base class from now on: refused when the user asked for f < 1 explicitly."""
        if not self._auto and self._control_fraction < 1:
            raise ValueError(f"control_fraction={self._control_fraction}: {reason}. Use control_fraction=1 or 'auto' to train as Trainer does.")
        logger.warning(f"{type(self).__name__} trains as its base class does (control fraction 1): {reason}.")
        self.disabled_reason = reason
        self._control_fraction = 1.0
        self._step_sums = None

    # ------------------------------------------------------------------ the estimator

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One micro-batch: the estimator when this optimizer step is observed or split, else the base class's step."""
        if self._micro_step == 0:
            self._step_fell_back = False
            self._step_sums = {"control": None, "applied": None, "shared_head": {}, "fit": None} if self._observes_step() else None
            self._observing = self._step_sums is not None
        batch_size = _batch_size(inputs)
        num_control = control_size(batch_size, self._control_fraction)
        if self._step_sums is not None and self._control_fraction < 1 and num_control >= batch_size:
            if not self._warned_single_example:
                logger.warning("A batch of one example cannot be split into control and prediction parts: full backward.")
                self._warned_single_example = True
            self._step_sums = None  # part of this optimizer step is not an estimator step: observe nothing
        if self._step_sums is None:
            loss = super().training_step(model, inputs, num_items_in_batch)
        else:
            loss = self._estimator_step(model, inputs, num_items_in_batch, batch_size, num_control)
        if self.accelerator.sync_gradients:
            if self._observing and self._auto and self._control_fraction == 1 and self.monitor.pending is None:
                self._schedule_observation()
            if self._auto and self.disabled_reason is None and (self.state.global_step + 1) % self.lgp_settings.predictor_refit_steps == 0:
                self._update_control_fraction()
            self._micro_step = 0
        else:
            self._micro_step += 1
        return loss

    def _observes_step(self) -> bool:
        """Every step at f < 1; under "auto" at f = 1, pairs of consecutive steps paced by `_schedule_observation`."""
        if self.disabled_reason is not None or not self.loss_decomposition.splittable:
            return False
        if self._control_fraction < 1:
            return True
        return self._auto and self.state.global_step >= self._next_observation

    def _schedule_observation(self) -> None:
        """After an observed pair at f = 1 (it began at step s - 1), the next begins at s - 1 + L, with
        L = max(`auto_observation_period`, ceil(2 o / `auto_observation_budget`)) and o the measured overhead of an
        observed step relative to a step's passes: observation then takes at most that budget of the compute spent
        waiting for the predictor to pay. o is averaged over ranks, so that every rank observes the same steps."""
        settings = self.lgp_settings
        spacing = settings.auto_observation_period
        if self.cost_meter.overhead_ratio is not None:
            overhead = float(self._all_ranks_mean(torch.tensor([self.cost_meter.overhead_ratio], dtype=torch.float64, device=self.args.device)))
            spacing = max(spacing, math.ceil(2 * overhead / settings.auto_observation_budget))
        self._next_observation = self.state.global_step - 1 + spacing

    def _estimator_step(self, model, inputs, num_items_in_batch, batch_size: int, num_control: int):
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        num_prediction = batch_size - num_control
        generator = split_generator(self.args.seed, self.state.global_step, self._micro_step)
        control_index, prediction_index = split_batch_indices(batch_size, num_control, generator)
        weights = (1.0, 0.0) if num_prediction == 0 else self._split_weights(model, inputs, num_items_in_batch, control_index, prediction_index)
        if weights is None:
            self._disable("the loss does not split over examples as a sum or a mean (lgp_hf.losses), so a part of the batch cannot stand for it")
            return super().training_step(model, inputs, num_items_in_batch)
        weight_control, weight_prediction = weights
        sums = self._step_sums
        scaled_for_ga = self._loss_is_scaled_for_ga(num_items_in_batch)
        accumulation = 1 if scaled_for_ga else self.current_gradient_accumulation_steps
        control_scale = batch_size / num_control
        # Pass times (which synchronise CUDA) every logging or refit period, whichever is shorter, and on every observed
        # step at f = 1 (rare), so that "auto" has them; never on the first step, whose passes include one-off work.
        period = max(1, min(int(self.args.logging_steps), self.lgp_settings.predictor_refit_steps))
        measure = self.state.global_step > 0 and (num_prediction == 0 or self.state.global_step % period == 0)
        stopwatch = Stopwatch(self.args.device, synchronize=measure)
        loss_scale = self.accelerator.scaler.get_scale() if self.accelerator.scaler is not None else 1.0

        # Prediction micro-batch: no-grad trunk, differentiable head and loss.
        prediction_seconds = 0.0
        if num_prediction:
            prediction_inputs = _select_examples(inputs, prediction_index, batch_size)
            with torch.no_grad(), capture_head(self.partition, head_only_autograd=True) as capture, self.compute_loss_context_manager():
                loss_prediction = self.compute_loss(_without_ddp(model), prediction_inputs, num_items_in_batch=num_items_in_batch)
            if capture.logits is None or not loss_prediction.requires_grad:
                self._disable(self._head_not_captured())
                return super().training_step(model, inputs, num_items_in_batch)
            head_prediction, signal_prediction = self._head_gradients(loss_prediction, capture, weight_prediction, False, loss_scale)
            prediction_seconds = stopwatch.lap()

        # Control micro-batch: forward with autograd; head gradient first (the graph is kept for the backward).
        control_inputs = _select_examples(inputs, control_index, batch_size) if num_prediction else inputs
        chunks = self.chunk_contrasts if self.chunk_contrasts is not None and num_control >= 2 else None
        with capture_head(self.partition) as capture, chunks.recording(num_control, measure) if chunks else nullcontext(), self.compute_loss_context_manager():
            loss_control = self.compute_loss(model, control_inputs, num_items_in_batch=num_items_in_batch)
        forward_seconds = stopwatch.lap()
        if capture.logits is None or not loss_control.requires_grad:  # only at f = 1: the batch is the control part
            self._disable(self._head_not_captured())
            loss = loss_control if scaled_for_ga else loss_control / accumulation
            self.accelerator.backward(loss)
            return loss.detach()
        if chunks:
            chunks.watch_logits(capture.logits)
            self.predictor.plan(self.predictor.sketched_width(chunks.signal_width))  # before the hooks encode
        if weight_control == 0:  # no item in C: its exact contribution is zero (its own loss would be 0 / 0)
            loss_control = capture.logits.float().sum() * 0.0
        coefficient = control_scale * weight_control / accumulation
        if num_prediction:
            head_control, signal_control = self._head_gradients(loss_control, capture, weight_control, True, loss_scale)
            head_batch = [weight_control * hc + weight_prediction * hp for hc, hp in zip(head_control, head_prediction)]
            batch_signal = weight_control * signal_control + weight_prediction * signal_prediction
            difference = signal_difference(batch_signal, weight_control * signal_control, control_scale) / accumulation
            head_correction = [hb / accumulation - coefficient * hc for hb, hc in zip(head_batch, head_control)]
            _add_to_grads(self.partition.head_params, head_correction, loss_scale)
            if self._add_trunk_correction(difference, loss_scale):
                sums["applied"] = running_sum(sums["applied"], difference)
            self._add_control_sums(sums, coefficient * signal_control, head_batch, accumulation)
        else:
            capture.record_gradients(self._recorded_heads)  # f = 1: the head gradients come from the backward itself
            logit_width, capture.logits = capture.logits.shape[-1], None  # not held through the backward
        overhead_seconds = stopwatch.lap()

        # The control backward: loss_control * r w_C (1 at f = 1, where this is the base class's backward).
        backward_loss = loss_control * (control_scale * weight_control)
        if not scaled_for_ga:
            backward_loss = backward_loss / accumulation
        with chunks.active(loss_scale * self.accelerator.num_processes) if chunks else nullcontext():
            self.accelerator.backward(backward_loss)
        backward_seconds = stopwatch.lap()
        if chunks:  # the chunk hooks ran inside the backward: their time is the predictor's, not the pass's
            backward_seconds -= chunks.seconds
            overhead_seconds += chunks.seconds
        if not num_prediction:
            # the hooks saw the gradients of loss_control * loss_scale / accumulation (scaled_for_ga: / 1)
            unscale = loss_scale / accumulation
            head_control = [g if g is None or unscale == 1 else g / unscale for g in capture.alias_gradients]
            logit_error = None if capture.logit_gradient is None else capture.logit_gradient / unscale
            self._add_control_sums(sums, coefficient * self._signal(head_control, logit_error, logit_width), head_control, accumulation)

        if chunks:
            self._keep_chunk_pairs(sums)
        self.monitor.count_examples(num_control, batch_size)
        if self.accelerator.sync_gradients:
            self._observe(loss_scale)
        overhead_seconds += stopwatch.lap()
        if measure:
            self.cost_meter.update(prediction_seconds, num_prediction, forward_seconds, backward_seconds, num_control, overhead_seconds)
        if not num_prediction:
            return backward_loss.detach()
        loss = weight_control * loss_control.detach()
        if weight_prediction:
            loss = loss + weight_prediction * loss_prediction.detach()
        return loss / accumulation

    def _split_weights(self, model, inputs, num_items_in_batch, control_index, prediction_index) -> tuple[float, float] | None:
        """(w_C, w_P) with loss(B) = w_C loss(C) + w_P loss(P) (`losses`); the batch is probed when the rules still
        possible disagree on it. None when no rule is left: this loss cannot be split."""
        batch_size = _batch_size(inputs)
        has_items = num_items_in_batch is not None
        labels = inputs.get(self.label_names[0]) if self.label_names else inputs.get("labels")
        decomposition = self.loss_decomposition
        weights = decomposition.weights(has_items, labels, control_index, batch_size)
        probe = weights is None
        if self.accelerator.num_processes > 1 and len(decomposition.candidates(has_items, labels)) > 1:
            probe = bool(self.accelerator.reduce(torch.tensor([float(probe)], device=self.args.device), reduction="sum") > 0)
        if probe:
            module = _without_ddp(model)
            module.eval()  # no dropout: the three losses are of the same function
            with torch.no_grad(), self.compute_loss_context_manager():
                losses = tuple(
                    float(self.compute_loss(module, part, num_items_in_batch=num_items_in_batch))
                    for part in (dict(inputs), _select_examples(inputs, control_index, batch_size), _select_examples(inputs, prediction_index, batch_size))
                )
            module.train()
            mask = decomposition.consistent_mask(has_items, labels, control_index, batch_size, losses)
            if self.accelerator.num_processes > 1:  # a rule stays only if every rank's batch follows it
                mask = self.accelerator.gather(mask[None].to(self.args.device)).min(0).values.cpu()
            decomposition.keep_consistent(mask)
            logger.info(f"Loss split rule(s) consistent with the probed batch: {decomposition.rules}.")
            if not decomposition.splittable:
                return None
            weights = decomposition.weights(has_items, labels, control_index, batch_size)
            if weights is None:  # several rules fit this batch exactly: any of them is right for it
                weights = decomposition.first_weights(has_items, labels, control_index, batch_size)
        return weights

    def _head_not_captured(self) -> str:
        return (
            f"the head modules {self.partition.head_module_names} did not run as modules under autograd in the model's "
            "forward (a fused head, or a loss computed outside the model's graph), so their gradient cannot be "
            "captured; name the model's final layers with head_modules=[...]"
        )

    def _add_trunk_correction(self, difference: torch.Tensor, loss_scale: float) -> bool:
        """`.grad` += beta A(S_B - r S_C), one trunk tensor at a time (no parameter-sized temporary); False when
        nothing is predicted (see `_predict_tensors`). A tensor whose prediction is not finite gets no correction:
        its control-only estimate is unbiased on its own."""
        parts = self._predict_tensors(difference)
        if parts is None:
            return False
        faulty = False
        for param, coefficient, part in zip(self.partition.trunk_params, self.coefficients.values.tolist(), parts):
            if not torch.isfinite(part.sum()):
                faulty = True
            elif coefficient:
                _add_to_grads([param], [part], coefficient * loss_scale)
        if faulty:
            self._record_fallback("the predicted trunk gradient is not finite in some tensors")
        return True

    def _predict_tensors(self, signal: torch.Tensor):
        """The predictor's output tensor by tensor, or None when it has none or its fit fails: a fault in the
        predictor never reaches the optimizer (the control-only estimate that replaces it is still unbiased)."""
        try:
            return self.predictor.predict_tensors(signal)
        except (FloatingPointError, torch.linalg.LinAlgError) as error:
            self._record_fallback(f"the predictor fit failed ({error})")
            return None

    def _keep_chunk_pairs(self, sums: dict) -> None:
        """This micro-batch's chunk contrasts (`chunks`) as the predictor keeps them: sketched signal rows and encoded
        trunk tensors (zero where a tensor has no chunk gradient), appended to `sums["fit"]` as one list per
        micro-batch, in `.grad`'s units after DDP's mean. When they are not finite or could not be formed, each pair
        is (None, None): every rank still sends as many rows (`_all_ranks_pairs` drops them)."""
        chunks = self.chunk_contrasts
        signals, encoded = chunks.take()
        rows = len(chunks.sizes) - 1
        if signals is None:
            pairs = [(None, None)] * rows
        else:
            signals = self.predictor.sketch(signals)
            for index in range(len(self.partition.trunk_params)):
                if index not in encoded:
                    encoded[index] = [self.predictor.encode(index, None)] * rows
            pairs = [(signals[row], [encoded[index][row] for index in range(len(self.partition.trunk_params))]) for row in range(rows)]
        sums["fit"] = (sums["fit"] or []) + [pairs]

    def _all_ranks_pairs(self, micro_batches: list[list]) -> list:
        """The chunk pairs of every rank, without the missing ones, in the order of one process that runs the
        ranks' micro-batches interleaved (micro-batch by micro-batch, rank by rank): identical on every rank. One
        gather of the encoded pairs: J (w + C(r)) floats per micro-batch and rank (C(r): a compressed gradient)."""
        pairs = [pair for micro_batch in micro_batches for pair in micro_batch]
        if self.accelerator.num_processes == 1:
            return [pair for pair in pairs if pair[0] is not None]
        template = [self.predictor.encode(index, None) for index in range(len(self.partition.trunk_params))]
        rows = pack_pairs(pairs, template, self.predictor.signal_width).to(self.args.device)
        rows = self.accelerator.gather(self.accelerator.pad_across_processes(rows, dim=0, pad_index=float("nan")))
        ranks = self.accelerator.num_processes
        if len(rows) == len(pairs) * ranks and len({len(m) for m in micro_batches}) == 1:  # rank-major: interleave
            rows = rows.reshape(ranks, len(micro_batches), -1, rows.shape[-1]).transpose(0, 1).reshape(-1, rows.shape[-1])
        return unpack_pairs(rows, template, self.predictor.signal_width)

    def _observe(self, loss_scale: float) -> None:
        """Score the predictor on this step's control batches, then (every second step) let it and beta learn.

        Runs after the last backward of an observed optimizer step, one trunk tensor at a time, so that nothing
        parameter-sized is allocated. The control part of a trunk tensor's gradient is what `.grad` holds minus the
        corrections that were added (and, for a parameter shared with the head, minus the exact head part); summed
        over micro-batches (and averaged over ranks, like `.grad`), it pairs with the summed control signal. What is
        kept of it: its compressed form for the predictor (`encode`), its count sketch and that of the prediction
        (`GradientSketch`, for the pair's score), and per tensor <g, A s>, ||A s||^2 (for beta). Consecutive observed
        steps come in pairs (`monitor`): the first is kept aside, the second scores the pair and only then do the
        predictor and beta learn from both, so that both are scored with a predictor fitted before either was
        drawn. Each step's estimator still uses only earlier control batches.
        """
        sums, self._step_sums = self._step_sums, None
        params = self.partition.trunk_params
        if sums is None or sums["control"] is None or any(p.grad is None for p in params):
            return
        control, applied = self._all_ranks_mean(sums["control"]), sums["applied"]
        if applied is None and self.accelerator.num_processes > 1 and self._control_fraction < 1:
            applied = torch.zeros_like(sums["control"])  # no correction here (or a fallback): still join the mean
        shared = {index: self._all_ranks_mean(part) for index, part in sums["shared_head"].items()}
        # one pass over the predictor's state for both rows: this batch's prediction and the applied correction
        parts = self._predict_tensors(control if applied is None else torch.stack([control, self._all_ranks_mean(applied)]))
        beta = self.coefficients.values.tolist()
        self.predictor.plan(control.shape[-1])
        true_sketch = self.gradient_sketch.zeros(control.device)
        predicted_sketch = None if parts is None else self.gradient_sketch.zeros(control.device)
        true_squares, products, squares, encoded = [], [], [], []
        for index, (param, coefficient) in enumerate(zip(params, beta)):
            gradient = param.grad.reshape(-1)
            if index in shared:  # trunk part = .grad - head part, computed in the head part's buffer (ours)
                true = shared.pop(index).reshape(-1).neg_().add_(gradient, alpha=1 / loss_scale)
            elif loss_scale != 1 or applied is not None or gradient.dtype != torch.float32:
                true = gradient.float() / loss_scale  # a new tensor: .grad is left as it is
            else:
                true = gradient  # only read
            if parts is not None:
                part = next(parts)
                if not torch.isfinite(part.sum()):
                    self._record_fallback("the predicted trunk gradient is not finite; nothing is learned from this step")
                    return
                raw = part if applied is None else part[0]
                if applied is not None:
                    true.add_(part[1], alpha=-coefficient)  # the corrections added to .grad: linear in the applied difference
                products.append(true.dot(raw))
                squares.append(raw.dot(raw))
                self.gradient_sketch.add(predicted_sketch, index, raw, scale=coefficient)
            true_squares.append(true.dot(true))
            if not torch.isfinite(true_squares[-1]):
                return  # an fp16 overflow: the scaler skips this step, and the predictor learns nothing from it
            self.gradient_sketch.add(true_sketch, index, true)
            if sums["fit"] is None:
                encoded.append(self.predictor.encode(index, true.view(param.shape)))
        true_squares = torch.stack(true_squares)
        # what the predictor will learn from: this batch's pair, or its chunk contrasts (`chunks`)
        fit = [(control, encoded)] if sums["fit"] is None else self._all_ranks_pairs(sums["fit"])
        observation = {"sketch": true_sketch, "step": self.state.global_step, "fit": fit}
        if parts is None:
            self.monitor.record_alignment(true_squares, None, None)
        else:
            products, squares = torch.stack(products), torch.stack(squares)
            coefficients = torch.tensor(beta, device=products.device)
            self.monitor.record_alignment(true_squares, coefficients.dot(products), coefficients.pow(2).dot(squares))
            observation.update(predicted_sketch=predicted_sketch, products=products, squares=squares)
        pending = self.monitor.take_pending()
        if pending is not None and pending["step"] != self.state.global_step - 1:
            pending = None  # not the step before: the mean gradient may have moved too far for a pair
        if pending is None:
            self.monitor.keep_pending(observation)
            return
        self.monitor.score_pair(pending, observation)
        for kept in (pending, observation):  # beta, then the predictor, learn from both
            if "products" in kept:
                self.coefficients.update(kept["products"], kept["squares"])
            for signal, parts in kept["fit"]:
                self.predictor.record(signal, parts)

    def _update_control_fraction(self) -> None:
        """`control_fraction="auto"`: the f minimising estimator variance per second (theory.optimal_control_fraction)
        for the variance explained measured since the last decision, the measured cost ratio and the predictor's
        overhead; 1 (plain backprop) unless the predictor pays. Changed only here, between optimizer steps, so each
        step's estimator is unbiased."""
        if self.cost_meter.cost_ratio is None:
            return
        explained = self.monitor.take_recent_variance_explained()
        if explained is None:
            return
        # Timings differ between ranks; their mean gives every rank the same f.
        costs = torch.tensor([self.cost_meter.cost_ratio, self.cost_meter.overhead_ratio or 0.0], dtype=torch.float64, device=self.args.device)
        cost_ratio, overhead = self._all_ranks_mean(costs).tolist()
        self._control_fraction = theory.optimal_control_fraction(
            math.sqrt(min(max(explained, 0.0), 1.0)), min(cost_ratio, 1.0), min_fraction=self.lgp_settings.auto_min_control_fraction,
            overhead=overhead,
        )

    def _head_gradients(self, loss: torch.Tensor, capture, weight: float, retain_graph: bool, loss_scale: float = 1.0):
        """Exact head gradients of `loss` (of each parameter's head use, through its aliases) and the predictor's
        signal, by a backward through the head alone (`torch.autograd.grad`), before the control backward.

        Under fp16 the backward runs on the loss times the GradScaler's scale, as the control backward does (an
        unscaled fp16 backward would flush small logit errors to zero), and the result is divided by it in float32;
        an overflow gives non-finite values, which reach `.grad` through the corrections and make the scaler skip.
        A part with weight 0 (no item: its loss is 0 / 0) contributes exact zeros.
        """
        if weight == 0:
            return self._head_and_signal([None] * len(self.partition.head_params), None, capture.logits)
        aliases = [alias for uses in capture.aliases for alias in uses]
        grads = torch.autograd.grad(loss * loss_scale if loss_scale != 1 else loss, [*aliases, capture.logits], retain_graph=retain_graph, allow_unused=True)
        grads = [None if g is None else g.float() / loss_scale for g in grads]
        per_param = []
        for uses in capture.aliases:
            taken = [g for g in grads[: len(uses)] if g is not None]
            del grads[: len(uses)]
            per_param.append(sum(taken[1:], taken[0]) if taken else None)
        return self._head_and_signal(per_param, grads[-1], capture.logits)

    def _head_and_signal(self, head: list, logit_gradient: torch.Tensor | None, logits: torch.Tensor):
        """Head gradients (zeros where a parameter's head use got none) and the predictor's signal (`_signal`)."""
        head = [torch.zeros_like(p, dtype=torch.float32) if g is None else g for p, g in zip(self.partition.head_params, head)]
        return head, self._signal(head, logit_gradient, logits.shape[-1])

    def _signal(self, head: list, logit_gradient: torch.Tensor | None, logit_width: int) -> torch.Tensor:
        """The predictor's signal, in float32 (also under bf16) and count-sketched when wide: the logit errors summed
        over every position (`logit_gradient` of any leading shape; None: no error) or the flat head gradient (a
        None entry: that parameter's head use got no gradient)."""
        if self.predictor.signal == "logit_error":
            signal = (
                torch.zeros(logit_width, device=self.args.device) if logit_gradient is None
                else logit_gradient.float().reshape(-1, logit_width).sum(0)
            )
        else:
            signal = torch.cat([
                torch.zeros(p.numel(), device=p.device) if g is None else g.reshape(-1).float() for p, g in zip(self.partition.head_params, head)
            ])
        return self.predictor.sketch(signal)

    def _add_control_sums(self, sums: dict, control_signal: torch.Tensor, head_batch: list, accumulation: int) -> None:
        """What `_observe` needs of a micro-batch: the scaled control signal and, for parameters shared by head and
        trunk, the exact head part of the batch's gradient."""
        sums["control"] = running_sum(sums["control"], control_signal)
        for trunk_index, head_index in self._shared_heads.items():
            part = head_batch[head_index]
            if part is not None:
                part = part.float() / accumulation if accumulation != 1 else part.float()
                sums["shared_head"][trunk_index] = running_sum(sums["shared_head"].get(trunk_index), part)

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """The base class's rule for whether the loss is already scaled for gradient accumulation (followed as is,
        so that f < 1 estimates the very gradient that f = 1, the base class's step, computes)."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def _all_ranks_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.contiguous(), reduction="mean")

    def _record_fallback(self, reason: str) -> None:
        """Counts the optimizer step (once, however many predictions failed in it) and says why."""
        if not self._step_fell_back:
            self._step_fell_back = True
            self.monitor.count_fallback_step()
        logger.warning(f"{reason}; the control-only trunk gradient is used instead (still unbiased).")

    # ------------------------------------------------------------------ reporting

    def break_even_alignment(self) -> float | None:
        """The per-example correlation above which the current control fraction beats plain backprop (at f = 1:
        above which lowering f pays), the square root of `break_even_variance_explained`. None before costs are
        measured."""
        explained = self.break_even_variance_explained()
        return None if explained is None else math.sqrt(explained)

    def break_even_variance_explained(self) -> float | None:
        """The per-example variance explained (`lgp/variance_explained`) above which the current control fraction
        beats plain backprop at equal compute (`theory.break_even_rho2`, the predictor's overhead included); at f = 1
        the level above which lowering f pays (what `control_fraction="auto"` waits for). None before costs are
        measured."""
        if self.cost_meter.cost_ratio is None:
            return None
        return theory.break_even_rho2(self._control_fraction, min(self.cost_meter.cost_ratio, 1.0), self.cost_meter.overhead_ratio or 0.0)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the `lgp/*` statistics (means since the last log) to training logs."""
        if "loss" in logs and self.disabled_reason is None:
            logs.update(self.monitor.take_log_values())
            logs["lgp/control_fraction"] = self._control_fraction
            for key, value in (
                ("lgp/backward_forward_ratio", self.cost_meter.backward_forward_ratio),
                ("lgp/cost_ratio", self.cost_meter.cost_ratio),
                ("lgp/overhead_ratio", self.cost_meter.overhead_ratio),
                ("lgp/overhead_seconds", self.cost_meter.overhead_seconds),
                ("lgp/break_even_variance_explained", self.break_even_variance_explained()),
                ("lgp/break_even_alignment", self.break_even_alignment()),
            ):
                if value is not None:
                    logs[key] = value
        super().log(logs, start_time)

    def lgp_summary(self) -> dict[str, float | None]:
        """Statistics of the run so far: alignment, per-example variance explained, break-even, measured costs,
        backward work skipped, predictor memory."""
        return {
            "lgp_predictor": self.lgp_settings.predictor,
            "lgp_control_fraction": self._control_fraction,
            "lgp_disabled_reason": self.disabled_reason,
            **self.monitor.summary(),
            "lgp_break_even_alignment": self.break_even_alignment(),
            "lgp_break_even_variance_explained": self.break_even_variance_explained(),
            "lgp_backward_forward_ratio": self.cost_meter.backward_forward_ratio,
            "lgp_cost_ratio": self.cost_meter.cost_ratio,
            "lgp_overhead_ratio": self.cost_meter.overhead_ratio,
            "lgp_predictor_state_numel": self.predictor.state_numel() if self.predictor is not None else 0,
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
        template (`lgp_hf/templates/model_card.md`), with the estimator's settings, the statistics measured so far
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
            "predictor": self.lgp_settings.predictor,
            "predictor_state": self.predictor.state_dict(),
            "coefficients": self.coefficients.state_dict(),
            "costs": self.cost_meter.state_dict(),
            "control_fraction": self._control_fraction,
            "next_observation": self._next_observation,
            "loss_decomposition": self.loss_decomposition.state_dict(),
            **self.monitor.state_dict(),
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
            logger.warning(f"{resume_from_checkpoint} holds no {LGP_STATE_NAME} (not an lgp_hf checkpoint): the predictor starts fresh.")
            return
        state = torch.load(path, map_location=self.args.device, weights_only=False)
        if state["predictor"] != self.lgp_settings.predictor:
            raise ValueError(
                f"predictor: the checkpoint was trained with predictor={state['predictor']!r}, not {self.lgp_settings.predictor!r}; "
                "resume with the same predictor."
            )
        self.predictor.load_state_dict(state["predictor_state"])
        self.coefficients.load_state_dict(state["coefficients"])
        self.cost_meter.load_state_dict(state["costs"])
        self._control_fraction = state["control_fraction"]
        self._next_observation = state.get("next_observation", 0)
        if "loss_decomposition" in state:
            self.loss_decomposition.load_state_dict(state["loss_decomposition"])
        self.monitor.load_state_dict(state)


def _batch_size(inputs: dict) -> int:
    labels = inputs.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() > 0:
        return labels.shape[0]
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("The batch holds no tensor with a batch dimension.")


def _without_ddp(model):
    """The module inside a DDP wrapper (accelerate's autocast, applied to it before wrapping, stays), for the
    prediction forward. Nothing of that forward reaches DDP's backward (its head gradients are taken with
    `torch.autograd.grad`), and through the wrapper it would look like a training forward (the head hooks turn
    autograd on inside it): DDP would wait for a backward that never comes, and fail at the next forward with
    `find_unused_parameters=False` ("initialize_buckets must NOT be called during autograd execution")."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _select_examples(inputs: dict, index: torch.Tensor, batch_size: int) -> dict:
    """The examples at `index` of every per-example tensor (first dimension = batch size); others as they are."""
    return {
        key: value[index.to(value.device)] if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size else value
        for key, value in inputs.items()
    }


def _add_to_grads(params, values, scale: float) -> None:
    """p.grad += scale * value, creating the gradient where there is none yet."""
    for param, value in zip(params, values):
        value = value.reshape(param.shape).to(param.dtype) * scale
        if param.grad is None:
            param.grad = value.contiguous()
        else:
            param.grad.add_(value)


class PredictedGradientTrainer(PredictedGradientMixin, Trainer):
    """`transformers.Trainer` with the control-variate estimator (`PredictedGradientMixin`): change the class name,
    keep everything else. Arguments: `PredictedGradientArguments` (or plain `TrainingArguments`, for the estimator's
    defaults)."""
