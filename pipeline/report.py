"""Stage report: ``reports/report.md`` with the paper's comparison, the accuracy / bit-ops trade-off of its
networks, and the training curves of both rounds (PNGs beside it, so nothing needs the internet to view).

Hermetic, like every DVC stage: its outputs come from its declared inputs (metrics, baselines, curves) only,
never from the MLflow store, so the same inputs give the same report. Comparing many runs is MLflow's job:
the stage also puts the trade-off beside the earlier comparable runs on the run's MLflow page
(:func:`pipeline.tradeoff.log_run_tradeoff`), which is no DVC output.

The comparison's rows and cost convention: :mod:`pipeline.comparison`.

Its inputs are checked like user input: a missing or malformed one is a one-line error naming the file and
the stage that makes it, and ``metrics.json`` and ``baselines.json`` must have been made from the same
features (:func:`pipeline.artifacts.check_made_together`; one that records nothing was written by an older
version and is refused).
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt

from bnn_core.errors import DataError
from pipeline.artifacts import MADE_FROM, Artifacts, check_made_together, made_by, read_json_artifact
from pipeline.comparison import accuracy_cell, comparison_rows, encoding_name, render_rows
from pipeline.files import write_json, write_png, write_text
from pipeline.stage import StageContext, stage_main
from pipeline.tradeoff import log_run_tradeoff, plot_tradeoff, tradeoff_title


def read_history(path: Path) -> dict[str, list[float]]:
    """A training round's curves (``reports/<stage>_history.csv``): column -> one value per epoch."""
    hint = made_by(path.stem)
    if not path.is_file():
        raise DataError(f"{path}: not found; {hint}")
    try:
        with path.open() as handle:
            rows = list(csv.DictReader(handle))
        history = {key: [float(row[key]) for row in rows] for key in (rows[0].keys() if rows else [])}
    except (OSError, ValueError, TypeError, csv.Error) as err:  # TypeError: a short row's missing cell is None
        raise DataError(f"{path}: unreadable training history ({type(err).__name__}: {err}); {hint}") from None
    if not history.get("epoch"):
        raise DataError(f"{path}: no epochs in the training history; {hint}")
    return history


def plot_curves(histories: dict[str, dict[str, list[float]]], path: Path) -> None:
    fig, axes = plt.subplots(1, len(histories), figsize=(5 * len(histories), 3.5), squeeze=False)
    for ax, (stage, history) in zip(axes[0], histories.items(), strict=True):
        for column in ("train_accuracy", "val_accuracy"):
            if column in history:
                ax.plot(history["epoch"], history[column], label=column.replace("_", " "))
        ax.set_title(f"{stage} ({'real-valued, tanh-compressed' if stage == 'pretrain' else 'bitwise'})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    write_png(path, fig)


def render(rows: list[dict], metrics: dict, data_source: str) -> str:
    bnn, compressed = metrics["bnn"], metrics["compressed"]
    # the last two rows: the bitwise network (bnn or bnn_bn) and before it its tanh-compressed twin
    compressed_row, bnn_row = rows[2], rows[3]
    return "\n".join(
        [
            "# Bitwise neural network: report",
            "",
            "## The paper's comparison (Kim & Smaragdis 2016, Table 1 layout)",
            "",
            *render_rows(rows),
            "",
            f"Test accuracy in brackets: its Wilson 95% interval on the {metrics['n_test']:,} test examples "
            "(`bnn_core.stats.wilson_interval`); accuracies whose difference is well inside it are not told "
            "apart by this test set.",
            "",
            f"Bitwise vs. its tanh-compressed twin: {100 * (bnn['test_accuracy'] - compressed['test_accuracy']):+.2f} "
            f"points of test accuracy ({accuracy_cell(bnn_row)} vs. {accuracy_cell(compressed_row)}), "
            f"{metrics['ratios']['weight_bits']:.1f}x less weight memory, "
            f"{rows[2]['bit_ops'] / rows[3]['bit_ops']:.0f}x fewer bit-ops; exported model file "
            f"{bnn['model_file_bytes']:,} bytes; the exported file and the packed engine give the simulation's "
            f"integer scores on all {metrics['n_test']} test examples.",
            "",
            "## Accuracy against bit-ops",
            "",
            f"The {len(rows)} networks of the table above, all of this run ({data_source}, the same "
            f"{metrics['n_test']:,} test examples): bit-ops on a log axis, a colour per kind of network.",
            "",
            "![accuracy vs bit-ops](tradeoff.png)",
            "",
            "Other runs are compared on MLflow (`make dashboard`): the run's page holds this picture beside the "
            "earlier runs on the same data source and test examples, or says there is nothing to compare yet "
            "(artifacts `tradeoff/`).",
            "",
            "## Training curves",
            "",
            "![training curves](training_curves.png)",
            "",
            "Cost details per layer: [cost.md](cost.md).",
            "",
        ]
    )


def read_inputs(artifacts: Artifacts) -> tuple[dict, dict]:
    """``metrics.json`` and ``baselines.json``, refused unless both are JSON objects made from the same
    features."""
    metrics, baselines = read_json_artifact(artifacts.metrics), read_json_artifact(artifacts.baselines)
    for name, value in (("metrics", metrics), ("baselines", baselines)):
        if not isinstance(value, dict):
            raise DataError(f"{artifacts.path(name)}: not a JSON object; {made_by(name)}")
    check_made_together(artifacts, {"metrics": metrics.get(MADE_FROM), "baselines": baselines.get(MADE_FROM)})
    return metrics, baselines


def run(ctx: StageContext) -> None:
    artifacts = ctx.artifacts
    metrics, baselines = read_inputs(artifacts)
    histories = {stage: read_history(artifacts.history(stage)) for stage in ("pretrain", "finetune")}
    try:  # everything that reads fields of the two JSON files, before anything is written
        rows = comparison_rows(metrics, baselines, encoding_name(ctx.config.data.binarize))
        text = render(rows, metrics, ctx.config.data.source)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise DataError(
            f"{artifacts.metrics} or {artifacts.baselines}: a field is missing or malformed ({type(err).__name__}: "
            f"{err}); re-run the evaluate and baselines stages (dvc repro)"
        ) from None
    plot_tradeoff(rows, artifacts.tradeoff_plot, tradeoff_title(ctx.config.data.source, metrics["n_test"], rows, 0))
    plot_curves(histories, artifacts.training_curves)
    write_json(artifacts.comparison, rows)
    write_text(artifacts.report, text)
    for path in (artifacts.tradeoff_plot, artifacts.training_curves, artifacts.report):
        ctx.tracker.log_artifact(path, "report")
    if ctx.tracker.stage == ctx.name:  # a stage of its own (dvc repro); pipeline.run logs it once at its end
        log_run_tradeoff(ctx.tracker, rows, ctx.config.data.source, metrics.get("test_split"))
    print(f"report: {artifacts.report}")


main = stage_main("report", run)

if __name__ == "__main__":
    main()
