"""The exported bitwise network as an MLflow pyfunc model ("models from code": this file is the model).

MLflow logs this file's source, not a pickled object: at load time it executes the file, which ends with
``mlflow.models.set_model(BitwiseNNPyfunc())``, and then calls :meth:`BitwiseNNPyfunc.load_context` with the
logged ``models/bnn.npz`` (artifact ``model_file``). The packed engine comes with the model: the
``bnn_core`` modules this file needs are logged as ``code_paths`` (:mod:`pipeline.model_registry`), so
this file imports only numpy, pandas (MLflow's own dependency), mlflow and ``bnn_core``, never ``pipeline``.

Input: raw pixels ``[n, n_pixels]`` (784 for MNIST), whole numbers 0..255. Output: a dict of two arrays,
``class`` (``int64 [n]``, ties to the lowest index) and ``scores`` (``int32 [n, n_classes]``, the last
layer's integer pre-activations), exactly :meth:`bnn_core.bitwise_model.BitwiseModel.predict` and
``forward_counts``. Served, a response reads ``{"predictions": {"class": [...], "scores": [[...], ...]}}``.

Every input is checked here before any cast, because MLflow's own conversions are lossy: its JSON parser
turns ``1.5`` into ``1`` for an integer column, and a ``uint8`` signature would make it wrap ``300`` to
``44`` and ``-1`` to ``255`` (pandas ``astype``). Anything but a 2-d array of whole numbers in 0..255 with
the model's pixel count is refused with an :class:`~mlflow.exceptions.MlflowException` whose code is
``INVALID_PARAMETER_VALUE``, which ``mlflow models serve`` answers with HTTP 400 and the message alone (any
other exception becomes a 400 carrying a Python stack trace).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel
from mlflow.pyfunc.model import PythonModelContext

from bnn_core.bitwise_model import BitwiseModel
from bnn_core.errors import BnnError
from bnn_core.model_file import load_bitwise_model

#: The key of the model file in the logged model's artifacts.
MODEL_FILE_ARTIFACT = "model_file"


def _refuse(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(f"bitwise-nn: {message}")


def checked_pixels(model_input: Any, n_pixels: int) -> np.ndarray:
    """``model_input`` as ``uint8 [n, n_pixels]``, or an MlflowException saying what is wrong with it.

    Accepts a numpy array, a pandas DataFrame (one column per pixel) or nested lists; the values must be
    integers, or floats that are whole numbers (MLflow may hand over float64), all in 0..255. Booleans,
    strings and fractions are refused rather than guessed at.
    """
    to_numpy = getattr(model_input, "to_numpy", None)  # pandas, without importing it
    pixels = to_numpy() if callable(to_numpy) else np.asarray(model_input)
    if pixels.dtype == object:  # e.g. a DataFrame with mixed columns: let numpy find one numeric dtype
        try:
            pixels = np.array(pixels.tolist())
        except ValueError as err:
            raise _refuse(f"pixels must form a 2-d array of numbers ({err})") from None
    if pixels.ndim != 2 or pixels.shape[1] != n_pixels:
        raise _refuse(f"expected images as rows of {n_pixels} pixels, shape [n, {n_pixels}]; got shape {pixels.shape}")
    if pixels.shape[0] == 0:
        raise _refuse("no images given")
    if pixels.dtype.kind not in "iuf":
        raise _refuse(f"pixels must be whole numbers 0..255, got values of type {pixels.dtype}")
    if pixels.dtype.kind == "f" and not (np.isfinite(pixels).all() and (pixels == np.round(pixels)).all()):
        raise _refuse("pixels must be whole numbers 0..255, got fractional, infinite or NaN values")
    low, high = pixels.min(), pixels.max()
    if low < 0 or high > 255:
        bad = np.argwhere((pixels < 0) | (pixels > 255))[0]
        raise _refuse(
            f"pixel values must lie in 0..255; got values from {low:g} to {high:g} "
            f"(first bad value: row {bad[0]}, column {bad[1]})"
        )
    return pixels.astype(np.uint8)  # exact: every value was checked to be a whole number in 0..255


class BitwiseNNPyfunc(PythonModel):
    """pyfunc wrapper of a :class:`~bnn_core.bitwise_model.BitwiseModel` read from the logged ``.npz``."""

    def __init__(self) -> None:
        self.model: BitwiseModel | None = None

    def load_context(self, context: PythonModelContext) -> None:
        self.model = load_bitwise_model(context.artifacts[MODEL_FILE_ARTIFACT])
        # Build and run the fast kernel once now: a freshly downloaded model compiles it (seconds), and a
        # server should pay that before it answers /ping, not on its first request.
        self.model.predict(np.zeros((1, self.model.n_pixels), dtype=np.uint8))

    # ``pd.DataFrame``: what MLflow hands over under the logged column signature (model_registry.signature).
    # MLflow infers no signature from it and converts nothing by it (a DataFrame type hint is one of those it
    # takes as is), so requests are still checked by the logged signature and then by checked_pixels; with no
    # hint at all MLflow prints a UserWarning asking for one in every process that loads or logs the model.
    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        """``{"class": int64 [n], "scores": int32 [n, n_classes]}`` for raw pixels ``[n, n_pixels]``
        (a numpy array, a pandas DataFrame or nested lists: see :func:`checked_pixels`)."""
        if self.model is None:
            raise MlflowException("bitwise-nn: the model file was not loaded (load_context was not called)")
        pixels = checked_pixels(model_input, self.model.n_pixels)
        try:
            scores = self.model.forward_counts(pixels)
        except BnnError as err:  # the engine's own input checks, should they ever disagree with ours
            raise _refuse(str(err)) from None
        return {"class": scores.argmax(axis=1).astype(np.int64), "scores": scores}


mlflow.models.set_model(BitwiseNNPyfunc())
