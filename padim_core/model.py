"""PaDiM: the network module and the object that fits and predicts.

Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly
Detection and Localization", https://arxiv.org/abs/2011.08785
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from padim_core import anomaly_map
from padim_core.backbones import build_feature_extractor, check_layers, get_spec
from padim_core.gaussian import (
    FewImagesWarning,
    Gaussian,
    RunningGaussian,
    all_finite,
)
from padim_core.images import DEFAULT_IMAGE_SIZE, Skipped
from padim_core.loader import Batch, iter_batches

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16

# Relative spread below which training features count as identical: the
# rounding of one forward pass, far below any real variation between images.
IDENTICAL_TOLERANCE = 1e-9


def select_channels(total: int, n_features: int, seed: int) -> Tensor:
    """Draw ``n_features`` of ``total`` channel indices, sorted, from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(total, generator=generator)[:n_features]
    return chosen.sort().values


@functools.lru_cache(maxsize=32)
def nearest_source(size: int, target: int) -> Tensor:
    """Which of ``size`` cells each of ``target`` cells copies when upsampled.

    Taken from ``F.interpolate(mode="nearest")`` itself, so it matches it.
    """
    cells = torch.arange(size, dtype=torch.float32).view(1, 1, size)
    upsampled = nn.functional.interpolate(cells, size=target, mode="nearest")
    return upsampled.view(target).long()


