"""Zip archives in: unpack the image members inside one folder, safely.

An uploaded zip is hostile until shown otherwise. :func:`extract_zip` writes
only image files, only inside the folder it is given, under new flat names;
it never trusts a member's name or declared size, and refuses archives that
would unpack to more than the limits allow.

Whole-archive problems (not a zip, too many members, too many bytes in all)
raise :class:`ArchiveError`; a bad member is skipped with a reason while the
rest is unpacked.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from padim_core.images import IMAGE_EXTENSIONS, MAX_FILE_BYTES, Skipped

logger = logging.getLogger(__name__)

# An inspection upload holds hundreds of images, not tens of thousands; the
# central directory of a bigger archive is itself a way to exhaust memory.
MAX_MEMBERS = 5_000

# Bytes written for one archive, in all.
MAX_TOTAL_BYTES = 2 * 1024**3

# Images are compressed already, so they deflate little; a member that
# deflates more than this is suspect once it is large enough to matter.
MAX_RATIO = 100

# Members smaller than this are never refused for their ratio: a flat BMP
# deflates a thousandfold and still cannot fill a disk.
RATIO_EXEMPT_BYTES = 1024 * 1024

# Archives inside archives are not unpacked (that is how nested bombs work).
ARCHIVE_EXTENSIONS = frozenset({".zip", ".gz", ".tgz", ".tar", ".7z", ".rar", ".xz"})

_CHUNK = 1024 * 1024
_SAFE_CHARACTER = re.compile(r"[^A-Za-z0-9._-]")
_MAX_NAME_LENGTH = 120


class ArchiveError(ValueError):
    """A zip archive refused as a whole, with the reason."""


@dataclass(frozen=True)
class Unpacked:
    """One image member written to disk.

    Attributes:
        member: The member's name inside the archive, as the user knows it.
        path: The file it was written to.
    """

    member: str
    path: Path


def extract_zip(
    source: str | Path | bytes | BinaryIO,
    dest_dir: str | Path,
    max_members: int = MAX_MEMBERS,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_ratio: float = MAX_RATIO,
    max_member_bytes: int = MAX_FILE_BYTES,
    name: str | None = None,
) -> tuple[list[Path], list[Skipped]]:
    """Unpack the image members of a zip archive; return the files written.

    The same as :func:`unpack_zip`, which see, but returns only the paths.
    """
    unpacked, skipped = unpack_zip(
        source,
        dest_dir,
        max_members,
        max_total_bytes,
        max_ratio,
        max_member_bytes,
        name,
    )
    return [item.path for item in unpacked], skipped


def unpack_zip(
    source: str | Path | bytes | BinaryIO,
    dest_dir: str | Path,
    max_members: int = MAX_MEMBERS,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_ratio: float = MAX_RATIO,
    max_member_bytes: int = MAX_FILE_BYTES,
    name: str | None = None,
) -> tuple[list[Unpacked], list[Skipped]]:
    """Unpack the image members of a zip archive into ``dest_dir``.

    Members are written flat, directly in ``dest_dir``: ``a/b/c.png`` becomes
    ``a_b_c.png``, and a name already taken gets ``-1``, ``-2``, ... appended,
    so no file in ``dest_dir`` is ever overwritten. Folders, links, hidden and
    macOS metadata files, nested archives, members whose name climbs out of
    the archive (``../``, absolute paths, drive letters) and non-image
    members are skipped and reported.

    Args:
        source: A path to the archive, its bytes, or a binary file object.
        dest_dir: Folder to write into; created if missing.
        max_members: Most members (files and folders) an archive may list.
        max_total_bytes: Most bytes written for the whole archive.
        max_ratio: Highest uncompressed / compressed size of a member larger
            than :data:`RATIO_EXEMPT_BYTES`.
        max_member_bytes: Largest member, uncompressed.
        name: How to name the archive in messages; defaults to the path.

    Returns:
        The members written with their files, in archive order, and the
        members skipped with the reason (named as in the archive).

    Raises:
        ArchiveError: If the source is not a readable zip archive, lists more
            than ``max_members`` members, or would unpack to more than
            ``max_total_bytes``. Nothing is left in ``dest_dir`` from it, and
            ``dest_dir`` itself is removed if this call created it.
    """
    if name is None:
        name = str(source) if isinstance(source, (str, Path)) else "<upload>"
    dest = Path(dest_dir)
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    dest = dest.resolve(strict=True)
    try:
        return _unpack(
            source,
            dest,
            max_members,
            max_total_bytes,
            max_ratio,
            max_member_bytes,
            name,
        )
    except ArchiveError:
        if created:
            with contextlib.suppress(OSError):
                dest.rmdir()
        raise


def _unpack(
    source: str | Path | bytes | BinaryIO,
    dest: Path,
    max_members: int,
    max_total_bytes: int,
    max_ratio: float,
    max_member_bytes: int,
    name: str,
) -> tuple[list[Unpacked], list[Skipped]]:
    with _open_zip(source, name) as archive:
        members = archive.infolist()
        if len(members) > max_members:
            raise ArchiveError(
                f"{name}: lists {len(members):,} members, more than the limit "
                f"of {max_members:,}"
            )
        declared = sum(member.file_size for member in members)
        if declared > max_total_bytes:
            raise ArchiveError(
                f"{name}: would unpack to {declared:,} bytes, more than the limit "
                f"of {max_total_bytes:,}; refused as a possible zip bomb"
            )
        limits = _Limits(max_total_bytes, max_ratio, max_member_bytes)
        return _extract_members(archive, members, dest, limits, name)


@dataclass
class _Limits:
    """The per-archive limits, and the bytes written so far."""

    total: int
    ratio: float
    member: int
    written: int = 0


def _open_zip(source: str | Path | bytes | BinaryIO, name: str) -> zipfile.ZipFile:
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        return zipfile.ZipFile(source)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as error:
        raise ArchiveError(f"{name}: not a readable zip archive ({error})") from error
    except OSError as error:
        raise ArchiveError(f"{name}: cannot be read ({error.strerror})") from error


def _extract_members(
    archive: zipfile.ZipFile,
    members: list[zipfile.ZipInfo],
    dest: Path,
    limits: _Limits,
    name: str,
) -> tuple[list[Unpacked], list[Skipped]]:
    written: list[Unpacked] = []
    skipped: list[Skipped] = []
    try:
        for member in members:
            if member.is_dir():
                continue
            reason = _refusal(member, limits)
            if reason is None:
                target, out = _create_unique(dest, member.filename)
                written.append(Unpacked(member.filename, target))
                with out:
                    reason = _copy_member(archive, member, out, limits, name)
                if reason is not None:
                    written.pop().path.unlink()
            if reason is not None:
                logger.info("skipped %s in %s: %s", member.filename, name, reason)
                skipped.append(Skipped(member.filename, reason))
    except BaseException:
        for item in written:
            item.path.unlink(missing_ok=True)
        raise
    logger.info("unpacked %d images from %s into %s", len(written), name, dest)
    return written, skipped


def _refusal(member: zipfile.ZipInfo, limits: _Limits) -> str | None:
    """Why ``member`` is not unpacked, from its entry alone; None if it may be."""
    reason = _name_refusal(member.filename)
    if reason is not None:
        return reason
    if stat.S_ISLNK(member.external_attr >> 16):
        return "a symbolic link; links are not unpacked"
    if member.flag_bits & 0x1:
        return "encrypted; encrypted members are not unpacked"
    suffix = PurePosixPath(member.filename).suffix.lower()
    if suffix in ARCHIVE_EXTENSIONS:
        return "an archive inside the archive; nested archives are not unpacked"
    if suffix not in IMAGE_EXTENSIONS:
        return "not an image file extension"
    if member.file_size > limits.member:
        return f"{member.file_size:,} bytes, more than the limit of {limits.member:,}"
    ratio = member.file_size / max(member.compress_size, 1)
    if member.file_size > RATIO_EXEMPT_BYTES and ratio > limits.ratio:
        return (
            f"compressed {ratio:,.0f} to 1, more than the limit of "
            f"{limits.ratio:,.0f} to 1; refused as a possible zip bomb"
        )
    return None


def _name_refusal(filename: str) -> str | None:
    """Why a member name is unsafe or unwanted; None if it is fine."""
    if "\x00" in filename:
        return "the name holds a NUL character"
    parts = filename.replace("\\", "/").split("/")
    if filename.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", filename):
        return "an absolute path; only relative names are unpacked"
    if ".." in parts:
        return "the name climbs out of the archive with '..'"
    hidden = [part for part in parts if part.startswith(".") and part != "."]
    if parts[0] == "__MACOSX" or hidden:
        return "a hidden or macOS metadata file"
    return None


def _flat_name(filename: str) -> str:
    """``a/b/c.png`` -> ``a_b_c.png``, with only safe characters."""
    parts = filename.replace("\\", "/").split("/")
    parts = [part for part in parts if part not in ("", ".")]
    path = PurePosixPath("_".join(parts))
    stem = _SAFE_CHARACTER.sub("_", path.stem)[:_MAX_NAME_LENGTH] or "image"
    return stem + path.suffix.lower()


def _create_unique(dest: Path, filename: str) -> tuple[Path, BinaryIO]:
    """Create a new file in ``dest`` named after ``filename``; never overwrite.

    Creation is exclusive, so an existing file or link of the same name, even
    one made meanwhile by another upload, makes the next name be tried.
    """
    flat = PurePosixPath(_flat_name(filename))
    candidate, k = dest / flat.name, 0
    while True:
        try:
            return candidate, open(candidate, "xb")
        except FileExistsError:
            k += 1
            candidate = dest / f"{flat.stem}-{k}{flat.suffix}"


def _copy_member(
    archive: zipfile.ZipFile,
    member: zipfile.ZipInfo,
    out: BinaryIO,
    limits: _Limits,
    name: str,
) -> str | None:
    """Stream ``member`` into ``out``, counting the bytes actually inflated.

    A member's declared size can lie, so the copy stops as soon as it passes
    the declared size, the member limit or the archive's total limit.

    Returns:
        None if the member was written, else why it was not.

    Raises:
        ArchiveError: If the archive's total limit is passed.
    """
    allowed = min(member.file_size, limits.member)
    copied = 0
    try:
        with archive.open(member) as inflating:
            while chunk := inflating.read(_CHUNK):
                copied += len(chunk)
                limits.written += len(chunk)
                if limits.written > limits.total:
                    raise ArchiveError(
                        f"{name}: unpacks to more than the limit of "
                        f"{limits.total:,} bytes; refused as a possible zip bomb"
                    )
                if copied > allowed:
                    raise _Oversize
                out.write(chunk)
    except _Oversize:
        return "inflates to more than its declared size; refused as a zip bomb"
    except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError) as error:
        return f"cannot be unpacked ({error})"
    return None


class _Oversize(Exception):
    """A member inflated past the bytes it is allowed."""
