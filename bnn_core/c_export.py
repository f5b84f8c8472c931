"""C export: a :class:`~bnn_core.bitwise_model.BitwiseModel` as a dependency-free C99 library.

:func:`c_sources` turns a model into the text of four files (nothing is written here; the entry point
``pipeline/export.py`` writes them). The generated code runs the model on raw uint8 pixels with integer
arithmetic only and gives exactly the classes and the integer scores of :meth:`BitwiseModel.predict` and
:meth:`BitwiseModel.forward_counts` (docs/method.md, section 6):

- ``bnn_model.h``: the API, the model's sizes as macros, and, inside ``#ifdef BNN_MODEL_DATA`` (defined
  only by ``bnn_model.c``, so the data is compiled once), the model as ``static const`` arrays, which a
  microcontroller toolchain places in flash (``.rodata``). Its header comment states the flash bytes of
  that data and the RAM bytes of the static activation buffers (:func:`c_memory`).
- ``bnn_model.c``: ``int bnn_predict(const uint8_t *pixels, int32_t *scores)`` (one image of
  ``BNN_N_PIXELS`` bytes -> class id; the ``BNN_N_CLASSES`` integer scores into ``scores`` unless it is
  NULL) and ``void bnn_predict_batch(const uint8_t *pixels, int32_t n, int32_t *classes, int32_t *scores)``
  (``n`` images row-major; ``scores`` NULL or ``[n][BNN_N_CLASSES]``). No heap, no floating point, no
  library calls: the activation buffers are static arrays sized at generation time, so the functions are
  not reentrant (one call at a time).
- ``main.c``: reads images of ``BNN_N_PIXELS`` raw bytes from stdin until EOF and prints one class per
  line; with ``-s`` each line is the class followed by the scores, space-separated. A truncated last image
  is an error (exit status 1).
- ``Makefile``: ``make`` builds ``bnn_predict`` with ``$(CC)`` (default ``cc``) and ``$(CFLAGS)``
  (default ``-O2 -std=c99 -Wall -Wextra -pedantic``); ``make libbnn_model.so`` builds the shared library.

The math, per layer with ``n_in`` inputs (bit 1 = +1, bit 0 = -1; feature ``j`` is bit ``j % W`` of word
``j // W``, ``W = word_bits``, rows padded to whole words with 0 bits), for a unit with sign plane ``s``,
nonzero mask ``m``, ``nnz = popcount(m)`` nonzero weights and integer constant ``c`` (binary bias or folded
threshold, ``|c| <= n_in + 1``; docs/method.md, section 8):

    d = sum_w popcount((x[w] ^ s[w]) & m[w])      # disagreements over the nonzero weights
    a = k - 2 d,  with k = c + nnz                  # = 2 * agreements - nnz + c, the packed engine's a
    hidden unit: bit a >= 0 (sign(0) = +1);  output layer: score a;  class = first maximum of the scores

``k`` is stored per unit as ``int32_t`` (``|a| <= 2 n_in + 1`` fits int32 for every accepted layer). A
layer without zero weights stores no mask: there ``m`` is all ones over the real bits and the padding bits
of ``x`` and ``s`` are both 0, so ``d = popcount(x ^ s)`` (the unmasked fast path of section 6). Zero
weights have sign bit 0, so ``(x ^ s) & m`` never counts them.

The input binarizer (docs/method.md, section 2) is any binary encoder that maps each pixel on its own to
``P`` bit-planes, plane-major (feature ``j * n_pixels + p`` is plane ``j`` of pixel ``p``): ``threshold``
(``P = 1``), ``thermometer``, ``lloyd_max``. It is stored as its exact truth table, one 256-bit row per
plane (``bnn_input_code[j][v >> 3] >> (v & 7) & 1`` is plane ``j``'s bit for pixel value ``v``), built by
running the model's own encoder on the 256 pixel values, so the float Lloyd-Max boundaries need no float
code in C. 32 bytes per plane.

Words are ``uint32_t`` (``word_bits=32``: native on 32-bit microcontrollers) or ``uint64_t`` (64).
Popcount is ``__builtin_popcount`` / ``__builtin_popcountll`` under GCC and Clang, and a portable SWAR
popcount elsewhere or when ``BNN_PORTABLE_POPCOUNT`` is defined.

Benchmarks: ``make -C <folder> libbnn_model.so CFLAGS="-O3 -march=native"`` builds the shared library
(the Makefile adds ``-shared -fPIC``; :data:`SHARED_LIBRARY`, :data:`SHARED_LIBRARY_CFLAGS`), and
:func:`bind_batch` wraps its ``bnn_predict_batch`` for numpy through ctypes.
"""

