"""Shared fixtures: a throw-away copy of the project for tests that run real stages."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = [
    "conf",
    "pipeline",
    "bnn_core",
    "dvc.yaml",
    "params.yaml",
    "pyproject.toml",
    ".dvc/config",
    ".dvc/plots",
    ".dvc/plots_page.html",
    ".dvc/.gitignore",
    ".gitignore",
    ".dvcignore",
]


def project_env(**extra: str) -> dict[str, str]:
    """The environment of a user who activated the project's virtualenv."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("DVC_ROOT", None)
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, cwd=cwd, env=project_env(**env), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def tracked_epochs(store: Path, metric: str) -> int:
    """Epochs a running stage has logged to the SQLite store so far (0 while there is none)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=1)) as db:
            (step,) = db.execute("SELECT max(step) FROM metrics WHERE key = ?", (metric,)).fetchone()
    except sqlite3.Error:  # not created yet, or busy
        return 0
    return 0 if step is None else step + 1


def copy_sources(dest: Path) -> Path:
    """The project's tracked sources copied into ``dest`` (no git repository), with numba's compiled kernels.

    The kernels are those earlier tests compiled in the repository (``bnn_core/__pycache__/*.nbi|nbc``):
    numba keys them by the source file's size and modification time, which ``copy2`` keeps, so a copy's
    stages load them instead of compiling them again (~7 s per evaluate stage); a test that edits a source
    file in its copy invalidates that file's kernels, as in the repository.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if not src.exists():
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, target)
    compiled = dest / "bnn_core" / "__pycache__"
    for path in (ROOT / "bnn_core" / "__pycache__").glob("*.nb[ic]"):
        compiled.mkdir(exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # another worker's numba replacing it right now
            shutil.copy2(path, compiled / path.name)
    return dest


def git_project(dest: Path) -> Path:
    """The sources in a fresh git repository with one commit (DVC experiments need a commit)."""
    copy_sources(dest)
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], dest)
    return dest


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """A throw-away copy of the project in its own git repository."""
    return git_project(tmp_path / "project")


def compose_params(project: Path, overrides: list[str]) -> None:
    """Write ``params.yaml`` exactly as ``dvc exp run -S`` would (DVC's Hydra composition)."""
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(project / "params.yaml", str(project / "conf"), None, "config", str(project), overrides)


def pytest_configure(config: pytest.Config) -> None:
    """Under ``make test``: each worker's share of the cores for torch's threads, and the file order kept.

    Two workers on two cores each training with torch's default of one thread per core oversubscribe the
    CPU, and OpenMP's spinning threads then burn it: on this 2-core machine the suite took 33 CPU minutes
    (1102 s wall) with every core per worker, 28 (1030 s) with one each. Set before any test imports torch;
    stages the tests start inherit it. A value the caller set is kept.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    # pytest-xdist (3.6+) hands out ``--dist=loadfile``'s files by how many tests each holds, not in
    # collection order, unless told not to: its own order started the 3-test chain files last, so one worker
    # ran them alone at the end. Keep the order pytest_collection_modifyitems sets.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files marked ``heavy`` first, then files with ``slow`` tests, then the rest; each file's tests in their
    own order.

    ``make test`` hands whole files to its workers in collection order (pytest-xdist ``--dist=loadfile``):
    starting with the long files and ending with the short ones keeps every core busy to the end, instead of
    one worker starting a minutes-long file while the others have nothing left to do.
    """
    heavy = {item.path for item in items if item.get_closest_marker("heavy")}
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.path not in heavy, item.path not in slow))  # stable within a file
