"""Compiled XNOR-popcount loops: the LLVM IR tile micro-kernels (numba intrinsics) and the numba loops that
drive them over rows, tiles and layers. :mod:`bnn_core.kernels` is the public API that dispatches to them;
:mod:`bnn_core.tile_layout` prepares the weights they read.

Per unit ``o`` and packed input row ``x`` (math of :mod:`bnn_core.packed`), a tile kernel computes

    masked:    a = 2 * sum_w popcount(~(x[w] ^ s[o, w]) & m[o, w]) + tile_offset[o]
    unmasked:  a = tile_offset[o] - 2 * sum_w popcount(x[w] ^ s[o, w])      (layers without zero weights)

with ``tile_offset = bias - popcount(m)`` (masked) or ``bias + n_in`` (unmasked); see
:func:`bnn_core.tile_layout.layout_layer` for why both equal the packed engine's integer. ``bias`` is any
integer constant (a +-1 bias or a folded threshold): the lanes are int64 and the offset is one add per unit
after the loop, so the code is the same for both; scores are truncated to int32 only at the store, exact
for the offsets :func:`bnn_core.kernels.prepare_layer` accepts.

Two ways to count, chosen per target CPU (:data:`CSA_DEFAULT`, from the features numba compiles for):

- **vector popcount** (CPUs with AVX-512 VPOPCNTDQ: Ice Lake and later, Zen 4/5). One input word
  ``x[i, w]`` is broadcast to all 8 lanes of a vector, so a single ``vpternlogq`` (XNOR-AND) or ``vpxorq``,
  ``vpopcntq`` and ``vpaddq`` advance 8 output units at once and each lane accumulates its own unit: no
  horizontal reductions, and no padding waste along the input (784 bits = 13 words, not 16). Measured on
  Zen 5: register blocking of ``ROW_BLOCK`` rows x 64 units = 3 x 8 accumulator vectors that stay in
  registers for the whole loop over input words (per word 8-16 weight loads and 3 broadcasts for 72 ALU
  ops, so the 4 vector ALU pipes bound it rather than loads; 4 x 8 spills, 2 x 8 measured the same).
  Unmasked layers skip the mask plane: besides halving the weight bytes, ``vpxorq`` has a separate
  destination while ``vpternlogq`` overwrites a source and costs a register copy per use (~25 % per core).
- **carry-save counting** (every other x86: AVX-512 without VPOPCNTDQ such as Skylake-X / Cascade Lake, and
  AVX2 such as Haswell, Zen 2/3). Without ``vpopcntq`` LLVM emulates a 64-bit lane popcount with ~7 ops
  (nibble lookup with ``vpshufb``, then ``vpsadbw``), so XNOR-popcount-add costs ~10 ops per word instead
  of 3. Harley-Seal (Mula, Kurz and Lemire, "Faster population counts using AVX2 instructions", 2018)
  counts a group of ``g`` words bit-sliced instead: full adders (carry-save adders) over the ``g`` words,
  lane by lane, ``(a, b, c) -> (a ^ b ^ c, maj(a, b, c))`` (2 ``vpternlogq``, or 5 AVX2 ops), leave one
  vector per power of two, ``sum_k 2^k * c_k``, and only those ``log2(g) + 1`` vectors are counted: each
  byte's two nibbles index a table of ``2^k * popcount(nibble)`` (``vpshufb``), the bytes are added (at
  most ``8 * 31 = 248`` for ``g = 16``: no byte overflows) and one ``vpsadbw`` sums each lane's 8 bytes.
  For ``g = 16``: 16 XORs, 11 full adders and a few half adders, 5 table lookups: about 6 ops per word.
  These kernels count disagreements ``d = popcount((x ^ s) & m)`` and compute ``a = tile_offset - 2 d``
  in masked layers too (the layout adds ``2 nnz`` to the offset), since ``(x ^ s) & m`` is one
  ``vpternlogq`` with ``x`` broadcast from memory. Input words are padded with zeros to a multiple of
  ``CSA_PAD`` (weights in the layout, inputs by the packers), so every group is a full tree of
  ``CSA_GROUP`` or ``CSA_PAD`` words: zero words count 0. The loop runs over 8-unit blocks at run time, so
  the output layer (10 classes) computes 2 of its tile's 8 blocks. Measured on Cascade Lake (AVX-512BW, no
  VPOPCNTDQ, 1 core, 784-3x1024-10, batch 2000): 6.9 us per row against 11-12 us for the emulated vector
  popcount, 1.6-1.8x.

For large batches of networks without zero weights, both have a **bit-sliced** kernel
(:func:`bitsliced_network`, laid out by :class:`bnn_core.kernels.BitSlicedLayout`): rows go in blocks of
``BS_ROWS`` (one bit per row in each lane of a vector), so an input bit of the whole block is one vector,
and unit ``o``'s disagreements are ``d = n1 - T + 2 S0`` (``T`` the row's set input bits, ``S0`` those
among the inputs where ``o``'s sign bit is 0; or ``n1 + T - 2 S1``, whichever subset is smaller). A
vertical count of at most half the input vectors through carry-save adders (Harley-Seal again, about one
full adder per vector, no XOR and no popcount), a bit-sliced compare ``Z <= K`` for the sign, and the
output bit planes are the next layer's input. Measured at batch 10,000 against the tile kernels: on Cascade
Lake 1.5-2.2x (AVX-512, carry-save tiles) and 2.0-2.1x (AVX2 build); on Zen 4 1.15-1.35x over the VPOPCNTDQ
tiles (batches of 1,024 to 60,000 rows, 1 thread and 2), so it runs on every CPU. The count then went to
passes of ``BS_CHUNK`` inputs over all of a layer's units, each unit's partial planes kept between passes,
so a pass reads 32 KB of input vectors, not the 64 KB of a 1,024-input block (Zen 4, the count alone: 3.5
cycles per input from L2 against 2.0 from L1): another 1.13-1.37x on Zen 4.

Both share the tile layout and cache blocking:

- A 64-unit tile is exactly one output word, so a hidden-layer kernel turns its lane comparisons
  (``a >= 0``) into sign bits of that word: threads working on different tiles never share a word.
- Cache blocking: rows are taken in chunks of ``CHUNK_ROWS``; for each chunk the loop runs tile by tile so
  a weight tile (W x 0.5-1 KiB) and the chunk's inputs stay in L1 while every row of the chunk uses them.
  The network loops run all layers on one chunk before the next, so hidden activations never leave L1 and
  a whole batch costs one parallel region.
- A whole network is one ``uint64`` buffer, the *model image* (``HEAD_*`` header, ``META_*`` table per
  layer, tile offsets, tiles; :func:`bnn_core.tile_layout.network_image`), and the network kernels read
  bool input rows directly (64 bools -> one word with a byte compare and a mask move), so a call passes
  three arrays: numba's dispatch costs about 0.15 us per argument, which matters at batch 1 (~2 us of
  compute on an AVX-512 VPOPCNTDQ core).

Compiled code is cached in ``__pycache__`` (``cache=True``; first compile ~10-30 s, later loads ~1 s, most
of it numba's own start-up). numba keys that cache by CPU name and features, so a build for another target
(``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES``) compiles and caches its own code.
"""

