"""Thresholds page: choose the image and pixel thresholds on labelled images."""

import warnings

import numpy as np
import pandas as pd
import streamlit as st

from app_ui import state
from app_ui.figures import histogram_figure, pr_figure, roc_figure
from app_ui.scoring import Scale, Scored, score_items, verdicts
from app_ui.state import PERSIST
from app_ui.thresholding import (
    model_slider_range,
    pixel_control,
    restart_thresholds,
    save_buttons,
    set_threshold,
    threshold_slider,
    to_save,
)
from app_ui.validation import Validation, mask_stack, pick_validation, pixel_metrics
from app_ui.widgets import (
    NORMALISED_FORMAT,
    percent,
    raw,
    report_skipped,
    require_model,
    show_flash,
    styled_verdicts,
)
from padim_core import metrics
from padim_core.model import Thresholds
from padim_core.workspace import MIN_SPAN_FRACTION, ModelEntry

PAGE = "thresholds"


def thresholds_page() -> None:
    """Score labelled images, show the trade-off, save the chosen thresholds."""
    st.title("Thresholds")
    show_flash()
    entry = require_model(state.active_model())
    validation = pick_validation(PAGE, entry)
    report_skipped(validation.skipped)
    items = validation.good + validation.defective
    if not items:
        st.info("Choose validation images: good ones at least, defective ones too.")
        _save_unsaved(entry)
        return
    restart_thresholds(entry, PAGE, validation.key)
    scored = score_items(entry, items, state.device(), "Scoring validation images")
    report_skipped(scored.skipped, "images")
    good_names = {item.name for item in validation.good}
    labels = np.array([int(name not in good_names) for name in scored.names])
    if not (labels == 0).any():
        st.error("No good image could be scored; a threshold needs good images.")
        return

    image = _image_threshold(entry, scored, labels, validation.key)
    pixel = _pixel_threshold(entry, scored, labels, validation, image)
    low, high = validation_range(scored.scores, labels, image)
    st.subheader("Save")
    st.caption(
        f"Normalised scores map {raw(low)} to 0, the image threshold {raw(image)} to "
        f"0.5 and {raw(high)} to 1 (from these validation scores)."
    )
    save_buttons(entry, Thresholds(image, pixel, low, high), PAGE)
    _score_table(scored, labels, Scale(low, image, high))


def _save_unsaved(entry: ModelEntry) -> None:
    """Save or revert thresholds tried on another page, without images here."""
    working = state.working_thresholds(entry)
    if not state.thresholds_changed(entry) or working.image is None:
        return
    st.subheader("Save")
    st.caption(
        f"Unsaved thresholds from another page: image {raw(working.image)}, pixel "
        f"{raw(working.pixel)}."
    )
    save_buttons(entry, to_save(entry, working.image, working.pixel), PAGE)


def validation_range(
    scores: np.ndarray, labels: np.ndarray, threshold: float
) -> tuple[float, float]:
    """Raw scores that normalise to 0 and 1: lowest good, highest defective."""
    low = min(float(scores[labels == 0].min()), threshold)
    span = max(threshold - low, MIN_SPAN_FRACTION * abs(threshold), 1e-6)
    high = threshold + span
    if (labels == 1).any():
        high = max(float(scores[labels == 1].max()), high)
    return low, high


def _image_threshold(
    entry: ModelEntry, scored: Scored, labels: np.ndarray, origin: str
) -> float:
    st.subheader("Image threshold")
    scores = scored.scores.astype(np.float64)
    good, defective = scores[labels == 0], scores[labels == 1]
    if len(defective):
        suggested, f1 = metrics.optimal_f1_threshold(labels, scores)
        hint = f"F1-optimal threshold on these images: {raw(suggested)} (F1 {f1:.3f})."
    else:
        suggested, hint = _percentile_suggestion(good)
    image = _suggested_slider(entry, "image", scores, suggested, origin)
    st.caption(hint)
    _rates(labels, scores, image)
    low, high = validation_range(scores, labels, image)
    scale = Scale(low, image, high)
    st.plotly_chart(histogram_figure(good, defective, image, scale), width="stretch")
    if len(defective):
        roc, pr = st.columns(2)
        roc.plotly_chart(roc_figure(labels, scores, image), width="stretch")
        pr.plotly_chart(pr_figure(labels, scores, image), width="stretch")
    return image


def _suggested_slider(
    entry: ModelEntry, which: str, scores: np.ndarray, suggested: float, origin: str
) -> float:
    """The ``which`` threshold's slider, beside a button that sets ``suggested``.

    ``origin`` is the id of the validation set that ``suggested`` is for.
    """
    top, step = model_slider_range(entry, scores)
    left, right = st.columns([3, 1], vertical_alignment="center")
    with left:
        value = threshold_slider(entry, which, PAGE, top, step, suggested, origin)
    right.button(
        f"Use suggested ({raw(suggested)})",
        on_click=set_threshold,
        args=(entry, PAGE, origin),
        kwargs={which: suggested},
        key=f"{PAGE}_use_{which}",
    )
    return value


