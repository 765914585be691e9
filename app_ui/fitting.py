"""Fitting in a background thread, so the app stays usable while it runs.

A :class:`FitJob` fits (or extends) a model and saves it into the workspace
on its own thread; pages only read its progress. Jobs are kept in a registry
shared by all sessions, so a fit survives a browser refresh and the page can
show it again.

Fits from several tabs never undo each other: a new model's name is taken
when its fit starts and the file is published without replacing any model
(:func:`padim_core.workspace.publish_model`); fits that add images to one
model run one after the other, and write under the model's lock with the
thresholds saved meanwhile (:func:`padim_core.workspace.model_lock`).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import streamlit as st
import torch
from PIL import Image

from app_ui.figures import display_image
from app_ui.fit_warnings import WarningLog, collecting
from app_ui.sources import Item, hold_uploads, release_uploads
from app_ui.widgets import spreadsheet_safe
from padim_core import visualize, workspace
from padim_core.anomaly_map import anomaly_maps
from padim_core.backbones import WeightsUnavailableError
from padim_core.images import ImageError, Skipped, iter_decoded, read_image
from padim_core.metrics import normalize_scores
from padim_core.model import DEFAULT_BATCH_SIZE, FitReport, Padim
from padim_core.model_file import (
    MODEL_SUFFIX,
    ModelFileError,
    load_model,
    read_header,
    save_model,
)
from padim_core.review import ReviewRow, TrainingReview, csv_text, fit_with_review

logger = logging.getLogger(__name__)

# A tenth of the good images is held out to set a first threshold, once there
# are enough that losing one still leaves most of them to fit on.
HOLDOUT_FRACTION = 0.1
MIN_IMAGES_FOR_HOLDOUT = 5

# Finished fits remembered, so a page can still say how each one ended.
KEPT_JOBS = 20

# Flagged training images shown with a heatmap; the rest are listed only.
REVIEW_PICTURES = 12
REVIEW_PICTURE_SIDE = 240

# A first threshold at or below this (Mahalanobis distances are >= 0) means
# the held-out images match the training ones exactly, as copies or flat
# images do; every part that differs at all would fail.
MIN_FIRST_THRESHOLD = 1e-6

_ids = itertools.count(1)


@dataclass
class FitRequest:
    """What to fit: the images, the model's settings and where to save it.

    ``extend`` names an existing model file to add the images to; the other
    settings are then taken from that model.
    """

    items: list[Item]
    name: str
    root: Path
    device: str = "cpu"
    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] | None = None
    n_features: int | None = None
    image_size: int = 256
    seed: int = 0
    pre_trained: bool = True
    batch_size: int = DEFAULT_BATCH_SIZE
    hold_out: bool = True
    source: str = "upload"
    extend: Path | None = None
    review: bool = False


@dataclass
class FitJob:
    """A fit running on its own thread; the pages read it, never write it."""

    request: FitRequest
    id: int = field(default_factory=lambda: next(_ids))
    phase: str = "Starting"
    done: int = 0
    total: int = 0
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None
    error: str | None = None
    n_images: int = 0
    held_out: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    path: Path | None = None
    cancelled: bool = False
    review: ReviewOutcome | None = None
    # Images done and in all of the current pass, for a job that reads its
    # images more than once; None when ``done`` and ``total`` say it.
    step: tuple[int, int] | None = None
    # What the counts count: files while reading files that may turn out
    # unusable, images while scoring the usable ones again.
    unit: str = "files"
    # Names of the images asked for, kept once the uploads are let go.
    names: frozenset[str] = frozenset()

    @property
    def running(self) -> bool:
        """True until the fit has finished or failed."""
        return self.finished is None

    @property
    def elapsed(self) -> float:
        """Seconds since the start, or the whole run once finished."""
        return (self.finished or time.perf_counter()) - self.started


@dataclass
class ReviewOutcome:
    """What the review of a fit's training images found, for its page.

    Attributes:
        reviewed: Number of images scored out of fold, held-out ones included.
        held_out: How many of those were held out of the fit.
        flagged: The flagged rows, highest score first, without distances.
        pictures: Heatmap thumbnails of the first flagged images, by name.
        cutoff: The out-of-fold score above which an image is flagged.
        note: Why there was no review (too few images); None when made.
        csv: Every row, as CSV text that a spreadsheet opens without running
            any file name as a formula; empty without a review.
    """

    reviewed: int = 0
    held_out: int = 0
    flagged: list[ReviewRow] = field(default_factory=list)
    pictures: dict[str, Image.Image] = field(default_factory=dict)
    cutoff: float | None = None
    note: str | None = None
    csv: str = ""


@st.cache_resource
def _registry() -> dict[int, FitJob]:
    """Every fit started since the server started, by id."""
    return {}


@dataclass
class _Names:
    """Names of new models whose fits run, per workspace, under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    taken: set[tuple[Path, str]] = field(default_factory=set)


