"""The workspace folder: saved models, and which of them is in use.

    <workspace>/models/<name>.safetensors   one model file per model
    <workspace>/models/.locks/              lock files of read-modify-writes
    <workspace>/active                      the name of the model in use
    <workspace>/uploads/<upload id>/        images unpacked from uploaded zips

The folder is ``$PADIM_WORKSPACE`` when set, else ``./workspace``. Everything
the app knows lives here, so a browser refresh or an app restart loses
nothing. Model files are written atomically (see
:func:`padim_core.model_file.save_model`) and never unpickled. A new model
never replaces one of the same name (:func:`publish_model`), and rewrites of
an existing model hold its lock (:func:`model_lock`), so two browser tabs
cannot undo each other's work.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
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
LOCKS_FOLDER = ".locks"
UPLOADS_FOLDER = "uploads"

# Unpacked uploads untouched for this long belong to no live browser session
# (the app removes its own sooner); older ones are swept away.
STALE_UPLOAD_SECONDS = 24 * 3600

# How often a lock is tried again while its holder works, in seconds.
LOCK_POLL_SECONDS = 0.2

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


def uploads_dir(root: str | Path | None = None) -> Path:
    """The folder of unpacked uploads inside ``root`` (default: the workspace)."""
    root = workspace_dir() if root is None else Path(root)
    return root / UPLOADS_FOLDER


def remove_stale_uploads(
    root: str | Path | None = None,
    keep: Iterable[str | Path] = (),
    max_age: float = STALE_UPLOAD_SECONDS,
) -> list[Path]:
    """Remove upload folders not written to for ``max_age`` seconds.

    Args:
        root: The workspace folder.
        keep: Folders still in use, never removed whatever their age.
        max_age: Age in seconds, from the folder's modification time.

    Returns:
        The folders removed.
    """
    folder = uploads_dir(root)
    if not folder.is_dir():
        return []
    kept = {Path(path).resolve() for path in keep}
    oldest = time.time() - max_age
    removed = []
    for path in folder.iterdir():
        try:
            stale = path.lstat().st_mtime < oldest
        except FileNotFoundError:
            continue
        if stale and path.resolve() not in kept:
            _remove(path)
            removed.append(path)
    if removed:
        logger.info("removed %d stale upload folders in %s", len(removed), folder)
    return removed


def _remove(path: Path) -> None:
    """Remove a file, link or folder tree; gone already is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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


def unique_name(
    base: str, root: str | Path | None = None, taken: Iterable[str] = ()
) -> str:
    """``base``, or ``base-2``, ``base-3``, ... whichever is still free.

    Args:
        base: The name wanted.
        root: The workspace folder.
        taken: Names to avoid besides the saved models, e.g. those of fits
            still running.
    """
    base, taken = check_name(base), set(taken)
    name, k = base, 1
    while name in taken or model_path(name, root).exists():
        k += 1
        name = check_name(f"{base[:60]}-{k}")
    return name


def safe_name(text: str, fallback: str = "model") -> str:
    """A valid model name made from any text, e.g. an uploaded file's name."""
    cleaned = re.sub(r"[^A-Za-z0-9 ._-]", "_", text).strip(" ._-")
    return check_name(cleaned[:64].strip(" ._-") or fallback)


@contextlib.contextmanager
def model_lock(
    path: str | Path, purpose: str = "write", wait: Callable[[], None] | None = None
) -> Iterator[None]:
    """Hold the lock of a model file while reading, changing and rewriting it.

    The lock is an exclusive ``flock`` on ``.locks/<name>.<purpose>.lock``
    beside the model, so it holds across threads and processes on this
    machine. Lock files stay; removing one while it is held would let a
    second holder in.

    Args:
        path: The model file.
        purpose: Which lock: ``"write"`` guards a rewrite of the file;
            ``"extend"`` keeps fits that add images to it one at a time.
        wait: Called while another holder keeps the lock; it may raise to
            give up. None waits as long as it takes.
    """
    path = Path(path)
    folder = path.parent / LOCKS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / f"{path.name.removesuffix(MODEL_SUFFIX)}.{purpose}.lock"
    with open(lock, "a") as handle:
        if wait is None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        else:
            while not _try_lock(handle):
                wait()
                time.sleep(LOCK_POLL_SECONDS)
        yield


