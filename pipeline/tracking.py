"""MLflow tracking of the pipeline stages.

One store per project: ``sqlite:///<repository root>/mlflow.db`` (MLflow 3's file store raises). Inside
``dvc exp run --queue`` the stage runs in a temporary copy, so the root is taken from ``DVC_ROOT`` when
DVC sets it. ``tracking.uri`` overrides the store (for example a shared ``mlflow server``).

Every stage run carries the tag ``pipeline_run``: the same value for all stages that one ``dvc repro``
(or ``dvc exp run``) executes, so a run of the whole chain can be found and compared as one.

Tracking never breaks the pipeline: if the store cannot be reached, a warning with the URI is printed
once and the stage goes on writing its local outputs.

A run ends FINISHED, FAILED (an error) or KILLED (SIGTERM, SIGINT). A process killed with SIGKILL cannot
end its run: every run records the ``host`` and ``pid`` that run it, and a stage starting on that host
later marks the runs whose process is gone as FAILED, with a note saying so.
"""

from __future__ import annotations

import logging
import os
import random
import subprocess
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pipeline.artifacts import Artifacts
from pipeline.files import Interrupted, process_alive

if TYPE_CHECKING:
    from pipeline.config import Config

PIPELINE_RUN_ENV = "BNN_PIPELINE_RUN"
#: ``make dashboard``'s address (MLFLOW_PORT in the Makefile).
DASHBOARD_URL = "http://127.0.0.1:5000"
T = TypeVar("T")


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def default_tracking_uri() -> str:
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def run_description(config: Config) -> str:
    """What a run trained, as its name says it: ``mnist5k 3x1024 s0.50 bnn`` (data source, hidden layers,
    sparsity of round 2, network)."""
    hidden = config.model.hidden
    widths = f"{len(hidden)}x{hidden[0]}" if len(set(hidden)) == 1 else "-".join(map(str, hidden))
    return f"{config.data.source} {widths} s{config.finetune.sparsity:.2f} {config.model.network}"


def _process_start_ticks(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime) after the parenthesised command name, which may itself hold spaces.
    return stat.rsplit(")", 1)[1].split()[19]


def _dvc_ancestor() -> str | None:
    """``<pid>-<start time>`` of the nearest ancestor process running DVC, if any (Linux /proc)."""
    pid = os.getppid()
    for _ in range(8):
        if pid <= 1:
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return None
        if any(Path(part.decode(errors="replace")).name == "dvc" for part in cmdline[:2]):
            return f"{pid}-{_process_start_ticks(pid)}"
        ppid_line = next((line for line in status.splitlines() if line.startswith("PPid:")), None)
        if ppid_line is None:
            return None
        pid = int(ppid_line.split()[1])
    return None


def pipeline_run_id() -> tuple[str, bool]:
    """``(id, shared)``: the identifier of the pipeline execution this stage belongs to.

    ``$BNN_PIPELINE_RUN`` if set (a Hydra sweep sets it for its jobs); else derived from the ``dvc``
    process that launched this stage; in both cases ``shared`` is True and the stages get a common MLflow
    parent run. A stage run by hand is a pipeline of its own: a fresh id, no parent run.
    """
    explicit = os.environ.get(PIPELINE_RUN_ENV)
    if explicit:
        return explicit, True
    ancestor = _dvc_ancestor()
    if ancestor is not None:
        return str(uuid.uuid5(uuid.NAMESPACE_OID, f"{os.uname().nodename}-{ancestor}")), True
    return uuid.uuid4().hex, False


def pipeline_written_paths(root: Path) -> list[str]:
    """What ``dvc repro`` itself rewrites in the work tree: ``dvc.lock`` and every stage output (the ones
    git tracks are the small reports). Changes there say nothing about the code a run used."""
    from pipeline.stages import STAGES  # pipeline.stages imports the stage modules' neighbours

    artifacts = Artifacts(root)
    return ["dvc.lock", *(artifacts.relative(name) for stage in STAGES for name in stage.outputs)]


