#!/usr/bin/env python
"""How much variance importance sampling at the head/trunk boundary adds, from exact per-example gradients.

`lgp_hf.sampling` computes the trunk gradient of a batch from a Poisson sample of its examples: example i is drawn
with probability pi_i (sum pi = f n) and weighted 1 / pi_i. The update's variance relative to the full batch is

    F = 1 + sum_i (1 - pi_i) / pi_i ||g_i||^2 / sum_i ||g_i||^2          (`lgp_hf.sampling.variance_factor`)

with g_i example i's exact trunk gradient. Uniform sampling gives F = 1 / f; the library's scores
s_i = ||dL/dh_i|| (the gradient at the head's input h) should do better. This script measures F directly: no
trainer and no estimator, only plain torch.

What it does. The example's ViT (`examples/run_vit.py`, default sizes: 32x32, patch 4, hidden 192, 6 layers,
3 heads, MLP 768, 2.7 M parameters) is trained with plain torch (AdamW, lr 1e-3, weight decay 0.05, constant lr,
the example's training transform, `--batch_size` 128, `--seed` 0). At each regime it takes fresh random batches of
training images (the training transform; not the batches just trained on) and computes, with the model in train
mode (dropout is 0 in this config) and the loss as the model's mean cross-entropy over the batch:
  * every example's exact trunk gradient g_i, with torch.func (vmap of grad of functional_call, one example per
    call, eager attention since sdpa has no vmap rule); the sum of the g_i is checked against the batch's own
    backward (`sum_check`, the relative error);
  * the scores s_i = ||dL/dh_i|| at two boundaries, from one batch backward:
      (a) `classifier_input`: the pooled CLS token after the final layernorm; head = classifier; trunk = all the rest;
      (b) `block_output`: the last block's output before the final layernorm (all tokens); head = vit.layernorm +
          classifier; trunk = all the rest (g_i then excludes vit.layernorm as well).
For f in 0.125, 0.25, 0.5 it reports F for uniform sampling (1 / f, computed from the formula as a check),
importance sampling at `uniform_mix` 0, 0.1, 0.3 (`lgp_hf.sampling.inclusion_probabilities`), and the oracle
pi ~ ||g_i||; the Pearson correlation of s_i with ||g_i||; the batch's accuracy; rho = (mean ||g||)^2 / mean(||g||^2)
(1 when every example's gradient has the same norm, and then no importance sampling can beat uniform). Every
number is averaged over `--batches` batches. F_centred (boundary a, mix 0.1) is the same formula with g_i - mean(g)
everywhere: what F approaches when the batch's mean gradient is taken out (a fixed-size design, or a control
variate that predicts the mean exactly); F - F_centred is the part of the variance due to the mean.

Gradient noise scale B_noise = tr(Sigma) / |G|^2 (McCandlish et al. 2018; `lgp_hf.noise_scale`), from the same
exact per-example gradients: over the trunk blocks' linear layers (the parameters whose gradients the trainer reads
for its in-run estimate, `lgp_hf.row_norms`) and over the whole model (the trunk of boundary a plus the classifier,
whose per-example gradient is e_i [h_i, 1] / n). `pooled`: the unbiased estimates from all the regime's measured
batches as one sample of (batches + 1) x batch_size examples; `per_batch`: each batch's estimates (as the trainer
makes them), averaged over the batches, then divided. `benchmarks/noise_scale.py` runs the trainer on the same
weights (this script caches them) and data, for its in-run estimate.

Control variate (decides whether the library keeps a predictor on top of importance sampling), boundary (a): a
ridge regression from a per-example signal to g_i, fitted on the PREVIOUS batch's exact per-example gradients
(n examples, lambda = the mean diagonal of the signals' Gram matrix, solved in the dual form since g_i has 2.7 M
coordinates: p(s) = G_prev^T (S_prev S_prev^T + lambda I)^{-1} S_prev s), scaled by beta = <g, p> / <p, p> fitted
on the previous batch too (in sample); on the current batch, with the same pi,

    F_cv = 1 + sum_i (1 - pi_i) / pi_i ||g_i - beta p_i||^2 / sum_i ||g_i||^2.

Signals: `logit_error` e_i = softmax(z_i) - onehot(y_i) (10 dims); `logit_error+head_grad` [e_i, dL/dh_i] (each
block scaled to unit mean square on the previous batch; at boundary a, dL/dh_i = W^T e_i / n is a linear function
of e_i, so this can differ from `logit_error` only through the ridge penalty); `head_weight_grad` e_i (x) [h_i, 1]
(the classifier's per-example weight gradient, the `window` predictor's signal); `constant` (1: p is about the
previous batch's mean gradient). Also reported: `F_cv*`, with the beta that is best on the current batch (an upper
bound on what the scale could give), and `explained`, 1 - sum ||g_i - beta p_i||^2 / sum ||g_i||^2 on the current
batch. All the batches of a regime are taken at the same weights, so the previous batch here is a better fit than
last step's batch would be in training: F_cv is optimistic.

Regimes (`--regimes`, default all): `scratch_<k>`, from scratch after k steps (`--scratch_steps`, default 0,
pretrain_steps / 3 and pretrain_steps: 0, 100, 300); `finetune_<k>`: the 10-class model after `--pretrain_steps`
(300) with a NEW 2-way classifier, fine-tuned on vehicles (labels 0, 1, 8, 9 -> 1) against animals (-> 0) at lr
3e-4 for k steps (`--finetune_steps`, default 100 300). The from-scratch weights at every measured step (the 10-class
pretrained state included) are cached in `--output_dir`/cache, so reruns skip the from-scratch training; the
fine-tuned weights at every measured step too (for `noise_scale.py`).

    python benchmarks/sampling_variance.py      # full CIFAR-10: 38 minutes on 2 busy CPU cores, 10 GB peak RSS
    python benchmarks/sampling_variance.py --subset --batches 1 --pretrain_steps 5 --finetune_steps 5 10 \\
        --batch_size 16 --output_dir /tmp/sampling_variance     # smoke test, about a minute

Writes `--output_dir`/sampling_variance.json (every batch's numbers and the averages) and prints a Markdown table
per regime.

How to read it. A step that computes the trunk backward for a fraction f of the batch costs about c + f of a plain
step (c ~ 0.3 on this CPU: the forward and the head's backward that every example needs), and its update has F
times the variance of a plain step's. At equal compute it beats plain training when F x (c + f) < 1 (the column
`F x (c+f)`, at `--cost_ratio`). Uniform sampling gives (c + f) / f > 1 always; importance sampling pays only where
the scores concentrate the gradient (F well below 1 / f), which needs rho well below 1 and a high correlation of
s_i with ||g_i||; the oracle column is the best any score could do. The control variate pays where F_cv is
materially below F_is (its cost comes on top: one more forward-like pass of the predictor).

Measured (defaults, seed 0, full CIFAR-10; results/sampling_variance/run.log): from scratch F x (c + f) stays above
1 at every f, even for the oracle (rho 0.65-0.67 after 100-300 steps, 0.99 at step 0); fine-tuning (rho 0.41-0.42,
corr 0.90-0.94) pays at f = 0.5 (F 1.09-1.10 at mix 0.1, F x (c+f) 0.87-0.88) and is at break-even at f = 0.25
(1.04-1.06). Mix 0 is always lowest, 0.1 costs 2-3 %, 0.3 about 10 %. The boundaries agree except early from
scratch (step 100: block_output F 3.44 against 3.82 at f = 0.25). The logit-error control variate lowers F by
12-16 % at f = 0.25 and by 2-10 % at f = 0.5 once trained (34 % and 22 % at step 0).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from transformers import set_seed

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "examples"))
import run_vit  # noqa: E402  (examples/ is not a package)

from lgp_hf import PredictedGradientArguments, PredictedGradientTrainer  # noqa: E402
from lgp_hf.noise_scale import noise_scale, noise_scale_estimates  # noqa: E402
from lgp_hf.replay import find_blocks  # noqa: E402
from lgp_hf.row_norms import RowGradientNorms  # noqa: E402
from lgp_hf.sampling import inclusion_probabilities, sampling_variance, variance_factor  # noqa: E402

DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "cifar10"
FRACTIONS = (0.125, 0.25, 0.5)
MIXES = (0.0, 0.1, 0.3)
CV_FRACTIONS = (0.25, 0.5)
CV_MIX = 0.1
CENTRED_MIX, CENTRED_FRACTION = 0.1, 0.5
VEHICLES = (0, 1, 8, 9)  # airplane, automobile, ship, truck
BOUNDARIES = ("classifier_input", "block_output")  # (a), (b)
SIGNALS = ("logit_error", "logit_error+head_grad", "head_weight_grad", "constant")
LAYERNORM_PREFIX = "vit.layernorm."
HEAD_PREFIX = "classifier."


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--output_dir", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "sampling_variance")
    parser.add_argument("--batches", type=int, default=3, help="Fresh batches averaged over per regime.")
    parser.add_argument("--batch_size", type=int, default=128, help="Examples per batch (training and measured).")
    parser.add_argument("--pretrain_steps", type=int, default=300, help="From-scratch steps before fine-tuning.")
    parser.add_argument(
        "--scratch_steps", type=int, nargs="+", default=None,
        help="From-scratch regimes: measured after these steps (default: 0, pretrain_steps // 3, pretrain_steps).",
    )
    parser.add_argument("--finetune_steps", type=int, nargs="+", default=[100, 300], help="Fine-tuning regimes.")
    parser.add_argument(
        "--regimes", nargs="+", default=None,
        help="Which regimes: names such as scratch_100 or finetune_300, or the groups scratch / finetune "
        "(default: all).",
    )
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="From scratch.")
    parser.add_argument("--finetune_learning_rate", type=float, default=3e-4)
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--cost_ratio", type=float, default=0.3, help="c in F x (c + f).")
    parser.add_argument("--vmap_chunk", type=int, default=32, help="Examples per vmap call (memory).")
    parser.add_argument("--subset", action="store_true", help="Use examples/data/cifar10_subset (5,000 train images).")
    parser.add_argument(
        "--data_dir", type=Path, default=DEFAULT_DATA_DIR, help="Holds train.parquet and test.parquet (full CIFAR-10)."
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.scratch_steps is None:
        args.scratch_steps = sorted({0, args.pretrain_steps // 3, args.pretrain_steps})
    regimes = [f"scratch_{k}" for k in sorted(set(args.scratch_steps))]
    regimes += [f"finetune_{k}" for k in sorted(set(args.finetune_steps))]
    if args.regimes is None:
        args.selected = regimes
    else:
        unknown = [r for r in args.regimes if r not in regimes and r not in ("scratch", "finetune")]
        if unknown:
            parser.error(f"--regimes {unknown}: choose from {regimes} or the groups scratch, finetune.")
        args.selected = [r for r in regimes if r in args.regimes or r.split("_")[0] in args.regimes]
    return args


# ---------------------------------------------------------------- data and model


def cache_file(args: argparse.Namespace, regime: str) -> Path:
    """Where the weights measured at `regime` (scratch_<k>, finetune_<k>) are cached, under `--output_dir`/cache."""
    tag = f"{'subset' if args.subset else 'full'}_seed{args.seed}_b{args.batch_size}_lr{args.learning_rate:g}"
    kind, step = regime.split("_")
    if kind == "finetune":
        tag += f"_pre{args.pretrain_steps}_lr{args.finetune_learning_rate:g}"
    return args.output_dir / "cache" / f"{kind}_{tag}_step{step}.pt"


def cached_regime_model(args: argparse.Namespace, regime: str, label_names):
    """(model, fine-tuning?): the example's ViT with the weights this script cached at `regime` (`cache_file`), with
    the binary head of the fine-tuning regimes."""
    set_seed(args.seed)
    model, _ = run_vit.build_model(run_vit.ModelArguments(), label_names)
    finetune = regime.startswith("finetune_")
    if finetune:
        new_head(model, 2)
    model.load_state_dict(torch.load(cache_file(args, regime)))
    return model, finetune


def load_train_split(args: argparse.Namespace):
    """The training split with the example's training transform (random crop with padding 4, flip)."""
    if args.subset:
        data_args = run_vit.DataTrainingArguments()
    else:
        paths = [args.data_dir / name for name in ("train.parquet", "test.parquet")]
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"{missing} not found: pass --data_dir or --subset.")
        # the test split as validation, so that no training image is held out
        data_args = run_vit.DataTrainingArguments(train_file=str(paths[0]), validation_file=str(paths[1]))
    dataset, source, column = run_vit.load_image_dataset(data_args, seed=0)
    train = dataset["train"]
    size = (run_vit.ModelArguments.image_size,) * 2
    train.set_transform(
        run_vit.make_transform(column, size, run_vit.CIFAR10_MEAN, run_vit.CIFAR10_STD, train=True, padding=4)
    )
    return train, train.features[run_vit.LABEL_COLUMN].names, source


