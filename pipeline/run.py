"""The whole chain in one process: binarize -> pretrain -> finetune -> evaluate (+ baselines when
``chain.baselines``), for sweeps.

    python -m pipeline.run -m model.hidden=[256,256,256],[1024,1024,1024]
    python -m pipeline.run experiment=sparsity_sweep

Each job gets its own output folder (Hydra's) and one MLflow run, a child of the sweep's parent run.
Stage outputs are cached under ``outputs/stage_cache/<stage>-<key>/``: the key is a content hash of the
stage's config sections (the same ones ``dvc.yaml`` lists as its params), the key of the stage before
it, and the project's source code, so jobs that share a prefix of the chain (every job of a sparsity
sweep shares binarize and pretrain) compute it once. This is a cache, not a DVC replacement: it never
invalidates, delete the folder to reclaim space.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from bnn_core.errors import BnnError
from pipeline import baselines, binarize, evaluate, finetune, pretrain
from pipeline.artifacts import Artifacts, link_inputs
from pipeline.config import CONF_DIR, flatten, validate
from pipeline.files import fail
from pipeline.stage import StageContext, StageFn, make_tracker, seed_everything
from pipeline.tracking import project_root


@dataclass(frozen=True)
class ChainStage:
    """A stage of the chain: its function, the config sections it depends on (as in dvc.yaml's params),
    and the stage whose outputs it reads (its cache key includes that stage's key)."""

    name: str
    run: StageFn
    sections: tuple[str, ...]
    after: str | None


STAGES = [
    ChainStage("binarize", binarize.run, ("seed", "data"), None),
    ChainStage("pretrain", pretrain.run, ("seed", "model", "pretrain"), "binarize"),
    ChainStage("finetune", finetune.run, ("seed", "finetune"), "pretrain"),
    ChainStage("evaluate", evaluate.run, ("evaluate",), "finetune"),
    # Optional (chain.baselines): the real-valued rows of the paper's comparison. It reads only the
    # binary features, so every job of a sparsity sweep shares it.
    ChainStage("baselines", baselines.run, ("seed", "data", "model", "pretrain"), "binarize"),
]
CODE_DIRS = ("bnn_core", "pipeline")


#: ``code_fingerprint()`` of this process. A plain dict rather than functools.cache: joblib and submitit
#: pickle this module's functions by value when it runs as ``__main__``, and a cache wrapper does not survive.
_FINGERPRINT: dict[str, str] = {}


def code_fingerprint() -> str:
    """Hash of the project's Python sources, taken once per process: a sweep whose jobs run in this
    process keeps one key even if the code is edited while it runs."""
    if "code" not in _FINGERPRINT:
        _FINGERPRINT["code"] = _hash_sources()
    return _FINGERPRINT["code"]


def _hash_sources() -> str:
    digest = hashlib.sha256()
    package_root = Path(__file__).resolve().parents[1]
    for folder in CODE_DIRS:
        for path in sorted((package_root / folder).glob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def stage_key(name: str, cfg: DictConfig, sections: tuple[str, ...], upstream: str, code: str) -> str:
    params = {
        section: OmegaConf.to_container(cfg[section], resolve=True)
        if isinstance(cfg[section], DictConfig)
        else cfg[section]
        for section in sections
    }
    payload = json.dumps({"stage": name, "params": params, "upstream": upstream, "code": code}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def run_chain(cfg: DictConfig, job_dir: Path, cache_dir: Path) -> None:
    config = validate(cfg)
    code = code_fingerprint()
    with make_tracker("pipeline", config) as tracker:
        tracker.log_params(flatten(cfg))
        keys: dict[str, str] = {}
        done: list[Path] = []
        for stage in STAGES:
            if stage.name == "baselines" and not config.chain.baselines:
                continue
            upstream = keys[stage.after] if stage.after else ""
            key = keys[stage.name] = stage_key(stage.name, cfg, stage.sections, upstream, code)
            stage_dir = cache_dir / f"{stage.name}-{key}"
            stage_dir.mkdir(parents=True, exist_ok=True)
            # Parallel jobs needing the same stage output: one computes it, the others wait and reuse it.
            with (stage_dir / ".lock").open("w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (stage_dir / ".complete").exists():
                    for earlier in done:
                        link_inputs(Artifacts(earlier), Artifacts(stage_dir))
                    seed_everything(config)
                    stage.run(StageContext(stage.name, config, cfg, Artifacts(stage_dir), tracker))
                    (stage_dir / ".complete").write_text(key + "\n")
                else:
                    print(f"{stage.name}: reusing {stage_dir}")
            done.append(stage_dir)
        for stage_dir in done:
            _link_tree(stage_dir, job_dir)
        evaluate.log_evaluation(tracker, json.loads((job_dir / "reports" / "metrics.json").read_text()))


def _link_tree(source: Path, dest: Path) -> None:
    """Symlink every real (non-link, non-marker) file of ``source`` into the same place under ``dest``."""
    for path in source.rglob("*"):
        if path.is_file() and not path.is_symlink() and not path.name.startswith("."):
            target = dest / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            target.symlink_to(path.resolve())


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        run_chain(cfg, job_dir, project_root() / "outputs" / "stage_cache")
        print(f"pipeline: outputs in {job_dir}")
    except BnnError as err:
        fail("run", str(err))


if __name__ == "__main__":
    main()
