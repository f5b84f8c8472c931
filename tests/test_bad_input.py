"""Bad input found on the second pass over faults (issue 13): each ends in one error that names the file or
key, never a traceback, a silent wrong result or a 0-feature dataset.

- IDX headers that declare 0 images, or images of 0 rows or columns;
- seeds out of the range numpy and torch accept;
- files the user may not read (as root: without the capabilities that let root read anything);
- outputs that cannot be written (a read-only folder, a full disk: real failing writes on a tmpfs);
- ``images=<a folder>``, labels outside the model's classes, ``data.binarize.method=real``.

In-process where the fault can be made in-process; the permission faults and the stage runs go through
the forked command lines of ``tests/test_cli_property.py`` (one interpreter start for both modules).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bnn_core.datasets import load_idx_folder
from bnn_core.errors import ConfigError, DataError
from bnn_core.model_file import save_bitwise_model
from pipeline.config import PredictConfig, validate
from pipeline.files import OutputError, write_json, write_text
from pipeline.predict import predict
from tests.test_cli_property import (
    DATA_READERS,
    SMOKE,
    assert_one_error_line,
    can_mount,
    command_server,
    copy_project,
    full_disk,
    prepared_project,
    read_only,
    snapshot,
    unreadable,
    write_idx_folder,
)
from tests.test_config import composed
from tests.test_datasets import idx_bytes
from tests.test_predict import make_model

# -- 0 images, 0 rows, 0 columns -------------------------------------------------------------------------------


TRAIN, TEST = "train-images-idx3-ubyte", "t10k-images-idx3-ubyte"


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ({TRAIN: np.zeros((0, 4, 4))}, f"{TRAIN}: holds no images"),
        ({TEST: np.zeros((0, 4, 4))}, f"{TEST}: holds no images"),
        ({TRAIN: np.zeros((30, 0, 4))}, f"{TRAIN}: its images have no pixels"),
        # both: train and test agree in size (0 pixels), which used to make a 0-feature dataset
        ({TRAIN: np.zeros((30, 4, 0)), TEST: np.zeros((10, 4, 0))}, f"{TRAIN}: its images have no pixels"),
    ],
)
def test_idx_files_without_images_or_pixels_name_the_file(tmp_path, images, message):
    write_idx_folder(tmp_path, n_train=30, n_test=10)
    for stem, array in images.items():
        (tmp_path / stem).write_bytes(idx_bytes(array))
        if len(array) == 0:  # the labels agree: 0 of them, so only the emptiness is wrong
            (tmp_path / stem.replace("images-idx3", "labels-idx1")).write_bytes(idx_bytes(np.zeros(0)))
    with pytest.raises(DataError, match=message):
        load_idx_folder(tmp_path)


# -- predict's inputs ----------------------------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path: Path, monkeypatch) -> Path:
    """``models/bnn.npz`` (16 pixels, 10 classes) and 4x4 IDX images in ``tmp_path``, the working directory."""
    save_bitwise_model(tmp_path / "models" / "bnn.npz", make_model())
    (tmp_path / "images").write_bytes(idx_bytes(np.zeros((5, 4, 4))))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_predict(**keys: str) -> None:
    predict(PredictConfig(**{"model_file": "models/bnn.npz", "images": "images", **keys}))


@pytest.mark.parametrize(("shape", "message"), [((5, 0, 4), "have no pixels"), ((5, 4, 0), "have no pixels")])
def test_predict_refuses_images_without_pixels(model_dir, shape, message):
    (model_dir / "empty").write_bytes(idx_bytes(np.zeros(shape)))
    with pytest.raises(DataError, match=f"empty: its images {message}"):
        run_predict(images="empty")


def test_images_naming_a_folder_says_so(model_dir):
    (model_dir / "folder").mkdir()
    with pytest.raises(DataError, match="folder: is a folder, not a file"):
        run_predict(images="folder")


def test_labels_outside_the_models_classes_are_refused(model_dir, capsys):
    (model_dir / "labels").write_bytes(idx_bytes(np.array([0, 1, 12, 3, 4])))
    with pytest.raises(DataError, match=r"labels: label 12 outside the model's classes 0\.\.9"):
        run_predict(labels="labels")
    assert "accuracy=" not in capsys.readouterr().out


# -- The config schema ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("seed=-1", "seed"),
        ("seed=99999999999", "seed"),
        ("seed=4294967296", "seed"),
        ("data.split.seed=-1", "data.split.seed"),
    ],
)
def test_seeds_outside_what_numpy_accepts_are_config_errors(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: must be in 0\.\.4294967295, got"):
        validate(composed([override]))


def test_the_largest_seed_is_accepted():
    config = validate(composed(["seed=4294967295", "data.split.seed=4294967295"]))
    assert config.seed == config.data.split.seed == 2**32 - 1


def test_real_inputs_are_refused_before_any_stage_runs():
    # Every chain ends in the bitwise network, whose round 2 refused real inputs only after round 1 trained.
    with pytest.raises(ConfigError, match="data.binarize.method: the bitwise network needs binary inputs"):
        validate(composed(["data.binarize.method=real"]))


# -- Outputs that cannot be written: a real full disk ------------------------------------------------------------


@pytest.fixture
def full_folder(tmp_path: Path):
    if not can_mount(tmp_path):
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "old.json").write_text('{"kept": true}\n')
    with full_disk(folder):
        yield folder


@pytest.mark.parametrize("writer", [write_json, write_text])
def test_a_full_disk_is_one_error_naming_the_file(full_folder, writer):
    with pytest.raises(OutputError, match=r"out/old.json: cannot write \(No space left on device\)"):
        writer(full_folder / "old.json", "x" * 100_000)
    assert (full_folder / "old.json").read_text() == '{"kept": true}\n'
    assert sorted(p.name for p in full_folder.iterdir()) == [".filler", "old.json"]  # no temporary left


# -- Commands: unreadable files, read-only folders ----------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    return command_server(tmp_path_factory)


@pytest.fixture(scope="module")
def denying_server(server):
    """The command server, where a file's mode does deny: not root, or root without its capabilities."""
    if not server.permissions_bite:
        pytest.skip("root without setpriv: every file is readable")
    return server


