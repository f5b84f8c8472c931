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
#: Where the launchers Lightning knows put a process's rank: its own ddp launcher (LOCAL_RANK, NODE_RANK),
#: torchrun (RANK, LOCAL_RANK, GROUP_RANK), SLURM's srun (SLURM_PROCID), LSF's jsrun (JSM_NAMESPACE_RANK).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def launched_as_rank_zero() -> bool:
    """Whether this process is global rank 0 of its training run, as the environment that started it says.

    Under data parallelism every rank runs the whole stage (Lightning's ``ddp`` starts the other processes
    of a node by running the same command again, with ``LOCAL_RANK`` and ``NODE_RANK`` set); only rank 0
    writes outputs and logs to MLflow. This is known before any Trainer exists, which the stage's MLflow
    run needs (it begins before training); :meth:`StageContext.trainer` checks that Lightning agrees.
    (Lightning's own ``rank_zero_only.rank`` reads the same variables but not ``NODE_RANK``: on the first
    process of node 1 it says 0 until training starts.)
    """
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


@dataclass
class StageContext:
    name: str
    config: Config
    artifacts: Artifacts
    tracker: StageTracker
    #: Global rank 0 of a data-parallel run, or the only process: the one that writes outputs and tracks.
    rank_zero: bool = True

    def trainer(self, epochs: int, callbacks: list[L.Callback], max_minutes: float | None = None) -> L.Trainer:
        """``trainer.devices`` devices on each of ``trainer.num_nodes`` nodes (more than one in all: data
        parallel, each process trains on its shard of every epoch; :mod:`bnn_core.data_module`), with
        batch-norm statistics synchronised across them (``sync_batchnorm``); ``deterministic=True`` (on
        CUDA Lightning also sets ``CUBLAS_WORKSPACE_CONFIG``). Checkpointing is on only when ``callbacks``
        hold a ModelCheckpoint (Lightning refuses it otherwise).

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
        warnings.filterwarnings("ignore", message=r".*all_gather is deprecated")  # inside Lightning's all_gather
        settings = self.config.trainer
        try:
            trainer = L.Trainer(
                max_epochs=epochs,
                max_time=None if max_minutes is None else timedelta(minutes=max_minutes),
                accelerator=settings.accelerator,
                devices=settings.devices,
                num_nodes=settings.num_nodes,
                strategy=settings.strategy,
                precision=settings.precision,  # type: ignore[arg-type]
                sync_batchnorm=settings.world_size > 1,
                logger=False,
                enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                enable_model_summary=False,
                enable_progress_bar=settings.progress_bar,  # Lightning's bars show on rank 0 only
                deterministic=True,
                callbacks=callbacks,
            )
        except MisconfigurationException as err:  # e.g. accelerator=gpu on a machine without one, or too few GPUs
            first_line = str(err).strip().splitlines()[0]
            raise ConfigError(f"trainer.accelerator={settings.accelerator}: {first_line}") from None
        if trainer.is_global_zero != self.rank_zero:
            raise ConfigError(
                f"Lightning makes this process global rank {trainer.global_rank} of {trainer.world_size}, the "
                f"environment ({', '.join(f'{v}={os.environ[v]}' for v in RANK_VARIABLES if v in os.environ)}) "
                "says otherwise: set the rank variables of one launcher only"
            )
        return trainer


def hydra_tags() -> dict[str, str]:
    """Tags describing how Hydra launched this process (its command-line overrides), if it did."""
    if not HydraConfig.initialized():
        return {}
    return {"hydra_overrides": " ".join(HydraConfig.get().overrides.task) or "(none)"}


def is_multirun_job() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def make_tracker(name: str, config: Config, rank_zero: bool = True) -> StageTracker:
    """The stage's MLflow run; in a sweep it is named after the job's overrides. The parent run of a
    ``dvc repro`` is named after what it trains (:func:`pipeline.tracking.run_description`). None but
    rank 0's: a training process of another rank gets a tracker that logs nothing."""
    tags = {"data_source": config.data.source, **hydra_tags()}
    run_name = f"{name} {tags['hydra_overrides']}" if is_multirun_job() else name
    return StageTracker(
        config.tracking.uri,
        config.tracking.experiment,
        name,
        tags=tags,
        run_name=run_name,
        description=run_description(config),
        enabled=rank_zero,
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
    removing what killed runs of it left (rank 0 only: the other ranks write nothing)."""
    if ctx.rank_zero:
        remove_leftovers(ctx.name, ctx.artifacts)
    seed_everything(ctx.config)
    run(ctx)


def stage_main(name: str, run: StageFn) -> Callable[[], None]:
    """The Hydra command line of one stage (exit statuses and signals: :func:`pipeline.files.command_line`)."""

    @hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
    def hydra_main(cfg: DictConfig) -> None:
        try:
            config = validate(cfg)
            if is_multirun_job() and config.trainer.world_size > 1:
                # Lightning's ddp starts the other ranks by running this command line again: with -m, a sweep.
                raise ConfigError(
                    f"trainer.devices * trainer.num_nodes = {config.trainer.world_size}: data-parallel training "
                    "runs one job at a time; run each job's command without -m"
                )
            root = Path.cwd()
            if is_multirun_job():
                root = Path(HydraConfig.get().runtime.output_dir)
                link_artifacts(Artifacts(project_root()), Artifacts(root), list(stage(name).reads))
            rank_zero = launched_as_rank_zero()
            with make_tracker(name, config, rank_zero) as tracker:
                tracker.log_params(flatten(cfg))
                run_stage(run, StageContext(name, config, Artifacts(root), tracker, rank_zero))
        except BnnError as err:
            fail(name, str(err))

    def main() -> None:
        command_line(name, hydra_main)

    main.__name__ = f"{name}_main"
    return main
