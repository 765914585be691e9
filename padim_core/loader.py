"""Batches of decoded images, decoded one batch ahead of the network."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from torch import Tensor

from padim_core.images import (
    ImageError,
    Skipped,
    read_image,
    resize_square,
    to_tensor,
)

logger = logging.getLogger(__name__)

Source = str | Path | tuple[str, str | Path | bytes | Image.Image]


@dataclass
class Batch:
    """Usable images of one batch, and the files of it that were not usable.

    Attributes:
        names: Names of the usable images.
        tensor: Normalised images (N, 3, S, S), or None if none was usable.
        sizes: Original (width, height) of each usable image.
        skipped: Files of this batch that could not be used.
        done: Files handled so far, this batch included.
        total: Files in the whole run.
        indices: Position of each usable image among the sources given.
    """

    names: list[str] = field(default_factory=list)
    tensor: Tensor | None = None
    sizes: list[tuple[int, int]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    done: int = 0
    total: int = 0
    indices: list[int] = field(default_factory=list)


def _name_and_source(source: Source) -> tuple[str, str | Path | bytes | Image.Image]:
    if isinstance(source, tuple):
        return source
    return str(source), source


def _decode(
    chunk: list[tuple[str, str | Path | bytes | Image.Image]],
    image_size: int,
    start: int = 0,
) -> Batch:
    batch = Batch()
    images = []
    for index, (name, source) in enumerate(chunk, start):
        try:
            if isinstance(source, Image.Image):
                image = source.convert("RGB")
            else:
                image = read_image(source, name)
        except ImageError as error:
            logger.info("skipped %s: %s", error.name, error.reason)
            batch.skipped.append(Skipped(error.name, error.reason))
            continue
        # Keep only the model-sized copy: a batch of large photos would
        # otherwise hold every full-resolution decode at once.
        images.append(resize_square(image, image_size))
        batch.names.append(name)
        batch.sizes.append(image.size)
        batch.indices.append(index)
    if images:
        batch.tensor = to_tensor(images, image_size)
    return batch


def iter_batches(
    sources: Iterable[Source], image_size: int, batch_size: int
) -> Iterator[Batch]:
    """Decode, check, resize and normalise images in batches.

    The next batch is decoded in a background thread while the caller works
    on the current one. Unusable files are reported in ``Batch.skipped``.

    Args:
        sources: Paths, or (name, path / bytes / PIL image) pairs.
        image_size: Side of the square model input.
        batch_size: Files per batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    items = [_name_and_source(source) for source in sources]
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    done = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        pending = pool.submit(_decode, chunks[0], image_size) if chunks else None
        for index, chunk in enumerate(chunks):
            batch = pending.result()
            if index + 1 < len(chunks):
                start = (index + 1) * batch_size
                pending = pool.submit(_decode, chunks[index + 1], image_size, start)
            done += len(chunk)
            batch.done, batch.total = done, len(items)
            yield batch
