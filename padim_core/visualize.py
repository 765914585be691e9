"""Heatmap colours and overlays, with one colour scale for every image."""

from __future__ import annotations

import numpy as np
from PIL import Image
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
