"""Training-set augmentation by random shifts, on raw pixels before binarization (``augment.shift``).

Each epoch every training image is moved by its own random ``(dy, dx)``, drawn uniformly from the
integers ``[-shift, shift]**2``, the pixels uncovered at the border become 0 (background), and the
shifted pixels are then encoded by the same input encoder the binarize stage fitted, so the network sees
exactly what the encoder would make of a shifted image. Shifting before binarization matters for
multi-bit encoders and keeps the augmentation independent of the feature layout (lloyd_max writes
bit-planes).

The shifts of epoch ``e`` come from ``numpy.random.default_rng((seed, e))``: the same seed and epoch
give the same images on any machine, a new epoch gives new shifts, and torch's random generators (the
shuffling, dropout) are not touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bnn_core.errors import DataError
from bnn_core.input_encoders import InputEncoder


def image_side(n_pixels: int) -> int:
    """The side of a square image of ``n_pixels`` pixels; DataError when the images are not square."""
    side = math.isqrt(n_pixels)
    if side * side != n_pixels:
        raise DataError(f"augment.shift needs square images; {n_pixels} pixels is not a square number")
    return side


def shift_images(pixels: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Move each square image by its own integer offset, filling the uncovered border with zeros.

    ``pixels``: ``[n, side * side]`` (row-major images, any dtype); ``shifts``: ``[n, 2]`` integers
    ``(dy, dx)``. Returns an array like ``pixels`` with

        ``out[k, i, j] = img_k[i - dy_k, j - dx_k]`` when that pixel exists, else 0,

    i.e. a positive ``dy`` moves the content down and a positive ``dx`` moves it right; what leaves the
    frame is lost. Done by padding every image with ``m = max |shift|`` zeros on each side and cutting the
    ``side x side`` window at ``(m - dy, m - dx)``, once per distinct offset (at most ``(2m + 1) ** 2``
    groups), so the cost is a few passes over the data whatever ``n`` is.
    """
    pixels = np.asarray(pixels)
    shifts = np.asarray(shifts, dtype=np.int64).reshape(-1, 2)
    if len(shifts) != len(pixels):
        raise ValueError(f"{len(shifts)} shifts for {len(pixels)} images")
    side = image_side(pixels.shape[1])
    margin = int(np.abs(shifts).max(initial=0))
    if margin == 0:
        return pixels.copy()
    images = pixels.reshape(-1, side, side)
    padded = np.pad(images, ((0, 0), (margin, margin), (margin, margin)))
    out = np.empty_like(images)
    offsets, group = np.unique(shifts, axis=0, return_inverse=True)
    for g, (dy, dx) in enumerate(offsets):
        members = np.flatnonzero(group.ravel() == g)
        top, left = margin - dy, margin - dx
        out[members] = padded[members, top : top + side, left : left + side]
    return out.reshape(pixels.shape)


def random_shifts(n: int, max_shift: int, seed: int, epoch: int) -> np.ndarray:
    """``[n, 2]`` offsets ``(dy, dx)``, each uniform on the integers ``-max_shift..max_shift``, from
    ``numpy.random.default_rng((seed, epoch))``.

    ``seed`` is taken modulo ``2**64`` (numpy's seed sequence wants non-negative integers; a negative
    config seed still maps to one fixed stream).
    """
    rng = np.random.default_rng((seed % 2**64, epoch))
    return rng.integers(-max_shift, max_shift, size=(n, 2), endpoint=True)


@dataclass(frozen=True)
class ShiftAugmentation:
    """The training inputs of each epoch: ``encoder.encode(shift_images(pixels, random_shifts(...)))``.

    ``pixels``: the raw ``[n, side * side]`` uint8 training images, in the order of the training labels.
    """

    pixels: np.ndarray
    encoder: InputEncoder
    max_shift: int
    seed: int

    def __post_init__(self) -> None:
        if self.max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {self.max_shift}")
        image_side(self.pixels.shape[1])  # fail at construction, not at the first epoch

    @property
    def n_features(self) -> int:
        return self.encoder.n_features(self.pixels.shape[1])

    def shifts(self, epoch: int) -> np.ndarray:
        return random_shifts(len(self.pixels), self.max_shift, self.seed, epoch)

    def features(self, epoch: int) -> np.ndarray:
        """The encoded (float32) training inputs of ``epoch``."""
        return self.encoder.encode(shift_images(self.pixels, self.shifts(epoch)))
