"""Lightning modules of the two training rounds. They log ``<split>/loss`` and ``<split>/accuracy`` per
epoch; keeping the best validation epoch is the trainer's job (e.g. Lightning's ModelCheckpoint)."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn

from bnn_core.errors import TrainingDivergedError
from bnn_core.networks import BitwiseMLP, CompressedMLP


class _Classifier(L.LightningModule):
    """Softmax cross-entropy on ``loss_scale * scores``; logs ``<split>/loss`` and ``<split>/accuracy``."""

    stage_name = "train"
    network: nn.Module
    loss_scale = 1.0

    def __init__(self, lr: float, epochs: int, weight_decay: float):
        super().__init__()
        self.lr, self.epochs, self.weight_decay = lr, epochs, weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        x, y = batch
        scores = self.network(x)
        loss = nn.functional.cross_entropy(scores * self.loss_scale, y)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"{split} loss became {loss.item()} at epoch {self.current_epoch} of {self.stage_name}; "
                "lower the learning rate"
            )
        accuracy = (scores.argmax(dim=1) == y).float().mean()
        on_step = split == "train"
        self.log(f"{split}/loss", loss, on_step=False, on_epoch=True, prog_bar=on_step)
        self.log(f"{split}/accuracy", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):  # type: ignore[override]
        self._step(batch, "val")

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:  # type: ignore[override]
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        except RuntimeError as err:
            # torch refuses a step whose size overflows float32 (learning rate above ~3e37)
            if "overflow" not in str(err):
                raise
            raise TrainingDivergedError(
                f"the optimizer step overflowed at epoch {epoch} of {self.stage_name} ({err}); lower the learning rate"
            ) from None

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.network.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class PretrainModule(_Classifier):
    """Round 1: the tanh-compressed real-valued network, trained with dropout."""

    stage_name = "pretrain"

    def __init__(self, network: CompressedMLP, lr: float, epochs: int, weight_decay: float = 0.0):
        super().__init__(lr, epochs, weight_decay)
        self.network = network


class FinetuneModule(_Classifier):
    """Round 2: noisy backpropagation on the bitwise network's shadow weights.

    The class scores are integers of magnitude up to ``fan_in + 1``; the loss sees them divided by
    ``sqrt(fan_in)`` (a fixed softmax temperature) so that it is not saturated. Argmax is unchanged.
    """

    stage_name = "finetune"

    def __init__(self, network: BitwiseMLP, lr: float, epochs: int, weight_decay: float = 0.0):
        super().__init__(lr, epochs, weight_decay)
        self.network = network
        self.loss_scale = 1.0 / math.sqrt(network.layers[-1].fan_in)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        self.network.clip_shadow_weights()
