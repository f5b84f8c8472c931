"""The layer abstraction and the two networks built from it: the invariants the saved models rely on."""

import math

import numpy as np
import pytest
import torch

from bnn_core.errors import DataError
from bnn_core.lightning_modules import FinetuneModule
from bnn_core.networks import BitwiseMLP, CompressedMLP, QuantizedDense
from bnn_core.packed import PackedNetwork
from bnn_core.quantizers import quantizer, sign
from pipeline.artifacts import save_checkpoint
from pipeline.networks_io import load_bitwise, load_compressed


def _binary_inputs(n: int, n_in: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(n, n_in, generator=generator) > 0.5, 1.0, -1.0)


def test_a_layer_computes_quantized_bias_plus_quantized_weights_times_input():
    weight_q, bias_q = quantizer("weight", "ternary", sparsity=0.4), quantizer("bias", "sign")
    layer = QuantizedDense(5, 3, 1.0, weight_q, bias_q, quantizer("activation", "tanh"))
    z = torch.randn(4, 5)
    # 0.4 of 15 weights: the 6 smallest in magnitude are 0
    beta = layer.weight.detach().abs().flatten().kthvalue(6).values
    w, b = sign(layer.weight) * (layer.weight.abs() > beta), sign(layer.bias)
    assert int((w == 0).sum()) == 6
    assert torch.equal(layer(z), torch.tanh(z @ w.T + b))


@pytest.mark.parametrize(
    ("make", "bound"),
    [
        (lambda: CompressedMLP(7, [5, 4], 3, 0.2, 0.5), lambda fan_in: 1 / math.sqrt(fan_in)),
        (lambda: BitwiseMLP(7, [5, 4], 3, 0.5, "ste"), lambda fan_in: 1.0),
    ],
)
def test_initial_parameters_are_drawn_weight_then_bias_layer_by_layer(make, bound):
    """Under one seed the networks start where every earlier checkpoint started (same draws, same order)."""
    torch.manual_seed(3)
    net = make()
    after_init = torch.get_rng_state()
    torch.manual_seed(3)
    for layer, (fan_in, fan_out) in zip(net.layers, [(7, 5), (5, 4), (4, 3)], strict=True):
        b = bound(fan_in)
        assert torch.equal(layer.weight, torch.empty(fan_out, fan_in).uniform_(-b, b))
        assert torch.equal(layer.bias, torch.empty(fan_out).uniform_(-b, b))
    assert torch.equal(torch.get_rng_state(), after_init)  # no other draws


@pytest.mark.parametrize(("sparsity", "rule"), [(0.0, "identity"), (0.3, "ste"), (0.7, "tanh")])
def test_bitwise_forward_is_integer_and_equals_the_packed_engine(sparsity, rule):
    torch.manual_seed(1)
    real = CompressedMLP(70, [33, 20], 10, 0.0, 0.0)
    net = BitwiseMLP.from_compressed(real, sparsity, rule)
    torch.testing.assert_close(net.layers[0].weight.detach(), torch.tanh(real.layers[0].weight).detach())
    x = _binary_inputs(64, 70)
    with torch.no_grad():
        scores = net(x)
    assert torch.equal(scores, scores.round())
    (w0, b0), (w1, b1), (w2, b2) = net.quantized_parameters()
    hidden = sign(sign(x @ w0.T + b0) @ w1.T + b1)
    assert torch.equal(scores, hidden @ w2.T + b2)
    layers = net.export_layers()
    assert all(w.dtype == np.int8 and b.dtype == np.int32 for w, b in layers)
    packed = PackedNetwork.from_ternary(layers).forward_counts(x.numpy() > 0)
    np.testing.assert_array_equal(packed, scores.numpy().astype(np.int64))


def test_compressed_network_uses_tanh_of_its_parameters_and_the_baseline_uses_them_as_they_are():
    torch.manual_seed(2)
    x = torch.rand(6, 9) * 2 - 1
    for compress, squash in [(True, torch.tanh), (False, lambda t: t)]:
        net = CompressedMLP(9, [8], 4, 0.5, 0.5, compress=compress).eval()  # eval: no dropout
        (w0, b0), (w1, b1) = [(squash(layer.weight), squash(layer.bias)) for layer in net.layers]
        assert torch.equal(net(x), torch.tanh(x @ w0.T + b0) @ w1.T + b1)


def test_clipping_keeps_shadow_weights_in_minus_one_one():
    net = BitwiseMLP(4, [3], 2, 0.0, "identity")
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(5.0)
    net.clip_shadow_weights()
    assert all(float(p.detach().abs().max()) <= 1.0 for p in net.parameters())
    assert any(float(p.detach().abs().max()) == 1.0 for p in net.parameters())


def test_finetune_loss_scale_is_one_over_sqrt_of_the_last_fan_in():
    module = FinetuneModule(BitwiseMLP(10, [36], 3, 0.0, "identity"), lr=0.1, epochs=1)
    assert module.loss_scale == 1 / 6


def test_checkpoints_with_the_stages_architecture_load_back(tmp_path):
    torch.manual_seed(4)
    real = CompressedMLP(12, [8, 6], 5, 0.1, 0.2)
    bitwise = BitwiseMLP.from_compressed(real, 0.25, "ste")
    real_arch = {"n_in": 12, "hidden": [8, 6], "n_out": 5, "dropout_input": 0.1, "dropout_hidden": 0.2}
    bitwise_arch = {"n_in": 12, "hidden": bitwise.hidden, "n_out": bitwise.n_out, "sparsity": 0.25, "grad": "ste"}
    save_checkpoint(tmp_path / "pretrained.pt", {"state_dict": real.state_dict(), "architecture": real_arch})
    save_checkpoint(tmp_path / "finetuned.pt", {"state_dict": bitwise.state_dict(), "architecture": bitwise_arch})
    x = _binary_inputs(10, 12)
    with torch.no_grad():
        assert torch.equal(load_compressed(tmp_path / "pretrained.pt")(x), real.eval()(x))
        assert torch.equal(load_bitwise(tmp_path / "finetuned.pt")(x), bitwise.eval()(x))
    wrong = {"state_dict": real.state_dict(), "architecture": {**real_arch, "hidden": [8]}}
    save_checkpoint(tmp_path / "wrong.pt", wrong)
    with pytest.raises(DataError, match="does not match its architecture"):
        load_compressed(tmp_path / "wrong.pt")
