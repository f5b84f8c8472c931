"""Stopped stages: SIGTERM and SIGINT end a stage cleanly (status 143 / 130, one ``error:`` line, its MLflow
run KILLED, no output); what a SIGKILL leaves (temporaries, checkpoint folders, a RUNNING run) is cleaned
up when a stage starts next; Hydra's own errors exit 2 with one line; a copied project's store is refused
rather than written into the original's folder. Real processes, signals and files throughout.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pipeline.artifacts import Artifacts
from pipeline.stage import CHECKPOINTS_PREFIX, remove_leftovers
from pipeline.tracking import StageTracker
from tests.conftest import copy_sources, project_env, tracked_epochs

pytestmark = pytest.mark.heavy  # make test starts this file early (tests/conftest.py)

SMOKE = ["experiment=smoke"]
HOST = os.uname().nodename
EXPERIMENT = "bitwise-nn-smoke"  # where smoke runs go (conf/experiment/smoke.yaml)
DATA_OPTIONS = "fashion_mnist, idx, mnist, mnist5k"


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests here chdir into throw-away projects; keep MLflow's process-wide tracking URI as it was."""
    monkeypatch.delenv("DVC_ROOT", raising=False)
    previous = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(previous)


def runs(project: Path) -> list:
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def run_main(module: str, *overrides: str) -> int | str | None:
    """``python -m pipeline.<module> <overrides>`` in this process (the working directory is the project);
    returns its exit status (None: it returned)."""
    import importlib

    main = importlib.import_module(f"pipeline.{module}").main
    argv = sys.argv
    sys.argv = [module, *overrides]
    try:
        main()
    except SystemExit as stop:
        return stop.code
    finally:
        sys.argv = argv
    return None


def temporaries(project: Path) -> list[str]:
    return sorted(p.name for folder in ("data", "models", "reports") for p in (project / folder).glob(".*.tmp"))


