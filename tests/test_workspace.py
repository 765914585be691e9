"""The workspace folder: names, listing, active model, renames, uploads."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from padim_core import workspace
from padim_core.model import Padim, Thresholds
from padim_core.model_file import ModelFileError, read_header, save_model


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A tiny model fitted on random images, with random backbone weights."""
    padim = Padim(backbone="resnet18", pre_trained=False, n_features=8, image_size=64)
    generator = torch.Generator().manual_seed(0)
    padim.partial_fit(torch.randn(12, 3, 64, 64, generator=generator))
    padim.finalize()
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    return save_model(padim, path)


@pytest.fixture
def root(tmp_path, model_file) -> Path:
    """A workspace holding the tiny model as 'first'."""
    models = workspace.models_dir(tmp_path)
    models.mkdir()
    shutil.copy(model_file, models / "first.safetensors")
    return tmp_path


def test_the_folder_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(workspace.WORKSPACE_ENV, str(tmp_path))
    assert workspace.models_dir() == tmp_path / "models"
    monkeypatch.delenv(workspace.WORKSPACE_ENV)
    assert workspace.workspace_dir() == workspace.Path("workspace")


@pytest.mark.parametrize("name", ["", " ", "../up", "a/b", ".hidden", "x" * 65, "é"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(ValueError, match="cannot name a model"):
        workspace.check_name(name)


def test_names_lose_spaces_around_them_and_the_suffix():
    assert workspace.check_name(" line 3.safetensors ") == "line 3"


def test_listing_reads_headers_and_flags_broken_files(root):
    (workspace.models_dir(root) / "broken.safetensors").write_bytes(b"nonsense")
    entries = {entry.name: entry for entry in workspace.list_models(root)}

    assert entries["first"].config.n_features == 8
    assert entries["first"].n_images == 12
    assert entries["broken"].error is not None


def test_the_newest_model_is_active_until_one_is_chosen(root, model_file):
    shutil.copy(model_file, workspace.model_path("second", root))
    assert workspace.get_active(root).name == "second"
    workspace.set_active("first", root)
    assert workspace.get_active(root).name == "first"


def test_rename_moves_the_active_marker_and_refuses_taken_names(root, model_file):
    workspace.set_active("first", root)
    workspace.rename_model("first", "renamed", root)
    assert workspace.get_active(root).name == "renamed"

    shutil.copy(model_file, workspace.model_path("other", root))
    with pytest.raises(ValueError, match="exists already"):
        workspace.rename_model("other", "renamed", root)


def test_delete_forgets_the_active_model(root):
    workspace.set_active("first", root)
    workspace.delete_model("first", root)
    assert workspace.get_active(root) is None
    with pytest.raises(FileNotFoundError, match="no model called"):
        workspace.delete_model("first", root)


def test_unique_names_count_up(root):
    assert workspace.unique_name("first", root) == "first-2"
    assert workspace.unique_name("fresh", root) == "fresh"


def test_saving_thresholds_keeps_the_statistics(root):
    path = workspace.model_path("first", root)
    before = read_header(path)["header"]
    entry = workspace.save_thresholds(path, Thresholds(5.0, 4.0, 1.0, 9.0))

    assert entry.thresholds == Thresholds(5.0, 4.0, 1.0, 9.0)
    assert read_header(path)["header"]["scatter"] == before["scatter"]
    assert entry.fingerprint == workspace.describe(path).fingerprint


def test_an_upload_is_checked_then_stored_under_a_free_name(root, model_file):
    entry, note = workspace.import_model(
        model_file.read_bytes(), "first.safetensors", root
    )
    assert (entry.name, note) == ("first-2", None)


@pytest.mark.parametrize(
    "data", [b"", b"\x00" * 64, pickle.dumps([1, 2]), b"PK\x03\x04rest"]
)
def test_an_upload_that_is_no_model_is_refused_and_leaves_nothing(tmp_path, data):
    with pytest.raises(ModelFileError, match="upload.safetensors"):
        workspace.import_model(data, "upload.safetensors", tmp_path)
    assert list(workspace.models_dir(tmp_path).iterdir()) == []


def test_thresholds_from_good_scores_centre_the_scale():
    thresholds = workspace.thresholds_from_good(np.array([10.0, 12.0, 14.0]), 100.0)
    assert thresholds.image == thresholds.pixel == 14.0
    assert (thresholds.score_min, thresholds.score_max) == (10.0, 18.0)


def test_one_good_score_still_gives_a_usable_scale():
    thresholds = workspace.thresholds_from_good([20.0])
    assert thresholds.score_min < thresholds.image < thresholds.score_max
