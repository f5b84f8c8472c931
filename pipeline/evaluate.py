"""Stage 4, evaluate: test accuracy of the tanh-compressed (round 1) and the bitwise network, what each
costs, and the exported model file.

The bitwise network runs three ways on the test split: the torch simulation of training time, the numpy
packed-bit engine on the encoded test inputs, and the exported ``models/bnn.npz`` (fast XNOR-popcount
kernel) on the raw test pixels. The stage fails, writing nothing, unless all three give the same integer
class scores on every example (:func:`check_same_scores`). Outputs: ``models/bnn.npz``,
``reports/metrics.json`` (DVC metrics: accuracy and cost, nothing measured in seconds), ``reports/cost.md``.

Before any of that it checks that its inputs belong together (:func:`check_inputs`): both checkpoints must
have been made from the features, encoder and round-1 network there now, and round 2 with the
``finetune.sparsity``, ``finetune.grad`` and ``model.norm`` this run writes into the model file and the metrics.
``metrics.json`` and the model file's metadata record the digests of the four inputs (``made_from``).

Inference speed is noisy, so it is not a DVC metric: the stage logs the fast kernel's speed against
float32 to MLflow (``speed/*``); ``make bench`` measures it properly (``reports/bench.json``).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from bnn_core.bitwise_model import BitwiseModel
from bnn_core.cost import cost_report
from bnn_core.errors import BnnError, DataError
from bnn_core.model_file import load_bitwise_model, save_bitwise_model
from bnn_core.networks import predict_classes
from bnn_core.packed import PackedNetwork
from bnn_core.speed import throughput
from pipeline.artifacts import (
    MADE_FROM,
    check_made_together,
    load_checkpoint,
    made_from,
    read_features,
    read_input_encoder,
)
from pipeline.comparison import bit_ops
from pipeline.config import Config
from pipeline.files import atomic_path, write_json, write_text
from pipeline.model_registry import log_and_register
from pipeline.networks_io import bitwise_from_checkpoint, compressed_from_checkpoint
from pipeline.stage import StageContext, stage_main
from pipeline.stages import stage
from pipeline.tracking import StageTracker, run_description


def _scores(network: torch.nn.Module, x: np.ndarray, batch_size: int) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate(
            [network(torch.from_numpy(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
        )


def test_split_id(pixels: np.ndarray, labels: np.ndarray) -> str:
    """A digest of the test examples (raw pixels and labels): two evaluations are compared only when they
    scored the same examples (:func:`pipeline.comparison.comparable_runs`), whatever config made them."""
    digest = hashlib.sha256()
    for array in (pixels, labels):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def log_evaluation(tracker: StageTracker, metrics: dict, config: Config) -> None:
    """The evaluation's MLflow metrics from ``metrics.json`` (names documented in the README, "Track and
    compare"), and the tags that say what may be compared with it: ``test_split``, ``network`` and a
    ``description`` (:func:`pipeline.tracking.run_description`).

    ``cost/bit_ops`` is the bitwise network's; ``cost/bit_ops_ratio_real_to_bitwise`` how many times more
    its 32-bit twin needs (~1000 for a dense network). MAC counts alone (``cost/binary_macs``,
    ``cost/real_macs``) are equal for a dense network: the two differ in the width of each MAC, not their
    number, which is why no ratio of the two is logged."""
    bnn, compressed = metrics["bnn"], metrics["compressed"]
    bitwise_ops, real_ops = bit_ops(metrics)
    tracker.log_metrics(
        {
            "test/accuracy": bnn["test_accuracy"],
            "test/error": 1.0 - bnn["test_accuracy"],
            "test/compressed_accuracy": compressed["test_accuracy"],
            "test/n_examples": metrics["n_test"],
            "cost/bit_ops": bitwise_ops,
            "cost/real_bit_ops": real_ops,
            "cost/bit_ops_ratio_real_to_bitwise": real_ops / bitwise_ops,
            "cost/binary_macs": bnn["binary_macs_per_example"],
            "cost/real_macs": compressed["macs_per_example"],
            "cost/weight_bits": bnn["weight_bits"],
            "cost/real_weight_bits": compressed["weight_bits"],
            "cost/memory_ratio": metrics["ratios"]["weight_bits"],
            "cost/model_file_bytes": bnn["model_file_bytes"],
        }
    )
    tags = {"network": bnn.get("network", "bnn"), "description": run_description(config)}
    if "test_split" in metrics:
        tags["test_split"] = metrics["test_split"]
    tracker.set_tags(tags)


def check_same_scores(engine: str, got: np.ndarray, expected: np.ndarray) -> None:
    """Refuse to go on unless ``engine`` gave exactly the torch simulation's integer scores."""
    mismatched = int(np.sum(np.any(got != expected, axis=1))) if got.shape == expected.shape else len(expected)
    if mismatched:
        raise BnnError(f"{engine} and the torch simulation disagree on {mismatched} of {len(expected)} test examples")


