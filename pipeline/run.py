"""The whole chain in one process, for Hydra sweeps: the stages of :data:`pipeline.stages.STAGES` in order
(baselines and report only with ``chain.baselines``).

    python -m pipeline.run -m model.hidden=[256,256,256],[1024,1024,1024]
    python -m pipeline.run experiment=sparsity_sweep

Each job gets its own output folder (Hydra's) and one MLflow run, a child of the sweep's parent run.

Stage outputs are cached under ``outputs/stage_cache/<stage>-<key>/``, so jobs that share a prefix of the
chain (every job of a sparsity sweep shares binarize and pretrain) compute it once. A stage's key is a
hash of everything that decides its outputs, the same things ``dvc.yaml`` lists for it: its config keys,
the contents of its code deps (the stage module's import closure), the keys of the stages whose outputs
it reads and, for stages that read the data source, the contents of the source's files (so replacing a
data file by another of the same name and size changes the key). What a key covers is written beside the
outputs (``.key.json``), with the digests of the outputs themselves; a stage is reused only while those
outputs are intact, and says what it reused and why (or why not).

Why not DVC's own run cache: ``dvc repro`` works on one workspace with fixed output paths and one
``params.yaml``, under a repository-wide lock; the parallel jobs of a joblib or submitit sweep each need
their own params and outputs at the same time. DVC's answer to that is ``dvc exp run --queue`` (a
temporary copy of the workspace per experiment), which this project supports beside Hydra sweeps.
This cache is not a DVC replacement: it never invalidates, delete the folder to reclaim space.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from bnn_core.errors import BnnError, ConfigError
from pipeline.artifacts import Artifacts, content_digest, link_artifacts
from pipeline.comparison import comparison_rows, encoding_name
from pipeline.config import CONF_DIR, Config, flatten, validate
from pipeline.evaluate import log_evaluation
from pipeline.files import command_line, fail, write_json
from pipeline.pareto import objectives
from pipeline.sources import source_fingerprint
from pipeline.stage import StageContext, is_multirun_job, make_tracker, run_stage
from pipeline.stages import REPO_ROOT, STAGES, Stage, code_deps, producers
from pipeline.summary import summary
from pipeline.tracking import StageTracker, project_root, run_description
from pipeline.tradeoff import log_run_tradeoff

#: Code hash of each stage module, taken once per process: a sweep whose jobs run in this process keeps
#: its keys even if the code is edited while it runs. A plain dict rather than functools.cache: joblib and
#: submitit pickle this module's functions by value when it runs as ``__main__``; a cache wrapper does not
#: survive that.
_CODE_HASHES: dict[str, dict[str, str]] = {}


def code_hashes(module: str) -> dict[str, str]:
    """sha256 of every file in ``module``'s code deps (relative path -> digest)."""
    if module not in _CODE_HASHES:
        _CODE_HASHES[module] = {
            path: hashlib.sha256((REPO_ROOT / path).read_bytes()).hexdigest() for path in code_deps(module)
        }
    return _CODE_HASHES[module]


def key_inputs(stage: Stage, cfg: DictConfig, config: Config, upstream: dict[str, str]) -> dict:
    """Everything the stage's key covers (written to ``.key.json`` beside its outputs)."""
    params = {}
    for name in stage.params:
        value = OmegaConf.select(cfg, name, throw_on_missing=True)
        params[name] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    inputs = {
        "stage": stage.name,
        "params": params,
        "code": code_hashes(stage.module),
        "upstream": {name: upstream[name] for name in sorted({producers()[a].name for a in stage.reads})},
    }
    if "data" in stage.params:  # the stage loads the data source itself: key on the files' contents
        inputs["data_source"] = source_fingerprint(config.data)
    return inputs


def stage_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def reuse_reason(inputs: dict) -> str:
    """Why a cached stage may stand in for running it: what its key covered, in words."""
    reasons = [f"same {', '.join(inputs['params'])}", f"same code ({len(inputs['code'])} files by content)"]
    if inputs["upstream"]:
        reasons.append(f"same outputs of {', '.join(inputs['upstream'])} (by key)")
    if "data_source" in inputs:
        reasons.append(f"same {len(inputs['data_source'])} data source files by content")
    return "; ".join(reasons)


def output_digests(stage: Stage, stage_dir: Path) -> dict[str, str]:
    """The content digest of each output ``stage`` wrote into ``stage_dir`` (relative path -> digest)."""
    artifacts = Artifacts(stage_dir)
    return {artifacts.relative(name): content_digest(artifacts.path(name)) for name in stage.outputs}


def changed_outputs(stage: Stage, stage_dir: Path, record: Path) -> list[str]:
    """The outputs in ``stage_dir`` that are missing or differ from the digests in ``record`` (the stage's
    ``.key.json``): a cache entry someone edited or half deleted is not reused."""
    try:
        recorded = json.loads(record.read_text()).get("outputs", {})
    except (OSError, ValueError, AttributeError):
        return [record.name]
    artifacts = Artifacts(stage_dir)
    changed = []
    for name in stage.outputs:
        path, relative = artifacts.path(name), artifacts.relative(name)
        if not path.is_file() or recorded.get(relative) != content_digest(path):
            changed.append(relative)
    return changed


