"""Quantizers: how a layer turns its real-valued parameters and pre-activations into the values it uses.

A :class:`bnn_core.networks.QuantizedDense` layer computes ``a = Q_b(b) + Q_w(W) z`` and outputs
``act(a)``. ``Q_w``, ``Q_b`` and ``act`` are the quantizers below, each a small function registered by
name, so a config string selects it::

    q = quantizer("weight", "ternary", sparsity=0.5)   # the rule with its options bound
    w_used = q(w_shadow)                                # forward: {-1, 0, +1}; backward: identity

Every quantizer states its forward rule, its (pseudo-)gradient and its source. The forward rules of the
bitwise network are shared with the packed engine (:mod:`bnn_core.packed`), so both give identical
outputs; in particular ``sign(0) = +1`` (:data:`SIGN_OF_ZERO`).

Registries: :data:`WEIGHT_QUANTIZERS` (identity, tanh, ternary), :data:`BIAS_QUANTIZERS` (identity, tanh,
sign), :data:`ACTIVATIONS` (tanh, sign) and the backward rules of the sign activation,
:data:`SIGN_GRADIENTS` (identity, tanh, ste; config key ``finetune.grad``).

Round 1 of Kim & Smaragdis (2016) is tanh/tanh/tanh (or identity/identity/tanh for the real-valued
baseline); round 2 is ternary/sign/sign with the shadow weights updated by noisy backpropagation.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bnn_core.errors import ConfigError

SIGN_OF_ZERO = 1


def sign(x: torch.Tensor) -> torch.Tensor:
    """Bipolar sign, ``+1 if x >= 0 else -1`` (so ``sign(0) = +1``), in ``x``'s dtype; no gradient rule.

    The forward rule shared by every sign quantizer below and by the packed engine.
    """
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Weight and bias quantizers
# ---------------------------------------------------------------------------------------------------------


def identity(x: torch.Tensor) -> torch.Tensor:
    """No quantization.

    Forward: ``q(x) = x``. Gradient: ``dq/dx = 1`` (the tensor itself is returned, autograd sees no op).

    Source: the real-valued baseline of Kim & Smaragdis (2016), their comparison's uncompressed network.
    """
    return x


def tanh(x: torch.Tensor) -> torch.Tensor:
    """Weight compression (and round 1's activation): squash into ``(-1, 1)``.

    Forward: ``q(x) = tanh(x)``. Gradient: the exact derivative, ``dq/dx = 1 - tanh(x)^2``.

    Source: Kim & Smaragdis (2016), round 1: ``a_i = tanh(b~_i) + sum_j tanh(w~_ij) z_j``,
    ``z_i = tanh(a_i)``; the compressed weights ``tanh(W~)`` are where round 2 starts.
    """
    return torch.tanh(x)


def nonzero_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True for the weights that stay nonzero: all but the ``round(sparsity * n)`` smallest in magnitude."""
    n_zero = round(sparsity * w.numel())
    if n_zero == 0:
        return torch.ones_like(w, dtype=torch.bool)
    magnitude = w.detach().abs()
    return magnitude > kth_smallest(magnitude.flatten(), n_zero)


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest (1-based) of a flat tensor.

    Recomputed for every layer at every training step, so speed matters: on CPU numpy's introselect
    (``np.partition``) is about 25x faster than ``torch.kthvalue`` for a 1024 x 1568 layer (same value).
    """
    if values.device.type == "cpu":
        return torch.as_tensor(np.partition(values.numpy(), k - 1)[k - 1])
    return values.kthvalue(k).values


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return values

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        return grad_out, None


def straight_through(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` in the forward pass, with the gradient passed to ``x`` unchanged (``d out / dx = 1``).

    The same as ``x + (values - x).detach()`` without its two full-size passes (a third of a round-2 step
    at batch 100), and exact: the forward gives ``values`` themselves, not ``x + (values - x)`` rounded.
    """
    return _StraightThrough.apply(x, values)


def ternarize(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Ternary weights with sparsity ``lambda``, per tensor (one layer).

    Forward: ``q(w) = sign(w)`` if ``|w| > beta`` else ``0``, where ``beta`` is the
    ``round(lambda * n)``-th smallest ``|w|`` of the ``n`` weights (``beta = -inf``, no zeros, when that
    count is 0). Ties at ``beta`` all become 0, so at least ``round(lambda * n)`` weights are zero.
    Gradient: straight-through identity, ``dq/dw = 1``: the gradient computed with the ternary values
    updates the real-valued shadow weight unchanged.

    Args:
        w: shadow weights of one layer.
        sparsity: ``lambda``, the fraction of weights set to 0 (connections off).

    Source: Kim & Smaragdis (2016), round 2 ("noisy backpropagation"): sparsity ``lambda`` fixes a
    boundary ``beta``; forward with binarized values, updates to the real-valued weights.
    """
    w_fixed = w.detach()
    if round(sparsity * w.numel()) == 0:
        return straight_through(w, sign(w_fixed))
    return straight_through(w, torch.where(nonzero_mask(w_fixed, sparsity), sign(w_fixed), 0.0))


def binarize(x: torch.Tensor) -> torch.Tensor:
    """Binary bias, never 0: it is one more binary input of the unit (the paper's 1024 x 1025 matrix).

    Forward: ``q(x) = sign(x)``, ``+1`` for ``x >= 0``, ``-1`` otherwise.
    Gradient: straight-through identity, ``dq/dx = 1`` (not clipped: round 2 keeps the shadow values in
    ``[-1, 1]`` instead, :meth:`bnn_core.networks.BitwiseMLP.clip_shadow_weights`).

    Source: Kim & Smaragdis (2016), round 2 (the bias is binarized like the weights).
    """
    return straight_through(x, sign(x.detach()))


# ---------------------------------------------------------------------------------------------------------
# Activations and the backward rules of sign
# ---------------------------------------------------------------------------------------------------------
# The rules see the pre-activation in units of sqrt(fan_in), u = a / sqrt(fan_in): that is its standard
# deviation for random +-1 inputs and weights, so one rule fits every layer width.


def identity_grad(u: torch.Tensor) -> torch.Tensor:
    """``dz/da = 1``: errors pass through the sign as they are.

    Source: Kim & Smaragdis (2016); their noisy backpropagation equations carry no derivative of sign.
    """
    return torch.ones_like(u)


def tanh_grad(u: torch.Tensor) -> torch.Tensor:
    """``dz/da = 1 - tanh(u)^2`` with ``u = a / sqrt(fan_in)``: a smooth gate shaped like the derivative of
    round 1's tanh, taken on the scaled pre-activation and without its ``1/sqrt(fan_in)`` factor (our
    choice, docs/method.md section 4)."""
    return 1.0 - torch.tanh(u) ** 2


def ste_grad(u: torch.Tensor) -> torch.Tensor:
    """``dz/da = 1 if |u| <= 1 else 0`` with ``u = a / sqrt(fan_in)``: the clipped straight-through
    estimator.

    Source: Courbariaux, Hubara et al. (2016), "Binarized Neural Networks" (BinaryNet).
    """
    return (u.abs() <= 1.0).to(u.dtype)


SIGN_GRADIENTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": identity_grad,
    "tanh": tanh_grad,
    "ste": ste_grad,
}


class _SignActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, scale: float, grad: str) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(a)
        ctx.scale, ctx.grad = scale, grad
        return sign(a)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (a,) = ctx.saved_tensors
        return grad_out * SIGN_GRADIENTS[ctx.grad](a / ctx.scale), None, None


def sign_activation(a: torch.Tensor, fan_in: int, grad: str) -> torch.Tensor:
    """The bitwise network's activation, with a named backward rule.

    Forward: ``z = sign(a)``, ``+1`` for ``a >= 0`` (same rule as the packed engine).
    Pseudo-gradient: ``dz/da = g(a / sqrt(fan_in))`` with ``g`` from :data:`SIGN_GRADIENTS`:
    ``identity`` (1), ``tanh`` (``1 - tanh(u)^2``) or ``ste`` (``1{|u| <= 1}``).

    Args:
        a: pre-activations of a layer.
        fan_in: the layer's number of inputs (the scale ``sqrt(fan_in)`` of ``a``).
        grad: the backward rule's name (config ``finetune.grad``).

    Source: Kim & Smaragdis (2016), round 2 (``identity``); Courbariaux, Hubara et al. (2016) (``ste``).
    """
    if grad not in SIGN_GRADIENTS:
        raise ConfigError(f"unknown gradient rule {grad!r} for sign (choose one of {', '.join(SIGN_GRADIENTS)})")
    return _SignActivation.apply(a, math.sqrt(fan_in), grad)


# ---------------------------------------------------------------------------------------------------------
# Registries
# ---------------------------------------------------------------------------------------------------------

WEIGHT_QUANTIZERS: dict[str, Callable[..., torch.Tensor]] = {
    "identity": identity,
    "tanh": tanh,
    "ternary": ternarize,
}
BIAS_QUANTIZERS: dict[str, Callable[..., torch.Tensor]] = {
    "identity": identity,
    "tanh": tanh,
    "sign": binarize,
}
ACTIVATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "tanh": tanh,
    "sign": sign_activation,
}
REGISTRIES: dict[str, dict[str, Callable[..., torch.Tensor]]] = {
    "weight": WEIGHT_QUANTIZERS,
    "bias": BIAS_QUANTIZERS,
    "activation": ACTIVATIONS,
}


@dataclass(frozen=True)
class Quantizer:
    """A registered rule with its options bound: calling it applies ``rule(x, **options)``."""

    name: str
    rule: Callable[..., torch.Tensor]
    options: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.rule(x, **self.options)

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{key}={value!r}' for key, value in self.options.items())})"


def quantizer(kind: str, name: str, **options: Any) -> Quantizer:
    """The quantizer ``name`` of ``kind`` (``weight``, ``bias`` or ``activation``) with ``options`` bound.

    Raises :class:`ConfigError` for an unknown name, and ``TypeError`` at once (not at the first forward
    pass) when the options do not fit the rule's arguments.
    """
    registry = REGISTRIES[kind]
    if name not in registry:
        raise ConfigError(f"unknown {kind} quantizer {name!r} (choose one of {', '.join(registry)})")
    inspect.signature(registry[name]).bind(None, **options)
    return Quantizer(name, registry[name], dict(options))
