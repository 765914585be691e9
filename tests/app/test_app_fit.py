"""AppTests of the Fit page: demo fit, uploads with bad files, extending."""

from __future__ import annotations

import csv
import io

import pytest
from apptools import (
    assert_clean,
    by_label,
    demo_uploads,
    flat_png,
    open_page,
    texts,
    upload,
    wait_for,
    zip_bytes,
)
from PIL import Image, ImageDraw
from streamlit.runtime.media_file_manager import MediaFileManager

from app_ui import state
from app_ui.fitting import get_job
from padim_core import demo, workspace
from padim_core.backbones import cached_weights_path
from padim_core.model_file import read_header


def small_settings(at) -> None:
    """Choose the quick settings of these tests."""
    by_label(at.selectbox, "Image size").set_value(128)
    by_label(at.number_input, "Random channels kept").set_value(20)
    at.run()


def finished(at) -> bool:
    """The fit ended: a success or an error is shown."""
    return bool(at.success) or bool(at.error)


def test_fit_on_the_demo_saves_an_active_model_with_thresholds(workspace_root):
    at = open_page("fit")
    assert_clean(at)
    small_settings(at)
    by_label(at.button, "Fit model").click().run()
    wait_for(at, finished)

    assert_clean(at)
    assert "saved" in texts(at.success)
    entry = workspace.get_active(workspace_root)
    assert entry is not None and entry.path.is_file()
    header = read_header(entry.path)
    held_out = round(demo.N_TRAIN * 0.1)
    assert header["info"]["n_images"] == demo.N_TRAIN - held_out
    thresholds = header["thresholds"]
    assert thresholds.score_min < thresholds.image < thresholds.score_max
    assert thresholds.pixel == thresholds.image


def test_fit_on_uploads_skips_bad_files_and_names_them(workspace_root):
    at = open_page("fit")
    at.radio(key="fit_source").set_value("Upload files or a zip").run()
    good = demo_uploads(demo.train_images(5))
    archive = zip_bytes({"more/a.png": good[0][1], "notes.txt": b"hello"})
    files = [*good, upload("broken.png", b"not an image"), upload("lot.zip", archive)]
    at.file_uploader(key="fit_Upload files or a zip").set_value(files).run()
    small_settings(at)
    by_label(at.button, "Fit model").click().run()
    wait_for(at, finished)

    assert not at.exception
    assert "saved" in texts(at.success)
    warned = texts(at.warning)
    assert "could not be used" in warned
    listed = texts(at.dataframe)
    assert "broken.png" in listed and "notes.txt" in listed
    entry = workspace.get_active(workspace_root)
    assert entry.n_images == 5  # 6 images, 1 held out
    assert "1 good image was held out of the fit; its score is" in texts(at.info)


def test_broken_uploads_never_take_the_place_of_a_good_image(workspace_root):
    at = open_page("fit")
    at.radio(key="fit_source").set_value("Upload files or a zip").run()
    junk = [upload(f"junk{i}.png", b"not an image") for i in range(2)]
    files = [junk[0], *demo_uploads(demo.train_images(3)), junk[1]]
    at.file_uploader(key="fit_Upload files or a zip").set_value(files).run()
    small_settings(at)
    assert "4 files to fit on, 1 held out (a tenth of those that can be" in texts(
        at.caption
    )
    by_label(at.button, "Fit model").click().run()
    wait_for(at, finished)

    assert not at.exception
    assert workspace.get_active(workspace_root).n_images == 3  # none held out
    assert "held out of the fit" not in texts(at.info)


def test_adding_images_extends_the_model_without_refitting(fitted):
    before = fitted.n_images
    at = open_page("fit")
    at.segmented_control(key="fit_mode").set_value("Add images to a model").run()
    at.radio(key="fit_source").set_value("Upload files or a zip").run()
    files = demo_uploads(demo.train_images()[100:103])
    at.file_uploader(key="fit_Upload files or a zip").set_value(files).run()
    by_label(at.button, "Add 3 images").click().run()
    wait_for(at, finished)

    assert_clean(at)
    after = workspace.describe(fitted.path)
    assert after.n_images == before + 3
    assert after.thresholds == fitted.thresholds
    assert after.info["added_images"] == 3


@pytest.mark.skipif(
    cached_weights_path("resnet18").is_file(), reason="resnet18 weights are cached"
)
def test_missing_weights_are_explained_and_random_weights_offered(workspace_root):
    at = open_page("fit")
    by_label(at.selectbox, "Backbone").set_value("resnet18").run()

    assert not at.exception
    assert "not on this machine" in texts(at.warning)
    assert by_label(at.button, "Fit model").disabled
    at.toggle(key="fit_pre_resnet18").set_value(False).run()
    assert not by_label(at.button, "Fit model").disabled


