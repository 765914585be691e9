"""AppTests of the Batch page: scoring a lot, the table, the CSV, the gallery."""

from __future__ import annotations

from apptools import assert_clean, by_label, demo_uploads, open_page, texts, zip_bytes

from padim_core import demo


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
