"""One MLflow tracking server for a team, tested for real (README, "Team set-up").

The module starts PostgreSQL itself (initdb and pg_ctl on a free local port, as an unprivileged user when the
tests run as root: PostgreSQL refuses root) and, on it, ``mlflow server`` with an artifact root that the server
proxies (``--artifacts-destination``, ``--serve-artifacts``); both are stopped after the module. A sweep of the
smoke chain then logs to ``tracking.uri=http://127.0.0.1:<port>`` from 4 parallel jobs of the submitit local
executor (the code path of the SLURM launcher, conf/hydra/launcher/cluster.yaml). Nothing may be lost: every
job's run arrives as a child of the sweep's parent run, with the metrics and artifacts its job wrote locally,
and the jobs need no disk shared with the server (the project keeps no ``mlflow.db`` and no ``mlruns/``; the
artifacts lie in the server's destination folder).
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pipeline.tracking import check_artifact_location
from tests.conftest import git_project, project_env, run

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

DB_USER = "mlflow"
SMOKE = ["experiment=smoke"]


def postgres_bin() -> Path | None:
    """The folder of initdb, pg_ctl and createdb: Debian keeps them under /usr/lib/postgresql/<major>/bin, off
    PATH; an initdb on PATH may be a link to one of them."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def checked(cmd: list[str], **kwargs) -> None:
    result = subprocess.run([str(part) for part in cmd], capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n{result.stdout}{result.stderr}")


@contextlib.contextmanager
def postgres(folder: Path) -> Iterator[str]:
    """A PostgreSQL server of its own in ``folder``, on a free port of 127.0.0.1, with a database ``mlflow``
    owned by the password-protected role ``mlflow``; yields its SQLAlchemy URI. Run as ``nobody`` when we are
    root (``runuser``), as ourselves otherwise."""
    bin_dir = postgres_bin()
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "nobody", "--"]
        shutil.chown(folder, "nobody")
    password = secrets.token_hex(16)
    password_file = folder / "password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    if as_user:
        shutil.chown(password_file, "nobody")
    data, port = folder / "data", free_port()
    # fsync off: a throw-away database; the server's durability is not what is tested here.
    checked([*as_user, bin_dir / "initdb", "-D", data, "-U", DB_USER, f"--pwfile={password_file}",
             "--auth=scram-sha-256", "--no-sync", "--encoding=UTF8"])  # fmt: skip
    options = f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off"
    checked([*as_user, bin_dir / "pg_ctl", "-D", data, "-l", folder / "postgres.log", "-w", "-o", options, "start"])
    try:
        checked(
            [bin_dir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", DB_USER, "mlflow"],
            env={**os.environ, "PGPASSWORD": password},
        )
        # postgresql+psycopg: psycopg 3 (the dev extra) whichever SQLAlchemy's default driver is.
        yield f"postgresql+psycopg://{DB_USER}:{password}@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_user, bin_dir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"], capture_output=True)


