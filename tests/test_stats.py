"""The Wilson score interval: published values, edge cases, and the formatting reports use."""

from __future__ import annotations

import itertools
import math

import pytest

from bnn_core.stats import Z_95, accuracy_interval, format_accuracy, wilson_interval


@pytest.mark.parametrize(
    ("correct", "n", "low", "high"),
    [
        # Newcombe, "Two-sided confidence intervals for the single proportion: comparison of seven
        # methods", Statistics in Medicine 17 (1998) 857-872, Table II, method 3 (Wilson score)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
        (29, 29, 0.8830, 1.0),
    ],
)
def test_published_values(correct, n, low, high):
    got = wilson_interval(correct, n)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_the_default_models_test_accuracy():
    # reports/metrics.json at the time of writing: 476 of 500 test digits, 95.2%
    low, high = accuracy_interval(0.952, 500)
    assert (low, high) == pytest.approx((0.929573, 0.967535), abs=1e-6)
    assert format_accuracy(0.952, (low, high)) == "95.20% (93.0-96.8)"


def test_closed_form_at_zero_and_all_correct():
    # 0 of n: [0, z^2 / (n + z^2)]; n of n: the mirror image
    n = 50
    edge = Z_95**2 / (n + Z_95**2)
    assert wilson_interval(0, n) == (0.0, pytest.approx(edge))
    assert wilson_interval(n, n) == (pytest.approx(1 - edge), 1.0)


def test_interval_holds_the_estimate_and_narrows_like_one_over_root_n():
    widths = []
    for n in (100, 400, 1600, 6400):
        low, high = wilson_interval(n * 9 // 10, n)
        assert 0 <= low < 0.9 < high <= 1
        widths.append(high - low)
    for wide, narrow in itertools.pairwise(widths):
        assert wide / narrow == pytest.approx(2, rel=0.05)  # 4x the examples, half the width


def test_symmetric_in_successes_and_failures():
    low, high = wilson_interval(7, 40)
    mirror_low, mirror_high = wilson_interval(33, 40)
    assert (low, high) == pytest.approx((1 - mirror_high, 1 - mirror_low))


def test_a_wider_z_gives_a_wider_interval():
    narrow, wide = wilson_interval(30, 60, z=1.0), wilson_interval(30, 60, z=3.0)
    assert wide[0] < narrow[0] and narrow[1] < wide[1]


def test_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    for correct, n in [(0, 1), (1, 1), (3, 7), (476, 500), (9_123, 10_000)]:
        expected = stats.binomtest(correct, n).proportion_ci(method="wilson")
        got = wilson_interval(correct, n)
        assert got == pytest.approx((expected.low, expected.high), abs=1e-12)


def test_accuracy_is_turned_back_into_a_count():
    # 0.1 + 0.2 style rounding of an accuracy must not change the count: 0.3 * 10 = 2.9999999999999996
    assert accuracy_interval(0.3, 10) == wilson_interval(3, 10)
    assert math.isclose(accuracy_interval(0.952, 500)[0], wilson_interval(476, 500)[0])


@pytest.mark.parametrize(("correct", "n"), [(0, 0), (-1, 10), (11, 10)])
def test_impossible_counts_are_refused(correct, n):
    with pytest.raises(ValueError):
        wilson_interval(correct, n)
