"""``make compare``: the workspace, HEAD and every DVC experiment in one table that fits 120 columns.

``dvc exp show`` prints every param and metric (far wider than a terminal, the test accuracy behind a
hash column); this reads its ``--json`` and keeps what a comparison needs, accuracy first::

    python -m pipeline.compare            # workspace, HEAD and its experiments
    python -m pipeline.compare -A         # any `dvc exp show` option passes through (here: all commits)
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from pipeline.files import fail

#: (header, width). bit-ops: the bitwise network's binary MACs per example (XNOR + popcount each).
COLUMNS: list[tuple[str, int]] = [
    ("experiment", 14),
    ("bitwise acc", 11),
    ("real acc", 8),
    ("n_test", 6),
    ("bit-ops", 11),
    ("sparsity", 8),
    ("network", 7),
    ("hidden", 14),
    ("data", 13),
    ("inputs", 9),
]
WIDTH = sum(width for _, width in COLUMNS) + 2 * (len(COLUMNS) - 1)  # 119


def experiments(exp_show: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every revision in ``dvc exp show --json`` (the workspace, commits, and their experiments), in order."""
    for entry in exp_show:
        if entry.get("data") is not None:
            rev = entry["rev"]  # a commit's sha, or "workspace"
            yield {"name": entry.get("name") or (rev[:7] if len(rev) == 40 else rev), **entry["data"]}
        for experiment in entry.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                yield from experiments([rev])


def row(experiment: dict[str, Any]) -> list[str]:
    params = (experiment.get("params") or {}).get("params.yaml", {}).get("data", {})
    metrics = (experiment.get("metrics") or {}).get("reports/metrics.json", {}).get("data", {})
    bnn, real = metrics.get("bnn", {}), metrics.get("compressed", {})
    data = params.get("data", {})

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}%"

    return [
        str(experiment["name"]),
        percent(bnn.get("test_accuracy")),
        percent(real.get("test_accuracy")),
        str(metrics.get("n_test", "-")),
        f"{bnn['binary_macs_per_example']:,}" if "binary_macs_per_example" in bnn else "-",
        str(bnn.get("sparsity", params.get("finetune", {}).get("sparsity", "-"))),
        str(bnn.get("network", "-")),
        "x".join(str(n) for n in params.get("model", {}).get("hidden", [])) or "-",
        str(data.get("source", "-")),
        str(data.get("binarize", {}).get("method", "-")),
    ]


def render(exp_show: list[dict[str, Any]]) -> str:
    """The table: one line per revision, cells cut to their column's width (so it never wraps)."""

    def line(cells: list[str]) -> str:
        return "  ".join(cell[:width].ljust(width) for cell, (_, width) in zip(cells, COLUMNS, strict=True)).rstrip()

    lines = [line([header for header, _ in COLUMNS])]
    lines += [line(row(experiment)) for experiment in experiments(exp_show)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        shown = subprocess.run(["dvc", "exp", "show", "--json", *args], capture_output=True, text=True)
    except FileNotFoundError:
        fail("compare", "dvc is not on PATH; run it as `make compare` (the project's .venv has dvc)")
    if shown.returncode != 0:
        message = (shown.stderr.strip().splitlines() or ["(no message)"])[-1]
        fail("compare", f"`dvc exp show` failed: {message}")
    print(render(json.loads(shown.stdout)))


if __name__ == "__main__":
    main()
