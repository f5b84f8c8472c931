"""Pareto search: validation accuracy of the bitwise network against what it costs in bit-ops.

``experiment=pareto_search`` runs the chain of :mod:`pipeline.run` under Hydra's Optuna sweeper
(multi-objective, NSGA-II). Every job returns :func:`objectives`: the **validation** accuracy of the
finetuned bitwise network (its best epoch, as ``models/finetuned.pt`` records it; the test split is never
an objective, so the front can be reported on test data without having been chosen on it) and its
bit-ops per example (``bnn.binary_macs_per_example`` of ``reports/metrics.json``: one XNOR-popcount per
nonzero weight and per bias, the cost convention of :mod:`pipeline.comparison`).

When the sweep ends, :class:`ParetoWriter` reads every trial back from its job folder, computes the
non-dominated set itself (:func:`pareto_front`; Optuna's own ``optimization_results.yaml`` in the sweep
folder lists the same set), and writes ``reports/<data.source>/pareto.json`` and ``pareto.png``, which it
logs as artifacts of the sweep's MLflow parent run (each trial is a child run of it, via
:class:`pipeline.tracking.SweepTracking`).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bnn_core.errors import BnnError
from pipeline.artifacts import Artifacts, load_checkpoint
from pipeline.files import fail, write_json, write_png

#: The two objectives, in the order the task function returns them, with the direction of each
#: (``hydra.sweeper.direction`` of conf/experiment/pareto_search.yaml says the same).
OBJECTIVES = (("val_accuracy", "maximize"), ("bit_ops", "minimize"))


def objectives(artifacts: Artifacts) -> tuple[float, float]:
    """``(validation accuracy, bit-ops per example)`` of the bitwise network in a finished job's folder.

    The accuracy is that of the finetune round's best epoch (the epoch model selection kept, so the
    number describes the very network that was evaluated); the test split plays no part.
    """
    checkpoint = load_checkpoint(artifacts.finetuned)
    if "val_accuracy" not in checkpoint:
        raise BnnError(f"{artifacts.finetuned}: no val_accuracy in the checkpoint; re-run the finetune stage")
    if not artifacts.metrics.is_file():
        raise BnnError(f"{artifacts.metrics}: not found; did the evaluate stage finish?")
    metrics = json.loads(artifacts.metrics.read_text())
    return float(checkpoint["val_accuracy"]), float(metrics["bnn"]["binary_macs_per_example"])


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether ``a = (accuracy, cost)`` dominates ``b``: no less accurate, no more costly, and strictly
    better in at least one of the two."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the non-dominated points among ``(accuracy, cost)`` pairs, where accuracy is
    maximised and cost minimised.

    A point is on the front when no other point is at least as accurate and at most as costly while
    being strictly better in one of the two. Equal points do not dominate each other, so duplicates of a
    front point are all on the front (as in Optuna's ``study.best_trials``). Quadratic in the number of
    points, which is the number of trials of a sweep: tens, not millions.

    >>> pareto_front([(0.9, 100), (0.8, 50), (0.85, 120), (0.9, 100)])
    [0, 1, 3]
    """
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]


@dataclass(frozen=True)
class Trial:
    """One finished job of the search: its number (Hydra's job number, which is Optuna's trial number
    with this sweeper), the values it tried for the searched keys, and its two objectives."""

    number: int
    params: dict[str, Any]
    val_accuracy: float
    bit_ops: float


def searched_keys(sweep_overrides: Sequence[str]) -> list[str]:
    """The keys that a sweep varies: those of the overrides (``key=choice(...)``, ``interval``, ``tag``,
    ...) that are sweeps rather than fixed values, in the order given."""
    parsed = OverridesParser.create().parse_overrides(list(sweep_overrides))
    return [override.get_key_element() for override in parsed if override.is_sweep_override()]


def trial_params(job_dir: Path, keys: Sequence[str]) -> dict[str, Any]:
    """The values the job was given for ``keys``, from its task overrides (``.hydra/overrides.yaml``).

    Read from the overrides rather than the composed config so that a searched config-group choice
    (``+input_bits=...``) reads back as the option that was chosen.
    """
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        raise BnnError(f"{job_dir}: no .hydra/overrides.yaml; is this a job folder of a pipeline.run sweep?")
    overrides = OverridesParser.create().parse_overrides(list(OmegaConf.load(path)))
    values = {o.get_key_element(): o.value() for o in overrides}
    return {key: _plain(values[key]) for key in keys if key in values}


