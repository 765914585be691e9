"""One multivariate Gaussian per patch position, fitted from streamed sums.

The fit keeps, for P positions and C channels, a count, a reference point
``shift`` (P, C), the sum of deviations from it (P, C) and the sum of their
outer products (P, C, C). These are plain sums, so batches, workers or days of
images merge exactly, and memory does not grow with the number of images.

The scatter is by far the largest tensor (5 GB for wide_resnet50_2 with 550
channels at 256x256). Large statistics therefore lend its memory to the fitted
:class:`Gaussian`: the Cholesky factors of the covariances go into the lower
triangle, while the upper triangle and a saved copy of the diagonal keep the
scatter recoverable for saving or further fitting. Every computation reads
the scatter's upper triangle only, so recovering it changes no result.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# Added to each covariance, as in the PaDiM paper, so that it is invertible
# even when a channel never varies or there are fewer images than channels.
COVARIANCE_RIDGE = 0.01

# Float64 working memory per step of the factorisation; keeps temporaries a
# small fraction of the statistics, whatever the number of channels, and
# gives each worker thread many steps to share.
CHUNK_BYTES = 16 * 2**20

# Deviations of up to max(channels / PENDING_DIVISOR, PENDING_MIN_IMAGES)
# images wait to be added to the scatter in one pass: a pass over (P, C, C)
# costs about the same for 16 images as for 64, and the wait takes at most
# 1 / PENDING_DIVISOR of the scatter's memory, or 64 / C of it.
PENDING_DIVISOR = 8
PENDING_MIN_IMAGES = 64

# With at least PANEL_MIN_CHANNELS channels, scatter updates compute only the
# upper triangle, in PANELS row panels: 5/8 of the work. Below that the
# products are too small for splitting to pay.
PANELS = 4
PANEL_MIN_CHANNELS = 256

# Scatters larger than this lend their memory to the Gaussian rather than
# allocating a second (P, C, C) tensor; smaller ones keep an explicit inverse,
# which scores a single image faster than a triangular solve does.
LEND_SCATTER_BYTES = 2**30


def all_finite(tensor: Tensor) -> bool:
    """Whether ``tensor`` holds no NaN or infinity, in one pass without copies.

    ``torch.isfinite`` would allocate temporaries as large as the tensor, 5 GB
    for a wide_resnet50_2 scatter, and run 10x slower. A NaN or infinity makes
    the sum NaN or infinite; only a sum that overflowed needs a second look,
    at the smallest and largest values.
    """
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    # Reduce in memory order: a permuted view reduces up to 30x slower.
    order = sorted(range(tensor.ndim), key=lambda axis: -tensor.stride(axis))
    tensor = tensor.permute(order)
    if tensor.is_contiguous():
        tensor = tensor.view(-1)
    if torch.isfinite(tensor.sum()):
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def positions_first(embedding: Tensor) -> Tensor:
    """Embeddings (N, C, h, w) as float32 (P, N, C); do not change it in place.

    A view when the embedding already lies that way in memory, as
    ``PadimModel.generate_embedding`` makes it; otherwise a copy made as one
    2-D transpose of (N * C, P), 3-4x faster than permuting three axes.
    """
    n, c, h, w = embedding.shape
    lying = embedding.detach().permute(2, 3, 0, 1)
    if lying.is_contiguous() and lying.dtype == torch.float32:
        return lying.view(h * w, n, c)
    flat = embedding.detach().reshape(n * c, h * w).T
    copy = torch.empty(h * w, n * c, dtype=torch.float32, device=embedding.device)
    return copy.copy_(flat).view(h * w, n, c)


@functools.cache
def _thread_counts_are_per_thread() -> bool:
    """Whether ``torch.set_num_threads`` in one thread leaves the others alone.

    True for the OpenMP backend of the standard builds; with the native
    backend it would change the whole process, so workers are not used.
    """
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def _map_in_workers(
    function: Callable[[slice], object], chunks: Iterable[slice]
) -> list:
    """Apply ``function`` to each chunk in worker threads, one per torch thread.

    Each worker runs single-threaded (torch's thread count is per thread).
    Threaded LAPACK synchronises its threads for every small matrix, which on
    a busy machine costs up to 100x; whole chunks per thread never wait.
    """
    workers = torch.get_num_threads()
    if workers == 1 or not _thread_counts_are_per_thread():
        return [function(chunk) for chunk in chunks]
    with ThreadPoolExecutor(
        workers, "linalg", initializer=torch.set_num_threads, initargs=(1,)
    ) as pool:
        return list(pool.map(function, chunks))


class FewImagesWarning(UserWarning):
    """The Gaussian was fitted on too few images to be reliable."""


class RunningGaussian:
    """Streamed sufficient statistics of one Gaussian per position.

    Attributes:
        count: Number of images seen.
        shift: Reference point the sums are taken about, shape (P, C).
        sum: Sum of ``x - shift`` over images, shape (P, C).
        scatter: Sum of ``(x - shift)(x - shift)^T``, shape (P, C, C). Only
            its upper triangle is kept up to date while fitting; reading the
            attribute mirrors it into the lower one, and takes back memory
            lent by :meth:`to_gaussian`, which leaves that Gaussian unusable.
    """

    def __init__(self, count: int, shift: Tensor, sum: Tensor, scatter: Tensor) -> None:
        self.count = count
        self.shift = shift
        self.sum = sum
        self._scatter = scatter
        # Whether the scatter's strict lower triangle lags its upper one.
        self._lower_stale = False
        # While lent: the scatter's own diagonal, and the Gaussian using it.
        self._diagonal: Tensor | None = None
        self._borrower: Gaussian | None = None
        self._lock = threading.RLock()
        # Deviations (P, capacity, C) already in count and sum, not yet in
        # the scatter; the first ``_waiting`` images of the buffer are used.
        self._pending: Tensor | None = None
        self._waiting = 0
        self._reserved: Tensor | None = None
        self._reserved_waits = False

    @classmethod
    def empty(cls, positions: int, channels: int) -> RunningGaussian:
        """Statistics of no images for ``positions`` x ``channels``."""
        return cls(
            count=0,
            shift=torch.zeros(positions, channels),
            sum=torch.zeros(positions, channels),
            scatter=torch.zeros(positions, channels, channels),
        )

    def __getstate__(self) -> dict:
        self._settle()
        state = dict(self.__dict__, _pending=None, _reserved=None)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return (
            f"RunningGaussian(count={self.count}, positions={self.positions}, "
            f"channels={self.channels}, lent={self.lent})"
        )

    @property
    def scatter(self) -> Tensor:
        """Sum of outer products (P, C, C), whole, symmetric and not lent."""
        self._settle()
        return self._scatter

    @scatter.setter
    def scatter(self, value: Tensor) -> None:
        self._settle()
        self._scatter = value

    @property
    def lent(self) -> bool:
        """Whether the scatter's lower triangle holds a Gaussian's factors."""
        return self._diagonal is not None

    @property
    def positions(self) -> int:
        """Number of patch positions P."""
        return self.shift.shape[0]

    @property
    def channels(self) -> int:
        """Number of channels C."""
        return self.shift.shape[1]

    def scatter_diagonal(self) -> Tensor:
        """Diagonal of the scatter, shape (P, C), without taking back a loan."""
        if self._diagonal is not None:
            return self._diagonal
        self._flush()
        return self._scatter.diagonal(dim1=1, dim2=2)

    def update(self, embedding: Tensor) -> None:
        """Add a batch of embeddings of shape (N, C, h, w), with P = h * w."""
        n, c, h, w = embedding.shape
        if (h * w, c) != (self.positions, self.channels):
            raise ValueError(
                f"embedding of shape {tuple(embedding.shape)} does not match "
                f"statistics for {self.positions} positions x {self.channels} channels"
            )
        self.reserve(n).copy_(positions_first(embedding))
        self.commit()

    def reserve(self, n: int) -> Tensor:
        """Room for the embeddings of ``n`` images, float32 (P, n, C).

        Write them there, then call :meth:`commit`; saves :meth:`update` a
        copy. Another call to ``reserve`` drops an uncommitted room.
        """
        self._take_back()
        self._reserved, self._reserved_waits = self._waiting_room(n)
        return self._reserved

    def commit(self) -> None:
        """Add the embeddings written into the last :meth:`reserve` room."""
        if self._reserved is None:
            raise RuntimeError("nothing reserved to commit")
        deviation, n = self._reserved, self._reserved.shape[1]
        self._reserved = None
        if self.count == 0:
            # Centre on the first batch so later sums stay small and exact.
            self.shift = deviation.mean(dim=1)
        deviation -= self.shift.unsqueeze(1)
        self.sum += deviation.sum(dim=1)
        self.count += n
        if self._reserved_waits:
            self._waiting += n
        else:
            self._add_products(deviation)

    def _waiting_room(self, n: int) -> tuple[Tensor, bool]:
        """Room (P, n, C) for new deviations, and whether it is a waiting slot."""
        capacity = max(self.channels // PENDING_DIVISOR, PENDING_MIN_IMAGES)
        if self._waiting + n > capacity:
            self._flush()
        if n > capacity:
            return self._scatter.new_empty(self.positions, n, self.channels), False
        if self._pending is None:
            self._pending = self._scatter.new_empty(
                self.positions, capacity, self.channels
            )
        return self._pending[:, self._waiting : self._waiting + n], True

    def _flush(self) -> None:
        """Add the waiting deviations to the scatter in one pass."""
        if self._waiting:
            self._add_products(self._pending[:, : self._waiting])
            self._waiting = 0

    def _add_products(self, deviation: Tensor) -> None:
        """Add ``d^T d`` for deviations (P, N, C) to the scatter's upper triangle.

        With many channels only panels on and above the diagonal are computed,
        5/8 of the work for 4 panels, and the lower triangle goes stale.
        """
        c = self.channels
        if c < PANEL_MIN_CHANNELS:
            self._scatter.baddbmm_(deviation.mT, deviation)
            return
        edges = [round(i * c / PANELS) for i in range(PANELS + 1)]

        def add(chunk: slice) -> None:
            block, part = self._scatter[chunk], deviation[chunk]
            for low, high in itertools.pairwise(edges):
                block[:, low:high, low:].baddbmm_(
                    part[:, :, low:high].mT, part[:, :, low:]
                )

        # Products into strided panels are per-matrix BLAS calls: in workers,
        # like the factorisations, so that threads never wait on each other.
        _map_in_workers(add, self._chunks())
        self._lower_stale = True

    def _complete(self) -> None:
        """Nothing waiting and nothing lent: the upper triangle is exact."""
        self._take_back()
        self._flush()

    def _settle(self) -> None:
        """Make ``_scatter`` the whole symmetric scatter."""
        self._complete()
        if self._lower_stale:
            self._mirror()

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
        self._complete()
        other._complete()
        # Re-express the other's sums about this shift: x - a = (x - b) + (b - a).
        offset = other.shift - self.shift
        scatter = self._scatter
        scatter += other._scatter
        scatter.baddbmm_(offset.unsqueeze(2), other.sum.unsqueeze(1))
        scatter.baddbmm_(other.sum.unsqueeze(2), offset.unsqueeze(1))
        scatter.baddbmm_(offset.unsqueeze(2), offset.unsqueeze(1), alpha=other.count)
        self._lower_stale |= other._lower_stale
        self.sum += other.sum + other.count * offset
        self.count += other.count

    def complement(self, whole: RunningGaussian) -> None:
        """Turn these statistics into those of the other images of ``whole``.

        These statistics must hold a subset of the images of ``whole``; they
        are replaced, in place and without a second scatter, by the
        statistics of the images of ``whole`` that are not among them. The
        sums are taken about the shift of ``whole`` and computed in float64
        chunk by chunk, so each entry is rounded once. ``whole`` is left as
        it is, bar waiting images being added to its scatter.
        """
        if whole.shift.shape != self.shift.shape:
            raise ValueError(
                f"cannot take statistics of shape {tuple(self.shift.shape)} out "
                f"of {tuple(whole.shift.shape)}"
            )
        if not 0 < self.count <= whole.count:
            raise ValueError(
                f"cannot take {self.count} images out of {whole.count}: the part "
                "must hold 1 to all of the images"
            )
        self._complete()
        whole._complete()
        # The part's sums about the whole's shift: x - s = (x - a) + (a - s).
        offset = (self.shift - whole.shift).to(torch.float64)
        part_sum = self.sum.to(torch.float64)

        def subtract(chunk: slice) -> None:
            block = self._scatter[chunk]
            rest = whole._scatter[chunk].to(torch.float64) - block.to(torch.float64)
            total, shift = part_sum[chunk], offset[chunk]
            rest.baddbmm_(total.unsqueeze(2), shift.unsqueeze(1), alpha=-1.0)
            rest.baddbmm_(shift.unsqueeze(2), total.unsqueeze(1), alpha=-1.0)
            rest.baddbmm_(shift.unsqueeze(2), shift.unsqueeze(1), alpha=-self.count)
            block.copy_(rest)

        _map_in_workers(subtract, self._chunks())
        rest_sum = whole.sum.to(torch.float64) - part_sum - self.count * offset
        self.sum = rest_sum.to(self.sum.dtype)
        self._lower_stale |= whole._lower_stale
        self.shift = whole.shift.clone()
        self.count = whole.count - self.count

    def center(self) -> None:
        """Move the reference point to the mean, in place (sum becomes 0)."""
        if self.count == 0:
            return
        self._complete()
        mean_offset = self.sum / self.count
        self._scatter.baddbmm_(
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
        self._complete()
        covariance = self._covariance(positions)
        return covariance.triu() + covariance.triu(1).mT

    def _covariance(self, positions: slice) -> Tensor:
        """Like :meth:`covariance`, but only the upper triangle is right."""
        scale = 1.0 / max(self.count - 1, 1)
        block = self._scatter[positions]
        covariance = torch.mul(
            block, scale, out=block.new_empty(block.shape, dtype=torch.float64)
        )
        total = self.sum[positions]
        if total.any():
            total = total.to(torch.float64)
            covariance.baddbmm_(
                total.unsqueeze(2), total.unsqueeze(1), alpha=-scale / self.count
            )
        covariance.diagonal(dim1=1, dim2=2).add_(COVARIANCE_RIDGE)
        return covariance

    def _chunks(self) -> Iterator[slice]:
        """Slices of positions whose float64 covariances fill CHUNK_BYTES."""
        step = max(1, CHUNK_BYTES // (8 * self.channels**2))
        for start in range(0, self.positions, step):
            yield slice(start, start + step)

    def to_gaussian(self, lend: bool | None = None, warn: bool = True) -> Gaussian:
        """Factor the covariances, chunk by chunk, into a :class:`Gaussian`.

        The statistics are centred on their mean first, as saving them does.

        Args:
            lend: Write the Cholesky factors into the scatter's own memory
                instead of allocating an inverse of the same size. Reading
                :attr:`scatter` later restores it exactly and leaves the
                Gaussian unusable. None lends scatters larger than
                ``LEND_SCATTER_BYTES``.
            warn: Warn when there are too few images for a reliable fit.
        """
        if self.count == 0:
            raise ValueError("no images have been added")
        if warn:
            self._warn_if_few_images()
        self._complete()
        self._pending = None
        if self.sum.any():
            self.center()
        if lend is None:
            lend = self._scatter.nbytes > LEND_SCATTER_BYTES
        mean = self.mean.to(torch.float32)
        if lend:
            return self._lend_factors(mean)
        inverse = torch.empty_like(self._scatter)

        def invert(chunk: slice) -> None:
            factor = torch.linalg.cholesky(self._covariance(chunk), upper=True)
            inverse[chunk] = torch.cholesky_inverse(factor, upper=True)

        _map_in_workers(invert, self._chunks())
        return Gaussian(mean=mean, inv_covariance=inverse)

    def _lend_factors(self, mean: Tensor) -> Gaussian:
        buffer = self._scatter
        lower = torch.ones(
            self.channels, self.channels, dtype=torch.bool, device=buffer.device
        ).tril()

        def factor_in_place(chunk: slice) -> None:
            factor = torch.linalg.cholesky(self._covariance(chunk), upper=True)
            block = buffer[chunk]
            block.copy_(torch.where(lower, factor.mT.to(block.dtype), block))

        with self._lock:
            self._take_back()
            self._diagonal = buffer.diagonal(dim1=1, dim2=2).clone()
            self._lower_stale = True
            try:
                _map_in_workers(factor_in_place, self._chunks())
            except BaseException:
                self._take_back()
                raise
            self._borrower = Gaussian(mean=mean, factor=buffer, guard=self._lock)
            return self._borrower

    def _take_back(self) -> None:
        """Restore the scatter's diagonal and mirror its upper triangle."""
        if self._diagonal is None:
            return
        with self._lock:
            if self._diagonal is None:
                return
            self._mirror()
            self._scatter.diagonal(dim1=1, dim2=2).copy_(self._diagonal)
            if self._borrower is not None:
                self._borrower.factor = None
            self._diagonal = self._borrower = None

    def _mirror(self) -> None:
        """Copy the scatter's strict upper triangle into its lower one."""
        buffer = self._scatter
        strictly_lower = torch.ones(
            self.channels, self.channels, dtype=torch.bool, device=buffer.device
        ).tril(-1)

        def mirror(chunk: slice) -> None:
            block = buffer[chunk]
            block.copy_(torch.where(strictly_lower, block.mT, block))

        _map_in_workers(mirror, self._chunks())
        self._lower_stale = False

    def _warn_if_few_images(self) -> None:
        if self.count < 2:
            warnings.warn(
                f"fitted on {self.count} image(s): the covariance is the ridge "
                f"{COVARIANCE_RIDGE} alone; scores are distances to that image",
                FewImagesWarning,
                stacklevel=3,
            )
        elif self.count <= self.channels:
            warnings.warn(
                f"fitted on {self.count} images for {self.channels} channels: the "
                "covariance rests on the ridge; add images for reliable scores",
                FewImagesWarning,
                stacklevel=3,
            )


@dataclass
class Gaussian:
    """The fitted Gaussians used for scoring.

    One of ``inv_covariance`` and ``factor`` is set; neither once the factor's
    memory went back to the statistics it was lent from.

    Attributes:
        mean: Mean embedding per position, shape (P, C), float32.
        inv_covariance: Inverse covariance per position, shape (P, C, C),
            float32, or None.
        factor: Lower Cholesky factor ``L`` of each covariance ``L L^T``,
            shape (P, C, C), float32, or None. Only the lower triangle is
            read; the upper one may hold other data.
        guard: Lock of the statistics that lent ``factor``, held while scoring
            so that the memory is not taken back midway.
    """

    mean: Tensor
    inv_covariance: Tensor | None = None
    factor: Tensor | None = None
    guard: AbstractContextManager | None = field(
        default=None, repr=False, compare=False
    )

    def __getstate__(self) -> dict:
        return {**self.__dict__, "guard": None}

    @property
    def usable(self) -> bool:
        """Whether the Gaussian still holds what scoring needs."""
        return self.inv_covariance is not None or self.factor is not None

    def is_finite(self) -> bool:
        """Whether the mean and the inverse or factor hold only finite numbers."""
        matrix = self.inv_covariance if self.inv_covariance is not None else self.factor
        return all_finite(self.mean) and (matrix is None or all_finite(matrix))

    def mahalanobis(self, embedding: Tensor) -> Tensor:
        """Mahalanobis distance of each patch to its position's Gaussian.

        Args:
            embedding: Embeddings of shape (N, C, h, w) with h * w = P.

        Returns:
            Distances of shape (N, h, w), float32, never negative.

        Raises:
            RuntimeError: If the factor's memory was taken back.
        """
        n, c, h, w = embedding.shape
        if (h * w, c) != tuple(self.mean.shape):
            raise ValueError(
                f"embedding of shape {tuple(embedding.shape)} does not match the "
                f"Gaussian's {self.mean.shape[0]} positions x {self.mean.shape[1]} "
                "channels"
            )
        x = positions_first(embedding)
        if self.inv_covariance is not None:
            deviation = x - self.mean.unsqueeze(1)
            weighted = torch.bmm(deviation, self.inv_covariance)  # (P, N, C)
            squared = weighted.mul_(deviation).sum(dim=2)
        else:
            squared = self._squared_by_factor(x)
        return squared.clamp_(min=0).sqrt_().T.reshape(n, h, w)

    def _squared_by_factor(self, x: Tensor) -> Tensor:
        """``|L^-1 d|^2 = d^T (L L^T)^-1 d`` for embeddings (P, N, C), as (P, N).

        Each worker takes its deviations ``d = x - mean`` chunk by chunk, so
        no deviation tensor as large as the embedding is allocated.
        """
        positions = x.shape[0]
        step = -(-positions // (4 * torch.get_num_threads()))
        chunks = [slice(i, i + step) for i in range(0, positions, step)]
        with self.guard or contextlib.nullcontext():
            factor = self.factor
            if factor is None:
                raise RuntimeError(
                    "the Gaussian's memory went back to its statistics; "
                    "finalize again to score"
                )

            def solve(chunk: slice) -> Tensor:
                deviation = x[chunk] - self.mean[chunk].unsqueeze(1)
                # Rows of X with X L^T = D are L^-1 d; L^T is read as upper.
                solved = torch.linalg.solve_triangular(
                    factor[chunk].mT, deviation, upper=True, left=False
                )
                return solved.square_().sum(dim=2)

            return torch.cat(_map_in_workers(solve, chunks))
