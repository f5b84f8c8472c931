"""The two networks of Kim & Smaragdis (2016): the tanh-compressed real network and the bitwise one.

Both are plain fully connected stacks ``n_in -> hidden... -> n_out``; the last layer's pre-activations
are the class scores (softmax cross-entropy in training, argmax at inference, ties to the lowest index).
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import torch
from torch import nn

from bnn_core.quantizers import binarize, sign, sign_activation, ternarize


def _layer_sizes(n_in: int, hidden: list[int], n_out: int) -> list[tuple[int, int]]:
    """``(fan_in, fan_out)`` of each layer, input layer first."""
    return list(pairwise([n_in, *hidden, n_out]))


class CompressedMLP(nn.Module):
    """Round 1: ``a_i = tanh(b~_i) + sum_j tanh(w~_ij) z_j``, ``z_i = tanh(a_i)`` (method.md).

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
        super().__init__()
        self.compress = compress
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in _layer_sizes(n_in, hidden, n_out):
            # Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), as torch's Linear: tanh is near-linear there.
            bound = 1.0 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(torch.empty(fan_out, fan_in).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(fan_out).uniform_(-bound, bound)))
        self.dropout_input = nn.Dropout(dropout_input)
        self.dropout_hidden = nn.Dropout(dropout_hidden)

    def compressed_parameters(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(tanh(W~), tanh(b~))`` per layer: the weights round 2 starts from (``(W, b)`` uncompressed)."""
        pairs = zip(self.weights, self.biases, strict=True)
        return [(torch.tanh(w), torch.tanh(b)) if self.compress else (w, b) for w, b in pairs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.dropout_input(x)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(self.compressed_parameters()):
            a = z @ w.T + b
            if i == last:
                return a
            z = self.dropout_hidden(torch.tanh(a))
        raise AssertionError("unreachable")


class BitwiseMLP(nn.Module):
    """Round 2 (training-time simulation of the bitwise network).

    Forward uses only ternary weights, binary biases and ``sign`` activations, so every pre-activation is
    an integer ``a_i = b_i + sum_j w_ij z_j`` (exact in float32 below 2**24). The parameters are the
    real-valued shadow weights that noisy backpropagation updates.
    """

    def __init__(self, n_in: int, hidden: list[int], n_out: int, sparsity: float, grad_rule: str):
        super().__init__()
        self.sparsity = sparsity
        self.grad_rule = grad_rule
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in _layer_sizes(n_in, hidden, n_out):
            self.weights.append(nn.Parameter(torch.empty(fan_out, fan_in).uniform_(-1, 1)))
            self.biases.append(nn.Parameter(torch.empty(fan_out).uniform_(-1, 1)))

    @classmethod
    def from_compressed(cls, real: CompressedMLP, sparsity: float, grad_rule: str) -> BitwiseMLP:
        """Start from round 1's compressed weights ``tanh(W~)``, ``tanh(b~)``."""
        n_in = real.weights[0].shape[1]
        hidden = [w.shape[0] for w in real.weights[:-1]]
        net = cls(n_in, hidden, real.weights[-1].shape[0], sparsity, grad_rule)
        with torch.no_grad():
            for (w, b), w_net, b_net in zip(real.compressed_parameters(), net.weights, net.biases, strict=True):
                w_net.copy_(w)
                b_net.copy_(b)
        return net

    def binary_parameters(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(W in {-1,0,+1}, b in {-1,+1})`` per layer, with straight-through gradients."""
        return [(ternarize(w, self.sparsity), binarize(b)) for w, b in zip(self.weights, self.biases, strict=True)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Integer-valued pre-activations of the last layer."""
        z = x
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(self.binary_parameters()):
            a = z @ w.T + b
            if i == last:
                return a
            z = sign_activation(a, w.shape[1], self.grad_rule)
        raise AssertionError("unreachable")

    @torch.no_grad()
    def clip_shadow_weights(self) -> None:
        """Keep shadow weights in [-1, 1] (as BinaryNet): beyond that a weight could never flip back."""
        for p in [*self.weights, *self.biases]:
            p.clamp_(-1.0, 1.0)

    @torch.no_grad()
    def export_layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The inference network: ``(W int8 [out, in] in {-1,0,1}, b int8 [out] in {-1,1})`` per layer."""
        return [
            (w.detach().to(torch.int8).numpy().copy(), sign(b.detach()).to(torch.int8).numpy().copy())
            for w, b in self.binary_parameters()
        ]


def predict_classes(scores: torch.Tensor | np.ndarray) -> np.ndarray:
    """Argmax over classes, ties to the lowest index (torch and numpy both return the first maximum)."""
    return np.asarray(scores).argmax(axis=1)
