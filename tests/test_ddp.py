"""Data-parallel training (Lightning DDP, gloo on CPU), for real: two processes on this machine.

- ``python -m pipeline.pretrain trainer.devices=2`` in a project copy: Lightning starts the second rank
  by running the command again; the run completes, writes one set of outputs and one MLflow run, and its
  accuracy is within noise of a one-process run of the same config.
- The ranks' agreement check (:meth:`bnn_core.lightning_modules._Classifier.check_ranks_agree`), which
  every data-parallel epoch runs: it passes for round 2 with sparsity (its thresholds come from weights
  DDP keeps identical) and stops a run whose copies went apart.
- The validation split padded for the ranks counts every example exactly once.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from bnn_core.data_module import PAD_LABEL, padded_for_ranks
from bnn_core.errors import TrainingDivergedError
from bnn_core.lightning_modules import FinetuneModule
from bnn_core.networks import BitwiseMLP, predict_classes
from bnn_core.splits import FeatureSplits
from pipeline import binarize, pretrain
from pipeline.artifacts import Artifacts, read_features
from pipeline.config import validate
from pipeline.networks_io import load_compressed
from pipeline.stage import StageContext, run_stage
from pipeline.tracking import StageTracker
from tests.conftest import ROOT, copy_sources, run

pytestmark = pytest.mark.heavy  # make test starts this file early (tests/conftest.py)

SMALL = ["experiment=smoke", "pretrain.epochs=3"]
#: Two runs that differ only in shuffling and dropout draws: 500 validation / test examples, accuracy
#: ~0.8, so one run's standard error is ~0.018; their difference stays well within this.
NOISE = 0.06


def stage_context(name: str, root: Path, overrides: list[str]) -> StageContext:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        config = validate(compose("config", overrides=overrides))
    return StageContext(name, config, Artifacts(root), StageTracker(None, "unused", name, enabled=False))


def test_accuracy(artifacts: Artifacts, splits: FeatureSplits) -> float:
    network = load_compressed(artifacts.pretrained).eval()
    with torch.no_grad():
        return float(np.mean(predict_classes(network(torch.from_numpy(splits.x_test))) == splits.y_test))


test_accuracy.__test__ = False  # a helper, not a test


def mlflow_runs(store: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(store) as db:
        return db.execute("SELECT run_uuid, name, status FROM runs WHERE name = 'pretrain'").fetchall()


@pytest.mark.slow
def test_pretrain_on_two_processes_matches_one(tmp_path):
    project = copy_sources(tmp_path / "project")
    run_stage(binarize.run, stage_context("binarize", project, SMALL))
    # The reference: the same round in this process, on a copy of the features.
    reference = tmp_path / "reference"
    for name in ("features", "input_encoder"):
        target = Artifacts(reference).path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Artifacts(project).path(name), target)
    run_stage(pretrain.run, stage_context("pretrain", reference, SMALL))

    started = time.time()
    result = run(["python", "-m", "pipeline.pretrain", *SMALL, "trainer.devices=2", "trainer.strategy=ddp"], project)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr, "no second process took part"
    assert "Traceback" not in result.stderr

    # One set of outputs, written by this run.
    out = Artifacts(project)
    assert sorted(p.name for p in (project / "models").iterdir()) == ["pretrained.pt"]
    assert sorted(p.name for p in (project / "reports").iterdir()) == ["pretrain_history.csv"]
    assert out.pretrained.stat().st_mtime >= started
    history = out.history("pretrain").read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["0", "1", "2"]

    # One MLflow run, one value per epoch (a second rank logging would double them).
    (run_row,) = mlflow_runs(project / "mlflow.db")
    assert run_row[2] == "FINISHED"
    with sqlite3.connect(project / "mlflow.db") as db:
        steps = db.execute(
            "SELECT step FROM metrics WHERE run_uuid = ? AND key = 'pretrain/val_accuracy' ORDER BY step",
            (run_row[0],),
        ).fetchall()
        (best_logged,) = db.execute(
            "SELECT value FROM metrics WHERE run_uuid = ? AND key = 'pretrain/best_val_accuracy'", (run_row[0],)
        ).fetchone()
    assert [s for (s,) in steps] == [0, 1, 2]

    # The reduced validation accuracy is the whole split's: a fraction of 500 examples, the history's best.
    val_column = [float(line.split(",")[4]) for line in history[1:]]
    assert best_logged == pytest.approx(max(val_column), abs=1e-6)
    assert round(best_logged * 500) == pytest.approx(best_logged * 500, abs=1e-3)

    reference_best = max(
        float(line.split(",")[4]) for line in Artifacts(reference).history("pretrain").read_text().splitlines()[1:]
    )
    assert abs(best_logged - reference_best) <= NOISE, (best_logged, reference_best)
    splits = read_features(out.features)
    ddp_test, reference_test = test_accuracy(out, splits), test_accuracy(Artifacts(reference), splits)
    assert abs(ddp_test - reference_test) <= NOISE, (ddp_test, reference_test)
    assert ddp_test > 0.5  # it learned


def test_padded_validation_counts_every_example_once():
    x = torch.arange(7, dtype=torch.float32).reshape(7, 1)
    y = torch.arange(7)
    dataset = padded_for_ranks(torch.utils.data.TensorDataset(x, y), 3)
    shards = [list(torch.utils.data.DistributedSampler(dataset, 3, rank, shuffle=False)) for rank in range(3)]
    assert {len(shard) for shard in shards} == {3}  # the same number of batches on every rank
    labels = [int(dataset[i][1]) for shard in shards for i in shard]
    assert sorted(label for label in labels if label != PAD_LABEL) == list(range(7))
    assert labels.count(PAD_LABEL) == 2


class RandomBits(L.LightningDataModule):
    """Random +-1 inputs, 10 classes: enough to train a few steps on each rank."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 2, (256, 32), generator=generator).float() * 2 - 1
        self.y = torch.randint(0, 10, (256,), generator=generator)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=32)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=64)


