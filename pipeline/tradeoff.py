"""The picture this project exists to show: test accuracy against bit-ops per example, real-valued,
tanh-compressed and bitwise networks side by side, and where a user finds it.

- ``reports/tradeoff.png`` (the report stage, hermetic): the networks of this run only (:func:`plot_tradeoff`
  on the rows of :mod:`pipeline.comparison`), so the same inputs always draw the same picture.
- The run's MLflow page (:func:`log_run_tradeoff`): the same networks beside the earlier runs of the
  experiment that may be compared with them: same data source and same test examples
  (:func:`comparable_runs`); smoke runs log to an experiment of their own (conf/experiment/smoke.yaml).
  Artifacts ``tradeoff/tradeoff.png``, ``tradeoff.md`` (the tables, saying which runs are in it or that there
  is nothing to compare yet) and ``comparison.json``.
- A sweep's parent run (:class:`SweepTradeoff`): every job of the sweep, one picture per data source and
  test split.

One colour per kind of network and a label on every point, in these pictures and in ``dvc plots``
(.dvc/plots/tradeoff.json).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pipeline.comparison import render_rows
from pipeline.files import write_json, write_png, write_text

if TYPE_CHECKING:
    from pipeline.tracking import StageTracker

#: One colour per kind of network, the same in every picture (and in .dvc/plots/tradeoff.json's scheme).
KIND_COLOURS = {"real": "tab:blue", "compressed": "tab:green", "bnn": "tab:red"}
KIND_NAMES = {"real": "real-valued (32-bit)", "compressed": "tanh-compressed (32-bit)", "bnn": "bitwise (1-bit)"}
#: Where a run's trade-off goes among its MLflow artifacts (the run page lists it, the picture shows inline).
TRADEOFF_FOLDER = "tradeoff"


def network_kind(row: dict) -> str:
    """``real``, ``compressed`` or ``bnn`` (the ``_bn`` chain's networks are of the same three kinds)."""
    return row["network"].removesuffix("_bn")


def row_label(row: dict) -> str:
    """What a point of the picture is: ``real, pixels``, ``compressed, threshold``, ``bitwise, s=0.50``
    (``bitwise bn`` and so on for the integer-threshold chain), or the label a tracked run's row carries (its
    run description)."""
    if "label" in row:
        return row["label"]
    kind = network_kind(row)
    name = ("bitwise" if kind == "bnn" else kind) + (" bn" if row["network"].endswith("_bn") else "")
    return f"{name}, s={row['sparsity']:.2f}" if kind == "bnn" else f"{name}, {row['encoding']}"


def _grouped(rows: list[dict]) -> dict[tuple[float, float], list[dict]]:
    """Rows at the same point (the real-valued network on binary inputs and its tanh-compressed twin often
    coincide), so that they share one label instead of writing over each other."""
    points: dict[tuple[float, float], list[dict]] = {}
    for row in rows:
        points.setdefault((float(row["bit_ops"]), float(row["test_accuracy"])), []).append(row)
    return points


def plot_tradeoff(
    rows: list[dict], path: Path, title: str, others: list[dict] = (), others_name: str = ""
) -> list[str]:
    """Test accuracy against bit-ops per example: bit-ops on a log axis (the 32-bit and the bitwise networks
    are ~1000x apart), accuracy zoomed to the points, one colour per kind of network and a label on every
    point; ``rows`` with their Wilson 95% interval, ``others`` (comparable tracked runs) as open markers with
    the Pareto front of all the bitwise points. Only what is drawn gets a legend entry; returns the entries."""
    import matplotlib

    matplotlib.use("Agg")  # headless: files only
    import matplotlib.pyplot as plt

    from pipeline.pareto import pareto_front

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for (bit_ops, accuracy), group in _grouped(list(others)).items():
        kind = network_kind(group[0])
        ax.scatter(
            [bit_ops],
            [accuracy],
            s=36,
            facecolors="none",
            edgecolors=KIND_COLOURS[kind],
            zorder=2,
            label=f"{KIND_NAMES[kind]}, {others_name}",
        )
        if kind == "bnn":  # the 32-bit twins sit in the column of this run's: their labels would collide
            text = "\n".join(dict.fromkeys(row_label(r) for r in group))
            ax.annotate(
                text,
                (bit_ops, accuracy),
                textcoords="offset points",
                xytext=(-6, -3),
                ha="right",
                va="top",
                fontsize=7,
                color="0.35",
            )
    columns: dict[float, list[dict]] = {}
    for row in rows:
        low, high = row.get("test_accuracy_ci95", (row["test_accuracy"], row["test_accuracy"]))
        accuracy = row["test_accuracy"]
        ax.errorbar(
            [row["bit_ops"]],
            [accuracy],
            yerr=[[accuracy - low], [high - accuracy]],
            fmt="o",
            ms=7,
            capsize=3,
            color=KIND_COLOURS[network_kind(row)],
            zorder=3,
            label=KIND_NAMES[network_kind(row)],
        )
        columns.setdefault(float(row["bit_ops"]), []).append(row)
    for bit_ops, column in columns.items():
        # One label per column of points (the 32-bit networks share their bit-ops): a line per network, in
        # the order of their accuracies, so that close points never write over each other.
        column.sort(key=lambda r: -r["test_accuracy"])
        text = "\n".join(f"{row_label(r)}: {100 * r['test_accuracy']:.1f}%" for r in column)
        middle = (column[0]["test_accuracy"] + column[-1]["test_accuracy"]) / 2
        ax.annotate(text, (bit_ops, middle), textcoords="offset points", xytext=(9, 0), va="center", fontsize=8.5)
    bitwise = [r for r in [*rows, *others] if network_kind(r) == "bnn"]
    if others and len(bitwise) > 1:
        front = sorted(
            (bitwise[i] for i in pareto_front([(r["test_accuracy"], r["bit_ops"]) for r in bitwise])),
            key=lambda r: r["bit_ops"],
        )
        if len(front) > 1:
            ax.plot(
                [r["bit_ops"] for r in front],
                [r["test_accuracy"] for r in front],
                "--",
                color="tab:red",
                lw=1,
                alpha=0.6,
                drawstyle="steps-post",
                label="Pareto front (bitwise)",
                zorder=1,
            )
    ax.set_xscale("log")
    ax.margins(x=0.45, y=0.2)
    ax.set_xlabel("bit-ops per example, log scale (32-bit MAC = 1024, XNOR-popcount = 1)")
    ax.set_ylabel("test accuracy (Wilson 95% interval)")
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=1))
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))  # one entry per series, only for series drawn
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    write_png(path, fig)
    return list(unique)


