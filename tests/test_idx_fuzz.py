"""Fuzzing the IDX reader: random and mutated payloads, plain and gzip, give an array or a DataError, nothing else."""

from __future__ import annotations

import gzip
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnn_core.datasets import parse_idx, read_idx
from bnn_core.errors import DataError
from tests.test_datasets import idx_bytes

pytestmark = pytest.mark.timeout(60)


HUGE = 2**32 - 1
# Headers whose item count overflows float64 or int64, or with more dimensions than numpy allows.
OVERFLOWING_HEADERS = {
    "inf": [HUGE] * 40,
    "nan": [HUGE] * 40 + [0],
    "zero-size-int64-overflow": [HUGE, HUGE, HUGE, 0],
    "over-64-dims": [1] * 70,
}


def _payload(dims: list[int], body: bytes = b"") -> bytes:
    return bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + body


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID = idx_bytes(np.arange(3 * 4 * 5).reshape(3, 4, 5) % 256)
VALID_LABELS = idx_bytes(np.arange(7) % 10)


def parse_or_data_error(payload: bytes) -> None:
    try:
        array = parse_idx(payload, "fuzz")
    except DataError:
        return
    assert array.dtype == np.uint8
    assert array.size == len(payload) - 4 - 4 * payload[3]


def read_or_data_error(payload: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"train-images-idx3-ubyte{suffix}"
        path.write_bytes(payload)
        try:
            read_idx(path)
        except DataError as err:
            assert str(path) in str(err)


@st.composite
def mutated(draw, base: bytes = VALID) -> bytes:
    """A valid payload with bit flips, byte overwrites, a truncation or an appended tail."""
    data = bytearray(draw(st.sampled_from([VALID, VALID_LABELS])) if base is VALID else base)
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(data) - 1))
        if draw(st.booleans()):
            data[i] ^= 1 << draw(st.integers(0, 7))
        else:
            data[i] = draw(st.integers(0, 255))
    action = draw(st.sampled_from(["none", "truncate", "append"]))
    if action == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif action == "append":
        data += draw(st.binary(max_size=16))
    return bytes(data)


@st.composite
def header_changed(draw) -> bytes:
    """A valid body under a header whose fields (magic, type, ndim, sizes) are redrawn."""
    ndim = draw(st.integers(0, 255))
    size = st.one_of(st.integers(0, 8), st.sampled_from([0, 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
    sizes = draw(st.lists(size, min_size=min(ndim, 6), max_size=min(ndim, 6)))
    magic = draw(st.sampled_from([b"\x00\x00", b"\x00\x01", b"\x08\x00"]))
    dtype = draw(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0xFF]))
    header = magic + bytes([dtype, ndim]) + struct.pack(f">{len(sizes)}I", *sizes)
    return header + draw(st.sampled_from([b"", VALID[16:], b"\x00" * 60, b"\x01" * 7]))


PAYLOADS = st.one_of(st.binary(max_size=128), mutated(), header_changed())


@FUZZ
@given(PAYLOADS)
def test_parse_idx_returns_an_array_or_a_data_error(payload):
    parse_or_data_error(payload)


@FUZZ
@given(PAYLOADS)
def test_read_idx_plain_file(payload):
    read_or_data_error(payload, "")


@FUZZ
@given(st.one_of(PAYLOADS.map(lambda p: gzip.compress(p, mtime=0)), mutated(gzip.compress(VALID, mtime=0))))
def test_read_idx_gzip_file(payload):
    """Valid gzip around bad IDX, and damaged gzip (bit flips, truncation, trailing junk) around good IDX."""
    read_or_data_error(payload, ".gz")


def test_the_unmutated_payloads_parse():
    assert parse_idx(VALID).shape == (3, 4, 5)
    assert parse_idx(VALID_LABELS).shape == (7,)


@pytest.mark.parametrize("name", list(OVERFLOWING_HEADERS))
def test_headers_with_overflowing_sizes_are_data_errors(name):
    dims = OVERFLOWING_HEADERS[name]
    body = b"\x07" if name == "over-64-dims" else b""
    with pytest.raises(DataError):
        parse_idx(_payload(dims, body), "fuzz")


@st.composite
def wide_header(draw) -> bytes:
    """Headers whose sizes' product may exceed any float or int64, with up to 100 dimensions."""
    ndim = draw(st.integers(2, 100))
    size = st.one_of(st.integers(0, 2), st.sampled_from([2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
    sizes = draw(st.lists(size, min_size=ndim, max_size=ndim))
    body = draw(st.sampled_from([b"", b"\x00"]))
    return _payload(sizes, body)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(wide_header())
def test_parse_idx_wide_headers(payload):
    try:
        parse_idx(payload, "fuzz")
    except DataError:
        return