from __future__ import annotations

import ctypes
import json
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bnn_core.bitwise_model import BitwiseModel
from bnn_core.packed import unpack_bits

#: Word sizes the generated code can use.
WORD_SIZES = (32, 64)
#: The files :func:`c_sources` returns.
C_FILES = ("bnn_model.h", "bnn_model.c", "main.c", "Makefile")
#: The generated Makefile's shared-library target, and the flags a benchmark should build it with.
SHARED_LIBRARY = "libbnn_model.so"
SHARED_LIBRARY_CFLAGS = "-O3 -march=native"
#: Bytes of one plane's truth table over the 256 pixel values.
_CODE_ROW_BYTES = 256 // 8


@dataclass(frozen=True)
class CLayer:
    """One layer in the generated code's layout: ``words = ceil(n_in / word_bits)`` words per row."""

    n_in: int
    n_out: int
    words: int
    signs: np.ndarray  # uint32/uint64 [n_out, words]
    mask: np.ndarray | None  # same shape; None when the layer has no zero weights
    k: np.ndarray  # int64 [n_out]: c + nnz, so a = k - 2 d


@dataclass(frozen=True)
class CMemory:
    """Bytes the generated library needs: ``flash`` = its const data, ``ram`` = its static buffers.

    ``flash = weights + masks + constants + input_code``; ``ram = activations + scores``, where
    ``activations`` are the two ping-pong word buffers (layer ``l`` reads buffer ``l % 2``, each sized for
    the widest input it holds) and ``scores`` the ``int32`` buffer used when ``bnn_predict`` gets NULL.
    Code size and stack (a few words) come on top.
    """

    weights: int
    masks: int
    constants: int
    input_code: int
    activations: int
    scores: int

    @property
    def flash(self) -> int:
        return self.weights + self.masks + self.constants + self.input_code

    @property
    def ram(self) -> int:
        return self.activations + self.scores


def _check_word_bits(word_bits: int) -> None:
    if word_bits not in WORD_SIZES:
        raise ValueError(f"word_bits must be one of {WORD_SIZES}, got {word_bits!r}")


