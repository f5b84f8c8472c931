"""From a data source to train / validation / test splits, raw (:class:`RawSplits`) and encoded by the
input binarizer (:class:`FeatureSplits`, what the binarize stage writes). numpy only: the stages that
split or read features without training never import torch or Lightning."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnn_core.datasets import LabelledImages, SourceData, stratified_split
from bnn_core.errors import DataError
from bnn_core.input_encoders import InputEncoder

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class RawSplits:
    train: LabelledImages
    val: LabelledImages
    test: LabelledImages


def split_source(
    source: SourceData,
    val_size: int,
    test_size: int | None,
    seed: int,
    *,
    folds: int | None = None,
    fold: int = 0,
) -> RawSplits:
    """Stratified, seeded split. A source with its own test set keeps it (``test_size`` must then be None);
    otherwise ``test_size`` examples are held out of the pool as well.

    ``folds`` (sources without a test set only): k-fold cross-validation instead; the test split is fold
    ``fold`` of ``folds`` stratified folds of the pool (``test_size`` is not used: a fold is
    ``len(pool) / folds`` examples) and validation is drawn from the rest
    (:func:`bnn_core.datasets.kfold_split`). ``folds=None`` is the hold-out split, unchanged.
    """
    pool = source.train
    if folds is not None:
        from bnn_core.datasets import kfold_split  # here, to keep this change to the one function

        if source.test is not None:
            raise DataError(
                "data.split.folds: this data source has its own test set; k-fold cross-validation is for "
                "sources without one (mnist5k), leave data.split.folds unset (null)"
            )
        train_idx, val_idx, test_idx = kfold_split(pool.labels, folds, fold, val_size, seed)
        return RawSplits(pool.subset(train_idx), pool.subset(val_idx), pool.subset(test_idx))
    if source.test is not None:
        if test_size is not None:
            raise DataError("this data source has its own test set; leave data.split.test unset (null)")
        train_idx, val_idx = stratified_split(pool.labels, [len(pool) - val_size, val_size], seed)
        return RawSplits(pool.subset(train_idx), pool.subset(val_idx), source.test)
    if test_size is None:
        raise DataError("this data source has no test set; set data.split.test to the number to hold out")
    n_train = len(pool) - val_size - test_size
    if n_train <= 0:
        raise DataError(f"data.split: {val_size} + {test_size} held out leaves no training examples of {len(pool)}")
    train_idx, val_idx, test_idx = stratified_split(pool.labels, [n_train, val_size, test_size], seed)
    return RawSplits(pool.subset(train_idx), pool.subset(val_idx), pool.subset(test_idx))


@dataclass(frozen=True)
class FeatureSplits:
    """Encoded inputs ``x_<split>`` (float32; +-1 for binary encoders) and labels ``y_<split>``.

    ``pixels_test`` keeps the raw uint8 test images, so that an exported model (which binarizes raw
    pixels itself) can be checked end to end against the training-time simulation. ``pixels_train``
    keeps the raw uint8 training images (row ``i`` is the image of ``x_train[i]``) for augmentation
    (:mod:`bnn_core.augment`), which shifts raw pixels and encodes them again each epoch; it is None in
    features files written before it existed, which then serve every run except an augmented one.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    pixels_test: np.ndarray
    pixels_train: np.ndarray | None = None

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @classmethod
    def encode(cls, raw: RawSplits, encoder: InputEncoder) -> FeatureSplits:
        parts = {}
        for split in SPLITS:
            images: LabelledImages = getattr(raw, split)
            parts[f"x_{split}"] = encoder.encode(images.pixels)
            parts[f"y_{split}"] = images.labels.astype(np.int64)
        return cls(
            **parts, pixels_test=raw.test.pixels.astype(np.uint8), pixels_train=raw.train.pixels.astype(np.uint8)
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Compact arrays for an ``.npz``: bipolar inputs as packed bits (8 per byte), real ones as float32."""
        binary = self.is_binary()
        arrays: dict[str, np.ndarray] = {
            "n_features": np.array(self.n_features),
            "packed": np.array(binary),
            "pixels_test": self.pixels_test,
        }
        if self.pixels_train is not None:
            arrays["pixels_train"] = self.pixels_train
        for split in SPLITS:
            x = getattr(self, f"x_{split}")
            arrays[f"x_{split}"] = np.packbits(x > 0, axis=1) if binary else x.astype(np.float32)
            arrays[f"y_{split}"] = getattr(self, f"y_{split}")
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> FeatureSplits:
        n_features, packed = int(arrays["n_features"]), bool(arrays["packed"])
        parts = {}
        for split in SPLITS:
            x = arrays[f"x_{split}"]
            if packed:
                x = np.where(np.unpackbits(x, axis=1, count=n_features).astype(bool), 1.0, -1.0)
            parts[f"x_{split}"] = x.astype(np.float32)
            parts[f"y_{split}"] = arrays[f"y_{split}"].astype(np.int64)
        pixels_train = arrays.get("pixels_train")  # absent from files written before augmentation
        return cls(
            **parts,
            pixels_test=arrays["pixels_test"].astype(np.uint8),
            pixels_train=None if pixels_train is None else pixels_train.astype(np.uint8),
        )

    def is_binary(self) -> bool:
        return bool(np.isin(self.x_train, (-1.0, 1.0)).all())