from __future__ import annotations

import os

import numpy as np

# Compile-time constants: numba freezes globals into the compiled code, and its on-disk cache only notices
# edits to the file that defines the compiled functions. So everything the compiled code reads is defined
# here, not imported (an edit elsewhere would leave a stale cache that computes the old layout).
LANES = 8  # uint64 lanes in one 512-bit vector
TILE_OUT = 64  # output units per tile: one output word (bnn_core.packed.WORD_BITS)
BLOCKS = TILE_OUT // LANES  # lane vectors per tile
TILE_WORDS = 2 * TILE_OUT  # uint64 per tile and input word, masked tiles: 64 signs + 64 masks
ROW_BLOCK = 3  # rows per vector-popcount micro-kernel call (see module docstring)
CSA_GROUP = 16  # input words per carry-save tree (5 weight columns: bytes stay <= 248)
CSA_PAD = 8  # carry-save layouts pad input words to a multiple of this (a tail tree of 8 words)
CHUNK_ROWS = 96  # rows per cache block / parallel work item (multiple of ROW_BLOCK)

# The model image (one uint64 buffer per network, bnn_core.tile_layout.network_image): a header of
# HEAD_WORDS words, then META_COLUMNS words per layer, then the tile offsets (int64 bit patterns) and the
# tiles. Starts are absolute indices into the image; plain ints so compiled code reads them directly.
HEAD_LAYERS = 0  # number of layers
HEAD_N_IN = 1  # input bits per row
HEAD_CLASSES = 2  # output units of the last layer (columns of the scores)
HEAD_CSA = 3  # 1: carry-save kernels (and layouts padded to CSA_PAD words); 0: vector popcount
HEAD_MAX_WORDS = 4  # widest layer input, in words (hidden buffers are CHUNK_ROWS x this)
HEAD_WORDS = 8
META_WEIGHT_START = 0  # first uint64 of the layer's tiles
META_OFFSET_START = 1  # first word of the layer's tile offsets
META_IN_WORDS = 2  # input words per row as the kernel reads them (padded to CSA_PAD for carry-save)
META_TILES = 3  # 64-unit tiles = output words per row
META_MASKED = 4  # 1: tiles hold sign and mask planes; 0: unmasked (signs only)
META_COLUMNS = 5

try:
    from llvmlite import binding as _llvm_binding
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.core import config as _numba_config
    from numba.extending import intrinsic
except ImportError as exc:  # pragma: no cover - exercised only where numba is missing
    UNAVAILABLE_REASON: str | None = f"numba unavailable ({exc})"
else:
    UNAVAILABLE_REASON = None
if UNAVAILABLE_REASON is None and os.environ.get("BNN_DISABLE_FAST_KERNEL", "") not in ("", "0"):
    UNAVAILABLE_REASON = "numba unavailable (BNN_DISABLE_FAST_KERNEL is set)"


def target_cpu() -> tuple[str, frozenset[str]]:
    """The CPU name and the enabled features numba compiles for (the host's unless ``NUMBA_CPU_NAME`` /
    ``NUMBA_CPU_FEATURES`` say otherwise), as numba passes them to LLVM.

    With ``NUMBA_CPU_FEATURES`` set, only the features it lists with ``+`` count (the ones LLVM would add
    from the CPU name are not known here): list the vector ones (``+avx2``, ``-avx512f``, ...) explicitly.
    Note that ``NUMBA_CPU_NAME`` alone keeps the host's features, AVX-512 included.
    """
    if UNAVAILABLE_REASON is not None:
        return "none", frozenset()
    name = _numba_config.CPU_NAME or _llvm_binding.get_host_cpu_name()
    if _numba_config.CPU_FEATURES is not None:
        tokens = (t.strip() for t in _numba_config.CPU_FEATURES.split(","))
        return name, frozenset(t[1:] for t in tokens if t.startswith("+"))
    return name, frozenset(k for k, on in _llvm_binding.get_host_cpu_features().items() if on)


def _is_x86() -> bool:
    return UNAVAILABLE_REASON is None and _llvm_binding.get_process_triple().split("-")[0] in ("x86_64", "i686")


_TARGET_NAME, _TARGET_FEATURES = target_cpu()
#: Carry-save counting by default: x86 without a vector 64-bit popcount (see module docstring). Elsewhere
#: (AVX-512 VPOPCNTDQ, or ARM, whose NEON byte popcount LLVM widens cheaply) the vector popcount.
CSA_DEFAULT: bool = _is_x86() and "avx512vpopcntdq" not in _TARGET_FEATURES

# Bit-sliced batch kernel (:func:`bitsliced_network`): rows per block = 64 x lanes of one vector.
BS_LANES = LANES if "avx512f" in _TARGET_FEATURES else LANES // 2
BS_ROWS = 64 * BS_LANES
BS_GROUP = 32  # inputs per carry-save round (index lists are padded to a multiple with the zero row)
# Inputs per pass over a layer's units: a unit's list is split at multiples of this, and each pass counts one
# piece for every unit, so the input vectors one pass reads (32 KB on AVX-512, 16 KB on AVX2) stay near L1
# instead of the whole block's 64 KB. Measured on Zen 4 (784-3x1024-10, interleaved): 512 the fastest of
# 128-1,024; 128 and 256 lose more to the partial counts' round trips than they gain in L1 hits.
BS_CHUNK = 512
BS_PLANES = 12  # bit planes of a vertical count: layers of at most 4095 inputs
BS_SIGN_BITS = BS_PLANES + 3  # two's complement width of the compare (|Z - K - 1| < 2^14)
BS_MAX_INPUTS = 2**BS_PLANES - 1