@st.cache_resource
def _names() -> _Names:
    return _Names()


def names_in_use(root: Path) -> set[str]:
    """Names of the new models being fitted in the workspace ``root``."""
    root = Path(root).resolve()
    with _names().lock:
        return {name for folder, name in _names().taken if folder == root}


def _take_name(request: FitRequest) -> None:
    """Reserve the new model's name, or say why it cannot be had.

    Checking and reserving happen under one lock, so of two tabs that start
    fits of one name at the same moment, exactly one gets it.

    Raises:
        ValueError: If a model of that name exists or is being fitted.
    """
    name = workspace.check_name(request.name)
    names = _names()
    with names.lock:
        if (request.root.resolve(), name) in names.taken:
            raise ValueError(
                f"a model called {name!r} is being fitted already (in this or "
                "another tab); choose another name"
            )
        if workspace.model_path(name, request.root).exists():
            raise ValueError(
                f"a model called {name!r} exists already; choose another name"
            )
        names.taken.add((request.root.resolve(), name))
    request.name = name


def _free_name(request: FitRequest) -> None:
    with _names().lock:
        _names().taken.discard((request.root.resolve(), request.name))


def get_job(job_id: int | None) -> FitJob | None:
    """The job with this id, if any."""
    return None if job_id is None else _registry().get(job_id)


def running_jobs() -> list[FitJob]:
    """Fits still running, from any session."""
    return [job for job in _registry().values() if job.running]


def start_fit(request: FitRequest) -> FitJob:
    """Start fitting on a background thread and return the job at once.

    Raises:
        ValueError: If a new model's name is taken by a model or by a fit
            still running.
    """
    if request.extend is None:
        _take_name(request)
    _forget_old_jobs()
    job = FitJob(
        request,
        total=_files_to_handle(request),
        step=_first_step(request),
        names=frozenset(item.name for item in request.items),
    )
    _registry()[job.id] = job
    held = hold_uploads(request.items)
    thread = threading.Thread(
        target=_run, args=(job, held), name=f"fit-{job.id}", daemon=True
    )
    thread.start()
    return job


def _checked(request: FitRequest) -> bool:
    """Whether the job checks the training images: new models only."""
    return request.review and request.extend is None


def _split(request: FitRequest) -> tuple[list[Item], list[Item]]:
    """The request's (train, held) images."""
    if not request.hold_out:
        return list(request.items), []
    return split_holdout(request.items)


def _files_to_handle(request: FitRequest) -> int:
    """Files the job reads, as far as known before it reads any.

    The check reads every file twice: once to fit (or hold out) and once to
    score. Files found unusable while fitting are not read again; the job's
    total shrinks then.
    """
    if not _checked(request):
        return len(request.items)
    return 2 * len(request.items)


def _first_step(request: FitRequest) -> tuple[int, int] | None:
    """The first pass's count, for a job of several passes; else None."""
    return (0, len(_split(request)[0])) if _checked(request) else None


def split_holdout(items: list[Item]) -> tuple[list[Item], list[Item]]:
    """Set aside evenly spaced images to score after the fit: (train, held).

    Pass usable images only: a broken file counted here would take the place
    of an image to fit on.
    """
    n = len(items)
    if n < MIN_IMAGES_FOR_HOLDOUT:
        return list(items), []
    k = max(1, round(n * HOLDOUT_FRACTION))
    chosen = {int((i + 0.5) * n / k) for i in range(k)}
    train = [item for i, item in enumerate(items) if i not in chosen]
    return train, [items[i] for i in sorted(chosen)]


def _run(job: FitJob, held: list[Path]) -> None:
    found = WarningLog(item.name for item in job.request.items)
    try:
        with torch.no_grad(), collecting(found):
            if job.request.extend is not None:
                _extend(job)
            else:
                _fit_new(job)
    except FitCancelled:
        job.error = "cancelled"
    except (ImageError, ModelFileError, WeightsUnavailableError) as error:
        job.error = str(error)
    except (ValueError, RuntimeError, OSError) as error:
        job.error = str(error) or type(error).__name__
        logger.exception("fit %d failed", job.id)
    except Exception as error:
        job.error = f"an unexpected error ({type(error).__name__}: {error})"
        logger.exception("fit %d failed", job.id)
    finally:
        job.warnings = found.about_model + job.warnings + found.about_images
        job.request.items = []  # let go of the uploads' bytes
        release_uploads(held)
        if job.request.extend is None:
            _free_name(job.request)
        job.finished = time.perf_counter()


