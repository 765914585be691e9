"""Evaluation metrics for anomaly scores and anomaly maps.

Image-level metrics take scores of shape ``(N,)`` and labels of shape ``(N,)``,
where 1 marks a defective image and 0 a good one. Pixel-level metrics take
anomaly maps of shape ``(N, H, W)`` and ground-truth masks of the same shape,
where a true (or 1) pixel is defective. NumPy arrays and torch tensors (on any
device) are accepted; everything is computed in NumPy.

Throughout, an image or pixel counts as predicted defective when its score is
greater than or equal to the threshold (``score >= threshold``), the same rule
scikit-learn's curves use.

Degenerate but valid input, such as a test set holding only one class, gives a
:class:`MetricWarning` and ``nan`` rather than an exception. Scores or maps of a
non-numeric dtype raise ``TypeError``; empty, non-finite or mismatched input
raises ``ValueError``.

The per-region overlap (PRO) metric follows Bergmann et al., "The MVTec Anomaly
Detection Dataset", IJCV 2021: https://doi.org/10.1007/s11263-020-01400-4
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import numpy.typing as npt
from scipy import ndimage, stats
from sklearn.metrics import precision_recall_curve, roc_auc_score

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ArrayInput: TypeAlias = "npt.ArrayLike | torch.Tensor"

# The usual AUPRO cut-off (MVTec AD): beyond 30% false positives a map is
# useless for inspection, so only the low-FPR part of the curve is scored.
DEFAULT_FPR_LIMIT = 0.3

# A high percentile of good validation scores leaves about 1% false rejects.
DEFAULT_PERCENTILE = 99.0

# Pixel scores are ranked in float32: maps come out of the model in float32,
# and halving the sort keys matters for 20M-pixel test sets.
PIXEL_SCORE_DTYPE = np.float32

# Defect regions are 8-connected within one image (as in the MVTec AD
# evaluation code) and never connected across images of the stack.
REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
REGION_STRUCTURE[1] = True

# Pixels the F1-optimal pixel threshold is searched on, at most (give or take
# one per image): a regular subsample pins the threshold down as well as all
# pixels do, while the search's sort and curve stay near 100 MB.
PIXEL_THRESHOLD_SAMPLE = 4_000_000

# Resamples of the bootstrap interval of the image AUROC: enough that the
# 2.5th and 97.5th percentiles move by well under 0.005 from seed to seed.
BOOTSTRAP_RESAMPLES = 2000

# The score given to the threshold itself by normalize_scores.
NORMALIZED_THRESHOLD = 0.5


class MetricWarning(UserWarning):
    """Warns that a metric is undefined for the given input and returns nan."""


@dataclass(frozen=True)
class ThresholdRates:
    """Error rates of an accept/reject decision at one threshold.

    Attributes:
        false_reject_rate: Fraction of good images flagged as defective.
        escape_rate: Fraction of defective images passed as good.
    """

    false_reject_rate: float
    escape_rate: float


def image_auroc(labels: ArrayInput, scores: ArrayInput) -> float:
    """Area under the ROC curve of image scores.

    Args:
        labels: Image labels of shape (N,), 1 for defective and 0 for good.
        scores: Image anomaly scores of shape (N,); higher means more anomalous.

    Returns:
        The AUROC in [0, 1], or nan with a :class:`MetricWarning` when only one
        class is present.

    Raises:
        ValueError: If the shapes differ, the scores are not finite or the
            labels are not 0/1.
    """
    labels, scores = _check_image_inputs(labels, scores)
    if not _has_both_classes(labels, "image_auroc", "images"):
        return math.nan

    return float(roc_auc_score(labels, scores))


def bootstrap_image_aurocs(
    labels: ArrayInput,
    scores: ArrayInput,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> np.ndarray:
    """Image AUROCs of stratified bootstrap resamples of a test set, (resamples,).

    Each resample draws as many good and as many defective images as the set
    holds, with replacement, from each class apart, so every resample has
    both classes. The draws come from ``numpy.random.default_rng(seed)``:
    good indices, then defective ones, for each resample in turn, into each
    class's scores sorted ascending, so the order of the images does not
    change the result.

    Raises:
        ValueError: As :func:`image_auroc`, or if ``resamples`` is below 1.
    """
    labels, scores = _check_image_inputs(labels, scores)
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    good, defective = np.sort(scores[labels == 0]), np.sort(scores[labels == 1])
    if good.size == 0 or defective.size == 0:
        return np.full(resamples, math.nan)
    rng = np.random.default_rng(seed)
    aurocs = np.empty(resamples)
    for k in range(resamples):
        drawn_good = good[rng.integers(0, good.size, good.size)]
        drawn_defective = defective[rng.integers(0, defective.size, defective.size)]
        aurocs[k] = _auroc_by_ranks(drawn_good, drawn_defective)
    return aurocs


def image_auroc_interval(
    labels: ArrayInput,
    scores: ArrayInput,
    level: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the image AUROC, (low, high).

    How far the AUROC of another test set of the same size and kind could
    fall: with a few hundred test images it spans several hundredths.

    Returns:
        The interval, or (nan, nan) with a :class:`MetricWarning` when only
        one class is present.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    labels, scores = _check_image_inputs(labels, scores)
    if not _has_both_classes(labels, "image_auroc_interval", "images"):
        return math.nan, math.nan
    aurocs = bootstrap_image_aurocs(labels, scores, resamples, seed)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(aurocs, [tail, 100 - tail])
    return float(low), float(high)


def _auroc_by_ranks(good: np.ndarray, defective: np.ndarray) -> float:
    """AUROC as the Mann-Whitney U statistic over all pairs, ties counting half."""
    ranks = stats.rankdata(np.concatenate([defective, good]))
    n_defective = defective.size
    u = ranks[:n_defective].sum() - n_defective * (n_defective + 1) / 2
    return float(u / (n_defective * good.size))


def pixel_auroc(masks: ArrayInput, maps: ArrayInput) -> float:
    """Area under the ROC curve of all pixels of all anomaly maps.

    The pixels are ranked once by a sort, so the result is exact (it equals
    ``roc_auc_score(masks.ravel(), maps.ravel())``) while the extra memory stays
    near 36 bytes per pixel: about 0.7 GB for 300 maps of 256 x 256, some 60%
    of what ``roc_auc_score`` needs, in well under half its time. Scores are
    ranked as float32 (float64 maps cost a float32 copy first), which can merge
    float64 scores closer than float32's resolution into ties.

    Args:
        masks: Ground-truth masks of shape (N, H, W), bool or 0/1; true marks a
            defective pixel.
        maps: Anomaly maps of shape (N, H, W); higher means more anomalous.

    Returns:
        The pixel AUROC in [0, 1], or nan with a :class:`MetricWarning` when all
        pixels share one class.

    Raises:
        ValueError: If the shapes differ or are not 3-D, the maps are not finite
            or the masks are not 0/1.
    """
    masks, maps = _check_pixel_inputs(masks, maps)
    if not _has_both_classes(masks, "pixel_auroc", "pixels"):
        return math.nan

    groups = masks.ravel().view(np.uint8)
    weights = np.array([0.0, 1.0 / np.count_nonzero(groups)])
    fpr, tpr = _ranked_curve(maps.ravel(), groups, weights)
    return float(np.trapezoid(tpr, fpr))


def aupro(
    masks: ArrayInput, maps: ArrayInput, fpr_limit: float = DEFAULT_FPR_LIMIT
) -> float:
    """Normalized area under the per-region overlap (PRO) curve.

    Each 8-connected defect region of each mask is one region. At a threshold
    ``t`` the PRO is the mean, over all regions, of the fraction of the
    region's pixels scoring ``>= t``, and the FPR is the fraction of all normal
    pixels scoring ``>= t``. The PRO is integrated over the FPR from 0 to
    ``fpr_limit`` (trapezoids, interpolated at the limit) and divided by
    ``fpr_limit``, so a perfect map scores 1.0 and a constant map scores
    ``fpr_limit / 2``.

    Every distinct score is a threshold; one sort of all pixels gives the exact
    curve. Memory use is that of :func:`pixel_auroc` plus about 7 bytes per
    pixel for the region labels.

    Args:
        masks: Ground-truth masks of shape (N, H, W), bool or 0/1; true marks a
            defective pixel.
        maps: Anomaly maps of shape (N, H, W); higher means more anomalous.
        fpr_limit: Upper end of the FPR range, in (0, 1].

    Returns:
        The normalized AUPRO in [0, 1], or nan with a :class:`MetricWarning`
        when there is no defect region or no normal pixel.

    Raises:
        ValueError: If the shapes differ or are not 3-D, the maps are not finite,
            the masks are not 0/1 or ``fpr_limit`` is outside (0, 1].
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}.")
    masks, maps = _check_pixel_inputs(masks, maps)
    if not _has_both_classes(masks, "aupro", "pixels"):
        return math.nan

    regions, n_regions = ndimage.label(masks, structure=REGION_STRUCTURE)
    logger.debug("aupro: %d defect regions in %d masks", n_regions, len(masks))
    region_sizes = np.bincount(regions.ravel())
    weights = 1.0 / (region_sizes * n_regions)
    weights[0] = 0.0

    fpr, pro = _ranked_curve(maps.ravel(), regions.ravel(), weights)
    fpr, pro = _truncate_curve(fpr, pro, fpr_limit)
    return float(np.trapezoid(pro, fpr) / fpr_limit)


