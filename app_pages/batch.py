"""Batch page: score a whole lot, sort it, look at the worst, download a CSV."""

import numpy as np
import pandas as pd
import streamlit as st

from app_ui import state
from app_ui.figures import display_image, overlay_picture
from app_ui.scoring import Scale, Scored, scale_of, score_items, verdicts
from app_ui.sources import Item, pick_images
from app_ui.state import PERSIST
from app_ui.widgets import (
    NORMALISED_FORMAT,
    escape_markdown,
    normalised,
    raw,
    report_skipped,
    require_model,
    show_flash,
    spreadsheet_safe,
    styled_verdicts,
)
from padim_core import demo
from padim_core.images import ImageError, read_image
from padim_core.workspace import ModelEntry

# Pictures per row of the gallery of worst images.
GALLERY_COLUMNS = 4


def batch_page() -> None:
    """Score many images at the model's thresholds; table, gallery and CSV."""
    st.title("Batch")
    show_flash()
    entry = require_model(state.active_model())
    items, skipped = pick_images(
        "batch",
        f"{demo.N_BATCH_GOOD + demo.N_BATCH_DEFECTIVE} cells, good and defective",
        demo.batch_images,
        model=entry,
    )
    report_skipped(skipped)
    if not items:
        st.info("Choose the images to score.")
        return
    thresholds = state.working_thresholds(entry)
    _threshold_note(entry, thresholds)
    request = (state.model_key(entry), tuple(item.key for item in items))
    if st.button(
        f"Score {len(items):,} image{'s' if len(items) != 1 else ''}",
        type="primary",
        icon=":material/play_arrow:",
    ):
        st.session_state[state.BATCH_REQUEST] = request
    if st.session_state.get(state.BATCH_REQUEST) != request:
        _last_results()
        return

    scored = score_items(entry, items, state.device())
    report_skipped(scored.skipped, "images")
    if not len(scored):
        st.error("None of these images could be read; nothing was scored.")
        return
    scale = scale_of(thresholds, scored.scores)
    frame = results_frame(scored, scale, thresholds.image)
    st.session_state[state.BATCH_RESULTS] = (frame, len(scored.skipped))
    _summary(frame, len(scored.skipped))
    _table(frame)
    _gallery(scored, items, frame, scale, thresholds.pixel)


def _last_results() -> None:
    """The table of the last scoring, kept until the next one."""
    kept = st.session_state.get(state.BATCH_RESULTS)
    if kept is None:
        return
    frame, n_skipped = kept
    st.info(
        f"The results below are from the last scoring ({len(frame):,} images), "
        "not of the images chosen now. Score these to replace them."
    )
    _summary(frame, n_skipped)
    _table(frame)


def _threshold_note(entry: ModelEntry, thresholds) -> None:
    if thresholds.image is None:
        st.warning(
            "This model has no image threshold, so every verdict reads 'unset' and "
            "the normalised column stays empty: a normalised score places the "
            "threshold at 0.5, and there is none. Set one on the Thresholds page."
        )
        return
    source = (
        "unsaved, as set on another page"
        if state.thresholds_changed(entry)
        else ("saved in the model")
    )
    st.caption(
        f"Verdicts at image threshold {raw(thresholds.image)} ({source}); a part "
        "fails when its score reaches it."
    )


def results_frame(
    scored: Scored, scale: Scale, threshold: float | None
) -> pd.DataFrame:
    """One row per image, worst first: path, score, normalised score, verdict.

    Without a ``threshold`` the normalised scores are NaN (empty in the CSV):
    any other scale would pass off one made up from this lot as the model's.
    """
    if threshold is None:
        normalised_scores = np.full(len(scored), np.nan)
    else:
        normalised_scores = scale.normalize(scored.scores)
    frame = pd.DataFrame(
        {
            "path": scored.names,
            "score": scored.scores.astype(float),
            "normalised_score": normalised_scores,
            "verdict": verdicts(scored.scores, threshold),
        }
    )
    return frame.sort_values("score", ascending=False, kind="stable").reset_index(
        drop=True
    )


def _summary(frame: pd.DataFrame, n_skipped: int) -> None:
    cols = st.columns(4)
    cols[0].metric("Images scored", f"{len(frame):,}")
    cols[1].metric("Fail", f"{(frame['verdict'] == 'fail').sum():,}")
    cols[2].metric("Pass", f"{(frame['verdict'] == 'pass').sum():,}")
    cols[3].metric("Left out", f"{n_skipped:,}")


def _table(frame: pd.DataFrame) -> None:
    st.dataframe(
        styled_verdicts(frame),
        hide_index=True,
        height=min(400, 38 + 35 * len(frame)),
        column_config={
            "path": st.column_config.TextColumn("image"),
            "score": st.column_config.NumberColumn("score (raw)", format="%.2f"),
            "normalised_score": st.column_config.ProgressColumn(
                "normalised", min_value=0.0, max_value=1.0, format=NORMALISED_FORMAT
            ),
            "verdict": st.column_config.TextColumn("verdict"),
        },
    )
    st.download_button(
        "Download CSV",
        results_csv(frame),
        file_name="padim_batch.csv",
        mime="text/csv",
        icon=":material/download:",
    )
    st.caption("Click a column header to sort. The CSV lists the worst first.")


def results_csv(frame: pd.DataFrame) -> bytes:
    """The results as CSV; paths that a spreadsheet would run are kept text."""
    safe = frame.assign(path=frame["path"].map(spreadsheet_safe))
    return safe.to_csv(index=False, float_format="%.4f").encode()


def _gallery(
    scored: Scored,
    items: list[Item],
    frame: pd.DataFrame,
    scale: Scale,
    pixel: float | None,
) -> None:
    st.subheader("Worst images")
    most = min(48, len(frame))
    count = (
        st.slider(
            "How many", 1, most, min(8, most), key="batch_worst", persist_state=PERSIST
        )
        if most > 1
        else 1
    )
    by_name = {item.name: item for item in items}
    index = {name: i for i, name in enumerate(scored.names)}
    cols = st.columns(GALLERY_COLUMNS)
    for k, row in enumerate(frame.head(count).itertuples()):
        item, i = by_name[row.path], index[row.path]
        with cols[k % GALLERY_COLUMNS]:
            try:
                image = display_image(read_image(item.source(), item.name), 320)
            except ImageError as error:
                st.warning(escape_markdown(error))
                continue
            picture = overlay_picture(image, scored.map(i), scale, 0.5, pixel)
            st.image(picture, width="stretch")
            facts = [f"**{row.verdict.upper()}**", escape_markdown(item.name)]
            facts.append(f"{raw(row.score)} raw")
            if not np.isnan(row.normalised_score):
                facts.append(normalised(row.normalised_score))
            st.caption(" · ".join(facts))


batch_page()
