"""Chunk contrasts: more fit data for the predictor from the control backward it already runs (issue 14).

A control batch gives the predictor one (signal, trunk gradient) pair, its sums. What the estimator's variance
depends on is how the per-example residuals r_i = g_i - A s_i spread within a batch (the split C of B is drawn
within it), and one pair per batch says little about that. Split the control batch into K chunks of n_k examples
with sums R_k. The K - 1 contrasts

    c_j = sum_k H_jk R_k / sqrt(n_k),    H (K-1 x K): orthonormal rows orthogonal to (sqrt(n_1), ..., sqrt(n_K)),

have, for i.i.d. examples, no mean and each the covariance of one example, and are uncorrelated: a ridge fit on
contrast pairs (signal contrast, gradient contrast) is least squares on the within-batch spread of the residuals,
the quantity the control variate removes (`contrast_matrix`).

The chunk gradients cost no extra backward for linear layers: y = x W^T + b has dL/dW = sum_i delta_i^T x_i over
examples (and positions), so the K chunk sums delta_k^T x_k take the multiplications of the one sum, from the
layer's input (kept by a forward hook, the tensor autograd keeps anyway) and its output error (a tensor hook) during
the control backward (`linear_gradient_contrasts`, `ChunkContrasts`). Covered: `nn.Linear` and transformers'
`Conv1D` (GPT-2), also as the `lora_A`/`lora_B` layers of peft's LoRA. Other trunk tensors (embeddings, norms,
convolutions) have no chunk gradient here: their contrast is recorded as zero (the pairs say nothing about them and
beta, fitted per tensor on whole batches, scales their predictions). The signal contrasts come from the same
backward: the logit error per example (`"ntk"`), or the head's linear layers (`"window"`; other head parameters
zero). Any of this only changes what the predictor learns from earlier control batches, never the estimator's
unbiasedness.

Measured on the example's ViT (benchmarks/README.md, "Chunk contrasts"): per-example contrasts (K = control batch
size) raise the held-out variance explained from 0.03 to 0.14 (head gradient) and from 0.007 to 0.08 (logit
error) over the first 100 steps; chunks of 4 examples gain almost nothing.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch import nn

from .costs import Stopwatch
from .estimator import running_sum


def chunk_sizes(num_examples: int, num_chunks: int) -> list[int]:
    """Sizes of min(K, n) contiguous chunks of n examples, as equal as possible (the first n mod K one larger)."""
    count = min(num_chunks, num_examples)
    return [num_examples // count + (1 if k < num_examples % count else 0) for k in range(count)]


def contrast_matrix(sizes: list[int]) -> torch.Tensor:
    """(K-1 x K) float64: entry (j, k) = H_jk / sqrt(n_k), so that row j applied to the chunk sums is contrast c_j.

    H completes u = sqrt(n) / ||sqrt(n)|| to an orthonormal basis (QR of [u, I]): its rows are orthonormal and
    orthogonal to u, so sum_k H_jk sqrt(n_k) = 0 (a common mean cancels) and, for examples of covariance S, every
    contrast has covariance S and no two are correlated."""
    root = torch.tensor(sizes, dtype=torch.float64).sqrt()
    basis = torch.linalg.qr(torch.cat([(root / root.norm())[:, None], torch.eye(len(sizes), dtype=torch.float64)], 1)).Q
    return basis[:, 1:].T / root


def linear_gradient_contrasts(
    inputs: torch.Tensor, errors: torch.Tensor, contrast: torch.Tensor, sizes: list[int], transposed: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contrasts (J x weight shape, J x out) of a linear layer's weight and bias gradients over chunks of examples.

    `inputs` (n x ... x in) and `errors` (n x ... x out, dL/d output) have the examples along their first dimension,
    in chunks of `sizes`; `contrast` is `contrast_matrix(sizes)`. The chunk gradients delta_k^T x_k (x_k^T delta_k
    for transformers' `Conv1D`, `transposed`, whose weight is in x out) take one product per chunk: together the
    multiplications of the layer's own weight gradient. Computed in float32.
    """
    n = sum(sizes)
    inputs = inputs.reshape(n, -1, inputs.shape[-1]).float()
    errors = errors.reshape(n, -1, errors.shape[-1]).float()
    if len(set(sizes)) == 1:  # equal chunks: one batched product
        x, delta = inputs.reshape(len(sizes), -1, inputs.shape[-1]), errors.reshape(len(sizes), -1, errors.shape[-1])
        weights, biases = (x.mT @ delta if transposed else delta.mT @ x), delta.sum(1)
    else:
        weights, biases = [], []
        for x, delta in zip(inputs.split(sizes), errors.split(sizes)):
            x, delta = x.reshape(-1, x.shape[-1]), delta.reshape(-1, delta.shape[-1])
            weights.append(x.T @ delta if transposed else delta.T @ x)
            biases.append(delta.sum(0))
        weights, biases = torch.stack(weights), torch.stack(biases)
    contrast = contrast.to(device=inputs.device, dtype=torch.float32)
    return torch.einsum("jk,k...->j...", contrast, weights), contrast @ biases