def _plain(value: Any) -> Any:
    """A JSON-ready copy of a parsed override value (lists and dicts of numbers and strings)."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


def _job_source(job_dir: Path) -> str:
    path = job_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise BnnError(f"{job_dir}: no .hydra/config.yaml; is this a job folder of a pipeline.run sweep?")
    return str(OmegaConf.load(path).data.source)


def collect_trials(job_dirs: Sequence[Path], keys: Sequence[str]) -> tuple[list[Trial], list[int], str]:
    """The finished trials among a sweep's job folders, the numbers of the jobs that did not finish (no
    ``reports/metrics.json``: a failed trial, tolerated by ``hydra.sweeper.max_failure_rate``), and the
    data source they all share.

    Raises :class:`BnnError` when no job finished or when the jobs used different data sources (their
    accuracies would not be comparable).
    """
    trials: list[Trial] = []
    unfinished: list[int] = []
    sources: set[str] = set()
    for job in job_dirs:
        artifacts = Artifacts(job)
        sources.add(_job_source(job))
        if not artifacts.metrics.exists():  # a job's outputs are linked in only once its whole chain ran
            unfinished.append(int(job.name))
            continue
        accuracy, bit_ops = objectives(artifacts)
        trials.append(Trial(int(job.name), trial_params(job, keys), accuracy, bit_ops))
    if not trials:
        raise BnnError(f"no finished trial among {len(job_dirs)} job folders")
    if len(sources) != 1:
        raise BnnError(f"the trials used different data sources: {sorted(sources)}")
    return trials, unfinished, sources.pop()


def pareto_summary(trials: Sequence[Trial], unfinished: Sequence[int], data_source: str, command: str) -> dict:
    """The content of ``pareto.json``: every trial (``on_front`` says which are non-dominated) and the
    front's trial numbers in order of increasing bit-ops."""
    front = set(pareto_front([(t.val_accuracy, t.bit_ops) for t in trials]))
    rows = [
        {
            "trial": t.number,
            "params": t.params,
            "val_accuracy": t.val_accuracy,
            "bit_ops": t.bit_ops,
            "on_front": i in front,
        }
        for i, t in enumerate(trials)
    ]
    ordered = sorted((r for r in rows if r["on_front"]), key=lambda r: (r["bit_ops"], r["val_accuracy"]))
    return {
        "data_source": data_source,
        "command": command,
        "objectives": dict(OBJECTIVES),
        "bit_ops": "binary MACs per example of the bitwise network (bnn.binary_macs_per_example)",
        "val_accuracy": "best-epoch validation accuracy of the finetuned bitwise network (models/finetuned.pt)",
        "n_trials": len(rows),
        "unfinished_trials": list(unfinished),
        "front": [r["trial"] for r in ordered],
        "trials": rows,
    }


def plot_pareto(summary: dict, path: Path) -> None:
    """All trials in grey, the front highlighted and joined as a staircase (``steps-post``: for any budget
    between two front points, the best accuracy on offer is that of the cheaper one); log bit-ops axis
    when the costs span a factor of 10 or more, as the searched widths and sparsities make them do."""
    import matplotlib

    matplotlib.use("Agg")  # headless: files only
    import matplotlib.pyplot as plt

    rows = summary["trials"]
    by_number = {r["trial"]: r for r in rows}
    front = [by_number[n] for n in summary["front"]]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.scatter([r["bit_ops"] for r in rows], [r["val_accuracy"] for r in rows], color="0.6", s=25, label="trial")
    ax.plot(
        [r["bit_ops"] for r in front],
        [r["val_accuracy"] for r in front],
        color="tab:red",
        marker="o",
        drawstyle="steps-post",
        label="Pareto front",
    )
    labels: dict[tuple[float, float], list[str]] = {}  # repeated trials (NSGA-II can repeat one) share a label
    for r in front:
        labels.setdefault((r["bit_ops"], r["val_accuracy"]), []).append(f"#{r['trial']}")
    for point, names in labels.items():
        ax.annotate(",".join(names), point, textcoords="offset points", xytext=(4, -10))
    costs = [r["bit_ops"] for r in rows]
    log_scale = min(costs) > 0 and max(costs) / min(costs) >= 10  # a narrow range reads better linear
    if log_scale:
        ax.set_xscale("log")
    ax.set_xlabel(f"bit-ops per example (XNOR-popcount{', log scale' if log_scale else ''})")
    ax.set_ylabel("validation accuracy (bitwise network)")
    ax.set_title(f"Pareto search on {summary['data_source']}: {len(front)} of {len(rows)} trials on the front")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best")
    write_png(path, fig)


