"""Trunk blocks whose backward runs on the rows that carry a gradient: where sampling saves compute.

Below the boundary, the rows that were not drawn have a zero gradient in every block whose rows do not interact (a
transformer layer: attention and MLP act within an example). An ordinary backward would still spend the full work
on them. While `BlockReplay.active`, each block of the trunk (transformers' `GradientCheckpointingLayer`s, the units
transformers itself replays under gradient checkpointing) runs its forward without autograd, keeping its inputs,
outputs and RNG state. In the backward the block finds the rows whose output gradient is not zero and re-runs its
forward on those rows alone, with autograd, then backpropagates them. The linear layers' products are not computed
again: their inputs and outputs are recorded in the forward (`_Tape`, the tensors autograd would keep anyway) and
the replay takes the recorded outputs on those rows, differentiating from the recorded inputs; the rest of the block
(norms, activations, attention) is recomputed on the rows. Dropout masks are drawn and recorded in the forward and
applied again to the same rows (attention dropout then runs as `F.scaled_dot_product_attention`'s math, not its
fused kernel). Under the user's gradient checkpointing no linear outputs are recorded (the block keeps little more
than its inputs, as checkpointing promises) and the replay recomputes them.

The backward of every block stays exact, which is what keeps the update unbiased:
- the rows come from the gradient itself (any entry that is not 0, NaN included), never from the draw;
- the replay on those rows is checked against the forward's own outputs on them (and every recorded linear layer's
  input): rows that interact (BatchNorm, a batch-wide router) or random numbers drawn other than through the tape
  give other outputs and fail the check;
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


def _nonzero_rows(gradient: torch.Tensor) -> torch.Tensor:
    """Indices along dim 0 of the rows with an entry that is not 0 (NaN counts as not 0: NaN != 0)."""
    flat = gradient.detach().reshape(gradient.shape[0], -1)
    return flat.abs().amax(dim=1).ne(0).nonzero().squeeze(1)


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
    """A replayed linear layer was called with inputs other than the recorded ones (on the replayed rows)."""


def _take_rows(value: torch.Tensor, rows: torch.Tensor, count: int) -> torch.Tensor:
    """The rows `rows` of a tensor whose dim 0 holds `count` rows, or `count` x k rows in row-major blocks of k (a
    flattened batch x positions, as transformers' `Conv1D` passes to `torch.addmm`)."""
    if value.shape[0] == count:
        return value.index_select(0, rows.to(value.device))
    blocks = value.reshape(count, -1, *value.shape[1:]).index_select(0, rows.to(value.device))
    return blocks.reshape(-1, *value.shape[1:])


class _TapedLinear(torch.autograd.Function):
    """y = x W^T + b whose forward takes the recorded output's rows instead of computing it, and whose backward is
    the layer's (in the dtype the forward computed in, e.g. under autocast)."""

    @staticmethod
    def forward(ctx, x, weight, bias, recorded, rows, count):
        output = _take_rows(recorded, rows, count)
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.dtype = bias is not None, output.dtype
        return output

    @staticmethod
    def backward(ctx, gradient):
        x, weight = ctx.saved_tensors
        gradient = gradient.to(ctx.dtype)
        flat = gradient.reshape(-1, gradient.shape[-1])
        grad_x = (gradient @ weight.to(ctx.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (flat.mT @ x.reshape(-1, x.shape[-1]).to(ctx.dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = flat.sum(0).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None


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


class _Tape(TorchFunctionMode):
    """What a block's replay on a subset of rows must neither compute again nor draw anew, recorded in its forward
    without autograd and replayed in order:
    - each `F.linear` call's input and output (`keep_linear_outputs`): a replayed call whose input matches the
      recorded input's rows (`_close`) takes the recorded output's rows (`_TapedLinear`);
    - each dropout's mask (`F.dropout`, and the attention weights' dropout of `F.scaled_dot_product_attention`, then
      computed by `_attention`), drawn here and applied again to the same rows.
    Any other sequence of calls in the replay raises `_TapeMismatch`."""

    def __init__(self, keep_linear_outputs: bool = True):
        super().__init__()
        self.keep_linear_outputs = keep_linear_outputs
        self.entries: list[tuple[str, tuple]] = []
        self.replay_rows: torch.Tensor | None = None
        self.position = 0
        self.count = 0

    @contextlib.contextmanager
    def replaying(self, rows: torch.Tensor, count: int):
        self.replay_rows, self.position, self.count, self._checked_input = rows, 0, count, None
        try:
            with self:
                yield
            if self.position != len(self.entries):
                raise _TapeMismatch
        finally:
            self.replay_rows = None

    def _next(self, kind: str) -> tuple:
        if self.position >= len(self.entries) or self.entries[self.position][0] != kind:
            raise _TapeMismatch
        self.position += 1
        return self.entries[self.position - 1][1]

    def _rows(self, recorded: torch.Tensor) -> torch.Tensor:
        if recorded.dim() == 0 or recorded.shape[0] % self.count:
            raise _TapeMismatch
        return _take_rows(recorded, self.replay_rows, self.count)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and self.keep_linear_outputs:
            return self._linear(func, args, kwargs)
        if func is F.dropout:
            return self._dropout(*args, **kwargs)
        if func is F.scaled_dot_product_attention and (args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)):
            return _attention(*args, **kwargs, dropout=self._dropout)
        return func(*args, **kwargs)

    def _linear(self, func, args, kwargs):
        if self.replay_rows is None:
            output = func(*args, **kwargs)
            self.entries.append(("linear", (args[0], output)))
            return output
        x, weight = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        recorded_input, recorded_output = self._next("linear")
        pair = (id(recorded_input), id(x))  # q, k and v read one input: checked once
        if pair != self._checked_input and not _close(x, self._rows(recorded_input)):
            raise _TapeMismatch
        self._checked_input = pair
        return _TapedLinear.apply(x, weight, bias, recorded_output, self.replay_rows, self.count)

    def _dropout(self, input, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return input
        if self.replay_rows is None:
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
    return _Tape(keep_linear_outputs=False)


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
        rows = self._rows_with_gradient(gradients)
        if rows is not None and rows.numel() == 0:  # zeros, not None: every parameter below still gets a gradient (DDP)
            self.replay.count(self.index, 0, self.rows)
            return [torch.zeros_like(x) for x in inputs], [torch.zeros_like(p) for p in params]
        if rows is not None and self.index not in self.replay.dense:
            result = self._differentiate(inputs, params, gradients, rows)
            if result is not None:
                self.replay.count(self.index, rows.numel(), self.rows)
                return result
            self.replay.mark_dense(self.index, "its forward on a subset of rows differs from the forward on all rows")
        self.replay.count(self.index, self.rows, self.rows)
        return self._differentiate(inputs, params, gradients, None)

    def _rows_with_gradient(self, gradients):
        """Rows (a tensor of indices) whose output gradient is not zero; None when it is every row, or when an output
        without the rows' dimension has a gradient (it depends on all rows)."""
        found = []
        for output, gradient in zip(self.outputs, gradients):
            if gradient is None:
                continue
            if output.dim() == 0 or output.shape[0] != self.rows:
                if bool((gradient != 0).any()):
                    return None
                continue
            found.append(_nonzero_rows(gradient))
        rows = torch.cat(found).unique() if found else torch.zeros(0, dtype=torch.long)
        return None if rows.numel() == self.rows else rows

    def _differentiate(self, inputs, params, gradients, rows):
        """Replays the block (on `rows`, or on all rows when None) and backpropagates; None when the replay on rows
        does not reproduce the forward's outputs on them."""
        def take(value):
            if rows is not None and isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == self.rows:
                return value.index_select(0, rows.to(value.device))
            return value

        # the recorded dropout masks and linear outputs, on all rows too: the forward's masks, not new ones
        tape_rows = rows if rows is not None else torch.arange(self.rows)
        with _restored(self.rng_states, self.autocast_states), torch.enable_grad(), self.replay.replaying(rows):
            replayed_inputs = [take(x).detach().requires_grad_(x.requires_grad) for x in inputs]
            try:
                with self.tape.replaying(tape_rows, self.rows):
                    flat, _ = tree_flatten(self.run(replayed_inputs, take))
            except _TapeMismatch:
                flat = None
        replayed = [flat[i] for i in self.output_positions] if flat is not None and len(flat) == len(self.output_leaves) else None
        if rows is None and replayed is None:
            raise RuntimeError(f"{type(self.replay.blocks[self.index]).__name__} ran other operations when run again on all its rows.")
        if rows is not None and (replayed is None or not all(_close(r, take(o)) for r, o in zip(replayed, self.outputs))):
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
        ctx.call, ctx.num_params = call, len(params)
        ctx.save_for_backward(*inputs, *params)
        call.record_state(inputs)
        # under the user's gradient checkpointing, no linear outputs are kept (memory over compute)
        call.tape = _Tape(keep_linear_outputs=not call.replay.blocks[call.index].gradient_checkpointing)
        with torch.no_grad(), call.tape:
            output = call.run(inputs)
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
        split = len(saved) - ctx.num_params
        input_grads, param_grads = ctx.call.backward(saved[:split], saved[split:], gradients)
        return (None, None, *input_grads, *param_grads)


class BlockReplay:
    """The trunk's blocks (`find_blocks`) and, while `active`, their forward without autograd and backward by replay.

    `dense`: indices of blocks found not to be replayable on a subset of rows, with `dense_reasons`; they run with
    plain autograd. `computed_rows` / `total_rows`: rows backpropagated and rows present, summed over block calls
    since `take_counts` (the share of the trunk's backward work that was done). `row_index()`: while a block is
    replayed on a subset of its rows, their indices (None otherwise), for hooks that attribute work to rows.
    """

    def __init__(self, blocks: list[nn.Module]):
        self.blocks = blocks
        self.dense: set[int] = set()
        self.dense_reasons: dict[int, str] = {}
        self.computed_rows = self.total_rows = 0
        self._rows: torch.Tensor | None = None

    def row_index(self) -> torch.Tensor | None:
        return self._rows

    @contextlib.contextmanager
    def replaying(self, rows: torch.Tensor | None):
        outer, self._rows = self._rows, rows
        try:
            yield
        finally:
            self._rows = outer

    def count(self, index: int, computed: int, total: int) -> None:
        self.computed_rows += computed
        self.total_rows += total

    def take_counts(self) -> tuple[int, int]:
        counts = (self.computed_rows, self.total_rows)
        self.computed_rows = self.total_rows = 0
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
