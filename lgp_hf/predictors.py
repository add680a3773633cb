"""Linear predictors A: head-side signal -> trunk gradient, with state bounded by a fraction of the model's size.

Every predictor sees only *earlier* control batches (`observe` comes after the step's update is built), so the
control-variate estimator stays unbiased whatever its quality. Its inputs are identical on every DDP rank (the
control signal averaged over ranks, the trunk gradient after DDP's all-reduce) and every step below is a
deterministic function of them (fixed seeds, no atomics), so its state is too. Flat trunk gradients are the
concatenation of the flattened trunk tensors, in `ModelPartition.trunk_params` order (`shapes`).

`RidgePredictor` (presets `"ntk"` and `"window"`) is ridge regression from the signal s to the trunk gradient g
over the last m control batches, in dual form:

    A s = G^T (H H^T + lambda I)^-1 H s,      H (m x w): stored signals,  G (m x P): stored trunk gradients,

lambda = `ridge` times the mean diagonal of H H^T (so it does not depend on the loss scale). By the push-through
identity G^T (H H^T + lambda I)^-1 H = G^T H (H^T H + lambda I)^-1, this is the same least-squares fit as the
primal "fitted Jacobian" J = (H^T H + lambda I)^-1 H^T G that the former `ntk` predictor kept (k x P, with
exponential forgetting instead of a window), and as the former `window` predictor (dense m x P): one family, two
presets that differ only in the signal:

- `"ntk"`: signal "logit_error", the summed logit errors dloss/dlogits (g ~ J^T e when the NTK has low effective
  rank); ridge 1 (1e-2, the former primal fit's, made predictions add variance on the example's ViT).
- `"window"`: signal "head_gradient", the flat gradient of the head modules; ridge 1.0.
- `"zero"` (`ZeroPredictor`): no prediction; the trunk gets only the rescaled control gradient (the ablation).

What makes it fit any model (issue 13; a dense G is m x P, a dense J is k x P, e.g. 50257 x 124 M for GPT-2):

1. Compressed gradients (`GradientStore`). Each stored trunk gradient is kept per parameter tensor: a tensor with
   ndim >= 2 (once size-1 dimensions are dropped) is viewed as an (a x b) matrix, b = prod(shape[1:]), and
   stored as rank-r factors U (a x r), V (b x r) from a randomized range finder (`low_rank_factors`) when
   r (a + b) < a b; others (and 1-D tensors) dense. A prediction is sum_j w_j U_j V_j^T per tensor, one
   (a x m r) @ (m r x b) product: no dense gradient of the window is ever formed.
2. Sketched signals (`count_sketch`). Signals wider than `max_signal_width` (an LM's logit error is vocabulary-wide,
   its head gradient vocabulary x d_model) are reduced to the largest prime D <= `max_signal_width` by a fixed,
   linear, seeded count sketch, which preserves inner products in expectation; the dual fit only uses inner
   products of signals. Because it is linear, the trainer applies it when it captures a signal
   (`predictor.sketch(signal)`), and `observe`/`predict` take sketched signals.
3. A memory budget (`plan_window`). The stored floats m (C(r) + w) (C(r) = floats per compressed gradient,
   w = sketched signal width) are kept <= `memory_fraction` * P: m = `window_size` and the largest r in
   [1, `max_rank`] that fits; when even r = 1 does not fit, m shrinks to the largest value that does (r then
   again the largest that fits at that m). Only when C(1) + w > `memory_fraction` * P (a tiny model, mostly
   1-D or thin tensors, or a signal as wide as the model) does it exceed the budget, and then with m = r = 1.
   m and r are chosen when w is known: at construction when `signal_width` (the raw width) is given, else at
   the first `observe`; the state is allocated at the first `observe`, on the trunk gradients' device.

Costs (P_lr = elements of the compressed tensors, k = r + `oversampling`, q = `power_iterations`):
an observation compresses each trunk gradient with 2 + 2q products of a tensor with a k-column matrix,
2 (2 + 2q) k P_lr flops (8 k P_lr at q = 1), plus a QR of each (a x k) and an SVD of each (k x b) matrix; a
prediction costs 2 m r P_lr + 2 m (P - P_lr) flops per row (r times a dense window's 2 m P: compute traded for
memory). Everything is float32 except the m x m system (float64). GPT-2 small (P = 124 M): the budget would allow
r = 9 (0.248 P), `DEFAULT_MAX_RANK` keeps r = 4 (0.119 P); an observed step's prediction, learning and sketches
cost 0.28 of a training step on 2 CPU cores (benchmarks/README.md, lm_scale.py).

Defaults (the example's ViT, 2.7 M trunk parameters, 120 steps from scratch, two 32-example control batches per
step, E with the trainer's fitted beta, steps < 60 / >= 60): at `memory_fraction` 0.25 the budget allows m = 16
at r = 1, m = 8 at r = 3 or m = 4 at r = 7; with the head gradient they gave E = 0.049 / 0.035, 0.040 / 0.024
and 0.032 / -0.001, against 0.054 / 0.049 for an uncompressed window of 16 (which r = 7, at
`memory_fraction` 1, matches). Hence m = 16: a longer window beats a sharper compression at equal memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

PREDICTOR_NAMES = ("ntk", "window", "zero")

# name -> (signal, default relative ridge)
PRESETS = {"ntk": ("logit_error", 1.0), "window": ("head_gradient", 1.0)}

DEFAULT_WINDOW_SIZE = 16
DEFAULT_MEMORY_FRACTION = 0.25
DEFAULT_MAX_RANK = 4  # a prediction costs 2 m r flops per compressed element: rank beyond 4 buys little (benchmarks/README.md)
MAX_SIGNAL_WIDTH = 4096

Shape = Sequence[int]


# ---------------------------------------------------------------------------------------------- layout and budget


def matrix_shape(shape: Shape) -> tuple[int, int] | None:
    """The (a, b) = (shape[0], prod(shape[1:])) matrix a tensor is viewed as once its size-1 dimensions are dropped
    (a (1, 65, 192) position embedding is a 65 x 192 matrix); None when fewer than 2 dimensions are left."""
    shape = [int(n) for n in shape if n != 1]
    if len(shape) < 2:
        return None
    return shape[0], math.prod(shape[1:])


def is_compressed(shape: Shape, rank: int) -> bool:
    """Whether a tensor is stored as rank-r factors: ndim >= 2 and r (a + b) < a b (fewer floats than dense)."""
    matrix = matrix_shape(shape)
    return matrix is not None and rank * (matrix[0] + matrix[1]) < matrix[0] * matrix[1]


def zero_encoding(shape: Shape, rank: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """A zero tensor of `shape` as `GradientStore.encode` stores it at `rank`: zero factors (U: a x r, V: b x r)
    when compressed, else zero flat values; no compression work."""
    if is_compressed(shape, rank):
        a, b = matrix_shape(shape)
        return torch.zeros(a, rank, device=device), torch.zeros(b, rank, device=device)
    return torch.zeros(math.prod(int(n) for n in shape), device=device)


def compressed_numel(shapes: Sequence[Shape], rank: int) -> int:
    """C(r): floats that one stored gradient takes, sum over tensors of min(r (a + b), a b) (numel for 1-D)."""
    total = 0
    for shape in shapes:
        matrix = matrix_shape(shape)
        total += rank * (matrix[0] + matrix[1]) if is_compressed(shape, rank) else math.prod(int(n) for n in shape)
    return total


def state_numel(shapes: Sequence[Shape], signal_width: int, window_size: int, rank: int) -> int:
    """Floats a `RidgePredictor` holds with window m and rank r: m (C(r) + w). Computed, never allocated."""
    return window_size * (compressed_numel(shapes, rank) + signal_width)


def plan_window(
    shapes: Sequence[Shape],
    signal_width: int,
    window_size: int = DEFAULT_WINDOW_SIZE,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    max_rank: int = DEFAULT_MAX_RANK,
) -> tuple[int, int]:
    """(m, r): the window and rank a `RidgePredictor` uses, from the budget m (C(r) + w) <= fraction * P.

    Rule: budget = `memory_fraction` * P, per-slot cost c(r) = C(r) + w (w the sketched signal width).
    If `window_size` * c(1) <= budget, m = `window_size`; else m = max(1, floor(budget / c(1))). Then r is the
    largest value in [1, `max_rank`] with m c(r) <= budget, or 1 when none fits. The result exceeds the budget
    exactly when c(1) > budget (then m = r = 1).
    """
    if window_size < 1 or max_rank < 1 or not memory_fraction > 0:
        raise ValueError(f"need window_size >= 1, max_rank >= 1 and memory_fraction > 0 (got {window_size}, {max_rank}, {memory_fraction})")
    budget = memory_fraction * sum(math.prod(int(n) for n in shape) for shape in shapes)

    def slot(rank: int) -> int:
        return compressed_numel(shapes, rank) + signal_width

    window = window_size if window_size * slot(1) <= budget else max(1, int(budget // slot(1)))
    rank = 1
    for candidate in range(2, max_rank + 1):  # c(r) is nondecreasing in r
        if window * slot(candidate) > budget:
            break
        rank = candidate
    return window, rank


# ---------------------------------------------------------------------------------------------- compression


def gaussian_test_matrix(rows: int, columns: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Omega (rows x columns), standard normal float32 from a CPU generator with a fixed seed: the same on every
    process and device, so compression is a deterministic function of the gradient."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, columns, generator=generator, dtype=torch.float32).to(device)


def low_rank_factors(
    matrix: torch.Tensor, rank: int, test_matrix: torch.Tensor, power_iterations: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors (U: a x r, V: b x r) with U V^T ~ matrix, by a randomized range finder (Halko, Martinsson
    and Tropp 2011, algorithms 4.4 and 5.1).

        Y = M Omega (a x k),  Q = qr(Y);  q times: Q = qr(M qr(M^T Q));  B = Q^T M (k x b) = Ub S Vb^T
        U = Q Ub[:, :r] S[:r],  V = Vb[:, :r]

    Omega (b x k, k >= r: the oversampled test matrix) is fixed, so the result is a deterministic function of M.
    Exact when rank(M) <= r (then Q spans M's range and the truncated SVD of B loses nothing); otherwise close
    to the best rank-r approximation when the spectrum decays, which power iterations sharpen. Cost: 2 + 2q
    products of M with a k-column matrix (2 (2 + 2q) k a b flops), a QR of (a x k) and an SVD of (k x b).
    A stack of matrices (t x a x b) gives stacked factors, in batched products (one call for t gradients).
    """
    basis = torch.linalg.qr(matrix @ test_matrix).Q
    for _ in range(power_iterations):
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.mT @ basis).Q).Q
    left, values, right = torch.linalg.svd(basis.mT @ matrix, full_matrices=False)
    return basis @ (left[..., :rank] * values[..., None, :rank]), right[..., :rank, :].mT


