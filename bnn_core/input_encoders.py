"""Input binarizers: raw 0..255 pixels -> network inputs (docs/method.md, section 2).

Each encoder maps ``pixels[n, p]`` (uint8) to ``features[n, f]`` (float32):

- ``threshold``: one bit per pixel, ``+1 if pixel > t else -1`` (f = p).
- ``lloyd_max``: a scalar Lloyd-Max quantizer with ``2**k`` levels fitted on the training pixels
  (Lloyd 1982; Max 1960); pixel -> level index ``q`` -> its ``k`` binary digits as bipolar bits. The
  layout is plane-major: features ``[j*p : (j+1)*p]`` hold bit ``k-1-j`` (most significant first) of
  every pixel's ``q`` (f = k * p).
- ``thermometer``: ``k`` fixed thresholds evenly spread over 0..255, ``t_j = floor(256 (j + 1) / (k + 1)) - 1``;
  plane ``j`` is ``+1 if pixel > t_j else -1`` (plane-major, f = k * p). A thermometer code is monotone
  in the pixel, so a unit's XNOR-popcount over the planes of a pixel is a step approximation of a linear
  function of it; with ``k = 1`` it is ``threshold`` at 127. (Our choice for the binary networks; the
  unary input coding of e.g. FINN-style and Rastegari-style binarized networks.)
- ``real``: ``pixel / 127.5 - 1`` in [-1, 1], for the real-valued baselines only (f = p).

An encoder is part of the model: :meth:`InputEncoder.to_dict` / :func:`encoder_from_dict` carry it
in plain JSON so an exported model takes raw pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from bnn_core.errors import ConfigError


@dataclass(frozen=True)
class ThresholdEncoder:
    """One bipolar bit per pixel: ``+1 if pixel > threshold else -1``."""

    threshold: int = 127
    name: ClassVar[str] = "threshold"
    is_binary: ClassVar[bool] = True

    def n_features(self, n_pixels: int) -> int:
        return n_pixels

    def encode_bits(self, pixels: np.ndarray) -> np.ndarray:
        """Boolean features, True for +1."""
        return np.asarray(pixels) > self.threshold

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return np.where(self.encode_bits(pixels), 1.0, -1.0).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, "threshold": int(self.threshold)}


@dataclass(frozen=True)
class LloydMaxEncoder:
    """``2**bits`` levels; a pixel's level index ``q`` is written as ``bits`` bipolar bit-planes."""

    levels: tuple[float, ...]

    name: ClassVar[str] = "lloyd_max"
    is_binary: ClassVar[bool] = True

    @property
    def bits(self) -> int:
        return int(np.log2(len(self.levels)))

    @property
    def thresholds(self) -> np.ndarray:
        """Decision boundaries: midpoints between neighbouring levels (the Lloyd-Max optimality condition)."""
        levels = np.asarray(self.levels)
        return (levels[:-1] + levels[1:]) / 2

    @classmethod
    def fit(cls, pixels: np.ndarray, bits: int, max_iter: int = 100) -> LloydMaxEncoder:
        """Lloyd's algorithm on the histogram of ``pixels`` (training split only): alternate
        boundaries = midpoints of levels, levels = centroids of their cells, until stable."""
        hist = np.bincount(np.asarray(pixels, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
        values = np.arange(256, dtype=np.float64)
        present = values[hist > 0]
        # Start evenly over the range the data occupies, so no level begins stranded outside it.
        levels = np.linspace(present.min(), present.max(), 2**bits) if present.size else np.linspace(0, 255, 2**bits)
        for _ in range(max_iter):
            cells = _cell_index((levels[:-1] + levels[1:]) / 2, values)
            mass = np.bincount(cells, weights=hist, minlength=len(levels))
            moment = np.bincount(cells, weights=hist * values, minlength=len(levels))
            # An empty cell keeps its level: it cannot move towards data it does not own.
            updated = np.where(mass > 0, moment / np.maximum(mass, 1e-12), levels)
            if np.allclose(updated, levels, atol=1e-9):
                break
            levels = updated
        return cls(levels=tuple(float(v) for v in levels))

    def n_features(self, n_pixels: int) -> int:
        return self.bits * n_pixels

    def level_index(self, pixels: np.ndarray) -> np.ndarray:
        return _cell_index(self.thresholds, np.asarray(pixels))

    def encode_bits(self, pixels: np.ndarray) -> np.ndarray:
        q = self.level_index(pixels)
        planes = [((q >> shift) & 1).astype(bool) for shift in range(self.bits - 1, -1, -1)]
        return np.concatenate(planes, axis=-1)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return np.where(self.encode_bits(pixels), 1.0, -1.0).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, "levels": [float(v) for v in self.levels]}


@dataclass(frozen=True)
class ThermometerEncoder:
    """``k`` bipolar bit-planes, plane ``j`` = ``pixel > thresholds[j]`` (increasing thresholds)."""

    thresholds: tuple[int, ...]

    name: ClassVar[str] = "thermometer"
    is_binary: ClassVar[bool] = True

    @classmethod
    def evenly_spaced(cls, planes: int) -> ThermometerEncoder:
        """``t_j = floor(256 (j + 1) / (planes + 1)) - 1``: 1 plane -> (127,), 3 planes -> (63, 127, 191)."""
        return cls(tuple(256 * (j + 1) // (planes + 1) - 1 for j in range(planes)))

    def n_features(self, n_pixels: int) -> int:
        return len(self.thresholds) * n_pixels

    def encode_bits(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.asarray(pixels)
        return np.concatenate([pixels > t for t in self.thresholds], axis=-1)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return np.where(self.encode_bits(pixels), 1.0, -1.0).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, "thresholds": [int(t) for t in self.thresholds]}


@dataclass(frozen=True)
class RealScaler:
    """Real-valued input ``pixel / 127.5 - 1``; not binary, so only real-valued networks take it."""

    name: ClassVar[str] = "real"
    is_binary: ClassVar[bool] = False

    def n_features(self, n_pixels: int) -> int:
        return n_pixels

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return (np.asarray(pixels, dtype=np.float32) / 127.5 - 1.0).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name}


InputEncoder = ThresholdEncoder | LloydMaxEncoder | ThermometerEncoder | RealScaler
ENCODER_METHODS = ("threshold", "lloyd_max", "thermometer", "real")


def _cell_index(thresholds: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index of the quantizer cell of each value: the number of boundaries strictly below it."""
    return np.searchsorted(thresholds, values, side="left").astype(np.int64)


def fit_input_encoder(
    method: str, train_pixels: np.ndarray, *, threshold: int = 127, bits: int = 1, planes: int = 3
) -> InputEncoder:
    """Build the encoder named ``method``; only ``lloyd_max`` looks at (training) pixels."""
    if method == "threshold":
        return ThresholdEncoder(threshold=threshold)
    if method == "thermometer":
        return ThermometerEncoder.evenly_spaced(planes)
    if method == "lloyd_max":
        return LloydMaxEncoder.fit(train_pixels, bits)
    if method == "real":
        return RealScaler()
    raise ConfigError(f"data.binarize.method: unknown method {method!r} (choose one of {', '.join(ENCODER_METHODS)})")


def encoder_from_dict(spec: dict[str, Any]) -> InputEncoder:
    """Inverse of ``to_dict``; raises ConfigError on anything it does not recognise."""
    method = spec.get("method")
    try:
        if method == "threshold":
            return ThresholdEncoder(threshold=int(spec["threshold"]))
        if method == "lloyd_max":
            levels = tuple(float(v) for v in spec["levels"])
            if len(levels) < 2 or len(levels) & (len(levels) - 1):
                raise ConfigError(f"lloyd_max encoder needs 2**k levels, got {len(levels)}")
            return LloydMaxEncoder(levels=levels)
        if method == "thermometer":
            thresholds = tuple(int(t) for t in spec["thresholds"])
            increasing = list(thresholds) == sorted(set(thresholds))
            if not thresholds or not increasing or not 0 <= thresholds[0] <= thresholds[-1] <= 254:
                raise ConfigError(f"thermometer encoder needs increasing thresholds in 0..254, got {list(thresholds)}")
            return ThermometerEncoder(thresholds=thresholds)
        if method == "real":
            return RealScaler()
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"malformed {method} input encoder ({err!r})") from None
    raise ConfigError(f"unknown input encoder {method!r}")
