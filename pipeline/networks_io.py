"""Rebuilding the networks from the stages' checkpoints."""

from __future__ import annotations

from pathlib import Path

from bnn_core.errors import DataError
from bnn_core.networks import BitwiseMLP, CompressedMLP
from pipeline.artifacts import load_checkpoint


def _load_into(net, path: Path, checkpoint: dict) -> None:
    try:
        net.load_state_dict(checkpoint["state_dict"])
    except (KeyError, RuntimeError) as err:
        raise DataError(f"{path}: checkpoint does not match its architecture ({err})") from None


def load_compressed(path: Path) -> CompressedMLP:
    checkpoint = load_checkpoint(path)
    arch = checkpoint["architecture"]
    dropout_hidden = arch["dropout_hidden"]
    net = CompressedMLP(
        arch["n_in"],
        list(arch["hidden"]),
        arch["n_out"],
        arch["dropout_input"],
        list(dropout_hidden) if isinstance(dropout_hidden, list | tuple) else dropout_hidden,
        norm=arch.get("norm", "none"),  # checkpoints made before bnn_bn have no "norm"
    )
    _load_into(net, path, checkpoint)
    return net.eval()


def load_bitwise(path: Path) -> BitwiseMLP:
    checkpoint = load_checkpoint(path)
    arch = checkpoint["architecture"]
    net = BitwiseMLP(
        arch["n_in"], list(arch["hidden"]), arch["n_out"], arch["sparsity"], arch["grad"], arch.get("norm", "none")
    )
    _load_into(net, path, checkpoint)
    return net.eval()
