"""The Lightning DataModule over encoded splits (:mod:`bnn_core.splits`), with per-epoch augmentation."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, TensorDataset

from bnn_core.augment import ShiftAugmentation
from bnn_core.errors import DataError
from bnn_core.splits import FeatureSplits


class AugmentedTrainSet(Dataset):
    """The training split with inputs re-made each epoch by ``augmentation`` (labels unchanged).

    :meth:`set_epoch` picks the epoch; its inputs are computed once, at the first item asked for.
    Items are ``(x float32 [n_features], y int64)``, as from a :class:`TensorDataset`.
    """

    def __init__(self, augmentation: ShiftAugmentation, labels: np.ndarray):
        if len(augmentation.pixels) != len(labels):
            raise DataError(f"{len(augmentation.pixels)} training images for {len(labels)} training labels")
        self.augmentation = augmentation
        self.labels = torch.from_numpy(labels)
        self.epoch = 0
        self._x: torch.Tensor | None = None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._x = epoch, None

    def inputs(self) -> torch.Tensor:
        """The encoded inputs of the current epoch, ``[n, n_features]``."""
        if self._x is None:
            self._x = torch.from_numpy(self.augmentation.features(self.epoch))
        return self._x

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs()[index], self.labels[index]


class EpochShuffle(Sampler[int]):
    """A :class:`RandomSampler` that forwards ``set_epoch`` to an :class:`AugmentedTrainSet`.

    Lightning calls ``set_epoch(epoch)`` on the training sampler at the start of every epoch (the hook
    meant for ``DistributedSampler``), which is how the dataset learns which epoch's augmentation to
    serve. The order is the plain RandomSampler's on ``generator``: the same shuffles as without
    augmentation.
    """

    def __init__(self, dataset: AugmentedTrainSet, generator: torch.Generator):
        self.dataset = dataset
        self.shuffle = RandomSampler(dataset, generator=generator)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        return iter(self.shuffle)

    def __len__(self) -> int:
        return len(self.shuffle)


class FeatureDataModule(L.LightningDataModule):
    """Shuffled, seeded mini-batches of the training split; whole-split batches for evaluation.

    With ``augmentation`` the training inputs are ``augmentation.features(epoch)`` (fresh each epoch,
    :class:`AugmentedTrainSet`) instead of ``splits.x_train``; validation and test are never augmented.
    Without it nothing changes: same loader, same draws from the torch generator.
    """

    def __init__(
        self,
        splits: FeatureSplits,
        batch_size: int,
        seed: int,
        eval_batch_size: int = 1000,
        augmentation: ShiftAugmentation | None = None,
    ):
        super().__init__()
        self.splits = splits
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        if augmentation is not None and augmentation.n_features != splits.n_features:
            raise DataError(
                f"the augmentation's encoder makes {augmentation.n_features} features, the training split has "
                f"{splits.n_features}: it is not the encoder these features were made with"
            )
        self.augmentation = augmentation

    def _dataset(self, split: str) -> TensorDataset:
        x = torch.from_numpy(getattr(self.splits, f"x_{split}"))
        y = torch.from_numpy(getattr(self.splits, f"y_{split}"))
        return TensorDataset(x, y)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        if self.augmentation is None:
            return DataLoader(self._dataset("train"), batch_size=self.batch_size, shuffle=True, generator=generator)
        dataset = AugmentedTrainSet(self.augmentation, self.splits.y_train)
        # The loader's generator is the sampler's too, as in DataLoader(shuffle=True): the same draws.
        sampler = EpochShuffle(dataset, generator)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset("val"), batch_size=self.eval_batch_size)
