"""The per-round training knobs: learning-rate schedule, loss, and wall-clock budget."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from bnn_core.errors import ConfigError
from bnn_core.lightning_modules import PretrainModule
from bnn_core.networks import CompressedMLP
from bnn_core.objectives import LOSSES, SCHEDULES, make_scheduler, squared_hinge
from bnn_core.splits import FeatureSplits
from pipeline import config as config_schema
from pipeline.artifacts import Artifacts
from pipeline.config import Config, PretrainConfig, TrainerConfig
from pipeline.stage import StageContext
from pipeline.training import fit

LR = 0.01


def tiny_splits(n_train: int = 40, n_features: int = 4, seed: int = 0) -> FeatureSplits:
    rng = np.random.default_rng(seed)

    def x(n: int) -> np.ndarray:
        return np.where(rng.random((n, n_features)) > 0.5, 1.0, -1.0).astype(np.float32)

    def y(n: int) -> np.ndarray:
        return rng.integers(0, 2, n).astype(np.int64)

    return FeatureSplits(
        x(n_train), y(n_train), x(10), y(10), x(10), y(10), np.zeros((10, n_features), dtype=np.uint8)
    )


def tiny_module(epochs: int, schedule: str = "cosine", loss: str = "cross_entropy") -> PretrainModule:
    torch.manual_seed(0)
    return PretrainModule(CompressedMLP(4, [3], 2, 0.0, 0.0), LR, epochs, schedule=schedule, loss=loss)


class LrRecorder(L.Callback):
    """The learning rate each optimizer step uses, and the epoch it belongs to."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append((trainer.current_epoch, trainer.optimizers[0].param_groups[0]["lr"]))


def lr_curve(schedule: str, epochs: int, n_train: int = 40, batch_size: int = 10) -> list[tuple[int, float]]:
    """Train the tiny module with ``schedule`` and record the learning rate of every step."""
    splits = tiny_splits(n_train)
    data = torch.utils.data.TensorDataset(torch.from_numpy(splits.x_train), torch.from_numpy(splits.y_train))
    recorder = LrRecorder()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        callbacks=[recorder],
    )
    trainer.fit(tiny_module(epochs, schedule), torch.utils.data.DataLoader(data, batch_size=batch_size))
    return recorder.steps


def per_epoch(steps: list[tuple[int, float]]) -> dict[int, set[float]]:
    epochs: dict[int, set[float]] = {}
    for epoch, lr in steps:
        epochs.setdefault(epoch, set()).add(lr)
    return epochs


def test_the_config_accepts_exactly_the_registered_schedules_and_losses() -> None:
    # the registries of bnn_core.lightning_modules are the one list; the config schema checks against them
    for name in SCHEDULES:
        assert config_schema.PretrainConfig(schedule=name).schedule == name
    for name in LOSSES:
        assert config_schema.FinetuneConfig(loss=name).loss == name
    with pytest.raises(ConfigError, match="pretrain.schedule"):
        config_schema.PretrainConfig(schedule="linear")
    with pytest.raises(ConfigError, match="finetune.loss"):
        config_schema.FinetuneConfig(loss="hinge")


def test_constant_schedule_keeps_the_learning_rate() -> None:
    steps = lr_curve("constant", epochs=3)
    assert len(steps) == 12
    assert {lr for _, lr in steps} == {LR}


def test_cosine_schedule_anneals_per_epoch_over_the_epoch_budget() -> None:
    epochs = 6
    curve = per_epoch(lr_curve("cosine", epochs))
    for epoch, lrs in curve.items():
        assert len(lrs) == 1  # stepped once per epoch
        assert lrs.pop() == pytest.approx(LR * (1 + math.cos(math.pi * epoch / epochs)) / 2, rel=1e-9)


def test_step_schedule_divides_by_ten_at_one_half_and_three_quarters() -> None:
    curve = per_epoch(lr_curve("step", epochs=8))
    expected = [LR] * 4 + [LR * 0.1] * 2 + [LR * 0.01] * 2
    assert [curve[e].pop() for e in range(8)] == pytest.approx(expected, rel=1e-9)


def test_step_schedule_of_one_epoch_does_not_decay_before_training() -> None:
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    make_scheduler(optimizer, "step", epochs=1)
    assert optimizer.param_groups[0]["lr"] == LR


def test_onecycle_schedule_steps_per_batch_over_all_the_epochs() -> None:
    epochs, steps_per_epoch = 5, 4  # 20 steps: the peak (30%) falls on step 5
    steps = lr_curve("onecycle", epochs)
    lrs = [lr for _, lr in steps]
    assert len(lrs) == epochs * steps_per_epoch
    assert len(set(lrs)) == len(lrs)  # a new rate every step
    # torch's OneCycleLR defaults: from lr/25 up to lr (30% of the steps), down to lr/25/1e4 at the last step
    assert lrs[0] == pytest.approx(LR / 25)
    assert max(lrs) == pytest.approx(LR)
    assert int(np.argmax(lrs)) == 5
    assert lrs[-1] == pytest.approx(LR / 25 / 1e4)


def test_onecycle_needs_the_number_of_steps() -> None:
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    with pytest.raises(ValueError, match="total_steps"):
        make_scheduler(optimizer, "onecycle", epochs=3)


def test_unknown_schedule_or_loss_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="schedule"):
        tiny_module(2, schedule="linear")
    with pytest.raises(ConfigError, match="loss"):
        tiny_module(2, loss="hinge")


