"""Shared set-up of the app tests: a workspace per test, a small fitted model.

Models are small (efficientnet_lite0, 128 px, 20 channels) to keep the suite
quick on a CPU. The helpers the tests share are in ``apptools.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from padim_core import demo, workspace
from padim_core.model import Padim
from padim_core.model_file import save_model

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


@pytest.fixture
def fitted(workspace_root: Path, model_file: Path) -> workspace.ModelEntry:
    """The small model, copied into this test's workspace and made active."""
    target = workspace.models_dir(workspace_root) / model_file.name
    target.parent.mkdir(parents=True)
    shutil.copy(model_file, target)
    workspace.set_active(target.stem, workspace_root)
    return workspace.get_active(workspace_root)
