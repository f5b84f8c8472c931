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

Design, as measured (AVX-512 with VPOPCNTDQ, Zen 5):

- Tiles: one input word ``x[i, w]`` is broadcast to all 8 lanes of a vector, so a single ``vpternlogq``
  (XNOR-AND), ``vpopcntq`` and ``vpaddq`` advance 8 output units at once and each lane accumulates its own
  unit: no horizontal reductions, and no padding waste along the input (784 bits = 13 words, not 16).
- Unmasked layers skip the mask plane. Besides halving the weight bytes, ``vpxorq`` has a separate
  destination while ``vpternlogq`` overwrites one of its sources, which then costs a register copy per
  use: measured ~25 % faster per core.
- Register blocking: one micro-kernel call computes ``ROW_BLOCK`` rows x 64 units = 3 x 8 accumulator
  vectors that stay in registers for the whole loop over input words. Per input word it loads 8-16 weight
  vectors and 3 broadcasts for 72 ALU ops, so it is bound by the 4 vector ALU pipes rather than by loads.
  3 x 8 is the largest block that fits the 32 zmm registers (24 accumulators + 3 broadcasts + sign/mask +
  temporaries); 4 x 8 spills. 2 x 8 measured the same; 3 x 8 loads less.
- A 64-unit tile is exactly one output word, so the fused hidden-layer kernel turns its 8 lane comparisons
  (``a >= 0``) into one ``uint64`` and stores it: threads working on different tiles never share a word.
- Cache blocking: rows are taken in chunks of ``CHUNK_ROWS``; for each chunk the loop runs tile by tile so
  a weight tile (W x 0.5-1 KiB) and the chunk's inputs stay in L1 while every row of the chunk uses them.
  The network loops run all layers on one chunk before the next, so hidden activations never leave L1 and
  a whole batch costs one parallel region.

