"""How sure a test accuracy is: the Wilson score interval of a binomial proportion.

A test set of ``n`` examples measures accuracy to within a few points only: with 500 test digits one
example is 0.2 points, and a 95% interval is about +-2 points wide. Every reported test accuracy carries
its interval, so that two networks a fraction of a point apart are not read as different.
"""

from __future__ import annotations

import math

#: The 97.5th percentile of the standard normal distribution: a two-sided 95% interval.
Z_95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion: ``correct`` successes out of ``n`` trials.

    With :math:`\\hat p = correct / n`,

    .. math::

        \\frac{\\hat p + \\frac{z^2}{2n}}{1 + \\frac{z^2}{n}}
        \\pm \\frac{z}{1 + \\frac{z^2}{n}} \\sqrt{\\frac{\\hat p (1 - \\hat p)}{n} + \\frac{z^2}{4 n^2}}

    the set of proportions ``p`` that a two-sided z-test of ``p`` would not reject (E. B. Wilson,
    "Probable inference, the law of succession, and statistical inference", Journal of the American
    Statistical Association 22 (1927) 209-212). Unlike the normal approximation
    :math:`\\hat p \\pm z \\sqrt{\\hat p (1 - \\hat p) / n}` it stays inside [0, 1] and does not collapse to
    a point at 0 or ``n`` successes, which matters for accuracies near 100% (Newcombe, Statistics in
    Medicine 17 (1998) 857-872, recommends it; 81 of 263 gives 0.2553 to 0.3662 there).

    ``z`` defaults to the 95% two-sided quantile. Returns ``(low, high)``.
    """
    if n <= 0:
        raise ValueError(f"wilson_interval: need n >= 1 trials, got {n}")
    if not 0 <= correct <= n:
        raise ValueError(f"wilson_interval: correct must be in 0..{n}, got {correct}")
    p = correct / n
    z2 = z * z
    denominator = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half_width = z / denominator * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # At 0 or n successes one bound is exactly 0 or 1; rounding error must not push it past.
    low = 0.0 if correct == 0 else max(0.0, center - half_width)
    high = 1.0 if correct == n else min(1.0, center + half_width)
    return low, high


def accuracy_interval(accuracy: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """:func:`wilson_interval` of an accuracy measured on ``n`` examples (``correct = round(accuracy * n)``).

    For reports that kept the accuracy but not the count of correct answers; exact, since the accuracy
    is a count over ``n``.
    """
    return wilson_interval(round(accuracy * n), n, z)


def format_accuracy(accuracy: float, interval: tuple[float, float], digits: int = 2) -> str:
    """``95.20% (93.0-96.7)``: an accuracy in percent and its interval (one decimal: the interval itself
    is uncertain in its last digits)."""
    low, high = interval
    return f"{100 * accuracy:.{digits}f}% ({100 * low:.1f}-{100 * high:.1f})"
