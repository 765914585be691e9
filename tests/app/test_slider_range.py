"""The one range rule of the threshold sliders, and the pages that use it."""

from __future__ import annotations

import pytest
from apptools import by_label, open_page

from app_ui.thresholding import HEADROOM, slider_range


@pytest.mark.parametrize(
    ("values", "top", "step"),
    [
        ((215.0,), 330.0, 0.5),
        ((215.0, None, 100.0), 330.0, 0.5),
        ((12.3, 9.0), 19.0, 0.02),
        ((0.8,), 1.2, 0.002),
        ((None,), 1.0, 0.001),
    ],
)
def test_the_range_reaches_half_again_past_the_largest_value(values, top, step):
    found_top, found_step = slider_range(*values)

    assert found_top == pytest.approx(top)
    assert found_step == pytest.approx(step)


@pytest.mark.parametrize("largest", [0.013, 4.2, 215.0, 3_456.0, 98_765.0])
def test_the_range_is_never_far_wider_than_the_values(largest):
    top, step = slider_range(largest)

    assert HEADROOM * largest <= top <= 1.1 * HEADROOM * largest
    assert 500 <= top / step <= 2_000


def _top_and_scores(at) -> tuple[float, float]:
    """The image slider's top and the highest score in the page's table."""
    top = by_label(at.slider, "Image threshold").max
    return top, float(at.dataframe[-1].value["score"].max())


def test_each_page_fits_the_range_to_its_images_and_the_thresholds(fitted):
    at = open_page("inspect")
    inspect_top, inspect_highest = _top_and_scores(at)
    at.switch_page("app_pages/thresholds.py").run()
    thresholds_top, thresholds_highest = _top_and_scores(at)

    saved = fitted.thresholds
    for top, highest in [
        (inspect_top, inspect_highest),
        (thresholds_top, thresholds_highest),
    ]:
        expected, _ = slider_range(highest, saved.image, saved.pixel)
        assert top == pytest.approx(expected)
