"""``python -m pipeline.summary``: the few lines to read after ``make repro`` (from reports/metrics.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bnn_core.stats import accuracy_interval, format_accuracy
from pipeline.artifacts import Artifacts
from pipeline.comparison import bit_ops


def summary(root: Path) -> str:
    artifacts = Artifacts(root)
    metrics = json.loads(artifacts.metrics.read_text())
    bnn, compressed, ratios = metrics["bnn"], metrics["compressed"], metrics["ratios"]
    n_test = int(metrics["n_test"])
    bitwise_ops, real_ops = bit_ops(metrics)

    def accuracy(net: dict) -> str:
        n = int(net.get("n_test", n_test))
        return format_accuracy(net["test_accuracy"], accuracy_interval(net["test_accuracy"], n))

    return "\n".join(
        [
            f"real-valued (tanh-compressed) network: {accuracy(compressed)} test accuracy",
            f"bitwise network:                      {accuracy(bnn)} test accuracy "
            f"(sparsity {bnn['sparsity']}; the exported file reproduces the training-time scores exactly)",
            f"in brackets: Wilson 95% interval on {n_test:,} test examples",
            f"cost per example: {bitwise_ops:,} bit-ops ({bnn['binary_macs_per_example']:,} binary MACs) vs "
            f"{real_ops:,} ({compressed['macs_per_example']:,} 32-bit MACs), {real_ops / bitwise_ops:.0f}x fewer; "
            f"{ratios['weight_bits']:.1f}x less weight memory; model file {bnn['model_file_bytes']:,} bytes",
            "speed: `make bench` (bitwise kernel vs float32, reports/bench.json)",
            (f"report: {artifacts.report}   " if artifacts.report.is_file() else "")
            + "dashboard: `make dashboard` -> http://127.0.0.1:5000 (the run's page: accuracy vs bit-ops, tradeoff/)",
        ]
    )


if __name__ == "__main__":
    try:
        print(summary(Path.cwd()))
    except (OSError, KeyError, ValueError) as err:
        print(f"error: summary: no complete reports/metrics.json yet ({err}); run `make repro`", file=sys.stderr)
        sys.exit(2)
