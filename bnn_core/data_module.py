"""The Lightning DataModule over encoded splits (:mod:`bnn_core.splits`), with per-epoch augmentation, for
one training process or several (data parallel: each rank loads its own shard)."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, TensorDataset

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


#: The label of the copies that pad the validation split to a multiple of the number of ranks: a module
#: leaves them out of its loss and accuracy (:mod:`bnn_core.lightning_modules`).
PAD_LABEL = -1


class EpochShards(DistributedSampler):
    """The training split of one rank of several: Lightning's usual sampler (a permutation drawn from
    ``seed + epoch``, the same on every rank, cut into one shard per rank and padded by repeating a few
    examples, so that every rank takes the same number of steps, as DDP needs), which also tells an
    :class:`AugmentedTrainSet` the epoch (Lightning calls ``set_epoch`` on the sampler only)."""

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if isinstance(self.dataset, AugmentedTrainSet):
            self.dataset.set_epoch(epoch)


def padded_for_ranks(dataset: TensorDataset, world_size: int) -> TensorDataset:
    """``dataset`` with copies of its first examples, labelled :data:`PAD_LABEL`, appended up to a
    multiple of ``world_size``: each rank then gets as many examples (and batches) as every other, and
    the copies are not counted, so that the accuracy reduced over the ranks is exactly the split's.
    (Lightning's DistributedSampler pads with copies that count twice.)"""
    x, y = dataset.tensors
    pad = -len(y) % world_size
    return TensorDataset(torch.cat([x, x[:pad]]), torch.cat([y, torch.full((pad,), PAD_LABEL, dtype=y.dtype)]))


class FeatureDataModule(L.LightningDataModule):
    """Shuffled, seeded mini-batches of the training split; whole-split batches for evaluation.

    With ``augmentation`` the training inputs are ``augmentation.features(epoch)`` (fresh each epoch,
    :class:`AugmentedTrainSet`) instead of ``splits.x_train``; validation and test are never augmented.
    Without it nothing changes: same loader, same draws from the torch generator.

    Under a Trainer with several processes (``world_size > 1``) each rank loads its shard: of the training
    split through :class:`EpochShards`, of the validation split (:func:`padded_for_ranks`) through a
    DistributedSampler without shuffling. Both are DistributedSamplers, which Lightning leaves as they
    are. ``batch_size`` stays the batch of one optimizer step: each rank loads ``batch_size / world_size``
    examples of it (DDP averages their gradients), so that a round takes the same steps of the same size
    on any number of processes. One process loads as before: the same loaders, the same draws.
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

    def _ranks(self) -> tuple[int, int]:
        """``(world_size, global_rank)`` of the Trainer this module is attached to; ``(1, 0)`` without one."""
        trainer = self.trainer
        return (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)

    def setup(self, stage: str) -> None:
        world_size, _ = self._ranks()
        if self.batch_size % world_size:
            raise DataError(f"a batch of {self.batch_size} cannot be split evenly over {world_size} training processes")
        if len(self.splits.y_val) < world_size:
            raise DataError(
                f"{len(self.splits.y_val)} validation examples cannot be shared by {world_size} training processes"
            )

    def train_dataloader(self) -> DataLoader:
        world_size, rank = self._ranks()
        if world_size > 1:
            dataset = self._dataset("train") if self.augmentation is None else self._augmented_train_set()
            sampler = EpochShards(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed)
            return DataLoader(dataset, batch_size=self.batch_size // world_size, sampler=sampler)
        generator = torch.Generator().manual_seed(self.seed)
        if self.augmentation is None:
            return DataLoader(self._dataset("train"), batch_size=self.batch_size, shuffle=True, generator=generator)
        dataset = self._augmented_train_set()
        # The loader's generator is the sampler's too, as in DataLoader(shuffle=True): the same draws.
        sampler = EpochShuffle(dataset, generator)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, generator=generator)

    def _augmented_train_set(self) -> AugmentedTrainSet:
        assert self.augmentation is not None
        return AugmentedTrainSet(self.augmentation, self.splits.y_train)

    def val_dataloader(self) -> DataLoader:
        world_size, rank = self._ranks()
        if world_size > 1:
            dataset = padded_for_ranks(self._dataset("val"), world_size)
            sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
            return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler)
        return DataLoader(self._dataset("val"), batch_size=self.eval_batch_size)