def f1_at_threshold(labels: ArrayInput, scores: ArrayInput, threshold: float) -> float:
    """F1 score of flagging images with ``score >= threshold`` as defective.

    Args:
        labels: Image labels of shape (N,), 1 for defective and 0 for good.
        scores: Image anomaly scores of shape (N,).
        threshold: Decision threshold; must be finite.

    Returns:
        The F1 score of the defective class, or nan with a
        :class:`MetricWarning` when no image is defective.

    Raises:
        ValueError: If the shapes differ, the scores or threshold are not finite
            or the labels are not 0/1.
    """
    labels, scores = _check_image_inputs(labels, scores)
    _check_finite_scalar(threshold, "threshold")
    if not labels.any():
        _warn_undefined("f1_at_threshold", "no image is defective")
        return math.nan

    flagged = scores >= threshold
    true_pos = np.count_nonzero(flagged & labels)
    false_pos = np.count_nonzero(flagged & ~labels)
    false_neg = np.count_nonzero(~flagged & labels)
    return 2.0 * true_pos / (2.0 * true_pos + false_pos + false_neg)


def optimal_f1_threshold(labels: ArrayInput, scores: ArrayInput) -> tuple[float, float]:
    """Threshold on image scores that maximises the F1 score.

    Candidates are the distinct scores; an image is flagged when its score is
    ``>= threshold``. Among equal F1 scores the highest threshold wins.

    Args:
        labels: Image labels of shape (N,), 1 for defective and 0 for good.
        scores: Image anomaly scores of shape (N,).

    Returns:
        ``(threshold, f1)``, or ``(nan, nan)`` with a :class:`MetricWarning`
        when no image is defective.

    Raises:
        ValueError: If the shapes differ, the scores are not finite or the
            labels are not 0/1.
    """
    labels, scores = _check_image_inputs(labels, scores)
    if not labels.any():
        _warn_undefined("optimal_f1_threshold", "no image is defective")
        return math.nan, math.nan

    precision, recall, thresholds = precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(
        2.0 * precision * recall,
        denominator,
        out=np.zeros_like(denominator),
        where=denominator > 0,
    )
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))
    return float(thresholds[best]), float(f1[best])


