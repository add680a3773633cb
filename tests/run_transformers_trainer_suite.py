"""Drop-in check: transformers' own Trainer tests, run with `Trainer` and with `PredictedGradientTrainer` swapped in.

    python tests/run_transformers_trainer_suite.py --junit-dir runs/transformers_suite   # 3 runs, ~4 min on 2 CPUs
    python tests/run_transformers_trainer_suite.py --junit-dir runs/transformers_suite --modes default f1
    python tests/run_transformers_trainer_suite.py -k "Checkpoint or Callback" --modes trainer f1

Runs `tests/transformers_suite` (transformers' `tests/trainer/test_trainer.py`, `test_trainer_callback.py` and
`test_trainer_checkpointing.py`; see the README there) in one pytest process per mode: `trainer` (transformers'
`Trainer`, the baseline), `default` (`PredictedGradientTrainer` given the tests' own `TrainingArguments`, so the
estimator's defaults: `control_fraction="auto"`) and `f1` (`control_fraction=1`). A mode left out of `--modes` is read
from `--junit-dir` when an earlier run left it there: the baseline does not depend on lgp_hf, so the second command
above reruns only the swapped modes. Prints each run's counts (and in how many passing tests the estimator ran, i.e.
logged `lgp/` metrics), then every test that passes with `Trainer` but not with the swap, with the first line of its
error, grouped by that line. Exit status 0 only if there is none and every run finished. Tests the baseline does not
pass (no GPU, no Hub, optional packages) are not compared. The swap itself is `tests/transformers_suite/conftest.py`.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SUITE = REPO_ROOT / "tests" / "transformers_suite"
# transformers' files (tests/trainer/ in github.com/huggingface/transformers) and the commit each is taken from.
UPSTREAM = {
    "test_trainer.py": "cdbb95d8e064f6a62bf760748079b518c6073b8f",
    "test_trainer_callback.py": "020a37d2264e60dc7beb9634c3e87ad870073e2c",
    "test_trainer_checkpointing.py": "22c22fa26f5f3352d243bc358f0947af05b1d61b",
    "trainer_test_utils.py": "fef6f3591b8998bd9ddd80b793b25e0c861ca3c7",
}
MODES = {
    "trainer": "Trainer (baseline)",
    "default": "PredictedGradientTrainer, default (auto)",
    "f1": "PredictedGradientTrainer, control_fraction=1",
}


def fetch_upstream():
    for name, commit in UPSTREAM.items():
        if not (SUITE / name).exists():
            url = f"https://raw.githubusercontent.com/huggingface/transformers/{commit}/tests/trainer/{name}"
            print(f"downloading {url}", flush=True)
            urllib.request.urlretrieve(url, SUITE / name)


def run_suite(mode, junit, pytest_args, timeout):
    """Runs the suite with `mode`'s Trainer, writing JUnit XML to `junit`."""
    junit.unlink(missing_ok=True)
    env = {**os.environ, "LGP_TRAINER_SWAP": mode, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "pytest", str(SUITE), "-p", "no:cacheprovider", "-q", f"--junitxml={junit}"]
    command += ["-o", "junit_family=xunit1"]  # keeps the lgp_logged property of each test
    start = time.time()
    try:
        subprocess.run(command + pytest_args, cwd=REPO_ROOT, env=env, timeout=timeout, stdout=subprocess.DEVNULL)
        print(f"{mode}: {time.time() - start:.0f} s", flush=True)
    except subprocess.TimeoutExpired:
        print(f"{mode}: timed out after {timeout} s", flush=True)


def read_junit(junit):
    """{test id: (outcome, first line of the error, whether it ran the estimator)} from a run's JUnit XML."""
    results = {}
    for case in ET.parse(junit).iter("testcase"):
        test = f"{case.get('classname').split('transformers_suite.')[-1]}::{case.get('name')}"
        problem = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        logged = any(p.get("name") == "lgp_logged" and p.get("value") == "True" for p in case.iter("property"))
        if problem is None:
            results[test] = ("passed", "", logged)
        else:
            message = (problem.get("message") or problem.text or "").strip().splitlines()
            outcome = "skipped" if problem.tag == "skipped" else "failed"
            results[test] = (outcome, message[0][:200] if message else "", logged)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--modes", nargs="+", choices=list(MODES), default=list(MODES),
        help="runs to do (default: all); the others are read from --junit-dir if an earlier run left them there",
    )
    parser.add_argument("-k", help="pytest -k expression selecting tests, e.g. 'not TrainerGradientAccumulationTest'")
    parser.add_argument("--timeout", type=float, help="seconds allowed per run (default: none)")
    parser.add_argument("--junit-dir", type=Path, help="each run's JUnit XML, <mode>.xml (default: a temporary folder)")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest after `--`")
    args = parser.parse_args()
    fetch_upstream()
    pytest_args = (["-k", args.k] if args.k else []) + args.pytest_args
    junit_dir = (args.junit_dir or Path(tempfile.mkdtemp(prefix="transformers_suite_"))).resolve()
    junit_dir.mkdir(parents=True, exist_ok=True)
    results, problems = {}, 0
    for mode in MODES:
        junit = junit_dir / f"{mode}.xml"
        if mode in args.modes:
            run_suite(mode, junit, pytest_args, args.timeout)
        if junit.exists():
            results[mode] = read_junit(junit)
        else:
            problems += mode in args.modes  # the run timed out or crashed

    print(f"\n{'run':<46}{'collected':>10}{'passed':>8}{'failed':>8}{'skipped':>9}{'passed, estimator ran':>23}")
    for mode, outcomes in results.items():
        counts = Counter(outcome for outcome, _, _ in outcomes.values())
        ran = sum(outcome == "passed" and logged for outcome, _, logged in outcomes.values())
        print(
            f"{MODES[mode]:<46}{len(outcomes):>10}{counts['passed']:>8}{counts['failed']:>8}{counts['skipped']:>9}"
            f"{ran if mode != 'trainer' else '':>23}"
        )

    baseline = {test for test, (outcome, _, _) in results.get("trainer", {}).items() if outcome == "passed"}
    for mode, outcomes in results.items():
        if mode == "trainer" or "trainer" not in results:
            continue
        compared = baseline & outcomes.keys()  # -k may have run fewer tests than the stored baseline
        lost = {test: outcomes[test][1] for test in sorted(compared) if outcomes[test][0] != "passed"}
        problems += len(lost)
        print(f"\n{MODES[mode]}: {len(compared) - len(lost)} of the {len(compared)} tests passing with Trainer pass")
        for message, count in Counter(lost.values()).most_common():
            print(f"  {count:>4} x {message}")
        for test, message in lost.items():
            print(f"  {test}\n      {message}")
    print(f"\nJUnit XML: {junit_dir}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
