"""Stage 4, evaluate: test accuracy of the real-valued and the bitwise network, what each costs, and the
exported model file.

The bitwise network runs three ways on the test split: the torch simulation of training time, the numpy
packed-bit engine on the encoded test inputs, and the exported ``models/bnn.npz`` (fast XNOR-popcount
kernel) on the raw test pixels. The stage fails, writing nothing, unless all three give the same integer
class scores on every example. Outputs: ``models/bnn.npz``, ``reports/metrics.json`` (DVC metrics),
``reports/cost.md``.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from bnn_core.cost import cost_report
from bnn_core.errors import BnnError
from bnn_core.input_encoders import encoder_from_dict
from bnn_core.kernels import kernel_name
from bnn_core.model_file import BitwiseModel, load_bitwise_model, save_bitwise_model
from bnn_core.networks import predict_classes
from bnn_core.packed import PackedNetwork
from pipeline.artifacts import read_features
from pipeline.files import atomic_path, write_json, write_text
from pipeline.networks_io import load_bitwise, load_compressed
from pipeline.stage import StageContext, stage_main
from pipeline.tracking import StageTracker


def _scores(network: torch.nn.Module, x: np.ndarray, batch_size: int) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate(
            [network(torch.from_numpy(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
        )


def _median_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up (and numba compilation, when not cached)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _float_forward(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """The same network in float32 BLAS (the baseline a float deployment would run)."""
    z = x
    for i, (w, b) in enumerate(layers):
        a = z @ w.T + b
        z = a if i == len(layers) - 1 else np.where(a >= 0, np.float32(1), np.float32(-1))
    return z


def throughput(model: BitwiseModel, layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> dict:
    """Examples per second of the fast kernel and of float32 BLAS on the same inputs (median of 5)."""
    bits = x > 0
    float_layers = [(w.astype(np.float32), b.astype(np.float32)) for w, b in layers]
    bitwise_s = _median_seconds(lambda: model.engine.forward_counts(bits))
    float_s = _median_seconds(lambda: _float_forward(float_layers, x))
    return {
        "bitwise_examples_per_s": len(x) / bitwise_s,
        "float_examples_per_s": len(x) / float_s,
        "speedup_vs_float": float_s / bitwise_s,
        "kernel": kernel_name(),
    }


def log_evaluation(tracker: StageTracker, metrics: dict) -> None:
    """The evaluation's MLflow metrics (names documented in the README, "Track and compare")."""
    tracker.log_metrics(
        {
            "test/accuracy": metrics["bnn"]["test_accuracy"],
            "test/error": 1.0 - metrics["bnn"]["test_accuracy"],
            "test/real_accuracy": metrics["real"]["test_accuracy"],
            "test/agreement": metrics["bnn"]["agreement"],
            "cost/binary_macs": metrics["bnn"]["binary_macs_per_example"],
            "cost/real_macs": metrics["real"]["macs_per_example"],
            "cost/macs_ratio": metrics["ratios"]["macs"],
            "cost/weight_bits": metrics["bnn"]["weight_bits"],
            "cost/real_weight_bits": metrics["real"]["weight_bits"],
            "cost/memory_ratio": metrics["ratios"]["weight_bits"],
            "cost/model_file_bytes": metrics["bnn"]["model_file_bytes"],
            "speed/speedup_vs_float": metrics["speed"]["speedup_vs_float"],
            "speed/bitwise_examples_per_s": metrics["speed"]["bitwise_examples_per_s"],
            "speed/float_examples_per_s": metrics["speed"]["float_examples_per_s"],
        }
    )


def _check_same(name: str, got: np.ndarray, expected: np.ndarray) -> None:
    mismatched = int(np.sum(np.any(got != expected, axis=1)))
    if mismatched:
        raise BnnError(f"{name} and the torch simulation disagree on {mismatched} of {len(expected)} test examples")


def run(ctx: StageContext) -> None:
    splits = read_features(ctx.artifacts.features)
    x, y = splits.x_test, splits.y_test
    batch = ctx.config.evaluate.batch_size

    real_pred = predict_classes(_scores(load_compressed(ctx.artifacts.pretrained), x, batch))
    bitwise = load_bitwise(ctx.artifacts.finetuned)
    simulated = _scores(bitwise, x, batch).astype(np.int64)
    layers = bitwise.export_layers()
    _check_same("the numpy packed engine", PackedNetwork.from_ternary(layers).forward_counts(x > 0), simulated)

    encoder = encoder_from_dict(json.loads(ctx.artifacts.input_encoder.read_text())["encoder"])
    metadata = {
        "sparsity": ctx.config.finetune.sparsity,
        "grad": ctx.config.finetune.grad,
        "data_source": ctx.config.data.source,
    }
    with atomic_path(ctx.artifacts.bnn_model) as staged:
        # The exported file, re-loaded, must reproduce the simulation from raw pixels before it is kept.
        file_bytes = save_bitwise_model(staged, BitwiseModel.from_layers(encoder, layers, metadata))
        exported = load_bitwise_model(staged)
        exported_counts = exported.forward_counts(splits.pixels_test)
        _check_same("the exported model file (fast kernel, raw pixels)", exported_counts, simulated)
        bnn_pred = predict_classes(exported_counts)
        agreement = float(np.mean(bnn_pred == predict_classes(simulated)))
        speed = throughput(exported, layers, x)

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
                "model_file_bytes": file_bytes,
                "sparsity": ctx.config.finetune.sparsity,
            },
            "ratios": {"macs": summary["macs_ratio"], "weight_bits": summary["memory_ratio"]},
            "speed": speed,
            "n_test": len(y),
        }
        write_text(
            ctx.artifacts.cost_table,
            "# Cost of the bitwise network and its real-valued twin\n\n" + cost.to_markdown() + "\n",
        )
        write_json(ctx.artifacts.metrics, metrics)
    log_evaluation(ctx.tracker, metrics)
    ctx.tracker.log_artifact(ctx.artifacts.cost_table)
    ctx.tracker.log_artifact(ctx.artifacts.bnn_model, "model")
    print(
        f"evaluate: real-valued {metrics['real']['test_accuracy']:.4f}, bitwise {metrics['bnn']['test_accuracy']:.4f} "
        f"test accuracy (agreement {agreement:.4f}); {summary['macs_ratio']:.1f}x fewer MACs, "
        f"{summary['memory_ratio']:.1f}x less weight memory, model file {file_bytes:,} bytes; fast kernel "
        f"{speed['speedup_vs_float']:.1f}x float32 on {len(y)} test examples -> {ctx.artifacts.metrics}"
    )


main = stage_main("evaluate", run)

if __name__ == "__main__":
    main()
