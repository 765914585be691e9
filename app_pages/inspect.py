"""Inspect page: see where each part differs from the good ones, and why it fails."""

import numpy as np
import pandas as pd
import streamlit as st

from app_ui import state
from app_ui.figures import inspection_figure
from app_ui.scoring import Scale, Scored, scale_of, score_items, verdicts
from app_ui.sources import Item, pick_images
from app_ui.state import PERSIST
from app_ui.thresholding import (
    describe_score,
    model_slider_range,
    pixel_control,
    save_buttons,
    threshold_slider,
    to_save,
)
from app_ui.widgets import (
    NORMALISED_FORMAT,
    escape_markdown,
    raw,
    report_skipped,
    require_model,
    show_flash,
    styled_verdicts,
    verdict_badge,
)
from padim_core import demo
from padim_core.images import read_image
from padim_core.model import Thresholds
from padim_core.workspace import ModelEntry

TABLE_KEY = "inspect_table"


def inspect_page() -> None:
    """Score images, then step through them with heatmap, outline and verdict."""
    st.title("Inspect")
    show_flash()
    entry = require_model(state.active_model())
    items, skipped = pick_images(
        "inspect",
        f"{demo.N_INSPECT_DEFECTIVE} defective and {demo.N_INSPECT_GOOD} good cells",
        demo.inspection_images,
        model=entry,
    )
    report_skipped(skipped)
    if not items:
        st.info("Choose images to inspect.")
        return
    scored = score_items(entry, items, state.device())
    report_skipped(scored.skipped, "images")
    if not len(scored):
        st.error("None of these images could be read; nothing to inspect.")
        return

    image_threshold, pixel_threshold, opacity = _controls(entry, scored)
    working = state.working_thresholds(entry)
    tried = Thresholds(
        image_threshold, pixel_threshold, working.score_min, working.score_max
    )
    scale = scale_of(tried, scored.scores)
    # Without a threshold saved or tried, the slider starts at these images' median,
    # which would fail half of them: no verdict until the user sets one.
    found = verdicts(scored.scores, None if working.image is None else image_threshold)
    index = _navigator(scored, found)
    by_name = {item.name: item for item in items}
    _show(
        scored,
        index,
        by_name[scored.names[index]],
        found[index],
        scale,
        opacity,
        pixel_threshold,
    )
    _table(scored, found, scale)


def _controls(entry: ModelEntry, scored: Scored) -> tuple[float, float, float]:
    working = state.working_thresholds(entry)
    if working.image is None:
        st.warning(
            "This model has no image threshold yet, so no image gets a pass or fail "
            "verdict. Set one on the Thresholds page with good and defective "
            "images, or move the image threshold slider to try one; it starts at "
            "the median score of these images."
        )
    fallback = float(np.median(scored.scores))
    top, step = model_slider_range(entry, scored.scores)
    left, middle, right = st.columns(3)
    with left:
        image = threshold_slider(entry, "image", "inspect", top, step, fallback)
    with middle:
        pixel = pixel_control(entry, "inspect", top, step, image)
    opacity = right.slider(
        "Heatmap opacity",
        0.0,
        1.0,
        0.5,
        0.05,
        key="inspect_opacity",
        persist_state=PERSIST,
    )
    save_buttons(entry, to_save(entry, image, pixel), "inspect")
    return image, pixel, opacity


def _label(scored: Scored, index: int) -> str:
    # No verdict here: the options' labels do not refresh when a threshold
    # moves, so they hold only what never changes.
    return f"{index + 1}. {scored.names[index]} · {raw(float(scored.scores[index]))}"


def _step(delta: int, count: int) -> None:
    current = st.session_state.get(state.INSPECT_SELECTED, 0)
    st.session_state[state.INSPECT_SELECTED] = (current + delta) % count


