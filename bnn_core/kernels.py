"""Fast XNOR-popcount kernels for packed bitwise layers (the fast twin of :mod:`bnn_core.packed`).

Encoding and math are those of :mod:`bnn_core.packed`: bit 1 = +1, bit 0 = -1, feature ``j`` in word
``j // 64``, bit ``j % 64``; a ternary weight row is a sign plane ``s`` and a nonzero mask ``m``. For
packed inputs ``x [n, W]`` the integer pre-activation of unit ``o`` is

    a[i, o] = 2 * sum_w popcount(~(x[i, w] ^ s[o, w]) & m[o, w]) + offset[o]
    offset[o] = bias[o] - popcount(m[o, :])

and a hidden layer feeds ``sign(a)`` with ``sign(0) = +1`` on: output bit ``o`` of row ``i`` is 1 iff
``a[i, o] >= 0``.

Public functions:

- :func:`preactivations` -> ``int32 [n, n_out]``; :func:`forward_layer_bits` -> the next layer's packed
  input ``uint64 [n, ceil(n_out / 64)]`` written straight from the accumulators (no unpack / repack).
- :func:`prepare_layer` / :class:`KernelLayer` keep a layer's weights in the kernel's tile layout so
  repeated calls skip the re-layout; :class:`KernelNetwork` runs a whole :class:`PackedNetwork`
  (input packing included) in one compiled call.
- :func:`pack_input_bits`: booleans -> packed words, bit-identical to :func:`bnn_core.packed.pack_bits`.
- ``*_fallback``: the numpy path (the math of :func:`bnn_core.packed.preactivations_numpy`), used when
  numba is missing, fails to compile, or ``BNN_DISABLE_FAST_KERNEL=1``; :data:`FAST_KERNEL_AVAILABLE`,
  :func:`kernel_name`. Compiled code is cached in ``__pycache__`` (first compile ~10 s, later loads ~1 s,
  most of it numba's own start-up).

How the fast kernel works (numba + hand-written LLVM IR through ``numba.extending.intrinsic``):

- Weights are re-laid out once into "vertical" tiles of 64 output units: for each input word ``w`` the
  tile holds 8 vectors of 8 lanes (one lane per output unit) for the sign plane and 8 for the mask.
  One input word ``x[i, w]`` is broadcast to all lanes, so a single ``vpternlogq`` (XNOR-AND),
  ``vpopcntq`` and ``vpaddq`` advance 8 output units at once and each lane accumulates its own unit:
  no horizontal reductions, and no padding waste along the input (784 bits = 13 words, not 16).
- Layers without zero weights skip the mask plane: ``a = (bias + n_in) - 2 popcount(x ^ s)``. Besides
  halving the weight bytes, ``vpxorq`` has a separate destination while ``vpternlogq`` overwrites one
  of its sources, which then costs a register copy per use: measured ~25 % faster per core.
- Register blocking: one micro-kernel call computes ``ROW_BLOCK`` rows x 64 units = 3 x 8 accumulator
  vectors that stay in registers for the whole loop over input words. Per input word it loads 8-16
  weight vectors and 3 broadcasts for 72 ALU ops, so it is bound by the 4 vector ALU pipes rather than
  by loads. 3 x 8 is the largest block that fits the 32 zmm registers (24 accumulators + 3 broadcasts
  + sign/mask + temporaries); 4 x 8 spills. 2 x 8 measured the same; 3 x 8 loads less.
- A 64-unit tile is exactly one output word, so the fused hidden-layer kernel turns its 8 lane
  comparisons (``a >= 0``) into one ``uint64`` and stores it: threads working on different tiles never
  share a word.
- Cache blocking: rows are taken in chunks of ``CHUNK_ROWS``; for each chunk the loop runs tile by tile
  so a weight tile (W x 0.5-1 KiB) and the chunk's inputs stay in L1 while every row of the chunk uses
  them. :class:`KernelNetwork` runs all layers on one chunk before the next, so hidden activations never
  leave L1 and a whole batch costs one parallel region.
- Threads: many rows -> chunks of rows in parallel (``prange``, handed out dynamically); few rows but a
  big layer -> output tiles in parallel; anything under ``PARALLEL_MIN_WORK`` runs on the calling thread.
  Measured here (numba's OpenMP layer, 2 cores): a parallel region costs >= 6 us when the other core is
  idle and stalls for a scheduler tick (4-12 ms) when another process holds it, while a batch-1
  1024 x 1024 layer takes 1.3 us on one thread. So batch 1 never goes parallel.
"""

