"""Weight gradients of the trunk's linear layers from sampled token rows (`weight_gradient_keep`).

In the backward of a linear layer y = x W^T + b over its token rows t (batch x positions, flattened), dX = dY W carries
the gradient on down and stays exact, and so does the cheap db = sum_t dy_t; the weight gradient

    dW = sum_t dy_t x_t^T

is one rank-one term per token row and ends at the layer, so an unbiased estimate of it keeps everything below exact.
Token rows are drawn by Poisson sampling with probabilities p_t (`token_probabilities`) and

    dW_hat = sum_t w_t dy_t x_t^T,   w_t = 1{drawn} / p_t,   E[dW_hat] = dW,
    E ||dW_hat - dW||^2 = sum_t (1 - p_t) / p_t ||dy_t||^2 ||x_t||^2        (`token_variances`),

as ||dy_t x_t^T|| = ||dy_t|| ||x_t||: the variance is smallest for p_t proportional to that score (`token_scores`;
VCAS's leverage scores, Wang et al. 2024), mixed with uniform (`sampling_uniform_mix`) to bound w_t. Token rows with
score 0 (dy_t = 0: positions without a gradient, rows the boundary did not draw) have no term: they get p_t = 0, and
the share k and the mix are taken among the token rows with a term, so no draw is spent on them.

Given the boundary's row draw the token draws are independent of it, so the update's variance is the rows' plus the
expected token variance: F counts both (`row_token_variances`, `token_variance_sums`). Each layer call draws with
its own generator, seeded by the micro-batch's seed and the call's index (`WeightGradientSampler`): resumes draw alike.
Replayed blocks take the draws in their taped linear layers (`replay._TapedLinear`); blocks run with plain autograd
(f = 1, dense blocks, the user's gradient checkpointing) get the same function in place of their linear calls
(`SampledWeightGradients`, active around every run of a trunk block: `sampled_weight_gradients`). Under
`weight_gradient_keep="auto"` the keep is one of 1 and `KEEP_CANDIDATES`, and a layer call is sampled only where
`costs.WeightGradientCalibration` prices its sampling below its exact product.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .replay import _TapedLinear, linear_call, linear_weight_gradient
from .sampling import capped_probabilities, poisson_draw, skip_odds

#: The keeps below 1 that `weight_gradient_keep="auto"` chooses from (with 1: every weight gradient exact).
KEEP_CANDIDATES = (0.5, 0.25)


def token_scores(errors: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """s_t = ||dy_t|| ||x_t||, the norm of token row t's term of dW, for 2-D `errors` (T x d_out) and `inputs`
    (T x d_in): float64 (probabilities are divided by), on their device."""
    return token_norms(errors) * token_norms(inputs)


def token_norms(inputs: torch.Tensor) -> torch.Tensor:
    """The norm of each token row of a 2-D `inputs` (x_t, or dy_t): computed in float32 at least (a float64 reduction
    is many times slower on a CPU), returned in float64."""
    return inputs.detach().to(torch.promote_types(inputs.dtype, torch.float32)).norm(dim=1).double()


def token_probabilities(scores: torch.Tensor, keep: float, uniform_mix: float) -> torch.Tensor:
    """p_t: `sampling.inclusion_probabilities` at share `keep` and `uniform_mix` among the token rows with a positive
    score (sum p_t = keep x their count), 0 on the others, on the scores' device; 1 everywhere when a score is not
    finite (an overflow: the weight gradient is then computed exactly)."""
    total = float(scores.sum())
    if not math.isfinite(total):
        return torch.ones_like(scores, dtype=torch.float64)
    if total <= 0:
        return torch.zeros_like(scores, dtype=torch.float64)
    active = scores > 0
    count = active.sum(dtype=torch.float64)
    weights = (1 - uniform_mix) * scores.double() / total + uniform_mix * active.double() / count
    return capped_probabilities(weights, keep * count)


def token_variances(probabilities: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(1 - p_t) / p_t s_t^2 per token row: its share of E ||dW_hat - dW||^2 (0 where p_t is 0 or 1)."""
    return skip_odds(probabilities, torch.where(probabilities < 1, scores.double() ** 2, 0.0))


