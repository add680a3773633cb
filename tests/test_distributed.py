"""DDP: two CPU processes (gloo) against one process on the same global batches.

`distributed_worker.py` says why the runs are comparable: with a sequential sampler, rank r of R gets every R-th
per-device batch, and one process with R times the accumulation steps sees the same micro-batches in the order
(micro-step 0 of rank 0, of rank 1, micro-step 1 of rank 0, ...); the one process draws each micro-batch's rows as
the rank that holds it does. What a pass proves, for f < 1 (with and without accumulation, with DDP's
`find_unused_parameters` off, with the unbiasedness check) and f = 1 (the base class's step):

- the update of the 2 ranks equals the update of 1 process over 5 optimizer steps (SGD, clipping on): each rank's
  sampled backward, replayed blocks included, is all-reduced by DDP as an ordinary gradient;
- the weights, the sampling statistics (sha256) and the control fraction are identical on both ranks, also with
  `control_fraction="auto"` (chosen from timings, so not comparable with one process);
- DDP all-reduces gradients once per optimizer step, on the last micro-batch only (a comm hook counts the buckets
  and the trainer's `sync_gradients` at each), as many buckets per step as the base class's f = 1 step;
- every other collective the trainer issues carries a few floats (the check's verdict, the observation overhead,
  the estimates "auto" decides from), never a parameter-sized tensor.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed_worker
from lgp_hf.monitor import CANDIDATE_FRACTIONS
from lgp_hf.predictor import predictor_map
from lgp_hf.token_sampling import KEEP_CANDIDATES
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
    if CONFIGS[name][0] < 1:  # rows were drawn, the same in both runs
        assert 0 < reference["summary"]["lgp_drawn_fraction"] < 1
        assert sum(r["summary"]["lgp_drawn_fraction"] for r in ddp[name]) / 2 == pytest.approx(reference["summary"]["lgp_drawn_fraction"])
    if len(CONFIGS[name]) > 2 and CONFIGS[name][2].get("weight_gradient_keep", 1) < 1:  # token rows were drawn, alike
        shares = [r["summary"]["lgp_weight_gradient_tokens_computed"] for r in ddp[name]]
        assert 0 < reference["summary"]["lgp_weight_gradient_tokens_computed"] < 1 and all(0 < share < 1 for share in shares)
    if reference["predictor"] is not None:  # the same map and coefficients on both ranks as in the one process
        maps = lambda state: [predictor_map(c, s, 0.1) for c, s in zip(state["correlations"], state["covariances"])]  # noqa: E731
        coefficients = lambda state: state["alignment"][:, 0] / state["alignment"][:, 1]  # noqa: E731
        expected = maps(reference["predictor"])
        assert expected and any(m.abs().sum() > 0 for m in expected)
        for rank_result in ddp[name]:
            # the sums themselves differ by the loss's scale (a rank's mean over its rows, the one process's over all)
            for a, b in zip(maps(rank_result["predictor"]), expected):
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))
            torch.testing.assert_close(coefficients(rank_result["predictor"]), coefficients(reference["predictor"]), rtol=1e-3, atol=1e-6)
    if len(CONFIGS[name]) > 2 and CONFIGS[name][2].get("unbiasedness_check"):
        assert all(r["summary"]["lgp_unbiasedness_check"] == "passed" for r in ddp[name])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ranks_hold_identical_state_and_weights(runs, name):
    ddp, _ = runs
    first, second = ddp[name]
    for key, value in first["params"].items():
        assert torch.equal(value, second["params"][key]), key
    assert first["control_fraction"] == second["control_fraction"]
    if CONFIGS[name][0] == "auto":  # decisions from rank-averaged estimates: the same on both ranks
        assert first["summary"]["lgp_predicted_efficiency"] == second["summary"]["lgp_predicted_efficiency"] is not None
        assert first["summary"]["lgp_weight_gradient_keep"] == second["summary"]["lgp_weight_gradient_keep"]


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
def test_only_a_few_floats_are_communicated(runs, name):
    """Besides DDP's buckets: the check's verdict (1), the observation overhead (1) and, at a decision of "auto",
    F without and with the predictor and the cost of each candidate fraction and of f = 1, at each keep "auto" may
    choose, and the predictor's cost; with the predictor, its step sums once per optimizer step (its state's size, far
    below the parameters')."""
    ddp, _ = runs
    keeps = 1 + len(KEEP_CANDIDATES) if len(CONFIGS[name]) > 2 and CONFIGS[name][2].get("weight_gradient_keep") == "auto" else 1
    for rank_result in ddp[name]:
        sizes = [numel for _, numel in rank_result["collectives"]]
        bound = max(3 * (len(CANDIDATE_FRACTIONS) + 1) * keeps + 1, rank_result["predictor_state_size"])
        assert max(sizes, default=0) <= bound, rank_result["collectives"]
