"""AppTests of the Models page: list, activate, rename, delete, upload."""

from __future__ import annotations

import pickle
import shutil

from apptools import assert_clean, by_label, open_page, texts

from padim_core import workspace


def test_the_list_shows_the_header_facts(fitted):
    at = open_page("models")

    assert_clean(at)
    table = at.dataframe[0].value
    row = table.iloc[0]
    assert row["name"] == fitted.name
    assert row["backbone"] == fitted.config.backbone
    assert row["images"] == fitted.n_images
    assert row["active"] == "●"


def test_rename_then_delete_with_confirmation(fitted, workspace_root):
    at = open_page("models")
    at.text_input(key=f"models_rename_{fitted.name}").set_value("renamed").run()
    by_label(at.button, "Rename").click().run()

    assert_clean(at)
    assert workspace.get_active(workspace_root).name == "renamed"
    assert by_label(at.button, "Delete").disabled
    at.checkbox(key="models_sure_renamed").check().run()
    by_label(at.button, "Delete").click().run()

    assert_clean(at)
    assert workspace.list_models(workspace_root) == []
    assert "Deleted renamed" in texts(at.success)


def test_make_active_switches_the_model(fitted, workspace_root):
    other = workspace.model_path("other", workspace_root)
    shutil.copy(fitted.path, other)
    at = open_page("models")
    at.selectbox(key="models_chosen").set_value("other").run()
    by_label(at.button, "Make active").click().run()

    assert_clean(at)
    assert workspace.get_active(workspace_root).name == "other"


def test_an_uploaded_model_file_is_checked_and_stored(fitted, workspace_root):
    at = open_page("models")
    data = fitted.path.read_bytes()
    at.file_uploader(key="models_upload").set_value(
        ("shared model.safetensors", data, "application/octet-stream")
    ).run()

    assert_clean(at)
    assert "Stored as shared model" in texts(at.success)
    names = {entry.name for entry in workspace.list_models(workspace_root)}
    assert names == {fitted.name, "shared model"}


def test_an_uploaded_model_is_made_active_in_one_click(fitted, workspace_root):
    at = open_page("models")
    at.file_uploader(key="models_upload").set_value(
        ("shared.safetensors", fitted.path.read_bytes(), "application/octet-stream")
    ).run()
    assert "above" not in texts(at.success)
    by_label(at.button, "Make shared active").click().run()

    assert_clean(at)
    assert workspace.get_active(workspace_root).name == "shared"
    assert at.selectbox(key="models_chosen").value == "shared"
    assert "shared is now the active model" in texts(at.success)
    assert not [b for b in at.button if b.label == "Make shared active"]


def test_a_pickle_is_refused_and_never_loaded(workspace_root):
    at = open_page("models")
    data = pickle.dumps({"not": "a model"})
    at.file_uploader(key="models_upload").set_value(
        ("evil.safetensors", data, "application/octet-stream")
    ).run()

    assert not at.exception
    assert "Not stored" in texts(at.error)
    assert workspace.list_models(workspace_root) == []
