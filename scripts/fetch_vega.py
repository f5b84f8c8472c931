"""Fetch the vega, vega-lite and vega-embed scripts that `dvc plots show` pages load, for offline viewing.

DVC's default plots page loads these three scripts from a CDN, so with no network it is blank. The page
template in ``.dvc/plots_page.html`` loads them from ``vendor/`` first (and from the CDN only when a file is
missing there); this script fills ``vendor/``. It takes each package's tarball from the npm registry, checks
it against the sha512 ``dist.integrity`` pinned below (the registry's own value for that version), and
stores only the browser build, renamed with its version, under a temporary name first: so ``vendor/``
never holds a partial or unverified file under a final name. Standard library only: it runs before the
project's venv exists (`make repro` and `make test` call it), and without ``npm``.

The versions are the ones the installed dvc-render's default page uses (``VegaRenderer.SCRIPTS``: the
specs DVC writes are made for them; a test checks they agree). Silent when the files are there. Exit status:
0 when the files are present, also when the network is unreachable (then it says that the page will use the
CDN); 2 on an integrity mismatch or an unusable tarball, which nothing should ignore.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "vendor"
REGISTRY = "https://registry.npmjs.org"


@dataclass(frozen=True)
class Package:
    """One npm package: the version, its tarball's ``dist.integrity``, and the browser build inside it."""

    name: str
    version: str
    integrity: str
    member: str

    @property
    def url(self) -> str:
        return f"{REGISTRY}/{self.name}/-/{self.name}-{self.version}.tgz"

    @property
    def filename(self) -> str:
        """The stored name, e.g. ``vega-5.20.2.min.js``: a version bump never reuses an old file."""
        return f"{self.name}-{self.version}.min.js"


#: In loading order: vega-lite and vega-embed need the ``vega`` global.
PACKAGES = (
    Package(
        "vega",
        "5.20.2",
        "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw==",
        "package/build/vega.min.js",
    ),
    Package(
        "vega-lite",
        "5.2.0",
        "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw==",
        "package/build/vega-lite.min.js",
    ),
    Package(
        "vega-embed",
        "6.18.2",
        "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg==",
        "package/build/vega-embed.min.js",
    ),
)


class FetchError(Exception):
    """The registry cannot be reached: not fatal, the page then loads the scripts from the CDN."""


class IntegrityError(Exception):
    """The bytes are not the pinned package: fatal, nothing is stored."""


def check_integrity(data: bytes, integrity: str, source: str) -> None:
    """Raise :class:`IntegrityError` unless ``data`` matches an npm ``sha512-<base64>`` integrity string."""
    algorithm, _, expected = integrity.partition("-")
    if algorithm != "sha512":
        raise IntegrityError(f"{source}: pinned integrity must be sha512-..., got {integrity!r}")
    got = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if got != expected:
        raise IntegrityError(
            f"{source}: integrity mismatch, got sha512-{got}, expected {integrity} ({len(data)} bytes)"
        )


def download(url: str, timeout: float) -> bytes:
    """The whole body of ``url`` (the tarballs are under 1 MB); network failures become :class:`FetchError`."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as err:
        err.close()
        raise FetchError(f"{url}: HTTP error {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise FetchError(f"{url}: cannot connect ({err.reason})") from None
    except (TimeoutError, OSError) as err:
        raise FetchError(f"{url}: download failed ({err!r})") from None


def extract(tarball: bytes, member: str, source: str) -> bytes:
    """One file of a verified ``.tgz``, read in memory (nothing of the archive is written to disk)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
            handle = archive.extractfile(member)
            if handle is None:
                raise IntegrityError(f"{source}: {member} is not a regular file in the tarball")
            return handle.read()
    except KeyError:
        raise IntegrityError(f"{source}: the tarball has no {member}") from None
    except (tarfile.TarError, EOFError, OSError) as err:
        raise IntegrityError(f"{source}: unreadable tarball ({err})") from None


def store(data: bytes, final: Path) -> None:
    """Write ``final`` under a temporary name in its folder, then rename: readers never see half a file."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp_name, 0o644)  # mkstemp's 0600 would hide it from a web server run as another user
        os.replace(tmp_name, final)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def fetch(package: Package, dest: Path, url: str | None = None, timeout: float = 60.0) -> Path:
    """Make ``dest/<package.filename>`` hold the package's verified browser build; return its path.

    A present file is trusted: it was only ever stored under that name after the check. ``url`` overrides
    the registry tarball's address (tests serve a local one).
    """
    final = dest / package.filename
    if final.is_file():
        return final
    source = url or package.url
    tarball = download(source, timeout)
    check_integrity(tarball, package.integrity, source)
    store(extract(tarball, package.member, source), final)
    return final


def main() -> int:
    missing = [package for package in PACKAGES if not (VENDOR / package.filename).is_file()]
    if not missing:  # the usual case: `make repro` stays quiet
        return 0
    try:
        for package in missing:
            fetch(package, VENDOR)
    except FetchError as err:
        print(f"fetch_vega: skipped, {err}; `dvc plots show` pages will load vega from the CDN", file=sys.stderr)
        return 0
    except (IntegrityError, OSError) as err:
        print(f"error: fetch_vega: {err}", file=sys.stderr)
        return 2
    print(f"fetch_vega: {', '.join(f'{p.name} {p.version}' for p in missing)} in {VENDOR.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
