"""The Makefile's bootstrap: the venv is reinstalled when pyproject.toml's content changes, not its mtime."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.conftest import ROOT


def make(folder: Path, *args: str) -> str:
    return subprocess.run(["make", "-C", str(folder), *args], capture_output=True, text=True, check=True).stdout


def test_the_venv_stamp_follows_pyproject_content_not_its_mtime(tmp_path):
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / ".venv").mkdir()
    stamp = tmp_path / ".venv" / ".installed"
    assert "pip install" in make(tmp_path, "-n", ".venv/.installed")  # never installed

    stamp.write_text(make(tmp_path, "-s", "--eval", "print-key: ; @echo $(VENV_KEY)", "print-key"))
    os.utime(tmp_path / "pyproject.toml", (stamp.stat().st_mtime + 60,) * 2)  # a checkout or `touch`
    assert "pip install" not in make(tmp_path, "-n", ".venv/.installed")

    with (tmp_path / "pyproject.toml").open("a") as pyproject:
        pyproject.write("\n# a changed dependency list\n")
    assert "pip install" in make(tmp_path, "-n", ".venv/.installed")
