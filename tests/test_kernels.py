"""The fast kernel (bnn_core.kernels) must give exactly the integers of the numpy packed engine, for the
paper's +-1 biases and for any integer constants (folded batch-norm thresholds)."""

import itertools
import os
import subprocess
import sys
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnn_core import kernel_codegen
from bnn_core import kernels as K
from bnn_core.packed import PackedLayer, PackedNetwork, forward_bits_numpy, pack_bits, preactivations_numpy

needs_numba = pytest.mark.skipif(not K.FAST_KERNEL_AVAILABLE, reason="numba kernels not available")


@contextmanager
def force_parallel():
    """Take the multi-threaded code paths even for tiny inputs."""
    with mock.patch.object(K, "PARALLEL_MIN_WORK", 0):
        yield


@contextmanager
def force_fallback():
    """Behave as if numba had failed to compile: everything goes through the numpy path."""
    with mock.patch.object(K, "_fast_failure", "forced by test"):
        yield


def random_layer(rng, n_in, n_out, zero_fraction, kind="binary"):
    """Ternary weights with about ``zero_fraction`` zeros; constants: the paper's +-1 (``binary``), any
    integer with ``|c| <= n_in + 1`` (``integer``), or only the range's extremes (``extremes``)."""
    w = rng.choice([-1, 1], (n_out, n_in)) * (rng.random((n_out, n_in)) >= zero_fraction)
    bound = n_in + 1
    if kind == "binary":
        b = rng.choice([-1, 1], n_out)
    elif kind == "extremes":
        b = rng.choice([-bound, -n_in, n_in, bound], n_out)
    else:
        b = rng.integers(-bound, bound + 1, n_out)
    return w, b


def integer_forward(x_pm1, layers):
    """Plain integer reference of a whole network: ``a = W z + c``, hidden ``z = +1 iff a >= 0``."""
    z = x_pm1.astype(np.int64)
    for i, (w, c) in enumerate(layers):
        a = integer_matmul(z, w, c)
        z = np.where(a >= 0, 1, -1) if i < len(layers) - 1 else a
    return z


