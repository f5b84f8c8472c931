"""The MLflow store a real pipeline run fills, read back over the REST API of `mlflow server`.

One project copy (module scope) gets a tiny `dvc repro` (smoke, up to the report) and, at the same time, a
tiny 2-job sweep of ``pipeline.run`` (smoke), both writing the project's SQLite store; then `mlflow server`
serves that store and the tests query it as the dashboard (`make dashboard`) would: smoke runs in their own
experiment, parent runs named by what they train, the accuracy / bit-ops picture and table on each run page.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import compose_params, git_project, project_env, run

pytestmark = [pytest.mark.slow, pytest.mark.heavy]
SMOKE = ["experiment=smoke"]
EXPERIMENT = "bitwise-nn-smoke"  # conf/experiment/smoke.yaml: smoke runs stay out of the real models' experiment
SWEEP = [0.0, 0.5]
#: The evaluation metrics the README documents (pipeline.evaluate.log_evaluation), on every evaluation.
DOCUMENTED_METRICS = (
    "test/accuracy",
    "test/error",
    "cost/binary_macs",
    "cost/weight_bits",
    "cost/bit_ops",
    "cost/real_bit_ops",
    "cost/bit_ops_ratio_real_to_bitwise",
)
#: What the trade-off puts on a run page (pipeline.tradeoff.log_run_tradeoff, log_sweep_tradeoff).
TRADEOFF_FILES = {"tradeoff/tradeoff.png", "tradeoff/tradeoff.md", "tradeoff/comparison.json"}
#: Smoke network 784-64-64-10 without zero weights: one binary MAC per weight and bias.
SMOKE_BINARY_MACS = 64 * 785 + 64 * 65 + 10 * 65
SERVER_START_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def filled_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = git_project(tmp_path_factory.mktemp("tracking") / "project")
    compose_params(project, SMOKE)
    # Create the store and the experiment first, so the two writers below never race to create its tables.
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{project / 'mlflow.db'}").create_experiment(
        EXPERIMENT, artifact_location=(project / "mlruns").as_uri()
    )
    log = project.parent / "dvc_repro.log"
    with log.open("w") as out:
        dvc = subprocess.Popen(
            ["dvc", "repro", "report"], cwd=project, env=project_env(), stdout=out, stderr=subprocess.STDOUT
        )
        try:
            sweep_values = ",".join(map(str, SWEEP))
            run(["python", "-m", "pipeline.run", "-m", *SMOKE, f"finetune.sparsity={sweep_values}"], project)
        finally:
            returncode = dvc.wait(timeout=600)
    assert returncode == 0, log.read_text()
    return project


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(filled_project: Path) -> Iterator[str]:
    """`mlflow server` on the filled store, on a free local port; its base URL."""
    port = free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    log = (filled_project.parent / "mlflow_server.log").open("w")
    process = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--backend-store-uri",
            f"sqlite:///{filled_project / 'mlflow.db'}",
            "--default-artifact-root",
            (filled_project / "mlruns").as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=filled_project,
        # No background job runner (GenAI evaluation jobs): a lighter server that stops at once.
        env=project_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the teardown stops the server and its workers
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            assert process.poll() is None, (filled_project.parent / "mlflow_server.log").read_text()
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"mlflow server not healthy after {SERVER_START_TIMEOUT_S} s"
            time.sleep(0.5)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)
        log.close()


def api(url: str, endpoint: str, payload: dict | None = None, **query: str) -> dict:
    """GET (no payload) or POST a JSON payload to MLflow's REST API."""
    address = f"{url}/api/2.0/mlflow/{endpoint}"
    if query:
        address += "?" + "&".join(f"{k}={urllib.request.quote(v)}" for k, v in query.items())
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(address, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def flat(run: dict, field: str) -> dict:
    return {item["key"]: item["value"] for item in run["data"].get(field, [])}


@pytest.fixture(scope="module")
def runs(server: str) -> list[dict]:
    """Every run of the experiment, as the REST API returns it, with tags/params/metrics as dicts."""
    experiment = api(server, "experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    found = api(server, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000})
    for r in found["runs"]:
        r["tags"], r["params"], r["metrics"] = (flat(r, f) for f in ("tags", "params", "metrics"))
    return found["runs"]


def family(runs: list[dict]) -> dict[str, tuple[dict, list[dict]]]:
    """``{'sweep' or 'pipeline' (the dvc repro): (parent, children)}``."""
    parents = [r for r in runs if r["tags"].get("kind") == "parent"]
    result = {}
    for parent in parents:
        children = [r for r in runs if r["tags"].get("mlflow.parentRunId") == parent["info"]["run_id"]]
        result["sweep" if parent["info"]["run_name"].startswith("sweep ") else "pipeline"] = (parent, children)
    return result


def artifact_files(url: str, run: dict, folder: str) -> set[str]:
    listed = api(url, "artifacts/list", run_id=run["info"]["run_id"], path=folder)
    return {f["path"] for f in listed.get("files", [])}


def artifact_json(url: str, run: dict, path: str):
    """An artifact's content, fetched as the run page fetches it (the server's artifact proxy)."""
    address = f"{url}/get-artifact?path={urllib.request.quote(path)}&run_uuid={run['info']['run_id']}"
    with urllib.request.urlopen(address, timeout=30) as response:
        return json.loads(response.read())


def check_documented_metrics(run: dict, binary_macs: int | None) -> None:
    metrics = run["metrics"]
    missing = [name for name in DOCUMENTED_METRICS if name not in metrics]
    assert not missing, (run["info"]["run_name"], missing)
    assert 0 < metrics["test/accuracy"] <= 1
    assert metrics["test/error"] == pytest.approx(1 - metrics["test/accuracy"])
    assert metrics["cost/weight_bits"] > 0
    assert metrics["cost/bit_ops"] == metrics["cost/binary_macs"]  # one XNOR-popcount per binary MAC
    assert metrics["cost/real_bit_ops"] == 1024 * metrics["cost/real_macs"]  # 32 x 32 per 32-bit MAC
    assert metrics["cost/bit_ops_ratio_real_to_bitwise"] == pytest.approx(
        metrics["cost/real_bit_ops"] / metrics["cost/bit_ops"]
    )
    assert "cost/macs_ratio" not in metrics  # 1.00 for a dense network, beside "1024x fewer bit-ops"
    assert run["tags"]["test_split"] and run["tags"]["description"].startswith("mnist5k 2x64 s")
    if binary_macs is not None:
        assert metrics["cost/binary_macs"] == binary_macs
        assert metrics["cost/bit_ops_ratio_real_to_bitwise"] == 1024  # dense: as many MACs, 1024x the bit-ops
    else:
        assert 0 < metrics["cost/binary_macs"] < SMOKE_BINARY_MACS


def test_server_serves_one_parent_per_pipeline_execution(runs):
    families = family(runs)
    assert sorted(families) == ["pipeline", "sweep"]
    assert all(r["info"]["status"] == "FINISHED" for r in runs)
    assert all(r["tags"]["kind"] in ("parent", "stage") for r in runs)
    # Every run is either a parent or the child of one.
    assert len(runs) == sum(1 + len(children) for _, children in families.values())


def test_dvc_repro_stages_are_children_of_its_parent_run(runs):
    parent, children = family(runs)["pipeline"]
    assert parent["info"]["run_name"] == "mnist5k 2x64 s0.00 bnn"
    assert sorted(r["tags"]["stage"] for r in children) == [
        "baselines",
        "binarize",
        "evaluate",
        "finetune",
        "pretrain",
        "report",
    ]
    for child in children:
        assert child["tags"]["kind"] == "stage"
        assert child["tags"]["pipeline_run"] == parent["tags"]["pipeline_run"]
        assert child["params"]["model.hidden"] == "[64, 64]"
    (evaluate,) = (r for r in children if r["tags"]["stage"] == "evaluate")
    check_documented_metrics(evaluate, SMOKE_BINARY_MACS)
    assert evaluate["metrics"]["speed/speedup_vs_float"] > 0  # measured by the stage, logged to MLflow only


def test_sweep_jobs_are_children_of_the_sweep_run(runs):
    parent, children = family(runs)["sweep"]
    assert parent["info"]["run_name"].startswith("sweep outputs/sweeps/")
    assert parent["tags"]["hydra_overrides"] == "experiment=smoke finetune.sparsity=0.0,0.5"
    children.sort(key=lambda r: float(r["params"]["finetune.sparsity"]))
    assert [float(r["params"]["finetune.sparsity"]) for r in children] == SWEEP
    for child, sparsity in zip(children, SWEEP, strict=True):
        assert child["tags"]["kind"] == "stage" and child["tags"]["stage"] == "pipeline"
        assert child["tags"]["hydra_overrides"] == f"experiment=smoke finetune.sparsity={sparsity}"
        assert child["info"]["run_name"] == f"pipeline experiment=smoke finetune.sparsity={sparsity}"
        check_documented_metrics(child, SMOKE_BINARY_MACS if sparsity == 0 else None)
        assert "finetune/best_val_accuracy" in child["metrics"]
    # Round 1 is computed once for the sweep (stage cache): its curves are in the run of the job that ran it.
    assert sum("pretrain/best_val_accuracy" in r["metrics"] for r in children) >= 1


def test_the_parent_run_page_shows_the_tradeoff_without_clicking(runs, server):
    """The dvc repro's parent holds the picture and the table of its four networks; what it is compared
    with are runs of the same data and test examples only (here: the sweep's jobs, if they ended first)."""
    parent, children = family(runs)["pipeline"]
    assert artifact_files(server, parent, "tradeoff") == TRADEOFF_FILES
    table = artifact_json(server, parent, "tradeoff/comparison.json")
    assert [(r["network"], r["input"]) for r in table["this_run"]] == [
        ("real", "real"),
        ("real", "binary"),
        ("compressed", "binary"),
        ("bnn", "binary"),
    ]
    (evaluate,) = (r for r in children if r["tags"]["stage"] == "evaluate")
    assert table["this_run"][3]["test_accuracy"] == evaluate["metrics"]["test/accuracy"]
    jobs = {r["info"]["run_id"] for r in family(runs)["sweep"][1]}
    assert {r["run_id"] for r in table["compared_with"]} <= jobs


def test_the_sweep_parent_shows_the_tradeoff_of_its_jobs(runs, server):
    parent, children = family(runs)["sweep"]
    assert artifact_files(server, parent, "tradeoff") == TRADEOFF_FILES
    table = artifact_json(server, parent, "tradeoff/comparison.json")
    bitwise = sorted((r["sparsity"], r["run_id"]) for r in table["compared_with"] if r["network"] == "bnn")
    by_sparsity = sorted((float(r["params"]["finetune.sparsity"]), r["info"]["run_id"]) for r in children)
    assert bitwise == by_sparsity
    for child in children:  # and each job's own page shows its networks
        assert artifact_files(server, child, "tradeoff") == TRADEOFF_FILES


def test_runs_compare_across_the_two_executions(runs, server):
    """The same configuration through DVC and through the sweep runner gives the same model and metrics."""
    (evaluate,) = (r for r in family(runs)["pipeline"][1] if r["tags"]["stage"] == "evaluate")
    (job,) = (r for r in family(runs)["sweep"][1] if r["params"]["finetune.sparsity"] == "0.0")
    for name in ("test/accuracy", "cost/binary_macs", "cost/weight_bits"):
        assert job["metrics"][name] == evaluate["metrics"][name], name
    # The search API's filter, as the dashboard's search box uses it.
    experiment_id = evaluate["info"]["experiment_id"]
    found = api(
        server,
        "runs/search",
        {"experiment_ids": [experiment_id], "filter": "metrics.`cost/binary_macs` < 50000", "max_results": 100},
    )
    assert [r["info"]["run_id"] for r in found["runs"]] == [
        r["info"]["run_id"] for r in family(runs)["sweep"][1] if r["params"]["finetune.sparsity"] == "0.5"
    ]


def test_git_dirty_ignores_what_dvc_repro_writes_but_not_code(tmp_path):
    """In a clean clone, DVC rewrites dvc.lock and the tracked reports as it goes: not a dirty tree."""
    from pipeline.tracking import git_commit

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    for path in ("dvc.lock", "reports/metrics.json", "pipeline/pretrain.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("committed\n")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    assert git_commit(tmp_path)[1] is False

    (tmp_path / "dvc.lock").write_text("rewritten by dvc repro\n")
    (tmp_path / "reports" / "metrics.json").write_text("{}\n")
    assert git_commit(tmp_path)[1] is False
    (tmp_path / "pipeline" / "pretrain.py").write_text("edited\n")
    assert git_commit(tmp_path)[1] is True