def _upsample_into(target: Tensor, part: Tensor) -> None:
    """Write ``part`` (h, w, N, c) into ``target`` (H, W, N, c), nearest cell.

    Whole-number scales, the usual case, become one broadcast copy; others
    gather rows and columns first.
    """
    (h, w), (height, width) = part.shape[:2], target.shape[:2]
    rows, columns = nearest_source(h, height), nearest_source(w, width)
    tail = tuple(part.shape[2:])
    if _is_repeat(rows, h) and _is_repeat(columns, w):
        shape = (h, height // h, w, width // w, *tail)
        target.view(shape).copy_(part[:, None, :, None].expand(shape))
    else:
        rows, columns = rows.to(part.device), columns.to(part.device)
        target.copy_(part[rows[:, None], columns])


def _is_repeat(source: Tensor, size: int) -> bool:
    """Whether ``source`` repeats each of ``size`` cells equally often, in order."""
    factor = len(source) // size
    steps = torch.arange(len(source)) // max(factor, 1)
    return len(source) == factor * size and torch.equal(source, steps)


def _pick_batch_inner(features: Tensor, channels: Tensor) -> Tensor:
    """``channels`` of features (N, C, h, w), as (h, w, N, c) with c contiguous.

    Channels-last features, which images from :func:`to_tensor` give, are
    picked as columns of (N * h * w, C) and only viewed in the new order.
    Otherwise whole rows of (N * C, h * w) are gathered and transposed once:
    8x faster than selecting on axis 1, 3x faster than permuting axes.
    """
    n, total, h, w = features.shape
    channels = channels.to(features.device)
    if features.is_contiguous(memory_format=torch.channels_last) and total > 1:
        flat = features.permute(0, 2, 3, 1).reshape(n * h * w, total)
        picked = flat.index_select(1, channels).view(n, h, w, len(channels))
        return picked.permute(1, 2, 0, 3)
    offsets = torch.arange(n, device=features.device)[:, None] * total
    rows = (offsets + channels).reshape(-1)
    picked = features.reshape(n * total, h * w).index_select(0, rows)
    return picked.T.contiguous().view(h, w, n, len(channels))


@dataclass(frozen=True)
class PadimConfig:
    """Everything that defines a PaDiM model besides its statistics."""

    backbone: str = "resnet18"
    layers: tuple[str, ...] = ("layer1", "layer2", "layer3")
    n_features: int = 100
    image_size: int = DEFAULT_IMAGE_SIZE
    seed: int = 0
    pre_trained: bool = True

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        values = asdict(self)
        values["layers"] = list(self.layers)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> PadimConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown configuration keys {sorted(unknown)}")
        values = dict(values)
        values["layers"] = tuple(values.get("layers", ()))
        return cls(**values)


def make_config(
    backbone: str = "resnet18",
    layers: Sequence[str] | None = None,
    n_features: int | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    pre_trained: bool = True,
) -> PadimConfig:
    """Validate arguments and fill defaults from the backbone table.

    Raises:
        ValueError: For an unknown backbone or layer, ``n_features`` outside
            1..channels available, or an image size out of range.
    """
    spec = get_spec(backbone)
    layers = check_layers(spec, layers if layers is not None else spec.default_layers)
    available = spec.channels(layers)
    if n_features is None:
        n_features = min(spec.default_n_features, available)
    if not 1 <= n_features <= available:
        raise ValueError(
            f"n_features={n_features} is not allowed for {backbone} layers "
            f"{list(layers)}: choose 1 to {available}"
        )
    if not 32 <= image_size <= 1024:
        raise ValueError(f"image_size={image_size} is not allowed: choose 32 to 1024")
    return PadimConfig(backbone, layers, n_features, image_size, seed, pre_trained)


class PadimModel(nn.Module):
    """PaDiM network: frozen backbone, random channels, Gaussian per patch.

    In training mode ``forward`` returns the feature maps by layer; in eval
    mode it returns anomaly maps. The backbone itself always stays in eval
    mode, so batch-norm statistics never change.

    Args:
        layers: Backbone layers to tap.
        backbone: A key of :data:`padim_core.backbones.BACKBONES`.
        pre_trained: Load ImageNet weights.
        n_features: Random channels kept; the backbone's default if None.
        seed: Seed of the random channel subset.
        weights: Optional local weights file for the backbone.
        image_size: Side of the square input the model is used at.
    """

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        backbone: str = "resnet18",
        pre_trained: bool = True,
        n_features: int | None = None,
        seed: int = 0,
        weights: str | Path | None = None,
        image_size: int = DEFAULT_IMAGE_SIZE,
    ) -> None:
        super().__init__()
        self.config = make_config(
            backbone, layers, n_features, image_size, seed, pre_trained
        )
        self.feature_extractor = build_feature_extractor(
            backbone, self.config.layers, pre_trained, weights, seed=seed
        )
        total = get_spec(backbone).channels(self.config.layers)
        self.register_buffer(
            "channel_index", select_channels(total, self.config.n_features, seed)
        )
        self.gaussian: Gaussian | None = None

    def train(self, mode: bool = True) -> PadimModel:
        """Switch mode; the frozen backbone stays in eval mode."""
        super().train(mode)
        self.feature_extractor.eval()
        return self

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor] | Tensor:
        """Feature maps by layer (training) or anomaly maps (N, H, W) (eval)."""
        features = self.feature_extractor(images)
        if self.training:
            return features
        distances = self.patch_distances(self.generate_embedding(features))
        return anomaly_map.anomaly_maps(distances, tuple(images.shape[-2:]))

    def generate_embedding(
        self, features: dict[str, Tensor], out: Tensor | None = None
    ) -> Tensor:
        """Concatenate the chosen channels on the finest grid, (N, C, h, w).

        Channels are picked before upsampling, which gives the same result as
        upsampling every channel first, at a fraction of the cost. The result
        is a view of an (h, w, N, C) tensor, the layout the Gaussian reads, so
        each layer is transposed once, on its own grid, before upsampling.

        Args:
            features: Feature maps by layer, as the feature extractor gives.
            out: Where to write, float32 (h, w, N, C); a new tensor if None.
        """
        spec = get_spec(self.config.backbone)
        first = features[self.config.layers[0]]
        n, height, width = first.shape[0], first.shape[2], first.shape[3]
        shape = (height, width, n, self.config.n_features)
        if out is None:
            out = first.new_empty(shape)
        elif tuple(out.shape) != shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape}")
        offset, start = 0, 0
        for layer in self.config.layers:
            channels = spec.layers[layer][1]
            index = self.channel_index
            local = index[(index >= offset) & (index < offset + channels)] - offset
            offset += channels
            if local.numel() == 0:
                continue
            part = _pick_batch_inner(features[layer], local)
            _upsample_into(out[:, :, :, start : start + len(local)], part)
            start += len(local)
        return out.permute(2, 3, 0, 1)

    def patch_distances(self, embedding: Tensor) -> Tensor:
        """Mahalanobis distance per patch, (N, h, w)."""
        if self.gaussian is None:
            raise RuntimeError("the model is not fitted yet")
        return self.gaussian.mahalanobis(embedding)


@dataclass
class Thresholds:
    """Decision thresholds and the range used to normalise scores.

    ``image`` and ``pixel`` are raw Mahalanobis distances; None means unset.
    ``score_min`` and ``score_max`` map normalised scores to [0, 1].
    """

    image: float | None = None
    pixel: float | None = None
    score_min: float | None = None
    score_max: float | None = None


