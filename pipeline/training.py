"""Fitting a training round's Lightning module and keeping its best validation epoch (used by pretrain,
finetune and the real-valued baselines).

Model selection is Lightning's :class:`~lightning.pytorch.callbacks.ModelCheckpoint` (monitor
``val/accuracy``, mode max, top 1, weights only; the first epoch of a tie wins): the test split is never
looked at during training. Its checkpoints go to a temporary folder; what a stage keeps is the plain
checkpoint of :func:`pipeline.artifacts.save_checkpoint`.

Everything a round's config asks of the training loop is done here, so the stages only build a module:

- the epoch budget ``optim.epochs`` and the time budget ``optim.max_minutes`` (whichever ends first;
  the learning-rate schedule keeps ``epochs`` as its horizon, so a round cut short by the clock simply
  stops part-way along it);
- ``augment.shift``: the training images shifted at random and re-encoded each epoch
  (:mod:`bnn_core.augment`), with the encoder the binarize stage fitted unless the caller passes one;
- ``trainer.*``: devices, nodes, strategy, precision (:meth:`pipeline.stage.StageContext.trainer`).

Data parallel (``trainer.devices * trainer.num_nodes > 1``): every rank runs the stage and trains on its
shard of each epoch (:class:`bnn_core.data_module.FeatureDataModule`), with a random stream of its own
for dropout (:class:`RankSeeds`); the metrics, and so the choice of the best epoch, are reduced across
ranks (:mod:`bnn_core.lightning_modules`). Only global rank 0 keeps the best epoch's weights, writes the
outputs and logs to MLflow: :func:`fit` returns None on the other ranks.
"""

from __future__ import annotations

import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from bnn_core.augment import ShiftAugmentation
from bnn_core.data_module import FeatureDataModule
from bnn_core.errors import ConfigError, DataError, TrainingDivergedError
from bnn_core.input_encoders import InputEncoder
from bnn_core.splits import FeatureSplits
from pipeline.artifacts import read_input_encoder, save_checkpoint
from pipeline.config import OptimConfig
from pipeline.files import write_text, writer_prefix
from pipeline.stage import CHECKPOINTS_PREFIX, StageContext
from pipeline.tracking import StageTracker


class RankSeeds(L.Callback):
    """Data parallel only: once the ranks hold the same initial network (DDP copies rank 0's when it wraps
    the model; Lightning has just re-seeded every rank with ``seed``), seed rank ``r`` with ``seed + r``,
    so that the ranks draw different dropout masks instead of the same ones. One process is left alone:
    its stream, and so its results, are those of a run without this callback."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:
            # Not L.seed_everything: it would also rewrite PL_GLOBAL_SEED, from which a later Trainer of this
            # process re-seeds every rank alike.
            seed = self.seed + trainer.global_rank
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)


class EpochHistory(L.Callback):
    """Collects the epoch-level metrics of a training round and logs them to the tracker, step = epoch.

    MLflow names carry the round, ``<stage>/<split>_<metric>`` (e.g. ``pretrain/val_accuracy``), so both
    rounds can share one run (as in ``pipeline.run`` jobs) without mixing their curves.
    """

    COLUMNS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")

    def __init__(self, tracker: StageTracker, stage: str):
        self.tracker = tracker
        self.stage = stage
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank reads the metrics: the first read reduces them across ranks (sync_dist), a collective
        # call each, which all ranks must make. Rank 0 keeps and logs them.
        metrics = {
            k.replace("/", "_"): float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(("train/", "val/"))
        }
        if not trainer.is_global_zero:
            return
        self.rows.append({"epoch": trainer.current_epoch, **metrics})
        self.tracker.log_metrics({f"{self.stage}/{k}": v for k, v in metrics.items()}, step=trainer.current_epoch)

    def to_csv(self) -> str:
        lines = [",".join(("epoch", *self.COLUMNS))]
        for row in self.rows:
            lines.append(",".join([str(row["epoch"]), *(f"{row.get(c, float('nan')):.6g}" for c in self.COLUMNS)]))
        return "\n".join(lines) + "\n"


class RoundProgressBar(TQDMProgressBar):
    """One bar per training round, on one line: ``<round> epoch e/E`` over the epoch's batches, with the
    epoch's training loss and accuracy and, once it has validated, its validation accuracy.

    Lightning's own bar (Rich, when installed) wraps its metrics over several lines and, in a terminal,
    prints the last epoch twice with different values; it also adds a bar for the sanity check and one
    for each validation, which take a fraction of a second here.

    Where stderr is not a terminal (a log file, a pipe, CI, a sweep's job), a bar's carriage returns and
    half-drawn states would fill the log: there it prints one line per epoch instead, when the epoch has
    validated (``pretrain epoch 3/30: train/loss 0.412, train/accuracy 0.871, val/accuracy 0.902``).
    """

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.live = sys.stderr.isatty()

    def init_sanity_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def init_train_tqdm(self) -> Tqdm:
        return super().init_train_tqdm() if self.live else Tqdm(disable=True)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"{self.name} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.live or not trainer.is_global_zero:
            return
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if isinstance(v, int | float)}
        shown = ", ".join(f"{key} {value:.3g}" for key, value in sorted(metrics.items()))
        epoch = f"{self.name} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        print(f"{epoch}: {shown}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class BestEpoch:
    epoch: int
    val_accuracy: float
    # epochs begun (the last may be partial): fewer than optim.epochs when the time budget (optim.max_minutes)
    # ended the round
    epochs_run: int


def training_augmentation(
    ctx: StageContext, splits: FeatureSplits, encoder: InputEncoder | None = None
) -> ShiftAugmentation | None:
    """The augmentation ``ctx.config.augment`` asks for, or None (``augment.shift = 0``).

    ``encoder`` makes the features from the shifted pixels; None: the one the binarize stage fitted
    (artifact ``input_encoder``), which made ``splits``. Old features files lack the raw training pixels
    augmentation needs: that is an error only when augmentation is on.
    """
    shift = ctx.config.augment.shift
    if shift == 0:
        return None
    if splits.pixels_train is None:
        raise DataError(
            f"augment.shift={shift} needs the raw training images, and {ctx.artifacts.features} was written "
            "before the binarize stage kept them; run binarize again (dvc repro -f binarize) or set augment.shift=0"
        )
    if encoder is None:
        encoder = read_input_encoder(ctx.artifacts.input_encoder)
    return ShiftAugmentation(splits.pixels_train, encoder, shift, ctx.config.seed)


def check_batch_norm_sync(trainer: L.Trainer, module: L.LightningModule) -> None:
    """Several processes keep one network only if their batch norms share batch statistics
    (``sync_batchnorm``), which torch's SyncBatchNorm does on GPUs only: refuse the rest in one line."""
    has_batch_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())
    if trainer.world_size > 1 and has_batch_norm and isinstance(trainer.accelerator, CPUAccelerator):
        raise ConfigError(
            f"model.norm=batchnorm on {trainer.world_size} CPU processes: torch synchronises batch-norm "
            "statistics across processes on GPUs only; train it in one process (trainer.devices=1) or on GPUs"
        )


