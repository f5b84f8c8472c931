"""What `dvc plots show` gives a user: a page that draws with no network, and a readable trade-off plot.

DVC's default page loads vega from a CDN (blank offline); the project's page (.dvc/plots_page.html) loads the
copies that scripts/fetch_vega.py verified into vendor/. The page is opened in a real headless Chromium with
every network request refused, as on a machine with no network.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT, copy_sources, run


def load_fetch_vega() -> ModuleType:
    """scripts/ is not a package (the script runs before the venv exists): load it by path."""
    spec = importlib.util.spec_from_file_location("fetch_vega", ROOT / "scripts" / "fetch_vega.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fetch_vega = load_fetch_vega()


def test_the_page_loads_the_vendored_scripts_dvc_render_was_made_for():
    from dvc.repo import Repo
    from dvc_render.vega import VegaRenderer

    # dvc-render's default page pins these versions (its specs are written for them): an upgrade that moves
    # them must move the pins in scripts/fetch_vega.py and the page too.
    default = re.findall(r"cdn\.jsdelivr\.net/npm/([\w-]+)@([\d.]+)", VegaRenderer.SCRIPTS)
    assert default == [(p.name, p.version) for p in fetch_vega.PACKAGES]

    with Repo(str(ROOT)) as repo:
        page = Path(repo.dvc_dir, repo.config["plots"]["html_template"]).read_text()
    assert "{plot_divs}" in page
    assert "{scripts}" not in page  # DVC would insert its CDN scripts there
    for package in fetch_vega.PACKAGES:
        local = page.index(f'src="../vendor/{package.filename}"')
        fallback = page.index(f"cdn.jsdelivr.net/npm/{package.name}@{package.version}")
        assert local < fallback  # the CDN only when the local copy did not load


def test_the_comparison_plot_has_log_bit_ops_zoomed_accuracy_and_a_label_per_network():
    from dvc.render.match import match_defs_renderers
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        data = repo.plots.show(targets=["reports/comparison.json"])
        (match,) = match_defs_renderers(data=data, templates_dir=repo.plots.templates_dir)
    spec = match.renderer.get_filled_template()

    x, y = spec["encoding"]["x"], spec["encoding"]["y"]
    assert (x["field"], x["scale"]["type"]) == ("bit_ops", "log")
    assert (y["field"], y["scale"]["zero"]) == ("test_accuracy", False)
    points, labels = spec["layer"]
    assert points["encoding"]["color"]["field"] == "kind"
    assert labels["mark"]["type"] == "text"
    calculated = {step["as"]: step["calculate"] for step in spec["transform"]}
    assert "sparse" in calculated["label"]  # the bitwise network's label says its sparsity
    assert {row["network"] for row in spec["data"]["values"]} >= {"real", "bnn"}  # the ~1000x gap is drawn


def tarball(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def test_fetch_stores_only_a_verified_build_under_its_final_name(tmp_path):
    script = b"var vega = {};"
    good = tarball({"package/build/vega.min.js": script, "package/package.json": b"{}"})
    (tmp_path / "good.tgz").write_bytes(good)
    (tmp_path / "bad.tgz").write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one bit flipped in transit
    package = fetch_vega.Package("vega", "9.9.9", integrity(good), "package/build/vega.min.js")
    dest = tmp_path / "vendor"
    dest.mkdir()

    with pytest.raises(fetch_vega.IntegrityError, match="integrity mismatch"):
        fetch_vega.fetch(package, dest, url=(tmp_path / "bad.tgz").as_uri())
    assert list(dest.iterdir()) == []  # no final file, no .part left behind

    with pytest.raises(fetch_vega.FetchError, match="cannot connect"):
        fetch_vega.fetch(package, dest, url=(tmp_path / "absent.tgz").as_uri())

    wrong_member = fetch_vega.Package("vega", "9.9.9", integrity(good), "package/build/other.js")
    with pytest.raises(fetch_vega.IntegrityError, match="has no package/build/other.js"):
        fetch_vega.fetch(wrong_member, dest, url=(tmp_path / "good.tgz").as_uri())

    stored = fetch_vega.fetch(package, dest, url=(tmp_path / "good.tgz").as_uri())
    assert stored == dest / "vega-9.9.9.min.js" and stored.read_bytes() == script
    assert [p.name for p in dest.iterdir()] == ["vega-9.9.9.min.js"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.skip("chromium is not installed (scripts/system_deps.sh installs it when run as root)")


@pytest.mark.slow
def test_the_plots_page_draws_with_no_network(tmp_path):
    browser = chromium()
    try:  # what `make test` did already; here for a bare `pytest`
        for package in fetch_vega.PACKAGES:
            fetch_vega.fetch(package, fetch_vega.VENDOR)
    except fetch_vega.FetchError as err:
        pytest.skip(f"the vega scripts are not in vendor/ and cannot be fetched: {err}")

    # The project as a user has it: the page template and plot templates, the plotted files, vendor/.
    project = copy_sources(tmp_path / "project")
    shutil.copy(ROOT / ".dvc" / "plots_page.html", project / ".dvc")
    shutil.copytree(ROOT / ".dvc" / "plots", project / ".dvc" / "plots", dirs_exist_ok=True)
    shutil.copytree(ROOT / "reports", project / "reports", ignore=shutil.ignore_patterns("*.png", "*.md"))
    (project / "vendor").symlink_to(fetch_vega.VENDOR)
    run(["git", "init", "-q"], project)
    run([str(Path(sys.executable).parent / "dvc"), "plots", "show"], project)
    page = project / "dvc_plots" / "index.html"

    # Every request that leaves the machine goes to a closed port, and no host name resolves.
    dom = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--proxy-server=127.0.0.1:9",
            "--proxy-bypass-list=<-loopback>",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout

    # vega-embed draws each plot on a canvas that it sizes once the spec has rendered.
    canvases = re.findall(r'<canvas[^>]*\bwidth="(\d+)"[^>]*\bheight="(\d+)"', dom)
    drawn = [size for size in canvases if min(map(int, size)) > 0]
    assert len(drawn) == 3, f"expected the comparison and two training curves drawn, got {canvases}:\n{dom[:2000]}"
