"""The one range rule of the threshold sliders, and the pages that share it."""

from __future__ import annotations

import pytest
from apptools import by_label, open_page

from app_ui.state import SCORES_SEEN
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


def test_inspect_and_thresholds_sliders_share_one_range(fitted):
    at = open_page("inspect")
    at.switch_page("app_pages/thresholds.py").run()
    thresholds_top = by_label(at.slider, "Image threshold").max
    at.switch_page("app_pages/inspect.py").run()
    inspect_top = by_label(at.slider, "Image threshold").max

    assert inspect_top == thresholds_top
    seen = at.session_state[SCORES_SEEN][fitted.fingerprint]
    saved = fitted.thresholds
    expected, _ = slider_range(saved.score_max, seen, saved.image, saved.pixel)
    assert inspect_top == pytest.approx(expected)
