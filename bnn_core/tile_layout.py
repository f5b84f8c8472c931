"""Weight re-layout for the tile kernels of :mod:`bnn_core.kernel_codegen` (pure numpy, done once per layer).

Weights are re-laid out into "vertical" tiles of 64 output units: for each input word ``w`` a tile holds 8
vectors of 8 lanes (one lane per output unit) for the sign plane and 8 for the mask,

    tiles[t, w, b, plane, lane] = plane[64 t + 8 b + lane, w]      plane 0 = signs, 1 = masks

so one input word broadcast to all lanes meets the weights of 8 units in one vector. Layers without zero
weights ("unmasked") keep the sign plane only: ``[n_tiles, W, 8, 8]``. Each layer also gets its
``tile_offset`` (the constant term the kernel adds, padded to whole tiles) and a whole network is
concatenated into one weight buffer, one offset buffer and a ``meta`` table (columns ``META_*``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bnn_core.kernel_codegen import (
    BLOCKS,
    LANES,
    META_COLUMNS,
    META_IN_WORDS,
    META_MASKED,
    META_OFFSET_START,
    META_TILES,
    META_WEIGHT_START,
    TILE_OUT,
)
from bnn_core.packed import WORD_BITS, pack_bits


def aligned_empty(n: int, dtype=np.uint64, align: int = 64) -> np.ndarray:
    """A 1-D array whose data starts on a cache line (vector loads never straddle two lines)."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(n + align // itemsize, dtype=dtype)
    start = (-raw.ctypes.data % align) // itemsize
    return raw[start : start + n]


def tile_planes(signs: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Sign/mask planes ``[n_out, W]`` -> flat tiles ``[n_tiles, W, 8 blocks, (sign, mask), 8 lanes]``
    (``mask=None``: signs only, ``[n_tiles, W, 8 blocks, 8 lanes]``).

    Unit ``o`` is tile ``o // 64``, block ``o % 64 // 8``, lane ``o % 8``. Padding units get sign 0 and
    mask 0; their tile offset is -1 (:func:`padded_tile_offset`), so they never set an output bit.
    """
    n_out, width = signs.shape
    n_tiles = -(-n_out // TILE_OUT)
    planes = np.zeros((1 if mask is None else 2, n_tiles * TILE_OUT, width), dtype=np.uint64)
    planes[0, :n_out] = signs
    if mask is not None:
        planes[1, :n_out] = mask
    tiles = planes.reshape(len(planes), n_tiles, BLOCKS, LANES, width).transpose(1, 4, 2, 0, 3)
    out = aligned_empty(tiles.size)
    out.reshape(tiles.shape)[...] = tiles
    return out


def leading_ones(n_bits: int, width: int) -> np.ndarray:
    """``uint64 [width]`` with the first ``n_bits`` bits set (the mask row of a layer without zeros)."""
    return pack_bits(np.arange(width * WORD_BITS) < n_bits)


def padded_tile_offset(tile_offset: np.ndarray, n_tiles: int) -> np.ndarray:
    """``int64 [n_tiles * 64]``: the units' offsets, then -1 for the padding units of the last tile."""
    off = np.full(n_tiles * TILE_OUT, -1, dtype=np.int64)
    off[: len(tile_offset)] = tile_offset
    return off


@dataclass(frozen=True, eq=False)
class LayerTiles:
    """One layer as the tile kernel reads it (see :func:`layout_layer`)."""

    tiles: np.ndarray  # uint64, flat [n_tiles, W, 8, 2, 8], or [n_tiles, W, 8, 8] when not masked
    tile_offset: np.ndarray  # int64 [n_tiles * 64]: the kernel's constant term; padding units -1
    masked: bool  # False: no zero weights; the kernel skips the mask plane
    input_bits: int  # popcount of the first mask row (= n_in for unmasked layers)


def layout_layer(signs: np.ndarray, mask: np.ndarray, offset: np.ndarray, allow_unmasked: bool = True) -> LayerTiles:
    """Tiles and tile offset of one layer: planes ``uint64 [n_out, W]`` (sign bits 0 where the mask is 0),
    ``offset = bias - popcount(mask row)`` ``int64 [n_out]`` (:attr:`bnn_core.packed.PackedLayer.offset`;
    ``bias`` any integer: it only shifts the offset, and padding units keep -1 whatever the biases are).

    Masked: ``tile_offset = offset`` and ``a = 2 popcount(~(x ^ s) & m) + offset``. A layer whose every mask
    row is the same run of leading ones (no zero weights: ``1 .. n_in``) is unmasked: sign plane only and
    ``a = tile_offset - 2 popcount(x ^ s)`` with ``tile_offset = offset + 2 n_in = bias + n_in``. Both are
    the same integer: with ``d = popcount(x ^ s)`` disagreements over ``n_in`` bits, ``2 (n_in - d) + bias
    - n_in = bias + n_in - 2 d``, provided input and sign bits past ``n_in`` are 0.
    """
    n_out, width = signs.shape
    n_tiles = -(-n_out // TILE_OUT)
    input_bits = int(np.bitwise_count(mask[0]).sum()) if n_out else 0
    unmasked = allow_unmasked and n_out > 0 and input_bits > 0
    unmasked = unmasked and bool((mask == leading_ones(input_bits, width)).all())
    if unmasked:
        tiles, tile_offset = tile_planes(signs, None), padded_tile_offset(offset + 2 * input_bits, n_tiles)
    else:
        tiles, tile_offset = tile_planes(signs, mask), padded_tile_offset(offset, n_tiles)
    return LayerTiles(tiles, tile_offset, not unmasked, input_bits)


def network_layout(layers: Sequence[LayerTiles], in_words: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All layers in one buffer each, for the fused network kernel: ``(weights, tile_offsets, meta)``.

    ``weights``: every layer's tiles, each layer starting on a cache line; ``tile_offsets``: every layer's
    padded tile offsets; ``meta int64 [n_layers, META_COLUMNS]``: where each layer starts in both buffers,
    its input words (``in_words[li]``), tiles and whether it is masked.
    """
    meta = np.zeros((len(layers), META_COLUMNS), dtype=np.int64)
    w_pos = o_pos = 0
    for li, (lay, width) in enumerate(zip(layers, in_words, strict=True)):
        meta[li, META_WEIGHT_START] = w_pos
        meta[li, META_OFFSET_START] = o_pos
        meta[li, META_IN_WORDS] = width
        meta[li, META_TILES] = len(lay.tile_offset) // TILE_OUT
        meta[li, META_MASKED] = lay.masked
        w_pos += lay.tiles.size
        o_pos += lay.tile_offset.size
    weights = aligned_empty(w_pos)
    tile_offsets = np.empty(o_pos, dtype=np.int64)
    for li, lay in enumerate(layers):
        w_start, o_start = meta[li, META_WEIGHT_START], meta[li, META_OFFSET_START]
        weights[w_start : w_start + lay.tiles.size] = lay.tiles
        tile_offsets[o_start : o_start + lay.tile_offset.size] = lay.tile_offset
    return weights, tile_offsets, meta
