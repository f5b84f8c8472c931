"""experiment=pareto_search: the non-dominated set, the search space the Optuna sweeper sees, the sweep-end
writer on fake job folders, and (slow) a real 2-trial search in a project copy."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bnn_core.errors import BnnError
from pipeline.artifacts import Artifacts, save_checkpoint
from pipeline.pareto import dominates, pareto_front, searched_keys, write_pareto
from tests.conftest import ROOT, run

pytestmark = pytest.mark.heavy  # make test starts this file early (tests/conftest.py)

CONF = ROOT / "conf"


# --- the non-dominated set ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("points", "front"),
    [
        ([], []),
        ([(0.5, 10)], [0]),
        # a staircase: every point trades accuracy for cost, nothing is dominated
        ([(0.9, 300), (0.8, 200), (0.7, 100)], [0, 1, 2]),
        # (0.8, 250) is beaten by (0.9, 200) on both; (0.6, 300) by everything
        ([(0.9, 200), (0.8, 250), (0.7, 100), (0.6, 300)], [0, 2]),
        # equal accuracy: the cheaper wins; equal cost: the more accurate wins
        ([(0.8, 100), (0.8, 120), (0.7, 100)], [0]),
        # exact duplicates on the front do not knock each other out (as in Optuna's best_trials)
        ([(0.9, 100), (0.9, 100), (0.95, 500)], [0, 1, 2]),
        # a duplicate of a dominated point stays dominated
        ([(0.9, 100), (0.8, 200), (0.8, 200)], [0]),
    ],
)
def test_pareto_front_by_hand(points, front):
    assert pareto_front(points) == front


def test_dominance_is_strict():
    assert dominates((0.9, 100), (0.8, 100)) and dominates((0.9, 100), (0.9, 120))
    assert not dominates((0.9, 100), (0.9, 100))
    assert not dominates((0.9, 200), (0.8, 100))


def test_pareto_front_matches_a_brute_force_definition():
    """On random clouds (with ties): a point is on the front iff no other point is at least as good in
    both objectives and strictly better in one; and the front, sorted by cost, rises in accuracy."""
    rng = random.Random(0)
    for _ in range(200):
        points = [(rng.choice([0.5, 0.6, 0.7, 0.8]), rng.choice([1, 2, 3, 4])) for _ in range(rng.randint(1, 12))]
        front = pareto_front(points)
        for i, (acc, cost) in enumerate(points):
            beaten = any(a >= acc and c <= cost and (a, c) != (acc, cost) for a, c in points)
            assert (i in front) == (not beaten)
        staircase = sorted({points[i] for i in front}, key=lambda p: p[1])
        assert all(a[0] < b[0] and a[1] < b[1] for a, b in itertools.pairwise(staircase))


# --- the experiment config ------------------------------------------------------------------------------


def test_experiment_configures_a_seeded_multi_objective_optuna_search():
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.distributions import (
        CategoricalDistribution,
        IntUniformDistribution,
        LogUniformDistribution,
        UniformDistribution,
    )

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=pareto_search"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.sampler._target_ == "optuna.samplers.NSGAIISampler" and sweeper.sampler.seed == 0
    assert list(sweeper.direction) == ["maximize", "minimize"]
    assert cfg.hydra.callbacks.pareto._target_ == "pipeline.pareto.ParetoWriter"
    assert "sweep_tracking" in cfg.hydra.callbacks  # every trial stays a child run of the sweep's parent

    params = [f"{key}={value}" for key, value in sweeper.params.items()]
    space, fixed = create_params_from_overrides(params)
    assert fixed == {}
    assert isinstance(space["model.hidden"], CategoricalDistribution)
    # list choices reach the jobs as list overrides that compose to lists
    widths = space["model.hidden"].choices
    assert widths == ("[256,256,256]", "[512,512,512]", "[1024,1024,1024]")
    assert isinstance(space["finetune.sparsity"], UniformDistribution) and space["finetune.sparsity"].high < 1
    assert space["data.binarize.method"].choices == ("threshold", "lloyd_max", "thermometer")
    assert isinstance(space["finetune.lr"], LogUniformDistribution)
    for key in ("pretrain.epochs", "finetune.epochs"):
        assert isinstance(space[key], IntUniformDistribution), key
    assert searched_keys(params) == list(sweeper.params)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        job = compose("config", overrides=["experiment=pareto_search", f"model.hidden={widths[0]}"])
    assert list(job.model.hidden) == [256, 256, 256]


# --- the sweep-end writer on fake job folders -----------------------------------------------------------


def fake_job(sweep: Path, number: int, overrides: list[str], val_accuracy: float, bit_ops: int | None) -> Path:
    """A job folder as pipeline.run leaves it: .hydra/ and, if it finished (``bit_ops`` given), the
    finetuned checkpoint and metrics.json."""
    job = sweep / str(number)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml({"data": {"source": "mnist5k"}}))
    if bit_ops is not None:
        artifacts = Artifacts(job)
        save_checkpoint(artifacts.finetuned, {"val_accuracy": val_accuracy, "best_epoch": 0})
        artifacts.metrics.parent.mkdir(parents=True)
        artifacts.metrics.write_text(json.dumps({"bnn": {"binary_macs_per_example": bit_ops, "test_accuracy": 0.0}}))
    return job


def test_writer_reads_the_trials_back_and_marks_the_front(tmp_path):
    sweep = tmp_path / "outputs" / "sweeps" / "s"
    keys = searched_keys(["model.hidden=choice([16],[32])", "finetune.sparsity=interval(0,0.9)", "seed=0"])
    assert keys == ["model.hidden", "finetune.sparsity"]
    jobs = [
        fake_job(sweep, 0, ["experiment=pareto_search", "model.hidden=[32]", "finetune.sparsity=0.1"], 0.90, 2000),
        fake_job(sweep, 1, ["experiment=pareto_search", "model.hidden=[16]", "finetune.sparsity=0.5"], 0.80, 600),
        fake_job(sweep, 2, ["experiment=pareto_search", "model.hidden=[32]", "finetune.sparsity=0.2"], 0.85, 2100),
        fake_job(sweep, 3, ["experiment=pareto_search", "model.hidden=[16]", "finetune.sparsity=0.9"], 0.0, None),
    ]
    json_path, png_path, summary = write_pareto(tmp_path, jobs, keys, "python -m pipeline.run experiment=pareto_search")

    assert json_path == tmp_path / "reports" / "mnist5k" / "pareto.json"
    assert png_path.read_bytes().startswith(b"\x89PNG")
    written = json.loads(json_path.read_text())
    assert written == summary
    assert written["objectives"] == {"val_accuracy": "maximize", "bit_ops": "minimize"}
    assert written["n_trials"] == 3 and written["unfinished_trials"] == [3]
    assert written["front"] == [1, 0]  # by increasing bit-ops
    trials = {t["trial"]: t for t in written["trials"]}
    assert [trials[n]["on_front"] for n in (0, 1, 2)] == [True, True, False]
    assert trials[1]["params"] == {"model.hidden": [16], "finetune.sparsity": 0.5}
    assert (trials[1]["val_accuracy"], trials[1]["bit_ops"]) == (0.80, 600)


def test_writer_refuses_a_sweep_with_no_finished_trial(tmp_path):
    job = fake_job(tmp_path / "s", 0, ["finetune.sparsity=0.5"], 0.0, None)
    with pytest.raises(BnnError, match="no finished trial"):
        write_pareto(tmp_path, [job], ["finetune.sparsity"], "")


# --- a real search --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_trial_search_writes_the_front_and_nests_every_trial(project_copy):
    """Two trials of a tiny network through the Optuna sweeper: pareto.json lists both with the
    validation accuracy and bit-ops their jobs returned (the same as Optuna's own summary), and every
    trial is a finished child run of the sweep's parent run, which holds pareto.json and pareto.png."""
    from mlflow.tracking import MlflowClient

    result = run(
        [
            "python",
            "-m",
            "pipeline.run",
            "experiment=pareto_search",
            "hydra.sweeper.n_trials=2",
            "model.hidden=[16]",
            "data.binarize.method=threshold",
            "pretrain.epochs=1",
            "finetune.epochs=1",
        ],
        project_copy,
    )
    assert "Sampler: NSGAIISampler" in result.stdout + result.stderr
    summary = json.loads((project_copy / "reports" / "mnist5k" / "pareto.json").read_text())
    assert summary["n_trials"] == 2 and [t["trial"] for t in summary["trials"]] == [0, 1]
    assert summary["front"] and set(summary["front"]) <= {0, 1}
    assert (project_copy / "reports" / "mnist5k" / "pareto.png").is_file()

    (sweep,) = (project_copy / "outputs" / "sweeps").iterdir()
    optuna_front = OmegaConf.load(sweep / "optimization_results.yaml").solutions
    ours = [t for t in summary["trials"] if t["on_front"]]
    assert sorted((t["val_accuracy"], t["bit_ops"]) for t in ours) == sorted(tuple(s["values"]) for s in optuna_front)
    for trial in summary["trials"]:
        job = sweep / str(trial["trial"])
        # the objective is the validation accuracy of the finetuned network, never the test split
        assert 0 < trial["val_accuracy"] <= 1
        metrics = json.loads((job / "reports" / "metrics.json").read_text())
        assert trial["bit_ops"] == metrics["bnn"]["binary_macs_per_example"]
        assert trial["params"]["model.hidden"] == [16] and 0 <= trial["params"]["finetune.sparsity"] <= 0.9

    client = MlflowClient(f"sqlite:///{project_copy / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("bitwise-nn")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert sorted(r.data.metrics["finetune/best_val_accuracy"] for r in children) == sorted(
        t["val_accuracy"] for t in summary["trials"]
    )
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "pareto")}
    assert logged == {"pareto/pareto.json", "pareto/pareto.png"}
    assert parent.data.metrics["pareto/n_trials"] == 2