def git_commit(root: Path) -> tuple[str, bool]:
    """``(commit, dirty)`` of the repository at ``root``; ``("unknown", True)`` outside git.

    ``dirty``: a tracked file differs from the commit, not counting what the pipeline writes
    (:func:`pipeline_written_paths`): in a clean clone, the stages after the first of a ``dvc repro``
    would otherwise all be tagged dirty, because DVC updates ``dvc.lock`` and the reports as it goes.
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        excluded = [f":(exclude){path}" for path in pipeline_written_paths(root)]
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return commit, bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True


def with_retries(fn: Callable[[], T], attempts: int = 8) -> T:
    """Parallel jobs share one SQLite file: retry briefly when it is locked by another writer."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:
            if "locked" not in str(err).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.05 * 2**attempt + random.random() * 0.05)
    raise AssertionError("unreachable")


def _configure_client() -> None:
    # An unreachable server should cost seconds, not MLflow's default minutes of retries: a refused
    # connection fails at once. A slow answer is not an unreachable server, though: a team server's worker
    # connects to its database on its first request, and under a sweep's load answers took over 5 s here
    # (tests/test_team_server.py), which cost the sweep its parent run. A host that never answers costs
    # 2 x 30 s, once per stage (a tracker stops at its first failure).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # The console shows what a user asked for: not MLflow's notes (creating the store's tables, validating
    # the input example, INFO) nor a progress bar for each artifact it reads back; its warnings still show.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow  # noqa: F401  (first: importing it sets its loggers' level)

    logging.getLogger("mlflow").setLevel(logging.WARNING)


class ArtifactLocationError(RuntimeError):
    """The project's store keeps an experiment's artifacts outside the project."""


def check_artifact_location(experiment: str, location: str) -> None:
    """Raise :class:`ArtifactLocationError` unless ``location`` (of an experiment in the project's own
    store, ``mlflow.db``) lies in the project's ``mlruns/``.

    MLflow stores an experiment's artifact location, and every run's, as an absolute path (it resolves a
    relative one when the experiment is created), and its API cannot change them. In a copy of the project
    its runs would write their artifacts into the original's ``mlruns/``; after a move, into a folder that
    is gone. So the mismatch is said instead, and the stage runs without tracking. Locations that are not
    local paths (an object store) are not the project's to judge.
    """
    from mlflow.utils.file_utils import local_file_uri_to_path
    from mlflow.utils.uri import is_local_uri

    if not is_local_uri(location):
        return
    expected = project_root() / "mlruns"
    path = Path(local_file_uri_to_path(location)).resolve()
    if path != expected and expected not in path.parents:
        raise ArtifactLocationError(
            f"{project_root() / 'mlflow.db'} keeps the artifacts of experiment {experiment!r} in {path}, "
            f"outside this project's {expected}: the project was copied or moved, and runs logged here would "
            "write into that folder; move mlflow.db and mlruns/ aside to start a new store here, or log to the "
            "original store with tracking.uri=sqlite:///<its mlflow.db>"
        )


def ensure_experiment(uri: str, name: str) -> str:
    """Experiment id of ``name``, creating it (artifacts beside the default store) if needed; in the
    default store, an existing experiment's artifacts must be in the project (:func:`check_artifact_location`)."""
    _configure_client()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = with_retries(lambda: client.get_experiment_by_name(name))
    if experiment is not None:
        if uri == default_tracking_uri():
            check_artifact_location(name, experiment.artifact_location)
        return experiment.experiment_id
    location = (project_root() / "mlruns").as_uri() if uri == default_tracking_uri() else None
    try:
        return with_retries(lambda: client.create_experiment(name, artifact_location=location))
    except Exception:
        # Another job created it between our lookup and create.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def common_tags(extra: dict[str, str] | None = None) -> dict[str, str]:
    commit, dirty = git_commit(project_root())
    tags = {"git_commit": commit, "git_dirty": str(dirty).lower(), **(extra or {})}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    return tags


#: Tags of one stage's run that its parent (the whole ``dvc repro`` or sweep) does not share.
PER_STAGE_TAGS = ("stage", "kind", "pid", "pid_started", "mlflow.parentRunId")


