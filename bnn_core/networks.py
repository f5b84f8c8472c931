"""The two networks of Kim & Smaragdis (2016), built from one layer with pluggable quantizers.

:class:`QuantizedDense` is a fully connected layer ``a = Q_b(b) + Q_w(W) z`` with output ``act(a)``; the
quantizers ``Q_w``, ``Q_b`` and ``act`` are selected by name from :mod:`bnn_core.quantizers`.
:class:`QuantizedMLP` stacks them ``n_in -> hidden... -> n_out``; the last layer has no activation, its
pre-activations are the class scores (softmax cross-entropy in training, argmax at inference, ties to the
lowest index). The two rounds are two settings of the stack:

- :class:`CompressedMLP` (round 1): tanh weights, tanh biases, tanh activations, dropout; with
  ``compress=False`` identity weights and biases (the plain real-valued baseline);
- :class:`BitwiseMLP` (round 2): ternary weights, sign biases, sign activations (named backward rule).

Both take ``norm``: ``"none"`` is the paper's network; ``"batchnorm"`` puts batch norm between each
hidden layer's pre-activation and its activation (``bnn_bn``, the integer-threshold network of
docs/method.md section 8). At inference batch norm followed by sign is one integer comparison per unit
(:func:`fold_batchnorm`), which is what the bitwise network computes in eval mode and what it exports.

Checkpoints hold ``layers.<i>.weight`` and ``layers.<i>.bias``: the real-valued parameters (the shadow
weights in round 2) before quantization, and with batch norm ``layers.<i>.activation.norm.*``.
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import torch
from torch import nn

from bnn_core.errors import ConfigError
from bnn_core.quantizers import Quantizer, quantizer, sign

NORMS = ("none", "batchnorm")


def fold_batchnorm(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Batch norm followed by sign, on integer pre-activations, as one integer comparison per unit.

    Batch norm at inference is ``y = s (a - mu) + beta`` with ``s = gamma / sqrt(var + eps)``, and the
    unit outputs ``+1`` iff ``y >= 0`` (``sign(0) = +1``). For an integer ``a``, with
    ``c = mu - beta / s`` (computed in float64):

    - ``s > 0``: ``y >= 0  <=>  a >= c  <=>  a >= ceil(c)``:            ``flip = +1, t = ceil(c)``;
    - ``s < 0``: ``y >= 0  <=>  a <= c  <=>  -a >= -floor(c)``:          ``flip = -1, t = -floor(c)``;
    - ``s = 0``: ``y = beta`` is constant: always ``+1`` if ``beta >= 0`` (``t = -inf``), else never.

    So the unit outputs ``+1`` iff ``flip * a >= t``. Thresholds that no pre-activation can cross are
    returned as ``+-inf`` (float64) here; :meth:`BitwiseMLP.export_layers` clips them to the layer's reach.

    Returns ``(flip float64 [n] in {-1, +1}, t float64 [n], integers or +-inf)``.

    Source: the folding of BinaryNet's batch norm into thresholds used by FINN (Umuroglu et al. 2017,
    section 4.2.2); docs/method.md section 8.
    """
    gamma, beta, mean, var = (np.asarray(v, dtype=np.float64) for v in (gamma, beta, mean, var))
    scale = gamma / np.sqrt(var + eps)
    flip = np.where(scale < 0, -1.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # s = 0 or tiny: handled below
        c = mean - beta / scale
    threshold = np.where(scale > 0, np.ceil(c), -np.floor(c))
    constant = np.where(beta >= 0, -np.inf, np.inf)
    return flip, np.where(scale == 0, constant, threshold)


class NormActivation(nn.Module):
    """``act(BN(a))``: batch norm over a layer's units, then its activation (a hidden layer of ``bnn_bn``)."""

    def __init__(self, n_units: int, activation: Quantizer):
        super().__init__()
        self.norm = nn.BatchNorm1d(n_units)
        self.activation = activation

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm(a))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class ThresholdSign(NormActivation):
    """``sign(BN(a))`` of the bitwise network: batch statistics in training, integer thresholds in eval.

    Training: ``z = sign(BN(a))`` with the sign's named backward rule on the normalized value (scale 1:
    batch norm already puts it in units of its standard deviation). Eval: ``z = +1`` iff
    ``flip * a >= t`` (:func:`fold_batchnorm` of the running statistics), the rule the exported network
    computes, so the simulation and every engine agree exactly (``a`` is an exact integer in float32).
    """

    def __init__(self, n_units: int, grad: str):
        super().__init__(n_units, quantizer("activation", "sign", fan_in=1, grad=grad))

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """``(flip, t)`` of :func:`fold_batchnorm` for the current running statistics."""
        bn = self.norm
        return fold_batchnorm(
            bn.weight.detach().cpu().numpy(),
            bn.bias.detach().cpu().numpy(),
            bn.running_mean.cpu().numpy(),
            bn.running_var.cpu().numpy(),
            bn.eps,
        )

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(a)
        flip, threshold = (torch.from_numpy(v).to(a.device) for v in self.folded())
        return sign((flip * a.double() - threshold).to(a.dtype))


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
        activation: Quantizer | nn.Module | None,
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

    ``dropout_hidden`` is one rate for every hidden layer or a list with one rate per hidden layer. With
    ``p = 0`` dropout returns its input unchanged and draws no random numbers.
    """

    def __init__(
        self,
        layers: list[QuantizedDense],
        dropout_input: float = 0.0,
        dropout_hidden: float | list[float] = 0.0,
    ):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        rates = dropout_hidden if isinstance(dropout_hidden, list | tuple) else [dropout_hidden] * (len(layers) - 1)
        if len(rates) != len(layers) - 1:
            raise ValueError(f"{len(rates)} hidden dropout rates for {len(layers) - 1} hidden layers")
        self.dropout_input = nn.Dropout(dropout_input)
        self.dropout_hidden = nn.ModuleList(nn.Dropout(rate) for rate in rates)

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
        for layer, dropout in zip(hidden_layers, self.dropout_hidden, strict=True):
            z = dropout(layer(z))
        return output_layer(z)


def _layer_sizes(n_in: int, hidden: list[int], n_out: int) -> list[tuple[int, int]]:
    """``(fan_in, fan_out)`` of each layer, input layer first."""
    return list(pairwise([n_in, *hidden, n_out]))


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ConfigError(f"unknown normalization {norm!r} (choose one of {', '.join(NORMS)})")


class CompressedMLP(QuantizedMLP):
    """Round 1: ``a_i = tanh(b~_i) + sum_j tanh(w~_ij) z_j``, ``z_i = tanh(a_i)`` (docs/method.md, section 3).

    Weights live in [-1, 1] through tanh, so binarizing them later is a small step. Dropout on the input
    and on each hidden layer (Srivastava et al. 2014). With ``compress=False`` the weights are used as
    they are: the plain real-valued baseline of the paper's comparison. With ``norm="batchnorm"`` each
    hidden layer is ``z = tanh(BN(a))`` (round 1 of ``bnn_bn``).
    """

    def __init__(
        self,
        n_in: int,
        hidden: list[int],
        n_out: int,
        dropout_input: float,
        dropout_hidden: float | list[float],
        compress: bool = True,
        norm: str = "none",
    ):
        _check_norm(norm)
        name = "tanh" if compress else "identity"
        sizes = _layer_sizes(n_in, hidden, n_out)

        def activation(fan_out: int) -> Quantizer | nn.Module:
            tanh = quantizer("activation", "tanh")
            return NormActivation(fan_out, tanh) if norm == "batchnorm" else tanh

        layers = [
            QuantizedDense(
                fan_in,
                fan_out,
                # Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), as torch's Linear: tanh is near-linear there.
                1.0 / math.sqrt(fan_in),
                quantizer("weight", name),
                quantizer("bias", name),
                activation(fan_out) if i < len(sizes) - 1 else None,
            )
            for i, (fan_in, fan_out) in enumerate(sizes)
        ]
        super().__init__(layers, dropout_input, dropout_hidden)
        self.compress = compress
        self.norm = norm


class BitwiseMLP(QuantizedMLP):
    """Round 2 (training-time simulation of the bitwise network).

    Forward uses only ternary weights, binary biases and ``sign`` activations, so every pre-activation is
    an integer ``a_i = b_i + sum_j w_ij z_j`` (exact in float32 below 2**24). The parameters are the
    real-valued shadow weights that noisy backpropagation updates; ``grad_rule`` names the backward rule
    of sign (:data:`bnn_core.quantizers.SIGN_GRADIENTS`).

    With ``norm="batchnorm"`` (``bnn_bn``) each hidden layer is ``z = sign(BN(a))``
    (:class:`ThresholdSign`): an integer threshold per unit at inference. The output layer has no batch
    norm in either network: its scores are the integers ``b + W z``, so argmax is exact in every engine.
    """

    def __init__(
        self, n_in: int, hidden: list[int], n_out: int, sparsity: float, grad_rule: str, norm: str = "none"
    ):
        _check_norm(norm)
        sizes = _layer_sizes(n_in, hidden, n_out)

        def activation(fan_in: int, fan_out: int) -> Quantizer | nn.Module:
            if norm == "batchnorm":
                return ThresholdSign(fan_out, grad_rule)
            return quantizer("activation", "sign", fan_in=fan_in, grad=grad_rule)

        layers = [
            QuantizedDense(
                fan_in,
                fan_out,
                # Paper network: shadow weights uniform in [-1, 1], the range they are clipped to. bnn_bn:
                # batch norm makes the forward pass blind to their scale (only signs count), so the scale
                # only sets how many Adam steps a sign flip takes; torch's Linear scale, 1/sqrt(fan_in),
                # lets training from random weights flip them as fast as a float network moves.
                1.0 if norm == "none" else 1.0 / math.sqrt(fan_in),
                quantizer("weight", "ternary", sparsity=sparsity),
                quantizer("bias", "sign"),
                activation(fan_in, fan_out) if i < len(sizes) - 1 else None,
            )
            for i, (fan_in, fan_out) in enumerate(sizes)
        ]
        super().__init__(layers)
        self.sparsity = sparsity
        self.grad_rule = grad_rule
        self.norm = norm

    @classmethod
    def from_compressed(cls, real: CompressedMLP, sparsity: float, grad_rule: str) -> BitwiseMLP:
        """Start from round 1's compressed weights ``tanh(W~)``, ``tanh(b~)`` (and its batch norm's
        scale and shift; the running statistics are re-estimated, since ternary sums are on another scale)."""
        net = cls(real.n_in, real.hidden, real.n_out, sparsity, grad_rule, real.norm)
        with torch.no_grad():
            for (w, b), layer, source in zip(real.quantized_parameters(), net.layers, real.layers, strict=True):
                layer.weight.copy_(w)
                layer.bias.copy_(b)
                if isinstance(layer.activation, ThresholdSign):
                    layer.activation.norm.weight.copy_(source.activation.norm.weight)
                    layer.activation.norm.bias.copy_(source.activation.norm.bias)
        return net

    @torch.no_grad()
    def clip_shadow_weights(self) -> None:
        """Keep shadow weights in [-1, 1] (as BinaryNet): beyond that a weight could never flip back."""
        for layer in self.layers:
            layer.weight.clamp_(-1.0, 1.0)
            layer.bias.clamp_(-1.0, 1.0)

    @torch.no_grad()
    def export_layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The inference network: ``(W int8 [out, in] in {-1,0,1}, c int32 [out])`` per layer, where a
        hidden unit outputs ``+1`` iff ``W z + c >= 0`` and the last layer's ``W z + c`` are the scores.

        Paper network: ``c = b`` in {-1, +1}. ``bnn_bn``: with the folded ``flip * (W z + b) >= t``
        (:func:`fold_batchnorm`) the flip goes into the row, ``W' = flip W``, and
        ``c = flip b - t``, clipped to ``[-(n_in + 1), n_in]``: ``W' z`` lies in ``[-n_in, n_in]``, so
        ``c = n_in`` is always on and ``c = -(n_in + 1)`` never, exactly like any value beyond them.
        """
        exported = []
        for (w, b), layer in zip(self.quantized_parameters(), self.layers, strict=True):
            weights = w.detach().cpu().to(torch.int8).numpy().copy()
            bias = sign(b.detach().cpu()).numpy().astype(np.float64)
            if isinstance(layer.activation, ThresholdSign):
                flip, threshold = layer.activation.folded()
                weights = weights * flip.astype(np.int8)[:, None]
                n_in = weights.shape[1]
                with np.errstate(invalid="ignore"):
                    bias = np.clip(flip * bias - threshold, -(n_in + 1), n_in)
            exported.append((weights, bias.astype(np.int32)))
        return exported


def predict_classes(scores: torch.Tensor | np.ndarray) -> np.ndarray:
    """Argmax over classes, ties to the lowest index (torch and numpy both return the first maximum)."""
    return np.asarray(scores).argmax(axis=1)
