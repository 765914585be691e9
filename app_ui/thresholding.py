"""Threshold sliders that every page shares, and saving them into the model.

A slider shows raw Mahalanobis distances (with the normalised value beside
it). What it is set to is kept per model in the session, so the Inspect,
Thresholds and Batch pages agree, until the user saves it into the model
file or reverts to what is saved. So is where each value came from: one
suggested for, or chosen on, a validation set starts again when the
Thresholds page gets another set.
"""

from __future__ import annotations

import math

import numpy as np
import streamlit as st

from app_ui import state
from app_ui.scoring import Scale, scale_of
from app_ui.state import PERSIST
from app_ui.widgets import escape_markdown, flash, normalised, raw
from padim_core.model import Thresholds
from padim_core.workspace import ModelEntry, save_thresholds

# A slider reaches this far above the largest value it must show: room to
# try a stricter threshold, without scores bunched at the left end.
HEADROOM = 1.5

# Slider steps per full range, about.
STEPS = 1000

# How a change of each saved value is named to the user.
CHANGE_LABELS = (
    ("image threshold", "image"),
    ("pixel threshold", "pixel"),
    ("normalising range", "score_min"),
    ("normalising range", "score_max"),
)

LABELS = {"image": "Image threshold", "pixel": "Pixel threshold"}
HELP = {
    "image": "A part fails when its score (the map's maximum) reaches this value.",
    "pixel": "The outline encloses the pixels whose map value reaches this value.",
}


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5 or 5 times a power of ten at least ``value``."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for factor in (1, 2, 2.5, 5, 10):
        if factor * power >= value:
            return factor * power
    return 10 * power


def round_up(value: float) -> float:
    """``value`` rounded up to two significant digits: 322.5 -> 330."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    unit = 10 ** (math.floor(math.log10(value)) - 1)
    return math.ceil(round(value / unit, 9)) * unit


def slider_range(*values: float | None) -> tuple[float, float]:
    """(top, step) of a slider from 0 that shows every one of ``values``.

    The top is :data:`HEADROOM` times the largest value, rounded up to two
    significant digits; the step a round number near 1/:data:`STEPS` of it.
    """
    known = [v for v in values if v is not None and math.isfinite(v)]
    top = round_up(HEADROOM * max(known, default=1.0 / HEADROOM))
    return top, nice_ceiling(top / STEPS)


def model_slider_range(entry: ModelEntry, scores: np.ndarray) -> tuple[float, float]:
    """(top, step) of every threshold slider of ``entry``, on every page.

    One rule for all pages: the scores of the images on the page, the
    thresholds being tried and the saved ones. Images scored earlier, on
    this page or another, leave it alone: their scores may lie far off.
    """
    working = state.working_thresholds(entry)
    saved = entry.thresholds or Thresholds()
    highest = float(np.max(scores, initial=0.0))
    return slider_range(highest, working.image, working.pixel, saved.image, saved.pixel)


def slider_key(entry: ModelEntry, which: str, page: str) -> str:
    """The widget key of the ``which`` threshold's slider on ``page``."""
    return f"{page}_{which}_{state.model_key(entry)}"


def threshold_slider(
    entry: ModelEntry,
    which: str,
    page: str,
    top: float,
    step: float,
    fallback: float,
    origin: str | None = None,
) -> float:
    """A slider for the ``image`` or ``pixel`` threshold being tried.

    Args:
        entry: The model.
        which: ``"image"`` or ``"pixel"``.
        page: Distinguishes the pages' widget keys.
        top: Largest value the slider offers.
        step: Slider step.
        fallback: Where the slider starts when no threshold is set.
        origin: The id of the validation set that ``fallback`` was suggested
            for; None on a page without one.
    """
    key = slider_key(entry, which, page)
    working = getattr(state.working_thresholds(entry), which)
    if key not in st.session_state:
        st.session_state[key] = float(working if working is not None else fallback)
        if working is None:
            state.set_threshold_origin(entry, which, origin or state.THRESHOLD_START)
    st.session_state[key] = float(np.clip(st.session_state[key], 0.0, top))
    return st.slider(
        LABELS[which],
        0.0,
        float(top),
        step=float(step),
        key=key,
        help=HELP[which],
        on_change=_remember,
        args=(entry, which, key, origin),
        format="%.2f",
    )