def extend_parent(uri: str, parent_id: str, status: str) -> None:
    """Make the parent run span its children: its end moves to now (never back), and a child that did
    not finish marks it too (DVC stops at a failed stage)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = with_retries(lambda: client.get_run(parent_id)).info
    end_time = max(int(time.time() * 1000), parent.end_time or 0)
    final = status if status != "FINISHED" else parent.status
    with_retries(lambda: client.set_terminated(parent_id, status=final, end_time=end_time))


def find_or_create_parent(uri: str, experiment_id: str, pipeline_run: str, name: str, tags: dict[str, str]) -> str:
    """The parent run of a pipeline execution or sweep, found by its ``pipeline_run`` tag."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    query = f"tags.pipeline_run = '{pipeline_run}' and tags.kind = 'parent'"
    found = with_retries(lambda: client.search_runs([experiment_id], filter_string=query, max_results=1))
    if found:
        return found[0].info.run_id
    # what describes the execution, not the stage or process that happened to create its parent
    shared = {key: value for key, value in tags.items() if key not in PER_STAGE_TAGS}
    run = with_retries(
        lambda: client.create_run(
            experiment_id, run_name=name, tags={**shared, "pipeline_run": pipeline_run, "kind": "parent"}
        )
    )
    with_retries(lambda: client.set_terminated(run.info.run_id))
    return run.info.run_id


def process_tags() -> dict[str, str]:
    """Which process runs a run: ``host``, ``pid`` and ``pid_started`` (the process's start time, so that
    a reused pid is not taken for the original process), read by :func:`fail_orphaned_runs`."""
    tags = {"host": os.uname().nodename, "pid": str(os.getpid())}
    started = _process_start_ticks(os.getpid())
    if started is not None:  # Linux only (/proc)
        tags["pid_started"] = started
    return tags


def _process_gone(tags: dict[str, str]) -> bool:
    """Whether the process that ``tags`` (:func:`process_tags`) name, on this host, has ended."""
    pid = tags.get("pid", "")
    if not pid.isdigit():  # a run logged before runs recorded their process
        return False
    if not process_alive(int(pid)):
        return True
    recorded, current = tags.get("pid_started"), _process_start_ticks(int(pid))
    return recorded is not None and current is not None and recorded != current  # the pid was reused


