"""The exported network as an MLflow Model (pipeline/mlflow_model.py, pipeline/model_registry.py).

A small random 784-48-10 bitwise model is logged and registered in a throw-away sqlite store, exactly as
the evaluate stage does it, then: loaded back by ``models:/bitwise-nn/<version>`` it gives the engine's
classes and integer scores; its registry version carries the evaluate metrics as tags; its folder holds no
pickle and carries the engine; it loads in a fresh interpreter that cannot import this repository; bad
inputs are refused with a message, never cast. The slow test serves it with ``mlflow models serve``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bnn_core.bitwise_model import BitwiseModel
from bnn_core.input_encoders import ThresholdEncoder
from bnn_core.model_file import save_bitwise_model
from pipeline import model_registry
from pipeline.mlflow_model import checked_pixels
from pipeline.model_registry import REGISTERED_MODEL, log_and_register, vendored_engine_files
from pipeline.tracking import StageTracker
from tests.conftest import project_env
from tests.test_model_file import random_layers

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "bitwise-nn-test"
METRICS = {"bnn": {"sparsity": 0.25, "test_accuracy": 0.9123, "binary_macs_per_example": 38112, "network": "bnn"}}
N_IMAGES = 300


@dataclass
class Logged:
    uri: str
    root: Path
    model: BitwiseModel
    pixels: np.ndarray
    version: object  # mlflow ModelVersion
    run_id: str
    model_dir: Path
    files_after_logging: list[str]


def log_in(uri: str, model_file: Path, pixels: np.ndarray) -> tuple[object, str]:
    """What the evaluate stage does: a stage run, the model logged to it and registered."""
    with StageTracker(uri, EXPERIMENT, "evaluate") as tracker:
        version = log_and_register(tracker, model_file, METRICS, pixels)
    return version, tracker.run_id


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Logged:
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # Artifacts inside the temporary folder (by default they would land in ./mlruns of the working directory).
    MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    rng = np.random.default_rng(7)
    model = BitwiseModel.from_layers(
        ThresholdEncoder(127), random_layers(rng, [784, 48, 10], [0.25, 0.0]), {"data_source": "random"}
    )
    save_bitwise_model(root / "bnn.npz", model)
    pixels = rng.integers(0, 256, (N_IMAGES, 784)).astype(np.uint8)
    previous_uri = mlflow.get_tracking_uri()
    version, run_id = log_in(uri, root / "bnn.npz", pixels)
    assert version is not None, "logging or registering failed (see the RuntimeWarning)"
    logged_model = MlflowClient(uri).get_logged_model(version.source.removeprefix("models:/"))
    model_dir = Path(urllib.request.url2pathname(urllib.parse.urlparse(logged_model.artifact_location).path))
    # Loading a model from a local store runs it in place (Python and numba then write caches beside its
    # code), so the folder is listed now, as logged.
    files = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file())
    yield Logged(uri, root, model, pixels, version, run_id, model_dir, files)
    mlflow.set_tracking_uri(previous_uri)


def test_pyfunc_round_trip_gives_the_engines_classes_and_scores(logged):
    loaded = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}/{logged.version.version}")
    out = loaded.predict(logged.pixels)
    np.testing.assert_array_equal(out["class"], logged.model.predict(logged.pixels))
    np.testing.assert_array_equal(out["scores"], logged.model.forward_counts(logged.pixels))
    assert out["class"].dtype == np.int64 and out["scores"].shape == (N_IMAGES, 10)
    # A DataFrame of whole floats (what a dataframe_split request becomes) gives the same classes.
    frame = pd.DataFrame(logged.pixels[:20].astype(np.float64))
    np.testing.assert_array_equal(loaded.predict(frame)["class"], out["class"][:20])


def test_each_run_registers_a_version_tagged_with_the_evaluation(logged):
    client = MlflowClient(logged.uri)
    version = client.get_model_version(REGISTERED_MODEL, logged.version.version)
    assert version.run_id == logged.run_id
    assert {k: version.tags[k] for k in ("data_source", "sparsity", "test_accuracy", "bit_ops", "network")} == {
        "data_source": "random",
        "sparsity": "0.25",
        "test_accuracy": "0.9123",
        "bit_ops": "38112",
        "network": "bnn",
    }
    run_tags = client.get_run(logged.run_id).data.tags
    assert version.tags["pipeline_run"] == run_tags["pipeline_run"]

    again, _ = log_in(logged.uri, logged.root / "bnn.npz", logged.pixels)
    assert int(again.version) == int(logged.version.version) + 1


def test_the_logged_model_holds_no_pickle_and_carries_the_engine(logged):
    files = logged.files_after_logging
    assert not [f for f in files if f.endswith((".pkl", ".pickle")) or "cloudpickle" in f or "__pycache__" in f]
    for name in files:  # no pickle stream under any name either (protocol 2+ starts with 0x80)
        assert not (logged.model_dir / name).read_bytes().startswith(b"\x80"), name
    flavor = (logged.model_dir / "MLmodel").read_text()
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in flavor and "python_model.pkl" not in flavor
    assert "mlflow_model.py" in files and "artifacts/bnn.npz" in files
    vendored = sorted(f.removeprefix("code/") for f in files if f.startswith("code/"))
    assert vendored == vendored_engine_files()
    assert "bnn_core/kernels.py" in vendored and "bnn_core/lightning_modules.py" not in vendored  # no torch
    pins = (logged.model_dir / "requirements.txt").read_text().split()
    for name in ("mlflow", "numpy", "numba"):
        assert any(pin.startswith(f"{name}==") for pin in pins), pins


FRESH_PYTHON = textwrap.dedent(
    """
    import importlib.util, json, sys
    # The project is installed in editable mode: drop that finder so nothing of the repository can load.
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    assert importlib.util.find_spec("bnn_core") is None and importlib.util.find_spec("pipeline") is None
    import mlflow, numpy as np
    model = mlflow.pyfunc.load_model(sys.argv[1])
    import bnn_core
    out = model.predict(np.load(sys.argv[2]))
    print(json.dumps({"bnn_core": bnn_core.__file__, "classes": out["class"].tolist(),
                      "pipeline": sorted(m for m in sys.modules if m.split(".")[0] == "pipeline")}))
    """
)


def test_loads_in_a_fresh_python_that_cannot_import_the_repository(logged, tmp_path):
    np.save(tmp_path / "pixels.npy", logged.pixels[:50])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DVC_ROOT")}
    # Numba's first compile of the vendored kernel takes ~10 s; the served-model test pays it, this one
    # checks the imports and runs the engine's numpy path, which gives the same integers.
    env.update(MLFLOW_TRACKING_URI=logged.uri, BNN_DISABLE_FAST_KERNEL="1", PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PYTHON, f"models:/{REGISTERED_MODEL}/{logged.version.version}", "pixels.npy"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    vendored = Path(report["bnn_core"]).resolve()
    assert vendored.parent.name == "bnn_core" and vendored.parent.parent.name == "code", vendored
    assert (vendored.parents[2] / "MLmodel").is_file() and not vendored.is_relative_to(ROOT), vendored
    assert report["pipeline"] == []
    assert report["classes"] == logged.model.predict(logged.pixels[:50]).tolist()


def with_pixel(pixels: np.ndarray, value: float, dtype: type = np.float64) -> np.ndarray:
    bad = pixels[:3].astype(dtype)
    bad[1, 5] = value
    return bad


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda p: with_pixel(p, 300), r"pixel values must lie in 0\.\.255; got values from 0 to 300 \(first bad"),
        (lambda p: with_pixel(p, -1), r"pixel values must lie in 0\.\.255; got values from -1"),
        (lambda p: with_pixel(p, 1.5), r"pixels must be whole numbers 0\.\.255"),
        (lambda p: with_pixel(p, np.nan), r"pixels must be whole numbers 0\.\.255"),
        # MLflow itself refuses int64 for double columns (it could hold values a double cannot).
        (lambda p: with_pixel(p, 300, np.int64), r"Can not safely convert int64 to float64"),
        (lambda p: p[:3, :783], r"784"),
        (lambda p: p[0], r"784"),
    ],
    ids=["300", "negative", "fraction", "nan", "int64", "783-columns", "one-dimensional"],
)
def test_bad_pixels_are_refused_with_a_message_not_cast(logged, make_input, message):
    loaded = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}/{logged.version.version}")
    with pytest.raises(MlflowException, match=message) as refused:
        loaded.predict(make_input(logged.pixels))
    assert refused.value.get_http_status_code() == 400


@pytest.mark.parametrize(
    ("model_input", "message"),
    [
        (np.full((2, 784), 256, dtype=np.int64), "got values from 256 to 256 (first bad value: row 0, column 0)"),
        ([[0] * 783], "shape [n, 784]; got shape (1, 783)"),
        (np.zeros((0, 784), dtype=np.uint8), "no images given"),
        (np.ones((1, 784), dtype=bool), "got values of type bool"),
        (pd.DataFrame([["7"] * 784]), "got values of type <U1"),
        (np.full((1, 784), np.inf), "fractional, infinite or NaN"),
    ],
    ids=["256-int64", "783-columns-list", "empty", "bool", "strings", "inf"],
)
def test_the_models_own_check_refuses_what_mlflow_lets_through(model_input, message):
    with pytest.raises(MlflowException, match="^bitwise-nn: ") as refused:
        checked_pixels(model_input, 784)
    assert message in refused.value.message
    assert refused.value.get_http_status_code() == 400


def test_the_models_own_check_accepts_whole_numbers_of_any_type_exactly():
    pixels = np.arange(784 * 2).reshape(2, 784) % 256
    for model_input in (
        pixels.astype(np.uint8),
        pixels,
        pixels.astype(np.float64),
        pd.DataFrame(pixels),
        pixels.tolist(),
    ):
        checked = checked_pixels(model_input, 784)
        assert checked.dtype == np.uint8
        np.testing.assert_array_equal(checked, pixels)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"inputs": [[1, 2,', "valid JSON"),
        (json.dumps({"inputs": [[0] * 783]}), "784"),
        (json.dumps({"dataframe_split": {"data": [[300] + [0] * 783]}}), "0..255"),
        (json.dumps({"inputs": [[0.5] * 784]}), "whole numbers"),
    ],
    ids=["malformed-json", "783-columns", "300-in-dataframe_split", "fraction-in-inputs"],
)
def test_scoring_server_answers_bad_requests_with_400_and_a_message(logged, body, message):
    """The request path of ``mlflow models serve`` (parsing, schema, predict), run in this process."""
    from mlflow.pyfunc import scoring_server

    loaded = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}/{logged.version.version}")
    with pytest.raises(MlflowException) as refused:
        scoring_server.invocations(body, "application/json", loaded, loaded.metadata.get_input_schema())
    assert refused.value.get_http_status_code() == 400
    assert message in refused.value.message
    assert "Traceback" not in refused.value.serialize_as_json()


def test_no_run_or_a_failing_registry_never_breaks_the_stage(logged, monkeypatch):
    untracked = StageTracker(logged.uri, EXPERIMENT, "evaluate")  # never started: as when the store failed
    assert log_and_register(untracked, logged.root / "bnn.npz", METRICS, logged.pixels) is None

    def unavailable(*args, **kwargs):
        raise MlflowException("model registry unavailable")

    monkeypatch.setattr(model_registry, "register", unavailable)
    with pytest.warns(RuntimeWarning, match="failed to register the model as 'bitwise-nn'.*unavailable"):
        version, run_id = log_in(logged.uri, logged.root / "bnn.npz", logged.pixels)
    assert version is None
    assert MlflowClient(logged.uri).get_run(run_id).info.status == "FINISHED"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(url: str, body: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body.encode() if body is not None else None)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.mark.slow
def test_mlflow_models_serve_answers_like_the_engine(logged, tmp_path):
    port = free_port()
    env = project_env(MLFLOW_TRACKING_URI=logged.uri)  # the venv's bin/ first on PATH: the CLI runs uvicorn
    env.pop("PYTHONPATH", None)
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    log = (tmp_path / "serve.log").open("w")
    serve = ["models", "serve", "-m", f"models:/{REGISTERED_MODEL}/latest", "--env-manager", "local"]
    server = subprocess.Popen(
        [mlflow_cli, *serve, "--host", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the finally block ends the server and its workers
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150  # CLI start-up, model load, numba's first compile of the kernel
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if http(f"{base}/ping")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server not ready:\n" + (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)

        pixels = logged.pixels[:40]
        expected = logged.model.predict(pixels).tolist()
        status, body = http(f"{base}/invocations", json.dumps({"inputs": pixels.tolist()}))
        assert status == 200, body
        assert json.loads(body)["predictions"]["class"] == expected
        assert json.loads(body)["predictions"]["scores"] == logged.model.forward_counts(pixels).tolist()
        status, body = http(f"{base}/invocations", json.dumps({"dataframe_split": {"data": pixels.tolist()}}))
        assert status == 200 and json.loads(body)["predictions"]["class"] == expected, body

        status, body = http(f"{base}/invocations", '{"inputs": [[1, 2,')
        assert status == 400 and "valid JSON" in json.loads(body)["message"], body
        status, body = http(f"{base}/invocations", json.dumps({"inputs": [[300] * 784]}))
        assert status == 400 and "0..255" in json.loads(body)["message"] and "Traceback" not in body, body
    finally:
        stop_process_group(server)
        log.close()


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the group the test started (the CLI and its uvicorn worker), SIGKILL if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:  # the whole group has already exited
            break
        try:
            process.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
