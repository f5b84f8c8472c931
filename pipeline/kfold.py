"""k-fold cross-validation of the whole chain on a source without its own test set (``experiment=kfold``).

One hold-out split of mnist5k tests on 500 digits: a Wilson 95% interval about +-2 points wide, and the
figure depends on which 500 were drawn. ``python -m pipeline.run experiment=kfold`` runs the chain once
per fold (``data.split.folds=5``, ``data.split.fold=0..4``: :func:`bnn_core.datasets.kfold_split`), so
every one of the 5,000 digits is tested exactly once, by a network that never trained on it.

When the sweep ends, :class:`KFoldWriter` writes ``reports/<data.source>/kfold.json``: per fold the test
accuracy of the bitwise and the tanh-compressed network; per network the mean and the sample standard
deviation (ddof = 1) over folds, and the pooled accuracy ``sum(correct) / sum(n_test)`` with its Wilson
95% interval (:func:`bnn_core.stats.wilson_interval`). The pooled interval treats the 5,000 test answers
as independent trials; it covers the test-sample noise, not the fold-to-fold variation of training,
which the standard deviation shows. The file and the summary metrics also go to the sweep's MLflow
parent run.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
import warnings
from dataclasses import asdict
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from bnn_core.errors import BnnError
from bnn_core.stats import accuracy_interval, wilson_interval
from pipeline.artifacts import Artifacts
from pipeline.comparison import job_config, read_job_json
from pipeline.config import Config
from pipeline.files import fail, write_json

#: The networks of each fold, as ``reports/metrics.json`` names them.
NETWORKS = ("bnn", "compressed")
#: Config sections that do not decide a fold's result (where it is logged, progress bars, batch size of
#: scoring, optional extra stages): jobs may differ in them.
UNSHARED_SECTIONS = ("tracking", "trainer", "evaluate", "chain")


def _shared_settings(config: Config) -> dict:
    settings = asdict(config)
    for section in UNSHARED_SECTIONS:
        settings.pop(section, None)
    settings["data"]["split"].pop("fold")
    return settings


def fold_results(job_dirs: list[Path]) -> tuple[list[dict], Config]:
    """Per fold (sorted by fold): ``{"fold", "n_test", "<network>": {"test_accuracy", "correct",
    "test_accuracy_ci95"}}`` from a sweep's job folders, and the config the jobs share.

    Raises :class:`BnnError` when a job's outputs are missing, when a job is not a k-fold job, when jobs
    differ in anything but ``data.split.fold`` (their folds would not be one cross-validation) or when
    two jobs test the same fold.
    """
    if not job_dirs:
        raise BnnError("kfold: the sweep has no job folders")
    configs = [job_config(job) for job in job_dirs]
    for job, config in zip(job_dirs, configs, strict=True):
        if config.data.split.folds is None:
            raise BnnError(f"{job}: data.split.folds is null; a k-fold sweep sets it (experiment=kfold)")
    first = _shared_settings(configs[0])
    for job, config in zip(job_dirs[1:], configs[1:], strict=True):
        if _shared_settings(config) != first:
            raise BnnError(f"{job}: its config differs from job {job_dirs[0].name} in more than data.split.fold")
    folds = [config.data.split.fold for config in configs]
    if len(set(folds)) != len(folds):
        raise BnnError(f"kfold: data.split.fold values repeat across jobs: {folds}")

    results = []
    for fold, job in sorted(zip(folds, job_dirs, strict=True)):
        metrics = read_job_json(Artifacts(job).metrics)
        n_test = int(metrics["n_test"])
        result: dict = {"fold": fold, "n_test": n_test}
        for network in NETWORKS:
            accuracy = float(metrics[network]["test_accuracy"])
            result[network] = {
                "test_accuracy": accuracy,
                # metrics.json keeps accuracies; each is a count over n_test, so the count is exact
                "correct": round(accuracy * n_test),
                "test_accuracy_ci95": list(accuracy_interval(accuracy, n_test)),
            }
        results.append(result)
    return results, configs[0]


def summarize(results: list[dict], network: str) -> dict:
    """Mean and sample standard deviation (ddof = 1; null for one fold) of ``network``'s per-fold test
    accuracy, and the pooled accuracy over all folds' test examples with its Wilson 95% interval."""
    accuracies = [r[network]["test_accuracy"] for r in results]
    correct = sum(r[network]["correct"] for r in results)
    total = sum(r["n_test"] for r in results)
    return {
        "mean": statistics.fmean(accuracies),
        "std": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
        "correct": correct,
        "total": total,
        "pooled_accuracy": correct / total,
        "pooled_ci95": list(wilson_interval(correct, total)),
    }


