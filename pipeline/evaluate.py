"""Stage 4, evaluate: test accuracy of the real-valued and the bitwise network, and what each costs.

The bitwise network is run twice on the test split: the torch simulation of training time and the
packed-bit engine (XNOR + popcount). The stage fails, writing nothing, if their integer class scores
differ on any example. Output: ``reports/metrics.json`` (DVC metrics) and ``reports/cost.md``.
"""

from __future__ import annotations

import numpy as np
import torch

from bnn_core.cost import cost_report
from bnn_core.errors import BnnError
from bnn_core.networks import predict_classes
from bnn_core.packed import PackedNetwork
from pipeline.artifacts import read_features, write_json, write_text
from pipeline.networks_io import load_bitwise, load_compressed
from pipeline.stage import StageContext, stage


def _scores(network: torch.nn.Module, x: np.ndarray, batch_size: int) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate(
            [network(torch.from_numpy(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
        )


@stage("evaluate")
def main(ctx: StageContext) -> None:
    splits = read_features(ctx.artifacts.features)
    x, y = splits.x_test, splits.y_test
    batch = ctx.config.evaluate.batch_size

    real_pred = predict_classes(_scores(load_compressed(ctx.artifacts.pretrained), x, batch))
    bitwise = load_bitwise(ctx.artifacts.finetuned)
    simulated = _scores(bitwise, x, batch)
    layers = bitwise.export_layers()
    packed = PackedNetwork.from_ternary(layers).forward_counts(x > 0)

    mismatched = int(np.sum(np.any(packed != simulated.astype(np.int64), axis=1)))
    if mismatched:
        raise BnnError(f"packed engine and torch simulation disagree on {mismatched} of {len(x)} test examples")
    bnn_pred = predict_classes(packed)
    agreement = float(np.mean(bnn_pred == predict_classes(simulated)))

    cost = cost_report([w for w, _ in layers])
    summary = cost.summary()
    metrics = {
        "real": {
            "test_accuracy": float(np.mean(real_pred == y)),
            "macs_per_example": summary["real_macs"],
            "weight_bits": summary["real_weight_bits"],
        },
        "bnn": {
            "test_accuracy": float(np.mean(bnn_pred == y)),
            "agreement": agreement,
            "binary_macs_per_example": summary["binary_macs"],
            "weight_bits": summary["binary_weight_bits"],
            "sparsity": ctx.config.finetune.sparsity,
        },
        "ratios": {"macs": summary["macs_ratio"], "weight_bits": summary["memory_ratio"]},
        "n_test": len(y),
    }
    write_text(
        ctx.artifacts.cost_table,
        "# Cost of the bitwise network and its real-valued twin\n\n" + cost.to_markdown() + "\n",
    )
    write_json(ctx.artifacts.metrics, metrics)
    ctx.tracker.log_metrics(
        {
            "test/accuracy": metrics["bnn"]["test_accuracy"],
            "test/error": 1.0 - metrics["bnn"]["test_accuracy"],
            "test/real_accuracy": metrics["real"]["test_accuracy"],
            "test/agreement": agreement,
            "cost/binary_macs": summary["binary_macs"],
            "cost/real_macs": summary["real_macs"],
            "cost/macs_ratio": summary["macs_ratio"],
            "cost/weight_bits": summary["binary_weight_bits"],
            "cost/real_weight_bits": summary["real_weight_bits"],
            "cost/memory_ratio": summary["memory_ratio"],
        }
    )
    ctx.tracker.log_artifact(ctx.artifacts.cost_table)
    print(
        f"evaluate: real-valued {metrics['real']['test_accuracy']:.4f}, bitwise {metrics['bnn']['test_accuracy']:.4f} "
        f"test accuracy (agreement {agreement:.4f}); {summary['macs_ratio']:.1f}x fewer MACs (binary), "
        f"{summary['memory_ratio']:.1f}x less weight memory -> {ctx.artifacts.metrics}"
    )


if __name__ == "__main__":
    main()