def tradeoff_title(data_source: str, n_test: int, rows: list[dict], n_others: int, others_name: str = "") -> str:
    """What the picture holds: ``mnist5k, 500 test examples: the 4 networks of this run and 2 earlier runs
    on this test split``, or ``...; nothing to compare yet``."""
    if n_others == 1:
        others_name = others_name.replace("runs", "run").replace("jobs", "job")
    what = f"{data_source}, {n_test:,} test examples: "
    if not rows:
        return what + f"{n_others} {others_name}"
    what += f"the {len(rows)} networks of this run"
    if not others_name:
        return what
    return what + (f" and {n_others} {others_name}" if n_others else "; nothing to compare yet")


def tracked_rows(runs: list) -> list[dict]:
    """The bitwise and the tanh-compressed row of each tracked evaluation (MLflow runs with the metrics
    :func:`pipeline.evaluate.log_evaluation` logs), labelled with the run's description."""
    rows = []
    for run in runs:
        metrics, tags = run.data.metrics, run.data.tags
        label = tags.get("description") or run.info.run_name
        bit_ops = metrics.get("cost/bit_ops", metrics.get("cost/binary_macs"))
        if bit_ops is None or "test/accuracy" not in metrics:
            continue
        network = tags.get("network", "bnn")
        sparsity = float(run.data.params.get("finetune.sparsity", 0.0))
        common = {"input": "binary", "encoding": "", "sparsity": sparsity, "run_id": run.info.run_id}
        rows.append(
            {
                **common,
                "network": network,
                "test_accuracy": metrics["test/accuracy"],
                "bit_ops": bit_ops,
                "label": label,
            }
        )
        if "cost/real_bit_ops" in metrics and "test/compressed_accuracy" in metrics:
            twin = "compressed_bn" if network == "bnn_bn" else "compressed"
            rows.append(
                {
                    **common,
                    "network": twin,
                    "sparsity": 0.0,
                    "test_accuracy": metrics["test/compressed_accuracy"],
                    "bit_ops": metrics["cost/real_bit_ops"],
                    "label": f"{twin} {' '.join(label.split()[1:2])}".strip(),
                }
            )
    return rows


