"""The exported network in MLflow's own terms: a logged MLflow Model, registered as ``bitwise-nn``.

:func:`log_and_register` (called by the evaluate stage) logs ``models/bnn.npz`` to the stage's run as a
pyfunc model and registers it: one new version of the registered model ``bitwise-nn`` per evaluate run,
tagged ``data_source``, ``network``, ``sparsity``, ``test_accuracy``, ``bit_ops`` (binary MACs per example,
one bit-op each, as in the report) and ``pipeline_run``. Anyone can then run it::

    mlflow models serve -m models:/bitwise-nn/latest --env-manager local -p 5001
    model = mlflow.pyfunc.load_model("models:/bitwise-nn/latest"); model.predict(pixels_uint8)

How it is logged, and why:

- **No pickle.** "Models from code": ``python_model`` is the path of :mod:`pipeline.mlflow_model`, whose
  source MLflow stores and executes at load time; the model file is an artifact (``model_file``), read
  by :func:`bnn_core.model_file.load_bitwise_model`, which never unpickles.
- **Vendored engine.** ``code_paths`` holds a ``bnn_core/`` folder with exactly the modules that
  :mod:`pipeline.mlflow_model` imports, transitively (:func:`vendored_engine_files`, the same static
  import closure that gives DVC its code deps): the packed engine, the fast kernel and the model-file
  reader, none of torch or Lightning. MLflow puts the model's ``code/`` folder first on ``sys.path``, so a
  process that has not imported ``bnn_core`` yet takes the vendored copy even where this repository is
  installed (the finder of ``pip install -e .`` comes after ``sys.path``); ``tests/test_mlflow_model.py``
  checks that in a fresh interpreter that cannot import anything from the repository. A process that
  already imported ``bnn_core`` (the evaluate stage, when MLflow validates the input example) keeps its
  own. The vendored kernel is compiled by numba on a process's first load (~10-20 s on 2 busy cores);
  from a local store MLflow loads the model in place, so Python's and numba's caches then appear in its
  ``code/bnn_core/__pycache__`` and later loads of that version skip the compile.
- **Signature: 784 unnamed ``double`` columns, not a ``uint8`` tensor.** Measured with MLflow 3.17: with
  a ``uint8`` tensor signature the server casts ``dataframe_split`` columns with pandas ``astype``, so a
  pixel 300 arrives as 44 and -1 as 255, and any integer signature truncates 1.5 to 1, all before the
  model sees them. Double columns carry every JSON number unchanged, so the model's own check
  (:func:`pipeline.mlflow_model.checked_pixels`: whole numbers in 0..255, or HTTP 400) sees what was sent.
  MLflow still checks the column count (HTTP 400), and accepts numpy ``uint8`` (and other types it can
  widen exactly to double; not ``int64``, which it refuses). Outputs: ``class`` ``int64 [n]`` and
  ``scores`` ``int32 [n, n_classes]``.
- **Pinned requirements** (:func:`pinned_requirements`): the installed versions, given explicitly, so
  MLflow does not spend seconds inferring them in a subprocess.
- The input example is the first two test images.

Like the rest of the tracking, none of this can fail the stage: with no run (tracking off, or its store
failed) nothing is logged; a store or registry error prints one warning and the stage goes on.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from bnn_core.bitwise_model import BitwiseModel
from bnn_core.model_file import load_bitwise_model
from pipeline import mlflow_model
from pipeline.stages import REPO_ROOT, code_deps
from pipeline.tracking import StageTracker, with_retries

#: The registered model every evaluate run adds a version to.
REGISTERED_MODEL = "bitwise-nn"
#: The logged model's name inside the run.
LOGGED_MODEL = "bitwise_nn"
#: Distributions the served model runs on: the engine (numpy, numba and its llvmlite), the pyfunc and
#: its server (mlflow), and pandas, which parses ``dataframe_split`` requests.
REQUIREMENTS = ("mlflow", "numpy", "numba", "llvmlite", "pandas")
EXAMPLE_IMAGES = 2


def vendored_engine_files() -> list[str]:
    """The ``bnn_core`` files (repository-relative) that :mod:`pipeline.mlflow_model` imports, transitively."""
    return [path for path in code_deps(mlflow_model.__name__) if path.startswith("bnn_core/")]


def pinned_requirements() -> list[str]:
    """``name==version`` of each installed distribution of :data:`REQUIREMENTS` (numba is optional)."""
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:  # numba / llvmlite: the engine falls back to numpy without them
            continue
    return pins


def signature(n_pixels: int, n_classes: int):
    """Pixels as ``n_pixels`` unnamed double columns (see the module docstring); class and scores out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.double) for _ in range(n_pixels)]),
        outputs=Schema(
            [
                TensorSpec(np.dtype(np.int64), (-1,), "class"),
                TensorSpec(np.dtype(np.int32), (-1, n_classes), "scores"),
            ]
        ),
    )


