"""Shared set-up of the app tests: a workspace per test, a small fitted model.

Models are small (efficientnet_lite0, 128 px, 20 channels) to keep the suite
quick on a CPU. The helpers the tests share are in ``apptools.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from padim_core import demo, workspace
from padim_core.model import Padim, Thresholds
from padim_core.model_file import load_model, save_model

# The small model of these tests.
BACKBONE = "efficientnet_lite0"
IMAGE_SIZE = 128
N_FEATURES = 20
N_TRAIN = 24


@pytest.fixture
def workspace_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty workspace folder that the app uses for this test."""
    root = tmp_path / "workspace"
    monkeypatch.setenv(workspace.WORKSPACE_ENV, str(root))
    return root


@pytest.fixture(scope="session")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model fitted once on demo cells, with first thresholds."""
    padim = Padim(
        backbone=BACKBONE, image_size=IMAGE_SIZE, n_features=N_FEATURES, seed=0
    )
    padim.fit(demo.train_images(N_TRAIN))
    prediction, _ = padim.predict(demo.train_images()[N_TRAIN : N_TRAIN + 6])
    padim.thresholds = workspace.thresholds_from_good(prediction.scores.numpy())
    path = tmp_path_factory.mktemp("model") / f"cells{workspace.MODEL_SUFFIX}"
    save_model(padim, path)
    return path


@pytest.fixture(scope="session")
def uploaded_model_file(
    model_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The small model, its info saying it was fitted on uploaded images."""
    padim = load_model(model_file)
    padim.metadata["source"] = "upload"
    path = tmp_path_factory.mktemp("model") / f"parts{workspace.MODEL_SUFFIX}"
    save_model(padim, path)
    return path


def _activate(root: Path, model: Path) -> workspace.ModelEntry:
    target = workspace.models_dir(root) / model.name
    target.parent.mkdir(parents=True)
    shutil.copy(model, target)
    workspace.set_active(target.stem, root)
    return workspace.get_active(root)


@pytest.fixture
def fitted(workspace_root: Path, model_file: Path) -> workspace.ModelEntry:
    """The small model, copied into this test's workspace and made active."""
    return _activate(workspace_root, model_file)


@pytest.fixture
def fitted_on_uploads(
    workspace_root: Path, uploaded_model_file: Path
) -> workspace.ModelEntry:
    """A model fitted on uploaded images (not the demo), made active."""
    return _activate(workspace_root, uploaded_model_file)


@pytest.fixture
def unthresholded(fitted: workspace.ModelEntry) -> workspace.ModelEntry:
    """The small model, made active, with no threshold saved in it."""
    return workspace.save_thresholds(fitted.path, Thresholds())
