"""Fast XNOR-popcount inference for packed bitwise layers (the fast twin of :mod:`bnn_core.packed`).

Encoding and math are those of :mod:`bnn_core.packed`: bit 1 = +1, bit 0 = -1, feature ``j`` in word
``j // 64``, bit ``j % 64``; a ternary weight row is a sign plane ``s`` and a nonzero mask ``m``. For
packed inputs ``x [n, W]`` the integer pre-activation of unit ``o`` is

    a[i, o] = 2 * sum_w popcount(~(x[i, w] ^ s[o, w]) & m[o, w]) + offset[o]
    offset[o] = bias[o] - popcount(m[o, :])

and a hidden layer feeds ``sign(a)`` with ``sign(0) = +1`` on: output bit ``o`` of row ``i`` is 1 iff
``a[i, o] >= 0``. The constant ``bias[o]`` is any integer (the paper's +-1, or ``-threshold`` of a network
with batch norm folded into thresholds): it only enters through ``offset``, one int64 per unit that the
kernel adds once per unit after the popcount loop, so integer thresholds run the very same instructions
as +-1 biases (``benchmarks/bench_inference.py`` times both). Scores are exact int64 sums, stored as int32;
offsets that could overflow int32 are refused (:func:`bnn_core.packed.offset_problem`).

Public API (this module dispatches; :mod:`bnn_core.kernel_codegen` holds the compiled loops and
:mod:`bnn_core.tile_layout` the weight re-layout):

- :func:`preactivations` -> ``int32 [n, n_out]``; :func:`forward_layer_bits` -> the next layer's packed
  input ``uint64 [n, ceil(n_out / 64)]`` written straight from the accumulators (no unpack / repack).
- :func:`prepare_layer` / :class:`KernelLayer` keep a layer's weights in the kernel's tile layout so
  repeated calls skip the re-layout; :class:`KernelNetwork` runs a whole :class:`PackedNetwork`
  (input packing included) in one compiled call.
- :func:`pack_input_bits`: booleans -> packed words, bit-identical to :func:`bnn_core.packed.pack_bits`.
- Counting: vector popcount or carry-save (Harley-Seal), chosen for the CPU numba compiles for
  (:data:`bnn_core.kernel_codegen.CSA_DEFAULT`; ``csa=`` overrides it per layer / network, which the tests
  use to run both on any machine). Both give the same integers. Networks without zero weights run
  batches of ``BITSLICED_MIN_ROWS`` rows or more bit-sliced (:class:`BitSlicedLayout`), whichever way the
  tile kernels count: it was faster than both kinds of tiles wherever measured (figures in
  :mod:`bnn_core.kernel_codegen`).
- Fallback: :func:`bnn_core.packed.preactivations_numpy` (the same integers), used when numba is missing,
  ``BNN_DISABLE_FAST_KERNEL=1``, or numba fails to compile a kernel (a ``NumbaError``: then a warning goes
  to stderr once and the whole process stays on numpy). Any other exception propagates.
  :data:`FAST_KERNEL_AVAILABLE`, :func:`kernel_name` say which path runs.

Threads, as measured (numba's OpenMP layer, 2 cores): many rows -> chunks of rows in parallel (``prange``,
handed out dynamically); few rows but a big layer -> output tiles in parallel; anything under
``PARALLEL_MIN_WORK`` runs on the calling thread. A parallel region costs >= 6 us when the other core is
idle and stalls for a scheduler tick (4-12 ms) when another process holds it, while a batch-1
1024 x 1024 layer takes 1.3 us on one thread. So batch 1 never goes parallel.

Batch 1 (and any batch up to ``CHUNK_ROWS`` rows): :meth:`KernelNetwork.forward_counts` takes a short path
for C-contiguous bool input, a few attribute checks, one ``np.empty`` and one compiled call with three
arguments (the input, the model image, the output), because at batch 1 the compute is ~2 us on an AVX-512
VPOPCNTDQ core and the Python and dispatch overhead around it was as large (README, benchmark section).
"""

from __future__ import annotations

import functools
import itertools
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bnn_core import kernel_codegen as codegen
from bnn_core.kernel_codegen import CHUNK_ROWS, CSA_DEFAULT, ROW_BLOCK, TILE_OUT
from bnn_core.packed import (
    WORD_BITS,
    PackedNetwork,
    forward_bits_numpy,
    n_words,
    offset_problem,
    pack_bits,
    preactivations_numpy,
)
from bnn_core.tile_layout import layout_layer, leading_ones, network_image

