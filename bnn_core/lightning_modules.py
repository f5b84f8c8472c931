"""Lightning modules of the two training rounds. They log ``<split>/loss`` and ``<split>/accuracy`` per
epoch; keeping the best validation epoch is the trainer's job (e.g. Lightning's ModelCheckpoint).

Two knobs per round (``pretrain.*`` / ``finetune.*`` in ``conf/config.yaml``):

- ``loss`` (:data:`LOSSES`): ``cross_entropy`` (softmax cross-entropy, the default) or ``squared_hinge``
  (BinaryNet's loss, Courbariaux et al. 2016), both on ``loss_scale * scores``;
- ``schedule`` (:func:`make_scheduler`): how Adam's learning rate moves over the round's epochs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
from torch import nn

from bnn_core.errors import ConfigError, TrainingDivergedError
from bnn_core.networks import BitwiseMLP, CompressedMLP


def squared_hinge(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BinaryNet's squared hinge loss (Courbariaux et al. 2016, "Binarized Neural Networks", sec. 2.6):

    ``t_k = +1`` for the true class and ``-1`` for every other class; the loss is
    ``mean over examples n and classes k of max(0, 1 - t_nk * s_nk) ** 2``.

    It is zero once the true class scores at least +1 and every other class at most -1, so, unlike
    cross-entropy, it stops pushing scores apart beyond a unit margin.
    """
    targets = 2.0 * nn.functional.one_hot(labels, scores.shape[1]).to(scores.dtype) - 1.0
    return torch.clamp(1.0 - targets * scores, min=0.0).square().mean()


def _cross_entropy(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy, mean over the batch: ``-log(softmax(s_n)[y_n])``."""
    return nn.functional.cross_entropy(scores, labels)


#: Training losses by name (``pretrain.loss`` / ``finetune.loss``): ``(scores [n, k], labels [n]) -> scalar``.
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": _cross_entropy,
    "squared_hinge": squared_hinge,
}

#: Learning-rate schedules by name (``pretrain.schedule`` / ``finetune.schedule``), see :func:`make_scheduler`.
SCHEDULES = ("constant", "cosine", "onecycle", "step")


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, epochs: int, total_steps: int | None = None
) -> dict | None:
    """The learning-rate schedule ``schedule`` over a round of ``epochs`` epochs, as Lightning's
    ``lr_scheduler`` config (``{"scheduler": ..., "interval": "epoch" | "step"}``), or None for ``constant``.

    With ``lr0`` the optimizer's learning rate and ``e`` the epoch (0-based):

    - ``constant``: ``lr0`` throughout.
    - ``cosine``: ``lr(e) = lr0 * (1 + cos(pi * e / epochs)) / 2`` (``CosineAnnealingLR``, ``T_max =
      epochs``; Loshchilov & Hutter 2017, SGDR, without restarts), stepped per epoch.
    - ``onecycle``: Smith & Topin's 1cycle (2019, "Super-convergence"), torch's ``OneCycleLR`` with its
      defaults: per optimizer step, up from ``lr0 / 25`` to ``lr0`` over the first 30% of
      ``total_steps``, then cosine-annealed down to ``lr0 / 25 / 1e4``; Adam's ``beta1`` cycles
      0.95 -> 0.85 -> 0.95 against it. ``total_steps`` (``epochs * batches per epoch``) is required.
    - ``step``: ``lr0``, times 0.1 from epoch ``epochs // 2`` and again from ``3 * epochs // 4``
      (``MultiStepLR``; both milestones count, so when they coincide (2 epochs) the factor there is 0.01).
      A milestone at epoch 0 would lower the rate before training begins, so it is dropped.

    The horizon is always the epoch budget: a round stopped early by its time budget (``max_minutes``)
    ends part-way along the curve; the schedule is not stretched or squeezed to the time.
    """
    if schedule == "constant":
        return None
    if schedule == "cosine":
        return {"scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs), "interval": "epoch"}
    if schedule == "onecycle":
        if total_steps is None:
            raise ValueError("the onecycle schedule needs total_steps (epochs * batches per epoch)")
        max_lr = [group["lr"] for group in optimizer.param_groups]
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps)
        return {"scheduler": scheduler, "interval": "step"}
    if schedule == "step":
        milestones = [m for m in (epochs // 2, 3 * epochs // 4) if m > 0]
        return {
            "scheduler": torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1),
            "interval": "epoch",
        }
    raise ConfigError(f"unknown learning-rate schedule {schedule!r} (choose one of {', '.join(SCHEDULES)})")


def _loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r} (choose one of {', '.join(LOSSES)})")
    return LOSSES[name]


class _Classifier(L.LightningModule):
    """Adam on ``network``'s parameters; the loss ``LOSSES[loss]`` on ``loss_scale * scores``.

    Logs ``<split>/loss`` and ``<split>/accuracy`` per epoch.
    """

    stage_name = "train"
    network: nn.Module
    loss_scale = 1.0

    def __init__(
        self, lr: float, epochs: int, weight_decay: float, schedule: str = "cosine", loss: str = "cross_entropy"
    ):
        super().__init__()
        self.lr, self.epochs, self.weight_decay = lr, epochs, weight_decay
        self.schedule, self.loss_name = schedule, loss
        self.loss_fn = _loss_fn(loss)
        if schedule not in SCHEDULES:
            raise ConfigError(f"unknown learning-rate schedule {schedule!r} (choose one of {', '.join(SCHEDULES)})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        x, y = batch
        scores = self.network(x)
        loss = self.loss_fn(scores * self.loss_scale, y)
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

    def __init__(
        self,
        network: CompressedMLP,
        lr: float,
        epochs: int,
        weight_decay: float = 0.0,
        schedule: str = "cosine",
        loss: str = "cross_entropy",
    ):
        super().__init__(lr, epochs, weight_decay, schedule, loss)
        self.network = network


class FinetuneModule(_Classifier):
    """Round 2: noisy backpropagation on the bitwise network's shadow weights.

    The class scores are integers of magnitude up to ``fan_in + 1``; the loss sees them divided by
    ``sqrt(fan_in)`` (a fixed softmax temperature) so that it is not saturated. Argmax is unchanged.
    (For ``squared_hinge`` the same scaling sets the margin: a unit margin on ``s / sqrt(fan_in)``.)
    """

    stage_name = "finetune"

    def __init__(
        self,
        network: BitwiseMLP,
        lr: float,
        epochs: int,
        weight_decay: float = 0.0,
        schedule: str = "cosine",
        loss: str = "cross_entropy",
    ):
        super().__init__(lr, epochs, weight_decay, schedule, loss)
        self.network = network
        self.loss_scale = 1.0 / math.sqrt(network.layers[-1].fan_in)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        self.network.clip_shadow_weights()
