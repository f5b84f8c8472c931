"""Stage baselines: the real-valued rows of the paper's comparison, trained like round 1.

A plain real-valued network (tanh activations, dropout, no weight compression) with the architecture and
budget of ``pretrain``, once on real pixels scaled to [-1, 1] and once on the binary input features.
Output: ``reports/baselines.json`` (test accuracy of each, best validation epoch, number of inputs, and
cost: 32-bit MACs per example and weight bits).
"""

from __future__ import annotations

import numpy as np
import torch

from bnn_core.cost import real_valued_cost
from bnn_core.input_encoders import InputEncoder, RealScaler
from bnn_core.lightning_modules import PretrainModule
from bnn_core.networks import CompressedMLP, predict_classes
from bnn_core.splits import FeatureSplits, split_source
from pipeline.artifacts import MADE_FROM, made_from, read_features
from pipeline.files import write_json
from pipeline.sources import load_source
from pipeline.stage import StageContext, seed_everything, stage_main
from pipeline.stages import stage
from pipeline.training import fit


def train_real_valued(
    ctx: StageContext, splits: FeatureSplits, encoder: InputEncoder | None
) -> dict[str, float] | None:
    """Round 1's training (:func:`pipeline.training.fit`) of the uncompressed network on ``splits``.

    ``encoder`` made ``splits`` from the raw pixels; with ``augment.shift > 0`` it re-encodes the shifted
    training images (None: the binarize stage's encoder, artifact ``input_encoder``). None on a
    data-parallel rank other than 0 (rank 0 tests and reports).
    """
    model, optim = ctx.config.model, ctx.config.pretrain
    seed_everything(ctx.config)  # each baseline starts from the seed, as if it were the only one
    layer_sizes = [splits.n_features, *model.hidden, ctx.config.data.n_classes]
    network = CompressedMLP(
        splits.n_features,
        list(model.hidden),
        ctx.config.data.n_classes,
        model.dropout_input,
        model.hidden_dropout_rates(),
        compress=False,
        norm=model.norm,
    )
    module = PretrainModule(network, optim.lr, optim.epochs, optim.weight_decay, optim.schedule, optim.loss)
    best = fit(ctx, module, splits, optim, [], encoder=encoder)
    if best is None:
        return None
    network.eval()
    with torch.no_grad():
        predictions = predict_classes(network(torch.from_numpy(splits.x_test)))
    return {
        "test_accuracy": float(np.mean(predictions == splits.y_test)),
        "best_epoch": best.epoch,
        "n_inputs": splits.n_features,
        **real_valued_cost(layer_sizes),
    }


def run(ctx: StageContext) -> None:
    data, split = ctx.config.data, ctx.config.data.split
    # the binarize stage's split exactly (pipeline/binarize.py), so both baselines see the same examples
    raw = split_source(load_source(data), split.val, split.test, split.seed, folds=split.folds, fold=split.fold)
    real_input = train_real_valued(ctx, FeatureSplits.encode(raw, RealScaler()), RealScaler())
    binary_input = train_real_valued(ctx, read_features(ctx.artifacts.features), None)
    if real_input is None or binary_input is None:  # another rank than 0 of a data-parallel run: rank 0 writes
        return
    rows = {"real_input": real_input, "binary_input": binary_input}
    ctx.tracker.log_metrics({f"baselines/{name}_test_accuracy": row["test_accuracy"] for name, row in rows.items()})
    write_json(ctx.artifacts.baselines, {**rows, MADE_FROM: made_from(ctx.artifacts, stage("baselines").reads)})
    print(
        f"baselines: real-valued network {rows['real_input']['test_accuracy']:.4f} on real pixels, "
        f"{rows['binary_input']['test_accuracy']:.4f} on binary inputs -> {ctx.artifacts.baselines}"
    )


main = stage_main("baselines", run)

if __name__ == "__main__":
    main()
