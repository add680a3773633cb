#!/usr/bin/env python
"""How much variance sampling rows, token rows or both adds when fine-tuning the LM of lm_finetune.py.

Rows (what the library draws): example i is drawn with probability pi_i (sum pi = f n) by the norm of its gradient
at the head's input (lm_head's input, all positions), mixed with uniform 0.1, and weighted 1 / pi_i. As in
`sampling_variance.py`, with g_i example i's exact trunk gradient (everything below lm_head: blocks, final
layernorm, position embeddings, and the token embeddings' input use, which GPT-2 ties to lm_head),

    F_rows = 1 + sum_i (1 - pi_i) / pi_i ||g_i||^2 / sum_i ||g_i||^2,

for uniform draws (1 / f), importance sampling at `sampling_uniform_mix` 0.1 (the library's) and the oracle
pi ~ ||g_i||, at f = 0.25 and 0.5.

Tokens (not built yet): in the backward of each trunk linear layer y = x W^T (Conv1D in GPT-2, LoRA's A and B), the
weight gradient dW = sum_t dy_t x_t^T over the call's token rows t (batch x positions) could be estimated from a
Poisson draw of the token rows with a nonzero dy_t: pi_t proportional to ||dy_t|| ||x_t|| (the norm of the token's
term, so the best such draw) mixed with uniform 0.1, sum pi_t = keep x (their count), each drawn term weighted
1 / pi_t; dx stays exact. Independent draws per layer call add their variances:

    F_tokens = 1 + sum_layers sum_t (1 - pi_t) / pi_t ||dy_t||^2 ||x_t||^2 / sum_i ||g_i||^2

(the same denominator as F_rows; uniform draws of the nonzero token rows for comparison). Both: rows drawn at f,
then within the drawn rows tokens at keep on the weighted dy (w_i dy_t): F_both = 1 + (the rows' variance + the
mean over `--row_draws` row draws of the tokens' variance given the rows) / sum_i ||g_i||^2 (the total variance).
Also per layer: the share of token rows whose dy is exactly zero (padding everywhere; the prompt in the top
block's MLP and attention output; LoRA's A while B is zero), which the library's replay already skips exactly.

Measured on `--batches` (16) fresh batches of `--batch_size` (16) training pairs of lm_finetune.py (the same
text, pairs, model and pre-trained checkpoint: its options pick them, and its pre-training runs when no checkpoint
is cached) at each of `--finetune_steps` (0 100) of plain AdamW fine-tuning (lr `--learning_rate`, weight decay 0.05,
constant, batches of `--batch_size`), model in train mode (dropout off in the default config). g_i: a backward of
example i alone (unpadded), of its summed token losses over the batch's label count, as its share of the batch's
mean loss; dy_t and x_t from the batch's own backward (hooks); `sum_check`: the relative error of sum_i g_i against
the batch's gradient.

    python benchmarks/lm_sampling_variance.py          # full fine-tuning
    python benchmarks/lm_sampling_variance.py --lora   # LoRA (the trainable weights: lora_A, lora_B)
    python benchmarks/lm_sampling_variance.py --pretrain_steps 20 --batches 2 --finetune_steps 0 2 --row_draws 4 \\
        --output_dir /tmp/smoke/lm_finetune            # smoke test

Writes `--output_dir`/lm_sampling_variance{,_lora}.json and prints the tables.
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F
from transformers import set_seed

import lm_finetune
from lgp_hf.replay import find_blocks
from lgp_hf.row_norms import trunk_linear_layers
from lgp_hf.sampling import inclusion_probabilities, poisson_draw, sampling_variance
from sampling_variance import average, sampling_numbers

FRACTIONS = (0.25, 0.5)
KEEPS = (0.25, 0.5)
MIX = 0.1  # the library's sampling_uniform_mix, for rows and tokens alike


def build_parser():
    parser = lm_finetune.build_parser()
    parser.description = __doc__.split("\n\n")[0]
    group = parser.add_argument_group("measurement")
    group.add_argument("--batches", type=int, default=16, help="Fresh batches of --batch_size pairs per regime.")
    group.add_argument("--finetune_steps", type=int, nargs="+", default=[0, 100], help="Measured after these steps.")
    group.add_argument("--row_draws", type=int, default=32, help="Row draws of the Monte Carlo of F_both.")
    group.add_argument("--seed", type=int, default=0)
    return parser


# ---------------------------------------------------------------- one batch


def trunk_parameters(model, head) -> tuple[list[str], torch.nn.Module | None]:
    """(names of the trainable trunk parameters, the input embedding if it trains): everything below `head` that
    trains. The input embedding's trunk gradient is taken at its output (it is tied to lm_head in GPT-2)."""
    embedding = model.get_input_embeddings()
    excluded = {id(p) for p in head.parameters()} | {id(embedding.weight)}
    names = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in excluded]
    return names, embedding if embedding.weight.requires_grad else None


