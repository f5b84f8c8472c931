"""Inference speed of the paper's MLP: float32 (numpy BLAS, torch, onnxruntime) vs packed bits vs the fast kernel.

Architecture (Kim & Smaragdis 2016): 784 input bits (threshold binarizer) -> 3 x 1024 hidden -> 10 classes,
random ternary weights and +-1 biases. All paths run in one process on the same inputs; every timed path is
called once and its integer scores checked against the fast kernel's before any timing (bench.json lists
them under ``checked_equal``). Paths: the fast kernel (bnn_core.kernels), a plain numba loop
(benchmarks/naive_kernel.py), numpy packed bits (bnn_core.packed), and the float32 network three ways, each
with all cores and with 1 thread: numpy (bnn_core.speed.Float32Network), torch, and onnxruntime (an ONNX
graph of Gemm + Sign nodes built with ``onnx.helper`` from the same float weights, intra-op threads set to
the same 2 or 1, inter-op 1). Optional paths join through :data:`EXTRA_BITWISE_PATHS` (the C export, when
``bnn_core.c_export`` and a C compiler are there). Timing: bnn_core.speed.time_calls. Writes
``reports/bench.json``; each batch's ``speedup_vs_float`` is against the fastest float path measured in
the same run at that batch (``fastest_float``).

Integer thresholds (a network with batch norm folded in, ``bnn_bn``): the same weights with random integer
constants ``|c| <= n_in + 1`` instead of +-1 biases, checked against the numpy engine and a plain integer
matmul, then timed side by side with the +-1 network (fused kernel, library threads and 1 thread); the
report prints the ratio of their times (``threshold_vs_binary_bias`` in bench.json). The constant only
changes the per-unit offset the kernel adds once per unit, so the ratio should be 1 within noise.

    python benchmarks/bench_inference.py [--quick] [--large-batch N] [--out PATH]

The float baseline gets its best chance: some machines here set OPENBLAS_CORETYPE=Haswell and
OPENBLAS_L2_SIZE, which slow OpenBLAS's float GEMM on an AVX-512 CPU, so the script re-executes itself once
without them (before numpy is imported) and reports the BLAS kernel that then runs.

x86 without AVX-512 VPOPCNTDQ (AVX2 laptops, Zen 2/3, Intel before Ice Lake) is measured in the same run by
a child process of this script (``--avx2-child``) that sets the Haswell ISA on purpose, for both sides:
numba builds the kernels for ``haswell`` with AVX-512 off (``NUMBA_CPU_NAME`` and ``NUMBA_CPU_FEATURES``:
the name alone keeps the host's AVX-512), OpenBLAS takes its Haswell kernels (``OPENBLAS_CORETYPE``), MKL and
torch their AVX2 ones (``MKL_ENABLE_INSTRUCTIONS``, ``ATEN_CPU_CAPABILITY``). onnxruntime is left out there:
its MLAS library picks its SGEMM kernels from CPUID when it loads (AVX-512F ones on an AVX-512 CPU) and has
no setting to hold it to AVX2, so its figure would not be an AVX2 machine's. bench.json: ``avx2``.
"""

from __future__ import annotations

import os
import sys

_SLOW_BLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_MARKER = "BNN_BENCH_REEXEC"  # set in the child: never re-execute twice
AVX2_CHILD_FLAG = "--avx2-child"
# The vector features numba may use for the AVX2 child: Haswell's, AVX-512 explicitly off (see docstring).
HASWELL_FEATURES = ",".join(
    ["+avx", "+avx2", "+bmi", "+bmi2", "+fma", "+f16c", "+lzcnt", "+movbe", "+popcnt", "+sse4.2"]
    + [f"-avx512{x}" for x in ("f", "bw", "cd", "dq", "vl", "vnni", "vpopcntdq")]
)
AVX2_ENV = {
    "OPENBLAS_CORETYPE": "Haswell",
    "NUMBA_CPU_NAME": "haswell",
    "NUMBA_CPU_FEATURES": HASWELL_FEATURES,
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
}


def _reexec_without_blas_overrides() -> None:
    """Re-execute once without the BLAS overrides, except in the AVX2 child, which sets them on purpose."""
    if AVX2_CHILD_FLAG in sys.argv:
        return
    found = {k: os.environ[k] for k in _SLOW_BLAS_VARS if k in os.environ}
    if found and _MARKER not in os.environ:
        env = {k: v for k, v in os.environ.items() if k not in _SLOW_BLAS_VARS}
        env[_MARKER] = " ".join(f"{k}={v}" for k, v in found.items())
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


if __name__ == "__main__":
    _reexec_without_blas_overrides()

import argparse  # noqa: E402
import ctypes  # noqa: E402
import importlib.util  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
import threadpoolctl  # noqa: E402
from naive_kernel import preactivations_naive  # noqa: E402  (benchmarks/, next to this script)
from tabulate import tabulate  # noqa: E402

from bnn_core import kernels as K  # noqa: E402
from bnn_core.input_encoders import ThresholdEncoder  # noqa: E402
from bnn_core.model_file import BitwiseModel, save_bitwise_model  # noqa: E402
from bnn_core.packed import PackedNetwork  # noqa: E402
from bnn_core.speed import Float32Network, time_calls  # noqa: E402

try:
    import torch
except ImportError:  # the float baseline then is numpy alone
    torch = None
try:  # the `bench` extra (pyproject.toml); without it the float paths are numpy and torch
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper
except ImportError:
    onnx = onnxruntime = None

ROOT = Path(__file__).resolve().parents[1]
FUSED = "fast kernel (fused network)"
FUSED_1 = "fast kernel (fused network, 1 thread)"
BINARY_BIAS = "+-1 biases"
THRESHOLDS = "integer thresholds"
PACKED = "numpy packed bits"
SIZES = (784, 1024, 1024, 1024, 10)
VECTOR_BITS = 512


