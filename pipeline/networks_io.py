"""Rebuilding the networks from the stages' checkpoints.

A checkpoint is a stage input like any other: one that loads but lacks a field, or whose fields do not
build a network, is a :class:`DataError` naming the file and the stage that makes it, not a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnn_core.errors import DataError
from bnn_core.networks import BitwiseMLP, CompressedMLP
from pipeline.artifacts import Artifacts, load_checkpoint, made_by


def _damaged(path: Path, detail: str) -> DataError:
    located = Artifacts.locate(path)
    hint = made_by(located[1]) if located else "re-make it with the stage that wrote it"
    return DataError(f"{path}: {detail}; {hint}")


def _load_into(net, path: Path, checkpoint: dict) -> None:
    try:
        net.load_state_dict(checkpoint["state_dict"])
    except (KeyError, RuntimeError, TypeError, AttributeError) as err:
        raise _damaged(path, f"checkpoint does not match its architecture ({type(err).__name__}: {err})") from None


def compressed_from_checkpoint(path: Path, checkpoint: dict[str, Any]) -> CompressedMLP:
    """Round 1's network from its checkpoint (``path``: for messages)."""
    try:
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
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise _damaged(path, f"not a round-1 checkpoint ({type(err).__name__}: {err})") from None
    _load_into(net, path, checkpoint)
    return net.eval()


def bitwise_from_checkpoint(path: Path, checkpoint: dict[str, Any]) -> BitwiseMLP:
    """Round 2's network from its checkpoint (``path``: for messages)."""
    try:
        arch = checkpoint["architecture"]
        net = BitwiseMLP(
            arch["n_in"], list(arch["hidden"]), arch["n_out"], arch["sparsity"], arch["grad"], arch.get("norm", "none")
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise _damaged(path, f"not a round-2 checkpoint ({type(err).__name__}: {err})") from None
    _load_into(net, path, checkpoint)
    return net.eval()


def load_compressed(path: Path) -> CompressedMLP:
    return compressed_from_checkpoint(path, load_checkpoint(path))


def load_bitwise(path: Path) -> BitwiseMLP:
    return bitwise_from_checkpoint(path, load_checkpoint(path))
