"""User-supplied names never turn into markdown: no links, emphasis or colour."""

from __future__ import annotations

import pickle
import re

import pytest
from apptools import by_label, open_page, texts, upload, wait_for, zip_bytes

from app_ui.widgets import escape_markdown
from padim_core import demo

LINK = "[Click here](https://evil.example)"
ESCAPED_LINK = "\\[Click here\\]\\(https\\:\u2060\\/\\/evil\\.example\\)"
JOINER = "\u2060"


def _unescape(text: str) -> str:
    """The text a markdown renderer shows (escapes undone), joiners apart."""
    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", text)


@pytest.mark.parametrize(
    "name",
    [
        LINK,
        "**bold** _it_ `code`",
        ":red[alarm] $x^2$ <b>html</b>",
        "https://evil.example and www.evil.example",
        "# heading\n- item\r\ttab",
        "a\\b",
        "mail x@evil.example",
    ],
)
def test_escaped_names_keep_every_character_literal(name):
    escaped = escape_markdown(name)

    assert not re.search(r"(?<!\\)[\[\]()*_`:$<>#\n]", escaped.replace("\\\\", ""))
    shown = _unescape(escaped)
    assert shown.replace(JOINER, "") == re.sub(r"[\x00-\x1f]", " ", name)
    assert not re.search(r"(?i)https?://|www\.|@\w", shown)  # no bare links


def test_an_image_name_shows_as_text_on_inspect(fitted):
    cell = demo.inspection_images()[0].read_bytes()
    archive = zip_bytes({f"{LINK}/cell.png": cell})
    at = open_page("inspect")
    at.radio(key="inspect_source").set_value("Upload files or a zip").run()
    at.file_uploader(key="inspect_Upload files or a zip").set_value(
        upload("lot.zip", archive, "application/zip")
    ).run()

    shown = texts(at.markdown)
    assert ESCAPED_LINK in shown
    assert LINK not in shown


def test_a_failed_fit_names_the_file_as_text_without_a_type(workspace_root):
    at = open_page("fit")
    at.radio(key="fit_source").set_value("Upload files or a zip").run()
    at.file_uploader(key="fit_Upload files or a zip").set_value(
        upload(f"{LINK}.png", b"not an image")
    ).run()
    by_label(at.button, "Fit model").click().run()
    wait_for(at, lambda at: bool(at.error))

    failed = texts(at.error)
    assert "could be used" in failed
    assert ESCAPED_LINK in failed and LINK not in failed
    assert "ValueError" not in failed


def test_a_refused_model_upload_names_the_file_as_text(workspace_root):
    at = open_page("models")
    at.file_uploader(key="models_upload").set_value(
        (f"{LINK}.safetensors", pickle.dumps([1]), "application/octet-stream")
    ).run()

    refused = texts(at.error)
    assert "Not stored" in refused
    assert ESCAPED_LINK in refused and LINK not in refused