# ---------------------------------------------------------------------------------------------------------------
# model and inputs
# ---------------------------------------------------------------------------------------------------------------


def random_ternary_layers(rng: np.random.Generator, zero_fraction: float) -> list[tuple[np.ndarray, np.ndarray]]:
    layers = []
    for n_in, n_out in itertools.pairwise(SIZES):
        w = rng.choice(np.array([-1, 1], dtype=np.int8), (n_out, n_in))
        if zero_fraction:
            w = w * (rng.random((n_out, n_in)) >= zero_fraction).astype(np.int8)
        layers.append((w, rng.choice(np.array([-1, 1], dtype=np.int8), n_out)))
    return layers


def with_integer_thresholds(
    rng: np.random.Generator, layers: list[tuple[np.ndarray, np.ndarray]]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The same weights with random integer constants over the whole reachable range ``|c| <= n_in + 1``
    (what a network with batch norm folded into thresholds exports), int32."""
    return [(w, rng.integers(-(w.shape[1] + 1), w.shape[1] + 2, w.shape[0]).astype(np.int32)) for w, _ in layers]


def model_bytes(layers) -> dict[str, int]:
    """float32: 4 bytes per weight and bias. bitwise: the size of the exported model file
    (bnn_core.model_file: header and zip overhead included), written to a temporary folder."""
    n_params = sum(w.size + b.size for w, b in layers)
    model = BitwiseModel.from_layers(ThresholdEncoder(), layers)
    with tempfile.TemporaryDirectory() as tmp:
        return {"float32": 4 * n_params, "bitwise": save_bitwise_model(Path(tmp) / "bnn.npz", model)}


class OnnxFloat32Network:
    """:class:`bnn_core.speed.Float32Network` as an ONNX graph run by onnxruntime (CPU provider, MLAS).

    Per layer one ``Gemm`` (``z W^T + b``, ``W^T`` stored as the initializer so no transpose is needed);
    hidden layers then ``Sign``. ONNX's ``Sign(0) = 0`` while the network needs ``sign(0) = +1``, so hidden
    layers get ``b + 0.5``: ``W z + b`` is an integer, ``+ 0.5`` never leaves it at 0 and does not change the
    sign of a nonzero one, and every value stays exact in float32. The output layer keeps ``b``: its
    scores are the integers. ``threads``: onnxruntime's intra-op threads (inter-op 1, sequential).
    """

    def __init__(self, floats: Float32Network, threads: int):
        nodes, initializers, prev = [], [], "x"
        last = len(floats.wt) - 1
        for i, (wt, b) in enumerate(zip(floats.wt, floats.b, strict=True)):
            bias = b if i == last else b + np.float32(0.5)
            initializers += [numpy_helper.from_array(wt, f"wt{i}"), numpy_helper.from_array(bias, f"b{i}")]
            out = "scores" if i == last else f"a{i}"
            nodes.append(helper.make_node("Gemm", [prev, f"wt{i}", f"b{i}"], [out]))
            if i != last:
                nodes.append(helper.make_node("Sign", [out], [f"z{i}"]))
                prev = f"z{i}"
        n_in, n_out = floats.wt[0].shape[0], floats.wt[-1].shape[1]
        graph = helper.make_graph(
            nodes,
            "bitwise_mlp_float32",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", n_in])],
            [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", n_out])],
            initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        onnx.checker.check_model(model)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        self.session = onnxruntime.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": x})[0]


class TorchFloat32Network:
    """:class:`bnn_core.speed.Float32Network` in torch (MKL here): same weights, same math, float32."""

    def __init__(self, floats: Float32Network):
        self.wt = [torch.from_numpy(w) for w in floats.wt]
        self.b = [torch.from_numpy(b) for b in floats.b]
        self.one = torch.tensor(1.0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            h = x
            for i, (wt, b) in enumerate(zip(self.wt, self.b, strict=True)):
                h = torch.addmm(b, h, wt)
                if i < len(self.wt) - 1:
                    torch.copysign(self.one, h, out=h)
            return h


# ---------------------------------------------------------------------------------------------------------------
# peak of the binary kernel on this CPU
# ---------------------------------------------------------------------------------------------------------------


def _micro_kernels():
    """Tiny compiled loops for the CPU's clock and its vector popcount throughput (numba + LLVM IR)."""
    from llvmlite import ir
    from numba import njit, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    v64 = ir.VectorType(ir.IntType(64), 8)
    chains = 12  # independent dependency chains: enough to hide latency and saturate the pipes

    def make(kind: str):
        @intrinsic
        def loop(typingctx, n_iter, seed):
            sig = types.uint64(types.int64, types.uint64)

            def codegen(context, builder, signature, args):
                n_iter, seed = args
                ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v64, [v64]), "llvm.ctpop.v8i64")
                undef = ir.Constant(v64, ir.Undefined)
                first = builder.insert_element(undef, seed, ir.Constant(ir.IntType(32), 0))
                splat = builder.shuffle_vector(first, undef, ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8))
                s = builder.xor(splat, ir.Constant(v64, [0x5555 * (k + 1) for k in range(8)]))
                m = builder.or_(splat, ir.Constant(v64, [0xF0F0 << k for k in range(8)]))
                inits = [builder.add(splat, ir.Constant(v64, [c] * 8)) for c in range(chains)]
                pre = builder.block
                head = builder.append_basic_block("head")
                body = builder.append_basic_block("body")
                done = builder.append_basic_block("done")
                builder.branch(head)
                builder.position_at_end(head)
                i = builder.phi(n_iter.type)
                vs = [builder.phi(v64) for _ in range(chains)]
                accs = [builder.phi(v64) for _ in range(chains)]
                i.add_incoming(ir.Constant(n_iter.type, 0), pre)
                for c in range(chains):
                    vs[c].add_incoming(inits[c], pre)
                    accs[c].add_incoming(ir.Constant(v64, None), pre)
                builder.cbranch(builder.icmp_signed("<", i, n_iter), body, done)
                builder.position_at_end(body)
                new_v, new_acc = [], []
                for c in range(chains):
                    if kind == "popcount":  # vpopcntq only: v = popcount(v)
                        new_v.append(builder.call(ctpop, [vs[c]]))
                        new_acc.append(accs[c])
                    else:  # the kernel's step: v = ~(v ^ s) & m (vpternlogq); acc += popcount(v)
                        v = builder.and_(builder.not_(builder.xor(vs[c], s)), m)
                        new_v.append(v)
                        new_acc.append(builder.add(accs[c], builder.call(ctpop, [v])))
                i_next = builder.add(i, ir.Constant(n_iter.type, 1))
                latch = builder.block
                builder.branch(head)
                i.add_incoming(i_next, latch)
                for c in range(chains):
                    vs[c].add_incoming(new_v[c], latch)
                    accs[c].add_incoming(new_acc[c], latch)
                builder.position_at_end(done)
                total = ir.Constant(v64, None)
                for c in range(chains):
                    total = builder.add(total, builder.add(vs[c], accs[c]))
                out = builder.extract_element(total, ir.Constant(ir.IntType(32), 0))
                for lane in range(1, 8):
                    out = builder.add(out, builder.extract_element(total, ir.Constant(ir.IntType(32), lane)))
                return out

            return sig, codegen

        @njit
        def run(n_iter, seed):
            return loop(n_iter, seed)

        return run

    @njit
    def clock_chain(n_iter, seed):
        # Dependent chain x = (x * a) ^ (x >> 29): imul (3 cycles on Zen) then xor (1) = 4 cycles per step;
        # the shift runs beside the multiply, and the xor keeps LLVM from folding steps together.
        x = seed
        for _ in range(n_iter):
            x = (x * np.uint64(6364136223846793005)) ^ (x >> np.uint64(29))
        return x

    return make("popcount"), make("mix"), chains, clock_chain


