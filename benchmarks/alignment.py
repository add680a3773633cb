#!/usr/bin/env python
r"""Predictor quality, measured honestly: per-example variance explained on held-out examples, against break-even.

For each predictor variant (`--variants`), trains the example's ViT with PredictedGradientTrainer for `--steps`
optimizer steps (control fraction `--control_fraction`, batch `--batch_size`; from scratch, or from
`--checkpoint` with a new classifier for the fine-tuning regime) and records:

- what the trainer logs every `--logging_steps`: `lgp/alignment` (cosine of the predicted and the true trunk
  gradient of the step's control batch: a batch-level number), `lgp/predictor_residual`,
  `lgp/break_even_alignment`, and `lgp/variance_explained`, the trainer's own online estimate of the per-example
  variance explained as applied (from pairs of control batches), which the probe below checks;
- every `--probe_every` steps, on `--probe_size` test images that no predictor has seen (drawn from a fixed pool
  of `--probe_pool` test images, the same draw for every variant at a given step): the true trunk gradient g_i of
  each example (one backward per example) and the prediction p_i = beta * A(s_i), where s_i is the example's
  head-side signal (logit error for `ntk`, head gradient for `window`, computed as the trainer computes it),
  A the trainer's predictor and beta its fitted coefficients, both as they stand after that step. With centred
  sums over the probe examples (<x, y>_c = sum_i <x_i - xbar, y_i - ybar>):

      rho^2                 = max(0, <g, p>_c)^2 / (<g, g>_c <p, p>_c): variance explained at the optimal scale
      explained_as_applied  = 1 - <g - p, g - p>_c / <g, g>_c: as the estimator applies p (< 0: p adds variance)
      optimal_scale         = <g, p>_c / <p, p>_c: the factor beta is off by (1: beta is right)
      rho2_raw              = rho^2 of A(s_i) without beta (what per-tensor beta adds is rho^2 - rho2_raw)
      per_example_cosine    = mean_i cos(g_i, p_i), uncentred (the notes' number)

  The estimator's variance per unit of compute beats plain backprop iff rho^2 >= c / (f + (1 - f) c) (theory
  module; c the trainer's measured cost ratio): `break_even_rho2`. The batch-level `lgp/alignment` is larger than
  rho when the mean gradient dominates the per-example noise, so only rho^2 may be compared with break-even.

Variants: `<predictor>[:key=value,...]`. Keys set PredictedGradientArguments fields: `m` =
`predictor_window_size` (the window predictor's m; the ntk fit's memory, about the last m steps), `ridge` =
`predictor_ridge`, `refit` = `predictor_refit_steps`, `chunks` = `predictor_fit_chunks` (K: the predictor learns K - 1
chunk contrasts per control batch), `memory` = `predictor_memory_fraction`; `head` is `classifier` (the default split) or `block`: the
last transformer block, the final layernorm and the classifier get exact gradients on every example and make up
the window predictor's signal (head_modules), for a backward through them on every example.

Writes `--output_dir`/alignment.json (every log entry and probe, and the table) and alignment.png (logged
alignment with break-even, rho^2 with break-even rho^2, and variance explained as applied, against step).

    python benchmarks/alignment.py        # 10 variants x 100 steps: about 16 minutes on 2 CPU cores
    python benchmarks/alignment.py --checkpoint benchmarks/results/finetune/pretrained_full_classes01234_300s_seed0
    python benchmarks/alignment.py --subset --steps 4 --probe_every 2 --probe_size 4 --batch_size 16 \
        --variants ntk:m=4 window:m=4 zero window:m=4,head=block    # smoke test
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback, set_seed

import common
from lgp_hf.estimator import apply_coefficients
from lgp_hf.heads import capture_head
from lgp_hf.predictors import PREDICTOR_NAMES

DEFAULT_VARIANTS = [
    "ntk:m=16",
    "ntk:m=64",
    "ntk:m=256",
    "window:m=16,ridge=1",
    "window:m=64,ridge=0.3",
    "window:m=64,ridge=1",
    "window:m=64,ridge=3",
    "zero",
    "ntk:m=64,head=block",
    "window:m=64,ridge=1,head=block",
]
#: variant key -> (PredictedGradientArguments field, type)
VARIANT_KEYS = {
    "m": ("predictor_window_size", int),
    "ridge": ("predictor_ridge", float),
    "refit": ("predictor_refit_steps", int),
    "chunks": ("predictor_fit_chunks", int),
    "memory": ("predictor_memory_fraction", float),
}
HEADS = ("classifier", "block")


@dataclass(frozen=True)
class Variant:
    name: str
    predictor: str
    settings: tuple[tuple[str, int | float], ...]  # (PredictedGradientArguments field, value)
    head: str = "classifier"

    def head_modules(self, model) -> list[str] | None:
        if self.head == "classifier":
            return None  # the trainer's default: the final layer
        return [f"vit.layers.{model.config.num_hidden_layers - 1}", "vit.layernorm", "classifier"]


def parse_variant(text: str) -> Variant:
    predictor, _, options = text.partition(":")
    settings, head = [], "classifier"
    for item in filter(None, options.split(",")):
        key, separator, value = item.partition("=")
        if key == "head" and value in HEADS:
            head = value
        elif key in VARIANT_KEYS and separator:
            field, kind = VARIANT_KEYS[key]
            settings.append((field, kind(value)))
        else:
            raise ValueError(
                f"variant {text!r}: {item!r} is not key=value with a key among {[*VARIANT_KEYS, 'head']} "
                f"(head one of {list(HEADS)})."
            )
    if predictor not in PREDICTOR_NAMES:
        raise ValueError(f"variant {text!r}: the predictor must be one of {list(PREDICTOR_NAMES)}.")
    return Variant(text, predictor, tuple(settings), head)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="Predictor variants (see above).")
    parser.add_argument("--steps", type=int, default=100, help="Optimizer steps of training per variant.")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--control_fraction", type=float, default=0.25)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--warmup_steps", type=int, default=20, help="Linear warm-up steps, then a constant rate.")
    parser.add_argument("--logging_steps", type=int, default=5, help="Steps between lgp/* log entries.")
    parser.add_argument("--probe_every", type=int, default=20, help="Steps between per-example measurements.")
    parser.add_argument("--probe_size", type=int, default=32, help="Held-out examples per measurement.")
    parser.add_argument("--probe_pool", type=int, default=1000, help="Test images the probe examples are drawn from.")
    parser.add_argument("--checkpoint", default=None, help="Start from this saved ViT with a new classifier (e.g. finetune.py's).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", type=Path, default=common.RESULTS_DIR / "alignment")
    common.add_data_arguments(parser, subset_default=False)
    args = parser.parse_args(argv)
    args.variants = [parse_variant(text) for text in args.variants]
    return args


# ---------------------------------------------------------------- per-example measurement


def per_example_statistics(trainer, batch: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """Centred per-example statistics of true trunk gradients against the trainer's predictions (module doc)."""
    model, partition, predictor = trainer.model, trainer.partition, trainer.predictor
    params = partition.trunk_params
    numels = [param.numel() for param in params]
    beta = trainer.coefficients.values
    num_examples = len(batch["labels"])
    sums = {name: torch.zeros(sum(numels), dtype=torch.float64, device=trainer.args.device) for name in ("g", "p", "raw")}
    dots = dict.fromkeys(("gg", "pp", "gp", "rr", "gr", "cosine"), 0.0)
    for i in range(num_examples):
        inputs = {key: value[i : i + 1].to(trainer.args.device) for key, value in batch.items()}
        with capture_head(partition) as capture:
            loss = model(**inputs).loss
        _, signal = trainer._head_gradients(loss, capture, 1.0, True)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        g = torch.cat([(torch.zeros_like(p) if grad is None else grad).reshape(-1) for p, grad in zip(params, grads)]).double()
        raw = predictor.predict(signal)
        raw = torch.zeros_like(g) if raw is None else raw.double()
        p = apply_coefficients(raw, beta, numels)
        for name, vector in (("g", g), ("p", p), ("raw", raw)):
            sums[name] += vector
        dots["gg"] += float(g @ g)
        dots["pp"] += float(p @ p)
        dots["gp"] += float(g @ p)
        dots["rr"] += float(raw @ raw)
        dots["gr"] += float(g @ raw)
        norms = float(g.norm() * p.norm())
        dots["cosine"] += float(g @ p) / norms if norms > 0 else 0.0

    def centred(a: str, b: str, key: str) -> float:
        return dots[key] - float(sums[a] @ sums[b]) / num_examples

    gg, pp, gp = centred("g", "g", "gg"), centred("p", "p", "pp"), centred("g", "p", "gp")
    rr, gr = centred("raw", "raw", "rr"), centred("g", "raw", "gr")
    return {
        "rho": gp / math.sqrt(gg * pp) if pp > 0 else 0.0,
        "rho2": max(gp, 0.0) ** 2 / (gg * pp) if pp > 0 else 0.0,
        "explained_as_applied": (2 * gp - pp) / gg,
        "optimal_scale": gp / pp if pp > 0 else None,
        "rho2_raw": max(gr, 0.0) ** 2 / (gg * rr) if rr > 0 else 0.0,
        "per_example_cosine": dots["cosine"] / num_examples,
    }


