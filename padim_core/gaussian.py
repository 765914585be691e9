"""One multivariate Gaussian per patch position, fitted from streamed sums.

The fit keeps, for P positions and C channels, a count, a reference point
``shift`` (P, C), the sum of deviations from it (P, C) and the sum of their
outer products (P, C, C). These are plain sums, so batches, workers or days of
images merge exactly, and memory does not grow with the number of images.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# Added to each covariance, as in the PaDiM paper, so that it is invertible
# even when a channel never varies or there are fewer images than channels.
COVARIANCE_RIDGE = 0.01

# Positions inverted at once; bounds the float64 working copy during inversion.
INVERSION_CHUNK = 256


class FewImagesWarning(UserWarning):
    """The Gaussian was fitted on too few images to be reliable."""


@dataclass
class RunningGaussian:
    """Streamed sufficient statistics of one Gaussian per position.

    Attributes:
        count: Number of images seen.
        shift: Reference point the sums are taken about, shape (P, C).
        sum: Sum of ``x - shift`` over images, shape (P, C).
        scatter: Sum of ``(x - shift)(x - shift)^T``, shape (P, C, C).
    """

    count: int
    shift: Tensor
    sum: Tensor
    scatter: Tensor

    @classmethod
    def empty(cls, positions: int, channels: int) -> RunningGaussian:
        """Statistics of no images for ``positions`` x ``channels``."""
        return cls(
            count=0,
            shift=torch.zeros(positions, channels),
            sum=torch.zeros(positions, channels),
            scatter=torch.zeros(positions, channels, channels),
        )

    @property
    def positions(self) -> int:
        """Number of patch positions P."""
        return self.shift.shape[0]

    @property
    def channels(self) -> int:
        """Number of channels C."""
        return self.shift.shape[1]

    def update(self, embedding: Tensor) -> None:
        """Add a batch of embeddings of shape (N, C, h, w), with P = h * w."""
        n, c, h, w = embedding.shape
        if (h * w, c) != (self.positions, self.channels):
            raise ValueError(
                f"embedding of shape {tuple(embedding.shape)} does not match "
                f"statistics for {self.positions} positions x {self.channels} channels"
            )
        x = embedding.detach().to(torch.float32).reshape(n, c, h * w)
        x = x.permute(2, 0, 1)  # (P, N, C)
        if self.count == 0:
            # Centre on the first batch so later sums stay small and exact.
            self.shift = x.mean(dim=1)
        deviation = x - self.shift.unsqueeze(1)
        self.sum += deviation.sum(dim=1)
        self.scatter.baddbmm_(deviation.transpose(1, 2), deviation)
        self.count += n

    def merge(self, other: RunningGaussian) -> None:
        """Add the statistics of ``other`` (disjoint images) to these, in place."""
        if other.shift.shape != self.shift.shape:
            raise ValueError(
                f"cannot merge statistics of shape {tuple(other.shift.shape)} "
                f"into {tuple(self.shift.shape)}"
            )
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.shift = other.count, other.shift.clone()
            self.sum, self.scatter = other.sum.clone(), other.scatter.clone()
            return
        # Re-express the other's sums about this shift: x - a = (x - b) + (b - a).
        offset = other.shift - self.shift
        self.scatter += other.scatter
        self.scatter.baddbmm_(offset.unsqueeze(2), other.sum.unsqueeze(1))
        self.scatter.baddbmm_(other.sum.unsqueeze(2), offset.unsqueeze(1))
        self.scatter.baddbmm_(
            offset.unsqueeze(2), offset.unsqueeze(1), alpha=other.count
        )
        self.sum += other.sum + other.count * offset
        self.count += other.count

    def center(self) -> None:
        """Move the reference point to the mean, in place (sum becomes 0)."""
        if self.count == 0:
            return
        mean_offset = self.sum / self.count
        self.scatter.baddbmm_(
            self.sum.unsqueeze(2), self.sum.unsqueeze(1), alpha=-1.0 / self.count
        )
        self.shift += mean_offset
        self.sum.zero_()

    @property
    def mean(self) -> Tensor:
        """Mean embedding per position, shape (P, C)."""
        if self.count == 0:
            raise ValueError("no images have been added")
        return self.shift + self.sum / self.count

    def covariance(self, positions: slice = slice(None)) -> Tensor:
        """Sample covariance plus the ridge, float64, shape (P, C, C).

        The ridge keeps one image usable: its covariance is the ridge alone.
        """
        if self.count == 0:
            raise ValueError("no images have been added")
        scatter = self.scatter[positions].to(torch.float64)
        total = self.sum[positions].to(torch.float64)
        scatter = scatter - total.unsqueeze(2) * total.unsqueeze(1) / self.count
        covariance = scatter / max(self.count - 1, 1)
        eye = torch.eye(self.channels, dtype=torch.float64)
        return covariance + COVARIANCE_RIDGE * eye

    def to_gaussian(self) -> Gaussian:
        """Invert the covariances, chunk by chunk, into a :class:`Gaussian`."""
        if self.count < 2:
            warnings.warn(
                f"fitted on {self.count} image(s): the covariance is the ridge "
                f"{COVARIANCE_RIDGE} alone; scores are distances to that image",
                FewImagesWarning,
                stacklevel=2,
            )
        elif self.count <= self.channels:
            warnings.warn(
                f"fitted on {self.count} images for {self.channels} channels: the "
                "covariance rests on the ridge; add images for reliable scores",
                FewImagesWarning,
                stacklevel=2,
            )
        inverse = torch.empty_like(self.scatter)
        for start in range(0, self.positions, INVERSION_CHUNK):
            chunk = slice(start, start + INVERSION_CHUNK)
            factor = torch.linalg.cholesky(self.covariance(chunk))
            inverse[chunk] = torch.cholesky_inverse(factor).to(inverse.dtype)
        return Gaussian(mean=self.mean.to(torch.float32), inv_covariance=inverse)


@dataclass
class Gaussian:
    """The fitted Gaussians used for scoring.

    Attributes:
        mean: Mean embedding per position, shape (P, C), float32.
        inv_covariance: Inverse covariance per position, shape (P, C, C), float32.
    """

    mean: Tensor
    inv_covariance: Tensor

    def mahalanobis(self, embedding: Tensor) -> Tensor:
        """Mahalanobis distance of each patch to its position's Gaussian.

        Args:
            embedding: Embeddings of shape (N, C, h, w) with h * w = P.

        Returns:
            Distances of shape (N, h, w), float32, never negative.
        """
        n, c, h, w = embedding.shape
        if (h * w, c) != tuple(self.mean.shape):
            raise ValueError(
                f"embedding of shape {tuple(embedding.shape)} does not match the "
                f"Gaussian's {self.mean.shape[0]} positions x {self.mean.shape[1]} "
                "channels"
            )
        x = embedding.to(torch.float32).reshape(n, c, h * w).permute(2, 0, 1)
        deviation = x - self.mean.unsqueeze(1)  # (P, N, C)
        weighted = torch.bmm(deviation, self.inv_covariance)
        squared = (weighted * deviation).sum(dim=2)  # (P, N)
        return squared.clamp_(min=0).sqrt_().T.reshape(n, h, w)