def per_example_gradients(model, batch: dict, params: list, embedding, label_count: int) -> torch.Tensor:
    """n x P: example i's trunk gradient of its summed token losses / `label_count`, from a backward of the example
    alone (its unpadded tokens)."""
    rows = []
    for i, length in enumerate(batch["attention_mask"].sum(1).tolist()):
        example = {key: value[i : i + 1, :length] for key, value in batch.items()}
        rows.append(trunk_gradient(model, example, params, embedding, label_count)[0])
    return torch.stack(rows)


def trunk_gradient(model, batch: dict, params: list, embedding, label_count: int, head=None):
    """(the trunk gradient of the batch's summed token losses / `label_count` as one float32 vector: `params`, then
    the input embedding's trunk gradient, its output's gradient scattered into its vocabulary rows; with `head`, the
    gradient at the head's input, else None)."""
    ids = batch["input_ids"]
    captured = {}
    hook = None if head is None else head.register_forward_hook(lambda module, args, output: captured.update(h=args[0]))
    try:
        if embedding is None:
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        else:
            inputs = embedding(ids).detach().requires_grad_()
            logits = model(inputs_embeds=inputs, attention_mask=batch["attention_mask"]).logits
    finally:
        if hook is not None:
            hook.remove()
    loss = token_loss_sum(logits, batch["labels"]) / label_count
    wrt = [*params, *(() if embedding is None else (inputs,)), *captured.values()]
    gradients = list(torch.autograd.grad(loss, wrt, allow_unused=True))
    head_gradient = gradients.pop() if head is not None else None
    parts = [torch.zeros_like(p) if g is None else g for p, g in zip(params, gradients)]
    if embedding is not None:
        rows = gradients[len(params)].reshape(-1, inputs.shape[-1])
        parts.append(torch.zeros_like(embedding.weight).index_add_(0, ids.reshape(-1), rows))
    return torch.cat([part.reshape(-1).float() for part in parts]), head_gradient


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The next-token cross-entropy summed over the labelled positions (the model's shift: logits at t, label t+1)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=lm_finetune.IGNORE, reduction="sum"
    )


