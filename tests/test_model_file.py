"""The exported model file: exact round trip (the paper's +-1 biases and integer thresholds), size =
cost-report bits + small overhead, version-1 files still load, and a loader that refuses every damaged or
foreign file with a ModelFileError (never anything else, never unpickling)."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import stat
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnn_core.bitwise_model import BitwiseModel
from bnn_core.cost import cost_report
from bnn_core.errors import DataError, ModelFileError
from bnn_core.input_encoders import LloydMaxEncoder, RealScaler, ThresholdEncoder
from bnn_core.model_file import (
    SIGN_OF_ZERO,
    bits_field,
    canonical_json,
    content_hash,
    encode_model,
    field_bits,
    load_bitwise_model,
    save_bitwise_model,
    write_npz,
)
from bnn_core.packed import PackedNetwork, bias_code, pack_bits

PAPER_SIZES = [784, 1024, 1024, 1024, 10]
OVERHEAD_LIMIT = 4096
DATA = Path(__file__).resolve().parent / "data"


def random_constants(rng, n_in, n_out, kind):
    """``binary``: the paper's +-1; ``integer``: any integer with ``|c| <= n_in + 1`` (folded thresholds);
    ``narrow``: a few values on a common step (exercises ``bias_step``); ``equal``: one value (0 bits)."""
    bound = n_in + 1
    if kind == "binary":
        return rng.choice(np.array([-1, 1], dtype=np.int8), n_out)
    if kind == "narrow":
        step = int(rng.integers(1, bound + 1))
        low = int(rng.integers(-bound, bound - step + 1))
        return (low + step * rng.integers(0, 2, n_out)).astype(np.int32)
    if kind == "equal":
        return np.full(n_out, rng.integers(-bound, bound + 1), dtype=np.int32)
    return rng.integers(-bound, bound + 1, n_out).astype(np.int32)


def random_layers(rng, sizes, sparsity=0.0, constants="binary"):
    """Ternary weights with about ``sparsity`` zeros (a float, or one per layer) and constants of the kind
    ``constants`` (one for all layers, or one per layer; see :func:`random_constants`)."""
    sparsities = sparsity if isinstance(sparsity, list | tuple) else [sparsity] * (len(sizes) - 1)
    kinds = constants if isinstance(constants, list | tuple) else [constants] * (len(sizes) - 1)
    layers = []
    for n_in, n_out, zeros, kind in zip(sizes[:-1], sizes[1:], sparsities, kinds, strict=True):
        w = rng.choice(np.array([-1, 1], dtype=np.int8), (n_out, n_in)) * (rng.random((n_out, n_in)) >= zeros)
        layers.append((w.astype(np.int8), random_constants(rng, n_in, n_out, kind)))
    return layers


def small_model(seed=0, sparsity=(0.4, 0.0)):
    rng = np.random.default_rng(seed)
    return BitwiseModel.from_layers(ThresholdEncoder(100), random_layers(rng, [20, 9, 3], list(sparsity)), {"t": 1})


def threshold_model(seed=0):
    """``small_model``'s shape with integer constants: layer 0 any integers (6 bits: [-21, 21]), layer 1 on a
    step of 3."""
    rng = np.random.default_rng(seed)
    (w0, _), (w1, _) = random_layers(rng, [20, 9, 3], [0.4, 0.0])
    c0 = np.array([-21, 21, 0, 5, -3, 7, 7, 12, -20], dtype=np.int32)
    c1 = np.array([-2, 4, 1], dtype=np.int32)
    return BitwiseModel.from_layers(ThresholdEncoder(100), [(w0, c0), (w1, c1)], {"t": 2})


def lloyd_encoder(bits, seed=0):
    return LloydMaxEncoder.fit(np.random.default_rng(seed).integers(0, 256, 5000), bits)


# ------------------------------------------------------------------------------------------- round trip


@settings(max_examples=30, deadline=None)
@given(
    pixels=st.integers(1, 140),
    hidden=st.lists(st.integers(1, 130), min_size=0, max_size=3),
    n_classes=st.integers(1, 12),
    sparsity=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
    encoder_bits=st.sampled_from([0, 1, 2, 3]),
    constants=st.sampled_from(["binary", "integer", "mixed", "binary as version 1"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_is_exact(pixels, hidden, n_classes, sparsity, encoder_bits, constants, seed):
    rng = np.random.default_rng(seed)
    encoder = ThresholdEncoder(int(rng.integers(0, 255))) if encoder_bits == 0 else lloyd_encoder(encoder_bits, seed)
    sizes = [encoder.n_features(pixels), *hidden, n_classes]
    version = 1 if constants == "binary as version 1" else 2
    if constants == "mixed":  # a kind per layer, as a threshold network with some degenerate layers
        kinds = [str(rng.choice(["binary", "integer", "narrow", "equal"])) for _ in sizes[1:]]
    else:
        kinds = "integer" if constants == "integer" else "binary"
    layers = random_layers(rng, sizes, [sparsity if rng.random() < 0.5 else 0.0 for _ in sizes[1:]], kinds)
    model = BitwiseModel.from_layers(encoder, layers, {"seed": seed, "sizes": sizes, "name": "x"})
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bnn.npz"
        written = save_bitwise_model(path, model, format_version=version)
        assert written == path.stat().st_size
        with np.load(path, allow_pickle=False) as npz:
            header = json.loads(npz["header"].tobytes())
            stored_bias_bits = 64 * len(npz["biases"])
        assert header["format_version"] == version
        if version == 2:  # the biases member holds exactly the fields the header declares
            declared = sum(spec["n_out"] * spec["bias_bits"] for spec in header["layers"])
            assert stored_bias_bits == 64 * -(-declared // 64)
            for spec, (_, c) in zip(header["layers"], layers, strict=True):
                assert (spec["bias_min"], spec["bias_step"], spec["bias_bits"]) == tuple(bias_code(c)[0])
        loaded = load_bitwise_model(path)

    assert loaded.encoder == encoder
    assert loaded.metadata == model.metadata
    assert loaded.layer_sizes == sizes
    assert loaded.n_pixels == pixels
    for (w, b), layer in zip(layers, loaded.network.layers, strict=True):
        w2, b2 = layer.to_ternary()
        np.testing.assert_array_equal(w2, w)
        np.testing.assert_array_equal(b2, b)
    x = rng.integers(0, 256, (23, pixels), dtype=np.uint8)
    direct = PackedNetwork.from_ternary(layers).forward_counts(encoder.encode_bits(x))
    counts = loaded.forward_counts(x)
    assert counts.dtype == np.int32
    assert counts.shape == (23, n_classes)
    np.testing.assert_array_equal(counts, direct)
    predictions = loaded.predict(x)
    assert predictions.dtype == np.int64
    np.testing.assert_array_equal(predictions, direct.argmax(axis=1))
    np.testing.assert_array_equal(predictions, model.predict(x))


def test_mask_members_only_for_layers_with_zeros(tmp_path):
    model = small_model(sparsity=(0.4, 0.0))
    save_bitwise_model(tmp_path / "m.npz", model)
    with np.load(tmp_path / "m.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["biases", "header", "mask_0", "signs_0", "signs_1"]
        assert all(npz[name].dtype == np.dtype("<u8") for name in npz.files if name != "header")
        nonzero = int(np.count_nonzero(model.network.layers[0].to_ternary()[0]))
        assert nonzero < 9 * 20
        assert npz["mask_0"].shape == (math.ceil(9 * 20 / 64),)  # bit-contiguous: no per-row padding
        assert npz["signs_0"].shape == (math.ceil(nonzero / 64),)  # signs of nonzero weights only
        assert npz["signs_1"].shape == (math.ceil(3 * 9 / 64),)
        header = json.loads(npz["header"].tobytes())
    with zipfile.ZipFile(tmp_path / "m.npz") as archive:
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}
    signs_of = [np.sign(layer.bias).tolist() for layer in model.network.layers]
    assert all(sorted(set(signs)) == [-1, 1] for signs in signs_of)  # both signs in each layer: 1 bit per bias
    paper_code = {"bias_min": -1, "bias_step": 2, "bias_bits": 1}
    assert header["layers"] == [
        {"n_in": 20, "n_out": 9, "mask": True, **paper_code},
        {"n_in": 9, "n_out": 3, "mask": False, **paper_code},
    ]
    assert header["format_version"] == 2
    assert header["sign_of_zero"] == 1
    assert header["argmax_ties"] == "lowest_index"
    assert header["encoder"] == {"method": "threshold", "threshold": 100}


def test_bit_order_on_disk_is_row_major_feature_k_in_word_k_div_64():
    w = -np.ones((3, 70), dtype=np.int8)
    w[0, 0] = w[0, 69] = w[1, 0] = w[2, 63] = 1
    members = encode_model(BitwiseModel.from_layers(ThresholdEncoder(), [(w, np.array([1, -1, 1], np.int8))]))
    set_bits = np.flatnonzero(np.unpackbits(members["signs_0"].view(np.uint8), bitorder="little"))
    assert set_bits.tolist() == [0, 69, 70, 2 * 70 + 63]
    assert members["biases"].tolist() == [0b101]


def test_integer_constants_on_disk_are_little_endian_fields_from_the_minimum():
    w = np.ones((3, 10), dtype=np.int8)
    layers = [(w, np.array([-4, 2, 11])), (np.ones((2, 3), np.int8), np.array([4, 4]))]
    members = encode_model(BitwiseModel.from_layers(ThresholdEncoder(), layers))
    specs = header_of(members)["layers"]
    # Layer 0: c = -4 + 3 u, u = (0, 2, 5) in 3 bits each, bits 0..8; layer 1: all equal, 0 bits.
    assert [(spec["bias_min"], spec["bias_step"], spec["bias_bits"]) for spec in specs] == [(-4, 3, 3), (4, 1, 0)]
    assert members["biases"].tolist() == [0b101_010_000]
    np.testing.assert_array_equal(bits_field(field_bits(np.array([0, 2, 5]), 3), 3), [0, 2, 5])


def test_paper_network_costs_the_same_bits_in_version_2_as_in_version_1():
    rng = np.random.default_rng(3)
    model = BitwiseModel.from_layers(ThresholdEncoder(), random_layers(rng, [70, 130, 10], 0.3))
    v1, v2 = encode_model(model, format_version=1), encode_model(model)
    assert v1.keys() == v2.keys()
    for name in v1:
        if name != "header":
            np.testing.assert_array_equal(v1[name], v2[name])  # the biases member bit for bit too


def test_version_1_file_loads_and_predicts_as_written():
    """``tests/data/model_v1.npz`` was written by the version-1 writer (before version 2 existed), with
    the weights, biases, pixels and scores in ``model_v1_expected.json``."""
    path = DATA / "model_v1.npz"
    expected = json.loads((DATA / "model_v1_expected.json").read_text())
    model = load_bitwise_model(path)
    with np.load(path, allow_pickle=False) as npz:
        assert json.loads(npz["header"].tobytes())["format_version"] == 1
    assert model.metadata == {"fixture": "v1"}
    for layer, w, b in zip(model.network.layers, expected["weights"], expected["biases"], strict=True):
        w2, b2 = layer.to_ternary()
        np.testing.assert_array_equal(w2, w)
        np.testing.assert_array_equal(b2, b)
    pixels = np.array(expected["pixels"], dtype=np.uint8)
    np.testing.assert_array_equal(model.forward_counts(pixels), expected["counts"])
    np.testing.assert_array_equal(model.predict(pixels), expected["classes"])
    # The kept version-1 writer gives the very same bytes; the default writes version 2 of the same model.
    buffer = io.BytesIO()
    write_npz(buffer, encode_model(model, format_version=1))
    assert buffer.getvalue() == path.read_bytes()
    assert header_of(encode_model(model))["format_version"] == 2


def test_version_1_cannot_hold_integer_constants():
    with pytest.raises(ValueError, match="format version 1 stores biases -1 / \\+1 only"):
        encode_model(threshold_model(), format_version=1)
    with pytest.raises(ValueError, match="cannot write format version 3"):
        encode_model(small_model(), format_version=3)


def test_sign_of_zero_matches_the_quantizers():
    from bnn_core.quantizers import SIGN_OF_ZERO as TRAINING_SIGN_OF_ZERO

    assert SIGN_OF_ZERO == TRAINING_SIGN_OF_ZERO


def test_argmax_ties_go_to_the_lowest_index():
    rng = np.random.default_rng(1)
    (w0, b0), _ = random_layers(rng, [8, 6, 4])
    w1 = np.tile(rng.choice(np.array([-1, 1], np.int8), 6), (4, 1))
    model = BitwiseModel.from_layers(ThresholdEncoder(), [(w0, b0), (w1, np.ones(4, np.int8))])
    x = rng.integers(0, 256, (10, 8), dtype=np.uint8)
    counts = model.forward_counts(x)
    assert (counts == counts[:, :1]).all()
    assert (model.predict(x) == 0).all()


@pytest.mark.parametrize("constants", ["binary", "integer"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
@pytest.mark.parametrize("encoder", [ThresholdEncoder(127), lloyd_encoder(2)], ids=["threshold", "lloyd_max2"])
def test_file_size_is_cost_report_bits_plus_small_overhead(tmp_path, sparsity, encoder, constants):
    rng = np.random.default_rng(0)
    sizes = [encoder.n_features(PAPER_SIZES[0]), *PAPER_SIZES[1:]]
    layers = random_layers(rng, sizes, sparsity, constants)
    metadata = {"source": "mnist", "finetune": {"sparsity": sparsity, "grad": "identity", "epochs": 20}}
    model = BitwiseModel.from_layers(encoder, layers, metadata)
    written = save_bitwise_model(tmp_path / "bnn.npz", model)
    report = cost_report([w for w, _ in layers], [b for _, b in layers])
    bits = report.summary()["binary_weight_bits"]
    if constants == "binary":  # the paper's convention (no biases given) counts the same bits
        assert bits == cost_report([w for w, _ in layers]).summary()["binary_weight_bits"]
    else:  # up to bit_length(2 n_in + 2) bits per unit, the range |c| <= n_in + 1
        assert all(1 < layer.bias_bits <= (2 * layer.n_in + 2).bit_length() for layer in report.layers)
    overhead = written - math.ceil(bits / 8)
    assert 0 <= overhead <= OVERHEAD_LIMIT, f"{written} bytes for {bits} bits: {overhead} bytes of overhead"


# ------------------------------------------------------------------------------------------- refusals


def write_members(path: Path, members: dict[str, np.ndarray]) -> Path:
    with open(path, "wb") as handle:
        np.savez(handle, **members)
    return path


def header_of(members):
    return json.loads(members["header"].tobytes())


def with_header(members, header, rehash=True):
    """``members`` with a new header; ``rehash`` recomputes its sha256 so only the intended check fires."""
    arrays = {k: v for k, v in members.items() if k != "header"}
    if rehash:
        header = {**header, "sha256": content_hash(header, arrays)}
    return {"header": np.frombuffer(canonical_json(header), dtype=np.uint8), **arrays}


def rehashed_without_field(members, field):
    return with_header(members, {k: v for k, v in header_of(members).items() if k != field})


def rehashed(members):
    return with_header(members, header_of(members))


def edit_header(members, **changes):
    return with_header(members, {**header_of(members), **changes})


def replaced(members, **arrays):
    return rehashed({**members, **arrays})


def flip_word(members, name, index=0, bit=0):
    array = members[name].copy()
    array[index] ^= np.uint64(1 << bit)
    return {**members, name: array}


def layer_edit(members, index, **changes):
    layers = [dict(spec) for spec in header_of(members)["layers"]]
    layers[index].update(changes)
    return edit_header(members, layers=layers)


def without(members, name):
    return {k: v for k, v in members.items() if k != name}


def layer_without(members, index, *keys):
    layers = [dict(spec) for spec in header_of(members)["layers"]]
    layers[index] = {k: v for k, v in layers[index].items() if k not in keys}
    return edit_header(members, layers=layers)


def reencoded_layer_1(members, low, step, bits, fields):
    """``members`` (of :func:`threshold_model`) with layer 1's constants stored as ``low + step * fields`` in
    ``bits``-bit fields (header entry and ``biases`` member rewritten, rehashed): for non-canonical forms."""
    layers = [dict(spec) for spec in header_of(members)["layers"]]
    code0, fields0 = bias_code(THRESHOLD_CONSTANTS[0])
    assert (layers[0]["bias_min"], layers[0]["bias_step"], layers[0]["bias_bits"]) == tuple(code0)
    layers[1].update(bias_min=low, bias_step=step, bias_bits=bits)
    stream = np.concatenate([field_bits(fields0, code0.bits), field_bits(np.array(fields), bits)])
    arrays = {**members, "biases": pack_bits(stream).astype("<u8")}
    return with_header(arrays, {**header_of(members), "layers": layers})


def signs_of_full_plane(members):
    """``signs_0`` as a full sign plane (one bit per weight) although layer 0 has a mask: the wrong length."""
    return np.zeros(-(-9 * 20 // 64), "<u8")


BASE = encode_model(small_model())
BASE_INT = encode_model(threshold_model())  # integer constants: layer 0 6 bits, layer 1 2 bits (step 3): 60 bits
THRESHOLD_CONSTANTS = [layer.bias for layer in threshold_model().network.layers]
V1 = encode_model(small_model(), format_version=1)

TAMPERED = {
    "extra member": ({**BASE, "extra": np.zeros(1, "<u8")}, r"unexpected members \['extra'\]"),
    "extra member, rehashed": (rehashed({**BASE, "extra": np.zeros(1, "<u8")}), r"unexpected members \['extra'\]"),
    "missing mask": (without(BASE, "mask_0"), r"missing members \['mask_0'\]"),
    "missing biases": (rehashed(without(BASE, "biases")), r"missing members \['biases'\]"),
    "missing header": (without(BASE, "header"), "missing member 'header'"),
    "format version 3": (
        edit_header(BASE, format_version=3),
        r"format version 3 is not supported \(this reader reads 1 and 2\)",
    ),
    "format version 0": (edit_header(V1, format_version=0), "format version 0 is not supported"),
    "version 2 layers in a version 1 header": (edit_header(BASE, format_version=1), r"header layer 0 must be \{n_in"),
    "version 1 layers in a version 2 header": (
        edit_header(V1, format_version=2),
        r"header layer 0 must be \{n_in: int >= 1, n_out: int >= 1, mask: bool, bias_min",
    ),
    "version 1 layer with bias fields": (
        layer_edit(V1, 1, bias_min=-1, bias_step=2, bias_bits=1),
        r"header layer 1 must be \{n_in: int >= 1, n_out: int >= 1, mask: bool\}",
    ),
    "missing bias_step": (layer_without(BASE_INT, 1, "bias_step"), "header layer 1 must be"),
    "bias_bits string": (layer_edit(BASE_INT, 0, bias_bits="5"), "header layer 0 bias fields must be"),
    "bias_bits bool": (layer_edit(BASE_INT, 0, bias_bits=True), "header layer 0 bias fields must be"),
    "bias_bits negative": (layer_edit(BASE_INT, 0, bias_bits=-1), "header layer 0 bias fields must be"),
    "bias_min float": (layer_edit(BASE_INT, 0, bias_min=-21.0), "header layer 0 bias fields must be"),
    "bias_step 0": (layer_edit(BASE_INT, 1, bias_step=0), "header layer 1 bias fields must be"),
    "bias_min beyond n_in + 1": (
        layer_edit(BASE_INT, 0, bias_min=-22),
        r"cannot describe constants within \[-21, 21\]",
    ),
    "bias_step beyond the range": (layer_edit(BASE_INT, 1, bias_step=21), r"within \[-10, 10\]"),
    "bias_bits beyond the range": (layer_edit(BASE_INT, 0, bias_bits=7), "bias_bits 7 cannot describe"),
    "bias_step with no bits": (layer_edit(BASE_INT, 1, bias_bits=0), "bias_step 3 with bias_bits 0"),
    "biases member too long": (
        replaced(BASE_INT, biases=np.zeros(2, "<u8")),
        r"layer shape mismatch: member 'biases' has shape \(2,\), the header's layer sizes need \(1,\)",
    ),
    "version 1 biases member too long": (replaced(V1, biases=np.zeros(2, "<u8")), "member 'biases' has shape"),
    "non-canonical: minimum not stored as 0": (
        reencoded_layer_1(BASE_INT, -5, 3, 2, [1, 3, 2]),
        "layer 1: non-canonical bias encoding: bias_min -5 is not the smallest constant",
    ),
    "non-canonical: step not the gcd": (
        reencoded_layer_1(BASE_INT, -2, 1, 3, [0, 6, 3]),
        "layer 1: non-canonical bias encoding: bias_step 1 is not the constants' common step",
    ),
    "non-canonical: more bits than needed": (
        reencoded_layer_1(BASE_INT, -2, 3, 3, [0, 2, 1]),
        "layer 1: non-canonical bias encoding: bias_bits 3 is more than the largest field, 2, needs",
    ),
    "constants beyond n_in + 1": (
        reencoded_layer_1(BASE_INT, -2, 3, 3, [0, 2, 5]),
        r"layer 1: constants reach 13, beyond n_in \+ 1 = 10",
    ),
    "n_in beyond the largest": (layer_edit(BASE, 0, n_in=2**30), "n_in 1073741824 exceeds the largest"),
    "format version string": (edit_header(BASE, format_version="1"), "format version '1' is not supported"),
    "foreign format": (edit_header(BASE, format="something-else"), "not a bitwise-nn model file"),
    "flipped array bit": (flip_word(BASE, "signs_1", 0, 5), "content hash mismatch"),
    "flipped bias bit": (flip_word(BASE, "biases", 0, 2), "content hash mismatch"),
    "flipped integer bias bit": (flip_word(BASE_INT, "biases", 0, 7), "content hash mismatch"),
    "flipped version 1 bias bit": (flip_word(V1, "biases", 0, 2), "content hash mismatch"),
    "edited bias_min": (
        with_header(
            BASE_INT,
            {**header_of(BASE_INT), "layers": header_of(layer_edit(BASE_INT, 1, bias_min=-1))["layers"]},
            False,
        ),
        "content hash mismatch",
    ),
    "edited header": (with_header(BASE, {**header_of(BASE), "n_pixels": 20, "metadata": {"t": 2}}, False), "hash"),
    "edited threshold": (
        with_header(BASE, {**header_of(BASE), "encoder": {"method": "threshold", "threshold": 101}}, False),
        "content hash mismatch",
    ),
    "edited digest": (
        with_header(BASE, {**header_of(BASE), "sha256": "0" * 64}, False),
        "content hash mismatch",
    ),
    "layers disagree": (layer_edit(BASE, 1, n_in=8), "layer shapes disagree: layer 0 has 9 outputs but layer 1 has 8"),
    "plane vs header": (layer_edit(BASE, 0, n_out=10), "layer shapes disagree"),
    "member vs header": (
        replaced(BASE, signs_1=np.zeros(len(BASE["signs_1"]) + 1, "<u8")),
        r"layer shape mismatch: member 'signs_1' has shape \(2,\)",
    ),
    "2-d member": (replaced(BASE, signs_1=BASE["signs_1"].reshape(1, -1)), "layer shape mismatch"),
    "mask flag without member": (layer_edit(BASE, 1, mask=True), r"missing members \['mask_1'\]"),
    "layer schema": (layer_edit(BASE, 0, n_in=True), "header layer 0 must be"),
    "no layers": (edit_header(BASE, layers=[]), "layers must be a non-empty list"),
    "encoder vs n_in": (edit_header(BASE, n_pixels=21), "turns 21 pixels into 21 bits but layer 0 takes 20 inputs"),
    "lloyd encoder vs n_in": (
        edit_header(BASE, encoder={"method": "lloyd_max", "levels": [0.0, 80.0, 160.0, 240.0]}),
        "turns 20 pixels into 40 bits but layer 0 takes 20 inputs",
    ),
    "real encoder": (edit_header(BASE, encoder={"method": "real"}), "is not binary"),
    "unknown encoder": (edit_header(BASE, encoder={"method": "magic"}), "bad input encoder"),
    "malformed encoder": (edit_header(BASE, encoder={"method": "threshold", "threshold": "127"}), "malformed input"),
    "unsorted levels": (
        edit_header(BASE, n_pixels=10, encoder={"method": "lloyd_max", "levels": [0.0, 160.0, 80.0, 240.0]}),
        "not in increasing order",
    ),
    "sign rule": (edit_header(BASE, sign_of_zero=-1), r"unsupported sign\(0\) rule"),
    "tie rule": (edit_header(BASE, argmax_ties="random"), "unsupported argmax tie rule"),
    "unknown header field": (edit_header(BASE, extra=1), r"unexpected header fields: \['extra'\]"),
    "missing header field": (rehashed_without_field(BASE, "n_pixels"), r"header fields missing: \['n_pixels'\]"),
    "signed words": (replaced(BASE, signs_0=BASE["signs_0"].view("<i8")), "dtype mismatch: member 'signs_0' is int64"),
    "big-endian words": (replaced(BASE, biases=BASE["biases"].astype(">u8")), "dtype mismatch: member 'biases'"),
    "float header": ({**BASE, "header": BASE["header"].astype(np.float32)}, "dtype mismatch: member 'header'"),
    "header not json": ({**BASE, "header": np.frombuffer(b"{not json", np.uint8)}, "header is not valid JSON"),
    "header not object": ({**BASE, "header": np.frombuffer(b"[1, 2]", np.uint8)}, "header is not a JSON object"),
    "header with NaN": ({**BASE, "header": np.frombuffer(b'{"a": NaN}', np.uint8)}, "header is not valid JSON"),
    "header with -Infinity": (
        {**BASE, "header": np.frombuffer(b'{"a": -Infinity}', np.uint8)},
        r"not valid JSON \(ValueError: non-finite number -Infinity\)",
    ),
    "header with 1e999": (
        {**BASE, "header": np.frombuffer(b'{"a": 1e999}', np.uint8)},
        r"not valid JSON \(ValueError: non-finite number 1e999\)",
    ),
    "padding bits": (rehashed(flip_word(BASE, "biases", 0, 63)), "'biases' has nonzero padding bits"),
    "integer bias padding bits": (rehashed(flip_word(BASE_INT, "biases", 0, 60)), "'biases' has nonzero padding"),
    "version 1 padding bits": (rehashed(flip_word(V1, "biases", 0, 12)), "'biases' has nonzero padding bits"),
    "signs for zero weights too": (
        rehashed(replaced(BASE, signs_0=signs_of_full_plane(BASE))),
        "member 'signs_0' has shape .* nonzero weights need",
    ),
    "mask without zeros": (
        layer_edit({**BASE, "mask_1": np.array([2**27 - 1], "<u8")}, 1, mask=True),
        "stores a mask but has no zero weights",
    ),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_archive_is_refused(tmp_path, case):
    members, message = TAMPERED[case]
    path = write_members(tmp_path / "bnn.npz", members)
    with pytest.raises(ModelFileError, match=message) as err:
        load_bitwise_model(path)
    assert str(err.value).startswith(f"{path}: ")


@pytest.mark.parametrize("base", ["BASE", "BASE_INT", "V1"])
def test_the_unmodified_base_loads(tmp_path, base):
    members = {"BASE": BASE, "BASE_INT": BASE_INT, "V1": V1}[base]
    model = load_bitwise_model(write_members(tmp_path / "bnn.npz", members))
    assert model.layer_sizes == [20, 9, 3]
    reference = threshold_model() if base == "BASE_INT" else small_model()
    for layer, expected in zip(model.network.layers, reference.network.layers, strict=True):
        np.testing.assert_array_equal(layer.bias, expected.bias)


def valid_bytes(tmp_path) -> bytes:
    path = tmp_path / "valid.npz"
    save_bitwise_model(path, small_model())
    return path.read_bytes()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda valid: valid[: len(valid) // 2], "not a readable .npz archive"),
        (lambda valid: valid[:-1], "not a readable .npz archive"),
        (lambda valid: b"", "not a readable .npz archive"),
        (lambda valid: b"just some text\n", "not a readable .npz archive"),
        (lambda valid: valid[: len(valid) // 2] + bytes(len(valid) // 2), "not a readable .npz archive"),
    ],
    ids=["half", "last byte cut", "empty", "text", "zeroed tail"],
)
def test_truncated_or_foreign_file_is_refused(tmp_path, make, message):
    path = tmp_path / "bnn.npz"
    path.write_bytes(make(valid_bytes(tmp_path)))
    with pytest.raises(ModelFileError, match=message) as err:
        load_bitwise_model(path)
    assert str(err.value).startswith(f"{path}: ")


def test_flipped_byte_inside_an_array_is_refused(tmp_path):
    raw = bytearray(valid_bytes(tmp_path))
    offset = raw.index(b"\x93NUMPY", raw.index(b"signs_1.npy")) + 128  # past signs_1's .npy header
    raw[offset] ^= 0x10
    path = tmp_path / "bnn.npz"
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match=r"damaged archive \(BadZipFile: Bad CRC-32") as err:
        load_bitwise_model(path)
    assert str(err.value).startswith(f"{path}: ")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ModelFileError, match=r"bnn\.npz: file not found"):
        load_bitwise_model(tmp_path / "bnn.npz")
    with pytest.raises(ModelFileError, match="not a regular file"):
        load_bitwise_model(tmp_path)


def test_single_npy_array_is_refused(tmp_path):
    path = tmp_path / "bnn.npz"
    with open(path, "wb") as handle:
        np.save(handle, np.zeros(3, np.uint8))
    with pytest.raises(ModelFileError, match="single .npy array"):
        load_bitwise_model(path)


def test_compressed_archive_is_refused(tmp_path):
    path = tmp_path / "bnn.npz"
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **BASE)
    with pytest.raises(ModelFileError, match="'header.npy' is compressed"):
        load_bitwise_model(path)


def test_non_npy_member_is_refused(tmp_path):
    path = write_members(tmp_path / "bnn.npz", BASE)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("README.txt", "hello")
    with pytest.raises(ModelFileError, match="unexpected member 'README.txt'"):
        load_bitwise_model(path)


class _CreatesMarker:
    """Unpickling this opens (creates) a marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_is_refused_without_being_unpickled(tmp_path):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_CreatesMarker(proof))).close()
    assert proof.exists(), "the marker pickle must create its file when unpickled"

    marker = tmp_path / "marker"
    for name, payload in [
        ("bnn.npz", pickle.dumps(_CreatesMarker(marker))),
        ("model.pkl", pickle.dumps({"weights": _CreatesMarker(marker)}, protocol=2)),
    ]:
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(ModelFileError, match="pickled data is never loaded") as err:
            load_bitwise_model(path)
        assert str(err.value).startswith(f"{path}: ")
    assert not marker.exists()