def binary_labels(labels: torch.Tensor) -> torch.Tensor:
    """Vehicles (airplane, automobile, ship, truck) -> 1, animals -> 0."""
    return torch.isin(labels, torch.tensor(VEHICLES)).long()


def batches_forever(dataset, batch_size: int, seed: int):
    """Shuffled training batches, epoch after epoch (drop_last), in the main process."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(dataset), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield run_vit.collate_fn([dataset[int(i)] for i in order[start : start + batch_size]])


def observed_trainer(model, dataset, label_map, offline_args, output_dir: str, max_steps: int, learning_rate: float, **settings):
    """A PredictedGradientTrainer on a copy of `model` and a regime's data (labels through `label_map`), every step
    observed, at the regime's batch, weight decay and seed, no unbiasedness check: the in-run counterpart of this
    script's offline measurements (`noise_scale.py`, `predictor_variance.py`); `settings`: further arguments."""

    def collate(rows):
        batch = run_vit.collate_fn(rows)
        return batch if label_map is None else {**batch, "labels": label_map(batch["labels"])}

    training = PredictedGradientArguments(
        output_dir=output_dir, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True,
        remove_unused_columns=False, per_device_train_batch_size=offline_args.batch_size, max_steps=max_steps,
        learning_rate=learning_rate, lr_scheduler_type="constant", weight_decay=offline_args.weight_decay,
        seed=offline_args.seed, auto_observation_period=1, auto_observation_budget=1e9, unbiasedness_check=False, **settings,
    )
    return PredictedGradientTrainer(model=copy.deepcopy(model), args=training, train_dataset=dataset, data_collator=collate)


