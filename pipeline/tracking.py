"""MLflow tracking of the pipeline stages.

One store per project: ``sqlite:///<repository root>/mlflow.db`` (MLflow 3's file store raises). Inside
``dvc exp run --queue`` the stage runs in a temporary copy, so the root is taken from ``DVC_ROOT`` when
DVC sets it. ``tracking.uri`` overrides the store (for example a shared ``mlflow server``).

Every stage run carries the tag ``pipeline_run``: the same value for all stages that one ``dvc repro``
(or ``dvc exp run``) executes, so a run of the whole chain can be found and compared as one.

Tracking never breaks the pipeline: if the store cannot be reached, a warning with the URI is printed
once and the stage goes on writing its local outputs.
"""

from __future__ import annotations

import os
import subprocess
import uuid
import warnings
from pathlib import Path
from typing import Any

import lightning as L

PIPELINE_RUN_ENV = "BNN_PIPELINE_RUN"


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def default_tracking_uri() -> str:
    return f"sqlite:///{project_root() / 'mlflow.db'}"


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


def pipeline_run_id() -> str:
    """Identifier shared by the stages of one pipeline execution.

    ``$BNN_PIPELINE_RUN`` if set; else derived from the ``dvc`` process that launched this stage;
    else a fresh id (a stage run by hand is a pipeline run of its own).
    """
    explicit = os.environ.get(PIPELINE_RUN_ENV)
    if explicit:
        return explicit
    ancestor = _dvc_ancestor()
    if ancestor is not None:
        return str(uuid.uuid5(uuid.NAMESPACE_OID, f"{os.uname().nodename}-{ancestor}"))
    return uuid.uuid4().hex


def git_commit(root: Path) -> tuple[str, bool]:
    """``(commit, dirty)`` of the repository at ``root``; ``("unknown", True)`` outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        return commit, bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True


class StageTracker:
    """An MLflow run for one stage; every call is a no-op after the store has failed once."""

    def __init__(self, uri: str | None, experiment: str, stage: str, tags: dict[str, str] | None = None):
        self.uri = uri or default_tracking_uri()
        self.experiment = experiment
        self.stage = stage
        self.tags = dict(tags or {})
        self.run_id: str | None = None
        self._failed = False

    def _guard(self, action: str, fn, *args, **kwargs) -> Any:
        if self._failed:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # any store failure: network, sqlite, permissions
            self._failed = True
            warnings.warn(
                f"MLflow tracking at {self.uri} failed while trying to {action} ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); the stage continues without tracking",
                RuntimeWarning,
                stacklevel=3,
            )
            return None

    def start(self) -> StageTracker:
        import mlflow

        def _start() -> str:
            mlflow.set_tracking_uri(self.uri)
            mlflow.set_experiment(self.experiment)
            commit, dirty = git_commit(project_root())
            tags = {
                "stage": self.stage,
                "pipeline_run": pipeline_run_id(),
                "git_commit": commit,
                "git_dirty": str(dirty).lower(),
                **self.tags,
            }
            if os.environ.get("DVC_EXP_NAME"):
                tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
            return mlflow.start_run(run_name=self.stage, tags=tags).info.run_id

        self.run_id = self._guard("start a run", _start)
        return self

    def end(self, failed: bool = False) -> None:
        import mlflow

        if self.run_id is not None:
            self._guard("end the run", mlflow.end_run, status="FAILED" if failed else "FINISHED")

    def __enter__(self) -> StageTracker:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end(failed=exc_type is not None)

    def log_params(self, params: dict[str, object]) -> None:
        import mlflow

        self._guard("log params", mlflow.log_params, {k: str(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import mlflow

        self._guard("log metrics", mlflow.log_metrics, {k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: Path) -> None:
        import mlflow

        self._guard("log an artifact", mlflow.log_artifact, str(path))


class EpochHistory(L.Callback):
    """Collects the epoch-level metrics of a training run and logs them to the tracker, step = epoch."""

    def __init__(self, tracker: StageTracker):
        self.tracker = tracker
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
        self.rows.append({"epoch": trainer.current_epoch, **metrics})
        self.tracker.log_metrics(metrics, step=trainer.current_epoch)

    def to_csv(self) -> str:
        columns = ["epoch", "train/loss", "train/accuracy", "val/loss", "val/accuracy"]
        lines = [",".join(c.replace("/", "_") for c in columns)]
        for row in self.rows:
            lines.append(
                ",".join(f"{row.get(c, float('nan')):.6g}" if c != "epoch" else str(row["epoch"]) for c in columns)
            )
        return "\n".join(lines) + "\n"
