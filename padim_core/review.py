"""Review of the training images: which "good" images look unlike the rest.

A model scores its own training images low, since each is part of the
Gaussian it is measured against; a worn or defective part filed as good is
absorbed, not revealed. The review therefore splits the training images into
two folds, A and B, while the model is fitted, and scores each image with
the Gaussian of the fold it is not in (its out-of-fold score). The fitted
model is the same, bit for bit, as a plain fit on the same images and seed.

Images kept out of the fit (held out to set a first threshold) can be
checked too: each is scored by one fold's Gaussian, half the data and not
including it, so that its score is on the scale of the out-of-fold ones.

Fold A's statistics are summed beside the full ones; fold B's are the full
ones minus fold A's, computed in fold A's memory, so the review needs one
extra scatter (P, C, C), not two.

Images are flagged by the modified z-score of Iglewicz and Hoaglin (1993,
"How to Detect and Handle Outliers"), a rule fixed before looking at any
data set.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from padim_core import anomaly_map
from padim_core.gaussian import Gaussian, RunningGaussian
from padim_core.images import Skipped
from padim_core.loader import Batch, iter_batches
from padim_core.model import DEFAULT_BATCH_SIZE, FitReport, Padim, ProgressCallback

logger = logging.getLogger(__name__)

Source = str | Path | tuple[str, str | Path | bytes | Image.Image]

# Two folds of at least two images each: one image alone gives a Gaussian
# that is its own point plus the ridge, against which every image is far.
MIN_REVIEW_IMAGES = 4

# Iglewicz and Hoaglin's cut-off: a modified z-score above it marks an
# outlier. Only high scores are suspicious; unusually low ones are not.
MODIFIED_Z_CUTOFF = 3.5

# Times the median absolute deviation, an estimate of the standard deviation
# that the outliers themselves barely move (exact for normal data).
MAD_TO_SIGMA = 1.4826

CSV_COLUMNS = ("path", "out_of_fold_score", "modified_z", "flagged", "held_out")


class ReviewWarning(UserWarning):
    """The training images could not be reviewed, or only in part."""


@dataclass
class ReviewRow:
    """One training image's out-of-fold result.

    Attributes:
        path: The image's name, as the fit reported it.
        fold: 0 for fold A, 1 for fold B: the fold it was in, not scored by.
            A held-out image is in neither; it was scored by fold
            ``1 - fold``'s Gaussian.
        score: Its image score under the other fold's Gaussian.
        modified_z: ``(score - median) / (1.4826 * MAD)`` over all rows.
        flagged: Whether ``modified_z`` exceeds :data:`MODIFIED_Z_CUTOFF`.
        held_out: Whether the image was kept out of the fit.
        distances: Its patch distances (h, w) under the other fold's
            Gaussian, when asked to keep them; else None.
    """

    path: str
    fold: int
    score: float
    modified_z: float = float("nan")
    flagged: bool = False
    held_out: bool = False
    distances: Tensor | None = field(default=None, repr=False)


@dataclass
class TrainingReview:
    """The review of a fit's training images.

    Attributes:
        rows: One row per image scored, in the order the images were given:
            the fitted ones, then the held-out ones.
        skipped: Images fitted on but unreadable when read again to score,
            and held-out images that could not be read.
        note: Why no review was made (too few images); None when made.
        seconds: Time taken by the scoring pass and the fold statistics.
        cutoff: The out-of-fold score above which an image is flagged, None
            without rows.
    """

    rows: list[ReviewRow] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    note: str | None = None
    seconds: float = 0.0
    cutoff: float | None = None

    @property
    def held_out(self) -> int:
        """Number of rows of held-out images."""
        return sum(row.held_out for row in self.rows)

    @property
    def flagged(self) -> list[ReviewRow]:
        """The flagged rows, highest score first."""
        return [row for row in self.by_score() if row.flagged]

    def by_score(self) -> list[ReviewRow]:
        """All rows, highest score first."""
        return sorted(self.rows, key=lambda row: row.score, reverse=True)


def fold_of(seed: int, k: int) -> int:
    """The fold (0 or 1) of the ``k``-th usable image for a model's ``seed``.

    Images 2j and 2j + 1 go to different folds, which of them to A drawn
    from the seed: the folds differ in size by one at most and each covers
    the whole sequence, whatever the batch size.
    """
    digest = hashlib.blake2b(f"{seed}:{k // 2}".encode(), digest_size=1).digest()
    return (k % 2) ^ (digest[0] & 1)


def modified_z_scores(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Iglewicz and Hoaglin's modified z-scores of ``scores`` (N,), float64.

    ``(x - median) / (1.4826 * MAD)``, MAD the median absolute deviation.
    When more than half the scores are equal the MAD is 0: equal scores get
    0 and the others an infinity of their sign.
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"expected scores of shape (N,), got {values.shape}")
    median, spread = _median_and_spread(values)
    deviation = values - median
    if spread > 0:
        return deviation / spread
    warnings.warn(
        "more than half the out-of-fold scores are equal, so their spread is 0; "
        "every image that scores above them is flagged",
        ReviewWarning,
        stacklevel=2,
    )
    return np.where(deviation == 0, 0.0, np.copysign(np.inf, deviation))


def _median_and_spread(values: np.ndarray) -> tuple[float, float]:
    """The median of ``values`` and 1.4826 times their median absolute deviation."""
    median = float(np.median(values))
    return median, MAD_TO_SIGMA * float(np.median(np.abs(values - median)))


def fit_with_review(
    padim: Padim,
    sources: Iterable[Source],
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: ProgressCallback | None = None,
    keep_distances: bool = False,
    held_out: Iterable[Source] = (),
) -> tuple[FitReport, TrainingReview]:
    """Fit ``padim`` on image files and score each with the other fold's model.

    The model is fitted exactly as :meth:`Padim.fit` fits it on ``sources``.
    Then each usable image is read again and scored by the Gaussian of the
    fold it was not in, and each ``held_out`` image, never fitted, by one
    fold's Gaussian. With fewer than :data:`MIN_REVIEW_IMAGES` usable images
    the model is fitted, a :class:`ReviewWarning` is raised and the review's
    ``note`` says why it holds no rows.

    Args:
        padim: A model with no statistics yet.
        sources: Paths, or (name, path / bytes / PIL image) pairs.
        batch_size: Images per forward pass.
        progress: Called with (files done, files total) after each batch.
            The fit reads ``sources`` first; once it has, the total becomes
            the files fitted plus the images still to score (the usable
            ones and ``held_out``), or stays at the files fitted when there
            is no review.
        keep_distances: Keep each image's patch distances (h, w) in its row.
        held_out: Images kept out of the fit, to check alongside it.

    Returns:
        The fit's report (its ``seconds`` include the review) and the review.

    Raises:
        ValueError: If ``padim`` holds images already, or no file could be
            used as an image.
    """
    if padim.n_images:
        raise ValueError(
            f"the review needs a model fitted from scratch; this one holds "
            f"{padim.n_images} images already"
        )
    start = time.perf_counter()
    items, extra = list(sources), list(held_out)
    total = 2 * len(items) + len(extra)
    folds = _FoldStatistics(padim.config.seed)

    def fit_progress(done: int, _: int) -> None:
        if progress is not None:
            progress(done, total)

    report = padim.add_images(items, batch_size, fit_progress, folds.observe)
    review_start = time.perf_counter()
    review = _review(
        padim, items + extra, len(items), folds, batch_size, progress, keep_distances
    )
    review.seconds = time.perf_counter() - review_start
    padim.finalize()
    report.seconds = time.perf_counter() - start
    padim.metadata["fit_seconds"] = report.seconds
    return report, review


class _FoldStatistics:
    """Fold A's sums, and the fold of each usable image, kept while fitting."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.fold_a: RunningGaussian | None = None
        # Index among the sources of each usable image, and its fold.
        self.indices: list[int] = []
        self.folds: list[int] = []

    def observe(self, batch: Batch, embedding: Tensor) -> None:
        """Note the batch's folds; add its fold A images, (P, N, C), to A."""
        first = len(self.folds)
        marks = [fold_of(self.seed, first + i) for i in range(len(batch.indices))]
        self.indices.extend(batch.indices)
        self.folds.extend(marks)
        if self.fold_a is None:
            positions, _, channels = embedding.shape
            self.fold_a = _empty_like(embedding, positions, channels)
        chosen = [i for i, fold in enumerate(marks) if fold == 0]
        if chosen:
            index = torch.tensor(chosen, device=embedding.device)
            self.fold_a.reserve(len(chosen)).copy_(embedding.index_select(1, index))
            self.fold_a.commit()

    def members(self, fold: int) -> list[int]:
        """Source indices of the usable images of ``fold``."""
        return [i for i, f in zip(self.indices, self.folds) if f == fold]