def comparable_runs(
    client, experiment_id: str, data_source: str, test_split: str, pipeline_run: str | None = None
) -> list:
    """The finished evaluations in the experiment on ``data_source`` and the same test split (the digest
    ``test_split`` of its examples, :func:`pipeline.evaluate.test_split_id`): accuracies on another data
    source or another test sample are not comparable. ``pipeline_run``: only that execution's (a sweep's
    jobs). Smoke and test runs are in an experiment of their own (conf/experiment/smoke.yaml), so they are
    never among them."""
    from pipeline.tracking import with_retries

    query = (
        f"tags.data_source = '{data_source}' and tags.test_split = '{test_split}' and attributes.status = 'FINISHED'"
    )
    if pipeline_run is not None:
        query += f" and tags.pipeline_run = '{pipeline_run}'"
    found = with_retries(lambda: client.search_runs([experiment_id], filter_string=query, max_results=5000))
    return [run for run in found if "test/accuracy" in run.data.metrics]


def render_tradeoff(title: str, rows: list[dict], others: list[dict], others_name: str, experiment: str) -> str:
    """``tradeoff.md``: the picture, the table of this run's networks and the runs it is compared with."""
    lines = ["# Accuracy against bit-ops", "", title, "", "![accuracy vs bit-ops](tradeoff.png)", ""]
    if rows:
        lines += ["## This run", "", *render_rows(rows), ""]
    bitwise = [r for r in others if network_kind(r) == "bnn"]
    lines += [f"## {others_name[:1].upper() + others_name[1:]}" if others_name else "## Other runs", ""]
    if bitwise:
        lines += ["| run | network | sparsity | test accuracy | bit-ops / example |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['label']} | {r['network']} | {r['sparsity']:.2f} | {100 * r['test_accuracy']:.2f}% "
            f"| {r['bit_ops']:,.0f} |"
            for r in sorted(bitwise, key=lambda r: r["bit_ops"])
        ]
    else:
        lines.append("Nothing to compare yet: no other finished run on this data source and test split.")
    lines += [
        "",
        f"Compared: finished runs of MLflow experiment `{experiment}` with the same data source and test split "
        "(the digest of the test examples, tag `test_split`); runs on other data or other test samples are left "
        "out, and smoke runs log to an experiment of their own.",
        "",
    ]
    return "\n".join(lines)


def write_tradeoff(
    folder: Path, rows: list[dict], others: list[dict], title: str, others_name: str, experiment: str
) -> None:
    """``tradeoff.png``, ``tradeoff.md`` and ``comparison.json`` (the rows of both) into ``folder``."""
    plot_tradeoff(rows, folder / "tradeoff.png", title, others, others_name)
    write_text(folder / "tradeoff.md", render_tradeoff(title, rows, others, others_name, experiment))
    write_json(folder / "comparison.json", {"this_run": rows, "compared_with": others})