def test_object_array_member_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "marker"
    buffer = io.BytesIO()
    np.savez(buffer, **{**BASE, "signs_0": np.array([_CreatesMarker(marker)], dtype=object)}, allow_pickle=True)
    path = tmp_path / "bnn.npz"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(ModelFileError, match="'signs_0.npy' holds Python objects; pickled data is never loaded"):
        load_bitwise_model(path)
    assert not marker.exists()


@pytest.mark.parametrize("shape", [(2**40,), (2**62,), (2**21, 2**21, 2**21)])
def test_member_declaring_a_huge_shape_is_refused_before_allocating(tmp_path, shape):
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<u8", "fortran_order": False, "shape": shape})
    path = tmp_path / "bnn.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("header.npy", buffer.getvalue() + bytes(64))
    with pytest.raises(ModelFileError, match="'header.npy' declares shape .*, more data than it holds"):
        load_bitwise_model(path)


# ------------------------------------------------------------------------------------------- writing and API


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "models" / "bnn.npz"
    save_bitwise_model(path, small_model(seed=0))
    before = path.read_bytes()

    def broken_write(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np.lib.format, "write_array", broken_write)
    with pytest.raises(OSError, match="disk full"):
        save_bitwise_model(path, small_model(seed=1))
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["bnn.npz"]
    monkeypatch.undo()

    save_bitwise_model(path, small_model(seed=1))
    assert path.read_bytes() != before
    assert [p.name for p in path.parent.iterdir()] == ["bnn.npz"]


