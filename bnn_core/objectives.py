"""What a training round optimizes, by name from the config: the loss (``pretrain.loss`` /
``finetune.loss``, :data:`LOSSES`) and the learning-rate schedule (``<round>.schedule``,
:func:`make_scheduler`). torch only, no Lightning: the config schema checks the names against these
registries in every stage, and the stages that do not train must stay light.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bnn_core.errors import ConfigError


def squared_hinge(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BinaryNet's squared hinge loss (Courbariaux et al. 2016, "Binarized Neural Networks", sec. 2.6):

    ``t_k = +1`` for the true class and ``-1`` for every other class; the loss is
    ``mean over examples n and classes k of max(0, 1 - t_nk * s_nk) ** 2``.

    It is zero once the true class scores at least +1 and every other class at most -1, so, unlike
    cross-entropy, it stops pushing scores apart beyond a unit margin.
    """
    targets = 2.0 * nn.functional.one_hot(labels, scores.shape[1]).to(scores.dtype) - 1.0
    return torch.clamp(1.0 - targets * scores, min=0.0).square().mean()


def cross_entropy(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy, mean over the batch: ``-log(softmax(s_n)[y_n])``."""
    return nn.functional.cross_entropy(scores, labels)


#: Training losses by name (``pretrain.loss`` / ``finetune.loss``): ``(scores [n, k], labels [n]) -> scalar``.
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": cross_entropy,
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


def loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r} (choose one of {', '.join(LOSSES)})")
    return LOSSES[name]
