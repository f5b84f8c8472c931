"""The stage graph is declared once (pipeline/stages.py): dvc.yaml is generated from it, its code deps are
each stage's import closure, and pipeline.run keys its cache on the same things plus the data's contents."""

from __future__ import annotations

import hashlib
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import stages
from pipeline.artifacts import Artifacts
from pipeline.stages import COMMANDS, STAGES, code_deps, producers, render_dvc_yaml
from tests.conftest import ROOT
from tests.test_datasets import write_idx_folder


def test_committed_dvc_yaml_is_the_generated_one():
    assert (ROOT / "dvc.yaml").read_text() == render_dvc_yaml(), "dvc.yaml is stale: run `make dvc-yaml`"


def test_stage_table_is_a_chain_of_existing_artifacts_and_modules():
    written_before: set[str] = set()
    for entry in STAGES:
        assert set(entry.reads) <= written_before, f"{entry.name} reads something no earlier stage writes"
        for name in (*entry.reads, *entry.outputs):
            Artifacts(Path()).path(name)  # raises KeyError for a name Artifacts does not define
        written_before.update(entry.outputs)
        module = importlib.import_module(entry.module)
        assert callable(module.run) and callable(module.main), entry.module
    assert len(producers()) == sum(len(entry.writes) for entry in STAGES), "two stages write the same artifact"


def test_stand_alone_commands_read_chain_artifacts_and_have_their_own_config():
    for command in COMMANDS:
        assert set(command.reads) <= set(producers()), f"{command.name} reads something no stage writes"
        assert not set(command.writes) & set(producers()), f"{command.name} writes a stage's artifact"
        for name in command.writes:
            Artifacts(Path()).path(name)
        assert (ROOT / "conf" / f"{command.name}.yaml").is_file()
        assert callable(importlib.import_module(command.module).main), command.module


#: Run in a fresh interpreter: import one stage module, print the repository files it loaded.
LOADED_FILES = """
import importlib, json, sys
from pathlib import Path
importlib.import_module(sys.argv[1])
root = Path(sys.argv[2])
files = [Path(m.__file__).resolve() for m in list(sys.modules.values()) if getattr(m, "__file__", None)]
print(json.dumps(sorted(f.relative_to(root).as_posix() for f in files
                        if f.is_relative_to(root) and f.parts[len(root.parts)] in ("bnn_core", "pipeline"))))
"""


@pytest.mark.slow
def test_every_project_file_a_stage_imports_is_among_its_dvc_deps():
    """Import each stage module in a fresh interpreter (all at once) and list the repository files it
    loaded: each must be a code dep of the stage in the committed dvc.yaml (the static closure may hold
    more: imports inside functions)."""
    processes = {
        entry.name: subprocess.Popen(
            [sys.executable, "-c", LOADED_FILES, entry.module, str(ROOT)], stdout=subprocess.PIPE, text=True
        )
        for entry in STAGES
    }
    dvc_stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, process in processes.items():
        stdout, _ = process.communicate(timeout=120)
        assert process.returncode == 0, name
        missing = set(json.loads(stdout)) - set(dvc_stages[name]["deps"])
        assert missing == set(), f"dvc.yaml misses code deps of {name}: run `make dvc-yaml`"