from __future__ import annotations

import itertools
import os
import warnings
from dataclasses import dataclass

import numpy as np

from bnn_core.packed import WORD_BITS, PackedNetwork, n_words, pack_bits

LANES = 8  # uint64 lanes in one 512-bit vector
TILE_OUT = WORD_BITS  # output units per tile: one output word
BLOCKS = TILE_OUT // LANES  # lane vectors per tile
TILE_WORDS = 2 * TILE_OUT  # uint64 per tile and input word: 64 signs + 64 masks
ROW_BLOCK = 3  # rows per micro-kernel call (see module docstring)
CHUNK_ROWS = 96  # rows per cache block / parallel work item (multiple of ROW_BLOCK)
# Work, in word-ops (rows x units x input words), under which a parallel region is not worth it: 4M
# word-ops take ~0.1 ms on one core, well above a region's cost on an idle machine (see docstring).
PARALLEL_MIN_WORK = 1 << 22
_MAGIC_PACK = 0x0102040810204080  # (8 bytes of 0/1) * magic >> 56 = the 8 bits, byte k -> bit k

try:
    from llvmlite import ir
    from numba import get_num_threads, njit, parallel_chunksize, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic
except ImportError as exc:  # pragma: no cover - exercised only where numba is missing
    _IMPORT_ERROR: Exception | None = exc
else:
    _IMPORT_ERROR = None

FAST_KERNEL_AVAILABLE: bool = _IMPORT_ERROR is None and os.environ.get("BNN_DISABLE_FAST_KERNEL", "") in ("", "0")
_fast_failure: str | None = (
    None if FAST_KERNEL_AVAILABLE else f"numba unavailable ({_IMPORT_ERROR or 'BNN_DISABLE_FAST_KERNEL is set'})"
)


# ---------------------------------------------------------------------------------------------------------------
# numpy fallback (same math as bnn_core.packed.preactivations_numpy)
# ---------------------------------------------------------------------------------------------------------------


def preactivations_fallback(
    x_words: np.ndarray, signs: np.ndarray, mask: np.ndarray, offset: np.ndarray, rows_per_chunk: int = 64
) -> np.ndarray:
    """numpy ``a[i, o] = 2 * sum_w popcount(~(x[i,w] ^ signs[o,w]) & mask[o,w]) + offset[o]``, ``int32 [n, n_out]``.

    The math and chunking of :func:`bnn_core.packed.preactivations_numpy`, with the offset given directly.
    """
    x_words, signs, mask, offset = _check(x_words, signs, mask, offset)
    out = np.empty((len(x_words), len(signs)), dtype=np.int32)
    for start in range(0, len(x_words), rows_per_chunk):
        x = x_words[start : start + rows_per_chunk, None, :]
        agreements = np.bitwise_count(~(x ^ signs[None]) & mask[None]).sum(axis=2, dtype=np.int64)
        out[start : start + rows_per_chunk] = 2 * agreements + offset
    return out


def forward_layer_bits_fallback(
    x_words: np.ndarray, signs: np.ndarray, mask: np.ndarray, offset: np.ndarray
) -> np.ndarray:
    """numpy ``pack_bits(preactivations >= 0)``: ``uint64 [n, ceil(n_out / 64)]``."""
    return pack_bits(preactivations_fallback(x_words, signs, mask, offset) >= 0)


def _check(x_words, signs, mask, offset):
    x_words = np.ascontiguousarray(x_words, dtype=np.uint64)
    signs = np.ascontiguousarray(signs, dtype=np.uint64)
    mask = np.ascontiguousarray(mask, dtype=np.uint64)
    offset = np.ascontiguousarray(offset, dtype=np.int64)
    if x_words.ndim != 2 or signs.ndim != 2 or signs.shape != mask.shape or x_words.shape[1] != signs.shape[1]:
        raise ValueError(f"shapes do not match: x {x_words.shape}, signs {signs.shape}, mask {mask.shape}")
    if offset.shape != (signs.shape[0],):
        raise ValueError(f"offset must have shape ({signs.shape[0]},), got {offset.shape}")
    return x_words, signs, mask, offset


