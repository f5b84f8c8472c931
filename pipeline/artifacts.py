"""Where the pipeline's files live (relative to a run's root folder), and how they are read and written.

:class:`Artifacts` is the one place that names a path: the stage table (:mod:`pipeline.stages`) refers to
its properties by name, ``dvc.yaml`` is generated from them, and every entry point asks it for its files.
All writes go through :func:`pipeline.files.atomic_path`: a killed stage leaves no finished-looking file.
torch and Lightning are imported by the functions that need them, so that light commands which only need
paths (``pipeline.summary``, the sweep callbacks) start fast.

Files handed from stage to stage are checked like user input: a missing, truncated or malformed one is a
:class:`DataError` naming the file and the stage that makes it (:func:`made_by`), never a traceback.

**Lineage.** An output that a later stage reads together with other artifacts records what it was made
from: ``made_from``, artifact name -> :func:`content_digest` of the file its stage read (checkpoints: a
payload field written by :func:`save_checkpoint`; ``metrics.json``: a top-level field). A stage that reads
several artifacts calls :func:`check_made_together`, which refuses a set whose records disagree with each
other or with the files there now (e.g. round 1 re-run by hand at another width, and round 2 not), and
names the stage to re-run. The config that shapes an artifact is in it already (a checkpoint's
``architecture``); the inputs' digests are what tells one version of a file from another. ``dvc repro``
never produces a mismatched set; people running stages by hand can.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bnn_core.errors import BnnError, DataError
from pipeline.files import atomic_path

if TYPE_CHECKING:
    from bnn_core.input_encoders import InputEncoder
    from bnn_core.splits import FeatureSplits


@dataclass(frozen=True)
class Artifacts:
    """The pipeline's files under ``root`` (the repository, a sweep job's folder, or a stage-cache entry)."""

    root: Path

    def path(self, name: str) -> Path:
        """The file of the artifact called ``name`` (a property of this class), as the stage table names it."""
        value = getattr(self, name, None)
        if not isinstance(value, Path):
            raise KeyError(f"no artifact called {name!r}")
        return value

    def relative(self, name: str) -> str:
        """``name``'s path relative to the root, in POSIX form (as ``dvc.yaml`` lists it)."""
        return self.path(name).relative_to(self.root).as_posix()

    @staticmethod
    def locate(path: Path) -> tuple[Artifacts, str] | None:
        """The artifact that ``path`` is (its root and name), when it sits where this class puts one, else
        None (a checkpoint a test writes to a bare folder, say)."""
        for name in artifact_names():
            parts = Artifacts(Path()).path(name).parts
            if path.parts[-len(parts) :] == parts:
                return Artifacts(Path(*path.parts[: -len(parts)])), name
        return None

    # binarize
    @property
    def features(self) -> Path:
        return self.root / "data" / "features.npz"

    @property
    def input_encoder(self) -> Path:
        return self.root / "data" / "input_encoder.json"

    # pretrain / finetune
    @property
    def pretrained(self) -> Path:
        return self.root / "models" / "pretrained.pt"

    @property
    def pretrain_history(self) -> Path:
        return self.root / "reports" / "pretrain_history.csv"

    @property
    def finetuned(self) -> Path:
        return self.root / "models" / "finetuned.pt"

    @property
    def finetune_history(self) -> Path:
        return self.root / "reports" / "finetune_history.csv"

    def history(self, stage: str) -> Path:
        """The per-epoch curves of a training round (``pretrain`` or ``finetune``)."""
        return self.path(f"{stage}_history")

    # evaluate
    @property
    def bnn_model(self) -> Path:
        return self.root / "models" / "bnn.npz"

    @property
    def metrics(self) -> Path:
        return self.root / "reports" / "metrics.json"

    @property
    def cost_table(self) -> Path:
        return self.root / "reports" / "cost.md"

    # export (a folder)
    @property
    def c_library(self) -> Path:
        return self.root / "dist" / "c"

    # baselines / report
    @property
    def baselines(self) -> Path:
        return self.root / "reports" / "baselines.json"

    @property
    def report(self) -> Path:
        return self.root / "reports" / "report.md"

    @property
    def comparison(self) -> Path:
        return self.root / "reports" / "comparison.json"

    @property
    def tradeoff_plot(self) -> Path:
        return self.root / "reports" / "tradeoff.png"

    @property
    def training_curves(self) -> Path:
        return self.root / "reports" / "training_curves.png"

    # not stage outputs: the paper's table of a sweep, the sweep's stage cache
    def table1_dir(self, data_source: str) -> Path:
        """``reports/<data.source>/``: ``table1.json`` and ``table1.md`` of ``experiment=paper_table1``."""
        return self.root / "reports" / data_source

    @property
    def stage_cache(self) -> Path:
        """``pipeline.run``'s cache of stage outputs (see :mod:`pipeline.run`)."""
        return self.root / "outputs" / "stage_cache"


