"""Cost accounting: multiply-accumulates and weight memory, per layer and in total.

Convention (in the spirit of ``larq.models.summary``; documented in the README):

- The bias is one more input of each unit (the paper's 1024 x 1025 matrix), so a layer of ``n_in`` inputs
  and ``n_out`` units has ``n_out * (n_in + 1)`` parameters.
- Real-valued twin: every parameter is one 32-bit MAC per example and 32 bits of memory.
- Bitwise network: one binary MAC (an XNOR-popcount bit operation) per nonzero weight plus one per unit
  for its constant; zero weights cost no operation. The constant is the paper's bias in {-1, +1} (a
  binary MAC of the always-+1 bias input) or, in a network with batch norm folded into thresholds, an
  integer ``c = -threshold``; then the unit's ``W z + c >= 0`` is one integer add (or, equivalently, one
  integer compare ``W z >= threshold``) per unit, counted as one operation as well. Both engines run
  exactly that (the constant is folded into one offset added per unit), so a threshold network has the
  same operation count as the paper network of the same weights.
- Memory, as the exported model file (:mod:`bnn_core.model_file`, version 2) stores it: a layer without
  zeros takes one sign bit per weight; a layer with zeros takes a mask bit per weight plus a sign bit per
  nonzero weight (``2 - sparsity`` bits per weight); plus the constants. Without the biases
  (``cost_report(weights)``, the paper's convention) that is one bit per unit. Given the biases it is
  ``k`` bits per unit as the file stores them (:func:`bnn_core.packed.bias_code`: ``c = min + step * u``,
  ``k = bit_length(max u)``): 1 for the paper's {-1, +1}, 0 when a layer's constants are all equal, and
  ``k`` for integer thresholds spanning up to ``2^k - 1`` steps. (The layer's ``min`` and ``step`` sit in
  the file's header, with the layer sizes: fixed overhead, not counted here.)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bnn_core.packed import bias_code, bias_problem

FLOAT_BITS = 32
#: Bit-ops of one 32-bit MAC (QONNX BOPs: bits(input) x bits(weight)); a binary MAC counts 1.
FLOAT_MAC_BIT_OPS = FLOAT_BITS * FLOAT_BITS


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
    bias_bits: int  # bits per unit of the constants (included in binary_bits): 1 without the biases


def layer_cost(name: str, weights: np.ndarray, bias: np.ndarray | None = None) -> LayerCost:
    """Cost of one layer from its ternary weights ``[n_out, n_in]`` and, optionally, its integer constants
    ``bias [n_out]`` (``|c| <= n_in + 1``; ValueError otherwise): the constants then cost the ``k`` bits per
    unit the model file stores, otherwise 1 bit per unit (the paper's binary bias)."""
    weights = np.asarray(weights)
    n_out, n_in = weights.shape
    nonzero = int(np.count_nonzero(weights))
    if bias is None:
        bias_bits = 1
    else:
        bias = np.asarray(bias)
        if bias.shape != (n_out,):
            raise ValueError(f"layer {name}: bias {bias.shape} for {n_out} units")
        problem = bias_problem(bias, n_in)
        if problem:
            raise ValueError(f"layer {name}: {problem}")
        bias_bits = bias_code(bias)[0].bits
    return LayerCost(
        name=name,
        n_in=n_in,
        n_out=n_out,
        nonzero_weights=nonzero,
        binary_macs=nonzero + n_out,  # + one add of the constant per unit (binary bias or integer threshold)
        binary_bits=(weights.size + nonzero if nonzero < weights.size else weights.size) + bias_bits * n_out,
        real_macs=weights.size + n_out,
        real_bits=FLOAT_BITS * (weights.size + n_out),
        bias_bits=bias_bits,
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
            # Same MAC count for a dense network (1.00), so the cost gap is in the bits per MAC:
            "bit_ops_ratio": real_macs * FLOAT_MAC_BIT_OPS / binary_macs,
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
            f"bit-ops of the real-valued twin / bitwise network = {s['bit_ops_ratio']:,.0f}x "
            f"({FLOAT_MAC_BIT_OPS} per 32-bit MAC, 1 per binary MAC); "
            f"float32 bits / binary bits = {s['memory_ratio']:.2f}"
        )
        if any(layer.bias_bits != 1 for layer in self.layers):
            # Only for integer thresholds: a paper network's table stays as it was.
            per_layer = ", ".join(f"{layer.name} {layer.bias_bits}" for layer in self.layers)
            lines.append("")
            lines.append(
                f"Binary bits include each unit's integer constant as the model file stores it, bits per unit: "
                f"{per_layer}; its add (threshold compare) counts as one binary MAC per unit."
            )
        return "\n".join(lines)


def real_valued_cost(layer_sizes: list[int]) -> dict[str, int]:
    """32-bit MACs per example and weight bits of a real-valued network with these layer widths
    (input first): ``sum n_out * (n_in + 1)`` parameters, each one MAC and 32 bits."""
    parameters = sum(n_out * (n_in + 1) for n_in, n_out in itertools.pairwise(layer_sizes))
    return {"macs_per_example": parameters, "weight_bits": FLOAT_BITS * parameters}


def cost_report(layers: Sequence[np.ndarray], biases: Sequence[np.ndarray] | None = None) -> CostReport:
    """Cost of a network given its ternary weight matrices, input layer first, and optionally its integer
    constants (one vector per layer; see :func:`layer_cost`). Without ``biases`` each unit's constant
    costs one bit (the paper's network: exactly what the model file stores for +-1 biases)."""
    if biases is None:
        return CostReport([layer_cost(f"dense_{i}", w) for i, w in enumerate(layers)])
    if len(biases) != len(layers):
        raise ValueError(f"{len(biases)} bias vectors for {len(layers)} layers")
    return CostReport([layer_cost(f"dense_{i}", w, b) for i, (w, b) in enumerate(zip(layers, biases, strict=True))])
