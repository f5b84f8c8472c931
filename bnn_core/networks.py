"""The two networks of Kim & Smaragdis (2016), built from one layer with pluggable quantizers.

:class:`QuantizedDense` is a fully connected layer ``a = Q_b(b) + Q_w(W) z`` with output ``act(a)``; the
quantizers ``Q_w``, ``Q_b`` and ``act`` are selected by name from :mod:`bnn_core.quantizers`.
:class:`QuantizedMLP` stacks them ``n_in -> hidden... -> n_out``; the last layer has no activation, its
pre-activations are the class scores (softmax cross-entropy in training, argmax at inference, ties to the
lowest index). The two rounds are two settings of the stack:

- :class:`CompressedMLP` (round 1): tanh weights, tanh biases, tanh activations, dropout; with
  ``compress=False`` identity weights and biases (the plain real-valued baseline);
- :class:`BitwiseMLP` (round 2): ternary weights, sign biases, sign activations (named backward rule).

Checkpoints hold ``layers.<i>.weight`` and ``layers.<i>.bias``: the real-valued parameters (the shadow
weights in round 2) before quantization.
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import torch
from torch import nn

from bnn_core.quantizers import Quantizer, quantizer, sign


class QuantizedDense(nn.Module):
    """One fully connected layer: ``a = Q_b(b) + Q_w(W) z``, output ``act(a)`` (``a`` without activation).

    ``weight`` (``[fan_out, fan_in]``) and ``bias`` (``[fan_out]``) are the real-valued parameters the
    optimizer updates; the forward pass only ever sees their quantized values.
    """

    def __init__(
        self,
        fan_in: int,
        fan_out: int,
        init_bound: float,
        weight_quantizer: Quantizer,
        bias_quantizer: Quantizer,
        activation: Quantizer | None,
    ):
        super().__init__()
        # Uniform(-init_bound, init_bound); the weight is drawn before the bias, so that under one seed
        # every network (and every checkpoint made so far) starts from the same parameters.
        self.weight = nn.Parameter(torch.empty(fan_out, fan_in).uniform_(-init_bound, init_bound))
        self.bias = nn.Parameter(torch.empty(fan_out).uniform_(-init_bound, init_bound))
        self.weight_quantizer = weight_quantizer
        self.bias_quantizer = bias_quantizer
        self.activation = activation

    @property
    def fan_in(self) -> int:
        return self.weight.shape[1]

    @property
    def fan_out(self) -> int:
        return self.weight.shape[0]

    def quantized_parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q_w(W), Q_b(b))``: the values the forward pass uses, with the quantizers' gradients."""
        return self.weight_quantizer(self.weight), self.bias_quantizer(self.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        w, b = self.quantized_parameters()
        # ``z @ w.T + b``, not ``F.linear``: addmm rounds differently, and the float outputs of the
        # compressed network must not depend on this refactoring. (Bitwise sums are exact either way.)
        a = z @ w.T + b
        return a if self.activation is None else self.activation(a)

    def extra_repr(self) -> str:
        return (
            f"fan_in={self.fan_in}, fan_out={self.fan_out}, weight={self.weight_quantizer!r}, "
            f"bias={self.bias_quantizer!r}, activation={self.activation!r}"
        )


class QuantizedMLP(nn.Module):
    """A stack of :class:`QuantizedDense` layers; dropout on the input and on each hidden layer's output.

    With ``p = 0`` dropout returns its input unchanged and draws no random numbers.
    """

    def __init__(self, layers: list[QuantizedDense], dropout_input: float = 0.0, dropout_hidden: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.dropout_input = nn.Dropout(dropout_input)
        self.dropout_hidden = nn.Dropout(dropout_hidden)

    @property
    def n_in(self) -> int:
        return self.layers[0].fan_in

    @property
    def hidden(self) -> list[int]:
        return [layer.fan_out for layer in self.layers[:-1]]

    @property
    def n_out(self) -> int:
        return self.layers[-1].fan_out

    def quantized_parameters(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(Q_w(W), Q_b(b))`` per layer, input layer first."""
        return [layer.quantized_parameters() for layer in self.layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's pre-activations (class scores)."""
        *hidden_layers, output_layer = self.layers
        z = self.dropout_input(x)
        for layer in hidden_layers:
            z = self.dropout_hidden(layer(z))
        return output_layer(z)


def _layer_sizes(n_in: int, hidden: list[int], n_out: int) -> list[tuple[int, int]]:
    """``(fan_in, fan_out)`` of each layer, input layer first."""
    return list(pairwise([n_in, *hidden, n_out]))


class CompressedMLP(QuantizedMLP):
    """Round 1: ``a_i = tanh(b~_i) + sum_j tanh(w~_ij) z_j``, ``z_i = tanh(a_i)`` (docs/method.md, section 3).

    Weights live in [-1, 1] through tanh, so binarizing them later is a small step. Dropout on the input
    and on each hidden layer (Srivastava et al. 2014). With ``compress=False`` the weights are used as
    they are: the plain real-valued baseline of the paper's comparison.
    """

    def __init__(
        self,
        n_in: int,
        hidden: list[int],
        n_out: int,
        dropout_input: float,
        dropout_hidden: float,
        compress: bool = True,
    ):
        name = "tanh" if compress else "identity"
        sizes = _layer_sizes(n_in, hidden, n_out)
        layers = [
            QuantizedDense(
                fan_in,
                fan_out,
                # Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), as torch's Linear: tanh is near-linear there.
                1.0 / math.sqrt(fan_in),
                quantizer("weight", name),
                quantizer("bias", name),
                quantizer("activation", "tanh") if i < len(sizes) - 1 else None,
            )
            for i, (fan_in, fan_out) in enumerate(sizes)
        ]
        super().__init__(layers, dropout_input, dropout_hidden)
        self.compress = compress


class BitwiseMLP(QuantizedMLP):
    """Round 2 (training-time simulation of the bitwise network).

    Forward uses only ternary weights, binary biases and ``sign`` activations, so every pre-activation is
    an integer ``a_i = b_i + sum_j w_ij z_j`` (exact in float32 below 2**24). The parameters are the
    real-valued shadow weights that noisy backpropagation updates; ``grad_rule`` names the backward rule
    of sign (:data:`bnn_core.quantizers.SIGN_GRADIENTS`).
    """

    def __init__(self, n_in: int, hidden: list[int], n_out: int, sparsity: float, grad_rule: str):
        sizes = _layer_sizes(n_in, hidden, n_out)
        layers = [
            QuantizedDense(
                fan_in,
                fan_out,
                1.0,  # shadow weights uniform in [-1, 1], the range they are clipped to
                quantizer("weight", "ternary", sparsity=sparsity),
                quantizer("bias", "sign"),
                quantizer("activation", "sign", fan_in=fan_in, grad=grad_rule) if i < len(sizes) - 1 else None,
            )
            for i, (fan_in, fan_out) in enumerate(sizes)
        ]
        super().__init__(layers)
        self.sparsity = sparsity
        self.grad_rule = grad_rule

    @classmethod
    def from_compressed(cls, real: CompressedMLP, sparsity: float, grad_rule: str) -> BitwiseMLP:
        """Start from round 1's compressed weights ``tanh(W~)``, ``tanh(b~)``."""
        net = cls(real.n_in, real.hidden, real.n_out, sparsity, grad_rule)
        with torch.no_grad():
            for (w, b), layer in zip(real.quantized_parameters(), net.layers, strict=True):
                layer.weight.copy_(w)
                layer.bias.copy_(b)
        return net

    @torch.no_grad()
    def clip_shadow_weights(self) -> None:
        """Keep shadow weights in [-1, 1] (as BinaryNet): beyond that a weight could never flip back."""
        for layer in self.layers:
            layer.weight.clamp_(-1.0, 1.0)
            layer.bias.clamp_(-1.0, 1.0)

    @torch.no_grad()
    def export_layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The inference network: ``(W int8 [out, in] in {-1,0,1}, b int8 [out] in {-1,1})`` per layer."""
        return [
            (w.detach().to(torch.int8).numpy().copy(), sign(b.detach()).to(torch.int8).numpy().copy())
            for w, b in self.quantized_parameters()
        ]


def predict_classes(scores: torch.Tensor | np.ndarray) -> np.ndarray:
    """Argmax over classes, ties to the lowest index (torch and numpy both return the first maximum)."""
    return np.asarray(scores).argmax(axis=1)