def _empty_like(embedding: Tensor, positions: int, channels: int) -> RunningGaussian:
    stats = RunningGaussian.empty(positions, channels)
    stats.shift = stats.shift.to(embedding.device)
    stats.sum = stats.sum.to(embedding.device)
    stats.scatter = stats.scatter.to(embedding.device)
    return stats


def _review(
    padim: Padim,
    items: list[Source],
    fitted: int,
    folds: _FoldStatistics,
    batch_size: int,
    progress: ProgressCallback | None,
    keep_distances: bool,
) -> TrainingReview:
    """Score fold B by fold A's Gaussian, then fold A by fold B's.

    ``items`` are the ``fitted`` sources followed by the held-out ones; a
    held-out image is scored in one of the two passes, chosen as the folds
    are, so each fold's Gaussian scores about half of them.
    """
    usable = len(folds.indices)
    if usable < MIN_REVIEW_IMAGES:
        note = (
            f"the review of the training images needs at least {MIN_REVIEW_IMAGES} "
            f"usable images (2 per fold); {usable} were usable, so none was reviewed"
        )
        warnings.warn(note, ReviewWarning, stacklevel=3)
        if progress is not None:
            progress(fitted, fitted)
        return TrainingReview(note=note)
    review = TrainingReview()
    extra = range(fitted, len(items))
    counter = _Counter(fitted, usable + len(extra), progress)
    scored: dict[int, ReviewRow] = {}
    fold_stats = folds.fold_a
    for fold in (1, 0):
        # Fold A's statistics become fold B's, in place, once A has scored B.
        if fold == 0:
            fold_stats.complement(padim.stats)
        gaussian = fold_stats.to_gaussian(warn=False)
        members = folds.members(fold)
        members += [i for i in extra if fold_of(folds.seed, i - fitted) == fold]
        rows, skipped = _score(
            padim, gaussian, [items[i] for i in members], batch_size, counter
        )
        review.skipped.extend(skipped)
        for position, row in rows:
            row.fold, row.held_out = fold, members[position] >= fitted
            row.distances = row.distances if keep_distances else None
            scored[members[position]] = row
    folds.fold_a = None
    review.rows = [scored[index] for index in sorted(scored)]
    review.cutoff = _flag(review.rows)
    logger.info(
        "reviewed %d training images (%d held out), %d flagged",
        len(review.rows),
        review.held_out,
        len(review.flagged),
    )
    return review


