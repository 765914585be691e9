"""What every page shares: the sidebar, and a run that never shows a traceback."""

from __future__ import annotations

import logging

import streamlit as st

from app_ui import state
from app_ui.scoring import WeightsMissingError
from app_ui.sources import upload_limits
from app_ui.widgets import escape_markdown, model_summary, raw
from padim_core.backbones import WeightsUnavailableError
from padim_core.demo import DemoUnavailableError
from padim_core.images import ImageError
from padim_core.model_file import ModelFileError

logger = logging.getLogger(__name__)

# Errors a user can cause and fix; shown as they are, in words.
EXPECTED_ERRORS = (
    ImageError,
    ModelFileError,
    WeightsUnavailableError,
    WeightsMissingError,
    DemoUnavailableError,
    FileNotFoundError,
    ValueError,
)


def sidebar() -> None:
    """The active model, the device and the limits, on every page."""
    with st.sidebar:
        entry = state.active_model()
        if entry is None:
            st.caption("No model yet.")
        elif entry.error is not None:
            st.error(escape_markdown(entry.error))
        else:
            thresholds = entry.thresholds
            st.markdown(f"**Model:** {escape_markdown(entry.name)}")
            st.caption(
                f"{model_summary(entry)}  \nimage threshold "
                f"{raw(thresholds.image)} · pixel threshold {raw(thresholds.pixel)}"
            )
        devices = state.available_devices()
        st.selectbox(
            "Device",
            devices,
            key=state.DEVICE,
            help="Where the network runs. CUDA and MPS appear when torch finds them.",
        )
        st.caption(f"Workspace: `{state.workspace_root().resolve()}`")
        st.caption(upload_limits())


def run_page(page) -> None:
    """Run a page; errors become messages, never tracebacks."""
    try:
        page.run()
    except EXPECTED_ERRORS as error:
        st.error(escape_markdown(error))
    except Exception as error:
        logger.exception("page %s failed", getattr(page, "title", page))
        st.error(
            f"Something went wrong ({type(error).__name__}: {escape_markdown(error)})"
            ". The details are in the server log; the workspace and its models are "
            "unharmed."
        )
