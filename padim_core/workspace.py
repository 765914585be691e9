"""The workspace folder: saved models, and which of them is in use.

    <workspace>/models/<name>.safetensors   one model file per model
    <workspace>/active                      the name of the model in use

The folder is ``$PADIM_WORKSPACE`` when set, else ``./workspace``. Everything
the app knows lives here, so a browser refresh or an app restart loses
nothing. Model files are written atomically (see
:func:`padim_core.model_file.save_model`) and never unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from padim_core import metrics
from padim_core.backbones import cached_weights_path
from padim_core.model import PadimConfig, Thresholds
from padim_core.model_file import (
    MODEL_SUFFIX,
    ModelFileError,
    load_model,
    read_header,
    write_safetensors,
)

logger = logging.getLogger(__name__)

WORKSPACE_ENV = "PADIM_WORKSPACE"
DEFAULT_WORKSPACE = "workspace"
MODELS_FOLDER = "models"
ACTIVE_FILE = "active"

# Model names become file names, so only characters that are safe in a file
# name on every system, starting with a letter or digit, 64 at most.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")

# With only good images, the normalised scale spans as far above the threshold
# as the lowest good score lies below it, but never less than this fraction of
# the threshold, so one held-out image still gives a usable colour scale.
MIN_SPAN_FRACTION = 0.1


@dataclass(frozen=True)
class ModelEntry:
    """A model file in the workspace, described from its header alone.

    Attributes:
        name: The model's name (its file name without the suffix).
        path: The model file.
        size_bytes: Size of the file.
        modified: When the file was last written (UTC).
        config: The model's configuration; None if the file is unreadable.
        thresholds: The saved thresholds; None if the file is unreadable.
        info: Facts about the fit (``n_images``, ``created``, ...).
        error: Why the file cannot be used, or None.
    """

    name: str
    path: Path
    size_bytes: int
    modified: datetime
    config: PadimConfig | None = None
    thresholds: Thresholds | None = None
    info: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def n_images(self) -> int:
        """Number of training images, 0 if unknown."""
        return int(self.info.get("n_images", 0))

    @property
    def created(self) -> str:
        """When the model was first fitted, ISO 8601, or '' if unknown."""
        return str(self.info.get("created", ""))

    @property
    def fingerprint(self) -> str:
        """Identifies the fitted statistics; saving thresholds keeps it.

        Scores cached under a fingerprint stay valid until the model is
        refitted or extended with more images.
        """
        config = self.config.to_dict() if self.config else None
        facts = [str(self.path), config, self.created, self.n_images]
        facts.append(self.info.get("updated", ""))
        return json.dumps(facts, sort_keys=True)


def workspace_dir() -> Path:
    """The workspace folder: ``$PADIM_WORKSPACE`` or ``./workspace``."""
    return Path(os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE)


def models_dir(root: str | Path | None = None) -> Path:
    """The folder of model files inside ``root`` (default: the workspace)."""
    root = workspace_dir() if root is None else Path(root)
    return root / MODELS_FOLDER


def check_name(name: str) -> str:
    """Return ``name`` stripped, or raise if it cannot name a model file.

    Raises:
        ValueError: If the name is empty, too long or holds other characters
            than letters, digits, space, dot, dash and underscore.
    """
    name = name.strip().removesuffix(MODEL_SUFFIX).strip()
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{name!r} cannot name a model: use 1 to 64 letters, digits, spaces, "
            "dots, dashes or underscores, starting with a letter or digit"
        )
    return name


def model_path(name: str, root: str | Path | None = None) -> Path:
    """The file of the model called ``name``."""
    return models_dir(root) / f"{check_name(name)}{MODEL_SUFFIX}"


def describe(path: str | Path) -> ModelEntry:
    """Describe one model file from its header; unreadable files get ``error``."""
    path = Path(path)
    stat = path.stat()
    modified = datetime.fromtimestamp(stat.st_mtime, tz=UTC)
    name = path.name.removesuffix(MODEL_SUFFIX)
    try:
        header = read_header(path)
    except ModelFileError as error:
        return ModelEntry(name, path, stat.st_size, modified, error=str(error))
    return ModelEntry(
        name,
        path,
        stat.st_size,
        modified,
        header["config"],
        header["thresholds"],
        header["info"],
    )


def list_models(root: str | Path | None = None) -> list[ModelEntry]:
    """Every model file of the workspace, the most recently written first."""
    folder = models_dir(root)
    if not folder.is_dir():
        return []
    entries = []
    for path in folder.glob(f"*{MODEL_SUFFIX}"):
        if path.name.startswith(".") or not path.is_file():
            continue
        entries.append(describe(path))
    return sorted(entries, key=lambda entry: entry.modified, reverse=True)


def unique_name(base: str, root: str | Path | None = None) -> str:
    """``base``, or ``base-2``, ``base-3``, ... whichever is still free."""
    base = check_name(base)
    name, k = base, 1
    while model_path(name, root).exists():
        k += 1
        name = check_name(f"{base[:60]}-{k}")
    return name


def get_active(root: str | Path | None = None) -> ModelEntry | None:
    """The model in use: the one last made active, else the newest readable one."""
    root = workspace_dir() if root is None else Path(root)
    marker = root / ACTIVE_FILE
    if marker.is_file():
        name = marker.read_text(encoding="utf-8").strip()
        try:
            path = model_path(name, root)
        except ValueError:
            path = None
        if path is not None and path.is_file():
            return describe(path)
    readable = [entry for entry in list_models(root) if entry.error is None]
    return readable[0] if readable else None


def set_active(name: str | None, root: str | Path | None = None) -> None:
    """Remember ``name`` as the model in use; None forgets it."""
    root = workspace_dir() if root is None else Path(root)
    marker = root / ACTIVE_FILE
    if name is None:
        marker.unlink(missing_ok=True)
        return
    model_path(name, root)  # validates the name
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(check_name(name) + "\n", encoding="utf-8")


def rename_model(old: str, new: str, root: str | Path | None = None) -> Path:
    """Rename a model file; the active model follows.

    Raises:
        ValueError: If ``new`` is not a valid name or already taken.
        FileNotFoundError: If there is no model called ``old``.
    """
    source, target = model_path(old, root), model_path(new, root)
    if not source.is_file():
        raise FileNotFoundError(f"no model called {old!r}")
    if target.exists():
        raise ValueError(f"a model called {check_name(new)!r} exists already")
    active = get_active(root)
    os.replace(source, target)
    if active is not None and active.path == source:
        set_active(check_name(new), root)
    logger.info("renamed model %s to %s", source.name, target.name)
    return target


def delete_model(name: str, root: str | Path | None = None) -> None:
    """Delete a model file; forget it as the active model.

    Raises:
        FileNotFoundError: If there is no model called ``name``.
    """
    path = model_path(name, root)
    if not path.is_file():
        raise FileNotFoundError(f"no model called {name!r}")
    active = get_active(root)
    path.unlink()
    if active is not None and active.path == path:
        set_active(None, root)
    logger.info("deleted model %s", path.name)


def weights_missing(config: PadimConfig) -> str | None:
    """Why ``config``'s backbone weights cannot be loaded offline, or None.

    Checked before building a backbone, so that the app never starts a
    download on its own.
    """
    if not config.pre_trained:
        return None
    expected = cached_weights_path(config.backbone)
    if expected is None or expected.is_file():
        return None
    return (
        f"the ImageNet weights of {config.backbone} are not on this machine: "
        f"expected {expected.name} in {expected.parent}. Copy the file there, or "
        "use backbone efficientnet_lite0 (weights bundled) or random weights"
    )


def import_model(
    data: bytes, file_name: str, root: str | Path | None = None
) -> tuple[ModelEntry, str | None]:
    """Check an uploaded model file and add it to the workspace.

    The file is written to a hidden temporary name first and only renamed
    into place once it reads as a model: header, tensors and, when the
    backbone's weights are available, a full load. Nothing is unpickled.

    Args:
        data: The file's bytes.
        file_name: The uploaded file's name; it names the model, made unique.
        root: The workspace folder.

    Returns:
        The new entry, and a note when the model could only be partly checked.

    Raises:
        ModelFileError: If the file is not a usable model file.
    """
    folder = models_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".upload.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        note = _check_upload(Path(temporary), file_name)
        base = Path(file_name).name.removesuffix(MODEL_SUFFIX)
        try:
            name = unique_name(_safe_name(base), root)
        except ValueError:
            name = unique_name("uploaded-model", root)
        target = model_path(name, root)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    logger.info("imported model %s", target.name)
    return describe(target), note


def _safe_name(base: str) -> str:
    """``base`` with unsafe characters replaced, for naming an upload."""
    cleaned = re.sub(r"[^A-Za-z0-9 ._-]", "_", base).strip(" ._-")
    return check_name(cleaned[:64] or "uploaded-model")


def _check_upload(path: Path, file_name: str) -> str | None:
    """Check an uploaded model file; return a note if only partly checked."""
    try:
        header = read_header(path)
    except ModelFileError as error:
        raise ModelFileError(str(error).replace(path.name, file_name)) from None
    missing = weights_missing(header["config"])
    if missing is not None:  # header and tensor shapes are checked already
        return f"{file_name} was stored, but cannot be used yet: {missing}"
    try:
        load_model(path)
    except ModelFileError as error:
        raise ModelFileError(str(error).replace(path.name, file_name)) from None
    return None


def save_thresholds(path: str | Path, thresholds: Thresholds) -> ModelEntry:
    """Write new thresholds into a model file, leaving its statistics alone.

    The file is rewritten atomically; no backbone is built, so this works
    even where the backbone's weights are missing.

    Raises:
        ModelFileError: If the file is not a usable model file.
    """
    # TODO: a fit that extends this model at the same moment can overwrite these
    # thresholds, or they its new images; the last writer wins. A lock file or
    # a version check on rewrite would let both land.
    path = Path(path)
    read_header(path)
    try:
        with safe_open(path, framework="pt") as opened:
            metadata = dict(opened.metadata())
            names = opened.keys()
            tensors = {key: opened.get_tensor(key) for key in names}
    except (SafetensorError, OSError) as error:
        raise ModelFileError(f"{path.name}: damaged tensors ({error})") from error
    metadata["thresholds"] = json.dumps(asdict(thresholds))
    write_safetensors(tensors, metadata, path)
    logger.info("saved thresholds %s in %s", thresholds, path.name)
    return describe(path)


def thresholds_from_good(
    scores: Sequence[float] | np.ndarray,
    percentile: float = metrics.DEFAULT_PERCENTILE,
) -> Thresholds:
    """Thresholds from scores of good images alone.

    The image threshold is a percentile of the scores; the pixel threshold
    equals it, so a part fails exactly when its map outlines a region. The
    normalising range is centred on the threshold.

    Args:
        scores: Image scores of held-out good images, shape (N,), N >= 1.
        percentile: Percentile of the scores that becomes the threshold.

    Raises:
        ValueError: If there are no scores or they are not finite.
    """
    scores = np.asarray(scores, dtype=np.float64)
    threshold = metrics.percentile_threshold(scores, percentile)
    span = max(threshold - float(scores.min()), MIN_SPAN_FRACTION * abs(threshold))
    span = max(span, 1e-6)
    return Thresholds(
        image=threshold,
        pixel=threshold,
        score_min=threshold - span,
        score_max=threshold + span,
    )