def kfold_report(job_dirs: list[Path], command: str) -> tuple[dict, Config]:
    """The content of ``kfold.json`` for a sweep's job folders, and the config they share."""
    results, config = fold_results(job_dirs)
    split = config.data.split
    folds_run = [r["fold"] for r in results]
    report = {
        "data_source": config.data.source,
        "folds": split.folds,
        "split_seed": split.seed,
        "val": split.val,
        "folds_run": folds_run,
        # a subset of folds (e.g. data.split.fold=0,1 for a quick look) does not test every example
        "complete": folds_run == list(range(split.folds)),
        "command": command,
        "per_fold": results,
        **{network: summarize(results, network) for network in NETWORKS},
    }
    return report, config


def write_kfold(root: Path, job_dirs: list[Path], command: str) -> tuple[Path, dict]:
    """Write ``<root>/reports/<data.source>/kfold.json``; return its path and content."""
    report, config = kfold_report(job_dirs, command)
    path = Artifacts(root).table1_dir(config.data.source) / "kfold.json"
    write_json(path, report)
    return path, report


def summary_metrics(report: dict) -> dict[str, float]:
    """The numbers of ``kfold.json`` as MLflow metric names: ``kfold/<network>_<mean|std|pooled...>``."""
    metrics: dict[str, float] = {}
    for network in NETWORKS:
        summary = report[network]
        low, high = summary["pooled_ci95"]
        metrics[f"kfold/{network}_mean"] = summary["mean"]
        if summary["std"] is not None:
            metrics[f"kfold/{network}_std"] = summary["std"]
        metrics[f"kfold/{network}_pooled_accuracy"] = summary["pooled_accuracy"]
        metrics[f"kfold/{network}_pooled_ci95_low"] = low
        metrics[f"kfold/{network}_pooled_ci95_high"] = high
    return metrics


def log_kfold(uri: str | None, experiment: str, report: dict, path: Path) -> None:
    """Log ``report`` to the sweep's MLflow parent run (found through ``$BNN_PIPELINE_RUN``, which
    :class:`pipeline.tracking.SweepTracking` set): summary metrics, each fold's accuracies as a metric
    with step = fold, and ``kfold.json`` as an artifact."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import (
        PIPELINE_RUN_ENV,
        common_tags,
        default_tracking_uri,
        ensure_experiment,
        find_or_create_parent,
    )

    uri = uri or default_tracking_uri()
    experiment_id = ensure_experiment(uri, experiment)
    sweep_id = os.environ.get(PIPELINE_RUN_ENV) or uuid.uuid4().hex
    parent = find_or_create_parent(uri, experiment_id, sweep_id, f"kfold {report['data_source']}", common_tags())
    now = int(time.time() * 1000)
    metrics = [Metric(name, float(value), now, 0) for name, value in summary_metrics(report).items()]
    for result in report["per_fold"]:
        for network in NETWORKS:
            accuracy = result[network]["test_accuracy"]
            metrics.append(Metric(f"kfold/{network}_test_accuracy", accuracy, now, result["fold"]))
    client = MlflowClient(uri)
    client.log_batch(parent, metrics=metrics)
    client.log_artifact(parent, str(path), "kfold")


class KFoldWriter(Callback):
    """Hydra callback of ``experiment=kfold``: when the sweep ends, write ``kfold.json`` and log it.

    The job folders are ``<hydra.sweep.dir>/<job number>``; each holds its composed config
    (``.hydra/config.yaml``) and ``reports/metrics.json``.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: object) -> None:
        from pipeline.tracking import project_root

        sweep_dir = Path(config.hydra.sweep.dir)
        job_dirs = sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        command = f"python -m pipeline.run {' '.join(config.hydra.overrides.task)}".strip()
        try:
            path, report = write_kfold(project_root(), job_dirs, command)
        except BnnError as err:
            fail("kfold", str(err))
        bnn = report["bnn"]
        low, high = bnn["pooled_ci95"]
        spread = f" +- {100 * bnn['std']:.2f}" if bnn["std"] is not None else ""
        print(
            f"kfold: {len(report['per_fold'])} of {report['folds']} folds; bitwise network "
            f"{100 * bnn['mean']:.2f}%{spread} (mean +- std over folds), pooled {100 * bnn['pooled_accuracy']:.2f}% "
            f"(95% CI {100 * low:.1f}-{100 * high:.1f}) on {bnn['total']:,} test examples -> {path}"
        )
        try:
            log_kfold(config.tracking.uri, config.tracking.experiment, report, path)
        except Exception as err:  # the file is written; tracking never fails the sweep
            warnings.warn(f"kfold: could not log to MLflow ({err})", RuntimeWarning, stacklevel=2)