def write_pareto(root: Path, job_dirs: Sequence[Path], keys: Sequence[str], command: str) -> tuple[Path, Path, dict]:
    """Write ``<root>/reports/<data.source>/pareto.json`` and ``pareto.png``; return both paths and the summary."""
    trials, unfinished, source = collect_trials(job_dirs, keys)
    summary = pareto_summary(trials, unfinished, source, command)
    folder = Artifacts(root).table1_dir(source)  # reports/<data.source>/, beside table1.json
    json_path, png_path = folder / "pareto.json", folder / "pareto.png"
    write_json(json_path, summary)
    plot_pareto(summary, png_path)
    return json_path, png_path, summary


def log_to_parent_run(config: DictConfig, paths: Sequence[Path], summary: dict) -> None:
    """Log the files (artifact folder ``pareto``) and the front's size to the sweep's MLflow parent run,
    which :class:`pipeline.tracking.SweepTracking` created and named through ``$BNN_PIPELINE_RUN``."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import (
        PIPELINE_RUN_ENV,
        common_tags,
        default_tracking_uri,
        ensure_experiment,
        find_or_create_parent,
    )

    uri = config.tracking.uri or default_tracking_uri()
    experiment_id = ensure_experiment(uri, config.tracking.experiment)
    sweep_id = os.environ.get(PIPELINE_RUN_ENV)
    if not sweep_id:
        raise RuntimeError(f"${PIPELINE_RUN_ENV} is not set: SweepTracking did not open a parent run")
    parent = find_or_create_parent(uri, experiment_id, sweep_id, f"sweep {config.hydra.sweep.dir}", common_tags())
    client = MlflowClient(uri)
    for path in paths:
        client.log_artifact(parent, str(path), "pareto")
    client.log_metric(parent, "pareto/n_trials", summary["n_trials"])
    client.log_metric(parent, "pareto/front_size", len(summary["front"]))


class ParetoWriter(Callback):
    """Hydra callback of ``experiment=pareto_search``: when the sweep ends, write and log its Pareto front.

    The job folders are ``<hydra.sweep.dir>/<job number>``; each holds the job's task overrides and
    composed config (``.hydra/``) and its chain's outputs (``models/finetuned.pt``,
    ``reports/metrics.json``).
    """

    def __init__(self) -> None:
        self.started = time.monotonic()

    def on_multirun_start(self, config: DictConfig, **kwargs: object) -> None:
        self.started = time.monotonic()

    def on_multirun_end(self, config: DictConfig, **kwargs: object) -> None:
        from pipeline.tracking import project_root

        sweep_dir = Path(config.hydra.sweep.dir)
        job_dirs = sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        task = list(config.hydra.overrides.task)
        sweeper_params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
        command = f"python -m pipeline.run {' '.join(task)}".strip()
        try:
            json_path, png_path, summary = write_pareto(
                project_root(), job_dirs, searched_keys([*sweeper_params, *task]), command
            )
        except BnnError as err:
            fail("pareto_search", str(err))
        minutes = (time.monotonic() - self.started) / 60
        print(
            f"pareto_search: {summary['n_trials']} trials in {minutes:.1f} min, front {summary['front']} "
            f"-> {json_path}, {png_path}"
        )
        try:
            log_to_parent_run(config, [json_path, png_path], summary)
        except Exception as err:  # the files are written; tracking never fails the sweep
            warnings.warn(f"pareto_search: could not log to MLflow ({err})", RuntimeWarning, stacklevel=2)