@dataclass
class Prediction:
    """Result for a batch of images.

    Attributes:
        names: The images' names.
        scores: Image scores (N,), the maxima of ``maps``.
        distances: Patch distances (N, h, w) on the feature grid.
        maps: Blurred anomaly maps (N, H, W) at the model's input size.
        sizes: Each image's original (width, height).
    """

    names: list[str]
    scores: Tensor
    distances: Tensor
    maps: Tensor
    sizes: list[tuple[int, int]]


@dataclass
class FitReport:
    """What a fit used and skipped, and how long it took."""

    images: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0


ProgressCallback = Callable[[int, int], None]
EmbeddingObserver = Callable[[Tensor], None]
BatchObserver = Callable[[Batch, Tensor], None]


class Padim:
    """Fit PaDiM on images of good parts and score new images.

    Args:
        backbone: A key of :data:`padim_core.backbones.BACKBONES`.
        layers: Backbone layers; the table's default if None.
        pre_trained: Load ImageNet weights.
        n_features: Random channels kept; the table's default if None.
        image_size: Side of the square model input.
        seed: Seed of the random channel subset.
        weights: Optional local weights file for the backbone.
        device: Torch device for the backbone and the statistics.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[str] | None = None,
        pre_trained: bool = True,
        n_features: int | None = None,
        image_size: int = DEFAULT_IMAGE_SIZE,
        seed: int = 0,
        weights: str | Path | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.model = PadimModel(
            layers, backbone, pre_trained, n_features, seed, weights, image_size
        )
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.stats: RunningGaussian | None = None
        self.thresholds = Thresholds()
        self.metadata: dict = {}

    @property
    def config(self) -> PadimConfig:
        """The model's configuration."""
        return self.model.config

    @property
    def n_images(self) -> int:
        """Number of training images in the statistics."""
        return 0 if self.stats is None else self.stats.count

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Embeddings (N, C, h, w) of normalised images (N, 3, H, W)."""
        features = self.model.feature_extractor(images.to(self.device))
        return self._embedding(features)

    def _embedding(
        self, features: dict[str, Tensor], out: Tensor | None = None
    ) -> Tensor:
        embedding = self.model.generate_embedding(features, out)
        if not all_finite(embedding):
            raise ValueError(
                "the backbone gave NaN or infinite features; its weights are damaged"
            )
        return embedding

    @torch.no_grad()
    def partial_fit(
        self, images: Tensor, observe: EmbeddingObserver | None = None
    ) -> None:
        """Add a batch of normalised good images (N, 3, H, W) to the statistics.

        The embeddings are written straight into the statistics' own buffer.

        Args:
            images: The batch.
            observe: Called with the batch's embeddings, float32 (P, N, C),
                before they are added; it must not change them.
        """
        self._check_input(images)
        features = self.model.feature_extractor(images.to(self.device))
        h, w = features[self.config.layers[0]].shape[-2:]
        if self.stats is None:
            self.stats = RunningGaussian.empty(h * w, self.config.n_features)
            self.stats.shift = self.stats.shift.to(self.device)
            self.stats.sum = self.stats.sum.to(self.device)
            self.stats.scatter = self.stats.scatter.to(self.device)
        room = self.stats.reserve(len(images))
        self._embedding(features, out=room.unflatten(0, (h, w)))
        if observe is not None:
            observe(room)
        self.stats.commit()
        self.model.gaussian = None

    def finalize(self) -> Padim:
        """Invert the covariances so the model can score images."""
        if self.stats is None or self.stats.count == 0:
            raise ValueError("no training images were usable; nothing to fit")
        self.model.gaussian = self.stats.to_gaussian()
        if self.stats.count > 1 and not _features_vary(self.stats):
            warnings.warn(
                f"the {self.stats.count} training images gave identical features "
                "(constant or duplicate images?); every difference will score high",
                FewImagesWarning,
                stacklevel=2,
            )
        logger.info("fitted PaDiM on %d images", self.stats.count)
        return self

    def fit(
        self,
        sources: Iterable[str | Path | tuple[str, str | Path | bytes | Image.Image]],
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: ProgressCallback | None = None,
    ) -> FitReport:
        """Fit (or extend the fit) on image files, skipping unusable ones.

        Args:
            sources: Paths, or (name, path / bytes / PIL image) pairs.
            batch_size: Images per forward pass.
            progress: Called with (images done, images total) after each batch.

        Returns:
            A report of the images used and skipped.

        Raises:
            ValueError: If no image at all could be used.
        """
        start = time.perf_counter()
        report = self.add_images(sources, batch_size, progress)
        self.finalize()
        report.seconds = time.perf_counter() - start
        self.metadata["fit_seconds"] = report.seconds
        return report

    def add_images(
        self,
        sources: Iterable[str | Path | tuple[str, str | Path | bytes | Image.Image]],
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: ProgressCallback | None = None,
        observe: BatchObserver | None = None,
    ) -> FitReport:
        """Add image files to the statistics, without :meth:`finalize`.

        Args:
            sources: Paths, or (name, path / bytes / PIL image) pairs.
            batch_size: Images per forward pass.
            progress: Called with (images done, images total) after each batch.
            observe: Called with each usable batch and its embeddings, float32
                (P, N, C), before they are added; it must not change them.

        Returns:
            A report of the images used and skipped; ``seconds`` is not set.

        Raises:
            ValueError: If no image at all could be used.
        """
        report = FitReport()
        for batch in iter_batches(sources, self.config.image_size, batch_size):
            report.skipped.extend(batch.skipped)
            if batch.tensor is not None:
                seen = None if observe is None else functools.partial(observe, batch)
                self.partial_fit(batch.tensor, seen)
                report.images += len(batch.names)
            if progress is not None:
                progress(batch.done, batch.total)
        if report.images == 0 and self.n_images == 0:
            first = report.skipped[0] if report.skipped else Skipped("", "no files")
            raise ValueError(
                f"none of the {len(report.skipped)} files could be used as an image "
                f"(first: {first.name}: {first.reason})"
            )
        return report

    @torch.no_grad()
    def predict_tensor(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Scores (N,), distances (N, h, w) and maps (N, H, W) of a batch."""
        self._check_input(images)
        gaussian = self.model.gaussian
        if gaussian is None or not gaussian.usable:
            if self.stats is None:
                raise RuntimeError("the model is not fitted yet")
            self.finalize()
        distances = self.model.patch_distances(self.embed(images)).cpu()
        maps = anomaly_map.anomaly_maps(distances, tuple(images.shape[-2:]))
        return anomaly_map.image_scores(maps), distances, maps

    def predict_batches(
        self,
        sources: Iterable[str | Path | tuple[str, str | Path | bytes | Image.Image]],
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> Iterable[tuple[Prediction | None, list[Skipped], Batch]]:
        """Score image files batch by batch, skipping unusable ones."""
        for batch in iter_batches(sources, self.config.image_size, batch_size):
            prediction = None
            if batch.tensor is not None:
                scores, distances, maps = self.predict_tensor(batch.tensor)
                prediction = Prediction(
                    batch.names, scores, distances, maps, batch.sizes
                )
            yield prediction, batch.skipped, batch

    def predict(
        self,
        sources: Iterable[str | Path | tuple[str, str | Path | bytes | Image.Image]],
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> tuple[Prediction | None, list[Skipped]]:
        """Score image files and gather all results in one :class:`Prediction`."""
        parts: list[Prediction] = []
        skipped: list[Skipped] = []
        for prediction, batch_skipped, _ in self.predict_batches(sources, batch_size):
            skipped.extend(batch_skipped)
            if prediction is not None:
                parts.append(prediction)
        if not parts:
            return None, skipped
        return concat_predictions(parts), skipped

    def _check_input(self, images: Tensor) -> None:
        size = self.config.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(
                f"expected images of shape (N, 3, {size}, {size}), "
                f"got {tuple(images.shape)}"
            )

    def with_thresholds(self, **values: float | None) -> Padim:
        """Set thresholds (see :class:`Thresholds`) and return self."""
        self.thresholds = replace(self.thresholds, **values)
        return self


def _features_vary(stats: RunningGaussian) -> bool:
    """Whether any feature varies across the training images, beyond rounding."""
    spread = stats.scatter_diagonal() - stats.sum**2 / stats.count
    scale = 1.0 + float(stats.shift.abs().max()) ** 2
    return bool(spread.max() > IDENTICAL_TOLERANCE * stats.count * scale)


def concat_predictions(parts: Sequence[Prediction]) -> Prediction:
    """Join batch predictions into one."""
    return Prediction(
        names=[name for part in parts for name in part.names],
        scores=torch.cat([part.scores for part in parts]),
        distances=torch.cat([part.distances for part in parts]),
        maps=torch.cat([part.maps for part in parts]),
        sizes=[size for part in parts for size in part.sizes],
    )
