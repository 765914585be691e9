"""Where images come from: the demo set, uploaded files, zips and folders.

Every image becomes an :class:`Item`: the name the user knows, a key that
identifies its content for the caches, and a way to read it. Zips are
unpacked once per upload into a temporary folder by
:func:`padim_core.archives.extract_zip`, which refuses unsafe members.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import streamlit as st
from streamlit.runtime.uploaded_file_manager import UploadedFile

from app_ui.state import PERSIST
from padim_core.archives import ArchiveError, unpack_zip
from padim_core.images import IMAGE_EXTENSIONS, Skipped

# What the uploaders accept; anything else never reaches the app.
UPLOAD_TYPES = sorted(ext.lstrip(".") for ext in IMAGE_EXTENSIONS) + ["zip"]

# Stated in the app; the server's limit is server.maxUploadSize in
# .streamlit/config.toml.
UPLOAD_LIMIT_TEXT = (
    "Up to 200 MB per file. A zip is unpacked on the server: images only, at "
    "most 5,000 members and 2 GB in all."
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


@st.cache_resource
def _upload_root() -> tempfile.TemporaryDirectory:
    """A folder for unpacked zips, removed when the server stops."""
    return tempfile.TemporaryDirectory(prefix="padim-uploads-")


@st.cache_resource(max_entries=32, show_spinner=False)
def _unpacked(
    file_id: str, name: str, _data: bytes
) -> tuple[list[Item], list[Skipped]]:
    """Unpack one uploaded zip, once per upload, into its own folder."""
    folder = Path(_upload_root().name) / re.sub(r"[^A-Za-z0-9_-]", "_", file_id)
    written, skipped = unpack_zip(_data, folder, name=name)
    items = [
        Item(f"{name}/{one.member}", f"{file_id}/{one.member}", path=one.path)
        for one in written
    ]
    skipped = [Skipped(f"{name}/{item.name}", item.reason) for item in skipped]
    return items, skipped


def upload_items(files: Sequence[UploadedFile]) -> tuple[list[Item], list[Skipped]]:
    """Items of uploaded files; zips are unpacked, refused parts reported."""
    items: list[Item] = []
    skipped: list[Skipped] = []
    for upload in files:
        if PurePosixPath(upload.name).suffix.lower() == ".zip":
            try:
                inner, refused = _unpacked(
                    upload.file_id, upload.name, upload.getvalue()
                )
            except ArchiveError as error:
                skipped.append(Skipped(upload.name, str(error)))
                continue
            items.extend(inner)
            skipped.extend(refused)
        else:
            items.append(Item(upload.name, upload.file_id, upload=upload))
    return _unique_names(items), skipped


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
    """A file (or folder) uploader for images and zips; returns the files."""
    files = st.file_uploader(
        label,
        type=UPLOAD_TYPES,
        accept_multiple_files="directory" if folder else True,
        key=key,
        help=UPLOAD_LIMIT_TEXT,
    )
    return list(files or [])


def pick_images(
    key: str,
    demo_label: str,
    demo_paths: Callable[[], Sequence[Path]] | None,
    upload_label: str = "Images of parts",
) -> tuple[list[Item], list[Skipped]]:
    """Let the user take the demo images, or upload files, a zip or a folder.

    Args:
        key: Prefix of the widgets' keys, unique per page.
        demo_label: What the demo choice holds, in words.
        demo_paths: Returns the demo images; None hides the demo choice.
        upload_label: Label of the uploader.

    Returns:
        The images, and the uploaded files left out with the reason.
    """
    choices = ([DEMO] if demo_paths is not None else []) + [FILES, FOLDER]
    choice = st.radio(
        "Images",
        choices,
        horizontal=True,
        key=f"{key}_source",
        persist_state=PERSIST,
        captions=[demo_label] * (demo_paths is not None) + ["", ""],
    )
    if choice == DEMO:
        return demo_items(demo_paths()), []
    files = uploader(upload_label, f"{key}_{choice}", folder=choice == FOLDER)
    return upload_items(files)
