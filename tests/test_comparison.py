"""The paper's comparison table: rows from a sweep's job folders, the files written, refusals, and one real
(tiny) ``experiment=paper_table1`` sweep whose rows reach MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from bnn_core.errors import BnnError
from bnn_core.stats import wilson_interval
from pipeline.comparison import comparison_rows, table1_rows, write_table1
from tests.conftest import ROOT, run

pytestmark = pytest.mark.heavy  # make test starts this file early (tests/conftest.py)

REAL_MACS, REAL_BITS = 1000, 32_000
PIXEL_MACS = 600  # the network on pixels has fewer inputs than the ones on (Lloyd-Max) bit-planes
#: (network, input, sparsity) of the rows of a table swept over sparsities 0.0 and 0.5, in order.
TABLE_OF_TWO_SPARSITIES = [
    ("real", "real", 0.0),
    ("real", "binary", 0.0),
    ("compressed", "binary", 0.0),
    ("bnn", "binary", 0.0),
    ("bnn", "binary", 0.5),
]


def row_keys(rows: list[dict]) -> list[tuple[str, str, float]]:
    return [(r["network"], r["input"], r["sparsity"]) for r in rows]


def job_config(overrides: list[str]):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def fake_job(folder: Path, sparsity: float, bnn_accuracy: float, overrides: list[str] = ()) -> Path:
    """A job folder as a paper_table1 sweep leaves it: composed config, metrics and baselines."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(
        OmegaConf.to_yaml(job_config([f"finetune.sparsity={sparsity}", *overrides]))
    )
    binary_macs = int(REAL_MACS * (1 - sparsity))
    metrics = {
        "compressed": {"test_accuracy": 0.91, "macs_per_example": REAL_MACS, "weight_bits": REAL_BITS},
        "bnn": {
            "test_accuracy": bnn_accuracy,
            "binary_macs_per_example": binary_macs,
            "weight_bits": 2 * binary_macs,
            "sparsity": sparsity,
            "network": "bnn_bn" if "model.norm=batchnorm" in overrides else "bnn",
        },
        "n_test": 500,
    }
    baselines = {
        "real_input": {"test_accuracy": 0.95, "macs_per_example": PIXEL_MACS, "weight_bits": 32 * PIXEL_MACS},
        "binary_input": {"test_accuracy": 0.93, "macs_per_example": REAL_MACS, "weight_bits": REAL_BITS},
    }
    (folder / "reports").mkdir()
    (folder / "reports" / "metrics.json").write_text(json.dumps(metrics))
    (folder / "reports" / "baselines.json").write_text(json.dumps(baselines))
    return folder


def test_rows_follow_the_papers_table_with_a_sparsity_column(tmp_path):
    # Job folders in sweep order need not be in sparsity order: rows are sorted by sparsity.
    jobs = [fake_job(tmp_path / "0", 0.5, 0.90), fake_job(tmp_path / "1", 0.0, 0.92)]
    rows, configs, n_test = table1_rows(jobs)
    config = configs[0]

    assert row_keys(rows) == TABLE_OF_TWO_SPARSITIES
    assert [r["encoding"] for r in rows] == ["pixels", "threshold", "threshold", "threshold", "threshold"]
    assert [r["test_accuracy"] for r in rows] == [0.95, 0.93, 0.91, 0.92, 0.90]
    assert all(r["test_error"] == pytest.approx(1 - r["test_accuracy"]) for r in rows)
    # every accuracy carries its Wilson 95% interval on the 500 test examples
    assert all(r["n_test"] == 500 for r in rows)
    assert rows[3]["test_accuracy_ci95"] == pytest.approx(wilson_interval(460, 500))
    assert all(r["test_accuracy_ci95"][0] < r["test_accuracy"] < r["test_accuracy_ci95"][1] for r in rows)
    for real, macs in zip(rows[:3], (PIXEL_MACS, REAL_MACS, REAL_MACS), strict=True):  # 32 x 32 bit-ops / MAC
        cost = (real["macs"], real["mac_bits"], real["bit_ops"], real["weight_bits"])
        assert cost == (macs, 32, macs * 1024, 32 * macs)
    for bnn, sparsity in zip(rows[3:], (0.0, 0.5), strict=True):  # one bit-op per nonzero weight and bias
        macs = int(REAL_MACS * (1 - sparsity))
        assert (bnn["macs"], bnn["mac_bits"], bnn["bit_ops"], bnn["weight_bits"]) == (macs, 1, macs, 2 * macs)
    assert config.data.source == "mnist5k"
    assert n_test == 500


