"""A straightforward numba XNOR-popcount loop: the benchmark's baseline for the tile kernels of
:mod:`bnn_core.kernel_codegen` (what plain numba gives without hand-written vector code).

    a[i, o] = 2 * sum_w popcount(~(x[i, w] ^ signs[o, w]) & mask[o, w]) + offset[o]

the math of :func:`bnn_core.packed.preactivations_numpy`, one scalar ``popcnt`` per word, rows in parallel.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

_I64 = ir.IntType(64)


@intrinsic
def _popcount64(typingctx, x):
    """Scalar ``llvm.ctpop.i64`` (one ``popcnt``); numba has no popcount of its own."""
    if not isinstance(x, types.Integer):
        return None
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.ctpop", [_I64])
        return builder.call(fn, args)

    return sig, codegen


@njit(cache=True, parallel=True)
def preactivations_naive(x_words, signs, mask, offset):
    """``int32 [n, n_out]`` pre-activations for packed inputs ``x_words uint64 [n, W]``."""
    n, n_in_words = x_words.shape
    n_out = signs.shape[0]
    out = np.empty((n, n_out), np.int32)
    for i in prange(n):
        for o in range(n_out):
            acc = np.uint64(0)
            for w in range(n_in_words):
                acc += _popcount64(~(x_words[i, w] ^ signs[o, w]) & mask[o, w])
            out[i, o] = 2 * np.int64(acc) + offset[o]
    return out