def _cpu_rate(fn, n_iter: int, repeats: int = 7) -> float:
    """Iterations per second of CPU time of this thread (robust to other processes on the machine)."""
    fn(1000, np.uint64(3))
    rates = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn(n_iter, np.uint64(3))
        rates.append(n_iter / (time.thread_time() - t0))
    return max(rates)


def _issue_rate(per_cycle: float) -> float:
    """Instructions per cycle, rounded to the integer the hardware issues; a rate under 1 (an emulated
    instruction) stays as measured rather than rounding to a zero peak."""
    return round(per_cycle) if per_cycle >= 1 else per_cycle


def binary_peak(cores: int) -> dict:
    popcount_loop, mix_loop, chains, clock_chain = _micro_kernels()
    clock_hz = 4 * _cpu_rate(clock_chain, 50_000_000)
    popcnt_per_s = chains * _cpu_rate(popcount_loop, 2_000_000)
    mix_per_s = chains * _cpu_rate(mix_loop, 2_000_000)
    return {
        "clock_ghz_measured": clock_hz / 1e9,
        "vpopcntq_zmm_per_cycle_measured": popcnt_per_s / clock_hz,
        "xnor_popcount_accumulate_per_cycle_measured": mix_per_s / clock_hz,
        # The definition asked for: 512-bit VPOPCNTQ width x its issue rate x cores x clock.
        "peak_bitops_per_s": cores * clock_hz * VECTOR_BITS * _issue_rate(popcnt_per_s / clock_hz),
        # What the instruction mix allows: each 512-bit step needs vpternlogq + vpopcntq + vpaddq.
        "mix_peak_bitops_per_s": cores * mix_per_s * VECTOR_BITS,
        "assumption": (
            f"{cores} cores at the clock measured with a dependent imul+xor chain (4 cycles/step), "
            "VPOPCNTQ zmm issue rate measured with 12 independent chains and rounded to an integer per cycle "
            "(kept as measured when under 1, e.g. a CPU without VPOPCNTDQ, where LLVM emulates it); "
            "1 bit-op = one binary multiply-accumulate (XNOR + count) of one weight with one input bit. "
            "mix peak: measured rate of the kernel's 3-instruction step (vpternlogq, vpopcntq, vpaddq) "
            "on 12 chains in registers, x 512 bits x cores. Both peaks describe the vector-popcount kernel; "
            "on a CPU without VPOPCNTDQ the fast kernel counts carry-save (bnn_core.kernel_codegen), another "
            "instruction mix, and can pass the mix peak."
        ),
    }


# ---------------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------------


@contextmanager
def thread_count(count: int | None):
    """Run a block with ``count`` threads in BLAS, OpenMP, torch and numba (None: leave the defaults)."""
    if count is None:
        yield
        return
    saved_numba = numba.get_num_threads()
    saved_torch = torch.get_num_threads() if torch is not None else None
    with threadpoolctl.threadpool_limits(count):
        numba.set_num_threads(count)
        if torch is not None:
            torch.set_num_threads(count)
        try:
            yield
        finally:
            numba.set_num_threads(saved_numba)
            if torch is not None:
                torch.set_num_threads(saved_torch)


Paths = dict[str, tuple[Callable[[], object], int | None]]  # name -> (call returning scores, threads; None: library)


def time_paths(paths: Paths, calls: int, cycles: int) -> dict[str, tuple[float, float]]:
    """Median (wall seconds, CPU seconds of the calling thread) per call, for ``{name: (fn, threads)}``.

    Each cycle runs every path (:func:`bnn_core.speed.time_calls`: one warm-up call, then ``calls`` timed
    calls one by one), so load from other processes on the machine is spread over all paths alike. The
    thread CPU time is the compute of single-threaded runs, whatever the other processes do; it means little
    for multi-threaded ones.
    """
    wall: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(cycles):
        for name, (fn, threads) in paths.items():
            with thread_count(threads):
                wall_s, cpu_s = time_calls(fn, calls)
            wall[name] += wall_s
            cpu[name] += cpu_s
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in paths}