def test_saved_file_has_the_mode_open_would_give(tmp_path):
    umask = os.umask(0o027)
    try:
        save_bitwise_model(tmp_path / "bnn.npz", small_model())
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "bnn.npz").stat().st_mode) == 0o640  # not mkstemp's 0600


def test_same_model_same_bytes(tmp_path, monkeypatch):
    save_bitwise_model(tmp_path / "a.npz", small_model())
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 400 * 86400)  # a zip writer stamping the clock would differ
    save_bitwise_model(tmp_path / "b.npz", small_model())
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    save_bitwise_model(tmp_path / "c.npz", small_model(seed=3))
    assert (tmp_path / "a.npz").read_bytes() != (tmp_path / "c.npz").read_bytes()
    save_bitwise_model(tmp_path / "d.npz", threshold_model())
    save_bitwise_model(tmp_path / "e.npz", threshold_model())
    assert (tmp_path / "d.npz").read_bytes() == (tmp_path / "e.npz").read_bytes()


@pytest.mark.parametrize(
    ("encoder", "layers", "message"),
    [
        (ThresholdEncoder(), [(np.full((2, 3), 2, np.int8), np.ones(2, np.int8))], "weights must be -1, 0 or"),
        (
            ThresholdEncoder(),
            [(np.ones((2, 3), np.int8), np.array([0, 5]))],
            r"layer 0: biases must be integers in .* = \[-4, 4\], got \[0, 5\]",
        ),
        (ThresholdEncoder(), [(np.ones((2, 3), np.int8), np.array([0, 0.5]))], "biases must be integers"),
        (ThresholdEncoder(), [(np.ones((2, 3), np.int8), np.ones(3, np.int8))], "not .n_out, n_in. and .n_out."),
        (
            ThresholdEncoder(),
            [(np.ones((2, 3), np.int8), np.ones(2, np.int8)), (np.ones((2, 3), np.int8), np.ones(2, np.int8))],
            "layer shapes disagree",
        ),
        (lloyd_encoder(2), [(np.ones((2, 3), np.int8), np.ones(2, np.int8))], "but layer 0 takes 3 inputs"),
        (RealScaler(), [(np.ones((2, 3), np.int8), np.ones(2, np.int8))], "not binary"),
    ],
)
def test_from_layers_refuses_what_cannot_be_a_model(encoder, layers, message):
    with pytest.raises(ValueError, match=message):
        BitwiseModel.from_layers(encoder, layers)


