"""What every stage entry point shares: Hydra config, validation, seeding, tracking, clean errors.

A stage is a function ``run(ctx) -> None`` decorated with :func:`stage`. Run by hand it composes
``conf/`` (``python -m pipeline.finetune finetune.sparsity=0.5``); DVC runs it on the composed
``params.yaml`` (``--config-dir . --config-name params``), which is what ``dvc exp run -S`` edits.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from bnn_core.errors import BnnError
from pipeline.artifacts import Artifacts
from pipeline.config import Config, flatten, validate
from pipeline.tracking import StageTracker


@dataclass
class StageContext:
    name: str
    config: Config
    raw_config: DictConfig
    artifacts: Artifacts
    tracker: StageTracker

    def trainer(self, epochs: int, callbacks: list[L.Callback]) -> L.Trainer:
        return L.Trainer(
            max_epochs=epochs,
            accelerator=self.config.trainer.accelerator,
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=self.config.trainer.progress_bar,
            deterministic=True,
            callbacks=callbacks,
        )


def fail(stage: str, message: str) -> None:
    """One line on stderr, exit status 2: an expected mistake, so no traceback."""
    print(f"error: {stage}: {message}", file=sys.stderr)
    sys.exit(2)


def stage(name: str) -> Callable[[Callable[[StageContext], None]], Callable[[], None]]:
    def decorate(run: Callable[[StageContext], None]) -> Callable[[], None]:
        @hydra.main(config_path="../conf", config_name="config", version_base="1.3")
        @functools.wraps(run)
        def main(cfg: DictConfig) -> None:
            try:
                config = validate(cfg)
                L.seed_everything(config.seed, workers=True, verbose=False)
                tracker = StageTracker(
                    config.tracking.uri, config.tracking.experiment, name, tags={"data_source": config.data.source}
                )
                with tracker:
                    tracker.log_params(flatten(cfg))
                    run(StageContext(name, config, cfg, Artifacts(Path.cwd()), tracker))
            except BnnError as err:
                fail(name, str(err))

        return main

    return decorate