def machine_description() -> str:
    model = platform.processor() or platform.machine()
    mhz = ""
    flags = ""
    family = ""
    flags_line = ""
    vendor = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name":
                model = value
            elif key == "vendor_id":
                vendor = value
            elif key == "cpu family" and not family:
                zen5 = vendor == "AuthenticAMD" and value == "26"  # family 1Ah
                family = f" (family {value}{', Zen 5' if zen5 else ''})"
            elif key == "cpu MHz" and not mhz:
                mhz = f", {float(value):.0f} MHz nominal"
            elif key == "flags" and not flags:
                flags_line = value
                flags = ", AVX-512 VPOPCNTDQ" if "avx512_vpopcntdq" in value.split() else ", no AVX-512 VPOPCNTDQ"
    except OSError:
        pass
    hypervisor = ", virtual machine" if "hypervisor" in flags_line else ""
    return f"{model}{family}, {os.cpu_count()} cores{mhz}{flags}{hypervisor}, {platform.system()} {platform.machine()}"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def blas_description() -> dict[str, str]:
    libs = threadpoolctl.threadpool_info()
    blas = [d for d in libs if d.get("user_api") == "blas"]
    # numba loads scipy, which brings a second OpenBLAS; numpy's matmul uses the one shipped with numpy.
    blas = [d for d in blas if "numpy" in d.get("filepath", "")] or blas
    numpy_blas = ", ".join(
        f"{d['internal_api']} {d.get('version') or ''} {d.get('architecture') or ''} "
        f"({d.get('threading_layer', '?')}, {d['num_threads']} threads)".replace("  ", " ")
        for d in blas
    )
    out = {"numpy": f"numpy {np.__version__} / {numpy_blas or 'unknown BLAS'}"}
    if torch is not None:
        config = torch.__config__.show()
        settings = config.replace(",", " ").split()
        blas_info = next((p.split("=")[1] for p in settings if p.startswith("BLAS_INFO=")), "?")
        capability = torch.backends.cpu.get_cpu_capability()
        mkl_isa = os.environ.get("MKL_ENABLE_INSTRUCTIONS")
        mkl = f", MKL_ENABLE_INSTRUCTIONS={mkl_isa}" if mkl_isa else ""
        out["torch"] = f"torch {torch.__version__} / {blas_info} ({capability}{mkl}, {torch.get_num_threads()} threads)"
    if onnxruntime is not None:
        flags = _cpu_flags()
        isa = "AVX-512F" if "avx512f" in flags else ("AVX2/FMA3" if {"avx2", "fma"} <= flags else "SSE")
        out["onnxruntime"] = (
            f"onnxruntime {onnxruntime.__version__} / MLAS SGEMM, kernel chosen from CPUID at load ({isa} here), "
            "intra-op threads as the path says, inter-op 1"
        )
    return out


# ---------------------------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------------------------

C_EXPORT = "C export (host build -O3 -march=native, from pixels)"


@dataclass(frozen=True)
class Networks:
    """The paper's MLP (and a 50 %-sparse twin, for the model size) in every engine the benchmark times."""

    layers: list[tuple[np.ndarray, np.ndarray]]
    sparse_layers: list[tuple[np.ndarray, np.ndarray]]
    packed: PackedNetwork
    fast: K.KernelNetwork
    floats: Float32Network
    torch_floats: TorchFloat32Network | None
    onnx_floats: dict[int, OnnxFloat32Network]  # intra-op threads -> session; empty without onnxruntime
    threshold_layers: list[tuple[np.ndarray, np.ndarray]]  # ``layers``' weights, integer constants
    threshold_packed: PackedNetwork
    threshold_fast: K.KernelNetwork

    def fast_per_layer(self, x_bits: np.ndarray) -> np.ndarray:
        """The fast kernel one layer call at a time (packed bits between calls), not fused."""
        words = K.pack_input_bits(x_bits)
        for lay in self.fast.layers[:-1]:
            words = lay.forward_bits(words)
        return self.fast.layers[-1].preactivations(words)

    def naive_chain(self, x_bits: np.ndarray) -> np.ndarray:
        """The plain numba loop (benchmarks/naive_kernel.py) layer by layer."""
        words = K.pack_input_bits(x_bits)
        for lay in self.packed.layers[:-1]:
            words = K.pack_input_bits(preactivations_naive(words, lay.signs, lay.mask, lay.offset) >= 0)
        last = self.packed.layers[-1]
        return preactivations_naive(words, last.signs, last.mask, last.offset)


def float_thread_counts(cores: int) -> list[int]:
    """Every float path runs with all cores and with 1 thread."""
    return sorted({cores, 1}, reverse=True)


def build_networks(rng: np.random.Generator, cores: int, with_onnx: bool = True) -> Networks:
    """Random weights, packed and laid out for every engine (none of this is timed)."""
    layers = random_ternary_layers(rng, 0.0)
    sparse_layers = random_ternary_layers(rng, 0.5)
    packed = PackedNetwork.from_ternary(layers)
    floats = Float32Network(layers)
    torch_floats = TorchFloat32Network(floats) if torch is not None else None
    use_onnx = with_onnx and onnxruntime is not None
    onnx_floats = {count: OnnxFloat32Network(floats, count) for count in float_thread_counts(cores)} if use_onnx else {}
    threshold_layers = with_integer_thresholds(rng, layers)
    threshold_packed = PackedNetwork.from_ternary(threshold_layers)
    return Networks(
        layers,
        sparse_layers,
        packed,
        K.KernelNetwork.from_packed(packed),
        floats,
        torch_floats,
        onnx_floats,
        threshold_layers,
        threshold_packed,
        K.KernelNetwork.from_packed(threshold_packed),
    )


