"""Weight re-layout for the tile kernels of :mod:`bnn_core.kernel_codegen` (pure numpy, done once per layer).

Weights are re-laid out into "vertical" tiles of 64 output units: for each input word ``w`` a tile holds 8
vectors of 8 lanes (one lane per output unit) for the sign plane and 8 for the mask,

    tiles[t, w, b, plane, lane] = plane[64 t + 8 b + lane, w]      plane 0 = signs, 1 = masks

so one input word broadcast to all lanes meets the weights of 8 units in one vector. Layers without zero
weights ("unmasked") keep the sign plane only: ``[n_tiles, W, 8, 8]``. For the carry-save kernels the
input words are padded with zero words to ``W = ceil(W / CSA_PAD) * CSA_PAD`` (sign 0 and mask 0: a padding
word counts 0 against an input word that is 0 too, which the packers guarantee). Each layer also gets its
``tile_offset`` (the constant term the kernel adds, padded to whole tiles), and a whole network becomes one
``uint64`` *model image* (:func:`network_image`): header, per-layer table, offsets, tiles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bnn_core.kernel_codegen import (
    BLOCKS,
    CSA_PAD,
    HEAD_CLASSES,
    HEAD_CSA,
    HEAD_LAYERS,
    HEAD_MAX_WORDS,
    HEAD_N_IN,
    HEAD_WORDS,
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

CACHE_LINE_WORDS = 8  # uint64 per 64-byte cache line


def aligned_empty(n: int, dtype=np.uint64, align: int = 64) -> np.ndarray:
    """A 1-D array whose data starts on a cache line (vector loads never straddle two lines)."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(n + align // itemsize, dtype=dtype)
    start = (-raw.ctypes.data % align) // itemsize
    return raw[start : start + n]