def new_head(model, num_labels: int) -> None:
    """A new classifier with ViT's own initialisation of a linear layer."""
    head = torch.nn.Linear(model.config.hidden_size, num_labels)
    torch.nn.init.trunc_normal_(head.weight, std=model.config.initializer_range)
    torch.nn.init.zeros_(head.bias)
    model.classifier = head
    model.config.num_labels = num_labels


def train_steps(model, batches, steps: int, learning_rate: float, weight_decay: float, label_map=None, on_step=None):
    """`steps` AdamW steps (constant lr) of the mean cross-entropy; `on_step(step)` after each one."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    model.train()
    start = time.time()
    for step in range(1, steps + 1):
        batch = next(batches)
        labels = batch["labels"] if label_map is None else label_map(batch["labels"])
        loss = F.cross_entropy(model(pixel_values=batch["pixel_values"]).logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or step == steps:
            print(f"    step {step}/{steps}: loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
        if on_step is not None:
            on_step(step)


# ---------------------------------------------------------------- per-example measurements


def measure_batch(model, batch: dict, vmap_chunk: int) -> dict:
    """Everything one batch gives: per-example trunk gradients (boundary a's trunk, as one n x P float32 matrix
    whose last columns are vit.layernorm's, so boundary b's trunk is a column slice), scores at both boundaries,
    logit errors, head inputs, accuracy, and the check of sum_i g_i against the batch's own backward."""
    pixels, labels = batch["pixel_values"], batch["labels"]
    n = len(labels)
    model.train()
    named = dict(model.named_parameters())
    trunk_names = [k for k in named if not k.startswith(HEAD_PREFIX) and not k.startswith(LAYERNORM_PREFIX)]
    trunk_names += [k for k in named if k.startswith(LAYERNORM_PREFIX)]  # last: boundary b's trunk drops them
    size_b = sum(named[k].numel() for k in trunk_names if not k.startswith(LAYERNORM_PREFIX))

    # One batch forward and backward (the model's sdpa attention): scores, signals, and sum_i g_i for the check.
    captured = {}
    hooks = [
        model.classifier.register_forward_hook(lambda m, inputs, out: captured.update(a=inputs[0])),
        model.vit.layernorm.register_forward_pre_hook(lambda m, inputs: captured.update(b=inputs[0])),
    ]
    try:
        logits = model(pixel_values=pixels).logits
    finally:
        for hook in hooks:
            hook.remove()
    loss = F.cross_entropy(logits, labels)
    trunk_params = [named[k] for k in trunk_names]
    dh_a, dh_b, *batch_grads = torch.autograd.grad(loss, [captured["a"], captured["b"], *trunk_params])
    batch_grad = torch.cat([g.reshape(-1) for g in batch_grads])
    logits = logits.detach()
    error = torch.softmax(logits.double(), -1) - F.one_hot(labels, logits.shape[-1]).double()

    # Per-example trunk gradients of loss_i / n (eager attention: sdpa has no vmap batching rule).
    params = {k: named[k].detach() for k in trunk_names}
    head = {k: v.detach() for k, v in named.items() if k.startswith(HEAD_PREFIX)}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def example_loss(trunk, x, y):
        out = functional_call(model, ({**trunk, **head}, buffers), (), {"pixel_values": x[None]})
        return F.cross_entropy(out.logits, y[None]) / n

    per_example_grad = vmap(grad(example_loss), in_dims=(None, 0, 0))
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    gradients = torch.empty(n, batch_grad.numel())
    try:
        with torch.no_grad():
            for start in range(0, n, vmap_chunk):
                chunk = per_example_grad(params, pixels[start : start + vmap_chunk], labels[start : start + vmap_chunk])
                gradients[start : start + vmap_chunk] = torch.cat(
                    [chunk[k].reshape(chunk[k].shape[0], -1) for k in trunk_names], 1
                )
                del chunk
    finally:
        model.set_attn_implementation(implementation)
    total = gradients.sum(0, dtype=torch.float64)
    sum_check = float((total - batch_grad.double()).norm() / batch_grad.double().norm())
    return {
        "G": gradients,
        "noise_sums": noise_sums(model, trunk_names, gradients, total, error, captured["a"].detach().double(), n),
        "size_b": size_b,
        "scores": {
            "classifier_input": dh_a.detach().double().norm(dim=-1),
            "block_output": dh_b.detach().double().flatten(1).norm(dim=-1),
        },
        "head_grad": dh_a.detach().double(),
        "head_input": captured["a"].detach().double(),
        "error": error,
        "accuracy": float((logits.argmax(-1) == labels).double().mean()),
        "sum_check": sum_check,
    }