def _try_lock(handle) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def hidden_model_file(folder: str | Path, label: str) -> Path:
    """A new, empty, uniquely named hidden file in ``folder``, for writing into.

    Hidden files are never listed as models. The file gets the permissions
    the umask gives new files, and keeps them once renamed into place.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        path = folder / f".{label}.{secrets.token_hex(8)}{MODEL_SUFFIX}"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return path


def publish_model(
    source: str | Path, name: str, root: str | Path | None = None, unique: bool = True
) -> Path:
    """Give a finished model file its name in the workspace; never replace one.

    The name is taken atomically (a hard link, which fails if the name
    exists), so two fits or uploads that finish at once both keep their
    model. ``source`` is gone afterwards.

    Args:
        source: The written file, in the models folder (e.g. from
            :func:`hidden_model_file`).
        name: The name wanted.
        root: The workspace folder.
        unique: Take ``name-2``, ``name-3``, ... when ``name`` is taken;
            False raises instead.

    Returns:
        The model file, under the name it got.

    Raises:
        ValueError: If ``unique`` is False and the name is taken.
    """
    base = check_name(name)
    try:
        while True:
            target = model_path(name, root)
            try:
                _link_new(Path(source), target)
            except FileExistsError:
                if not unique:
                    raise ValueError(
                        f"a model called {base!r} exists already"
                    ) from None
                name = unique_name(base, root)
                continue
            _sync_folder(target.parent)
            return target
    finally:
        Path(source).unlink(missing_ok=True)


def _link_new(source: Path, target: Path) -> None:
    """Make ``target`` name ``source``'s file; FileExistsError if it exists."""
    try:
        os.link(source, target)
    except OSError as error:  # FileExistsError passes through
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        # No hard links on this file system: claim the name, then fill it.
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.replace(source, target)


def _sync_folder(folder: Path) -> None:
    """Flush a new name in ``folder`` to disk, where the system allows it."""
    with contextlib.suppress(OSError):
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


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
    with model_lock(source):
        if not source.is_file():
            raise FileNotFoundError(f"no model called {old!r}")
        active = get_active(root)
        try:
            _link_new(source, target)
        except FileExistsError:
            raise ValueError(
                f"a model called {check_name(new)!r} exists already"
            ) from None
        source.unlink(missing_ok=True)
        _sync_folder(target.parent)
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
    with model_lock(path):
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

    The file is written to a hidden temporary name first and only published
    once it reads as a model: header, tensors and, when the backbone's
    weights are available, a full load. Nothing is unpickled. It gets the
    permissions the umask gives new files, like the models the app fits.

    Args:
        data: The file's bytes.
        file_name: The uploaded file's name; it names the model, made unique.
        root: The workspace folder.

    Returns:
        The new entry, and a note when the model could only be partly checked.

    Raises:
        ModelFileError: If the file is not a usable model file.
    """
    temporary = hidden_model_file(models_dir(root), "upload")
    try:
        with open(temporary, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        note = _check_upload(temporary, file_name)
        base = Path(file_name).name.removesuffix(MODEL_SUFFIX)
        target = publish_model(temporary, safe_name(base, "uploaded-model"), root)
    finally:
        temporary.unlink(missing_ok=True)
    logger.info("imported model %s", target.name)
    return describe(target), note


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

    The file is read and rewritten under its lock (:func:`model_lock`), and
    a fit that adds images to the model takes the same lock to write its
    result with the thresholds then saved, so neither update is lost. The
    rewrite is atomic; no backbone is built, so this works even where the
    backbone's weights are missing.

    Raises:
        ModelFileError: If the file is not a usable model file.
        FileNotFoundError: If the file is gone (renamed or deleted).
    """
    path = Path(path)
    with model_lock(path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path.name} is gone (renamed or deleted meanwhile); nothing saved"
            )
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