class DriftingModule(FinetuneModule):
    """Round 2 with sparsity, except that from its second epoch on rank 1 nudges one shadow weight after
    its last step."""

    def on_train_epoch_end(self) -> None:
        if self.trainer.global_rank == 1 and self.current_epoch >= 1:
            with torch.no_grad():
                self.network.layers[0].weight[0, 0] += 1e-3
        super().on_train_epoch_end()


@pytest.mark.slow
def test_ranks_agree_in_round_2_and_a_drift_is_caught():
    """Epoch 0 passes the check (the sparsity thresholds come from weights DDP keeps identical, on both
    ranks); epoch 1, after rank 1's nudge, stops the run."""
    torch.manual_seed(0)
    network = BitwiseMLP(32, [16], 10, sparsity=0.5, grad_rule="identity")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",  # in-process test: the module travels to the two processes
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(Exception, match=r"after epoch 1 of finetune the network of rank\(s\) 1 differs") as caught:
        trainer.fit(DriftingModule(network, lr=1e-2, epochs=3), datamodule=RandomBits())
    assert isinstance(caught.value, TrainingDivergedError) or "TrainingDivergedError" in str(caught.value)


@pytest.mark.slow
def test_pipeline_run_refuses_several_processes_before_any_work(tmp_path):
    """``pipeline.run`` runs the whole chain in one process: with DDP every rank would run it again (and
    wait on the stage cache's lock held by rank 0, which waits for them). It says so, before any work."""
    project = copy_sources(tmp_path / "project")
    result = run(["python", "-m", "pipeline.run", *SMALL, "trainer.devices=2"], project, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: "), result.stderr
    assert "pipeline.run trains one process per job" in result.stderr and "Traceback" not in result.stderr
    # Only Hydra's record of the command (outputs/runs/<time>/.hydra, run.log): no stage ran, nothing tracked.
    written = {p.name for p in (project / "outputs").rglob("*") if p.is_file()}
    assert written <= {"run.log", "config.yaml", "hydra.yaml", "overrides.yaml"}, written
    assert not (project / "mlflow.db").exists()