def noise_sums(model, trunk_names, gradients, total, error, head_input, n) -> dict:
    """Per parameter set ("trunk_linear": the trunk blocks' linear layers, "model": everything), S = sum_i ||g_i||^2
    and the summed gradient sum_i g_i (float64), g_i the exact per-example gradients of loss_i / n. The classifier's
    are e_i [h_i, 1] / n (e_i = softmax - onehot: the cross-entropy's logit gradient)."""
    linear = {id(p) for layer in RowGradientNorms(find_blocks(model, [model.classifier])).layers for p in layer.parameters()}
    named = dict(model.named_parameters())
    squares, sums, start = 0.0, [], 0
    for name in trunk_names:
        end = start + named[name].numel()
        if id(named[name]) in linear:
            squares += float(gradients[:, start:end].double().pow(2).sum())
            sums.append(total[start:end])
        start = end
    head_rows = torch.cat([head_input, torch.ones(n, 1, dtype=torch.float64)], 1)
    head_squares = float((error.pow(2).sum(1) * head_rows.pow(2).sum(1)).sum()) / n**2
    head_sum = (error.T @ head_rows).reshape(-1) / n
    return {
        "trunk_linear": (squares, torch.cat(sums)),
        "model": (float(gradients.double().pow(2).sum()) + head_squares, torch.cat([total, head_sum])),
    }


