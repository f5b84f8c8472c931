"""The paper's comparison (Kim & Smaragdis 2016, Table 1): real-valued, tanh-compressed and bitwise
networks side by side, with what each costs.

Rows are plain dicts, the format of ``reports/comparison.json`` and ``reports/<data>/table1.json``:
``network`` (``real`` | ``compressed`` | ``bnn``, and ``real_bn`` | ``compressed_bn`` | ``bnn_bn`` for the
integer-threshold network's chain, ``model.norm=batchnorm``), ``input`` (``real`` | ``binary``), ``encoding`` (how
the input was made: ``pixels``, ``threshold``, ``lloyd_max_<bits>``), ``sparsity``, ``test_accuracy``,
``test_error``, ``n_test`` (test examples) and ``test_accuracy_ci95`` (Wilson 95% interval, ``[low, high]``:
:func:`bnn_core.stats.wilson_interval`), ``macs`` and ``mac_bits`` (32-bit or 1-bit multiply-accumulates per example),
``bit_ops`` and ``weight_bits``.

Cost convention (README, "Cost accounting"): real-valued networks do 32-bit MACs, counted as
32 x 32 = 1024 bit operations each (QONNX BOPs); the bitwise network does one XNOR-popcount bit
operation per nonzero weight and per bias (where this departs from QONNX's tool: docs/method.md, section 7).

``experiment=paper_table1`` sweeps the network (``+network=bnn,bnn_bn``) and ``finetune.sparsity`` with the
baselines stage added to every job; when the sweep ends, :class:`Table1Writer` collects the jobs' outputs
into ``reports/<data>/table1.json`` and ``table1.md`` and logs one MLflow run per row.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bnn_core.cost import FLOAT_BITS, FLOAT_MAC_BIT_OPS
from bnn_core.errors import BnnError
from bnn_core.stats import accuracy_interval, format_accuracy
from pipeline.artifacts import Artifacts
from pipeline.config import BinarizeConfig, Config, validate
from pipeline.files import fail, write_json, write_text

#: The config sections the jobs of one network must share: only ``finetune.sparsity`` may differ.
SHARED_SECTIONS = ("seed", "data", "model", "augment", "pretrain")
SHARED_FINETUNE_KEYS = ("grad", "init", "epochs", "batch_size", "lr", "weight_decay", "schedule", "loss", "max_minutes")
#: What every job of a table shares, whichever network it trains: the data, the seed, the widths.
SHARED_ACROSS_NETWORKS = ("seed", "data", "augment")


def encoding_name(binarize: BinarizeConfig) -> str:
    """``threshold`` or ``lloyd_max_<bits>``: how the binary input features were made."""
    return f"lloyd_max_{binarize.bits}" if binarize.method == "lloyd_max" else binarize.method


def bit_ops(metrics: dict) -> tuple[int, int]:
    """``(bitwise, real)``: bit-ops per example of the bitwise network (one XNOR-popcount per binary MAC)
    and of its tanh-compressed twin (32 x 32 bit operations per 32-bit MAC), from ``metrics.json``."""
    return metrics["bnn"]["binary_macs_per_example"], metrics["compressed"]["macs_per_example"] * FLOAT_MAC_BIT_OPS


def _row(
    network: str, input_kind: str, encoding: str, sparsity: float, accuracy: float, n_test: int, **cost: int
) -> dict:
    return {
        "network": network,
        "input": input_kind,
        "encoding": encoding,
        "sparsity": sparsity,
        "test_accuracy": accuracy,
        "test_error": 1.0 - accuracy,
        "n_test": n_test,
        "test_accuracy_ci95": list(accuracy_interval(accuracy, n_test)),
        **cost,
    }


def _n_test(net: dict, metrics: dict) -> int:
    """The test examples a network was scored on: its own ``n_test`` where its stage wrote one, else the
    chain's (every network of one chain is scored on the same test split)."""
    return int(net.get("n_test", metrics["n_test"]))


def _network_suffix(metrics: dict) -> str:
    """``_bn`` for the chain of the integer-threshold network (its real-valued twins have batch norm too)."""
    return "_bn" if metrics["bnn"].get("network", "bnn") == "bnn_bn" else ""


