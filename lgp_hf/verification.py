"""`verify_unbiased`: the estimator checked on the user's own model, loss, data and arguments.

On one batch, with the weights fixed (learning rate 0 in effect: nothing is stepped), the exact gradient g is taken
once, by plain autograd, and the sampled estimator D times from one forward started from the same RNG state, with
the same dropout masks (`replay.recorded_dropout`); each backward draws anew, and conditionally on the forward the
estimate must average to that forward's exact gradient. Along each of a set of fixed
directions u the draws' errors y_d = <est_d - g, u> are z-tested for mean 0 (`z_scores`), with a floor on the
standard error for float rounding. Directions: the exact gradient, a few random sparse directions over all
parameters, and per parameter tensor its exact gradient and one random sparse direction: `Directions`. The largest
|z| is compared with a Bonferroni threshold for a family-wise false alarm rate `alpha` (`z_threshold`). The test suite
checks every model family with this same function.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from statistics import NormalDist

import torch

from .replay import recorded_dropout

#: Random sparse directions over all parameters, and coordinates each random direction samples per tensor.
RANDOM_DIRECTIONS = 8
SPARSE_COORDINATES = 1024
#: Float rounding floor of the standard error, relative to the size of the terms of a projection (the replayed and
#: the plain backward sum in other orders): float32, and mixed precision.
ROUNDING_FLOOR = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def t_quantile(probability: float, dof: int) -> float:
    """Quantile of Student's t with `dof` degrees of freedom (Cornish-Fisher expansion around the normal quantile,
    Abramowitz & Stegun 26.7.5; within 0.5 % for dof >= 10 at the tails used here)."""
    z = NormalDist().inv_cdf(probability)
    terms = (
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
    )
    return z + sum(term / dof ** (k + 1) for k, term in enumerate(terms))


def z_threshold(draws: int, directions: int, alpha: float) -> float:
    """|z| above which the mean error along one of `directions` directions is called a bias: the two-sided
    t quantile at alpha / directions (Bonferroni), so that all together raise a false alarm with probability at
    most `alpha`."""
    return t_quantile(1 - alpha / (2 * directions), max(draws - 1, 1))


def z_scores(sums: torch.Tensor, squares: torch.Tensor, draws: int, floors: torch.Tensor) -> torch.Tensor:
    """mean / standard error per direction from the summed errors and summed squared errors of `draws` draws;
    `floors`: the rounding floor of each standard error. 0 where both mean and error are 0."""
    mean = sums / draws
    variance = ((squares - draws * mean**2) / max(draws - 1, 1)).clamp_min(0)
    error = (variance / draws + floors**2).sqrt()
    return torch.where(error > 0, mean / error.clamp_min(1e-300), torch.where(mean == 0, 0.0, math.inf))


class Directions:
    """The test directions for a list of parameter tensors, and the projection of a gradient error on all of them.

    Order of `project`'s output: [exact gradient, RANDOM_DIRECTIONS random, then per tensor (its exact gradient, its
    random direction)]. The random directions sample at most SPARSE_COORDINATES coordinates of each tensor (Gaussian
    weights), so that nothing parameter-sized is kept per direction.
    """

    def __init__(self, exact: list[torch.Tensor], generator: torch.Generator):
        self.exact = exact
        self.samples = []
        for tensor in exact:
            count = min(tensor.numel(), SPARSE_COORDINATES)
            index = torch.randperm(tensor.numel(), generator=generator)[:count].to(tensor.device)
            weights = torch.randn(RANDOM_DIRECTIONS, count, generator=generator, dtype=torch.float64).to(tensor.device)
            self.samples.append((index, weights))

    @property
    def count(self) -> int:
        return 1 + RANDOM_DIRECTIONS + 2 * len(self.exact)

    def project(self, gradients: list[torch.Tensor]) -> torch.Tensor:
        """<gradient, u> for every direction u (float64), tensor by tensor."""
        # float32 dot products (no float64 copy of a parameter-sized gradient): their rounding is within the floor
        along_exact = [g.reshape(-1).float().dot(e.reshape(-1).float()).double() for g, e in zip(gradients, self.exact)]
        random = [w @ g.reshape(-1)[i].double() for g, (i, w) in zip(gradients, self.samples)]
        return self._in_order(torch.stack(along_exact), torch.stack(random))

    def floors(self, relative: float) -> torch.Tensor:
        """The rounding floor of each direction u: `relative` times sum_i |g_i u_i| + rms(g) sum_i |u_i| (rounding in a
        coordinate whose exact gradient cancels to 0 is relative to the gradients it was summed from)."""
        terms = self._in_order(
            torch.stack([e.double().pow(2).sum() for e in self.exact]),
            torch.stack([w.abs() @ e.reshape(-1).double().abs()[i] for e, (i, w) in zip(self.exact, self.samples)]),
        )
        size = self._in_order(
            torch.stack([e.double().abs().sum() for e in self.exact]), torch.stack([w.abs().sum(1) for _, w in self.samples])
        )
        squares = sum(float(e.double().pow(2).sum()) for e in self.exact)
        rms = math.sqrt(squares / sum(e.numel() for e in self.exact))
        return relative * (terms + rms * size)

    @staticmethod
    def _in_order(along_exact: torch.Tensor, random: torch.Tensor) -> torch.Tensor:
        """Per-tensor values (tensors,) and (tensors, RANDOM) in direction order."""
        per_tensor = torch.stack([along_exact, random[:, 0]], dim=1).reshape(-1)
        return torch.cat([along_exact.sum()[None], random.sum(0), per_tensor]).cpu()


@dataclass
class UnbiasednessReport:
    """What `verify_unbiased` found. `passed`: no direction's |z| above `threshold`. `per_tensor`: the largest |z| of
    each parameter tensor's two directions, largest first."""

    passed: bool
    worst_z: float
    threshold: float
    draws: int
    control_fraction: float
    seconds: float
    directions: int
    per_tensor: dict[str, float] = field(default_factory=dict)

    def worst_tensors(self, count: int = 3) -> list[str]:
        return [f"{name} (|z| {z:.1f})" for name, z in list(self.per_tensor.items())[:count]]

    def __str__(self) -> str:
        verdict = "unbiased: no evidence of bias" if self.passed else "BIASED"
        line = (
            f"lgp_hf.verify_unbiased: {verdict} at control_fraction={self.control_fraction:g} "
            f"(largest |z| {self.worst_z:.2f} against a threshold of {self.threshold:.2f} over {self.directions} "
            f"directions, {self.draws} draws, {self.seconds:.1f} s)"
        )
        return line if self.passed else f"{line}; largest in {', '.join(self.worst_tensors())}"


