"""Workspace writes that race or carry permissions: publish, locks, uploads."""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest

from padim_core import workspace
from padim_core.model import Thresholds


@pytest.fixture
def umask_022():
    """The usual umask, whatever the test runner's."""
    before = os.umask(0o022)
    yield
    os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_an_uploaded_model_is_stored_as_the_umask_says(
    fitted, workspace_root, umask_022
):
    entry, _ = workspace.import_model(
        fitted.path.read_bytes(), "shared.safetensors", workspace_root
    )

    assert _mode(entry.path) == 0o644
    assert not [p for p in entry.path.parent.iterdir() if p.name.startswith(".u")]


def test_publishing_never_replaces_a_model(fitted, workspace_root):
    before = fitted.path.read_bytes()
    folder = workspace.models_dir(workspace_root)
    copy = workspace.hidden_model_file(folder, "test")
    shutil.copy(fitted.path, copy)

    path = workspace.publish_model(copy, fitted.name, workspace_root)

    assert path.name == f"{fitted.name}-2{workspace.MODEL_SUFFIX}"
    assert fitted.path.read_bytes() == before
    assert not copy.exists()


def test_publishing_under_a_taken_name_can_be_refused(fitted, workspace_root):
    copy = workspace.hidden_model_file(fitted.path.parent, "test")
    shutil.copy(fitted.path, copy)

    with pytest.raises(ValueError, match="exists already"):
        workspace.publish_model(copy, fitted.name, workspace_root, unique=False)
    assert not copy.exists()


def test_saving_thresholds_waits_for_the_model_lock(fitted):
    saved = threading.Event()
    new = Thresholds(7.0, 6.0, 1.0, 9.0)

    def save() -> None:
        workspace.save_thresholds(fitted.path, new)
        saved.set()

    with workspace.model_lock(fitted.path):
        thread = threading.Thread(target=save)
        thread.start()
        time.sleep(0.5)
        assert not saved.is_set()
    thread.join(30)

    assert saved.is_set()
    assert workspace.describe(fitted.path).thresholds == new


def test_saving_thresholds_into_a_model_gone_says_so(fitted):
    path = fitted.path
    workspace.delete_model(fitted.name, path.parent.parent)

    with pytest.raises(FileNotFoundError, match="renamed or deleted"):
        workspace.save_thresholds(path, Thresholds(1.0, 1.0, 0.0, 2.0))
    assert not path.exists()


def test_a_lock_wait_can_give_up(fitted):
    class GiveUp(Exception):
        pass

    def give_up() -> None:
        raise GiveUp

    held = workspace.model_lock(fitted.path)
    waiting = workspace.model_lock(fitted.path, wait=give_up)
    with held, pytest.raises(GiveUp), waiting:
        pass


def test_names_in_use_are_skipped_like_saved_ones(fitted, workspace_root):
    name = workspace.unique_name(fitted.name, workspace_root, {f"{fitted.name}-2"})
    assert name == f"{fitted.name}-3"


@pytest.mark.parametrize(
    ("text", "name"),
    [("Line 4 lot", "Line 4 lot"), ("../../etc", "etc"), ("[x](y)", "x__y"), ("", "m")],
)
def test_safe_names_are_made_from_any_text(text, name):
    assert workspace.safe_name(text, "m") == name
