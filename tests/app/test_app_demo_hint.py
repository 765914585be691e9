"""AppTests of the hint that the demo cells are not what the model was fitted on."""

from __future__ import annotations

import pytest
from apptools import assert_clean, open_page, texts

NOT_THE_DEMO = "not fitted on the demo's solar cells"

# Each page and the key of its choice of images.
SOURCES = [("inspect", "inspect_source"), ("batch", "batch_source")]
SOURCES.append(("thresholds", "thresholds_source"))


@pytest.mark.parametrize(("page", "key"), SOURCES)
def test_a_model_fitted_elsewhere_starts_on_the_uploads(fitted_on_uploads, page, key):
    at = open_page(page)

    assert_clean(at)
    assert at.radio(key=key).value != "Demo set"
    at.radio(key=key).set_value("Demo set").run()
    assert NOT_THE_DEMO in texts(at.info)


@pytest.mark.parametrize(("page", "key"), SOURCES)
def test_a_demo_model_starts_on_the_demo_without_a_hint(fitted, page, key):
    at = open_page(page)

    assert_clean(at)
    assert at.radio(key=key).value == "Demo set"
    assert NOT_THE_DEMO not in texts(at.info)
