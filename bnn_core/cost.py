"""Cost accounting: multiply-accumulates and weight memory, per layer and in total.

Convention (in the spirit of ``larq.models.summary``; documented in the README):

- The bias is one more input of each unit (the paper's 1024 x 1025 matrix), so a layer of ``n_in`` inputs
  and ``n_out`` units has ``n_out * (n_in + 1)`` parameters.
- Real-valued twin: every parameter is one 32-bit MAC per example and 32 bits of memory.
- Bitwise network: one binary MAC (an XNOR-popcount bit operation) per nonzero weight plus one per bias;
  zero weights cost no operation. Memory, as the exported model file stores it: a layer without zeros
  takes one sign bit per weight; a layer with zeros takes a mask bit per weight plus a sign bit per
  nonzero weight (``2 - sparsity`` bits per weight); plus one bit per bias.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

FLOAT_BITS = 32


@dataclass(frozen=True)
class LayerCost:
    name: str
    n_in: int
    n_out: int
    nonzero_weights: int
    binary_macs: int
    binary_bits: int
    real_macs: int
    real_bits: int


def layer_cost(name: str, weights: np.ndarray) -> LayerCost:
    """Cost of one layer from its ternary weights ``[n_out, n_in]``."""
    n_out, n_in = weights.shape
    nonzero = int(np.count_nonzero(weights))
    return LayerCost(
        name=name,
        n_in=n_in,
        n_out=n_out,
        nonzero_weights=nonzero,
        binary_macs=nonzero + n_out,
        binary_bits=(weights.size + nonzero if nonzero < weights.size else weights.size) + n_out,
        real_macs=weights.size + n_out,
        real_bits=FLOAT_BITS * (weights.size + n_out),
    )


@dataclass(frozen=True)
class CostReport:
    layers: list[LayerCost]

    def total(self, field: str) -> int:
        return sum(getattr(layer, field) for layer in self.layers)

    def summary(self) -> dict[str, float]:
        binary_macs, real_macs = self.total("binary_macs"), self.total("real_macs")
        binary_bits, real_bits = self.total("binary_bits"), self.total("real_bits")
        return {
            "binary_macs": binary_macs,
            "real_macs": real_macs,
            "macs_ratio": real_macs / binary_macs,
            "binary_weight_bits": binary_bits,
            "real_weight_bits": real_bits,
            "memory_ratio": real_bits / binary_bits,
        }

    def to_markdown(self) -> str:
        header = (
            "| layer | inputs | outputs | nonzero weights | binary MACs | binary bits | 32-bit MACs | float32 bits |"
        )
        lines = [header, "|" + "---|" * 8]
        for layer in self.layers:
            lines.append(
                f"| {layer.name} | {layer.n_in} | {layer.n_out} | {layer.nonzero_weights:,} | {layer.binary_macs:,} "
                f"| {layer.binary_bits:,} | {layer.real_macs:,} | {layer.real_bits:,} |"
            )
        s = self.summary()
        lines.append(
            f"| **total** | | | {self.total('nonzero_weights'):,} | {s['binary_macs']:,} | {s['binary_weight_bits']:,} "
            f"| {s['real_macs']:,} | {s['real_weight_bits']:,} |"
        )
        lines.append("")
        lines.append(
            f"32-bit MACs / binary MACs = {s['macs_ratio']:.2f}; float32 bits / binary bits = {s['memory_ratio']:.2f}"
        )
        return "\n".join(lines)


def real_valued_cost(layer_sizes: list[int]) -> dict[str, int]:
    """32-bit MACs per example and weight bits of a real-valued network with these layer widths
    (input first): ``sum n_out * (n_in + 1)`` parameters, each one MAC and 32 bits."""
    parameters = sum(n_out * (n_in + 1) for n_in, n_out in itertools.pairwise(layer_sizes))
    return {"macs_per_example": parameters, "weight_bits": FLOAT_BITS * parameters}


def cost_report(layers: list[np.ndarray]) -> CostReport:
    """Cost of a network given its ternary weight matrices, input layer first."""
    return CostReport([layer_cost(f"dense_{i}", w) for i, w in enumerate(layers)])