def wait_for_health(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.25)
    raise AssertionError(f"mlflow server not up after {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def mlflow_server(backend: str, folder: Path) -> Iterator[str]:
    """``mlflow server`` on ``backend`` with proxied artifacts in ``folder/artifacts``; yields its URL.

    Without MLflow's job runner (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: 8 more processes, for its GenAI
    features, which the pipeline does not use), as the README's team set-up runs it."""
    port, log = free_port(), folder / "mlflow-server.log"
    cmd = [Path(sys.executable).parent / "mlflow", "server", "--backend-store-uri", backend,
           "--artifacts-destination", folder / "artifacts", "--serve-artifacts",
           "--host", "127.0.0.1", "--port", port, "--workers", "2"]  # fmt: skip
    with log.open("w") as out:
        # a session of its own: uvicorn's workers are stopped with it, as one process group
        server = subprocess.Popen(
            [str(part) for part in cmd],
            cwd=folder,
            env=project_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url, server, log)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture(scope="module")
def team_server() -> Iterator[tuple[str, str, Path]]:
    """``(server URL, database URI, artifact destination)`` of a PostgreSQL-backed ``mlflow server``, for
    the whole module."""
    if postgres_bin() is None:
        pytest.skip("PostgreSQL missing (initdb, pg_ctl: Debian package postgresql; scripts/system_deps.sh)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("runuser missing (util-linux): needed to start PostgreSQL as nobody when running as root")
    if importlib.util.find_spec("psycopg") is None:
        pytest.skip("psycopg missing (the PostgreSQL driver of mlflow server: pip install -e '.[dev]')")
    # Not in pytest's tmp_path: its parents are private to the user running the tests, and PostgreSQL
    # runs as nobody when that user is root.
    folder = Path(tempfile.mkdtemp(prefix="bnn-team-server-"))
    folder.chmod(0o755)
    try:
        (folder / "postgres").mkdir()
        with postgres(folder / "postgres") as backend, mlflow_server(backend, folder) as url:
            yield url, backend, folder / "artifacts"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def team_project(tmp_path_factory) -> Path:
    """One project copy for the module (with the repository's compiled kernels, so that the 4 parallel
    evaluate stages do not all compile them at once: not what is tested here)."""
    return git_project(tmp_path_factory.mktemp("team") / "project")


def sweep_family(client: MlflowClient, experiment: str, sparsities: list[float]) -> tuple[Run, list[Run]]:
    """The experiment holds one parent run and exactly one FINISHED child per job (none lost, none extra),
    whose runs overlapped in time (the jobs ran in parallel); children sorted by sparsity."""
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    assert found.artifact_location.startswith("mlflow-artifacts:"), found.artifact_location  # proxied
    check_artifact_location(experiment, found.artifact_location)  # not the project's to judge: no error
    runs = client.search_runs([found.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("kind") == "parent"]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 1 + len(children) and len(children) == len(sparsities)
    for r in [parent, *children]:
        assert r.info.status == "FINISHED", r.info.run_name
        assert r.data.tags["pipeline_run"] == parent.data.tags["pipeline_run"]
    children.sort(key=lambda r: float(r.data.params["finetune.sparsity"]))
    assert [float(r.data.params["finetune.sparsity"]) for r in children] == sparsities
    assert len({r.data.tags["pid"] for r in children}) == len(children)  # one process per job
    assert max(r.info.start_time for r in children) < min(r.info.end_time for r in children)  # all at once
    assert parent.info.end_time >= max(r.info.end_time for r in children)  # the parent spans its children
    return parent, children


def job_dirs(project: Path, parent: Run, sparsities: list[float]) -> list[Path]:
    """The sweep's job folders (named in its parent run), in the order of ``sparsities``."""
    sweep_dir = project / parent.info.run_name.removeprefix("sweep ")
    jobs = {json.loads((job / "reports" / "metrics.json").read_text())["bnn"]["sparsity"]: job
            for job in sweep_dir.iterdir() if job.name.isdigit()}  # fmt: skip
    assert sorted(jobs) == sparsities
    return [jobs[s] for s in sparsities]


def check_job_run(client: MlflowClient, child: Run, job: Path, artifact_root: Path) -> None:
    """The job's run holds what the job wrote locally: its evaluation metrics, every epoch of its finetune
    curves, and its artifacts, uploaded through the server into its destination folder byte for byte."""
    metrics = json.loads((job / "reports" / "metrics.json").read_text())
    assert child.data.metrics["test/accuracy"] == metrics["bnn"]["test_accuracy"]
    assert child.data.metrics["test/compressed_accuracy"] == metrics["compressed"]["test_accuracy"]
    assert child.data.metrics["cost/binary_macs"] == metrics["bnn"]["binary_macs_per_example"]
    assert child.data.metrics["cost/model_file_bytes"] == metrics["bnn"]["model_file_bytes"]
    assert child.data.metrics["finetune/epochs_run"] == 1  # finetune.epochs=1 (smoke)
    with (job / "reports" / "finetune_history.csv").open() as f:
        rows = list(csv.DictReader(f))
    for column in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        history = client.get_metric_history(child.info.run_id, f"finetune/{column}")
        assert [(m.step, f"{m.value:.6g}") for m in history] == [(int(r["epoch"]), r[column]) for r in rows]

    assert child.info.artifact_uri.startswith("mlflow-artifacts:"), child.info.artifact_uri
    listed = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"cost.md", "model"} <= listed, listed
    stored = artifact_root / child.info.experiment_id / child.info.run_id / "artifacts"
    for name, local in (("model/bnn.npz", job / "models" / "bnn.npz"), ("cost.md", job / "reports" / "cost.md")):
        assert (stored / name).read_bytes() == local.read_bytes(), name
        downloaded = client.download_artifacts(child.info.run_id, name, str(job.parent / f".download-{job.name}"))
        assert Path(downloaded).read_bytes() == local.read_bytes(), name


def test_parallel_submitit_sweep_on_the_team_server_loses_nothing(team_server, team_project):
    """4 jobs of the submitit local executor (the SLURM launcher's code path: each job a process of its own,
    started from a pickled job) log to the server at once; they reach it through tracking.uri and find
    their sweep's parent run through the inherited $BNN_PIPELINE_RUN."""
    url, _, artifact_root = team_server
    sparsities = [0.0, 0.25, 0.5, 0.75]
    started = time.monotonic()
    result = run(
        ["python", "-m", "pipeline.run", "-m", "hydra/launcher=submitit_local", "experiment=smoke",
         f"finetune.sparsity={','.join(map(str, sparsities))}", f"tracking.uri={url}", "tracking.experiment=team"],
        team_project,
    )  # fmt: skip
    print(f"4-job submitit_local sweep against the team server: {time.monotonic() - started:.1f} s")
    output = result.stdout + result.stderr
    assert "Submitit 'local' sweep output dir" in output
    assert "MLflow tracking at" not in output, output  # a store failure is only a warning: none may occur

    client = MlflowClient(url)
    parent, children = sweep_family(client, "team", sparsities)
    jobs = job_dirs(team_project, parent, sparsities)
    cache = team_project / "outputs" / "stage_cache"
    for child, job in zip(children, jobs, strict=True):
        assert child.data.tags["stage"] == "pipeline"
        check_job_run(client, child, job, artifact_root)
        # the job ran in the project (its working folder): its outputs live in the project's stage cache
        assert (job / "models" / "bnn.npz").resolve().is_relative_to(cache)
    # submitit ran each job: a log folder per job id (beside "%j", where it keeps the submitted array)
    logs = [p for p in (jobs[0].parent / ".submitit").iterdir() if p.name != "%j"]
    assert len(logs) == len(sparsities), logs

    # one registered model version per job, each made from its job's run
    versions = [v for v in client.search_model_versions("name='bitwise-nn'")
                if v.tags.get("pipeline_run") == parent.data.tags["pipeline_run"]]  # fmt: skip
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in children)
    assert {v.status for v in versions} == {"READY"}
    # the jobs logged to the server only: nothing of a local store in the project
    assert not (team_project / "mlflow.db").exists()
    assert not (team_project / "mlruns").exists()


DIRECT = """
import sys
from pipeline.tracking import StageTracker
with StageTracker(sys.argv[1], "team-direct", "probe") as tracker:
    tracker.log_metrics({"probe/value": 0.5}, step=3)
print(tracker.run_id)
"""


def test_postgresql_tracking_uri_logs_to_the_same_store(team_server, team_project):
    """tracking.uri may name the database itself (no server between): the run lands in the store the team
    server shows."""
    url, database, _ = team_server
    result = run(["python", "-c", DIRECT, database], team_project)
    run_id = result.stdout.strip().splitlines()[-1]
    assert "MLflow tracking at" not in result.stderr, result.stderr
    logged = MlflowClient(url).get_run(run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.tags["stage"] == "probe"
    assert [(m.step, m.value) for m in MlflowClient(url).get_metric_history(run_id, "probe/value")] == [(3, 0.5)]
