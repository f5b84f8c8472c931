"""The data source a config names, loaded through bnn_core."""

from __future__ import annotations

from bnn_core.datasets import SourceData, load_idx_folder, load_mnist5k
from pipeline.config import DataConfig


def load_source(data: DataConfig) -> SourceData:
    if data.source == "mnist5k":
        return load_mnist5k(data.n_classes)
    if data.source == "idx":
        return load_idx_folder(data.path or "", data.n_classes)
    raise AssertionError(f"unvalidated data.source {data.source!r}")
