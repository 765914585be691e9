"""From a grid of patch distances to a smooth, image-sized anomaly map."""

from __future__ import annotations

import functools

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


@functools.lru_cache(maxsize=16)
def axis_operator(grid: int, size: int, sigma: float = BLUR_SIGMA) -> Tensor:
    """Bilinear upsampling then blur along one axis, as a matrix (size, grid).

    Both steps are linear and act on rows and columns separately, so a map is
    ``rows @ distances @ columns.T``. The matrix is built by sending each unit
    impulse through the steps themselves, so it matches them by construction.
    """
    impulses = torch.eye(grid).reshape(grid, 1, grid, 1)
    upsampled = F.interpolate(
        impulses, size=(size, 1), mode="bilinear", align_corners=False
    )
    return gaussian_blur(upsampled.squeeze(1), sigma)[:, :, 0].T.contiguous()


def anomaly_maps(
    distances: Tensor, image_size: tuple[int, int], sigma: float = BLUR_SIGMA
) -> Tensor:
    """Upsample patch distances (N, h, w) bilinearly to (N, H, W) and blur them.

    Two small matrix products, (H, h) and (w, W), do both steps at once: about
    20x fewer operations than a 33-tap blur over the full-size map.
    """
    grid_h, grid_w = distances.shape[-2:]
    rows = axis_operator(grid_h, image_size[0], sigma).to(distances)
    columns = axis_operator(grid_w, image_size[1], sigma).to(distances)
    return rows @ distances @ columns.T


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
    "axis_operator",
    "gaussian_blur",
    "gaussian_kernel_1d",
    "image_scores",
    "resize_maps",
]