def kernel_words(n_words: int, csa: bool) -> int:
    """Input words per row as a kernel reads them: ``n_words``, or padded to a multiple of ``CSA_PAD``."""
    return -(-n_words // CSA_PAD) * CSA_PAD if csa else n_words


def tile_planes(signs: np.ndarray, mask: np.ndarray | None, width: int | None = None) -> np.ndarray:
    """Sign/mask planes ``[n_out, W]`` -> flat tiles ``[n_tiles, width, 8 blocks, (sign, mask), 8 lanes]``
    (``mask=None``: signs only, ``[n_tiles, width, 8 blocks, 8 lanes]``); ``width >= W`` (default ``W``)
    pads each unit's row with zero words.

    Unit ``o`` is tile ``o // 64``, block ``o % 64 // 8``, lane ``o % 8``. Padding units get sign 0 and
    mask 0; their tile offset is -1 (:func:`padded_tile_offset`), so they never set an output bit.
    """
    n_out, n_words = signs.shape
    width = n_words if width is None else width
    n_tiles = -(-n_out // TILE_OUT)
    planes = np.zeros((1 if mask is None else 2, n_tiles * TILE_OUT, width), dtype=np.uint64)
    planes[0, :n_out, :n_words] = signs
    if mask is not None:
        planes[1, :n_out, :n_words] = mask
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

    tiles: np.ndarray  # uint64, flat [n_tiles, in_words, 8, 2, 8], or [n_tiles, in_words, 8, 8] when not masked
    tile_offset: np.ndarray  # int64 [n_tiles * 64]: the kernel's constant term; padding units -1
    masked: bool  # False: no zero weights; the kernel skips the mask plane
    input_bits: int  # popcount of the first mask row (= n_in for unmasked layers)
    in_words: int  # input words per row the kernel reads (the layer's, padded for carry-save)
    csa: bool  # laid out for the carry-save kernels


def layout_layer(
    signs: np.ndarray, mask: np.ndarray, offset: np.ndarray, allow_unmasked: bool = True, csa: bool = False
) -> LayerTiles:
    """Tiles and tile offset of one layer: planes ``uint64 [n_out, W]`` (sign bits 0 where the mask is 0),
    ``offset = bias - popcount(mask row)`` ``int64 [n_out]`` (:attr:`bnn_core.packed.PackedLayer.offset`;
    ``bias`` any integer: it only shifts the offset, and padding units keep -1 whatever the biases are).
    ``csa``: pad the input words for the carry-save kernels (:func:`kernel_words`).

    Masked: ``tile_offset = offset`` and ``a = 2 popcount(~(x ^ s) & m) + offset``. A layer whose every mask
    row is the same run of leading ones (no zero weights: ``1 .. n_in``) is unmasked: sign plane only and
    ``a = tile_offset - 2 popcount(x ^ s)`` with ``tile_offset = offset + 2 n_in = bias + n_in``. Both are
    the same integer: with ``d = popcount(x ^ s)`` disagreements over ``n_in`` bits, ``2 (n_in - d) + bias
    - n_in = bias + n_in - 2 d``, provided input and sign bits past ``n_in`` are 0.

    The carry-save kernels count disagreements in masked layers too, ``d = popcount((x ^ s) & m)``, because
    ``(x ^ s) & m`` is one ``vpternlogq`` with ``x`` broadcast from memory while LLVM turns the XNOR form
    into a scalar NOT and a register broadcast: ``tile_offset = offset + 2 nnz`` with ``nnz =
    popcount(m)`` and ``a = tile_offset - 2 d``, the same integer since agreements ``= nnz - d``.
    """
    n_out, width = signs.shape
    n_tiles = -(-n_out // TILE_OUT)
    in_words = kernel_words(width, csa)
    input_bits = int(np.bitwise_count(mask[0]).sum()) if n_out else 0
    unmasked = allow_unmasked and n_out > 0 and input_bits > 0
    unmasked = unmasked and bool((mask == leading_ones(input_bits, width)).all())
    if unmasked:
        tiles = tile_planes(signs, None, in_words)
        tile_offset = padded_tile_offset(offset + 2 * input_bits, n_tiles)
    elif csa:  # counts disagreements d = popcount((x ^ s) & m): a = (offset + 2 nnz) - 2 d
        nnz = np.bitwise_count(mask).sum(axis=1, dtype=np.int64)
        tiles, tile_offset = tile_planes(signs, mask, in_words), padded_tile_offset(offset + 2 * nnz, n_tiles)
    else:
        tiles, tile_offset = tile_planes(signs, mask, in_words), padded_tile_offset(offset, n_tiles)
    return LayerTiles(tiles, tile_offset, not unmasked, input_bits, in_words, csa)


def network_image(layers: Sequence[LayerTiles], n_in: int, n_classes: int) -> np.ndarray:
    """All layers in one ``uint64`` buffer, the fused network kernels' only weight argument.

    Layout (indices in words, constants of :mod:`bnn_core.kernel_codegen`): ``HEAD_WORDS`` header words
    (``HEAD_LAYERS``, ``HEAD_N_IN``, ``HEAD_CLASSES``, ``HEAD_CSA``, ``HEAD_MAX_WORDS``), then
    ``META_COLUMNS`` words per layer (where its tiles and tile offsets start in this buffer, its input
    words, tiles, masked), then every layer's tile offsets (int64 bit patterns), then every layer's tiles,
    each layer starting on a cache line (the buffer itself starts on one). One buffer instead of three
    arrays: each argument costs numba's dispatcher time at every call, which shows at batch 1.
    """
    if not layers:
        raise ValueError("a network needs at least one layer")
    csa = layers[0].csa
    if any(lay.csa != csa for lay in layers):
        raise ValueError("all layers of a network must use the same kernel (carry-save or vector popcount)")
    n_layers = len(layers)
    pos = HEAD_WORDS + n_layers * META_COLUMNS
    offset_starts = []
    for lay in layers:
        offset_starts.append(pos)
        pos += lay.tile_offset.size
    weight_starts = []
    for lay in layers:
        pos = -(-pos // CACHE_LINE_WORDS) * CACHE_LINE_WORDS
        weight_starts.append(pos)
        pos += lay.tiles.size
    image = aligned_empty(pos)
    image[:] = 0
    head = image[:HEAD_WORDS]
    head[HEAD_LAYERS] = n_layers
    head[HEAD_N_IN] = n_in
    head[HEAD_CLASSES] = n_classes
    head[HEAD_CSA] = int(csa)
    head[HEAD_MAX_WORDS] = max(lay.in_words for lay in layers)
    meta = image[HEAD_WORDS : HEAD_WORDS + n_layers * META_COLUMNS].reshape(n_layers, META_COLUMNS)
    for li, lay in enumerate(layers):
        meta[li, META_WEIGHT_START] = weight_starts[li]
        meta[li, META_OFFSET_START] = offset_starts[li]
        meta[li, META_IN_WORDS] = lay.in_words
        meta[li, META_TILES] = lay.tile_offset.size // TILE_OUT
        meta[li, META_MASKED] = int(lay.masked)
        image[offset_starts[li] : offset_starts[li] + lay.tile_offset.size] = lay.tile_offset.view(np.uint64)
        image[weight_starts[li] : weight_starts[li] + lay.tiles.size] = lay.tiles
    return image