class Probe(TrainerCallback):
    """Every `every` optimizer steps, `per_example_statistics` on `size` examples of `pool` (drawn with the step
    number as seed, so every variant sees the same examples at the same step), with the break-even rho^2."""

    def __init__(self, pool, size: int, every: int):
        self.pool, self.size, self.every = pool, size, every
        self.trainer = None
        self.records: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every:
            return
        order = torch.randperm(len(self.pool), generator=torch.Generator().manual_seed(state.global_step))
        batch = common.run_vit.collate_fn([self.pool[int(i)] for i in order[: self.size]])
        break_even = self.trainer.break_even_alignment()
        self.records.append({
            "step": state.global_step,
            **per_example_statistics(self.trainer, batch),
            "break_even_rho2": None if break_even is None else break_even**2,
        })


# ---------------------------------------------------------------- runs and report


def run_variant(variant: Variant, data: common.ImageData, probe_pool, args) -> dict:
    set_seed(args.seed)
    model, _ = common.build_model(data.labels, args.checkpoint)
    spec = common.RunSpec(variant.name, args.batch_size, variant.predictor, args.control_fraction)
    training_args = common.training_arguments(
        spec,
        str(args.output_dir / "trainer_output"),
        args.seed,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=args.warmup_steps,
        logging_steps=args.logging_steps,
        head_modules=variant.head_modules(model),
        **dict(variant.settings),
    )
    probe = Probe(probe_pool, args.probe_size, args.probe_every)
    trainer = common.make_trainer(spec, model, training_args, data.train, callbacks=[probe])
    probe.trainer = trainer
    trainer.train()
    log = [
        {key: value for key, value in entry.items() if key == "step" or key.startswith("lgp/")}
        for entry in trainer.state.log_history
        if "lgp/alignment" in entry
    ]
    return {
        "variant": variant.name,
        "trunk_parameters": trainer.partition.num_trunk_parameters,
        "head_modules": trainer.partition.head_module_names,
        "log": log,
        "probes": probe.records,
        "lgp_summary": trainer.lgp_summary(),
    }


