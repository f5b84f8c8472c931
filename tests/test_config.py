"""Every shipped config composes and validates; params.yaml is exactly conf/ composed."""

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bnn_core.errors import ConfigError
from pipeline.config import validate

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(overrides: list[str]):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize("data", options("data"))
@pytest.mark.parametrize("experiment", [None, *options("experiment")])
def test_every_config_composes_and_validates(data, experiment):
    overrides = [f"data={data}"] + ([f"experiment={experiment}"] if experiment else [])
    if data == "idx":
        overrides.append("data.path=/some/folder")
    config = validate(composed(overrides))
    assert config.data.source == data


def test_params_yaml_is_the_composition_of_conf():
    from dvc.utils.hydra import compose_and_dump

    expected = ROOT / ".pytest_cache" / "params.composed.yaml"
    expected.parent.mkdir(exist_ok=True)
    compose_and_dump(expected, str(CONF), None, "config", str(ROOT), [])
    assert yaml.safe_load((ROOT / "params.yaml").read_text()) == yaml.safe_load(expected.read_text()), (
        "params.yaml differs from conf/ composed: run `make params`"
    )


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("finetune.sparsity=1.0", "finetune.sparsity"),
        ("finetune.sparsity=-0.1", "finetune.sparsity"),
        ("finetune.sparsity=lots", "finetune.sparsity"),
        ("finetune.grad=sigmoid", "finetune.grad"),
        ("data.binarize.bits=0", "data.binarize.bits"),
        ("data.binarize.bits=9", "data.binarize.bits"),
        ("data.binarize.method=median", "data.binarize.method"),
        ("model.hidden=[64,0]", "model.hidden"),
        ("pretrain.lr=0", "pretrain.lr"),
        ("finetune.lr=-1e-3", "finetune.lr"),
        ("finetune.lr=inf", "finetune.lr"),
        ("finetune.lr=1e38", "finetune.lr"),  # fused Adam would overflow to +-inf weights without a word
        ("pretrain.lr=2", "pretrain.lr"),
        ("pretrain.weight_decay=nan", "pretrain.weight_decay"),
        ("trainer.accelerator=tpu", "trainer.accelerator"),
        ("trainer.devices=0", "trainer.devices"),
        ("trainer.num_nodes=0", "trainer.num_nodes"),
        ("trainer.strategy=ddp_spawn", "trainer.strategy"),
        ("trainer.precision=8-true", "trainer.precision"),
        ("trainer.devices=3", "pretrain.batch_size"),  # 100 examples a step do not split over 3 processes
        ("pretrain.epochs=0", "pretrain.epochs"),
        ("model.dropout_hidden=1.0", "model.dropout_hidden"),
        ("data=idx", "data.path"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(composed([override]))


def test_unknown_key_names_the_key():
    cfg = composed([])
    OmegaConf.set_struct(cfg, False)
    cfg.finetune.sparsty = 0.5
    with pytest.raises(ConfigError, match=r"finetune\.sparsty"):
        validate(cfg)


def stage_context(overrides: list[str]):
    from pipeline.stage import StageContext

    cfg = composed(overrides)
    return StageContext("pretrain", validate(cfg), None, None)  # type: ignore[arg-type]


def test_accelerator_auto_picks_a_gpu_when_there_is_one():
    import torch
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

    trainer = stage_context(["trainer.accelerator=auto"]).trainer(1, [])
    expected = CUDAAccelerator if torch.cuda.is_available() else CPUAccelerator
    assert isinstance(trainer.accelerator, expected)


def test_asking_for_a_missing_gpu_is_a_config_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=r"trainer\.accelerator=gpu: No supported gpu backend found"):
        stage_context(["trainer.accelerator=gpu"]).trainer(1, [])


@pytest.mark.parametrize(
    ("environment", "rank_zero"),
    [
        ({}, True),
        ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True),  # Lightning's ddp, in the process it started from
        ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, False),  # ... and in the process it started
        ({"NODE_RANK": "1"}, False),  # the first process of a second node
        ({"RANK": "3", "LOCAL_RANK": "1"}, False),  # torchrun
        ({"SLURM_PROCID": "2"}, False),  # srun
    ],
)
def test_rank_zero_is_read_from_the_launchers_variables(monkeypatch, environment, rank_zero):
    from pipeline.stage import RANK_VARIABLES, launched_as_rank_zero

    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert launched_as_rank_zero() is rank_zero


def test_a_rank_lightning_does_not_agree_with_is_a_config_error():
    from dataclasses import replace

    ctx = replace(stage_context([]), rank_zero=False)  # e.g. LOCAL_RANK=1 left set, one device asked for
    with pytest.raises(ConfigError, match="global rank 0 of 1"):
        ctx.trainer(1, [])


def test_trainer_gets_devices_nodes_strategy_and_precision():
    trainer = stage_context(["trainer.precision=64-true", "trainer.num_nodes=1"]).trainer(1, [])
    assert trainer.num_devices == 1 and trainer.num_nodes == 1 and trainer.world_size == 1
    assert trainer.precision == "64-true"