def pixel_sample(
    masks: ArrayInput, maps: ArrayInput, max_pixels: int = PIXEL_THRESHOLD_SAMPLE
) -> tuple[np.ndarray, np.ndarray]:
    """A regular subsample of the pixels, for threshold searches on large sets.

    Every ``k``-th pixel of each image, in reading order, with the smallest
    ``k`` that keeps about ``max_pixels``. Each image gives the same
    positions, so the sample does not depend on the images' order.

    Args:
        masks: Ground-truth masks of shape (N, H, W), bool or 0/1.
        maps: Anomaly maps of shape (N, H, W).
        max_pixels: Pixels to keep, at most, give or take one per image.

    Returns:
        ``(mask pixels, map pixels)``, bool and float32, both of shape (M,).

    Raises:
        ValueError: If the shapes differ or are not 3-D, the maps are not
            finite, the masks are not 0/1 or ``max_pixels`` is below 1.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1, got {max_pixels}.")
    masks, maps = _check_pixel_inputs(masks, maps)
    n_images, height, width = maps.shape
    step = math.ceil(maps.size / max_pixels)
    if step > 1 and step % width == 0:
        step += 1  # a multiple of the width would keep the same columns only
    per_image = height * width
    return (
        masks.reshape(n_images, per_image)[:, ::step].ravel(),
        maps.reshape(n_images, per_image)[:, ::step].ravel(),
    )


def optimal_pixel_threshold(
    masks: ArrayInput, maps: ArrayInput, max_pixels: int = PIXEL_THRESHOLD_SAMPLE
) -> tuple[float, float]:
    """Threshold on map values that maximises the F1 score of defective pixels.

    :func:`optimal_f1_threshold` on :func:`pixel_sample`, so that every
    caller suggests the same threshold for the same maps and masks, in any
    order, with bounded memory.

    Args:
        masks: Ground-truth masks of shape (N, H, W), bool or 0/1.
        maps: Anomaly maps of shape (N, H, W).
        max_pixels: See :func:`pixel_sample`.

    Returns:
        ``(threshold, f1)`` on the sample, or ``(nan, nan)`` with a
        :class:`MetricWarning` when the sample holds no defective pixel.

    Raises:
        ValueError: As :func:`pixel_sample`.
    """
    mask_pixels, map_pixels = pixel_sample(masks, maps, max_pixels)
    return optimal_f1_threshold(mask_pixels, map_pixels)


def rates_at_threshold(
    labels: ArrayInput, scores: ArrayInput, threshold: float
) -> ThresholdRates:
    """False-reject and escape rates of flagging images with ``score >= threshold``.

    Args:
        labels: Image labels of shape (N,), 1 for defective and 0 for good.
        scores: Image anomaly scores of shape (N,).
        threshold: Decision threshold; must be finite.

    Returns:
        The rates; a rate whose class is absent is nan, with a
        :class:`MetricWarning`.

    Raises:
        ValueError: If the shapes differ, the scores or threshold are not finite
            or the labels are not 0/1.
    """
    labels, scores = _check_image_inputs(labels, scores)
    _check_finite_scalar(threshold, "threshold")
    flagged = scores >= threshold

    return ThresholdRates(
        false_reject_rate=_fraction(flagged[~labels], "false_reject_rate", "good"),
        escape_rate=_fraction(~flagged[labels], "escape_rate", "defective"),
    )


def percentile_threshold(
    scores: ArrayInput, percentile: float = DEFAULT_PERCENTILE
) -> float:
    """Threshold at a percentile of scores from good validation images.

    Args:
        scores: Anomaly scores of good images, of shape (N,).
        percentile: Percentile in [0, 100]; about ``100 - percentile`` percent
            of good images will score at or above the threshold.

    Returns:
        The threshold, linearly interpolated between neighbouring scores.

    Raises:
        ValueError: If the scores are not a non-empty finite 1-D array or the
            percentile is outside [0, 100].
    """
    scores = _check_scores(scores, "scores")
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}.")

    return float(np.percentile(scores, percentile))


def normalize_scores(
    scores: ArrayInput, threshold: float, min_value: float, max_value: float
) -> np.ndarray:
    """Map raw scores piecewise-linearly onto [0, 1] with the threshold at 0.5.

    ``[min_value, threshold]`` maps linearly onto ``[0, 0.5]`` and
    ``[threshold, max_value]`` onto ``[0.5, 1]``; results are clipped to
    [0, 1]. When ``threshold`` equals ``min_value`` (or ``max_value``), scores
    below (or above) it map straight to 0 (or 1). The mapping is
    non-decreasing, so rankings are kept.

    Args:
        scores: Raw scores of any shape, e.g. (N,) or anomaly maps (N, H, W).
        threshold: Raw score that should become 0.5.
        min_value: Raw score that should become 0, at most ``threshold``.
        max_value: Raw score that should become 1, at least ``threshold``.

    Returns:
        Normalized scores of the input's shape; float dtypes are kept, others
        become float64.

    Raises:
        ValueError: If the scores or bounds are not finite or the bounds are not
            ordered ``min_value <= threshold <= max_value``.
    """
    scores = _as_numpy(scores)
    _check_numeric_finite(scores, "scores")
    for value, name in (
        (threshold, "threshold"),
        (min_value, "min_value"),
        (max_value, "max_value"),
    ):
        _check_finite_scalar(value, name)
    if not min_value <= threshold <= max_value:
        raise ValueError(
            "Expected min_value <= threshold <= max_value, got "
            f"min_value={min_value}, threshold={threshold}, max_value={max_value}."
        )

    floating = np.issubdtype(scores.dtype, np.floating)
    dtype = scores.dtype if floating else np.dtype(np.float64)
    shifted = scores.astype(dtype) - dtype.type(threshold)
    lower_span, upper_span = threshold - min_value, max_value - threshold
    below = _scale_half(shifted, lower_span, fallback=-NORMALIZED_THRESHOLD)
    above = _scale_half(shifted, upper_span, fallback=NORMALIZED_THRESHOLD)
    normalized = NORMALIZED_THRESHOLD + np.where(shifted < 0, below, above)
    return np.clip(normalized, 0.0, 1.0).astype(dtype, copy=False)


def _fraction(hits: np.ndarray, metric: str, kind: str) -> float:
    """Fraction of true entries in ``hits``, or nan with a warning when empty."""
    if hits.size == 0:
        _warn_undefined(metric, f"no image is {kind}", stacklevel=4)
        return math.nan
    return float(np.count_nonzero(hits) / hits.size)


def _scale_half(shifted: np.ndarray, span: float, fallback: float) -> np.ndarray:
    """Scale threshold-centred scores so that ``span`` becomes 0.5.

    With a zero span, every non-zero score jumps to ``fallback``.
    """
    if span > 0:
        return shifted * (NORMALIZED_THRESHOLD / span)
    return np.where(shifted == 0, 0.0, fallback).astype(shifted.dtype)


def _ranked_curve(
    scores: np.ndarray, groups: np.ndarray, group_weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sweep a threshold down through every distinct score in one sort.

    Args:
        scores: Flat pixel scores of shape (P,).
        groups: Flat non-negative integer group ids of shape (P,); 0 marks a
            normal pixel, other ids a defect group.
        group_weights: Weight of one pixel of each group, shape (G,), with
            ``group_weights[0] == 0``.

    Returns:
        ``(fpr, gain)``, both of shape (T + 1,) for T distinct scores, starting
        at 0 and ordered by decreasing threshold: the fraction of normal pixels,
        and the summed weight of all pixels, scoring at or above each threshold.
    """
    order = np.argsort(scores)[::-1]
    sorted_groups = groups[order]
    sorted_scores = scores[order]
    del order

    # The last position of each run of equal scores closes one threshold.
    is_tie_end = np.empty(len(sorted_scores), dtype=bool)
    np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=is_tie_end[:-1])
    is_tie_end[-1] = True
    del sorted_scores

    normal_counts = np.cumsum(sorted_groups == 0, dtype=np.float64)
    fpr = _prepend_zero(normal_counts, is_tie_end)
    fpr /= fpr[-1]
    del normal_counts

    gain = group_weights[sorted_groups]
    np.cumsum(gain, out=gain)
    return fpr, _prepend_zero(gain, is_tie_end)


