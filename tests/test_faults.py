"""Bad input, faults and integrity, through the real command lines in temporary copies of the project.

- training that diverges (NaN or infinite loss, an overflowing optimizer step) stops the stage cleanly and
  leaves no checkpoint of the broken run;
- a stage killed with SIGKILL leaves no half-written output, and re-running ``dvc repro`` gives the same
  bytes as an uninterrupted run;
- an unreachable MLflow server costs a warning per stage, not the pipeline (nor minutes of retries);
- four parallel sweep jobs writing to one SQLite store are all recorded;
- config and data errors end the stage before any work with one line naming the key or file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import ROOT, compose_params, copy_sources, git_project, project_env, run, tracked_epochs

pytestmark = [pytest.mark.slow, pytest.mark.heavy]
SMOKE = ["experiment=smoke"]
#: Outputs of binarize and pretrain (smoke), made once and copied into the tests that start later.
UPSTREAM = ["data/features.npz", "data/input_encoder.json", "models/pretrained.pt", "reports/pretrain_history.csv"]
TMP_NAME = re.compile(r"^\..+\.tmp$")  # pipeline.files.atomic_path's temporary names


def stage(project: Path, name: str, *overrides: str) -> subprocess.CompletedProcess[str]:
    return run(["python", "-m", f"pipeline.{name}", *overrides], project, check=False)


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def smoke_repro(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess[str], str]:
    """``dvc repro`` of the smoke config with a tracking server where nothing listens: ``(project, result, uri)``.

    Its outputs (tracking does not change them) are also the upstream outputs the fault tests start from.
    """
    project = git_project(tmp_path_factory.mktemp("smoke"))
    uri = f"http://127.0.0.1:{free_port()}"
    compose_params(project, [*SMOKE, f"tracking.uri={uri}"])
    result = subprocess.run(
        ["dvc", "repro"], cwd=project, env=project_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return project, result, uri


@pytest.fixture(scope="module")
def upstream(smoke_repro) -> Path:
    project, result, _ = smoke_repro
    assert result.returncode == 0, result.stdout
    return project


def with_upstream(project: Path, upstream: Path, files: list[str]) -> None:
    for name in files:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(upstream / name, project / name)


def files_under(project: Path, *folders: str) -> list[str]:
    return sorted(
        str(p.relative_to(project)) for folder in folders for p in (project / folder).rglob("*") if p.is_file()
    )


def mlflow_runs(store: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("bitwise-nn-smoke")  # conf/experiment/smoke.yaml
    return client.search_runs([experiment.experiment_id]) if experiment else []


def assert_clean_failure(result: subprocess.CompletedProcess[str], prefix: str) -> str:
    """Exit status 2, the last stderr line is the one error line, no traceback; returns that line."""
    assert result.returncode == 2, result.stderr
    line = last_line(result.stderr)
    assert line.startswith(prefix), result.stderr
    assert "Traceback" not in result.stderr
    assert sum(x.startswith("error:") for x in result.stderr.splitlines()) == 1, result.stderr
    return line


# -- 1. Diverging training ------------------------------------------------------------------------------------


# Run as `python -c DIVERGE_AT <value> <epoch> <overrides...>`: the training loss is multiplied by <value>
# from epoch <epoch> on, as if training blew up midway (an earlier epoch had a good validation score).
DIVERGE_AT = """
import sys
import torch
from bnn_core import lightning_modules
from pipeline import pretrain

factor, epoch = float(sys.argv[1]), int(sys.argv[2])
real_cross_entropy, state = torch.nn.functional.cross_entropy, {"epoch": 0}

def on_train_epoch_start(self):
    state["epoch"] = self.current_epoch

def cross_entropy(*args, **kwargs):
    loss = real_cross_entropy(*args, **kwargs)
    return loss * factor if state["epoch"] >= epoch else loss

