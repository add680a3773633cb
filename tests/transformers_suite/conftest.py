"""Runs transformers' own Trainer tests with `transformers.Trainer` swapped for `PredictedGradientTrainer`.

`LGP_TRAINER_SWAP` picks the class the tests get as `Trainer` (`tests/run_transformers_trainer_suite.py` sets it):

- unset: nothing here is collected (the suite is slow and not part of the default `pytest` run);
- `trainer`: transformers' `Trainer`, untouched (the baseline);
- `default`: `PredictedGradientTrainer` as the tests call it (their `TrainingArguments`, so the estimator's defaults:
  `control_fraction="auto"`);
- `f1`: `PredictedGradientTrainer` with `control_fraction=1`.

The swap happens when this file is imported, before the test modules import `Trainer`: `transformers.Trainer` and
`transformers.trainer.Trainer` are replaced, so `from transformers import Trainer` and the tests' own subclasses of it
get the swapped class. Each test's JUnit record says whether its trainers ran the estimator (`lgp_logged`).
"""

import copy
import dataclasses
import os

import pytest
import transformers
import transformers.trainer


SWAP = os.environ.get("LGP_TRAINER_SWAP")


def pytest_configure(config):
    config.addinivalue_line("markers", "torch_compile_test: transformers' marker for torch.compile tests")


if SWAP is None:
    collect_ignore_glob = ["test_*.py"]
elif SWAP not in ("trainer", "default", "f1"):
    raise ValueError(f"LGP_TRAINER_SWAP={SWAP!r}: use 'trainer', 'default' or 'f1'.")
elif SWAP != "trainer":
    from lgp_hf import PredictedGradientArguments, PredictedGradientTrainer

    _TRAINING_FIELDS = {field.name for field in dataclasses.fields(transformers.TrainingArguments)}
    _SETTINGS = [f.name for f in dataclasses.fields(PredictedGradientArguments) if f.name not in _TRAINING_FIELDS]
    _DEFAULTS = PredictedGradientArguments(output_dir="tmp_trainer")

    def _with_settings(cls):
        """`cls` (a `TrainingArguments` subclass of a test) plus the estimator's settings, importable for pickling
        (checkpoints save `training_args.bin`)."""
        name = f"{cls.__name__}WithEstimatorSettings"
        if name not in globals():
            combined = dataclasses.dataclass(type(name, (PredictedGradientArguments, cls), {"__module__": __name__}))
            globals()[name] = combined
        return globals()[name]

    def with_control_fraction(args, fraction):
        """A copy of `args` (any `TrainingArguments`, or None as `Trainer` takes it) that is also a
        `PredictedGradientArguments` with `control_fraction=fraction` and the other estimator settings at their
        defaults; every `TrainingArguments` value is kept as the test set it (no second `__post_init__`).
        The one place that knows how `PredictedGradientTrainer` reads its settings: adapt it if that changes."""
        args = copy.copy(args if args is not None else transformers.TrainingArguments(output_dir="tmp_trainer"))
        if not isinstance(args, PredictedGradientArguments):
            args.__class__ = _with_settings(type(args))
            for name in _SETTINGS:
                setattr(args, name, copy.copy(getattr(_DEFAULTS, name)))
        args.control_fraction = fraction
        return args

    _trainers = []  # the swapped trainers the running test created

    class SwappedTrainer(PredictedGradientTrainer):
        """`PredictedGradientTrainer`, at `control_fraction=1` in the `f1` run, whatever arguments the test passes."""

        def __init__(self, model=None, args=None, *pargs, **kwargs):
            if SWAP == "f1":
                args = with_control_fraction(args, 1.0)
            super().__init__(model, args, *pargs, **kwargs)
            _trainers.append(self)

    @pytest.fixture(autouse=True)
    def _record_estimator_use(record_property):
        """Records in the JUnit XML whether the test's trainers logged `lgp/` metrics, i.e. ran the estimator (a model
        it cannot split, for one, trains as with `Trainer`)."""
        _trainers.clear()
        yield
        logs = [log for trainer in _trainers for log in trainer.state.log_history]
        record_property("lgp_logged", any(key.startswith("lgp/") for log in logs for key in log))

    transformers.Trainer = transformers.trainer.Trainer = SwappedTrainer
