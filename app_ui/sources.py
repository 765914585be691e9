"""Where images come from: the demo set, uploaded files, zips and folders.

Every image becomes an :class:`Item`: the name the user knows, a key that
identifies its content for the caches, and a way to read it. Zips are
unpacked once per upload, inside the workspace at
``<workspace>/uploads/<upload id>``, by :func:`padim_core.archives.unpack_zip`,
which refuses unsafe members. A folder is removed when its zip leaves the
uploader or is the least recently used of more than :data:`MAX_UNPACKED`, but
never while a fit still reads it; folders a day old that no upload of this
server owns (left by an earlier run) are swept away.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import streamlit as st
from streamlit.runtime.uploaded_file_manager import UploadedFile

from app_ui import state
from app_ui.state import PERSIST
from padim_core import workspace
from padim_core.archives import MAX_TOTAL_BYTES, ArchiveError, unpack_zip
from padim_core.images import IMAGE_EXTENSIONS, Skipped
from padim_core.workspace import ModelEntry

# What the uploaders accept; anything else never reaches the app.
UPLOAD_TYPES = sorted(ext.lstrip(".") for ext in IMAGE_EXTENSIONS) + ["zip"]

# Streamlit limits the size of each file (server.maxUploadSize in
# .streamlit/config.toml) but not their number; the app does. A zip counts
# as its members, so one archive cannot carry more.
MAX_UPLOAD_FILES = 2_000

# Unpacked zips kept on disk at once; the least recently used go first.
MAX_UNPACKED = 32


def upload_limits() -> str:
    """The upload limits in words, as every uploader states them."""
    return (
        f"Up to {st.get_option('server.maxUploadSize'):,} MB per file and "
        f"{MAX_UPLOAD_FILES:,} files per upload; a zip counts as the files inside "
        f"it and may unpack to at most {MAX_TOTAL_BYTES / 2**30:g} GB."
    )


DEMO = "Demo set"
FILES = "Upload files or a zip"
FOLDER = "Upload a folder"


@dataclass(frozen=True)
class Item:
    """One image to read.

    Attributes:
        name: How the user knows the image: a file name, a path inside a zip
            or folder, or a demo file name.
        key: Identifies the content, for caches (an upload's id, or a path).
        path: The file on disk, for demo images and unpacked zips.
        upload: The uploaded file, for plain uploads.
    """

    name: str
    key: str
    path: Path | None = None
    upload: UploadedFile | None = field(default=None, compare=False, repr=False)

    def source(self) -> Path | bytes:
        """What :mod:`padim_core` reads: the path, or the upload's bytes."""
        if self.path is not None:
            return self.path
        return self.upload.getvalue()

    def pair(self) -> tuple[str, Path | bytes]:
        """``(name, source)``, as :meth:`padim_core.model.Padim.fit` takes."""
        return self.name, self.source()


DEMO_KEY_PREFIX = "demo:"


def demo_items(paths: Sequence[Path]) -> list[Item]:
    """Items of demo image files."""
    return [Item(path.name, f"{DEMO_KEY_PREFIX}{path}", path=path) for path in paths]


def is_demo(items: Sequence[Item]) -> bool:
    """Whether the items are demo images."""
    return bool(items) and all(item.key.startswith(DEMO_KEY_PREFIX) for item in items)


@dataclass
class _Unpacked:
    """One uploaded zip: its folder, what came out of it, who still reads it."""

    folder: Path
    lock: threading.Lock = field(default_factory=threading.Lock)
    items: list[Item] | None = None
    skipped: list[Skipped] = field(default_factory=list)
    refusal: str | None = None
    readers: int = 0
    dropped: bool = False
    used: float = field(default_factory=time.monotonic)


@dataclass
class _Unpacks:
    """Every unpacked zip of this server, by folder."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    entries: dict[Path, _Unpacked] = field(default_factory=dict)

    def get(self, folder: Path) -> _Unpacked:
        """The entry of ``folder``, new if needed; old ones make room."""
        with self.lock:
            entry = self.entries.get(folder)
            if entry is None:
                entry = self.entries[folder] = _Unpacked(folder)
            entry.dropped = False  # back in an uploader, e.g. after eviction
            entry.used = time.monotonic()
            idle = [e for e in self.entries.values() if e is not entry]
            idle = sorted((e for e in idle if not e.readers), key=lambda e: e.used)
            evicted = idle[: max(0, len(self.entries) - MAX_UNPACKED)]
        for old in evicted:
            self.drop(old.folder)
        return entry

    def folders(self) -> list[Path]:
        """The folders this server still owns."""
        with self.lock:
            return list(self.entries)

    def drop(self, folder: Path) -> None:
        """Remove ``folder`` now, or once the last fit reading it ends."""
        with self.lock:
            entry = self.entries.get(folder)
            if entry is None:
                return
            entry.dropped = True
            if entry.readers:
                return
            del self.entries[folder]
        with entry.lock:  # lets an unpacking in progress finish first
            shutil.rmtree(folder, ignore_errors=True)

    def hold(self, folders: Iterable[Path]) -> list[Path]:
        """Keep ``folders`` while a fit reads them; returns those held."""
        with self.lock:
            held = [path for path in set(folders) if path in self.entries]
            for path in held:
                self.entries[path].readers += 1
        return held

    def release(self, folders: Iterable[Path]) -> None:
        """Let ``folders`` go again; dropped ones are removed now."""
        gone = []
        with self.lock:
            for path in folders:
                entry = self.entries.get(path)
                if entry is not None:
                    entry.readers -= 1
                    if entry.dropped and not entry.readers:
                        gone.append(path)
        for path in gone:
            self.drop(path)


@st.cache_resource
def _unpacks() -> _Unpacks:
    return _Unpacks()


@st.cache_resource(show_spinner=False)
def _swept(root: str) -> bool:
    """Sweep stale upload folders once per server start and workspace."""
    workspace.remove_stale_uploads(root, keep=_unpacks().folders())
    return True


def _upload_folder(root: Path, file_id: str) -> Path:
    safe_id = re.sub(r"[^A-Za-z0-9_-]", "_", file_id)
    return (workspace.uploads_dir(root) / safe_id).resolve()


def _unpacked(upload: UploadedFile, root: Path) -> tuple[list[Item], list[Skipped]]:
    """Unpack one uploaded zip, once per upload, into its own folder.

    Raises:
        ArchiveError: If the zip is refused as a whole (remembered, so a
            rerun does not try again).
    """
    entry = _unpacks().get(_upload_folder(root, upload.file_id))
    with entry.lock:
        if entry.refusal is not None:
            raise ArchiveError(entry.refusal)
        if entry.items is None or not entry.folder.is_dir():
            _unpack_into(entry, upload)
            fresh = True
        else:
            fresh = False
    if fresh:
        workspace.remove_stale_uploads(root, keep=_unpacks().folders())
    return list(entry.items), list(entry.skipped)


def _unpack_into(entry: _Unpacked, upload: UploadedFile) -> None:
    shutil.rmtree(entry.folder, ignore_errors=True)  # a run cut short
    try:
        written, skipped = unpack_zip(
            upload.getvalue(),
            entry.folder,
            max_members=MAX_UPLOAD_FILES,
            name=upload.name,
        )
    except ArchiveError as error:
        entry.refusal = str(error)
        raise
    except OSError as error:  # e.g. a full disk; worth another try later
        shutil.rmtree(entry.folder, ignore_errors=True)
        raise ArchiveError(
            f"{upload.name}: cannot be unpacked here ({error.strerror or error})"
        ) from error
    entry.items = [
        Item(
            f"{upload.name}/{one.member}",
            f"{upload.file_id}/{one.member}",
            path=one.path,
        )
        for one in written
    ]
    entry.skipped = [
        Skipped(f"{upload.name}/{one.name}", one.reason) for one in skipped
    ]


def hold_uploads(items: Iterable[Item]) -> list[Path]:
    """Keep the unpacked zips of ``items`` on disk until released.

    A fit holds its images' folders, so replacing the upload meanwhile
    does not pull files from under it.
    """
    folders = [item.path.parent.resolve() for item in items if item.path]
    return _unpacks().hold(folders)


def release_uploads(folders: Iterable[Path]) -> None:
    """Let go of folders held by :func:`hold_uploads`."""
    _unpacks().release(folders)


def _is_zip(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() == ".zip"


def upload_items(files: Sequence[UploadedFile]) -> tuple[list[Item], list[Skipped]]:
    """Items of uploaded files; zips are unpacked, refused parts reported.

    More than :data:`MAX_UPLOAD_FILES` files, zip members counted, are
    refused as a whole with an error on the page: a partly used lot would
    mislead.
    """
    if len(files) > MAX_UPLOAD_FILES:
        _too_many(f"{len(files):,} files")
        return [], []
    root = state.workspace_root()
    items: list[Item] = []
    skipped: list[Skipped] = []
    for upload in files:
        if not _is_zip(upload.name):
            items.append(Item(upload.name, upload.file_id, upload=upload))
            continue
        try:
            inner, refused = _unpacked(upload, root)
        except ArchiveError as error:
            skipped.append(Skipped(upload.name, str(error)))
            continue
        items.extend(inner)
        skipped.extend(refused)
        if len(items) > MAX_UPLOAD_FILES:
            _too_many(f"more than {MAX_UPLOAD_FILES:,} images once unpacked")
            return [], []
    return _unique_names(items), skipped


def _too_many(what: str) -> None:
    st.error(
        f"This upload holds {what}; the limit is {MAX_UPLOAD_FILES:,} files per "
        "upload, a zip counting as the files inside it. None of it was used: "
        "upload fewer at a time."
    )


def _unique_names(items: list[Item]) -> list[Item]:
    """Give repeated names a ``(2)``, ``(3)``, ... so every name is distinct."""
    seen: dict[str, int] = {}
    unique = []
    for item in items:
        count = seen.get(item.name, 0) + 1
        seen[item.name] = count
        if count > 1:
            item = Item(f"{item.name} ({count})", item.key, item.path, item.upload)
        unique.append(item)
    return unique


def uploader(label: str, key: str, folder: bool = False) -> list[UploadedFile]:
    """A file (or folder) uploader for images and zips, with its limits stated.

    The files are kept in the session, so they are still used after a visit
    to another page (which empties the uploader) until the user clears them.

    Returns:
        The files. Zips that left the uploader since the last run have their
        unpacked folders removed.
    """
    shown_before = key in st.session_state
    files = st.file_uploader(
        label,
        type=UPLOAD_TYPES,
        accept_multiple_files="directory" if folder else True,
        key=key,
        help=upload_limits(),
    )
    st.caption(upload_limits())
    files = list(files or [])
    kept = st.session_state.setdefault(state.KEPT_UPLOADS, {})
    previous, restored = kept.get(key, ([], False))
    if files or (shown_before and not restored):
        kept[key] = (files, False)  # the user's own choice, an empty one too
    elif previous:
        kept[key] = (previous, True)
        files = list(previous)
        _kept_note(key, len(files))
    _forget_replaced(key, files)
    return files


def _kept_note(key: str, count: int) -> None:
    note, clear = st.columns([4, 1], vertical_alignment="center")
    note.info(
        f"Using {count:,} uploaded file{'s' if count != 1 else ''} (from previous "
        "visit). Upload others above to replace them.",
        icon=":material/history:",
    )
    clear.button(
        "Clear", key=f"{key}_clear", on_click=clear_kept, args=(key,), width="stretch"
    )


def clear_kept(key: str) -> None:
    """Forget the files kept for the uploader ``key`` (a callback)."""
    st.session_state.setdefault(state.KEPT_UPLOADS, {}).pop(key, None)


def _forget_replaced(key: str, files: Sequence[UploadedFile]) -> None:
    """Remove the unpacked folders of zips no longer in the uploader ``key``."""
    root = state.workspace_root()
    _swept(str(root.absolute()))
    zips = {_upload_folder(root, f.file_id) for f in files if _is_zip(f.name)}
    known = st.session_state.setdefault(state.UPLOADED_ZIPS, {})
    for folder in known.get(key, set()) - zips:
        _unpacks().drop(folder)
    known[key] = zips


def default_source(choices: Sequence[str], model: ModelEntry | None) -> str:
    """The demo for models fitted on it (or not saying); else the first upload."""
    if DEMO in choices and state.fitted_on_demo(model) is not False:
        return DEMO
    return next(choice for choice in choices if choice != DEMO)


def demo_mismatch_note(model: ModelEntry | None) -> None:
    """Say so when the demo cells are not what ``model`` was fitted on."""
    if state.fitted_on_demo(model) is False:
        st.info(
            "This model was not fitted on the demo's solar cells, so the demo "
            "images look anomalous to it everywhere. Upload images of the parts "
            "it was fitted on instead.",
            icon=":material/info:",
        )


def pick_images(
    key: str,
    demo_label: str,
    demo_paths: Callable[[], Sequence[Path]] | None,
    upload_label: str = "Images of parts",
    model: ModelEntry | None = None,
) -> tuple[list[Item], list[Skipped]]:
    """Let the user take the demo images, or upload files, a zip or a folder.

    Args:
        key: Prefix of the widgets' keys, unique per page.
        demo_label: What the demo choice holds, in words.
        demo_paths: Returns the demo images; None hides the demo choice.
        upload_label: Label of the uploader.
        model: The model the images are for; one not fitted on the demo
            starts on the uploader and warns when the demo is chosen.

    Returns:
        The images, and the uploaded files left out with the reason.
    """
    choices = ([DEMO] if demo_paths is not None else []) + [FILES, FOLDER]
    choice = st.radio(
        "Images",
        choices,
        index=choices.index(default_source(choices, model)),
        horizontal=True,
        key=f"{key}_source",
        persist_state=PERSIST,
        captions=[demo_label] * (demo_paths is not None) + ["", ""],
    )
    if choice == DEMO:
        demo_mismatch_note(model)
        return demo_items(demo_paths()), []
    files = uploader(upload_label, f"{key}_{choice}", folder=choice == FOLDER)
    return upload_items(files)
