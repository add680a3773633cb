#!/usr/bin/env python
"""The cheap-forward regime (issue 14, item 2): what a lower-precision prediction pass would cost and change.

The prediction micro-batch only needs the head-side signal, so its no-grad trunk forward could run at lower
precision. Unbiasedness then needs the signal of the control examples from the same cheap pass (the predictor maps
one function of the input; a different one on C and P would bias the update), and the head's gradient on P becomes a
prediction too (corrected on C like the trunk's). A step at control fraction f then costs f (1 + c') + (1 - f) c' =
f + c' of a full step, c' = cheap pass / (forward + backward) per example: in `theory.break_even_rho2` terms, cost
ratio c' plus an overhead f c'.

Measured on the example's ViT at `--batch_size` (default 128) of the CIFAR-10 subset, in one process, passes taking
turns (`--repeats` rounds, medians), on the same batch:
- `full`: forward with autograd and backward, fp32 (Trainer's step without the optimizer);
- `fp32`: the prediction pass as built (no-grad forward of trunk and head, head backward ignored: it is the same in
  every variant);
- `bf16`: the same no-grad forward under `torch.autocast(bfloat16)`;
- `int8`: `torch.ao.quantization.quantize_dynamic` of the model's `nn.Linear` layers (int8 weights, dynamic int8
  activations), no-grad forward; `requantize` times rebuilding the quantized copy, which the weights' change
  after every optimizer step requires.
Per variant: c' (per example, relative to `full`), the step cost at f (int8: with one requantization per step), and
the signal's relative error
||e' - e||^2 / ||e||^2 over the batch, e the per-example logit errors softmax(z) - onehot(y) of the fp32 pass and
e' of the variant's (0: the same signal). Break-even E at f = 0.25 for each variant, and for the pass as built.

    python benchmarks/cheap_forward.py                    # about 3 minutes on 2 CPU cores (quiet machine)
    python benchmarks/cheap_forward.py --checkpoint DIR   # a trained ViT instead of a fresh one
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from lgp_hf import theory  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_data_arguments(parser, subset_default=True)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--control_fraction", type=float, default=0.25)
    parser.add_argument("--checkpoint", default=None, help="a saved ViT (default: a new one of the example's sizes)")
    parser.add_argument("--output_dir", default="benchmarks/results/cheap_forward")
    return parser.parse_args(argv)


def logit_errors(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example dloss/dlogits of the summed cross-entropy: softmax(z) - onehot(y)."""
    errors = logits.float().softmax(-1)
    errors[torch.arange(len(labels)), labels] -= 1
    return errors


def seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    set_seed(0)
    data = common.load_data(args)
    model, _ = common.build_model(data.labels, args.checkpoint)
    model.train()
    batch = common.first_batch(data.train, args.batch_size)
    pixels, labels = batch["pixel_values"], batch["labels"]

    def full():
        model.zero_grad(set_to_none=True)
        model(pixel_values=pixels, labels=labels).loss.backward()

    def forward(module, autocast=False):
        def run():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return module(pixel_values=pixels).logits
        return run

    quantized = {}

    def requantize():
        quantized["model"] = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)

    requantize()
    passes = {
        "full": full, "fp32": forward(model), "bf16": forward(model, autocast=True),
        "int8": lambda: forward(quantized["model"])(), "requantize": requantize,
    }
    for function in passes.values():  # warm-up
        function()
    times = {name: [] for name in passes}
    for _ in range(args.repeats):
        for name, function in passes.items():
            times[name].append(seconds(function))
    median = {name: statistics.median(values) for name, values in times.items()}

    reference = logit_errors(forward(model)(), labels)
    f = args.control_fraction
    rows = []
    requantize_share = median["requantize"] / median["full"]  # per optimizer step, in full steps
    for name in ("fp32", "bf16", "int8"):
        logits = forward(quantized["model"])() if name == "int8" else forward(model, autocast=name == "bf16")()
        signal_error = float((logit_errors(logits, labels) - reference).pow(2).sum() / reference.pow(2).sum())
        cost = min(1.0, median[name] / median["full"])
        # as built: f + (1 - f) c; a cheap pass on every example instead: f + c' (+ requantization for int8)
        extra = 0.0 if name == "fp32" else f * cost + (requantize_share if name == "int8" else 0.0)
        rows.append({
            "variant": name + (" (as built)" if name == "fp32" else ""), "seconds": median[name], "c'": cost,
            "signal_error": signal_error, f"step at f={f}": f + (1 - f) * cost + extra,
            f"break_even_E at f={f}": theory.break_even_rho2(f, cost, extra),
        })
    columns = ["variant", "seconds", "c'", "signal_error", f"step at f={f}", f"break_even_E at f={f}"]
    print(f"\n{common.device_description()}, ViT ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'random init'}), batch {args.batch_size}; "
          f"full pass {median['full']:.3f} s, requantize {median['requantize']:.3f} s; medians of {args.repeats}")
    print(common.format_table(rows, columns))
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    common.write_json(output / "cheap_forward.json", {"settings": vars(args), "times": times, "table": rows})


if __name__ == "__main__":
    main()
