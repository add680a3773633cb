#!/usr/bin/env python
"""How much per-example trunk-gradient variance a linear predictor could explain, given more data than a trainer has.

The trainer's predictors learn from one (signal, trunk gradient) pair per control batch: the batch sums, the only
thing one backward pass gives. This script asks what they would reach with richer training data, to show where
the limit lies. It trains the example's ViT with transformers.Trainer and the example's optimizer settings
(AdamW, cosine schedule with 10 % warm-up over the last snapshot step, so late snapshots are at a low learning
rate), from scratch or from `--checkpoint` with a new classifier (the fine-tuning regime), and at each step of
`--snapshots` takes, one backward per example, the
exact trunk gradient g_i of `--examples` training images, with each one's logit error e_i (dloss/dlogits), head
input phi_i and label. The first examples are cut into control batches of `--control_batch` (f n at the
benchmarks' f = 0.25, n = 128) and fitted on; the last `--held_out` are scored.

Data a fit gets from each control batch (rows):
    batch_sums    one pair: the batch's summed signal and summed trunk gradient (what lgp_hf's predictors get);
    chunks_<s>    the batch cut into chunks of s examples, each chunk's sums minus the batch's mean chunk (the
                  mean gradient cancels): what 1 / s backward passes per control example would give;
    per_example   every example's own pair: the most any fit can get, at one backward pass per example.
Signals (the predictor's input, linear ridge fit to the trunk gradient, lambda = `--ridge` times the mean
diagonal of the signals' Gram matrix):
    logit_error        e_i (the `ntk` predictor);
    head_gradient      e_i (x) [phi_i, 1] (the `window` predictor);
    features_<r>       e_i (x) [1, a_i], a_i the top-r principal components of phi_i (a Jacobian that varies
                       with the example's features, low rank: J_i ~ J + sum_r a_ir K_r);
    class_conditional  one fit of e_i per label (per-example data only).
Score: rho^2 = <g, p>_c^2 / (<g, g>_c <p, p>_c) over the held-out examples (centred), the per-example variance
explained at the best scale, to compare with the break-even c / (f + (1 - f) c) (theory module).

Trunk gradients are count-sketched to `--sketch` coordinates (each parameter added, with a random sign, to a
random bucket): inner products are preserved in expectation, and every fit here is linear in the trunk gradients,
so fitting on sketches is sketching the fit; only the scores carry sketch noise (small at 65,536 buckets).

Writes `--output_dir`/ceiling.json and ceiling.png (rho^2 against step for each signal and data source, with the
break-even levels for `--cost_ratio`).

    python benchmarks/predictor_ceiling.py      # from scratch: about 7 minutes on 2 CPU cores
    python benchmarks/predictor_ceiling.py --checkpoint benchmarks/results/finetune/pretrained_full_classes01234_120s_seed0 \\
        --learning_rate 3e-4 --snapshots 0 25 50 100 --output_dir benchmarks/results/predictor_ceiling_finetune
    python benchmarks/predictor_ceiling.py --subset --snapshots 0 2 --examples 96 --held_out 32   # smoke test
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import TrainerCallback, set_seed

import common
from lgp_hf import theory
from lgp_hf.predictors import RidgePredictor

DATA_SOURCES = ("batch_sums", "chunks_8", "chunks_4", "per_example")
SIGNALS = ("logit_error", "features_4", "head_gradient", "class_conditional")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--snapshots", type=int, nargs="+", default=[0, 25, 50, 100, 200], help="Optimizer steps measured at.")
    parser.add_argument("--examples", type=int, default=512, help="Training images per snapshot (fitted + held out).")
    parser.add_argument("--held_out", type=int, default=64, help="Of which scored (the rest is fitted on).")
    parser.add_argument("--control_batch", type=int, default=32, help="Examples per control batch of the fit data.")
    parser.add_argument("--ridge", type=float, default=0.1, help="Relative ridge lambda of every fit.")
    parser.add_argument("--sketch", type=int, default=1 << 16, help="Buckets of the trunk-gradient count sketch.")
    parser.add_argument("--cost_ratio", type=float, default=0.307, help="c for the break-even lines (step_cost.py's measurement).")
    parser.add_argument("--batch_size", type=int, default=128, help="Training batch size between snapshots.")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--checkpoint", default=None, help="Start from this saved ViT with a new classifier (e.g. finetune.py's).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", type=Path, default=common.RESULTS_DIR / "predictor_ceiling")
    common.add_data_arguments(parser, subset_default=False)
    args = parser.parse_args(argv)
    if (args.examples - args.held_out) % args.control_batch or args.control_batch % 8:
        parser.error("--examples minus --held_out must be a multiple of --control_batch, itself a multiple of 8.")
    return args


# ---------------------------------------------------------------- per-example gradients


class Snapshots(TrainerCallback):
    """At the chosen steps, the per-example (logit error, head input, label, sketched trunk gradient)."""

    def __init__(self, data, args):
        self.data, self.args = data, args
        self.records: list[dict] = []
        self.bucket = self.sign = None

    def _measure(self, model, step: int) -> None:
        trunk = [param for name, param in model.named_parameters() if not name.startswith("classifier.")]
        if self.bucket is None:
            generator = torch.Generator().manual_seed(self.args.seed + 1)
            size = sum(param.numel() for param in trunk)
            self.bucket = torch.randint(0, self.args.sketch, (size,), generator=generator)
            self.sign = torch.randint(0, 2, (size,), generator=generator).float() * 2 - 1
        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.args.seed + 100 + step))
        batch = common.run_vit.collate_fn([self.data[int(i)] for i in order[: self.args.examples]])
        head_input = {}
        hook = model.classifier.register_forward_hook(lambda module, inputs, output: head_input.update(phi=inputs[0].detach()))
        was_training = model.training
        model.train()
        errors, features, gradients = [], [], []
        for i in range(self.args.examples):
            logits = model(pixel_values=batch["pixel_values"][i : i + 1].to(model.device)).logits
            loss = torch.nn.functional.cross_entropy(logits, batch["labels"][i : i + 1].to(model.device))
            *grads, logit_grad = torch.autograd.grad(loss, [*trunk, logits], allow_unused=True)
            flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float().cpu() for p, g in zip(trunk, grads)])
            gradients.append(torch.zeros(self.args.sketch).index_add_(0, self.bucket, flat * self.sign))
            errors.append(logit_grad[0].float().cpu())
            features.append(head_input["phi"][0].float().cpu())
        hook.remove()
        model.train(was_training)
        self.records.append({
            "step": step, "errors": torch.stack(errors), "features": torch.stack(features),
            "labels": batch["labels"].clone(), "gradients": torch.stack(gradients),
        })
        print(f"    snapshot at step {step}: {self.args.examples} per-example gradients", flush=True)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if 0 in self.args.snapshots:
            self._measure(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.args.snapshots:
            self._measure(model, state.global_step)


# ---------------------------------------------------------------- fits and scores (plain tensors)


def rho2(true: torch.Tensor, predicted: torch.Tensor) -> float:
    """Centred per-example variance explained at the best scale (rows are examples)."""
    true, predicted = true - true.mean(0), predicted - predicted.mean(0)
    cross = float((true * predicted).sum())
    denominator = float((true * true).sum() * (predicted * predicted).sum())
    return max(cross, 0.0) ** 2 / denominator if denominator > 0 else 0.0


def ridge_fit(signals: torch.Tensor, targets: torch.Tensor, ridge: float):
    """x -> the ridge prediction fitted on rows (signals, targets), by lgp_hf's own predictor (`RidgePredictor`: the
    dual fit over all rows, penalised by `ridge` times the mean diagonal of the rows' Gram matrix), with the targets
    (count-sketched gradients, one flat tensor) stored uncompressed. Before the compressed predictors, signals
    narrower than the row count were fitted in primal form, whose penalty is relative to the mean diagonal of the
    k x k Gram matrix instead: the numbers in benchmarks/README.md were measured that way."""
    predictor = RidgePredictor(
        shapes=[(targets.shape[1],)], window_size=len(signals), ridge=ridge, memory_fraction=float(len(signals) + signals.shape[1]),
    )
    predictor.observe(signals, targets)
    return predictor.predict


def control_batch_pairs(signals: torch.Tensor, gradients: torch.Tensor, source: str, control_batch: int):
    """The fit data a control batch yields under `source` (module docstring)."""
    if source == "per_example":
        return signals, gradients
    chunk = control_batch if source == "batch_sums" else int(source.removeprefix("chunks_"))

    def chunk_sums(x):
        return x.reshape(-1, control_batch // chunk, chunk, x.shape[1]).sum(2)

    signal_sums, gradient_sums = chunk_sums(signals), chunk_sums(gradients)
    if source != "batch_sums":
        signal_sums = signal_sums - signal_sums.mean(1, keepdim=True)
        gradient_sums = gradient_sums - gradient_sums.mean(1, keepdim=True)
    return signal_sums.reshape(-1, signals.shape[1]), gradient_sums.reshape(-1, gradients.shape[1])


def signal_matrix(name: str, record: dict, fitted: slice) -> torch.Tensor:
    errors, features = record["errors"], record["features"]
    ones = torch.ones(len(errors), 1)
    if name in ("logit_error", "class_conditional"):
        return errors
    if name == "head_gradient":
        columns = torch.cat([features, ones], 1)
    else:  # features_<r>
        rank = int(name.removeprefix("features_"))
        centre = features[fitted].mean(0)
        directions = torch.linalg.svd(features[fitted] - centre, full_matrices=False).Vh[:rank]
        components = (features - centre) @ directions.T
        columns = torch.cat([ones, components / components[fitted].std(0)], 1)
    return (errors[:, :, None] * columns[:, None, :]).reshape(len(errors), -1)


def score_snapshot(record: dict, args) -> dict[str, float]:
    total = len(record["errors"])
    fitted, held_out = slice(0, total - args.held_out), slice(total - args.held_out, total)
    gradients = record["gradients"]
    scores = {}
    for signal_name in SIGNALS:
        signals = signal_matrix(signal_name, record, fitted)
        sources = ("per_example",) if signal_name == "class_conditional" else DATA_SOURCES
        for source in sources:
            if signal_name == "class_conditional":
                labels = record["labels"]
                predicted = torch.zeros(args.held_out, gradients.shape[1])
                for label in labels[held_out].unique():
                    fit_rows = (labels[fitted] == label).nonzero().squeeze(1)
                    test_rows = (labels[held_out] == label).nonzero().squeeze(1)
                    if len(fit_rows) >= 2:
                        x, y = signals[fitted][fit_rows], gradients[fitted][fit_rows]
                        fit = ridge_fit(x - x.mean(0), y - y.mean(0), args.ridge)
                        predicted[test_rows] = fit(signals[held_out][test_rows])
            else:
                x, y = control_batch_pairs(signals[fitted], gradients[fitted], source, args.control_batch)
                predicted = ridge_fit(x, y, args.ridge)(signals[held_out])
            scores[f"{signal_name}/{source}"] = rho2(gradients[held_out], predicted)
    return scores


# ---------------------------------------------------------------- report


def plot(rows: list[dict], steps: list[int], break_even: dict[str, float], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(16, 5), layout="tight")
    panels = figure.subplots(1, len(SIGNALS), sharey=True)
    for axes, signal_name in zip(panels, SIGNALS):
        for index, source in enumerate(DATA_SOURCES):
            key = f"{signal_name}/{source}"
            if key in rows[0]:
                axes.plot(steps, [row[key] for row in rows], marker="o", color=f"C{index}", label=source)
        for (label, level), style in zip(break_even.items(), ("--", "-.", ":")):
            axes.axhline(level, color="black", ls=style, lw=0.8, label=label)
        axes.set(title=signal_name, xlabel="optimizer step", ylim=(0, 1))
        axes.grid(alpha=0.3)
    panels[0].set_ylabel("held-out per-example rho^2")
    panels[0].legend(fontsize=7)
    figure.suptitle(title)
    figure.savefig(path, dpi=120)


def main(argv=None) -> None:
    args = parse_args(argv)
    data = common.load_data(args)
    set_seed(args.seed)
    model, _ = common.build_model(data.labels, args.checkpoint)
    spec = common.parse_run("trainer", args.batch_size)
    training_args = common.training_arguments(
        spec, str(args.output_dir / "trainer_output"), args.seed, max_steps=max(max(args.snapshots), 1),
        learning_rate=args.learning_rate,
    )
    snapshots = Snapshots(data.train, args)
    regime = f"from {args.checkpoint} (new classifier)" if args.checkpoint else "from scratch"
    title = (f"ViT on CIFAR-10 {regime}, Trainer at lr {args.learning_rate:g}: held-out per-example rho^2 of ridge fits "
             f"on {args.examples - args.held_out} examples in control batches of {args.control_batch}")
    print(f"{title}; data {data.source}; {common.device_description()}", flush=True)
    common.make_trainer(spec, model, training_args, data.train, callbacks=[snapshots]).train()

    c = args.cost_ratio
    break_even = {
        f"break-even f=0.25 ({theory.break_even_rho2(0.25, c):.2f})": theory.break_even_rho2(0.25, c),
        f"break-even f=0.5 ({theory.break_even_rho2(0.5, c):.2f})": theory.break_even_rho2(0.5, c),
        f"c: auto lowers f above ({c:.2f})": c,
    }
    rows = [score_snapshot(record, args) for record in snapshots.records]
    steps = [record["step"] for record in snapshots.records]
    table = [{"predictor/data": key, **{f"step {step}": row[key] for step, row in zip(steps, rows)}} for key in rows[0]]
    print(f"\n{title}\nbreak-even rho^2 (c = {c:g}): " + ", ".join(f"{k}" for k in break_even))
    print(common.format_table(table, ["predictor/data", *(f"step {step}" for step in steps)]))
    common.write_json(args.output_dir / "ceiling.json", {"settings": vars(args), "title": title, "break_even": break_even, "table": table})
    plot(rows, steps, break_even, args.output_dir / "ceiling.png", title)
    print(f"Wrote {args.output_dir / 'ceiling.json'} and {args.output_dir / 'ceiling.png'}")


if __name__ == "__main__":
    main()