def test_squared_hinge_matches_a_hand_computation() -> None:
    scores = torch.tensor([[2.0, -0.5, 0.3], [0.0, 0.0, -2.0]])
    labels = torch.tensor([0, 2])
    # targets t = [+1, -1, -1] and [-1, -1, +1]; max(0, 1 - t s)^2:
    #   row 0: 1 - 2 = -1 -> 0;  1 - 0.5 = 0.5 -> 0.25;  1 + 0.3 = 1.3 -> 1.69
    #   row 1: 1 -> 1;           1 -> 1;                 1 + 2 = 3 -> 9
    expected = (0.0 + 0.25 + 1.69 + 1.0 + 1.0 + 9.0) / 6
    assert squared_hinge(scores, labels).item() == pytest.approx(expected, rel=1e-6)
    assert LOSSES["squared_hinge"] is squared_hinge


def test_squared_hinge_is_zero_beyond_the_unit_margin_and_has_gradients() -> None:
    scores = torch.tensor([[1.5, -1.0, -3.0]], requires_grad=True)
    loss = squared_hinge(scores, torch.tensor([0]))
    loss.backward()
    assert loss.item() == 0.0
    assert scores.grad is not None and torch.all(scores.grad == 0)


def test_cross_entropy_is_torchs_on_the_scaled_scores() -> None:
    scores, labels = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 1, 0])
    assert torch.equal(LOSSES["cross_entropy"](scores, labels), torch.nn.functional.cross_entropy(scores, labels))
    assert tiny_module(1).loss_fn is LOSSES["cross_entropy"]
    assert tiny_module(1, loss="squared_hinge").loss_fn is squared_hinge


def stage_context(tmp_path: Path) -> StageContext:
    config = Config(trainer=TrainerConfig(progress_bar=False))
    return StageContext("pretrain", config, Artifacts(tmp_path), None)  # type: ignore[arg-type]


def test_a_time_budget_stops_training_early_and_keeps_the_best_epoch(tmp_path: Path) -> None:
    epochs = 50
    optim = PretrainConfig(epochs=epochs, batch_size=1, max_minutes=0.001)  # 60 ms
    best = fit(stage_context(tmp_path), tiny_module(epochs), tiny_splits(n_train=400), optim, [])
    assert best.epochs_run < epochs
    assert 0 <= best.epoch <= best.epochs_run
    assert 0.0 <= best.val_accuracy <= 1.0


def test_without_a_time_budget_every_epoch_runs(tmp_path: Path) -> None:
    optim = PretrainConfig(epochs=3, batch_size=10)
    best = fit(stage_context(tmp_path), tiny_module(3), tiny_splits(), optim, [])
    assert best.epochs_run == 3


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "log"])
def test_the_console_shows_one_bar_per_round_ending_on_the_last_epochs_numbers(
    tmp_path: Path, capfd, monkeypatch, terminal: bool
) -> None:
    """No Lightning notes (GPU/TPU lines, its cloud-logging tip, "`Trainer.fit` stopped"), no sanity-check or
    validation bars. In a terminal: one bar, ``pretrain epoch e/E``, whose last state shows the last epoch's
    accuracy. In a log (stderr not a terminal): one line per epoch, nothing half-drawn."""
    import logging
    import sys

    logging.getLogger("lightning.pytorch").setLevel(logging.INFO)  # as in a fresh process
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    ctx = StageContext("pretrain", Config(), Artifacts(tmp_path), None)  # type: ignore[arg-type]
    assert ctx.config.trainer.progress_bar
    history = []

    class LastValAccuracy(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                history.append(float(trainer.callback_metrics["val/accuracy"]))

    fit(ctx, tiny_module(3), tiny_splits(), PretrainConfig(epochs=3, batch_size=10), [LastValAccuracy()])
    out, err = capfd.readouterr()
    console = out + err
    for noise in ("GPU available", "TPU available", "Tip:", "Trainer.fit", "Sanity Checking", "Validation"):
        assert noise not in console, noise
    if terminal:
        last = console.replace("\r", "\n").strip().splitlines()[-1]
        assert last.startswith("pretrain epoch 3/3: 100%"), last
        assert f"val/accuracy={history[-1]:.3f}" in last, (last, history)
    else:
        assert "\r" not in console
        lines = console.strip().splitlines()
        assert [line.split(":")[0] for line in lines] == [f"pretrain epoch {e}/3" for e in (1, 2, 3)], lines
        for line, accuracy in zip(lines, history, strict=True):
            assert f"val/accuracy {accuracy:.3g}" in line, (line, history)


def test_weights_that_overflow_stop_training_with_a_clear_error(tmp_path: Path) -> None:
    """Fused Adam steps past float32's range without a word, and round 1's loss stays finite (tanh(inf) = 1):
    the module checks its weights at each epoch's end. (The config refuses lr > 1 before any of this.)"""
    from bnn_core.errors import TrainingDivergedError

    torch.manual_seed(0)
    module = PretrainModule(CompressedMLP(4, [3], 2, 0.0, 0.0), 1e38, 3)
    with pytest.raises(TrainingDivergedError, match=r"weights became non-finite at epoch \d of pretrain; lower the"):
        fit(stage_context(tmp_path), module, tiny_splits(), PretrainConfig(epochs=3, batch_size=10), [])
