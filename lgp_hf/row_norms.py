"""Per-row squared norms of the trunk's linear-layer gradients, read in the backward: what F is estimated from.

"auto" needs ||g_i||^2, the squared norm of row i's trunk gradient, to estimate the variance factor F of candidate
control fractions (`sampling.variance_factor_sums`). For a linear layer y = x W^T + b the gradient of row i is
sum_t delta_it x_it^T (and sum_t delta_it for the bias), t over the row's positions, so its norm needs only the
layer's input x (kept by a forward hook: autograd keeps it anyway) and output error delta (a tensor hook), read
during the backward the step runs anyway (`linear_row_squared_norms`). Covered: `nn.Linear` (LoRA's adapters too)
and transformers' `Conv1D` inside the trunk's blocks, which hold most of a transformer's parameters and of its
gradient; the F estimated from them stands for the whole trunk's. The rows' summed gradient of those layers, whose
squared norm with the rows' gives the gradient noise scale (`noise_scale`), is the one the backward hands their
parameters (read where it is accumulated: no second product), and, with weight gradients from sampled token rows,
the same hooks read the variance each row's token draws add
(`token_sampling.row_token_variances`: a function of the same inputs and output errors), at each keep "auto" may
choose, in the layers whose sampling pays there (`costs.WeightGradientCalibration`, timed on the same tensors), with
the seconds that keep would save.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from transformers.pytorch_utils import Conv1D

from .token_sampling import row_token_variances, token_scores


def linear_row_squared_norms(inputs: torch.Tensor, errors: torch.Tensor, bias: bool) -> torch.Tensor:
    """||sum_t delta_t x_t^T||_F^2 (+ ||sum_t delta_t||^2 with a bias) per row (dim 0), in float32.

    `inputs` (r x ... x a) and `errors` (r x ... x b): the positions of a row are all dims but the first and last.
    With T positions, the product is formed directly (r a b values, T a b multiply-adds per row) or, when cheaper,
    from the positions' Gram matrices: sum_{t,t'} (x_t . x_t')(delta_t . delta_t') (T^2 (a + b) per row).
    """
    rows = inputs.shape[0]
    x = inputs.detach().reshape(rows, -1, inputs.shape[-1]).float()
    delta = errors.detach().reshape(rows, -1, errors.shape[-1]).float()
    positions, a, b = x.shape[1], x.shape[2], delta.shape[2]
    if positions * (a + b) < a * b:
        norms = ((x @ x.mT) * (delta @ delta.mT)).sum(dim=(1, 2))
    else:
        norms = (delta.mT @ x).pow(2).sum(dim=(1, 2))
    if bias:
        norms = norms + delta.sum(dim=1).pow(2).sum(dim=1)
    return norms


def trunk_linear_layers(modules: list[nn.Module]) -> list[nn.Module]:
    """The trainable linear layers (`nn.Linear`, LoRA's adapters included, and transformers' `Conv1D`) in `modules`."""
    return [m for module in modules for m in module.modules() if isinstance(m, (nn.Linear, Conv1D)) and m.weight.requires_grad]


class RowGradientNorms:
    """Hooks on the linear layers of `modules` that add each row's squared gradient norm into `squared_norms`, and
    on their parameters' gradient accumulation (`AccumulateGrad`, run once per backward with the parameter's whole
    gradient there, not by the `torch.autograd.grad` of a block's replay) that hold the gradient each backward gives
    them in `batch_gradients` (`take_batch_squared_norm`: its squared norm; the update's, with its sampling variance); with a
    keep below 1 in `token_keeps` (`weight_gradient_keep`), each row's token sampling variance at each keep into
    `token_variances` (rows x keeps; 0 at keep 1). With a `calibration` (`weight_gradient_keep="auto"`), only layers
    whose sampling saves time at a keep are counted there, and `keep_savings` adds up the seconds they would save
    (scaled to all rows where the layer ran on a subset of them).

    Active only inside `recording(row_count, row_index)`. `row_count()` is the number of rows at the boundary (known
    once its backward has drawn, before any trunk backward: None when it drew nothing); `row_index()` returns, when a
    layer runs on a subset of the rows (a block's replay, `replay`), the indices of that subset (None: all rows). A
    layer call whose input does not have that many rows is skipped (its rows are not the batch's).
    """

    def __init__(self, modules: list[nn.Module], token_keeps: tuple[float, ...] = (1.0,), uniform_mix: float = 0.0, calibration=None):
        self.layers = trunk_linear_layers(modules)
        self.token_keeps, self.uniform_mix, self.calibration = tuple(token_keeps), uniform_mix, calibration
        self.squared_norms: torch.Tensor | None = None
        self.token_variances: torch.Tensor | None = None
        self.batch_gradients: dict[nn.Parameter, torch.Tensor] = {}  # by parameter
        self.keep_savings = [0.0] * len(self.token_keeps)

    def take_keep_savings(self) -> list[float]:
        """The seconds each keep would have saved in the recorded backwards since the last call."""
        savings, self.keep_savings = self.keep_savings, [0.0] * len(self.token_keeps)
        return savings

    def _token_terms(self, module, inputs, errors, index, rows: int) -> torch.Tensor:
        """Per row (rows x keeps), the token variance of this layer call at each keep where it is sampled; adds the
        seconds saved there to `keep_savings`."""
        variances = torch.zeros(inputs.shape[0], len(self.token_keeps), dtype=torch.float64)
        flat_errors, flat_inputs = errors.reshape(-1, errors.shape[-1]), inputs.reshape(-1, inputs.shape[-1])
        scores = token_scores(flat_errors, flat_inputs)  # once for every keep
        savings = None
        if self.calibration is not None:
            active = int((scores > 0).sum())
            seconds = self.calibration.savings(flat_errors, flat_inputs, isinstance(module, Conv1D), active, fit=True) or [0.0] * len(self.calibration.keeps)
            savings = dict(zip(self.calibration.keeps, seconds))
            scale = 1.0 if index is None else rows / max(index.numel(), 1)
        for column, keep in enumerate(self.token_keeps):
            if keep >= 1 or (savings is not None and savings[keep] <= 0):
                continue
            variances[:, column] = row_token_variances(scores, inputs.shape[0], keep, self.uniform_mix)
            if savings is not None:
                self.keep_savings[column] += savings[keep] * scale
        return variances

    def parameters(self) -> list[nn.Parameter]:
        """The layers' trainable weights and biases, each once."""
        return list({id(p): p for layer in self.layers for p in (layer.weight, layer.bias) if p is not None and p.requires_grad}.values())

    def take_batch_squared_norm(self) -> float:
        """The squared norm of the gradient the layers' parameters were given in the recorded backward: ||sum_i g_i||^2
        at f = 1 without token draws; with them, that of the update, whose expectation adds their variance (0 before
        any backward). Lets go of the gradients: they are not held until the next observed step."""
        gradients, self.batch_gradients = self.batch_gradients, {}
        return sum(float(gradient.double().pow(2).sum()) for gradient in gradients.values())

    @contextlib.contextmanager
    def recording(self, row_count, row_index):
        self.squared_norms, self.token_variances, self.batch_gradients = None, None, {}

        def watch(module, args, output):
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad and args):
                return
            inputs, index = args[0], row_index()

            def read(errors):
                rows = row_count()
                if rows is None or inputs.dim() < 2 or inputs.shape[0] != (rows if index is None else index.numel()):
                    return
                if self.squared_norms is None:
                    self.squared_norms = torch.zeros(rows, dtype=torch.float64)
                    sampled = any(keep < 1 for keep in self.token_keeps)
                    self.token_variances = torch.zeros(rows, len(self.token_keeps), dtype=torch.float64) if sampled else None
                bias = module.bias is not None and module.bias.requires_grad
                squares = linear_row_squared_norms(inputs, errors, bias).double().cpu()
                sums = [(self.squared_norms, squares)]
                if self.token_variances is not None:
                    sums.append((self.token_variances, self._token_terms(module, inputs, errors, index, rows)))
                for total, values in sums:
                    if index is None:
                        total.add_(values)
                    else:
                        total.index_add_(0, index.cpu(), values)

            output.register_hook(read)

        def accumulate(parameter, gradients):
            if gradients[0] is not None:  # several calls under reentrant checkpointing (a weight shared by blocks): one sum
                gradient, held = gradients[0].detach().float(), self.batch_gradients.get(parameter)
                self.batch_gradients[parameter] = gradient if held is None else held + gradient

        handles = [layer.register_forward_hook(watch) for layer in self.layers]
        # a parameter holds its node weakly: held here, it is the one the forwards inside link the parameter to
        with torch.enable_grad():
            nodes = [(parameter, get_gradient_edge(parameter).node) for parameter in self.parameters()]
        handles += [node.register_prehook(functools.partial(accumulate, parameter)) for parameter, node in nodes]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
