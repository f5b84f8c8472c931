"""The deployed bitwise model: raw 0..255 pixels in, class ids out.

A :class:`BitwiseModel` is the input binarizer (a binary encoder of :mod:`bnn_core.input_encoders`)
plus a :class:`~bnn_core.packed.PackedNetwork` and free JSON metadata. For pixels ``p uint8 [n, n_pixels]``:

    x = encoder.encode_bits(p)                    # bool [n, n_in], True = +1
    counts = network.forward_counts(x)            # int32 [n, n_classes]; hidden units output a >= 0
    classes = argmax(counts), ties to the lowest index

where every layer computes ``a = W z + c`` with ``W`` ternary and ``c`` one integer per unit: the paper's
binary bias in {-1, +1}, or ``-threshold`` of a network whose batch norm was folded into thresholds, with
``|c| <= n_in + 1`` (:func:`bnn_core.packed.bias_bound`: beyond that a hidden unit's output is constant).

computed by the fast kernel (:mod:`bnn_core.kernels`, built on first use). The model checks itself when
built (:func:`layer_problem`), so a model that exists can be run and saved. Saving and loading live in
:mod:`bnn_core.model_file`, which this module does not need.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from bnn_core.errors import DataError
from bnn_core.input_encoders import LloydMaxEncoder, ThresholdEncoder
from bnn_core.packed import MAX_N_IN, PackedNetwork, bias_problem

if TYPE_CHECKING:
    from bnn_core.kernels import KernelNetwork

BinaryEncoder = ThresholdEncoder | LloydMaxEncoder


def layer_problem(encoder: Any, n_pixels: int, dims: list[tuple[int, int]]) -> str | None:
    """Why an encoder and layer dimensions ``[(n_in, n_out), ...]`` do not form a model (None if they do).

    The one check shared by :class:`BitwiseModel` and the model-file loader, whose messages both repeat.
    """
    if not dims:
        return "a model needs at least one layer"
    if not getattr(encoder, "is_binary", False):
        return f"input encoder {getattr(encoder, 'name', encoder)!r} is not binary; a bitwise model needs bit inputs"
    for i in range(len(dims) - 1):
        if dims[i][1] != dims[i + 1][0]:
            return (
                f"layer shapes disagree: layer {i} has {dims[i][1]} outputs "
                f"but layer {i + 1} has {dims[i + 1][0]} inputs"
            )
    features = encoder.n_features(n_pixels)
    if features != dims[0][0]:
        return (
            f"input encoder {encoder.name!r} turns {n_pixels} pixels into {features} bits "
            f"but layer 0 takes {dims[0][0]} inputs"
        )
    return None


def _is_plain_json(value: Any) -> bool:
    """True if ``value`` comes back equal from a JSON round trip: str keys; lists, finite numbers, strings,
    bools, null. Anything else (tuples, numpy scalars, NaN) would change or fail when the model is saved."""
    try:
        return json.loads(json.dumps(value, allow_nan=False)) == value
    except (TypeError, ValueError, RecursionError):
        return False


@dataclass(frozen=True)
class BitwiseModel:
    """Input binarizer + packed network: raw uint8 pixels ``[n, n_pixels]`` in, class ids out."""

    encoder: BinaryEncoder
    network: PackedNetwork
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        layers = self.network.layers
        dims = [(layer.n_in, layer.n_out) for layer in layers]
        # The pixel count is implied by layer 0; taking it by floor division makes a layer 0 that no whole
        # number of pixels fills fail the encoder check below.
        per_pixel = self.encoder.n_features(1) if getattr(self.encoder, "is_binary", False) else 1
        problem = layer_problem(self.encoder, dims[0][0] // per_pixel if dims else 0, dims)
        if problem:
            raise ValueError(problem)
        for i, layer in enumerate(layers):
            if layer.n_in > MAX_N_IN:
                raise ValueError(f"layer {i}: at most {MAX_N_IN} inputs, got {layer.n_in}")
            # Integer dtype required here (from_ternary and the loader give int32): a float vector would
            # reach the engines, which add it as an integer offset.
            problem = bias_problem(layer.bias, layer.n_in)
            if problem is None and not np.issubdtype(layer.bias.dtype, np.integer):
                problem = f"biases must have an integer dtype, got {layer.bias.dtype}"
            if problem:
                raise ValueError(f"layer {i}: {problem}")
        if not isinstance(self.metadata, dict) or not _is_plain_json(self.metadata):
            raise ValueError("metadata must be a JSON object (str keys; lists, numbers, strings, bools, null)")

    @classmethod
    def from_layers(
        cls,
        encoder: BinaryEncoder,
        layers: list[tuple[np.ndarray, np.ndarray]],
        metadata: dict[str, Any] | None = None,
    ) -> BitwiseModel:
        """From ternary ``W [n_out, n_in]`` in {-1, 0, 1} and integer constants ``c [n_out]`` with
        ``|c| <= n_in + 1`` (the paper's {-1, +1}, or folded thresholds), input layer first."""
        for i, (w, b) in enumerate(layers):
            w, b = np.asarray(w), np.asarray(b)
            if w.ndim != 2 or b.shape != (w.shape[0],):
                raise ValueError(f"layer {i}: weights {w.shape} and bias {b.shape} are not [n_out, n_in] and [n_out]")
            if not np.isin(w, (-1, 0, 1)).all():
                raise ValueError(f"layer {i}: weights must be -1, 0 or +1")
            problem = bias_problem(b, w.shape[1])
            if problem:
                raise ValueError(f"layer {i}: {problem}")
        return cls(encoder, PackedNetwork.from_ternary(list(layers)), dict(metadata or {}))

    @property
    def n_pixels(self) -> int:
        return self.network.n_in // self.encoder.n_features(1)

    @property
    def n_classes(self) -> int:
        return self.network.layers[-1].n_out

    @property
    def layer_sizes(self) -> list[int]:
        return [self.network.n_in, *(layer.n_out for layer in self.network.layers)]

    def _bits(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.asarray(pixels)
        if pixels.ndim != 2 or pixels.shape[1] != self.n_pixels:
            raise DataError(
                f"the model takes images of {self.n_pixels} pixels as [n, {self.n_pixels}], got {pixels.shape}"
            )
        if pixels.dtype != np.uint8:
            if not np.issubdtype(pixels.dtype, np.integer) or (
                pixels.size and (pixels.min() < 0 or pixels.max() > 255)
            ):
                raise DataError(f"pixels must be uint8 values 0..255, got {pixels.dtype}")
            pixels = pixels.astype(np.uint8)
        return self.encoder.encode_bits(pixels)

    @functools.cached_property
    def engine(self) -> KernelNetwork:
        """The network in the fast kernel's layout (built once; numpy fallback inside when numba is absent)."""
        from bnn_core.kernels import KernelNetwork  # numba loads only when a model actually runs

        return KernelNetwork.from_packed(self.network)

    def forward_counts(self, pixels: np.ndarray) -> np.ndarray:
        """Integer pre-activations ``int32 [n, n_classes]`` of the last layer."""
        return self.engine.forward_counts(self._bits(pixels))

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Class ids ``int64 [n]``: argmax of :meth:`forward_counts`, ties to the lowest index."""
        return self.forward_counts(pixels).argmax(axis=1).astype(np.int64)
