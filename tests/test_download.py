"""Download + MD5 check of the `mnist` source, against a local HTTP server on 127.0.0.1 (no internet)."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import pipeline.sources
from bnn_core.download import MNIST_MD5, fetch_verified
from bnn_core.errors import ConfigError, DataError
from pipeline.config import DataConfig
from pipeline.sources import load_source
from tests.test_datasets import idx_bytes

pytestmark = pytest.mark.timeout(10)

TIMEOUT_S = 2.0


def small_mnist_files() -> dict[str, bytes]:
    """Valid gzip IDX files under the four MNIST names: 30 train / 10 test images of 4x4 pixels."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (30, 4, 4)),
        "train-labels-idx1-ubyte.gz": np.arange(30) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (10, 4, 4)),
        "t10k-labels-idx1-ubyte.gz": np.arange(10) % 10,
    }
    assert set(arrays) == set(MNIST_MD5)
    return {name: gzip.compress(idx_bytes(a), mtime=0) for name, a in arrays.items()}


FILES = small_mnist_files()
MD5S = {name: hashlib.md5(body).hexdigest() for name, body in FILES.items()}


class Server:
    """http.server in a thread; ``mode`` chooses how it answers: ok, 404, or truncated bodies."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append(name)
                body = FILES.get(name)
                if body is None or server.mode == "404":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if server.mode == "truncated":  # promise more than we send, then hang up
                    self.send_header("Content-Length", str(len(body) + 1000))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mnist/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def final_files(cache: Path) -> list[str]:
    """Files in the cache under a final (non-temporary) name."""
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) if cache.exists() else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mnist_source_downloads_once_then_uses_the_cache(server, tmp_path, monkeypatch):
    # the real MNIST MD5s would reject our small files: the source checks against theirs here
    monkeypatch.setattr(pipeline.sources, "MNIST_MD5", MD5S)
    cache = tmp_path / "cache"
    data = DataConfig(source="mnist", url=server.url, cache_dir=str(cache))
    source = load_source(data)
    assert source.train.pixels.shape == (30, 16)
    assert source.test.labels.tolist() == list(range(10))
    assert sorted(server.requests) == sorted(FILES)
    assert sorted(p.name for p in cache.iterdir()) == sorted(FILES), "only the four files, no temporary ones"

    server.requests.clear()
    again = load_source(data)
    assert server.requests == []
    np.testing.assert_array_equal(again.train.pixels, source.train.pixels)


def test_a_cached_file_with_a_wrong_md5_is_downloaded_again(server, tmp_path):
    cache = tmp_path / "cache"
    fetch_verified(server.url, cache, MD5S, TIMEOUT_S)
    (cache / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    server.requests.clear()
    fetch_verified(server.url, cache, MD5S, TIMEOUT_S)
    assert server.requests == ["t10k-labels-idx1-ubyte.gz"]
    assert (cache / "t10k-labels-idx1-ubyte.gz").read_bytes() == FILES["t10k-labels-idx1-ubyte.gz"]


def test_md5_mismatch_keeps_no_file(server, tmp_path):
    cache = tmp_path / "cache"
    wrong = {**MD5S, "train-labels-idx1-ubyte.gz": "0" * 32}
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: MD5 mismatch") as err:
        fetch_verified(server.url, cache, wrong, TIMEOUT_S, hint="use `data=idx data.path=<folder>`")
    assert "data=idx" in str(err.value)
    assert "\n" not in str(err.value)
    assert "train-labels-idx1-ubyte.gz" not in final_files(cache)
    assert not [p for p in cache.iterdir() if p.name.startswith(".")], "temporary file left behind"


def test_real_mnist_md5s_reject_other_files_through_the_source(server, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"(?i)md5.*data=idx data\.path="):
        load_source(DataConfig(source="mnist", url=server.url, cache_dir=str(cache)))
    assert final_files(cache) == []


def test_connection_dropped_mid_file(server, tmp_path):
    server.mode = "truncated"
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: connection dropped.*data=idx"):
        load_source(DataConfig(source="mnist", url=server.url, cache_dir=str(cache)))
    assert final_files(cache) == []
    assert list(cache.iterdir()) == []


def test_http_404(server, tmp_path):
    server.mode = "404"
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: HTTP error 404.*data=idx"):
        load_source(DataConfig(source="mnist", url=server.url, cache_dir=str(tmp_path / "c")))
    assert final_files(tmp_path / "c") == []


def test_no_server_listening_fails_fast(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/mnist"
    start = time.monotonic()
    with pytest.raises(DataError, match=r"cannot connect.*data=idx data\.path="):
        load_source(DataConfig(source="mnist", url=url, cache_dir=str(tmp_path / "c")))
    assert time.monotonic() - start < 3
    assert final_files(tmp_path / "c") == []


def test_a_silent_server_times_out(tmp_path):
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        start = time.monotonic()
        with pytest.raises(DataError, match=r"timed out"):
            fetch_verified(url, tmp_path / "c", MD5S, timeout=0.5, hint="data=idx")
        assert time.monotonic() - start < 3
    assert final_files(tmp_path / "c") == []


def test_invalid_url_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="invalid URL|cannot connect"):
        fetch_verified("nosuchscheme://x/", tmp_path / "c", MD5S, TIMEOUT_S)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"url": "ossci-datasets.s3.amazonaws.com/mnist/"}, "data.url"),
        ({"cache_dir": " "}, "data.cache_dir"),
        ({"path": "/some/folder"}, "data.path"),
    ],
)
def test_mnist_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        DataConfig(source="mnist", **kwargs)
