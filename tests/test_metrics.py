"""Tests for padim_core.metrics."""

import math
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import f1_score, roc_auc_score

from padim_core.metrics import (
    MetricWarning,
    ThresholdRates,
    aupro,
    bootstrap_image_aurocs,
    f1_at_threshold,
    image_auroc,
    image_auroc_interval,
    normalize_scores,
    optimal_f1_threshold,
    optimal_pixel_threshold,
    percentile_threshold,
    pixel_auroc,
    pixel_sample,
    rates_at_threshold,
)

PixelMetric = Callable[[np.ndarray, np.ndarray], float]

SEEDS = (0, 1, 2)

# Thresholds of the coarse reference AUPRO, and how close it must come.
COARSE_THRESHOLDS = 200
COARSE_TOLERANCE = 1e-2


def _image_case(seed: int, n_images: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Random labels with both classes and scores that loosely follow them."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n_images)
    labels[:2] = (0, 1)
    scores = rng.normal(size=n_images) + labels
    return labels, scores


def _pixel_case(seed: int, decimals: int | None = None) -> tuple[np.ndarray, ...]:
    """Three 16 x 16 masks with a few rectangles, and noisy maps.

    Rounding the maps to ``decimals`` creates many tied scores.
    """
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[0, 2:6, 3:9] = True
    masks[0, 10:12, 10:11] = True
    masks[1, 8:15, 1:4] = True
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    if decimals is not None:
        maps = np.round(maps, decimals)
    return masks, maps.astype(np.float32)


def _reference_aupro(
    masks: np.ndarray, maps: np.ndarray, thresholds: np.ndarray, fpr_limit: float
) -> float:
    """Slow, obvious AUPRO: one full pass over the maps per threshold."""
    regions = []
    for image_index, mask in enumerate(masks):
        labeled, n_regions = ndimage.label(mask, structure=np.ones((3, 3)))
        for region_id in range(1, n_regions + 1):
            regions.append((image_index, labeled == region_id))
    normal_scores = maps[~masks]

    fprs, pros = [0.0], [0.0]
    for threshold in np.sort(thresholds)[::-1]:
        overlaps = [(maps[i][region] >= threshold).mean() for i, region in regions]
        pros.append(np.mean(overlaps))
        fprs.append((normal_scores >= threshold).mean())
    fprs, pros = np.array(fprs), np.array(pros)

    inside = fprs <= fpr_limit
    pro_at_limit = np.interp(fpr_limit, fprs, pros)
    x = np.append(fprs[inside], fpr_limit)
    y = np.append(pros[inside], pro_at_limit)
    return np.trapezoid(y, x) / fpr_limit


@pytest.mark.parametrize("seed", SEEDS)
def test_image_auroc_matches_sklearn(seed: int) -> None:
    labels, scores = _image_case(seed)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


def test_image_auroc_accepts_torch_tensors() -> None:
    labels, scores = _image_case(0)
    expected = roc_auc_score(labels, scores)
    tensors = torch.from_numpy(labels), torch.from_numpy(scores).requires_grad_()
    assert image_auroc(*tensors) == pytest.approx(expected)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("decimals", [None, 1])
def test_pixel_auroc_matches_sklearn(seed: int, decimals: int | None) -> None:
    masks, maps = _pixel_case(seed, decimals)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_accepts_torch_tensors() -> None:
    masks, maps = _pixel_case(0)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    result = pixel_auroc(torch.from_numpy(masks), torch.from_numpy(maps))
    assert result == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_reference_at_every_score(
    seed: int, decimals: int | None, fpr_limit: float
) -> None:
    masks, maps = _pixel_case(seed, decimals)
    expected = _reference_aupro(masks, maps, np.unique(maps), fpr_limit)
    assert aupro(masks, maps, fpr_limit) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_aupro_matches_coarse_reference(seed: int) -> None:
    masks, maps = _pixel_case(seed)
    thresholds = np.linspace(maps.min(), maps.max(), COARSE_THRESHOLDS)
    expected = _reference_aupro(masks, maps, thresholds, fpr_limit=0.3)
    assert aupro(masks, maps) == pytest.approx(expected, abs=COARSE_TOLERANCE)


def test_aupro_of_perfect_map_is_one() -> None:
    masks, _ = _pixel_case(0)
    assert aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0)


