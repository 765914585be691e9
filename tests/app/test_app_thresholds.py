"""AppTests of the Thresholds page: demo, only-good sets, masks, saving, new sets."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from apptools import (
    assert_clean,
    by_label,
    demo_uploads,
    open_page,
    texts,
    upload,
    zip_bytes,
)
from PIL import Image

from app_ui.thresholding import slider_range
from app_ui.validation import pixel_metrics
from padim_core import demo, metrics, workspace
from padim_core.anomaly_map import anomaly_maps
from padim_core.cli import _evaluation

SEPARATE = "Upload good and defective images"
MVTEC = "Upload a zip or folder in MVTec layout"


def metric(at, label: str) -> str:
    return by_label(at.metric, label).value


def test_demo_validation_shows_rates_and_curves(fitted):
    at = open_page("thresholds")

    assert_clean(at)
    for label in ("False-reject rate", "Escape rate", "Image AUROC"):
        assert metric(at, label) != "n/a"
    assert len(at.get("plotly_chart")) == 3  # histogram, ROC, precision-recall
    auroc = by_label(at.metric, "Image AUROC")
    low, high = auroc.delta.removeprefix("95 % interval ").split(" to ")
    assert float(low) <= float(auroc.value) <= float(high)


def test_the_suggested_threshold_can_be_taken_and_saved(fitted):
    at = open_page("thresholds")
    by_label(at.button, "Use suggested").click().run()
    chosen = by_label(at.slider, "Image threshold").value
    by_label(at.button, "Save to model").click().run()

    assert_clean(at)
    saved = workspace.describe(fitted.path).thresholds
    assert saved.image == chosen
    assert saved.score_min <= saved.image <= saved.score_max


def test_only_good_images_offer_a_percentile(fitted):
    at = open_page("thresholds")
    at.radio(key="thresholds_source").set_value(SEPARATE).run()
    good = demo_uploads(demo.validation_images()[0][:6])
    at.file_uploader(key="thresholds_good").set_value(good).run()

    assert_clean(at)
    assert "All these validation images are good" in texts(at.warning)
    assert metric(at, "Escape rate") == "n/a"
    by_label(at.slider, "Percentile").set_value(90.0).run()
    assert_clean(at)
    assert "90th percentile" in texts(at.caption)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_mvtec_zip_with_masks_gives_pixel_metrics(fitted):
    good, defective = demo.validation_images()
    mask = np.zeros((300, 300), np.uint8)
    mask[100:200, 100:200] = 255
    members = {f"cells/test/good/{p.name}": p.read_bytes() for p in good[:4]}
    for path in defective[:4]:
        members[f"cells/test/crack/{path.name}"] = path.read_bytes()
        members[f"cells/ground_truth/crack/{path.stem}_mask.png"] = _png(mask)
    members["cells/train/good/extra.png"] = good[5].read_bytes()
    at = open_page("thresholds")
    at.radio(key="thresholds_source").set_value(MVTEC).run()
    upload = ("cells.zip", zip_bytes(members), "application/zip")
    at.file_uploader(key="thresholds_mvtec_files").set_value(upload).run()

    assert not at.exception
    assert 0.0 <= float(metric(at, "Pixel AUROC")) <= 1.0
    assert 0.0 <= float(metric(at, "AUPRO")) <= 1.0
    assert "outside the test/ folder" in texts(at.dataframe)


def test_thresholds_from_inspect_can_be_saved_here_without_images(fitted):
    at = open_page("inspect")
    by_label(at.slider, "Image threshold").set_value(12.5).run()
    at.switch_page("app_pages/thresholds.py").run()
    at.radio(key="thresholds_source").set_value(SEPARATE).run()

    assert_clean(at)
    assert by_label(at.button, "Revert to saved").disabled is False
    by_label(at.button, "Save to model").click().run()
    assert_clean(at)
    assert workspace.describe(fitted.path).thresholds.image == 12.5


def test_without_images_or_changes_there_is_nothing_to_save(fitted):
    at = open_page("thresholds")
    at.radio(key="thresholds_source").set_value(SEPARATE).run()

    assert_clean(at)
    assert not [b for b in at.button if b.label.startswith("Save to model")]


def test_validation_uploads_survive_a_visit_to_another_page(fitted):
    good, defective = demo.validation_images()
    at = open_page("thresholds")
    at.radio(key="thresholds_source").set_value(SEPARATE).run()
    at.file_uploader(key="thresholds_good").set_value(demo_uploads(good[:3])).run()
    at.file_uploader(key="thresholds_bad").set_value(demo_uploads(defective[:2])).run()
    at.switch_page("app_pages/batch.py").run()
    at.switch_page("app_pages/thresholds.py").run()

    assert_clean(at)
    assert "Using 3 uploaded files" in texts(at.info)
    assert "Using 2 uploaded files" in texts(at.info)
    assert metric(at, "Escape rate") != "n/a"


def test_the_page_suggests_the_pixel_threshold_that_evaluate_finds():
    # 64 maps of 256 x 256: more pixels than the threshold search takes.
    rng = np.random.default_rng(0)
    distances = rng.gamma(4.0, 3.0, size=(64, 32, 32)).astype(np.float32)
    distances[::2, 8:16, 8:16] += 12.0
    masks = np.zeros((64, 256, 256), dtype=bool)
    masks[::2, 64:128, 64:128] = True
    labels = masks.any(axis=(1, 2)).astype(int)
    keys = tuple((str(i), "") for i in range(64))

    found = pixel_metrics("model", keys, distances, masks, 256)
    # evaluate gets the maps from the model, in the order of the test folder.
    order = np.argsort(labels, kind="stable")
    maps = anomaly_maps(torch.from_numpy(distances[order]), (256, 256)).numpy()
    evaluated = _evaluation(labels[order], maps.max(axis=(1, 2)), maps, masks[order])

    assert maps.size > metrics.PIXEL_THRESHOLD_SAMPLE
    assert evaluated["pixel_threshold"] == round(found["suggested"], 4)


def _noise_uploads(count: int, seed: int) -> list[tuple[str, bytes, str]]:
    """Random-noise images: nothing like the cells, so they score far higher."""
    rng = np.random.default_rng(seed)
    pictures = rng.integers(0, 256, size=(count, 96, 96, 3), dtype=np.uint8)
    return [upload(f"noise_{seed}_{i}.png", _png(p)) for i, p in enumerate(pictures)]


def _masked_cells_zip() -> tuple[str, bytes, str]:
    """Demo cells in the MVTec layout, each defective one with a mask."""
    good, defective = demo.validation_images()
    mask = np.zeros((300, 300), np.uint8)
    mask[60:240, 60:240] = 255
    members = {f"cells/test/good/{p.name}": p.read_bytes() for p in good[:6]}
    for path in defective[:6]:
        members[f"cells/test/crack/{path.name}"] = path.read_bytes()
        members[f"cells/ground_truth/crack/{path.stem}_mask.png"] = _png(mask)
    return "cells.zip", zip_bytes(members), "application/zip"


def _switch_from_noise_to_cells(at) -> float:
    """Score noise images first, then masked cells; the noise's highest score."""
    at.radio(key="thresholds_source").set_value(SEPARATE).run()
    at.file_uploader(key="thresholds_good").set_value(_noise_uploads(4, 1)).run()
    at.file_uploader(key="thresholds_bad").set_value(_noise_uploads(4, 2)).run()
    noise_top = by_label(at.slider, "Image threshold").max
    at.radio(key="thresholds_source").set_value(MVTEC).run()
    at.file_uploader(key="thresholds_mvtec_files").set_value(_masked_cells_zip()).run()
    return noise_top


