"""Trunk blocks whose backward runs on the rows that carry a gradient: where sampling saves compute.

Below the boundary, the rows that were not drawn have a zero gradient in every block whose rows do not interact (a
transformer layer: attention and MLP act within an example). An ordinary backward would still spend the full work
on them. While `BlockReplay.active`, each block of the trunk (transformers' `GradientCheckpointingLayer`s, the units
transformers itself replays under gradient checkpointing) runs its forward without autograd, keeping its inputs,
outputs and RNG state. In the backward the block finds the rows whose output gradient is not zero and replays its
forward on those rows alone, with autograd, then backpropagates them. The replay does not compute the drawn rows'
forward a second time: the operations that hold most of it (linear layers, activations, CPU flash attention) are
recorded in the forward with what their backward needs (`_Tape`: the tensors autograd would keep anyway), and the
replay takes their recorded outputs on those rows and differentiates from them; only norms, residual sums and
reshapes are computed again. Where few positions of the drawn rows carry a gradient (a classifier reads one token,
a language model's masked prompt), the taped backwards run on the token rows with a gradient only: the top block of
a ViT backpropagates its MLP for the CLS token alone. Dropout masks are drawn and recorded in the forward and
applied again to the same rows (attention dropout then runs as `F.scaled_dot_product_attention`'s math, not its
fused kernel). Under the user's gradient checkpointing no outputs are recorded (the block keeps little more than
its inputs, as checkpointing promises) and the replay recomputes them.

The backward of every block stays exact, which is what keeps the update unbiased:
- the rows come from the gradient itself (any entry that is not 0, NaN included), never from the draw;
- a replay on a subset of rows is checked against the forward's own outputs on them (and every taped operation's
  input) on the 1st, 2nd, 4th, 8th, ... replay of each block and input signature (`BlockReplay.should_check`):
  rows that interact (BatchNorm, a batch-wide router) or random numbers drawn other than through the tape give
  other outputs and fail the first check;
- a block whose check fails, or whose gradient reaches every row, is replayed on all rows with the forward's RNG and
  autocast state restored (as `torch.utils.checkpoint` does): the exact backward. A block that failed the check runs
  with plain autograd from then on (`BlockReplay.dense`), so it costs what it costs under `Trainer`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer

#: Largest difference, relative to the largest magnitude, between a block's outputs on a subset of rows and the
#: forward's outputs on those rows that still counts as the same function (kernels may sum in another order).
REPLAY_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def find_blocks(model: nn.Module, head_modules: list[nn.Module]) -> list[nn.Module]:
    """The outermost `GradientCheckpointingLayer`s of `model` that hold trainable parameters and neither contain
    nor lie inside a head module, in module order."""
    head_ids = {id(m) for head in head_modules for m in head.modules()}
    blocks, inside = [], set()
    for module in model.modules():
        if id(module) in inside or id(module) in head_ids or not isinstance(module, GradientCheckpointingLayer):
            continue
        members = {id(m) for m in module.modules()}
        inside |= members
        if members & head_ids or not any(p.requires_grad for p in module.parameters()):
            continue
        blocks.append(module)
    return blocks


def _close(replayed: torch.Tensor, original: torch.Tensor) -> bool:
    """Equal, or (floating point) within `REPLAY_TOLERANCE` of the largest magnitude. Row-wise kernels usually give
    the very same bits on a subset of rows, and that check is one cheap pass."""
    if replayed.shape != original.shape or replayed.dtype != original.dtype:
        return False
    if torch.equal(replayed, original) or not original.is_floating_point():
        return torch.equal(replayed, original)
    scale = float(original.detach().abs().amax()) if original.numel() else 0.0
    if not math.isfinite(scale):  # an overflow: the same non-finite values, or not the same function
        return torch.allclose(replayed, original, rtol=0.0, atol=0.0, equal_nan=True)
    tolerance = REPLAY_TOLERANCE.get(original.dtype, 1e-5) * max(scale, 1e-30)
    return torch.allclose(replayed, original, rtol=0.0, atol=tolerance, equal_nan=True)


def _nonzero_tokens(gradient: torch.Tensor) -> torch.Tensor:
    """rows x positions: whether each position (all dims but the first and last) of each row (dim 0) has an entry
    that is not 0 (NaN counts as not 0: NaN != 0)."""
    flat = gradient.detach().reshape(gradient.shape[0], -1, gradient.shape[-1] if gradient.dim() > 1 else 1)
    return flat.abs().amax(-1).ne(0)  # NaN stays NaN through abs and amax, and NaN != 0


@contextlib.contextmanager
def _restored(rng_states, autocast_states):
    """The RNG and autocast state of the forward, for its replay (then the caller's again)."""
    cpu_state, cuda_states = rng_states
    with torch.random.fork_rng(devices=list(cuda_states), enabled=True), contextlib.ExitStack() as stack:
        torch.set_rng_state(cpu_state)
        for device, state in cuda_states.items():
            torch.cuda.set_rng_state(state, device)
        for device_type, (enabled, dtype) in autocast_states.items():
            stack.enter_context(torch.autocast(device_type=device_type, enabled=enabled, dtype=dtype))
        yield


class _TapeMismatch(Exception):
    """A replay called other operations than its block's forward recorded, or (checked) with other inputs."""


#: The token-sparse backward is used when at most this share of a gradient's token rows are not zero (gathering them
#: costs about one pass over the rows; below this share the skipped products pay for it).
SPARSE_TOKEN_SHARE = 0.5


def _take_rows(value: torch.Tensor, rows: torch.Tensor | None, count: int) -> torch.Tensor:
    """The rows `rows` (all when None) of a tensor whose dim 0 holds `count` rows, or `count` x k rows in row-major
    blocks of k (a flattened batch x positions, as transformers' `Conv1D` passes to `torch.addmm`). A tensor that is a
    permutation of a contiguous one with the rows outermost (attention's heads view) keeps its memory layout."""
    if rows is None:
        return value.detach()
    rows = rows.to(value.device)
    if value.shape[0] != count:
        blocks = value.reshape(count, -1, *value.shape[1:]).index_select(0, rows)
        return blocks.reshape(-1, *value.shape[1:])
    order = sorted(range(value.dim()), key=lambda d: -value.stride(d))
    if order[0] == 0 and order != sorted(order) and value.permute(order).is_contiguous():
        return value.permute(order).index_select(0, rows).permute([order.index(d) for d in range(value.dim())])
    return value.index_select(0, rows)


def _nonzero_token_rows(flat: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows of a 2-D gradient (token positions x features) with an entry that is not 0 (NaN counts);
    None when they are more than `SPARSE_TOKEN_SHARE` of the rows (the dense kernels are then cheaper)."""
    rows = flat.abs().amax(1).ne(0).nonzero().squeeze(1)  # abs().amax(): a third of ne().any()'s time on a CPU
    return None if rows.numel() > SPARSE_TOKEN_SHARE * flat.shape[0] else rows


def linear_call(func, args, kwargs) -> tuple | None:
    """(x, weight, bias, transposed) of a call of `F.linear`, or of `torch.addmm(bias, x, weight)` as transformers'
    `Conv1D` makes it (`transposed`: y = b + x W); None for any other call."""
    if func is F.linear:
        return args[0], args[1], args[2] if len(args) > 2 else kwargs.get("bias"), False
    if func is torch.addmm and len(args) == 3 and not kwargs and args[0].dim() == 1 and args[1].dim() == 2:
        return args[1], args[2], args[0], True
    return None


def linear_weight_gradient(errors: torch.Tensor, inputs: torch.Tensor, transposed: bool) -> torch.Tensor:
    """dW = dY^T X of a linear layer from its 2-D output `errors` and `inputs` (X^T dY when `transposed`: `Conv1D`'s
    weight is d_in x d_out)."""
    return inputs.mT @ errors if transposed else errors.mT @ inputs


class _TapedLinear(torch.autograd.Function):
    """y = x W^T + b (`F.linear`), or y = b + x W (`transposed`: `torch.addmm` as transformers' `Conv1D` calls it),
    whose forward returns the given output (the recorded output's rows, or one computed by the caller) instead of
    computing it, and whose backward is the layer's (in the dtype the forward computed in, e.g. under autocast). With
    `sparse`, the backward runs on the token rows of dY that are not zero: dX = dY W is 0 on the others and
    dW = dY^T X gets nothing from them. With a `sampler` (`token_sampling.WeightGradientSampler`), dW is its estimate
    from sampled token rows; dX and db stay exact. Saves x and W, as autograd does for a linear layer."""

    @staticmethod
    def forward(ctx, x, weight, bias, output, transposed, sparse, sampler=None):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.dtype, ctx.transposed, ctx.sparse, ctx.sampler = bias is not None, output.dtype, transposed, sparse, sampler
        return output

    @staticmethod
    def backward(ctx, gradient):
        x, weight = ctx.saved_tensors
        flat = gradient.to(ctx.dtype).reshape(-1, gradient.shape[-1])
        inputs = x.reshape(-1, x.shape[-1])
        rows = _nonzero_token_rows(flat) if ctx.sparse else None
        if rows is not None:
            flat, inputs = flat.index_select(0, rows), inputs.index_select(0, rows)
        weight_t = weight.to(ctx.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = flat @ (weight_t.mT if ctx.transposed else weight_t)
            if rows is not None:
                grad_x = grad_x.new_zeros(x.numel() // x.shape[-1], x.shape[-1]).index_copy_(0, rows, grad_x)
            grad_x = grad_x.reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            inputs = inputs.to(ctx.dtype)
            if ctx.sampler is not None:
                grad_w = ctx.sampler.weight_gradient(flat, inputs, ctx.transposed)
            else:
                grad_w = linear_weight_gradient(flat, inputs, ctx.transposed)
            grad_w = grad_w.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat.sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


class _TapedOp(torch.autograd.Function):
    """An operation whose forward returns the recorded output's rows instead of computing them and whose backward is
    `backward(gradient, *inputs)`, from the replay's own inputs (equal to the recorded ones on those rows)."""

    @staticmethod
    def forward(ctx, backward, output, *inputs):
        ctx.backward_function = backward
        ctx.save_for_backward(*inputs)
        return output

    @staticmethod
    def backward(ctx, gradient):
        return (None, None, *ctx.backward_function(gradient, *ctx.saved_tensors))


def _elementwise_backward(kernel, sparse: bool):
    """The backward of an elementwise y = act(x) from its kernel(dY, x); with `sparse`, on the token rows of dY that
    are not zero only."""

    def backward(gradient, x):
        if sparse:
            flat = gradient.reshape(-1, gradient.shape[-1])
            rows = _nonzero_token_rows(flat)
            if rows is not None:
                part = kernel(flat.index_select(0, rows), x.reshape(-1, x.shape[-1]).index_select(0, rows))
                return (torch.zeros_like(flat).index_copy_(0, rows, part).reshape(gradient.shape),)
        return (kernel(gradient, x),)

    return backward


#: Activations taped in a replay, with the backward kernel autograd itself runs for them (of dY and the input x).
_ACTIVATION_KERNELS = {
    F.gelu: lambda approximate: lambda gradient, x: torch.ops.aten.gelu_backward(gradient, x, approximate=approximate),
    F.silu: lambda approximate: lambda gradient, x: torch.ops.aten.silu_backward(gradient, x),
}


def _attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *, dropout):
    """`F.scaled_dot_product_attention` written out (its documented math) with the attention weights' dropout done
    by `dropout`, so that the mask can be recorded and replayed: the fused kernels draw it inside."""
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa:
        repeats = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeats, -3), value.repeat_interleave(repeats, -3)
    scores = query @ key.transpose(-2, -1) * scale
    if is_causal:
        causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return dropout(torch.softmax(scores, dim=-1), dropout_p) @ value


def _attention_arguments(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


def _cpu_flash_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> bool:
    """Whether `F.scaled_dot_product_attention` runs these arguments with the CPU flash kernel (whose output and
    log-sum-exp the tape keeps, as autograd does): CPU tensors, no dropout, and no mask or a boolean one (a float
    mask can be a learned bias, T5's, whose gradient the recording forward, without autograd, cannot foresee)."""
    return (
        query.device.type == "cpu" and not dropout_p and not enable_gqa
        and (attn_mask is None or attn_mask.dtype == torch.bool)
        and torch._fused_sdp_choice(query, key, value, attn_mask, 0.0, is_causal, scale=scale) == int(SDPBackend.FLASH_ATTENTION)
    )


def _additive_mask(attn_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask as `F.scaled_dot_product_attention` hands it to its kernels (the flash kernel takes no other):
    0 where attended, -inf elsewhere, in the query's dtype (a padding mask, as transformers passes it)."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros_like(attn_mask, dtype=dtype).masked_fill_(~attn_mask, float("-inf"))


class _Tape(TorchFunctionMode):
    """What a block's replay on a subset of rows must neither compute again nor draw anew, recorded in its forward
    without autograd and replayed in order:
    - the outputs of the operations that hold most of a block's forward (`keep_outputs`), with what their backward
      needs: `F.linear` and `torch.addmm` (transformers' `Conv1D`) with their inputs (`_TapedLinear`), `F.gelu` and
      `F.silu` with their inputs, and `F.scaled_dot_product_attention` where it runs the CPU flash kernel, with its
      log-sum-exp (`_TapedOp`). The replay takes the recorded outputs' rows and backpropagates from them: the drawn
      rows' forward is not computed twice. The rest (norms, residual sums, reshapes) is computed again on the rows.
    - each dropout's mask (`F.dropout`, and the attention weights' dropout of `F.scaled_dot_product_attention`, then
      computed by `_attention`), drawn here and applied again to the same rows.
    A replay that calls other operations raises `_TapeMismatch`; a `checking` one also when a taped operation's input
    differs from the recorded input's rows (`_close`). With `sparse`, taped backwards run on the token rows of their
    gradient that are not zero; with a weight `sampler`, the taped linear layers whose weight it samples estimate
    their weight gradient from sampled token rows (`token_sampling`).
    """

    def __init__(self, keep_outputs: bool = True):
        super().__init__()
        self.keep_outputs = keep_outputs
        self.entries: list[tuple[str, tuple]] = []
        self.replay_rows: torch.Tensor | None = None
        self.replaying_now = False
        self.position = self.count = 0
        self.checking = self.sparse = False
        self.sampler = None
        self._layout: list[tuple[str, int]] = []
        self._gathered: dict[int, torch.Tensor] = {}
        self._checked_input: tuple[int, int] | None = None

    @contextlib.contextmanager
    def replaying(self, rows: torch.Tensor | None, count: int, checking: bool, sparse: bool, sampler=None):
        """Replays the recorded calls on `rows` (all rows when None) of `count`."""
        self.replay_rows, self.count, self.checking, self.sparse, self.sampler = rows, count, checking, sparse, sampler
        self.replaying_now, self.position, self._gathered, self._checked_input = True, 0, {}, None
        try:
            with self:
                yield
            if self.position != len(self.entries):
                raise _TapeMismatch
        finally:
            self.replaying_now, self.replay_rows, self._gathered, self.sampler = False, None, {}, None

    def take_tensors(self) -> list[torch.Tensor]:
        """The recorded tensors in order, the tape's own references dropped (its caller saves them for the backward)."""
        self._layout = [(kind, len(values)) for kind, values in self.entries]
        tensors = [tensor for _, values in self.entries for tensor in values]
        self.entries = []
        return tensors

    def restore_tensors(self, tensors) -> None:
        """The entries again, from the tensors `take_tensors` returned."""
        remaining = iter(tensors)
        self.entries = [(kind, tuple(next(remaining) for _ in range(size))) for kind, size in self._layout]

    def _next(self, kind: str) -> tuple:
        if self.position >= len(self.entries) or self.entries[self.position][0] != kind:
            raise _TapeMismatch
        self.position += 1
        return self.entries[self.position - 1][1]

    def _rows(self, recorded: torch.Tensor) -> torch.Tensor:
        """The replayed rows of a recorded tensor, gathered once per replay (all rows: the tensor itself, whatever its
        shape, e.g. an operation on parameters alone; on a subset, one without the rows' dimension fails the check)."""
        if self.replay_rows is not None and (recorded.dim() == 0 or recorded.shape[0] % self.count):
            raise _TapeMismatch
        gathered = self._gathered.get(id(recorded))
        if gathered is None:
            gathered = self._gathered[id(recorded)] = _take_rows(recorded, self.replay_rows, self.count)
        return gathered

    def _check(self, value: torch.Tensor, recorded: torch.Tensor) -> None:
        if self.checking and not _close(value, self._rows(recorded)):
            raise _TapeMismatch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.keep_outputs:
            call = linear_call(func, args, kwargs)
            if call is not None:
                return self._linear(func, args, kwargs, *call)
            if func in _ACTIVATION_KERNELS and not kwargs.get("inplace", False) and len(args) == 1:
                return self._activation(func, args[0], kwargs)
        if func is F.scaled_dot_product_attention:
            arguments = _attention_arguments(*args, **kwargs)
            if arguments[4]:
                return _attention(*args, **kwargs, dropout=self._dropout)
            if self.keep_outputs and _cpu_flash_attention(*arguments):
                return self._flash_attention(*arguments)
        if func is F.dropout:
            return self._dropout(*args, **kwargs)
        return func(*args, **kwargs)

    def _linear(self, func, args, kwargs, x, weight, bias, transposed):
        if not self.replaying_now:
            output = func(*args, **kwargs)
            self.entries.append(("linear", (x, output)))
            return output
        recorded_input, recorded_output = self._next("linear")
        pair = (id(recorded_input), id(x))  # q, k and v read one input: checked once
        if pair != self._checked_input:
            self._check(x, recorded_input)
        self._checked_input = pair
        sampler = self.sampler if self.sampler is not None and self.sampler.samples(weight) else None
        return _TapedLinear.apply(x, weight, bias, self._rows(recorded_output), transposed, self.sparse, sampler)

    def _activation(self, func, x, kwargs):
        if not self.replaying_now:
            output = func(x, **kwargs)
            self.entries.append(("activation", (x, output)))
            return output
        recorded_input, recorded_output = self._next("activation")
        self._check(x, recorded_input)
        kernel = _ACTIVATION_KERNELS[func](kwargs.get("approximate", "none"))
        return _TapedOp.apply(_elementwise_backward(kernel, self.sparse), self._rows(recorded_output), x)

    def _flash_attention(self, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        attn_mask = _additive_mask(attn_mask, query.dtype)
        if not self.replaying_now:
            output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, 0.0, is_causal, attn_mask=attn_mask, scale=scale
            )
            self.entries.append(("attention", (query, key, value, output, logsumexp)))
            return output
        *recorded_inputs, recorded_output, recorded_logsumexp = self._next("attention")
        for replayed, recorded in zip((query, key, value), recorded_inputs):
            self._check(replayed, recorded)
        output, logsumexp = self._rows(recorded_output), self._rows(recorded_logsumexp)

        def backward(gradient, q, k, v):
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                gradient, q, k, v, output, logsumexp, 0.0, is_causal, attn_mask=attn_mask, scale=scale
            )

        return _TapedOp.apply(backward, output, query, key, value)

    def _dropout(self, input, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return input
        if not self.replaying_now:
            mask = torch.empty_like(input).bernoulli_(1 - p).bool()
            self.entries.append(("dropout", (mask,)))
        else:
            (mask,) = self._next("dropout")
            mask = self._rows(mask)
            if mask.shape != input.shape:
                raise _TapeMismatch
        scaled = mask.to(input.dtype) / (1 - p)
        return input.mul_(scaled) if inplace else input * scaled


def recorded_dropout() -> _Tape:
    """A mode under which every dropout draws its mask as a replayed block's forward does (`_Tape`): two forwards
    started from the same RNG state then drop the same entries, whether their blocks are replayed or not."""
    return _Tape(keep_outputs=False)


@dataclass
class _BlockCall:
    """One call of a block under replay: how to run it again, and what its forward returned."""

    replay: "BlockReplay"
    index: int
    spec: object
    leaves: list
    positions: list[int]  # leaves that are differentiable inputs of the autograd function
    rows: int
    rng_states: tuple = ()
    autocast_states: dict = field(default_factory=dict)
    outputs: tuple = ()
    output_spec: object = None
    output_leaves: list = field(default_factory=list)
    output_positions: list[int] = field(default_factory=list)
    tape: _Tape | None = None

    def run(self, inputs, take=None):
        """The block's forward on `inputs` (the differentiable leaves) and the other leaves (`take`n, if given)."""
        leaves = list(self.leaves) if take is None else [take(leaf) for leaf in self.leaves]
        for position, value in zip(self.positions, inputs):
            leaves[position] = value
        args, kwargs = tree_unflatten(leaves, self.spec)
        block = self.replay.blocks[self.index]
        checkpointing, block.gradient_checkpointing = block.gradient_checkpointing, False  # this is the replay
        try:
            return type(block).forward(block, *args, **kwargs)
        finally:
            block.gradient_checkpointing = checkpointing

    def record_state(self, inputs) -> None:
        cuda = sorted({t.device.index for t in inputs if t.is_cuda})
        self.rng_states = (torch.get_rng_state(), {device: torch.cuda.get_rng_state(device) for device in cuda})
        device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        self.autocast_states = {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in device_types}

    def rebuild(self, tensors):
        leaves = list(self.output_leaves)
        for position, value in zip(self.output_positions, tensors):
            leaves[position] = value
        return tree_unflatten(leaves, self.output_spec)

    def backward(self, inputs, params, gradients):
        """Gradients of the inputs and parameters: on the rows with a gradient, or on all rows."""
        rows, tokens, positions = self._rows_with_gradient(gradients)
        count = rows.numel() if rows is not None else self.rows
        sparse = tokens <= SPARSE_TOKEN_SHARE * positions * count
        if count == 0:  # zeros, not None: every parameter below still gets a gradient (DDP)
            self.replay.count(0, self.rows, 0, positions * self.rows)
            return [torch.zeros_like(x) for x in inputs], [torch.zeros_like(p) for p in params]
        if rows is not None and self.index not in self.replay.dense:
            result = self._differentiate(inputs, params, gradients, rows, sparse)
            if result is not None:
                self.replay.count(count, self.rows, tokens, positions * self.rows)
                return result
            self.replay.mark_dense(self.index, "its forward on a subset of rows differs from the forward on all rows")
        self.replay.count(self.rows, self.rows, tokens, positions * self.rows)
        return self._differentiate(inputs, params, gradients, None, sparse)

    def _rows_with_gradient(self, gradients) -> tuple[torch.Tensor | None, int, int]:
        """(rows, tokens, positions): the indices of the rows whose output gradient is not zero (None when it is every
        row, or when an output without the rows' dimension has a gradient: it depends on all rows), the number of
        (row, position) pairs with a gradient (positions: all dims but the first and last), and the positions of a
        row (over the outputs with the rows' dimension)."""
        found, tokens, positions = [], 0, 0
        for output, gradient in zip(self.outputs, gradients):
            if gradient is None:
                continue
            if output.dim() == 0 or output.shape[0] != self.rows:
                if bool((gradient != 0).any()):
                    return None, self.rows * max(positions, 1), max(positions, 1)
                continue
            nonzero = _nonzero_tokens(gradient)
            found.append(nonzero.any(1))
            tokens, positions = tokens + int(nonzero.sum()), positions + nonzero.shape[1]
        rows = torch.stack(found).any(0).nonzero().squeeze(1) if found else torch.zeros(0, dtype=torch.long)
        return (None if rows.numel() == self.rows else rows), tokens, positions

    def signature(self) -> tuple:
        """What decides whether a replay can reproduce the forward, the rows aside: the inputs' shapes past the rows,
        dtypes and devices, the other arguments' types, the training mode (dropout), autocast and checkpointing."""
        leaves = tuple((tuple(x.shape[1:]), x.dtype, x.device.type) if isinstance(x, torch.Tensor) else type(x).__name__ for x in self.leaves)
        return leaves, self.replay.blocks[self.index].training, tuple(sorted(self.autocast_states.items())), self.tape.keep_outputs

    def _differentiate(self, inputs, params, gradients, rows, sparse):
        """Replays the block (on `rows`, or on all rows when None) and backpropagates; None when the replay on rows
        was checked (`BlockReplay.should_check`) and does not reproduce the forward's outputs on them."""
        def take(value):
            if rows is not None and isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == self.rows:
                return value.index_select(0, rows.to(value.device))
            return value

        checking = rows is not None and self.replay.should_check(self.index, self.signature())
        sampler = self.replay.weight_sampler  # its function mode for the linear calls the tape does not take
        sampling = sampler.sampling() if sampler is not None else contextlib.nullcontext()
        with _restored(self.rng_states, self.autocast_states), torch.enable_grad(), self.replay.replaying(rows), sampling:
            replayed_inputs = [take(x).detach().requires_grad_(x.requires_grad) for x in inputs]
            try:
                # the recorded dropout masks and outputs, on all rows too: the forward's masks, not new ones
                with self.tape.replaying(rows, self.rows, checking, sparse, sampler):
                    flat, _ = tree_flatten(self.run(replayed_inputs, take))
            except _TapeMismatch:
                flat = None
        replayed = [flat[i] for i in self.output_positions] if flat is not None and len(flat) == len(self.output_leaves) else None
        if rows is None and replayed is None:
            raise RuntimeError(f"{type(self.replay.blocks[self.index]).__name__} ran other operations when run again on all its rows.")
        if rows is not None and (replayed is None or (checking and not all(_close(r, take(o)) for r, o in zip(replayed, self.outputs)))):
            return None
        pairs = [(r, take(g)) for r, g in zip(replayed, gradients) if g is not None and r.requires_grad]
        wanted = [x for x in replayed_inputs if x.requires_grad] + list(params)
        with self.replay.replaying(rows):
            grads = list(torch.autograd.grad([r for r, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)) if pairs else [None] * len(wanted)
        input_grads = []
        for original, replayed_input in zip(inputs, replayed_inputs):
            grad = grads.pop(0) if replayed_input.requires_grad else None
            if grad is not None and rows is not None and original.dim() > 0 and original.shape[0] == self.rows:
                grad = grad.new_zeros(original.shape).index_copy_(0, rows.to(grad.device), grad)
            input_grads.append(grad)
        return input_grads, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


class _ReplayedBlock(torch.autograd.Function):
    """Forward without autograd; backward by replay (`_BlockCall.backward`)."""

    @staticmethod
    def forward(ctx, call: _BlockCall, num_inputs: int, *tensors):
        inputs, params = tensors[:num_inputs], tensors[num_inputs:]
        ctx.call = call
        call.record_state(inputs)
        # under the user's gradient checkpointing, no outputs are kept (memory over compute)
        call.tape = _Tape(keep_outputs=not call.replay.blocks[call.index].gradient_checkpointing)
        with torch.no_grad(), call.tape:
            output = call.run(inputs)
        # The tape's tensors are saved as autograd saves any node's: freed once the backward has run (kept under
        # retain_graph), and seen by saved-tensor hooks (`torch.autograd.graph.save_on_cpu`).
        recorded = call.tape.take_tensors()
        ctx.sizes = (len(inputs), len(params))
        ctx.save_for_backward(*inputs, *params, *recorded)
        leaves, call.output_spec = tree_flatten(output)
        call.output_positions = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        outputs = tuple(leaves[i] for i in call.output_positions)
        # Kept for the replay's check as detached aliases: the outputs themselves will hold this node (a cycle).
        call.outputs = tuple(t.detach() for t in outputs)
        call.output_leaves = [None if isinstance(x, torch.Tensor) else x for x in leaves]
        constants = {id(x) for x in call.leaves if isinstance(x, torch.Tensor)}
        ctx.mark_non_differentiable(*(t for t in outputs if not t.is_floating_point() or id(t) in constants))
        return outputs

    @staticmethod
    def backward(ctx, *gradients):
        saved = ctx.saved_tensors
        inputs, params = ctx.sizes
        ctx.call.tape.restore_tensors(saved[inputs + params :])
        try:
            input_grads, param_grads = ctx.call.backward(saved[:inputs], saved[inputs : inputs + params], gradients)
        finally:
            ctx.call.tape.take_tensors()  # the saved tensors alone hold them again
        return (None, None, *input_grads, *param_grads)


class BlockReplay:
    """The trunk's blocks (`find_blocks`) and, while `active`, their forward without autograd and backward by replay.

    `dense`: indices of blocks found not to be replayable on a subset of rows, with `dense_reasons`; they run with
    plain autograd. `should_check`: the schedule of the replays' checks. `computed_rows` / `total_rows`: rows
    backpropagated and rows present, and `computed_tokens` / `total_tokens`: (row, position) pairs with a gradient
    and present, summed over block calls since `take_counts` (the share of the trunk's backward work that was done,
    by rows and by tokens). `row_index()`: while a block is
    replayed on a subset of its rows, their indices (None otherwise), for hooks that attribute work to rows.
    `weight_sampler`: None, or the `token_sampling.WeightGradientSampler` whose token draws the replayed linear layers'
    weight gradients take (its `sampling()` mode is active during a replay: backwards run without the step's modes).
    """

    def __init__(self, blocks: list[nn.Module]):
        self.blocks = blocks
        self.dense: set[int] = set()
        self.dense_reasons: dict[int, str] = {}
        self.weight_sampler = None
        self.computed_rows = self.total_rows = self.computed_tokens = self.total_tokens = 0
        self._rows: torch.Tensor | None = None
        self._replays: dict[tuple, int] = {}

    def should_check(self, index: int, signature: tuple) -> bool:
        """Whether this replay of block `index` on a subset of rows checks that it reproduces the forward: the 1st,
        2nd, 4th, 8th, ... replay with each `_BlockCall.signature`. A block whose rows interact, or that draws random
        numbers outside the tape, fails its first check; later checks guard against behaviour that changes with the
        data, at a cost that vanishes over a run (log2 of its steps)."""
        key = (index, signature)
        count = self._replays.get(key, 0)
        self._replays[key] = count + 1
        return count & (count + 1) == 0

    def row_index(self) -> torch.Tensor | None:
        return self._rows

    @contextlib.contextmanager
    def replaying(self, rows: torch.Tensor | None):
        outer, self._rows = self._rows, rows
        try:
            yield
        finally:
            self._rows = outer

    def count(self, computed_rows: int, rows: int, computed_tokens: int, tokens: int) -> None:
        self.computed_rows += computed_rows
        self.total_rows += rows
        self.computed_tokens += computed_tokens
        self.total_tokens += tokens

    def take_counts(self) -> tuple[int, int, int, int]:
        """(rows backpropagated, rows present, (row, position) pairs with a gradient, pairs present), summed over the
        block calls since the last call."""
        counts = (self.computed_rows, self.total_rows, self.computed_tokens, self.total_tokens)
        self.computed_rows = self.total_rows = self.computed_tokens = self.total_tokens = 0
        return counts

    def mark_dense(self, index: int, reason: str) -> None:
        self.dense.add(index)
        self.dense_reasons[index] = reason

    @contextlib.contextmanager
    def active(self):
        """Blocks not marked dense run under replay during the forwards (and their backwards) inside."""
        replaced = []
        for index, block in enumerate(self.blocks):
            if index not in self.dense:
                block.forward = self._replayed_forward(index)
                replaced.append(block)
        try:
            yield
        finally:
            for block in replaced:
                del block.forward  # the class's forward again

    def _replayed_forward(self, index: int):
        block = self.blocks[index]

        def forward(*args, **kwargs):
            # As transformers' gradient checkpointing does, a replayed layer gets no KV cache (it would be written twice).
            leaves, spec = tree_flatten((args, kwargs), is_leaf=lambda x: isinstance(x, Cache))
            leaves = [None if isinstance(x, Cache) else x for x in leaves]
            positions = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.requires_grad]
            rows = next((leaves[i].shape[0] for i in positions if leaves[i].dim() > 0), None)
            params = [p for p in block.parameters() if p.requires_grad]
            if not torch.is_grad_enabled() or rows is None:
                return type(block).forward(block, *args, **kwargs)
            call = _BlockCall(self, index, spec, leaves, positions, rows)
            outputs = _ReplayedBlock.apply(call, len(positions), *(leaves[i] for i in positions), *params)
            return call.rebuild(outputs)

        return forward