def _prepend_zero(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Return ``values[keep]`` with a 0 in front, without a temporary copy."""
    out = np.zeros(np.count_nonzero(keep) + 1, dtype=values.dtype)
    np.compress(keep, values, out=out[1:])
    return out


def _truncate_curve(
    fpr: np.ndarray, values: np.ndarray, fpr_limit: float
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a curve with non-decreasing ``fpr`` at ``fpr_limit``, interpolating."""
    n_kept = int(np.searchsorted(fpr, fpr_limit, side="right"))
    if n_kept == len(fpr):
        return fpr, values

    left, right = n_kept - 1, n_kept
    fraction = (fpr_limit - fpr[left]) / (fpr[right] - fpr[left])
    value_at_limit = values[left] + fraction * (values[right] - values[left])
    return (
        np.append(fpr[:n_kept], fpr_limit),
        np.append(values[:n_kept], value_at_limit),
    )


def _as_numpy(values: ArrayInput) -> np.ndarray:
    """Convert an array-like or a torch tensor on any device to a NumPy array."""
    if hasattr(values, "detach"):
        values = values.detach().cpu()
    return np.asarray(values)


def _check_numeric_finite(values: np.ndarray, name: str) -> None:
    """Raise unless ``values`` is a non-empty numeric array of finite numbers."""
    _check_numeric(values, name)
    _check_finite(values, name)


def _check_numeric(values: np.ndarray, name: str) -> None:
    """Raise unless ``values`` is a non-empty array of a numeric (or bool) dtype."""
    if not (np.issubdtype(values.dtype, np.number) or values.dtype == bool):
        raise TypeError(f"{name} must be numeric, got dtype {values.dtype}.")
    if values.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {values.shape}.")


def _check_finite(values: np.ndarray, name: str) -> None:
    """Raise if ``values`` holds nan or infinite entries."""
    n_bad = values.size - np.count_nonzero(np.isfinite(values))
    if n_bad:
        raise ValueError(
            f"{name} must be finite, got {n_bad} nan or infinite values "
            f"in an array of shape {values.shape}."
        )


def _check_finite_scalar(value: float, name: str) -> None:
    """Raise unless ``value`` is a finite real number."""
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}.")


