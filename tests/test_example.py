"""End-to-end tests of examples/run_vit.py on the embedded CIFAR-10 subset.

The runs use the documented main command, so what the README tells users to run is what is tested, with a few
overrides that cut it to four optimizer steps. They run offline, with a private HF_HOME, so neither the Hub nor
a user's cache or `accelerate config` can change the outcome.
"""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "run_vit.py"

#: The command the README documents; it trains with the lgp trainer on the embedded data.
MAIN_COMMAND = "accelerate launch examples/run_vit.py --output_dir runs/vit"
#: Overrides that make the main command a smoke test of a few seconds.
FEW_STEPS = [
    "--max_steps", "4", "--max_train_samples", "64", "--max_eval_samples", "64",
    "--per_device_train_batch_size", "16", "--logging_steps", "2",
]


def run(command: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def run_main_command(tmp_path: Path, *overrides: str) -> Path:
    """Runs MAIN_COMMAND with FEW_STEPS and `overrides` (later options win); returns the output directory."""
    launcher, launch, *script_args = shlex.split(MAIN_COMMAND)
    assert (launcher, launch) == ("accelerate", "launch")
    output_dir = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", *script_args]
    result = run([*command, "--output_dir", str(output_dir), *FEW_STEPS, *overrides], tmp_path)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-5000:]}\nstderr:\n{result.stderr[-5000:]}"
    if importlib.util.find_spec("matplotlib") is None:
        assert "pip install matplotlib" in result.stdout
    else:
        assert (output_dir / "training_curves.png").stat().st_size > 0
    return output_dir


@pytest.fixture(scope="module")
def script():
    """examples/run_vit.py as a module, for testing its parts in-process."""
    spec = importlib.util.spec_from_file_location("run_vit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_results(output_dir: Path) -> dict:
    results = json.loads((output_dir / "all_results.json").read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    assert results["train_runtime"] > 0 and results["train_samples_per_second"] > 0
    log_history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    assert any("loss" in entry and "wall_time" in entry for entry in log_history)
    assert (output_dir / "model.safetensors").exists() and (output_dir / "preprocessor_config.json").exists()
    return results


def test_baseline_trainer_end_to_end(tmp_path):
    results = check_results(run_main_command(tmp_path, "--trainer", "baseline"))
    assert not any(key.startswith("lgp") for key in results)


def test_lgp_trainer_end_to_end(tmp_path):
    results = check_results(run_main_command(tmp_path, "--trainer", "lgp"))
    assert any(key.startswith("lgp") for key in results)


def test_defaults_apply_without_arguments_and_to_json_files(script, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["run_vit.py"])
    model_args, data_args, training_args = script.parse_args()
    assert (model_args.trainer, training_args.output_dir) == ("lgp", "runs/vit")
    assert training_args.do_train and training_args.do_eval and not training_args.remove_unused_columns
    assert data_args.train_file is None and data_args.dataset_name is None  # the embedded subset

    options = tmp_path / "options.json"
    options.write_text(json.dumps({"trainer": "baseline", "output_dir": str(tmp_path), "num_train_epochs": 1}))
    monkeypatch.setattr(sys, "argv", ["run_vit.py", str(options)])
    model_args, _, training_args = script.parse_args()
    assert (model_args.trainer, training_args.num_train_epochs) == ("baseline", 1)
    assert training_args.per_device_train_batch_size == script.TRAINING_DEFAULTS["per_device_train_batch_size"]


def test_bad_train_file_gives_one_clear_error(tmp_path):
    missing = tmp_path / "missing.parquet"
    result = run([sys.executable, str(SCRIPT), "--train_file", str(missing), "--output_dir", str(tmp_path)], tmp_path)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ValueError: --train_file") and "expected an existing .parquet file" in last_line


def test_data_without_image_or_label_column_gives_one_clear_error(script):
    data = datasets.DatasetDict(train=datasets.Dataset.from_dict({"pixels": [[0.0]], "label": [0]}))
    with pytest.raises(ValueError, match=r"expected an image column named 'img' or 'image'.*found"):
        script.image_column(data, "some.parquet")


def test_transforms_normalise_crop_and_flip(script):
    image = Image.new("RGB", (32, 32), (255, 0, 128))
    image.paste((0, 0, 0), (0, 0, 16, 32))  # left half black, so a flip shows
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    evaluate_transform = script.make_transform("img", (32, 32), mean, std, train=False, padding=0)
    batch = evaluate_transform({"img": [image], "label": [3]})
    assert batch["labels"] == [3]
    plain = batch["pixel_values"][0]
    torch.testing.assert_close(plain[:, 5, 20], (torch.tensor([1.0, 0.0, 128 / 255]) - 0.5) / 0.25)

    torch.manual_seed(0)
    flip_only = script.make_transform("img", (32, 32), mean, std, train=True, padding=0)
    outputs = [flip_only({"img": [image], "label": [3]})["pixel_values"][0] for _ in range(20)]
    flipped = [torch.equal(output, plain.flip(-1)) for output in outputs]
    assert all(f or torch.equal(output, plain) for f, output in zip(flipped, outputs))
    assert any(flipped) and not all(flipped)

    uniform = Image.new("RGB", (32, 32), (255, 0, 128))  # no black pixel, so black can only be padding
    crop_and_resize = script.make_transform("img", (16, 16), mean, std, train=True, padding=4)
    crops = [crop_and_resize({"img": [uniform], "label": [3]})["pixel_values"][0] for _ in range(20)]
    assert all(crop.shape == (3, 16, 16) for crop in crops)
    padded = [(crop == (0.0 - 0.5) / 0.25).all(dim=0) for crop in crops]  # zero padding, normalised
    assert any(mask.any() for mask in padded), "no crop reached into the padding"
    assert len({tuple(mask.flatten().tolist()) for mask in padded}) > 2, "crop offsets do not vary"


def test_without_matplotlib_the_plot_is_skipped_with_an_install_hint(script, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    path = tmp_path / "training_curves.png"
    script.plot_training_curves([{"loss": 2.0, "wall_time": 1.0, "step": 1}], str(path))
    assert not path.exists()
    assert "pip install lgp_hf[plots]" in caplog.text and "pip install matplotlib" in caplog.text


def test_documented_command_is_the_tested_one():
    assert MAIN_COMMAND in SCRIPT.read_text()
    assert MAIN_COMMAND in (REPO_ROOT / "README.md").read_text()
