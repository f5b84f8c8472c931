"""bnn_core.speed: the float32 baseline computes the bitwise network's integers; the timing helpers time."""

import itertools

import numpy as np
import pytest

from bnn_core.packed import PackedNetwork
from bnn_core.speed import Float32Network, median_seconds, throughput, time_calls


def random_layers(rng, sizes, zero_fraction):
    layers = []
    for n_in, n_out in itertools.pairwise(sizes):
        w = rng.choice([-1, 1], (n_out, n_in)) * (rng.random((n_out, n_in)) >= zero_fraction)
        layers.append((w, rng.choice([-1, 1], n_out)))
    return layers


@pytest.mark.parametrize("zero_fraction", [0.0, 0.5])
def test_float32_network_gives_the_bitwise_scores_including_ties(zero_fraction):
    rng = np.random.default_rng(0)
    layers = random_layers(rng, [5, 7, 5, 4], zero_fraction)  # small odd widths: a = 0 happens
    x = rng.choice([-1.0, 1.0], (300, 5)).astype(np.float32)
    floats = Float32Network(layers)
    expected = PackedNetwork.from_ternary(layers).forward_counts(x > 0)
    np.testing.assert_array_equal(floats(x), expected)
    np.testing.assert_array_equal(floats(x[:7]), expected[:7])  # another batch size, its own buffers
    w0, b0 = layers[0]
    assert ((x @ w0.T + b0) == 0).any()  # guard: the test above did see ties at zero


def test_float32_network_sign_of_zero_is_plus_one_even_with_a_negative_zero_bias():
    # One hidden unit whose pre-activation is exactly 0: products -1 * 0 = -0.0 plus a -0.0 bias.
    layers = [(np.array([[0, 0]]), np.array([-0.0])), (np.array([[1]]), np.array([0]))]
    got = Float32Network(layers)(np.array([[-1.0, -1.0]], np.float32))
    assert got[0, 0] == 1.0


def test_time_calls_warms_up_then_times_each_call():
    calls = []
    wall, cpu = time_calls(lambda: calls.append(1), 4)
    assert len(calls) == 5 and len(wall) == len(cpu) == 4
    assert all(t >= 0 for t in wall + cpu)
    assert median_seconds(lambda: None, repeats=3) >= 0


def test_throughput_reports_the_evaluate_keys():
    rng = np.random.default_rng(1)
    layers = random_layers(rng, [20, 16, 3], 0.3)
    x = rng.choice([-1.0, 1.0], (50, 20)).astype(np.float32)
    engine = PackedNetwork.from_ternary(layers)
    speed = throughput(engine.forward_counts, layers, x, repeats=1)
    assert set(speed) == {"bitwise_examples_per_s", "float_examples_per_s", "speedup_vs_float", "kernel"}
    assert speed["bitwise_examples_per_s"] > 0 and speed["float_examples_per_s"] > 0
    ratio = speed["bitwise_examples_per_s"] / speed["float_examples_per_s"]
    assert speed["speedup_vs_float"] == pytest.approx(ratio)
    assert isinstance(speed["kernel"], str) and speed["kernel"]
