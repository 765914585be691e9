"""AppTests of the Batch page: scoring a lot, the table, the CSV, the gallery."""

from __future__ import annotations

import csv
import io
import tomllib
from pathlib import Path

import pytest
from apptools import (
    assert_clean,
    by_label,
    demo_uploads,
    open_page,
    texts,
    upload,
    zip_bytes,
)
from streamlit import config
from streamlit.runtime.media_file_manager import MediaFileManager

from app_ui.widgets import spreadsheet_safe
from padim_core import demo


@pytest.fixture
def offered(monkeypatch) -> list[bytes]:
    """The CSV files the page offers for download, as they are offered."""
    kept = []
    add = MediaFileManager.add

    def keep(self, data, mimetype, *args, **kwargs):
        if mimetype == "text/csv":
            kept.append(data)
        return add(self, data, mimetype, *args, **kwargs)

    monkeypatch.setattr(MediaFileManager, "add", keep)
    return kept


def test_the_demo_lot_is_scored_sorted_and_offered_as_csv(fitted):
    at = open_page("batch")
    assert_clean(at)
    n = demo.N_BATCH_GOOD + demo.N_BATCH_DEFECTIVE
    by_label(at.button, f"Score {n} images").click().run()

    assert_clean(at)
    table = at.dataframe[0].value
    assert list(table.columns) == ["path", "score", "normalised_score", "verdict"]
    assert len(table) == n
    assert table["score"].is_monotonic_decreasing
    assert set(table["verdict"]) <= {"pass", "fail"}
    assert ((table["normalised_score"] >= 0) & (table["normalised_score"] <= 1)).all()
    assert by_label(at.metric, "Images scored").value == str(n)
    assert at.get("download_button")
    assert len(at.get("image")) == 8  # the gallery of the worst


def test_a_zip_lot_names_the_members_it_left_out(fitted):
    images = {f"lot/{p.name}": p.read_bytes() for p in demo.batch_images()[:3]}
    images["lot/readme.md"] = b"# not an image"
    at = open_page("batch")
    at.radio(key="batch_source").set_value("Upload files or a zip").run()
    upload = ("lot.zip", zip_bytes(images), "application/zip")
    at.file_uploader(key="batch_Upload files or a zip").set_value(upload).run()
    by_label(at.button, "Score 3 images").click().run()

    assert_clean(at)
    paths = list(at.dataframe[-1].value["path"])
    assert all(path.startswith("lot.zip/lot/") for path in paths)
    assert "readme.md" in texts(at.dataframe)


def test_nothing_is_scored_until_asked(fitted):
    at = open_page("batch")
    at.radio(key="batch_source").set_value("Upload files or a zip").run()
    files = demo_uploads(demo.batch_images()[:2])
    at.file_uploader(key="batch_Upload files or a zip").set_value(files).run()

    assert_clean(at)
    assert not at.dataframe
    assert not at.metric


@pytest.mark.parametrize(
    "name",
    ['=HYPERLINK("https://evil.example","ok").png', "+1.png", "-2.png", "@SUM.png"],
)
def test_the_csv_keeps_formula_like_names_as_text(fitted, offered, name):
    at = open_page("batch")
    at.radio(key="batch_source").set_value("Upload files or a zip").run()
    cell = demo.batch_images()[0].read_bytes()
    at.file_uploader(key="batch_Upload files or a zip").set_value(
        upload(name, cell)
    ).run()
    by_label(at.button, "Score 1 image").click().run()

    assert_clean(at)
    (row,) = csv.DictReader(io.StringIO(offered[-1].decode()))
    assert row["path"] == f"'{name}"
    assert at.dataframe[-1].value["path"][0] == name  # the table shows it as is


def test_tables_offer_no_csv_download_of_their_own():
    # Their built-in CSV would pass formula-like file names on unquoted.
    settings = Path(__file__).resolve().parents[2] / ".streamlit" / "config.toml"
    client = tomllib.loads(settings.read_text())["client"]

    assert "client.disableDataExport" in config.get_config_options()
    assert client["disableDataExport"] is True


@pytest.mark.parametrize("text", ["=1+1", "+1", "-1", "@A1", "\t=1", "\r=1"])
def test_formula_starts_get_a_quote(text):
    assert spreadsheet_safe(text) == f"'{text}"


@pytest.mark.parametrize("text", ["cell.png", "lot.zip/a-1.png", " =x", "'=x"])
def test_other_names_are_left_alone(text):
    assert spreadsheet_safe(text) == text


def test_the_last_results_stay_until_the_next_scoring(fitted):
    at = open_page("batch")
    n = demo.N_BATCH_GOOD + demo.N_BATCH_DEFECTIVE
    by_label(at.button, f"Score {n} images").click().run()
    at.radio(key="batch_source").set_value("Upload files or a zip").run()
    files = demo_uploads(demo.batch_images()[:2])
    at.file_uploader(key="batch_Upload files or a zip").set_value(files).run()

    assert_clean(at)
    assert len(at.dataframe[-1].value) == n
    assert "from the last scoring" in texts(at.info)
    by_label(at.button, "Score 2 images").click().run()
    assert len(at.dataframe[-1].value) == 2
    assert "from the last scoring" not in texts(at.info)


def test_without_a_threshold_the_normalised_column_stays_empty(unthresholded, offered):
    at = open_page("batch")
    n = demo.N_BATCH_GOOD + demo.N_BATCH_DEFECTIVE
    by_label(at.button, f"Score {n} images").click().run()

    assert_clean(at)
    table = at.dataframe[-1].value
    assert table["normalised_score"].isna().all()
    assert set(table["verdict"]) == {"unset"}
    assert "normalised column stays empty" in texts(at.warning)
    rows = list(csv.DictReader(io.StringIO(offered[-1].decode())))
    assert len(rows) == n
    assert {row["normalised_score"] for row in rows} == {""}
