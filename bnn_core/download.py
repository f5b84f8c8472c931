"""Download files into a cache folder and verify their MD5, with urllib only.

:func:`fetch_verified` is the whole API: for each ``name -> md5`` it keeps a cached ``dest/name`` whose
MD5 matches, or downloads ``<base_url>/<name>`` to a temporary ``.part`` file in ``dest`` and renames it
to ``name`` only once the byte count and the MD5 are right. So the cache never holds a partial or wrong
file under a final name, and two processes filling the same cache cannot see each other's half files.

Every failure (no network, timeout, HTTP error status, connection dropped mid-file, MD5 mismatch,
unwritable cache) is a one-line :class:`DataError` that names the URL and ends with ``hint``.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from bnn_core.errors import DataError

log = logging.getLogger(__name__)

#: The four canonical MNIST files and their MD5s (as torchvision lists them).
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
#: A public mirror of the MNIST files (yann.lecun.com itself often refuses downloads).
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"

_CHUNK = 1 << 16


def file_digest(path: str | Path, algorithm: str) -> str:
    """Hex digest of a file's bytes with a ``hashlib`` algorithm, read in chunks (data files can be large)."""
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_url(base_url: str, name: str) -> str:
    return f"{base_url.rstrip('/')}/{name}"


def fetch_verified(
    base_url: str, dest: str | Path, md5s: Mapping[str, str], timeout: float = 60.0, hint: str = ""
) -> Path:
    """Make ``dest`` hold every file of ``md5s`` with its MD5, downloading from ``base_url`` what is missing.

    ``timeout`` (seconds) bounds the connection and every read. ``hint`` is appended to every error
    message (say how to get the files another way). Returns ``dest``.
    """
    dest = Path(dest)
    suffix = f"; {hint}" if hint else ""
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{dest}: cannot create the download cache folder ({err}){suffix}") from None
    for name, md5 in md5s.items():
        final = dest / name
        if final.is_file() and file_digest(final, "md5") == md5.lower():
            continue
        _download(file_url(base_url, name), final, md5.lower(), timeout, suffix)
    return dest


def _download(url: str, final: Path, md5: str, timeout: float, suffix: str) -> None:
    log.info("downloading %s -> %s", url, final)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".part")
    except OSError as err:
        raise DataError(f"{final.parent}: cannot write to the download cache ({err}){suffix}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            received, expected, digest = _copy(url, out, tmp, timeout, suffix)
        if expected is not None and received < expected:
            raise DataError(f"{url}: connection dropped after {received} of {expected} bytes{suffix}")
        if digest != md5:
            raise DataError(f"{url}: MD5 mismatch, got {digest}, expected {md5} ({received} bytes){suffix}")
        try:
            os.replace(tmp, final)
        except OSError as err:
            raise DataError(f"{final}: cannot store the downloaded file ({err}){suffix}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _copy(url: str, out: BinaryIO, tmp: Path, timeout: float, suffix: str) -> tuple[int, int | None, str]:
    """Stream ``url`` into ``out``; return (bytes received, Content-Length or None, MD5 hex digest)."""
    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    expected: int | None = None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.strip().isdigit() else None
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                try:
                    out.write(chunk)
                except OSError as err:  # disk full, quota
                    raise DataError(f"{tmp}: cannot write the download of {url} ({err}){suffix}") from None
                received += len(chunk)
    except urllib.error.HTTPError as err:
        err.close()
        raise DataError(f"{url}: HTTP error {err.code} {err.reason}{suffix}") from None
    except urllib.error.URLError as err:
        raise DataError(f"{url}: cannot connect ({err.reason}){suffix}") from None
    except TimeoutError:
        raise DataError(f"{url}: timed out after {timeout:g} s ({received} bytes received){suffix}") from None
    except http.client.IncompleteRead as err:
        raise DataError(f"{url}: connection dropped after {received + len(err.partial)} bytes{suffix}") from None
    except (http.client.HTTPException, OSError) as err:
        raise DataError(f"{url}: download failed after {received} bytes ({err!r}){suffix}") from None
    except ValueError as err:  # malformed URL, unknown scheme
        raise DataError(f"{url}: invalid URL ({err}){suffix}") from None
    return received, expected, digest.hexdigest()