def per_example_contrasts(values: torch.Tensor, contrast: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """(J x width): contrasts of per-example sums of `values` (n x ... x width, e.g. the logit errors at every
    position), in float32."""
    n = sum(sizes)
    per_example = values.reshape(n, -1, values.shape[-1]).float().sum(1)
    sums = torch.stack([chunk.sum(0) for chunk in per_example.split(sizes)])
    return contrast.to(device=values.device, dtype=torch.float32) @ sums


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # transformers.pytorch_utils.Conv1D


class ChunkContrasts:
    """Hooks on a model's linear layers that compute, during the control backward, the chunk contrasts of their
    parameter gradients (trunk) and of the predictor's signal.

    `trunk_params`, `head_params`: the partition's lists; `shared`: ids of parameters in both (their chunk gradient
    would mix the two uses: left out); `encode(index, rows)`: the form kept of trunk tensor `index`'s J contrasts
    (J x its shape), a list of J (the predictor's `encode_stack`). Use: the control forward inside `recording(n)`,
    then the backward inside `active(scale)`, then `take()`. A layer's contrasts are encoded as soon as the last
    backward through it has run, so that at most J raw copies of one layer are alive at a time; only the layers'
    inputs are held from forward to backward (autograd holds them too, except under gradient checkpointing,
    where these hooks keep them through the backward; with `use_reentrant=True` checkpointing the checkpointed
    layers run their forward without autograd, so they get no contrasts).
    """

    def __init__(self, model: nn.Module, trunk_params: list, head_params: list, shared: set[int], num_chunks: int, signal: str, encode):
        trunk_index = {id(p): i for i, p in enumerate(trunk_params)}
        head_index = {id(p): i for i, p in enumerate(head_params)}
        self.num_chunks, self.signal, self.encode = num_chunks, signal, encode
        self.head_numels = [p.numel() for p in head_params]
        # the raw signal width: the head's size, or the logits' (known at the first `watch_logits`)
        self.signal_width = sum(self.head_numels) if signal == "head_gradient" else None
        self.trunk_shapes = [p.shape for p in trunk_params]
        # module -> (side, weight index, bias index): indices into trunk_params ("trunk") or head_params ("head")
        self.layers: dict[nn.Module, tuple[str, int | None, int | None]] = {}
        for module in model.modules():
            if not _is_linear(module):
                continue
            params = [getattr(module, "weight", None), getattr(module, "bias", None)]
            params = [p if p is not None and p.requires_grad and id(p) not in shared else None for p in params]
            # head layers only for the head-gradient signal: the logit-error signal comes from the logits
            sides = (("trunk", trunk_index), ("head", head_index)) if signal == "head_gradient" else (("trunk", trunk_index),)
            for side, index in sides:
                found = [None if p is None else index.get(id(p)) for p in params]
                if any(i is not None for i in found):
                    self.layers[module] = (side, *found)
                    break
        self._clear()

    def _clear(self) -> None:
        self.sizes: list[int] | None = None
        self.contrast: torch.Tensor | None = None
        self.trunk: dict[int, torch.Tensor] = {}  # raw J x numel sums, until their layer's last backward
        self.encoded: dict[int, list] = {}
        self.head: dict[int, torch.Tensor] = {}
        self.logit_error: torch.Tensor | None = None
        self.incomplete: set[tuple[str, int]] = set()
        self.calls: dict[nn.Module, int] = {}  # per layer, recorded calls whose backward has not run yet
        self.finite = True
        self.seconds = 0.0
        self.scale = 1.0
        self._active = False

    @property
    def trunk_coverage(self) -> float:
        """Fraction of the trunk's parameters that get chunk gradients."""
        covered = {i for side, *indices in self.layers.values() if side == "trunk" for i in indices if i is not None}
        total = sum(shape.numel() for shape in self.trunk_shapes)
        return sum(self.trunk_shapes[i].numel() for i in covered) / total if total else 0.0

    @contextmanager
    def recording(self, num_examples: int, synchronize: bool = False):
        """Forward hooks on the covered layers for a forward of `num_examples` examples (at least 2)."""
        self._clear()
        self.sizes = chunk_sizes(num_examples, self.num_chunks)
        self.contrast = contrast_matrix(self.sizes)
        self._synchronize = synchronize
        collector = weakref.ref(self)  # the tensor hooks must not keep this object (and its sums) in a cycle

        def keep_input(module, args, output):
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                return
            side, *indices = self.layers[module]
            x = args[0].detach() if args and isinstance(args[0], torch.Tensor) else None
            if x is None or x.dim() < 2 or x.shape[0] % num_examples or output.shape[0] != x.shape[0]:
                self.incomplete.update((side, i) for i in indices if i is not None)  # examples not along dim 0
                return
            transposed = type(module).__name__ == "Conv1D"
            self.calls[module] = self.calls.get(module, 0) + 1
            output.register_hook(lambda error: collector()._add_layer(module, side, indices, x, error, transposed))

        handles = [module.register_forward_hook(keep_input) for module in self.layers]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def watch_logits(self, logits: torch.Tensor) -> None:
        """The logit-error signal's contrasts, from the logits' gradient in the active backward (`"ntk"`)."""
        if self.signal != "logit_error":
            return
        self.signal_width = logits.shape[-1]
        if not logits.requires_grad:
            return
        collector = weakref.ref(self)

        def keep(error):
            self = collector()
            if self._active and error is not None:
                if error.shape[0] % sum(self.sizes):
                    self.incomplete.add(("logits", 0))
                    return
                self.logit_error = running_sum(self.logit_error, per_example_contrasts(error, self.contrast, self.sizes))

        logits.register_hook(keep)

    @contextmanager
    def active(self, scale: float = 1.0):
        """The backward in which the hooks compute (other backward passes through the same graph are ignored); its
        contrasts are divided by `scale` (the loss scale, and the number of DDP ranks: `.grad`'s units)."""
        self._active, self.scale = True, scale
        try:
            yield
        finally:
            self._active = False

    def _add_layer(self, module: nn.Module, side: str, indices: list, x: torch.Tensor, error: torch.Tensor, transposed: bool) -> None:
        if not self._active or error is None:
            return
        watch = Stopwatch(error.device, self._synchronize)
        sums = self.trunk if side == "trunk" else self.head
        weight, bias = linear_gradient_contrasts(x, error, self.contrast, self.sizes, transposed)
        for index, value in zip(indices, (weight, bias)):
            if index is not None:
                sums[index] = running_sum(sums.get(index), value.reshape(len(value), -1))
        self.calls[module] -= 1
        if side == "trunk" and self.calls[module] == 0:  # this layer's gradient is complete
            for index in indices:
                if index is not None:
                    self._encode(index)
        self.seconds += watch.lap()

    def _encode(self, index: int) -> None:
        rows = self.trunk.pop(index) / self.scale
        if ("trunk", index) in self.incomplete:
            return
        if not torch.isfinite(rows.sum()):
            self.finite = False  # an fp16 overflow: no pair of this batch is kept
            return
        self.encoded[index] = self.encode(index, rows.view(len(rows), *self.trunk_shapes[index]))

    def take(self) -> tuple[torch.Tensor | None, dict[int, list]]:
        """(signal contrasts J x raw width, {trunk index: its J encoded contrasts}) of the last active backward, in
        `.grad`'s units; signals None when no pair should be kept (not formed, or not finite). Tensors without a
        complete chunk gradient (a call whose examples were not along dim 0) are left out."""
        for index in list(self.trunk):  # layers whose output had no gradient in some call: what came is all of it
            self._encode(index)
        scale = self.scale
        if self.signal == "logit_error":
            signals = None if self.logit_error is None or ("logits", 0) in self.incomplete else self.logit_error / scale
        else:
            rows = len(self.sizes) - 1
            parts = [
                self.head[i] / scale if i in self.head and ("head", i) not in self.incomplete else None
                for i in range(len(self.head_numels))
            ]
            device = next((p.device for p in parts if p is not None), None)
            signals = None if device is None else torch.cat([
                torch.zeros(rows, numel, device=device) if p is None else p for p, numel in zip(parts, self.head_numels)
            ], 1)
        if signals is not None and not (self.finite and torch.isfinite(signals).all()):
            signals = None
        encoded, self.encoded, self.head, self.logit_error = self.encoded, {}, {}, None
        return signals, encoded


def _pieces(part) -> tuple:
    """The tensors of one encoded trunk tensor: (U, V) when compressed, else its dense values."""
    return part if isinstance(part, tuple) else (part,)


def pack_pairs(pairs: list, template: list, width: int) -> torch.Tensor:
    """(pairs x (w + sum of the encoded sizes)) float32: each (signal, encoded tensors) pair as one row, a missing
    pair ((None, None)) as a row of NaN; `template`: one pair's encoded tensors (their shapes), `width`: w. The
    rows of several processes can then be gathered as one tensor."""
    length = width + sum(piece.numel() for part in template for piece in _pieces(part))
    rows = torch.full((len(pairs), length), float("nan"), device=_pieces(template[0])[0].device if template else "cpu")
    for row, (signal, parts) in zip(rows, pairs):
        if signal is not None:
            row.copy_(torch.cat([signal.reshape(-1), *(piece.reshape(-1) for part in parts for piece in _pieces(part))]))
    return rows


def unpack_pairs(rows: torch.Tensor, template: list, width: int) -> list:
    """The pairs of `pack_pairs` rows (views into them), NaN rows left out."""
    pairs = []
    for row in rows:
        if torch.isnan(row).any():
            continue
        signal, offset, parts = row[:width], width, []
        for part in template:
            pieces = []
            for piece in _pieces(part):
                pieces.append(row[offset : offset + piece.numel()].view(piece.shape))
                offset += piece.numel()
            parts.append(tuple(pieces) if isinstance(part, tuple) else pieces[0])
        pairs.append((signal, parts))
    return pairs