class _Counter:
    """Progress of the scoring pass, after the fitting pass's files."""

    def __init__(self, files: int, to_score: int, progress: ProgressCallback | None):
        self.done = files
        self.total = files + to_score
        self.progress = progress

    def add(self, files: int) -> None:
        self.done += files
        if self.progress is not None:
            self.progress(self.done, self.total)


def _score(
    padim: Padim,
    gaussian: Gaussian,
    sources: list[Source],
    batch_size: int,
    counter: _Counter,
) -> tuple[list[tuple[int, ReviewRow]], list[Skipped]]:
    """Score ``sources`` as :meth:`Padim.predict` does, with ``gaussian``.

    Returns:
        (position among ``sources``, row) of each usable image, and the
        images that could not be read again.
    """
    size = (padim.config.image_size, padim.config.image_size)
    rows, skipped, handled = [], [], 0
    for batch in iter_batches(sources, padim.config.image_size, batch_size):
        skipped.extend(batch.skipped)
        if batch.tensor is not None:
            distances = gaussian.mahalanobis(padim.embed(batch.tensor)).cpu()
            scores = anomaly_map.image_scores(anomaly_map.anomaly_maps(distances, size))
            for position, name, score, grid in zip(
                batch.indices, batch.names, scores.tolist(), distances
            ):
                rows.append((position, ReviewRow(name, 0, score, distances=grid)))
        counter.add(batch.done - handled)
        handled = batch.done
    return rows, skipped


def _flag(rows: list[ReviewRow]) -> float | None:
    """Set each row's modified z-score and flag; return the score cut-off."""
    if not rows:
        return None
    scores = np.array([row.score for row in rows], dtype=np.float64)
    values = modified_z_scores(scores)
    for row, value in zip(rows, values.tolist()):
        row.modified_z = value
        row.flagged = value > MODIFIED_Z_CUTOFF
    median, spread = _median_and_spread(scores)
    return median + MODIFIED_Z_CUTOFF * spread


def csv_text(review: TrainingReview, path_text: Callable[[str], str] = str) -> str:
    """The review as CSV, one row per image, highest score first.

    Columns are :data:`CSV_COLUMNS`. ``path_text`` turns each path into the
    text of its cell; by default paths are written exactly as found.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for row in review.by_score():
        writer.writerow(
            [
                path_text(row.path),
                f"{row.score:.4f}",
                f"{row.modified_z:.3f}",
                "true" if row.flagged else "false",
                "true" if row.held_out else "false",
            ]
        )
    return buffer.getvalue()


def write_csv(review: TrainingReview, path: Path) -> None:
    """Write :func:`csv_text` of ``review`` to ``path``.

    Paths are written exactly as found, like ``predict``'s CSV, so that a
    script can move or open the flagged files.
    """
    with open(path, "w", newline="") as handle:
        handle.write(csv_text(review))
