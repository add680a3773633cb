"""End-to-end test of examples/run_clm.py: a tiny GPT-2 from its config, byte-level, on a small text, offline.

It runs the documented command with overrides that cut it to a few seconds of training, in a private HF_HOME with
the Hub off, as tests/test_example.py does for the ViT example.
"""

import json
import math
import shlex
import sys
from pathlib import Path

from test_example import REPO_ROOT, run

SCRIPT = REPO_ROOT / "examples" / "run_clm.py"
#: The command the README documents (default data: tinyshakespeare next to the repository).
MAIN_COMMAND = "python examples/run_clm.py --output_dir runs/clm"
TINY = [
    "--config_overrides", "n_embd=32,n_layer=2,n_head=2,n_positions=64", "--block_size", "64", "--max_steps", "30",
    "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--lr_scheduler_type", "constant",
    "--warmup_steps", "0", "--logging_steps", "10",
]
LINES = [
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n",
    "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n",
    "MERCUTIO:\nA plague o' both your houses!\n",
]


def test_clm_example_trains_a_tiny_gpt2_with_sampled_rows(tmp_path):
    text = tmp_path / "plays.txt"
    text.write_text("\n".join(LINES * 80))
    output_dir = tmp_path / "out"
    _, script, *_ = shlex.split(MAIN_COMMAND)
    command = [sys.executable, script, "--output_dir", str(output_dir), "--train_file", str(text), *TINY,
               "--control_fraction", "0.5"]
    result = run(command, tmp_path)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-5000:]}\nstderr:\n{result.stderr[-5000:]}"
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["eval_loss"] < math.log(259) - 1.5  # a new model's loss is about log(vocabulary)
    assert results["perplexity"] == math.exp(results["eval_loss"])
    assert results["lgp_control_fraction"] == 0.5 and 0 < results["lgp_trunk_rows_computed"] < 1
    assert results["lgp_unbiasedness_check"] == "passed"
    assert (output_dir / "model.safetensors").exists() and (output_dir / "tokenizer_config.json").exists()


def test_documented_command_is_the_tested_one():
    assert MAIN_COMMAND in SCRIPT.read_text()
    assert MAIN_COMMAND in (REPO_ROOT / "README.md").read_text()
