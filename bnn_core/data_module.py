"""From a data source to encoded train / validation / test splits, and the Lightning DataModule over them."""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from bnn_core.datasets import LabelledImages, SourceData, stratified_split
from bnn_core.errors import DataError
from bnn_core.input_encoders import InputEncoder

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class RawSplits:
    train: LabelledImages
    val: LabelledImages
    test: LabelledImages


def split_source(source: SourceData, val_size: int, test_size: int | None, seed: int) -> RawSplits:
    """Stratified, seeded split. A source with its own test set keeps it (``test_size`` must then be None);
    otherwise ``test_size`` examples are held out of the pool as well."""
    pool = source.train
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
    pixels itself) can be checked end to end against the training-time simulation.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    pixels_test: np.ndarray

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
        return cls(**parts, pixels_test=raw.test.pixels.astype(np.uint8))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Compact arrays for an ``.npz``: bipolar inputs as packed bits (8 per byte), real ones as float32."""
        binary = self.is_binary()
        arrays: dict[str, np.ndarray] = {
            "n_features": np.array(self.n_features),
            "packed": np.array(binary),
            "pixels_test": self.pixels_test,
        }
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
        return cls(**parts, pixels_test=arrays["pixels_test"].astype(np.uint8))

    def is_binary(self) -> bool:
        return bool(np.isin(self.x_train, (-1.0, 1.0)).all())


class FeatureDataModule(L.LightningDataModule):
    """Shuffled, seeded mini-batches of the training split; whole-split batches for evaluation."""

    def __init__(self, splits: FeatureSplits, batch_size: int, seed: int, eval_batch_size: int = 1000):
        super().__init__()
        self.splits = splits
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed

    def _dataset(self, split: str) -> TensorDataset:
        x = torch.from_numpy(getattr(self.splits, f"x_{split}"))
        y = torch.from_numpy(getattr(self.splits, f"y_{split}"))
        return TensorDataset(x, y)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self._dataset("train"), batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset("val"), batch_size=self.eval_batch_size)
