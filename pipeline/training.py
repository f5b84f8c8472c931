"""Fitting a training round's Lightning module and keeping its best validation epoch (used by pretrain,
finetune and the real-valued baselines).

Model selection is Lightning's :class:`~lightning.pytorch.callbacks.ModelCheckpoint` (monitor
``val/accuracy``, mode max, top 1, weights only; the first epoch of a tie wins): the test split is never
looked at during training. Its checkpoints go to a temporary folder; what a stage keeps is the plain
checkpoint of :func:`pipeline.artifacts.save_checkpoint`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from bnn_core.data_module import FeatureDataModule, FeatureSplits
from pipeline.artifacts import save_checkpoint
from pipeline.config import OptimConfig
from pipeline.files import write_text
from pipeline.stage import StageContext
from pipeline.tracking import EpochHistory


@dataclass(frozen=True)
class BestEpoch:
    epoch: int
    val_accuracy: float


def fit(
    ctx: StageContext, module: L.LightningModule, splits: FeatureSplits, optim: OptimConfig, callbacks: list[L.Callback]
) -> BestEpoch:
    """Train ``module`` for ``optim.epochs`` and load the weights of its best validation epoch into it."""
    data = FeatureDataModule(splits, optim.batch_size, ctx.config.seed, ctx.config.evaluate.batch_size)
    with tempfile.TemporaryDirectory(prefix="bnn-checkpoints-") as folder:
        best = ModelCheckpoint(
            dirpath=folder, filename="best", monitor="val/accuracy", mode="max", save_top_k=1, save_weights_only=True
        )
        ctx.trainer(optim.epochs, [best, *callbacks]).fit(module, datamodule=data)
        checkpoint = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
    module.load_state_dict(checkpoint["state_dict"])
    return BestEpoch(int(checkpoint["epoch"]), float(best.best_model_score))


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
    ctx.tracker.log_metrics({f"{ctx.name}/best_val_accuracy": best.val_accuracy, f"{ctx.name}/best_epoch": best.epoch})
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
