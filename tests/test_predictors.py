"""The predictors on plain tensors: exactness, the memory budget, determinism, resume, the signal sketch."""

import io
import math

import pytest
import torch

from lgp_hf.predictors import (
    PREDICTOR_NAMES,
    SIGN_PERIOD,
    GradientStore,
    RidgePredictor,
    ZeroPredictor,
    compressed_numel,
    count_sketch,
    gaussian_test_matrix,
    low_rank_factors,
    make_predictor,
    plan_window,
    sign_vector,
    state_numel,
)


def gpt2_shapes(vocab=50257, d=768, layers=12, positions=1024):
    """The parameter shapes of GPT-2 (small by default: 124,439,808 parameters, lm_head tied to the embedding)."""
    shapes = [(vocab, d), (positions, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def vit_shapes(hidden=192, layers=6, channels=3, patch=4, image=32, mlp=768):
    """The trunk of the example's ViT (everything but the classifier)."""
    shapes = [(1, 1, hidden), (1, (image // patch) ** 2 + 1, hidden), (hidden, channels, patch, patch), (hidden,)]
    for _ in range(layers):
        shapes += [(hidden,), (hidden,)] + [(hidden, hidden), (hidden,)] * 4 + [(hidden,), (hidden,), (mlp, hidden), (mlp,), (hidden, mlp), (hidden,)]
    return shapes + [(hidden,), (hidden,)]


def numel(shapes):
    return sum(math.prod(shape) for shape in shapes)


def tensors_numel(state):
    if isinstance(state, torch.Tensor):
        return state.numel()
    if isinstance(state, dict):
        return sum(tensors_numel(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensors_numel(value) for value in state)
    return 0


def assert_states_equal(first, second):
    assert type(first) is type(second)
    if isinstance(first, torch.Tensor):
        assert first.dtype == second.dtype and torch.equal(first, second)
    elif isinstance(first, dict):
        assert first.keys() == second.keys()
        for key in first:
            assert_states_equal(first[key], second[key])
    elif isinstance(first, (list, tuple)):
        assert len(first) == len(second)
        for x, y in zip(first, second):
            assert_states_equal(x, y)
    else:
        assert first == second


SMALL_SHAPES = [(12, 10), (7,), (6, 5, 4), (3, 2)]  # compressed, dense, compressed (as 6 x 20), dense at small ranks


def random_pairs(count, signal_width, shapes=SMALL_SHAPES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, signal_width, generator=generator), torch.randn(count, numel(shapes), generator=generator)


# ---------------------------------------------------------------------------------------------- compression


def test_low_rank_factors_are_exact_for_matrices_of_rank_at_most_r():
    generator = torch.Generator().manual_seed(0)
    for a, b, true_rank, rank in [(50, 30, 3, 3), (30, 50, 2, 4), (200, 8, 1, 2)]:
        matrix = torch.randn(a, true_rank, generator=generator) @ torch.randn(true_rank, b, generator=generator)
        u, v = low_rank_factors(matrix, rank, gaussian_test_matrix(b, min(rank + 4, a, b), seed=1))
        assert u.shape == (a, rank) and v.shape == (b, rank)
        assert float((u @ v.T - matrix).norm() / matrix.norm()) < 1e-5


def test_gradient_store_combines_like_the_dense_sum_of_its_compressed_gradients():
    store = GradientStore(SMALL_SHAPES, capacity=4, rank=2)
    assert store.compressed == [0, 2] and store.dense == [1, 3]
    gradients = random_pairs(6, 1)[1]
    numels = [math.prod(shape) for shape in SMALL_SHAPES]
    stored = []
    for j, gradient in enumerate(gradients):  # wraps: slots hold gradients 4, 5, 2, 3
        parts = [store.encode(i, tensor.view(shape)) for i, (tensor, shape) in enumerate(zip(gradient.split(numels), SMALL_SHAPES))]
        store.write(j % 4, parts)
        stored.append(torch.cat([(part[0] @ part[1].T).reshape(-1) if i in store.compressed else part for i, part in enumerate(parts)]))
    slots = torch.stack([stored[4], stored[5], stored[2], stored[3]])
    weights = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    for filled in (4, 2):
        combined = torch.cat([store.combine_tensor(i, weights[:, :filled]) for i in range(len(SMALL_SHAPES))], dim=1)
        torch.testing.assert_close(combined, weights[:, :filled] @ slots[:filled], rtol=1e-5, atol=1e-5)
    assert store.numel == 4 * compressed_numel(SMALL_SHAPES, 2)


def test_stacked_encoding_equals_one_tensor_at_a_time():
    """`encode_stack` (the chunk contrasts' batched compression) stores what `encode` stores, row by row; a None
    tensor encodes as zeros."""
    store = GradientStore(SMALL_SHAPES, capacity=4, rank=2)
    generator = torch.Generator().manual_seed(3)
    for index, shape in enumerate(SMALL_SHAPES):
        tensors = torch.randn(3, *shape, generator=generator)
        for stacked, tensor in zip(store.encode_stack(index, tensors), tensors):
            single = store.encode(index, tensor)
            for a, b in zip(_pieces(stacked), _pieces(single)):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert all(float(piece.abs().sum()) == 0 for piece in _pieces(store.encode(index, None)))


def _pieces(part):
    return part if isinstance(part, tuple) else (part,)


def test_predictions_are_exact_for_low_rank_gradients_linear_in_the_signal():
    """g(s): per matrix tensor U0 diag(L s) V0^T (rank <= 3, linear in s), per 1-D tensor M s; window 8 > width 3,
    so a near-zero ridge recovers the map exactly on a new signal."""
    generator = torch.Generator().manual_seed(0)
    shapes, width, rank = [(40, 30), (20,), (6, 5, 4), (9, 7)], 3, 3
    maps = []
    for shape in shapes:
        if len(shape) >= 2:
            a, b = shape[0], math.prod(shape[1:])
            u0, v0 = torch.randn(a, rank, generator=generator), torch.randn(b, rank, generator=generator)
            mix = torch.randn(rank, width, generator=generator)
            maps.append(lambda s, u0=u0, v0=v0, mix=mix: (u0 * (mix @ s)) @ v0.T)
        else:
            matrix = torch.randn(shape[0], width, generator=generator)
            maps.append(lambda s, matrix=matrix: matrix @ s)

    def gradient(s):
        return torch.cat([m(s).reshape(-1) for m in maps])

    predictor = RidgePredictor(shapes, window_size=8, ridge=1e-8, memory_fraction=10.0, max_rank=rank)
    signals = torch.randn(8, width, generator=generator)
    predictor.observe(signals, torch.stack([gradient(s) for s in signals]))
    assert (predictor.window_size, predictor.rank) == (8, rank)
    for s in torch.randn(3, width, generator=generator):
        true, predicted = gradient(s), predictor.predict(s)
        assert predicted.dtype == torch.float32 and predicted.shape == true.shape
        assert float((predicted - true).norm() / true.norm()) < 1e-4


# ---------------------------------------------------------------------------------------------- budget


def test_gpt2_small_state_fits_a_quarter_of_the_model():
    shapes = gpt2_shapes()
    parameters = numel(shapes)
    assert parameters == 124_439_808
    predictor = make_predictor("window", shapes, signal_width=50257 * 768)  # planned, nothing allocated
    assert predictor.signal_width == 4093  # the sketch of the vocab x d_model head gradient
    assert predictor.window_size == 16 and predictor.rank == 4  # the default rank cap; the budget would allow 9
    assert plan_window(shapes, 4093, 16, 0.25, max_rank=16) == (16, 9)
    assert predictor.state_numel() == state_numel(shapes, 4093, 16, 4) <= 0.25 * parameters
    for window in (1, 4, 16, 64, 256):
        for fraction in (0.05, 0.25, 1.0):
            m, r = plan_window(shapes, 4093, window, fraction, max_rank=16)
            assert 1 <= m <= window and 1 <= r <= 16
            assert (m == window) == (window * (compressed_numel(shapes, 1) + 4093) <= fraction * parameters)
            assert state_numel(shapes, 4093, m, r) <= fraction * parameters
    ranks = [plan_window(shapes, 4093, 16, fraction, max_rank=16)[1] for fraction in (0.05, 0.1, 0.25, 0.5)]
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1]  # more memory, better compression


def test_vit_state_fits_the_budget():
    shapes = vit_shapes()
    parameters = numel(shapes)
    for width in (10, 192 * 10 + 10):  # logit error, head gradient of the classifier
        m, r = plan_window(shapes, width, 16, 0.25)
        assert (m, r) == (16, 1)  # the 1-D tensors (stored dense) take most of it
        assert state_numel(shapes, width, m, r) <= 0.25 * parameters


def test_the_window_shrinks_before_the_budget_is_exceeded_and_only_m_1_exceeds_it():
    shapes = [(64, 64)]  # P = 4096, budget 1024; rank 1 costs 128 floats per gradient
    assert plan_window(shapes, 0, 16, 0.25) == (8, 1)  # 8 x 128 = 1024
    assert plan_window(shapes, 0, 4, 0.25) == (4, 2)  # 4 x 256 = 1024
    assert plan_window(shapes, 64, 16, 0.25) == (5, 1)  # 5 x (128 + 64) = 960
    assert plan_window([(10,), (3, 3)], 4, 16, 0.25) == (1, 1)  # C(1) + w = 10 + 9 + 4 > 4.75: over, at m = 1
    with pytest.raises(ValueError):
        plan_window(shapes, 0, 0, 0.25)


@pytest.mark.parametrize("name, signal_width", [("ntk", 1000), ("window", 64 * 1000 + 1000)])
def test_state_dict_of_a_small_language_model_respects_the_budget(name, signal_width):
    shapes = gpt2_shapes(vocab=1000, d=64, layers=2, positions=64)
    parameters = numel(shapes)
    predictor = make_predictor(name, shapes)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):  # 8 pairs: the window (6 for ntk, 4 for window) wraps
        signals = predictor.sketch(torch.randn(2, signal_width, generator=generator))
        predictor.observe(signals, torch.randn(2, parameters, generator=generator))
    state = predictor.state_dict()
    assert predictor.window_size < 8 and predictor.count == 8
    assert tensors_numel(state) == predictor.state_numel() <= 0.25 * parameters
    prediction = predictor.predict(predictor.sketch(torch.randn(signal_width, generator=generator)))
    assert prediction.shape == (parameters,) and torch.isfinite(prediction).all()


# ---------------------------------------------------------------------------------------------- determinism, resume


def test_compression_is_deterministic():
    signals, gradients = random_pairs(6, 5)
    first, second = (make_predictor("window", SMALL_SHAPES, window_size=4, memory_fraction=2.0) for _ in range(2))
    for predictor in (first, second):
        predictor.observe(signals, gradients)
    assert first.rank == 2 and len(first.store.compressed) == 2
    assert_states_equal(first.state_dict(), second.state_dict())
    assert torch.equal(first.predict(signals[:2]), second.predict(signals[:2]))


def test_state_dict_round_trip_continues_bit_identically():
    signals, gradients = random_pairs(9, 5)
    original = make_predictor("ntk", SMALL_SHAPES, window_size=4, memory_fraction=2.0)
    original.observe(signals[:5], gradients[:5])
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    resumed = make_predictor("ntk", SMALL_SHAPES, window_size=4, memory_fraction=2.0)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert torch.equal(original.predict(signals[5:7]), resumed.predict(signals[5:7]))
    for predictor in (original, resumed):
        predictor.observe(signals[5:], gradients[5:])
    assert_states_equal(original.state_dict(), resumed.state_dict())
    assert torch.equal(original.predict(signals[:3]), resumed.predict(signals[:3]))
    fresh = make_predictor("ntk", SMALL_SHAPES)
    fresh.load_state_dict(make_predictor("ntk", SMALL_SHAPES).state_dict())  # an empty state
    assert fresh.predict(signals[0]) is None


@pytest.mark.parametrize("name", ["ntk", "window"])
def test_stacked_rows_equal_one_at_a_time_calls(name):
    signals, gradients = random_pairs(5, 4)
    one_at_a_time, stacked = (make_predictor(name, SMALL_SHAPES, window_size=8, memory_fraction=4.0) for _ in range(2))
    for signal, gradient in zip(signals, gradients):
        one_at_a_time.observe(signal, gradient)
    stacked.observe(signals[:2], gradients[:2])
    stacked.observe(signals[2], gradients[2])
    stacked.observe(signals[3:], gradients[3:])
    assert_states_equal(one_at_a_time.state_dict(), stacked.state_dict())
    queries = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    predictions = stacked.predict(queries)
    assert predictions.shape == (3, numel(SMALL_SHAPES)) and predictions.dtype == torch.float32
    for query, prediction in zip(queries, predictions):
        torch.testing.assert_close(one_at_a_time.predict(query), prediction, rtol=1e-5, atol=1e-6)


def test_non_finite_input_raises_and_is_not_kept():
    signals, gradients = random_pairs(3, 4)
    predictor = make_predictor("window", SMALL_SHAPES, window_size=4, memory_fraction=2.0)
    assert predictor.predict(signals[0]) is None
    predictor.observe(signals[0], gradients[0])
    before = io.BytesIO()
    torch.save(predictor.state_dict(), before)
    before.seek(0)
    before = torch.load(before, weights_only=False)  # a copy
    bad_signal, bad_gradient = signals[1:].clone(), gradients[1:].clone()
    bad_signal[1, 0], bad_gradient[0, 3] = float("nan"), float("inf")
    with pytest.raises(FloatingPointError):
        predictor.observe(bad_signal, gradients[1:])
    with pytest.raises(FloatingPointError):
        predictor.observe(signals[1:], bad_gradient)
    assert predictor.count == 1
    assert_states_equal(before, predictor.state_dict())


def test_presets_and_errors():
    assert PREDICTOR_NAMES == ("ntk", "window", "zero")
    ntk, window = make_predictor("ntk", SMALL_SHAPES), make_predictor("window", SMALL_SHAPES, ridge=0.5)
    assert (ntk.signal, ntk.ridge, window.signal, window.ridge) == ("logit_error", 1.0, "head_gradient", 0.5)
    zero = make_predictor("zero", SMALL_SHAPES)
    assert isinstance(zero, ZeroPredictor) and zero.predict(torch.ones(3)) is None and zero.state_numel() == 0
    zero.observe(torch.ones(3), torch.ones(numel(SMALL_SHAPES)))  # accepted, kept nowhere
    assert zero.predict(torch.ones(3)) is None
    with pytest.raises(ValueError):
        make_predictor("jacobian", SMALL_SHAPES)
    with pytest.raises(ValueError):  # an unsketched wide signal
        ntk.observe(torch.randn(5000), torch.randn(numel(SMALL_SHAPES)))
    with pytest.raises(ValueError):  # a state from before issue 13
        ntk.load_state_dict({"gram": torch.eye(2), "cross": torch.zeros(2, 5), "count": 3})


# ---------------------------------------------------------------------------------------------- sketch


def test_sketch_is_the_identity_up_to_the_maximum_width():
    predictor = make_predictor("ntk", SMALL_SHAPES)
    signal = torch.randn(2, 4096)
    assert predictor.sketch(signal) is signal
    assert predictor.sketch(torch.randn(4097)).shape == (4093,)  # the largest prime <= 4096
    assert predictor.sketch(torch.randn(3, 50257)).shape == (3, 4093)


def test_sketch_is_linear_and_deterministic():
    predictor, other = RidgePredictor(SMALL_SHAPES, max_signal_width=64), RidgePredictor(SMALL_SHAPES, max_signal_width=64)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 5000, generator=generator), torch.randn(3, 5000, generator=generator)
    torch.testing.assert_close(predictor.sketch(2 * x - 0.5 * y), 2 * predictor.sketch(x) - 0.5 * predictor.sketch(y), rtol=1e-5, atol=1e-4)
    stacked = predictor.sketch(x)
    assert stacked.shape == (3, 61)
    assert all(torch.equal(stacked[i], predictor.sketch(x[i])) for i in range(3))
    assert torch.equal(stacked, other.sketch(x))
    # chunking and the periodic signs (period < width) give the same linear map as one pass
    signs = sign_vector(1009, seed=3)
    torch.testing.assert_close(count_sketch(x, 61, signs, chunk=61 * 7), count_sketch(x, 61, signs, chunk=1 << 22), rtol=1e-5, atol=1e-5)


def test_sketch_preserves_inner_products_in_expectation():
    """Over seeds, E <S x, S y> = <x, y> and E ||S x||^2 = ||x||^2; here with signs repeating every 1009 coordinates
    (width 20000 < D L = 61 x 1009, so no two coordinates of a bucket share a sign)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=generator)
    y = x + torch.randn(20000, generator=generator)
    seeds = 400
    products, norms = torch.zeros(seeds, dtype=torch.float64), torch.zeros(seeds, dtype=torch.float64)
    for seed in range(seeds):
        signs = sign_vector(1009, seed)
        sx, sy = count_sketch(x, 61, signs), count_sketch(y, 61, signs)
        products[seed], norms[seed] = float(sx @ sy), float(sx @ sx)
    for estimates, exact in ((products, float(x @ y)), (norms, float(x @ x))):
        standard_error = float(estimates.std()) / seeds**0.5
        assert abs(float(estimates.mean()) - exact) < 4 * standard_error, (float(estimates.mean()), exact, standard_error)
        assert standard_error < 0.02 * exact
    assert SIGN_PERIOD == 1048573 and math.gcd(SIGN_PERIOD, 4093) == 1


def test_count_sketch_of_pieces_at_their_offsets_sums_to_the_sketch_of_the_whole():
    signs = sign_vector(SIGN_PERIOD, seed=3)
    vector = torch.randn(2, 30_000, generator=torch.Generator().manual_seed(0))
    cuts = [0, 7, 4093, 4100, 12_345, 30_000]
    pieces = sum(count_sketch(vector[:, a:b], 4093, signs, offset=a) for a, b in zip(cuts, cuts[1:]))
    torch.testing.assert_close(pieces, count_sketch(vector, 4093, signs), rtol=0, atol=1e-4)
