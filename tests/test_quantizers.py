"""Each quantizer's forward rule and (pseudo-)gradient are the formulas its docstring states."""

import math

import numpy as np
import pytest
import torch

from bnn_core.errors import ConfigError
from bnn_core.networks import BitwiseMLP
from bnn_core.quantizers import (
    REGISTRIES,
    SIGN_GRADIENTS,
    binarize,
    kth_smallest,
    nonzero_mask,
    quantizer,
    sign,
    sign_activation,
    ternarize,
)

X = [-3.0, -1.0, -0.4, -0.1, 0.0, 0.2, 0.7, 2.5]
FAN_IN = 4  # sign's backward rules see u = a / sqrt(4) = a / 2


def _sign(x):
    return np.where(x >= 0, 1.0, -1.0)


# (kind, name, options, forward(x), d forward / dx) as the docstrings state them, on numpy arrays.
DOCUMENTED = [
    ("weight", "identity", {}, lambda x: x, np.ones_like),
    ("weight", "tanh", {}, np.tanh, lambda x: 1 - np.tanh(x) ** 2),
    # sparsity 0.25 of 8 weights: the 2 smallest in magnitude (0.0, -0.1) become 0
    ("weight", "ternary", {"sparsity": 0.25}, lambda x: _sign(x) * (np.abs(x) > 0.1), np.ones_like),
    ("bias", "identity", {}, lambda x: x, np.ones_like),
    ("bias", "tanh", {}, np.tanh, lambda x: 1 - np.tanh(x) ** 2),
    ("bias", "sign", {}, _sign, np.ones_like),
    ("activation", "tanh", {}, np.tanh, lambda x: 1 - np.tanh(x) ** 2),
    ("activation", "sign", {"fan_in": FAN_IN, "grad": "identity"}, _sign, np.ones_like),
    ("activation", "sign", {"fan_in": FAN_IN, "grad": "tanh"}, _sign, lambda x: 1 - np.tanh(x / 2) ** 2),
    ("activation", "sign", {"fan_in": FAN_IN, "grad": "ste"}, _sign, lambda x: (np.abs(x / 2) <= 1).astype(float)),
]


@pytest.mark.parametrize(("kind", "name", "options", "forward", "derivative"), DOCUMENTED)
def test_each_quantizer_follows_its_documented_formulas(kind, name, options, forward, derivative):
    x = torch.tensor(X, requires_grad=True)
    q = quantizer(kind, name, **options)
    y = q(x)
    upstream = torch.linspace(0.5, 2.0, len(X))
    (y * upstream).sum().backward()
    np.testing.assert_allclose(y.detach().numpy(), forward(np.array(X)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(x.grad.numpy(), upstream.numpy() * derivative(np.array(X)), rtol=1e-6, atol=1e-7)


def test_every_registered_quantizer_and_gradient_rule_is_documented_above():
    assert {(kind, name) for kind, name, *_ in DOCUMENTED} == {
        (kind, name) for kind, registry in REGISTRIES.items() for name in registry
    }
    assert {o["grad"] for kind, name, o, *_ in DOCUMENTED if name == "sign" and kind == "activation"} == set(
        SIGN_GRADIENTS
    )


def test_unknown_names_and_wrong_options_fail_when_the_quantizer_is_made():
    with pytest.raises(ConfigError, match="unknown weight quantizer 'binary'.*identity, tanh, ternary"):
        quantizer("weight", "binary")
    with pytest.raises(TypeError):
        quantizer("weight", "ternary", fan_in=3)
    assert repr(quantizer("weight", "ternary", sparsity=0.5)) == "ternary(sparsity=0.5)"


def test_sign_of_zero_is_plus_one():
    np.testing.assert_array_equal(sign(torch.tensor([-2.0, 0.0, 3.0])).numpy(), [-1, 1, 1])


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.9, 0.99])
def test_ternarize_zeroes_the_asked_fraction_of_each_layer(sparsity):
    torch.manual_seed(0)
    net = BitwiseMLP(100, [37, 70], 10, sparsity, "identity")
    for (w, b), layer in zip(net.quantized_parameters(), net.layers, strict=True):
        assert set(torch.unique(w).tolist()) <= {-1.0, 0.0, 1.0}
        assert int((w == 0).sum()) == round(sparsity * layer.weight.numel())
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
def test_each_gradient_rule_of_sign_scales_by_sqrt_fan_in(rule, expected):
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
    with pytest.raises(ConfigError, match="unknown gradient rule 'sigmoid'"):
        sign_activation(torch.zeros(2), 4, "sigmoid")
