import math

import numpy as np
import pytest
import torch

from bnn_core.errors import ConfigError
from bnn_core.networks import BitwiseMLP, CompressedMLP
from bnn_core.quantizers import (
    SIGN_GRADIENTS,
    binarize,
    kth_smallest,
    nonzero_mask,
    sign,
    sign_activation,
    ternarize,
)


def test_sign_of_zero_is_plus_one():
    np.testing.assert_array_equal(sign(torch.tensor([-2.0, 0.0, 3.0])).numpy(), [-1, 1, 1])


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.9, 0.99])
def test_ternarize_zeroes_the_asked_fraction_of_each_layer(sparsity):
    torch.manual_seed(0)
    net = BitwiseMLP(100, [37, 70], 10, sparsity, "identity")
    for (w, b), shadow in zip(net.binary_parameters(), net.weights, strict=True):
        assert set(torch.unique(w).tolist()) <= {-1.0, 0.0, 1.0}
        assert int((w == 0).sum()) == round(sparsity * shadow.numel())
        assert set(torch.unique(b).tolist()) <= {-1.0, 1.0}


def test_zeroed_weights_are_the_smallest_in_magnitude():
    w = torch.tensor([[0.5, -0.1, 0.05], [-0.9, 0.2, -0.01]])
    np.testing.assert_array_equal(nonzero_mask(w, 0.5).numpy(), [[True, False, False], [True, True, False]])
    np.testing.assert_array_equal(ternarize(w, 0.5).detach().numpy(), [[1, 0, 0], [-1, 1, 0]])


@pytest.mark.parametrize("k", [1, 2, 500, 999, 1000])
def test_kth_smallest_is_torchs_kthvalue(k):
    generator = torch.Generator().manual_seed(k)
    values = torch.randint(-20, 20, (1000,), generator=generator).float() / 7  # with many ties
    assert kth_smallest(values, k).item() == values.kthvalue(k).values.item()


def test_weights_and_biases_pass_gradients_straight_through():
    w = torch.tensor([0.3, -0.2, 0.01], requires_grad=True)
    (ternarize(w, 1 / 3) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    np.testing.assert_array_equal(w.grad.numpy(), [1.0, 2.0, 3.0])
    b = torch.tensor([0.3, -0.2], requires_grad=True)
    (binarize(b) * torch.tensor([5.0, 7.0])).sum().backward()
    np.testing.assert_array_equal(b.grad.numpy(), [5.0, 7.0])


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("identity", lambda u: np.ones_like(u)),
        ("tanh", lambda u: 1 - np.tanh(u) ** 2),
        ("ste", lambda u: (np.abs(u) <= 1).astype(float)),
    ],
)
def test_each_gradient_rule_of_sign(rule, expected):
    fan_in = 16
    a = torch.tensor([-9.0, -4.0, -1.0, 0.0, 2.0, 4.0, 5.0, 30.0], requires_grad=True)
    z = sign_activation(a, fan_in, rule)
    np.testing.assert_array_equal(z.detach().numpy(), [-1, -1, -1, 1, 1, 1, 1, 1])
    upstream = torch.linspace(0.5, 2.0, len(a))
    (z * upstream).sum().backward()
    u = a.detach().numpy() / math.sqrt(fan_in)
    np.testing.assert_allclose(a.grad.numpy(), upstream.numpy() * expected(u), rtol=1e-6)


def test_rules_differ_where_they_should():
    u = torch.tensor([0.0, 0.5, 3.0])
    assert SIGN_GRADIENTS["identity"](u)[2] == 1.0
    assert SIGN_GRADIENTS["ste"](u)[2] == 0.0
    assert 0.0 < SIGN_GRADIENTS["tanh"](u)[2] < 0.01


def test_unknown_rule_is_a_config_error():
    with pytest.raises(ConfigError, match="finetune.grad"):
        sign_activation(torch.zeros(2), 4, "sigmoid")


def test_bitwise_forward_is_integer_and_uses_only_binary_values():
    torch.manual_seed(1)
    real = CompressedMLP(30, [20], 5, 0.0, 0.0)
    net = BitwiseMLP.from_compressed(real, 0.3, "ste")
    torch.testing.assert_close(net.weights[0].detach(), torch.tanh(real.weights[0]).detach())
    x = torch.where(torch.rand(8, 30) > 0.5, 1.0, -1.0)
    scores = net(x)
    assert torch.equal(scores, scores.round())
    (w0, b0), (w1, b1) = net.binary_parameters()
    hidden = sign(x @ w0.T + b0)
    torch.testing.assert_close(scores, hidden @ w1.T + b1)
