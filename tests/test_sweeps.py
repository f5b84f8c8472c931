"""Hydra sweeps: the ready-made experiment configs, the launchers, and tiny real sweeps in a project copy.

The real sweeps (marked slow) run the smoke configuration: ``pipeline.run`` through the joblib and the
submitit_local launchers (every job's MLflow run a child of the sweep's parent run, stage outputs shared
through the stage cache), and one stage (``pipeline.finetune -m``) on the project's own earlier outputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pipeline.config import validate
from tests.conftest import ROOT, compose_params, run

pytestmark = pytest.mark.heavy  # make test starts this file early (tests/conftest.py)

CONF = ROOT / "conf"
SMOKE = ["experiment=smoke"]
SMOKE_NET = ["model.hidden=[64,64]", "pretrain.epochs=1", "finetune.epochs=1", "trainer.progress_bar=false"]


def hydra_config(overrides: list[str], with_hydra: bool = True):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=with_hydra)


def sweep_jobs(experiment: str) -> list[list[str]]:
    """The jobs Hydra's basic sweeper launches for ``experiment=<name>``: each job's overrides."""
    cfg = hydra_config([f"experiment={experiment}"])
    assert cfg.hydra.mode == RunMode.MULTIRUN
    params = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
    (batch,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
    return batch


@pytest.mark.parametrize(
    ("experiment", "jobs"),
    [
        ("sparsity_sweep", [[f"finetune.sparsity={s}"] for s in ("0.0", "0.25", "0.5", "0.75", "0.9")]),
        ("width_sweep", [[f"model.hidden=[{w},{w},{w}]"] for w in (128, 256, 512, 1024)]),
        (
            "input_bits_sweep",
            [[f"+input_bits={name}"] for name in ("threshold", "lloyd_max_2", "lloyd_max_4", "thermometer_3")],
        ),
        (
            "paper_table1",
            [[f"+network={n}", f"finetune.sparsity={s}"] for n in ("bnn", "bnn_bn") for s in ("0.0", "0.5", "0.75")],
        ),
    ],
)
def test_experiment_sweeps_expand_to_their_jobs(experiment, jobs):
    assert sweep_jobs(experiment) == jobs


@pytest.mark.parametrize(
    ("name", "method", "bits", "n_inputs_per_pixel"),
    [
        ("threshold", "threshold", None, 1),
        ("lloyd_max_2", "lloyd_max", 2, 2),
        ("lloyd_max_4", "lloyd_max", 4, 4),
        ("thermometer_3", "thermometer", None, 3),
    ],
)
def test_every_input_bits_job_composes_and_validates(name, method, bits, n_inputs_per_pixel):
    config = validate(hydra_config(["experiment=input_bits_sweep", f"+input_bits={name}"], with_hydra=False))
    assert config.data.binarize.method == method
    if bits is not None:
        assert config.data.binarize.bits == bits == n_inputs_per_pixel
    if method == "thermometer":
        assert config.data.binarize.planes == n_inputs_per_pixel


def test_dvc_composition_of_every_experiment_validates(tmp_path):
    """`dvc exp run -S experiment=<name>` composes without the hydra node: a sweep config is then one run."""
    import yaml

    (tmp_path / "conf").symlink_to(CONF)
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        compose_params(tmp_path, [f"experiment={path.stem}"])
        params = yaml.safe_load((tmp_path / "params.yaml").read_text())
        assert "hydra" not in params, path.stem
        validate(hydra_config([f"experiment={path.stem}"], with_hydra=False))


def test_cluster_launcher_settings_reach_the_sbatch_script(tmp_path, monkeypatch):
    """conf/hydra/launcher/cluster.yaml is submitit_slurm; its settings are valid sbatch options (checked by
    submitit itself, as hydra-submitit-launcher passes them, with a stand-in `srun` so no cluster is needed).
    Its setup line runs the job in the folder the sweep was started from, and fails the job, saying why,
    on a node where that folder is missing (where SLURM itself would quietly start the job in /tmp)."""
    import subprocess

    import submitit
    from hydra.utils import instantiate

    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)  # the sweep is started from the project
    launcher = instantiate(hydra_config(["hydra/launcher=cluster", "hydra.launcher.partition=cpu"]).hydra.launcher)
    monkeypatch.chdir(tmp_path)
    assert type(launcher).__name__ == "SlurmLauncher"
    fake_srun = tmp_path / "bin" / "srun"
    fake_srun.parent.mkdir()
    fake_srun.write_text("#!/bin/sh\nexit 1\n")
    fake_srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_srun.parent}{os.pathsep}{os.environ['PATH']}")

    # what SlurmLauncher.launch hands to submitit
    params = dict(launcher.params)
    for key in ("submitit_folder", "max_num_timeout"):
        params.pop(key)
    params["name"] = "pipeline"
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "submitit")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{key if key in base else f"slurm_{key}": value for key, value in params.items()})
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in (
        "#SBATCH --partition=cpu",
        f"#SBATCH --time={params['timeout_min']}",
        f"#SBATCH --cpus-per-task={params['cpus_per_task']}",
        f"#SBATCH --mem={params['mem_gb']}GB",
        *params["setup"],
    ):
        assert line in script.splitlines(), line

    setup = "\n".join(params["setup"])
    moved = subprocess.run(["bash", "-c", f"{setup}\npwd"], cwd="/", capture_output=True, text=True)
    assert (moved.returncode, moved.stdout.strip()) == (0, str(project))
    project.rmdir()  # a node that does not have the project
    missing = subprocess.run(["bash", "-c", f"{setup}\npwd"], cwd="/", capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stdout == ""
    assert f"error: {project} is missing on this node" in missing.stderr


# --- real sweeps on the smoke configuration ------------------------------------------------------------


def runs_of(project: Path) -> list[Run]:
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("bitwise-nn-smoke")  # conf/experiment/smoke.yaml
    return client.search_runs([experiment.experiment_id], max_results=1000)


def sweep_family(project: Path) -> tuple[Run, list[Run]]:
    """The only parent run in the project's store and its children, sorted by job number."""
    runs = runs_of(project)
    parents = [r for r in runs if r.data.tags.get("kind") == "parent"]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    for r in [parent, *children]:
        assert r.info.status == "FINISHED", r.info.run_name
        assert r.data.tags["pipeline_run"] == parent.data.tags["pipeline_run"]
    return parent, sorted(children, key=lambda r: float(r.data.params["finetune.sparsity"]))


