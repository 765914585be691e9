"""Heatmap colours and overlays, with one colour scale for every image."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

# Anchors of a blue - cyan - yellow - red scale; 0.5 (the threshold) is yellow.
_ANCHORS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array(
    [[30, 60, 200], [40, 200, 230], [250, 230, 40], [245, 120, 30], [200, 20, 20]],
    dtype=np.float64,
)


def colourize(normalized: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] of shape (H, W) to RGB uint8 of shape (H, W, 3)."""
    values = np.clip(np.nan_to_num(normalized), 0.0, 1.0)
    channels = [np.interp(values, _ANCHORS, _COLOURS[:, i]) for i in range(3)]
    return np.stack(channels, axis=-1).astype(np.uint8)


def overlay(
    image: Image.Image, normalized: np.ndarray, opacity: float = 0.5
) -> Image.Image:
    """Blend a normalised map (H, W) over ``image``, resizing the map to fit."""
    heat = Image.fromarray(colourize(normalized)).resize(
        image.size, Image.Resampling.BILINEAR
    )
    return Image.blend(image.convert("RGB"), heat, float(np.clip(opacity, 0, 1)))


def outline(mask: np.ndarray) -> np.ndarray:
    """The one-pixel border of a boolean mask (H, W)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def draw_outline(
    image: Image.Image, mask: np.ndarray, colour: tuple[int, int, int] = (255, 0, 0)
) -> Image.Image:
    """Draw the border of ``mask`` (resized to the image) in ``colour``."""
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(
        image.size, Image.Resampling.NEAREST
    )
    border = ndimage.binary_dilation(outline(np.asarray(resized) > 0))
    pixels = np.array(image.convert("RGB"))
    pixels[border] = colour
    return Image.fromarray(pixels)


LEGEND_HEIGHT = 28


def add_legend(
    picture: Image.Image, low: float, threshold: float, high: float, score: float
) -> Image.Image:
    """Add a strip under ``picture``: the colour scale with its raw values.

    The strip shows the scale from ``low`` (left) through ``threshold``
    (middle) to ``high`` (right), and the image's ``score``, so an overlay
    read on its own says what its colours mean.
    """
    width = max(picture.width, 240)
    strip = Image.new("RGB", (width, LEGEND_HEIGHT), (255, 255, 255))
    ramp = colourize(np.tile(np.linspace(0.0, 1.0, width), (8, 1)))
    strip.paste(Image.fromarray(ramp), (0, 0))
    draw = ImageDraw.Draw(strip)
    draw.text((2, 10), f"{low:.1f}", fill=(0, 0, 0))
    draw.text((width // 2 - 20, 10), f"thr {threshold:.1f}", fill=(0, 0, 0))
    label = f"{high:.1f}"
    draw.text((width - 6 * len(label) - 2, 10), label, fill=(0, 0, 0))
    draw.line([(width // 2, 0), (width // 2, 8)], fill=(0, 0, 0))
    framed = Image.new("RGB", (width, picture.height + LEGEND_HEIGHT), (255, 255, 255))
    framed.paste(picture.convert("RGB"), (0, 0))
    framed.paste(strip, (0, picture.height))
    ImageDraw.Draw(framed).text(
        (4, 4),
        f"score {score:.1f}",
        fill=(255, 255, 255),
        stroke_width=1,
        stroke_fill=(0, 0, 0),
    )
    return framed