def _pack_words(bits: np.ndarray, word_bits: int) -> np.ndarray:
    """Booleans ``[rows, n]`` -> ``uint{word_bits} [rows, ceil(n / word_bits)]``, feature ``j`` at bit
    ``j % word_bits`` of word ``j // word_bits``, padding bits 0 (the packed engine's order at any width)."""
    rows, n = bits.shape
    words = -(-n // word_bits)
    padded = np.zeros((rows, words * word_bits), dtype=bool)
    padded[:, :n] = bits
    packed = np.packbits(padded, axis=1, bitorder="little")
    return np.ascontiguousarray(packed).view(f"<u{word_bits // 8}").reshape(rows, words)


def c_layers(model: BitwiseModel, word_bits: int) -> list[CLayer]:
    """The model's layers repacked into ``word_bits``-bit words, with ``k = c + nnz`` per unit."""
    _check_word_bits(word_bits)
    layers = []
    for layer in model.network.layers:
        signs = unpack_bits(layer.signs, layer.n_in)
        mask = unpack_bits(layer.mask, layer.n_in)
        nnz = mask.sum(axis=1, dtype=np.int64)
        dense = bool(mask.all())
        layers.append(
            CLayer(
                n_in=layer.n_in,
                n_out=layer.n_out,
                words=-(-layer.n_in // word_bits),
                # Sign bits of zero weights are 0 already (pack_bits(weights > 0)); masking keeps that true.
                signs=_pack_words(signs & mask, word_bits),
                mask=None if dense else _pack_words(mask, word_bits),
                k=layer.bias.astype(np.int64) + nnz,
            )
        )
    return layers


def input_code(model: BitwiseModel) -> np.ndarray:
    """The encoder's truth table ``uint8 [planes, 32]``: bit ``v % 8`` of byte ``v // 8`` of row ``j`` is
    plane ``j``'s bit for pixel value ``v``.

    Raises ValueError if the encoder is not pixelwise and plane-major (checked on a probe image whose
    pixels differ from their neighbours), since the table could not represent it.
    """
    encoder = model.encoder
    planes = encoder.n_features(1)
    values = np.arange(256, dtype=np.uint8)
    table = np.asarray(encoder.encode_bits(values[None, :]), dtype=bool).reshape(planes, 256)
    probe = np.random.default_rng(0).permutation(values)[None, :]
    if not np.array_equal(np.asarray(encoder.encode_bits(probe), dtype=bool).reshape(planes, 256), table[:, probe[0]]):
        raise ValueError(f"input encoder {encoder.name!r} is not pixelwise plane-major; the C export cannot code it")
    return np.packbits(table, axis=1, bitorder="little")


def c_memory(model: BitwiseModel, word_bits: int) -> CMemory:
    """Flash and RAM bytes of the library :func:`c_sources` generates (:class:`CMemory`)."""
    return _memory(model, c_layers(model, word_bits), word_bits)


def _memory(model: BitwiseModel, layers: list[CLayer], word_bits: int) -> CMemory:
    word_bytes = word_bits // 8
    buffers = [0, 0]
    for i, layer in enumerate(layers):
        buffers[i % 2] = max(buffers[i % 2], layer.words)
    return CMemory(
        weights=sum(layer.signs.size for layer in layers) * word_bytes,
        masks=sum(layer.mask.size for layer in layers if layer.mask is not None) * word_bytes,
        constants=sum(layer.n_out for layer in layers) * 4,
        input_code=model.encoder.n_features(1) * _CODE_ROW_BYTES,
        activations=sum(buffers) * word_bytes,  # buffer 1 is not declared when there is no hidden layer
        scores=model.n_classes * 4,
    )


def _c_array(ctype: str, name: str, values: np.ndarray, literal: Callable[[int], str], per_line: int) -> str:
    flat = [literal(int(v)) for v in np.asarray(values).ravel().tolist()]
    lines = [", ".join(flat[i : i + per_line]) for i in range(0, len(flat), per_line)]
    body = ",\n    ".join(lines)
    return f"static const {ctype} {name}[{len(flat)}] = {{\n    {body}\n}};\n"


def _word_literal(word_bits: int) -> Callable[[int], str]:
    if word_bits == 64:
        # Suffix u: the literal takes the first unsigned type that holds it (C99 6.4.4.1), so no ull.
        return lambda v: f"0x{v:016x}u"
    return lambda v: f"0x{v:08x}u"


def _header(model: BitwiseModel, word_bits: int, layers: list[CLayer], memory: CMemory) -> str:
    sizes = " -> ".join(str(n) for n in model.layer_sizes)
    # Wrapped: a lloyd_max encoder lists up to 256 levels.
    encoder = "\n *   ".join(textwrap.wrap(json.dumps(model.encoder.to_dict(), sort_keys=True), 96))
    layer_lines = "\n".join(
        f" *   layer {i}: {layer.n_in} -> {layer.n_out}, {layer.words} words/row, "
        f"{'dense (signs only)' if layer.mask is None else 'sparse (signs + mask)'}"
        for i, layer in enumerate(layers)
    )
    planes = model.encoder.n_features(1)
    word_bytes = word_bits // 8
    buffer_words = [max((layer.words for layer in layers[p::2]), default=0) for p in (0, 1)]
    literal = _word_literal(word_bits)
    data = []
    data.append(_c_array("uint8_t", "bnn_input_code", input_code(model), lambda v: f"0x{v:02x}", 16))
    for i, layer in enumerate(layers):
        data.append(_c_array("bnn_word_t", f"bnn_signs_{i}", layer.signs, literal, 64 // word_bits * 4))
        if layer.mask is not None:
            data.append(_c_array("bnn_word_t", f"bnn_mask_{i}", layer.mask, literal, 64 // word_bits * 4))
        data.append(_c_array("int32_t", f"bnn_k_{i}", layer.k, str, 12))
    data_text = "\n".join(data)
    return f"""\
/* bnn_model.h: a bitwise neural network (Kim & Smaragdis 2016) exported by bitwise-nn
 * (bnn_core/c_export.py). Generated file; do not edit.
 *
 * Network: {sizes} ({model.n_pixels} pixels x {planes} input bit-plane(s) -> {model.n_classes} classes)
 * Input encoder: {encoder}
{layer_lines}
 * Words: {word_bits}-bit (uint{word_bits}_t)
 *
 * Flash (const data): {memory.flash} bytes = weights {memory.weights} + masks {memory.masks}
 *   + constants {memory.constants} + input code {memory.input_code}
 * RAM (static buffers): {memory.ram} bytes = activations {memory.activations}
 *   ({buffer_words[0]} + {buffer_words[1]} words of {word_bytes} bytes) + scores {memory.scores}
 *   (used only when bnn_predict gets scores == NULL); plus code and a few words of stack.
 *
 * Per unit: d = sum_w popcount((x[w] ^ signs[w]) & mask[w]) (no mask: popcount(x[w] ^ signs[w])),
 * a = k - 2 d with k = bias + number of nonzero weights. A hidden unit outputs bit (a >= 0); the
 * output layer's a are the class scores, and the class is the first maximum. Bit 1 = +1, bit 0 = -1;
 * input j is bit j % {word_bits} of word j / {word_bits}; rows are padded with 0 bits.
 * Input: plane p of pixel value v is bit (v & 7) of bnn_input_code[p * 32 + (v >> 3)]; input j of
 * layer 0 is plane j / BNN_N_PIXELS of pixel j % BNN_N_PIXELS.
 *
 * Use: #include "bnn_model.h" and link bnn_model.c. Not reentrant (static buffers): one call at a time.
 */
#ifndef BNN_MODEL_H
#define BNN_MODEL_H

#include <stdint.h>

#define BNN_WORD_BITS {word_bits}
#define BNN_N_PIXELS {model.n_pixels}
#define BNN_N_PLANES {planes}
#define BNN_N_INPUTS {model.network.n_in}
#define BNN_N_CLASSES {model.n_classes}
#define BNN_N_LAYERS {len(layers)}
#define BNN_FLASH_BYTES {memory.flash}
#define BNN_RAM_BYTES {memory.ram}

#ifdef __cplusplus
extern "C" {{
#endif

/* One image of BNN_N_PIXELS raw pixels -> its class in 0..BNN_N_CLASSES-1. If scores is not NULL it
 * receives the BNN_N_CLASSES integer scores (the model's forward counts). */
int bnn_predict(const uint8_t *pixels, int32_t *scores);

/* n images, row-major [n][BNN_N_PIXELS] -> classes[n]; scores is NULL or [n][BNN_N_CLASSES]. */
void bnn_predict_batch(const uint8_t *pixels, int32_t n, int32_t *classes, int32_t *scores);

#ifdef __cplusplus
}}
#endif

#ifdef BNN_MODEL_DATA
/* The model, compiled into bnn_model.c only. */
typedef uint{word_bits}_t bnn_word_t;
#define BNN_BUFFER0_WORDS {buffer_words[0]}
#define BNN_BUFFER1_WORDS {buffer_words[1]}

{data_text}
#endif /* BNN_MODEL_DATA */

#endif /* BNN_MODEL_H */
"""


_C_CORE = """\
/* bnn_model.c: inference for the network in bnn_model.h (generated by bitwise-nn; do not edit).
 * Integer-only, no heap, no library calls. */
#define BNN_MODEL_DATA
#include "bnn_model.h"

#include <limits.h>
#include <stddef.h>

#if !defined(BNN_PORTABLE_POPCOUNT) && (defined(__GNUC__) || defined(__clang__))
#  if BNN_WORD_BITS == 64
#    define BNN_POPCOUNT(v) __builtin_popcountll(v)
#  elif UINT_MAX >= 0xffffffffu
#    define BNN_POPCOUNT(v) __builtin_popcount(v)
#  else /* 16-bit int: unsigned long holds 32 bits */
#    define BNN_POPCOUNT(v) __builtin_popcountl(v)
#  endif
#else
/* SWAR popcount (Hacker's Delight 5-1); the casts cut the 64-bit masks down for 32-bit words. */
static int32_t bnn_popcount(bnn_word_t v)
{
    v = v - ((v >> 1) & (bnn_word_t)0x5555555555555555ull);
    v = (v & (bnn_word_t)0x3333333333333333ull) + ((v >> 2) & (bnn_word_t)0x3333333333333333ull);
    v = (v + (v >> 4)) & (bnn_word_t)0x0f0f0f0f0f0f0f0full;
    return (int32_t)((bnn_word_t)(v * (bnn_word_t)0x0101010101010101ull) >> (BNN_WORD_BITS - 8));
}
#  define BNN_POPCOUNT(v) bnn_popcount(v)
#endif

static bnn_word_t bnn_buffer0[BNN_BUFFER0_WORDS];
#if BNN_N_LAYERS > 1 /* a model without hidden layers needs no second buffer and no hidden layer code */
static bnn_word_t bnn_buffer1[BNN_BUFFER1_WORDS];
#endif
static int32_t bnn_scores[BNN_N_CLASSES];

/* Raw pixels -> layer 0's input words: input j = plane j / BNN_N_PIXELS of pixel j % BNN_N_PIXELS.
 * Bits are shifted into an accumulator and stored a whole word at a time, so padding bits are 0. */
static void bnn_encode(const uint8_t *pixels, bnn_word_t *x)
{
    bnn_word_t acc = 0;
    int bit = 0;
    int32_t plane, p;
    for (plane = 0; plane < BNN_N_PLANES; ++plane) {
        const uint8_t *code = bnn_input_code + (size_t)plane * 32u;
        for (p = 0; p < BNN_N_PIXELS; ++p) {
            const uint8_t v = pixels[p];
            acc |= (bnn_word_t)((code[v >> 3] >> (v & 7u)) & 1u) << bit;
            if (++bit == BNN_WORD_BITS) {
                *x++ = acc;
                acc = 0;
                bit = 0;
            }
        }
    }
    if (bit != 0) {
        *x = acc;
    }
}

/* a = k - 2 d for unit `unit` of a layer with `words` words per row; mask NULL: no zero weights. */
static int32_t bnn_unit(const bnn_word_t *x, int32_t words, int32_t unit, const bnn_word_t *signs,
                        const bnn_word_t *mask, const int32_t *k)
{
    const bnn_word_t *s = signs + (size_t)unit * (size_t)words;
    int32_t d = 0;
    int32_t w;
    if (mask == NULL) {
        for (w = 0; w < words; ++w) {
            d += (int32_t)BNN_POPCOUNT(x[w] ^ s[w]);
        }
    } else {
        const bnn_word_t *m = mask + (size_t)unit * (size_t)words;
        for (w = 0; w < words; ++w) {
            d += (int32_t)BNN_POPCOUNT((x[w] ^ s[w]) & m[w]);
        }
    }
    return k[unit] - 2 * d;
}

#if BNN_N_LAYERS > 1
/* A hidden layer: output bit o = (a_o >= 0), packed like the input (padding bits 0). */
static void bnn_hidden(const bnn_word_t *x, int32_t words, int32_t n_out, const bnn_word_t *signs,
                       const bnn_word_t *mask, const int32_t *k, bnn_word_t *out)
{
    bnn_word_t acc = 0;
    int bit = 0;
    int32_t o;
    for (o = 0; o < n_out; ++o) {
        if (bnn_unit(x, words, o, signs, mask, k) >= 0) {
            acc |= (bnn_word_t)1 << bit;
        }
        if (++bit == BNN_WORD_BITS) {
            *out++ = acc;
            acc = 0;
            bit = 0;
        }
    }
    if (bit != 0) {
        *out = acc;
    }
}
#endif

/* The output layer: the integer scores a_o. */
static void bnn_output(const bnn_word_t *x, int32_t words, int32_t n_out, const bnn_word_t *signs,
                       const bnn_word_t *mask, const int32_t *k, int32_t *scores)
{
    int32_t o;
    for (o = 0; o < n_out; ++o) {
        scores[o] = bnn_unit(x, words, o, signs, mask, k);
    }
}

int bnn_predict(const uint8_t *pixels, int32_t *scores)
{
    int32_t *s = scores != NULL ? scores : bnn_scores;
    int best = 0;
    int o;
    bnn_encode(pixels, bnn_buffer0);
@@LAYERS@@
    /* First maximum: ties go to the lowest class index, as numpy's argmax. */
    for (o = 1; o < BNN_N_CLASSES; ++o) {
        if (s[o] > s[best]) {
            best = o;
        }
    }
    return best;
}

void bnn_predict_batch(const uint8_t *pixels, int32_t n, int32_t *classes, int32_t *scores)
{
    int32_t i;
    for (i = 0; i < n; ++i) {
        classes[i] = bnn_predict(pixels + (size_t)i * BNN_N_PIXELS,
                                 scores != NULL ? scores + (size_t)i * BNN_N_CLASSES : NULL);
    }
}
"""

_MAIN = """\
/* main.c: raw uint8 images (BNN_N_PIXELS bytes each) on stdin -> one class per line on stdout.
 * Usage: bnn_predict [-s] < images.raw   (-s: each line is the class, then the scores)
 * Generated by bitwise-nn; do not edit. */
#include <stdio.h>
#include <string.h>

#include "bnn_model.h"

int main(int argc, char **argv)
{
    static uint8_t pixels[BNN_N_PIXELS];
    int32_t scores[BNN_N_CLASSES];
    int with_scores = 0;
    int i;
    for (i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "-s") == 0) {
            with_scores = 1;
        } else {
            fprintf(stderr, "usage: %s [-s] < images (%d raw uint8 pixels each)\\n", argv[0], BNN_N_PIXELS);
            return 2;
        }
    }
    for (;;) {
        size_t got = fread(pixels, 1, BNN_N_PIXELS, stdin);
        if (got == 0) {
            break;
        }
        if (got < BNN_N_PIXELS) {
            fprintf(stderr, "bnn_predict: truncated image at end of input (%lu of %d bytes)\\n",
                    (unsigned long)got, BNN_N_PIXELS);
            return 1;
        }
        if (with_scores) {
            int c = bnn_predict(pixels, scores);
            printf("%d", c);
            for (i = 0; i < BNN_N_CLASSES; ++i) {
                printf(" %ld", (long)scores[i]);
            }
            putchar('\\n');
        } else {
            printf("%d\\n", bnn_predict(pixels, NULL));
        }
    }
    if (ferror(stdin)) {
        perror("bnn_predict: stdin");
        return 1;
    }
    return fflush(stdout) == 0 ? 0 : 1;
}
"""

_MAKEFILE = """\
# Build the exported bitwise network (generated by bitwise-nn; do not edit).
#   make                      bnn_predict: raw images on stdin -> classes (-s: and scores)
#   make libbnn_model.so      shared library (bnn_predict, bnn_predict_batch), e.g. for ctypes;
#                             benchmarks: make libbnn_model.so CFLAGS="-O3 -march=native"
#   make CC=arm-none-eabi-gcc CFLAGS="-mcpu=cortex-m7 -mthumb -Os" bnn_model.o   (microcontrollers)
CC ?= cc
CFLAGS ?= -O2 -std=c99 -Wall -Wextra -pedantic

all: bnn_predict

bnn_predict: main.c bnn_model.c bnn_model.h
\t$(CC) $(CFLAGS) -o $@ main.c bnn_model.c $(LDFLAGS)

bnn_model.o: bnn_model.c bnn_model.h
\t$(CC) $(CFLAGS) -c -o $@ bnn_model.c

libbnn_model.so: bnn_model.c bnn_model.h
\t$(CC) $(CFLAGS) -shared -fPIC -o $@ bnn_model.c $(LDFLAGS)

clean:
\trm -f bnn_predict bnn_model.o libbnn_model.so

.PHONY: all clean
"""


def _layer_calls(layers: list[CLayer]) -> str:
    """The forward pass unrolled: layer ``i`` reads buffer ``i % 2`` and writes buffer ``(i + 1) % 2``,
    the last writes the scores. Constant arguments let the compiler specialise each call."""
    buffers = ("bnn_buffer0", "bnn_buffer1")
    calls = []
    for i, layer in enumerate(layers):
        mask = f"bnn_mask_{i}" if layer.mask is not None else "NULL"
        args = f"{buffers[i % 2]}, {layer.words}, {layer.n_out}, bnn_signs_{i}, {mask}, bnn_k_{i}"
        if i < len(layers) - 1:
            calls.append(f"    bnn_hidden({args}, {buffers[(i + 1) % 2]});")
        else:
            calls.append(f"    bnn_output({args}, s);")
    return "\n".join(calls)


def c_sources(model: BitwiseModel, word_bits: int = 32) -> dict[str, str]:
    """The C99 library for ``model`` with ``word_bits``-bit words: ``{filename: text}`` for :data:`C_FILES`.

    ``bnn_predict`` in the generated code returns ``model.predict`` and its scores are
    ``model.forward_counts`` exactly (see the module docstring for the math). Raises ValueError for a word
    size not in :data:`WORD_SIZES` or an encoder the export cannot code.
    """
    layers = c_layers(model, word_bits)
    memory = _memory(model, layers, word_bits)
    return {
        "bnn_model.h": _header(model, word_bits, layers, memory),
        "bnn_model.c": _C_CORE.replace("@@LAYERS@@", _layer_calls(layers)),
        "main.c": _MAIN,
        "Makefile": _MAKEFILE,
    }


def bind_batch(
    library: ctypes.CDLL, n_pixels: int, n_classes: int
) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Wrap ``bnn_predict_batch`` of a loaded :data:`SHARED_LIBRARY` for numpy.

    Returns ``run(pixels uint8 [n, n_pixels]) -> (classes int64 [n], scores int32 [n, n_classes])``.
    The library's buffers are static: call ``run`` from one thread at a time.
    """
    entry = library.bnn_predict_batch
    entry.restype = None
    entry.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p]

    def run(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        if pixels.ndim != 2 or pixels.shape[1] != n_pixels:
            raise ValueError(f"expected pixels [n, {n_pixels}], got {pixels.shape}")
        n = len(pixels)
        classes = np.empty(n, dtype=np.int32)
        scores = np.empty((n, n_classes), dtype=np.int32)
        entry(pixels.ctypes.data, n, classes.ctypes.data, scores.ctypes.data)
        return classes.astype(np.int64), scores

    return run
