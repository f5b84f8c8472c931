"""Run an exported bitwise model on raw images: ``python -m pipeline.predict images=<IDX images file>``.

Keys (``conf/predict.yaml``): ``model_file`` (default ``models/bnn.npz``, a file written by
:func:`bnn_core.model_file.save_bitwise_model`), ``images`` (required: an IDX file, optionally
gzip-compressed, of uint8 images ``[n, ...]``; each image is flattened to its pixels, whose number must
be the model's), ``labels`` (optional IDX file of ``n`` labels), ``output`` (optional file),
``batch_size`` (images per forward pass). Relative paths are relative to the working directory.

Output: the predicted class ids, one per line, go to ``output`` (written atomically; stdout then says
how many were written where) or, when ``output`` is null, to stdout. With ``labels``, stdout ends with
exactly one line ``accuracy=<fraction correct, 4 decimals> n=<number of images>``. Nothing else is
written: no Hydra ``outputs/`` or ``.hydra/`` folder, no log file. An expected problem (missing or
damaged model file, unreadable IDX file, pixel count or label count mismatch, a label outside the model's
classes, an output that cannot be written) ends the command with one line ``error: predict: <message>``
on stderr and exit status 2.

Example::

    python -m pipeline.predict model_file=models/bnn.npz \\
        images=data/mnist/t10k-images-idx3-ubyte.gz labels=data/mnist/t10k-labels-idx1-ubyte.gz
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from bnn_core.bitwise_model import BitwiseModel
from bnn_core.datasets import image_rows, read_idx
from bnn_core.errors import BnnError, DataError
from bnn_core.model_file import load_bitwise_model
from pipeline.config import CONF_DIR, PredictConfig, validate_predict
from pipeline.files import command_line, fail, write_text


def read_images(path: str | Path) -> np.ndarray:
    """IDX images ``[n, ...]`` flattened to ``uint8 [n, pixels]``."""
    return image_rows(read_idx(path), path)


def read_labels(path: str | Path, n_images: int, n_classes: int) -> np.ndarray:
    """IDX labels, one per image, each a class of the model: a label it can never predict would only lower
    the accuracy line without a word (the file belongs to another dataset)."""
    labels = read_idx(path)
    if labels.ndim != 1:
        raise DataError(f"{path}: expected a 1-d label array, got shape {labels.shape}")
    if len(labels) != n_images:
        raise DataError(f"{path}: holds {len(labels)} labels for {n_images} images")
    if int(labels.max()) >= n_classes:
        raise DataError(f"{path}: label {int(labels.max())} outside the model's classes 0..{n_classes - 1}")
    return labels.astype(np.int64)


def predict_in_batches(model: BitwiseModel, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([model.predict(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)])


def predict(config: PredictConfig) -> None:
    model = load_bitwise_model(config.model_file)
    pixels = read_images(config.images)
    if pixels.shape[1] != model.n_pixels:
        raise DataError(
            f"{config.images}: images have {pixels.shape[1]} pixels but the model {config.model_file} "
            f"takes {model.n_pixels}"
        )
    labels = read_labels(config.labels, len(pixels), model.n_classes) if config.labels else None
    predictions = predict_in_batches(model, pixels, config.batch_size)
    lines = "".join(f"{c}\n" for c in predictions.tolist())
    if config.output:
        write_text(Path(config.output), lines)
        print(f"predict: {len(predictions)} predictions -> {config.output}")
    else:
        print(lines, end="")
    if labels is not None:
        print(f"accuracy={float(np.mean(predictions == labels)):.4f} n={len(labels)}")


@hydra.main(config_path=CONF_DIR, config_name="predict", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    try:
        predict(validate_predict(cfg))
    except BnnError as err:
        fail("predict", str(err))


def main() -> None:
    """The command line (exit statuses and signals: :func:`pipeline.files.command_line`)."""
    command_line("predict", hydra_main)


if __name__ == "__main__":
    main()
