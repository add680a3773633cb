"""Runs the trainer under DDP (one process per rank) or emulates R ranks in one process; `test_distributed` compares.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py OUT_DIR   # DDP, gloo
    python tests/distributed_worker.py OUT_DIR --emulate_ranks 2                                          # 1 process

What makes the two comparable. With a sequential sampler, accelerate gives rank r the per-device batches
r, r + R, r + 2R, ... of the data set, so optimizer step t of R ranks with G accumulation micro-batches covers
the same global batch as one process with G R micro-batches of the same size, micro-batch m of the one process
being micro-batch m // R of rank m % R. The rows of a micro-batch are drawn with `draw_generator(seed, step,
micro_step, rank)`; the one process draws micro-batch m's rows as rank m % R at micro_step m // R (the only thing
changed for the emulation), so every row is drawn with the same probability and the same random number in both runs.
Both then take the same update, up to float summation order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import lgp_hf.trainer  # noqa: E402
from conftest import image_dataset, tiny_vit  # noqa: E402
from lgp_hf import PredictedGradientArguments, PredictedGradientTrainer  # noqa: E402

PER_DEVICE_BATCH = 8
STEPS = 5
#: name -> (control_fraction, gradient accumulation steps per rank[, other arguments])
CONFIGS = {
    # with the unbiasedness check at the start (each rank checks its own batch; the verdict is all-reduced)
    "f0.5_ga1": (0.5, 1, {"unbiasedness_check": True}),
    "f0.25_ga2": (0.25, 2),
    # DDP rebuilds its buckets after the first step only without find_unused_parameters (Trainer's choice under
    # activation checkpointing): every parameter must get a gradient, zero where no row was drawn
    "f0.25_ga2_no_unused": (0.25, 2, {"ddp_find_unused_parameters": False}),
    "full_f1_ga2": (1.0, 2),
    # the gradient predictor: its fitted sums averaged over ranks after each optimizer step, so that every rank
    # applies the same map, fitted on the same rows as the one process's
    "f0.5_ga2_predictor": (0.5, 2, {"gradient_predictor": "linear", "predictor_signal_dims": 4}),
    # weight gradients from sampled token rows: each rank's token draws seeded by its micro-batch, as one process's
    "f0.5_ga2_tokens": (0.5, 2, {"weight_gradient_keep": 0.5}),
    "f1_ga2_tokens": (1.0, 2, {"weight_gradient_keep": 0.5}),
    # f chosen from measured timings: not comparable with one process, but every rank must choose the same f
    "auto_ga2": ("auto", 2, {"auto_observation_period": 1, "auto_decision_steps": 4, "unbiasedness_check": False}),
    # and the weight gradient keep, from each rank's own timings of its layers (the savings averaged over ranks)
    "auto_keep_ga2": ("auto", 2, {"auto_observation_period": 1, "auto_decision_steps": 4, "unbiasedness_check": False,
                                  "weight_gradient_keep": "auto"}),
}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor", "all_to_all_single")


def state_hash(state) -> str:
    """sha256 of every tensor's bytes (and every other value's repr), in key order."""
    digest = hashlib.sha256()

    def feed(value):
        if isinstance(value, dict):
            for key in sorted(value):
                digest.update(str(key).encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                feed(item)
        elif isinstance(value, torch.Tensor):
            digest.update(str(value.dtype).encode())
            digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(value).encode())

    feed(state)
    return digest.hexdigest()


class CommunicationLog(TrainerCallback):
    """Records, during training, every collective the trainer issues outside DDP (name, numel) and every bucket
    DDP all-reduces (through a comm hook: optimizer step, micro-step, whether it was a sync micro-batch)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.collectives: list[tuple[str, int]] = []
        self.buckets: list[tuple[int, int, bool]] = []
        self._originals = {}
        self._in_hook = False

    def on_train_begin(self, args, state, control, **kwargs):
        if not (dist.is_available() and dist.is_initialized()):
            return
        for name in COLLECTIVES:
            original = getattr(dist, name)
            self._originals[name] = original
            setattr(dist, name, self._recording(name, original))
        ddp = self.trainer.model_wrapped
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel), type(ddp)
        ddp.register_comm_hook(None, self._bucket_hook)

    def on_train_end(self, args, state, control, **kwargs):
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals = {}

    def _recording(self, name, original):
        def wrapper(tensor, *args, **kwargs):
            if not self._in_hook:
                first = tensor[0] if isinstance(tensor, (list, tuple)) else tensor
                size = kwargs.get("tensor", args[0] if args else None) if name == "all_gather_into_tensor" else first
                self.collectives.append((name, int(size.numel()) if isinstance(size, torch.Tensor) else -1))
            return original(tensor, *args, **kwargs)

        return wrapper

    def _bucket_hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        trainer = self.trainer
        self.buckets.append((trainer.state.global_step, trainer._micro_step, bool(trainer.accelerator.sync_gradients)))
        self._in_hook = True
        try:
            return allreduce_hook(None, bucket)
        finally:
            self._in_hook = False


@contextmanager
def emulated_draws(ranks: int):
    """One process standing in for `ranks` ranks: micro-batch m draws as rank m % R at micro-step m // R."""
    original = lgp_hf.trainer.draw_generator
    if ranks > 1:
        lgp_hf.trainer.draw_generator = lambda seed, step, micro_step, rank: original(seed, step, micro_step // ranks, micro_step % ranks)
    try:
        yield
    finally:
        lgp_hf.trainer.draw_generator = original


def run_config(name: str, output_dir: str, emulate_ranks: int = 1) -> dict:
    """Train one configuration; returns what the comparison needs (on this rank)."""
    control_fraction, accumulation, *extra = CONFIGS[name]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ranks = world * emulate_ranks
    settings = {"unbiasedness_check": False, **(extra[0] if extra else {})}
    args = PredictedGradientArguments(
        output_dir=output_dir, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=7,
        per_device_train_batch_size=PER_DEVICE_BATCH, gradient_accumulation_steps=accumulation * emulate_ranks,
        max_steps=STEPS, learning_rate=0.05, optim="sgd", max_grad_norm=1.0, logging_steps=1,
        train_sampling_strategy="sequential", control_fraction=control_fraction, ddp_backend="gloo" if world > 1 else None,
        **settings,
    )
    dataset = image_dataset(PER_DEVICE_BATCH * accumulation * ranks * STEPS, num_labels=3, seed=1)
    trainer = PredictedGradientTrainer(model=tiny_vit(num_labels=3, seed=2), args=args, train_dataset=dataset)
    log = CommunicationLog(trainer)
    trainer.add_callback(log)
    with emulated_draws(emulate_ranks):
        trainer.train()
    return {
        "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "summary": trainer.lgp_summary(),
        "state_hash": state_hash(trainer._lgp_state()["monitor"]),
        "collectives": log.collectives,
        "buckets": log.buckets,
        "global_step": trainer.state.global_step,
        "control_fraction": trainer._control_fraction,
        "predictor": None if trainer.predictor is None else trainer.predictor.state_dict(),
        "predictor_state_size": 0 if trainer.predictor is None else trainer.predictor.state_size(),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--emulate_ranks", type=int, default=1)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    cli = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    cli.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for name in cli.configs:
        result = run_config(name, str(cli.out / "trainer_output"), cli.emulate_ranks)
        torch.save(result, cli.out / f"{name}_rank{rank}.pt")
    (cli.out / f"done_rank{rank}.json").write_text(json.dumps({"configs": cli.configs}))


if __name__ == "__main__":
    main()
