"""Typed schema of the Hydra configuration in ``conf/``: every key, its type and its valid range.

:class:`Config` is ``conf/config.yaml`` (the pipeline), :class:`PredictConfig` is ``conf/predict.yaml``.
An entry point validates its composed config before doing any work (:func:`validate`,
:func:`validate_predict`): an unknown key, a missing or wrong-typed value or a value out of range ends it
with a :class:`ConfigError` naming the key.

Kept free of torch: ``pipeline.predict`` imports this module and should start fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from bnn_core.errors import ConfigError
from bnn_core.input_encoders import ENCODER_METHODS, RealScaler

Schema = TypeVar("Schema")

#: The Hydra config folder, absolute so entry points work from any module and any working directory.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

#: Where round 2 starts: round 1 (the paper) or random shadow weights (no pretraining).
FINETUNE_INITS = ("pretrained", "random")
DATA_SOURCES = ("mnist5k", "idx", "mnist", "fashion_mnist")
BINARY_ENCODER_METHODS = tuple(method for method in ENCODER_METHODS if method != RealScaler.name)
#: Seeds numpy's and torch's generators accept.
MAX_SEED = 2**32 - 1


def _require(ok: bool, key: str, message: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}, got {value!r}")


@dataclass
class BinarizeConfig:
    method: str = "threshold"
    threshold: int = 127
    bits: int = 2
    planes: int = 3

    def __post_init__(self) -> None:
        _require(
            self.method in ENCODER_METHODS, "data.binarize.method", f"must be one of {ENCODER_METHODS}", self.method
        )
        # Every chain (dvc.yaml, pipeline.run) feeds these features to the bitwise network, whose round 2
        # refuses real inputs: refused here, before round 1 spends its minutes, not after.
        _require(
            self.method != RealScaler.name,
            "data.binarize.method",
            f"the bitwise network needs binary inputs, one of {BINARY_ENCODER_METHODS} (the real-valued "
            "baselines scale the pixels themselves)",
            self.method,
        )
        _require(0 <= self.threshold <= 254, "data.binarize.threshold", "must be in 0..254", self.threshold)
        _require(1 <= self.bits <= 8, "data.binarize.bits", "must be in 1..8", self.bits)
        _require(1 <= self.planes <= 15, "data.binarize.planes", "must be in 1..15", self.planes)


@dataclass
class SplitConfig:
    val: int = 500
    test: int | None = 500
    seed: int = 0
    # k-fold cross-validation (sources without their own test set): fold ``fold`` of ``folds`` stratified
    # folds is the test split, validation is held out of the rest. null: one seeded hold-out split.
    folds: int | None = None
    fold: int = 0

    def __post_init__(self) -> None:
        _require(0 <= self.seed <= MAX_SEED, "data.split.seed", f"must be in 0..{MAX_SEED}", self.seed)
        _require(self.val >= 1, "data.split.val", "must be >= 1", self.val)
        _require(self.test is None or self.test >= 1, "data.split.test", "must be >= 1 or null", self.test)
        _require(self.folds is None or self.folds >= 2, "data.split.folds", "must be >= 2 or null", self.folds)
        _require(
            self.fold >= 0 and (self.folds is None or self.fold < self.folds),
            "data.split.fold",
            "must be in 0..folds-1",
            self.fold,
        )


@dataclass
class DataConfig:
    source: str = "mnist5k"
    path: str | None = None
    n_classes: int = 10
    split: SplitConfig = field(default_factory=SplitConfig)
    binarize: BinarizeConfig = field(default_factory=BinarizeConfig)
    # source mnist only (conf/data/mnist.yaml); null: the defaults in pipeline/sources.py
    url: str | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        _require(self.source in DATA_SOURCES, "data.source", f"must be one of {DATA_SOURCES}", self.source)
        _require(self.source != "idx" or bool(self.path), "data.path", "must name a folder of IDX files", self.path)
        _require(self.url is None or "://" in self.url, "data.url", "must be a base URL or null", self.url)
        _require(
            self.cache_dir is None or bool(self.cache_dir.strip()),
            "data.cache_dir",
            "must be a folder or null",
            self.cache_dir,
        )
        _require(
            self.source != "mnist" or self.path is None,
            "data.path",
            "is not used by source mnist (it downloads into data.cache_dir; for files you have, use data=idx)",
            self.path,
        )
        _require(2 <= self.n_classes <= 256, "data.n_classes", "must be in 2..256", self.n_classes)


@dataclass
class ModelConfig:
    hidden: list[int] = field(default_factory=lambda: [1024, 1024, 1024])
    norm: str = "none"
    dropout_input: float = 0.2
    # one rate for every hidden layer, or a list with one rate per hidden layer
    dropout_hidden: Any = 0.5

    def __post_init__(self) -> None:
        _require(len(self.hidden) >= 1, "model.hidden", "needs at least one hidden layer", self.hidden)
        _require(all(h > 0 for h in self.hidden), "model.hidden", "sizes must be > 0", self.hidden)
        # none: the paper's network (a binary bias per unit); batchnorm: bnn_bn (integer thresholds)
        from bnn_core.networks import NORMS

        _require(self.norm in NORMS, "model.norm", f"must be one of {NORMS}", self.norm)
        _require(_is_rate(self.dropout_input), "model.dropout_input", "must be in [0, 1)", self.dropout_input)
        rates = self.dropout_hidden if isinstance(self.dropout_hidden, list | tuple) else [self.dropout_hidden]
        _require(
            all(_is_rate(rate) for rate in rates)
            and (len(rates) == 1 or len(rates) == len(self.hidden)),
            "model.dropout_hidden",
            f"must be a rate in [0, 1) or a list of {len(self.hidden)} rates (one per hidden layer)",
            self.dropout_hidden,
        )
        self.dropout_hidden = [float(rate) for rate in rates] if len(rates) > 1 else float(rates[0])

    @property
    def network(self) -> str:
        """The bitwise network's name in reports: ``bnn`` (the paper's) or ``bnn_bn`` (integer thresholds)."""
        return "bnn_bn" if self.norm == "batchnorm" else "bnn"

    def hidden_dropout_rates(self) -> list[float]:
        """One dropout rate per hidden layer."""
        rates = self.dropout_hidden
        return list(rates) if isinstance(rates, list) else [rates] * len(self.hidden)


def _is_rate(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value < 1.0


@dataclass
class AugmentConfig:
    """Training-set augmentation, applied to raw pixels before binarization, fresh and seeded each epoch."""

    shift: int = 0  # largest random shift in pixels, each axis; 0 = off

    def __post_init__(self) -> None:
        _require(0 <= self.shift <= 4, "augment.shift", "must be in 0..4 pixels", self.shift)


@dataclass
class OptimConfig:
    epochs: int = 10
    batch_size: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    loss: str = "cross_entropy"
    # wall-clock budget: stop after this many minutes even if epochs remain (null: epochs only). A time
    # budget makes the result depend on the machine's speed; the epoch budget is reproducible.
    max_minutes: float | None = None

    def check(self, stage: str) -> None:
        # imported here: the registries need torch (bnn_core.objectives, no Lightning), the schema does not
        from bnn_core.objectives import LOSSES, SCHEDULES

        _require(self.schedule in SCHEDULES, f"{stage}.schedule", f"must be one of {SCHEDULES}", self.schedule)
        _require(self.loss in LOSSES, f"{stage}.loss", f"must be one of {tuple(LOSSES)}", self.loss)
        _require(
            self.max_minutes is None or (math.isfinite(self.max_minutes) and self.max_minutes > 0),
            f"{stage}.max_minutes",
            "must be > 0 or null",
            self.max_minutes,
        )
        _require(self.epochs >= 1, f"{stage}.epochs", "must be >= 1", self.epochs)
        _require(self.batch_size >= 1, f"{stage}.batch_size", "must be >= 1", self.batch_size)
        # Adam moves every weight by about lr per step: above 1 a step crosses round 2's whole [-1, 1] range
        # of shadow weights, and near 3e37 it overflows float32.
        _require(math.isfinite(self.lr) and 0 < self.lr <= 1, f"{stage}.lr", "must be in (0, 1]", self.lr)
        _require(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            f"{stage}.weight_decay",
            "must be finite and >= 0",
            self.weight_decay,
        )


@dataclass
class PretrainConfig(OptimConfig):
    def __post_init__(self) -> None:
        self.check("pretrain")


@dataclass
class FinetuneConfig(OptimConfig):
    sparsity: float = 0.0
    grad: str = "identity"
    init: str = "pretrained"

    def __post_init__(self) -> None:
        self.check("finetune")
        from bnn_core.quantizers import SIGN_GRADIENTS  # torch: only the stages that train need it

        _require(0.0 <= self.sparsity < 1.0, "finetune.sparsity", "must be in [0, 1)", self.sparsity)
        _require(self.grad in SIGN_GRADIENTS, "finetune.grad", f"must be one of {tuple(SIGN_GRADIENTS)}", self.grad)
        _require(self.init in FINETUNE_INITS, "finetune.init", f"must be one of {FINETUNE_INITS}", self.init)


#: Lightning accelerators a stage may ask for; ``auto`` picks a GPU when there is one.
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")
#: Lightning strategies a stage may ask for: ``auto`` (one device: none; several: ``ddp``) or ``ddp``, which
#: starts the other processes of a node by running the same command again (each rank runs the stage; only
#: global rank 0 writes and tracks, :mod:`pipeline.training`). Not ``ddp_spawn``/``ddp_fork``: they train
#: in child processes whose epoch history and MLflow logging never reach the stage.
STRATEGIES = ("auto", "ddp")
#: Lightning's precision settings. 16-bit formats hold integers exactly only up to 256 (bf16) or 2048
#: (fp16): round 2's integer sums of +-1 products are exact only in 32 (or 64) bits.
PRECISIONS = ("32-true", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    progress_bar: bool = True

    def __post_init__(self) -> None:
        _require(
            self.accelerator in ACCELERATORS, "trainer.accelerator", f"must be one of {ACCELERATORS}", self.accelerator
        )
        _require(self.devices >= 1, "trainer.devices", "must be >= 1 (devices per node)", self.devices)
        _require(self.num_nodes >= 1, "trainer.num_nodes", "must be >= 1", self.num_nodes)
        _require(self.strategy in STRATEGIES, "trainer.strategy", f"must be one of {STRATEGIES}", self.strategy)
        _require(self.precision in PRECISIONS, "trainer.precision", f"must be one of {PRECISIONS}", self.precision)

    @property
    def world_size(self) -> int:
        """Training processes in all: one per device on every node."""
        return self.devices * self.num_nodes


@dataclass
class ChainConfig:
    """``pipeline.run`` only: optional stages each job adds to binarize -> ... -> evaluate."""

    baselines: bool = False  # the real-valued rows of the paper's comparison (experiment=paper_table1)


@dataclass
class EvaluateConfig:
    batch_size: int = 1000

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "evaluate.batch_size", "must be >= 1", self.batch_size)


@dataclass
class TrackingConfig:
    uri: str | None = None
    experiment: str = "bitwise-nn"


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    chain: ChainConfig = field(default_factory=ChainConfig)

    def __post_init__(self) -> None:
        _require(0 <= self.seed <= MAX_SEED, "seed", f"must be in 0..{MAX_SEED}", self.seed)
        # A batch is that of one optimizer step, whatever the number of processes: each loads its share.
        processes = self.trainer.world_size
        for stage, optim in (("pretrain", self.pretrain), ("finetune", self.finetune)):
            _require(
                optim.batch_size % processes == 0,
                f"{stage}.batch_size",
                f"must be a multiple of trainer.devices * trainer.num_nodes ({processes}), each process's share",
                optim.batch_size,
            )


@dataclass
class PredictConfig:
    """``python -m pipeline.predict``: see its module docstring for what each key does."""

    model_file: str = "models/bnn.npz"
    images: str = MISSING
    labels: str | None = None
    output: str | None = None
    batch_size: int = 4096

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)


#: Formats ``python -m pipeline.export`` writes (``c``: a C99 library, :mod:`bnn_core.c_export`).
EXPORT_FORMATS = ("c",)


@dataclass
class ExportConfig:
    """``python -m pipeline.export``: see its module docstring for what each key does."""

    model_file: str = "models/bnn.npz"
    format: str = "c"
    output: str = "dist/c"
    word_bits: int = 32
    overwrite: bool = False

    def __post_init__(self) -> None:
        from bnn_core.c_export import WORD_SIZES  # the registry lives beside the code that uses it

        _require(self.format in EXPORT_FORMATS, "format", f"must be one of {EXPORT_FORMATS}", self.format)
        _require(self.word_bits in WORD_SIZES, "word_bits", f"must be one of {WORD_SIZES}", self.word_bits)
        _require(bool(self.output.strip()), "output", "must name a folder", self.output)


def _validate(schema: type[Schema], cfg: DictConfig) -> Schema:
    """Merge ``cfg`` into the structured ``schema`` and build it; every OmegaConf complaint and every
    range check (``__post_init__``) becomes one :class:`ConfigError` that names the key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except MissingMandatoryValue as err:
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError(f"{key}: missing value (pass {key}=...)") from None
    except OmegaConfBaseException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError(f"{key}: {getattr(err, 'msg', str(err)).splitlines()[0]}") from None


def validate(cfg: DictConfig) -> Config:
    """Check a composed ``conf/config.yaml`` against the schema and return it as typed objects."""
    return _validate(Config, cfg)


def validate_predict(cfg: DictConfig) -> PredictConfig:
    """Check a composed ``conf/predict.yaml`` against :class:`PredictConfig`."""
    return _validate(PredictConfig, cfg)


def validate_export(cfg: DictConfig) -> ExportConfig:
    """Check a composed ``conf/export.yaml`` against :class:`ExportConfig`."""
    return _validate(ExportConfig, cfg)


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become their string form (MLflow params are strings)."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, object] = {}
    for key, value in container.items():  # type: ignore[union-attr]
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
