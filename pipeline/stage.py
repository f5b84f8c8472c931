"""What every stage entry point shares: Hydra config, validation, seeding, tracking, clean errors.

A stage is a function ``run(ctx) -> None``; ``main = stage_main("name", run)`` makes its command line.
Run by hand it composes ``conf/`` (``python -m pipeline.finetune finetune.sparsity=0.5``); DVC runs it
on the composed ``params.yaml`` (``--config-dir . --config-name params``), which is what
``dvc exp run -S`` edits. In a Hydra multirun (``-m``) each job writes into its own output folder and
reads the outputs of earlier stages from the project (the artifacts the stage table says it reads).
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from bnn_core.errors import BnnError, ConfigError
from pipeline.artifacts import Artifacts, link_artifacts
from pipeline.config import CONF_DIR, Config, flatten, validate
from pipeline.files import command_line, fail, remove_stale
from pipeline.stages import stage
from pipeline.tracking import StageTracker, project_root, run_description

if TYPE_CHECKING:  # Lightning takes ~8 s to import: only the stages that train load it (in trainer())
    import lightning as L

StageFn = Callable[["StageContext"], None]
#: Lightning's checkpoints during training go to ``<temp dir>/<this><host>-<pid>.<random>`` (pipeline.training).
CHECKPOINTS_PREFIX = "bnn-checkpoints-"


@dataclass
class StageContext:
    name: str
    config: Config
    artifacts: Artifacts
    tracker: StageTracker

    def trainer(self, epochs: int, callbacks: list[L.Callback], max_minutes: float | None = None) -> L.Trainer:
        """One device; ``deterministic=True`` (on CUDA Lightning also sets ``CUBLAS_WORKSPACE_CONFIG``).
        Checkpointing is on only when ``callbacks`` hold a ModelCheckpoint (Lightning refuses it otherwise).

        ``max_minutes``: a wall-clock budget as well (Lightning's ``max_time``, checked after every
        training batch; it validates once more before it stops, so the partial epoch can still be the
        best one). Whichever of the two budgets runs out first ends training; ``epochs`` stays the
        horizon of the learning-rate schedule."""
        import lightning as L
        from lightning.fabric.utilities.exceptions import MisconfigurationException
        from lightning.pytorch.callbacks import ModelCheckpoint

        # The console shows what a user asked for: not Lightning's notes on GPUs and TPUs, its cloud-logging
        # tip or "`Trainer.fit` stopped" (INFO), nor a deprecation inside Lightning itself. Its warnings
        # (e.g. "GPU available but not used") still show.
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        try:
            return L.Trainer(
                max_epochs=epochs,
                max_time=None if max_minutes is None else timedelta(minutes=max_minutes),
                accelerator=self.config.trainer.accelerator,
                devices=1,
                logger=False,
                enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                enable_model_summary=False,
                enable_progress_bar=self.config.trainer.progress_bar,
                deterministic=True,
                callbacks=callbacks,
            )
        except MisconfigurationException as err:  # e.g. accelerator=gpu on a machine without one
            raise ConfigError(f"trainer.accelerator={self.config.trainer.accelerator}: {err}") from None


def hydra_tags() -> dict[str, str]:
    """Tags describing how Hydra launched this process (its command-line overrides), if it did."""
    if not HydraConfig.initialized():
        return {}
    return {"hydra_overrides": " ".join(HydraConfig.get().overrides.task) or "(none)"}


def is_multirun_job() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def make_tracker(name: str, config: Config) -> StageTracker:
    """The stage's MLflow run; in a sweep it is named after the job's overrides. The parent run of a
    ``dvc repro`` is named after what it trains (:func:`pipeline.tracking.run_description`)."""
    tags = {"data_source": config.data.source, **hydra_tags()}
    run_name = f"{name} {tags['hydra_overrides']}" if is_multirun_job() else name
    return StageTracker(
        config.tracking.uri,
        config.tracking.experiment,
        name,
        tags=tags,
        run_name=run_name,
        description=run_description(config),
    )


def seed_everything(config: Config) -> None:
    """What ``lightning.seed_everything(config.seed, workers=True)`` does, without importing Lightning into
    the stages that do not train: seed Python's, numpy's and torch's generators, and set the variables
    through which Lightning seeds dataloader workers (a test checks the two leave the same state)."""
    os.environ["PL_GLOBAL_SEED"] = str(config.seed)
    os.environ["PL_SEED_WORKERS"] = "1"
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)


def remove_leftovers(name: str, artifacts: Artifacts) -> None:
    """Remove what killed runs of stage ``name`` left behind (their writers are gone, see
    :func:`pipeline.files.remove_stale`): the temporaries of its outputs under ``artifacts``, and the
    checkpoint folders of any training process of this machine."""
    removed = remove_stale(Path(tempfile.gettempdir()), CHECKPOINTS_PREFIX)
    for output in stage(name).outputs:
        target = artifacts.path(output)
        removed += remove_stale(target.parent, f".{target.name}.", ".tmp")
        # A file written atomically into atomic_path's temporary (evaluate's model file, which
        # bnn_core.model_file saves atomically itself) has a temporary of its own: one more leading dot.
        removed += remove_stale(target.parent, f"..{target.name}.", ".tmp")
    for path in removed:
        print(f"{name}: removed {path}, left by a run that was killed")


def run_stage(run: StageFn, ctx: StageContext) -> None:
    """Run a stage from a freshly seeded state (by hand, under DVC, or inside ``pipeline.run``), after
    removing what killed runs of it left."""
    remove_leftovers(ctx.name, ctx.artifacts)
    seed_everything(ctx.config)
    run(ctx)


def stage_main(name: str, run: StageFn) -> Callable[[], None]:
    """The Hydra command line of one stage (exit statuses and signals: :func:`pipeline.files.command_line`)."""

    @hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
    def hydra_main(cfg: DictConfig) -> None:
        try:
            config = validate(cfg)
            root = Path.cwd()
            if is_multirun_job():
                root = Path(HydraConfig.get().runtime.output_dir)
                link_artifacts(Artifacts(project_root()), Artifacts(root), list(stage(name).reads))
            with make_tracker(name, config) as tracker:
                tracker.log_params(flatten(cfg))
                run_stage(run, StageContext(name, config, Artifacts(root), tracker))
        except BnnError as err:
            fail(name, str(err))

    def main() -> None:
        command_line(name, hydra_main)

    main.__name__ = f"{name}_main"
    return main