def _navigator(scored: Scored, found: list[str]) -> int:
    count = len(scored)
    if st.session_state.get(state.INSPECT_SELECTED, 0) >= count:
        st.session_state[state.INSPECT_SELECTED] = 0
    fails = found.count("fail")
    if "unset" in found:
        st.markdown(f"**{count} images** · no image threshold, so no verdicts")
    else:
        st.markdown(f"**{count} images** · {fails} fail · {found.count('pass')} pass")
    back, choice, forward = st.columns([1, 6, 1], vertical_alignment="bottom")
    back.button(
        "Previous",
        icon=":material/chevron_left:",
        on_click=_step,
        args=(-1, count),
        width="stretch",
        disabled=count < 2,
    )
    index = choice.selectbox(
        "Image",
        range(count),
        key=state.INSPECT_SELECTED,
        format_func=lambda i: _label(scored, i),
        label_visibility="collapsed",
    )
    forward.button(
        "Next",
        icon=":material/chevron_right:",
        on_click=_step,
        args=(1, count),
        width="stretch",
        disabled=count < 2,
    )
    return index


def _show(
    scored: Scored,
    index: int,
    item: Item,
    verdict: str,
    scale: Scale,
    opacity: float,
    pixel_threshold: float,
) -> None:
    score = float(scored.scores[index])
    badge, text = st.columns([1, 8], vertical_alignment="center")
    with badge:
        verdict_badge(verdict)
    width, height = scored.sizes[index]
    threshold = "image threshold" if verdict != "unset" else "no threshold; median"
    text.markdown(
        f"**{escape_markdown(item.name)}** · score {describe_score(score, scale)} · "
        f"{threshold} {raw(scale.threshold)} (0.50) · {width} × {height} px, seen "
        f"by the model at {scored.image_size} × {scored.image_size}"
    )
    image = read_image(item.source(), item.name)
    full_map = scored.map(index)
    figure = inspection_figure(
        image, scored.distances[index], full_map, scale, opacity, pixel_threshold
    )
    st.plotly_chart(
        figure,
        width="stretch",
        config={
            "displaylogo": False,
            "scrollZoom": True,
            "modeBarButtonsToRemove": ["zoomIn2d", "zoomOut2d", "autoScale2d"],
        },
    )
    above = float((full_map >= pixel_threshold).mean())
    yellow = "the image threshold" if verdict != "unset" else "the median score"
    st.caption(
        f"Colours use one scale for every image: yellow is {yellow}, red "
        f"is at or above {raw(scale.high)}. {100 * above:.1f} % of the image is "
        "inside the outline. Drag to zoom (all three panels follow); double-click "
        "to reset."
    )
    _outline_note(verdict, above, scale.threshold, pixel_threshold)


def _outline_note(verdict: str, above: float, image: float, pixel: float) -> None:
    """Explain an outline that is missing or small because of the thresholds."""
    if image is None or pixel <= image:
        return
    if verdict == "fail" and above == 0:
        st.caption(
            f":orange[This part fails, yet nothing is outlined:] the pixel threshold "
            f"({raw(pixel)}) is higher than the image threshold ({raw(image)}), so "
            "no pixel of the map reaches it although the score does."
        )
        return
    st.caption(
        f"The pixel threshold ({raw(pixel)}) is higher than the image threshold "
        f"({raw(image)}): a failing part may show a small outline, or none."
    )


def _pick_row() -> None:
    rows = st.session_state[TABLE_KEY].selection.rows
    if rows:
        st.session_state[state.INSPECT_SELECTED] = rows[0]


def _table(scored: Scored, found: list[str], scale: Scale) -> None:
    with st.expander(f"All {len(scored)} images", expanded=len(scored) > 1):
        frame = pd.DataFrame(
            {
                "image": scored.names,
                "score": scored.scores.astype(float),
                "normalised": scale.normalize(scored.scores),
                "verdict": found,
            }
        )
        st.dataframe(
            styled_verdicts(frame),
            hide_index=True,
            key=TABLE_KEY,
            on_select=_pick_row,
            selection_mode="single-row",
            column_config={
                "score": st.column_config.NumberColumn("score (raw)", format="%.2f"),
                "normalised": st.column_config.ProgressColumn(
                    "normalised", min_value=0.0, max_value=1.0, format=NORMALISED_FORMAT
                ),
            },
        )
        st.caption(
            "Tick the box at the start of a row to show that image; click a header "
            "to sort."
        )


inspect_page()
