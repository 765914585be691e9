"""Models page: the saved models, and loading, renaming, deleting, up and down."""

from datetime import datetime

import pandas as pd
import streamlit as st

from app_ui import state
from app_ui.widgets import escape_markdown, flash, raw, show_flash
from padim_core import workspace
from padim_core.model_file import MODEL_SUFFIX, ModelFileError
from padim_core.workspace import ModelEntry

UPLOAD_KEY = "models_upload"
IMPORTED = "models_imported"
CHOSEN_KEY = "models_chosen"


def models_page() -> None:
    """List the workspace's models; act on one; upload a model file."""
    st.title("Models")
    show_flash()
    root = state.workspace_root()
    st.caption(
        f"Models live in `{workspace.models_dir(root).resolve()}` as safetensors "
        "files: statistics and settings, never pickled. Copy them to share them."
    )
    entries = workspace.list_models(root)
    active = workspace.get_active(root)
    if entries:
        st.dataframe(
            models_frame(entries, active),
            hide_index=True,
            width="stretch",
            column_config={
                "active": st.column_config.TextColumn("active", width="small"),
                "created": st.column_config.TextColumn("created", width="medium"),
            },
        )
        _actions(entries, active, root)
    else:
        st.info("No models yet: fit one on the Fit page, or upload a model file.")
    _upload(root)


def models_frame(entries: list[ModelEntry], active: ModelEntry | None) -> pd.DataFrame:
    """One row per model with what its header says."""
    rows = []
    for entry in entries:
        row = {
            "active": "●" if active is not None and entry.path == active.path else "",
            "name": entry.name,
        }
        if entry.error is not None:
            row["problem"] = entry.error
        else:
            row.update(_facts(entry))
        row["MB"] = round(entry.size_bytes / 2**20, 1)
        rows.append(row)
    return pd.DataFrame(rows)


def _facts(entry: ModelEntry) -> dict:
    config, thresholds = entry.config, entry.thresholds
    return {
        "backbone": config.backbone + ("" if config.pre_trained else " (random)"),
        "layers": ", ".join(config.layers),
        "n_features": config.n_features,
        "image size": config.image_size,
        "images": entry.n_images,
        "image threshold": raw(thresholds.image),
        "pixel threshold": raw(thresholds.pixel),
        "created": _local_time(entry.created),
    }


def _local_time(iso: str) -> str:
    """An ISO 8601 time in this machine's time zone, to the minute."""
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso


def _actions(entries: list[ModelEntry], active: ModelEntry | None, root) -> None:
    names = [entry.name for entry in entries]
    index = names.index(active.name) if active is not None else 0
    chosen = st.selectbox("Model", names, index=index, key=CHOSEN_KEY)
    entry = entries[names.index(chosen)]
    is_active = active is not None and entry.path == active.path
    left, middle, _ = st.columns([1, 1, 3])
    if left.button(
        "Make active",
        icon=":material/check:",
        disabled=is_active or entry.error is not None,
        type="primary",
    ):
        workspace.set_active(entry.name, root)
        flash(f"{escape_markdown(entry.name)} is now the active model.")
        st.rerun()
    middle.download_button(
        "Download",
        data=entry.path.read_bytes,
        file_name=entry.path.name,
        mime="application/octet-stream",
        icon=":material/download:",
    )
    _rename(entry, root)
    _delete(entry, root)


def _rename(entry: ModelEntry, root) -> None:
    with st.expander("Rename"):
        new = st.text_input("New name", entry.name, key=f"models_rename_{entry.name}")
        if st.button(
            "Rename", key="models_rename_go", disabled=new.strip() == entry.name
        ):
            try:
                target = workspace.rename_model(entry.name, new, root)
            except (ValueError, FileNotFoundError) as error:
                st.error(escape_markdown(error))
                return
            flash(
                f"Renamed {escape_markdown(entry.name)} to "
                f"{escape_markdown(target.stem)}."
            )
            st.rerun()


def _delete(entry: ModelEntry, root) -> None:
    with st.expander("Delete"):
        sure = st.checkbox(
            f"Yes, delete {escape_markdown(entry.name)} for good",
            key=f"models_sure_{entry.name}",
        )
        if st.button(
            "Delete",
            icon=":material/delete:",
            disabled=not sure,
            key="models_delete_go",
        ):
            workspace.delete_model(entry.name, root)
            flash(f"Deleted {escape_markdown(entry.name)}.")
            st.rerun()


def _upload(root) -> None:
    st.subheader("Upload a model file")
    limits = (
        f"One model file at a time, up to {st.get_option('server.maxUploadSize'):,} "
        "MB; checked before it is stored. Copy larger models into the models "
        "folder directly."
    )
    upload = st.file_uploader(
        f"A {MODEL_SUFFIX} model file written by this app or the command line",
        type=[MODEL_SUFFIX.lstrip(".")],
        key=UPLOAD_KEY,
        help=limits,
    )
    st.caption(limits)
    if upload is None:
        return
    done = st.session_state.setdefault(IMPORTED, {})
    if upload.file_id not in done:
        try:
            entry, note = workspace.import_model(upload.getvalue(), upload.name, root)
        except ModelFileError as error:
            message = f"Not stored: {escape_markdown(error)}"
            done[upload.file_id] = ("error", message, None)
        else:
            stored = f"Stored as {escape_markdown(entry.name)}."
            done[upload.file_id] = (
                ("warning", escape_markdown(note), None)
                if note
                else ("success", stored, entry.name)
            )
        st.rerun()
    kind, message, name = done[upload.file_id]
    getattr(st, kind)(message)
    _offer_activation(name, root)


def _offer_activation(name: str | None, root) -> None:
    """A button that makes the uploaded model active, while it is not yet."""
    active = workspace.get_active(root)
    names = {entry.name for entry in workspace.list_models(root)}
    if name is None or name not in names:
        return
    if active is not None and active.name == name:
        return
    st.button(
        f"Make {escape_markdown(name)} active",
        icon=":material/check:",
        key="models_activate_upload",
        on_click=_activate,
        args=(name, root),
    )


def _activate(name: str, root) -> None:
    """Make ``name`` active and show it in the selector (a button's callback)."""
    workspace.set_active(name, root)
    st.session_state[CHOSEN_KEY] = name
    flash(f"{escape_markdown(name)} is now the active model.")


models_page()