def test_aupro_of_inverted_map_is_zero() -> None:
    masks, _ = _pixel_case(0)
    assert aupro(masks, (~masks).astype(np.float32)) == pytest.approx(0.0)


@pytest.mark.parametrize("fpr_limit", [0.1, 0.3, 1.0])
def test_aupro_of_constant_map_is_half_the_limit(fpr_limit: float) -> None:
    masks, _ = _pixel_case(0)
    maps = np.zeros(masks.shape)
    assert aupro(masks, maps, fpr_limit) == pytest.approx(fpr_limit / 2)


def test_aupro_joins_diagonal_neighbours_into_one_region() -> None:
    # An L of three pixels plus one pixel touching it only at a corner: one
    # region of four pixels under 8-connectivity, two regions under 4.
    masks = np.zeros((1, 5, 5), dtype=bool)
    masks[0, 1, 1] = masks[0, 2, 1] = masks[0, 2, 2] = True
    masks[0, 3, 3] = True
    maps = np.full(masks.shape, 2.0)
    maps[masks] = 1.0
    maps[0, 3, 3] = 3.0

    # Only the corner pixel beats the normal pixels: PRO 1/4 up to FPR 1.
    assert aupro(masks, maps) == pytest.approx(0.25)


@pytest.mark.parametrize("fpr_limit", [0.0, -0.1, 1.5, math.nan])
def test_aupro_rejects_fpr_limit_outside_unit_interval(fpr_limit: float) -> None:
    masks, maps = _pixel_case(0)
    with pytest.raises(ValueError, match=r"fpr_limit must be in \(0, 1\]"):
        aupro(masks, maps, fpr_limit)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.5, 1.0, 2.5])
def test_f1_at_threshold_matches_sklearn(seed: int, threshold: float) -> None:
    labels, scores = _image_case(seed)
    expected = f1_score(labels, scores >= threshold, zero_division=0.0)
    assert f1_at_threshold(labels, scores, threshold) == pytest.approx(expected)


def test_f1_at_threshold_counts_score_equal_to_threshold_as_defective() -> None:
    assert f1_at_threshold([0, 1], [0.2, 0.7], threshold=0.7) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_optimal_f1_threshold_beats_every_candidate(seed: int) -> None:
    labels, scores = _image_case(seed)
    threshold, best_f1 = optimal_f1_threshold(labels, scores)

    candidates = [f1_at_threshold(labels, scores, s) for s in np.unique(scores)]
    assert best_f1 == pytest.approx(max(candidates))
    assert f1_at_threshold(labels, scores, threshold) == pytest.approx(best_f1)