if UNAVAILABLE_REASON is None:
    _I8 = ir.IntType(8)
    _I32 = ir.IntType(32)
    _I64 = ir.IntType(64)
    _V64 = ir.VectorType(_I64, LANES)
    _V32 = ir.VectorType(_I32, LANES)
    _V1 = ir.VectorType(ir.IntType(1), LANES)
    _B64 = ir.VectorType(_I8, 8 * LANES)  # the same 512 bits as 64 bytes
    _TERNLOG = "avx512f" in _TARGET_FEATURES  # 3-input logic is one vpternlogq
    _X86 = _is_x86()
    # Byte shuffle (the nibble lookup) and sum of absolute differences (the byte sum per lane) at the widest
    # width the target has, as (intrinsic, bytes per call); None: no byte shuffle, generic popcounts instead.
    if _X86 and "avx512bw" in _TARGET_FEATURES:
        _PSHUFB, _PSADBW = ("llvm.x86.avx512.pshuf.b.512", 64), ("llvm.x86.avx512.psad.bw.512", 64)
    elif _X86 and "avx2" in _TARGET_FEATURES:
        _PSHUFB, _PSADBW = ("llvm.x86.avx2.pshuf.b", 32), ("llvm.x86.avx2.psad.bw", 32)
    elif _X86 and "ssse3" in _TARGET_FEATURES:
        _PSHUFB, _PSADBW = ("llvm.x86.ssse3.pshuf.b.128", 16), ("llvm.x86.sse2.psad.bw", 16)
    else:
        _PSHUFB = _PSADBW = None

    def _splat(builder, scalar, lanes: int = LANES):
        """Broadcast one ``i64`` to all ``lanes`` lanes."""
        undef = ir.Constant(ir.VectorType(_I64, lanes), ir.Undefined)
        first = builder.insert_element(undef, scalar, ir.Constant(_I32, 0))
        return builder.shuffle_vector(first, undef, ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes))

    def _vec_ptr(builder, base, index, vec_type):
        return builder.bitcast(builder.gep(base, [index]), vec_type.as_pointer())

    class _TileArgs:
        """The micro-kernel's arguments as LLVM values: data pointers, sizes and indices."""

        def __init__(self, context, builder, signature, args):
            x_ty, _, wt_ty, _, off_ty, out_ty, _ = signature.args
            self._x_arr = context.make_array(x_ty)(context, builder, args[0])
            self.row, self.t, self.out_row = args[1], args[3], args[6]
            self.n_in_words = cgutils.unpack_tuple(builder, self._x_arr.shape, 2)[1]
            self.wt_data = context.make_array(wt_ty)(context, builder, args[2]).data
            self.off_data = context.make_array(off_ty)(context, builder, args[4]).data
            self._out_arr = context.make_array(out_ty)(context, builder, args[5])
            self.out_cols = cgutils.unpack_tuple(builder, self._out_arr.shape, 2)[1]

        # Each read loads the pointer at the builder's current position (as a numba array proxy does).
        @property
        def x_data(self):
            return self._x_arr.data

        @property
        def out_data(self):
            return self._out_arr.data

        def const(self, value: int):
            """An index-sized (intp) constant."""
            return ir.Constant(self.n_in_words.type, value)

    # ---------------------------------------------------------------------------------- vector popcount

    def _accumulate_word(builder, ctpop, xb, w_ptr, acc, masked: bool, const):
        """One input word: ``acc[r][b] + popcount(~(x[r] ^ s[b]) & m[b])`` (masked) or
        ``acc[r][b] + popcount(x[r] ^ s[b])`` (unmasked), for broadcast inputs ``xb[r]`` and the tile's
        sign (and mask) vectors at ``w_ptr``. Returns the new accumulators ``[rows][BLOCKS]``."""
        rows = len(acc)
        new = [[None] * BLOCKS for _ in range(rows)]
        for b in range(BLOCKS):
            if masked:
                s = builder.load(_vec_ptr(builder, w_ptr, const(b * 2 * LANES), _V64), align=8)
                m = builder.load(_vec_ptr(builder, w_ptr, const(b * 2 * LANES + LANES), _V64), align=8)
            else:
                s = builder.load(_vec_ptr(builder, w_ptr, const(b * LANES), _V64), align=8)
            for r in range(rows):
                # Masked: one vpternlogq. It overwrites a source, so every use but the last copies a register
                # first: why the unmasked form (3-operand vpxorq) is ~25 % faster.
                count = builder.and_(builder.not_(builder.xor(xb[r], s)), m) if masked else builder.xor(xb[r], s)
                new[r][b] = builder.add(acc[r][b], builder.call(ctpop, [count]))
        return new

    def _loop_over_input_words(builder, a: _TileArgs, rows: int, masked: bool, tile_words: int):
        """Emit ``for w in range(W): acc = _accumulate_word(...)`` with the ``rows x BLOCKS`` accumulators as
        loop-carried SSA values (phis), so they stay in registers. Leaves the builder after the loop and
        returns the final accumulators (popcount sums, ``<8 x i64>`` each)."""
        const = a.const
        ctpop_type = ir.FunctionType(_V64, [_V64])
        ctpop = cgutils.get_or_insert_function(builder.module, ctpop_type, "llvm.ctpop.v8i64")
        x_rows = [builder.gep(a.x_data, [builder.mul(builder.add(a.row, const(r)), a.n_in_words)]) for r in range(rows)]
        w_base = builder.gep(a.wt_data, [builder.mul(a.t, builder.mul(a.n_in_words, const(tile_words)))])

        preheader = builder.block
        header = builder.append_basic_block("tile.header")
        body = builder.append_basic_block("tile.body")
        done = builder.append_basic_block("tile.done")
        builder.branch(header)
        builder.position_at_end(header)
        w = builder.phi(a.n_in_words.type)
        zero = ir.Constant(_V64, None)
        acc = [[builder.phi(_V64) for _ in range(BLOCKS)] for _ in range(rows)]
        w.add_incoming(const(0), preheader)
        for acc_row in acc:
            for phi in acc_row:
                phi.add_incoming(zero, preheader)
        builder.cbranch(builder.icmp_signed("<", w, a.n_in_words), body, done)

        builder.position_at_end(body)
        xb = [_splat(builder, builder.load(builder.gep(xr, [w]))) for xr in x_rows]
        w_ptr = builder.gep(w_base, [builder.mul(w, const(tile_words))])
        new = _accumulate_word(builder, ctpop, xb, w_ptr, acc, masked, const)
        w_next = builder.add(w, const(1))
        latch = builder.block
        builder.branch(header)
        w.add_incoming(w_next, latch)
        for acc_row, new_row in zip(acc, new, strict=True):
            for phi, value in zip(acc_row, new_row, strict=True):
                phi.add_incoming(value, latch)
        builder.position_at_end(done)
        return acc

    def _preactivation(builder, acc, off, masked: bool):
        """``a = 2 * acc + tile_offset`` (masked) or ``tile_offset - 2 * acc`` (unmasked), one lane vector."""
        twice = builder.shl(acc, ir.Constant(_V64, [1] * LANES))
        return builder.add(twice, off) if masked else builder.sub(off, twice)

    def _sign_byte(builder, pre):
        """The 8 lanes' ``a >= 0`` (sign(0) = +1) as one byte, lane ``k`` -> bit ``k``."""
        return builder.bitcast(builder.icmp_signed(">=", pre, ir.Constant(_V64, None)), _I8)

    def _store_sign_bits(builder, pre, out_row_ptr, t):
        """Output word ``t`` of the row = the 64 bits ``a >= 0``: lane vector ``b``'s 8 comparisons are byte
        ``b``, so unit ``o`` lands on bit ``o % 64`` as in ``pack_bits``."""
        word = ir.Constant(_I64, 0)
        for b in range(BLOCKS):
            shifted = builder.shl(builder.zext(_sign_byte(builder, pre[b]), _I64), ir.Constant(_I64, b * LANES))
            word = builder.or_(word, shifted)
        builder.store(word, builder.gep(out_row_ptr, [t]), align=8)

    def _store_block_scores(builder, a: _TileArgs, pre, out_row_ptr, first):
        """One lane vector of pre-activations (units ``first .. first + 7``) as ``int32``; lanes of units
        ``>= n_out`` (tile padding) left unwritten."""
        masked_store = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [_V32, _V32.as_pointer(), _I32, _V1]),
            "llvm.masked.store.v8i32.p0",
        )
        lane = ir.Constant(_V64, list(range(LANES)))
        live = builder.icmp_signed("<", lane, _splat(builder, builder.sub(a.out_cols, first)))
        ptr = _vec_ptr(builder, out_row_ptr, first, _V32)
        builder.call(masked_store, [builder.trunc(pre, _V32), ptr, ir.Constant(_I32, 4), live])

    def _epilogue(builder, a: _TileArgs, acc, masked: bool, bits_out: bool):
        """Accumulators -> pre-activations -> ``out`` rows ``out_row ..``: int32 scores or packed sign bits."""
        const = a.const
        unit0 = builder.mul(a.t, const(TILE_OUT))
        offs = [
            builder.load(_vec_ptr(builder, a.off_data, builder.add(unit0, const(b * LANES)), _V64), align=8)
            for b in range(BLOCKS)
        ]
        for r, acc_row in enumerate(acc):
            out_row_ptr = builder.gep(a.out_data, [builder.mul(builder.add(a.out_row, const(r)), a.out_cols)])
            pre = [_preactivation(builder, acc_row[b], offs[b], masked) for b in range(BLOCKS)]
            if bits_out:
                _store_sign_bits(builder, pre, out_row_ptr, a.t)
            else:
                for b in range(BLOCKS):
                    _store_block_scores(builder, a, pre[b], out_row_ptr, builder.add(unit0, const(b * LANES)))

    # ------------------------------------------------------------------------------- carry-save counting

    def _ternlog(builder, a, b, c, imm: int):
        """``vpternlogq``: any 3-input bitwise function, ``imm`` its truth table (bit ``4a + 2b + c``)."""
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V64, [_V64, _V64, _V64, _I32]), "llvm.x86.avx512.pternlog.q.512"
        )
        return builder.call(fn, [a, b, c, ir.Constant(_I32, imm)])

    def _full_adder(builder, a, b, c):
        """``(a ^ b ^ c, maj(a, b, c))`` lane-wise: the sum bit and the carry (weight x2) of 3 inputs."""
        if _TERNLOG:
            # One vpternlogq each (0x96 = xor3, 0xE8 = majority), called directly: LLVM's own matcher
            # splits the majority's nested and/or into two.
            return _ternlog(builder, a, b, c, 0x96), _ternlog(builder, a, b, c, 0xE8)
        u = builder.xor(a, b)  # AVX2: share a ^ b, 5 ops
        return builder.xor(u, c), builder.or_(builder.and_(a, b), builder.and_(u, c))

    class _CarrySaveCounter:
        """Bit-sliced counter of weight-1 vectors, reduced as they arrive (Harley-Seal order): ``cols[k]``
        holds vectors of weight ``2^k``, and a column that reaches 3 gets a full adder at once (sum stays,
        carry moves up). So at most 2 vectors per column are live: the tree for 16 words and 2 rows fits
        the 32 vector registers next to the weights (emitting all leaves first made LLVM spill)."""

        def __init__(self, builder):
            self.builder = builder
            self.cols: list[list] = []

        def add(self, vector, k: int = 0) -> None:
            while len(self.cols) <= k:
                self.cols.append([])
            col = self.cols[k]
            col.append(vector)
            if len(col) == 3:
                total, carry = _full_adder(self.builder, *col)
                col[:] = [total]
                self.add(carry, k + 1)

        def _settle(self) -> None:
            """Leave at most one vector per column: a column left with 2 gets a half adder (2 ops, cheaper
            than another popcount or plane)."""
            k = 0
            while k < len(self.cols):
                col = self.cols[k]
                if len(col) == 2:
                    a, b = col
                    col[:] = [self.builder.xor(a, b)]
                    self.add(self.builder.and_(a, b), k + 1)
                k += 1

        def columns(self) -> list:
            """One vector per weight: ``sum(popcount(added)) = sum_k 2^k * popcount(columns[k])``."""
            self._settle()
            return [col[0] for col in self.cols if col]

        def planes(self, n: int, zero) -> list:
            """The count's bits ``0 .. n - 1`` by weight (``zero`` for an empty column); higher columns are
            dropped (the caller knows the count stays under ``2^n``)."""
            self._settle()
            return [self.cols[k][0] if k < len(self.cols) and self.cols[k] else zero for k in range(n)]

    def _pieces(builder, vector, width: int) -> list:
        """Split ``<64 x i8>`` into ``<width x i8>`` parts (one per intrinsic call at that width)."""
        if width == 8 * LANES:
            return [vector]
        undef = ir.Constant(_B64, ir.Undefined)
        return [
            builder.shuffle_vector(vector, undef, ir.Constant(ir.VectorType(_I32, width), list(range(p, p + width))))
            for p in range(0, 8 * LANES, width)
        ]

    def _concat(builder, parts: list):
        """Inverse of :func:`_pieces` (any element type): concatenate equal vectors pairwise."""
        while len(parts) > 1:
            n = parts[0].type.count
            mask = ir.Constant(ir.VectorType(_I32, 2 * n), list(range(2 * n)))
            parts = [builder.shuffle_vector(parts[i], parts[i + 1], mask) for i in range(0, len(parts), 2)]
        return parts[0]

    def _x86_call(builder, spec, out_type, *operands):
        """Intrinsic ``spec = (name, bytes)`` applied piece by piece to ``<64 x i8>`` operands, concatenated."""
        name, width = spec
        part = ir.VectorType(_I8, width)
        out_part = ir.VectorType(out_type.element, out_type.count * width // (8 * LANES))
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(out_part, [part] * len(operands)), name)
        split = [_pieces(builder, op, width) for op in operands]
        return _concat(builder, [builder.call(fn, list(args)) for args in zip(*split, strict=True)])

    def _weighted_popcount(builder, cols):
        """``sum_k 2^k * popcount(cols[k])`` per 64-bit lane, ``<8 x i64>``.

        x86: per column the two nibbles of every byte index a 16-entry table of ``2^k * popcount(nibble)``
        (``vpshufb``), the looked-up bytes are added (at most ``8 * (2^5 - 1) = 248`` over 5 columns: no byte
        overflows), then one ``vpsadbw`` sums each lane's 8 bytes. The weight sits in the table, so there is
        no shift: LLVM turns a doubling of bytes into a word shift and a mask. Elsewhere: 64-bit popcounts,
        shifted and added.
        """
        if _PSHUFB is None:
            ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V64, [_V64]), "llvm.ctpop.v8i64")
            total = None
            for k, col in enumerate(cols):
                count = builder.shl(builder.call(ctpop, [col]), ir.Constant(_V64, [k] * LANES))
                total = count if total is None else builder.add(total, count)
            return total
        low_nibbles = ir.Constant(_B64, [0x0F] * (8 * LANES))
        four = ir.Constant(_V64, [4] * LANES)
        total = None
        for k, col in enumerate(cols):
            table = ir.Constant(_B64, [(1 << k) * (i & 15).bit_count() for i in range(8 * LANES)])
            low = builder.and_(builder.bitcast(col, _B64), low_nibbles)
            high = builder.and_(builder.bitcast(builder.lshr(col, four), _B64), low_nibbles)
            for nibbles in (low, high):
                count = _x86_call(builder, _PSHUFB, _B64, table, nibbles)
                total = count if total is None else builder.add(total, count)
        return _x86_call(builder, _PSADBW, _V64, total, ir.Constant(_B64, None))

    def _emit_loop(builder, name: str, start, carried, cond, body):
        """``i = start; while cond(i): carried = body(i, carried); i = next`` with loop-carried SSA values.

        ``body(i, carried)`` returns ``(next_i, new_carried)``. Leaves the builder after the loop and returns
        ``(i, carried)`` as they are when ``cond`` fails."""
        preheader = builder.block
        header = builder.append_basic_block(f"{name}.header")
        loop_body = builder.append_basic_block(f"{name}.body")
        done = builder.append_basic_block(f"{name}.done")
        builder.branch(header)
        builder.position_at_end(header)
        i = builder.phi(start.type)
        i.add_incoming(start, preheader)
        phis = [builder.phi(value.type) for value in carried]
        for phi, value in zip(phis, carried, strict=True):
            phi.add_incoming(value, preheader)
        builder.cbranch(cond(i), loop_body, done)
        builder.position_at_end(loop_body)
        i_next, new = body(i, phis)
        latch = builder.block
        builder.branch(header)
        i.add_incoming(i_next, latch)
        for phi, value in zip(phis, new, strict=True):
            phi.add_incoming(value, latch)
        builder.position_at_end(done)
        return i, phis

    def _csa_group(builder, a: _TileArgs, x_rows, w_ptr_b, w0, n_words: int, masked: bool, tile_words: int):
        """Disagreement counts of one group of ``n_words`` input words (from ``w0``) for every row, ``<8 x
        i64>`` each: the words ``(x ^ s) & m`` (or ``x ^ s`` unmasked) go through a carry-save counter."""
        const = a.const
        counters = [_CarrySaveCounter(builder) for _ in x_rows]
        for j in range(n_words):
            w = builder.add(w0, const(j))
            ptr = builder.gep(w_ptr_b, [builder.mul(w, const(tile_words))])
            s = builder.load(_vec_ptr(builder, ptr, const(0), _V64), align=8)
            m = builder.load(_vec_ptr(builder, ptr, const(LANES), _V64), align=8) if masked else None
            for xr, counter in zip(x_rows, counters, strict=True):
                # Broadcast straight from memory: LLVM folds the load into vpxorq / vpternlogq {1to8}.
                xb = _splat(builder, builder.load(builder.gep(xr, [w])))
                counter.add(builder.and_(builder.xor(xb, s), m) if masked else builder.xor(xb, s))
        return [_weighted_popcount(builder, counter.columns()) for counter in counters]

    def _csa_tile_body(builder, a: _TileArgs, rows: int, masked: bool, bits_out: bool):
        """For each live 8-unit block ``b`` of tile ``t``: groups of ``CSA_GROUP`` words, then a tail group
        of ``CSA_PAD`` (W is a multiple of ``CSA_PAD``), then that block's pre-activations are stored."""
        const = a.const
        tile_words = TILE_WORDS if masked else TILE_OUT
        planes = 2 if masked else 1
        width = a.n_in_words
        x_rows = [builder.gep(a.x_data, [builder.mul(builder.add(a.row, const(r)), width)]) for r in range(rows)]
        w_base = builder.gep(a.wt_data, [builder.mul(a.t, builder.mul(width, const(tile_words)))])
        unit0 = builder.mul(a.t, const(TILE_OUT))
        if bits_out:
            n_blocks = const(BLOCKS)  # padding units' bits must be written (as 0): all blocks
        else:  # scores: only the blocks holding real units (the output layer's 10 classes: 2 of 8)
            live = builder.sdiv(builder.add(builder.sub(a.out_cols, unit0), const(LANES - 1)), const(LANES))
            n_blocks = builder.select(builder.icmp_signed("<", live, const(BLOCKS)), live, const(BLOCKS))
        out_rows = [
            builder.gep(a.out_data, [builder.mul(builder.add(a.out_row, const(r)), a.out_cols)]) for r in range(rows)
        ]
        zero = ir.Constant(_V64, None)

        def block(b, _):
            w_ptr_b = builder.gep(w_base, [builder.mul(b, const(planes * LANES))])

            def group(w, acc):
                counts = _csa_group(builder, a, x_rows, w_ptr_b, w, CSA_GROUP, masked, tile_words)
                return builder.add(w, const(CSA_GROUP)), [builder.add(x, c) for x, c in zip(acc, counts, strict=True)]

            def more(w):
                return builder.icmp_signed("<=", builder.add(w, const(CSA_GROUP)), width)

            w_end, acc = _emit_loop(builder, "csa.groups", const(0), [zero] * rows, more, group)
            before_tail = builder.block
            with builder.if_then(builder.icmp_signed("<", w_end, width)):
                counts = _csa_group(builder, a, x_rows, w_ptr_b, w_end, CSA_PAD, masked, tile_words)
                tail_acc = [builder.add(x, c) for x, c in zip(acc, counts, strict=True)]
                tail_block = builder.block
            merged = []
            for x, y in zip(acc, tail_acc, strict=True):
                phi = builder.phi(_V64)
                phi.add_incoming(x, before_tail)
                phi.add_incoming(y, tail_block)
                merged.append(phi)
            first = builder.add(unit0, builder.mul(b, const(LANES)))
            off = builder.load(_vec_ptr(builder, a.off_data, first, _V64), align=8)
            for r in range(rows):
                # Disagreements, masked or not: a = tile_offset - 2 d (tile_layout.layout_layer, csa).
                pre = _preactivation(builder, merged[r], off, False)
                if bits_out:  # byte b of output word t: units 64 t + 8 b .. + 7
                    word_ptr = builder.bitcast(builder.gep(out_rows[r], [a.t]), _I8.as_pointer())
                    builder.store(_sign_byte(builder, pre), builder.gep(word_ptr, [b]), align=1)
                else:
                    _store_block_scores(builder, a, pre, out_rows[r], first)
            return builder.add(b, const(1)), []

        _emit_loop(builder, "csa.blocks", const(0), [], lambda b: builder.icmp_signed("<", b, n_blocks), block)

    def _make_tile(rows: int, masked: bool, csa: bool):
        """Micro-kernel ``tile(x, row, wt, t, off, out, out_row)``: rows ``row .. row+rows-1`` of ``x`` times
        tile ``t`` (64 units) of the prepared weights ``wt``, written to ``out`` rows ``out_row ..``.

        ``masked``: tiles hold sign and mask planes, ``a = 2 * popcount(~(x ^ s) & m) + off``.
        Unmasked (layers without zero weights): tiles hold signs only and ``a = off - 2 * popcount(x ^ s)``
        with ``off = bias + n_in``; input bits past ``n_in`` must be 0 (their sign bits are 0 too).
        ``csa``: carry-save counting, ``x``'s row width (= the layout's input words) a multiple of
        ``CSA_PAD``; otherwise the vector popcount over any width.
        ``out`` int32 ``[*, n_out]``: pre-activations (masked store of the lanes ``< n_out``).
        ``out`` uint64 ``[*, ceil(n_out/64)]`` or wider: word ``t`` of each row = the 64 bits ``a >= 0``.
        Written as LLVM IR so the 8-lane accumulators are SSA values that live in registers across the
        loop over input words (numba's own loops would keep them in memory or reduce horizontally).
        """
        tile_words = TILE_WORDS if masked else TILE_OUT

        @intrinsic
        def tile(typingctx, x, row, wt, t, off, out, out_row):
            if not (isinstance(out, types.Array) and out.dtype in (types.int32, types.uint64)):
                return None
            bits_out = out.dtype == types.uint64
            sig = types.void(x, row, wt, t, off, out, out_row)

            def codegen(context, builder, signature, args):
                tile_args = _TileArgs(context, builder, signature, args)
                if csa:
                    _csa_tile_body(builder, tile_args, rows, masked, bits_out)
                else:
                    acc = _loop_over_input_words(builder, tile_args, rows, masked, tile_words)
                    _epilogue(builder, tile_args, acc, masked, bits_out)
                return context.get_dummy_value()

            return sig, codegen

        return tile

    _tile_block_masked = _make_tile(ROW_BLOCK, True, False)
    _tile_one_masked = _make_tile(1, True, False)
    _tile_block_unmasked = _make_tile(ROW_BLOCK, False, False)
    _tile_one_unmasked = _make_tile(1, False, False)
    # Carry-save: one row per call. 1, 2 and 3 rows measured the same (Cascade Lake, 1 core: the weights
    # come from L1 either way and the ALU ops per row do not change), and one variant compiles faster.
    _csa_masked = _make_tile(1, True, True)
    _csa_unmasked = _make_tile(1, False, True)

    @intrinsic
    def _bits64(typingctx, x, row, col):
        """Bools ``x[row, col : col + 64]`` (C-contiguous, one byte each) -> one word, bool ``k`` -> bit ``k``:
        a 64-byte load, a compare with 0 and a mask move (vptestmb + kmovq, or two vpmovmskb on AVX2)."""
        if not (isinstance(x, types.Array) and x.dtype == types.boolean and x.layout == "C" and x.ndim == 2):
            return None
        sig = types.uint64(x, row, col)

        def codegen(context, builder, signature, args):
            arr = context.make_array(signature.args[0])(context, builder, args[0])
            n_cols = cgutils.unpack_tuple(builder, arr.shape, 2)[1]
            data = builder.bitcast(arr.data, _I8.as_pointer())
            start = builder.add(builder.mul(args[1], n_cols), args[2])
            vec = builder.load(builder.bitcast(builder.gep(data, [start]), _B64.as_pointer()), align=1)
            nonzero = builder.icmp_unsigned("!=", vec, ir.Constant(_B64, None))
            return builder.bitcast(nonzero, _I64)

        return sig, codegen

    @njit(cache=True, nogil=True)
    def _block(x, r0, r1, wt, off, t0, t1, out, out_r0, masked, csa):
        """Rows ``[r0, r1)`` of ``x`` times tiles ``[t0, t1)``; row ``r`` lands in ``out[out_r0 + r - r0]``."""
        # Tiles outer, rows inner: one weight tile stays in L1 while all rows of the chunk use it.
        for t in range(t0, t1):
            r = r0
            if csa:
                if masked:
                    while r < r1:
                        _csa_masked(x, r, wt, t, off, out, out_r0 + r - r0)
                        r += 1
                else:
                    while r < r1:
                        _csa_unmasked(x, r, wt, t, off, out, out_r0 + r - r0)
                        r += 1
            elif masked:
                while r + ROW_BLOCK <= r1:
                    _tile_block_masked(x, r, wt, t, off, out, out_r0 + r - r0)
                    r += ROW_BLOCK
                while r < r1:
                    _tile_one_masked(x, r, wt, t, off, out, out_r0 + r - r0)
                    r += 1
            else:
                while r + ROW_BLOCK <= r1:
                    _tile_block_unmasked(x, r, wt, t, off, out, out_r0 + r - r0)
                    r += ROW_BLOCK
                while r < r1:
                    _tile_one_unmasked(x, r, wt, t, off, out, out_r0 + r - r0)
                    r += 1

    @njit(cache=True, nogil=True)
    def layer_serial(x, wt, off, out, masked, csa):
        """One layer, all rows on the calling thread: ``out`` int32 scores or uint64 sign bits."""
        n = x.shape[0]
        n_tiles = off.shape[0] // TILE_OUT
        for r0 in range(0, n, CHUNK_ROWS):
            _block(x, r0, min(n, r0 + CHUNK_ROWS), wt, off, 0, n_tiles, out, r0, masked, csa)

    @njit(cache=True, parallel=True)
    def layer_parallel(x, wt, off, out, tiles_per_item, masked, csa):
        """Work items = (chunk of rows) x (group of ``tiles_per_item`` tiles), handed out dynamically.

        Many rows: ``tiles_per_item = n_tiles`` (rows in parallel, each chunk reuses every weight tile).
        Few rows: ``tiles_per_item = 1`` (output units in parallel). Items never share an output word.
        """
        n = x.shape[0]
        n_tiles = off.shape[0] // TILE_OUT
        n_groups = (n_tiles + tiles_per_item - 1) // tiles_per_item
        n_items = (n + CHUNK_ROWS - 1) // CHUNK_ROWS * n_groups
        for item in prange(n_items):
            r0 = item // n_groups * CHUNK_ROWS
            t0 = item % n_groups * tiles_per_item
            t1 = min(n_tiles, t0 + tiles_per_item)
            _block(x, r0, min(n, r0 + CHUNK_ROWS), wt, off, t0, t1, out, r0, masked, csa)

    @njit(cache=True, nogil=True)
    def _pack_row(x, r, dest, dest_row):
        """Bools ``x[r]`` -> packed words ``dest[dest_row]`` (bit order of ``pack_bits``); words past the
        input's are zeroed (the padding the carry-save layouts and unmasked layers rely on)."""
        n_in = x.shape[1]
        full = n_in // 64
        for k in range(full):
            dest[dest_row, k] = _bits64(x, r, 64 * k)
        k = full
        if 64 * full < n_in:
            word = np.uint64(0)
            for j in range(n_in - 64 * full):
                if x[r, 64 * full + j]:
                    word |= np.uint64(1) << np.uint64(j)
            dest[dest_row, k] = word
            k += 1
        for kk in range(k, dest.shape[1]):
            dest[dest_row, kk] = 0

    @njit(cache=True, nogil=True)
    def pack_rows(x, dest):
        """Bools ``x [n, n_in]`` (C-contiguous) -> ``dest uint64 [n, >= ceil(n_in / 64)]``, zero padded."""
        for r in range(x.shape[0]):
            _pack_row(x, r, dest, r)

    @njit(cache=True, nogil=True)
    def _meta(model, li, col):
        return np.int64(model[HEAD_WORDS + li * META_COLUMNS + col])

    @njit(cache=True, nogil=True)
    def _network_chunk(x, r0, r1, model, out, buf_a, buf_b):
        """Input rows ``[r0, r1)`` through every layer; hidden activations stay packed in ``buf_a``/``buf_b``."""
        rows = r1 - r0
        n_layers = np.int64(model[HEAD_LAYERS])
        csa = model[HEAD_CSA] != 0
        width = _meta(model, 0, META_IN_WORDS)
        cur = buf_a[: rows * width].reshape((rows, width))
        for r in range(rows):
            _pack_row(x, r0 + r, cur, r)
        for li in range(n_layers):
            w_start, o_start = _meta(model, li, META_WEIGHT_START), _meta(model, li, META_OFFSET_START)
            n_tiles = _meta(model, li, META_TILES)
            masked = _meta(model, li, META_MASKED) != 0
            wt = model[w_start : w_start + n_tiles * width * (TILE_WORDS if masked else TILE_OUT)]
            off = model[o_start : o_start + n_tiles * TILE_OUT]
            if li == n_layers - 1:
                _block(cur, 0, rows, wt, off, 0, n_tiles, out, r0, masked, csa)
            else:
                nxt_width = _meta(model, li + 1, META_IN_WORDS)
                nxt_buf = buf_b if li % 2 == 0 else buf_a
                nxt = nxt_buf[: rows * nxt_width].reshape((rows, nxt_width))
                for r in range(rows):  # padding words of the next layer's input (carry-save layouts)
                    for k in range(n_tiles, nxt_width):
                        nxt[r, k] = 0
                _block(cur, 0, rows, wt, off, 0, n_tiles, nxt, 0, masked, csa)
                cur = nxt
                width = nxt_width

    @njit(cache=True, nogil=True)
    def network_serial(x, model, out):
        """Bools ``x [n, n_in]`` -> ``out`` int32 scores ``[n, n_classes]`` through all layers of the model
        image, on the calling thread (the batch-1 path: buffers sized to the batch, no parallel region)."""
        n = x.shape[0]
        size = min(n, CHUNK_ROWS) * np.int64(model[HEAD_MAX_WORDS])
        buf_a = np.empty(size, np.uint64)
        buf_b = np.empty(size, np.uint64)
        for r0 in range(0, n, CHUNK_ROWS):
            _network_chunk(x, r0, min(n, r0 + CHUNK_ROWS), model, out, buf_a, buf_b)

    @njit(cache=True, parallel=True)
    def network_parallel(x, model, out):
        """As :func:`network_serial`, chunks of rows in parallel: one parallel region for the whole network,
        each chunk runs all layers on one thread."""
        n = x.shape[0]
        size = CHUNK_ROWS * np.int64(model[HEAD_MAX_WORDS])
        n_chunks = (n + CHUNK_ROWS - 1) // CHUNK_ROWS
        for c in prange(n_chunks):
            r0 = c * CHUNK_ROWS
            buf_a = np.empty(size, np.uint64)
            buf_b = np.empty(size, np.uint64)
            _network_chunk(x, r0, min(n, r0 + CHUNK_ROWS), model, out, buf_a, buf_b)

    # ------------------------------------------------------------------------ bit-sliced batch kernel

    _BS_VEC = ir.VectorType(_I64, BS_LANES)

    def _bs_vector(builder, data, k):
        """Pointer to vector ``k`` (an ``i64``; ``BS_LANES`` words, 8-byte aligned) of a uint64 array's data:
        plane ``k`` of a count, or row ``k`` of a block's bit-sliced input or output."""
        ptr = builder.gep(data, [builder.mul(k, ir.Constant(_I64, BS_LANES))])
        return builder.bitcast(ptr, _BS_VEC.as_pointer())

    @intrinsic
    def _bs_count(typingctx, x, idx, start, n, planes, accumulate):
        """Vertical count: ``planes[k]`` = bit ``k`` of, per row (bit of a lane), the number of the rows of
        ``x`` listed in ``idx[start : start + n]`` (int16 row numbers of ``x``, 2 bytes each so the lists
        stream from cache; ``n`` a multiple of ``BS_GROUP``) that have that row's bit set, plus the count
        already in ``planes`` if ``accumulate``. Each round feeds the running planes and ``BS_GROUP`` new
        vectors to one carry-save counter: about one full adder per input, no popcount at all."""
        sig = types.void(x, idx, start, n, planes, accumulate)

        def codegen(context, builder, signature, args):
            x_ty, idx_ty, _, _, planes_ty, _ = signature.args
            x_data = context.make_array(x_ty)(context, builder, args[0]).data
            idx_data = context.make_array(idx_ty)(context, builder, args[1]).data
            out_data = context.make_array(planes_ty)(context, builder, args[4]).data
            start, n = args[2], args[3]
            end = builder.add(start, n)
            zero = ir.Constant(_BS_VEC, None)
            keep = builder.icmp_signed("!=", args[5], ir.Constant(args[5].type, 0))
            first = [
                builder.select(keep, builder.load(_bs_vector(builder, out_data, ir.Constant(_I64, k)), align=8), zero)
                for k in range(BS_PLANES)
            ]

            def round_(g, acc):
                counter = _CarrySaveCounter(builder)
                for k, plane in enumerate(acc):
                    counter.add(plane, k)
                for j in range(BS_GROUP):
                    index = builder.load(builder.gep(idx_data, [builder.add(g, ir.Constant(g.type, j))]))
                    counter.add(builder.load(_bs_vector(builder, x_data, builder.sext(index, _I64)), align=8))
                return builder.add(g, ir.Constant(g.type, BS_GROUP)), counter.planes(BS_PLANES, zero)

            _, acc = _emit_loop(builder, "bs.rounds", start, first, lambda g: builder.icmp_signed("<", g, end), round_)
            for k, plane in enumerate(acc):
                builder.store(plane, _bs_vector(builder, out_data, ir.Constant(_I64, k)), align=8)
            return context.get_dummy_value()

        return sig, codegen

    def _bs_add(builder, a, b, carry):
        """One bit position of a bit-sliced addition: ``(sum, carry out)``."""
        u = builder.xor(a, b)
        return builder.xor(u, carry), builder.or_(builder.and_(a, b), builder.and_(u, carry))

    @intrinsic
    def _bs_sign(typingctx, s_planes, t_planes, use_ones, k_bound, out, u):
        """``out[u]`` = per row ``Z <= K``: ``Z = 2 S - T`` (``use_ones`` 0) or ``T - 2 S`` (1), from the
        unit's subset count ``S`` and the rows' total ``T`` (bit planes), computed as the sign of
        ``Z - K - 1`` in ``BS_SIGN_BITS``-bit two's complement, plane by plane (bit-sliced adders)."""
        sig = types.void(s_planes, t_planes, use_ones, k_bound, out, u)

        def codegen(context, builder, signature, args):
            s_ty, t_ty, _, _, out_ty, _ = signature.args
            s_data = context.make_array(s_ty)(context, builder, args[0]).data
            t_data = context.make_array(t_ty)(context, builder, args[1]).data
            out_data = context.make_array(out_ty)(context, builder, args[4]).data
            zero = ir.Constant(_BS_VEC, None)
            ones = ir.Constant(_BS_VEC, [-1] * BS_LANES)

            def plane(data, k):
                if k < 0 or k >= BS_PLANES:
                    return zero
                return builder.load(_bs_vector(builder, data, ir.Constant(_I64, k)), align=8)

            pick_t = _splat(builder, builder.sub(ir.Constant(_I64, 0), args[2]), BS_LANES)  # all ones: use_ones
            carry, z = ones, []  # Z = A + ~B + 1
            for k in range(BS_SIGN_BITS):
                twice_s, t = plane(s_data, k - 1), plane(t_data, k)
                a = builder.or_(builder.and_(t, pick_t), builder.and_(twice_s, builder.not_(pick_t)))
                b = builder.or_(builder.and_(twice_s, pick_t), builder.and_(t, builder.not_(pick_t)))
                bit, carry = _bs_add(builder, a, builder.not_(b), carry)
                z.append(bit)
            minus = builder.sub(ir.Constant(_I64, -1), args[3])  # -(K + 1)
            carry, bit = zero, zero
            for k in range(BS_SIGN_BITS):
                c_bit = builder.and_(builder.lshr(minus, ir.Constant(_I64, k)), ir.Constant(_I64, 1))
                cb = _splat(builder, builder.sub(ir.Constant(_I64, 0), c_bit), BS_LANES)
                bit, carry = _bs_add(builder, z[k], cb, carry)
            builder.store(bit, _bs_vector(builder, out_data, args[5]), align=8)
            return context.get_dummy_value()

        return sig, codegen

    @njit(cache=True, nogil=True)
    def _transpose64(a):
        """In place: ``a[c]`` bit ``b`` <- ``a[b]`` bit ``c`` (64 x 64 bits; swaps of ever smaller blocks,
        Warren, "Hacker's Delight", 2nd ed., section 7-3)."""
        j = 32
        m = np.uint64(0x00000000FFFFFFFF)
        while j != 0:
            k = 0
            while k < 64:
                t = ((a[k] >> np.uint64(j)) ^ a[k + j]) & m
                a[k + j] ^= t
                a[k] ^= t << np.uint64(j)
                k = (k + j + 1) & ~j
            j >>= 1
            m ^= m << np.uint64(j)

    @njit(cache=True, nogil=True)
    def _bs_transpose(x, r0, r1, dest):
        """Bool rows ``x[r0:r1]`` -> ``dest[i, w]`` bit ``b`` = ``x[r0 + 64 w + b, i]`` (rows past ``r1``
        and ``dest``'s last row stay 0): rows packed 64 bools at a time, then 64 x 64 bit transposes."""
        n_in = x.shape[1]
        n_words = (n_in + 63) // 64
        packed = np.zeros((64, n_words), np.uint64)
        block = np.empty(64, np.uint64)
        for w in range((r1 - r0 + 63) // 64):
            rows = min(64, r1 - r0 - 64 * w)
            for b in range(rows):
                _pack_row(x, r0 + 64 * w + b, packed, b)
            for b in range(rows, 64):
                for j in range(n_words):
                    packed[b, j] = 0
            for j in range(n_words):
                for b in range(64):
                    block[b] = packed[b, j]
                _transpose64(block)
                for c in range(min(64, n_in - 64 * j)):
                    dest[64 * j + c, w] = block[c]

    @njit(cache=True, nogil=True)
    def _bs_plane_value(planes, r):
        value = 0
        for k in range(BS_PLANES):
            value |= np.int64((planes[k, r >> 6] >> np.uint64(r & 63)) & np.uint64(1)) << k
        return value

    @njit(cache=True, nogil=True)
    def _bs_block(x, r0, r1, layers, idx, units, pieces, out):
        """Rows ``[r0, r1)`` (at most ``BS_ROWS``) through every layer, bit-sliced (:func:`bitsliced_network`)."""
        cur = np.zeros((x.shape[1] + 1, BS_LANES), np.uint64)  # + the zero row the index lists pad with
        _bs_transpose(x, r0, r1, cur)
        t_planes = np.empty((BS_PLANES, BS_LANES), np.uint64)
        s_planes = np.empty((np.int64(layers[:, 1].max()), BS_PLANES, BS_LANES), np.uint64)
        n_layers = layers.shape[0]
        for li in range(n_layers):
            n_out, u0, all_start, all_len = layers[li, 1], layers[li, 2], layers[li, 3], layers[li, 4]
            n_pieces = layers[li, 5]
            _bs_count(cur, idx, all_start, all_len, t_planes, 0)
            # Piece by piece over all units, so a pass reads at most BS_CHUNK input vectors.
            for c in range(n_pieces):
                for u in range(n_out):
                    p = units[u0 + u, 0] + c
                    _bs_count(cur, idx, pieces[p, 0], pieces[p, 1], s_planes[u], c)
            if li < n_layers - 1:
                nxt = np.zeros((n_out + 1, BS_LANES), np.uint64)
                for u in range(n_out):
                    _bs_sign(s_planes[u], t_planes, units[u0 + u, 1], units[u0 + u, 2], nxt, u)
                cur = nxt
            else:
                for u in range(n_out):
                    use_ones, n1, offset = units[u0 + u, 1], units[u0 + u, 3], units[u0 + u, 4]
                    for r in range(r1 - r0):
                        s, t = _bs_plane_value(s_planes[u], r), _bs_plane_value(t_planes, r)
                        d = n1 + t - 2 * s if use_ones else n1 - t + 2 * s
                        out[r0 + r, u] = offset - 2 * d

    @njit(cache=True, parallel=True)
    def bitsliced_network(x, layers, idx, units, pieces, out):
        """Bools ``x [n, n_in]`` -> int32 scores ``out [n, n_classes]``, blocks of ``BS_ROWS`` rows in
        parallel. ``layers int64 [L, 6]``: n_in, n_out, first unit, start and length of the all-inputs list,
        pieces per unit; ``units int64 [U, 5]``: the unit's first row of ``pieces``, use_ones, K, n1, tile
        offset; ``pieces int64 [P, 2]``: start and length in ``idx`` of one piece of a unit's list (its
        inputs in ``[c BS_CHUNK, (c + 1) BS_CHUNK)``); ``idx``: the lists (row numbers of the block's
        bit-sliced input, zero-row padded)."""
        n = x.shape[0]
        n_blocks = (n + BS_ROWS - 1) // BS_ROWS
        for b in prange(n_blocks):
            r0 = b * BS_ROWS
            _bs_block(x, r0, min(n, r0 + BS_ROWS), layers, idx, units, pieces, out)
