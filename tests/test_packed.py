"""The packed-bit engine must give exactly the integer scores of the torch simulation."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bnn_core.networks import BitwiseMLP, CompressedMLP
from bnn_core.packed import PackedLayer, PackedNetwork, pack_bits, preactivations_numpy, unpack_bits


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