def pixel_control(
    entry: ModelEntry,
    page: str,
    top: float,
    step: float,
    image: float,
    origin: str | None = None,
) -> float:
    """The pixel threshold: tied to the image threshold, or a slider of its own.

    Tied, a part fails exactly when its outline encloses something, which is
    the natural default when there are no masks to tune it on. Tied, it also
    comes from where the image threshold came from; ``origin`` is as for
    :func:`threshold_slider`.
    """
    working = state.working_thresholds(entry)
    tied = st.toggle(
        "Pixel threshold = image threshold",
        working.pixel is None or working.pixel == working.image,
        key=f"{page}_tie_{state.model_key(entry)}",
        persist_state=PERSIST,
        help="Off: set the pixel threshold (the outline) on its own.",
    )
    if not tied:
        return threshold_slider(entry, "pixel", page, top, step, image, origin)
    if working.pixel != image:
        state.set_working_thresholds(entry, pixel=image)
        tied_to = state.threshold_origin(entry, "image")
        state.set_threshold_origin(entry, "pixel", tied_to)
    st.session_state.pop(slider_key(entry, "pixel", page), None)
    return image


def _remember(entry: ModelEntry, which: str, key: str, origin: str | None) -> None:
    state.set_working_thresholds(entry, **{which: float(st.session_state[key])})
    state.set_threshold_origin(entry, which, origin)


def set_threshold(
    entry: ModelEntry, page: str, origin: str | None = None, **values: float | None
) -> None:
    """Set thresholds being tried, and the page's sliders with them (callback).

    ``origin`` is the id of the validation set the values were chosen on.
    """
    state.set_working_thresholds(entry, **values)
    for which in values:
        state.set_threshold_origin(entry, which, origin)
        st.session_state.pop(slider_key(entry, which, page), None)


def restart_thresholds(entry: ModelEntry, page: str, origin: str) -> None:
    """Start again the sliders whose value came from images other than ``origin``'s.

    A threshold suggested for, or chosen on, another validation set says
    nothing about this one: it goes back to the saved threshold, or, without
    one, to this set's suggestion. Saved values, and values chosen by hand
    on a page without a validation set, stay.
    """
    saved = entry.thresholds or Thresholds()
    for which in ("image", "pixel"):
        if state.threshold_origin(entry, which) in (None, origin):
            continue
        state.set_working_thresholds(entry, **{which: getattr(saved, which)})
        state.set_threshold_origin(entry, which, None)
        st.session_state.pop(slider_key(entry, which, page), None)


def to_save(entry: ModelEntry, image: float, pixel: float | None) -> Thresholds:
    """The thresholds to write: the ones tried, with a range that holds them."""
    working = state.working_thresholds(entry)
    scale = scale_of(Thresholds(image, pixel, working.score_min, working.score_max))
    return Thresholds(image, pixel, scale.low, scale.high)


def save_buttons(entry: ModelEntry, thresholds: Thresholds, page: str) -> None:
    """Save ``thresholds`` into the model file, or revert to what is saved."""
    saved = entry.thresholds or Thresholds()
    changed = thresholds != saved
    left, right, note = st.columns([1, 1, 3], vertical_alignment="center")
    if left.button(
        "Save to model",
        type="primary",
        disabled=not changed,
        icon=":material/save:",
        key=f"{page}_save",
    ):
        save_thresholds(entry.path, thresholds)
        state.forget_working_thresholds(entry)
        flash(
            f"Saved in {escape_markdown(entry.name)}: image threshold "
            f"{raw(thresholds.image)}, "
            f"pixel threshold {raw(thresholds.pixel)}."
        )
        st.rerun()
    if right.button(
        "Revert to saved",
        disabled=not changed,
        key=f"{page}_revert",
        icon=":material/undo:",
    ):
        state.forget_working_thresholds(entry)
        for which in ("image", "pixel"):
            st.session_state.pop(slider_key(entry, which, page), None)
        st.rerun()
    differs = [
        label
        for label, field in CHANGE_LABELS
        if getattr(thresholds, field) != getattr(saved, field)
    ]
    unsaved = f" **Not saved yet: {', '.join(dict.fromkeys(differs))}.**"
    note.caption(
        f"Saved in the model: image {raw(saved.image)}, pixel {raw(saved.pixel)}."
        + (unsaved if differs else "")
    )


def describe_score(score: float, scale: Scale) -> str:
    """``412.31 raw · 0.83 normalised``."""
    return f"{raw(score)} raw · {normalised(scale.normalize(score))} normalised"