lightning_modules._Classifier.on_train_epoch_start = on_train_epoch_start
torch.nn.functional.cross_entropy = cross_entropy
sys.argv = ["pretrain", *sys.argv[3:]]
pretrain.main()
"""
# Run as `python -c KILLED_WHILE_SAVING <overrides...>`: pretrain is killed (SIGKILL) halfway through writing
# its checkpoint (models/pretrained.pt; Lightning's own checkpoints during training are saved as usual).
KILLED_WHILE_SAVING = """
import os
import signal
import sys
import torch
from pipeline import pretrain

torch_save = torch.save

def save(obj, handle, *args, **kwargs):
    if ".pretrained.pt." not in str(getattr(handle, "name", handle)):
        return torch_save(obj, handle, *args, **kwargs)
    handle.write(b"PK\\x03\\x04 the first half of a checkpoint")
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save
sys.argv = ["pretrain", *sys.argv[1:]]
pretrain.main()
"""
#: case: (upstream files the project starts with, command line)
BROKEN_RUNS = {
    # The loss turns NaN in the first epoch. Injected: the configs that used to do it for real (an infinite
    # weight decay or learning rate) are now refused by validation, see test_config.py.
    "nan": (UPSTREAM[:2], ["python", "-c", DIVERGE_AT, "nan", "0", *SMOKE]),
    # Training is fine for an epoch, then the loss is infinite; the project has a model from an earlier run.
    "inf midway": (UPSTREAM, ["python", "-c", DIVERGE_AT, "inf", "1", *SMOKE, "pretrain.epochs=3"]),
    # Not a divergence: section 2 checks what a kill in the middle of writing an output leaves.
    "killed while saving": (UPSTREAM[:2], ["python", "-c", KILLED_WHILE_SAVING, *SMOKE]),
}


@pytest.fixture(scope="module")
def broken_runs(tmp_path_factory, upstream) -> dict[str, tuple[Path, subprocess.CompletedProcess[str], dict]]:
    """Each case of BROKEN_RUNS in its own project, two at a time: ``(project, result, files before)``."""

    def one(case: str) -> tuple[Path, subprocess.CompletedProcess[str], dict]:
        files, command = BROKEN_RUNS[case]
        project = copy_sources(tmp_path_factory.mktemp(re.sub(r"\W+", "_", case)))
        with_upstream(project, upstream, files)
        before = {name: (project / name).read_bytes() for name in files}
        return project, run(command, project, check=False), before

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(BROKEN_RUNS, pool.map(one, BROKEN_RUNS), strict=True))


def test_nan_loss_stops_pretrain_and_leaves_no_checkpoint(broken_runs):
    project, result, _ = broken_runs["nan"]
    line = assert_clean_failure(result, "error: pretrain: ")
    assert re.search(r"loss became nan at epoch 0\b", line), line
    assert files_under(project, "models", "reports") == []
    [tracked] = [r for r in mlflow_runs(project / "mlflow.db") if r.data.tags.get("stage") == "pretrain"]
    assert tracked.info.status == "FAILED"


def test_loss_blowing_up_midway_keeps_the_previous_checkpoint(broken_runs):
    project, result, before = broken_runs["inf midway"]
    line = assert_clean_failure(result, "error: pretrain: ")
    assert re.search(r"loss became inf at epoch 1\b", line), line
    # Neither epoch 0's good weights nor anything else of the broken run replaced the previous outputs.
    assert {name: (project / name).read_bytes() for name in before} == before
    assert files_under(project, "models", "reports") == sorted(UPSTREAM[2:])


# -- 2. Killed stages -----------------------------------------------------------------------------------------


def test_stage_killed_while_writing_its_checkpoint_leaves_only_a_temporary_file(broken_runs):
    project, result, _ = broken_runs["killed while saving"]
    assert result.returncode == -signal.SIGKILL, result.stderr
    [partial] = (project / "models").iterdir()
    assert TMP_NAME.match(partial.name) and partial.name.startswith(".pretrained.pt.")
    assert partial.read_bytes().endswith(b"the first half of a checkpoint")  # killed mid-write indeed
    assert not (project / "models" / "pretrained.pt").exists()


#: Long enough for pretrain to be killed in the middle of its training.
SLOW_PRETRAIN = [*SMOKE, "pretrain.epochs=4", "model.hidden=[256,256]"]


def wait_for_group_exit(pgid: int, timeout: float = 10) -> None:
    """Until no process of the group is left (zombies that nobody reaps count as gone after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def test_repro_after_sigkill_midway_gives_the_uninterrupted_result(project_copy, tmp_path):
    compose_params(project_copy, SLOW_PRETRAIN)
    reference = tmp_path / "reference"
    shutil.copytree(project_copy, reference, symlinks=True)
    env = project_env()
    # The reference runs meanwhile, uninterrupted (the two runs share the CPUs, not their results).
    with (tmp_path / "reference.log").open("w") as ref_log:
        ref = subprocess.Popen(["dvc", "repro", "evaluate"], cwd=reference, env=env, stdout=ref_log, stderr=ref_log)
        with (tmp_path / "killed.log").open("w") as log:
            killed = subprocess.Popen(
                ["dvc", "repro", "evaluate"],
                cwd=project_copy,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            deadline = time.monotonic() + 240
            while tracked_epochs(project_copy / "mlflow.db", "pretrain/val_accuracy") < 1:
                assert killed.poll() is None, (tmp_path / "killed.log").read_text()
                assert time.monotonic() < deadline, "pretrain did not reach its second epoch"
                time.sleep(0.25)
            os.killpg(killed.pid, signal.SIGKILL)  # dvc and the stage it runs
            killed.wait()
            wait_for_group_exit(killed.pid)
        ref.wait(timeout=300)
    assert ref.returncode == 0, (tmp_path / "reference.log").read_text()
    assert "Running stage 'pretrain'" in (tmp_path / "killed.log").read_text()

    # binarize had finished; pretrain was in its second of four epochs: none of its outputs may exist.
    left = files_under(project_copy, "data", "models", "reports")
    assert [f for f in left if not TMP_NAME.match(Path(f).name)] == [
        "data/.gitignore",
        "data/features.npz",
        "data/input_encoder.json",
    ]
    for name in ("data/features.npz", "data/input_encoder.json"):
        assert (project_copy / name).read_bytes() == (reference / name).read_bytes(), name

    # Just run it again: the killed dvc left its locks (.dvc/tmp/rwlock names its pid); DVC finds that
    # process gone and drops them.
    assert str(killed.pid) in (project_copy / ".dvc" / "tmp" / "rwlock").read_text()
    again = run(["dvc", "repro", "evaluate"], project_copy)
    assert re.findall(r"Running stage '(\w+)'", again.stdout) == ["pretrain", "finetune", "evaluate"]
    outputs = ["data/features.npz", "models/pretrained.pt", "models/finetuned.pt", "models/bnn.npz"]
    for name in outputs:
        assert (project_copy / name).read_bytes() == (reference / name).read_bytes(), f"{name} differs"
    for name in ("data", "models", "reports"):
        assert not [f for f in files_under(project_copy, name) if TMP_NAME.match(Path(f).name)]
    # metrics.json holds no wall-clock figures, so a resumed run reproduces it to the byte.
    metrics, expected = ((p / "reports" / "metrics.json").read_text() for p in (project_copy, reference))
    assert metrics == expected
    assert json.loads(metrics)["bnn"]["test_accuracy"] > 0.5  # a trained model, not a degenerate one


# -- 3. Unreachable tracking server ---------------------------------------------------------------------------


def test_unreachable_tracking_server_warns_once_per_stage_and_the_pipeline_completes(smoke_repro):
    project, result, uri = smoke_repro
    assert result.returncode == 0, result.stdout
    # Stage by stage (each one's output follows DVC's "Running stage" line): exactly one warning, with the URI.
    chunks = re.split(r"Running stage '(\w+)'", result.stdout)[1:]
    per_stage = dict(zip(chunks[::2], chunks[1::2], strict=True))
    assert sorted(per_stage) == ["baselines", "binarize", "evaluate", "export", "finetune", "pretrain", "report"]
    # export is a stand-alone command (pipeline.stages.COMMANDS) that logs nothing, so nothing to warn about
    assert "MLflow" not in per_stage.pop("export")
    for name, output in per_stage.items():
        assert output.count(f"MLflow tracking at {uri} failed") == 1, f"{name}:\n{output}"
        assert len(re.findall(r"Warning: .*MLflow", output)) == 1, f"{name}:\n{output}"
    assert json.loads((project / "reports" / "metrics.json").read_text())["bnn"]["test_accuracy"] > 0
    for name in ("report.md", "baselines.json", "pretrain_history.csv", "finetune_history.csv", "tradeoff.png"):
        assert (project / "reports" / name).stat().st_size > 0, name
    assert not (project / "mlflow.db").exists()


PROBE_TRACKING = """
import sys
import time
from pipeline.tracking import StageTracker

start = time.monotonic()
with StageTracker(sys.argv[1], "bitwise-nn", "probe") as tracker:
    tracker.log_params({"a": 1})
    for step in range(3):
        tracker.log_metrics({"m": 1.0}, step=step)
print(f"{time.monotonic() - start:.1f}")
"""


def test_unreachable_tracking_server_costs_seconds_not_minutes():
    uri = f"http://127.0.0.1:{free_port()}"
    env = project_env()
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        env.pop(name, None)  # the defaults pipeline.tracking sets, not the caller's
    result = subprocess.run(
        ["python", "-c", PROBE_TRACKING, uri], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    # MLflow's own default is 7 retries with exponential backoff: minutes per stage.
    assert float(result.stdout.strip()) < 15
    assert len(re.findall(r"RuntimeWarning: .*MLflow", result.stderr)) == 1, result.stderr
    assert uri in result.stderr


# -- 4. Parallel sweep jobs, one store ------------------------------------------------------------------------

SPARSITIES = [0.0, 0.25, 0.5, 0.75]


def test_four_parallel_sweep_jobs_are_all_recorded(project_copy, upstream):
    import torch

    with_upstream(project_copy, upstream, UPSTREAM[:3])
    previous = project_copy / "models" / "finetuned.pt"
    previous.write_bytes(b"the project's own finetuned model, not the sweep's")
    pretrained = (project_copy / "models" / "pretrained.pt").read_bytes()

    launcher = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=4"]
    sweep = f"finetune.sparsity={','.join(map(str, SPARSITIES))}"
    result = run(["python", "-m", "pipeline.finetune", "-m", *launcher, *SMOKE, sweep], project_copy)
    output = result.stdout + result.stderr
    assert "Joblib.Parallel(n_jobs=4" in output
    assert "locked" not in output.lower()

    runs = mlflow_runs(project_copy / "mlflow.db")
    [parent] = [r for r in runs if r.data.tags["kind"] == "parent"]
    children = [r for r in runs if r.data.tags["kind"] == "stage"]
    assert len(runs) == 5
    assert sorted(r.data.tags["stage"] for r in children) == ["finetune"] * 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert {r.data.tags["pipeline_run"] for r in children} == {parent.data.tags["pipeline_run"]}
    assert [r.info.status for r in [parent, *children]] == ["FINISHED"] * 5
    assert sorted(float(r.data.params["finetune.sparsity"]) for r in children) == SPARSITIES
    assert all("finetune/best_val_accuracy" in r.data.metrics for r in children)
    # They really ran at the same time (else the shared SQLite file was never contended).
    first_end = min(r.info.end_time for r in children)
    assert sum(r.info.start_time < first_end for r in children) >= 2

    [sweep_dir] = (project_copy / "outputs" / "sweeps").iterdir()
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [job.name for job in jobs] == ["0", "1", "2", "3"]
    for job, sparsity in zip(jobs, SPARSITIES, strict=True):
        model = job / "models" / "finetuned.pt"
        assert model.is_file() and not model.is_symlink()
        assert torch.load(model, weights_only=True)["architecture"]["sparsity"] == sparsity
        assert (job / "reports" / "finetune_history.csv").is_file()
        assert (job / "models" / "pretrained.pt").resolve() == (project_copy / "models" / "pretrained.pt").resolve()
    assert previous.read_bytes() == b"the project's own finetuned model, not the sweep's"
    assert (project_copy / "models" / "pretrained.pt").read_bytes() == pretrained
    assert not (project_copy / "reports" / "finetune_history.csv").exists()


# -- 5. Config and data errors --------------------------------------------------------------------------------


def idx_bytes(array) -> bytes:
    import struct

    return bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape) + array.tobytes()


def corrupt_idx_folder(folder: Path) -> Path:
    """The four IDX files, gzip-compressed; the training labels' .gz is cut in half."""
    import gzip

    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (40, 4, 4), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(40, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 4, 4), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(10, dtype=np.uint8),
    }
    folder.mkdir()
    for stem, array in arrays.items():
        (folder / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(array)))
    labels = folder / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[: labels.stat().st_size // 2])
    return labels


#: (stage, overrides, the error line after `error: <stage>: `); {missing}, {folder}, {corrupt}: paths made below.
BAD_INPUTS = {
    "pretrain.epochs=0": ("pretrain", ["pretrain.epochs=0"], "pretrain.epochs: must be >= 1, got 0"),
    "model.hidden=[0]": ("pretrain", ["model.hidden=[0]"], "model.hidden: sizes must be > 0, got [0]"),
    "bits=9": ("binarize", ["data.binarize.bits=9"], "data.binarize.bits: must be in 1..8, got 9"),
    "lr=-1": ("pretrain", ["pretrain.lr=-1"], "pretrain.lr: must be in (0, 1], got -1.0"),
    "epochs=lots": ("evaluate", ["finetune.epochs=lots"], "finetune.epochs: Value 'lots'"),
    "missing folder": ("binarize", ["data=idx", "data.path={missing}"], "{missing}: data folder not found"),
    "corrupt gz": ("binarize", ["data=idx", "data.path={folder}"], "{corrupt}: corrupt or truncated gzip data"),
    "unknown key": ("binarize", ["epochs=0"], "epochs"),
}


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess[str], str, set[str]]]:
    """Every case of BAD_INPUTS, each in its own copy of the project, two at a time (they only start up)."""
    base = tmp_path_factory.mktemp("bad_inputs")
    corrupt = corrupt_idx_folder(base / "corrupt_idx")
    names = {"missing": str(base / "no_such_folder"), "folder": str(corrupt.parent), "corrupt": str(corrupt)}

    def one(case: str) -> tuple[Path, subprocess.CompletedProcess[str], str, set[str]]:
        name, overrides, expected = BAD_INPUTS[case]
        project = copy_sources(base / re.sub(r"\W+", "_", case))
        before = set(os.listdir(project))
        result = stage(project, name, *(o.format(**names) for o in overrides))
        return project, result, f"error: {name}: {expected.format(**names)}", before

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(BAD_INPUTS, pool.map(one, BAD_INPUTS), strict=True))


@pytest.mark.parametrize("case", [c for c in BAD_INPUTS if c not in ("missing folder", "corrupt gz", "unknown key")])
def test_config_error_fails_before_any_work(bad_input_runs, case):
    project, result, expected, before = bad_input_runs[case]
    assert_clean_failure(result, expected)
    # Nothing but Hydra's run folder appeared: no data, no model, not even the tracking store.
    assert set(os.listdir(project)) - before <= {"outputs"}


@pytest.mark.parametrize("case", ["missing folder", "corrupt gz"])
def test_data_error_names_the_file_and_writes_nothing(bad_input_runs, case):
    project, result, expected, _ = bad_input_runs[case]
    assert_clean_failure(result, expected)
    assert not (project / "data").exists()


def test_unknown_key_is_refused_by_hydra_before_any_work(bad_input_runs):
    # Hydra itself refuses to override a key the config does not have; the command says so in one line.
    project, result, _, _ = bad_input_runs["unknown key"]
    line = assert_clean_failure(result, "error: ")
    assert "epochs: no such config key" in line, line
    assert not (project / "data").exists() and not (project / "mlflow.db").exists()
