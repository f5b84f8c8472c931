"""The packed-bit engine must give exactly the integer scores of the torch simulation and of a plain integer
matmul, for the paper's +-1 biases and for any integer constants (folded batch-norm thresholds)."""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bnn_core.networks import BitwiseMLP, CompressedMLP
from bnn_core.packed import (
    BiasCode,
    PackedLayer,
    PackedNetwork,
    bias_code,
    offset_problem,
    pack_bits,
    preactivations_numpy,
    unpack_bits,
)


@given(st.integers(1, 200), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(n_bits, rows, seed):
    bits = np.random.default_rng(seed).random((rows, n_bits)) > 0.5
    words = pack_bits(bits)
    assert words.dtype == np.uint64
    assert words.shape == (rows, -(-n_bits // 64))
    np.testing.assert_array_equal(unpack_bits(words, n_bits), bits)


def test_bit_order_is_feature_j_in_word_j_div_64_bit_j_mod_64():
    bits = np.zeros((1, 130), dtype=bool)
    bits[0, [0, 63, 64, 129]] = True
    words = pack_bits(bits)
    assert words[0, 0] == (1 | (1 << 63))
    assert words[0, 1] == 1
    assert words[0, 2] == 2


def reference_preactivations(x_pm1: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return x_pm1.astype(np.int64) @ w.T.astype(np.int64) + b


@settings(max_examples=60, deadline=None)
@given(
    n_in=st.integers(1, 300),
    n_out=st.integers(1, 40),
    zero_fraction=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_packed_layer_equals_integer_matmul(n_in, n_out, zero_fraction, seed):
    rng = np.random.default_rng(seed)
    w = rng.choice([-1, 1], (n_out, n_in)) * (rng.random((n_out, n_in)) >= zero_fraction)
    b = rng.choice([-1, 1], n_out)
    x = rng.choice([-1, 1], (17, n_in))
    layer = PackedLayer.from_ternary(w, b)
    got = preactivations_numpy(pack_bits(x > 0), layer.signs, layer.mask, layer.offset, rows_per_chunk=5)
    np.testing.assert_array_equal(got, reference_preactivations(x, w, b))
    np.testing.assert_array_equal(layer.to_ternary()[0], w)


def test_ties_at_zero_follow_sign_of_zero_plus_one():
    # Two inputs, weights (+1, -1): with x = (+1, +1) the sum is 0; bias -1 then +1 gives -1... set bias so a = 0.
    w = np.array([[1, -1, 1]])
    b = np.array([-1])
    x = np.array([[1, 1, 1]])  # a = 1 - 1 + 1 - 1 = 0
    layer = PackedLayer.from_ternary(w, b)
    a = preactivations_numpy(pack_bits(x > 0), layer.signs, layer.mask, layer.offset)
    assert a[0, 0] == 0
    net = PackedNetwork.from_ternary([(w, b), (np.array([[1], [-1]]), np.array([1, 1]))])
    # sign(0) = +1 feeds +1 to the next layer: scores (1+1, -1+1) = (2, 0).
    np.testing.assert_array_equal(net.forward_counts(x > 0), [[2, 0]])


@settings(max_examples=25, deadline=None)
@given(
    n_in=st.integers(1, 200),
    hidden=st.lists(st.integers(1, 130), min_size=1, max_size=3),
    sparsity=st.sampled_from([0.0, 0.25, 0.5, 0.9]),
    seed=st.integers(0, 2**31 - 1),
)
def test_packed_network_equals_torch_simulation(n_in, hidden, sparsity, seed):
    torch.manual_seed(seed)
    real = CompressedMLP(n_in, hidden, 10, 0.0, 0.0)
    # Tiny shadow weights and inputs of few ones make zero pre-activations (ties) common.
    net = BitwiseMLP.from_compressed(real, sparsity, "identity").eval()
    x = torch.where(torch.rand(40, n_in) > 0.5, 1.0, -1.0)
    with torch.no_grad():
        simulated = net(x).numpy().astype(np.int64)
    packed = PackedNetwork.from_ternary(net.export_layers()).forward_counts(x.numpy() > 0)
    np.testing.assert_array_equal(packed, simulated)
    np.testing.assert_array_equal(packed.argmax(1), simulated.argmax(1))


def test_random_networks_do_produce_ties():
    """Guard for the test above: ties at zero actually occur in such networks (small even widths)."""
    torch.manual_seed(0)
    net = BitwiseMLP.from_compressed(CompressedMLP(8, [8], 4, 0.0, 0.0), 0.5, "identity").eval()
    x = torch.where(torch.rand(200, 8) > 0.5, 1.0, -1.0)
    (w0, b0), _ = net.quantized_parameters()
    assert bool(((x @ w0.T + b0) == 0).any())


# ------------------------------------------------------------------------- integer constants (thresholds)


def random_constants(rng, n_in, n_out, kind):
    """Per-unit constants ``c [n_out]``: the paper's +-1, any integer of the reachable range
    ``|c| <= n_in + 1``, or only its extremes (units whose output is constant)."""
    bound = n_in + 1
    if kind == "binary":
        return rng.choice([-1, 1], n_out)
    if kind == "extremes":
        return rng.choice([-bound, -n_in, n_in, bound], n_out)
    return rng.integers(-bound, bound + 1, n_out)


def integer_forward(x_pm1, layers):
    """Plain integer reference of a whole network: ``a = W z + c``, hidden ``z = +1 iff a >= 0``."""
    z = x_pm1.astype(np.int64)
    for i, (w, c) in enumerate(layers):
        a = z @ w.T.astype(np.int64) + np.asarray(c, dtype=np.int64)
        z = np.where(a >= 0, 1, -1) if i < len(layers) - 1 else a
    return z


@settings(max_examples=60, deadline=None)
@given(
    n_in=st.integers(1, 300),
    n_out=st.integers(1, 40),
    zero_fraction=st.sampled_from([0.0, 0.3, 1.0]),
    kind=st.sampled_from(["binary", "integer", "extremes"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_packed_layer_with_integer_constants_equals_integer_matmul(n_in, n_out, zero_fraction, kind, seed):
    rng = np.random.default_rng(seed)
    w = rng.choice([-1, 1], (n_out, n_in)) * (rng.random((n_out, n_in)) >= zero_fraction)
    c = random_constants(rng, n_in, n_out, kind)
    x = rng.choice([-1, 1], (17, n_in))
    layer = PackedLayer.from_ternary(w, c)
    assert layer.bias.dtype == np.int32
    got = preactivations_numpy(pack_bits(x > 0), layer.signs, layer.mask, layer.offset, rows_per_chunk=5)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, reference_preactivations(x, w, c))
    w2, c2 = layer.to_ternary()
    np.testing.assert_array_equal(w2, w)
    np.testing.assert_array_equal(c2, c)


@settings(max_examples=30, deadline=None)
@given(
    n_in=st.integers(1, 150),
    hidden=st.lists(st.integers(1, 100), min_size=0, max_size=3),
    kind=st.sampled_from(["binary", "integer", "extremes"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_packed_network_with_integer_constants_equals_integer_reference(n_in, hidden, kind, seed):
    rng = np.random.default_rng(seed)
    sizes = [n_in, *hidden, 7]
    layers = [
        (rng.choice([-1, 0, 1], (n_out, fan_in)), random_constants(rng, fan_in, n_out, kind))
        for fan_in, n_out in itertools.pairwise(sizes)
    ]
    x = rng.choice([-1, 1], (25, n_in))
    np.testing.assert_array_equal(PackedNetwork.from_ternary(layers).forward_counts(x > 0), integer_forward(x, layers))


def test_constants_at_the_bound_make_hidden_units_constant():
    # |W z| <= n_in: c = n_in (or n_in + 1) is always on, c = -(n_in + 1) never.
    n_in = 5
    w = np.ones((3, n_in), dtype=np.int8)
    layer = PackedLayer.from_ternary(w, np.array([n_in, n_in + 1, -(n_in + 1)]))
    x = np.array([[False] * n_in, [True] * n_in])
    a = preactivations_numpy(pack_bits(x), layer.signs, layer.mask, layer.offset)
    np.testing.assert_array_equal(a >= 0, [[True, True, False], [True, True, False]])


@pytest.mark.parametrize(
    ("bias", "message"),
    [
        (np.array([0, 7]), r"\[-6, 6\], got \[0, 7\]"),
        (np.array([-7, 0]), r"\[-6, 6\]"),
        (np.array([0.5, 1.0]), "whole numbers"),
        (np.array([np.nan, 1.0]), "whole numbers"),
        (np.array([True, False]), "dtype bool"),
        (np.array(["1", "2"]), "must be integers"),
        (np.array([1, 1, 1]), "not .n_out, n_in. and .n_out."),
    ],
)
def test_from_ternary_refuses_constants_it_cannot_run_exactly(bias, message):
    with pytest.raises(ValueError, match=message):
        PackedLayer.from_ternary(np.ones((2, 5), np.int8), bias)


def test_from_ternary_accepts_whole_floats_and_any_integer_dtype():
    w = np.ones((2, 5), np.int8)
    for bias in (np.array([-6.0, 6.0]), np.array([-6, 6], np.int8), np.array([6, 0], np.uint64)):
        layer = PackedLayer.from_ternary(w, bias)
        assert layer.bias.dtype == np.int32
        np.testing.assert_array_equal(layer.bias, bias.astype(np.int64))


def test_hand_made_offsets_that_overflow_int32_are_refused():
    layer = PackedLayer.from_ternary(np.ones((2, 5), np.int8), np.array([1, -1]))
    words = pack_bits(np.ones((1, 5), bool))
    assert offset_problem(layer.offset, 1) is None
    huge = np.array([2**31 - 100, 0], np.int64)  # + 2 * 64 agreements could pass 2^31 - 1
    assert offset_problem(huge, 1) is not None
    with pytest.raises(ValueError, match="beyond int32"):
        preactivations_numpy(words, layer.signs, layer.mask, huge)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-(2**20), 2**20), min_size=1, max_size=50))
def test_bias_code_is_the_canonical_fewest_bits_form(values):
    c = np.array(values)
    code, u = bias_code(c)
    np.testing.assert_array_equal(code.low + code.step * u, c)  # exact
    assert u.min() == 0
    if len(set(values)) == 1:
        assert (code.step, code.bits) == (1, 0)
    else:
        assert math.gcd(*u.tolist()) == 1
        assert 2 ** (code.bits - 1) <= u.max() < 2**code.bits  # fewest bits for the largest field


def test_bias_code_of_the_paper_biases_is_one_bit():
    code, u = bias_code(np.array([1, -1, -1, 1]))
    assert code == BiasCode(low=-1, step=2, bits=1)
    np.testing.assert_array_equal(u, [1, 0, 0, 1])  # the version-1 bias bit
    assert bias_code(np.array([1, 1]))[0].bits == 0
