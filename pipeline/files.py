"""Writing files atomically, and failing cleanly: the light helpers every entry point shares.

Every output is written to a temporary name in its folder and renamed into place only when complete,
so a killed or failing stage never leaves a file that looks finished. Kept free of heavy imports (torch,
Lightning) so that small commands such as ``pipeline.predict`` start fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; outputs are ordinary files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, payload: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def fail(command: str, message: str) -> NoReturn:
    """One line on stderr, exit status 2: an expected mistake, so no traceback."""
    print(f"error: {command}: {message}", file=sys.stderr)
    sys.exit(2)