def fail_orphaned_runs(uri: str, experiment_id: str) -> list[str]:
    """Mark FAILED the runs still RUNNING whose process, on this host, is gone (killed with SIGKILL, out of
    memory, the machine rebooted), with a note saying so; return their ids. Other hosts' runs cannot be
    checked from here and stay as they are."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    host = os.uname().nodename
    query = f"attributes.status = 'RUNNING' and tags.host = '{host}'"
    running = with_retries(lambda: client.search_runs([experiment_id], filter_string=query, max_results=1000))
    orphans = [run for run in running if _process_gone(run.data.tags)]
    for run in orphans:
        note = (
            f"Marked FAILED by a later stage: process {run.data.tags['pid']} on {host}, which ran this run, "
            "ended without ending it (killed with SIGKILL, out of memory, or the machine stopped)."
        )
        with_retries(lambda run=run, note=note: client.set_tag(run.info.run_id, "mlflow.note.content", note))
        with_retries(lambda run=run: client.set_terminated(run.info.run_id, "FAILED"))
    return [run.info.run_id for run in orphans]


class StageTracker:
    """An MLflow run for one stage or sweep job; every call is a no-op after the store has failed once.

    When the stage belongs to a shared pipeline execution (``dvc repro``, ``dvc exp run``, a Hydra
    sweep), its run is a child of that execution's parent run.
    """

    def __init__(
        self,
        uri: str | None,
        experiment: str,
        stage: str,
        tags: dict[str, str] | None = None,
        run_name: str = "",
        description: str = "",
        enabled: bool = True,
    ):
        """``description``: what the execution trains (:func:`run_description`), the name of the parent
        run that a ``dvc repro`` gets (else ``pipeline <id>``). ``enabled=False``: a tracker that logs
        nothing, for a training process other than global rank 0 (a data-parallel run is one MLflow run,
        rank 0's, whose metrics are already reduced across ranks)."""
        self.uri = uri or default_tracking_uri()
        self.run_name = run_name or stage
        self.experiment = experiment
        self.stage = stage
        self.tags = dict(tags or {})
        self.description = description
        self.run_id: str | None = None
        self.parent_id: str | None = None
        self.pipeline_run: str | None = None
        self.experiment_id: str | None = None
        self.in_sweep = False
        self._failed = not enabled  # off from the start: every call below is skipped, as after a failure

    @property
    def page_run_id(self) -> str | None:
        """The run whose page shows this execution as a whole: the parent of a ``dvc repro``'s stages; else
        this run (a stage by hand, a ``pipeline.run`` job: a sweep's parent shows the sweep, not one job)."""
        return self.parent_id if self.parent_id is not None and not self.in_sweep else self.run_id

    def page_url(self) -> str | None:
        """Where the run page shows this execution's trade-off: on the tracking server, or on
        ``make dashboard`` (http://127.0.0.1:5000) for the project's own store."""
        if self.page_run_id is None or self.experiment_id is None:
            return None
        base = self.uri.rstrip("/") if self.uri.startswith(("http://", "https://")) else DASHBOARD_URL
        return f"{base}/#/experiments/{self.experiment_id}/runs/{self.page_run_id}/artifactPath/tradeoff/tradeoff.png"

    def attempt(self, action: str, fn: Callable[[], T]) -> T | None:
        """``fn()``, retried while the store is locked; a failure is a warning (``could not <action>``) and
        turns this tracker off, as for every other call."""
        return self._guard(action, fn)

    def _guard(self, action: str, fn: Callable[..., T], *args, **kwargs) -> T | None:
        if self._failed:
            return None
        try:
            return with_retries(lambda: fn(*args, **kwargs))
        except Exception as err:  # any store failure: network, sqlite, permissions
            self._failed = True
            detail = str(err).splitlines()[0] if str(err) else ""
            warnings.warn(
                f"MLflow tracking at {self.uri} failed while trying to {action} ({type(err).__name__}: {detail}); "
                "the stage continues without tracking",
                RuntimeWarning,
                stacklevel=3,
            )
            return None

    def start(self) -> StageTracker:
        if self._failed:
            return self
        _configure_client()
        import mlflow

        def _start() -> str:
            mlflow.set_tracking_uri(self.uri)
            experiment_id = self.experiment_id = ensure_experiment(self.uri, self.experiment)
            fail_orphaned_runs(self.uri, experiment_id)
            pipeline_run, shared = pipeline_run_id()
            self.pipeline_run, self.in_sweep = pipeline_run, bool(os.environ.get(PIPELINE_RUN_ENV))
            tags = common_tags(
                {"stage": self.stage, "pipeline_run": pipeline_run, "kind": "stage", **process_tags(), **self.tags}
            )
            if shared:
                name = self.description or f"pipeline {pipeline_run[:8]}"
                self.parent_id = find_or_create_parent(self.uri, experiment_id, pipeline_run, name, tags)
                tags["mlflow.parentRunId"] = self.parent_id
            return mlflow.start_run(experiment_id=experiment_id, run_name=self.run_name, tags=tags).info.run_id

        self.run_id = self._guard("start a run", _start)
        return self

    def end(self, status: str = "FINISHED") -> None:
        """End the run as ``status``: FINISHED, FAILED or KILLED (MLflow's run statuses)."""
        import mlflow

        if self.run_id is not None:
            self._guard("end the run", mlflow.end_run, status=status)
        if self.parent_id is not None:
            self._guard("extend the parent run", extend_parent, self.uri, self.parent_id, status)

    def __enter__(self) -> StageTracker:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.end("FINISHED")
        else:  # a signal that stopped the stage is not a failure of the stage
            self.end("KILLED" if isinstance(exc, Interrupted | KeyboardInterrupt) else "FAILED")

    def log_params(self, params: dict[str, object]) -> None:
        import mlflow

        self._guard("log params", mlflow.log_params, {k: str(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import mlflow

        self._guard("log metrics", mlflow.log_metrics, {k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        import mlflow

        self._guard("log an artifact", mlflow.log_artifact, str(path), folder)

    def set_tags(self, tags: dict[str, str]) -> None:
        import mlflow

        self._guard("set tags", mlflow.set_tags, tags)


class SweepTracking(Callback):
    """Hydra callback: one MLflow parent run per multirun sweep; every job's run becomes its child.

    The sweep's id goes to the jobs through ``$BNN_PIPELINE_RUN`` (set before any job is launched, so
    local, joblib and submitit workers inherit it). The parent and the experiment are created here, in
    the launching process, so parallel jobs never race to create them.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: object) -> None:
        sweep_id = uuid.uuid4().hex
        os.environ[PIPELINE_RUN_ENV] = sweep_id
        uri = config.tracking.uri or default_tracking_uri()
        overrides = " ".join(config.hydra.overrides.task) or "(none)"
        try:
            experiment_id = ensure_experiment(uri, config.tracking.experiment)
            tags = common_tags({"hydra_overrides": overrides, "data_source": str(config.data.source)})
            find_or_create_parent(uri, experiment_id, sweep_id, f"sweep {config.hydra.sweep.dir}", tags)
        except Exception as err:  # tracking never stops a sweep
            warnings.warn(
                f"MLflow tracking at {uri} failed to create the sweep's parent run ({err})",
                RuntimeWarning,
                stacklevel=2,
            )


def log_table_rows(uri: str | None, experiment: str, table: str, rows: list[dict], folder: Path) -> None:
    """One finished MLflow run per table row, children of the sweep's parent run (found through
    ``$BNN_PIPELINE_RUN``), so the dashboard can chart accuracy against bit-ops row by row; the table's
    files go to the parent run. Row runs carry the tag ``kind = <table>_row`` and metrics ``<table>/...``.
    """
    _configure_client()
    from mlflow.tracking import MlflowClient

    uri = uri or default_tracking_uri()
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(uri, experiment)
    sweep_id = os.environ.get(PIPELINE_RUN_ENV) or uuid.uuid4().hex
    parent = find_or_create_parent(uri, experiment_id, sweep_id, f"{table} {folder.name}", common_tags())
    for row in rows:
        label = f"{table} {row['network']} {row['input']}"
        if row["network"].startswith("bnn"):
            label += f" s={row['sparsity']:g}"
        tags = {"kind": f"{table}_row", "pipeline_run": sweep_id, "data_source": folder.name}
        _log_row_run(client, experiment_id, parent, table, label, row, tags)
    for path in sorted(folder.glob(f"{table}.*")):
        with_retries(lambda path=path: client.log_artifact(parent, str(path), table))


def _log_row_run(
    client, experiment_id: str, parent: str, table: str, label: str, row: dict, tags: dict[str, str]
) -> None:
    """A finished run holding one table row: numbers as metrics, words (and the sparsity) as params."""
    from mlflow.entities import Metric, Param

    all_tags = {**common_tags(tags), "mlflow.parentRunId": parent}
    run = with_retries(lambda: client.create_run(experiment_id, run_name=label, tags=all_tags))
    now = int(time.time() * 1000)
    numbers = {key: float(value) for key, value in row.items() if isinstance(value, int | float)}
    if "test_accuracy_ci95" in row:  # the Wilson interval, as two metrics
        numbers["test_accuracy_ci95_low"], numbers["test_accuracy_ci95_high"] = map(float, row["test_accuracy_ci95"])
    words = {key: str(value) for key, value in row.items() if isinstance(value, str)}
    metrics = [Metric(f"{table}/{key}", value, now, 0) for key, value in numbers.items()]
    params = [Param(key, value) for key, value in {**words, "sparsity": str(row["sparsity"])}.items()]
    with_retries(lambda: client.log_batch(run.info.run_id, metrics=metrics, params=params))
    with_retries(lambda: client.set_terminated(run.info.run_id))