# -- Hydra's own errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "override", "message"),
    [
        ("binarize", "data=nope", "In 'config': Could not find 'data/nope'; the options are " + DATA_OPTIONS),
        ("run", "data=nope", "In 'config': Could not find 'data/nope'; the options are " + DATA_OPTIONS),
        ("binarize", "foo=1", "foo: no such config key (add --cfg job to the command to print the config)"),
        ("binarize", "model.foo=1", "model.foo: no such config key (add --cfg job to the command to print the config)"),
        (
            "binarize",
            "model.hidden=[",
            "cannot parse the override 'model.hidden=[': no viable alternative at input '['",
        ),
        ("binarize", "+foo=1", "foo: Key 'foo' not in 'Config'"),  # Hydra adds it; our schema refuses it
    ],
)
def test_hydra_errors_exit_2_with_one_line(command, override, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert run_main(command, override) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {command}: {message}"]
    # The command put back what it changed in the process (tests, and callers that embed it).
    assert "HYDRA_FULL_ERROR" not in os.environ
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers


# -- Stopped processes: SIGKILL, then SIGTERM and SIGINT in the middle of training ----------------------------

# Run as `python -c KILLED_WHILE_WRITING <checkpoint folder prefix>`: a stage is killed (SIGKILL) halfway
# through writing data/features.npz, while its MLflow run is open and (as in training) it holds a checkpoint
# folder, whose path it prints. The project's own code throughout, without the seconds torch and Lightning
# take to import.
KILLED_WHILE_WRITING = """
import os, signal, sys, tempfile
from pathlib import Path
from pipeline.files import atomic_path, writer_prefix
from pipeline.tracking import StageTracker

StageTracker(None, "bitwise-nn-smoke", "binarize").start()
print(tempfile.mkdtemp(prefix=writer_prefix(sys.argv[1])), flush=True)
with atomic_path(Path("data/features.npz")) as tmp:
    tmp.write_bytes(b"PK half an archive")
    os.kill(os.getpid(), signal.SIGKILL)
"""
#: case: (stage named in the error line, the signal, the command after `python -m`)
INTERRUPTED = {
    "pretrain": ("pretrain", signal.SIGTERM, ["pipeline.pretrain", *SMOKE, "augment.shift=0", "pretrain.epochs=1000"]),
    "run": ("run", signal.SIGINT, ["pipeline.run", *SMOKE, "augment.shift=0", "pretrain.epochs=1000"]),
}


@dataclass
class Killed:
    """A project where binarize was killed with SIGKILL, and what the next binarize found and did there."""

    project: Path
    result: subprocess.CompletedProcess[str]
    left: list[str]  # its temporaries, as the killed process left them
    orphan: Run  # its MLflow run, as left
    checkpoints: Path
    planted: list[str]  # temporaries of a live writer and of another machine, planted before the next start
    live_run: str  # a RUNNING run of a live process (this one), created before the next start
    status: int | str | None  # of the next binarize
    out: str  # its stdout
    temporaries_after: list[str]
    runs_after: dict[str, Run]


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def private_tmp(project: Path) -> Path:
    """The project's own temp folder: every stage that starts on this machine removes the checkpoint
    folders of dead processes from the shared one, so a test watching its own needs a folder of its own."""
    folder = project / "tmp"
    folder.mkdir(exist_ok=True)
    return folder


def kill_and_restart(project: Path) -> Killed:
    """binarize killed with SIGKILL mid-write, then started again in this process."""
    command = [sys.executable, "-c", KILLED_WHILE_WRITING, CHECKPOINTS_PREFIX]
    env = project_env(TMPDIR=str(private_tmp(project)))
    result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    left, [orphan] = temporaries(project), runs(project)
    # To be left alone: a temporary and a run of a live process (this one: a parallel job of a sweep, say),
    # and a temporary of another machine on a shared file system (whose processes cannot be checked here).
    planted = [f".features.npz.{HOST}-{os.getpid()}.live0000.tmp", ".input_encoder.json.elsewhere-1.rmt00000.tmp"]
    for name in planted:
        (project / "data" / name).write_bytes(b"being written")
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    live_run = client.create_run(orphan.info.experiment_id, tags={"host": HOST, "pid": str(os.getpid())}).info.run_id
    cwd, tmp, out = Path.cwd(), tempfile.tempdir, io.StringIO()
    os.chdir(project)
    tempfile.tempdir = str(private_tmp(project))
    try:
        with contextlib.redirect_stdout(out):
            status = run_main("binarize", *SMOKE)
    finally:
        os.chdir(cwd)
        tempfile.tempdir = tmp
    temporaries_after, runs_after = temporaries(project), {run.info.run_id: run for run in runs(project)}
    for name in planted:  # the project goes on to the SIGTERM case
        (project / "data" / name).unlink()
    client.set_terminated(live_run)
    checkpoints = Path(result.stdout.splitlines()[-1])
    return Killed(
        project,
        result,
        left,
        orphan,
        checkpoints,
        planted,
        live_run,
        status,
        out.getvalue(),
        temporaries_after,
        runs_after,
    )


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> tuple[Killed, dict[str, tuple[Path, subprocess.CompletedProcess[str], int]]]:
    """The SIGKILL case, then each case of INTERRUPTED sent its signal once pretrain has logged an epoch
    (Lightning is then inside ``fit``, its signal connector installed), the two at once: ``(killed, {case:
    (project, result, pid)})``. Pretrain uses the features of the SIGKILL case's project, written by the
    binarize that cleaned up after the killed one."""
    projects = {case: copy_sources(tmp_path_factory.mktemp(case)) for case in INTERRUPTED}
    logs = {case: projects[case] / "stderr.log" for case in INTERRUPTED}
    processes = {}

    def start(case: str) -> None:
        with logs[case].open("w") as log:
            command = [sys.executable, "-m", *INTERRUPTED[case][2]]
            env = project_env(TMPDIR=str(private_tmp(projects[case])))
            # SIGINT as a terminal delivers it: a test runner started in the background (`cmd &` without job
            # control) ignores SIGINT, the child would inherit that, and Python keeps an ignored SIGINT ignored.
            processes[case] = subprocess.Popen(
                command, cwd=projects[case], env=env, stdout=log, stderr=log, preexec_fn=default_sigint
            )

    killed = kill_and_restart(projects["pretrain"])
    for case in INTERRUPTED:
        start(case)
    deadline = time.monotonic() + 300
    pending = dict(processes)
    while pending:
        for case, process in list(pending.items()):
            assert process.poll() is None, logs[case].read_text()
            if tracked_epochs(projects[case] / "mlflow.db", "pretrain/val_accuracy") >= 1:
                process.send_signal(INTERRUPTED[case][1])
                del pending[case]
        assert time.monotonic() < deadline, "pretrain did not log an epoch in time"
        time.sleep(0.2)
    results = {}
    for case, process in processes.items():
        process.wait(timeout=120)
        result = subprocess.CompletedProcess(process.args, process.returncode, "", logs[case].read_text())
        results[case] = (projects[case], result, process.pid)
    return killed, results


@pytest.mark.slow
def test_next_stage_cleans_up_after_a_sigkilled_one(stopped):
    killed = stopped[0]
    [partial] = killed.left
    assert partial.startswith(f".features.npz.{HOST}-")
    assert killed.orphan.info.status == "RUNNING" and killed.orphan.data.tags["host"] == HOST
    assert killed.checkpoints.name.startswith(f"{CHECKPOINTS_PREFIX}{HOST}-")

    assert killed.status is None  # the next binarize ran
    data = killed.project / "data"
    assert f"binarize: removed {data / partial}, left by a run that was killed" in killed.out
    assert f"binarize: removed {killed.checkpoints}, left by a run that was killed" in killed.out
    assert killed.temporaries_after == sorted(killed.planted)
    assert not killed.checkpoints.exists()
    orphan = killed.runs_after[killed.orphan.info.run_id]
    assert orphan.info.status == "FAILED"
    assert "ended without ending it" in orphan.data.tags["mlflow.note.content"]
    assert killed.runs_after[killed.live_run].info.status == "RUNNING"


@pytest.mark.slow
@pytest.mark.parametrize("case", list(INTERRUPTED))
def test_interrupted_training_exits_128_plus_signal_and_leaves_nothing(stopped, case):
    name, signum, _ = INTERRUPTED[case]
    project, result, pid = stopped[1][case]
    assert result.returncode == 128 + signum, result.stderr
    lines = result.stderr.splitlines()
    assert lines[-1] == f"error: {name}: interrupted by {signal.Signals(signum).name}", result.stderr
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in result.stderr
    # (mid-fit by construction: sent once epochs of the 1000 were logged; Lightning's own "Received SIGTERM"
    # note is INFO, which the stages keep off the console)
    # No output of the interrupted training, finished or partial, and no checkpoint folder left behind.
    assert not list(project.rglob("pretrained.pt")) and not list(project.rglob("pretrain_history.csv"))
    assert not list(project.rglob("*.tmp"))
    assert not list(private_tmp(project).glob(f"{CHECKPOINTS_PREFIX}*"))
    [run] = [r for r in runs(project) if r.data.tags.get("pid") == str(pid)]
    assert run.info.status == "KILLED"


def test_evaluate_removes_the_nested_temporary_of_a_killed_model_write(tmp_path, capsys):
    """evaluate saves the model file (bnn_core.model_file, atomically) into atomic_path's temporary: killed
    in between, it leaves two temporaries, both named after its process."""
    finished = subprocess.Popen(["true"])
    finished.wait()
    models = tmp_path / "models"
    models.mkdir()
    staged = f".bnn.npz.{HOST}-{finished.pid}.abcdefgh.tmp"
    names = [staged, f".{staged}.ijklmnop.tmp", f".bnn.npz.{HOST}-{os.getpid()}.qrstuvwx.tmp"]
    for name in names:
        (models / name).write_bytes(b"")
    remove_leftovers("evaluate", Artifacts(tmp_path))
    assert sorted(p.name for p in models.iterdir()) == names[2:]  # this process is alive
    assert capsys.readouterr().out.count("evaluate: removed ") == 2


# -- A copied project ------------------------------------------------------------------------------------------


def test_copied_project_does_not_log_into_the_original(tmp_path, monkeypatch):
    original, copy = tmp_path / "original", tmp_path / "copy"
    original.mkdir()
    (tmp_path / "note.txt").write_text("an artifact")
    monkeypatch.chdir(original)
    with StageTracker(None, EXPERIMENT, "binarize") as tracker:
        tracker.log_artifact(tmp_path / "note.txt")
    assert tracker.run_id is not None
    shutil.copytree(original, copy)
    before = sorted(p.relative_to(original) for p in original.rglob("*"))

    monkeypatch.chdir(copy)
    warning = r"ArtifactLocationError: .*copy/mlflow.db keeps the artifacts"
    with pytest.warns(RuntimeWarning, match=warning) as seen, StageTracker(None, EXPERIMENT, "binarize") as tracker:
        tracker.log_artifact(tmp_path / "note.txt")
    assert tracker.run_id is None
    assert f"in {original / 'mlruns'}, outside this project's {copy / 'mlruns'}" in str(seen[0].message)
    assert sorted(p.relative_to(original) for p in original.rglob("*")) == before

    monkeypatch.chdir(original)  # the original itself is fine
    with StageTracker(None, EXPERIMENT, "binarize") as tracker:
        pass
    assert tracker.run_id is not None
