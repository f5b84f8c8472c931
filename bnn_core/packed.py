"""Packed-bit inference: bipolar values as bits in uint64 words, XNOR and popcount (docs/method.md, section 6).

Encoding: bit 1 = +1, bit 0 = -1. Feature ``j`` sits in word ``j // 64``, bit ``j % 64``. A ternary
weight row is two planes: its sign bits and a nonzero mask. Padding bits are 0 in the mask, so they
never count. For one unit with inputs ``x``, sign plane ``w``, mask ``m`` and integer constant ``c``:

    agreements = popcount(~(x ^ w) & m)          # XNOR = bipolar product +1
    a = 2 * agreements - popcount(m) + c          # (+1 per agreement, -1 per disagreement)
    z = sign(a), sign(0) = +1                     # same rule as bnn_core.quantizers

The constant ``c`` ("bias") is the paper's binary bias in {-1, +1}, or, for a network whose batch norm was
folded into thresholds (``bnn_bn``), ``c = -threshold``: any integer. Since ``w . x`` lies in
``[-n_in, n_in]``, a constant outside ``[-(n_in + 1), n_in + 1]`` (:func:`bias_bound`) changes nothing a
hidden unit outputs, so :meth:`PackedLayer.from_ternary` refuses it: every score then fits ``int32``
with room to spare (``|a| <= 2 n_in + 1``), which the int32 outputs of both engines rely on.

This module is the reference numpy path, and the fast kernel's fallback; :mod:`bnn_core.kernels` holds the
fast one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

WORD_BITS = 64
#: Largest ``n_in`` a layer may have: keeps ``|a| <= 2 n_in + 1`` and ``c`` inside int32.
MAX_N_IN = (1 << 30) - 1


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


def bias_bound(n_in: int) -> int:
    """Largest ``|c|`` a layer of ``n_in`` inputs accepts: ``n_in + 1``.

    ``w . x`` lies in ``[-n_in, n_in]``, so with ``c >= n_in`` a hidden unit is always on and with
    ``c <= -(n_in + 1)`` never: nothing beyond ``[-(n_in + 1), n_in + 1]`` is needed (a folded threshold
    clips to it, see :meth:`bnn_core.networks.BitwiseMLP.export_layers`).
    """
    return n_in + 1


def bias_problem(bias: np.ndarray, n_in: int) -> str | None:
    """Why ``bias`` is not a valid vector of layer constants for ``n_in`` inputs (None if it is):
    integers (an integer dtype, or floats with integral values), each with ``|c| <= n_in + 1``."""
    bias = np.asarray(bias)
    bound = bias_bound(n_in)
    if bias.dtype == np.bool_ or not (np.issubdtype(bias.dtype, np.integer) or np.issubdtype(bias.dtype, np.floating)):
        return f"biases must be integers, got dtype {bias.dtype}"
    if bias.size == 0:
        return None
    if np.issubdtype(bias.dtype, np.floating) and not (np.isfinite(bias).all() and (bias == np.round(bias)).all()):
        return "biases must be integers (whole numbers)"
    # Compare as Python ints / float64: no integer dtype can wrap here.
    low, high = bias.min().item(), bias.max().item()
    if low < -bound or high > bound:
        return f"biases must be integers in [-(n_in + 1), n_in + 1] = [{-bound}, {bound}], got [{low}, {high}]"
    return None


def offset_problem(offset: np.ndarray, n_in_words: int) -> str | None:
    """Why ``a = 2 * agreements + offset`` might not fit the engines' int32 scores (None if it always does):
    ``0 <= agreements <= 64 * n_in_words``, so every ``offset`` and ``offset + 128 * n_in_words`` must fit.
    Any layer :meth:`PackedLayer.from_ternary` accepts passes; this catches hand-made offsets, which would
    otherwise wrap silently."""
    offset = np.asarray(offset)
    if offset.size == 0:
        return None
    low, high = int(offset.min()), int(offset.max()) + 2 * WORD_BITS * n_in_words
    info = np.iinfo(np.int32)
    if low < info.min or high > info.max:
        return f"offsets in [{low}, {int(offset.max())}] give scores beyond int32 over {n_in_words} input words"
    return None


class BiasCode(NamedTuple):
    """How a layer's constants are stored: ``c = low + step * u`` with ``u`` an unsigned ``bits``-bit field.

    Canonical (unique) form, :func:`bias_code`: ``low = min(c)``; ``step = gcd(c - low)`` (1 when all ``c``
    are equal); ``bits = bit_length(max(u))``, so 0 when all are equal and 1 for the paper's {-1, +1}
    (``low = -1``, ``step = 2``: ``u = (c + 1) / 2``, the v1 bias bit).
    """

    low: int
    step: int
    bits: int


def bias_code(bias: np.ndarray) -> tuple[BiasCode, np.ndarray]:
    """The canonical :class:`BiasCode` of integer constants ``c [n]`` and their fields ``u int64 [n]``."""
    c = np.asarray(bias).astype(np.int64)
    if c.size == 0:
        return BiasCode(0, 1, 0), c
    low = int(c.min())
    offsets = c - low
    step = math.gcd(*offsets.tolist()) or 1
    u = offsets // step
    return BiasCode(low, step, int(u.max()).bit_length()), u


@dataclass(frozen=True)
class PackedLayer:
    """One bitwise layer: sign plane and nonzero mask ``uint64 [n_out, words]``, constants ``int32 [n_out]``."""

    signs: np.ndarray
    mask: np.ndarray
    bias: np.ndarray
    n_in: int

    @property
    def n_out(self) -> int:
        return len(self.bias)

    @classmethod
    def from_ternary(cls, weights: np.ndarray, bias: np.ndarray) -> PackedLayer:
        """From ``weights[n_out, n_in]`` in {-1, 0, 1} and integer constants ``bias[n_out]`` with
        ``|c| <= n_in + 1`` (:func:`bias_problem`; ValueError otherwise): the paper's {-1, +1} or folded
        thresholds."""
        weights, bias = np.asarray(weights), np.asarray(bias)
        if weights.ndim != 2 or bias.shape != (weights.shape[0],):
            raise ValueError(f"weights {weights.shape} and bias {bias.shape} are not [n_out, n_in] and [n_out]")
        if weights.shape[1] > MAX_N_IN:
            raise ValueError(f"a layer takes at most {MAX_N_IN} inputs, got {weights.shape[1]}")
        problem = bias_problem(bias, weights.shape[1])
        if problem:
            raise ValueError(problem)
        return cls(
            signs=pack_bits(weights > 0),
            mask=pack_bits(weights != 0),
            bias=bias.astype(np.int32),
            n_in=weights.shape[1],
        )

    def to_ternary(self) -> tuple[np.ndarray, np.ndarray]:
        signs = unpack_bits(self.signs, self.n_in)
        mask = unpack_bits(self.mask, self.n_in)
        return (np.where(signs, 1, -1) * mask).astype(np.int8), self.bias.copy()

    @property
    def offset(self) -> np.ndarray:
        """``bias - popcount(m)`` per unit (int64): the constant term of ``a = 2 * agreements + offset``.

        Any integer bias folds in here, so both engines run the same loop whatever the constants are."""
        return self.bias.astype(np.int64) - np.bitwise_count(self.mask).sum(axis=1, dtype=np.int64)


def preactivations_numpy(
    x_words: np.ndarray, signs: np.ndarray, mask: np.ndarray, offset: np.ndarray, rows_per_chunk: int = 64
) -> np.ndarray:
    """Integer pre-activations ``int32 [n, n_out]`` for packed inputs ``x_words uint64 [n, W]``:

        a[i, o] = 2 * sum_w popcount(~(x[i, w] ^ signs[o, w]) & mask[o, w]) + offset[o]

    with planes ``signs``/``mask uint64 [n_out, W]`` and ``offset = bias - popcount(mask row)``
    (:attr:`PackedLayer.offset`, any integer bias). The sum is exact in int64; the result fits int32 for
    every layer :meth:`PackedLayer.from_ternary` accepts (``|a| <= 2 n_in + 1``). Rows go in chunks so the
    ``[rows, n_out, W]`` temporary stays small.
    """
    problem = offset_problem(offset, signs.shape[-1])
    if problem:
        raise ValueError(problem)
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
