"""AppTests of the hint that the demo cells are not what the model was fitted on."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from apptools import assert_clean, open_page, texts

from app_ui.state import fitted_on_demo
from padim_core import demo, workspace
from padim_core.model_file import load_model, save_model

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


def _entry(info: dict) -> workspace.ModelEntry:
    return workspace.ModelEntry(
        "m", Path("m.safetensors"), 0, datetime.now(UTC), info=info
    )


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        ({"source": "demo"}, True),
        ({"source": "upload", "train_dir": "elpv_dataset/data"}, False),
        ({"train_dir": "../shared/datasets/bsdata/train"}, False),
        ({"train_dir": "site-packages/elpv_dataset/data/images"}, True),
        ({}, None),
    ],
)
def test_the_recorded_source_or_training_folder_tells_a_demo_model(info, expected):
    assert fitted_on_demo(_entry(info)) is expected


def test_a_model_fitted_from_the_command_line_on_the_demo_folder(tmp_path):
    inside = tmp_path / "cells"
    inside.symlink_to(demo.data_dir() / "images")

    assert fitted_on_demo(_entry({"train_dir": str(inside)})) is True


def test_a_model_fitted_on_another_folder_skips_the_demo_scoring(
    workspace_root, model_file
):
    padim = load_model(model_file)
    padim.metadata["train_dir"] = "../shared/datasets/bsdata/train"
    target = workspace.models_dir(workspace_root) / "bsdata.safetensors"
    target.parent.mkdir(parents=True)
    save_model(padim, target)
    workspace.set_active(target.stem, workspace_root)
    at = open_page("thresholds")

    assert_clean(at)
    assert at.radio(key="thresholds_source").value != "Demo set"
    assert not at.metric  # nothing was scored
