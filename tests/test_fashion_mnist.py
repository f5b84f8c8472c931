"""The `fashion_mnist` source: the Debian package's files when installed, and any folder via data.path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bnn_core.errors import DataError
from bnn_core.splits import split_source
from pipeline.config import DataConfig, SplitConfig
from pipeline.sources import FASHION_MNIST_DEBIAN_DIR, load_source
from tests.test_datasets import write_idx_folder

DEBIAN_FILES = [
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
]


@pytest.mark.skipif(
    not all((Path(FASHION_MNIST_DEBIAN_DIR) / name).is_file() for name in DEBIAN_FILES),
    reason=f"Fashion-MNIST not in {FASHION_MNIST_DEBIAN_DIR} (Debian dataset-fashion-mnist; scripts/system_deps.sh)",
)
def test_debian_fashion_mnist_is_the_full_dataset():
    source = load_source(DataConfig(source="fashion_mnist"))
    assert source.train.pixels.shape == (60000, 784)
    assert source.test.pixels.shape == (10000, 784)
    assert np.bincount(source.train.labels).tolist() == [6000] * 10
    assert np.bincount(source.test.labels).tolist() == [1000] * 10
    splits = split_source(source, 5000, None, 0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (55000, 5000, 10000)


def test_fashion_mnist_from_a_folder_given_by_data_path(tmp_path):
    arrays = write_idx_folder(tmp_path / "fm", n_train=40, n_test=20)
    data = DataConfig(source="fashion_mnist", path=str(tmp_path / "fm"), split=SplitConfig(val=10, test=None))
    source = load_source(data)
    assert source.train.pixels.shape == (40, 16)
    np.testing.assert_array_equal(source.test.labels, arrays["t10k-labels-idx1-ubyte"])
    splits = split_source(source, data.split.val, data.split.test, data.split.seed)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 20)


def test_missing_fashion_mnist_folder_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist.*data\.path="):
        load_source(DataConfig(source="fashion_mnist", path=str(tmp_path / "nowhere")))
