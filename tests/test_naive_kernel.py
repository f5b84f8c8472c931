"""The benchmark's baseline kernel (benchmarks/naive_kernel.py) must give the same integers as the others."""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from bnn_core import kernels as K
from bnn_core.packed import PackedLayer, pack_bits

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_naive_kernel():
    # Imported by the name the benchmark script uses ("naive_kernel", from benchmarks/ on sys.path): numba's
    # on-disk cache of this file records the module name, and a cache written under another name (or an
    # unregistered module) breaks the next load from the benchmark.
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    return importlib.import_module("naive_kernel")


@pytest.mark.skipif(not K.FAST_KERNEL_AVAILABLE, reason="numba kernels not available")
@pytest.mark.parametrize("constants", ["binary", "integer"])
def test_naive_numba_kernel_equals_integer_matmul(constants):
    rng = np.random.default_rng(11)
    w = rng.choice([-1, 1], (75, 300)) * (rng.random((75, 300)) >= 0.4)
    # The paper's +-1 biases, or integer thresholds over the whole reachable range |c| <= n_in + 1.
    b = rng.choice([-1, 1], 75) if constants == "binary" else rng.integers(-301, 302, 75)
    x = rng.choice([-1, 1], (20, 300))
    layer = PackedLayer.from_ternary(w, b)
    got = load_naive_kernel().preactivations_naive(pack_bits(x > 0), layer.signs, layer.mask, layer.offset)
    np.testing.assert_array_equal(got, x @ w.T + b)