def _forget_old_jobs() -> None:
    """Keep only the last :data:`KEPT_JOBS` finished fits in the registry."""
    registry = _registry()
    finished = sorted(job.id for job in registry.values() if not job.running)
    for job_id in finished[:-KEPT_JOBS]:
        registry.pop(job_id, None)


class FitCancelled(Exception):
    """The user cancelled the fit."""


def _progress(job: FitJob, offset: int = 0):
    def report(done: int, total: int) -> None:
        _stop_if_cancelled(job)
        job.done = offset + done

    return report


def _stop_if_cancelled(job: FitJob) -> None:
    if job.cancelled:
        raise FitCancelled


def _usable_only(job: FitJob) -> list[Skipped]:
    """Drop the request's files that cannot be decoded, before any hold-out.

    The hold-out is a share of the usable images, so broken files must not
    count towards it. Each file is decoded once more for this, which costs
    little next to its features; jobs that hold nothing out skip it.

    Returns:
        The files dropped, and why.
    """
    request = job.request
    if not request.hold_out or len(request.items) < MIN_IMAGES_FOR_HOLDOUT:
        return []
    job.phase = "Decoding the files"
    n = len(request.items)
    usable, broken = [], []
    job.step = (0, n)
    decoded = iter_decoded(item.pair() for item in request.items)
    for i, (item, (_, image)) in enumerate(zip(request.items, decoded, strict=True)):
        _stop_if_cancelled(job)
        if isinstance(image, Skipped):
            broken.append(image)
        else:
            usable.append(item)
        job.step = (i + 1, n)
    if not usable:  # the fit says so, naming the first file
        return []
    request.items = usable
    job.total = _files_to_handle(request)
    job.step = _first_step(request)
    return broken


def _fit_new(job: FitJob) -> None:
    request = job.request
    broken = _usable_only(job)
    train, held = _split(request)
    job.phase = "Loading the backbone"
    padim = Padim(
        backbone=request.backbone,
        layers=request.layers,
        pre_trained=request.pre_trained,
        n_features=request.n_features,
        image_size=request.image_size,
        seed=request.seed,
        device=request.device,
    )
    job.phase = "Fitting"
    if request.review:
        report = _fit_and_review(job, padim, train, held)
    else:
        report = padim.fit(
            [item.pair() for item in train], request.batch_size, _progress(job)
        )
    job.n_images, job.skipped = report.images, broken + list(report.skipped)
    if held:
        _set_thresholds(job, padim, held, offset=job.total - len(held))
    padim.metadata.update(
        name=request.name,
        source=request.source,
        device=request.device,
        held_out=job.held_out,
        skipped=len(job.skipped),
    )
    job.phase = "Saving"
    temporary = workspace.hidden_model_file(workspace.models_dir(request.root), "fit")
    try:
        save_model(padim, temporary)
        path = workspace.publish_model(temporary, request.name, request.root)
    finally:
        temporary.unlink(missing_ok=True)
    if path.stem != request.name:
        job.warnings.append(
            f"A model called {request.name} was stored while this one was fitted, "
            f"so this one is saved as {path.stem}."
        )
    _done(job, path)


def _fit_and_review(
    job: FitJob, padim: Padim, train: list[Item], held: list[Item]
) -> FitReport:
    """Fit, then score each image, held-out ones too, with one fold's model."""
    report, review = fit_with_review(
        padim,
        [item.pair() for item in train],
        job.request.batch_size,
        _pass_progress(job, len(train), len(held)),
        keep_distances=True,
        held_out=[item.pair() for item in held],
    )
    # A held-out file that cannot be read is named once, by the threshold.
    held_names = {item.name for item in held}
    report.skipped.extend(s for s in review.skipped if s.name not in held_names)
    job.review = ReviewOutcome(
        reviewed=len(review.rows),
        held_out=review.held_out,
        flagged=review.flagged,
        cutoff=review.cutoff,
        note=review.note,
        csv=csv_text(review, spreadsheet_safe) if review.rows else "",
    )
    by_name = {item.name: item for item in [*train, *held]}
    for row in job.review.flagged[:REVIEW_PICTURES]:
        try:
            job.review.pictures[row.path] = _review_picture(
                by_name[row.path], row, review, padim.config.image_size
            )
        except ImageError as error:  # gone since it was scored: listed only
            logger.info("no review picture of %s: %s", row.path, error)
    for row in review.rows:
        row.distances = None  # keep only the thumbnails
    padim.metadata["review_flagged"] = len(job.review.flagged)
    return report