def mean(values) -> float | None:
    values = [value for value in values if value is not None]
    return statistics.fmean(values) if values else None


def summary_row(result: dict) -> dict:
    probes, log = result["probes"], result["log"]
    above = [p["rho2"] >= p["break_even_rho2"] for p in probes if p["break_even_rho2"] is not None]
    return {
        "variant": result["variant"],
        "trunk_params": result["trunk_parameters"],
        "batch_alignment": mean(entry["lgp/alignment"] for entry in log),
        "residual": mean(entry["lgp/predictor_residual"] for entry in log),
        "logged_variance_explained": mean(entry.get("lgp/variance_explained") for entry in log),
        "per_example_cosine": mean(p["per_example_cosine"] for p in probes),
        "rho2": mean(p["rho2"] for p in probes),
        "rho2_last": probes[-1]["rho2"] if probes else None,
        "rho2_raw": mean(p["rho2_raw"] for p in probes),
        "explained_as_applied": mean(p["explained_as_applied"] for p in probes),
        "optimal_scale": mean(p["optimal_scale"] for p in probes),
        "break_even_alignment": result["lgp_summary"]["lgp_break_even_alignment"],
        "break_even_rho2": mean(p["break_even_rho2"] for p in probes),
        "probes_above_break_even": f"{sum(above)}/{len(above)}",
    }


