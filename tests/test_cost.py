import numpy as np

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
    assert "| **total** |" in report.to_markdown()


def test_real_valued_cost_counts_the_bias_as_one_more_input():
    from bnn_core.cost import real_valued_cost

    # The paper architecture on 784 pixels: 1024 x 785 + 2 x (1024 x 1025) + 10 x 1025 parameters.
    assert real_valued_cost([784, 1024, 1024, 1024, 10]) == {
        "macs_per_example": 2_913_290,
        "weight_bits": 32 * 2_913_290,
    }
    assert real_valued_cost([3, 2]) == {"macs_per_example": 8, "weight_bits": 256}
