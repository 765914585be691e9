"""Small widgets that several pages share: headers, badges, notices, numbers."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import pandas as pd
import streamlit as st

from app_ui.state import FLASH
from padim_core.images import Skipped
from padim_core.workspace import ModelEntry

# The page scripts. Their folder is not called pages/: Streamlit would treat
# such a folder as an old-style multipage app on a server's first run (and
# in every AppTest run), bypassing the routing of app.py.
FIT_PAGE = "app_pages/fit.py"
INSPECT_PAGE = "app_pages/inspect.py"
THRESHOLDS_PAGE = "app_pages/thresholds.py"
BATCH_PAGE = "app_pages/batch.py"
MODELS_PAGE = "app_pages/models.py"

# How many skipped files are listed by name before the rest is counted.
MAX_LISTED = 200

# Warnings shown one by one; the rest are listed in an expander.
MAX_WARNINGS_SHOWN = 5

# ASCII punctuation, every character of which CommonMark lets a backslash
# make literal; control characters, which could start a new block.
_MARKDOWN_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")

# Where GitHub-flavoured markdown finds links in plain text, after escapes are
# undone: ``http(s)://``, ``www.`` and ``name@host``. An invisible word
# joiner (U+2060) in the middle keeps each of them text.
_BARE_LINKS = re.compile(r"(?i)(https?:)(//)|(www)(\.)|(@)()")
_WORD_JOINER = "\u2060"


def escape_markdown(text: object) -> str:
    """``text`` shown as itself where Streamlit renders markdown.

    File names, zip members, model files' contents and the errors that quote
    them come from users. Unescaped, ``[Click here](https://evil)`` becomes a
    live link, ``:red[...]`` colours text and ``**`` makes it bold. Every
    ASCII punctuation mark gets a backslash (links, emphasis, HTML, LaTeX,
    Streamlit's directives), bare URLs and e-mail addresses an invisible
    word joiner, and control characters become spaces.
    """
    text = _CONTROL_CHARACTERS.sub(" ", str(text))
    text = _BARE_LINKS.sub(_join, text)
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", text)


def _join(match: re.Match) -> str:
    head, tail = (part for part in match.groups() if part is not None)
    return head + _WORD_JOINER + tail


def time_left_text(
    label: str,
    done: int,
    total: int,
    elapsed: float,
    shown: tuple[int, int] | None = None,
    unit: str = "images",
) -> str:
    """``Label: 12 of 120 images · 8 s · about 40 s left``.

    ``shown`` replaces the counts in the words, for a job that reads its
    images more than once: (done, total) of the current pass, while the time
    left still comes from the whole job's ``done`` and ``total``. ``unit``
    names what is counted, in the plural.
    """
    done_shown, total_shown = shown or (done, total)
    text = f"{label}: {done_shown:,} of {total_shown:,} {unit} · {duration(elapsed)}"
    if 0 < done < total:
        text += f" · about {duration(elapsed / done * (total - done))} left"
    return text


def duration(seconds: float) -> str:
    """Seconds in words a person reads at a glance: ``45 s``, ``3 min 5 s``."""
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def raw(value: float | None) -> str:
    """A raw Mahalanobis distance, to a useful precision."""
    if value is None or not math.isfinite(value):
        return "not set"
    return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"


# printf format of a normalised score in tables; :func:`normalised` agrees.
NORMALISED_FORMAT = "%.2f"


def normalised(value: float) -> str:
    """A normalised score (0 to 1, threshold at 0.5), as every page shows it."""
    return NORMALISED_FORMAT % float(value)


def percent(value: float) -> str:
    """A rate as a percentage; ``n/a`` when undefined."""
    return "n/a" if not math.isfinite(value) else f"{100 * value:.1f} %"


# A cell that starts with one of these is a formula to a spreadsheet.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(text: str) -> str:
    """``text`` for a CSV cell that a spreadsheet shows and never evaluates.

    A file named ``=HYPERLINK("https://evil", "ok").png`` would otherwise run
    as a formula where the CSV is opened; a leading single quote keeps it text.
    """
    return f"'{text}" if text.startswith(FORMULA_STARTS) else text


def verdict_badge(verdict: str) -> None:
    """A coloured PASS / FAIL badge."""
    if verdict == "fail":
        st.badge("FAIL", icon=":material/cancel:", color="red")
    elif verdict == "pass":
        st.badge("PASS", icon=":material/check_circle:", color="green")
    else:
        st.badge("NO THRESHOLD", icon=":material/help:", color="gray")


VERDICT_STYLES = {
    "fail": "color: #c62828; font-weight: 600",
    "pass": "color: #2e7d32",
    "unset": "color: #757575",
}


def styled_verdicts(frame: pd.DataFrame, column: str = "verdict"):
    """``frame`` with its verdicts coloured, for ``st.dataframe``."""
    return frame.style.map(lambda value: VERDICT_STYLES.get(value, ""), subset=[column])


def model_summary(entry: ModelEntry) -> str:
    """One line about a model: backbone, layers, channels, size, images."""
    config = entry.config
    return (
        f"{config.backbone} · {', '.join(config.layers)} · {config.n_features} "
        f"channels · {config.image_size} px · {entry.n_images:,} training images"
    )


def require_model(entry: ModelEntry | None) -> ModelEntry:
    """Show the active model, or explain how to get one and stop the page."""
    if entry is None:
        st.info("No model yet. Fit one on good images first, or upload a model file.")
        col_fit, col_models = st.columns(2)
        col_fit.page_link(
            FIT_PAGE, label="Fit a model", icon=":material/model_training:"
        )
        col_models.page_link(
            MODELS_PAGE, label="Upload a model", icon=":material/upload:"
        )
        st.stop()
    if entry.error is not None:
        st.error(f"The active model cannot be used: {escape_markdown(entry.error)}")
        st.page_link(
            MODELS_PAGE, label="Choose another model", icon=":material/inventory_2:"
        )
        st.stop()
    st.caption(f"Model **{escape_markdown(entry.name)}** · {model_summary(entry)}")
    return entry


def report_skipped(skipped: Sequence[Skipped], what: str = "files") -> None:
    """Warn about files left out, naming each with the reason.

    ``what`` is the plural of what they are (files, images, masks).
    """
    if not skipped:
        return
    if len(skipped) == 1:
        told = f"1 {what.removesuffix('s')} could not be used and was left out"
    else:
        told = f"{len(skipped):,} {what} could not be used and were left out"
    st.warning(f"{told}; everything else went on.")
    with st.expander(f"Files left out ({len(skipped):,})"):
        rows = [{"file": item.name, "reason": item.reason} for item in skipped]
        if len(rows) > MAX_LISTED:
            st.caption(f"The first {MAX_LISTED} of {len(rows):,}.")
        st.dataframe(pd.DataFrame(rows[:MAX_LISTED]), hide_index=True)


def show_warnings(messages: Sequence[str]) -> None:
    """Show warnings (plain text, not markdown); many are listed in an expander."""
    for message in messages[:MAX_WARNINGS_SHOWN]:
        st.warning(escape_markdown(message))
    if len(messages) > MAX_WARNINGS_SHOWN:
        with st.expander(f"All {len(messages):,} warnings"):
            st.text("\n".join(messages))


def flash(message: str, kind: str = "success") -> None:
    """Keep a message to show once on the next run (see :func:`show_flash`)."""
    st.session_state[FLASH] = (kind, message)


def show_flash() -> None:
    """Show and forget the message kept by :func:`flash`."""
    kept = st.session_state.pop(FLASH, None)
    if kept is not None:
        kind, message = kept
        getattr(st, kind)(message)