def test_code_deps_is_the_import_closure_inside_the_repository(tmp_path, monkeypatch):
    files = {
        "pipeline/__init__.py": "",
        "pipeline/stage_a.py": "import numpy\nfrom pipeline import helper\n",
        "pipeline/helper.py": "def f():\n    from bnn_core.lazy import g  # imported only when called\n",
        "pipeline/unused.py": "",
        "bnn_core/__init__.py": "from bnn_core.errors import E\n",
        "bnn_core/errors.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import bnn_core.typing_only\n",
        "bnn_core/lazy.py": "",
        "bnn_core/typing_only.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(stages, "REPO_ROOT", tmp_path)
    assert code_deps("pipeline.stage_a") == [
        "bnn_core/__init__.py",
        "bnn_core/errors.py",
        "bnn_core/lazy.py",
        "pipeline/__init__.py",
        "pipeline/helper.py",
        "pipeline/stage_a.py",
    ]


def idx_config(folder: Path):
    from pipeline.config import validate
    from tests.test_config import composed

    overrides = ["data=idx", f"data.path={folder}", "data.split.val=5"]
    return composed(overrides), validate(composed(overrides))


def composed_with(cfg, override: str):
    from omegaconf import OmegaConf

    key, value = override.split("=")
    changed = OmegaConf.create(OmegaConf.to_container(cfg))
    OmegaConf.update(changed, key, yaml.safe_load(value))
    return changed


def test_stage_cache_key_covers_the_data_contents_not_only_the_config(tmp_path):
    """Replace every training label of a data=idx folder by another (same names, same sizes): binarize's
    key, and so every key after it, must change; the key's record names the files and their digests."""
    from pipeline.run import key_inputs, stage_key

    folder = tmp_path / "idx"
    write_idx_folder(folder, n_train=40, n_test=10, gz=False)
    cfg, config = idx_config(folder)
    binarize = stages.stage("binarize")
    before = key_inputs(binarize, cfg, config, {})
    labels = folder / "train-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[8:] = bytes((9 - b) for b in data[8:])  # header is 8 bytes; same length, other labels
    labels.write_bytes(bytes(data))
    after = key_inputs(binarize, cfg, config, {})

    assert stage_key(before) != stage_key(after)
    assert before["params"] == after["params"] and before["code"] == after["code"]
    assert set(after["data_source"]) == {str(path) for path in sorted(folder.iterdir())}
    pretrain = stages.stage("pretrain")
    keys = [stage_key(key_inputs(pretrain, cfg, config, {"binarize": stage_key(k)})) for k in (before, after)]
    assert keys[0] != keys[1]


def test_stage_cache_key_covers_the_stage_code_and_its_declared_params(tmp_path):
    from pipeline.run import code_hashes, key_inputs, stage_key

    folder = tmp_path / "idx"
    write_idx_folder(folder, gz=True)
    cfg, config = idx_config(folder)
    entry = stages.stage("finetune")
    inputs = key_inputs(entry, cfg, config, {"binarize": "b", "pretrain": "p"})
    assert sorted(inputs["code"]) == code_deps("pipeline.finetune") == sorted(code_hashes("pipeline.finetune"))
    assert list(inputs["params"]) == list(entry.params)
    assert inputs["upstream"] == {"binarize": "b", "pretrain": "p"}
    assert "data_source" not in inputs  # it reads the features, whose key covers the data
    assert inputs["params"]["model.hidden"] == [1024, 1024, 1024]
    other = key_inputs(entry, composed_with(cfg, "finetune.sparsity=0.5"), config, inputs["upstream"])
    assert stage_key(other) != stage_key(inputs)


def test_a_missing_data_file_fails_the_key_with_a_data_error(tmp_path):
    from bnn_core.errors import DataError
    from pipeline.run import key_inputs

    folder = tmp_path / "idx"
    write_idx_folder(folder, gz=True)
    cfg, config = idx_config(folder)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
        key_inputs(stages.stage("binarize"), cfg, config, {})


def test_the_data_fingerprint_is_each_files_sha256(tmp_path):
    from pipeline.sources import source_fingerprint

    folder = tmp_path / "idx"
    write_idx_folder(folder, gz=True)
    _, config = idx_config(folder)
    expected = {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.iterdir()}
    assert source_fingerprint(config.data) == expected


def test_seed_everything_leaves_the_state_lightnings_does():
    """pipeline.stage.seed_everything stands in for lightning.seed_everything(seed, workers=True)."""
    import os
    import random

    import lightning as L
    import numpy as np
    import torch

    from pipeline.config import Config
    from pipeline.stage import seed_everything

    def state_after(seed_fn) -> tuple:
        random.seed(1234), np.random.seed(1234), torch.manual_seed(1234)
        os.environ.pop("PL_GLOBAL_SEED", None), os.environ.pop("PL_SEED_WORKERS", None)
        seed_fn()
        env = (os.environ.get("PL_GLOBAL_SEED"), os.environ.get("PL_SEED_WORKERS"))
        return (random.random(), float(np.random.rand()), float(torch.rand(1)), *env)

    config = Config(seed=7)
    assert state_after(lambda: seed_everything(config)) == state_after(
        lambda: L.seed_everything(7, workers=True, verbose=False)
    )


@pytest.mark.slow
@pytest.mark.parametrize("module", ["pipeline.binarize", "pipeline.evaluate", "pipeline.report", "pipeline.export"])
def test_stages_that_do_not_train_never_import_lightning(module):
    """Lightning costs ~8 s per process: `make repro`'s four non-training stages must not pay it."""
    check = (
        f"import importlib, sys; importlib.import_module({module!r})\n"
        "from hydra import compose, initialize_config_dir\n"
        "from pipeline.config import CONF_DIR, validate\n"
        "with initialize_config_dir(CONF_DIR, version_base='1.3'):\n"
        "    validate(compose('config'))  # every stage validates its config first\n"
        "print('lightning' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
