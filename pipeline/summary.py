"""``python -m pipeline.summary``: the few lines to read after ``make repro`` (from reports/metrics.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def summary(root: Path) -> str:
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    bnn, real, ratios = metrics["bnn"], metrics["real"], metrics["ratios"]
    return "\n".join(
        [
            f"real-valued (tanh-compressed) network: {100 * real['test_accuracy']:.2f}% test accuracy",
            f"bitwise network:                      {100 * bnn['test_accuracy']:.2f}% test accuracy "
            f"(sparsity {bnn['sparsity']}, packed engine agreement {bnn['agreement']:.4f})",
            f"cost: {bnn['binary_macs_per_example']:,} binary MACs vs {real['macs_per_example']:,} 32-bit MACs "
            "per example; "
            f"{ratios['weight_bits']:.1f}x less weight memory; model file {bnn['model_file_bytes']:,} bytes",
            f"speed: fast kernel {metrics['speed']['speedup_vs_float']:.1f}x float32 on the test split "
            "(`make bench` for the full benchmark)",
            f"report: {root / 'reports' / 'report.md'}   dashboard: `make dashboard` -> http://127.0.0.1:5000",
        ]
    )


if __name__ == "__main__":
    try:
        print(summary(Path.cwd()))
    except (OSError, KeyError, ValueError) as err:
        print(f"error: summary: no complete reports/metrics.json yet ({err}); run `make repro`", file=sys.stderr)
        sys.exit(2)