def run_chain(cfg: DictConfig, job_dir: Path, cache_dir: Path) -> StageTracker:
    """Run the chain into ``job_dir``; return its (ended) MLflow tracker."""
    config = validate(cfg)
    if config.trainer.world_size > 1:
        # Every rank would run the whole chain: rank 1 would wait on the stage-cache lock that rank 0 holds
        # while rank 0 waits for rank 1 inside DDP.
        raise ConfigError(
            f"trainer.devices * trainer.num_nodes = {config.trainer.world_size}: pipeline.run trains one process "
            "per job; train data-parallel with the stage commands (dvc exp run -S trainer.devices=N, "
            "python -m pipeline.pretrain ...)"
        )
    written_by = producers()
    tracker = make_tracker("pipeline", config)
    if not is_multirun_job():  # a sweep's job is named after its overrides, what sets it apart from the others
        tracker.run_name = run_description(config)
    with tracker:
        tracker.log_params(flatten(cfg))
        keys: dict[str, str] = {}
        stage_dirs: dict[str, Path] = {}
        for stage in STAGES:
            if stage.optional and not config.chain.baselines:
                continue
            inputs = key_inputs(stage, cfg, config, keys)
            keys[stage.name] = stage_key(inputs)
            stage_dir = stage_dirs[stage.name] = cache_dir / f"{stage.name}-{keys[stage.name]}"
            sources = {artifact: stage_dirs[written_by[artifact].name] for artifact in stage.reads}
            _run_cached(stage, stage_dir, inputs, config, tracker, sources)
        for stage_dir in stage_dirs.values():
            _link_tree(stage_dir, job_dir)
        log_job_results(tracker, Artifacts(job_dir), config)
    return tracker


def log_job_results(tracker: StageTracker, artifacts: Artifacts, config: Config) -> None:
    """The job's evaluation metrics (whether its evaluate stage ran or was reused) and its trade-off
    (:func:`pipeline.tradeoff.log_run_tradeoff`) on its run."""
    metrics = json.loads(artifacts.metrics.read_text())
    log_evaluation(tracker, metrics, config)
    baselines = json.loads(artifacts.baselines.read_text()) if config.chain.baselines else None
    rows = comparison_rows(metrics, baselines, encoding_name(config.data.binarize))
    log_run_tradeoff(tracker, rows, config.data.source, metrics.get("test_split"))


def _run_cached(
    stage: Stage, stage_dir: Path, inputs: dict, config: Config, tracker: StageTracker, sources: dict[str, Path]
) -> None:
    """Run ``stage`` into ``stage_dir`` unless an earlier job completed it there.

    Parallel jobs needing the same stage output: one computes it under the folder's lock, the others
    wait for the lock and reuse it. ``sources``: the cache folder holding each artifact the stage reads.
    """
    stage_dir.mkdir(parents=True, exist_ok=True)
    complete = stage_dir / ".key.json"  # written last: its presence marks a finished stage
    with (stage_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if complete.exists():
            changed = changed_outputs(stage, stage_dir, complete)
            if not changed:
                print(f"{stage.name}: reusing {stage_dir} ({reuse_reason(inputs)}; see {complete.name})")
                return
            print(f"{stage.name}: not reusing {stage_dir}: {', '.join(changed)} changed or missing since; running it")
            complete.unlink()
        for artifact, source in sources.items():
            link_artifacts(Artifacts(source), Artifacts(stage_dir), [artifact])
        module = importlib.import_module(stage.module)
        run_stage(module.run, StageContext(stage.name, config, Artifacts(stage_dir), tracker))
        write_json(complete, {**inputs, "outputs": output_digests(stage, stage_dir)})


def _link_tree(source: Path, dest: Path) -> None:
    """Symlink every real (non-link, non-hidden) file of ``source`` into the same place under ``dest``."""
    for path in source.rglob("*"):
        if path.is_file() and not path.is_symlink() and not path.name.startswith("."):
            target = dest / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            target.symlink_to(path.resolve())


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> tuple[float, float]:
    """Run the chain in the job's folder; return ``(validation accuracy, bit-ops per example)`` of its
    bitwise network (:func:`pipeline.pareto.objectives`).

    The return value is what Hydra's Optuna sweeper optimises (``experiment=pareto_search``); a single
    run and the other sweepers ignore it.
    """
    try:
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        tracker = run_chain(cfg, job_dir, Artifacts(project_root()).stage_cache)
        print(summary(job_dir))  # what `make repro` ends with: accuracies, cost, report, dashboard
        if tracker.page_url() is not None:
            print(f"MLflow run {tracker.run_name!r}, accuracy vs bit-ops: {tracker.page_url()}")
        print(f"pipeline: outputs in {job_dir}")
        return objectives(Artifacts(job_dir))
    except BnnError as err:
        fail("run", str(err))


def main() -> None:
    """The command line (exit statuses and signals: :func:`pipeline.files.command_line`)."""
    command_line("run", hydra_main)


if __name__ == "__main__":
    main()