class GradientStore:
    """Ring buffer of `capacity` compressed flat gradients, in contiguous buffers preallocated per tensor.

    Per compressed tensor i (an a x b matrix): U_i (a, m, r) and V_i (m, r, b), slot j holding U_j and V_j^T;
    all dense tensors together: one (m, n_dense) buffer. Writing a gradient copies its factors into one slot
    (nothing else moves); `combine_tensor` computes one tensor of sum_j w_j G_j as (U * w) reshaped to (a, m r)
    times V reshaped to (m r, b). Everything is per tensor, so that a caller can stream a prediction or an
    observation tensor by tensor without a parameter-sized temporary. Holds m C(r) floats (`compressed_numel`).
    """

    def __init__(
        self,
        shapes: Sequence[Shape],
        capacity: int,
        rank: int,
        device: torch.device | str = "cpu",
        seed: int = 0,
        oversampling: int = 4,
        power_iterations: int = 1,
    ):
        self.shapes = [tuple(int(n) for n in shape) for shape in shapes]
        self.capacity, self.rank, self.seed = capacity, rank, seed
        self.oversampling, self.power_iterations = oversampling, power_iterations
        self.numels = [math.prod(shape) for shape in self.shapes]
        self.compressed = [i for i, shape in enumerate(self.shapes) if is_compressed(shape, rank)]
        self.dense = [i for i, shape in enumerate(self.shapes) if not is_compressed(shape, rank)]
        self._compressed_position = {i: k for k, i in enumerate(self.compressed)}
        self._dense_start, dense_numel = {}, 0
        for i in self.dense:
            self._dense_start[i], dense_numel = dense_numel, dense_numel + self.numels[i]
        self.u = [torch.zeros(matrix_shape(self.shapes[i])[0], capacity, rank, device=device) for i in self.compressed]
        self.v = [torch.zeros(capacity, rank, matrix_shape(self.shapes[i])[1], device=device) for i in self.compressed]
        self.dense_buffer = torch.zeros(capacity, dense_numel, device=device)
        self._test_matrices: dict[int, torch.Tensor] = {}  # derived from the seed, never saved

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in [*self.u, *self.v, self.dense_buffer])

    def _test_matrix(self, index: int, device: torch.device) -> torch.Tensor:
        matrix = self._test_matrices.get(index)
        if matrix is None or matrix.device != device:
            rows, columns = matrix_shape(self.shapes[index])
            width = min(self.rank + self.oversampling, rows, columns)
            matrix = gaussian_test_matrix(columns, width, (self.seed * 1_000_003 + index) % 2**63, device)
            self._test_matrices[index] = matrix
        return matrix

    def encode(self, index: int, tensor: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """Tensor `index` of a gradient (any shape, float32) as it is stored: rank-r factors (U, V) when compressed,
        else a copy of its flat values (None: a zero tensor, on the store's device, without compression work); the
        store itself is not touched (a failure leaves it as it was)."""
        if tensor is None:
            return zero_encoding(self.shapes[index], self.rank, self.dense_buffer.device)
        return self.encode_stack(index, tensor[None])[0]

    def encode_stack(self, index: int, tensors: torch.Tensor) -> list:
        """`encode` of each of t stacked tensors (t x the tensor's shape), compressed in one batched call."""
        if index not in self._compressed_position:
            return list(tensors.reshape(len(tensors), -1).clone())  # not views: the caller's tensor may be .grad, zeroed before `write`
        matrices = tensors.reshape(len(tensors), *matrix_shape(self.shapes[index]))
        u, v = low_rank_factors(matrices, self.rank, self._test_matrix(index, tensors.device), self.power_iterations)
        return list(zip(u, v))

    def write(self, slot: int, parts: Sequence) -> None:
        """Stores one gradient, given as the `encode`d parts of all its tensors (in order), in `slot`."""
        for index, part in enumerate(parts):
            position = self._compressed_position.get(index)
            if position is not None:
                u, v = part
                self.u[position][:, slot].copy_(u)
                self.v[position][slot].copy_(v.T)
            else:
                start = self._dense_start[index]
                self.dense_buffer[slot, start : start + self.numels[index]].copy_(part)

    def combine_tensor(self, index: int, weights: torch.Tensor) -> torch.Tensor:
        """(t, numel) float32: row i is tensor `index` of sum_j weights[i, j] G~_j, over the first `filled` =
        weights.shape[1] slots; only this tensor's memory is touched."""
        weights = weights.float()
        rows, filled = weights.shape
        position = self._compressed_position.get(index)
        if position is None:
            start = self._dense_start[index]
            return weights @ self.dense_buffer[:filled, start : start + self.numels[index]]
        a, b = matrix_shape(self.shapes[index])
        u_buffer, right = self.u[position][:, :filled], self.v[position][:filled].reshape(filled * self.rank, b)
        out = torch.empty(rows, a * b, dtype=torch.float32, device=right.device)
        for row in range(rows):
            torch.mm((u_buffer * weights[row, :, None]).reshape(a, filled * self.rank), right, out=out[row].view(a, b))
        return out

    def state_dict(self) -> dict:
        return {"u": list(self.u), "v": list(self.v), "dense": self.dense_buffer}

    def to(self, device: torch.device | str) -> None:
        self.u = [t.to(device) for t in self.u]
        self.v = [t.to(device) for t in self.v]
        self.dense_buffer = self.dense_buffer.to(device)

    def load_state_dict(self, state: dict) -> None:
        expected = [*self.u, *self.v, self.dense_buffer]
        loaded = [*state["u"], *state["v"], state["dense"]]
        if len(loaded) != len(expected) or any(x.shape != y.shape for x, y in zip(loaded, expected)):
            raise ValueError("predictor: the saved gradient store does not match these trunk parameter shapes")
        self.u = [t.to(self.dense_buffer.device).contiguous() for t in state["u"]]
        self.v = [t.to(self.dense_buffer.device).contiguous() for t in state["v"]]
        self.dense_buffer = state["dense"].to(self.dense_buffer.device).contiguous()


# ---------------------------------------------------------------------------------------------- signal sketch

def largest_prime_at_most(n: int) -> int:
    if n < 2:
        raise ValueError(f"need a width >= 2 (got {n})")
    for candidate in range(n, 1, -1):
        if all(candidate % d for d in range(2, math.isqrt(candidate) + 1)):
            return candidate
    raise AssertionError("unreachable")


SIGN_PERIOD = largest_prime_at_most(1 << 20)  # 1048573


def sign_vector(length: int, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """`length` fair random signs (float32 +-1) from a CPU generator with a fixed seed: the same everywhere."""
    generator = torch.Generator().manual_seed(seed)
    return (1.0 - 2.0 * torch.randint(0, 2, (length,), generator=generator)).float().to(device)


def count_sketch(signal: torch.Tensor, width: int, signs: torch.Tensor, offset: int = 0, chunk: int = 1 << 22) -> torch.Tensor:
    """The count sketch (S x)_b = sum_{i : i mod D = b} s_i x_i of each row of `signal` (float32, D = `width`),
    with s_i = signs[(o + i) mod L], L = len(signs), for the coordinates i of a piece that starts at position
    o = `offset` of a longer vector: the sketches of its pieces, each with its own offset, sum to its sketch
    (buckets (o + i) mod D), so a long vector can be sketched piece by piece.

    Unbiased inner products: <S x, S y> = sum_i s_i^2 x_i y_i + sum_{i != j, i = j mod D} s_i s_j x_i y_j with
    s_i^2 = 1. Two coordinates in one bucket differ by a multiple of D; for D and L coprime (both prime) and a
    signal narrower than D L they never share a sign entry, so s_i s_j is a product of two independent fair signs
    (over the seed) and has mean 0: E <S x, S y> = <x, y>, whatever the buckets. The error's variance is about
    sum over colliding pairs of x_i^2 y_j^2 + x_i y_i x_j y_j (each coordinate meets d / D others).
    Why this layout: buckets i mod D and signs signs[i mod L] need no per-coordinate index or hash (for a
    38 M-wide head gradient an int64 index would take 300 MB, a hashed sign per call seconds on a CPU): a
    sketch is a few elementwise passes, far cheaper than computing the signal itself, and deterministic (a
    fixed-order sum, no scatter). D prime spreads strided structure (row v, column c of a vocabulary x d_model
    head gradient: i = v d + c) over every bucket, where a power of two would fold it (d = 1024 into 4096
    buckets: each column into 4). Up to L coordinates the signs are i.i.d.; beyond, pairs (i + kL, j + kL) share
    the sign product of (i, j), which correlates those error terms without biasing them. Linear, so sums and
    differences of signals can be taken before or after it.
    """
    rows = signal.reshape(-1, signal.shape[-1])
    total, period = rows.shape[1], len(signs)
    out = torch.zeros(rows.shape[0], width, dtype=torch.float32, device=signal.device)
    step = max(1, chunk // width) * width  # chunks start at multiples of D: bucket = position within a row of D
    for start in range(0, total, step):
        stop = min(total, start + step)
        first = (offset + start) % period
        if first + stop - start <= period:
            chunk_signs = signs[first : first + stop - start]
        else:
            chunk_signs = signs.repeat(-(-(first + stop - start) // period))[first : first + stop - start]
        piece = rows[:, start:stop].float() * chunk_signs
        if (stop - start) % width:
            piece = torch.nn.functional.pad(piece, (0, width - (stop - start) % width))
        out += piece.reshape(rows.shape[0], -1, width).sum(1)
    if offset % width:  # local position i is in bucket i mod D; its place in the long vector, (o + i) mod D
        out = torch.roll(out, offset % width, dims=1)
    return out.reshape(*signal.shape[:-1], width)


class CountSketch:
    """`count_sketch` of width `width` with the `SIGN_PERIOD` signs of `seed`, made at the first call (and again
    on another device); they derive from the seed and are never saved."""

    def __init__(self, width: int, seed: int):
        self.width, self.seed = width, seed
        self._signs: torch.Tensor | None = None

    def __call__(self, signal: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if self._signs is None or self._signs.device != signal.device:
            self._signs = sign_vector(SIGN_PERIOD, self.seed, signal.device)
        return count_sketch(signal, self.width, self._signs, offset=offset)


# ---------------------------------------------------------------------------------------------- ridge fit


def dual_ridge_map(signals: torch.Tensor, ridge: float) -> torch.Tensor:
    """(H H^T + lambda I)^-1 H in float64 (n x w), lambda = `ridge` times the mean diagonal of H H^T.

    A prediction is then weights = s (this map)^T (t x n), combined with the stored gradients. Raises
    FloatingPointError when the solution is not finite (torch.linalg.LinAlgError when the system is singular).
    """
    signals = signals.double()
    gram = signals @ signals.T
    penalty = ridge * gram.diagonal().mean().clamp_min(1e-30)
    system = gram + penalty * torch.eye(len(signals), dtype=gram.dtype, device=gram.device)
    dual_map = torch.linalg.solve(system, signals)
    if not torch.isfinite(dual_map).all():
        raise FloatingPointError("the predictor's ridge system has no finite solution")
    return dual_map


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor as one row; a stack of rows as it is."""
    return tensor.reshape(1, -1) if tensor.dim() == 1 else tensor


# ---------------------------------------------------------------------------------------------- predictors


class GradientPredictor:
    """Interface: `signal` names the input ("head_gradient" or "logit_error").

    Signals are 1-D tensors, or several stacked as rows (one pass over the state serves them all), already passed
    through `sketch`. Trunk gradients are handled one parameter tensor at a time (`shapes` order), so that a
    caller never needs a parameter-sized temporary: `predict_tensors` yields a prediction tensor by tensor, and an
    observation is `plan`, `encode` of each tensor, then `record`. `predict` and `observe` do the same on flat
    vectors (tests, benchmarks). A prediction is finite (or `predict_tensors` raises FloatingPointError).
    """

    signal: str = "head_gradient"
    window_size: int | None = 0
    rank: int | None = 0

    def __init__(self, shapes: Sequence[Shape]):
        self.shapes = [tuple(int(n) for n in shape) for shape in shapes]

    def sketch(self, signal: torch.Tensor) -> torch.Tensor:
        """The signal as `observe` and `predict` take it (linear; the identity here)."""
        return signal

    def predict_tensors(self, signal: torch.Tensor):
        """An iterator over the predicted trunk gradient, one (*signal.shape[:-1], numel) tensor per trunk tensor,
        or None for no prediction. The fit is done (and may raise) at the call, each tensor when it is reached."""
        return None

    def plan(self, signal_width: int) -> None:
        """Fix what depends on the (sketched) signal width before the first `encode`."""

    def encode(self, index: int, tensor: torch.Tensor | None):
        """Trunk tensor `index` of one control batch's gradient, in the form `record` keeps (None: zero)."""
        return None

    def encode_stack(self, index: int, tensors: torch.Tensor) -> list:
        """`encode` of each of t stacked tensors (t x the tensor's shape); subclasses may batch the work."""
        return [self.encode(index, tensor) for tensor in tensors]

    def record(self, signal: torch.Tensor, parts: list) -> None:
        """Keep one control batch: its signal (1-D) and the `encode`d tensors of its true trunk gradient."""

    def predict(self, signal: torch.Tensor) -> torch.Tensor | None:
        """The predicted flat trunk gradient(s) for `signal` (same leading shape), or None for no prediction."""
        parts = self.predict_tensors(signal)
        return None if parts is None else torch.cat(list(parts), dim=-1)

    def observe(self, signal: torch.Tensor, trunk_grad: torch.Tensor) -> None:
        """Record control batches from flat trunk gradients (rows, oldest first; all encoded before any is kept)."""
        signals, trunk_grads = _rows(signal), _rows(trunk_grad)
        numels = [math.prod(shape) for shape in self.shapes]
        if trunk_grads.shape[1] != sum(numels) or len(signals) != len(trunk_grads):
            raise ValueError(f"predictor: expected rows of {sum(numels)} trunk-gradient elements, one per signal")
        if not (torch.isfinite(signals).all() and torch.isfinite(trunk_grads).all()):
            raise FloatingPointError("a control batch's signal or trunk gradient is not finite; the pair is not kept")
        self.plan(signals.shape[1])
        encoded = [[self.encode(i, part) for i, part in enumerate(row.float().split(numels))] for row in trunk_grads]
        for row_signal, parts in zip(signals, encoded):
            self.record(row_signal, parts)

    def state_numel(self) -> int:
        """Floats held in the state (what `state_dict` returns)."""
        return 0

    def state_bytes(self) -> int:
        return 4 * self.state_numel()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ZeroPredictor(GradientPredictor):
    """No prediction: the trunk gradient comes from the control micro-batch alone."""


class RidgePredictor(GradientPredictor):
    """Dual ridge regression signal -> trunk gradient over the last m control batches, gradients stored compressed
    (module docstring: formula, budget, costs).

    Args:
        shapes: the trunk parameter shapes, in the order of the flat gradient.
        signal: "logit_error" or "head_gradient" (what the trainer captures; only a label here).
        window_size: m requested; the budget may shrink it (`plan_window`).
        ridge: lambda relative to the mean diagonal of H H^T.
        memory_fraction: stored floats <= this times P (see `plan_window` for the one exception).
        max_rank: largest rank r of the compressed gradients.
        max_signal_width: wider signals are count-sketched to the largest prime <= this (`sketch`).
        signal_width: the raw (unsketched) signal width, if known: m and r are chosen now instead of at the
            first `observe` (nothing is allocated before it).
        seed, oversampling, power_iterations: the compression's fixed test matrices and their size.

    Once planned (at construction when `signal_width` is given, else at the first `observe`), `window_size` and
    `rank` are the chosen m and r (None before), `signal_width` the sketched width w, and `state_numel()` =
    m (C(r) + w). `requested_window_size` keeps the argument. The state is allocated at the first `observe`, on
    the trunk gradients' device.
    """

    def __init__(
        self,
        shapes: Sequence[Shape],
        signal: str = "head_gradient",
        window_size: int = DEFAULT_WINDOW_SIZE,
        ridge: float = 1.0,
        memory_fraction: float = DEFAULT_MEMORY_FRACTION,
        max_rank: int = DEFAULT_MAX_RANK,
        max_signal_width: int = MAX_SIGNAL_WIDTH,
        signal_width: int | None = None,
        seed: int = 0,
        oversampling: int = 4,
        power_iterations: int = 1,
    ):
        if signal not in ("logit_error", "head_gradient"):
            raise ValueError(f"signal must be 'logit_error' or 'head_gradient' (got {signal!r})")
        if not ridge >= 0:
            raise ValueError(f"ridge must be >= 0 (got {ridge})")
        super().__init__(shapes)
        self.signal, self.ridge = signal, ridge
        self.requested_window_size, self.memory_fraction, self.max_rank = window_size, memory_fraction, max_rank
        plan_window(self.shapes, 0, window_size, memory_fraction, max_rank)  # validates the arguments
        self.max_signal_width = max_signal_width
        if not 2 <= max_signal_width < SIGN_PERIOD:
            raise ValueError(f"max_signal_width must be in [2, {SIGN_PERIOD}) (got {max_signal_width})")
        self.sketch_width = largest_prime_at_most(max_signal_width)
        self._count_sketch = CountSketch(self.sketch_width, seed)
        self.seed, self.oversampling, self.power_iterations = seed, oversampling, power_iterations
        self.window_size: int | None = None
        self.rank: int | None = None
        self.signal_width: int | None = None
        self.signals: torch.Tensor | None = None  # (m, w) ring buffer
        self.store: GradientStore | None = None
        self.count = 0
        self._dual_map: torch.Tensor | None = None  # (filled, w) float64, refitted lazily
        if signal_width is not None:
            self._plan(self.sketched_width(signal_width))

    def sketched_width(self, width: int) -> int:
        """The width `sketch` gives a signal of `width` coordinates."""
        return width if width <= self.max_signal_width else self.sketch_width

    def sketch(self, signal: torch.Tensor) -> torch.Tensor:
        """`count_sketch` to `sketch_width` coordinates when wider than `max_signal_width`, else the identity.
        Accepts 1-D or stacked rows. Linear: apply it to each captured signal, then sum, difference, average."""
        if signal.shape[-1] <= self.max_signal_width:
            return signal
        return self._count_sketch(signal)

    def _plan(self, signal_width: int) -> None:
        self.window_size, self.rank = plan_window(self.shapes, signal_width, self.requested_window_size, self.memory_fraction, self.max_rank)
        self.signal_width = signal_width

    def _allocate(self, device: torch.device | str) -> None:
        self.signals = torch.zeros(self.window_size, self.signal_width, device=device)
        self.store = GradientStore(self.shapes, self.window_size, self.rank, device, self.seed, self.oversampling, self.power_iterations)

    def plan(self, signal_width):
        """Chooses m and r for this (sketched) width, once; a later width must match."""
        if signal_width > self.max_signal_width:
            raise ValueError(f"predictor: a signal of width {signal_width} > {self.max_signal_width}; pass it through predictor.sketch first")
        if self.signal_width is None:
            self._plan(signal_width)
        elif signal_width != self.signal_width:
            raise ValueError(f"predictor: signal width {signal_width}, but this predictor's window holds width {self.signal_width}")

    def encode(self, index, tensor):
        if tensor is not None:
            return self.encode_stack(index, tensor[None])[0]
        if self.rank is None:
            raise RuntimeError("predictor: call plan(signal_width) before encode")
        # a zero tensor: on the store's device (allocated on the first real tensor's)
        return zero_encoding(self.shapes[index], self.rank, "cpu" if self.store is None else self.store.dense_buffer.device)

    def encode_stack(self, index, tensors):
        if self.rank is None:
            raise RuntimeError("predictor: call plan(signal_width) before encode")
        if self.store is None:
            self._allocate(tensors.device)
        elif self.signals.device != tensors.device:
            self.signals = self.signals.to(tensors.device)
            self.store.to(tensors.device)
        return self.store.encode_stack(index, tensors.float())

    def record(self, signal, parts):
        self.plan(signal.shape[-1])
        slot = self.count % self.window_size
        self.signals[slot].copy_(signal)
        self.store.write(slot, parts)
        self.count += 1
        self._dual_map = None

    def predict_tensors(self, signal):
        if self.count == 0:
            return None
        rows = _rows(signal)
        self.plan(rows.shape[1])
        filled = min(self.count, self.window_size)
        if self._dual_map is None:
            self._dual_map = dual_ridge_map(self.signals[:filled], self.ridge)
        weights = rows.to(self._dual_map) @ self._dual_map.T
        if not torch.isfinite(weights).all():
            raise FloatingPointError("the predictor's ridge weights are not finite")
        # finite weights times finite stored gradients (only finite ones are recorded): a finite prediction
        return (self.store.combine_tensor(i, weights).reshape(*signal.shape[:-1], -1) for i in range(len(self.shapes)))

    def state_numel(self):
        """m (C(r) + w): the floats the state holds (allocated at the first `observe`), 0 before the window is
        planned (at construction with `signal_width`, else at the first `observe`)."""
        if self.window_size is None:
            return 0
        return state_numel(self.shapes, self.signal_width, self.window_size, self.rank)

    def state_dict(self):
        if self.store is None:
            return {"count": 0}
        return {
            "count": self.count, "window_size": self.window_size, "rank": self.rank,
            "signals": self.signals, "gradients": self.store.state_dict(),
        }

    def load_state_dict(self, state):
        """Restores a `state_dict`, including its window and rank (a changed `memory_fraction` or `window_size`
        applies to fresh predictors only, so that a resumed run continues bit-identically)."""
        if "gram" in state or ("gradients" in state and not isinstance(state["gradients"], dict)):
            raise ValueError(
                "predictor: this state was written by lgp_hf before compressed predictors (issue 13); resume it with "
                "the lgp_hf version that wrote it, or start the predictor fresh."
            )
        self._dual_map = None
        if state["count"] == 0:
            self.signals = self.store = None
            self.count = 0
            return
        signals = state["signals"]
        self.window_size, self.rank, self.signal_width = state["window_size"], state["rank"], signals.shape[1]
        self.store = GradientStore(self.shapes, self.window_size, self.rank, signals.device, self.seed, self.oversampling, self.power_iterations)
        self.store.load_state_dict(state["gradients"])
        self.signals = signals.float().contiguous()
        self.count = int(state["count"])


def make_predictor(
    name: str,
    shapes: Sequence[Shape],
    window_size: int = DEFAULT_WINDOW_SIZE,
    ridge: float | None = None,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    max_rank: int = DEFAULT_MAX_RANK,
    signal_width: int | None = None,
) -> GradientPredictor:
    """The predictor named by `PredictedGradientArguments.predictor` for trunk tensors of `shapes` (ridge None:
    the preset's default; `signal_width`, the raw signal width if known, fixes m and r at once)."""
    if name == "zero":
        return ZeroPredictor(shapes)
    if name not in PRESETS:
        raise ValueError(f"predictor: unknown value {name!r}; allowed values are {list(PREDICTOR_NAMES)}.")
    signal, default_ridge = PRESETS[name]
    return RidgePredictor(
        shapes, signal, window_size, default_ridge if ridge is None else ridge, memory_fraction, max_rank,
        signal_width=signal_width,
    )
