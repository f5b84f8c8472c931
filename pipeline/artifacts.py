"""Where each stage's outputs live (relative to the run's root folder), and how they are read and written.

All writes go through :func:`pipeline.files.atomic_path`: a killed stage leaves no finished-looking file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnn_core.data_module import FeatureSplits
from bnn_core.errors import DataError
from pipeline.files import atomic_path


@dataclass(frozen=True)
class Artifacts:
    """The pipeline's files under ``root`` (the repository, or a sweep job's folder)."""

    root: Path

    @property
    def features(self) -> Path:
        return self.root / "data" / "features.npz"

    @property
    def input_encoder(self) -> Path:
        return self.root / "data" / "input_encoder.json"

    @property
    def pretrained(self) -> Path:
        return self.root / "models" / "pretrained.pt"

    @property
    def finetuned(self) -> Path:
        return self.root / "models" / "finetuned.pt"

    @property
    def bnn_model(self) -> Path:
        return self.root / "models" / "bnn.npz"

    @property
    def metrics(self) -> Path:
        return self.root / "reports" / "metrics.json"

    @property
    def baselines(self) -> Path:
        return self.root / "reports" / "baselines.json"

    @property
    def report(self) -> Path:
        return self.root / "reports" / "report.md"

    @property
    def cost_table(self) -> Path:
        return self.root / "reports" / "cost.md"

    def history(self, stage: str) -> Path:
        return self.root / "reports" / f"{stage}_history.csv"

    def stage_inputs(self) -> list[Path]:
        """Files a later stage may read from an earlier one."""
        return [self.features, self.input_encoder, self.pretrained, self.finetuned]


def link_inputs(source: Artifacts, dest: Artifacts) -> None:
    """Symlink ``source``'s existing stage files into ``dest`` where ``dest`` has none.

    A stage then reads earlier stages' outputs through the links and writes its own outputs into
    ``dest`` (the atomic rename replaces the link, never the file it points to).
    """
    for src, dst in zip(source.stage_inputs(), dest.stage_inputs(), strict=True):
        if src.is_file() and not dst.exists() and src.resolve() != dst.resolve():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src.resolve())


def write_features(path: Path, splits: FeatureSplits) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.savez_compressed(handle, **splits.to_arrays())


def read_features(path: Path) -> FeatureSplits:
    if not path.is_file():
        raise DataError(f"{path}: not found; run the binarize stage first (dvc repro)")
    with np.load(path, allow_pickle=False) as arrays:
        return FeatureSplits.from_arrays(dict(arrays))


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """A torch checkpoint of tensors and plain values only, so it loads with ``weights_only=True``.

    Saved through a file object: given a path, torch names the archive's inner folder after the (random)
    temporary file, and equal checkpoints would differ in bytes (and in DVC hash) from run to run.
    """
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        torch.save(payload, handle)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: not found; run the stage that makes it first (dvc repro)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged archive
        raise DataError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
