"""Inference speed of a bitwise network against the float32 network a float deployment would run.

- :func:`time_calls` / :func:`median_seconds`: one warm-up call (numba compilation, caches), then timed
  calls one by one; the median is robust to the odd call that loses its core to another process.
- :class:`Float32Network`: the same ternary network in float32 numpy BLAS, the baseline. Hidden layers
  ``h = sign(h W^T + b)`` with ``sign(0) = +1`` (as :func:`bnn_core.packed.sign_bits`), last layer the raw
  scores ``h W^T + b``. For +-1 inputs every value is an integer, so its scores equal the bitwise ones.
- :func:`throughput`: examples per second of both on the same inputs (used by the evaluate stage; the
  benchmark, ``benchmarks/bench_inference.py``, times more paths with the same helpers).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

from bnn_core.kernels import kernel_name


def time_calls(fn: Callable[[], object], calls: int) -> tuple[list[float], list[float]]:
    """Seconds per call of ``calls`` timed calls after one warm-up call: ``(wall, thread CPU)``.

    Wall time is what a user waits; the calling thread's CPU time is the compute of a single-threaded call
    whatever other processes do (it means little for multi-threaded calls).
    """
    fn()  # warm-up (and numba compilation, when not cached)
    wall, cpu = [], []
    for _ in range(calls):
        c0 = time.thread_time()
        t0 = time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return wall, cpu


def median_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median wall seconds of ``repeats`` calls after one warm-up call."""
    return statistics.median(time_calls(fn, repeats)[0])


class Float32Network:
    """A ternary network ``[(W [n_out, n_in], b [n_out]), ...]`` run in float32 numpy BLAS.

    Weights are stored as contiguous ``W^T`` so each layer is one row-major ``[n, in] x [in, out]`` GEMM
    into a preallocated output, with the bias and the sign applied in place: the float baseline gets its
    best chance. Inputs must be float32 ``[n, n_in]`` (+-1 for scores equal to the bitwise ones).
    """

    def __init__(self, layers: Sequence[tuple[np.ndarray, np.ndarray]]):
        self.wt = [np.ascontiguousarray(np.asarray(w).T, dtype=np.float32) for w, _ in layers]
        # + 0.0 turns a bias of -0.0 into +0.0, so no sum below can end as -0.0 (copysign would give -1).
        self.b = [np.asarray(b, dtype=np.float32) + np.float32(0) for _, b in layers]
        self._buffers: dict[int, list[np.ndarray]] = {}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Scores ``float32 [n, n_classes]`` (a buffer reused by the next call with the same batch size)."""
        bufs = self._buffers.get(len(x))
        if bufs is None:
            bufs = self._buffers[len(x)] = [np.empty((len(x), wt.shape[1]), np.float32) for wt in self.wt]
        h = x
        for wt, b, out in zip(self.wt, self.b, bufs, strict=True):
            np.matmul(h, wt, out=out)
            out += b
            h = out
            if out is not bufs[-1]:
                # sign with sign(0) = +1, in place: an exact zero here is +0.0 (see the bias above).
                np.copysign(np.float32(1), out, out=out)
        return h


def throughput(
    forward_counts: Callable[[np.ndarray], np.ndarray],
    layers: Sequence[tuple[np.ndarray, np.ndarray]],
    x: np.ndarray,
    repeats: int = 5,
) -> dict:
    """Examples per second of a bitwise engine and of float32 BLAS on the same inputs (median of ``repeats``).

    ``forward_counts``: the engine's ``bits [n, n_in] -> integer scores`` (e.g.
    ``BitwiseModel.engine.forward_counts``), fed ``x > 0``; ``layers``: the ternary ``(W, b)`` list the float
    baseline runs on ``x`` (+-1 features ``[n, n_in]``). ``kernel`` names the fast kernel in use
    (:func:`bnn_core.kernels.kernel_name`).
    """
    bits = x > 0
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    floats = Float32Network(layers)
    bitwise_s = median_seconds(lambda: forward_counts(bits), repeats)
    float_s = median_seconds(lambda: floats(x32), repeats)
    return {
        "bitwise_examples_per_s": len(x) / bitwise_s,
        "float_examples_per_s": len(x) / float_s,
        "speedup_vs_float": float_s / bitwise_s,
        "kernel": kernel_name(),
    }