def noise_scale_numbers(batches: list[dict], n: int) -> dict:
    """B_noise per parameter set from `noise_sums` of equally sized batches: pooled (one sample of all the rows:
    contributions g_i / K over K batches) and per batch (estimates averaged over batches, then divided)."""
    out = {}
    for key in batches[0]:
        k = len(batches)
        squares = sum(b[key][0] for b in batches) / k**2
        summed = sum(b[key][1] for b in batches) / k
        pooled = noise_scale_estimates(squares, float(summed.pow(2).sum()), k * n)
        each = [noise_scale_estimates(b[key][0], float(b[key][1].pow(2).sum()), n) for b in batches]
        trace, squared_mean = (sum(e[i] for e in each) / k for i in (0, 1))
        out[key] = {
            "pooled": noise_scale(*pooled), "pooled_trace": pooled[0], "pooled_squared_mean": pooled[1],
            "per_batch": noise_scale(trace, squared_mean), "batches": [noise_scale(*e) for e in each],
        }
    return out


def gram(left: torch.Tensor, right: torch.Tensor, block: int = 1 << 18) -> torch.Tensor:
    """left @ right.T in float64, a block of columns at a time."""
    out = torch.zeros(left.shape[0], right.shape[0], dtype=torch.float64)
    for start in range(0, left.shape[1], block):
        out += left[:, start : start + block].double() @ right[:, start : start + block].double().T
    return out


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator > 0 else float("nan")


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    return pearson(x.argsort().argsort().double(), y.argsort().argsort().double())


def sampling_numbers(scores: torch.Tensor, squared_norms: torch.Tensor) -> dict:
    """F for uniform, importance (each mix) and oracle sampling at each f; correlation; rho."""
    norms = squared_norms.clamp(min=0).sqrt()
    result = {
        "corr_score_norm": pearson(scores, norms),
        "spearman_score_norm": spearman(scores, norms),
        "rho": float(norms.mean() ** 2 / squared_norms.mean()),
        "F": {},
    }
    for f in FRACTIONS:
        row = {"uniform": variance_factor(torch.full_like(squared_norms, f), squared_norms)}
        for mix in MIXES:
            row[f"is_mix{mix}"] = variance_factor(inclusion_probabilities(scores, f, mix), squared_norms)
        row["oracle"] = variance_factor(inclusion_probabilities(norms, f, 0.0), squared_norms)
        result["F"][str(f)] = row
    return result


