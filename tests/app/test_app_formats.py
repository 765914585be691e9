"""One format for normalised scores, and layout details of figures and forms."""

from __future__ import annotations

import json

import numpy as np
from apptools import assert_clean, by_label, open_page, texts
from PIL import Image

from app_ui.figures import MODEBAR_ROOM, inspection_figure
from app_ui.scoring import Scale
from app_ui.widgets import NORMALISED_FORMAT, normalised
from padim_core import demo


def test_normalised_scores_show_two_decimals():
    assert normalised(0.12345) == "0.12"
    assert normalised(np.float32(1.0)) == "1.00"


def _column_formats(element) -> dict:
    config = json.loads(element.proto.columns)
    return {name: column.get("type_config", {}) for name, column in config.items()}


def test_batch_and_inspect_tables_format_normalised_scores_alike(fitted):
    at = open_page("batch")
    n = demo.N_BATCH_GOOD + demo.N_BATCH_DEFECTIVE
    by_label(at.button, f"Score {n} images").click().run()
    batch = _column_formats(at.dataframe[-1])["normalised_score"]
    at.switch_page("app_pages/inspect.py").run()
    inspect = _column_formats(at.dataframe[-1])["normalised"]

    assert_clean(at)
    assert batch["format"] == inspect["format"] == NORMALISED_FORMAT


def test_panel_titles_of_square_images_sit_below_the_modebar():
    image = Image.new("RGB", (64, 64))
    full_map = np.zeros((64, 64), np.float32)
    figure = inspection_figure(
        image, np.zeros((8, 8)), full_map, Scale(0.0, 1.0, 2.0), 0.5, 1.0
    )

    assert figure.layout.margin.t == MODEBAR_ROOM >= 60
    titles = [a.text for a in figure.layout.annotations]
    assert titles[-1] == "Outline"


def test_fit_form_names_the_backbone_and_its_weights_apart(workspace_root):
    at = open_page("fit")

    assert_clean(at)
    backbone = by_label(at.selectbox, "Backbone")
    assert all(" — " not in option for option in backbone.options)
    assert "Weights:" in texts(at.caption)


def test_the_models_table_gives_the_created_column_room(fitted):
    at = open_page("models")

    assert_clean(at)
    config = json.loads(at.dataframe[0].proto.columns)
    assert config["created"]["width"] == "medium"


def test_layer_tags_are_short_enough_for_three_in_a_row(workspace_root):
    at = open_page("fit")

    assert_clean(at)
    layers = by_label(at.multiselect, "Layers")
    assert len(layers.value) == 3
    assert all(len(layers.format_func(layer)) <= 20 for layer in layers.value)
