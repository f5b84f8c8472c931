"""Training-set augmentation (``augment.shift``): random shifts of raw pixels, re-encoded each epoch."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from bnn_core.augment import ShiftAugmentation, random_shifts, shift_images
from bnn_core.data_module import AugmentedTrainSet, FeatureDataModule
from bnn_core.datasets import LabelledImages
from bnn_core.errors import DataError
from bnn_core.input_encoders import LloydMaxEncoder, RealScaler, ThresholdEncoder
from bnn_core.lightning_modules import PretrainModule
from bnn_core.networks import CompressedMLP
from bnn_core.splits import FeatureSplits, RawSplits
from pipeline.artifacts import Artifacts, read_features, write_features
from pipeline.config import AugmentConfig, Config, PretrainConfig, TrainerConfig
from pipeline.stage import StageContext
from pipeline.training import fit, training_augmentation

SIDE = 6


def test_shift_images_moves_content_and_fills_the_border_with_zeros() -> None:
    image = np.arange(1, 10, dtype=np.uint8).reshape(1, 9)  # 1 2 3 / 4 5 6 / 7 8 9
    pixels = np.repeat(image, 4, axis=0)
    shifts = np.array([[1, 0], [0, -1], [-1, 1], [0, 0]])
    out = shift_images(pixels, shifts).reshape(4, 3, 3)
    np.testing.assert_array_equal(out[0], [[0, 0, 0], [1, 2, 3], [4, 5, 6]])  # down by one
    np.testing.assert_array_equal(out[1], [[2, 3, 0], [5, 6, 0], [8, 9, 0]])  # left by one
    np.testing.assert_array_equal(out[2], [[0, 4, 5], [0, 7, 8], [0, 0, 0]])  # up and right
    np.testing.assert_array_equal(out[3], image.reshape(3, 3))  # unchanged
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(pixels, np.repeat(image, 4, axis=0))  # input untouched


def test_a_shift_of_the_whole_side_empties_the_image() -> None:
    pixels = np.full((1, 4), 7, dtype=np.uint8)
    np.testing.assert_array_equal(shift_images(pixels, [[2, 0]]), np.zeros((1, 4)))


def test_shift_images_needs_square_images_and_one_shift_per_image() -> None:
    with pytest.raises(DataError, match="square"):
        shift_images(np.zeros((2, 10), dtype=np.uint8), np.zeros((2, 2), dtype=int))
    with pytest.raises(ValueError, match="shifts"):
        shift_images(np.zeros((2, 9), dtype=np.uint8), np.zeros((3, 2), dtype=int))


def test_random_shifts_are_seeded_uniform_integers_in_range() -> None:
    shifts = random_shifts(2000, 2, seed=0, epoch=0)
    assert shifts.shape == (2000, 2)
    assert set(np.unique(shifts)) == {-2, -1, 0, 1, 2}
    np.testing.assert_array_equal(shifts, random_shifts(2000, 2, seed=0, epoch=0))
    assert not np.array_equal(shifts, random_shifts(2000, 2, seed=0, epoch=1))
    assert not np.array_equal(shifts, random_shifts(2000, 2, seed=1, epoch=0))
    assert random_shifts(3, 1, seed=-5, epoch=0).shape == (3, 2)  # a negative seed is fine too


def raw_splits(n_train: int = 60, seed: int = 0) -> RawSplits:
    rng = np.random.default_rng(seed)

    def images(n: int) -> LabelledImages:
        pixels = rng.integers(0, 256, (n, SIDE * SIDE)).astype(np.uint8)
        return LabelledImages(pixels, rng.integers(0, 3, n).astype(np.int64))

    return RawSplits(images(n_train), images(12), images(12))


def test_augmented_features_are_the_encoded_shifted_pixels() -> None:
    raw = raw_splits()
    encoder = LloydMaxEncoder.fit(raw.train.pixels, 2)
    augmentation = ShiftAugmentation(raw.train.pixels, encoder, max_shift=2, seed=3)
    expected = encoder.encode(shift_images(raw.train.pixels, random_shifts(len(raw.train), 2, 3, 7)))
    np.testing.assert_array_equal(augmentation.features(7), expected)
    assert augmentation.n_features == 2 * SIDE * SIDE
    # without a shift the features are the binarize stage's
    unshifted = ShiftAugmentation(raw.train.pixels, encoder, max_shift=0, seed=3)
    np.testing.assert_array_equal(unshifted.features(7), FeatureSplits.encode(raw, encoder).x_train)


def batches(loader: DataLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)  # what Lightning does at the start of each epoch
    return list(loader)


def test_augmented_batches_are_deterministic_and_fresh_each_epoch() -> None:
    raw = raw_splits()
    encoder = ThresholdEncoder()
    splits = FeatureSplits.encode(raw, encoder)

    def loader() -> DataLoader:
        augmentation = ShiftAugmentation(splits.pixels_train, encoder, max_shift=2, seed=0)
        return FeatureDataModule(splits, 16, seed=0, augmentation=augmentation).train_dataloader()

    first, again = batches(loader(), 0), batches(loader(), 0)
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other_epoch = batches(loader(), 1)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other_epoch, strict=True))
    assert not torch.equal(torch.cat([x for x, _ in first]), torch.from_numpy(splits.x_train))


def test_zero_shift_augmentation_gives_the_plain_loaders_batches() -> None:
    """The augmented loader shuffles exactly like the plain one: only the inputs differ."""
    raw = raw_splits()
    encoder = ThresholdEncoder()
    splits = FeatureSplits.encode(raw, encoder)
    plain = list(FeatureDataModule(splits, 16, seed=5).train_dataloader())
    augmentation = ShiftAugmentation(splits.pixels_train, encoder, max_shift=0, seed=5)
    augmented = batches(FeatureDataModule(splits, 16, seed=5, augmentation=augmentation).train_dataloader(), 3)
    for (x1, y1), (x2, y2) in zip(plain, augmented, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_without_augmentation_the_loader_is_todays() -> None:
    """shift=0: the same DataLoader as before augmentation existed (same torch generator draws)."""
    splits = FeatureSplits.encode(raw_splits(), ThresholdEncoder())
    generator = torch.Generator().manual_seed(2)
    reference = DataLoader(
        TensorDataset(torch.from_numpy(splits.x_train), torch.from_numpy(splits.y_train)),
        batch_size=16,
        shuffle=True,
        generator=generator,
    )
    ours = FeatureDataModule(splits, 16, seed=2).train_dataloader()
    for _ in range(2):  # two epochs: the generator's later draws agree too
        for (x1, y1), (x2, y2) in zip(reference, ours, strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_validation_data_is_never_augmented() -> None:
    splits = FeatureSplits.encode(raw_splits(), ThresholdEncoder())
    augmentation = ShiftAugmentation(splits.pixels_train, ThresholdEncoder(), max_shift=3, seed=0)
    data = FeatureDataModule(splits, 16, seed=0, eval_batch_size=100, augmentation=augmentation)
    (x_val, _), *_ = list(data.val_dataloader())
    np.testing.assert_array_equal(x_val.numpy(), splits.x_val)


def test_an_encoder_that_did_not_make_the_features_is_refused() -> None:
    splits = FeatureSplits.encode(raw_splits(), ThresholdEncoder())
    augmentation = ShiftAugmentation(splits.pixels_train, LloydMaxEncoder((0.0, 85.0, 170.0, 255.0)), 1, 0)
    with pytest.raises(DataError, match="not the encoder"):
        FeatureDataModule(splits, 16, seed=0, augmentation=augmentation)


def test_features_file_keeps_the_training_pixels(tmp_path: Path) -> None:
    raw = raw_splits()
    splits = FeatureSplits.encode(raw, ThresholdEncoder())
    write_features(tmp_path / "features.npz", splits)
    loaded = read_features(tmp_path / "features.npz")
    assert loaded.pixels_train is not None and loaded.pixels_train.dtype == np.uint8
    np.testing.assert_array_equal(loaded.pixels_train, raw.train.pixels)
    # a file written before pixels_train existed still loads
    arrays = splits.to_arrays()
    del arrays["pixels_train"]
    assert FeatureSplits.from_arrays(arrays).pixels_train is None


def stage_context(root: Path, shift: int) -> StageContext:
    config = Config(augment=AugmentConfig(shift=shift), trainer=TrainerConfig(progress_bar=False))
    return StageContext("pretrain", config, Artifacts(root), None)  # type: ignore[arg-type]


def test_old_features_files_fail_clearly_only_when_augmentation_is_asked_for(tmp_path: Path) -> None:
    splits = FeatureSplits.encode(raw_splits(), ThresholdEncoder())
    arrays = splits.to_arrays()
    del arrays["pixels_train"]
    old = FeatureSplits.from_arrays(arrays)
    assert training_augmentation(stage_context(tmp_path, 0), old) is None  # reads no file either
    with pytest.raises(DataError, match=r"augment\.shift=2 needs the raw training images"):
        training_augmentation(stage_context(tmp_path, 2), old)


def test_augmentation_uses_the_binarize_stages_encoder_unless_given_one(tmp_path: Path) -> None:
    raw = raw_splits()
    encoder = LloydMaxEncoder.fit(raw.train.pixels, 2)
    ctx = stage_context(tmp_path, 1)
    with pytest.raises(DataError, match="input_encoder.json: not found"):
        training_augmentation(ctx, FeatureSplits.encode(raw, encoder))
    ctx.artifacts.input_encoder.parent.mkdir(parents=True)
    ctx.artifacts.input_encoder.write_text(json.dumps({"encoder": encoder.to_dict(), "n_pixels": SIDE * SIDE}))
    augmentation = training_augmentation(ctx, FeatureSplits.encode(raw, encoder))
    assert augmentation is not None and augmentation.encoder == encoder and augmentation.max_shift == 1
    given = training_augmentation(ctx, FeatureSplits.encode(raw, RealScaler()), RealScaler())
    assert given is not None and isinstance(given.encoder, RealScaler)


class EpochRecorder(L.Callback):
    """The training dataset's epoch and the inputs of every batch, as Lightning runs them."""

    def __init__(self) -> None:
        self.epochs: list[tuple[int, int]] = []
        self.inputs: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        dataset = trainer.train_dataloader.dataset
        assert isinstance(dataset, AugmentedTrainSet)
        self.epochs.append((trainer.current_epoch, dataset.epoch))
        self.inputs.append(batch[0].clone())


def test_lightning_trains_on_fresh_seeded_augmentations_each_epoch(tmp_path: Path) -> None:
    raw = raw_splits(n_train=32)
    encoder = ThresholdEncoder()
    splits = FeatureSplits.encode(raw, encoder)
    ctx = stage_context(tmp_path, 2)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        module = PretrainModule(CompressedMLP(SIDE * SIDE, [4], 3, 0.0, 0.0), 1e-3, 3)
        recorder = EpochRecorder()
        fit(ctx, module, splits, PretrainConfig(epochs=3, batch_size=16), [recorder], encoder=encoder)
        runs.append(recorder)
    first, second = runs
    assert [dataset_epoch for _, dataset_epoch in first.epochs] == [0, 0, 1, 1, 2, 2]
    assert all(epoch == dataset_epoch for epoch, dataset_epoch in first.epochs)
    assert all(torch.equal(a, b) for a, b in zip(first.inputs, second.inputs, strict=True))
    epoch_inputs = [torch.cat(first.inputs[2 * e : 2 * e + 2]) for e in range(3)]
    assert not torch.equal(epoch_inputs[0], epoch_inputs[1])
    assert not torch.equal(epoch_inputs[1], epoch_inputs[2])