def artifact_names() -> list[str]:
    """The names of :class:`Artifacts`' files and folders (its properties)."""
    return [name for name, value in vars(Artifacts).items() if isinstance(value, property)]


def made_by(name: str) -> str:
    """How to make artifact ``name`` again: its stage, by hand or through DVC (for error messages)."""
    from pipeline.stages import COMMANDS, producers  # pipeline.stages imports this module

    stage = producers().get(name) or next((c for c in COMMANDS if name in c.writes), None)
    if stage is None:
        return "run the stage that makes it (dvc repro)"
    return f"it is made by the {stage.name} stage: run `python -m {stage.module}` (or `dvc repro`)"


def _hint(path: Path) -> str:
    located = Artifacts.locate(path)
    return made_by(located[1]) if located else "run the stage that makes it (dvc repro)"


# --- lineage: what an output was made from ----------------------------------------------------------------

#: The field, in an output, that records the artifacts it was made from (artifact name -> content digest).
MADE_FROM = "made_from"
_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}


def content_digest(path: Path) -> str:
    """The first 16 hex digits of the sha256 of ``path``'s bytes.

    64 bits tell two versions of a file apart; this is a consistency check between a user's own files, not a
    defence against forgery. Memoised on the file's identity, size and mtime (outputs are replaced by a
    rename, so a new version is a new inode), so a process hashes each file once however often it asks.
    """
    try:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if key not in _DIGESTS:
            with path.open("rb") as handle:
                _DIGESTS[key] = hashlib.file_digest(handle, "sha256").hexdigest()[:16]
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    return _DIGESTS[key]


def made_from(artifacts: Artifacts, names: Iterable[str]) -> dict[str, str]:
    """The lineage record of an output made from ``names`` (those of them that exist under ``artifacts``)."""
    return {name: content_digest(artifacts.path(name)) for name in names if artifacts.path(name).is_file()}


def check_made_together(artifacts: Artifacts, records: Mapping[str, Mapping[str, str] | None]) -> None:
    """Refuse a set of artifacts that were not made from one another.

    ``records``: artifact name -> its :data:`MADE_FROM` record, or None for one written before outputs
    recorded their inputs (refused: nothing tells whether it belongs to the others, and the code that made it
    is not today's, so DVC would re-run its stage too). Two checks: every recorded input that is present under
    ``artifacts`` still has the recorded digest (else the recording artifact is stale: re-run its stage), and
    two records that name the same input agree on it (covers an input that is not present here).
    """
    known, checked = set(artifact_names()), {}
    for name, record in records.items():
        if not isinstance(record, Mapping) or not set(record) <= known:
            raise DataError(
                f"{artifacts.path(name)}: does not record what it was made from (written by an older version); "
                f"re-make it: {made_by(name)}"
            )
        for source, digest in record.items():
            path = artifacts.path(source)
            if path.is_file() and content_digest(path) != digest:
                raise DataError(
                    f"{artifacts.path(name)} was made from another {artifacts.relative(source)} than the one there "
                    f"now; re-make it (or {artifacts.relative(source)} as it was): {made_by(name)}"
                )
        checked[name] = record
    names = list(checked)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            first_record, second_record = checked[first], checked[second]
            for source in sorted(set(first_record) & set(second_record)):
                if first_record[source] != second_record[source]:
                    raise DataError(
                        f"{artifacts.relative(first)} and {artifacts.relative(second)} were made from different "
                        f"versions of {artifacts.relative(source)}; re-make the older one ({made_by(first)}; or "
                        f"{made_by(second)})"
                    )


# --- reading and writing ------------------------------------------------------------------------------------