def _check_scores(scores: ArrayInput, name: str) -> np.ndarray:
    """Return ``scores`` as a finite 1-D NumPy array of shape (N,)."""
    scores = _as_numpy(scores)
    if scores.ndim != 1:
        raise ValueError(f"{name} must have shape (N,), got shape {scores.shape}.")
    _check_numeric_finite(scores, name)
    return scores


def _check_binary(values: ArrayInput, name: str) -> np.ndarray:
    """Return 0/1 (or bool) ``values`` as a bool array."""
    values = _as_numpy(values)
    if values.dtype == bool:
        return values
    if not np.isin(values, (0, 1)).all():
        found = np.unique(values)[:5]
        raise ValueError(f"{name} must hold only 0 and 1, got values {found}.")
    return values.astype(bool)


def _check_image_inputs(
    labels: ArrayInput, scores: ArrayInput
) -> tuple[np.ndarray, np.ndarray]:
    """Validate image labels and scores; return bool labels and scores."""
    scores = _check_scores(scores, "scores")
    labels = _check_binary(labels, "labels")
    if labels.shape != scores.shape:
        raise ValueError(
            f"labels and scores must have the same shape (N,), got labels of "
            f"shape {labels.shape} and scores of shape {scores.shape}."
        )
    return labels, scores


