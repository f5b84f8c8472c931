"""Writing files atomically, and failing cleanly: the light helpers every entry point shares.

Every output is written to a temporary name in its folder and renamed into place only when complete,
so a killed or failing stage never leaves a file that looks finished. Kept free of heavy imports (torch,
Lightning) so that small commands such as ``pipeline.predict`` start fast.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from bnn_core.errors import BnnError


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    An OSError while writing (a read-only folder, a full disk; the block is meant to write the temporary
    and nothing else) becomes an :class:`OutputError` naming ``path`` (:func:`writing`): one line, not a
    traceback, and the file that was there before stays as it was.
    """
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        # The writer's host and pid in the name: a later stage removes it if this process dies before the
        # rename (remove_stale), while the temporaries of live writers, e.g. parallel jobs of a sweep, stay.
        fd, tmp_name = tempfile.mkstemp(prefix=writer_prefix(f".{path.name}."), suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            yield tmp
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; outputs are ordinary files
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class OutputError(BnnError):
    """An output cannot be written: its folder is read-only, the disk is full, the path is a folder."""


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OSError raised while the block writes ``path`` into an :class:`OutputError` naming it.

    The atomic rename already keeps a failed write from leaving a finished-looking file; this makes the
    failure one line that says which file and why, instead of a traceback. Wrap only code that writes:
    a read error in the block would be reported against the wrong file.
    """
    try:
        yield
    except OSError as err:
        raise OutputError(
            f"{path}: cannot write ({err.strerror or err}); check its folder's permissions and free space"
        ) from None


def write_json(path: Path, payload: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_png(path: Path, fig) -> None:
    """A matplotlib figure as ``path`` (atomically, as every output), then closed: every picture the
    pipeline writes has the same resolution (110 dpi) and is cropped tight to what it draws."""
    import matplotlib.pyplot as plt  # only the stages that draw pay for it

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def fail(command: str, message: str) -> NoReturn:
    """One line on stderr, exit status 2: an expected mistake, so no traceback."""
    print(f"error: {command}: {message}", file=sys.stderr)
    sys.exit(2)


# -- Leftovers of killed processes ----------------------------------------------------------------------------


def writer_prefix(prefix: str) -> str:
    """``prefix`` + ``<host>-<pid>.``: a temporary's name says which process writes it, so that a later one
    can tell the leftover of a dead writer (:func:`remove_stale`) from the work of a live one."""
    return f"{prefix}{os.uname().nodename}-{os.getpid()}."


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (it may be another user's)."""
    if pid <= 0:  # os.kill would address a process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder: Path, prefix: str, suffix: str = "") -> list[Path]:
    """Remove the files and folders ``<prefix><host>-<pid>.<...><suffix>`` in ``folder`` (named with
    :func:`writer_prefix`) whose writer, a process of this machine, has gone; return them.

    A process killed with SIGKILL (or by the out-of-memory killer) cannot remove its temporaries. Those of
    live writers stay (the parallel jobs of a sweep write beside each other), and so do those of other
    machines (a shared file system), whose processes cannot be checked from here.
    """
    host = os.uname().nodename
    removed = []
    try:
        candidates = [p for p in folder.iterdir() if p.name.startswith(prefix) and p.name.endswith(suffix)]
    except OSError:  # no such folder yet, or not ours to list
        return []
    for path in candidates:
        writer = path.name[len(prefix) :]
        if not writer.startswith(f"{host}-"):
            continue
        pid = writer[len(host) + 1 :].split(".", 1)[0]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:  # removed by a parallel job first, or another user's: not ours to remove
            continue
        removed.append(path)
    return removed


# -- Command lines: termination signals and Hydra's own errors ------------------------------------------------


class Interrupted(BaseException):
    """SIGTERM or SIGINT, raised in the main thread by the handlers :func:`command_line` installs.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way out (MLflow
    retries, the tracker's guard, Hydra's job runner, Lightning's fit loop) swallows it, while ``with``
    blocks and ``finally`` clauses run: temporaries are removed, the MLflow run is ended as KILLED.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def hydra_error_line(err: HydraException) -> str:
    """Hydra's several-line message as one line that says what to do."""
    cause = err.__cause__
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and cause.full_key:  # `foo=1`, `model.foo=1`
        return f"{cause.full_key}: no such config key (add --cfg job to the command to print the config)"
    if isinstance(err, OverrideParseException):
        return f"cannot parse the override {err.override!r}: {err.message.splitlines()[0]}"
    if isinstance(err, MissingConfigException) and err.options:  # `data=nope`: a config group has no such option
        return f"{str(err).splitlines()[0]}; the options are {', '.join(err.options)}"
    # Anything else: its lines up to the config search path Hydra appends.
    lines = str(err).split("\nConfig search path:")[0].splitlines()
    return "; ".join(line.strip() for line in lines if line.strip())


def command_line(name: str, hydra_main: Callable[[], object]) -> None:
    """Run ``hydra_main`` (a ``@hydra.main`` function) as the command ``name``, with the README's exit
    statuses.

    - SIGTERM or SIGINT (``timeout``, SLURM, Kubernetes, ``kill``, Ctrl+C): :class:`Interrupted` unwinds
      the command, then one line ``error: <name>: interrupted by SIGTERM`` and status 128 + the signal's
      number (143, 130), the shell's convention. While Lightning trains, its signal connector runs its own
      SIGTERM handler and then the one it found (ours), and lets our exception through after its teardown.
      Left to itself it would stop after the batch with ``SIGTERMException``, a bare SystemExit (status 0),
      and it turns a KeyboardInterrupt into status 1: hence SIGINT raises Interrupted too.
    - Hydra's own errors (an unknown config group option or key, a malformed override): one line and
      status 2 like our config errors, instead of Hydra's several lines and status 1. ``HYDRA_FULL_ERROR=1``
      makes Hydra raise them to us rather than print them; a user who sets it gets Hydra's full traceback.
    - The garbage collector skips what lives as long as the process: the objects that exist when the command
      starts (modules, classes: torch's, Hydra's) are frozen, and at exit everything is. Walking those
      ~400,000 objects is what made collections slow: 1.5 s of a binarize stage's ~9 s went to the
      interpreter's final collections (0.3 s frozen), and pretrain's collections while it ran took 1.56 s
      (1.01 s). Frozen objects are still freed by reference counting and module teardown; exit handlers and
      ``finally`` clauses run as before.
    """
    gc.freeze()
    atexit.register(gc.freeze)
    users_setting = os.environ.get("HYDRA_FULL_ERROR")
    previous = {
        signum: signal.signal(signum, _raise_interrupted)
        for signum in (signal.SIGTERM, signal.SIGINT)
        # An ignored signal stays ignored: a shell script starts its background jobs so that Ctrl+C spares them.
        if signal.getsignal(signum) is not signal.SIG_IGN
    }
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_main()
    except Interrupted as interrupt:
        print(f"error: {name}: interrupted by {interrupt.signal_name}", file=sys.stderr)
        sys.exit(128 + interrupt.signum)
    except HydraException as err:
        if users_setting == "1":
            raise
        fail(name, hydra_error_line(err))
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: installed outside Python, cannot be put back from here
                signal.signal(signum, handler)
        if users_setting is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = users_setting