def job_dirs(project: Path) -> list[Path]:
    (sweep,) = (project / "outputs" / "sweeps").iterdir()
    return sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def check_chain_sweep(project: Path, sparsities: list[float]) -> None:
    """One parent, one finished job run per value with the evaluation metrics; each job's outputs; the
    binarize and pretrain stages computed once and shared, finetune and evaluate once per job."""
    parent, children = sweep_family(project)
    assert len(runs_of(project)) == 1 + len(sparsities)
    assert parent.info.run_name.startswith("sweep outputs/sweeps/")
    assert [float(r.data.params["finetune.sparsity"]) for r in children] == sparsities
    for child in children:
        assert child.data.tags["kind"] == "stage" and child.data.tags["stage"] == "pipeline"
        assert child.info.run_name.startswith("pipeline experiment=smoke finetune.sparsity=")
        assert 0 < child.data.metrics["test/accuracy"] <= 1
        assert child.data.metrics["cost/binary_macs"] > 0

    jobs = job_dirs(project)
    assert len(jobs) == len(sparsities)
    for job, sparsity in zip(jobs, sparsities, strict=True):
        metrics = json.loads((job / "reports" / "metrics.json").read_text())
        assert metrics["bnn"]["sparsity"] == sparsity
        assert (job / "models" / "bnn.npz").is_file()

    cache = project / "outputs" / "stage_cache"
    counts = {stage: len(list(cache.glob(f"{stage}-*"))) for stage in ("binarize", "pretrain", "finetune", "evaluate")}
    assert counts == {"binarize": 1, "pretrain": 1, "finetune": len(sparsities), "evaluate": len(sparsities)}
    assert not list(cache.glob("baselines-*"))  # only with chain.baselines=true (experiment=paper_table1)
    for shared in ("data/features.npz", "models/pretrained.pt"):
        assert len({(job / shared).resolve() for job in jobs}) == 1, shared
    assert len({(job / "models" / "finetuned.pt").resolve() for job in jobs}) == len(sparsities)