def _pass_progress(job: FitJob, files: int, held: int):
    """Progress of :func:`fit_with_review`, counted pass by pass.

    The fit reads ``files``; the check then scores the usable ones and the
    ``held`` images, which the first threshold reads once more.
    """

    def report(done: int, total: int) -> None:
        _stop_if_cancelled(job)
        job.done, job.total = done, total + held
        if done <= files:
            job.step = (done, files)
            return
        job.phase = "Checking the training images for outliers"
        job.unit = "images"
        job.step = (done - files, total - files)

    return report


def _review_picture(
    item: Item, row: ReviewRow, review: TrainingReview, size: int
) -> Image.Image:
    """A thumbnail of the image under its out-of-fold heatmap.

    Yellow is the review's cut-off score; red the highest score reviewed.
    """
    image = display_image(read_image(item.source(), item.name), REVIEW_PICTURE_SIDE)
    heat = anomaly_maps(row.distances.unsqueeze(0), (size, size))[0].numpy()
    highest = max(r.score for r in review.rows)
    cutoff = min(review.cutoff, highest)
    normalized = normalize_scores(heat, cutoff, 0.0, max(highest, cutoff))
    return visualize.overlay(image, normalized)


def _set_thresholds(job: FitJob, padim: Padim, held: list[Item], offset: int) -> None:
    job.phase = "Scoring held-out images for a first threshold"
    job.unit = "files"
    job.step = None if job.step is None else (0, len(held))
    prediction, skipped = padim.predict([item.pair() for item in held])
    job.skipped.extend(skipped)
    job.done = offset + len(held)
    job.step = None if job.step is None else (len(held), len(held))
    if prediction is None:
        job.warnings.append(
            "No held-out image could be scored, so no threshold is set."
        )
        return
    job.held_out = len(prediction.names)
    thresholds = workspace.thresholds_from_good(prediction.scores.numpy())
    if thresholds.image <= MIN_FIRST_THRESHOLD:
        job.warnings.append(
            f"The held-out images ({job.held_out}) score {thresholds.image:.2g}: "
            "they match the training images exactly (copies, or one flat colour), so a "
            "threshold there would fail every part that differs at all. No first "
            "threshold is set; set one on the Thresholds page with good and "
            "defective images."
        )
        return
    padim.thresholds = thresholds


def _extend(job: FitJob) -> None:
    """Add images to a model; fits of one model take turns, none is lost."""
    request = job.request
    path = Path(request.extend)
    job.phase = "Waiting for another fit of this model to end"
    with workspace.model_lock(path, "extend", wait=lambda: _stop_if_cancelled(job)):
        job.phase = "Loading the model"
        padim = load_model(path, device=request.device)
        loaded = _statistics_id(path)
        before = padim.n_images
        job.phase = "Adding images"
        report = padim.fit(
            [item.pair() for item in request.items],
            request.batch_size,
            _progress(job),
        )
        job.n_images, job.skipped = report.images, list(report.skipped)
        padim.metadata["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
        padim.metadata["added_images"] = (
            padim.metadata.get("added_images", 0) + report.images
        )
        job.phase = "Saving"
        with workspace.model_lock(path):
            _check_unchanged(path, loaded)
            padim.thresholds = read_header(path)["thresholds"]  # saved meanwhile?
            save_model(padim, path)
    job.notes.append(
        f"The model now holds {padim.n_images:,} images ({before:,} before). Its "
        "thresholds are kept; check them on the Thresholds page."
    )
    _done(job, path)


def _statistics_id(path: Path) -> tuple:
    """What tells one fit's statistics from another's, from the header."""
    info = read_header(path)["info"]
    return info.get("created"), info.get("n_images"), info.get("updated")


def _check_unchanged(path: Path, loaded: tuple) -> None:
    """Refuse to write if the model was renamed, deleted or replaced meanwhile."""
    if not path.is_file() or _statistics_id(path) != loaded:
        raise ValueError(
            f"{path.stem} was renamed, deleted or replaced while the images were "
            "being added, so nothing was saved; add them again"
        )


def _done(job: FitJob, path: Path) -> None:
    workspace.set_active(path.name.removesuffix(MODEL_SUFFIX), job.request.root)
    job.path = path
    job.phase = "Done"
    logger.info("fit %d saved %s", job.id, path)
