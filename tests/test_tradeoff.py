"""The accuracy / bit-ops picture (pipeline.tradeoff): what it draws, and that it only ever compares like
with like, read back from a real SQLite MLflow store filled with runs that must and must not be in it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline.comparison import comparison_rows
from pipeline.config import validate
from pipeline.tracking import PIPELINE_RUN_ENV, StageTracker, run_description
from pipeline.tradeoff import log_run_tradeoff, log_sweep_tradeoff, plot_tradeoff, tradeoff_title
from tests.conftest import ROOT, project_env
from tests.test_config import composed

EXPERIMENT, SMOKE_EXPERIMENT = "bitwise-nn", "bitwise-nn-smoke"
SPLIT = "0123456789abcdef"  # the test split digest the current run and its comparable runs share


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """MLflow's process-wide tracking URI and active run stay as they were; no stray ./mlruns."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(PIPELINE_RUN_ENV, raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    previous = mlflow.get_tracking_uri()
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(previous)


def store(tmp_path: Path) -> tuple[str, MlflowClient]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    for name in (EXPERIMENT, SMOKE_EXPERIMENT):
        client.create_experiment(name, artifact_location=(tmp_path / "mlruns" / name).as_uri())
    return uri, client


def evaluation_run(
    client: MlflowClient,
    experiment: str,
    name: str,
    *,
    source: str = "mnist5k",
    split: str = SPLIT,
    accuracy: float = 0.9,
    bit_ops: float = 1e6,
    sparsity: float = 0.0,
    pipeline_run: str = "earlier",
    status: str = "FINISHED",
) -> str:
    """A run as an evaluation logs it (pipeline.evaluate.log_evaluation): metrics, tags, the sparsity param."""
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    tags = {
        "data_source": source,
        "test_split": split,
        "description": name,
        "network": "bnn",
        "pipeline_run": pipeline_run,
        "kind": "stage",
    }
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    for key, value in {
        "test/accuracy": accuracy,
        "cost/bit_ops": bit_ops,
        "test/compressed_accuracy": accuracy + 0.01,
        "cost/real_bit_ops": bit_ops * 1024,
        "test/n_examples": 500,
    }.items():
        client.log_metric(run_id, key, value)
    client.log_param(run_id, "finetune.sparsity", str(sparsity))
    client.set_terminated(run_id, status)
    return run_id


def this_run_rows(accuracy: float = 0.95) -> list[dict]:
    metrics = {
        "compressed": {"test_accuracy": 0.96, "macs_per_example": 3_000_000, "weight_bits": 96_000_000},
        "bnn": {
            "test_accuracy": accuracy,
            "binary_macs_per_example": 3_000_000,
            "weight_bits": 3_000_000,
            "sparsity": 0.0,
            "network": "bnn",
        },
        "n_test": 500,
    }
    return comparison_rows(metrics, None, "threshold")


def logged_tradeoff(client: MlflowClient, run_id: str, tmp_path: Path) -> tuple[dict, str]:
    folder = Path(client.download_artifacts(run_id, "tradeoff", str(tmp_path / f"download-{run_id}")))
    assert (folder / "tradeoff.png").read_bytes().startswith(b"\x89PNG")
    return json.loads((folder / "comparison.json").read_text()), (folder / "tradeoff.md").read_text()


def test_the_run_page_compares_only_runs_of_the_same_data_and_test_split(tmp_path):
    uri, client = store(tmp_path)
    comparable = {
        evaluation_run(client, EXPERIMENT, "mnist5k 3x1024 s0.00 bnn", accuracy=0.94, bit_ops=2.9e6),
        evaluation_run(client, EXPERIMENT, "mnist5k 3x1024 s0.50 bnn", accuracy=0.93, bit_ops=1.5e6, sparsity=0.5),
    }
    left_out = {
        evaluation_run(client, EXPERIMENT, "fashion_mnist 3x1024 s0.00 bnn", source="fashion_mnist"),
        evaluation_run(client, EXPERIMENT, "mnist5k, other test split", split="fedcba9876543210"),
        evaluation_run(client, SMOKE_EXPERIMENT, "mnist5k 2x64 s0.00 bnn", accuracy=0.6, bit_ops=55_050),
        evaluation_run(client, EXPERIMENT, "mnist5k, failed", status="FAILED"),
    }
    tracker = StageTracker(uri, EXPERIMENT, "report").start()
    # this execution's own evaluation (a dvc repro's evaluate stage) is this run, not one to compare with
    left_out.add(evaluation_run(client, EXPERIMENT, "this run", pipeline_run=tracker.pipeline_run))
    rows = this_run_rows()
    log_run_tradeoff(tracker, rows, "mnist5k", SPLIT)
    tracker.end()

    logged, markdown = logged_tradeoff(client, tracker.page_run_id, tmp_path)
    assert {r["run_id"] for r in logged["compared_with"]} == comparable
    assert not {r["run_id"] for r in logged["compared_with"]} & left_out
    assert logged["this_run"] == rows
    assert "the 2 networks of this run and 2 earlier runs on this test split" in markdown
    assert "| mnist5k 3x1024 s0.50 bnn | bnn | 0.50 | 93.00% | 1,500,000 |" in markdown
    assert "fashion_mnist" not in markdown and "2x64" not in markdown