def _percentile_suggestion(good: np.ndarray) -> tuple[float, str]:
    st.warning(
        "All these validation images are good, so there is no F1-optimal threshold "
        "and the escape rate cannot be measured. A percentile of the good scores is "
        "offered instead; add defective images to see the trade-off."
    )
    percentile = st.slider(
        "Percentile of the good scores",
        80.0,
        100.0,
        metrics.DEFAULT_PERCENTILE,
        0.5,
        key=f"{PAGE}_percentile",
        persist_state=PERSIST,
        help="About (100 - percentile) % of good parts will score at or above it.",
    )
    suggested = metrics.percentile_threshold(good, percentile)
    return suggested, f"{percentile:g}th percentile of {len(good)} good scores."


def _rates(labels: np.ndarray, scores: np.ndarray, threshold: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.MetricWarning)
        rates = metrics.rates_at_threshold(labels, scores, threshold)
        f1 = metrics.f1_at_threshold(labels, scores, threshold)
        auroc = metrics.image_auroc(labels, scores)
    flagged = scores >= threshold
    n_good, n_bad = int((labels == 0).sum()), int((labels == 1).sum())
    rejected = int(flagged[labels == 0].sum())
    escaped = int((~flagged[labels == 1]).sum())
    cols = st.columns(4)
    cols[0].metric(
        "False-reject rate",
        percent(rates.false_reject_rate),
        f"{rejected} of {n_good} good parts fail",
        delta_color="off",
        delta_arrow="off",
    )
    cols[1].metric(
        "Escape rate",
        percent(rates.escape_rate),
        f"{escaped} of {n_bad} defective parts pass",
        delta_color="off",
        delta_arrow="off",
    )
    cols[2].metric("F1 at this threshold", "n/a" if np.isnan(f1) else f"{f1:.3f}")
    if np.isnan(auroc):
        cols[3].metric("Image AUROC", "n/a")
    else:
        low, high = _auroc_interval(labels, scores)
        cols[3].metric(
            "Image AUROC",
            f"{auroc:.3f}",
            f"95 % interval {low:.3f} to {high:.3f}",
            delta_color="off",
            delta_arrow="off",
            help=(
                "From 2,000 bootstrap resamples of these images: how far the "
                "AUROC could move on another set of this size."
            ),
        )


@st.cache_data(show_spinner=False, max_entries=8)
def _auroc_interval(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The image AUROC's bootstrap interval; slider moves reuse it."""
    return metrics.image_auroc_interval(labels, scores)


def _pixel_threshold(
    entry: ModelEntry,
    scored: Scored,
    labels: np.ndarray,
    validation: Validation,
    image: float,
) -> float:
    st.subheader("Pixel threshold")
    has_mask = [name in validation.masks for name in scored.names]
    if not any(has_mask):
        return _pixel_without_masks(entry, scored, image, validation.key)
    chosen = [i for i, label in enumerate(labels) if label == 0 or has_mask[i]]
    names = [scored.names[i] for i in chosen]
    masks, unreadable = mask_stack(names, validation.masks, scored.image_size)
    report_skipped(unreadable, "masks")
    keys = tuple(
        (name, validation.masks[name].key if name in validation.masks else "")
        for name in names
    )
    fingerprint = entry.fingerprint
    found = pixel_metrics(
        fingerprint, keys, scored.distances[chosen], masks, scored.image_size
    )
    n_masks = len(chosen) - int((labels == 0).sum())
    return _pixel_slider(entry, scored, found, n_masks, validation.key)


def _pixel_slider(
    entry: ModelEntry, scored: Scored, found: dict, n_masks: int, origin: str
) -> float:
    suggested = found["suggested"]
    pixel = _suggested_slider(entry, "pixel", scored.scores, suggested, origin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.MetricWarning)
        f1 = metrics.f1_at_threshold(found["sample_masks"], found["sample_maps"], pixel)
    cols = st.columns(4)
    cols[0].metric("Pixel AUROC", f"{found['pixel_auroc']:.3f}")
    cols[1].metric("AUPRO (to 30 % FPR)", f"{found['aupro']:.3f}")
    cols[2].metric("Pixel F1 at this threshold", f"{f1:.3f}")
    cols[3].metric("Best pixel F1", f"{found['f1']:.3f}")
    st.caption(
        f"From {n_masks} masked defective images and the good ones. F1-optimal pixel "
        f"threshold: {raw(suggested)}."
    )
    return pixel


def _pixel_without_masks(
    entry: ModelEntry, scored: Scored, image: float, origin: str
) -> float:
    st.info(
        "No masks, so the pixel threshold cannot be measured. By default it equals "
        "the image threshold: a part fails exactly when the outline encloses "
        "something. Judge it by eye on the Inspect page, or add masks here."
    )
    top, step = model_slider_range(entry, scored.scores)
    return pixel_control(entry, PAGE, top, step, image, origin)


def _score_table(scored: Scored, labels: np.ndarray, scale: Scale) -> None:
    with st.expander(f"Scores of all {len(scored)} images"):
        frame = pd.DataFrame(
            {
                "image": scored.names,
                "class": np.where(labels == 1, "defective", "good"),
                "score": scored.scores.astype(float),
                "normalised": scale.normalize(scored.scores),
                "verdict": verdicts(scored.scores, scale.threshold),
            }
        ).sort_values("score", ascending=False)
        st.dataframe(
            styled_verdicts(frame),
            hide_index=True,
            column_config={
                "score": st.column_config.NumberColumn("score (raw)", format="%.2f"),
                "normalised": st.column_config.NumberColumn(format=NORMALISED_FORMAT),
            },
        )


thresholds_page()