def link_artifacts(source: Artifacts, dest: Artifacts, names: list[str]) -> None:
    """Symlink ``source``'s files ``names`` into ``dest`` where ``dest`` has none.

    A stage then reads earlier stages' outputs through the links and writes its own outputs into
    ``dest`` (the atomic rename replaces a link, never the file it points to).
    """
    for name in names:
        src, dst = source.path(name), dest.path(name)
        if src.is_file() and not dst.exists() and src.resolve() != dst.resolve():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src.resolve())


def _not_found(path: Path) -> DataError:
    return DataError(f"{path}: not found; {_hint(path)}")


def _unreadable(path: Path, what: str, detail: str) -> DataError:
    return DataError(f"{path}: {what} ({detail}); {_hint(path)}")


def write_features(path: Path, splits: FeatureSplits) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.savez_compressed(handle, **splits.to_arrays())


def read_features(path: Path) -> FeatureSplits:
    from bnn_core.splits import FeatureSplits

    if not path.is_file():
        raise _not_found(path)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return FeatureSplits.from_arrays(dict(arrays))
    except KeyError as err:
        raise _unreadable(path, "not a features file", f"no array {err}") from None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as err:
        # a truncated or damaged archive fails in zipfile, zlib or numpy's format reader, as any of these
        detail = err.strerror if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {err}"
        raise _unreadable(path, "truncated or damaged features file", detail) from None


def read_json_artifact(path: Path) -> Any:
    """A JSON file a stage wrote (``metrics.json``, ``baselines.json``, ...)."""
    if not path.is_file():
        raise _not_found(path)
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise _unreadable(path, "cannot read", err.strerror or str(err)) from None
    except ValueError as err:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not text
        raise _unreadable(path, "truncated or malformed JSON", f"{type(err).__name__}: {err}") from None


def read_input_encoder(path: Path) -> InputEncoder:
    """The input encoder the binarize stage fitted (``data/input_encoder.json``)."""
    from bnn_core.input_encoders import encoder_from_dict

    spec = read_json_artifact(path)
    try:
        return encoder_from_dict(spec["encoder"])
    except (KeyError, TypeError, AttributeError, BnnError) as err:
        detail = f"no field {err}" if isinstance(err, KeyError) else str(err)
        raise _unreadable(path, "malformed input encoder", detail) from None


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """A torch checkpoint of tensors and plain values only, so it loads with ``weights_only=True``.

    At an artifact's place (``models/pretrained.pt`` under some root) it records what it was made from: the
    :data:`MADE_FROM` digests of the artifacts its stage reads (the stage table's ``reads``), as they are when
    it is written, which is what DVC records for a stage's deps too.

    Saved through a file object: given a path, torch names the archive's inner folder after the (random)
    temporary file, and equal checkpoints would differ in bytes (and in DVC hash) from run to run.
    """
    import torch

    from pipeline.stages import producers

    located = Artifacts.locate(path)
    if located is not None and located[1] in producers():
        root, name = located
        payload = {**payload, MADE_FROM: made_from(root, producers()[name].reads)}
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        torch.save(payload, handle)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint of :func:`save_checkpoint`, loaded with ``weights_only=True`` (no pickled code runs), and
    checked against the inputs it records that are present beside it (:func:`check_made_together`).

    A file holding anything else is refused with our own message: torch's suggests retrying with
    ``weights_only=False``, which would run whatever code an untrusted file carries.
    """
    import torch

    if not path.is_file():
        raise _not_found(path)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _unreadable(
            path, "refused", "it holds Python objects, not only tensors and plain values; not a checkpoint of ours"
        ) from None
    except OSError as err:
        raise _unreadable(path, "cannot read", err.strerror or str(err)) from None
    except Exception as err:  # torch raises many types for a damaged archive (RuntimeError, KeyError, ...)
        first = str(err).splitlines()[0].split(". ")[0] if str(err) else ""
        detail = type(err).__name__ if "weights_only" in first else f"{type(err).__name__}: {first}"
        raise _unreadable(path, "truncated or not a checkpoint", detail) from None
    if not isinstance(checkpoint, dict):
        raise _unreadable(path, "not a checkpoint of ours", f"holds a {type(checkpoint).__name__}, not a dict")
    located, record = Artifacts.locate(path), checkpoint.get(MADE_FROM)
    if located is not None and isinstance(record, Mapping):
        # every reader (finetune, evaluate, pareto) refuses a checkpoint made from other inputs than those
        # beside it; one without a record is refused only where several are combined (evaluate)
        check_made_together(located[0], {located[1]: record})
    return checkpoint