Compiled code is cached in ``__pycache__`` (``cache=True``; first compile ~10 s, later loads ~1 s, most of
it numba's own start-up).
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
ROW_BLOCK = 3  # rows per micro-kernel call (see module docstring)
CHUNK_ROWS = 96  # rows per cache block / parallel work item (multiple of ROW_BLOCK)
_MAGIC_PACK = 0x0102040810204080  # (8 bytes of 0/1) * magic >> 56 = the 8 bits, byte k -> bit k

# Columns of the per-layer table ``meta int64 [n_layers, META_COLUMNS]`` of a whole network
# (:func:`bnn_core.tile_layout.network_layout`); plain ints so compiled code indexes ``meta[li, META_TILES]``.
META_WEIGHT_START = 0  # first uint64 of the layer's tiles in the concatenated weights
META_OFFSET_START = 1  # first entry of the layer's tile offsets in the concatenated offsets
META_IN_WORDS = 2  # input words per row (W)
META_TILES = 3  # 64-unit tiles = output words per row
META_MASKED = 4  # 1: tiles hold sign and mask planes; 0: unmasked (signs only)
META_COLUMNS = 5

try:
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic
except ImportError as exc:  # pragma: no cover - exercised only where numba is missing
    UNAVAILABLE_REASON: str | None = f"numba unavailable ({exc})"
else:
    UNAVAILABLE_REASON = None
if UNAVAILABLE_REASON is None and os.environ.get("BNN_DISABLE_FAST_KERNEL", "") not in ("", "0"):
    UNAVAILABLE_REASON = "numba unavailable (BNN_DISABLE_FAST_KERNEL is set)"


if UNAVAILABLE_REASON is None:
    _I32 = ir.IntType(32)
    _I64 = ir.IntType(64)
    _V64 = ir.VectorType(_I64, LANES)
    _V32 = ir.VectorType(_I32, LANES)
    _V1 = ir.VectorType(ir.IntType(1), LANES)

    def _splat(builder, scalar):
        """Broadcast one ``i64`` to all 8 lanes."""
        undef = ir.Constant(_V64, ir.Undefined)
        first = builder.insert_element(undef, scalar, ir.Constant(_I32, 0))
        return builder.shuffle_vector(first, undef, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))

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

    def _preactivations(builder, acc_row, offs, masked: bool):
        """``a = 2 * acc + tile_offset`` (masked) or ``tile_offset - 2 * acc`` (unmasked), per lane vector."""
        one = ir.Constant(_V64, [1] * LANES)
        twice = [builder.shl(acc_row[b], one) for b in range(BLOCKS)]
        if masked:
            return [builder.add(twice[b], offs[b]) for b in range(BLOCKS)]
        return [builder.sub(offs[b], twice[b]) for b in range(BLOCKS)]

    def _store_sign_bits(builder, pre, out_row_ptr, t):
        """Output word ``t`` of the row = the 64 bits ``a >= 0`` (sign(0) = +1): lane vector ``b``'s 8
        comparisons are byte ``b``, so unit ``o`` lands on bit ``o % 64`` as in ``pack_bits``."""
        zero = ir.Constant(_V64, None)
        word = ir.Constant(_I64, 0)
        for b in range(BLOCKS):
            byte = builder.bitcast(builder.icmp_signed(">=", pre[b], zero), ir.IntType(LANES))
            shifted = builder.shl(builder.zext(byte, _I64), ir.Constant(_I64, b * LANES))
            word = builder.or_(word, shifted)
        builder.store(word, builder.gep(out_row_ptr, [t]), align=8)

    def _store_scores(builder, a: _TileArgs, pre, out_row_ptr, unit0):
        """The pre-activations as ``int32``, lanes of units ``>= n_out`` (tile padding) left unwritten."""
        masked_store = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [_V32, _V32.as_pointer(), _I32, _V1]),
            "llvm.masked.store.v8i32.p0",
        )
        lane = ir.Constant(_V64, list(range(LANES)))
        for b in range(BLOCKS):
            first = builder.add(unit0, a.const(b * LANES))
            live = builder.icmp_signed("<", lane, _splat(builder, builder.sub(a.out_cols, first)))
            ptr = _vec_ptr(builder, out_row_ptr, first, _V32)
            builder.call(masked_store, [builder.trunc(pre[b], _V32), ptr, ir.Constant(_I32, 4), live])

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
            pre = _preactivations(builder, acc_row, offs, masked)
            if bits_out:
                _store_sign_bits(builder, pre, out_row_ptr, a.t)
            else:
                _store_scores(builder, a, pre, out_row_ptr, unit0)

    def _make_tile(rows: int, masked: bool):
        """Micro-kernel ``tile(x, row, wt, t, off, out, out_row)``: rows ``row .. row+rows-1`` of ``x`` times
        tile ``t`` (64 units) of the prepared weights ``wt``, written to ``out`` rows ``out_row ..``.

        ``masked``: tiles hold sign and mask planes, ``a = 2 * popcount(~(x ^ s) & m) + off``.
        Unmasked (layers without zero weights): tiles hold signs only and ``a = off - 2 * popcount(x ^ s)``
        with ``off = bias + n_in``; input bits past ``n_in`` must be 0 (their sign bits are 0 too).
        ``out`` int32 ``[*, n_out]``: pre-activations (masked store of the lanes ``< n_out``).
        ``out`` uint64 ``[*, ceil(n_out/64)]``: word ``t`` of each row = the 64 bits ``a >= 0``.
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
                acc = _loop_over_input_words(builder, tile_args, rows, masked, tile_words)
                _epilogue(builder, tile_args, acc, masked, bits_out)
                return context.get_dummy_value()

            return sig, codegen

        return tile

    _tile_block_masked = _make_tile(ROW_BLOCK, True)
    _tile_one_masked = _make_tile(1, True)
    _tile_block_unmasked = _make_tile(ROW_BLOCK, False)
    _tile_one_unmasked = _make_tile(1, False)

    @njit(cache=True, nogil=True)
    def _block(x, r0, r1, wt, off, t0, t1, out, out_r0, masked):
        """Rows ``[r0, r1)`` of ``x`` times tiles ``[t0, t1)``; row ``r`` lands in ``out[out_r0 + r - r0]``."""
        # Tiles outer, rows inner: one weight tile stays in L1 while all rows of the chunk use it.
        for t in range(t0, t1):
            r = r0
            if masked:
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
    def layer_serial(x, wt, off, out, masked):
        """One layer, all rows on the calling thread: ``out`` int32 scores or uint64 sign bits."""
        n = x.shape[0]
        n_tiles = off.shape[0] // TILE_OUT
        for r0 in range(0, n, CHUNK_ROWS):
            _block(x, r0, min(n, r0 + CHUNK_ROWS), wt, off, 0, n_tiles, out, r0, masked)

    @njit(cache=True, parallel=True)
    def layer_parallel(x, wt, off, out, tiles_per_item, masked):
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
            _block(x, r0, min(n, r0 + CHUNK_ROWS), wt, off, t0, t1, out, r0, masked)

    @njit(cache=True, nogil=True)
    def pack_rows(groups, r0, r1, n_bytes, dest):
        """Rows ``[r0, r1)`` of ``groups`` (uint64 = 8 bool bytes each) -> packed words ``dest[r - r0]``."""
        magic = np.uint64(_MAGIC_PACK)
        shift = np.uint64(56)
        n_groups = (n_bytes + 7) // 8
        n_dest = dest.shape[1]
        for r in range(r0, r1):
            for wd in range(n_dest):
                word = np.uint64(0)
                for k in range(8):
                    g = wd * 8 + k
                    if g < n_groups:
                        word |= ((groups[r, g] * magic) >> shift) << np.uint64(8 * k)
                dest[r - r0, wd] = word

    @njit(cache=True, nogil=True)
    def _network_chunk(groups, n_bytes, r0, r1, wbuf, obuf, meta, out, buf_a, buf_b):
        """Input rows ``[r0, r1)`` through every layer; hidden activations stay packed in ``buf_a``/``buf_b``."""
        rows = r1 - r0
        n_layers = meta.shape[0]
        width = meta[0, META_IN_WORDS]
        cur = buf_a[: rows * width].reshape((rows, width))
        pack_rows(groups, r0, r1, n_bytes, cur)
        for li in range(n_layers):
            w_start, o_start = meta[li, META_WEIGHT_START], meta[li, META_OFFSET_START]
            width, n_tiles = meta[li, META_IN_WORDS], meta[li, META_TILES]
            masked = meta[li, META_MASKED] != 0
            wt = wbuf[w_start : w_start + n_tiles * width * (TILE_WORDS if masked else TILE_OUT)]
            off = obuf[o_start : o_start + n_tiles * TILE_OUT]
            if li == n_layers - 1:
                _block(cur, 0, rows, wt, off, 0, n_tiles, out, r0, masked)
            else:
                nxt_buf = buf_b if li % 2 == 0 else buf_a
                nxt = nxt_buf[: rows * n_tiles].reshape((rows, n_tiles))
                _block(cur, 0, rows, wt, off, 0, n_tiles, nxt, 0, masked)
                cur = nxt

    @njit(cache=True, nogil=True)
    def network_serial(groups, n_bytes, wbuf, obuf, meta, out):
        """Byte groups of input bits -> ``out`` int32 scores through all layers, on the calling thread."""
        n = groups.shape[0]
        max_words = meta[:, META_IN_WORDS].max()
        buf_a = np.empty(CHUNK_ROWS * max_words, np.uint64)
        buf_b = np.empty(CHUNK_ROWS * max_words, np.uint64)
        for r0 in range(0, n, CHUNK_ROWS):
            _network_chunk(groups, n_bytes, r0, min(n, r0 + CHUNK_ROWS), wbuf, obuf, meta, out, buf_a, buf_b)

    @njit(cache=True, parallel=True)
    def network_parallel(groups, n_bytes, wbuf, obuf, meta, out):
        """As :func:`network_serial`, chunks of rows in parallel: one parallel region for the whole network,
        each chunk runs all layers on one thread."""
        n = groups.shape[0]
        max_words = meta[:, META_IN_WORDS].max()
        n_chunks = (n + CHUNK_ROWS - 1) // CHUNK_ROWS
        for c in prange(n_chunks):
            r0 = c * CHUNK_ROWS
            buf_a = np.empty(CHUNK_ROWS * max_words, np.uint64)
            buf_b = np.empty(CHUNK_ROWS * max_words, np.uint64)
            _network_chunk(groups, n_bytes, r0, min(n, r0 + CHUNK_ROWS), wbuf, obuf, meta, out, buf_a, buf_b)