def test_metadata_must_be_json():
    layers = [(np.ones((2, 3), np.int8), np.ones(2, np.int8))]
    with pytest.raises(ValueError, match="metadata"):
        BitwiseModel.from_layers(ThresholdEncoder(), layers, {"x": np.int64(1)})
    with pytest.raises(ValueError, match="metadata"):
        BitwiseModel.from_layers(ThresholdEncoder(), layers, {"x": float("nan")})


def test_predict_checks_the_pixels():
    model = small_model()
    with pytest.raises(DataError, match="images of 20 pixels"):
        model.predict(np.zeros((3, 21), np.uint8))
    with pytest.raises(DataError, match="uint8"):
        model.predict(np.full((3, 20), 300))
    np.testing.assert_array_equal(model.predict(np.full((3, 20), 200)), model.predict(np.full((3, 20), 200, np.uint8)))


# ------------------------------------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Fuzzed: a version-2 file with integer constants (every bias field in use), and a version-1 file.
VALID = encode_model(threshold_model())


def _file_bytes(members) -> bytes:
    buffer = io.BytesIO()
    write_npz(buffer, members)
    return buffer.getvalue()


VALID_BYTES = _file_bytes(VALID)
VALID_V1_BYTES = _file_bytes(encode_model(small_model(), format_version=1))
REFERENCE_PIXELS = np.random.default_rng(5).integers(0, 256, (16, 20), dtype=np.uint8)
REFERENCE_COUNTS = threshold_model().forward_counts(REFERENCE_PIXELS)
REFERENCE_V1_COUNTS = small_model().forward_counts(REFERENCE_PIXELS)