def signals(measured: dict, scale: dict | None = None) -> tuple[dict, dict]:
    """The control variate's per-example signals (n x d each), and the block scales (from the previous batch)."""
    error, head_grad, head_input = measured["error"], measured["head_grad"], measured["head_input"]
    if scale is None:
        scale = {
            "error": float(error.pow(2).sum(1).mean().sqrt()) or 1.0,
            "head_grad": float(head_grad.pow(2).sum(1).mean().sqrt()) or 1.0,
        }
    ones = torch.ones(len(error), 1, dtype=torch.float64)
    return {
        "logit_error": error,
        "logit_error+head_grad": torch.cat([error / scale["error"], head_grad / scale["head_grad"]], 1),
        "head_weight_grad": (error[:, :, None] * torch.cat([head_input, ones], 1)[:, None, :]).flatten(1),
        "constant": ones,
    }, scale


def control_variate(previous: dict, current: dict, cross: torch.Tensor, probabilities: dict) -> dict:
    """F_is and F_cv (boundary a) for each signal and f, the predictor fitted on `previous` (dual-form ridge).

    `cross` = G_cur G_prev^T; previous["gram"] = G_prev G_prev^T; current["gram"] = G_cur G_cur^T."""
    squared = current["gram"].diagonal()
    previous_signals, scale = signals(previous)
    current_signals, _ = signals(current, scale)
    out = {}
    for name in SIGNALS:
        s_prev, s_cur = previous_signals[name], current_signals[name]
        kernel = s_prev @ s_prev.T
        lam = float(kernel.diagonal().mean())
        eye = torch.eye(len(kernel), dtype=torch.float64)
        solve = torch.linalg.solve(kernel + lam * eye, eye)  # M = (K + lambda I)^{-1}
        # beta on the previous batch, in sample: p_prev = A_pp^T G_prev with A_pp = M K
        a_pp = solve @ kernel
        g_prev = previous["gram"]
        beta_num = float(torch.trace(g_prev @ a_pp))
        beta_den = float(torch.trace(a_pp.T @ g_prev @ a_pp))
        beta = beta_num / beta_den if beta_den > 0 else 0.0
        # predictions for the current batch: p_cur = A^T G_prev with A = M S_prev S_cur^T
        a = solve @ (s_prev @ s_cur.T)
        inner = (cross * a.T).sum(1)  # <g_i, p_i>
        pred_sq = (a.T @ g_prev @ a).diagonal()  # ||p_i||^2
        residual = (squared - 2 * beta * inner + beta**2 * pred_sq).clamp(min=0)
        row = {"beta": beta, "lambda": lam, "explained": 1 - float(residual.sum() / squared.sum())}
        for f in CV_FRACTIONS:
            pi = probabilities[str(f)]
            odds = torch.where(pi > 0, (1 - pi) / pi, torch.zeros_like(pi))
            best = float((odds * inner).sum() / (odds * pred_sq).sum()) if float((odds * pred_sq).sum()) > 0 else 0.0
            best_residual = (squared - 2 * best * inner + best**2 * pred_sq).clamp(min=0)
            row[str(f)] = {
                "F_is": variance_factor(pi, squared),
                "F_cv": 1 + float(sampling_variance(pi, residual)) / float(squared.sum()),
                "F_cv_best_beta": 1 + float(sampling_variance(pi, best_residual)) / float(squared.sum()),
                "best_beta": best,
            }
        out[name] = row
    return out


def centred_factors(gram_matrix: torch.Tensor, scores: torch.Tensor) -> dict:
    """F with g_i - mean(g) in place of g_i (numerator and denominator), boundary a, each f and mix."""
    squared = gram_matrix.diagonal()
    centred = (squared - 2 * gram_matrix.mean(1) + gram_matrix.mean()).clamp(min=0)
    out = {"mean_share": 1 - float(centred.sum() / squared.sum())}  # ||sum g||^2 / (n sum ||g_i||^2)
    for f in FRACTIONS:
        for mix in MIXES:
            pi = inclusion_probabilities(scores, f, mix)
            out[f"{f}_mix{mix}"] = {"F": variance_factor(pi, squared), "F_centred": variance_factor(pi, centred)}
    return out