def _suggestion(at, which: str) -> float:
    label = at.button(key=f"thresholds_use_{which}").label
    return float(label.removeprefix("Use suggested (").removesuffix(")"))


def _scores(at) -> np.ndarray:
    return at.dataframe[-1].value["score"].to_numpy()


def test_another_set_starts_the_sliders_at_its_suggestions(unthresholded):
    at = open_page("thresholds")
    noise_top = _switch_from_noise_to_cells(at)

    assert_clean(at)
    image, pixel = by_label(at.slider, "Image threshold"), by_label(at.slider, "Pixel")
    assert image.value == pytest.approx(_suggestion(at, "image"), abs=image.step)
    assert pixel.value == pytest.approx(_suggestion(at, "pixel"), abs=pixel.step)
    assert metric(at, "Pixel F1 at this threshold") == metric(at, "Best pixel F1")
    top, _ = slider_range(_scores(at).max(), image.value, pixel.value)
    assert image.max == pixel.max == pytest.approx(top)
    assert top < noise_top


def test_another_set_starts_the_sliders_at_the_saved_thresholds(fitted):
    saved = fitted.thresholds
    at = open_page("thresholds")
    at.radio(key="thresholds_source").set_value(SEPARATE).run()
    at.file_uploader(key="thresholds_good").set_value(_noise_uploads(4, 1)).run()
    at.file_uploader(key="thresholds_bad").set_value(_noise_uploads(4, 2)).run()
    by_label(at.button, "Use suggested").click().run()
    at.radio(key="thresholds_source").set_value(MVTEC).run()
    at.file_uploader(key="thresholds_mvtec_files").set_value(_masked_cells_zip()).run()

    assert_clean(at)
    image, pixel = by_label(at.slider, "Image threshold"), by_label(at.slider, "Pixel")
    assert image.value == pytest.approx(saved.image, abs=image.step)
    assert pixel.value == pytest.approx(saved.pixel, abs=pixel.step)
    top, _ = slider_range(_scores(at).max(), saved.image, saved.pixel)
    assert image.max == pytest.approx(top)


def test_a_threshold_chosen_on_this_set_stays_after_a_visit_elsewhere(fitted):
    at = open_page("thresholds")
    by_label(at.slider, "Image threshold").set_value(14.0).run()
    at.switch_page("app_pages/batch.py").run()
    at.switch_page("app_pages/thresholds.py").run()

    assert_clean(at)
    assert by_label(at.slider, "Image threshold").value == pytest.approx(14.0)


def test_a_threshold_chosen_on_inspect_is_where_this_page_starts(fitted):
    at = open_page("inspect")
    by_label(at.slider, "Image threshold").set_value(12.5).run()
    at.switch_page("app_pages/thresholds.py").run()

    assert_clean(at)
    assert by_label(at.slider, "Image threshold").value == pytest.approx(12.5)
