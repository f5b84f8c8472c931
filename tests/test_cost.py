import numpy as np
import pytest

from bnn_core.cost import cost_report, layer_cost


def test_dense_layer_without_zeros():
    cost = layer_cost("l", np.ones((1024, 1024), dtype=np.int8))
    assert cost.binary_macs == 1024 * 1024 + 1024
    assert cost.real_macs == 1024 * 1025  # the paper's 1024 x 1025 matrix, bias included
    assert cost.binary_bits == 1024 * 1024 + 1024
    assert cost.real_bits == 32 * 1024 * 1025


def test_zero_weights_cost_no_operation_and_only_a_mask_bit():
    w = np.ones((10, 20), dtype=np.int8)
    w[:, :5] = 0
    cost = layer_cost("l", w)
    assert cost.nonzero_weights == 150
    assert cost.binary_macs == 150 + 10
    assert cost.binary_bits == 200 + 150 + 10  # mask bit per weight, sign bit per nonzero, bias bits


def test_totals_and_ratios():
    report = cost_report([np.ones((4, 3)), -np.ones((2, 4))])
    summary = report.summary()
    assert summary["real_macs"] == 4 * 4 + 2 * 5
    assert summary["binary_macs"] == summary["real_macs"]
    assert summary["memory_ratio"] == 32.0
    assert summary["bit_ops_ratio"] == 1024.0  # same MACs, 32 x 32 bit-ops each against 1
    assert "| **total** |" in report.to_markdown()
    assert "= 1,024x" in report.to_markdown()


def test_real_valued_cost_counts_the_bias_as_one_more_input():
    from bnn_core.cost import real_valued_cost

    # The paper architecture on 784 pixels: 1024 x 785 + 2 x (1024 x 1025) + 10 x 1025 parameters.
    assert real_valued_cost([784, 1024, 1024, 1024, 10]) == {
        "macs_per_example": 2_913_290,
        "weight_bits": 32 * 2_913_290,
    }
    assert real_valued_cost([3, 2]) == {"macs_per_example": 8, "weight_bits": 256}


def test_paper_biases_cost_one_bit_as_before():
    rng = np.random.default_rng(0)
    weights = [rng.choice([-1, 0, 1], (8, 5)), rng.choice([-1, 1], (3, 8))]
    biases = [np.array([1, -1] * 4), np.array([-1, 1, 1])]
    with_biases, without = cost_report(weights, biases), cost_report(weights)
    assert with_biases.summary() == without.summary()
    assert with_biases.to_markdown() == without.to_markdown()
    assert [layer.bias_bits for layer in with_biases.layers] == [1, 1]


def test_integer_thresholds_cost_the_bits_the_model_file_stores():
    w = np.ones((4, 10), dtype=np.int8)
    w[:, :2] = 0
    # c = -3 + 2 u, u in {0, 1, 3, 5}: 3 bits per unit; the add of c is still one operation per unit.
    cost = layer_cost("l", w, np.array([-3, -1, 3, 7]))
    assert cost.bias_bits == 3
    assert cost.binary_bits == 40 + 32 + 4 * 3
    assert cost.binary_macs == 32 + 4  # same as with +-1 biases
    assert cost.real_macs == layer_cost("l", w).real_macs
    assert layer_cost("l", w, np.full(4, 5)).bias_bits == 0  # all equal: nothing stored per unit
    report = cost_report([w], [np.array([-3, -1, 3, 7])])
    assert "bits per unit: dense_0 3" in report.to_markdown()


def test_cost_report_refuses_mismatched_biases():
    w = np.ones((4, 10), dtype=np.int8)
    with pytest.raises(ValueError, match="1 bias vectors for 2 layers"):
        cost_report([w, w.T], [np.zeros(4)])
    with pytest.raises(ValueError, match="bias"):
        layer_cost("l", w, np.zeros(3))
    with pytest.raises(ValueError, match=r"\[-11, 11\]"):
        layer_cost("l", w, np.array([0, 0, 0, 12]))