def test_the_model_name_follows_the_images_until_edited(workspace_root):
    at = open_page("fit")
    assert at.text_input(key="fit_name").value == "solar-cells"

    at.radio(key="fit_source").set_value("Upload files or a zip").run()
    assert at.text_input(key="fit_name").value.startswith("model-")
    lot = zip_bytes({"lot/a.png": demo.train_images(1)[0].read_bytes()})
    at.file_uploader(key="fit_Upload files or a zip").set_value(
        upload("Line 4 lot.zip", lot, "application/zip")
    ).run()
    assert at.text_input(key="fit_name").value == "Line 4 lot"

    at.text_input(key="fit_name").set_value("mine").run()
    at.radio(key="fit_source").set_value("Demo set").run()
    assert_clean(at)
    assert at.text_input(key="fit_name").value == "mine"


def test_flat_training_images_warn_and_set_no_first_threshold(workspace_root):
    at = open_page("fit")
    at.radio(key="fit_source").set_value("Upload files or a zip").run()
    files = [upload(f"black{i}.png", flat_png(0)) for i in range(10)]
    at.file_uploader(key="fit_Upload files or a zip").set_value(files).run()
    small_settings(at)
    by_label(at.button, "Fit model").click().run()
    wait_for(at, finished)

    assert_clean(at)
    warned = texts(at.warning)
    assert "identical features" in warned
    assert "one flat colour" in warned
    assert "No first threshold is set" in warned
    assert len(at.warning) == 5  # the first five; all are listed below them
    assert "black9.png: the image is one flat colour" in texts(at.text)
    assert workspace.get_active(workspace_root).thresholds.image is None


def test_few_images_are_warned_about_once(workspace_root):
    at = open_page("fit")
    at.radio(key="fit_source").set_value("Upload files or a zip").run()
    files = demo_uploads(demo.train_images(4))
    at.file_uploader(key="fit_Upload files or a zip").set_value(files).run()
    small_settings(at)
    by_label(at.button, "Fit model").click().run()
    wait_for(at, finished)

    assert_clean(at)
    assert texts(at.warning).count("fitted on 4 images for 20 channels") == 1


def test_the_outlier_check_is_off_by_default(workspace_root):
    at = open_page("fit")
    check = at.checkbox(key="fit_review")
    assert check.label == (
        "Check the training images for outliers (one more pass over them)"
    )
    assert check.value is False