def _real_cost(net: dict) -> dict[str, int]:
    macs = net["macs_per_example"]
    return {
        "macs": macs,
        "mac_bits": FLOAT_BITS,
        "bit_ops": macs * FLOAT_MAC_BIT_OPS,
        "weight_bits": net["weight_bits"],
    }


def compressed_row(metrics: dict, encoding: str) -> dict:
    """Round 1's tanh-compressed network: 32-bit, on the binary features."""
    compressed = metrics["compressed"]
    return _row(
        f"compressed{_network_suffix(metrics)}",
        "binary",
        encoding,
        0.0,
        compressed["test_accuracy"],
        _n_test(compressed, metrics),
        **_real_cost(compressed),
    )


def real_valued_rows(metrics: dict, baselines: dict, encoding: str) -> list[dict]:
    """The three 32-bit rows: real-valued on pixels, real-valued on the binary features, tanh-compressed.

    Each costs what its own layer sizes say: with Lloyd-Max bit-planes the networks on binary features
    have more inputs than the one on pixels. In the ``bnn_bn`` chain they are ``real_bn`` and
    ``compressed_bn``: the same networks with batch norm before each hidden activation.
    """
    suffix = _network_suffix(metrics)
    pixels, binary = baselines["real_input"], baselines["binary_input"]
    return [
        _row(
            f"real{suffix}",
            "real",
            "pixels",
            0.0,
            pixels["test_accuracy"],
            _n_test(pixels, metrics),
            **_real_cost(pixels),
        ),
        _row(
            f"real{suffix}",
            "binary",
            encoding,
            0.0,
            binary["test_accuracy"],
            _n_test(binary, metrics),
            **_real_cost(binary),
        ),
        compressed_row(metrics, encoding),
    ]


def bitwise_row(metrics: dict, encoding: str) -> dict:
    bnn = metrics["bnn"]
    macs = bnn["binary_macs_per_example"]
    return _row(
        bnn.get("network", "bnn"),
        "binary",
        encoding,
        bnn["sparsity"],
        bnn["test_accuracy"],
        _n_test(bnn, metrics),
        macs=macs,
        mac_bits=1,
        bit_ops=macs,
        weight_bits=bnn["weight_bits"],
    )


def comparison_rows(metrics: dict, baselines: dict | None, encoding: str) -> list[dict]:
    """The paper's four networks for one run of the chain; without the baselines stage's output (a
    ``pipeline.run`` job without ``chain.baselines``), the two the chain itself trains."""
    if baselines is None:
        return [compressed_row(metrics, encoding), bitwise_row(metrics, encoding)]
    return [*real_valued_rows(metrics, baselines, encoding), bitwise_row(metrics, encoding)]


def accuracy_cell(row: dict) -> str:
    """``95.20% (93.0-96.7)``: test accuracy and its Wilson 95% interval (the accuracy alone for rows
    written before the interval was)."""
    if "test_accuracy_ci95" not in row:
        return f"{100 * row['test_accuracy']:.2f}%"
    return format_accuracy(row["test_accuracy"], row["test_accuracy_ci95"])


