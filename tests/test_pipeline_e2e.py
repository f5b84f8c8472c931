"""The real stages, chained by DVC, on a tiny configuration in a temporary copy of the project."""

import json
import re

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import compose_params, run

pytestmark = [pytest.mark.slow, pytest.mark.heavy]
SMOKE = ["experiment=smoke"]
ALL_STAGES = ["binarize", "pretrain", "finetune", "evaluate", "baselines", "report"]
# and DVC's stand-alone commands (pipeline.stages.COMMANDS), which log no MLflow run
DVC_STAGES = [*ALL_STAGES, "export"]


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def test_dvc_repro_then_experiment_reruns_only_what_changed(project_copy):
    compose_params(project_copy, SMOKE)
    first = run(["dvc", "repro"], project_copy)
    assert sorted(stages_run(first.stdout)) == sorted(DVC_STAGES)
    assert (project_copy / "dist" / "c" / "bnn_model.h").is_file()

    metrics = json.loads((project_copy / "reports" / "metrics.json").read_text())
    assert "speed" not in metrics  # wall-clock figures are noise to `dvc metrics diff`: MLflow only
    for key in ("test_accuracy", "binary_macs_per_example", "weight_bits"):
        assert metrics["bnn"][key] > 0
    for key in ("test_accuracy", "macs_per_example", "weight_bits"):
        assert metrics["compressed"][key] > 0
    # Smoke net 784-64-64-10 without zeros: one binary MAC per weight and bias, 1 bit each.
    assert metrics["bnn"]["binary_macs_per_example"] == 64 * 785 + 64 * 65 + 10 * 65
    assert metrics["compressed"]["weight_bits"] == 32 * metrics["bnn"]["weight_bits"]

    again = run(["dvc", "repro"], project_copy)
    assert stages_run(again.stdout) == []

    run(["git", "add", "-A"], project_copy)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"], project_copy)
    experiment = run(["dvc", "exp", "run", "-S", "experiment=smoke", "-S", "finetune.sparsity=0.5"], project_copy)
    assert sorted(stages_run(experiment.stdout)) == ["evaluate", "export", "finetune", "report"]
    report = (project_copy / "reports" / "report.md").read_text()
    assert "| bnn | binary (threshold) | 0.50 |" in report and "| real | real (pixels) |" in report
    for png in ("tradeoff.png", "training_curves.png"):
        assert (project_copy / "reports" / png).read_bytes().startswith(b"\x89PNG")
    sparse = json.loads((project_copy / "reports" / "metrics.json").read_text())
    assert sparse["bnn"]["sparsity"] == 0.5
    assert sparse["bnn"]["binary_macs_per_example"] < metrics["bnn"]["binary_macs_per_example"]

    client = MlflowClient(f"sqlite:///{project_copy / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("bitwise-nn-smoke").experiment_id  # conf/experiment/smoke.yaml
    runs = client.search_runs([experiment_id])
    parents = {r.info.run_id: r for r in runs if r.data.tags["kind"] == "parent"}
    stages = [r for r in runs if r.data.tags["kind"] == "stage"]
    children: dict[str, list[str]] = {}
    for r in stages:
        assert r.data.params["finetune.grad"] == "ste"
        parent = parents[r.data.tags["mlflow.parentRunId"]]
        assert parent.data.tags["pipeline_run"] == r.data.tags["pipeline_run"]
        children.setdefault(parent.info.run_id, []).append(r.data.tags["stage"])
    # One parent per DVC invocation, one child per stage it ran; a parent spans its children and carries
    # no stage's tags.
    assert len(parents) == 2
    for parent in parents.values():
        assert "stage" not in parent.data.tags and "pid" not in parent.data.tags
        own = [r for r in stages if r.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        assert parent.info.start_time <= min(r.info.start_time for r in own)
        assert parent.info.end_time >= max(r.info.end_time for r in own)
        assert parent.info.status == "FINISHED"
    assert sorted(map(sorted, children.values())) == [
        sorted(ALL_STAGES),
        ["evaluate", "finetune", "report"],
    ]
    assert all(r.data.tags["git_commit"] != "unknown" for r in stages)
    evaluate_run = next(
        r for r in runs if r.data.tags["stage"] == "evaluate" and r.data.params["finetune.sparsity"] == "0.5"
    )
    assert evaluate_run.data.metrics["speed/speedup_vs_float"] > 0

    # Shared data and models: a DVC remote round trip (here a local folder; S3 / SSH differ only in the URL).
    remote, clone = project_copy.parent / "remote", project_copy.parent / "clone"
    run(["dvc", "remote", "add", "--default", "shared", str(remote)], project_copy)
    run(["git", "add", "-A"], project_copy)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "sparse, shared"], project_copy)
    run(["dvc", "push"], project_copy)
    run(["git", "clone", "-q", str(project_copy), str(clone)], project_copy)
    run(["dvc", "pull"], clone)
    cached = ["data/features.npz", "data/input_encoder.json", "models/pretrained.pt", "models/finetuned.pt"]
    for path in [*cached, "models/bnn.npz", "dist/c/bnn_model.h", "dist/c/bnn_model.c"]:
        assert (clone / path).read_bytes() == (project_copy / path).read_bytes(), path
    assert "up to date" in run(["dvc", "status"], clone).stdout


def test_stage_rejects_bad_config_before_any_work(project_copy):
    result = run(["python", "-m", "pipeline.binarize", "finetune.sparsity=1.5"], project_copy, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: binarize: finetune.sparsity: must be in [0, 1), got 1.5"
    assert "Traceback" not in result.stderr
    assert not (project_copy / "data").exists()


def test_stage_by_hand_with_a_hydra_override(project_copy):
    for stage in ("binarize", "pretrain", "finetune", "evaluate"):
        run(["python", "-m", f"pipeline.{stage}", *SMOKE, "finetune.sparsity=0.25", "finetune.grad=ste"], project_copy)
    metrics = json.loads((project_copy / "reports" / "metrics.json").read_text())
    assert metrics["bnn"]["sparsity"] == 0.25