if codegen.UNAVAILABLE_REASON is None:
    from numba import get_num_threads, parallel_chunksize
    from numba.core.errors import NumbaError

# Work, in word-ops (rows x units x input words), under which a parallel region is not worth it: 4M
# word-ops take ~0.1 ms on one core, well above a region's cost on an idle machine (see docstring).
PARALLEL_MIN_WORK = 1 << 22
# Rows from which a network without zero weights runs bit-sliced (BitSlicedLayout): whole blocks for
# every thread of 2 cores; below that the tile kernels' row chunks balance better. (On Zen 4 bit-sliced
# already wins at 1,024 rows, 1.1-1.3x; the bound stays where both kinds of CPU measured a win.)
BITSLICED_MIN_ROWS = 4 * codegen.BS_ROWS
_BOOL, _INT32 = np.dtype(np.bool_), np.dtype(np.int32)  # dtypes are singletons: `is` is the fast test
_ANSI_STYLE = re.compile(r"\x1b\[[0-9;]*m")

FAST_KERNEL_AVAILABLE: bool = codegen.UNAVAILABLE_REASON is None
# Why this process runs on numpy (None: it runs the fast kernel). Set once, at import or on the first
# compile failure, and never cleared: a kernel that failed to compile would fail again.
_fast_failure: str | None = codegen.UNAVAILABLE_REASON


def _fast() -> bool:
    """True while this process runs the compiled kernels (read at call time: tests patch both names)."""
    return FAST_KERNEL_AVAILABLE and _fast_failure is None