def version_tags(metrics: dict, metadata: dict, pipeline_run: str | None) -> dict[str, str]:
    """The model version's tags, from the evaluate stage's ``metrics.json`` and the model file's metadata."""
    bnn = metrics["bnn"]
    tags = {
        "data_source": str(metadata.get("data_source", "unknown")),
        "network": str(bnn.get("network", metadata.get("network", "bnn"))),
        "sparsity": f"{bnn['sparsity']:g}",
        "test_accuracy": f"{bnn['test_accuracy']:.4f}",
        "bit_ops": str(bnn["binary_macs_per_example"]),
    }
    if pipeline_run:
        tags["pipeline_run"] = pipeline_run
    return tags


def log_model(model_file: Path, model: BitwiseModel, example_pixels: np.ndarray):
    """Log ``model_file`` (holding ``model``) to the active run as a pyfunc model; returns MLflow's ModelInfo."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="bnn-vendored-") as staging:
        # code_paths copies each folder as it is: stage a bnn_core/ holding only the closure, without the
        # repository's __pycache__ (compiled bytecode and numba's machine code have no place in a model).
        for relative in vendored_engine_files():
            target = Path(staging) / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO_ROOT / relative, target)
        return mlflow.pyfunc.log_model(
            name=LOGGED_MODEL,
            python_model=mlflow_model.__file__,
            artifacts={mlflow_model.MODEL_FILE_ARTIFACT: str(model_file)},
            code_paths=[str(Path(staging) / "bnn_core")],
            signature=signature(model.n_pixels, model.n_classes),
            input_example=np.asarray(example_pixels[:EXAMPLE_IMAGES], dtype=np.uint8),
            pip_requirements=pinned_requirements(),
        )


def register(info, tags: dict[str, str]):
    """A new version of :data:`REGISTERED_MODEL` (created on first use) for the logged model ``info``
    (MLflow's ModelInfo), with ``tags``.

    Through the client rather than ``mlflow.register_model``, which prints "Successfully registered model"
    and "Created version" to stderr on every call: the stage says which version it made itself."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        client.create_registered_model(REGISTERED_MODEL)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.create_model_version(
        REGISTERED_MODEL, info.model_uri, run_id=info.run_id, tags=tags, model_id=info.model_id
    )


def _warn(tracker: StageTracker, action: str, err: Exception) -> None:
    detail = str(err).splitlines()[0] if str(err) else ""
    warnings.warn(
        f"MLflow at {tracker.uri} failed to {action} ({type(err).__name__}: {detail}); "
        "the stage continues, its outputs are unaffected",
        RuntimeWarning,
        stacklevel=3,
    )


def log_and_register(tracker: StageTracker, model_file: Path, metrics: dict, example_pixels: np.ndarray):
    """Log the exported model to the stage's run and register it; the new ModelVersion, or None if skipped.

    Returns None without a word when the run has no tracking (its failure was already reported), and
    with a warning when logging or registering fails. Only the errors a store raises are caught (MLflow's
    own and I/O errors, requests' included): anything else is a bug and propagates.
    """
    if tracker.run_id is None:
        return None
    import mlflow
    from mlflow.exceptions import MlflowException

    model = load_bitwise_model(model_file)
    try:
        # The tracker's run is the active one (StageTracker.start), so log_model attaches the model to it.
        info = with_retries(lambda: log_model(model_file, model, example_pixels))
    except (MlflowException, OSError) as err:
        _warn(tracker, f"log {model_file} as an MLflow model", err)
        return None
    try:
        run_tags = with_retries(lambda: mlflow.get_run(tracker.run_id).data.tags)
        tags = version_tags(metrics, model.metadata, run_tags.get("pipeline_run"))
        return with_retries(lambda: register(info, tags))
    except (MlflowException, OSError) as err:
        _warn(tracker, f"register the model as {REGISTERED_MODEL!r}", err)
        return None
