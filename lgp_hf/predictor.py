"""The linear gradient predictor: a control variate for the rows the sampled backward leaves out.

The sampled update is sum_i w_i g_i, w_i = 1{drawn} / pi_i, g_i row i's trunk gradient. With a prediction p_i that is
fixed once the forward and the head's backward have run (it never depends on the draw), the difference estimator

    sum_i w_i g_i + beta sum_i (1 - w_i) p_i  =  sum_i beta p_i + sum_i w_i (g_i - beta p_i)

is unbiased (E[w_i] = 1 under Poisson draws) with variance sum_i (1 - pi_i) / pi_i ||g_i - beta p_i||^2: below the
importance-sampled one's as far as p_i predicts g_i (`predicted_squared_norm_change` gives the difference per row).
Per trunk linear layer W (input x' = [x, 1] with a bias), the prediction is

    p_i(W) = M_W s_i xbar_i^T,   s_i = vec(sum_t (R^T dL/dh_it) (Q^T [h_it, 1])^T) (k^2 numbers),   xbar_i = sum_t x'_it,

s_i a sketch of the head's own per-row gradient: the boundary gradient and the boundary input h (the head's input),
each through a fixed random projection (`signal_projection`, `boundary_signals`); times the row's own summed input
to the layer. A linear map of what the head says about the example, shaped by the example's activations. The
correction sum_i (1 - w_i) p_i(W) is then one small product per layer, M_W Z_W with Z_W = sum_i (1 - w_i) s_i xbar_i^T
(`predicted_sum`; Z_W is k^2 x d_in), added to W's gradient by the boundary's backward (`boundary`): through
autograd, never into `.grad`.

M_W is a ridge least-squares fit over the drawn rows of earlier optimizer steps (never the rows it is applied to: that
would bias the estimate), weighted by the variance each row's residual adds, v_i = (1 - pi_i) / pi_i, made a
Horvitz-Thompson sum over the drawn rows by a further 1 / pi_i (`variance_weights`):

    M (sum_i v_i ||xbar_i||^2 s_i s_i^T + lambda I) = sum_i v_i (g_i xbar_i) s_i^T      (`fit_sums`, `predictor_map`),

where g_i xbar_i = sum_t delta_it (x'_it . xbar_i) needs only the layer's output error and input, read in the backward
(`row_products`). beta_W = sum_i v_i <g_i, p_i> / sum_i v_i ||p_i||^2, with the p_i of the map in use (out of sample:
the variance-optimal scale of an imperfect predictor). Every sum is an exponential moving average over optimizer
steps: d_out k^2 + k^4 numbers per layer (`LinearGradientPredictor`).
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .boundary import BoundaryDraw
from .row_norms import trunk_linear_layers

#: Seed of the signal projection R (a function of the boundary's width and k only: nothing to checkpoint).
PROJECTION_SEED = 2511_05187


def signal_projection(width: int, dims: int, device) -> torch.Tensor:
    """R (width x dims), entries N(0, 1 / dims): a fixed random projection of the boundary gradient, the same on every
    rank and after every resume."""
    generator = torch.Generator().manual_seed(PROJECTION_SEED + 1_000 * width + dims)
    return (torch.randn(width, dims, generator=generator) / dims**0.5).to(device)


def boundary_signals(gradient: torch.Tensor, hidden: torch.Tensor, dims: int) -> torch.Tensor:
    """s_i = vec(sum_t (R^T dL/dh_it) (Q^T [h_it, 1])^T) (rows x k^2, float32), t over the row's positions (all dims but
    the first and last): the head's per-row weight gradient dL/dh_i [h_i, 1]^T (for a linear head), sketched by R and
    Q (`signal_projection`). With a binary or scalar head dL/dh_i has one direction; h_i says which example it is."""
    rows, width = gradient.shape[0], gradient.shape[-1]
    g = gradient.detach().float().reshape(rows, -1, width)
    h = hidden.detach().float().reshape(rows, -1, width)
    h = torch.cat([h, h.new_ones(*h.shape[:-1], 1)], -1)
    left = g @ signal_projection(width, dims, gradient.device)
    right = h @ signal_projection(width + 1, dims, gradient.device)
    return torch.einsum("rtk,rtl->rkl", left, right).reshape(rows, dims * dims)


def input_sums(inputs: torch.Tensor, bias: bool) -> torch.Tensor:
    """xbar_i = sum_t x'_it (rows x (d_in + bias), float32), x' = [x, 1] with a bias (its last entry: the positions)."""
    rows = inputs.shape[0]
    x = inputs.detach().reshape(rows, -1, inputs.shape[-1])
    sums = x.sum(1, dtype=torch.float32)
    return torch.cat([sums, sums.new_full((rows, 1), x.shape[1])], 1) if bias else sums


def row_products(inputs: torch.Tensor, errors: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """g_i xbar_i = sum_t delta_it (x'_it . xbar_i) per row (rows x d_out, float32), g_i = sum_t delta_it x'_it^T the
    row's gradient of the layer: what the fit needs of g_i, at the cost of two batched matrix-vector products of the
    row's size."""
    rows = inputs.shape[0]
    x = inputs.detach().float().reshape(rows, -1, inputs.shape[-1])
    delta = errors.detach().float().reshape(rows, -1, errors.shape[-1])
    sums = sums.float()
    along = torch.bmm(x, sums[:, : x.shape[-1], None]).squeeze(2)  # x_it . xbar_i
    if sums.shape[1] > x.shape[-1]:  # the bias's constant input 1, times its sum (the positions)
        along = along + sums[:, -1:]
    return torch.bmm(along[:, None, :], delta).squeeze(1)


def variance_weights(probabilities: torch.Tensor, drawn: torch.Tensor, design: torch.Tensor | None = None) -> torch.Tensor:
    """v_i / pi_i on the drawn rows, 0 elsewhere, v_i = (1 - q_i) / q_i the variance a row's residual adds under the
    design q (default: the draw's own, q = pi): summed over the drawn rows, an unbiased estimate of the v-weighted sum
    over all rows. A draw that kept every row (f = 1: pi = 1, nothing to reduce) fits for another design this way."""
    safe = probabilities.where(drawn, torch.ones_like(probabilities))
    target = safe if design is None else design.to(safe).where(drawn, torch.ones_like(safe))
    return torch.where(drawn, (1 - target) / target / safe, torch.zeros_like(safe))


def fit_sums(products: torch.Tensor, signals: torch.Tensor, sums: torch.Tensor, weights: torch.Tensor):
    """(sum_i v_i (g_i xbar_i) s_i^T (d_out x m), sum_i v_i ||xbar_i||^2 s_i s_i^T (m x m)), m = k^2 the signal's
    size: the normal equations of the weighted least-squares fit of g_i on s_i xbar_i^T."""
    weights = weights.to(signals)
    return (products * weights[:, None]).mT @ signals, (signals * (weights * sums.pow(2).sum(1))[:, None]).mT @ signals


def regularised_inverses(covariances: torch.Tensor, ridge: float) -> torch.Tensor:
    """(S + lambda I)^-1 of each m x m S of a stack (float64), lambda = ridge x tr(S) / m (relative: invariant to the
    loss scale); 0 where S is 0 (no row with a variance weight yet). One batched call for every layer."""
    m = covariances.shape[-1]
    system = covariances.double()
    penalty = ridge * system.diagonal(dim1=-2, dim2=-1).sum(-1) / m
    positive = penalty > 0
    identity = torch.eye(m, dtype=torch.float64, device=covariances.device)
    inverse = torch.linalg.inv(system + penalty.where(positive, 1.0)[:, None, None] * identity)
    return inverse * positive[:, None, None]


def predictor_map(correlation: torch.Tensor, covariance: torch.Tensor, ridge: float) -> torch.Tensor:
    """M = C (S + lambda I)^-1 (`regularised_inverses`); 0 while S is."""
    return (correlation.double() @ regularised_inverses(covariance[None], ridge)[0]).to(correlation.dtype)


def predicted_sum(prediction_map: torch.Tensor, signals: torch.Tensor, sums: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i (1 - w_i) p_i = M Z, Z = sum_i (1 - w_i) s_i xbar_i^T (d_out x (d_in + bias)): k^2 d_in d_out operations,
    not one per row."""
    left = (1 - weights.to(signals))[:, None] * signals
    return prediction_map @ (left.mT @ sums)


def row_alignment(predicted_rows: torch.Tensor, products: torch.Tensor, sums: torch.Tensor):
    """(<g_i, p_i>, ||p_i||^2) per row, with M s_i given (`predicted_rows`): <g_i, M s_i xbar_i^T> = (M s_i) . (g_i xbar_i)
    and ||p_i||^2 = ||M s_i||^2 ||xbar_i||^2."""
    return (predicted_rows * products).sum(1), predicted_rows.pow(2).sum(1) * sums.pow(2).sum(1)


def predicted_squared_norm_change(cross: torch.Tensor, squares: torch.Tensor, coefficient: torch.Tensor) -> torch.Tensor:
    """||g_i - beta p_i||^2 - ||g_i||^2 = -2 beta <g_i, p_i> + beta^2 ||p_i||^2, per row, summed over layers (rows of
    `cross` and `squares`: layers x rows; `coefficient`: beta per layer)."""
    beta = coefficient[:, None].to(cross)
    return (beta**2 * squares - 2 * beta * cross).sum(0)


class LinearGradientPredictor:
    """The predictor of the trunk's linear layers (`trunk_linear_layers`): its fitted sums, and during a sampled
    micro-batch (`active`) the hooks that read what it needs and the terms the boundary adds.

    Per micro-batch: the forward records xbar_i of every layer (forward hooks; in a replayed block the forward without
    autograd, the replay coming after the draw); the boundary's backward calls `terms`, which returns beta M Z of
    every weight and bias (`parameters` order) and keeps s_i and M s_i; the layers' output errors then give g_i xbar_i
    of the rows backpropagated (`row_index`: their indices while a block is replayed on a subset). `finish_micro_batch`
    adds the micro-batch's rows to the optimizer step's sums and returns each row's change of ||g_i||^2 (for F);
    `end_step` folds the step's sums (averaged over ranks) into the moving averages. Nothing of a draw is used before
    its step has ended, so the map applied to a draw was fitted on earlier draws only.

    `applying`: whether `terms` returns the correction (else it only predicts, for F, and the fit goes on: how "auto"
    measures a predictor it does not use). `clock`: a callable returning seconds (waiting for the device), set on steps
    whose predictor work is timed; `take_seconds` returns the time spent in the predictor's own work since its last call.
    """

    def __init__(self, modules: list[nn.Module], dims: int, ridge: float, decay: float):
        self.layers = trunk_linear_layers(modules)
        self.dims, self.ridge, self.decay = dims, ridge, decay
        self.biased = [layer.bias is not None and layer.bias.requires_grad for layer in self.layers]
        count = len(self.layers)
        # moving averages: C (d_out x k^2), S (k^2 x k^2) per layer (None before any row), and sum v <g,p>, sum v ||p||^2
        self.correlations: list[torch.Tensor | None] = [None] * count
        self.covariances: list[torch.Tensor | None] = [None] * count
        self.alignment = torch.zeros(count, 2, dtype=torch.float64)
        self._maps: dict[int, torch.Tensor] = {}  # M per layer, for the moving averages as they are
        self.applying = True
        self.clock = None
        self._seconds = 0.0
        self._reset_step()
        self._reset_micro_batch()

    def parameters(self) -> list[nn.Parameter]:
        """The weights and trainable biases the predictor corrects, in the order of `terms`."""
        return [p for layer, biased in zip(self.layers, self.biased) for p in ((layer.weight, layer.bias) if biased else (layer.weight,))]

    def coefficients(self) -> torch.Tensor:
        """beta per layer: sum v <g, p> / sum v ||p||^2 of the moving averages (0 before any prediction)."""
        cross, squares = self.alignment[:, 0], self.alignment[:, 1]
        return torch.where(squares > 0, cross / squares.where(squares > 0, 1.0), 0.0)

    def state_size(self) -> int:
        """Numbers held between steps (the fitted sums): d_out k^2 + k^4 + 2 per layer."""
        signal = self.dims**2
        return sum(layer.weight.numel() // self._inputs(index) * signal + signal**2 + 2 for index, layer in enumerate(self.layers))

    @contextlib.contextmanager
    def _timed(self):
        """Adds the time inside to `take_seconds` when a `clock` is set."""
        clock = self.clock
        begun = clock() if clock is not None else None
        try:
            yield
        finally:
            if begun is not None:
                self._seconds += clock() - begun

    def take_seconds(self) -> float:
        seconds, self._seconds = self._seconds, 0.0
        return seconds

    def _inputs(self, index: int) -> int:
        layer = self.layers[index]
        return layer.weight.shape[0] if isinstance(layer, Conv1D) else layer.weight.shape[1]

    def _reset_step(self) -> None:
        self._step_sums: list[list[torch.Tensor] | None] = [None] * len(self.layers)  # C, S, [v <g,p>, v ||p||^2]

    def _reset_micro_batch(self) -> None:
        self._sums: dict[int, torch.Tensor] = {}  # xbar per layer
        self._products: dict[int, torch.Tensor] = {}
        self._predicted_rows: dict[int, torch.Tensor] = {}  # M s_i per layer with a map
        self._signals: torch.Tensor | None = None
        self._draw: BoundaryDraw | None = None
        self._last_input: tuple | None = None  # (input, bias, its sums) of the last layer call in the forward

    @contextlib.contextmanager
    def active(self, row_index):
        """The hooks of one micro-batch's forward and backward(s); `row_index()` as `replay.BlockReplay.row_index`."""
        self._reset_micro_batch()

        def watch(index):
            def hook(module, args, output):
                if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() < 2:
                    return
                inputs = args[0]
                if self._draw is None:  # the forward: xbar (summed over calls of a shared layer)
                    with self._timed():
                        sums = self._input_sums(inputs, self.biased[index])
                        previous = self._sums.get(index)
                        self._sums[index] = sums if previous is None or previous.shape != sums.shape else previous + sums
                if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
                    rows = row_index()
                    output.register_hook(lambda errors: self._read(index, inputs, errors, rows))

            return hook

        handles = [layer.register_forward_hook(watch(index)) for index, layer in enumerate(self.layers)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _input_sums(self, inputs: torch.Tensor, bias: bool) -> torch.Tensor:
        """`input_sums`, once for layers that read the same input in turn (an attention's query, key and value)."""
        if self._last_input is None or self._last_input[0] is not inputs or self._last_input[1] != bias:
            self._last_input = (inputs, bias, input_sums(inputs, bias))
        return self._last_input[2]

    def _read(self, index: int, inputs: torch.Tensor, errors: torch.Tensor, rows: torch.Tensor | None) -> None:
        """g_i xbar_i of the rows of one call of layer `index` (as read: drawn rows weighted 1 / pi_i)."""
        with self._timed():
            self._add_products(index, inputs, errors, rows)

    def _add_products(self, index: int, inputs: torch.Tensor, errors: torch.Tensor, rows: torch.Tensor | None) -> None:
        sums = self._sums.get(index)
        if sums is None or self._draw is None:
            return
        if rows is None and inputs.shape[0] != sums.shape[0]:
            return
        if rows is not None:
            sums = sums.index_select(0, rows.to(sums.device))
            if inputs.shape[0] != sums.shape[0]:
                return
        products = row_products(inputs, errors, sums)
        total = self._products.get(index)
        if total is None:
            total = self._products[index] = products.new_zeros(self._sums[index].shape[0], products.shape[1])
        if rows is None:
            total.add_(products)
        else:
            total.index_add_(0, rows.to(total.device), products)

    def terms(self, gradient: torch.Tensor, hidden: torch.Tensor, draw: BoundaryDraw) -> list[torch.Tensor | None]:
        """beta M Z of every parameter (`parameters` order; None where there is nothing to add, and everywhere when not
        `applying`), for the draw just made at the boundary from `gradient` (dL/dh, before the draw's weights) at
        `hidden` (h): in the parameter's shape and dtype. Keeps the rows' predictions M s_i either way."""
        with self._timed():
            return self._terms(gradient, hidden, draw)

    def _terms(self, gradient: torch.Tensor, hidden: torch.Tensor, draw: BoundaryDraw) -> list[torch.Tensor | None]:
        self._products, self._predicted_rows = {}, {}
        self._draw, self._last_input = draw, None
        self._signals = signals = boundary_signals(gradient, hidden, self.dims)
        weights = torch.where(draw.drawn, 1.0 / draw.probabilities.where(draw.drawn, 1.0), 0.0).to(signals.device)
        correcting = self.applying and not draw.uniform and not bool(draw.drawn.all())
        coefficients = self.coefficients()
        terms = []
        for index, layer in enumerate(self.layers):
            sums, correlation = self._sums.get(index), self.correlations[index]
            term = None
            if correlation is not None and sums is not None and sums.shape[0] == signals.shape[0]:
                prediction_map = self._map(index, signals.device)
                self._predicted_rows[index] = signals @ prediction_map.mT
                beta = float(coefficients[index])
                if correcting and beta != 0:
                    term = beta * predicted_sum(prediction_map, signals, sums, weights)
            terms.extend(self._split(index, layer, term))
        return terms

    def _map(self, index: int, device) -> torch.Tensor:
        """M of layer `index` (`predictor_map`): every fitted layer's at once (`regularised_inverses`), once per change of
        the moving averages."""
        if not self._maps:
            fitted = [i for i, correlation in enumerate(self.correlations) if correlation is not None]
            inverses = regularised_inverses(torch.stack([self.covariances[i] for i in fitted]).to(device), self.ridge)
            self._maps = {i: (self.correlations[i].to(device).double() @ inverse).to(self.correlations[i].dtype) for i, inverse in zip(fitted, inverses)}
        return self._maps[index]

    def _split(self, index: int, layer: nn.Module, term: torch.Tensor | None) -> list[torch.Tensor | None]:
        """A layer's d_out x (d_in + bias) term as its weight's (and bias's) gradient."""
        parts = 2 if self.biased[index] else 1
        if term is None:
            return [None] * parts
        weight = term[:, : self._inputs(index)]
        weight = weight.mT if isinstance(layer, Conv1D) else weight
        out = [weight.to(layer.weight.dtype).contiguous()]
        if parts == 2:
            out.append(term[:, -1].to(layer.bias.dtype))
        return out

    def finish_micro_batch(self, design: torch.Tensor | None = None) -> torch.Tensor | None:
        """After the micro-batch's backward: its drawn rows join the step's fit sums, and the change of each row's
        ||g_i||^2 under the predictor in use, -2 beta <g_i, p_i> + beta^2 ||p_i||^2 summed over layers (float64, CPU; None
        when the draw was uniform or is not there). `design`: the inclusion probabilities whose variance the fit
        weights (`variance_weights`), when not the draw's own (at f = 1, those of the fraction "auto" considers)."""
        with self._timed():
            return self._finish_micro_batch(design)

    def _finish_micro_batch(self, design: torch.Tensor | None) -> torch.Tensor | None:
        draw, signals = self._draw, self._signals
        if draw is None or draw.uniform or signals is None or not bool(torch.isfinite(signals).all()):
            return None
        probabilities = draw.probabilities.to(signals.device, torch.float32)
        weights = variance_weights(probabilities, draw.drawn.to(signals.device), None if design is None else design.to(signals.device))
        unweight = torch.where(draw.drawn.to(signals.device), probabilities, 0.0)[:, None]  # the read rows carry 1 / pi_i
        coefficients = self.coefficients()
        changes = torch.zeros(signals.shape[0], dtype=torch.float64)
        for index, read in self._products.items():
            sums = self._sums[index]
            if sums.shape[0] != signals.shape[0]:  # this layer's rows are not the boundary's
                continue
            products = read * unweight
            if not bool(torch.isfinite(products).all()):
                continue
            correlation, covariance = fit_sums(products, signals, sums, weights)
            alignment = torch.zeros(2, dtype=torch.float64)
            predicted = self._predicted_rows.get(index)
            if predicted is not None:
                cross, squares = row_alignment(predicted, products, sums)
                alignment = torch.stack([(weights * cross).sum(), (weights * squares).sum()]).double().cpu()
                changes += predicted_squared_norm_change(cross[None], squares[None], coefficients[index : index + 1]).double().cpu()
            step = self._step_sums[index]
            self._step_sums[index] = [correlation, covariance, alignment] if step is None else [
                step[0] + correlation, step[1] + covariance, step[2] + alignment]
        return changes

    def end_step(self, reduce) -> None:
        """Folds the optimizer step's sums into the moving averages. `reduce` sums a flat float64 tensor over ranks
        (the identity on one process): every rank must call it with the same layout, so layers that no rank read this
        step contribute zeros, and every rank then holds the same sums."""
        with self._timed():
            self._end_step(reduce)

    def _end_step(self, reduce) -> None:
        present = [index for index, sums in enumerate(self._step_sums) if sums is not None]
        flags = reduce(torch.tensor([float(sums is not None) for sums in self._step_sums], dtype=torch.float64))
        layers = [index for index in range(len(self.layers)) if float(flags[index]) > 0]
        if not layers:
            self._reset_step()
            return
        pieces, shapes = [], []
        for index in layers:
            sums = self._step_sums[index] if index in present else None
            out_features = self.layers[index].weight.numel() // self._inputs(index)
            signal = self.dims**2
            shape = [(out_features, signal), (signal, signal), (2,)]
            values = sums if sums is not None else [torch.zeros(s, dtype=torch.float64) for s in shape]
            pieces.extend(v.double().cpu().reshape(-1) for v in values)
            shapes.append(shape)
        flat = reduce(torch.cat(pieces))
        offset = 0
        for index, shape in zip(layers, shapes):
            values = []
            for size in shape:
                count = int(torch.tensor(size).prod())
                values.append(flat[offset : offset + count].reshape(size))
                offset += count
            correlation, covariance, alignment = values
            self.correlations[index] = self._average(self.correlations[index], correlation.float())
            self.covariances[index] = self._average(self.covariances[index], covariance.float())
            self.alignment[index] = self.decay * self.alignment[index] + (1 - self.decay) * alignment
        self._maps = {}
        self._reset_step()

    def _average(self, old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        return (1 - self.decay) * new if old is None else self.decay * old + (1 - self.decay) * new

    def state_dict(self) -> dict:
        return {"correlations": [None if c is None else c.clone() for c in self.correlations],
                "covariances": [None if c is None else c.clone() for c in self.covariances],
                "alignment": self.alignment.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.correlations = [None if c is None else c.clone() for c in state["correlations"]]
        self.covariances = [None if c is None else c.clone() for c in state["covariances"]]
        self.alignment = state["alignment"].clone()
        self._maps = {}