def test_a_first_run_says_there_is_nothing_to_compare_yet(tmp_path):
    uri, client = store(tmp_path)
    evaluation_run(client, SMOKE_EXPERIMENT, "mnist5k 2x64 s0.00 bnn")  # a smoke run is no comparison
    tracker = StageTracker(uri, EXPERIMENT, "pipeline").start()
    log_run_tradeoff(tracker, this_run_rows(), "mnist5k", SPLIT)
    tracker.end()

    logged, markdown = logged_tradeoff(client, tracker.run_id, tmp_path)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    assert tracker.page_url() == (  # what pipeline.run prints: make dashboard's address of the picture
        f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{tracker.run_id}/artifactPath/tradeoff/tradeoff.png"
    )
    assert logged["compared_with"] == []
    assert "the 2 networks of this run; nothing to compare yet" in markdown
    assert "Nothing to compare yet" in markdown and "(1 runs)" not in markdown


def test_only_what_is_drawn_has_a_legend_entry(tmp_path):
    rows = this_run_rows()
    alone = plot_tradeoff(rows, tmp_path / "alone.png", tradeoff_title("mnist5k", 500, rows, 0, "earlier runs"))
    assert sorted(alone) == ["bitwise (1-bit)", "tanh-compressed (32-bit)"]
    earlier = [{**rows[1], "label": "mnist5k 3x1024 s0.50 bnn", "bit_ops": 1.5e6, "test_accuracy": 0.93}]
    both = plot_tradeoff(rows, tmp_path / "both.png", "t", earlier, "earlier runs")
    assert sorted(both) == [
        "Pareto front (bitwise)",
        "bitwise (1-bit)",
        "bitwise (1-bit), earlier runs",
        "tanh-compressed (32-bit)",
    ]
    assert (tmp_path / "both.png").read_bytes().startswith(b"\x89PNG")


def test_a_sweep_parent_gets_one_picture_per_data_source_of_its_jobs(tmp_path):
    uri, client = store(tmp_path)
    jobs = [
        evaluation_run(client, EXPERIMENT, "job 0", pipeline_run="sweep-1"),
        evaluation_run(client, EXPERIMENT, "job 1", pipeline_run="sweep-1", sparsity=0.5, bit_ops=5e5),
        evaluation_run(client, EXPERIMENT, "job 2", pipeline_run="sweep-1", source="fashion_mnist", split="f" * 16),
    ]
    evaluation_run(client, EXPERIMENT, "another sweep's job", pipeline_run="sweep-2")
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parent = client.create_run(experiment_id, run_name="sweep", tags={"pipeline_run": "sweep-1", "kind": "parent"})
    log_sweep_tradeoff(uri, EXPERIMENT, "sweep-1", parent.info.run_id)

    folders = sorted(a.path for a in client.list_artifacts(parent.info.run_id, "tradeoff"))
    assert folders == [f"tradeoff/fashion_mnist-{'f' * 8}", f"tradeoff/mnist5k-{SPLIT[:8]}"]
    mnist = json.loads(
        Path(client.download_artifacts(parent.info.run_id, folders[1], str(tmp_path / "d")))
        .joinpath("comparison.json")
        .read_text()
    )
    assert {r["run_id"] for r in mnist["compared_with"]} == set(jobs[:2])


def test_run_names_say_what_was_trained():
    assert run_description(validate(composed([]))) == "mnist5k 3x1024 s0.00 bnn"
    sparse = validate(composed(["model.hidden=[512,256]", "finetune.sparsity=0.5", "model.norm=batchnorm"]))
    assert run_description(sparse) == "mnist5k 512-256 s0.50 bnn_bn"


def test_smoke_runs_log_to_an_experiment_of_their_own():
    assert composed([]).tracking.experiment == EXPERIMENT
    assert composed(["experiment=smoke"]).tracking.experiment == SMOKE_EXPERIMENT


def test_loading_the_mlflow_model_file_prints_nothing():
    """MLflow asks for a type hint on ``predict`` in a UserWarning it forces to show; the model file has one."""
    result = subprocess.run(
        [sys.executable, "-c", "import pipeline.mlflow_model"],
        cwd=ROOT,
        env=project_env(PYTHONWARNINGS="default"),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")
