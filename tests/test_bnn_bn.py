"""The integer-threshold network ``bnn_bn``: batch norm folded exactly into integer thresholds."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bnn_core.networks import BitwiseMLP, CompressedMLP, ThresholdSign, fold_batchnorm

FINITE = {"allow_nan": False, "allow_infinity": False}


def _integer_forward(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """Reference inference in plain integers: hidden ``W z + c >= 0``, last layer's ``W z + c`` are scores."""
    z = x.astype(np.int64)
    for i, (w, c) in enumerate(layers):
        a = z @ w.astype(np.int64).T + c.astype(np.int64)
        z = np.where(a >= 0, 1, -1) if i < len(layers) - 1 else a
    return z


@settings(max_examples=200, deadline=None)
@given(
    gamma=st.floats(-3, 3, **FINITE) | st.just(0.0),
    beta=st.floats(-3, 3, **FINITE),
    mean=st.floats(-40, 40, **FINITE),
    var=st.floats(1e-3, 400, **FINITE),
)
def test_folded_threshold_equals_batch_norm_then_sign_on_every_integer(gamma, beta, mean, var):
    eps = 1e-5
    flip, threshold = fold_batchnorm(np.array([gamma]), np.array([beta]), np.array([mean]), np.array([var]), eps)
    a = np.arange(-60, 61, dtype=np.float64)
    y = gamma * (a - mean) / np.sqrt(var + eps) + beta
    folded = flip[0] * a >= threshold[0]
    # The folded rule is the network's definition; it equals float64 batch norm + sign away from y = 0.
    clear = np.abs(y) > 1e-9
    assert np.array_equal(folded[clear], (y >= 0)[clear])
    assert flip[0] in (-1.0, 1.0) and (np.isinf(threshold[0]) or threshold[0] == np.round(threshold[0]))


def _trained_bnn_bn(seed: int, sparsity: float, n_in: int = 24, hidden: tuple[int, ...] = (16, 12)) -> BitwiseMLP:
    """A bnn_bn with non-trivial batch-norm statistics (a few training steps, some negative / zero scales)."""
    torch.manual_seed(seed)
    net = BitwiseMLP(n_in, list(hidden), 5, sparsity, "ste", norm="batchnorm")
    x = torch.where(torch.randn(128, n_in) > 0, 1.0, -1.0)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    net.train()
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(net(x) / 4, torch.randint(0, 5, (128,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        norm = net.layers[0].activation.norm
        norm.weight[0], norm.weight[1], norm.bias[1] = -0.7, 0.0, -0.2  # a flipped unit and a constant one
        norm.weight[2], norm.bias[2], norm.running_mean[2] = 1e-4, 5.0, 0.0  # a threshold far out of reach
    return net.eval()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), sparsity=st.sampled_from([0.0, 0.4]))
def test_torch_simulation_and_exported_integer_network_give_identical_scores(seed, sparsity):
    net = _trained_bnn_bn(seed, sparsity)
    x = torch.where(torch.randn(200, 24, generator=torch.Generator().manual_seed(seed)) > 0, 1.0, -1.0)
    with torch.no_grad():
        simulated = net(x).numpy().astype(np.int64)
    layers = net.export_layers()
    assert np.array_equal(_integer_forward(layers, x.numpy()), simulated)
    for w, c in layers:
        assert np.isin(w, (-1, 0, 1)).all()
        assert c.min() >= -(w.shape[1] + 1) and c.max() <= w.shape[1]
    w0, c0 = layers[0]
    assert c0[2] == w0.shape[1]  # threshold far below every reachable sum: clipped to "always on"


def test_round_two_starts_from_round_one_batch_norm_scale_and_shift():
    real = CompressedMLP(10, [8], 3, 0.0, 0.0, norm="batchnorm")
    with torch.no_grad():
        real.layers[0].activation.norm.weight.fill_(0.5)
        real.layers[0].activation.norm.bias.fill_(0.25)
    net = BitwiseMLP.from_compressed(real, 0.0, "identity")
    assert isinstance(net.layers[0].activation, ThresholdSign) and net.norm == "batchnorm"
    assert torch.all(net.layers[0].activation.norm.weight == 0.5)
    assert torch.all(net.layers[0].activation.norm.bias == 0.25)