# ---------------------------------------------------------------------------------------------------------------
# numba kernels
# ---------------------------------------------------------------------------------------------------------------

if FAST_KERNEL_AVAILABLE:
    _I32 = ir.IntType(32)
    _I64 = ir.IntType(64)
    _V64 = ir.VectorType(_I64, LANES)
    _V32 = ir.VectorType(_I32, LANES)
    _V1 = ir.VectorType(ir.IntType(1), LANES)

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

    def _splat(builder, scalar):
        undef = ir.Constant(_V64, ir.Undefined)
        first = builder.insert_element(undef, scalar, ir.Constant(_I32, 0))
        return builder.shuffle_vector(first, undef, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))

    def _vec_ptr(builder, base, index, vec_type):
        return builder.bitcast(builder.gep(base, [index]), vec_type.as_pointer())

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
                x_ty, _, wt_ty, _, off_ty, out_ty, _ = signature.args
                x_arr = context.make_array(x_ty)(context, builder, args[0])
                row, t, out_row = args[1], args[3], args[6]
                n_in_words = cgutils.unpack_tuple(builder, x_arr.shape, 2)[1]
                wt_data = context.make_array(wt_ty)(context, builder, args[2]).data
                off_data = context.make_array(off_ty)(context, builder, args[4]).data
                out_arr = context.make_array(out_ty)(context, builder, args[5])
                out_cols = cgutils.unpack_tuple(builder, out_arr.shape, 2)[1]
                intp = n_in_words.type

                def const(v):
                    return ir.Constant(intp, v)

                ctpop_type = ir.FunctionType(_V64, [_V64])
                ctpop = cgutils.get_or_insert_function(builder.module, ctpop_type, "llvm.ctpop.v8i64")
                x_rows = [
                    builder.gep(x_arr.data, [builder.mul(builder.add(row, const(r)), n_in_words)]) for r in range(rows)
                ]
                w_base = builder.gep(wt_data, [builder.mul(t, builder.mul(n_in_words, const(tile_words)))])

                # for w in range(n_in_words): acc[r][b] += popcount(~(x[r, w] ^ sign[b]) & mask[b])
                #                         or  acc[r][b] += popcount(x[r, w] ^ sign[b])   (unmasked)
                preheader = builder.block
                header = builder.append_basic_block("tile.header")
                body = builder.append_basic_block("tile.body")
                done = builder.append_basic_block("tile.done")
                builder.branch(header)
                builder.position_at_end(header)
                w = builder.phi(intp)
                zero = ir.Constant(_V64, None)
                acc = [[builder.phi(_V64) for _ in range(BLOCKS)] for _ in range(rows)]
                w.add_incoming(const(0), preheader)
                for acc_row in acc:
                    for a in acc_row:
                        a.add_incoming(zero, preheader)
                builder.cbranch(builder.icmp_signed("<", w, n_in_words), body, done)

                builder.position_at_end(body)
                xb = [_splat(builder, builder.load(builder.gep(xr, [w]))) for xr in x_rows]
                w_ptr = builder.gep(w_base, [builder.mul(w, const(tile_words))])
                new = [[None] * BLOCKS for _ in range(rows)]
                for b in range(BLOCKS):
                    if masked:
                        s = builder.load(_vec_ptr(builder, w_ptr, const(b * 2 * LANES), _V64), align=8)
                        m = builder.load(_vec_ptr(builder, w_ptr, const(b * 2 * LANES + LANES), _V64), align=8)
                    else:
                        s = builder.load(_vec_ptr(builder, w_ptr, const(b * LANES), _V64), align=8)
                    for r in range(rows):
                        if masked:
                            # One vpternlogq. It overwrites a source, so every use but the last copies a
                            # register first: why the unmasked form (3-operand vpxorq) is ~25 % faster.
                            count = builder.and_(builder.not_(builder.xor(xb[r], s)), m)
                        else:
                            count = builder.xor(xb[r], s)
                        new[r][b] = builder.add(acc[r][b], builder.call(ctpop, [count]))
                w_next = builder.add(w, const(1))
                latch = builder.block
                builder.branch(header)
                w.add_incoming(w_next, latch)
                for r in range(rows):
                    for b in range(BLOCKS):
                        acc[r][b].add_incoming(new[r][b], latch)

                # epilogue: a = 2 * acc + off (masked) or off - 2 * acc (unmasked)
                builder.position_at_end(done)
                unit0 = builder.mul(t, const(TILE_OUT))
                offs = [
                    builder.load(_vec_ptr(builder, off_data, builder.add(unit0, const(b * LANES)), _V64), align=8)
                    for b in range(BLOCKS)
                ]
                one = ir.Constant(_V64, [1] * LANES)
                for r in range(rows):
                    out_row_ptr = builder.gep(out_arr.data, [builder.mul(builder.add(out_row, const(r)), out_cols)])
                    twice = [builder.shl(acc[r][b], one) for b in range(BLOCKS)]
                    if masked:
                        pre = [builder.add(twice[b], offs[b]) for b in range(BLOCKS)]
                    else:
                        pre = [builder.sub(offs[b], twice[b]) for b in range(BLOCKS)]
                    if bits_out:
                        word = ir.Constant(_I64, 0)
                        for b in range(BLOCKS):
                            byte = builder.bitcast(builder.icmp_signed(">=", pre[b], zero), ir.IntType(LANES))
                            shifted = builder.shl(builder.zext(byte, _I64), ir.Constant(_I64, b * LANES))
                            word = builder.or_(word, shifted)
                        builder.store(word, builder.gep(out_row_ptr, [t]), align=8)
                    else:
                        masked_store = cgutils.get_or_insert_function(
                            builder.module,
                            ir.FunctionType(ir.VoidType(), [_V32, _V32.as_pointer(), _I32, _V1]),
                            "llvm.masked.store.v8i32.p0",
                        )
                        lane = ir.Constant(_V64, list(range(LANES)))
                        for b in range(BLOCKS):
                            first = builder.add(unit0, const(b * LANES))
                            live = builder.icmp_signed("<", lane, _splat(builder, builder.sub(out_cols, first)))
                            ptr = _vec_ptr(builder, out_row_ptr, first, _V32)
                            builder.call(masked_store, [builder.trunc(pre[b], _V32), ptr, ir.Constant(_I32, 4), live])
                return context.get_dummy_value()

            return sig, codegen

        return tile

    _tile_block_masked = _make_tile(ROW_BLOCK, True)
    _tile_one_masked = _make_tile(1, True)
    _tile_block_dense = _make_tile(ROW_BLOCK, False)
    _tile_one_dense = _make_tile(1, False)

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
                    _tile_block_dense(x, r, wt, t, off, out, out_r0 + r - r0)
                    r += ROW_BLOCK
                while r < r1:
                    _tile_one_dense(x, r, wt, t, off, out, out_r0 + r - r0)
                    r += 1

    @njit(cache=True, nogil=True)
    def _layer_serial(x, wt, off, out, masked):
        n = x.shape[0]
        n_tiles = off.shape[0] // TILE_OUT
        for r0 in range(0, n, CHUNK_ROWS):
            _block(x, r0, min(n, r0 + CHUNK_ROWS), wt, off, 0, n_tiles, out, r0, masked)

    @njit(cache=True, parallel=True)
    def _layer_parallel(x, wt, off, out, tiles_per_item, masked):
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
    def _pack_rows(groups, r0, r1, n_bytes, dest):
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
        width = meta[0, 2]
        cur = buf_a[: rows * width].reshape((rows, width))
        _pack_rows(groups, r0, r1, n_bytes, cur)
        for li in range(n_layers):
            w_start, o_start, width, n_tiles = meta[li, 0], meta[li, 1], meta[li, 2], meta[li, 3]
            masked = meta[li, 4] != 0
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
    def _network_serial(groups, n_bytes, wbuf, obuf, meta, out):
        n = groups.shape[0]
        max_words = meta[:, 2].max()
        buf_a = np.empty(CHUNK_ROWS * max_words, np.uint64)
        buf_b = np.empty(CHUNK_ROWS * max_words, np.uint64)
        for r0 in range(0, n, CHUNK_ROWS):
            _network_chunk(groups, n_bytes, r0, min(n, r0 + CHUNK_ROWS), wbuf, obuf, meta, out, buf_a, buf_b)

    @njit(cache=True, parallel=True)
    def _network_parallel(groups, n_bytes, wbuf, obuf, meta, out):
        # One parallel region for the whole network: each chunk of rows runs all layers on one thread.
        n = groups.shape[0]
        max_words = meta[:, 2].max()
        n_chunks = (n + CHUNK_ROWS - 1) // CHUNK_ROWS
        for c in prange(n_chunks):
            r0 = c * CHUNK_ROWS
            buf_a = np.empty(CHUNK_ROWS * max_words, np.uint64)
            buf_b = np.empty(CHUNK_ROWS * max_words, np.uint64)
            _network_chunk(groups, n_bytes, r0, min(n, r0 + CHUNK_ROWS), wbuf, obuf, meta, out, buf_a, buf_b)

    @njit(cache=True, parallel=True)
    def preactivations_naive(x_words, signs, mask, offset):
        """Straightforward numba loop (scalar ``popcnt`` per word, rows in parallel); a baseline for the tiles."""
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