def integer_matmul(x_pm1, w, b):
    return x_pm1.astype(np.int64) @ w.T.astype(np.int64) + b


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 70),
    n_in=st.one_of(st.integers(1, 300), st.sampled_from([64, 128, 192, 256])),
    n_out=st.integers(1, 150),
    zero_fraction=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    parallel=st.booleans(),
    csa=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_kernel_equals_numpy_engine_and_integer_matmul(n, n_in, n_out, zero_fraction, parallel, csa, seed):
    rng = np.random.default_rng(seed)
    w, b = random_layer(rng, n_in, n_out, zero_fraction)
    x = rng.choice([-1, 1], (n, n_in))
    layer = PackedLayer.from_ternary(w, b)
    words = pack_bits(x > 0)
    offset = layer.offset
    expected = preactivations_numpy(words, layer.signs, layer.mask, offset)
    np.testing.assert_array_equal(expected, integer_matmul(x, w, b))
    threads = force_parallel() if parallel else mock.patch.object(K, "PARALLEL_MIN_WORK", 1 << 60)
    # Both counting methods, whatever this CPU's default is.
    with threads, mock.patch.object(K, "CSA_DEFAULT", csa):
        got = K.preactivations(words, layer.signs, layer.mask, offset)
        bits = K.forward_layer_bits(words, layer.signs, layer.mask, offset)
    assert got.dtype == np.int32 and got.shape == (n, n_out)
    np.testing.assert_array_equal(got, expected)
    assert bits.dtype == np.uint64 and bits.shape == (n, -(-n_out // 64))
    np.testing.assert_array_equal(bits, pack_bits(expected >= 0))
    # The numpy fallback (bnn_core.packed), called directly, gives the same packed bits.
    np.testing.assert_array_equal(forward_bits_numpy(words, layer.signs, layer.mask, offset), bits)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 70),
    n_in=st.one_of(st.integers(1, 300), st.sampled_from([64, 128, 192, 256])),
    n_out=st.integers(1, 150),
    zero_fraction=st.sampled_from([0.0, 0.3, 1.0]),
    kind=st.sampled_from(["integer", "extremes"]),
    parallel=st.booleans(),
    csa=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_kernel_with_integer_constants_equals_numpy_engine_and_integer_matmul(
    n, n_in, n_out, zero_fraction, kind, parallel, csa, seed
):
    rng = np.random.default_rng(seed)
    w, c = random_layer(rng, n_in, n_out, zero_fraction, kind)
    x = rng.choice([-1, 1], (n, n_in))
    layer = PackedLayer.from_ternary(w, c)
    words = pack_bits(x > 0)
    reference = integer_matmul(x, w, c)
    np.testing.assert_array_equal(preactivations_numpy(words, layer.signs, layer.mask, layer.offset), reference)
    # zero_fraction 0: the unmasked kernel
    prepared = K.prepare_layer(layer.signs, layer.mask, layer.offset, csa=csa)
    with force_parallel() if parallel else mock.patch.object(K, "PARALLEL_MIN_WORK", 1 << 60):
        got = prepared.preactivations(words)
        bits = prepared.forward_bits(words)
    np.testing.assert_array_equal(got, reference)
    # Tile padding units (n_out not a multiple of 64) stay 0 whatever the real units' constants are.
    np.testing.assert_array_equal(bits, pack_bits(reference >= 0))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 120),
    n_in=st.integers(1, 300),
    hidden=st.lists(st.integers(1, 150), min_size=0, max_size=3),
    n_classes=st.integers(1, 12),
    sparsity=st.sampled_from([0.0, 0.5]),
    kind=st.sampled_from(["integer", "extremes"]),
    parallel=st.booleans(),
    csa=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_kernel_network_with_integer_constants_equals_packed_network_and_integer_reference(
    n, n_in, hidden, n_classes, sparsity, kind, parallel, csa, seed
):
    rng = np.random.default_rng(seed)
    sizes = [n_in, *hidden, n_classes]
    layers = [random_layer(rng, sizes[i], sizes[i + 1], sparsity, kind) for i in range(len(sizes) - 1)]
    x = rng.random((n, n_in)) > 0.5
    packed = PackedNetwork.from_ternary(layers)
    reference = integer_forward(np.where(x, 1, -1), layers)
    np.testing.assert_array_equal(packed.forward_counts(x), reference)
    with force_parallel() if parallel else mock.patch.object(K, "PARALLEL_MIN_WORK", 1 << 60):
        got = K.KernelNetwork.from_packed(packed, csa=csa).forward_counts(x)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, reference)


def test_offsets_that_could_overflow_int32_are_refused():
    layer = PackedLayer.from_ternary(*random_layer(np.random.default_rng(6), 70, 20, 0.0))
    huge = layer.offset.copy()
    huge[3] = 2**31 - 10  # fits int64 and int32, but 2 * agreements on top would wrap
    words = pack_bits(np.ones((2, 70), bool))
    for call in (K.preactivations, K.forward_layer_bits):
        with pytest.raises(ValueError, match="beyond int32"):
            call(words, layer.signs, layer.mask, huge)
    with pytest.raises(ValueError, match="beyond int32"):
        K.prepare_layer(layer.signs, layer.mask, huge)


@pytest.mark.parametrize("zero_fraction", [0.0, 1.0])
def test_full_and_all_zero_masks(zero_fraction):
    rng = np.random.default_rng(3)
    w, b = random_layer(rng, 200, 130, zero_fraction)
    x = rng.choice([-1, 1], (9, 200))
    layer = PackedLayer.from_ternary(w, b)
    got = K.preactivations(pack_bits(x > 0), layer.signs, layer.mask, layer.offset)
    np.testing.assert_array_equal(got, integer_matmul(x, w, b))
    if zero_fraction == 1.0:
        np.testing.assert_array_equal(got, np.broadcast_to(b, got.shape))  # only the bias is left