def render_rows(rows: list[dict]) -> list[str]:
    """Markdown table lines, test error as in the paper, test accuracy with its 95% interval."""
    lines = [
        "| network | input | sparsity | test error | test accuracy (95% CI) | MACs / example | bit-ops / example "
        "| weight bits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        input_kind = "real (pixels)" if row["input"] == "real" else f"binary ({row['encoding']})"
        sparsity = f"{row['sparsity']:.2f}" if row["network"].startswith("bnn") else "-"
        lines.append(
            f"| {row['network']} | {input_kind} | {sparsity} | {100 * row['test_error']:.2f}% | "
            f"{accuracy_cell(row)} | {row['macs']:,} x {row['mac_bits']}-bit | {row['bit_ops']:,} | "
            f"{row['weight_bits']:,} |"
        )
    return lines


# --- Table 1 of one data source, from a sweep over finetune.sparsity ------------------------------------


def job_config(job_dir: Path) -> Config:
    """The validated config a sweep job ran with (Hydra writes it to ``<job>/.hydra/config.yaml``)."""
    path = job_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise BnnError(f"{job_dir}: no .hydra/config.yaml; is this a job folder of a pipeline.run sweep?")
    return validate(OmegaConf.load(path))


def read_job_json(path: Path) -> Any:
    """A JSON output of a sweep job; :class:`BnnError` saying what to do when it is missing."""
    if not path.is_file():
        hint = "the sweep's jobs need chain.baselines=true" if path.name == "baselines.json" else "did the job finish?"
        raise BnnError(f"{path}: not found; {hint}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:  # ValueError: JSONDecodeError, or bytes that are not text
        raise BnnError(f"{path}: unreadable ({type(err).__name__}: {err}); did the job finish?") from None


def _shared_settings(config: Config) -> dict:
    settings = asdict(config)
    shared = {key: settings[key] for key in SHARED_SECTIONS}
    shared["finetune"] = {key: settings["finetune"][key] for key in SHARED_FINETUNE_KEYS}
    return shared


def _network_rows(job_dirs: list[Path], configs: list[Config], encoding: str) -> tuple[list[dict], int]:
    """One network's rows (jobs that differ only in ``finetune.sparsity``): its real-valued twins from the
    first job's baselines, then one bitwise row per sparsity, and the number of test examples."""
    first = _shared_settings(configs[0])
    for job, config in zip(job_dirs[1:], configs[1:], strict=True):
        if _shared_settings(config) != first:
            raise BnnError(f"{job}: its config differs from job {job_dirs[0].name} in more than finetune.sparsity")
    sparsities = [config.finetune.sparsity for config in configs]
    if len(set(sparsities)) != len(sparsities):
        raise BnnError(f"paper_table1: finetune.sparsity values repeat across jobs: {sparsities}")
    jobs = sorted(zip(sparsities, job_dirs, strict=True))
    metrics = [read_job_json(Artifacts(job).metrics) for _, job in jobs]
    rows = real_valued_rows(metrics[0], read_job_json(Artifacts(jobs[0][1]).baselines), encoding)
    for (sparsity, job), job_metrics in zip(jobs, metrics, strict=True):
        if job_metrics["bnn"]["sparsity"] != sparsity:
            raise BnnError(f"{job}: metrics.json is for sparsity {job_metrics['bnn']['sparsity']}, not {sparsity}")
        rows.append(bitwise_row(job_metrics, encoding))
    return rows, metrics[0]["n_test"]


def table1_rows(job_dirs: list[Path]) -> tuple[list[dict], list[Config], int]:
    """The table's rows from a sweep's job folders, one config per network (the paper's first, then
    ``bnn_bn``), and the number of test examples.

    Jobs are grouped by network (``model.norm``). Raises :class:`BnnError` when a job's outputs are
    missing, when the jobs of one network differ in anything but ``finetune.sparsity``, when networks
    differ in data, seed or augmentation (their rows would not be comparable), or when a sparsity repeats.
    """
    if not job_dirs:
        raise BnnError("paper_table1: the sweep has no job folders")
    configs = [job_config(job) for job in job_dirs]
    shared = {key: asdict(configs[0])[key] for key in SHARED_ACROSS_NETWORKS}
    for job, config in zip(job_dirs, configs, strict=True):
        if {key: asdict(config)[key] for key in SHARED_ACROSS_NETWORKS} != shared:
            raise BnnError(f"{job}: its data, seed or augmentation differ from job {job_dirs[0].name}")
    encoding = encoding_name(configs[0].data.binarize)
    rows: list[dict] = []
    network_configs: list[Config] = []
    n_test = 0
    for norm in ("none", "batchnorm"):
        group = [(job, config) for job, config in zip(job_dirs, configs, strict=True) if config.model.norm == norm]
        if group:
            group_rows, n_test = _network_rows([job for job, _ in group], [config for _, config in group], encoding)
            rows += group_rows
            network_configs.append(group[0][1])
    return rows, network_configs, n_test


def _recipe(config: Config) -> str:
    """One line: how a network of the table was trained."""
    hidden = "x".join(str(h) for h in config.model.hidden)
    pre, fine = config.pretrain, config.finetune
    start = "from round 1" if fine.init == "pretrained" else "from random weights"
    return (
        f"`{config.model.network}`: hidden layers {hidden}, norm {config.model.norm}; round 1 (and each "
        f"real-valued twin) {pre.epochs} epochs, {pre.schedule} lr {pre.lr:g}, {pre.loss}; round 2 {start}, "
        f"{fine.epochs} epochs, `{fine.grad}` gradient, {fine.schedule} lr {fine.lr:g}, {fine.loss}."
    )


def render_table1(rows: list[dict], configs: list[Config], n_test: int, wall_time_s: float | None, command: str) -> str:
    config = configs[0]
    timing = f"{wall_time_s / 60:.1f} min wall time" if wall_time_s is not None else "wall time not measured"
    summaries = []
    for network in dict.fromkeys(r["network"] for r in rows if r["network"].startswith("bnn")):
        suffix = network[len("bnn") :]
        bnn = min((r for r in rows if r["network"] == network), key=lambda r: r["sparsity"])
        real_binary = next(r for r in rows if r["network"] == f"real{suffix}" and r["input"] == "binary")
        gap = 100 * (real_binary["test_accuracy"] - bnn["test_accuracy"])
        behind = f"{gap:.2f} points behind" if gap >= 0 else f"{-gap:.2f} points ahead of"
        summaries.append(
            f"`{network}` at sparsity {bnn['sparsity']:.2f}: {accuracy_cell(bnn)} test accuracy, {behind} the "
            f"real-valued network on the same binary inputs (`real{suffix}`, {accuracy_cell(real_binary)})."
        )
    augment = f"random shifts up to {config.augment.shift} px" if config.augment.shift else "no augmentation"
    return "\n".join(
        [
            f"# Table 1 on {config.data.source}",
            "",
            f"`{command}`: {timing} (stages reused from the stage cache are not re-run).",
            "",
            *render_rows(rows),
            "",
            *(f"- {_recipe(c)}" for c in configs),
            "",
            f"Seed {config.seed}; {augment}; {n_test:,} test examples. In brackets: the Wilson 95% interval of "
            "each test accuracy (`bnn_core.stats`); differences well inside it are noise of the test sample.",
            "",
            "\n\n".join(summaries),
            "",
        ]
    )


def write_table1(root: Path, job_dirs: list[Path], wall_time_s: float | None, command: str) -> tuple[Path, list[dict]]:
    """Write ``<root>/reports/<data.source>/table1.json`` and ``table1.md``; return the folder and rows."""
    rows, configs, n_test = table1_rows(job_dirs)
    folder = Artifacts(root).table1_dir(configs[0].data.source)
    write_json(folder / "table1.json", rows)
    write_text(folder / "table1.md", render_table1(rows, configs, n_test, wall_time_s, command))
    return folder, rows


class Table1Writer(Callback):
    """Hydra callback of ``experiment=paper_table1``: when the sweep ends, write its table and log its rows.

    The job folders are ``<hydra.sweep.dir>/<job number>``; each holds the job's composed config
    (``.hydra/config.yaml``) and its chain's outputs (``reports/metrics.json``, ``reports/baselines.json``).
    """

    def __init__(self) -> None:
        self.started = time.monotonic()

    def on_multirun_start(self, config: DictConfig, **kwargs: object) -> None:
        self.started = time.monotonic()

    def on_multirun_end(self, config: DictConfig, **kwargs: object) -> None:
        from pipeline.tracking import log_table_rows, project_root

        sweep_dir = Path(config.hydra.sweep.dir)
        job_dirs = sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        overrides = " ".join(config.hydra.overrides.task)
        command = f"python -m pipeline.run {overrides}".strip()
        try:
            folder, rows = write_table1(project_root(), job_dirs, time.monotonic() - self.started, command)
        except BnnError as err:
            fail("paper_table1", str(err))
        print(f"paper_table1: {len(rows)} rows -> {folder / 'table1.md'}, {folder / 'table1.json'}")
        try:
            log_table_rows(config.tracking.uri, config.tracking.experiment, "table1", rows, folder)
        except Exception as err:  # the table is written; tracking never fails the sweep
            warnings.warn(f"paper_table1: could not log the rows to MLflow ({err})", RuntimeWarning, stacklevel=2)
