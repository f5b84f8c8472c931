"""Fitting a round's Lightning module and saving what it learned (shared by pretrain and finetune)."""

from __future__ import annotations

from typing import Any

from bnn_core.data_module import FeatureDataModule, FeatureSplits
from bnn_core.lightning_modules import BestValidationState
from pipeline.artifacts import save_checkpoint
from pipeline.config import OptimConfig
from pipeline.files import write_text
from pipeline.stage import StageContext
from pipeline.tracking import EpochHistory


def fit_round(
    ctx: StageContext, module, splits: FeatureSplits, optim: OptimConfig, checkpoint_path, architecture: dict[str, Any]
) -> None:
    """Train ``module`` for ``optim.epochs``, keep the best validation epoch, save its weights and curves."""
    data = FeatureDataModule(splits, optim.batch_size, ctx.config.seed, ctx.config.evaluate.batch_size)
    best, history = BestValidationState(), EpochHistory(ctx.tracker, ctx.name)
    trainer = ctx.trainer(optim.epochs, [best, history])
    trainer.fit(module, datamodule=data)
    best.restore(module)
    ctx.tracker.log_metrics(
        {f"{ctx.name}/best_val_accuracy": best.best_score, f"{ctx.name}/best_epoch": best.best_epoch}
    )
    write_text(ctx.artifacts.history(ctx.name), history.to_csv())
    save_checkpoint(
        checkpoint_path,
        {
            "state_dict": module.network.state_dict(),
            "architecture": architecture,
            "best_epoch": best.best_epoch,
            "val_accuracy": best.best_score,
        },
    )
    print(f"{ctx.name}: best validation accuracy {best.best_score:.4f} at epoch {best.best_epoch} -> {checkpoint_path}")