@dataclass(frozen=True)
class Batch:
    """One batch of random pixels, encoded for the bitwise paths (bool) and the float paths (+-1 float32)."""

    pixels: np.ndarray  # uint8 [n, 784]: what the C export's entry point takes
    x_bits: np.ndarray
    x_float: np.ndarray
    x_torch: object  # torch.Tensor sharing x_float's memory, or None without torch

    @property
    def n(self) -> int:
        return len(self.x_bits)


def make_batch(rng: np.random.Generator, n: int) -> Batch:
    encoder = ThresholdEncoder()
    pixels = rng.integers(0, 256, (n, SIZES[0]), dtype=np.uint8)
    x_float = encoder.encode(pixels)
    x_torch = torch.from_numpy(x_float) if torch is not None else None
    return Batch(pixels, encoder.encode_bits(pixels), x_float, x_torch)


def _scores(value: object) -> np.ndarray:
    """A path's return value (numpy array, torch tensor, float or int) as int64 scores."""
    array = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
    return array.astype(np.int64)


def check_paths(paths: Paths, reference: np.ndarray, n: int) -> list[str]:
    """Call every path once and compare its integer scores with ``reference``; SystemExit on the first that
    differs. Returns the names checked (all of them): bench.json's ``checked_equal``."""
    for name, (fn, threads) in paths.items():
        with thread_count(threads):
            scores = _scores(fn())
        if scores.shape != reference.shape or not np.array_equal(scores, reference):
            raise SystemExit(f"{name}: scores differ from the reference at batch {n}")
    return list(paths)


def integer_reference(layers: list[tuple[np.ndarray, np.ndarray]], x_bits: np.ndarray) -> np.ndarray:
    """Plain integer matmuls: ``a = W z + c``, hidden ``z = +1 iff a >= 0``; the scores of the last layer."""
    z = np.where(x_bits, 1, -1).astype(np.int64)
    for i, (w, c) in enumerate(layers):
        a = z @ w.T.astype(np.int64) + c.astype(np.int64)
        z = np.where(a >= 0, 1, -1) if i < len(layers) - 1 else a
    return z


def check_thresholds(nets: Networks, batch: Batch, rows: int = 500) -> None:
    """The threshold network's fast-kernel scores must equal the numpy engine's and a plain integer matmul's
    (on the first ``rows`` rows: the references are slow)."""
    x = batch.x_bits[:rows]
    fast = nets.threshold_fast.forward_counts(x)
    for name, scores in (
        ("numpy packed", nets.threshold_packed.forward_counts(x)),
        ("integer matmul", integer_reference(nets.threshold_layers, x)),
    ):
        if not np.array_equal(scores.astype(np.int64), fast.astype(np.int64)):
            raise SystemExit(f"integer thresholds: {name} scores differ from the fast kernel's at batch {batch.n}")


def time_thresholds(nets: Networks, batch: Batch, calls: int, cycles: int) -> dict:
    """The fused kernel on the same weights with +-1 biases and with integer thresholds, timed side by side
    (interleaved in every cycle): median seconds per call and the ratio thresholds / +-1 biases, with the
    library's threads (wall clock) and on 1 thread (wall clock and thread CPU time)."""
    x = batch.x_bits
    paths: Paths = {
        BINARY_BIAS: (lambda: nets.fast.forward_counts(x), None),
        THRESHOLDS: (lambda: nets.threshold_fast.forward_counts(x), None),
        f"{BINARY_BIAS}, 1 thread": (lambda: nets.fast.forward_counts(x), 1),
        f"{THRESHOLDS}, 1 thread": (lambda: nets.threshold_fast.forward_counts(x), 1),
    }
    times = time_paths(paths, calls, cycles)
    one = ", 1 thread"
    return {
        "binary_bias_s": times[BINARY_BIAS][0],
        "thresholds_s": times[THRESHOLDS][0],
        "ratio": times[THRESHOLDS][0] / times[BINARY_BIAS][0],
        "binary_bias_1_thread_s": times[BINARY_BIAS + one][0],
        "thresholds_1_thread_s": times[THRESHOLDS + one][0],
        "ratio_1_thread": times[THRESHOLDS + one][0] / times[BINARY_BIAS + one][0],
        "ratio_1_thread_cpu": times[THRESHOLDS + one][1] / times[BINARY_BIAS + one][1],
    }


def float_paths(nets: Networks, batch: Batch, cores: int, with_onnx: bool = True) -> Paths:
    """float32 numpy, torch and onnxruntime, each with all cores and with 1 thread."""
    x_float, x_torch = batch.x_float, batch.x_torch
    paths: Paths = {}
    for count in float_thread_counts(cores):
        label = f"{count} thread" + ("s" if count > 1 else "")
        paths[f"numpy float32 ({label})"] = (lambda: nets.floats(x_float), count)
        if nets.torch_floats is not None:
            paths[f"torch float32 ({label})"] = (lambda: nets.torch_floats(x_torch), count)
        if with_onnx and count in nets.onnx_floats:
            # onnxruntime's threads are the session's (intra-op = count): thread_count leaves it alone.
            session = nets.onnx_floats[count]
            paths[f"onnxruntime float32 ({label})"] = (lambda session=session: session(x_float), count)
    return paths


# An extra bitwise path: given the networks, (name, batch -> call returning scores), or why it is skipped.
ExtraPath = tuple[str, Callable[[Batch], Callable[[], object]]]
ExtraPathFactory = Callable[[Networks], "ExtraPath | str"]


