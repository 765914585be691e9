"""Threshold sliders that every page shares, and saving them into the model.

A slider shows raw Mahalanobis distances (with the normalised value beside
it). What it is set to is kept per model in the session, so the Inspect,
Thresholds and Batch pages agree, until the user saves it into the model
file or reverts to what is saved.
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

    One rule for all pages: the model's normalising range, the highest score
    seen this session and the thresholds being tried.
    """
    highest = state.note_scores(entry, float(np.max(scores, initial=0.0)))
    working = state.working_thresholds(entry)
    return slider_range(working.score_max, highest, working.image, working.pixel)


def threshold_slider(
    entry: ModelEntry, which: str, page: str, top: float, step: float, fallback: float
) -> float:
    """A slider for the ``image`` or ``pixel`` threshold being tried.

    Args:
        entry: The model.
        which: ``"image"`` or ``"pixel"``.
        page: Distinguishes the pages' widget keys.
        top: Largest value the slider offers.
        step: Slider step.
        fallback: Where the slider starts when no threshold is set.
    """
    key = f"{page}_{which}_{state.model_key(entry)}"
    working = getattr(state.working_thresholds(entry), which)
    if key not in st.session_state:
        st.session_state[key] = float(working if working is not None else fallback)
    st.session_state[key] = float(np.clip(st.session_state[key], 0.0, top))
    return st.slider(
        LABELS[which],
        0.0,
        float(top),
        step=float(step),
        key=key,
        help=HELP[which],
        on_change=_remember,
        args=(entry, which, key),
        format="%.2f",
    )


def pixel_control(
    entry: ModelEntry, page: str, top: float, step: float, image: float
) -> float:
    """The pixel threshold: tied to the image threshold, or a slider of its own.

    Tied, a part fails exactly when its outline encloses something, which is
    the natural default when there are no masks to tune it on.
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
        return threshold_slider(entry, "pixel", page, top, step, image)
    if working.pixel != image:
        state.set_working_thresholds(entry, pixel=image)
    st.session_state.pop(f"{page}_pixel_{state.model_key(entry)}", None)
    return image


def _remember(entry: ModelEntry, which: str, key: str) -> None:
    state.set_working_thresholds(entry, **{which: float(st.session_state[key])})


def set_threshold(entry: ModelEntry, page: str, **values: float | None) -> None:
    """Set thresholds being tried, and the page's sliders with them (callback)."""
    state.set_working_thresholds(entry, **values)
    for which in values:
        st.session_state.pop(f"{page}_{which}_{state.model_key(entry)}", None)


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
            st.session_state.pop(f"{page}_{which}_{state.model_key(entry)}", None)
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
