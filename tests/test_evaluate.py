"""In-process stages on a tiny configuration: training learns, and evaluate's three-engine check fires.

The evaluate stage finishes only when the numpy packed engine and the exported model file (fast kernel,
raw pixels) give the torch simulation's integer scores on every test example. That agreement is not a
metric to assert on (it holds by construction); what needs testing is that the check refuses a model
when one engine is made to disagree, and leaves no output behind.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from bnn_core.bitwise_model import BitwiseModel
from bnn_core.errors import BnnError
from bnn_core.model_file import load_bitwise_model
from bnn_core.packed import PackedNetwork
from pipeline.artifacts import Artifacts
from pipeline.config import Config, validate
from pipeline.stage import StageContext, make_tracker, run_stage
from tests.test_config import composed

N_CLASSES = 10


def run_in_process(name: str, config: Config, root: Path) -> None:
    module = importlib.import_module(f"pipeline.{name}")
    with make_tracker(name, config) as tracker:
        run_stage(module.run, StageContext(name, config, Artifacts(root), tracker))


def tiny_config(root: Path, *overrides: str) -> Config:
    """The smoke network (784-64-64-10), 2 epochs a round, on the mnist5k digits; MLflow in ``root``."""
    return validate(
        composed(
            [
                "experiment=smoke",
                "pretrain.epochs=2",
                "finetune.epochs=2",
                f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
                *overrides,
            ]
        )
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Path]:
    root = tmp_path_factory.mktemp("chain")
    config = tiny_config(root)
    for name in ("binarize", "pretrain", "finetune"):
        run_in_process(name, config, root)
    return config, root


def test_round_two_learns_far_above_chance(trained):
    config, root = trained
    run_in_process("evaluate", config, root)
    metrics = json.loads(Artifacts(root).metrics.read_text())
    # 10 balanced classes: chance is 0.10. Two short rounds of the smoke network reach ~0.85 here.
    assert metrics["bnn"]["test_accuracy"] > 0.6
    assert metrics["compressed"]["test_accuracy"] > 0.6
    history = Artifacts(root).finetune_history.read_text().splitlines()
    assert len(history) == 1 + config.finetune.epochs


def off_by_one_on_the_first_example(forward_counts):
    def disagreeing(self, *args, **kwargs):
        counts = np.array(forward_counts(self, *args, **kwargs))
        counts[0, 0] += 1
        return counts

    return disagreeing


@pytest.mark.parametrize(
    ("engine", "method", "message"),
    [
        (PackedNetwork, "forward_counts", "the numpy packed engine and the torch simulation disagree on 1 of"),
        (BitwiseModel, "forward_counts", "the exported model file (fast kernel, raw pixels) and the torch simulation"),
    ],
    ids=["numpy-packed", "exported-file"],
)
def test_evaluate_refuses_and_writes_nothing_when_an_engine_disagrees(
    trained, tmp_path, monkeypatch, engine, method, message
):
    config, root = trained
    work = Artifacts(tmp_path)
    for name in ("features", "input_encoder", "pretrained", "finetuned"):
        work.path(name).parent.mkdir(parents=True, exist_ok=True)
        work.path(name).symlink_to(Artifacts(root).path(name))
    monkeypatch.setattr(engine, method, off_by_one_on_the_first_example(getattr(engine, method)))

    with pytest.raises(BnnError, match="disagree on 1 of") as refused:
        run_in_process("evaluate", config, tmp_path)

    assert message in str(refused.value)
    for name in ("bnn_model", "metrics", "cost_table"):
        assert not work.path(name).exists(), name
    assert not list(work.bnn_model.parent.glob(".bnn.npz.*")), "a staged model file was left behind"


def test_the_integer_threshold_network_learns_and_its_export_is_exact(tmp_path):
    """bnn_bn through the real stages (its recipe: conf/network/bnn_bn.yaml): far above chance, and
    evaluate's three-engine check passes on its folded integer thresholds."""
    config = tiny_config(tmp_path, "+network=bnn_bn")
    assert config.model.network == "bnn_bn"
    for name in ("binarize", "pretrain", "finetune", "evaluate"):
        run_in_process(name, config, tmp_path)
    metrics = json.loads(Artifacts(tmp_path).metrics.read_text())
    assert metrics["bnn"]["network"] == "bnn_bn"
    assert metrics["bnn"]["test_accuracy"] > 0.6  # chance 0.10; two short rounds reach ~0.8 here
    model = load_bitwise_model(Artifacts(tmp_path).bnn_model)
    hidden_constants = model.network.layers[0].bias
    assert not np.isin(hidden_constants, (-1, 1)).all()  # real thresholds, not binary biases


def test_the_evaluation_names_its_cost_so_that_every_number_reads_right(tmp_path, monkeypatch):
    """A dense network does as many binary MACs as its twin does 32-bit MACs: their ratio (1.00) once sat
    beside "1024x fewer bit-ops". The run logs bit-ops, and the ratio of those."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.evaluate import log_evaluation
    from pipeline.tracking import StageTracker

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BNN_PIPELINE_RUN", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("e", artifact_location=(tmp_path / "mlruns").as_uri())
    metrics = {
        "compressed": {"test_accuracy": 0.96, "macs_per_example": 1000, "weight_bits": 32_000},
        "bnn": {
            "test_accuracy": 0.95,
            "binary_macs_per_example": 1000,
            "weight_bits": 1000,
            "model_file_bytes": 9,
            "sparsity": 0.0,
            "network": "bnn",
        },
        "ratios": {"weight_bits": 32.0},
        "n_test": 500,
        "test_split": "0123456789abcdef",
    }
    previous = mlflow.get_tracking_uri()
    try:
        with StageTracker(uri, "e", "evaluate") as tracker:
            log_evaluation(tracker, metrics, tiny_config(tmp_path))
    finally:
        mlflow.set_tracking_uri(previous)
    run = MlflowClient(uri).get_run(tracker.run_id)
    logged = run.data.metrics
    assert logged["cost/bit_ops"] == 1000 and logged["cost/real_bit_ops"] == 1_024_000
    assert logged["cost/bit_ops_ratio_real_to_bitwise"] == 1024
    assert "cost/macs_ratio" not in logged
    assert run.data.tags["test_split"] == "0123456789abcdef"
    assert run.data.tags["description"] == "mnist5k 2x64 s0.00 bnn"
