"""A property of every command line: given a bad file or value, it ends with one ``error:`` line and no
traceback, exits with status 2, and leaves every output that was there before byte-identical.

The bad inputs come from a fixed catalogue (:data:`FAULTS`: config values, damaged, empty, unreadable or
misplaced files, read-only folders, a full disk); hypothesis draws ``(entry point, fault)`` pairs from it.
Each pair runs in a fresh copy of a small project that a smoke chain made once (:func:`prepared_project`).

The commands run in real processes, forked from a :class:`CommandServer` that imported the pipeline once:
a fresh interpreter per command would cost ~10 s of imports each, this costs a fork. Each child runs the
module as ``python -m`` does (``runpy``, as ``__main__``), with its own exit status and its stdout and
stderr in files. Run as root, the server runs under ``setpriv`` without the capabilities that let root
read and write any file, so that a ``chmod 000`` file or a read-only folder fails as it would for a user.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT, project_env
from tests.test_datasets import idx_bytes

pytestmark = pytest.mark.slow

#: ``python -m pipeline.<name>``: every command line a user runs.
ENTRY_POINTS = ("binarize", "pretrain", "finetune", "evaluate", "baselines", "report", "export", "predict", "run")
#: Commands of ``conf/config.yaml`` (the others, predict and export, have their own small configs).
STAGES = ("binarize", "pretrain", "finetune", "evaluate", "baselines", "report", "run")
#: Commands that load the data source themselves.
DATA_READERS = ("binarize", "baselines", "run")
#: Tracking at an address where nothing listens: each stage warns once and goes on. MLflow's SQLite store
#: would cost several seconds per command (it checks its schema in every new process), and tracking is not
#: what this property is about (tests/test_faults.py and tests/test_tracking.py cover it).
NO_TRACKING = "tracking.uri=http://127.0.0.1:9"
#: The prepared project's config: the smoke chain on a small IDX dataset of 4x4 images in ``idx/`` (seconds).
SMOKE = [
    "experiment=smoke",
    "data=idx",
    "data.path=idx",
    "data.split.val=100",
    "trainer.progress_bar=false",
    NO_TRACKING,
]
#: Not outputs: the folder Hydra and ``pipeline.run`` add a new entry to on every run.
NOT_OUTPUTS = "outputs"
#: Without these, root reads and writes any file whatever its mode (setpriv's spelling).
DAC_CAPS = "-dac_override,-dac_read_search"


# -- Commands in forked processes ------------------------------------------------------------------------------

SERVER = r"""
import json, os, runpy, signal, sys, time, traceback

for module in sys.argv[1:]:
    __import__(module)  # paid once; every command forks from here