def c_export_path(nets: Networks) -> ExtraPath | str:
    """The C export (``bnn_core.c_export``): the model as C99, built as a shared library with the host
    compiler (``-O3 -march=native``, the flags c_export recommends for benchmarks) and called through its
    ctypes batch entry point, ``bnn_predict_batch``. It takes raw pixels, so its time includes the
    binarization the fused kernel's input has already had. Single-threaded (static buffers)."""
    if importlib.util.find_spec("bnn_core.c_export") is None:
        return "bnn_core.c_export is not in this checkout"
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None or shutil.which("make") is None:
        return "no C compiler (cc) or make on PATH"
    from bnn_core import c_export

    model = BitwiseModel.from_layers(ThresholdEncoder(), nets.layers)
    folder = Path(tempfile.mkdtemp(prefix="bnn_bench_c_export_"))
    try:
        for name, text in c_export.c_sources(model, word_bits=64).items():
            (folder / name).write_text(text)
        build = subprocess.run(
            ["make", "-C", str(folder), c_export.SHARED_LIBRARY, f"CFLAGS={c_export.SHARED_LIBRARY_CFLAGS}"],
            capture_output=True,
            text=True,
        )
        if build.returncode != 0:
            return f"the C export did not build: {(build.stderr or build.stdout).strip().splitlines()[-1:]}"
        run = c_export.bind_batch(ctypes.CDLL(str(folder / c_export.SHARED_LIBRARY)), model.n_pixels, model.n_classes)
    except (AttributeError, TypeError) as exc:  # the C export's API is not (yet) the one used here
        return f"bnn_core.c_export has no usable shared-library entry point ({type(exc).__name__}: {exc})"
    return C_EXPORT, lambda batch: lambda: run(batch.pixels)[1]


#: One more bitwise path is one more factory here: it is checked bit-exact like every other path, timed in
#: the same cycles, and shown in the table; a factory that returns a string is skipped with that reason.
EXTRA_BITWISE_PATHS: list[ExtraPathFactory] = [c_export_path]


def timed_paths(nets: Networks, batch: Batch, cores: int, extras: list[ExtraPath]) -> Paths:
    """The paths timed side by side: the fast kernel (library threads and 1 thread), its per-layer calls, the
    naive numba loop, the extra bitwise paths, and the float32 paths (:func:`float_paths`)."""
    x_bits = batch.x_bits
    paths: Paths = {
        FUSED: (lambda: nets.fast.forward_counts(x_bits), None),
        FUSED_1: (lambda: nets.fast.forward_counts(x_bits), 1),
        "fast kernel (per-layer calls)": (lambda: nets.fast_per_layer(x_bits), None),
        "numba naive loop": (lambda: nets.naive_chain(x_bits), None),
    }
    for name, make in extras:
        paths[name] = (make(batch), 1)
    paths.update(float_paths(nets, batch, cores))
    return paths


def time_batch(nets: Networks, batch: Batch, calls: int, cycles: int, quick: bool, cores: int, extras) -> tuple:
    """Median (wall, thread CPU) seconds per call of every path and the names whose scores were checked;
    the slow numpy packed path on its own, with fewer calls."""
    paths = timed_paths(nets, batch, cores, extras)
    packed_path = {PACKED: (lambda: nets.packed.forward_counts(batch.x_bits), None)}
    reference = _scores(nets.fast.forward_counts(batch.x_bits))
    checked = check_paths(paths, reference, batch.n) + check_paths(packed_path, reference, batch.n)
    times = time_paths(paths, calls, cycles)
    packed_calls = 100 if batch.n == 1 else 1
    packed_cycles = 2 if batch.n == 1 else (5 if not quick else 1)
    times[PACKED] = time_paths(packed_path, packed_calls, packed_cycles)[PACKED]
    return times, checked


def summarize_batch(n: int, times: dict[str, tuple[float, float]], timed_calls: int, checked: list[str]) -> dict:
    """The batch's entry in bench.json: the fastest float path measured at this batch vs the faster fused-kernel
    path, wall clock and per core."""
    float_times = {name: t[0] for name, t in times.items() if "float32" in name}
    float_path = min(float_times, key=float_times.get)
    float_s = float_times[float_path]
    # Same rule for the bitwise side: the faster of the library's own thread choice and one thread
    # (on a shared machine a second thread can lose more to waiting for a busy core than it gains).
    fused_times = {name: times[name][0] for name in (FUSED, FUSED_1)}
    bitwise_path = min(fused_times, key=fused_times.get)
    bitwise_s = fused_times[bitwise_path]
    # Per core, from CPU time of single-threaded runs: robust to the other processes on this machine.
    one_thread = {name: t[1] for name, t in times.items() if "float32" in name and "(1 thread)" in name}
    float_cpu_path = min(one_thread, key=one_thread.get)
    float_cpu_1 = one_thread[float_cpu_path]
    bitwise_cpu_1 = times[FUSED_1][1]
    bitops = n * sum(a * b for a, b in itertools.pairwise(SIZES))
    return {
        "float_s": float_s,
        "bitwise_s": bitwise_s,
        "speedup_vs_float": float_s / bitwise_s,
        "fastest_float": float_path,
        "float_path": float_path,  # the same name, kept for readers of older bench.json files
        "bitwise_path": bitwise_path,
        "numpy_packed_s": times[PACKED][0] if PACKED in times else None,
        "bitwise_default_threads_s": times[FUSED][0],
        "all_paths_s": {name: t[0] for name, t in times.items()},
        "checked_equal": checked,
        "bitwise_bitops_per_s": bitops / bitwise_s,
        "single_thread_cpu": {
            "float_s": float_cpu_1,
            "fastest_float": float_cpu_path,
            "bitwise_s": bitwise_cpu_1,
            "speedup_vs_float": float_cpu_1 / bitwise_cpu_1,
            "bitwise_bitops_per_s": bitops / bitwise_cpu_1,
        },
        "timed_calls": timed_calls,
    }