def fit(
    ctx: StageContext,
    module: L.LightningModule,
    splits: FeatureSplits,
    optim: OptimConfig,
    callbacks: list[L.Callback],
    encoder: InputEncoder | None = None,
) -> BestEpoch | None:
    """Train ``module`` for ``optim.epochs`` (or until ``optim.max_minutes``) and load the weights of its
    best validation epoch into it. ``encoder``: see :func:`training_augmentation` (used only with
    ``augment.shift > 0``).

    None on a data-parallel rank other than 0: its part is done (Lightning's checkpoint lies on rank 0's
    machine; the module keeps the last epoch's weights)."""
    augmentation = training_augmentation(ctx, splits, encoder)
    data = FeatureDataModule(splits, optim.batch_size, ctx.config.seed, ctx.config.evaluate.batch_size, augmentation)
    # Named after this process, so that a stage started after it was killed can remove the folder.
    with tempfile.TemporaryDirectory(prefix=writer_prefix(CHECKPOINTS_PREFIX)) as folder:
        best = ModelCheckpoint(
            dirpath=folder, filename="best", monitor="val/accuracy", mode="max", save_top_k=1, save_weights_only=True
        )
        progress = [RoundProgressBar(ctx.name)] if ctx.config.trainer.progress_bar else []
        seeds = RankSeeds(ctx.config.seed)
        trainer = ctx.trainer(optim.epochs, [best, seeds, *progress, *callbacks], max_minutes=optim.max_minutes)
        check_batch_norm_sync(trainer, module)
        trainer.fit(module, datamodule=data)
        if not trainer.is_global_zero:
            return None
        if not best.best_model_path:  # Lightning validates before it stops, so this should not happen
            raise TrainingDivergedError(f"{ctx.name}: training stopped before any validation epoch")
        checkpoint = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
    module.load_state_dict(checkpoint["state_dict"])
    epochs_run = trainer.current_epoch
    if epochs_run < optim.epochs:
        print(f"{ctx.name}: time budget of {optim.max_minutes} min reached after {epochs_run} of {optim.epochs} epochs")
    return BestEpoch(int(checkpoint["epoch"]), float(best.best_model_score), epochs_run)


def fit_round(
    ctx: StageContext,
    module: L.LightningModule,
    splits: FeatureSplits,
    optim: OptimConfig,
    checkpoint_path: Path,
    architecture: dict[str, Any],
) -> None:
    """:func:`fit`, then save the best epoch's network (``checkpoint_path``) and the round's curves."""
    history = EpochHistory(ctx.tracker, ctx.name)
    best = fit(ctx, module, splits, optim, [history])
    if best is None:  # another rank than 0 of a data-parallel run: rank 0 writes
        return
    ctx.tracker.log_metrics(
        {
            f"{ctx.name}/best_val_accuracy": best.val_accuracy,
            f"{ctx.name}/best_epoch": best.epoch,
            f"{ctx.name}/epochs_run": best.epochs_run,
        }
    )
    write_text(ctx.artifacts.history(ctx.name), history.to_csv())
    save_checkpoint(
        checkpoint_path,
        {
            "state_dict": module.network.state_dict(),
            "architecture": architecture,
            "best_epoch": best.epoch,
            "val_accuracy": best.val_accuracy,
        },
    )
    print(f"{ctx.name}: best validation accuracy {best.val_accuracy:.4f} at epoch {best.epoch} -> {checkpoint_path}")
