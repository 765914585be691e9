"""Session-state keys, the workspace, the active model and the device.

Every key the app keeps in ``st.session_state`` is a constant here, so pages
never spell one twice. What must survive a refresh (models, thresholds, the
active model) lives in the workspace folder instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import streamlit as st
import torch

from padim_core import demo, workspace
from padim_core.model import Thresholds
from padim_core.workspace import ModelEntry

# Widgets that keep their value while the user visits other pages.
PERSIST = "session"

# Compute device chosen in the sidebar.
DEVICE = "device"
# Thresholds being tried out, per model fingerprint, before they are saved.
WORKING_THRESHOLDS = "working_thresholds"
# The fit started from this session (a FitJob id).
FIT_JOB = "fit_job"
# Index of the image shown on the Inspect page.
INSPECT_SELECTED = "inspect_selected"
# The items the Batch page was asked to score (their cache keys).
BATCH_REQUEST = "batch_request"
# A message to show once after a rerun, e.g. after deleting a model.
FLASH = "flash"
# The unpacked zip folders of each uploader (by widget key), to remove a
# folder once its zip leaves the uploader.
UPLOADED_ZIPS = "uploaded_zips"
# The files of each uploader (by widget key) and whether they were restored
# after a visit to another page: Streamlit forgets the state of widgets a page
# does not show.
KEPT_UPLOADS = "kept_uploads"
# The last scoring of the Batch page: (request, scored, items).
BATCH_RESULTS = "batch_results"
# Where each threshold being tried came from, per model fingerprint: the
# validation set it was suggested for or chosen on (see THRESHOLD_START).
# A threshold not listed was saved, or chosen on a page without such a set.
THRESHOLD_ORIGINS = "threshold_origins"
# The origin of a slider's first value on a page without a validation set (a
# guess from the images shown there), so a validation set replaces it.
THRESHOLD_START = "start"


def workspace_root() -> Path:
    """The workspace folder, read from the environment on every run."""
    return workspace.workspace_dir()


def available_devices() -> list[str]:
    """Devices torch can use here: always ``cpu``, then ``cuda`` and ``mps``."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def device() -> str:
    """The device chosen in the sidebar, ``cpu`` until one is chosen."""
    chosen = st.session_state.get(DEVICE, "cpu")
    return chosen if chosen in available_devices() else "cpu"


def active_model() -> ModelEntry | None:
    """The workspace's active model, or None when there is none."""
    return workspace.get_active(workspace_root())


def working_thresholds(entry: ModelEntry) -> Thresholds:
    """The thresholds being tried for ``entry``; the saved ones to start with."""
    tried = st.session_state.setdefault(WORKING_THRESHOLDS, {})
    saved = entry.thresholds or Thresholds()
    return tried.get(entry.fingerprint, saved)


def set_working_thresholds(entry: ModelEntry, **values: float | None) -> Thresholds:
    """Change some of the thresholds being tried for ``entry``."""
    updated = replace(working_thresholds(entry), **values)
    st.session_state.setdefault(WORKING_THRESHOLDS, {})[entry.fingerprint] = updated
    return updated


def forget_working_thresholds(entry: ModelEntry) -> None:
    """Drop the tried thresholds of ``entry``, e.g. once they are saved."""
    st.session_state.setdefault(WORKING_THRESHOLDS, {}).pop(entry.fingerprint, None)
    st.session_state.setdefault(THRESHOLD_ORIGINS, {}).pop(entry.fingerprint, None)


def thresholds_changed(entry: ModelEntry) -> bool:
    """Whether the thresholds being tried differ from the saved ones."""
    return working_thresholds(entry) != (entry.thresholds or Thresholds())


def threshold_origin(entry: ModelEntry, which: str) -> str | None:
    """Where the ``which`` threshold being tried for ``entry`` came from.

    Returns:
        The validation set's id, :data:`THRESHOLD_START`, or None for a value
        that was saved or chosen without a validation set.
    """
    origins = st.session_state.setdefault(THRESHOLD_ORIGINS, {})
    return origins.get(entry.fingerprint, {}).get(which)


def set_threshold_origin(entry: ModelEntry, which: str, origin: str | None) -> None:
    """Record where the ``which`` threshold being tried for ``entry`` came from."""
    origins = st.session_state.setdefault(THRESHOLD_ORIGINS, {})
    origins.setdefault(entry.fingerprint, {})[which] = origin


def fitted_on_demo(entry: ModelEntry | None) -> bool | None:
    """Whether ``entry`` was fitted on the demo cells; None when not recorded.

    The app records the images' source (``demo`` or ``upload``). The command
    line records the training folder instead: the demo cells lie inside the
    demo's Python package, so a folder outside it held other images.
    """
    info = entry.info if entry is not None else {}
    if info.get("source") is not None:
        return info["source"] == "demo"
    if info.get("train_dir") is None:
        return None
    folder = Path(str(info["train_dir"]))
    return demo.DEMO_PACKAGE in folder.parts + folder.resolve().parts


def model_key(entry: ModelEntry) -> str:
    """A short id of the model's statistics, for widget keys."""
    return hashlib.sha1(entry.fingerprint.encode()).hexdigest()[:12]