def check_inputs(ctx: StageContext, pretrained: dict, finetuned: dict) -> dict[str, str]:
    """Refuse inputs that were not made together, or a round 2 trained with other settings than this run
    reports; return the :data:`MADE_FROM` record of the evaluation (the digests of its four inputs)."""
    check_made_together(ctx.artifacts, {"pretrained": pretrained.get(MADE_FROM), "finetuned": finetuned.get(MADE_FROM)})
    arch = finetuned.get("architecture")
    if isinstance(arch, dict):
        config = ctx.config
        expected = {
            "finetune.sparsity": (arch.get("sparsity"), config.finetune.sparsity),
            "finetune.grad": (arch.get("grad"), config.finetune.grad),
            "model.norm": (arch.get("norm", "none"), config.model.norm),
        }
        for key, (trained, configured) in expected.items():
            if trained != configured:
                raise DataError(
                    f"{ctx.artifacts.finetuned} was trained with {key}={trained}, this run has {key}={configured}; "
                    f"pass {key}={trained}, or re-run finetune with {key}={configured}"
                )
    return made_from(ctx.artifacts, stage("evaluate").reads)


def run(ctx: StageContext) -> None:
    pretrained = load_checkpoint(ctx.artifacts.pretrained)
    finetuned = load_checkpoint(ctx.artifacts.finetuned)
    lineage = check_inputs(ctx, pretrained, finetuned)
    splits = read_features(ctx.artifacts.features)
    encoder = read_input_encoder(ctx.artifacts.input_encoder)
    x, y = splits.x_test, splits.y_test
    batch = ctx.config.evaluate.batch_size

    compressed_pred = predict_classes(
        _scores(compressed_from_checkpoint(ctx.artifacts.pretrained, pretrained), x, batch)
    )
    bitwise = bitwise_from_checkpoint(ctx.artifacts.finetuned, finetuned)
    simulated = _scores(bitwise, x, batch).astype(np.int64)
    layers = bitwise.export_layers()
    check_same_scores("the numpy packed engine", PackedNetwork.from_ternary(layers).forward_counts(x > 0), simulated)

    metadata = {
        "network": ctx.config.model.network,
        "sparsity": ctx.config.finetune.sparsity,
        "grad": ctx.config.finetune.grad,
        "data_source": ctx.config.data.source,
        MADE_FROM: lineage,
    }
    with atomic_path(ctx.artifacts.bnn_model) as staged:
        # The exported file, re-loaded, must reproduce the simulation from raw pixels before it is kept.
        file_bytes = save_bitwise_model(staged, BitwiseModel.from_layers(encoder, layers, metadata))
        exported = load_bitwise_model(staged)
        exported_counts = exported.forward_counts(splits.pixels_test)
        check_same_scores("the exported model file (fast kernel, raw pixels)", exported_counts, simulated)
        speed = throughput(exported.engine.forward_counts, layers, x)

        cost = cost_report([w for w, _ in layers], [b for _, b in layers])
        summary = cost.summary()
        metrics = {
            "compressed": {
                "test_accuracy": float(np.mean(compressed_pred == y)),
                "macs_per_example": summary["real_macs"],
                "weight_bits": summary["real_weight_bits"],
            },
            "bnn": {
                "test_accuracy": float(np.mean(predict_classes(exported_counts) == y)),
                "binary_macs_per_example": summary["binary_macs"],
                "weight_bits": summary["binary_weight_bits"],
                "model_file_bytes": file_bytes,
                "sparsity": ctx.config.finetune.sparsity,
                "network": ctx.config.model.network,
            },
            "ratios": {"weight_bits": summary["memory_ratio"]},
            "n_test": len(y),
            "test_split": test_split_id(splits.pixels_test, y),
            MADE_FROM: lineage,
        }
        write_text(
            ctx.artifacts.cost_table,
            "# Cost of the bitwise network and its real-valued twin\n\n" + cost.to_markdown() + "\n",
        )
        write_json(ctx.artifacts.metrics, metrics)
    log_evaluation(ctx.tracker, metrics, ctx.config)
    bitwise_ops, real_ops = bit_ops(metrics)
    ctx.tracker.log_metrics({f"speed/{key}": value for key, value in speed.items() if key != "kernel"})
    ctx.tracker.log_artifact(ctx.artifacts.cost_table)
    ctx.tracker.log_artifact(ctx.artifacts.bnn_model, "model")
    registered = log_and_register(ctx.tracker, ctx.artifacts.bnn_model, metrics, splits.pixels_test)
    print(
        f"evaluate: tanh-compressed {metrics['compressed']['test_accuracy']:.4f}, bitwise "
        f"{metrics['bnn']['test_accuracy']:.4f} test accuracy (the three engines agree on all {len(y)} test "
        f"examples); {real_ops / bitwise_ops:.0f}x fewer bit-ops, {summary['memory_ratio']:.1f}x less weight memory, "
        f"model file {file_bytes:,} bytes; fast kernel {speed['speedup_vs_float']:.1f}x float32 "
        f"({speed['kernel']}) -> {ctx.artifacts.metrics}"
    )
    if registered is not None:
        print(f"evaluate: MLflow model models:/{registered.name}/{registered.version} (pyfunc; `mlflow models serve`)")


main = stage_main("evaluate", run)

if __name__ == "__main__":
    main()