@contextlib.contextmanager
def _unchanged_model(model):
    """Buffers (BatchNorm's running statistics), `.grad` and the RNG streams are as they were afterwards."""
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    grads = {param: param.grad for param in model.parameters()}
    devices = sorted({p.device.index for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for name, buffer in model.named_buffers():
                    buffer.copy_(buffers[name])
            for param, grad in grads.items():
                param.grad = grad


def gradient_error_statistics(trainer, model, inputs, num_items_in_batch, control_fraction: float, draws: int, seed: int = 0):
    """(Directions, summed projections, summed squared projections, parameter names) of the errors of `draws` sampled
    gradients against the exact one, on `inputs` (prepared), with `model` unchanged afterwards."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    generator = torch.Generator().manual_seed(seed)

    def loss_of_forward():
        # dropout drawn alike in the exact forward and in the sampled one, whose replayed blocks record their masks
        with trainer.compute_loss_context_manager(), recorded_dropout():
            return trainer.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)

    def gradient(loss, retain):
        grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]

    with _unchanged_model(model):
        model.train()
        state = torch.get_rng_state()
        exact = gradient(loss_of_forward(), retain=False)
        directions = Directions(exact, generator)
        reference = directions.project(exact)
        torch.set_rng_state(state)  # the same dropout masks in the sampled forward
        with trainer.sampled_backward(control_fraction, generator):
            loss = loss_of_forward()
            sums = torch.zeros(directions.count, dtype=torch.float64)
            squares = torch.zeros_like(sums)
            for _ in range(draws):
                error = directions.project(gradient(loss, retain=True)) - reference
                sums += error
                squares += error**2
    return directions, sums, squares, names


def verify_unbiased(
    trainer, batch: dict | None = None, draws: int = 64, control_fraction: float | None = None, alpha: float = 1e-3, seed: int = 0,
    verbose: bool = True,
) -> UnbiasednessReport:
    """Checks that `trainer`'s sampled update averages to the exact gradient on `batch` (default: the first batch of
    its training data), for its model, loss and arguments, at `control_fraction` (default: the trainer's, 0.5 at f = 1
    unless `weight_gradient_keep` < 1: every sampled backward also draws the weight gradients' token rows, at f = 1
    too). Nothing is trained and the model is left as it was. Prints the verdict (`verbose`) and returns an
    `UnbiasednessReport`; a failure means: do not train this setup at f < 1, and please report it.

    Cost: two forwards, one full backward and `draws` sampled backwards. Power: a bias along one of the directions of
    about `report.threshold / sqrt(draws)` standard deviations of a single draw is found half the time.
    """
    if draws < 5:
        raise ValueError(f"draws: {draws!r} is not allowed; use an integer >= 5 (the z-test needs a spread of draws).")
    fraction = trainer.sampling_fraction() if control_fraction is None else control_fraction
    tokens = getattr(trainer, "token_sampler", None) is not None  # at f = 1 the weight gradients' tokens are sampled
    if not (0 < fraction < 1 or (tokens and fraction == 1)):
        raise ValueError(
            f"control_fraction: {fraction!r} is not allowed; use a number in (0, 1){' or 1' if tokens else ': at 1 nothing is sampled'}."
        )
    start = time.perf_counter()
    if batch is None:
        with torch.random.fork_rng():  # the training data's shuffling stays as it would have been
            batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    inputs = trainer._prepare_inputs(batch)
    num_items = trainer._get_num_items_in_batch([inputs], trainer.args.device) if hasattr(trainer, "_get_num_items_in_batch") else None
    directions, sums, squares, names = gradient_error_statistics(trainer, model, inputs, num_items, fraction, draws, seed)
    report = report_from_statistics(directions, sums, squares, draws, names, fraction, alpha, trainer.args, time.perf_counter() - start)
    if verbose:
        print(report)
    return report


def rounding_floor(args) -> float:
    """The relative rounding floor for the precision `args` train in."""
    if getattr(args, "bf16", False):
        return ROUNDING_FLOOR[torch.bfloat16]
    if getattr(args, "fp16", False):
        return ROUNDING_FLOOR[torch.float16]
    return ROUNDING_FLOOR[torch.float32]


def report_from_statistics(directions, sums, squares, draws, names, fraction, alpha, args, seconds) -> UnbiasednessReport:
    z = z_scores(sums, squares, draws, directions.floors(rounding_floor(args))).abs()
    threshold = z_threshold(draws, directions.count, alpha)
    per_tensor = z[1 + RANDOM_DIRECTIONS :].reshape(-1, 2).amax(1).tolist()
    ranked = dict(sorted(zip(names, per_tensor), key=lambda item: -item[1]))
    worst = float(z.max())
    return UnbiasednessReport(
        passed=bool(worst <= threshold), worst_z=worst, threshold=threshold, draws=draws, control_fraction=fraction,
        seconds=seconds, directions=directions.count, per_tensor=ranked,
    )
