"""The dashboard in headless Chromium: the planted feature's page shows its grids, the list's search works.

Skipped when no Chromium is installed (CI installs it with the system package manager).
"""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from tests.analysis.helpers import D_SAE, PLANTED, SITE, make_store, planted_sae

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium / chromium-browser / google-chrome on PATH")
GREEN = np.array([0x2E, 0xCC, 0x40])  # ARC colour 3


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1400,1000", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory) -> Path:
    from arcstream.analysis import AnalyzeOptions, analyze

    root = tmp_path_factory.mktemp("browser")
    make_store(root / "run", n_tasks=2)
    planted_sae(root / "run" / "saes" / SITE)
    analyze(AnalyzeOptions(run_dir=str(root / "run"), output_dir=str(root / "out"), chunk_rows=1024,
                           dashboard_features=D_SAE, examples_per_feature=2, ce_prompts=0))
    return root / "out" / "dashboard" / "index.html"


def _green_pixels(png: Path) -> int:
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB"), np.int32)
    return int((np.abs(rgb - GREEN).max(-1) <= 8).sum())


def test_the_feature_page_draws_its_grids_only_when_opened(dashboard, tmp_path):
    from arcstream.analysis import page_id

    url = dashboard.as_uri()
    shots = {}
    for name, target in (("list", url), ("page", f"{url}#{page_id(SITE, PLANTED)}")):
        shots[name] = tmp_path / f"{name}.png"
        p = _chromium(f"--screenshot={shots[name]}", target)
        assert shots[name].exists(), p.stderr[-2000:]
    # ARC colour 3 appears only in drawn grids: none on the bare list, many cells' worth on the page.
    assert _green_pixels(shots["list"]) == 0
    assert _green_pixels(shots["page"]) > 500


class _Rows(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and a.get("class") == "feature-row":
            self.rows.append(a)


def test_search_box_filters_the_feature_list(dashboard, tmp_path):
    # The same page plus a script typing "colour 3" into the search box, then dumping the live DOM.
    probe = tmp_path / "probe.html"
    probe.write_text(dashboard.read_text().replace(
        "</body>", "<script>const s=document.getElementById('search');s.value='colour 3';"
                   "s.dispatchEvent(new Event('input'));</script></body>"))
    p = _chromium("--dump-dom", probe.as_uri())
    parser = _Rows()
    parser.feed(p.stdout)
    assert len(parser.rows) == D_SAE, p.stderr[-2000:]
    shown = [int(r["data-index"]) for r in parser.rows if "display: none" not in r.get("style", "")]
    assert PLANTED in shown and len(shown) < D_SAE, "the filter hides the rows whose label lacks the query"
    assert all("colour 3" in r["data-label"] for r in parser.rows if int(r["data-index"]) in shown)