class TokenNorms:
    """Forward hooks on the trunk's linear layers that keep, per call, ||x_t||^2 and ||dy_t||^2 of every token row
    (batch x positions) and whether dy_t is zero, read in the backward."""

    def __init__(self, model, head):
        self.names = {module: name for name, module in model.named_modules()}
        self.layers = trunk_linear_layers(find_blocks(model, [head]))
        self.calls: list[dict] = []

    def __enter__(self):
        def watch(module, args, output):
            call = {"layer": self.names[module], "x": args[0].detach().float().pow(2).sum(-1)}
            self.calls.append(call)

            def read(dy):
                call["dy"] = dy.detach().float().pow(2).sum(-1)
                call["zero"] = (dy == 0).all(-1)

            output.register_hook(read)

        self.handles = [layer.register_forward_hook(watch) for layer in self.layers]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def measure_batch(model, batch: dict, draws: int, seed: int) -> dict:
    """F of rows, tokens and both, the zero-dy shares and the sum check, on one batch."""
    head = model.get_output_embeddings()
    names, embedding = trunk_parameters(model, head)
    params = [dict(model.named_parameters())[name] for name in names]
    label_count = int((batch["labels"][:, 1:] != lm_finetune.IGNORE).sum())
    with TokenNorms(model, head) as tokens:
        batch_gradient, head_gradient = trunk_gradient(model, batch, params, embedding, label_count, head)
    scores = head_gradient.double().flatten(1).norm(dim=1)
    gradients = per_example_gradients(model, batch, params, embedding, label_count)
    squared = gradients.double().pow(2).sum(1)
    total = float(squared.sum())
    sum_check = float((gradients.double().sum(0) - batch_gradient.double()).norm() / batch_gradient.double().norm())
    mask = batch["attention_mask"].bool()
    calls = [{**call, "term": (call["x"] * call["dy"]).double()} for call in tokens.calls]
    rows = sampling_numbers(scores, squared)
    return {
        "sum_check": sum_check,
        "rows": {
            "corr_score_norm": rows["corr_score_norm"], "rho": rows["rho"],
            **{str(f): {key: rows["F"][str(f)][key] for key in ("uniform", f"is_mix{MIX}", "oracle")} for f in FRACTIONS},
        },
        "tokens": {str(keep): token_factors(calls, keep, total) for keep in KEEPS},
        "both": both_factors(calls, scores, squared, draws, seed),
        "zero_share": {call["layer"]: float(call["zero"].double().mean()) for call in calls},
        "zero_share_real_tokens": {call["layer"]: float(call["zero"][mask].double().mean()) for call in calls},
        "padding_share": 1 - float(mask.double().mean()),
        "prompt_share": float(((batch["labels"] == lm_finetune.IGNORE) & mask).double().sum() / mask.double().sum()),
    }


def token_factors(calls: list[dict], keep: float, total: float) -> dict:
    """F_tokens at `keep` (importance at mix 0.1, and uniform) over the layer calls, tokens with a nonzero dy."""
    variance = {"is": 0.0, "uniform": 0.0}
    for call in calls:
        term = call["term"][~call["zero"]]
        if term.numel():
            variance["is"] += float(sampling_variance(inclusion_probabilities(term.sqrt(), keep, MIX), term))
            variance["uniform"] += float(sampling_variance(torch.full_like(term, keep), term))
    return {key: 1 + value / total for key, value in variance.items()}


def both_factors(calls: list[dict], scores: torch.Tensor, squared: torch.Tensor, draws: int, seed: int) -> dict:
    """F_both for each f and keep: the rows' exact variance plus the Monte Carlo mean of the tokens' variance
    within the drawn rows (dy weighted by 1 / pi_i)."""
    total = float(squared.sum())
    out = {}
    for f in FRACTIONS:
        row_pi = inclusion_probabilities(scores, f, MIX)
        row_variance = float(sampling_variance(row_pi, squared))
        generator = torch.Generator().manual_seed(seed)
        token_variance = {keep: 0.0 for keep in KEEPS}
        for _ in range(draws):
            drawn = poisson_draw(row_pi, generator)
            weights = torch.where(drawn, 1 / row_pi, torch.zeros_like(row_pi))
            for call in calls:
                present = (~call["zero"]) & drawn[:, None]
                term = (call["term"] * weights[:, None] ** 2)[present]
                if term.numel():
                    for keep in KEEPS:
                        token_variance[keep] += float(sampling_variance(inclusion_probabilities(term.sqrt(), keep, MIX), term)) / draws
        out[str(f)] = {"rows_only": 1 + row_variance / total,
                       **{str(keep): 1 + (row_variance + token_variance[keep]) / total for keep in KEEPS}}
    return out
# ---------------------------------------------------------------- regimes


