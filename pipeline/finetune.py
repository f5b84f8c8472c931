"""Stage 3, finetune (round 2): noisy backpropagation of the bitwise network, started from round 1.

Output: ``models/finetuned.pt`` (shadow weights of the best validation epoch; the bitwise network is
their ternarization), ``reports/finetune_history.csv``.
"""

from __future__ import annotations

from bnn_core.errors import ConfigError
from bnn_core.lightning_modules import FinetuneModule
from bnn_core.networks import BitwiseMLP
from pipeline.artifacts import read_features
from pipeline.config import PRECISIONS
from pipeline.networks_io import load_compressed
from pipeline.stage import StageContext, stage_main
from pipeline.training import fit_round

#: Precisions whose float sums of up to a few thousand +-1 products are exact integers (16-bit formats are
#: exact only up to 256, bf16, or 2048, fp16).
EXACT_PRECISIONS = tuple(p for p in PRECISIONS if not p.startswith(("16", "bf16")))


def run(ctx: StageContext) -> None:
    optim = ctx.config.finetune
    if ctx.config.trainer.precision not in EXACT_PRECISIONS:
        raise ConfigError(
            f"trainer.precision={ctx.config.trainer.precision}: round 2's sums of +-1 products (up to the fan-in) "
            f"are exact integers only in one of {EXACT_PRECISIONS}"
        )
    splits = read_features(ctx.artifacts.features)
    if not splits.is_binary():
        raise ConfigError(
            "data.binarize.method: the bitwise network needs binary inputs (threshold or lloyd_max); "
            "'real' is for the real-valued baselines"
        )
    if optim.init == "pretrained":
        network = BitwiseMLP.from_compressed(load_compressed(ctx.artifacts.pretrained), optim.sparsity, optim.grad)
    else:  # "random": the same noisy backpropagation without round 1 (shadow weights uniform in [-1, 1])
        hidden, n_out = list(ctx.config.model.hidden), ctx.config.data.n_classes
        network = BitwiseMLP(splits.n_features, hidden, n_out, optim.sparsity, optim.grad, ctx.config.model.norm)
    architecture = {
        "n_in": splits.n_features,
        "hidden": network.hidden,
        "n_out": network.n_out,
        "sparsity": optim.sparsity,
        "grad": optim.grad,
        "norm": network.norm,
    }
    module = FinetuneModule(network, optim.lr, optim.epochs, optim.weight_decay, optim.schedule, optim.loss)
    fit_round(ctx, module, splits, optim, ctx.artifacts.finetuned, architecture)


main = stage_main("finetune", run)

if __name__ == "__main__":
    main()