def sampled_weight_gradient(
    errors: torch.Tensor, inputs: torch.Tensor, probabilities: torch.Tensor, drawn: torch.Tensor, transposed: bool = False
) -> torch.Tensor:
    """dW_hat = sum over the drawn token rows of dy_t x_t^T / p_t (d_out x d_in; d_in x d_out when `transposed`, as
    `Conv1D` keeps its weight), in the dtype of `errors`. The weights 1 / p_t scale the narrower of the two factors
    (fewer products), in float32 at least: rounding 1 / p_t to bf16 would bias it."""
    index = drawn.nonzero().squeeze(1)
    weights = (1 / probabilities[index]).to(torch.promote_types(errors.dtype, torch.float32))[:, None]
    errors, inputs = errors.index_select(0, index), inputs.index_select(0, index)
    if errors.shape[1] <= inputs.shape[1]:
        errors = (errors * weights).to(errors.dtype)
    else:
        inputs = (inputs * weights).to(inputs.dtype)
    return linear_weight_gradient(errors, inputs, transposed)


def row_token_variances(scores: torch.Tensor, rows: int, keep: float, uniform_mix: float) -> torch.Tensor:
    """Per row of one layer call over `rows` rows, from its token rows' `scores` (`token_scores` of the call's inputs
    and output errors, flattened rows x positions), the `token_variances` of its token rows summed: the variance the
    call's token draw adds, attributed to the rows (float64, CPU). The probabilities are those the call's backward
    draws with (the same token rows and scores)."""
    return token_variances(token_probabilities(scores, keep, uniform_mix), scores).reshape(rows, -1).sum(1).cpu()


def token_variance_sums(
    candidates: torch.Tensor, probabilities: torch.Tensor, drawn: torch.Tensor, row_variances: torch.Tensor
) -> torch.Tensor:
    """Horvitz-Thompson estimates, from the rows drawn at `probabilities`, of the token variance of the update under
    each row design of `candidates` (k x n inclusion probabilities): sum over the drawn rows of V_i pi_i / q_i; per
    column of `row_variances` when it has two (n x keeps: k x keeps sums).

    V_i (`row_token_variances`) is read with row i's gradient weighted 1 / pi_i; the token variance scales with the
    gradient squared, so at weight 1 / q_i it is T_i / q_i^2 with T_i = pi_i^2 V_i (the token probabilities taken as
    unchanged), and the row is drawn with probability q_i: sum_i T_i / q_i in expectation, each drawn row counting
    1 / pi_i. At the drawn design itself this is sum V_i, the variance the step's token draws added."""
    weighted = torch.where(drawn, probabilities, 0.0).double()
    values = row_variances.double() * (weighted if row_variances.dim() == 1 else weighted[:, None])
    positive = candidates > 0
    return torch.where(positive, 1 / candidates.double().where(positive, 1.0), 0.0) @ values


def token_seed(seed: int, call: int) -> int:
    """The seed of a micro-batch's `call`-th sampled layer call (its backward's order), from the micro-batch's seed."""
    return (seed * 1_000_033 + call + 1) % 2**63