def test_ties_at_zero_happen_and_give_bit_one():
    """Small widths with zeros: a = 0 must occur, and sign(0) = +1 must set the output bit."""
    rng = np.random.default_rng(0)
    ties = 0
    for n_in in (2, 3, 4, 6, 8):
        w, b = random_layer(rng, n_in, 70, 0.5)
        x = rng.choice([-1, 1], (40, n_in))
        layer = PackedLayer.from_ternary(w, b)
        words = pack_bits(x > 0)
        offset = layer.offset
        a = K.preactivations(words, layer.signs, layer.mask, offset)
        np.testing.assert_array_equal(a, integer_matmul(x, w, b))
        bits = K.forward_layer_bits(words, layer.signs, layer.mask, offset)
        np.testing.assert_array_equal(bits, pack_bits(a >= 0))
        zero_rows, zero_units = np.nonzero(a == 0)
        ties += len(zero_rows)
        if len(zero_rows):
            set_bits = (bits[zero_rows, zero_units // 64] >> (zero_units % 64).astype(np.uint64)) & np.uint64(1)
            assert set_bits.all()
    assert ties > 0


def test_unmasked_kernel_ignores_padding_bits_set_by_the_caller():
    """Layers without zeros take the sign-only kernel; stray bits past n_in (in x or in the sign plane)
    must not count, as in the masked math."""
    rng = np.random.default_rng(2)
    w, b = random_layer(rng, 100, 70, 0.0)
    x = rng.choice([-1, 1], (12, 100))
    layer = PackedLayer.from_ternary(w, b)
    offset = layer.offset
    assert not K.prepare_layer(layer.signs, layer.mask, offset).masked
    words = pack_bits(x > 0)
    noisy_words = words | np.array([0, ~np.uint64(0) << np.uint64(36)], dtype=np.uint64)  # bits 100..127
    noisy_signs = layer.signs | np.array([0, ~np.uint64(0) << np.uint64(36)], dtype=np.uint64)
    expected = integer_matmul(x, w, b)
    np.testing.assert_array_equal(K.preactivations(noisy_words, noisy_signs, layer.mask, offset), expected)
    np.testing.assert_array_equal(words, pack_bits(x > 0))  # the caller's array is left alone
    np.testing.assert_array_equal(
        K.forward_layer_bits(noisy_words, layer.signs, layer.mask, offset), pack_bits(expected >= 0)
    )


def test_network_with_all_zero_trailing_columns_keeps_the_mask():
    # Every row's mask is the same run of leading ones (50 of 100 inputs): the layer must still ignore
    # inputs 50..99 inside the fused network, whose inputs there are real features, not padding.
    rng = np.random.default_rng(4)
    w, b = random_layer(rng, 100, 30, 0.0)
    w[:, 50:] = 0
    layers = [(w, b), random_layer(rng, 30, 10, 0.0)]
    x = rng.random((20, 100)) > 0.5
    packed = PackedNetwork.from_ternary(layers)
    fast = K.KernelNetwork.from_packed(packed)
    assert fast.layers[0].masked and not fast.layers[1].masked
    np.testing.assert_array_equal(fast.forward_counts(x), packed.forward_counts(x))


def test_output_bits_padding_is_zero_and_bit_order_matches_pack_bits():
    # 70 units that all fire: word 0 all ones, word 1 has exactly bits 0..5.
    w = np.ones((70, 5), dtype=int)
    layer = PackedLayer.from_ternary(w, np.ones(70))
    bits = K.forward_layer_bits(pack_bits(np.ones((1, 5), bool)), layer.signs, layer.mask, layer.offset)
    assert bits[0, 0] == np.uint64(2**64 - 1)
    assert bits[0, 1] == np.uint64(0b111111)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 70),
    n_in=st.integers(1, 300),
    hidden=st.lists(st.integers(1, 150), min_size=0, max_size=3),
    n_classes=st.integers(1, 12),
    sparsity=st.sampled_from([0.0, 0.5, 0.9]),
    parallel=st.booleans(),
    csa=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_kernel_network_equals_packed_network(n, n_in, hidden, n_classes, sparsity, parallel, csa, seed):
    rng = np.random.default_rng(seed)
    sizes = [n_in, *hidden, n_classes]
    layers = [random_layer(rng, sizes[i], sizes[i + 1], sparsity) for i in range(len(sizes) - 1)]
    x = rng.random((n, n_in)) > 0.5
    packed = PackedNetwork.from_ternary(layers)
    fast = K.KernelNetwork.from_packed(packed, csa=csa)
    expected = packed.forward_counts(x)
    with force_parallel() if parallel else mock.patch.object(K, "PARALLEL_MIN_WORK", 1 << 60):
        got = fast.forward_counts(x)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(fast.forward_counts(np.where(x, 1, -1)), expected)  # +-1 input
    np.testing.assert_array_equal(fast.predict(x), packed.predict(x))


@pytest.mark.parametrize("csa", [False, True])
def test_kernel_network_parallel_over_many_row_chunks(csa):
    rng = np.random.default_rng(5)
    layers = [random_layer(rng, 100, 130, 0.2), random_layer(rng, 130, 70, 0.0), random_layer(rng, 70, 10, 0.5)]
    x = rng.random((kernel_codegen.CHUNK_ROWS * 5 + 7, 100)) > 0.5
    packed = PackedNetwork.from_ternary(layers)
    with force_parallel():
        got = K.KernelNetwork.from_packed(packed, csa=csa).forward_counts(x)
    np.testing.assert_array_equal(got, packed.forward_counts(x))


@needs_numba
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 700),
    n_in=st.integers(1, 300),
    hidden=st.lists(st.integers(1, 150), min_size=0, max_size=3),
    n_classes=st.integers(1, 12),
    kind=st.sampled_from(["binary", "integer", "extremes"]),
    skew=st.sampled_from([0.5, 0.1, 0.9]),
    csa=st.booleans(),
    chunk=st.sampled_from([kernel_codegen.BS_CHUNK, 64, 37]),
    seed=st.integers(0, 2**31 - 1),
)
def test_bit_sliced_batch_kernel_equals_integer_reference(n, n_in, hidden, n_classes, kind, skew, csa, chunk, seed):
    """Networks without zero weights, any widths, partial blocks of rows, constants up to the bound, units
    whose smaller subset is the +1 weights or the -1 weights (``skew``: the fraction of +1), and lists cut
    into pieces of ``chunk`` inputs (the layout reads ``BS_CHUNK``; the kernel follows the layout)."""
    rng = np.random.default_rng(seed)
    sizes = [n_in, *hidden, n_classes]
    layers = []
    for a, b in itertools.pairwise(sizes):
        _, c = random_layer(rng, a, b, 0.0, kind)
        layers.append((np.where(rng.random((b, a)) < skew, 1, -1), c))
    x = rng.random((n, n_in)) > 0.5
    net = K.KernelNetwork.from_packed(PackedNetwork.from_ternary(layers), csa=csa)
    with mock.patch.object(kernel_codegen, "BS_CHUNK", chunk):
        assert net.bitsliced is not None  # the same layout whichever way the tile kernels count
    assert net.bitsliced.layers[0, 5] == -(-n_in // chunk)  # pieces per unit
    out = np.empty((n, n_classes), np.int32)
    assert net.bitsliced.forward_counts(np.ascontiguousarray(x), out)
    np.testing.assert_array_equal(out, integer_forward(np.where(x, 1, -1), layers))


@needs_numba
@pytest.mark.parametrize("csa", [False, True])
def test_large_batches_of_dense_networks_run_bit_sliced(monkeypatch, csa):
    rng = np.random.default_rng(3)
    dense = [random_layer(rng, 100, 130, 0.0), random_layer(rng, 130, 10, 0.0, "integer")]
    packed = PackedNetwork.from_ternary(dense)
    calls = []
    real = kernel_codegen.bitsliced_network
    monkeypatch.setattr(kernel_codegen, "bitsliced_network", lambda *a: calls.append(len(a[0])) or real(*a))
    net = K.KernelNetwork.from_packed(packed, csa=csa)
    x = rng.random((K.BITSLICED_MIN_ROWS + 3, 100)) > 0.5
    np.testing.assert_array_equal(net.forward_counts(x[:1]), packed.forward_counts(x[:1]))
    assert "bitsliced" not in vars(net)  # batch 1 never builds the layout
    with force_parallel():
        np.testing.assert_array_equal(net.forward_counts(x), packed.forward_counts(x))
        np.testing.assert_array_equal(net.forward_counts(x[:200]), packed.forward_counts(x[:200]))
    assert calls == [len(x)]  # the small batches took the tile kernels
    # Zero weights: no bit-sliced layout, and large batches take the tile kernels.
    sparse = PackedNetwork.from_ternary([random_layer(rng, 100, 130, 0.3), dense[1]])
    sparse_net = K.KernelNetwork.from_packed(sparse, csa=csa)
    assert sparse_net.bitsliced is None
    np.testing.assert_array_equal(sparse_net.forward_counts(x), sparse.forward_counts(x))
    assert calls == [len(x)]
    # Zero weights in the last inputs only: the layer keeps its mask, so no layout either.
    w, c = random_layer(rng, 100, 130, 0.0)
    w[:, -3:] = 0
    assert K.KernelNetwork.from_packed(PackedNetwork.from_ternary([(w, c), dense[1]]), csa=csa).bitsliced is None


def test_fallback_path_gives_identical_results():
    rng = np.random.default_rng(7)
    layers = [random_layer(rng, 150, 90, 0.3), random_layer(rng, 90, 10, 0.0)]
    x = rng.random((33, 150)) > 0.5
    packed = PackedNetwork.from_ternary(layers)
    fast = K.KernelNetwork.from_packed(packed)
    layer = packed.layers[0]
    words = pack_bits(x)
    args = (words, layer.signs, layer.mask, layer.offset)
    fast_results = (fast.forward_counts(x), K.preactivations(*args), K.forward_layer_bits(*args), K.pack_input_bits(x))
    with force_fallback():
        assert K.kernel_name().startswith("numpy-fallback")
        slow_results = (
            fast.forward_counts(x),
            K.preactivations(*args),
            K.forward_layer_bits(*args),
            K.pack_input_bits(x),
        )
    for fast_r, slow_r in zip(fast_results, slow_results, strict=True):
        np.testing.assert_array_equal(fast_r, slow_r)
    np.testing.assert_array_equal(fast_results[0], packed.forward_counts(x))


def _small_network(seed):
    rng = np.random.default_rng(seed)
    layers = [random_layer(rng, 40, 20, 0.3), random_layer(rng, 20, 3, 0.0)]
    packed = PackedNetwork.from_ternary(layers)
    return packed, K.KernelNetwork.from_packed(packed), rng.random((5, 40)) > 0.5


def _compiled_call(kind, fast, packed, x):
    """(name of a compiled function in bnn_core.kernel_codegen, a public call that runs it)."""
    layer = packed.layers[0]
    words = pack_bits(x)
    calls = {
        "network": ("network_serial", lambda: fast.forward_counts(x)),
        "layer": ("layer_serial", lambda: K.preactivations(words, layer.signs, layer.mask, layer.offset)),
        "pack": ("pack_rows", lambda: K.pack_input_bits(x)),
    }
    return calls[kind]


@needs_numba
@pytest.mark.parametrize("kind", ["network", "layer", "pack"])
def test_numba_compile_error_falls_back_to_numpy_and_says_so(kind, monkeypatch, capsys):
    from numba.core.errors import LoweringError

    packed, fast, x = _small_network(8)
    name, call = _compiled_call(kind, fast, packed, x)
    expected = call()

    def broken(*args):
        raise LoweringError("simulated LLVM lowering failure\nsecond line of numba's report")

    monkeypatch.setattr(K, "_fast_failure", None)
    monkeypatch.setattr(kernel_codegen, name, broken)
    np.testing.assert_array_equal(call(), expected)
    np.testing.assert_array_equal(call(), expected)
    np.testing.assert_array_equal(fast.forward_counts(x), packed.forward_counts(x))
    err = capsys.readouterr().err
    assert err.count("WARNING: fast kernel unavailable") == 1  # once per process, not once per call
    assert "LoweringError: simulated LLVM lowering failure" in err
    expected_name = "numpy-fallback (numba compilation failed: LoweringError: simulated LLVM lowering failure)"
    assert K.kernel_name() == expected_name


@needs_numba
@pytest.mark.parametrize("error", [ValueError("bad value"), ZeroDivisionError("division by zero"), MemoryError()])
def test_other_errors_propagate_and_keep_the_fast_kernel(error, monkeypatch, capsys):
    packed, fast, x = _small_network(9)

    def broken(*args):
        raise error

    monkeypatch.setattr(K, "_fast_failure", None)
    monkeypatch.setattr(kernel_codegen, "network_serial", broken)
    with pytest.raises(type(error)):
        fast.forward_counts(x)
    assert K._fast_failure is None
    assert K.kernel_name().startswith("numba-xnor-popcount")
    assert "WARNING" not in capsys.readouterr().err
    monkeypatch.undo()
    np.testing.assert_array_equal(fast.forward_counts(x), packed.forward_counts(x))


@pytest.mark.parametrize("csa", [False, True])
def test_model_image_describes_each_layer(csa):
    rng = np.random.default_rng(10)
    layers = [random_layer(rng, 100, 130, 0.2), random_layer(rng, 130, 70, 0.0), random_layer(rng, 70, 10, 0.5)]
    fast = K.KernelNetwork.from_packed(PackedNetwork.from_ternary(layers), csa=csa)
    model, C = fast.model, kernel_codegen
    assert model.dtype == np.uint64 and model.ctypes.data % 64 == 0
    head = model[: C.HEAD_WORDS]
    assert (head[C.HEAD_LAYERS], head[C.HEAD_N_IN], head[C.HEAD_CLASSES], head[C.HEAD_CSA]) == (3, 100, 10, csa)
    assert head[C.HEAD_MAX_WORDS] == max(lay.in_words for lay in fast.layers)
    assert fast.meta.shape == (3, C.META_COLUMNS)
    for li, lay in enumerate(fast.layers):
        row = fast.meta[li]
        w_start, o_start = row[C.META_WEIGHT_START], row[C.META_OFFSET_START]
        np.testing.assert_array_equal(model[w_start : w_start + lay.tiles.size], lay.tiles)
        offsets = model[o_start : o_start + lay.tile_offset.size].view(np.int64)
        np.testing.assert_array_equal(offsets, lay.tile_offset)
        assert row[C.META_IN_WORDS] == lay.in_words
        assert row[C.META_TILES] == lay.n_tiles
        assert row[C.META_MASKED] == lay.masked
        assert w_start % 8 == 0  # each layer's tiles start on a cache line
        # Carry-save layouts pad the input words to a multiple of CSA_PAD; the vector popcount reads them as is.
        assert lay.in_words == (-(-lay.n_in_words // C.CSA_PAD) * C.CSA_PAD if csa else lay.n_in_words)
    assert [lay.masked for lay in fast.layers] == [True, False, True]


def test_without_numba_everything_runs_on_numpy():
    code = (
        "import sys; sys.modules['numba'] = None; sys.modules['llvmlite'] = None\n"
        "import numpy as np\n"
        "from bnn_core import kernels as K\n"
        "from bnn_core.packed import PackedNetwork\n"
        "assert not K.FAST_KERNEL_AVAILABLE and K.kernel_name().startswith('numpy-fallback')\n"
        "rng = np.random.default_rng(0)\n"
        "w0, w1 = rng.choice([-1, 0, 1], (30, 50)), rng.choice([-1, 1], (4, 30))\n"
        "net = PackedNetwork.from_ternary([(w0, rng.choice([-1, 1], 30)), (w1, rng.choice([-1, 1], 4))])\n"
        "x = rng.random((9, 50)) > 0.5\n"
        "assert (K.KernelNetwork.from_packed(net).forward_counts(x) == net.forward_counts(x)).all()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 40), n_in=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_pack_input_bits_equals_pack_bits(n, n_in, seed):
    bits = np.random.default_rng(seed).random((n, 2 * n_in)) > 0.5
    np.testing.assert_array_equal(K.pack_input_bits(bits[:, :n_in]), pack_bits(bits[:, :n_in]))
    np.testing.assert_array_equal(K.pack_input_bits(bits[:, ::2]), pack_bits(bits[:, ::2]))  # not contiguous


def test_empty_batch_and_bad_shapes():
    rng = np.random.default_rng(1)
    layer = PackedLayer.from_ternary(*random_layer(rng, 70, 20, 0.0))
    offset = layer.offset
    empty = np.zeros((0, 2), np.uint64)
    assert K.preactivations(empty, layer.signs, layer.mask, offset).shape == (0, 20)
    assert K.forward_layer_bits(empty, layer.signs, layer.mask, offset).shape == (0, 1)
    with pytest.raises(ValueError):
        K.preactivations(np.zeros((3, 3), np.uint64), layer.signs, layer.mask, offset)
    with pytest.raises(ValueError):
        K.preactivations(np.zeros((3, 2), np.uint64), layer.signs, layer.mask, offset[:5])


@pytest.mark.skipif(os.environ.get("BNN_DISABLE_FAST_KERNEL", "") not in ("", "0"), reason="disabled on purpose")
def test_fast_kernel_is_available_here():
    """numba is a dependency: if the fast kernel is missing, the install is broken."""
    assert K.FAST_KERNEL_AVAILABLE
    assert K.kernel_name().startswith("numba-xnor-popcount")


# ------------------------------------------------------------------------------------------ batch-1 path


@settings(max_examples=40, deadline=None)
@given(
    n=st.sampled_from([1, 1, 1, 2, 3, 5, 7]),
    n_in=st.integers(1, 300),
    hidden=st.lists(st.integers(1, 200), min_size=0, max_size=3),
    n_classes=st.integers(1, 20),
    sparsity=st.sampled_from([0.0, 0.5]),
    kind=st.sampled_from(["binary", "integer"]),
    csa=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_small_batches_equal_the_numpy_engine(n, n_in, hidden, n_classes, sparsity, kind, csa, seed):
    """The short path (C-contiguous bool input, one compiled call) on random networks with odd widths:
    input bits not a multiple of 8 or 64, units not a multiple of 8 or 64, ties at zero."""
    rng = np.random.default_rng(seed)
    sizes = [n_in, *hidden, n_classes]
    layers = [random_layer(rng, sizes[i], sizes[i + 1], sparsity, kind) for i in range(len(sizes) - 1)]
    packed = PackedNetwork.from_ternary(layers)
    fast = K.KernelNetwork.from_packed(packed, csa=csa)
    x = rng.random((n, n_in)) > 0.5
    expected = packed.forward_counts(x)
    np.testing.assert_array_equal(expected, integer_forward(np.where(x, 1, -1), layers))
    for row in range(n):  # batch 1, each row on its own
        np.testing.assert_array_equal(fast.forward_counts(x[row : row + 1]), expected[row : row + 1])
    np.testing.assert_array_equal(fast.forward_counts(x), expected)


@needs_numba
@pytest.mark.parametrize("csa", [False, True])
def test_batch_1_makes_one_compiled_call_and_converts_other_inputs(csa, monkeypatch):
    rng = np.random.default_rng(12)
    layers = [random_layer(rng, 784, 130, 0.0), random_layer(rng, 130, 10, 0.3)]
    packed = PackedNetwork.from_ternary(layers)
    fast = K.KernelNetwork.from_packed(packed, csa=csa)
    x = rng.random((4, 784)) > 0.5
    expected = packed.forward_counts(x)
    calls = []
    real = kernel_codegen.network_serial

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(kernel_codegen, "network_serial", counting)
    got = fast.forward_counts(x[:1])
    np.testing.assert_array_equal(got, expected[:1])
    assert len(calls) == 1
    assert np.shares_memory(calls[0][0], x)  # C-contiguous bool input: passed on as it is, no copy
    assert len(calls[0]) == 3  # input, model image, output
    # Inputs the short path does not take as they are: a column slice, +-1 integers, a list.
    np.testing.assert_array_equal(fast.forward_counts(np.asfortranarray(x[1:2])), expected[1:2])
    np.testing.assert_array_equal(fast.forward_counts(np.where(x[2:3], 1, -1)), expected[2:3])
    np.testing.assert_array_equal(fast.forward_counts(x[3:4].tolist()), expected[3:4])
    wide = np.zeros((1, 2 * 784), bool)
    wide[:, ::2] = x[:1]
    np.testing.assert_array_equal(fast.forward_counts(wide[:, ::2]), expected[:1])  # not contiguous
    with pytest.raises(ValueError, match=r"expected input bits \[n, 784\]"):
        fast.forward_counts(x[:, :700])
    with pytest.raises(ValueError, match=r"expected input bits"):
        fast.forward_counts(x[0])
    assert fast.forward_counts(x[:0]).shape == (0, 10)


@needs_numba
def test_both_counting_methods_give_the_paper_network_s_scores():
    """The benchmark's architecture (784 -> 3 x 1024 -> 10, +-1 weights) at batch 1, 2 and 100."""
    rng = np.random.default_rng(13)
    sizes = [784, 1024, 1024, 1024, 10]
    layers = [random_layer(rng, sizes[i], sizes[i + 1], 0.0) for i in range(4)]
    packed = PackedNetwork.from_ternary(layers)
    x = rng.random((100, 784)) > 0.5
    expected = packed.forward_counts(x)
    for csa in (False, True):
        fast = K.KernelNetwork.from_packed(packed, csa=csa)
        for n in (1, 2, 100):
            np.testing.assert_array_equal(fast.forward_counts(x[:n]), expected[:n])


def test_target_cpu_reads_numba_s_settings():
    name, features = kernel_codegen.target_cpu()
    assert isinstance(name, str) and isinstance(features, frozenset)
    code = (
        "from bnn_core import kernel_codegen as C, kernels as K\n"
        "name, features = C.target_cpu()\n"
        "assert name == 'haswell', name\n"
        "assert 'avx2' in features and 'avx512f' not in features, features\n"
        "assert C.CSA_DEFAULT is C._is_x86()\n"
        "assert 'haswell' in K.kernel_name()\n"
    )
    run_as_haswell(code, timeout=120)


HASWELL_FEATURES = "+avx,+avx2,+bmi,+bmi2,+fma,+popcnt,+sse4.2,-avx512f,-avx512bw,-avx512vpopcntdq"


def run_as_haswell(code: str, timeout: int) -> None:
    """Run ``code`` in a fresh Python whose numba compiles for Haswell (AVX2, no AVX-512)."""
    env = {**os.environ, "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": HASWELL_FEATURES}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=timeout, env=env)


@pytest.mark.slow
@needs_numba
def test_avx2_build_gives_the_same_scores():
    """numba built for Haswell (AVX2, no AVX-512): both counting methods, in a subprocess (its own compile)."""
    code = (
        "import numpy as np\n"
        "from bnn_core import kernels as K\n"
        "from bnn_core.packed import PackedNetwork\n"
        "rng = np.random.default_rng(0)\n"
        "sizes = [200, 130, 70, 10]\n"
        "layers = [(rng.choice([-1, 0, 1], (b, a)), rng.choice([-1, 1], b)) for a, b in zip(sizes, sizes[1:])]\n"
        "layers[1] = (np.where(layers[1][0] == 0, 1, layers[1][0]), layers[1][1])\n"
        "packed = PackedNetwork.from_ternary(layers)\n"
        "x = rng.random((300, 200)) > 0.5\n"
        "for csa in (False, True):\n"
        "    got = K.KernelNetwork.from_packed(packed, csa=csa).forward_counts(x)\n"
        "    assert (got == packed.forward_counts(x)).all(), csa\n"
        "    assert (K.KernelNetwork.from_packed(packed, csa=csa).forward_counts(x[:1]) == got[:1]).all()\n"
        "dense = PackedNetwork.from_ternary([(np.where(w == 0, 1, w), c) for w, c in layers])\n"
        "x = rng.random((700, 200)) > 0.5\n"
        "net = K.KernelNetwork.from_packed(dense, csa=True)\n"
        "out = np.empty((700, 10), np.int32)\n"
        "assert net.bitsliced.forward_counts(x, out) and (out == dense.forward_counts(x)).all()\n"
    )
    run_as_haswell(code, timeout=600)