# ---------------------------------------------------------------------------------------------------------------
# weight layout and dispatch
# ---------------------------------------------------------------------------------------------------------------


def _aligned_empty(n: int, dtype=np.uint64, align: int = 64) -> np.ndarray:
    """A 1-D array whose data starts on a cache line (vector loads never straddle two lines)."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(n + align // itemsize, dtype=dtype)
    start = (-raw.ctypes.data % align) // itemsize
    return raw[start : start + n]


def _tile_layout(signs: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Sign/mask planes ``[n_out, W]`` -> flat tiles ``[n_tiles, W, 8 blocks, (sign, mask), 8 lanes]``
    (``mask=None``: signs only, ``[n_tiles, W, 8 blocks, 8 lanes]``).

    Unit ``o`` is tile ``o // 64``, block ``o % 64 // 8``, lane ``o % 8``. Padding units get sign 0 and
    mask 0; their offset is -1, so they never set an output bit.
    """
    n_out, width = signs.shape
    n_tiles = -(-n_out // TILE_OUT)
    planes = np.zeros((1 if mask is None else 2, n_tiles * TILE_OUT, width), dtype=np.uint64)
    planes[0, :n_out] = signs
    if mask is not None:
        planes[1, :n_out] = mask
    tiles = planes.reshape(len(planes), n_tiles, BLOCKS, LANES, width).transpose(1, 4, 2, 0, 3)
    out = _aligned_empty(tiles.size)
    out.reshape(tiles.shape)[...] = tiles
    return out


def _leading_ones(n_bits: int, width: int) -> np.ndarray:
    """``uint64 [width]`` with the first ``n_bits`` bits set (the mask row of a layer without zeros)."""
    return pack_bits(np.arange(width * WORD_BITS) < n_bits)


def _padded_offset(offset: np.ndarray, n_tiles: int) -> np.ndarray:
    off = np.full(n_tiles * TILE_OUT, -1, dtype=np.int64)
    off[: len(offset)] = offset
    return off


def _run_fast(fn, *args) -> bool:
    """Run a compiled kernel; on a compilation failure switch this process to the numpy path for good."""
    global _fast_failure
    if _fast_failure is not None:
        return False
    try:
        if getattr(fn, "targetoptions", {}).get("parallel"):
            # Chunk size 1 = dynamic scheduling of the work items: a thread that lost its core to another
            # process does not hold back the whole region with a fixed 1/threads share of the work.
            with parallel_chunksize(1):
                fn(*args)
        else:
            fn(*args)  # compiles (or loads from the on-disk cache) on the first call of each signature
    except MemoryError:
        raise
    except Exception as exc:  # numba typing/lowering errors, LLVM errors: keep working on the numpy path
        _fast_failure = f"compilation failed: {type(exc).__name__}: {exc}"
        warnings.warn(f"bnn_core.kernels: fast kernel unavailable, using numpy ({_fast_failure})", stacklevel=3)
        return False
    return True


def _parallel_ok(work: int) -> bool:
    return work >= PARALLEL_MIN_WORK and get_num_threads() > 1


@dataclass(frozen=True, eq=False)
class KernelLayer:
    """One layer in the fast kernel's tile layout (see :func:`prepare_layer`)."""

    tiles: np.ndarray  # uint64, flat [n_tiles, W, 8, 2, 8], or [n_tiles, W, 8, 8] when not masked
    offset: np.ndarray  # int64 [n_tiles * 64] as the tile kernel wants it; padding units -1
    signs: np.ndarray  # the planes (sign bits cleared where the mask is 0), kept for the numpy fallback
    mask: np.ndarray
    bias_offset: np.ndarray  # int64 [n_out]: the caller's offset, bias - popcount(mask row)
    masked: bool  # False: no zero weights; the kernel skips the mask plane
    input_bits: int  # unmasked layers: input bits past this are cleared before the kernel sees them

    @property
    def n_out(self) -> int:
        return len(self.signs)

    @property
    def n_in_words(self) -> int:
        return self.signs.shape[1]

    @property
    def n_tiles(self) -> int:
        return len(self.offset) // TILE_OUT

    def preactivations(self, x_words: np.ndarray) -> np.ndarray:
        """``int32 [n, n_out]``: ``2 * popcount(~(x ^ s) & m) + offset`` per unit."""
        x_words = self._input(x_words)
        out = np.empty((len(x_words), self.n_out), dtype=np.int32)
        if self._run(x_words, out):
            return out
        return preactivations_fallback(x_words, self.signs, self.mask, self.bias_offset)

    def forward_bits(self, x_words: np.ndarray) -> np.ndarray:
        """Next layer's packed inputs ``uint64 [n, ceil(n_out/64)]``: bit ``o`` = ``a[i, o] >= 0``."""
        x_words = self._input(x_words)
        out = np.empty((len(x_words), self.n_tiles), dtype=np.uint64)
        if self._run(x_words, out):
            return out
        return forward_layer_bits_fallback(x_words, self.signs, self.mask, self.bias_offset)

    def _input(self, x_words: np.ndarray) -> np.ndarray:
        x_words = np.require(x_words, dtype=np.uint64, requirements=["C", "W"])
        if x_words.ndim != 2 or x_words.shape[1] != self.n_in_words:
            raise ValueError(f"x_words must be [n, {self.n_in_words}] uint64, got {x_words.shape}")
        first = self.input_bits // WORD_BITS
        if not self.masked and first < self.n_in_words:
            # The unmasked kernel counts every input bit: clear those past n_in if a caller left any set
            # (they never count in the masked math). Packed inputs from pack_bits have them 0 already.
            valid = _leading_ones(self.input_bits, self.n_in_words)
            if (x_words[:, first:] & ~valid[first:]).any():
                x_words = x_words & valid
        return x_words

    def _run(self, x_words: np.ndarray, out: np.ndarray) -> bool:
        n = len(x_words)
        if not FAST_KERNEL_AVAILABLE or _fast_failure is not None:
            return False
        if n == 0:
            return True
        if not _parallel_ok(n * self.n_tiles * TILE_OUT * self.n_in_words):
            return _run_fast(_layer_serial, x_words, self.tiles, self.offset, out, self.masked)
        # Enough row chunks for every thread: rows in parallel; otherwise split the output tiles too.
        n_chunks = -(-n // CHUNK_ROWS)
        per_item = self.n_tiles if n_chunks >= 2 * get_num_threads() else 1
        return _run_fast(_layer_parallel, x_words, self.tiles, self.offset, out, per_item, self.masked)


def prepare_layer(signs: np.ndarray, mask: np.ndarray, offset: np.ndarray, allow_unmasked: bool = True) -> KernelLayer:
    """Lay out one layer for the kernel: sign/mask planes ``uint64 [n_out, W]``, offset ``int64 [n_out]``.

    A layer whose every mask row is the same run of leading ones (no zero weights: ``1 .. n_in``) gets the
    unmasked kernel: sign plane only, ``a = (offset + 2 n_in) - 2 popcount(x ^ s)``. That is the same
    integer as the masked formula because input and sign bits past ``n_in`` are 0.
    """
    _, signs, mask, offset = _check(np.zeros((0, np.shape(signs)[-1]), np.uint64), signs, mask, offset)
    signs = signs & mask  # sign bits under a zero mask never count; clearing them lets both kernels agree
    n_out, width = signs.shape
    n_tiles = -(-n_out // TILE_OUT)
    input_bits = int(np.bitwise_count(mask[0]).sum()) if n_out else 0
    dense = allow_unmasked and n_out > 0 and input_bits > 0
    dense = dense and bool((mask == _leading_ones(input_bits, width)).all())
    if dense:
        tiles = _tile_layout(signs, None)
        tile_offset = _padded_offset(offset + 2 * input_bits, n_tiles)
    else:
        tiles = _tile_layout(signs, mask)
        tile_offset = _padded_offset(offset, n_tiles)
    return KernelLayer(tiles, tile_offset, signs, mask, offset, not dense, input_bits)


def preactivations(x_words: np.ndarray, signs: np.ndarray, mask: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``a[i, o] = 2 * sum_w popcount(~(x[i,w] ^ signs[o,w]) & mask[o,w]) + offset[o]`` as ``int32 [n, n_out]``.

    ``x_words uint64 [n, W]``, ``signs``/``mask uint64 [n_out, W]``, ``offset int64 [n_out]`` (``bias -
    popcount(mask row)``, see :attr:`bnn_core.packed.PackedLayer.offset`). Re-lays out the weights on every
    call (O(n_out W)); keep a :class:`KernelLayer` (:func:`prepare_layer`) for repeated calls.
    """
    x_words, signs, mask, offset = _check(x_words, signs, mask, offset)
    if not FAST_KERNEL_AVAILABLE or _fast_failure is not None:
        return preactivations_fallback(x_words, signs, mask, offset)
    return prepare_layer(signs, mask, offset).preactivations(x_words)


def forward_layer_bits(x_words: np.ndarray, signs: np.ndarray, mask: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Packed sign bits of the pre-activations: ``uint64 [n, ceil(n_out/64)]``, bit ``o`` = ``a[i, o] >= 0``.

    Same bit order as :func:`bnn_core.packed.pack_bits` (unit ``o`` in word ``o // 64``, bit ``o % 64``),
    padding bits 0: the result is the next layer's ``x_words`` directly.
    """
    x_words, signs, mask, offset = _check(x_words, signs, mask, offset)
    if not FAST_KERNEL_AVAILABLE or _fast_failure is not None:
        return forward_layer_bits_fallback(x_words, signs, mask, offset)
    return prepare_layer(signs, mask, offset).forward_bits(x_words)


def _as_bool(bits: np.ndarray) -> np.ndarray:
    bits = np.asarray(bits)
    return bits if bits.dtype == np.bool_ else bits > 0  # +-1 (or 0/1) inputs: +1 -> True


def _byte_groups(bits: np.ndarray) -> tuple[np.ndarray, int]:
    """Booleans ``[n, n_in]`` -> ``uint64 [n, ceil(n_in/8)]`` holding 8 bool bytes each (a view when possible)."""
    bits = _as_bool(bits)
    if bits.ndim != 2:
        raise ValueError(f"input bits must be [n, n_in], got shape {bits.shape}")
    n, n_in = bits.shape
    if n_in % 8 or not bits.flags.c_contiguous or not bits.flags.writeable:
        padded = np.zeros((n, -(-n_in // 8) * 8), dtype=np.bool_)
        padded[:, :n_in] = bits
        bits = padded
    return bits.view(np.uint64), n_in


def pack_input_bits(bits: np.ndarray) -> np.ndarray:
    """Booleans (or +-1) ``[n, n_in]`` -> ``uint64 [n, ceil(n_in/64)]``, identical to ``pack_bits(bits > 0)``."""
    if FAST_KERNEL_AVAILABLE and _fast_failure is None:
        groups, n_in = _byte_groups(bits)
        out = np.empty((len(groups), n_words(n_in)), dtype=np.uint64)
        if _run_fast(_pack_rows, groups, 0, len(groups), n_in, out):
            return out
    return pack_bits(_as_bool(bits))


@dataclass(frozen=True, eq=False)
class KernelNetwork:
    """A :class:`PackedNetwork` in the kernel's layout, run end to end in one compiled call."""

    layers: tuple[KernelLayer, ...]
    n_in: int
    weights: np.ndarray  # all layers' tiles, concatenated (each layer starts on a cache line)
    offsets: np.ndarray  # all layers' padded offsets
    meta: np.ndarray  # int64 [layers, 5]: tile start, offset start, input words, tiles, masked

    @classmethod
    def from_packed(cls, net: PackedNetwork) -> KernelNetwork:
        layers = []
        for lay in net.layers:
            fast = prepare_layer(lay.signs, lay.mask, lay.offset)
            if not fast.masked and fast.input_bits != lay.n_in:  # zero columns at the end: keep the mask
                fast = prepare_layer(lay.signs, lay.mask, lay.offset, allow_unmasked=False)
            layers.append(fast)
        layers = tuple(layers)
        for prev, nxt in itertools.pairwise(layers):
            if nxt.n_in_words != prev.n_tiles:
                raise ValueError("layer widths do not chain")
        meta = np.zeros((len(layers), 5), dtype=np.int64)
        w_pos = o_pos = 0
        for li, lay in enumerate(layers):
            # Inputs here come from our own packers, so bits past n_in are always 0 (unmasked layers rely on it).
            meta[li] = (w_pos, o_pos, lay.n_in_words, lay.n_tiles, lay.masked)
            w_pos += lay.tiles.size
            o_pos += lay.offset.size
        weights = _aligned_empty(w_pos)
        offsets = np.empty(o_pos, dtype=np.int64)
        for li, lay in enumerate(layers):
            weights[meta[li, 0] : meta[li, 0] + lay.tiles.size] = lay.tiles
            offsets[meta[li, 1] : meta[li, 1] + lay.offset.size] = lay.offset
        return cls(layers, net.n_in, weights, offsets, meta)

    @classmethod
    def from_ternary(cls, layers: list[tuple[np.ndarray, np.ndarray]]) -> KernelNetwork:
        return cls.from_packed(PackedNetwork.from_ternary(layers))

    @property
    def n_classes(self) -> int:
        return self.layers[-1].n_out

    @property
    def word_ops_per_row(self) -> int:
        """64-bit XNOR-popcount word operations per input row, over the real (unpadded) units."""
        return sum(lay.n_out * lay.n_in_words for lay in self.layers)

    def forward_counts(self, x_bits: np.ndarray) -> np.ndarray:
        """Integer scores ``int32 [n, n_classes]`` for input bits ``[n, n_in]`` (bool, or +-1 with +1 -> True).

        Equal to :meth:`bnn_core.packed.PackedNetwork.forward_counts`. Input packing, all hidden layers
        (packed sign bits straight from the accumulators) and the output layer run in one compiled call.
        """
        if np.ndim(x_bits) != 2 or np.shape(x_bits)[1] != self.n_in:
            raise ValueError(f"expected input bits [n, {self.n_in}], got shape {np.shape(x_bits)}")
        if FAST_KERNEL_AVAILABLE and _fast_failure is None:
            groups, n_in = _byte_groups(x_bits)
            out = np.empty((len(groups), self.n_classes), dtype=np.int32)
            if len(groups) == 0:
                return out
            args = (groups, n_in, self.weights, self.offsets, self.meta, out)
            parallel = len(groups) > CHUNK_ROWS and _parallel_ok(len(groups) * self.word_ops_per_row)
            if _run_fast(_network_parallel if parallel else _network_serial, *args):
                return out
        words = pack_bits(_as_bool(x_bits))
        for lay in self.layers[:-1]:
            words = lay.forward_bits(words)
        return self.layers[-1].preactivations(words)

    def predict(self, x_bits: np.ndarray) -> np.ndarray:
        """Class ids: argmax of the scores, ties to the lowest index."""
        return self.forward_counts(x_bits).argmax(axis=1)


def kernel_name() -> str:
    """Which implementation runs: the numba tile kernel (and the vector ISA it compiles for) or numpy.

    The fast kernel compiles lazily; if that ever fails the name turns into ``numpy-fallback (reason)``.
    """
    if not FAST_KERNEL_AVAILABLE or _fast_failure is not None:
        return f"numpy-fallback ({_fast_failure})"
    from llvmlite import binding

    features = binding.get_host_cpu_features()
    isa = "avx512-vpopcntdq" if features.get("avx512vpopcntdq") else "no-vpopcntdq"
    return (
        f"numba-xnor-popcount ({isa}, {binding.get_host_cpu_name()}, {ROW_BLOCK}x{TILE_OUT} register tiles, "
        f"{get_num_threads()} threads)"
    )
