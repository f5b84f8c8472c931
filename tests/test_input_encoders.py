import numpy as np
import pytest

from bnn_core.errors import ConfigError
from bnn_core.input_encoders import LloydMaxEncoder, ThresholdEncoder, encoder_from_dict, fit_input_encoder


def test_threshold_is_one_bipolar_bit_per_pixel():
    pixels = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(ThresholdEncoder(127).encode(pixels), [[-1, -1, 1, 1]])


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lloyd_max_has_2_pow_k_sorted_levels_and_k_bit_planes(bits):
    rng = np.random.default_rng(bits)
    pixels = rng.integers(0, 256, (50, 20), dtype=np.uint8)
    encoder = LloydMaxEncoder.fit(pixels, bits)
    assert len(encoder.levels) == 2**bits
    assert np.all(np.diff(encoder.levels) > 0)
    features = encoder.encode(pixels)
    assert features.shape == (50, 20 * bits)
    assert set(np.unique(features)) <= {-1.0, 1.0}
    # Plane j holds bit (bits-1-j) of each pixel's level index: reassemble q from the planes.
    planes = (features.reshape(50, bits, 20) > 0).astype(int)
    q = sum(planes[:, j] << (bits - 1 - j) for j in range(bits))
    np.testing.assert_array_equal(q, encoder.level_index(pixels))


def test_lloyd_max_levels_are_the_centroids_of_their_cells():
    pixels = np.array([0] * 80 + [10] * 20 + [200] * 50 + [250] * 50, dtype=np.uint8)
    encoder = LloydMaxEncoder.fit(pixels, 1)
    np.testing.assert_allclose(encoder.levels, [2.0, 225.0])


def test_lloyd_max_is_fitted_on_the_pixels_it_is_given_only():
    dark = np.zeros((10, 10), dtype=np.uint8)
    dark[:, :2] = 40
    bright = np.full((10, 10), 250, dtype=np.uint8)
    fitted_on_dark = fit_input_encoder("lloyd_max", dark, bits=1)
    assert max(fitted_on_dark.levels) <= 40
    assert fitted_on_dark != fit_input_encoder("lloyd_max", np.concatenate([dark, bright]), bits=1)


def test_real_scaler_range():
    features = fit_input_encoder("real", np.zeros((1, 1))).encode(np.array([[0, 255]], dtype=np.uint8))
    np.testing.assert_allclose(features, [[-1.0, 1.0]])


@pytest.mark.parametrize("method", ["threshold", "lloyd_max", "real"])
def test_encoders_round_trip_through_plain_dicts(method):
    pixels = np.random.default_rng(0).integers(0, 256, (20, 8), dtype=np.uint8)
    encoder = fit_input_encoder(method, pixels, threshold=100, bits=3)
    restored = encoder_from_dict(encoder.to_dict())
    np.testing.assert_array_equal(restored.encode(pixels), encoder.encode(pixels))


def test_unknown_method_names_the_key():
    with pytest.raises(ConfigError, match="data.binarize.method"):
        fit_input_encoder("median", np.zeros((1, 1)))


def test_thermometer_planes_are_pixel_above_each_evenly_spread_threshold():
    from bnn_core.input_encoders import ThermometerEncoder, encoder_from_dict, fit_input_encoder

    encoder = fit_input_encoder("thermometer", np.zeros((1, 2), np.uint8), planes=3)
    assert encoder.thresholds == (63, 127, 191)
    assert ThermometerEncoder.evenly_spaced(1).thresholds == (127,)
    pixels = np.array([[0, 64], [128, 255]], dtype=np.uint8)
    # plane-major: [pixel0 > 63, pixel1 > 63, pixel0 > 127, pixel1 > 127, pixel0 > 191, pixel1 > 191]
    assert encoder.encode_bits(pixels).tolist() == [
        [False, True, False, False, False, False],
        [True, True, True, True, False, True],
    ]
    assert encoder.n_features(784) == 3 * 784
    assert encoder_from_dict(encoder.to_dict()) == encoder
    with pytest.raises(ConfigError):
        encoder_from_dict({"method": "thermometer", "thresholds": [127, 63]})
