"""Where the pipeline's files live (relative to a run's root folder), and how they are read and written.

:class:`Artifacts` is the one place that names a path: the stage table (:mod:`pipeline.stages`) refers to
its properties by name, ``dvc.yaml`` is generated from them, and every entry point asks it for its files.
All writes go through :func:`pipeline.files.atomic_path`: a killed stage leaves no finished-looking file.
torch and Lightning are imported by the functions that need them, so that light commands which only need
paths (``pipeline.summary``, the sweep callbacks) start fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bnn_core.errors import DataError
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


def write_features(path: Path, splits: FeatureSplits) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.savez_compressed(handle, **splits.to_arrays())


def read_features(path: Path) -> FeatureSplits:
    from bnn_core.splits import FeatureSplits

    if not path.is_file():
        raise DataError(f"{path}: not found; run the binarize stage first (dvc repro)")
    with np.load(path, allow_pickle=False) as arrays:
        return FeatureSplits.from_arrays(dict(arrays))


def read_input_encoder(path: Path) -> InputEncoder:
    """The input encoder the binarize stage fitted (``data/input_encoder.json``)."""
    from bnn_core.input_encoders import encoder_from_dict

    if not path.is_file():
        raise DataError(f"{path}: not found; run the binarize stage first (dvc repro)")
    try:
        return encoder_from_dict(json.loads(path.read_text())["encoder"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{path}: unreadable input encoder ({type(err).__name__}: {err})") from None


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """A torch checkpoint of tensors and plain values only, so it loads with ``weights_only=True``.

    Saved through a file object: given a path, torch names the archive's inner folder after the (random)
    temporary file, and equal checkpoints would differ in bytes (and in DVC hash) from run to run.
    """
    import torch

    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        torch.save(payload, handle)


def load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise DataError(f"{path}: not found; run the stage that makes it first (dvc repro)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged archive
        raise DataError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
