"""Helpers of the app tests: open a page, find widgets, build uploads.

Every test runs the real app (``app.py``) with ``AppTest`` and switches to the
page under test, so routing and the sidebar run too.
"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path

from PIL import Image
from streamlit.testing.v1 import AppTest

APP = Path(__file__).resolve().parents[2] / "app.py"
TIMEOUT = 120


def open_page(page: str) -> AppTest:
    """Run the app, then switch to ``page`` (a file in app_pages/)."""
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    at.switch_page(f"app_pages/{page}.py")
    return at.run()


def assert_clean(at: AppTest) -> None:
    """No exception and no error message on the page."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def by_label(elements: Iterable, label: str):
    """The one element whose label starts with ``label``."""
    found = [e for e in elements if e.label.startswith(label)]
    assert len(found) == 1, [e.label for e in elements]
    return found[0]


def texts(elements: Iterable) -> str:
    """All values of some elements as one string, to search in."""
    return "\n".join(str(e.value) for e in elements)


def upload(name: str, data: bytes, mime: str = "image/png") -> tuple[str, bytes, str]:
    """An upload, as ``FileUploader.set_value`` takes it."""
    return name, data, mime


def demo_uploads(paths: Iterable[Path]) -> list[tuple[str, bytes, str]]:
    """Demo images as uploads."""
    return [upload(path.name, path.read_bytes()) for path in paths]


def flat_png(value: int = 0, side: int = 64) -> bytes:
    """A PNG of one flat grey level."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (value, value, value)).save(buffer, "PNG")
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    """A zip archive of ``members`` (name -> bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def wait_for(at: AppTest, done, timeout: float = TIMEOUT) -> AppTest:
    """Rerun ``at`` until ``done(at)`` holds, e.g. while a fit runs."""
    start = time.perf_counter()
    while not done(at):
        assert time.perf_counter() - start < timeout, "timed out waiting"
        time.sleep(0.3)
        at.run()
    return at