def _check_pixel_inputs(
    masks: ArrayInput, maps: ArrayInput
) -> tuple[np.ndarray, np.ndarray]:
    """Validate masks and maps; return bool masks and float32 maps."""
    masks, maps = _as_numpy(masks), _as_numpy(maps)
    if maps.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(
            "masks and maps must have the same shape (N, H, W), got masks of "
            f"shape {masks.shape} and maps of shape {maps.shape}."
        )
    _check_numeric(maps, "maps")
    masks = _check_binary(masks, "masks")

    # Values beyond float32's range become infinite here and are caught below.
    with np.errstate(over="ignore"):
        maps = maps.astype(PIXEL_SCORE_DTYPE, copy=False)
    _check_finite(maps, f"maps (as {np.dtype(PIXEL_SCORE_DTYPE)})")
    return np.ascontiguousarray(masks), maps


def _has_both_classes(labels: np.ndarray, metric: str, items: str) -> bool:
    """Warn and return False when ``labels`` holds only one class."""
    n_positive = np.count_nonzero(labels)
    if 0 < n_positive < labels.size:
        return True

    only = "defective" if n_positive else "good"
    _warn_undefined(metric, f"all {labels.size} {items} are {only}", stacklevel=4)
    return False


def _warn_undefined(metric: str, reason: str, stacklevel: int = 3) -> None:
    """Issue a MetricWarning that ``metric`` is undefined and will be nan.

    The default ``stacklevel`` points at the caller of a public function that
    calls this helper directly; add one for each helper in between.
    """
    warnings.warn(
        f"{metric} is undefined because {reason}; returning nan.",
        MetricWarning,
        stacklevel=stacklevel,
    )