def refused_or_intact(data: bytes, reference: np.ndarray = REFERENCE_COUNTS) -> bool:
    """True if ``data`` is refused with ModelFileError, or loads as the reference model (content intact)."""
    model = load_bytes(data)
    return model is None or np.array_equal(model.forward_counts(REFERENCE_PIXELS), reference)


def load_bytes(data: bytes) -> BitwiseModel | None:
    """Load ``data`` from a file; None if refused with ModelFileError. Any other exception escapes (a bug)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bnn.npz"
        path.write_bytes(data)
        try:
            return load_bitwise_model(path)
        except ModelFileError as err:
            assert str(err).startswith(f"{path}: ")
            return None


@FUZZ
@given(st.binary(max_size=3000))
def test_fuzz_random_bytes_only_raise_model_file_error(data):
    assert load_bytes(data) is None


@FUZZ
@given(st.binary(min_size=1, max_size=200), st.integers(0, len(VALID_BYTES)))
def test_fuzz_valid_prefix_with_garbage_refused_or_harmless(garbage, cut):
    # Bytes appended to a whole archive may be taken for a zip comment; anything else is refused.
    assert refused_or_intact(VALID_BYTES[:cut] + garbage)


@FUZZ
@given(st.integers(0, len(VALID_BYTES) - 1), st.integers(1, 255))
def test_fuzz_single_byte_mutation_refused_or_harmless(position, xor):
    data = bytearray(VALID_BYTES)
    data[position] ^= xor
    # A flip in a field nothing reads (a zip timestamp) may load, but then the content is intact.
    assert refused_or_intact(bytes(data))


@FUZZ
@given(st.integers(0, len(VALID_V1_BYTES) - 1), st.integers(1, 255))
def test_fuzz_single_byte_mutation_of_a_version_1_file_refused_or_harmless(position, xor):
    data = bytearray(VALID_V1_BYTES)
    data[position] ^= xor
    assert refused_or_intact(bytes(data), REFERENCE_V1_COUNTS)


@FUZZ
@given(st.integers(0, len(VALID_BYTES) - 1))
def test_fuzz_truncation_is_refused(length):
    assert load_bytes(VALID_BYTES[:length]) is None


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
HEADER_PATHS = [
    ("format_version",),
    ("n_pixels",),
    ("encoder",),
    ("encoder", "method"),
    ("encoder", "threshold"),
    ("encoder", "levels"),
    ("layers",),
    ("layers", 0),
    ("layers", 1, "n_in"),
    ("layers", 0, "n_out"),
    ("layers", 1, "mask"),
    ("layers", 0, "bias_min"),
    ("layers", 1, "bias_step"),
    ("layers", 0, "bias_bits"),
    ("layers", 1, "bias_bits"),
    ("sign_of_zero",),
    ("argmax_ties",),
    ("metadata",),
    ("metadata", "t"),
]


@FUZZ
@given(st.sampled_from(HEADER_PATHS), JSON_VALUES)
def test_fuzz_rehashed_header_fields_only_raise_model_file_error(where, value):
    """A writer bug (a well-hashed header with any JSON in any field) is refused or loads: nothing else."""
    header = header_of(VALID)
    node = header
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    try:
        members = with_header(VALID, header)
    except ValueError:  # not representable as canonical JSON: a writer could not produce it
        return
    buffer = io.BytesIO()
    write_npz(buffer, members)
    model = load_bytes(buffer.getvalue())
    if model is not None:
        assert model.layer_sizes == [20, 9, 3]
