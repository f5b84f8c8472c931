"""Stage 1, binarize: load the data source, split it, fit the input encoder on the training split, encode.

Outputs: ``data/features.npz`` (encoded splits) and ``data/input_encoder.json`` (the fitted encoder).
"""

from __future__ import annotations

from bnn_core.input_encoders import fit_input_encoder
from bnn_core.splits import FeatureSplits, split_source
from pipeline.artifacts import write_features
from pipeline.files import write_json
from pipeline.sources import load_source
from pipeline.stage import StageContext, stage_main


def run(ctx: StageContext) -> None:
    data = ctx.config.data
    split = data.split
    raw = split_source(load_source(data), split.val, split.test, split.seed, folds=split.folds, fold=split.fold)
    encoder = fit_input_encoder(
        data.binarize.method,
        raw.train.pixels,
        threshold=data.binarize.threshold,
        bits=data.binarize.bits,
        planes=data.binarize.planes,
    )
    splits = FeatureSplits.encode(raw, encoder)
    write_features(ctx.artifacts.features, splits)
    write_json(ctx.artifacts.input_encoder, {"encoder": encoder.to_dict(), "n_pixels": int(raw.train.pixels.shape[1])})
    ctx.tracker.log_metrics(
        {
            "data/n_train": len(raw.train),
            "data/n_val": len(raw.val),
            "data/n_test": len(raw.test),
            "data/n_features": splits.n_features,
        }
    )
    print(
        f"binarize: {len(raw.train)}/{len(raw.val)}/{len(raw.test)} train/val/test examples, "
        f"{splits.n_features} {encoder.name} features -> {ctx.artifacts.features}"
    )


main = stage_main("binarize", run)

if __name__ == "__main__":
    main()
