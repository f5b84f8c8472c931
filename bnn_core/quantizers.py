"""Binarization rules of the bitwise network and their pseudo-gradients (method.md, round 2).

Forward rules (shared with the packed engine, so both give identical outputs):

- activation ``sign(a) = +1 if a >= 0 else -1``: sign(0) is +1 (:data:`SIGN_OF_ZERO`);
- weight ternarization with sparsity ``lambda``: per layer, the ``round(lambda * n)`` weights of smallest
  magnitude become 0 (``beta`` = their largest magnitude), the rest ``sign(w)``;
- bias binarization: ``sign(b)``, never 0 (the bias is one more binary input, paper's 1024 x 1025 matrix).

Backward rules for ``z = sign(a)``, selected by name (``finetune.grad``). They see the pre-activation in
units of ``sqrt(fan_in)``, ``u = a / sqrt(fan_in)``, which is its standard deviation for random +-1
inputs and weights, so one rule fits every layer width:

- ``identity``: ``dz/da = 1``. Kim & Smaragdis's noisy backpropagation equations carry no sign
  derivative: errors pass through the binarized network as they are.
- ``tanh``: ``dz/da = 1 - tanh(u)^2``, the derivative of round 1's tanh activation.
- ``ste``: ``dz/da = 1 if |u| <= 1 else 0``, the clipped straight-through estimator of BinaryNet
  (Courbariaux, Hubara et al. 2016).

Weights and biases use the identity straight-through estimator: gradients computed with the binarized
values update the real-valued shadow weights unchanged (noisy backpropagation).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from bnn_core.errors import ConfigError

SIGN_OF_ZERO = 1


def identity_grad(u: torch.Tensor) -> torch.Tensor:
    """Paper's rule: ``dz/da = 1``."""
    return torch.ones_like(u)


def tanh_grad(u: torch.Tensor) -> torch.Tensor:
    """``dz/da = 1 - tanh(u)^2`` with ``u = a / sqrt(fan_in)``."""
    return 1.0 - torch.tanh(u) ** 2


def ste_grad(u: torch.Tensor) -> torch.Tensor:
    """Clipped straight-through: ``dz/da = 1{|u| <= 1}`` with ``u = a / sqrt(fan_in)``."""
    return (u.abs() <= 1.0).to(u.dtype)


SIGN_GRADIENTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": identity_grad,
    "tanh": tanh_grad,
    "ste": ste_grad,
}


def sign(x: torch.Tensor) -> torch.Tensor:
    """Bipolar sign with ``sign(0) = +1``."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class _SignActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, scale: float, rule: str) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(a)
        ctx.scale, ctx.rule = scale, rule
        return sign(a)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (a,) = ctx.saved_tensors
        return grad_out * SIGN_GRADIENTS[ctx.rule](a / ctx.scale), None, None


def sign_activation(a: torch.Tensor, fan_in: int, rule: str) -> torch.Tensor:
    """``sign(a)`` forward; backward by the named rule on ``u = a / sqrt(fan_in)``."""
    if rule not in SIGN_GRADIENTS:
        raise ConfigError(f"finetune.grad: unknown rule {rule!r} (choose one of {', '.join(SIGN_GRADIENTS)})")
    return _SignActivation.apply(a, math.sqrt(fan_in), rule)


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


def ternarize(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Ternary weights ``{-1, 0, +1}`` with a straight-through (identity) gradient to the shadow ``w``."""
    hard = sign(w.detach()) * nonzero_mask(w, sparsity)
    return w + (hard - w).detach()


def binarize(b: torch.Tensor) -> torch.Tensor:
    """Binary ``{-1, +1}`` values with a straight-through (identity) gradient to the shadow ``b``."""
    return b + (sign(b.detach()) - b).detach()
