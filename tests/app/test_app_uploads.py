"""Uploads: zips unpacked inside the workspace and cleaned up; count limits."""

from __future__ import annotations

import os
import time

import pandas as pd
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

from app_ui import sources
from padim_core import archives, demo, workspace

UPLOADER = "batch_Upload files or a zip"


def _batch_uploads():
    at = open_page("batch")
    at.radio(key="batch_source").set_value("Upload files or a zip").run()
    return at


def _lot(name: str, n: int = 2) -> tuple[str, bytes, str]:
    images = {f"lot/{p.name}": p.read_bytes() for p in demo.batch_images()[:n]}
    return upload(name, zip_bytes(images), "application/zip")


def _reasons(at) -> str:
    """The reasons in the table of files left out."""
    return "\n".join(at.dataframe[0].value["reason"])


def _folders(root) -> list:
    folder = workspace.uploads_dir(root)
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_zips_unpack_inside_the_workspace_and_go_when_replaced(fitted, workspace_root):
    at = _batch_uploads()
    at.file_uploader(key=UPLOADER).set_value(_lot("first.zip")).run()

    assert_clean(at)
    (first,) = _folders(workspace_root)
    assert len(list(first.iterdir())) == 2
    at.file_uploader(key=UPLOADER).set_value(_lot("second.zip", 3)).run()
    (second,) = _folders(workspace_root)
    assert second != first and len(list(second.iterdir())) == 3
    at.file_uploader(key=UPLOADER).set_value([]).run()
    assert _folders(workspace_root) == []


def test_a_refused_zip_leaves_no_folder_and_is_not_retried(
    fitted, workspace_root, monkeypatch
):
    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return archives.unpack_zip(*args, **kwargs)

    monkeypatch.setattr(sources, "unpack_zip", counting)
    at = _batch_uploads()
    bad = upload("broken.zip", b"PK\x03\x04 not really", "application/zip")
    at.file_uploader(key=UPLOADER).set_value(bad).run()
    at.run()
    at.run()

    assert_clean(at)
    assert "not a readable zip archive" in _reasons(at)
    assert _folders(workspace_root) == []
    assert len(calls) == 1


def test_stale_upload_folders_are_swept_and_kept_ones_stay(tmp_path):
    uploads = workspace.uploads_dir(tmp_path)
    old, kept, fresh = (uploads / name for name in ("old", "kept", "fresh"))
    for folder in (old, kept, fresh):
        folder.mkdir(parents=True)
        (folder / "a.png").write_bytes(b"x")
    day_ago = time.time() - workspace.STALE_UPLOAD_SECONDS - 60
    for folder in (old, kept):
        os.utime(folder, (day_ago, day_ago))

    removed = workspace.remove_stale_uploads(tmp_path, keep=[kept])

    assert removed == [old]
    assert sorted(uploads.iterdir()) == [fresh, kept]


def test_a_folder_a_fit_reads_stays_until_the_fit_lets_go(tmp_path):
    unpacks = sources._Unpacks()
    folder = tmp_path / "upload"
    folder.mkdir()
    unpacks.get(folder)
    held = unpacks.hold([folder])

    unpacks.drop(folder)
    assert folder.is_dir()
    unpacks.release(held)
    assert not folder.exists()
    assert unpacks.folders() == []


def test_the_limits_are_stated_beside_every_uploader(fitted):
    at = _batch_uploads()

    stated = texts(at.caption)
    assert "2,000 files per upload" in stated
    assert "200 MB per file" in stated


def test_more_files_than_the_limit_are_refused_as_a_whole(fitted):
    at = _batch_uploads()
    files = [upload(f"{i}.png", b"x") for i in range(sources.MAX_UPLOAD_FILES + 1)]
    at.file_uploader(key=UPLOADER).set_value(files).run()

    assert not at.exception
    assert "2,001 files" in texts(at.error)
    assert "Choose the images" in texts(at.info)


@pytest.mark.parametrize("extra", [1, 50])
def test_zips_may_not_carry_more_images_than_the_limit(fitted, extra):
    at = _batch_uploads()
    cell = demo.batch_images()[0].read_bytes()
    members = {f"{i}.png": cell for i in range(sources.MAX_UPLOAD_FILES - 10)}
    plain = demo_uploads(demo.batch_images()[:1])
    files = [upload("big.zip", zip_bytes(members), "application/zip"), *plain]
    other = {f"{i}.png": cell for i in range(10 + extra)}
    files.append(upload("more.zip", zip_bytes(other), "application/zip"))
    at.file_uploader(key=UPLOADER).set_value(files).run()

    assert not at.exception
    assert "more than 2,000 images once unpacked" in texts(at.error)


def test_one_zip_over_the_member_limit_is_refused_unpacked(fitted, workspace_root):
    at = _batch_uploads()
    members = {f"{i}.png": b"x" for i in range(sources.MAX_UPLOAD_FILES + 1)}
    at.file_uploader(key=UPLOADER).set_value(
        upload("huge.zip", zip_bytes(members), "application/zip")
    ).run()

    assert_clean(at)
    assert "2,001 members, more than the limit of 2,000" in _reasons(at)
    assert _folders(workspace_root) == []


def test_uploads_and_results_survive_a_visit_to_another_page(fitted):
    images = {f"lot/{p.name}": p.read_bytes() for p in demo.batch_images()[:3]}
    at = open_page("batch")
    at.radio(key="batch_source").set_value("Upload files or a zip").run()
    lot = ("lot.zip", zip_bytes(images), "application/zip")
    at.file_uploader(key="batch_Upload files or a zip").set_value(lot).run()
    by_label(at.button, "Score 3 images").click().run()
    before = at.dataframe[-1].value

    at.switch_page("app_pages/inspect.py").run()
    at.switch_page("app_pages/batch.py").run()

    assert_clean(at)
    assert "Using 1 uploaded file (from previous visit)" in texts(at.info)
    pd.testing.assert_frame_equal(at.dataframe[-1].value, before)
    by_label(at.slider, "How many").set_value(2).run()  # any rerun keeps them
    assert "Using 1 uploaded file" in texts(at.info)
    assert len(at.dataframe[-1].value) == 3

    by_label(at.button, "Clear").click().run()
    assert_clean(at)
    assert not at.dataframe
    assert "Choose the images to score." in texts(at.info)


def test_inspect_keeps_its_uploads_across_pages(fitted):
    at = open_page("inspect")
    at.radio(key="inspect_source").set_value("Upload files or a zip").run()
    files = demo_uploads(demo.inspection_images()[:2])
    at.file_uploader(key="inspect_Upload files or a zip").set_value(files).run()
    at.switch_page("app_pages/models.py").run()
    at.switch_page("app_pages/inspect.py").run()

    assert_clean(at)
    assert "Using 2 uploaded files" in texts(at.info)
    assert "**2 images**" in texts(at.markdown)