COLUMNS = [
    "variant", "trunk_params", "batch_alignment", "residual", "per_example_cosine", "rho2", "rho2_last", "rho2_raw",
    "explained_as_applied", "logged_variance_explained", "optimal_scale", "break_even_alignment", "break_even_rho2", "probes_above_break_even",
]


def plot(results: list[dict], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(18, 5.5), layout="tight")
    panels = figure.subplots(1, 3)
    for index, result in enumerate(results):
        color, label = f"C{index % 10}", result["variant"]
        log, probes = result["log"], result["probes"]
        panels[0].plot([e["step"] for e in log], [e["lgp/alignment"] for e in log], color=color, label=label)
        be_log = [(e["step"], e["lgp/break_even_alignment"]) for e in log if "lgp/break_even_alignment" in e]
        if be_log:
            panels[0].plot(*zip(*be_log), color=color, ls="--", lw=0.8)
        panels[1].plot([p["step"] for p in probes], [p["rho2"] for p in probes], color=color, marker="o", label=label)
        be_probe = [(p["step"], p["break_even_rho2"]) for p in probes if p["break_even_rho2"] is not None]
        if be_probe:
            panels[1].plot(*zip(*be_probe), color=color, ls="--", lw=0.8)
        panels[2].plot([p["step"] for p in probes], [p["explained_as_applied"] for p in probes], color=color, marker="o", label=label)
        logged = [(e["step"], e["lgp/variance_explained"]) for e in log if "lgp/variance_explained" in e]
        if logged:
            panels[2].plot(*zip(*logged), color=color, ls=":", lw=1)
    titles = [
        "lgp/alignment (batch cosine, logged); dashed: break-even alignment",
        "per-example rho^2 on held-out examples; dashed: break-even rho^2",
        "per-example variance explained as applied (beta * A s)\nprobe (markers); trainer's lgp/variance_explained (dotted)",
    ]
    for axes, panel_title in zip(panels, titles):
        axes.set(xlabel="optimizer step", title=panel_title)
        axes.grid(alpha=0.3)
    panels[2].axhline(0, color="black", lw=0.8)
    panels[0].legend(fontsize=7)
    figure.suptitle(title)
    figure.savefig(path, dpi=120)


def main(argv=None) -> None:
    args = parse_args(argv)
    data = common.load_data(args, eval_samples=args.probe_pool)
    regime = f"from {args.checkpoint} (new classifier)" if args.checkpoint else "from scratch"
    title = (f"ViT on CIFAR-10 {regime}: first {args.steps} steps, batch {args.batch_size}, "
             f"f = {args.control_fraction:g}, {args.probe_size} held-out examples per probe")
    print(f"{title}; data {data.source}; {common.device_description()}", flush=True)
    results, rows = [], []
    for index, variant in enumerate(args.variants):
        print(f"[{index + 1}/{len(args.variants)}] {variant.name}", flush=True)
        results.append(run_variant(variant, data, data.eval, args))
        rows.append(summary_row(results[-1]))
        print(f"    rho^2 {common.format_value(rows[-1]['rho2'])} (break-even {common.format_value(rows[-1]['break_even_rho2'])}), "
              f"batch alignment {common.format_value(rows[-1]['batch_alignment'])}", flush=True)
        settings = {**vars(args), "variants": [v.name for v in args.variants]}
        common.write_json(args.output_dir / "alignment.json", {"settings": settings, "title": title, "summary": rows, "results": results})
    print(f"\n{title}")
    print(common.format_table(rows, COLUMNS))
    plot(results, args.output_dir / "alignment.png", title)
    print(f"Wrote {args.output_dir / 'alignment.json'} and {args.output_dir / 'alignment.png'}")


if __name__ == "__main__":
    main()
