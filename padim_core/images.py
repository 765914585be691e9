"""Images in: decode and check one file at a time, then resize and normalise.

Any size and mode Pillow reads becomes an RGB image; a file that cannot be
used raises :class:`ImageError` naming the file and the reason, so callers can
skip it and go on with the rest.

Only the formats of :data:`IMAGE_EXTENSIONS` are decoded, whatever a file's
name says: Pillow can open many rarer formats, some through outside programs
(EPS runs Ghostscript), and none of them is needed for inspection images.
"""

from __future__ import annotations

import functools
import io
import logging
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm"}
)

# Pillow formats decoded, matching the extensions above (JPEG includes the
# multi-picture variant some cameras write; PPM also reads PGM, PBM and PFM).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "DIB", "TIFF", "WEBP", "GIF", "PPM")

# ImageNet statistics that every backbone here was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_IMAGE_SIZE = 256

# Larger images are refused before decoding: 8000 x 8000 is far beyond any
# inspection camera here and would take gigabytes once decoded.
MAX_PIXELS = 64_000_000

# Below this side length an image holds too little to inspect.
MIN_SIDE = 8

# Files larger than this are refused before reading.
MAX_FILE_BYTES = 200 * 1024 * 1024

# Why a file is refused when none of the accepted formats can open it. Rarer
# formats are not even identified, so their parsers never see uploads.
_NOT_ACCEPTED = (
    "not an image, or not in an accepted format (PNG, JPEG, BMP, TIFF, WebP, GIF, PPM)"
)

_INTEGER_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageError(ValueError):
    """A file that cannot be used as an image.

    Attributes:
        name: The file's name or path as the user knows it.
        reason: What is wrong, in words.
    """

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class ImageWarning(UserWarning):
    """An image was used, but something about it deserves a look.

    For example only the first of several frames was used, or the image is
    one flat colour.
    """


@dataclass(frozen=True)
class Skipped:
    """A file left out, and why."""

    name: str
    reason: str


