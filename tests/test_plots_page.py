"""The `dvc plots` review page draws its charts with the network off (vega inlined, .dvc/config)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("CI"):  # `make test` installs it; CI must not skip silently
    raise RuntimeError("chromium is missing: `make test` installs it with apt-get (Debian package chromium)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")

# every host name resolves nowhere and every request goes to a closed port: no network at all
OFFLINE = ["--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9", "--no-proxy-server=false"]


def _chromium(*options: str, page) -> str:
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--virtual-time-budget=15000",
        *OFFLINE,
        *options,
        page.as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


def _plots_page(tmp_path, with_template: bool):
    """``dvc plots show`` of a confusion matrix and a curve in a fresh repository, as a reviewer runs it."""
    repo = tmp_path / ("offline" if with_template else "default")
    (repo / "plots").mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    if with_template:
        shutil.copy(REPO / ".dvc" / "config", repo / ".dvc" / "config")
        shutil.copytree(REPO / ".dvc" / "plots", repo / ".dvc" / "plots", dirs_exist_ok=True)
    rows = ["actual,predicted"] + [
        f"{a},{p}" for a, p in [("bas", "bas"), ("eos", "eos"), ("eos", "bas"), ("lym", "lym")]
    ]
    (repo / "plots" / "confusion.csv").write_text("\n".join(rows) + "\n")
    (repo / "plots" / "curve.csv").write_text("epoch,f1\n1,0.4\n2,0.6\n3,0.7\n")
    (repo / "dvc.yaml").write_text(
        "plots:\n"
        "  - plots/confusion.csv:\n      template: confusion\n      x: predicted\n      y: actual\n"
        "  - plots/curve.csv:\n      x: epoch\n      y: f1\n"
    )
    subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show", "-o", "page"], cwd=repo, check=True, capture_output=True
    )
    return repo / "page" / "index.html"


def _drawn_charts(page) -> int:
    """Charts vega-embed drew on the page (each a canvas or svg of class "marks")."""
    return len(re.findall(r'class="marks"', _chromium("--dump-dom", page=page)))


def test_the_plots_page_draws_every_chart_offline(tmp_path):
    page = _plots_page(tmp_path, with_template=True)
    assert "cdn.jsdelivr.net" not in page.read_text()
    assert _drawn_charts(page) == 2
    shot = tmp_path / "page.png"
    _chromium(f"--screenshot={shot}", "--window-size=1200,900", page=page)
    assert shot.stat().st_size > 10_000  # the charts, not a blank page


def test_without_the_template_the_charts_stay_blank_offline(tmp_path):
    page = _plots_page(tmp_path, with_template=False)
    assert "cdn.jsdelivr.net" in page.read_text()
    assert _drawn_charts(page) == 0
