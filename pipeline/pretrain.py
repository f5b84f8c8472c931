"""Stage 2, pretrain (round 1): the real-valued network with tanh weight compression.

Output: ``models/pretrained.pt`` (best validation epoch), ``reports/pretrain_history.csv``.
"""

from __future__ import annotations

from bnn_core.lightning_modules import PretrainModule
from bnn_core.networks import CompressedMLP
from pipeline.artifacts import read_features
from pipeline.stage import StageContext, stage_main
from pipeline.training import fit_round


def run(ctx: StageContext) -> None:
    model, optim = ctx.config.model, ctx.config.pretrain
    splits = read_features(ctx.artifacts.features)
    # The checkpoint's record of the network (pipeline.networks_io.load_compressed rebuilds it from this);
    # dropout_hidden as configured: one rate, or one per hidden layer.
    architecture = {
        "n_in": splits.n_features,
        "hidden": list(model.hidden),
        "n_out": ctx.config.data.n_classes,
        "dropout_input": model.dropout_input,
        "dropout_hidden": model.dropout_hidden,
        "norm": model.norm,
    }
    network = CompressedMLP(
        splits.n_features,
        list(model.hidden),
        ctx.config.data.n_classes,
        model.dropout_input,
        model.hidden_dropout_rates(),
        norm=model.norm,
    )
    module = PretrainModule(network, optim.lr, optim.epochs, optim.weight_decay, optim.schedule, optim.loss)
    fit_round(ctx, module, splits, optim, ctx.artifacts.pretrained, architecture)


main = stage_main("pretrain", run)

if __name__ == "__main__":
    main()