def table_rows(n: int, times: dict[str, tuple[float, float]], float_s: float) -> list[list]:
    """One printed row per path, fastest first: ms per call, CPU ms (1-thread paths), us per sample, ratio."""
    rows = []
    for name, (seconds, cpu_s) in sorted(times.items(), key=lambda kv: kv[1][0]):
        cpu_text = f"{cpu_s * 1e3:.4f}" if "1 thread" in name else ""
        rows.append(
            [n, name, f"{seconds * 1e3:.4f}", cpu_text, f"{seconds / n * 1e6:.3f}", f"{float_s / seconds:.1f}x"]
        )
    return rows


def model_size_results(nets: Networks) -> dict:
    full_bytes = model_bytes(nets.layers)  # no zero weights
    sparse_bytes = model_bytes(nets.sparse_layers)
    return {
        "float32": full_bytes["float32"],
        "bitwise": full_bytes["bitwise"],
        "ratio": full_bytes["float32"] / full_bytes["bitwise"],
        "bitwise_sparse": sparse_bytes["bitwise"],
        "ratio_sparse": sparse_bytes["float32"] / sparse_bytes["bitwise"],
        # Same weights, integer thresholds: k = bit_length(2 n_in + 2) bits per unit instead of 1.
        "bitwise_thresholds": model_bytes(nets.threshold_layers)["bitwise"],
    }


def machine_results(results: dict, large: str, cores: int, load_before: tuple, quick: bool) -> dict:
    """Machine, kernels, the binary peak and the fraction of it the fused kernel reaches at the large batch."""
    peak = binary_peak(cores)
    achieved = results[large]["bitwise_bitops_per_s"]
    blas = blas_description()
    best = results[large]["fastest_float"]
    # One core, CPU time of the single-threaded fused network against one core's share of the peaks.
    per_core = results[large]["single_thread_cpu"]["bitwise_bitops_per_s"]
    return {
        "machine": machine_description(),
        "float_kernel": (
            f"{blas[best.split()[0]]}; fastest float path: {large} {best}, "
            f"batch_1 {results['batch_1']['fastest_float']}"
        ),
        "float_kernels": blas,
        "bitwise_kernel": K.kernel_name(),
        "binary_peak": peak,
        "binary_peak_fraction": achieved / peak["peak_bitops_per_s"],
        "binary_mix_peak_fraction": achieved / peak["mix_peak_bitops_per_s"],
        "binary_peak_fraction_one_core_cpu_time": per_core * cores / peak["peak_bitops_per_s"],
        "binary_mix_peak_fraction_one_core_cpu_time": per_core * cores / peak["mix_peak_bitops_per_s"],
        "blas_env_unset": os.environ.get(_MARKER, "") or "none were set",
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "quick": quick,
    }


def ratio_line(label: str, r: dict) -> str:
    one = r["single_thread_cpu"]
    return (
        f"{label}: {r['bitwise_path']} vs fastest float ({r['fastest_float']}) = {r['speedup_vs_float']:.1f}x "
        f"wall clock; single-thread CPU time {one['speedup_vs_float']:.1f}x (vs {one['fastest_float']})"
    )


def print_report(results: dict, table: list[list], cores: int, large: str) -> None:
    load_before = results["load_average"]["before"]
    print(f"machine: {results['machine']}")
    print(f"load average before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} (other processes share the CPU)")
    print(f"BLAS env unset for this run: {results['blas_env_unset']}")
    for name, desc in results["float_kernels"].items():
        print(f"float kernel ({name}): {desc}")
    print(f"bitwise kernel: {results['bitwise_kernel']}")
    for name, reason in results["skipped_paths"].items():
        print(f"skipped path {name}: {reason}")
    print()
    headers = ["batch", "path", "ms / call", "CPU ms (1 thread)", "us / sample", "speedup vs fastest float"]
    print(tabulate(table, headers=headers))
    print()
    mb = results["model_bytes"]
    print(
        f"model bytes: float32 {mb['float32']:,}  bitwise {mb['bitwise']:,} ({mb['ratio']:.1f}x smaller)  "
        f"50%-sparse bitwise {mb['bitwise_sparse']:,} ({mb['ratio_sparse']:.1f}x)  "
        f"integer thresholds {mb['bitwise_thresholds']:,}"
    )
    for key, t in results["threshold_vs_binary_bias"].items():
        print(
            f"integer thresholds vs +-1 biases (fused kernel, same weights), {key}: "
            f"{t['thresholds_s'] * 1e3:.4f} ms vs {t['binary_bias_s'] * 1e3:.4f} ms = ratio {t['ratio']:.3f}; "
            f"1 thread {t['ratio_1_thread']:.3f} (CPU time {t['ratio_1_thread_cpu']:.3f})"
        )
    peak = results["binary_peak"]
    achieved = results[large]["bitwise_bitops_per_s"]
    per_core = results[large]["single_thread_cpu"]["bitwise_bitops_per_s"]
    print(
        f"binary peak: clock {peak['clock_ghz_measured']:.2f} GHz (measured), "
        f"{peak['vpopcntq_zmm_per_cycle_measured']:.2f} VPOPCNTQ zmm/cycle, "
        f"{peak['xnor_popcount_accumulate_per_cycle_measured']:.2f} XNOR-popcount-add steps/cycle (measured)"
    )
    print(
        f"  popcount peak {peak['peak_bitops_per_s']:.3g} bit-op/s, instruction-mix peak "
        f"{peak['mix_peak_bitops_per_s']:.3g} bit-op/s ({cores} cores)"
    )
    print(
        f"  fast kernel at {large}: {achieved:.3g} bit-op/s = {results['binary_peak_fraction']:.0%} of the "
        f"popcount peak, {results['binary_mix_peak_fraction']:.0%} of the instruction-mix peak (wall clock)"
    )
    print(
        f"  one core (CPU time, 1 thread): {per_core:.3g} bit-op/s = "
        f"{results['binary_peak_fraction_one_core_cpu_time']:.0%} of a core's popcount peak, "
        f"{results['binary_mix_peak_fraction_one_core_cpu_time']:.0%} of its instruction-mix peak"
    )
    if "bit-sliced" in results["bitwise_kernel"]:
        print(
            "  (both peaks assume one XNOR-popcount per weight and input bit; the bit-sliced kernel that runs\n"
            "  large batches counts with carry-save adders over at most half the inputs, so it can pass them)"
        )
    print()
    for key in ("batch_1", large):
        print(ratio_line(key.replace("_", " "), results[key]))
    avx2 = results["avx2"]
    for name, reason in avx2["excluded_float_paths"].items():
        print(f"avx2: {name} left out: {reason}")
    print(ratio_line(f"avx2 {large.replace('_', ' ')} (numba haswell, AVX2 float kernels)", avx2[large]))


