"""bnn_core.speed: the float32 baseline computes the bitwise network's integers; the timing helpers time.
And the benchmark script (benchmarks/bench_inference.py): its onnxruntime float path is exact, and a quick
run measures and checks every path."""

import importlib
import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

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


# ---------------------------------------------------------------------------------- the benchmark script

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def load_bench():
    """benchmarks/bench_inference.py as a module (it re-executes itself only when run as a script)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))  # it imports naive_kernel by that name, as test_naive_kernel does
    return importlib.import_module("bench_inference")


@pytest.mark.parametrize("threads", [1, 2])
def test_onnx_float32_network_gives_the_bitwise_scores_including_ties(threads):
    pytest.importorskip("onnxruntime")
    bench = load_bench()
    rng = np.random.default_rng(3)
    layers = random_layers(rng, [6, 9, 5, 4], 0.5)  # small widths with zeros: hidden a = 0 happens
    x = rng.choice([-1.0, 1.0], (400, 6)).astype(np.float32)
    w0, b0 = layers[0]
    assert ((x @ w0.T + b0) == 0).any()  # guard: ties at zero do occur, and ONNX's Sign(0) would be 0
    onnx_net = bench.OnnxFloat32Network(Float32Network(layers), threads)
    expected = PackedNetwork.from_ternary(layers).forward_counts(x > 0)
    np.testing.assert_array_equal(onnx_net(x), expected)
    np.testing.assert_array_equal(onnx_net(x[:1]), expected[:1])


@pytest.mark.slow
def test_bench_quick_run_measures_and_checks_every_path(tmp_path):
    """A smoke run of `make bench`: structure only (every key there, every path checked), no timing asserts."""
    out = tmp_path / "bench.json"
    large = 200
    cmd = [sys.executable, str(BENCHMARKS / "bench_inference.py"), "--quick", "--large-batch", str(large)]
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    has_onnx = importlib.util.find_spec("onnxruntime") is not None
    batches = {"batch_1": results["batch_1"], f"batch_{large}": results[f"batch_{large}"]}
    batches["avx2"] = results["avx2"][f"batch_{large}"]
    for name, r in batches.items():
        paths = r["all_paths_s"]
        assert r["speedup_vs_float"] > 0 and r["single_thread_cpu"]["speedup_vs_float"] > 0, name
        # The speedup is against the fastest float path measured in the same run, which bench.json names.
        assert r["fastest_float"] in paths and "float32" in r["fastest_float"], name
        assert r["float_s"] == min(t for p, t in paths.items() if "float32" in p), name
        assert r["speedup_vs_float"] == pytest.approx(r["float_s"] / r["bitwise_s"]), name
        assert set(paths) == set(r["checked_equal"]), name  # every timed path's scores were checked equal
        threads = {"1 thread"} | ({f"{os.cpu_count()} threads"} if (os.cpu_count() or 1) > 1 else set())
        for label in threads:
            assert f"numpy float32 ({label})" in paths and f"torch float32 ({label})" in paths, name
            if has_onnx and name != "avx2":
                assert f"onnxruntime float32 ({label})" in paths, name
    # onnxruntime cannot be held to AVX2, so the AVX2 comparison leaves it out and says why.
    avx2 = results["avx2"]
    assert not any("onnxruntime" in p for p in batches["avx2"]["all_paths_s"])
    assert "onnxruntime float32" in avx2["excluded_float_paths"]
    assert "haswell" in avx2["bitwise_kernel"] and "Haswell" in avx2["float_kernels"]["numpy"]
    assert avx2["env"]["NUMBA_CPU_NAME"] == "haswell" and "-avx512f" in avx2["env"]["NUMBA_CPU_FEATURES"]
    # The C export is either measured (and so checked) or skipped with a reason.
    c_export = [p for p in results["batch_1"]["all_paths_s"] if p.startswith("C export")]
    assert c_export or results["skipped_paths"]
    for label in ("batch 1:", f"batch {large}:", f"avx2 batch {large}"):
        assert any(line.startswith(label) and "vs fastest float" in line for line in proc.stdout.splitlines()), label
