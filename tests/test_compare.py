"""`make compare`: DVC's experiments in one table that fits 120 columns, accuracy first."""

from __future__ import annotations

from pipeline.compare import COLUMNS, WIDTH, render


def revision(rev: str, accuracy: float, sparsity: float, name: str | None = None) -> dict:
    params = {
        "data": {"source": "fashion_mnist", "binarize": {"method": "thermometer"}},
        "model": {"hidden": [1024, 1024, 1024]},
        "finetune": {"sparsity": sparsity},
    }
    metrics = {
        "bnn": {"test_accuracy": accuracy, "binary_macs_per_example": 3_200_000, "sparsity": sparsity},
        "compressed": {"test_accuracy": 0.9},
        "n_test": 10000,
    }
    return {
        "rev": rev,
        "name": name,
        "data": {
            "rev": rev,
            "params": {"params.yaml": {"data": params}},
            "metrics": {"reports/metrics.json": {"data": metrics}},
        },
    }


def test_the_table_fits_120_columns_and_leads_with_accuracy():
    commit = revision("a" * 40, 0.8654, 0.5, name="main")
    commit["experiments"] = [{"revs": [revision("b" * 40, 0.8711, 0.75, name="a-very-long-experiment-name")]}]
    table = render([revision("workspace", 0.85, 0.0), commit]).splitlines()

    assert WIDTH <= 120 and all(len(line) <= 120 for line in table)
    assert [header for header, _ in COLUMNS][1:3] == ["bitwise acc", "real acc"]
    assert table[1].split()[:4] == ["workspace", "85.00%", "90.00%", "10000"]
    assert table[2].split()[:2] == ["main", "86.54%"]
    experiment = table[3].split()
    assert experiment[0] == "a-very-long-ex" and experiment[1] == "87.11%" and "0.75" in experiment
    assert "fashion_mnist" in table[3] and "1024x1024x1024" in table[3]


def test_a_revision_without_metrics_shows_dashes():
    bare = {"rev": "c" * 40, "name": None, "data": {"rev": "c" * 40, "params": None, "metrics": None}}
    line = render([bare]).splitlines()[1]
    assert line.split()[0] == "c" * 7 and line.split()[1] == "-"