# ---------------------------------------------------------------------------------------------------------------
# x86 without AVX-512 VPOPCNTDQ: the AVX2 child process
# ---------------------------------------------------------------------------------------------------------------

ONNX_AVX2_REASON = (
    "onnxruntime's MLAS picks its SGEMM kernels from CPUID when it loads (AVX-512F ones on this CPU) and has "
    "no setting to hold it to AVX2, so it would not measure an AVX2 machine"
)


def run_avx2_child(args: argparse.Namespace) -> dict:
    """Run this script as the AVX2 child (Haswell ISA for numba, OpenBLAS, MKL and torch) and read its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "avx2.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), AVX2_CHILD_FLAG, "--out", str(out)]
        cmd += ["--large-batch", str(args.large_batch)] + (["--quick"] if args.quick else [])
        env = {**os.environ, **AVX2_ENV, _MARKER: "none (the AVX2 child sets OPENBLAS_CORETYPE=Haswell on purpose)"}
        sys.stdout.flush()
        proc = subprocess.run(cmd, env=env, timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"the AVX2 child failed (exit status {proc.returncode})")
        return json.loads(out.read_text())


def avx2_child_main(args: argparse.Namespace) -> None:
    """The large batch with every path built for Haswell: fused kernel vs numpy and torch float32 (all
    checked against the numpy packed engine, an implementation the ISA does not touch)."""
    cores = os.cpu_count() or 1
    rng = np.random.default_rng(2016)
    nets = build_networks(rng, cores, with_onnx=False)
    n = args.large_batch
    batch = make_batch(rng, n)
    x_bits = batch.x_bits
    paths: Paths = {
        FUSED: (lambda: nets.fast.forward_counts(x_bits), None),
        FUSED_1: (lambda: nets.fast.forward_counts(x_bits), 1),
        **float_paths(nets, batch, cores, with_onnx=False),
    }
    checked = check_paths(paths, _scores(nets.packed.forward_counts(x_bits)), n)
    calls, cycles = (1, 2) if args.quick else (2, 3)
    times = time_paths(paths, calls, cycles)
    key = f"batch_{n}"
    float_kernels = blas_description()
    float_kernels.pop("onnxruntime", None)  # not timed here (ONNX_AVX2_REASON)
    result = {
        key: summarize_batch(n, times, calls * cycles, checked),
        "float_kernels": float_kernels,
        "bitwise_kernel": K.kernel_name(),
        "env": AVX2_ENV,
        "excluded_float_paths": {"onnxruntime float32": ONNX_AVX2_REASON},
    }
    print(f"AVX2 child: {result['bitwise_kernel']}")
    for name, desc in result["float_kernels"].items():
        print(f"AVX2 child float kernel ({name}): {desc}")
    print(
        tabulate(
            table_rows(n, times, result[key]["float_s"]),
            headers=["batch", "path (AVX2 child)", "ms", "CPU ms", "us", "x"],
        )
    )
    args.out.write_text(json.dumps(result, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, not for reporting)")
    parser.add_argument(
        "--large-batch", type=int, default=10_000, help="the large batch (default 10000; bench.json key batch_N)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench.json")
    parser.add_argument(AVX2_CHILD_FLAG, action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def setup_extra_paths(nets: Networks) -> tuple[list[ExtraPath], dict[str, str]]:
    extras, skipped = [], {}
    for factory in EXTRA_BITWISE_PATHS:
        made = factory(nets)
        if isinstance(made, str):
            skipped[factory.__name__] = made
            print(f"skipping {factory.__name__}: {made}")
        else:
            extras.append(made)
    return extras, skipped


def main() -> None:
    args = parse_args()
    if args.avx2_child:
        avx2_child_main(args)
        return
    load_before = os.getloadavg()
    rng = np.random.default_rng(2016)
    cores = os.cpu_count() or 1
    nets = build_networks(rng, cores)
    extras, skipped = setup_extra_paths(nets)

    results: dict = {"threshold_vs_binary_bias": {}, "skipped_paths": skipped}
    table: list[list] = []
    large = f"batch_{args.large_batch}"
    # batch, calls, cycles
    plan = ((1, 10, 2), (args.large_batch, 1, 2)) if args.quick else ((1, 100, 3), (args.large_batch, 2, 3))
    for n, calls, cycles in plan:
        batch = make_batch(rng, n)
        check_thresholds(nets, batch)
        times, checked = time_batch(nets, batch, calls, cycles, args.quick, cores, extras)
        results[f"batch_{n}"] = summarize_batch(n, times, calls * cycles, checked)
        table += table_rows(n, times, results[f"batch_{n}"]["float_s"])
        # More cycles than the main table: the ratio of two near-equal times needs a steadier median.
        results["threshold_vs_binary_bias"][f"batch_{n}"] = time_thresholds(nets, batch, calls, 2 * cycles + 1)
    results["model_bytes"] = model_size_results(nets)
    results.update(machine_results(results, large, cores, load_before, args.quick))
    results["avx2"] = run_avx2_child(args)

    print_report(results, table, cores, large)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