@pytest.mark.slow
@pytest.mark.parametrize("target", ["train-labels-idx1-ubyte", "."])
@pytest.mark.parametrize("command", DATA_READERS)
def test_an_unreadable_data_file_or_folder_is_one_error_line(denying_server, tmp_path, command, target):
    write_idx_folder(tmp_path / "idx")
    with unreadable(tmp_path / "idx" / target):
        result = denying_server.run(command, SMOKE, tmp_path)
    assert_one_error_line(result, command, "train-", "cannot read (Permission denied)")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["images", "labels"])
def test_predict_on_an_unreadable_file_is_one_error_line(denying_server, tmp_path, target):
    save_bitwise_model(tmp_path / "models" / "bnn.npz", make_model())
    (tmp_path / "images").write_bytes(idx_bytes(np.zeros((5, 4, 4))))
    (tmp_path / "labels").write_bytes(idx_bytes(np.zeros(5)))
    with unreadable(tmp_path / target):
        result = denying_server.run("predict", ["images=images", "labels=labels"], tmp_path)
    assert_one_error_line(result, "predict", f"{target}: cannot read (Permission denied)")


@pytest.mark.slow
def test_evaluate_with_read_only_reports_is_one_error_line(denying_server, tmp_path_factory, tmp_path):
    project = copy_project(prepared_project(denying_server, tmp_path_factory), tmp_path / "project")
    with read_only(project / "reports"):
        before = snapshot(project)
        result = denying_server.run("evaluate", SMOKE, project)
        assert snapshot(project) == before
    assert_one_error_line(result, "evaluate", "reports/", "cannot write (Permission denied)")


@pytest.mark.slow
def test_evaluate_on_a_full_disk_is_one_error_line(server, tmp_path_factory, tmp_path):
    if not can_mount(tmp_path):
        pytest.skip("mounting a tmpfs needs root")
    project = copy_project(prepared_project(server, tmp_path_factory), tmp_path / "project")
    with full_disk(project / "models"):
        before = snapshot(project)
        result = server.run("evaluate", SMOKE, project)
        assert snapshot(project) == before
    assert_one_error_line(result, "evaluate", "models/bnn.npz: cannot write (No space left on device)")
