"""From a grid of patch distances to a smooth, image-sized anomaly map."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# The PaDiM paper smooths the upsampled map with a Gaussian of this sigma, in
# pixels of the model's input image.
BLUR_SIGMA = 4.0

# The kernel reaches four sigmas on each side, where the Gaussian is ~3e-4.
BLUR_TRUNCATE = 4.0


def gaussian_kernel_1d(sigma: float = BLUR_SIGMA) -> Tensor:
    """A normalised 1-D Gaussian kernel of odd length, float32."""
    radius = int(BLUR_TRUNCATE * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(torch.float32)


def gaussian_blur(maps: Tensor, sigma: float = BLUR_SIGMA) -> Tensor:
    """Blur maps of shape (N, H, W) with a separable Gaussian, reflecting edges."""
    kernel = gaussian_kernel_1d(sigma).to(maps.device)
    radius = kernel.numel() // 2
    x = maps.unsqueeze(1)
    height, width = x.shape[-2:]
    # Reflection needs a pad shorter than the side: tiny maps use a shorter,
    # renormalised kernel.
    for axis, side in ((3, width), (2, height)):
        reach = min(radius, side - 1)
        taps = kernel[radius - reach : radius + reach + 1]
        shape = [1, 1, 1, 1]
        shape[axis] = taps.numel()
        pad = (reach, reach, 0, 0) if axis == 3 else (0, 0, reach, reach)
        x = F.pad(x, pad, mode="reflect") if reach > 0 else x
        x = F.conv2d(x, (taps / taps.sum()).view(shape))
    return x.squeeze(1)


def anomaly_maps(
    distances: Tensor, image_size: tuple[int, int], sigma: float = BLUR_SIGMA
) -> Tensor:
    """Upsample patch distances (N, h, w) bilinearly to (N, H, W) and blur them."""
    maps = F.interpolate(
        distances.unsqueeze(1), size=image_size, mode="bilinear", align_corners=False
    ).squeeze(1)
    return gaussian_blur(maps, sigma)


def resize_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize maps (N, H, W) bilinearly to ``size`` = (height, width)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(
        maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False
    ).squeeze(1)


def image_scores(maps: Tensor) -> Tensor:
    """Image score = the map's maximum, shape (N,)."""
    return maps.flatten(1).amax(dim=1)


__all__ = [
    "BLUR_SIGMA",
    "anomaly_maps",
    "gaussian_blur",
    "gaussian_kernel_1d",
    "image_scores",
    "resize_maps",
]
