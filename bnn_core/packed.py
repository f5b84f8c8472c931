"""Packed-bit inference: bipolar values as bits in uint64 words, XNOR and popcount (docs/method.md, section 6).

Encoding: bit 1 = +1, bit 0 = -1. Feature ``j`` sits in word ``j // 64``, bit ``j % 64``. A ternary
weight row is two planes: its sign bits and a nonzero mask. Padding bits are 0 in the mask, so they
never count. For one unit with inputs ``x``, sign plane ``w``, mask ``m`` and bias ``b`` in {-1, +1}:

    agreements = popcount(~(x ^ w) & m)          # XNOR = bipolar product +1
    a = 2 * agreements - popcount(m) + b          # (+1 per agreement, -1 per disagreement)
    z = sign(a), sign(0) = +1                     # same rule as bnn_core.quantizers

This module is the reference numpy path, and the fast kernel's fallback; :mod:`bnn_core.kernels` holds the
fast one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WORD_BITS = 64


def n_words(n_bits: int) -> int:
    return -(-n_bits // WORD_BITS)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack booleans ``[..., n]`` (True = +1) into ``uint64 [..., ceil(n/64)]``, little-endian bit order."""
    bits = np.asarray(bits, dtype=bool)
    n = bits.shape[-1]
    pad = n_words(n) * WORD_BITS - n
    if pad:
        bits = np.concatenate([bits, np.zeros((*bits.shape[:-1], pad), dtype=bool)], axis=-1)
    packed = np.packbits(bits, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u8").astype(np.uint64, copy=False)


def unpack_bits(words: np.ndarray, n_bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``uint64 [..., w]`` -> booleans ``[..., n_bits]``."""
    as_bytes = np.ascontiguousarray(words.astype("<u8", copy=False)).view(np.uint8)
    return np.unpackbits(as_bytes, axis=-1, bitorder="little", count=n_bits).astype(bool)


@dataclass(frozen=True)
class PackedLayer:
    """One bitwise layer: sign plane and nonzero mask ``uint64 [n_out, words]``, bias ``int8 [n_out]``."""

    signs: np.ndarray
    mask: np.ndarray
    bias: np.ndarray
    n_in: int

    @property
    def n_out(self) -> int:
        return len(self.bias)

    @classmethod
    def from_ternary(cls, weights: np.ndarray, bias: np.ndarray) -> PackedLayer:
        """From ``weights[n_out, n_in]`` in {-1, 0, 1} and ``bias[n_out]`` in {-1, 1}."""
        weights = np.asarray(weights)
        return cls(
            signs=pack_bits(weights > 0),
            mask=pack_bits(weights != 0),
            bias=np.asarray(bias, dtype=np.int8),
            n_in=weights.shape[1],
        )

    def to_ternary(self) -> tuple[np.ndarray, np.ndarray]:
        signs = unpack_bits(self.signs, self.n_in)
        mask = unpack_bits(self.mask, self.n_in)
        return (np.where(signs, 1, -1) * mask).astype(np.int8), self.bias.copy()

    @property
    def offset(self) -> np.ndarray:
        """``bias - popcount(m)`` per unit (int64): the constant term of ``a = 2 * agreements + offset``."""
        return self.bias.astype(np.int64) - np.bitwise_count(self.mask).sum(axis=1, dtype=np.int64)


def preactivations_numpy(
    x_words: np.ndarray, signs: np.ndarray, mask: np.ndarray, offset: np.ndarray, rows_per_chunk: int = 64
) -> np.ndarray:
    """Integer pre-activations ``int32 [n, n_out]`` for packed inputs ``x_words uint64 [n, W]``:

        a[i, o] = 2 * sum_w popcount(~(x[i, w] ^ signs[o, w]) & mask[o, w]) + offset[o]

    with planes ``signs``/``mask uint64 [n_out, W]`` and ``offset = bias - popcount(mask row)``
    (:attr:`PackedLayer.offset`). Rows go in chunks so the ``[rows, n_out, W]`` temporary stays small.
    """
    out = np.empty((len(x_words), len(signs)), dtype=np.int32)
    for start in range(0, len(x_words), rows_per_chunk):
        x = x_words[start : start + rows_per_chunk, None, :]
        agreements = np.bitwise_count(~(x ^ signs[None]) & mask[None]).sum(axis=2, dtype=np.int64)
        out[start : start + rows_per_chunk] = 2 * agreements + offset
    return out


def sign_bits(preactivations: np.ndarray) -> np.ndarray:
    """Hidden activations as bits: ``a >= 0`` (sign(0) = +1)."""
    return preactivations >= 0


def forward_bits_numpy(x_words: np.ndarray, signs: np.ndarray, mask: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """A hidden layer's output as the next layer's packed input: ``pack_bits(sign_bits(a))``,
    ``uint64 [n, ceil(n_out / 64)]``."""
    return pack_bits(sign_bits(preactivations_numpy(x_words, signs, mask, offset)))


@dataclass(frozen=True)
class PackedNetwork:
    """A stack of :class:`PackedLayer`; hidden layers feed ``sign`` bits to the next."""

    layers: tuple[PackedLayer, ...]

    @classmethod
    def from_ternary(cls, layers: list[tuple[np.ndarray, np.ndarray]]) -> PackedNetwork:
        return cls(tuple(PackedLayer.from_ternary(w, b) for w, b in layers))

    @property
    def n_in(self) -> int:
        return self.layers[0].n_in

    def forward_counts(self, x_bits: np.ndarray) -> np.ndarray:
        """Integer pre-activations ``int32 [n, n_classes]`` of the last layer for input bits ``[n, n_in]``."""
        words = pack_bits(x_bits)
        for layer in self.layers[:-1]:
            words = forward_bits_numpy(words, layer.signs, layer.mask, layer.offset)
        last = self.layers[-1]
        return preactivations_numpy(words, last.signs, last.mask, last.offset)

    def predict(self, x_bits: np.ndarray) -> np.ndarray:
        """Class ids: argmax of the counts, ties to the lowest index."""
        return self.forward_counts(x_bits).argmax(axis=1)
