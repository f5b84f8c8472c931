"""`python -m pipeline.predict`: an exported model file + raw IDX images -> predictions and accuracy."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

from bnn_core.bitwise_model import BitwiseModel
from bnn_core.errors import DataError
from bnn_core.input_encoders import ThresholdEncoder
from bnn_core.model_file import save_bitwise_model
from tests.conftest import run
from tests.test_datasets import idx_bytes

PROJECT = Path(__file__).resolve().parents[1]
N_IMAGES = 57


def make_model(seed: int = 0) -> BitwiseModel:
    rng = np.random.default_rng(seed)
    sizes = [16, 40, 10]
    layers = []
    for n_in, n_out in itertools.pairwise(sizes):
        w = rng.choice(np.array([-1, 1], np.int8), (n_out, n_in)) * (rng.random((n_out, n_in)) >= 0.3)
        layers.append((w.astype(np.int8), rng.choice(np.array([-1, 1], np.int8), n_out)))
    return BitwiseModel.from_layers(ThresholdEncoder(90), layers, {"test": True})


@pytest.fixture
def files(tmp_path: Path) -> dict[str, object]:
    """A model file and 4x4 IDX images + labels in ``tmp_path``; labels agree with the model half the time."""
    rng = np.random.default_rng(1)
    model = make_model()
    save_bitwise_model(tmp_path / "models" / "bnn.npz", model)
    images = rng.integers(0, 256, (N_IMAGES, 4, 4), dtype=np.uint8)
    predictions = model.predict(images.reshape(N_IMAGES, -1))
    labels = np.where(rng.random(N_IMAGES) < 0.5, predictions, rng.integers(0, 10, N_IMAGES))
    (tmp_path / "images-idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    return {"model": model, "images": images, "labels": labels, "predictions": predictions}


def predict_cli(cwd: Path, *overrides: str):
    return run([sys.executable, "-m", "pipeline.predict", *overrides], cwd, check=False, PYTHONPATH=str(PROJECT))


@pytest.mark.slow  # a fresh interpreter imports hydra and lightning (~8 s)
def test_predictions_and_accuracy_line(tmp_path, files):
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = predict_cli(tmp_path, "model_file=models/bnn.npz", "images=images-idx3-ubyte", "labels=labels-idx1-ubyte")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    expected_accuracy = float(np.mean(files["predictions"] == files["labels"]))
    assert 0.3 < expected_accuracy < 1.0
    assert lines[-1] == f"accuracy={expected_accuracy:.4f} n={N_IMAGES}"
    assert [int(line) for line in lines[:-1]] == files["predictions"].tolist()
    # Nothing written: no outputs/ or .hydra/ folder, no log file.
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.slow  # a fresh interpreter imports hydra and lightning (~8 s)
def test_predictions_to_a_file(tmp_path, files):
    result = predict_cli(
        tmp_path,
        f"model_file={tmp_path / 'models' / 'bnn.npz'}",
        "images=images-idx3-ubyte",
        "labels=labels-idx1-ubyte",
        "output=out/predictions.txt",
        "batch_size=10",
    )
    assert result.returncode == 0, result.stderr
    written = (tmp_path / "out" / "predictions.txt").read_text().splitlines()
    assert [int(line) for line in written] == files["predictions"].tolist()
    accuracy = float(np.mean(files["predictions"] == files["labels"]))
    assert result.stdout.splitlines() == [
        f"predict: {N_IMAGES} predictions -> out/predictions.txt",
        f"accuracy={accuracy:.4f} n={N_IMAGES}",
    ]
    assert not (tmp_path / "outputs").exists()


def assert_one_error_line(result, *fragments: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: predict: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.slow  # a fresh interpreter imports hydra and lightning (~8 s)
def test_missing_model_file_is_one_error_line(tmp_path, files):
    result = predict_cli(tmp_path, "model_file=models/missing.npz", "images=images-idx3-ubyte")
    assert_one_error_line(result, "models/missing.npz: file not found")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow  # a fresh interpreter imports hydra and lightning (~8 s)
def test_pixel_count_mismatch_is_one_error_line(tmp_path, files):
    (tmp_path / "big-idx3-ubyte").write_bytes(idx_bytes(np.zeros((3, 5, 5), np.uint8)))
    result = predict_cli(tmp_path, "images=big-idx3-ubyte", "labels=labels-idx1-ubyte")
    assert_one_error_line(result, "big-idx3-ubyte: images have 25 pixels", "takes 16")


# In-process checks of the same code path (no interpreter start-up per case).


def in_process(tmp_path: Path, monkeypatch, **keys: str | None) -> None:
    from pipeline.config import PredictConfig
    from pipeline.predict import predict

    monkeypatch.chdir(tmp_path)
    predict(PredictConfig(**{"model_file": "models/bnn.npz", **keys}))


def test_in_process_prints_the_same_lines(tmp_path, files, monkeypatch, capsys):
    in_process(tmp_path, monkeypatch, images="images-idx3-ubyte", labels="labels-idx1-ubyte")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == N_IMAGES + 1
    assert lines[-1].startswith("accuracy=")


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.zeros(N_IMAGES - 1, np.uint8), f"holds {N_IMAGES - 1} labels for {N_IMAGES} images"),
        (np.zeros((N_IMAGES, 2), np.uint8), "expected a 1-d label array"),
    ],
)
def test_bad_labels_are_data_errors(tmp_path, files, monkeypatch, labels, message):
    (tmp_path / "bad-labels").write_bytes(idx_bytes(labels))
    with pytest.raises(DataError, match=message):
        in_process(tmp_path, monkeypatch, images="images-idx3-ubyte", labels="bad-labels")


def test_bad_images_are_data_errors(tmp_path, files, monkeypatch):
    (tmp_path / "flat").write_bytes(idx_bytes(np.zeros(16, np.uint8)))
    with pytest.raises(DataError, match="expected images"):
        in_process(tmp_path, monkeypatch, images="flat")
    (tmp_path / "empty").write_bytes(idx_bytes(np.zeros((0, 4, 4), np.uint8)))
    with pytest.raises(DataError, match="holds no images"):
        in_process(tmp_path, monkeypatch, images="empty")
