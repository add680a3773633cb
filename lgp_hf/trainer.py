"""`PredictedGradientTrainer`: `transformers.Trainer` with the control-variate estimator in `training_step`."""

from __future__ import annotations

import math
import os
from collections import defaultdict

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy
from transformers.utils import logging

from . import theory
from .arguments import PredictedGradientArguments
from .checkpoints import reload_renamed_weights
from .costs import CostMeter, Stopwatch
from .estimator import (
    ControlVariateCoefficients,
    control_size,
    cosine_similarity,
    paired_squared_differences,
    relative_residual,
    signal_difference,
    split_batch_indices,
    split_generator,
    subset_loss_weights,
    trunk_correction,
    variance_explained,
)
from .heads import ModelPartition, capture_head
from .model_card import write_model_card
from .predictors import make_predictor

logger = logging.get_logger(__name__)

LGP_STATE_NAME = "lgp_state.pt"


class PredictedGradientTrainer(Trainer):
    """A `Trainer` that runs a full backward on a random control fraction of each batch only.

    Each per-device micro-batch B is split at random into a control part C (forward and backward) and a
    prediction part P (trunk forward without autograd, head forward and backward with the model's own loss).
    The head gets its exact gradient over B; the trunk gets r g(C) + beta A(S_B - r S_C) (`estimator`), an
    unbiased estimate of g(B) because the predictor A and the coefficients beta are fitted from earlier control
    batches only. Everything else (callbacks, logging, evaluation, saving, accumulation, DDP, mixed precision) is
    the base class's: the extra gradient terms are written into `.grad` before the control backward, so DDP's
    reducer, the fp16 scaler (they are pre-multiplied by its scale) and clipping see one ordinary gradient.

    Distributed (DDP through `accelerate launch`, GPUs or multi-process CPU). Each rank splits its own per-device
    batch with a generator seeded by (seed, optimizer step, micro-step), so all ranks take the same decisions
    without communicating; the update is the rank average of per-rank unbiased estimates, hence unbiased for the
    global batch. What is sent between ranks, per optimizer step and only on its last (sync) micro-batch:
      - DDP's own gradient all-reduce, once, as for `Trainer` (earlier micro-batches run in `no_sync`): the
        control gradient together with the head and predicted trunk corrections already written into `.grad`;
      - the control signal summed over the step's micro-batches (an all-reduce mean of k floats for `ntk`, of the
        head gradient's size for `window` and `zero`);
      - the summed signal difference S_B - r S_C that the applied corrections were computed from (same size), so
        that the control part of the all-reduced `.grad` can be isolated: the corrections are linear in it.
    Nothing parameter-sized besides DDP's all-reduce. The predictor and beta are then fitted from inputs that are
    identical on every rank (the averaged signal, the all-reduced `.grad`), so their state is identical on every
    rank and equal to one process's on the same global batches (tests/test_distributed.py checks both). The
    prediction forward runs on the module inside the DDP wrapper (it has no backward for DDP to reduce);
    `ddp_static_graph=True` is refused.

    Mixed precision. bf16/fp16 autocast applies to both forwards (accelerate's, around the model); head gradients
    and signals are taken in float32 and the predictors fit and predict in float32. Under fp16 the head gradients
    are computed from the scaled loss like the control backward, every term written into `.grad` is in the
    GradScaler's scale, and `_observe` divides it out; an overflow makes the scaler skip the step, as in `Trainer`,
    and the predictor learns nothing from a step whose trunk gradient is not finite.

    Overridden hooks: `training_step` (the estimator), `log` (adds the `lgp/*` statistics), `_save_checkpoint` and
    `_load_from_checkpoint` (the predictor state travels with checkpoints).
    """

    _tag_names = ["lgp-hf", "predicted-gradients"]

    def __init__(self, model=None, args: PredictedGradientArguments | None = None, *pargs, **kwargs):
        if args is None:
            args = PredictedGradientArguments(output_dir="trainer_output")
        if not isinstance(args, PredictedGradientArguments):
            raise ValueError(
                f"args: got {type(args).__name__}; PredictedGradientTrainer needs PredictedGradientArguments "
                "(a TrainingArguments subclass with the estimator's settings)."
            )
        super().__init__(model, args, *pargs, **kwargs)
        if hasattr(self.model, "add_model_tags"):  # transformers' Trainer does not: push_to_hub's card gets them
            self.model.add_model_tags(self._tag_names)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "PredictedGradientTrainer supports single-device and DDP training (accelerate launch, "
                "--multi_gpu or multi-process CPU), with fp16/bf16; DeepSpeed and FSDP shard or hide `.grad`, "
                "which the estimator writes, and are not supported."
            )
        if self.args.n_gpu > 1:
            raise ValueError(
                "PredictedGradientTrainer does not support torch.nn.DataParallel (several GPUs in one process); "
                "launch one process per GPU with `accelerate launch --multi_gpu`."
            )
        if self.args.ddp_static_graph:
            raise ValueError(
                "ddp_static_graph=True is not supported by PredictedGradientTrainer: DDP's static graph mode replays "
                "the autograd passes of the first step, and the estimator's extra head-gradient pass "
                "(torch.autograd.grad through DDP's output) breaks it. Leave ddp_static_graph unset; DDP works with "
                "or without ddp_find_unused_parameters."
            )
        self.partition = ModelPartition.from_model(self.model, self.args.head_modules)
        self.predictor = make_predictor(
            self.args.predictor, self.args.predictor_window_size, self.args.predictor_ridge
        )
        self.coefficients = ControlVariateCoefficients(
            len(self.partition.trunk_params), mode=self.args.control_variate_coefficient
        )
        self.cost_meter = CostMeter()
        self._trunk_numels = [p.numel() for p in self.partition.trunk_params]
        self._auto = self.args.control_fraction == "auto"
        self._control_fraction = self.args.auto_initial_control_fraction if self._auto else self.args.control_fraction
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._totals = {
            "alignment_sum": 0.0, "observations": 0, "last_alignment": None, "control_examples": 0, "examples": 0,
            "fallback_steps": 0, "residual_squares": 0.0, "gradient_squares": 0.0,
        }
        self._step_sums: dict | None = None
        self._micro_step = 0
        self._step_fell_back = False
        self._warned_single_example = False
        self._additive_loss: bool | None = None
        self._pending_batch: dict | None = None  # the first control batch of a pair (see _observe)
        self._log_pairs = [0.0, 0.0]  # summed (||dR||^2, ||dG||^2) of the pairs since the last log
        self._recent_pairs = [0.0, 0.0]  # the same since the last automatic control fraction update
        self._model_card_kwargs: dict = {}  # arguments of the last create_model_card, reused by later saves

    # ------------------------------------------------------------------ the estimator

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One micro-batch: the estimator when f < 1, the base class's step when the batch cannot be split."""
        batch_size = _batch_size(inputs)
        num_control = control_size(batch_size, self._control_fraction)
        if self._micro_step == 0:
            self._step_sums = _new_step_sums()
            self._step_fell_back = False
        if num_control >= batch_size and not self._auto:
            if batch_size == 1 and self._control_fraction < 1 and not self._warned_single_example:
                logger.warning("A batch of one example cannot be split into control and prediction parts: full backward.")
                self._warned_single_example = True
            self._step_sums = None  # part of this optimizer step is not an estimator step: observe nothing
            self._end_micro_step()
            return super().training_step(model, inputs, num_items_in_batch)

        self._check_labels(inputs)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        sums = self._step_sums if self._step_sums is not None else _new_step_sums()  # None: accumulate for nothing
        generator = split_generator(self.args.seed, self.state.global_step, self._micro_step)
        control_index, prediction_index = split_batch_indices(batch_size, num_control, generator)
        num_prediction = batch_size - num_control

        additive = self._loss_is_additive(model, inputs, num_items_in_batch)
        weight_control, weight_prediction = subset_loss_weights(additive, batch_size, num_control)
        accumulation = 1 if self._loss_is_scaled_for_ga(num_items_in_batch) else self.current_gradient_accumulation_steps
        control_scale = batch_size / num_control
        # Pass times (which synchronise CUDA) every logging or refit period, whichever is shorter, so that "auto" has
        # them; never on the first step, whose passes include one-off warm-up work.
        period = max(1, min(int(self.args.logging_steps), self.args.predictor_refit_steps))
        measure = self.state.global_step > 0 and self.state.global_step % period == 0
        stopwatch = Stopwatch(self.args.device, synchronize=measure)
        loss_scale = self.accelerator.scaler.get_scale() if self.accelerator.scaler is not None else 1.0

        # Prediction micro-batch: no-grad trunk, differentiable head and loss.
        if num_prediction:
            prediction_inputs = _select_examples(inputs, prediction_index, batch_size)
            with torch.no_grad(), capture_head(self.partition, head_only_autograd=True) as capture, self.compute_loss_context_manager():
                loss_prediction = self.compute_loss(_without_ddp(model), prediction_inputs, num_items_in_batch=num_items_in_batch)
            head_prediction, signal_prediction = self._head_gradients(loss_prediction, capture.logits, False, loss_scale)
            prediction_seconds = stopwatch.lap()

        # Control micro-batch: forward with autograd; head gradient first (the graph is kept for the backward).
        control_inputs = _select_examples(inputs, control_index, batch_size) if num_prediction else inputs
        with capture_head(self.partition) as capture, self.compute_loss_context_manager():
            loss_control = self.compute_loss(model, control_inputs, num_items_in_batch=num_items_in_batch)
        forward_seconds = stopwatch.lap()
        head_control, signal_control = self._head_gradients(loss_control, capture.logits, True, loss_scale)

        coefficient = control_scale * weight_control / accumulation
        if num_prediction:
            batch_signal = weight_control * signal_control + weight_prediction * signal_prediction
            difference = signal_difference(batch_signal, weight_control * signal_control, control_scale) / accumulation
            head_correction = [
                (weight_control * hc + weight_prediction * hp) / accumulation - coefficient * hc
                for hc, hp in zip(head_control, head_prediction)
            ]
            trunk_correction = self._trunk_correction(difference)
        else:
            difference, head_correction, trunk_correction = None, None, None
        if head_correction is not None:
            _add_to_grads(self.partition.head_params, head_correction, loss_scale)
        if trunk_correction is not None:
            _add_to_grads(self.partition.trunk_params, trunk_correction.split(self._trunk_numels), loss_scale)
            sums["applied"] = _add(sums["applied"], difference)
        sums["control"] = _add(sums["control"], coefficient * signal_control)

        self.accelerator.backward(loss_control * coefficient)
        backward_seconds = stopwatch.lap()
        if measure:
            self.cost_meter.update(prediction_seconds if num_prediction else 0.0, num_prediction, forward_seconds, backward_seconds, num_control)

        self._totals["control_examples"] += num_control
        self._totals["examples"] += batch_size
        if self.accelerator.sync_gradients:
            self._observe(loss_scale)
        self._end_micro_step()
        loss = weight_control * loss_control.detach()
        if num_prediction:
            loss = loss + weight_prediction * loss_prediction.detach()
        return loss / accumulation

    def _trunk_correction(self, difference: torch.Tensor) -> torch.Tensor | None:
        """beta * A(S_B - r S_C), or None (control-only update) when there is no prediction (see `_predict`)."""
        return trunk_correction(self._predict, difference, self._expanded_beta())

    def _expanded_beta(self) -> torch.Tensor:
        return self.coefficients.expanded(self._trunk_numels, self.partition.trunk_params[0].device)

    def _predict(self, signal: torch.Tensor) -> torch.Tensor | None:
        """The predictor's output, or None when it has none, its fit fails or it is not finite: a fault in the
        predictor never reaches the optimizer (the control-only estimate that replaces it is still unbiased) nor
        the statistics."""
        try:
            prediction = self.predictor.predict(signal)
        except (FloatingPointError, torch.linalg.LinAlgError) as error:
            self._record_fallback(f"the predictor fit failed ({error})")
            return None
        if prediction is not None and not torch.isfinite(prediction).all():
            self._record_fallback("the predicted trunk gradient is not finite")
            return None
        return prediction

    def _observe(self, loss_scale: float) -> None:
        """Score the predictor on this step's control batches, then (every second step) let it and beta learn.

        Runs after the last backward of an optimizer step. The control part of the trunk gradient is what `.grad`
        holds minus the corrections that were added; summed over micro-batches (and averaged over ranks, like
        `.grad`), it pairs with the summed control signal. Optimizer steps come in pairs: the first keeps its
        control batch aside, the second scores the pair (`lgp/variance_explained`, from the difference of the two
        batches, in which the mean gradient cancels) and only then do the predictor and beta learn from both, so
        that both are scored with a predictor fitted before either was drawn. Each step's estimator still uses only
        earlier control batches: the first of a pair is learnt from one step later. Every prediction needed here
        comes from one pass over the predictor's state.
        """
        sums, self._step_sums = self._step_sums, None
        if sums is None or sums["control"] is None or any(p.grad is None for p in self.partition.trunk_params):
            return
        true = torch.cat([p.grad.reshape(-1).float() for p in self.partition.trunk_params]) / loss_scale
        if not torch.isfinite(true).all():
            return  # an fp16 overflow: the scaler skips this step, and the predictor learns nothing from it
        control, applied = self._all_ranks_mean(sums["control"]), sums["applied"]
        if applied is None and self.accelerator.num_processes > 1:
            applied = torch.zeros_like(sums["control"])  # no correction here (or a fallback): still join the mean
        pending, self._pending_batch = self._pending_batch, None
        signals = [control]
        if applied is not None:
            signals.append(self._all_ranks_mean(applied))
        if pending is not None:
            signals.append(pending["signal"])
        predictions = self._predict(torch.stack(signals))
        beta = self._expanded_beta()
        raw = previous_raw = None
        if predictions is not None:
            raw = predictions[0]
            if applied is not None:
                true -= predictions[1] * beta  # the corrections added to .grad: linear in the applied difference
            if pending is not None:
                previous_raw = predictions[-1]
        if raw is None:
            alignment, residual = 0.0, 1.0
        else:
            predicted = raw * beta
            alignment, residual = cosine_similarity(predicted, true), relative_residual(true, predicted)
        self._metrics["lgp/alignment"].append(alignment)
        self._metrics["lgp/predictor_residual"].append(residual)
        self._totals["alignment_sum"] += alignment
        self._totals["observations"] += 1
        self._totals["last_alignment"] = alignment
        if pending is None:
            self._pending_batch = {"signal": control, "trunk_gradient": true}
        else:
            raw_pair = None if raw is None else (previous_raw, raw)
            self._score_pair(pending["trunk_gradient"], true, None if raw is None else (previous_raw * beta, predicted))
            self._learn(torch.stack([pending["signal"], control]), torch.stack([pending["trunk_gradient"], true]), raw_pair)
        if self._auto and (self.state.global_step + 1) % self.args.predictor_refit_steps == 0:
            self._update_control_fraction()

    def _score_pair(self, first: torch.Tensor, second: torch.Tensor, predicted: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        residual_squares, gradient_squares = paired_squared_differences((first, second), predicted)
        for sums in (self._log_pairs, self._recent_pairs):
            sums[0] += residual_squares
            sums[1] += gradient_squares
        self._totals["residual_squares"] += residual_squares
        self._totals["gradient_squares"] += gradient_squares

    def _learn(self, signals: torch.Tensor, gradients: torch.Tensor, predictions: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """beta from the (true, raw predicted) gradients and the predictor from the (signal, true gradient) pairs of
        the pair's two control batches."""
        if predictions is not None:
            for gradient, prediction in zip(gradients, predictions):
                self.coefficients.update(gradient, prediction, self._trunk_numels)
        try:
            self.predictor.observe(signals, gradients)
        except (FloatingPointError, torch.linalg.LinAlgError) as error:
            self._record_fallback(f"the predictor fit failed ({error})")

    def _update_control_fraction(self) -> None:
        """`control_fraction="auto"`: the f minimising estimator variance per second (theory.optimal_control_fraction)
        for the variance explained measured since the last refit point and the measured cost ratio; 1 (plain
        backprop) unless the variance explained exceeds the cost ratio c. Changed only here, between optimizer
        steps, so each step's estimator is unbiased."""
        explained = variance_explained(*self._recent_pairs)
        if explained is None or self.cost_meter.cost_ratio is None:
            return
        self._recent_pairs = [0.0, 0.0]
        # Timings differ between ranks; their mean (one float) gives every rank the same f.
        cost_ratio = float(self._all_ranks_mean(torch.tensor([self.cost_meter.cost_ratio], dtype=torch.float64, device=self.args.device)))
        self._control_fraction = theory.optimal_control_fraction(
            math.sqrt(min(max(explained, 0.0), 1.0)), cost_ratio, min_fraction=self.args.auto_min_control_fraction
        )

    def _head_gradients(self, loss: torch.Tensor, logits: torch.Tensor | None, retain_graph: bool, loss_scale: float = 1.0):
        """Exact head gradients of `loss` and the predictor's signal (flat head gradient or summed logit errors).

        Under fp16 the backward runs on the loss times the GradScaler's scale, as the control backward does (an
        unscaled fp16 backward would flush small logit errors to zero), and the result is divided by it in float32;
        an overflow gives non-finite values, which reach `.grad` through the corrections and make the scaler skip.
        """
        if logits is None or not loss.requires_grad:
            raise RuntimeError(
                f"The head modules {self.partition.head_module_names} did not run under autograd in this forward "
                "pass, so their gradient (and input) cannot be captured; name the model's final layers with "
                "head_modules=[...]."
            )
        params = self.partition.head_params
        grads = torch.autograd.grad(loss * loss_scale if loss_scale != 1 else loss, [*params, logits], retain_graph=retain_graph, allow_unused=True)
        if loss_scale != 1:
            grads = [None if g is None else g.float() / loss_scale for g in grads]
        head = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads[:-1])]
        if self.predictor.signal == "logit_error":
            logit_grad = grads[-1] if grads[-1] is not None else torch.zeros_like(logits)
            signal = logit_grad.float().reshape(-1, logit_grad.shape[-1]).sum(0)  # summed in float32, also under bf16
        else:
            signal = torch.cat([g.reshape(-1).float() for g in head])
        return head, signal

    def _check_labels(self, inputs: dict) -> None:
        """A batch without labels has no loss to split: say so before any gradient is written."""
        if self.label_names and not any(name in inputs for name in self.label_names):
            raise ValueError(
                f"The training batch has no labels: expected a key among {self.label_names} (got {sorted(inputs)}); "
                "PredictedGradientTrainer needs the model's own loss on every example. Check the collator and "
                "`label_names`."
            )

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """The base class's rule for whether the loss is already scaled for gradient accumulation (followed as is,
        so that f < 1 estimates the very gradient that f = 1, the base class's step, computes)."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def _loss_is_additive(self, model, inputs, num_items_in_batch) -> bool:
        """Whether the loss is a sum over examples divided by `num_items_in_batch` (so loss(B) = loss(C) + loss(P)).

        Accepting loss kwargs does not make a model use them (BERT's regression loss is a plain mean while its
        classification loss is normalised by `num_items_in_batch`), so this is measured once: the loss of the
        batch with `num_items_in_batch` doubled must halve. The probe runs in eval mode without autograd, so it
        draws no random numbers and changes nothing.
        """
        if num_items_in_batch is None:
            return False
        if self._additive_loss is None:
            model.eval()
            with torch.no_grad(), self.compute_loss_context_manager():
                once = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
                twice = self.compute_loss(model, inputs, num_items_in_batch=2 * num_items_in_batch)
            model.train()
            self._additive_loss = bool(torch.isclose(once.float(), 2 * twice.float(), rtol=1e-3, atol=1e-12))
        return self._additive_loss

    def _all_ranks_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.contiguous(), reduction="mean")

    def _end_micro_step(self) -> None:
        self._micro_step = 0 if self.accelerator.sync_gradients else self._micro_step + 1

    def _record_fallback(self, reason: str) -> None:
        """Counts the optimizer step (once, however many predictions failed in it) and says why."""
        if not self._step_fell_back:
            self._step_fell_back = True
            self._totals["fallback_steps"] += 1
        logger.warning(f"{reason}; the control-only trunk gradient is used instead (still unbiased).")

    # ------------------------------------------------------------------ reporting

    def break_even_alignment(self) -> float | None:
        """The per-example correlation above which the current control fraction beats plain backprop (at f = 1:
        above which lowering f pays), the square root of `break_even_variance_explained`. None before costs are
        measured."""
        if self.cost_meter.cost_ratio is None:
            return None
        return theory.break_even_alignment(self._control_fraction, self.cost_meter.cost_ratio)

    def break_even_variance_explained(self) -> float | None:
        """The per-example variance explained (`lgp/variance_explained`) above which the current control fraction
        beats plain backprop at equal compute, c / (f + (1 - f) c); at f = 1 it is c, the level above which
        lowering f pays (what `control_fraction="auto"` waits for). None before costs are measured."""
        if self.cost_meter.cost_ratio is None:
            return None
        return theory.break_even_rho2(self._control_fraction, self.cost_meter.cost_ratio)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the `lgp/*` statistics (means since the last log) to training logs."""
        if "loss" in logs:
            for key, values in self._metrics.items():
                if values:
                    logs[key] = sum(values) / len(values)
            self._metrics.clear()
            logs["lgp/control_fraction"] = self._control_fraction
            logs["lgp/fallback_steps"] = self._totals["fallback_steps"]
            if self.cost_meter.cost_ratio is not None:
                logs["lgp/backward_forward_ratio"] = self.cost_meter.backward_forward_ratio
                logs["lgp/cost_ratio"] = self.cost_meter.cost_ratio
            explained = variance_explained(*self._log_pairs)
            if explained is not None:
                logs["lgp/variance_explained"] = explained
            self._log_pairs = [0.0, 0.0]
            for key, value in (
                ("lgp/break_even_variance_explained", self.break_even_variance_explained()),
                ("lgp/break_even_alignment", self.break_even_alignment()),
            ):
                if value is not None:
                    logs[key] = value
        super().log(logs, start_time)

    def lgp_summary(self) -> dict[str, float | None]:
        """Statistics of the run so far: alignment, per-example variance explained, break-even, measured costs,
        backward work skipped."""
        totals = self._totals
        return {
            "lgp_predictor": self.args.predictor,
            "lgp_control_fraction": self._control_fraction,
            "lgp_mean_alignment": totals["alignment_sum"] / totals["observations"] if totals["observations"] else None,
            "lgp_final_alignment": totals["last_alignment"],
            "lgp_break_even_alignment": self.break_even_alignment(),
            "lgp_variance_explained": variance_explained(totals["residual_squares"], totals["gradient_squares"]),
            "lgp_break_even_variance_explained": self.break_even_variance_explained(),
            "lgp_backward_forward_ratio": self.cost_meter.backward_forward_ratio,
            "lgp_cost_ratio": self.cost_meter.cost_ratio,
            "lgp_backward_work_skipped": 1 - totals["control_examples"] / totals["examples"] if totals["examples"] else 0.0,
            "lgp_fallback_steps": totals["fallback_steps"],
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
            "predictor": self.args.predictor,
            "predictor_state": self.predictor.state_dict(),
            "coefficients": self.coefficients.state_dict(),
            "costs": self.cost_meter.state_dict(),
            "control_fraction": self._control_fraction,
            "pending_batch": self._pending_batch,
            "log_pairs": list(self._log_pairs),
            "recent_pairs": list(self._recent_pairs),
            "totals": dict(self._totals),
        }

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            torch.save(self._lgp_state(), os.path.join(folder, LGP_STATE_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        reload_renamed_weights(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)
        path = os.path.join(resume_from_checkpoint, LGP_STATE_NAME)
        if not os.path.isfile(path):
            logger.warning(f"{resume_from_checkpoint} holds no {LGP_STATE_NAME} (not an lgp_hf checkpoint): the predictor starts fresh.")
            return
        state = torch.load(path, map_location=self.args.device, weights_only=False)
        if state["predictor"] != self.args.predictor:
            raise ValueError(
                f"predictor: the checkpoint was trained with predictor={state['predictor']!r}, not {self.args.predictor!r}; "
                "resume with the same predictor."
            )
        self.predictor.load_state_dict(state["predictor_state"])
        self.coefficients.load_state_dict(state["coefficients"])
        self.cost_meter.load_state_dict(state["costs"])
        self._control_fraction = state["control_fraction"]
        self._pending_batch = state["pending_batch"]
        self._log_pairs, self._recent_pairs = list(state["log_pairs"]), list(state["recent_pairs"])
        self._totals.update(state["totals"])


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


def _new_step_sums() -> dict:
    """What `_observe` needs of one optimizer step, summed over its micro-batches."""
    return {"control": None, "applied": None}


def _add(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value.clone() if total is None else total + value