def test_the_integer_threshold_network_adds_its_own_rows_after_the_papers(tmp_path):
    bn = ["model.norm=batchnorm", "finetune.init=random", "finetune.grad=ste"]
    jobs = [
        fake_job(tmp_path / "0", 0.0, 0.90),
        fake_job(tmp_path / "1", 0.5, 0.93, bn),
        fake_job(tmp_path / "2", 0.0, 0.94, bn),
    ]
    rows, configs, _ = table1_rows(jobs)
    assert row_keys(rows) == [
        ("real", "real", 0.0),
        ("real", "binary", 0.0),
        ("compressed", "binary", 0.0),
        ("bnn", "binary", 0.0),
        ("real_bn", "real", 0.0),
        ("real_bn", "binary", 0.0),
        ("compressed_bn", "binary", 0.0),
        ("bnn_bn", "binary", 0.0),
        ("bnn_bn", "binary", 0.5),
    ]
    assert [c.model.network for c in configs] == ["bnn", "bnn_bn"]
    folder, _ = write_table1(tmp_path / "project", jobs, 60.0, "python -m pipeline.run experiment=paper_table1")
    table = (folder / "table1.md").read_text()
    assert "`bnn_bn` at sparsity 0.00: 94.00%" in table and "`bnn` at sparsity 0.00: 90.00%" in table


def test_networks_of_one_table_must_share_the_data(tmp_path):
    jobs = [fake_job(tmp_path / "0", 0.0, 0.9), fake_job(tmp_path / "1", 0.0, 0.9, ["model.norm=batchnorm", "seed=3"])]
    with pytest.raises(BnnError, match="data, seed or augmentation"):
        table1_rows(jobs)


def test_lloyd_max_inputs_are_named_by_their_bits(tmp_path):
    jobs = [fake_job(tmp_path / "0", 0.0, 0.9, ["data.binarize.method=lloyd_max", "data.binarize.bits=2"])]
    rows, _, _ = table1_rows(jobs)
    assert [r["encoding"] for r in rows] == ["pixels", "lloyd_max_2", "lloyd_max_2", "lloyd_max_2"]


def test_table_files_land_under_reports_of_the_data_source(tmp_path):
    jobs = [fake_job(tmp_path / "sweep" / "0", 0.0, 0.92), fake_job(tmp_path / "sweep" / "1", 0.75, 0.88)]
    folder, rows = write_table1(tmp_path / "project", jobs, 125.0, "python -m pipeline.run experiment=paper_table1")

    assert folder == tmp_path / "project" / "reports" / "mnist5k"
    assert json.loads((folder / "table1.json").read_text()) == rows
    markdown = (folder / "table1.md").read_text()
    assert "`python -m pipeline.run experiment=paper_table1`: 2.1 min wall time" in markdown
    assert "| test error | test accuracy (95% CI) |" in markdown
    assert "| bnn | binary (threshold) | 0.75 | 12.00% | 88.00% (84.9-90.6) | 250 x 1-bit | 250 | 500 |" in markdown
    assert "| real | real (pixels) | - | 5.00% | 95.00% (92.7-96.6) | 600 x 32-bit | 614,400 | 19,200 |" in markdown
    assert "`bnn` at sparsity 0.00: 92.00% (89.3-94.1) test accuracy" in markdown
    behind = "1.00 points behind the real-valued network on the same binary inputs (`real`, 93.00% (90.4-94.9))"
    assert behind in markdown


def test_a_network_scored_on_its_own_number_of_examples_gets_its_own_interval():
    # baselines.json rows and metrics.json networks may carry n_test; without it, the chain's n_test
    metrics = {
        "compressed": {"test_accuracy": 0.9, "macs_per_example": 10, "weight_bits": 320, "n_test": 1000},
        "bnn": {"test_accuracy": 0.9, "binary_macs_per_example": 10, "weight_bits": 10, "sparsity": 0.0},
        "n_test": 500,
    }
    baselines = {
        "real_input": {"test_accuracy": 0.9, "macs_per_example": 10, "weight_bits": 320, "n_test": 100},
        "binary_input": {"test_accuracy": 0.9, "macs_per_example": 10, "weight_bits": 320},
    }
    rows = comparison_rows(metrics, baselines, "threshold")
    assert [r["n_test"] for r in rows] == [100, 500, 1000, 500]
    for row in rows:
        assert row["test_accuracy_ci95"] == pytest.approx(wilson_interval(round(0.9 * row["n_test"]), row["n_test"]))