def _check(
    x_words: np.ndarray, signs: np.ndarray, mask: np.ndarray, offset: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four arrays as contiguous uint64 / int64, or ValueError naming the shapes that do not match (or
    offsets whose scores would not fit int32)."""
    x_words = np.ascontiguousarray(x_words, dtype=np.uint64)
    signs = np.ascontiguousarray(signs, dtype=np.uint64)
    mask = np.ascontiguousarray(mask, dtype=np.uint64)
    offset = np.ascontiguousarray(offset, dtype=np.int64)
    if x_words.ndim != 2 or signs.ndim != 2 or signs.shape != mask.shape or x_words.shape[1] != signs.shape[1]:
        raise ValueError(f"shapes do not match: x {x_words.shape}, signs {signs.shape}, mask {mask.shape}")
    if offset.shape != (signs.shape[0],):
        raise ValueError(f"offset must have shape ({signs.shape[0]},), got {offset.shape}")
    problem = offset_problem(offset, signs.shape[1])
    if problem:
        raise ValueError(problem)
    return x_words, signs, mask, offset


def _fall_back(exc: Exception) -> None:
    """Switch this process to the numpy path for good, and say so on stderr (once: the switch is one-way)."""
    global _fast_failure
    text = _ANSI_STYLE.sub("", str(exc))  # numba highlights its messages for terminals
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    _fast_failure = f"numba compilation failed: {type(exc).__name__}: {first_line}"
    print(
        f"bnn_core.kernels: WARNING: fast kernel unavailable, this process now runs the numpy fallback "
        f"(same results, slower). Reason: {_fast_failure}",
        file=sys.stderr,
        flush=True,
    )


def _run_fast(fn, *args) -> bool:
    """Run a compiled kernel; False (numpy path) if numba cannot compile it.

    Only numba's own compile errors (``NumbaError``: typing, lowering, unsupported features) switch the
    process to numpy. llvmlite reports LLVM failures as plain ``RuntimeError``, which is no specific sign
    of a compile problem, so it propagates with every other exception: a bug must not hide behind a slower
    path.
    """
    if not _fast():
        return False
    try:
        if getattr(fn, "targetoptions", {}).get("parallel"):
            # Chunk size 1 = dynamic scheduling of the work items: a thread that lost its core to another
            # process does not hold back the whole region with a fixed 1/threads share of the work.
            with parallel_chunksize(1):
                fn(*args)
        else:
            fn(*args)  # compiles (or loads from the on-disk cache) on the first call of each signature
    except NumbaError as exc:
        _fall_back(exc)
        return False
    return True


def _parallel_ok(work: int) -> bool:
    return work >= PARALLEL_MIN_WORK and get_num_threads() > 1


@dataclass(frozen=True, eq=False)
class KernelLayer:
    """One layer in the fast kernel's tile layout (see :func:`prepare_layer`)."""

    tiles: np.ndarray  # uint64, flat [n_tiles, in_words, 8, 2, 8], or [n_tiles, in_words, 8, 8] when not masked
    tile_offset: np.ndarray  # int64 [n_tiles * 64]: the kernel's constant term (bias + n_in if unmasked); pad -1
    signs: np.ndarray  # the planes (sign bits cleared where the mask is 0), kept for the numpy fallback
    mask: np.ndarray
    offset: np.ndarray  # int64 [n_out]: bias - popcount(mask row), as PackedLayer.offset
    masked: bool  # False: no zero weights; the kernel skips the mask plane
    input_bits: int  # unmasked layers: input bits past this are cleared before the kernel sees them
    in_words: int  # input words per row the kernel reads: n_in_words, padded to CSA_PAD for carry-save
    csa: bool  # carry-save counting (else vector popcount)

    @property
    def n_out(self) -> int:
        return len(self.signs)

    @property
    def n_in_words(self) -> int:
        return self.signs.shape[1]

    @property
    def n_tiles(self) -> int:
        return len(self.tile_offset) // TILE_OUT

    def preactivations(self, x_words: np.ndarray) -> np.ndarray:
        """``int32 [n, n_out]``: ``2 * popcount(~(x ^ s) & m) + offset`` per unit."""
        x_words = self._input(x_words)
        out = np.empty((len(x_words), self.n_out), dtype=np.int32)
        if self._run(x_words, out):
            return out
        return preactivations_numpy(x_words, self.signs, self.mask, self.offset)

    def forward_bits(self, x_words: np.ndarray) -> np.ndarray:
        """Next layer's packed inputs ``uint64 [n, ceil(n_out/64)]``: bit ``o`` = ``a[i, o] >= 0``."""
        x_words = self._input(x_words)
        out = np.empty((len(x_words), self.n_tiles), dtype=np.uint64)
        if self._run(x_words, out):
            return out
        return forward_bits_numpy(x_words, self.signs, self.mask, self.offset)

    def _input(self, x_words: np.ndarray) -> np.ndarray:
        x_words = np.require(x_words, dtype=np.uint64, requirements=["C", "W"])
        if x_words.ndim != 2 or x_words.shape[1] != self.n_in_words:
            raise ValueError(f"x_words must be [n, {self.n_in_words}] uint64, got {x_words.shape}")
        first = self.input_bits // WORD_BITS
        if not self.masked and first < self.n_in_words:
            # The unmasked kernel counts every input bit: clear those past n_in if a caller left any set
            # (they never count in the masked math). Packed inputs from pack_bits have them 0 already.
            valid = leading_ones(self.input_bits, self.n_in_words)
            if (x_words[:, first:] & ~valid[first:]).any():
                x_words = x_words & valid
        return x_words

    def _run(self, x_words: np.ndarray, out: np.ndarray) -> bool:
        n = len(x_words)
        if not _fast():
            return False
        if n == 0:
            return True
        if self.in_words != self.n_in_words:  # carry-save layout: zero words up to a multiple of CSA_PAD
            padded = np.zeros((n, self.in_words), dtype=np.uint64)
            padded[:, : self.n_in_words] = x_words
            x_words = padded
        args = (x_words, self.tiles, self.tile_offset, out)
        if not _parallel_ok(n * self.n_tiles * TILE_OUT * self.in_words):
            return _run_fast(codegen.layer_serial, *args, self.masked, self.csa)
        # Enough row chunks for every thread: rows in parallel; otherwise split the output tiles too.
        n_chunks = -(-n // CHUNK_ROWS)
        per_item = self.n_tiles if n_chunks >= 2 * get_num_threads() else 1
        return _run_fast(codegen.layer_parallel, *args, per_item, self.masked, self.csa)


def prepare_layer(
    signs: np.ndarray, mask: np.ndarray, offset: np.ndarray, allow_unmasked: bool = True, csa: bool | None = None
) -> KernelLayer:
    """Lay out one layer for the kernel: sign/mask planes ``uint64 [n_out, W]``, offset ``int64 [n_out]``
    (``bias - popcount(mask row)``, any integer bias). ``csa``: carry-save counting (None: this CPU's
    default, :data:`bnn_core.kernel_codegen.CSA_DEFAULT`).

    A layer without zero weights gets the unmasked kernel (sign plane only); see
    :func:`bnn_core.tile_layout.layout_layer` for why it gives the same integers.
    """
    _, signs, mask, offset = _check(np.zeros((0, np.shape(signs)[-1]), np.uint64), signs, mask, offset)
    signs = signs & mask  # sign bits under a zero mask never count; clearing them lets both kernels agree
    layout = layout_layer(signs, mask, offset, allow_unmasked, CSA_DEFAULT if csa is None else csa)
    return KernelLayer(
        layout.tiles,
        layout.tile_offset,
        signs,
        mask,
        offset,
        layout.masked,
        layout.input_bits,
        layout.in_words,
        layout.csa,
    )


def preactivations(x_words: np.ndarray, signs: np.ndarray, mask: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``a[i, o] = 2 * sum_w popcount(~(x[i,w] ^ signs[o,w]) & mask[o,w]) + offset[o]`` as ``int32 [n, n_out]``.

    ``x_words uint64 [n, W]``, ``signs``/``mask uint64 [n_out, W]``, ``offset int64 [n_out]`` (``bias -
    popcount(mask row)``, see :attr:`bnn_core.packed.PackedLayer.offset`). Re-lays out the weights on every
    call (O(n_out W)); keep a :class:`KernelLayer` (:func:`prepare_layer`) for repeated calls.
    """
    x_words, signs, mask, offset = _check(x_words, signs, mask, offset)
    if not _fast():
        return preactivations_numpy(x_words, signs, mask, offset)
    return prepare_layer(signs, mask, offset).preactivations(x_words)


def forward_layer_bits(x_words: np.ndarray, signs: np.ndarray, mask: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Packed sign bits of the pre-activations: ``uint64 [n, ceil(n_out/64)]``, bit ``o`` = ``a[i, o] >= 0``.

    Same bit order as :func:`bnn_core.packed.pack_bits` (unit ``o`` in word ``o // 64``, bit ``o % 64``),
    padding bits 0: the result is the next layer's ``x_words`` directly.
    """
    x_words, signs, mask, offset = _check(x_words, signs, mask, offset)
    if not _fast():
        return forward_bits_numpy(x_words, signs, mask, offset)
    return prepare_layer(signs, mask, offset).forward_bits(x_words)


def _as_bool(bits: np.ndarray) -> np.ndarray:
    bits = np.asarray(bits)
    return bits if bits.dtype == np.bool_ else bits > 0  # +-1 (or 0/1) inputs: +1 -> True


def _bool_rows(bits: np.ndarray) -> np.ndarray:
    """Input bits as the compiled packers read them: a C-contiguous bool array (a copy only if needed)."""
    if type(bits) is np.ndarray and bits.dtype == np.bool_ and bits.flags.c_contiguous:
        return bits
    return np.ascontiguousarray(_as_bool(bits))


def pack_input_bits(bits: np.ndarray) -> np.ndarray:
    """Booleans (or +-1) ``[n, n_in]`` -> ``uint64 [n, ceil(n_in/64)]``, identical to ``pack_bits(bits > 0)``."""
    if _fast():
        rows = _bool_rows(bits)
        if rows.ndim != 2:
            raise ValueError(f"input bits must be [n, n_in], got shape {rows.shape}")
        out = np.empty((len(rows), n_words(rows.shape[1])), dtype=np.uint64)
        if _run_fast(codegen.pack_rows, rows, out):
            return out
    return pack_bits(_as_bool(bits))


@dataclass(frozen=True, eq=False)
class BitSlicedLayout:
    """A network without zero weights laid out for :func:`bnn_core.kernel_codegen.bitsliced_network`.

    Large batches only: rows go in blocks of ``BS_ROWS`` (256 or 512), one bit per row in each vector, so a
    block's input ``i`` is one vector ``X_i``. For a unit with sign bits ``s`` (``n1`` of them set), the
    disagreements of row ``r`` are ``d = n1 - T + 2 S0 = n1 + T - 2 S1``, where ``T`` counts the row's set
    input bits and ``S0`` / ``S1`` count them over the inputs whose sign bit is 0 / 1. So each unit needs a
    vertical count over the smaller of the two subsets only (at most half the inputs; ``T`` is shared by
    all units): carry-save adders over the ``X_i``, no XOR and no popcount. The hidden output is
    ``a = tile_offset - 2 d >= 0``, i.e. ``Z <= K`` with ``Z = 2 S0 - T`` (or ``T - 2 S1``) and ``K =
    floor((tile_offset - 2 n1) / 2)``, compared bit-sliced; its bit planes are the next layer's ``X``.
    """

    layers: np.ndarray  # int64 [L, 6]: n_in, n_out, first unit, all-inputs list start, its length, pieces per unit
    idx: np.ndarray  # int16: input numbers, each list padded with the zero row (number n_in)
    units: np.ndarray  # int64 [U, 5]: first row in pieces, use_ones, K, n1, tile offset
    pieces: np.ndarray  # int64 [P, 2]: start and length in idx of a unit's inputs in one BS_CHUNK range

    @classmethod
    def from_layers(cls, layers: Sequence[KernelLayer]) -> BitSlicedLayout | None:
        """The layout of :attr:`KernelNetwork.layers`, or None when a layer has zero weights
        (:attr:`KernelLayer.masked`) or more inputs than the counts can hold.

        An unmasked layer there counts all its inputs (``input_bits == n_in``: :meth:`KernelNetwork.from_packed`
        keeps the mask of a layer whose last inputs have only zero weights), and ``offset`` is ``bias - n_in``.
        A unit's list is cut into pieces at multiples of ``BS_CHUNK`` inputs: the kernel counts piece ``c``
        of every unit before piece ``c + 1``, so the input vectors one pass reads stay in L1.
        """
        if any(lay.masked or lay.input_bits > codegen.BS_MAX_INPUTS for lay in layers):
            return None
        group, chunk = codegen.BS_GROUP, codegen.BS_CHUNK
        lists: list[np.ndarray] = []
        pos = 0
        table, units, pieces = [], [], []

        def add_list(inputs: np.ndarray, n_in: int) -> tuple[int, int]:
            nonlocal pos
            padded = np.full(-(-len(inputs) // group) * group, n_in, dtype=np.int16)
            padded[: len(inputs)] = inputs
            lists.append(padded)
            pos += len(padded)
            return pos - len(padded), len(padded)

        for lay in layers:
            n_in = lay.input_bits
            bounds = np.arange(0, n_in + chunk, chunk)[1:]  # piece c: inputs below bounds[c]
            bits = np.unpackbits(lay.signs.view(np.uint8), axis=1, bitorder="little")[:, :n_in].astype(bool)
            all_start, all_len = add_list(np.arange(n_in, dtype=np.int64), n_in)
            table.append((n_in, lay.n_out, len(units), all_start, all_len, len(bounds)))
            tile_offset = lay.offset.astype(np.int64) + 2 * n_in
            for o in range(lay.n_out):
                n1 = int(bits[o].sum())
                use_ones = n1 <= n_in - n1
                inputs = np.flatnonzero(bits[o] == use_ones)
                first_piece = len(pieces)
                for part in np.split(inputs, np.searchsorted(inputs, bounds[:-1])):
                    pieces.append(add_list(part, n_in))
                # Z is within [-n_in, n_in]; a K beyond that decides the same, and keeps Z - K - 1 in range.
                k_bound = int(np.clip((int(tile_offset[o]) - 2 * n1) // 2, -n_in - 2, n_in + 1))
                units.append((first_piece, int(use_ones), k_bound, n1, int(tile_offset[o])))
        return cls(
            np.array(table, np.int64),
            np.concatenate(lists),
            np.array(units, np.int64),
            np.array(pieces, np.int64).reshape(-1, 2),
        )

    def forward_counts(self, x: np.ndarray, out: np.ndarray) -> bool:
        """Scores of C-contiguous bool rows into ``out``; False if the kernel could not run."""
        return _run_fast(codegen.bitsliced_network, x, self.layers, self.idx, self.units, self.pieces, out)


@dataclass(frozen=True, eq=False)
class KernelNetwork:
    """A :class:`PackedNetwork` in the kernel's layout, run end to end in one compiled call."""

    layers: tuple[KernelLayer, ...]
    n_in: int
    n_classes: int
    model: np.ndarray  # the model image: uint64, all layers (bnn_core.tile_layout.network_image)
    csa: bool  # carry-save counting (else vector popcount)
    word_ops_per_row: int  # 64-bit XNOR-popcount word operations per input row, over the real units

    @classmethod
    def from_packed(cls, net: PackedNetwork, csa: bool | None = None) -> KernelNetwork:
        """Lay out every layer (``csa``: carry-save counting; None: this CPU's default)."""
        csa = CSA_DEFAULT if csa is None else csa
        layers = []
        for lay in net.layers:
            fast = prepare_layer(lay.signs, lay.mask, lay.offset, csa=csa)
            if not fast.masked and fast.input_bits != lay.n_in:  # zero columns at the end: keep the mask
                fast = prepare_layer(lay.signs, lay.mask, lay.offset, allow_unmasked=False, csa=csa)
            layers.append(fast)
        layers = tuple(layers)
        for prev, nxt in itertools.pairwise(layers):
            if nxt.n_in_words != prev.n_tiles:
                raise ValueError("layer widths do not chain")
        # Inputs here come from our own packers, so bits (and padding words) past n_in are always 0, which
        # unmasked layers and carry-save layouts rely on.
        n_classes = layers[-1].n_out
        model = network_image(layers, net.n_in, n_classes)
        ops = sum(lay.n_out * lay.n_in_words for lay in layers)
        return cls(layers, net.n_in, n_classes, model, csa, ops)

    @functools.cached_property
    def bitsliced(self) -> BitSlicedLayout | None:
        """The layout for batches of ``BITSLICED_MIN_ROWS`` rows or more (None with zero weights), built on the
        first such batch: 0.1 s for 3 x 1024 units, which batch-1 users never pay."""
        return BitSlicedLayout.from_layers(self.layers) if FAST_KERNEL_AVAILABLE else None

    @property
    def meta(self) -> np.ndarray:
        """``int64 [layers, META_COLUMNS]``: the model image's per-layer table (a copy)."""
        start = codegen.HEAD_WORDS
        return (
            self.model[start : start + len(self.layers) * codegen.META_COLUMNS]
            .reshape(len(self.layers), -1)
            .astype(np.int64)
        )

    def forward_counts(self, x_bits: np.ndarray) -> np.ndarray:
        """Integer scores ``int32 [n, n_classes]`` for input bits ``[n, n_in]`` (bool, or +-1 with +1 -> True).

        Equal to :meth:`bnn_core.packed.PackedNetwork.forward_counts`. Input packing, all hidden layers
        (packed sign bits straight from the accumulators) and the output layer run in one compiled call.
        C-contiguous bool input skips every conversion (the batch-1 path: module docstring).
        """
        if type(x_bits) is np.ndarray and x_bits.dtype is _BOOL and x_bits.flags.c_contiguous:
            x = x_bits  # _bool_rows inlined: at batch 1 every Python call counts
        else:
            x = _bool_rows(x_bits)
        if x.ndim != 2 or x.shape[1] != self.n_in:
            raise ValueError(f"expected input bits [n, {self.n_in}], got shape {np.shape(x_bits)}")
        if _fast_failure is None and FAST_KERNEL_AVAILABLE:
            n = x.shape[0]
            out = np.empty((n, self.n_classes), _INT32)
            if n <= CHUNK_ROWS:
                try:  # _run_fast inlined
                    codegen.network_serial(x, self.model, out)
                    return out
                except NumbaError as exc:
                    _fall_back(exc)
            elif n >= BITSLICED_MIN_ROWS and self.bitsliced is not None:  # on any number of threads
                if self.bitsliced.forward_counts(x, out):
                    return out
            elif not _parallel_ok(n * self.word_ops_per_row):
                if _run_fast(codegen.network_serial, x, self.model, out):
                    return out
            elif _run_fast(codegen.network_parallel, x, self.model, out):
                return out
        words = pack_bits(x)
        for lay in self.layers[:-1]:
            words = lay.forward_bits(words)
        return self.layers[-1].preactivations(words)

    def predict(self, x_bits: np.ndarray) -> np.ndarray:
        """Class ids: argmax of the scores, ties to the lowest index."""
        return self.forward_counts(x_bits).argmax(axis=1)


def kernel_name() -> str:
    """Which implementation runs: the numba tile kernel (the CPU and vector ISA numba compiles for, which
    ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` can change, and the counting method) or numpy.

    The fast kernel compiles lazily; if that ever fails the name turns into ``numpy-fallback (reason)``.
    """
    if not _fast():
        return f"numpy-fallback ({_fast_failure})"
    name, features = codegen.target_cpu()
    isa = "avx512-vpopcntdq" if "avx512vpopcntdq" in features else "no-vpopcntdq"
    vector = "avx512bw" if "avx512bw" in features else ("avx2" if "avx2" in features else "no-avx2")
    if CSA_DEFAULT:
        counting = f"carry-save counting, {vector}, 1x{TILE_OUT} tiles"
    else:
        counting = f"vector popcount, {ROW_BLOCK}x{TILE_OUT} register tiles"
    bitsliced = f"bit-sliced rows from batch {BITSLICED_MIN_ROWS} without zero weights"
    return f"numba-xnor-popcount ({isa}, {name}, {counting}, {bitsliced}, {get_num_threads()} threads)"