def batches(dataset, batch_size: int, generator: torch.Generator):
    """Shuffled batches of `dataset`'s pairs, epoch after epoch (drop_last), collated."""
    while True:
        order = torch.randperm(len(dataset), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield lm_finetune.collate_pairs([dataset[i] for i in order[start : start + batch_size]])


def measure_regime(model, dataset, args, step: int) -> dict:
    """`--batches` fresh batches (drawn by the seed and the step alone) at fixed weights; their mean."""
    model.train()
    fresh = batches(dataset, args.batch_size, torch.Generator().manual_seed(1_000_003 * (args.seed + 1) + step))
    records = []
    for b in range(args.batches):
        start = time.time()
        records.append(measure_batch(model, next(fresh), args.row_draws, args.seed + b))
        print(f"    batch {b}: sum check {records[-1]['sum_check']:.1e}, {time.time() - start:.1f} s", flush=True)
    return {"batches": records, "mean": average(records)}


def print_tables(step: int, mean: dict, count: int) -> None:
    rows, tokens, both = mean["rows"], mean["tokens"], mean["both"]
    print(f"\n### fine-tuning step {step} ({count} batches; padding {mean['padding_share']:.3f} of the positions, "
          f"prompt {mean['prompt_share']:.3f} of the real tokens; sum check {mean['sum_check']:.1e})\n")
    print(f"Rows (corr(score, ‖g_i‖) {rows['corr_score_norm']:.3f}, rho {rows['rho']:.3f}), then tokens within the "
          "drawn rows:\n")
    print(f"| f | F rows: uniform | IS mix {MIX} | oracle | " + " | ".join(f"F both, tokens at keep {k}" for k in KEEPS) + " |")
    print("|---|---|---|---|" + "---|" * len(KEEPS))
    for f in FRACTIONS:
        row = rows[str(f)]
        print(f"| {f} | {row['uniform']:.3f} | {row[f'is_mix{MIX}']:.3f} | {row['oracle']:.3f} | "
              + " | ".join(f"{both[str(f)][str(keep)]:.3f}" for keep in KEEPS) + " |")
    print(f"\nTokens alone (every row):\n\n| keep | F tokens: uniform | IS mix {MIX} |\n|---|---|---|")
    for keep in KEEPS:
        print(f"| {keep} | {tokens[str(keep)]['uniform']:.3f} | {tokens[str(keep)]['is']:.3f} |")
    print("\n| layer | zero-dy share of all token rows | of the real tokens |\n|---|---|---|")
    for layer, share in mean["zero_share"].items():
        print(f"| {layer} | {share:.3f} | {mean['zero_share_real_tokens'][layer]:.3f} |")
    print(flush=True)


def main(argv=None) -> None:
    args = lm_finetune.parse_args(argv, build_parser())
    began = time.time()
    checkpoint = lm_finetune.pretrained_checkpoint(args)
    data = lm_finetune.load_pairs(args)
    set_seed(args.seed)
    model = lm_finetune.pretrained_model_factory(args, checkpoint)()
    mode = "LoRA" if args.lora else "full fine-tuning"
    print(f"Measuring F ({mode}) on batches of {args.batch_size} of {len(data.train)} training pairs at fine-tuning "
          f"steps {args.finetune_steps}", flush=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=0.05)
    training = batches(data.train, args.batch_size, torch.Generator().manual_seed(args.seed))
    output = {"settings": {k: str(v) for k, v in vars(args).items()}, "checkpoint": str(checkpoint), "mode": mode,
              "fractions": FRACTIONS, "keeps": KEEPS, "mix": MIX, "regimes": {}}
    path = args.output_dir / f"lm_sampling_variance{'_lora' if args.lora else ''}.json"
    for step in range(max(args.finetune_steps) + 1):
        if step in args.finetune_steps:
            print(f"  fine-tuning step {step}", flush=True)
            result = measure_regime(model, data.train, args, step)
            output["regimes"][str(step)] = result
            output["wall_seconds"] = time.time() - began
            path.write_text(json.dumps(output, indent=1))
            print_tables(step, result["mean"], args.batches)
        if step < max(args.finetune_steps):
            loss = model(**next(training)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if (step + 1) % 25 == 0:
                print(f"    step {step + 1}: loss {loss.item():.3f} ({time.time() - began:.0f} s)", flush=True)
    print(f"Wrote {path} ({time.time() - began:.0f} s)")


if __name__ == "__main__":
    main()