@pytest.mark.parametrize(
    ("second_job", "message"),
    [
        (lambda d: fake_job(d, 0.5, 0.9, ["seed=1"]), "data, seed or augmentation differ from job 0"),
        (lambda d: fake_job(d, 0.5, 0.9, ["finetune.lr=0.01"]), "differs from job 0 in more than finetune.sparsity"),
        (lambda d: fake_job(d, 0.0, 0.9), "finetune.sparsity values repeat across jobs"),
        (lambda d: d.mkdir(), "no .hydra/config.yaml"),
    ],
)
def test_jobs_that_are_not_one_table_are_refused_and_nothing_is_written(tmp_path, second_job, message):
    jobs = [fake_job(tmp_path / "sweep" / "0", 0.0, 0.9)]
    jobs.append(tmp_path / "sweep" / "1")
    second_job(jobs[1])
    with pytest.raises(BnnError, match=message):
        write_table1(tmp_path / "project", jobs, None, "cmd")
    assert not (tmp_path / "project").exists()


def test_a_job_without_baselines_is_refused(tmp_path):
    job = fake_job(tmp_path / "0", 0.0, 0.9)
    (job / "reports" / "baselines.json").unlink()
    with pytest.raises(BnnError, match=r"baselines.json: not found; the sweep's jobs need chain.baselines=true"):
        table1_rows([job])


@pytest.mark.slow
def test_paper_table1_sweep_writes_the_table_and_logs_every_row(project_copy):
    result = run(
        [
            "python",
            "-m",
            "pipeline.run",
            "experiment=paper_table1",
            "+network=bnn",  # one network: the table over sparsities (bnn_bn's rows: the fast tests above)
            "model.hidden=[32,32]",
            "pretrain.epochs=1",
            "finetune.epochs=1",
            "trainer.progress_bar=false",
            "finetune.sparsity=0.0,0.5",
        ],
        project_copy,
    )
    table = json.loads((project_copy / "reports" / "mnist5k" / "table1.json").read_text())
    assert row_keys(table) == TABLE_OF_TWO_SPARSITIES
    assert all(0 < r["test_accuracy"] <= 1 for r in table)
    assert table[4]["macs"] < table[3]["macs"]  # half the weights are zero
    assert "paper_table1: 5 rows" in result.stdout
    assert (
        "(stages reused from the stage cache are not re-run)"
        in (project_copy / "reports" / "mnist5k" / "table1.md").read_text()
    )

    # Binarize, pretrain and the baselines ran once; round 2 and evaluation once per sparsity.
    cache = project_copy / "outputs" / "stage_cache"
    counts = {s: len(list(cache.glob(f"{s}-*"))) for s in ("binarize", "pretrain", "baselines", "finetune", "evaluate")}
    assert counts == {"binarize": 1, "pretrain": 1, "baselines": 1, "finetune": 2, "evaluate": 2}

    client = MlflowClient(f"sqlite:///{project_copy / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("bitwise-nn")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "parent"]
    rows = [r for r in runs if r.data.tags.get("kind") == "table1_row"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in rows)
    logged = sorted(
        (r.data.params["network"], r.data.params["input"], float(r.data.params["sparsity"]), r.data.metrics)
        for r in rows
    )
    assert [row[:3] for row in logged] == sorted(row_keys(table))
    for network, input_kind, sparsity, metrics in logged:
        (expected,) = [r for r in table if (r["network"], r["input"], r["sparsity"]) == (network, input_kind, sparsity)]
        assert metrics["table1/test_accuracy"] == expected["test_accuracy"]
        assert metrics["table1/bit_ops"] == expected["bit_ops"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "table1")}
    assert artifacts == {"table1/table1.json", "table1/table1.md"}


def test_the_repro_summary_gives_each_accuracy_its_interval(tmp_path):
    from pipeline.summary import summary

    metrics = {
        "bnn": {"test_accuracy": 0.952, "sparsity": 0.0, "binary_macs_per_example": 10, "model_file_bytes": 99},
        "compressed": {"test_accuracy": 0.946, "macs_per_example": 10},
        "ratios": {"weight_bits": 32.0},
        "n_test": 500,
    }
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "metrics.json").write_text(json.dumps(metrics))
    text = summary(tmp_path)
    assert "network: 94.60% (92.3-96.3) test accuracy" in text
    assert "bitwise network:                      95.20% (93.0-96.8) test accuracy" in text
    assert "Wilson 95% interval on 500 test examples" in text
