"""DDP: two CPU processes (gloo) against one process on the same global batches.

`distributed_worker.py` says why the runs are comparable: with a sequential sampler, rank r of R gets every R-th
per-device batch, and one process with R times the accumulation steps sees the same micro-batches in the order
(micro-step 0 of rank 0, of rank 1, micro-step 1 of rank 0, ...); the one process draws each micro-batch's split as
the rank that holds it does. What a pass proves, for f < 1 (`ntk` and `window` predictors, with and without
accumulation, and with chunk contrasts) and f = 1 (the base class's step):

- the update of the 2 ranks equals the update of 1 process over 5 optimizer steps (SGD, clipping on), so the
  corrections written into `.grad` are all-reduced by DDP like the control gradient, and the predictor and beta,
  fitted from the rank-averaged inputs, evolve as in one process;
- the predictor state (and beta) is bit-identical on both ranks (sha256), and so are the weights and, with
  `control_fraction="auto"` (chosen from timings, so not comparable with one process), the control fraction;
- DDP all-reduces gradients once per optimizer step, on the last micro-batch only (a comm hook counts the buckets
  and the trainer's `sync_gradients` at each), as many buckets per step as the base class's f = 1 step;
- every other collective the trainer issues during training carries at most a predictor input (the signal: k
  logits for `ntk`, the head gradient for `window`), or with `predictor_fit_chunks` the rank's compressed chunk
  pairs (gathered, so that every rank learns from all of them), never a parameter-sized tensor.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed_worker
from lgp_hf.losses import RULES
from distributed_worker import CONFIGS, run_config

WORKER = Path(distributed_worker.__file__)
RANKS = 2
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Results per configuration: the two DDP ranks (launched in the background) and the one-process emulation."""
    out = tmp_path_factory.mktemp("distributed")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join(filter(None, [str(WORKER.parent), os.environ.get("PYTHONPATH")])))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}", str(WORKER), str(out / "ddp")]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        single = {name: run_config(name, str(out / "single"), emulate_ranks=RANKS) for name in CONFIGS}
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and its two workers, nothing else
        process.wait()
        raise
    assert process.returncode == 0, output[-6000:]
    ddp = {
        name: [torch.load(out / "ddp" / f"{name}_rank{rank}.pt", weights_only=False) for rank in range(RANKS)]
        for name in CONFIGS
    }
    return ddp, single


@pytest.mark.parametrize("name", [name for name, config in CONFIGS.items() if config[0] != "auto"])
def test_two_ranks_update_like_one_process(runs, name):
    ddp, single = runs
    reference = single[name]
    initial = distributed_worker.tiny_vit(num_labels=3, seed=2).state_dict()
    largest_update = max((reference["params"][k] - initial[k]).abs().max().item() for k in initial)
    assert largest_update > 1e-3  # the comparison is not between two untrained models
    for rank_result in ddp[name]:
        assert rank_result["global_step"] == reference["global_step"] == distributed_worker.STEPS
        for key, value in reference["params"].items():
            torch.testing.assert_close(rank_result["params"][key], value, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
        assert rank_result["alignment"] == pytest.approx(reference["alignment"], abs=1e-4)
        for part in ("predictor", "coefficients"):
            for key, value in reference["predictor_state"][part].items():
                if isinstance(value, torch.Tensor):
                    other = rank_result["predictor_state"][part][key]
                    torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-6 * value.abs().max().item(), msg=f"{part}.{key}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ranks_hold_identical_predictor_state_and_weights(runs, name):
    ddp, _ = runs
    first, second = ddp[name]
    assert first["predictor_hash"] == second["predictor_hash"]
    for key, value in first["params"].items():
        assert torch.equal(value, second["params"][key]), key
    assert first["control_fraction"] == second["control_fraction"]
    if CONFIGS[name][0] != 1:
        assert first["predictor_state"]["predictor"]  # there is a state to compare
        assert first["alignment"][-1] > 0
    if CONFIGS[name][0] == "auto":  # f was chosen (from timings averaged over ranks), not left at its initial value
        assert first["control_fraction"] != 0.5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ddp_all_reduces_once_per_step_on_the_sync_micro_batch(runs, name):
    ddp, _ = runs
    baseline = ddp["full_f1_ga2"][0]["buckets"]  # the base class's training_step
    for rank_result in ddp[name]:
        buckets = rank_result["buckets"]
        assert buckets and all(sync for _, _, sync in buckets), buckets  # never inside no_sync
        per_step = [sum(1 for step, _, _ in buckets if step == s) for s in range(distributed_worker.STEPS)]
        assert per_step == [len(baseline) // distributed_worker.STEPS] * distributed_worker.STEPS, per_step


@pytest.mark.parametrize("name", list(CONFIGS))
def test_only_predictor_input_sized_tensors_are_communicated(runs, name):
    ddp, _ = runs
    for rank_result in ddp[name]:
        sizes = [numel for _, numel in rank_result["collectives"]]
        # besides signals: the loss-split probe (lgp_hf.losses) agrees on one flag and one mask of len(RULES) floats,
        # and with predictor_fit_chunks > 1 each rank sends its compressed chunk pairs
        assert max(sizes) <= max(rank_result["signal_numel"], len(RULES), rank_result["fit_numel"]), rank_result["collectives"]
        assert rank_result["signal_numel"] < rank_result["trunk_numel"] / 50
        assert rank_result["fit_numel"] < rank_result["trunk_numel"]  # J compressed pairs, below one gradient here
        if CONFIGS[name][0] != 1:  # the control signal (and the applied difference) are averaged every step
            assert sum(1 for op, numel in rank_result["collectives"] if op == "all_reduce" and numel == rank_result["signal_numel"]) >= distributed_worker.STEPS