class WeightGradientSampler:
    """The token draws of the weights in `weights` (the trunk's trainable linear weights): share `keep`, `uniform_mix`.

    `start(seed)` begins a micro-batch (or the unbiasedness check's backwards of one forward): its layer calls draw in
    turn with generators on the layer's device seeded by (seed, call index). `computed_tokens` / `total_tokens`: token
    rows whose term was computed, and token rows with a term, since `take_counts` (tensors on the device until then:
    no wait for it per call). Layers that read the same input in turn (q, k, v) take its norms once. With a
    `calibration` (`costs.WeightGradientCalibration`, under `weight_gradient_keep="auto"`), a layer call whose sampling
    would not save time at `keep` (for its shape and its rows with a term) computes its weight gradient exactly.
    """

    def __init__(self, weights: list[nn.Parameter], keep: float, uniform_mix: float, calibration=None):
        self.weight_ids = {id(weight) for weight in weights}
        self.keep, self.uniform_mix, self.calibration = keep, uniform_mix, calibration
        self.seed = self.calls = 0
        self.computed_tokens = self.total_tokens = 0
        self._last_input: tuple[torch.Tensor, tuple, torch.Tensor] | None = None  # (input, its key, its norms)

    def samples(self, weight: torch.Tensor) -> bool:
        return id(weight) in self.weight_ids

    def start(self, seed: int) -> None:
        self.seed, self.calls, self._last_input = seed, 0, None

    def weight_gradient(self, errors: torch.Tensor, inputs: torch.Tensor, transposed: bool) -> torch.Tensor:
        """dW_hat of one layer call from its 2-D `errors` and `inputs` (`sampled_weight_gradient`)."""
        scores = token_norms(errors) * self._input_norms(inputs)
        if self.calibration is not None:
            savings = self.calibration.savings(errors, inputs, transposed, int((scores > 0).sum()))
            if savings is None or savings[self.calibration.keeps.index(self.keep)] <= 0:
                return linear_weight_gradient(errors, inputs, transposed)
        probabilities = token_probabilities(scores, self.keep, self.uniform_mix)
        generator = torch.Generator(errors.device).manual_seed(token_seed(self.seed, self.calls))
        self.calls += 1
        drawn = poisson_draw(probabilities, generator)
        self.computed_tokens += drawn.sum()
        self.total_tokens += (probabilities > 0).sum()
        return sampled_weight_gradient(errors, inputs, probabilities, drawn, transposed)

    def _input_norms(self, inputs: torch.Tensor) -> torch.Tensor:
        """`token_norms` of an input, reused while the layers read the same values: the same memory, layout and
        version (each call's input is its own view; the last one is held, so that its memory cannot be taken by another
        tensor)."""
        key = (inputs.data_ptr(), inputs.shape, inputs.stride(), inputs.dtype, inputs.device, inputs._version)
        if self._last_input is None or self._last_input[1] != key:
            self._last_input = (inputs, key, token_norms(inputs))
        return self._last_input[2]

    def sampling(self) -> "SampledWeightGradients":
        """The function mode that routes the sampled weights' linear calls here (for a block's replay)."""
        return SampledWeightGradients(self)

    def take_counts(self) -> tuple[int, int]:
        """(token rows whose term was computed, token rows with a term) since the last call; forgets the held input."""
        counts = (int(self.computed_tokens), int(self.total_tokens))
        self.computed_tokens = self.total_tokens = 0
        self._last_input = None
        return counts


class SampledWeightGradients(TorchFunctionMode):
    """While active, every `F.linear` / `torch.addmm` (`Conv1D`) call under autograd whose weight the `sampler`
    samples runs as `replay._TapedLinear` with its output computed here and its weight gradient from sampled token
    rows. It saves what autograd saves for a linear layer, x and W: under autocast their casts, made here as the
    autocast kernel would (the casts' backward returns the gradients to the parameters' dtype)."""

    def __init__(self, sampler: WeightGradientSampler):
        super().__init__()
        self.sampler = sampler

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = linear_call(func, args, kwargs)
        if call is None or not torch.is_grad_enabled() or not self.sampler.samples(call[1]):
            return func(*args, **kwargs)
        x, weight, bias, transposed = call
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            x, weight, bias = (None if t is None else t.to(dtype) for t in (x, weight, bias))
        with torch.no_grad():
            output = torch.addmm(bias, x, weight) if transposed else func(x, weight, bias)
        return _TapedLinear.apply(x, weight, bias, output, transposed, False, self.sampler)


@contextlib.contextmanager
def sampled_weight_gradients(blocks: list[nn.Module], sampler: WeightGradientSampler):
    """While inside, every run of a block of `blocks` through its module call has `SampledWeightGradients` active: its
    forward and, under gradient checkpointing, its recomputation in the backward (hooks around the call: the autograd
    engine runs backwards without the caller's function modes). A replayed block's backward enters the mode itself
    (`replay.BlockReplay.weight_sampler`)."""
    modes = []

    def enter(module, args):
        modes.append(sampler.sampling())
        modes[-1].__enter__()

    def leave(module, args, output):
        modes.pop().__exit__(None, None, None)

    handles = [block.register_forward_pre_hook(enter) for block in blocks]
    handles += [block.register_forward_hook(leave, always_call=True) for block in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