@pytest.mark.slow
def test_joblib_sweep_of_the_chain_shares_binarize_and_pretrain(project_copy):
    result = run(
        [
            "python",
            "-m",
            "pipeline.run",
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            *SMOKE,
            "finetune.sparsity=0.0,0.5",
        ],
        project_copy,
    )
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    check_chain_sweep(project_copy, [0.0, 0.5])
    # Whichever job came second waited for the first one's binarize and pretrain and reused them.
    assert result.stdout.count("binarize: reusing") == 1
    assert result.stdout.count("pretrain: reusing") == 1
    assert "finetune: reusing" not in result.stdout
    # each job ends with the `make repro` summary: accuracies with their intervals, cost, report
    assert result.stdout.count("bitwise network:") == 2 and result.stdout.count("cost per example: ") == 2


@pytest.mark.slow
def test_submitit_local_sweep_of_the_chain(project_copy):
    """Jobs in subprocesses started by submitit (the code path of the SLURM launcher, conf/hydra/launcher/
    cluster.yaml) find the sweep's parent run through the inherited $BNN_PIPELINE_RUN."""
    result = run(
        ["python", "-m", "pipeline.run", "-m", "hydra/launcher=submitit_local", *SMOKE, "finetune.sparsity=0.0,0.25"],
        project_copy,
    )
    assert "Submitit 'local' sweep output dir" in result.stdout + result.stderr
    check_chain_sweep(project_copy, [0.0, 0.25])


@pytest.mark.slow
def test_stage_sweep_reuses_the_project_outputs_and_keeps_them(project_copy):
    """`python -m pipeline.finetune -m ...` after the earlier stages ran by hand: each job reads the
    project's features and round-1 model and writes its own finetuned model into its job folder."""
    for stage in ("binarize", "pretrain", "finetune"):
        run(["python", "-m", f"pipeline.{stage}", *SMOKE, "finetune.sparsity=0.25"], project_copy)
    project_model = project_copy / "models" / "finetuned.pt"
    before = project_model.stat()

    run(["python", "-m", "pipeline.finetune", "-m", *SMOKE, "finetune.sparsity=0.0,0.5"], project_copy)

    after = project_model.stat()
    assert not project_model.is_symlink()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert torch.load(project_model, weights_only=True)["architecture"]["sparsity"] == 0.25

    jobs = job_dirs(project_copy)
    assert len(jobs) == 2
    for job, sparsity in zip(jobs, [0.0, 0.5], strict=True):
        for shared in ("data/features.npz", "models/pretrained.pt"):
            assert (job / shared).is_symlink() and (job / shared).resolve() == (project_copy / shared).resolve()
        model = job / "models" / "finetuned.pt"
        assert model.is_file() and not model.is_symlink()
        assert torch.load(model, weights_only=True)["architecture"]["sparsity"] == sparsity
        assert (job / "reports" / "finetune_history.csv").is_file()

    parent, children = sweep_family(project_copy)
    assert [r.data.tags["stage"] for r in children] == ["finetune", "finetune"]
    assert [float(r.data.params["finetune.sparsity"]) for r in children] == [0.0, 0.5]
    assert all("finetune/best_val_accuracy" in r.data.metrics for r in children)
    sweep_ids = {parent.info.run_id, *(r.info.run_id for r in children)}
    by_hand = [r for r in runs_of(project_copy) if r.info.run_id not in sweep_ids]
    assert sorted(r.data.tags["stage"] for r in by_hand) == ["binarize", "finetune", "pretrain"]
    assert all("mlflow.parentRunId" not in r.data.tags for r in by_hand)