def log_run_tradeoff(tracker: StageTracker, rows: list[dict], data_source: str, test_split: str | None) -> None:
    """Put this run's trade-off where a user looks, its MLflow run page (:attr:`StageTracker.page_run_id`):
    this run's networks beside the earlier comparable runs of the experiment (:func:`comparable_runs`, not
    this execution's own), as ``tradeoff/tradeoff.png``, ``tradeoff.md`` and ``comparison.json``. Like all
    tracking, a failure is a warning and the run goes on."""
    target = tracker.page_run_id
    if target is None:
        return

    def publish() -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracker.uri)
        experiment_id = client.get_experiment_by_name(tracker.experiment).experiment_id
        earlier = []
        if test_split:  # an evaluation written before tests splits had a digest is compared with nothing
            found = comparable_runs(client, experiment_id, data_source, test_split)
            earlier = tracked_rows([r for r in found if r.data.tags.get("pipeline_run") != tracker.pipeline_run])
        n_runs = len({r["run_id"] for r in earlier})
        title = tradeoff_title(data_source, rows[-1]["n_test"], rows, n_runs, "earlier runs on this test split")
        with tempfile.TemporaryDirectory(prefix="bnn-tradeoff-") as staging:
            write_tradeoff(Path(staging), rows, earlier, title, "earlier runs", tracker.experiment)
            client.log_artifacts(target, staging, TRADEOFF_FOLDER)

    tracker.attempt("log the trade-off to the run page", publish)


def log_sweep_tradeoff(uri: str, experiment: str, sweep_id: str, parent_id: str) -> None:
    """The sweep's trade-off on its parent run: every job's networks, one picture per data source and test
    split (``tradeoff/`` when the jobs share one, else ``tradeoff/<data source>-<split>/``)."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import with_retries

    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    query = f"tags.pipeline_run = '{sweep_id}' and tags.kind = 'stage'"
    jobs = with_retries(lambda: client.search_runs([experiment_id], filter_string=query, max_results=5000))
    groups: dict[tuple[str, str], list] = {}
    for run in jobs:
        tags = run.data.tags
        if "test/accuracy" in run.data.metrics and "test_split" in tags:
            groups.setdefault((tags.get("data_source", "?"), tags["test_split"]), []).append(run)
    with tempfile.TemporaryDirectory(prefix="bnn-tradeoff-") as staging:
        for (source, split), runs in groups.items():
            folder = Path(staging) if len(groups) == 1 else Path(staging) / f"{source}-{split[:8]}"
            n_test = int(max(r.data.metrics.get("test/n_examples", 0) for r in runs))
            title = tradeoff_title(source, n_test, [], len(runs), "jobs of this sweep")
            write_tradeoff(folder, [], tracked_rows(runs), title, "jobs of this sweep", experiment)
        if groups:
            with_retries(lambda: client.log_artifacts(parent_id, staging, TRADEOFF_FOLDER))


class SweepTradeoff(Callback):
    """Hydra callback: when a sweep ends, its trade-off on its MLflow parent run
    (:func:`log_sweep_tradeoff`; the parent and ``$BNN_PIPELINE_RUN`` are
    :class:`pipeline.tracking.SweepTracking`'s)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: object) -> None:
        from pipeline.tracking import PIPELINE_RUN_ENV, default_tracking_uri, ensure_experiment, find_or_create_parent

        uri = config.tracking.uri or default_tracking_uri()
        sweep_id = os.environ.get(PIPELINE_RUN_ENV)
        if not sweep_id:
            return
        try:
            experiment_id = ensure_experiment(uri, config.tracking.experiment)
            parent = find_or_create_parent(uri, experiment_id, sweep_id, f"sweep {config.hydra.sweep.dir}", {})
            log_sweep_tradeoff(uri, config.tracking.experiment, sweep_id, parent)
        except Exception as err:  # the jobs' outputs are written; tracking never fails the sweep
            warnings.warn(
                f"MLflow tracking at {uri} failed to log the sweep's trade-off ({err})", RuntimeWarning, stacklevel=2
            )
