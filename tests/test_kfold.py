"""k-fold cross-validation inside mnist5k: the folds, the splits built on them, the default hold-out split
left as it was, ``experiment=kfold``'s jobs, and the sweep callback's ``kfold.json`` (from fake job folders,
and from one tiny real sweep, marked slow)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from bnn_core.datasets import LabelledImages, SourceData, kfold_split, load_mnist5k, stratified_kfold, stratified_split
from bnn_core.errors import BnnError, DataError
from bnn_core.splits import split_source
from bnn_core.stats import wilson_interval
from pipeline.kfold import KFoldWriter, fold_results, summarize, write_kfold
from tests.conftest import ROOT, run

pytestmark = pytest.mark.heavy  # make test starts this file early (tests/conftest.py)

#: sha256 of pixels + int64 labels of each split of mnist5k's default split (val 500, test 500, seed 0),
#: computed with the code before k-fold existed (commit 0df5e30): folds=None must keep it to the byte.
DEFAULT_SPLIT_SHA256 = {
    "train": "3ee02790fb03d97566476748dd0d8ed3e5b0c3544ac90bfa5d2513f3e433814d",
    "val": "09262e361a76d27fd8090490505fa7cc67d885efdf171a2c2d6e359e4f024d53",
    "test": "5b20282e155d6189fbae57fe0eebc45d754619a57d595221565db0c566ad0bbd",
}


@pytest.fixture(scope="module")
def mnist5k() -> SourceData:
    return load_mnist5k()


def digest(images: LabelledImages) -> str:
    data = np.ascontiguousarray(images.pixels).tobytes() + images.labels.astype(np.int64).tobytes()
    return hashlib.sha256(data).hexdigest()


# --- the folds ---------------------------------------------------------------------------------------------


def test_folds_are_disjoint_cover_the_pool_and_keep_the_class_mix(mnist5k):
    labels = mnist5k.train.labels
    folds = stratified_kfold(labels, 5, seed=0)
    assert np.array_equal(np.sort(np.concatenate(folds)), np.arange(5000))  # each index exactly once
    for fold in folds:
        assert np.bincount(labels[fold], minlength=10).tolist() == [100] * 10


def test_uneven_classes_give_folds_within_one_example_per_class_and_overall():
    labels = np.repeat(np.arange(4), [7, 11, 3, 23])  # 44 examples, no class a multiple of 5
    folds = stratified_kfold(labels, 5, seed=3)
    assert np.array_equal(np.sort(np.concatenate(folds)), np.arange(len(labels)))
    sizes = [len(fold) for fold in folds]
    assert max(sizes) - min(sizes) <= 1
    per_class = np.array([np.bincount(labels[fold], minlength=4) for fold in folds])
    for c, n_c in enumerate([7, 11, 3, 23]):
        assert set(per_class[:, c]) <= {n_c // 5, -(-n_c // 5)}


def test_folds_are_deterministic_in_the_seed(mnist5k):
    labels = mnist5k.train.labels
    first, again, other = (stratified_kfold(labels, 5, seed=s) for s in (0, 0, 1))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])


@pytest.mark.parametrize("folds", [1, 11])
def test_impossible_fold_counts_are_refused(folds):
    with pytest.raises(DataError, match="folds"):
        stratified_kfold(np.arange(10) % 2, folds, seed=0)


# --- splits on the folds -------------------------------------------------------------------------------------


def test_kfold_splits_test_each_example_once_and_never_train_on_it(mnist5k):
    pool = mnist5k.train
    tested = []
    for fold in range(5):
        train, val, test = kfold_split(pool.labels, 5, fold, val_size=500, seed=0)
        assert (len(train), len(val), len(test)) == (3500, 500, 1000)
        assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(5000))  # disjoint, covering
        assert np.bincount(pool.labels[val], minlength=10).tolist() == [50] * 10  # stratified validation
        tested.append(test)
    assert np.array_equal(np.sort(np.concatenate(tested)), np.arange(5000))


def test_split_source_with_folds_is_the_kfold_split(mnist5k):
    splits = split_source(mnist5k, 500, 500, 0, folds=5, fold=2)
    train, val, test = kfold_split(mnist5k.train.labels, 5, 2, 500, 0)
    for images, index in ((splits.train, train), (splits.val, val), (splits.test, test)):
        assert np.array_equal(images.pixels, mnist5k.train.pixels[index])
        assert np.array_equal(images.labels, mnist5k.train.labels[index])
    again = split_source(mnist5k, 500, 500, 0, folds=5, fold=2)
    assert digest(again.test) == digest(splits.test) and digest(again.val) == digest(splits.val)


def test_default_split_is_unchanged(mnist5k):
    splits = split_source(mnist5k, 500, 500, 0)
    assert {name: digest(getattr(splits, name)) for name in DEFAULT_SPLIT_SHA256} == DEFAULT_SPLIT_SHA256
    # ... and is still the hold-out code path: one stratified split of the pool
    previous = stratified_split(mnist5k.train.labels, [4000, 500, 500], 0)
    for name, index in zip(("train", "val", "test"), previous, strict=True):
        assert digest(getattr(splits, name)) == digest(mnist5k.train.subset(index))


def test_folds_on_a_source_with_its_own_test_set_are_refused():
    rng = np.random.default_rng(0)
    pool = LabelledImages(rng.integers(0, 256, (100, 4), dtype=np.uint8), np.arange(100) % 10)
    test = LabelledImages(rng.integers(0, 256, (20, 4), dtype=np.uint8), np.arange(20) % 10)
    with pytest.raises(DataError, match="own test set"):
        split_source(SourceData(pool, test), 10, None, 0, folds=5, fold=0)


def test_a_fold_and_validation_that_leave_no_training_examples_are_refused():
    with pytest.raises(DataError, match="no training examples"):
        kfold_split(np.arange(20) % 2, 2, 0, val_size=10, seed=0)


# --- experiment=kfold ---------------------------------------------------------------------------------------


def hydra_config(overrides: list[str], with_hydra: bool = False):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=with_hydra)


def test_experiment_kfold_runs_one_job_per_fold_with_the_writer():
    cfg = hydra_config(["experiment=kfold"], with_hydra=True)
    assert cfg.data.split.folds == 5
    params = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
    (batch,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
    assert batch == [[f"data.split.fold={k}"] for k in range(5)]
    assert cfg.hydra.callbacks.kfold._target_ == "pipeline.kfold.KFoldWriter"
    assert "sweep_tracking" in cfg.hydra.callbacks  # the parent run kfold.json is logged to


# --- the sweep callback -------------------------------------------------------------------------------------


def fake_job(folder: Path, fold: int, bnn: float, compressed: float, n_test: int = 1000, overrides=()) -> Path:
    """A job folder as an experiment=kfold sweep leaves it: composed config and metrics."""
    (folder / ".hydra").mkdir(parents=True)
    config = hydra_config(["experiment=kfold", f"data.split.fold={fold}", *overrides])
    (folder / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(config))
    (folder / "reports").mkdir()
    metrics = {
        "bnn": {"test_accuracy": bnn, "sparsity": 0.0},
        "compressed": {"test_accuracy": compressed},
        "n_test": n_test,
    }
    (folder / "reports" / "metrics.json").write_text(json.dumps(metrics))
    return folder


BNN = [0.95, 0.94, 0.96, 0.93, 0.97]
COMPRESSED = [0.96, 0.95, 0.95, 0.94, 0.96]


def five_folds(sweep: Path) -> list[Path]:
    # job numbers need not follow the folds: results are sorted by fold
    order = [3, 0, 4, 1, 2]
    return [fake_job(sweep / str(job), fold, BNN[fold], COMPRESSED[fold]) for job, fold in enumerate(order)]


def test_kfold_json_aggregates_the_folds(tmp_path):
    path, report = write_kfold(tmp_path / "project", five_folds(tmp_path / "sweep"), "python -m pipeline.run x")

    assert path == tmp_path / "project" / "reports" / "mnist5k" / "kfold.json"
    assert json.loads(path.read_text()) == report
    assert (report["data_source"], report["folds"], report["folds_run"], report["complete"]) == (
        "mnist5k",
        5,
        [0, 1, 2, 3, 4],
        True,
    )
    assert [r["fold"] for r in report["per_fold"]] == [0, 1, 2, 3, 4]
    assert [r["bnn"]["test_accuracy"] for r in report["per_fold"]] == BNN
    assert report["per_fold"][0]["bnn"]["correct"] == 950
    assert report["per_fold"][0]["bnn"]["test_accuracy_ci95"] == pytest.approx(wilson_interval(950, 1000))

    bnn = report["bnn"]
    assert bnn["mean"] == pytest.approx(0.95)
    assert bnn["std"] == pytest.approx(np.std(BNN, ddof=1))  # sample std: sqrt(0.001 / 4)
    assert (bnn["correct"], bnn["total"], bnn["pooled_accuracy"]) == (4750, 5000, 0.95)
    assert bnn["pooled_ci95"] == pytest.approx(wilson_interval(4750, 5000))
    compressed = report["compressed"]
    assert compressed["mean"] == pytest.approx(0.952)
    assert (compressed["correct"], compressed["total"]) == (4760, 5000)


def test_pooling_counts_examples_not_folds(tmp_path):
    # folds of unequal size: the pooled accuracy weights each test example once, the mean each fold once
    jobs = [fake_job(tmp_path / "0", 0, 0.9, 0.9, n_test=10), fake_job(tmp_path / "1", 1, 0.5, 0.5, n_test=1000)]
    results, _ = fold_results(jobs)
    summary = summarize(results, "bnn")
    assert summary["mean"] == pytest.approx(0.7)
    assert (summary["correct"], summary["total"]) == (509, 1010)


def test_a_subset_of_folds_is_written_but_marked_incomplete(tmp_path):
    jobs = [fake_job(tmp_path / "0", 0, 0.9, 0.9)]
    _, report = write_kfold(tmp_path / "project", jobs, "cmd")
    assert (report["folds_run"], report["complete"], report["bnn"]["std"]) == ([0], False, None)


@pytest.mark.parametrize(
    ("second_job", "message"),
    [
        (lambda d: fake_job(d, 1, 0.9, 0.9, overrides=["seed=1"]), "differs from job 0 in more than data.split.fold"),
        (lambda d: fake_job(d, 0, 0.9, 0.9), "data.split.fold values repeat across jobs"),
        (lambda d: fake_job(d, 0, 0.9, 0.9, overrides=["data.split.folds=null"]), "data.split.folds is null"),
        (lambda d: d.mkdir(), "no .hydra/config.yaml"),
    ],
)
def test_jobs_that_are_not_one_cross_validation_are_refused(tmp_path, second_job, message):
    jobs = [fake_job(tmp_path / "sweep" / "0", 0, 0.9, 0.9), tmp_path / "sweep" / "1"]
    second_job(jobs[1])
    with pytest.raises(BnnError, match=message):
        write_kfold(tmp_path / "project", jobs, "cmd")
    assert not (tmp_path / "project").exists()


def test_the_callback_writes_the_file_and_logs_it_to_the_sweeps_parent_run(tmp_path, monkeypatch):
    project, sweep = tmp_path / "project", tmp_path / "sweep"
    five_folds(sweep)
    monkeypatch.setenv("DVC_ROOT", str(project))  # tracking.project_root()
    monkeypatch.setenv("BNN_PIPELINE_RUN", "sweep-123")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = OmegaConf.create(
        {
            "hydra": {"sweep": {"dir": str(sweep)}, "overrides": {"task": ["experiment=kfold"]}},
            "tracking": {"uri": uri, "experiment": "bitwise-nn"},
        }
    )
    KFoldWriter().on_multirun_end(config)

    report = json.loads((project / "reports" / "mnist5k" / "kfold.json").read_text())
    assert report["command"] == "python -m pipeline.run experiment=kfold"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("bitwise-nn")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.pipeline_run = 'sweep-123'")
    assert parent.data.tags["kind"] == "parent"
    assert parent.data.metrics["kfold/bnn_pooled_accuracy"] == pytest.approx(0.95)
    assert parent.data.metrics["kfold/bnn_mean"] == pytest.approx(0.95)
    history = client.get_metric_history(parent.info.run_id, "kfold/bnn_test_accuracy")
    assert sorted((m.step, m.value) for m in history) == list(enumerate(BNN))
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "kfold")] == ["kfold/kfold.json"]


@pytest.mark.slow
def test_a_real_two_fold_sweep_writes_kfold_json(project_copy):
    result = run(
        [
            "python",
            "-m",
            "pipeline.run",
            "experiment=kfold",
            "data.split.folds=2",
            "data.split.fold=0,1",
            "model.hidden=[32,32]",
            "pretrain.epochs=1",
            "finetune.epochs=1",
            "trainer.progress_bar=false",
        ],
        project_copy,
    )
    report = json.loads((project_copy / "reports" / "mnist5k" / "kfold.json").read_text())
    assert (report["folds_run"], report["complete"]) == ([0, 1], True)
    assert [r["n_test"] for r in report["per_fold"]] == [2500, 2500]
    assert report["bnn"]["total"] == 5000 and 0 < report["bnn"]["pooled_accuracy"] <= 1
    assert "kfold: 2 of 2 folds" in result.stdout
