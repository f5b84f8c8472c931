"""Lightning modules of the two training rounds. They log ``<split>/loss`` and ``<split>/accuracy`` per
epoch; keeping the best validation epoch is the trainer's job (e.g. Lightning's ModelCheckpoint).

Two knobs per round (``pretrain.*`` / ``finetune.*`` in ``conf/config.yaml``):

- ``loss`` (:data:`bnn_core.objectives.LOSSES`): ``cross_entropy`` (softmax cross-entropy, the default) or
  ``squared_hinge`` (BinaryNet's loss, Courbariaux et al. 2016), both on ``loss_scale * scores``;
- ``schedule`` (:func:`bnn_core.objectives.make_scheduler`): how Adam's learning rate moves over the
  round's epochs.

Under data parallelism (a Trainer with several processes, DDP) the epoch metrics are reduced across the
ranks before anyone reads them (``sync_dist``; Lightning's mean of a logged value is the sum of
``value * batch_size`` over the sum of batch sizes, on all ranks together): the validation accuracy that
picks the best epoch is the whole split's, exactly, since the examples that pad a rank's shard are not
counted (:data:`bnn_core.data_module.PAD_LABEL`). After every epoch the ranks compare their weights and
buffers (:meth:`_Classifier.check_ranks_agree`): DDP's averaged gradients keep them identical, and with them
round 2's sparsity thresholds (computed from the weights) and the synchronised batch-norm statistics.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn

from bnn_core.data_module import PAD_LABEL
from bnn_core.errors import ConfigError, TrainingDivergedError
from bnn_core.networks import BitwiseMLP, CompressedMLP
from bnn_core.objectives import SCHEDULES, loss_fn, make_scheduler


class _Classifier(L.LightningModule):
    """Adam on ``network``'s parameters; the loss ``objectives.LOSSES[loss]`` on ``loss_scale * scores``.

    Logs ``<split>/loss`` and ``<split>/accuracy`` per epoch.
    """

    stage_name = "train"
    network: nn.Module
    loss_scale = 1.0

    def __init__(
        self,
        network: nn.Module,
        lr: float,
        epochs: int,
        weight_decay: float = 0.0,
        schedule: str = "cosine",
        loss: str = "cross_entropy",
    ):
        super().__init__()
        self.network = network
        self.lr, self.epochs, self.weight_decay = lr, epochs, weight_decay
        self.schedule, self.loss_name = schedule, loss
        self.loss_fn = loss_fn(loss)
        if schedule not in SCHEDULES:
            raise ConfigError(f"unknown learning-rate schedule {schedule!r} (choose one of {', '.join(SCHEDULES)})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor | None:
        x, y = batch
        scores = self.network(x)
        padding = y == PAD_LABEL
        if split != "train" and bool(padding.any()):  # a validation shard's padding (several ranks only)
            scores, y = scores[~padding], y[~padding]
            if len(y) == 0:
                return None
        loss = self.loss_fn(scores * self.loss_scale, y)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"{split} loss became {loss.item()} at epoch {self.current_epoch} of {self.stage_name}; "
                "lower the learning rate"
            )
        accuracy = (scores.argmax(dim=1) == y).float().mean()
        on_step = split == "train"
        # Weighted by the examples counted; reduced over the ranks at the epoch's end (one process: no-op).
        logged = {"on_step": False, "on_epoch": True, "batch_size": len(y), "sync_dist": True}
        self.log(f"{split}/loss", loss, prog_bar=on_step, **logged)
        self.log(f"{split}/accuracy", accuracy, prog_bar=True, **logged)
        return loss

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        loss = self._step(batch, "train")
        assert loss is not None  # training batches are never padding
        return loss

    def validation_step(self, batch, batch_idx):  # type: ignore[override]
        self._step(batch, "val")

    def on_train_epoch_end(self) -> None:
        # A weight that overflowed to inf does not show in round 1's loss (tanh(inf) = 1): say so instead of
        # going on to a model at chance. (The config keeps lr <= 1; this guards direct use of the library.)
        # Checked once an epoch: after every step it would cost a quarter of the step.
        if not all(bool(torch.isfinite(p).all()) for p in self.network.parameters()):
            raise TrainingDivergedError(
                f"the weights became non-finite at epoch {self.current_epoch} of {self.stage_name}; "
                "lower the learning rate"
            )
        if self.trainer.world_size > 1:
            self.check_ranks_agree()

    def check_ranks_agree(self) -> None:
        """Raise unless every rank holds the same network: each compares the sum of each of its weights
        and buffers (float64) with every other rank's. One collective call an epoch; all ranks reach the
        same verdict, so they stop together."""
        # Lightning reduces the epoch's logged metrics lazily, one collective call each, at their first read:
        # read them on every rank before the collective call below, so that all make the same calls in the
        # same order (callbacks that read them on rank 0 only, such as the progress bar, run before this).
        self.trainer.callback_metrics  # noqa: B018
        sums = torch.stack([t.detach().double().sum() for t in self.network.state_dict().values()])
        gathered = self.all_gather(sums)
        differ = [rank for rank in range(len(gathered)) if not torch.equal(gathered[rank], gathered[0])]
        if differ:
            raise TrainingDivergedError(
                f"after epoch {self.current_epoch} of {self.stage_name} the network of rank(s) "
                f"{', '.join(map(str, differ))} differs from rank 0's: the data-parallel copies went apart"
            )

    def configure_optimizers(self):
        parameters = list(self.network.parameters())
        # Fused Adam (one kernel for all parameters) where torch has it: a fifth of a CPU training step at
        # batch 100 goes to the optimizer otherwise. Same update rule; float rounding may differ.
        fused = all(p.device.type in ("cpu", "cuda") for p in parameters)
        optimizer = torch.optim.Adam(parameters, lr=self.lr, weight_decay=self.weight_decay, fused=fused)
        # 1cycle's horizon in optimizer steps: Lightning's count for max_epochs (never the time budget).
        total_steps = int(self.trainer.estimated_stepping_batches) if self.schedule == "onecycle" else None
        scheduler = make_scheduler(optimizer, self.schedule, self.epochs, total_steps)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class PretrainModule(_Classifier):
    """Round 1: the tanh-compressed real-valued network, trained with dropout."""

    stage_name = "pretrain"
    network: CompressedMLP


class FinetuneModule(_Classifier):
    """Round 2: noisy backpropagation on the bitwise network's shadow weights.

    The class scores are integers of magnitude up to ``fan_in + 1``; the loss sees them divided by
    ``sqrt(fan_in)`` (a fixed softmax temperature) so that it is not saturated. Argmax is unchanged.
    (For ``squared_hinge`` the same scaling sets the margin: a unit margin on ``s / sqrt(fan_in)``.)
    """

    stage_name = "finetune"

    network: BitwiseMLP

    def __init__(
        self,
        network: BitwiseMLP,
        lr: float,
        epochs: int,
        weight_decay: float = 0.0,
        schedule: str = "cosine",
        loss: str = "cross_entropy",
    ):
        super().__init__(network, lr, epochs, weight_decay, schedule, loss)
        self.loss_scale = 1.0 / math.sqrt(network.layers[-1].fan_in)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        self.network.clip_shadow_weights()
