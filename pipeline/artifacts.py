"""Where each stage's outputs live (relative to the run's root folder), and how they are written.

Every output is written to a temporary name in its folder and renamed into place only when complete,
so a killed or failing stage never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnn_core.data_module import FeatureSplits
from bnn_core.errors import DataError


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
    def metrics(self) -> Path:
        return self.root / "reports" / "metrics.json"

    @property
    def cost_table(self) -> Path:
        return self.root / "reports" / "cost.md"

    def history(self, stage: str) -> Path:
        return self.root / "reports" / f"{stage}_history.csv"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, payload: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_features(path: Path, splits: FeatureSplits) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.savez_compressed(handle, **splits.to_arrays())


def read_features(path: Path) -> FeatureSplits:
    if not path.is_file():
        raise DataError(f"{path}: not found; run the binarize stage first (dvc repro)")
    with np.load(path, allow_pickle=False) as arrays:
        return FeatureSplits.from_arrays(dict(arrays))


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """A torch checkpoint of tensors and plain values only, so it loads with ``weights_only=True``."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: not found; run the stage that makes it first (dvc repro)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged archive
        raise DataError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