def _odd_cell(path) -> bytes:
    """A demo cell with a bright block painted over its middle."""
    picture = Image.open(path).convert("RGB")
    side = min(picture.size)
    ImageDraw.Draw(picture).rectangle(
        [side // 4, side // 4, 3 * side // 4, 3 * side // 4], fill=(255, 255, 255)
    )
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def test_the_check_lists_an_odd_training_image_and_fits_again_without_it(
    workspace_root,
):
    at = open_page("fit")
    at.radio(key="fit_source").set_value("Upload files or a zip").run()
    cells = demo.train_images(20)
    files = [*demo_uploads(cells), upload("odd.png", _odd_cell(cells[0]))]
    at.file_uploader(key="fit_Upload files or a zip").set_value(files).run()
    small_settings(at)
    at.toggle(key="fit_hold_out").set_value(False)
    at.checkbox(key="fit_review").check().run()
    by_label(at.button, "Fit model").click().run()
    wait_for(at, finished)

    assert_clean(at)
    warned = texts(at.warning)
    assert " of 21 training images look" in warned
    count = int(warned.split(" of 21 ")[0].split()[-1])
    listed = at.dataframe[0].value
    assert listed["image"].iloc[0] == "odd.png"  # the highest score first
    assert len(listed) == count == len(at.get("image"))
    first = workspace.get_active(workspace_root)
    assert first.n_images == 21

    label = "this image" if count == 1 else f"these {count} images"
    uploader = "fit_Upload files or a zip"
    at.file_uploader(key=uploader).set_value(files[1:]).run()  # not those fitted
    at.text_input(key="fit_name").set_value("mine").run()
    by_label(at.button, f"Fit again without {label}").click().run()
    assert _refusal_follows_its_button(at)
    assert at.text_input(key="fit_name").value == "mine"
    assert workspace.get_active(workspace_root).name == first.name  # no new fit

    at.file_uploader(key=uploader).set_value(files).run()
    by_label(at.button, f"Fit again without {label}").click().run()
    wait_for(at, lambda at: finished(at) and "without" in texts(at.success))
    assert_clean(at)
    second = workspace.get_active(workspace_root)
    assert second.name == f"{first.name}-without-outliers"
    assert second.n_images == 21 - count


def _refusal_follows_its_button(at) -> bool:
    """The refusal to fit again shows right under its button, above the form."""
    order = [
        node.label if node.type == "button" else "refused"
        for node in at.main
        if node.type == "button"
        or (node.type == "error" and "no longer those of that fit" in node.value)
    ]
    refit = next(i for i, label in enumerate(order) if label.startswith("Fit again"))
    return order[refit + 1 : refit + 2] == ["refused"] and "Fit model" in order[refit:]


def test_the_check_of_too_few_images_says_why_and_keeps_the_model(workspace_root):
    at = open_page("fit")
    at.radio(key="fit_source").set_value("Upload files or a zip").run()
    at.file_uploader(key="fit_Upload files or a zip").set_value(
        demo_uploads(demo.train_images(3))
    ).run()
    small_settings(at)
    at.checkbox(key="fit_review").check().run()
    by_label(at.button, "Fit model").click().run()
    wait_for(at, finished)

    assert_clean(at)
    assert "saved" in texts(at.success)
    assert "needs at least 4 usable images" in texts(at.warning)
    assert workspace.get_active(workspace_root).n_images == 3


# Markdown and a formula in one file name; uploads cannot carry a slash.
ODD_NAME = "=HYPERLINK(1) **bold** [x](http:__127.0.0.1).png"


def _csv_offered(monkeypatch) -> list[str]:
    """The CSV texts the page offers for download, as it offers them."""
    offered = []
    add = MediaFileManager.add

    def keep(self, data, mimetype, *args, **kwargs):
        if mimetype == "text/csv":
            offered.append(data if isinstance(data, str) else data.decode())
        return add(self, data, mimetype, *args, **kwargs)

    monkeypatch.setattr(MediaFileManager, "add", keep)
    return offered


def test_an_odd_held_out_image_is_checked_flagged_and_left_out_again(
    workspace_root, monkeypatch
):
    offered = _csv_offered(monkeypatch)
    at = open_page("fit")
    at.radio(key="fit_source").set_value("Upload files or a zip").run()
    cells = demo.train_images(20)
    files = demo_uploads(cells)
    files[5] = upload(ODD_NAME, _odd_cell(cells[5]))  # 5 and 15 of 21 held out
    files.append(upload("broken.png", b"not an image"))
    at.file_uploader(key="fit_Upload files or a zip").set_value(files).run()
    small_settings(at)
    at.checkbox(key="fit_review").check().run()
    assert "19 files to fit on, 2 held out" in texts(at.caption)
    by_label(at.button, "Fit model").click().run()
    wait_for(at, finished)

    assert_clean(at)
    warned = texts(at.warning)
    assert "1 file could not be used and was left out" in warned
    assert " of 20 images checked (18 fitted, 2 held out) look" in warned
    assert "1 flagged image was held out of the fit" in warned
    listed = at.dataframe[0].value
    held = listed[listed["held out"]]
    assert list(held["image"]) == [ODD_NAME]
    captions = [one.caption for image in at.get("image") for one in image.proto.imgs]
    odd = r"\=HYPERLINK\(1\) \*\*bold\*\* \[x\]\(http\:\_\_127"
    assert [text for text in captions if text.startswith(odd)]
    assert not [text for text in captions if "**" in text]
    rows = list(csv.DictReader(io.StringIO(offered[-1])))
    assert list(rows[0]) == [
        "path",
        "out_of_fold_score",
        "modified_z",
        "flagged",
        "held_out",
    ]
    assert len(rows) == 20
    flagged = [row for row in rows if row["flagged"] == "true"]
    (row,) = [row for row in flagged if row["held_out"] == "true"]
    assert row["path"] == f"'{ODD_NAME}"  # a spreadsheet keeps it text
    assert "broken.png" in texts(at.dataframe)  # named once, not twice
    assert texts(at.dataframe).count("broken.png") == 1

    count = len(listed)
    label = "this image" if count == 1 else f"these {count} images"
    by_label(at.button, f"Fit again without {label}").click().run()
    wait_for(at, lambda at: finished(at) and "without" in texts(at.success))
    assert not at.exception
    again = get_job(at.session_state[state.FIT_JOB])
    assert ODD_NAME not in again.names
    assert len(again.names) == 21 - count