def measure_regime(model, dataset, args, name: str, label_map=None) -> dict:
    """`--batches` fresh batches (plus one before them, for the first control-variate fit) at fixed weights. The
    batches and their augmentations depend only on the seed and the regime's name (the same in every rerun)."""
    kind, step = name.split("_")
    regime_seed = 1_000_003 * (args.seed + 1) + (2 if kind == "finetune" else 1) * 100_000 + int(step)
    torch.manual_seed(regime_seed)  # the training transform's random crops and flips
    generator = torch.Generator().manual_seed(regime_seed)
    order = torch.randperm(len(dataset), generator=generator)
    previous, records, noise = None, [], []
    for b in range(args.batches + 1):
        start = time.time()
        batch = run_vit.collate_fn(
            [dataset[int(i)] for i in order[b * args.batch_size : (b + 1) * args.batch_size]]
        )
        if label_map is not None:
            batch["labels"] = label_map(batch["labels"])
        measured = measure_batch(model, batch, args.vmap_chunk)
        noise.append(measured.pop("noise_sums"))
        G = measured.pop("G")
        measured["gram"] = gram(G, G)
        squared_a = measured["gram"].diagonal().clone()
        squared_b = (G[:, : measured["size_b"]].double().pow(2)).sum(1)
        if b > 0:
            record = {
                "accuracy": measured["accuracy"],
                "sum_check": measured["sum_check"],
                "classifier_input": sampling_numbers(measured["scores"]["classifier_input"], squared_a),
                "block_output": sampling_numbers(measured["scores"]["block_output"], squared_b),
                "centred": centred_factors(measured["gram"], measured["scores"]["classifier_input"]),
            }
            scores = measured["scores"]["classifier_input"]
            pis = {str(f): inclusion_probabilities(scores, f, CV_MIX) for f in CV_FRACTIONS}
            record["control_variate"] = control_variate(previous, measured, gram(G, previous["G"]), pis)
            records.append(record)
        measured["G"] = G
        previous = measured
        print(
            f"    batch {b}{' (control-variate fit only)' if b == 0 else ''}: accuracy {measured['accuracy']:.3f}, "
            f"sum check {measured['sum_check']:.1e}, {time.time() - start:.1f} s",
            flush=True,
        )
    return {"batches": records, "mean": average(records), "noise_scale": noise_scale_numbers(noise, args.batch_size)}


def average(records: list[dict]):
    """The element-wise mean of a list of equally nested dicts of numbers."""
    first = records[0]
    if isinstance(first, dict):
        return {k: average([r[k] for r in records]) for k in first}
    return sum(records) / len(records)


# ---------------------------------------------------------------- tables


def fmt(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.2f}"