def child(request):
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    code = 0
    try:
        os.chdir(request["cwd"])
        sys.argv = [request["module"], *request["args"]]
        sys.modules.pop(request["module"], None)  # run afresh as __main__, like python -m (its imports stay)
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exit:  # what the interpreter makes of it
        if exit.code is None or isinstance(exit.code, int):
            code = exit.code or 0
        else:
            print(exit.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait(pid, timeout):
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(request)
    print(wait(pid, request["timeout"]), flush=True)  # the exit status; -9 if it ran out of time
"""


@dataclasses.dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


class CommandServer:
    """A Python process that imports ``preload`` once, then forks one child per command it is sent."""

    def __init__(self, preload: list[str], log_dir: Path):
        self.log_dir = log_dir
        self.log = log_dir / "server.err"
        self.log_file = self.log.open("w")
        self.count = 0
        self.drops_root = os.geteuid() == 0 and shutil.which("setpriv") is not None
        prefix = ["setpriv", "--bounding-set", DAC_CAPS, "--inh-caps", DAC_CAPS, "--"] if self.drops_root else []
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-P", "-c", SERVER, *preload],
            cwd=ROOT,
            env=project_env(PYTHONPATH=str(ROOT)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            text=True,
        )

    @property
    def permissions_bite(self) -> bool:
        """Whether a ``chmod 000`` file is unreadable to the commands (not so for root with its capabilities)."""
        return self.drops_root or os.geteuid() != 0

    def run(self, command: str, args: list[str], cwd: Path, timeout: float = 120) -> Result:
        """``python -m pipeline.<command> <args>`` in ``cwd``, killed after ``timeout`` seconds."""
        self.count += 1
        out, err = self.log_dir / f"{self.count}.out", self.log_dir / f"{self.count}.err"
        request = {
            "module": f"pipeline.{command}",
            "args": args,
            "cwd": str(cwd),
            "stdout": str(out),
            "stderr": str(err),
            "timeout": timeout,
        }
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the command server died: {self.log.read_text()}")
        return Result(int(line), out.read_text(), err.read_text())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)
        self.log_file.close()


_SHARED: dict[str, object] = {}


def command_server(tmp_path_factory: pytest.TempPathFactory) -> CommandServer:
    """One server per test session (both this module and ``tests/test_bad_input.py`` use it)."""
    if "server" not in _SHARED:
        server = CommandServer([f"pipeline.{name}" for name in ENTRY_POINTS], tmp_path_factory.mktemp("server"))
        _SHARED["server"] = server
        atexit.register(server.close)
    return _SHARED["server"]  # type: ignore[return-value]


# -- The prepared project ----------------------------------------------------------------------------------------

N_PREDICT = 20


def write_idx_folder(folder: Path, n_train: int = 600, n_test: int = 100, side: int = 4) -> None:
    """The four standard IDX files (``data=idx``), plain, small, valid: random pixels, every class."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        (folder / f"{stem}-images-idx3-ubyte").write_bytes(idx_bytes(rng.integers(0, 256, (n, side, side))))
        (folder / f"{stem}-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(n) % 10))


def prepared_project(server: CommandServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder made once per session: ``idx/``, the data (:data:`SMOKE`), every stage's outputs of the smoke
    chain on it, the exported C library (``dist/c``), and predictions for ``images/``."""
    if "project" in _SHARED:
        return _SHARED["project"]  # type: ignore[return-value]
    project = tmp_path_factory.mktemp("prepared")
    write_idx_folder(project / "idx")
    (project / "images").mkdir()
    rng = np.random.default_rng(1)
    (project / "images" / "images-idx3-ubyte").write_bytes(idx_bytes(rng.integers(0, 256, (N_PREDICT, 4, 4))))
    (project / "images" / "labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(N_PREDICT) % 10))
    chain = [(name, SMOKE) for name in ("binarize", "pretrain", "finetune", "evaluate", "baselines", "report")]
    chain += [
        ("export", []),
        ("predict", ["images=images/images-idx3-ubyte", "output=predictions/predictions.txt"]),
    ]
    for command, args in chain:
        result = server.run(command, args, project, timeout=300)
        assert result.returncode == 0, f"{command}: {result.stderr}"
    _SHARED["project"] = project
    return project


def copy_project(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest, symlinks=True, ignore=shutil.ignore_patterns(NOT_OUTPUTS))
    return dest


def snapshot(project: Path) -> dict[str, str]:
    """sha256 of every file of ``project`` but those of the per-run folders."""
    digests = {}
    for path in sorted(project.rglob("*")):
        relative = path.relative_to(project)
        if relative.parts[0] == NOT_OUTPUTS or not path.is_file():
            continue
        digests[str(relative)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def error_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_one_error_line(result: Result, command: str, *fragments: str) -> str:
    """Status 2, one ``error: <command>: ...`` line that holds ``fragments``, no traceback; returns the line."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert lines[0].startswith(f"error: {command}: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# -- Faults -------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def full_disk(folder: Path) -> Iterator[None]:
    """``folder`` on a tmpfs that its present files fill up (root only): every write into it fails with
    ENOSPC, a real failing write. Its files are copied in, so they are the same bytes as before."""
    saved = folder.with_name(f"{folder.name}.saved")
    folder.rename(saved)
    folder.mkdir()
    size = sum(p.stat().st_size for p in saved.rglob("*") if p.is_file()) + 64 * 1024
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        shutil.copytree(saved, folder, dirs_exist_ok=True)
        with contextlib.suppress(OSError), (folder / ".filler").open("wb") as filler:
            while True:  # until ENOSPC
                filler.write(b"\0" * 4096)
                filler.flush()
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)
        folder.rmdir()
        saved.rename(folder)


_MOUNTS: dict[str, bool] = {}


def can_mount(scratch: Path) -> bool:
    """Whether this process may mount a tmpfs (root, and a container that allows it); tried once."""
    if "tmpfs" not in _MOUNTS:
        probe = scratch / "mount-probe"
        probe.mkdir()
        command = ["mount", "-t", "tmpfs", "tmpfs", str(probe)]
        mounted = os.geteuid() == 0 and shutil.which("mount") is not None
        mounted = mounted and subprocess.run(command, capture_output=True).returncode == 0
        if mounted:
            subprocess.run(["umount", str(probe)], check=True)
        _MOUNTS["tmpfs"] = mounted
    return _MOUNTS["tmpfs"]


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    mode = path.stat().st_mode
    path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        yield
    finally:
        path.chmod(mode)


@contextlib.contextmanager
def unreadable(path: Path) -> Iterator[None]:
    mode = path.stat().st_mode
    path.chmod(0)
    try:
        yield
    finally:
        path.chmod(mode)


#: How a fault damages a project copy; the context it returns lasts while the command runs (e.g. a mount).
Setup = Callable[[Path], contextlib.AbstractContextManager]


def _overwrite(relative: str, data: bytes) -> Setup:
    def apply(project: Path) -> contextlib.AbstractContextManager:
        (project / relative).write_bytes(data)
        return contextlib.nullcontext()

    return apply


def _truncate(relative: str) -> Setup:
    def apply(project: Path) -> contextlib.AbstractContextManager:
        path = project / relative
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return contextlib.nullcontext()

    return apply


def _remove(relative: str) -> Setup:
    def apply(project: Path) -> contextlib.AbstractContextManager:
        (project / relative).unlink()
        return contextlib.nullcontext()

    return apply


def _on(relative: str, fault: Callable[[Path], contextlib.AbstractContextManager]) -> Setup:
    return lambda project: fault(project / relative)


@dataclasses.dataclass(frozen=True)
class Fault:
    """A bad input for the commands ``entry_points``: ``args`` for the command line, ``setup`` damages the
    project copy (and may hold a state such as a mount while the command runs); ``fragment`` must be in the
    error line (``{entry}`` stands for the command)."""

    name: str
    entry_points: tuple[str, ...]
    args: tuple[str, ...] = ()
    setup: Setup = lambda project: contextlib.nullcontext()
    fragment: str = ""
    needs: str = ""  # "permissions" or "mount": faults that need root's capabilities dropped or a tmpfs


PREDICT = ("images=images/images-idx3-ubyte",)
#: export must replace the existing dist/c: a failure has to leave the old folder as it was.
EXPORT = ("overwrite=true",)
EMPTY_IMAGES = idx_bytes(np.zeros((0, 4, 4), np.uint8))
ZERO_ROW_IMAGES = idx_bytes(np.zeros((100, 0, 4), np.uint8))
SEED_RANGE = "must be in 0..4294967295"

FAULTS = [
    # Config values: the schema's ranges, Hydra's own errors.
    Fault("seed=-1", STAGES, ("seed=-1",), fragment=f"seed: {SEED_RANGE}"),
    Fault("seed too large", STAGES, ("seed=99999999999",), fragment=f"seed: {SEED_RANGE}"),
    Fault("split seed=-1", STAGES, ("data.split.seed=-1",), fragment=f"data.split.seed: {SEED_RANGE}"),
    Fault("real inputs", STAGES, ("data.binarize.method=real",), fragment="data.binarize.method: the bitwise"),
    Fault("sparsity out of range", STAGES, ("finetune.sparsity=1.5",), fragment="finetune.sparsity"),
    Fault("batch_size=0", ("predict",), (*PREDICT, "batch_size=0"), fragment="batch_size"),
    Fault("word_bits=7", ("export",), (*EXPORT, "word_bits=7"), fragment="word_bits"),
    Fault("unknown key", STAGES, ("nosuchkey=1",), fragment="nosuchkey"),
    Fault("unknown data option", STAGES, ("data=nope",), fragment="nope"),
    Fault("malformed override", STAGES, ("seed=[",), fragment="seed=["),
    Fault("unknown key", ("predict",), (*PREDICT, "nosuchkey=1"), fragment="nosuchkey"),
    Fault("malformed override", ("predict",), (*PREDICT, "batch_size=["), fragment="batch_size=["),
    Fault("unknown key", ("export",), (*EXPORT, "nosuchkey=1"), fragment="nosuchkey"),
    Fault("malformed override", ("export",), (*EXPORT, "word_bits=["), fragment="word_bits=["),
    # The data source's files: empty, pixel-less, unreadable, missing.
    Fault(
        "0 training images",
        DATA_READERS,
        (),
        _overwrite("idx/train-images-idx3-ubyte", EMPTY_IMAGES),
        "train-images-idx3-ubyte: holds no images",
    ),
    Fault(
        "0-row test images",
        DATA_READERS,
        (),
        _overwrite("idx/t10k-images-idx3-ubyte", ZERO_ROW_IMAGES),
        "t10k-images-idx3-ubyte: its images have no pixels",
    ),
    Fault(
        "unreadable labels",
        DATA_READERS,
        (),
        _on("idx/train-labels-idx1-ubyte", unreadable),
        "train-labels-idx1-ubyte: cannot read (Permission denied)",
        needs="permissions",
    ),
    Fault(
        "unreadable data folder",
        DATA_READERS,
        (),
        _on("idx", unreadable),
        "cannot read (Permission denied)",
        needs="permissions",
    ),
    Fault("data folder missing", DATA_READERS, ("data.path=nowhere",), fragment="nowhere: data folder"),
    # Files one stage hands to the next.
    Fault(
        "truncated features",
        ("pretrain", "finetune", "evaluate", "baselines"),
        setup=_truncate("data/features.npz"),
        fragment="data/features.npz",
    ),
    Fault(
        "malformed input encoder",
        ("evaluate",),
        setup=_overwrite("data/input_encoder.json", b"{not json"),
        fragment="data/input_encoder.json",
    ),
    Fault("missing baselines", ("report",), setup=_remove("reports/baselines.json"), fragment="reports/baselines.json"),
    Fault(
        "truncated round 1 checkpoint",
        ("finetune", "evaluate"),
        setup=_truncate("models/pretrained.pt"),
        fragment="models/pretrained.pt",
    ),
    Fault(
        "truncated round 2 checkpoint", ("evaluate",), setup=_truncate("models/finetuned.pt"), fragment="finetuned.pt"
    ),
    # predict's and export's files.
    Fault("images is a folder", ("predict",), ("images=images",), fragment="images: is a folder"),
    Fault(
        "unreadable images",
        ("predict",),
        PREDICT,
        _on("images/images-idx3-ubyte", unreadable),
        "images-idx3-ubyte: cannot read (Permission denied)",
        needs="permissions",
    ),
    Fault(
        "labels outside the model's classes",
        ("predict",),
        (*PREDICT, "labels=images/bad-labels"),
        _overwrite("images/bad-labels", idx_bytes(np.full(N_PREDICT, 12))),
        "bad-labels: label 12 outside the model's classes 0..9",
    ),
    Fault("0 images", ("predict",), ("images=images/empty",), _overwrite("images/empty", EMPTY_IMAGES), "no images"),
    Fault(
        "unreadable model file",
        ("predict",),
        PREDICT,
        _on("models/bnn.npz", unreadable),
        "models/bnn.npz",
        needs="permissions",
    ),
    Fault("truncated model file", ("predict",), PREDICT, _truncate("models/bnn.npz"), "models/bnn.npz"),
    Fault(
        "unreadable model file", ("export",), EXPORT, _on("models/bnn.npz", unreadable), "models/bnn.npz", "permissions"
    ),
    Fault("truncated model file", ("export",), EXPORT, _truncate("models/bnn.npz"), "models/bnn.npz"),
    # Outputs that cannot be written: a read-only folder, a full disk.
    Fault(
        "read-only output folder",
        ("predict",),
        (*PREDICT, "output=predictions/predictions.txt"),
        _on("predictions", read_only),
        "predictions/predictions.txt: cannot write (Permission denied)",
        needs="permissions",
    ),
    Fault(
        "full disk",
        ("predict",),
        (*PREDICT, "output=predictions/predictions.txt"),
        _on("predictions", full_disk),
        "predictions/predictions.txt: cannot write (No space left on device)",
        needs="mount",
    ),
    Fault("read-only output folder", ("export",), EXPORT, _on("dist", read_only), "dist/c", "permissions"),
    Fault(
        "read-only output folder",
        ("binarize",),
        setup=_on("data", read_only),
        fragment="data/features.npz: cannot write (Permission denied)",
        needs="permissions",
    ),
    Fault(
        "full disk",
        ("binarize",),
        setup=_on("data", full_disk),
        fragment="data/features.npz: cannot write (No space left on device)",
        needs="mount",
    ),
    Fault(
        "read-only reports",
        ("pretrain", "finetune", "evaluate", "baselines", "report"),
        setup=_on("reports", read_only),
        fragment="cannot write (Permission denied)",
        needs="permissions",
    ),
    Fault(
        "read-only models",
        ("pretrain", "finetune", "evaluate"),
        setup=_on("models", read_only),
        fragment="models/",
        needs="permissions",
    ),
    Fault(
        "full disk under models",
        ("pretrain", "finetune", "evaluate"),
        setup=_on("models", full_disk),
        fragment="cannot write (No space left on device)",
        needs="mount",
    ),
]


def available(fault: Fault, server: CommandServer, scratch: Path) -> bool:
    """Whether ``fault`` can be made here: unreadable files need a user without root's capabilities, a
    full disk needs a tmpfs."""
    if fault.needs == "permissions":
        return server.permissions_bite
    if fault.needs == "mount":
        return can_mount(scratch)
    return True


#: ``(entry point, fault name)`` -> fault: names, so that hypothesis reports a failing pair readably.
CATALOGUE = {(entry, fault.name): fault for fault in FAULTS for entry in fault.entry_points}


def command_args(entry: str, fault: Fault) -> list[str]:
    """The fault's arguments, after the prepared project's config for the stages of conf/config.yaml."""
    return [*SMOKE, *fault.args] if entry in STAGES else list(fault.args)


def check_pair(server: CommandServer, prepared: Path, scratch: Path, entry: str, fault: Fault) -> None:
    """Run ``entry`` with ``fault`` in a copy of the prepared project and check the property."""
    project = copy_project(prepared, scratch)
    try:
        with fault.setup(project):
            before = snapshot(project)
            result = server.run(entry, command_args(entry, fault), project)
            after = snapshot(project)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(project)
    assert_one_error_line(result, entry, fault.fragment)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, f"{entry} with {fault.name}: changed or new files {changed}"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> CommandServer:
    return command_server(tmp_path_factory)


@pytest.fixture(scope="module")
def prepared(server, tmp_path_factory) -> Path:
    return prepared_project(server, tmp_path_factory)


def test_catalogue_covers_every_entry_point():
    assert {entry for entry, _ in CATALOGUE} == set(ENTRY_POINTS)
    assert len(CATALOGUE) == sum(len(fault.entry_points) for fault in FAULTS)  # no pair twice


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(pair=st.sampled_from(sorted(CATALOGUE)))
def test_every_command_fails_cleanly_on_bad_input(server, prepared, tmp_path_factory, pair):
    entry, fault = pair[0], CATALOGUE[pair]
    scratch = tmp_path_factory.mktemp("case")
    assume(available(fault, server, scratch))
    check_pair(server, prepared, scratch / "project", entry, fault)