def test_optimal_f1_threshold_on_separable_scores() -> None:
    threshold, best_f1 = optimal_f1_threshold([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert (threshold, best_f1) == pytest.approx((0.8, 1.0))


def test_rates_at_threshold_known_answer() -> None:
    labels = [0, 0, 0, 1, 1]
    scores = [0.1, 0.5, 0.9, 0.4, 0.8]
    rates = rates_at_threshold(labels, scores, threshold=0.5)
    assert rates == ThresholdRates(false_reject_rate=2 / 3, escape_rate=0.5)


def test_rates_at_threshold_without_defective_images() -> None:
    with pytest.warns(MetricWarning, match="escape_rate is undefined"):
        rates = rates_at_threshold([0, 0], [0.1, 0.9], threshold=0.5)
    assert rates.false_reject_rate == pytest.approx(0.5)
    assert math.isnan(rates.escape_rate)


def test_rates_at_threshold_without_good_images() -> None:
    with pytest.warns(MetricWarning, match="false_reject_rate is undefined"):
        rates = rates_at_threshold([1, 1], [0.1, 0.9], threshold=0.5)
    assert math.isnan(rates.false_reject_rate)
    assert rates.escape_rate == pytest.approx(0.5)


_ONE_CLASS_MASKS = np.zeros((2, 4, 4), dtype=bool)
_ONE_CLASS_MAPS = np.arange(32, dtype=np.float32).reshape(2, 4, 4)


@pytest.mark.parametrize(
    "compute",
    [
        lambda: image_auroc([0, 0, 0], [0.1, 0.2, 0.3]),
        lambda: image_auroc([1, 1, 1], [0.1, 0.2, 0.3]),
        lambda: pixel_auroc(_ONE_CLASS_MASKS, _ONE_CLASS_MAPS),
        lambda: pixel_auroc(~_ONE_CLASS_MASKS, _ONE_CLASS_MAPS),
        lambda: aupro(_ONE_CLASS_MASKS, _ONE_CLASS_MAPS),
        lambda: aupro(~_ONE_CLASS_MASKS, _ONE_CLASS_MAPS),
        lambda: f1_at_threshold([0, 0], [0.1, 0.2], threshold=0.15),
    ],
    ids=[
        "image_auroc_good",
        "image_auroc_defective",
        "pixel_auroc_good",
        "pixel_auroc_defective",
        "aupro_good",
        "aupro_defective",
        "f1_good",
    ],
)
def test_degenerate_input_warns_and_gives_nan(compute: Callable[[], float]) -> None:
    with pytest.warns(MetricWarning, match="undefined"):
        result = compute()
    assert math.isnan(result)


def test_optimal_f1_threshold_without_defective_images() -> None:
    with pytest.warns(MetricWarning, match="no image is defective"):
        threshold, best_f1 = optimal_f1_threshold([0, 0], [0.1, 0.2])
    assert math.isnan(threshold) and math.isnan(best_f1)


@pytest.mark.parametrize(
    "compute",
    [
        lambda: image_auroc([0, 0], [0.1, 0.2]),
        lambda: rates_at_threshold([0, 0], [0.1, 0.2], threshold=0.5),
    ],
    ids=["through_class_check", "through_fraction"],
)
def test_metric_warning_points_at_the_caller(compute: Callable[[], object]) -> None:
    with pytest.warns(MetricWarning) as record:
        compute()
    assert [entry.filename for entry in record] == [__file__]


@pytest.mark.parametrize("percentile", [0.0, 50.0, 99.0, 100.0])
def test_percentile_threshold_matches_numpy(percentile: float) -> None:
    scores = np.random.default_rng(0).normal(size=50)
    expected = np.percentile(scores, percentile)
    assert percentile_threshold(scores, percentile) == pytest.approx(expected)


@pytest.mark.parametrize("percentile", [-1.0, 100.5, math.nan])
def test_percentile_threshold_rejects_bad_percentile(percentile: float) -> None:
    with pytest.raises(ValueError, match=r"percentile must be in \[0, 100\]"):
        percentile_threshold([0.1, 0.2], percentile)


@pytest.mark.parametrize(
    ("threshold", "min_value", "max_value"),
    [(1.0, 0.0, 3.0), (0.0, 0.0, 3.0), (3.0, 0.0, 3.0), (1.0, 1.0, 1.0)],
    ids=["ordinary", "min_is_threshold", "max_is_threshold", "all_equal"],
)
def test_normalize_scores_is_monotone_with_threshold_at_half(
    threshold: float, min_value: float, max_value: float
) -> None:
    scores = np.linspace(-2.0, 5.0, 141)
    normalized = normalize_scores(scores, threshold, min_value, max_value)
    bounds = [min_value, threshold, max_value]
    anchors = normalize_scores(bounds, threshold, min_value, max_value)

    assert np.all(np.diff(normalized) >= 0)
    assert normalized.min() >= 0.0 and normalized.max() <= 1.0
    assert anchors[1] == 0.5
    if min_value < threshold:
        assert anchors[0] == pytest.approx(0.0)
    if max_value > threshold:
        assert anchors[2] == pytest.approx(1.0)


def test_normalize_scores_is_piecewise_linear() -> None:
    normalized = normalize_scores([0.5, 2.0, 5.0, -1.0, 9.0], 1.0, 0.0, 5.0)
    np.testing.assert_allclose(normalized, [0.25, 0.625, 1.0, 0.0, 1.0])


def test_normalize_scores_keeps_float32_maps() -> None:
    maps = np.ones((2, 4, 4), dtype=np.float32)
    normalized = normalize_scores(maps, 1.0, 0.0, 2.0)
    assert normalized.dtype == np.float32 and normalized.shape == maps.shape


def test_normalize_scores_rejects_unordered_bounds() -> None:
    with pytest.raises(ValueError, match="min_value <= threshold <= max_value"):
        normalize_scores([0.1], threshold=2.0, min_value=0.0, max_value=1.0)


def test_image_metrics_reject_mismatched_lengths() -> None:
    message = re.escape("got labels of shape (3,) and scores of shape (2,)")
    with pytest.raises(ValueError, match=message):
        image_auroc([0, 1, 1], [0.1, 0.2])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_image_metrics_reject_non_finite_scores(bad: float) -> None:
    with pytest.raises(ValueError, match="scores must be finite, got 1 nan"):
        f1_at_threshold([0, 1], [0.1, bad], threshold=0.5)


@pytest.mark.parametrize("labels", [[0, 2], [-1, 1], [0.5, 1.0], [math.nan, 1]])
def test_image_metrics_reject_labels_other_than_zero_and_one(labels: list) -> None:
    with pytest.raises(ValueError, match="labels must hold only 0 and 1"):
        image_auroc(labels, [0.1, 0.2])


def test_image_metrics_reject_two_dimensional_scores() -> None:
    with pytest.raises(ValueError, match=re.escape("shape (N,), got shape (2, 1)")):
        image_auroc([0, 1], [[0.1], [0.2]])


def test_image_metrics_reject_empty_scores() -> None:
    with pytest.raises(ValueError, match="scores must not be empty"):
        percentile_threshold([])


def test_image_metrics_reject_text_scores() -> None:
    with pytest.raises(TypeError, match="scores must be numeric"):
        percentile_threshold(["a", "b"])


@pytest.mark.parametrize("threshold", [math.nan, math.inf])
def test_threshold_metrics_reject_non_finite_threshold(threshold: float) -> None:
    with pytest.raises(ValueError, match="threshold must be finite"):
        rates_at_threshold([0, 1], [0.1, 0.2], threshold)


@pytest.mark.parametrize(
    ("mask_shape", "map_shape"),
    [((2, 4, 4), (2, 4, 5)), ((2, 4, 4), (3, 4, 4)), ((4, 4), (4, 4))],
)
@pytest.mark.parametrize("metric", [pixel_auroc, aupro])
def test_pixel_metrics_reject_mismatched_shapes(
    metric: PixelMetric, mask_shape: tuple[int, ...], map_shape: tuple[int, ...]
) -> None:
    message = re.escape(f"got masks of shape {mask_shape} and maps of shape")
    with pytest.raises(ValueError, match=message):
        metric(np.zeros(mask_shape), np.zeros(map_shape))


@pytest.mark.parametrize("metric", [pixel_auroc, aupro])
def test_pixel_metrics_reject_non_finite_maps(metric: PixelMetric) -> None:
    masks, maps = _pixel_case(0)
    maps[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="must be finite, got 1 nan"):
        metric(masks, maps)


@pytest.mark.parametrize("metric", [pixel_auroc, aupro])
def test_pixel_metrics_reject_masks_other_than_zero_and_one(
    metric: PixelMetric,
) -> None:
    masks, maps = _pixel_case(0)
    with pytest.raises(ValueError, match="masks must hold only 0 and 1"):
        metric(masks * 255, maps)


def _pixel_stack(seed: int, n_images: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks with one defect square in half the images, maps that follow them."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_images, side, side), dtype=bool)
    masks[::2, side // 4 : side // 2, side // 4 : side // 2] = True
    maps = (rng.normal(size=masks.shape) + 2.0 * masks).astype(np.float32)
    return masks, maps


@pytest.mark.parametrize(
    ("n_images", "side", "max_pixels", "expected"),
    [
        (4, 8, 1000, 256),  # all pixels
        (4, 8, 128, 128),  # every second pixel of each image
        (6, 10, 100, 102),  # a step of 6 pixels: 17 per image
        (3, 8, 24, 24),  # a step of 8 would keep one column; 9 keeps 8 per image
    ],
)
def test_pixel_sample_keeps_about_max_pixels(n_images, side, max_pixels, expected):
    masks, maps = _pixel_stack(0, n_images, side)

    sample_masks, sample_maps = pixel_sample(masks, maps, max_pixels)

    assert sample_masks.shape == sample_maps.shape == (expected,)
    assert sample_masks.dtype == bool and sample_maps.dtype == np.float32
    assert expected <= max_pixels + n_images


def test_pixel_sample_spreads_over_the_columns() -> None:
    masks, maps = _pixel_stack(0, 3, 8)
    maps[:] = np.arange(8, dtype=np.float32)  # each pixel's value is its column

    _, sample_maps = pixel_sample(masks, maps, 24)

    assert set(sample_maps.tolist()) == set(range(8))


def test_optimal_pixel_threshold_ignores_the_order_of_the_images() -> None:
    masks, maps = _pixel_stack(1, 10, 32)
    order = np.random.default_rng(2).permutation(10)

    found = optimal_pixel_threshold(masks, maps, 1000)

    assert optimal_pixel_threshold(masks[order], maps[order], 1000) == found
    sample_masks, sample_maps = pixel_sample(masks, maps, 1000)
    assert found == optimal_f1_threshold(sample_masks, sample_maps)


def test_optimal_pixel_threshold_uses_every_pixel_of_a_small_set() -> None:
    masks, maps = _pixel_stack(3, 4, 16)

    found = optimal_pixel_threshold(masks, maps)

    assert found == optimal_f1_threshold(masks.ravel(), maps.ravel())


def test_pixel_sample_refuses_an_empty_sample() -> None:
    masks, maps = _pixel_stack(0, 2, 4)
    with pytest.raises(ValueError, match="max_pixels must be at least 1, got 0"):
        pixel_sample(masks, maps, 0)


@pytest.mark.parametrize("seed", SEEDS)
def test_bootstrap_aurocs_are_those_of_the_stated_resamples(seed):
    labels, scores = _image_case(seed)
    scores = np.round(scores, 1)  # ties count half, as in roc_auc_score
    aurocs = bootstrap_image_aurocs(labels, scores, resamples=50, seed=seed)

    rng = np.random.default_rng(seed)
    good, defective = np.sort(scores[labels == 0]), np.sort(scores[labels == 1])
    for auroc in aurocs:
        drawn_good = good[rng.integers(0, good.size, good.size)]
        drawn_defective = defective[rng.integers(0, defective.size, defective.size)]
        expected = roc_auc_score(
            np.r_[np.zeros(good.size), np.ones(defective.size)],
            np.r_[drawn_good, drawn_defective],
        )
        assert auroc == pytest.approx(expected, abs=1e-12)


def test_the_auroc_interval_holds_the_auroc_and_narrows_with_more_images():
    labels, scores = _image_case(0, n_images=60)
    low, high = image_auroc_interval(labels, scores)
    assert low < image_auroc(labels, scores) < high
    assert image_auroc_interval(labels, scores) == (low, high)  # seeded

    many_labels, many_scores = _image_case(0, n_images=2000)
    many_low, many_high = image_auroc_interval(many_labels, many_scores)
    assert many_high - many_low < (high - low) / 3


def test_the_auroc_interval_does_not_depend_on_the_order_of_the_images():
    labels, scores = _image_case(1, n_images=50)
    order = np.random.default_rng(7).permutation(labels.size)
    assert image_auroc_interval(labels[order], scores[order]) == (
        image_auroc_interval(labels, scores)
    )


def test_perfectly_separated_scores_have_an_interval_of_one():
    labels = np.array([0, 0, 0, 1, 1])
    assert image_auroc_interval(labels, [0.1, 0.2, 0.3, 0.8, 0.9]) == (1.0, 1.0)


def test_the_auroc_interval_of_one_class_is_undefined():
    with pytest.warns(MetricWarning, match="image_auroc_interval is undefined"):
        low, high = image_auroc_interval([0, 0, 0], [0.1, 0.2, 0.3])
    assert math.isnan(low) and math.isnan(high)


@pytest.mark.parametrize(("level", "resamples"), [(0.0, 10), (1.0, 10), (0.9, 0)])
def test_the_auroc_interval_refuses_impossible_settings(level, resamples):
    with pytest.raises(ValueError, match="level|resamples"):
        image_auroc_interval([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], level, resamples)
