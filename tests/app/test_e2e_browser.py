"""End to end in a real browser: fit, inspect, move a threshold, batch CSV.

Starts ``streamlit run app.py`` on a free localhost port with an empty
workspace and drives it with Playwright and Debian's chromium (never a
downloaded browser). A screenshot of every step is kept in
``test-output/e2e/``.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "test-output" / "e2e"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
START_TIMEOUT = 90
STEP_TIMEOUT = 240_000  # milliseconds, for Playwright


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"streamlit exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"streamlit did not answer on {url}")


@pytest.fixture
def app_url(tmp_path: Path) -> Iterator[str]:
    """The app, served on a free localhost port with an empty workspace."""
    port = _free_port()
    env = dict(os.environ, PADIM_WORKSPACE=str(tmp_path / "workspace"))
    command = [sys.executable, "-m", "streamlit", "run", "app.py"]
    command += ["--server.address", "127.0.0.1", "--server.port", str(port)]
    command += ["--server.headless", "true", "--browser.gatherUsageStats", "false"]
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "streamlit.log", "wb") as log:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
        try:
            _wait_healthy(url, server)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()


@pytest.fixture
def page(app_url: str):
    """A chromium page on the app."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.skip("chromium is not installed (.ci/run installs it)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS
        )
        view = browser.new_page(
            viewport={"width": 1400, "height": 1800}, accept_downloads=True
        )
        view.set_default_timeout(STEP_TIMEOUT)
        view.goto(app_url)
        yield view
        browser.close()


def _shot(page, name: str) -> None:
    page.wait_for_timeout(800)
    page.screenshot(path=SHOTS / f"{name}.png")


def _choose(page, label: str, option: str) -> None:
    page.get_by_role("combobox", name=label).click()
    page.get_by_role("option").filter(has_text=option).first.click()
    page.wait_for_timeout(1000)


def test_fit_inspect_threshold_and_batch_csv(page, app_url, tmp_path):
    page.get_by_role("button", name="Fit model").wait_for()
    _choose(page, "Image size", "128 × 128")
    channels = page.get_by_role("spinbutton", name="Random channels kept")
    channels.fill("20")
    channels.press("Enter")
    page.wait_for_timeout(1000)
    _shot(page, "01_fit_settings")
    page.get_by_role("button", name="Fit model").click()
    page.get_by_text("It is now the active model").wait_for()
    _shot(page, "02_fitted")

    page.goto(f"{app_url}/inspect")
    summary = page.locator("p").filter(has_text="8 images ·")
    summary.wait_for()
    page.get_by_text("FAIL").first.wait_for()
    _shot(page, "03_inspect_defective_cell")
    assert " fail" in summary.inner_text()

    page.get_by_role("slider").first.focus()
    page.keyboard.press("End")
    page.get_by_text("0 fail").wait_for()
    page.get_by_text("PASS").first.wait_for()
    _shot(page, "04_threshold_moved_all_pass")

    page.goto(f"{app_url}/batch")
    page.get_by_role("button", name="Score 80 images").click()
    page.get_by_text("Worst images").wait_for()
    _shot(page, "05_batch")
    # The table's toolbar offers no CSV of its own: only the page's, which
    # keeps formula-like names as text.
    page.get_by_test_id("stDataFrame").first.hover()
    page.locator("button[aria-label^='Search']").first.wait_for()
    assert page.locator("button[aria-label^='Download as CSV']").count() == 0
    with page.expect_download() as download:
        page.get_by_role("button", name="Download CSV").click()
    saved = tmp_path / "batch.csv"
    download.value.save_as(saved)
    with open(saved, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "score", "normalised_score", "verdict"]
    assert len(rows) == 80
    assert {row["verdict"] for row in rows} <= {"pass", "fail"}
