"""AppTests of the Inspect page: verdicts, thresholds, stepping, uploads."""

from __future__ import annotations

from apptools import assert_clean, by_label, demo_uploads, open_page, texts, upload

from padim_core import demo, workspace


def test_without_a_model_the_page_says_how_to_get_one(workspace_root):
    at = open_page("inspect")

    assert_clean(at)
    assert "No model yet" in texts(at.info)


def test_demo_cells_get_verdicts_and_a_heatmap(fitted):
    at = open_page("inspect")

    assert_clean(at)
    n = demo.N_INSPECT_DEFECTIVE + demo.N_INSPECT_GOOD
    assert f"**{n} images**" in texts(at.markdown)
    assert at.get("plotly_chart")
    assert "FAIL" in texts(at.markdown) or "PASS" in texts(at.markdown)
    assert len(at.dataframe[0].value) == n


def test_moving_the_image_threshold_changes_the_verdicts(fitted):
    at = open_page("inspect")
    slider = by_label(at.slider, "Image threshold")
    slider.set_value(slider.max).run()

    assert_clean(at)
    assert " 0 fail " in texts(at.markdown)
    by_label(at.slider, "Image threshold").set_value(0.0).run()
    assert " 0 pass" in texts(at.markdown)
    assert by_label(at.button, "Save to model").disabled is False


def test_saving_the_thresholds_writes_them_into_the_model(fitted):
    at = open_page("inspect")
    by_label(at.slider, "Image threshold").set_value(123.0).run()
    by_label(at.button, "Save to model").click().run()

    assert_clean(at)
    assert workspace.describe(fitted.path).thresholds.image == 123.0
    assert "Saved" in texts(at.success)


def test_next_steps_to_the_following_image(fitted):
    at = open_page("inspect")
    first = at.selectbox(key="inspect_selected").value
    by_label(at.button, "Next").click().run()

    assert_clean(at)
    assert at.selectbox(key="inspect_selected").value == first + 1


def test_uploads_with_a_bad_file_are_inspected_and_the_bad_one_named(fitted):
    at = open_page("inspect")
    at.radio(key="inspect_source").set_value("Upload files or a zip").run()
    files = [*demo_uploads(demo.inspection_images()[:2]), upload("bad.jpg", b"\0" * 9)]
    at.file_uploader(key="inspect_Upload files or a zip").set_value(files).run()

    assert_clean(at)
    assert "**2 images**" in texts(at.markdown)
    assert "could not be used" in texts(at.warning)


def test_a_damaged_active_model_is_reported_not_raised(fitted):
    fitted.path.write_bytes(b"\0" * 100)
    at = open_page("inspect")

    assert not at.exception
    assert "cannot be used" in texts(at.error)


def test_a_fail_without_outline_says_the_pixel_threshold_is_higher(fitted):
    at = open_page("inspect")
    by_label(at.toggle, "Pixel threshold = image threshold").set_value(False).run()
    pixel = by_label(at.slider, "Pixel threshold")
    pixel.set_value(pixel.max).run()
    by_label(at.slider, "Image threshold").set_value(0.0).run()

    assert_clean(at)
    assert "FAIL" in texts(at.markdown) or at.get("badge")
    assert "fails, yet nothing is outlined" in texts(at.caption)
    assert "higher than the image threshold" in texts(at.caption)


def test_equal_thresholds_need_no_outline_note(fitted):
    at = open_page("inspect")

    assert_clean(at)
    assert "higher than the image threshold" not in texts(at.caption)


def test_the_table_caption_names_the_checkbox_that_selects(fitted):
    at = open_page("inspect")

    assert_clean(at)
    assert "Tick the box at the start of a row" in texts(at.caption)
    assert "Click a row" not in texts(at.caption)


def test_without_a_saved_threshold_no_part_passes_or_fails(unthresholded):
    at = open_page("inspect")

    assert_clean(at)
    shown = texts(at.markdown)
    assert "no image threshold, so no verdicts" in shown
    assert "NO THRESHOLD" in shown and "PASS" not in shown and "FAIL" not in shown
    assert set(at.dataframe[0].value["verdict"]) == {"unset"}
    assert "Thresholds page" in texts(at.warning)
    assert at.get("plotly_chart")


def test_moving_the_slider_without_a_saved_threshold_gives_verdicts(unthresholded):
    at = open_page("inspect")
    slider = by_label(at.slider, "Image threshold")
    slider.set_value(slider.value * 1.01).run()

    assert_clean(at)
    assert "no verdicts" not in texts(at.markdown)
    assert "no image threshold yet" not in texts(at.warning)
    assert set(at.dataframe[0].value["verdict"]) == {"pass", "fail"}
    by_label(at.slider, "Image threshold").set_value(0.0).run()
    assert " 0 pass" in texts(at.markdown)