def _to_8bit_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB with a fixed, per-mode rule."""
    if image.mode in _INTEGER_GREY_MODES:
        # Integer greyscale: 16-bit range to 8 bits, the same for every image.
        array = np.asarray(image, dtype=np.float32)
        array = np.clip(array / 257.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "F":
        array = np.nan_to_num(np.asarray(image, dtype=np.float32), posinf=0, neginf=0)
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        array = np.clip(array * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        # Transparent pixels become black, the same for every image.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def read_image(
    source: str | Path | bytes | BinaryIO,
    name: str | None = None,
    *,
    warn_flat: bool = True,
) -> Image.Image:
    """Decode one image file into an RGB Pillow image.

    Args:
        source: A path, the file's bytes, or a binary file object.
        name: How to name the file in messages; defaults to the path.
        warn_flat: Warn when the image is one flat colour (False for masks,
            where that is normal).

    Returns:
        The image in RGB, upright (EXIF orientation applied), first frame only.

    Raises:
        ImageError: If the file is empty, too large, not an image, of a format
            not accepted, truncated, or too small to inspect.

    Warns:
        ImageWarning: If the file has several frames, or is one flat colour
            (unless ``warn_flat`` is False).
    """
    if name is None:
        name = str(source) if isinstance(source, (str, Path)) else "<upload>"
    data = _read_bytes(source, name)
    if len(data) == 0:
        raise ImageError(name, "the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            rgb, frames = _decode(name, data)
    except ImageError:
        raise
    except UnidentifiedImageError as error:
        raise ImageError(name, _NOT_ACCEPTED) from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(
            name,
            f"more than {Image.MAX_IMAGE_PIXELS:,} pixels; refused as a possible "
            "decompression bomb",
        ) from error
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as error:
        raise ImageError(name, f"the image cannot be decoded ({error})") from error
    if frames > 1:
        _warn(f"{name}: has {frames} frames; only the first is used")
    if warn_flat and _is_flat(rgb):
        _warn(f"{name}: the image is one flat colour")
    return rgb


def _decode(name: str, data: bytes) -> tuple[Image.Image, int]:
    """Open, check and decode ``data``; return the RGB image and its frames."""
    with Image.open(io.BytesIO(data), formats=_pillow_formats()) as opened:
        width, height = opened.size
        _check_size(name, width, height)
        frames = getattr(opened, "n_frames", 1)
        opened.load()
        image = ImageOps.exif_transpose(opened) or opened
        return _to_8bit_rgb(image), frames


@functools.cache
def _pillow_formats() -> tuple[str, ...]:
    """The accepted formats this Pillow build can open (WebP may be missing)."""
    Image.init()
    return tuple(name for name in IMAGE_FORMATS if name in Image.OPEN)


def _is_flat(image: Image.Image) -> bool:
    return all(low == high for low, high in image.getextrema())


def _warn(message: str) -> None:
    logger.info(message)
    warnings.warn(message, ImageWarning, stacklevel=3)


def _read_bytes(source: str | Path | bytes | BinaryIO, name: str) -> bytes:
    if isinstance(source, bytes):
        data = source
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(name, "no such file")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ImageError(name, _too_large())
        try:
            data = path.read_bytes()
        except OSError as error:
            raise ImageError(name, f"cannot be read ({error.strerror})") from error
    else:
        data = source.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(name, _too_large())
    return data


def _too_large() -> str:
    return f"the file is larger than {MAX_FILE_BYTES // 2**20} MiB"


def _check_size(name: str, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageError(
            name,
            f"{width}x{height} pixels is more than the limit of {MAX_PIXELS:,} pixels",
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(
            name,
            f"{width}x{height} pixels is smaller than the minimum of "
            f"{MIN_SIDE}x{MIN_SIDE}",
        )


def resize_square(image: Image.Image, image_size: int) -> Image.Image:
    """``image`` resized bilinearly to ``image_size`` x ``image_size``."""
    if image.size == (image_size, image_size):
        return image
    return image.resize((image_size, image_size), Image.Resampling.BILINEAR)


def to_tensor(
    images: Sequence[Image.Image], image_size: int = DEFAULT_IMAGE_SIZE
) -> Tensor:
    """Resize RGB images to a square side and normalise them.

    Args:
        images: RGB Pillow images of any sizes.
        image_size: Side of the square model input.

    Returns:
        Float32 tensor of shape (N, 3, image_size, image_size), normalised with
        the ImageNet mean and standard deviation.
    """
    if len(images) == 0:
        raise ValueError("no images to convert")
    batch = np.empty((len(images), image_size, image_size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        batch[i] = np.asarray(resize_square(image, image_size).convert("RGB"))
    tensor = torch.from_numpy(batch).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (tensor - mean) / std


def find_images(paths: Iterable[str | Path]) -> tuple[list[Path], list[Skipped]]:
    """Expand files and folders into image files, recursively and sorted.

    Files named directly are kept whatever their extension (decoding checks
    them); inside folders only image extensions count, other files are
    reported as skipped, hidden files are ignored. Links to folders are not
    followed, so a link loop cannot make the walk endless.

    Returns:
        The image paths, and the files skipped with their reasons.
    """
    found: list[Path] = []
    skipped: list[Skipped] = []
    for path in map(Path, paths):
        if path.is_dir():
            _walk(path, found, skipped)
        elif path.is_file():
            found.append(path)
        else:
            skipped.append(Skipped(str(path), _not_a_file(path)))
    return found, skipped


def _walk(folder: Path, found: list[Path], skipped: list[Skipped]) -> None:
    for child in sorted(folder.rglob("*")):
        relative = child.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if child.is_dir():
            continue
        if not child.is_file():
            skipped.append(Skipped(str(child), _not_a_file(child)))
        elif child.suffix.lower() in IMAGE_EXTENSIONS:
            found.append(child)
        else:
            skipped.append(Skipped(str(child), "not an image file extension"))


def _not_a_file(path: Path) -> str:
    if path.is_symlink():
        return "a link to nothing"
    if path.exists():
        return "not a regular file or folder"
    return "no such file or folder"


def iter_decoded(
    sources: Iterable[tuple[str, str | Path | bytes]],
) -> Iterator[tuple[str, Image.Image | Skipped]]:
    """Decode sources one by one, yielding each name with an image or a skip."""
    for name, source in sources:
        try:
            yield name, read_image(source, name)
        except ImageError as error:
            logger.info("skipped %s: %s", error.name, error.reason)
            yield name, Skipped(error.name, error.reason)
