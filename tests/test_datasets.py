import gzip
import struct

import numpy as np
import pytest

from bnn_core.datasets import (
    LabelledImages,
    SourceData,
    load_idx_folder,
    load_mnist5k,
    parse_idx,
    read_idx,
    stratified_split,
)
from bnn_core.errors import DataError
from bnn_core.splits import split_source


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_folder(folder, n_train=30, n_test=10, gz=True, rng=None):
    rng = rng or np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 4, 4)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 4, 4)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for stem, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


def test_idx_round_trip(tmp_path):
    arrays = write_idx_folder(tmp_path / "d", gz=True)
    source = load_idx_folder(tmp_path / "d")
    assert source.train.pixels.shape == (30, 16)
    np.testing.assert_array_equal(source.train.pixels.reshape(30, 4, 4), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(source.test.labels, arrays["t10k-labels-idx1-ubyte"])


def test_plain_idx_files_are_read_too(tmp_path):
    write_idx_folder(tmp_path / "d", gz=False)
    assert len(load_idx_folder(tmp_path / "d").test) == 10


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x00", "bad magic"),
        (b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00", "not supported"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05\x00", "holds 1"),
        (b"\x00\x00\x08\x02\x00\x00", "truncated IDX header"),
        (b"\x00\x00", "too short"),
    ],
)
def test_malformed_idx_is_a_data_error(payload, message):
    with pytest.raises(DataError, match=message):
        parse_idx(payload, "x")


def test_truncated_gzip_names_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((5, 4, 4))))[:-10])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: corrupt or truncated gzip"):
        read_idx(path)


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        load_idx_folder(tmp_path / "nowhere")
    write_idx_folder(tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
        load_idx_folder(tmp_path / "d")


def test_image_and_label_counts_must_agree(tmp_path):
    write_idx_folder(tmp_path / "d")
    (tmp_path / "d" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(29))))
    with pytest.raises(DataError, match="30 images but .* 29 labels"):
        load_idx_folder(tmp_path / "d")


def test_labels_outside_classes(tmp_path):
    write_idx_folder(tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.full(10, 12))))
    with pytest.raises(DataError, match="label 12 outside 0..9"):
        load_idx_folder(tmp_path / "d")


def test_mnist5k_is_the_real_digits():
    data = load_mnist5k()
    assert data.train.pixels.shape == (5000, 784)
    assert data.train.pixels.dtype == np.uint8
    assert np.bincount(data.train.labels).tolist() == [500] * 10
    assert data.test is None


def test_stratified_split_sizes_balance_and_determinism():
    labels = np.repeat(np.arange(10), 500)
    parts = stratified_split(labels, [4000, 500, 500], seed=0)
    assert [len(p) for p in parts] == [4000, 500, 500]
    assert len(np.unique(np.concatenate(parts))) == 5000
    for part, size in zip(parts, [4000, 500, 500], strict=True):
        assert np.bincount(labels[part]).tolist() == [size // 10] * 10
    again = stratified_split(labels, [4000, 500, 500], seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = stratified_split(labels, [4000, 500, 500], seed=1)
    assert not np.array_equal(parts[2], other[2])


def test_split_keeps_a_source_test_set_and_rejects_a_test_size():
    rng = np.random.default_rng(0)
    pool = LabelledImages(rng.integers(0, 256, (100, 4), dtype=np.uint8), np.arange(100) % 10)
    test = LabelledImages(rng.integers(0, 256, (20, 4), dtype=np.uint8), np.arange(20) % 10)
    splits = split_source(SourceData(pool, test), val_size=10, test_size=None, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 10, 20)
    with pytest.raises(DataError, match="own test set"):
        split_source(SourceData(pool, test), val_size=10, test_size=5, seed=0)
