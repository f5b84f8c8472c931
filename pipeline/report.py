"""Stage report: ``reports/report.md`` with the paper's comparison, the accuracy / bit-op trade-off over
every run in the MLflow experiment (Pareto front, current run marked), and the training curves of both
rounds (PNGs beside it, so nothing needs the internet to view).

The comparison's rows and cost convention: :mod:`pipeline.comparison`.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt

from pipeline.comparison import comparison_rows, encoding_name, render_rows
from pipeline.files import atomic_path, write_json, write_text
from pipeline.stage import StageContext, stage_main


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by another with fewer-or-equal bit-ops and higher-or-equal accuracy."""
    front, best = [], -1.0
    for cost, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if accuracy > best:
            front.append((cost, accuracy))
            best = accuracy
    return front


def tracked_tradeoffs(uri: str | None, experiment: str) -> list[tuple[float, float]]:
    """``(binary MACs, test accuracy)`` of every run in the experiment that has both; [] if unreachable."""
    try:
        from mlflow.tracking import MlflowClient

        from pipeline.tracking import default_tracking_uri

        client = MlflowClient(uri or default_tracking_uri())
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return []
        runs = client.search_runs([found.experiment_id], filter_string="metrics.`test/accuracy` >= 0", max_results=5000)
        return [
            (r.data.metrics["cost/binary_macs"], r.data.metrics["test/accuracy"])
            for r in runs
            if "cost/binary_macs" in r.data.metrics
        ]
    except Exception as err:  # the report is still worth writing without the store
        warnings.warn(
            f"report: could not read MLflow runs ({err}); the trade-off shows the current run only",
            RuntimeWarning,
            stacklevel=2,
        )
        return []


def _save_png(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_tradeoff(points: list[tuple[float, float]], current: tuple[float, float], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    if points:
        ax.scatter(*zip(*points, strict=True), s=14, alpha=0.5, label="MLflow runs")
        front = pareto_front([*points, current])
        ax.plot(*zip(*front, strict=True), "k--", lw=1, label="Pareto front")
    ax.scatter([current[0]], [current[1]], marker="*", s=160, c="crimson", label="this run", zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("binary MACs per example (XNOR-popcount bit-ops)")
    ax.set_ylabel("test accuracy")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    _save_png(fig, path)


def read_history(path: Path) -> dict[str, list[float]]:
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    return {key: [float(row[key]) for row in rows] for key in (rows[0].keys() if rows else [])}


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
    _save_png(fig, path)


def render(rows: list[dict], metrics: dict, n_tracked: int) -> str:
    bnn, real = metrics["bnn"], metrics["real"]
    return "\n".join(
        [
            "# Bitwise neural network: report",
            "",
            "## The paper's comparison (Kim & Smaragdis 2016, Table 1 layout)",
            "",
            *render_rows(rows),
            "",
            f"Bitwise vs. its real-valued twin: {100 * (bnn['test_accuracy'] - real['test_accuracy']):+.2f} points of "
            f"test accuracy, {metrics['ratios']['weight_bits']:.1f}x less weight memory, "
            f"{rows[2]['bit_ops'] / rows[3]['bit_ops']:.0f}x fewer bit-ops; exported model file "
            f"{bnn['model_file_bytes']:,} bytes; packed engine agrees with the simulation on "
            f"{100 * bnn['agreement']:.1f}% of the {metrics['n_test']} test examples.",
            "",
            "## Accuracy against bit-ops",
            "",
            f"Every run in the MLflow experiment with both metrics ({n_tracked} runs); the star is this run.",
            "",
            "![accuracy vs bit-ops](tradeoff.png)",
            "",
            "## Training curves",
            "",
            "![training curves](training_curves.png)",
            "",
            "Cost details per layer: [cost.md](cost.md).",
            "",
        ]
    )


def run(ctx: StageContext) -> None:
    artifacts = ctx.artifacts
    reports = artifacts.metrics.parent
    metrics = json.loads(artifacts.metrics.read_text())
    baselines = json.loads(artifacts.baselines.read_text())
    rows = comparison_rows(metrics, baselines, encoding_name(ctx.config.data.binarize))
    current = (float(metrics["bnn"]["binary_macs_per_example"]), metrics["bnn"]["test_accuracy"])
    # A store the stage's tracker could not reach was reported once already: don't try (and warn) again.
    tracked = tracked_tradeoffs(ctx.config.tracking.uri, ctx.config.tracking.experiment) if ctx.tracker.run_id else []
    plot_tradeoff(tracked, current, reports / "tradeoff.png")
    plot_curves(
        {stage: read_history(artifacts.history(stage)) for stage in ("pretrain", "finetune")},
        reports / "training_curves.png",
    )
    write_json(reports / "comparison.json", rows)
    write_text(artifacts.report, render(rows, metrics, len(tracked)))
    for name in ("tradeoff.png", "training_curves.png", "report.md"):
        ctx.tracker.log_artifact(reports / name, "report")
    print(f"report: {artifacts.report}")


main = stage_main("report", run)

if __name__ == "__main__":
    main()