def print_tables(name: str, result: dict, c: float) -> None:
    mean = result["mean"]
    print(f"\n### {name}: {result['description']}\n")
    print(f"batch accuracy {mean['accuracy']:.3f}; {len(result['batches'])} batches of {result['batch_size']}; "
          f"sum check (relative error of sum_i g_i) {max(r['sum_check'] for r in result['batches']):.1e}\n")
    print(
        "| boundary | f | uniform | IS mix 0 | IS mix 0.1 | IS mix 0.3 | oracle | F x (c+f), mix 0.1 | "
        "F x (c+f), oracle | corr(s, ‖g‖) | spearman | rho |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for boundary in BOUNDARIES:
        numbers = mean[boundary]
        for f in FRACTIONS:
            row = numbers["F"][str(f)]
            cells = [row["uniform"], row["is_mix0.0"], row["is_mix0.1"], row["is_mix0.3"], row["oracle"]]
            print(
                f"| {boundary} | {f} | " + " | ".join(fmt(x) for x in cells)
                + f" | {fmt(row['is_mix0.1'] * (c + f))} | {fmt(row['oracle'] * (c + f))}"
                + f" | {numbers['corr_score_norm']:.3f} | {numbers['spearman_score_norm']:.3f} | {numbers['rho']:.3f} |"
            )
    noise = result["noise_scale"]
    print(
        f"\nGradient noise scale B_noise (examples; pooled over {len(noise['model']['batches'])} batches, and per batch): "
        + "; ".join(f"{key} {fmt(v['pooled'])} ({', '.join(fmt(x) for x in v['batches'])})" for key, v in noise.items())
    )
    centred = mean["centred"]
    key = f"{CENTRED_FRACTION}_mix{CENTRED_MIX}"
    print(
        f"\nF_centred (classifier_input, mix {CENTRED_MIX}, f {CENTRED_FRACTION}): {fmt(centred[key]['F_centred'])} "
        f"against F {fmt(centred[key]['F'])}; the mean's share of sum ||g_i||^2, ||sum g||^2 / (n sum ||g_i||^2): "
        f"{centred['mean_share']:.3f}\n"
    )
    print(f"Control variate (classifier_input, IS mix {CV_MIX}; fit on the previous batch):\n")
    print("| signal | f | F_is | F_cv | F_cv / F_is | F_cv* (best beta) | beta | best beta | explained |")
    print("|---|---|---|---|---|---|---|---|---|")
    for signal in SIGNALS:
        numbers = mean["control_variate"][signal]
        for f in CV_FRACTIONS:
            row = numbers[str(f)]
            print(
                f"| {signal} | {f} | {fmt(row['F_is'])} | {fmt(row['F_cv'])} | {row['F_cv'] / row['F_is']:.3f} | "
                f"{fmt(row['F_cv_best_beta'])} | {numbers['beta']:.3f} | {row['best_beta']:.3f} | "
                f"{numbers['explained']:.3f} |"
            )
    print(flush=True)


# ---------------------------------------------------------------- main


def main(argv=None) -> None:
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = args.output_dir / "cache"
    cache_dir.mkdir(exist_ok=True)
    began = time.time()
    dataset, label_names, source = load_train_split(args)
    print(f"Data: {source}, {len(dataset)} training images; regimes {args.selected}", flush=True)

    def cache_path(step: int) -> Path:
        return cache_file(args, f"scratch_{step}")

    def build():
        set_seed(args.seed)
        model, _ = run_vit.build_model(run_vit.ModelArguments(), label_names)
        return model

    output = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": source,
        "fractions": FRACTIONS,
        "mixes": MIXES,
        "regimes": {},
    }
    json_path = args.output_dir / "sampling_variance.json"

    def record(name: str, model, description: str, label_map=None) -> None:
        print(f"  measuring {name}", flush=True)
        start = time.time()
        rng = torch.get_rng_state()  # the measurement's augmentations must not change the training that follows
        result = measure_regime(model, dataset, args, name, label_map)
        torch.set_rng_state(rng)
        result.update(description=description, batch_size=args.batch_size, seconds=time.time() - start)
        output["regimes"][name] = result
        output["wall_seconds"] = time.time() - began
        json_path.write_text(json.dumps(output, indent=1))
        print_tables(name, result, args.cost_ratio)

    # From scratch (10 classes), and the pretrained state for fine-tuning.
    scratch = [int(r.split("_")[1]) for r in args.selected if r.startswith("scratch_")]
    need_finetune = any(r.startswith("finetune_") for r in args.selected)
    checkpoints = sorted(set(scratch) | ({args.pretrain_steps} if need_finetune else set()))
    model = build()
    if checkpoints and all(cache_path(k).is_file() for k in checkpoints):
        print(f"From-scratch weights cached in {cache_dir}", flush=True)
        for k in checkpoints:
            if k in scratch:
                model.load_state_dict(torch.load(cache_path(k)))
                record(f"scratch_{k}", model, f"from scratch after {k} steps, 10 classes")
    elif checkpoints:
        print(f"Training from scratch for {max(checkpoints)} steps", flush=True)

        def at_step(step: int) -> None:
            if step in checkpoints:
                torch.save(model.state_dict(), cache_path(step))
            if step in scratch:
                record(f"scratch_{step}", model, f"from scratch after {step} steps, 10 classes")
                model.train()

        at_step(0)
        train_steps(
            model, batches_forever(dataset, args.batch_size, args.seed), max(checkpoints),
            args.learning_rate, args.weight_decay, on_step=at_step,
        )

    # Fine-tuning: vehicles against animals, a new 2-way head on the pretrained trunk.
    if need_finetune:
        model = build()
        model.load_state_dict(torch.load(cache_path(args.pretrain_steps)))
        set_seed(args.seed + 1)
        new_head(model, 2)
        finetune = sorted(int(r.split("_")[1]) for r in args.selected if r.startswith("finetune_"))
        print(f"Fine-tuning (vehicles vs animals) for {max(finetune)} steps", flush=True)

        def at_finetune_step(step: int) -> None:
            if step in finetune:
                torch.save(model.state_dict(), cache_file(args, f"finetune_{step}"))
                record(
                    f"finetune_{step}", model,
                    f"pretrained {args.pretrain_steps} steps (10 classes), new 2-way head, fine-tuned {step} steps "
                    "on vehicles vs animals",
                    label_map=binary_labels,
                )
                model.train()

        at_finetune_step(0)
        train_steps(
            model, batches_forever(dataset, args.batch_size, args.seed + 1), max(finetune),
            args.finetune_learning_rate, args.weight_decay, label_map=binary_labels, on_step=at_finetune_step,
        )

    output["wall_seconds"] = time.time() - began
    json_path.write_text(json.dumps(output, indent=1))
    print(f"Wrote {json_path} ({output['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
