"""Cached models and cached scores, so moving a threshold never reruns the net.

Models are cached as resources, keyed by file path and modification time.
Scores are cached as data, chunk by chunk, keyed by the model's fingerprint
(which saving thresholds leaves alone) and the images' keys: an interrupted
run picks up where it stopped, and a threshold change only re-colours.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import streamlit as st
import torch

from app_ui.sources import Item
from app_ui.widgets import time_left_text
from padim_core import anomaly_map, metrics
from padim_core.images import Skipped
from padim_core.model import Padim, Thresholds
from padim_core.model_file import load_model
from padim_core.workspace import MIN_SPAN_FRACTION, ModelEntry, weights_missing

# Images per cached chunk: small enough for a lively progress bar, large
# enough to batch the network well on a CPU.
CHUNK = 8


class WeightsMissingError(RuntimeError):
    """The model's backbone weights are not on this machine."""


@st.cache_resource(max_entries=3, show_spinner=False)
def _load(path: str, mtime_ns: int, device: str) -> Padim:
    return load_model(path, device=device)


def cached_model(entry: ModelEntry, device: str) -> Padim:
    """The fitted model of ``entry`` on ``device``, loaded once per file version.

    Raises:
        WeightsMissingError: If the backbone's weights are not here (checked
            first, so nothing is ever downloaded).
        ModelFileError: If the file is not a usable model.
    """
    problem = weights_missing(entry.config)
    if problem is not None:
        raise WeightsMissingError(f"model {entry.name!r} cannot be used: {problem}")
    return _load(str(entry.path), entry.path.stat().st_mtime_ns, device)


@dataclass
class Scored:
    """Scores of a set of images under one model.

    Attributes:
        names: Names of the images that could be scored.
        scores: Image scores (N,), raw Mahalanobis distances.
        distances: Patch distances (N, h, w) on the feature grid.
        sizes: Each image's original (width, height).
        image_size: The model's input side; maps are (N, S, S).
        skipped: Images that could not be read, with the reason.
    """

    names: list[str] = field(default_factory=list)
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    distances: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 1)))
    sizes: list[tuple[int, int]] = field(default_factory=list)
    image_size: int = 0
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    def map(self, index: int) -> np.ndarray:
        """The blurred anomaly map (S, S) of one image, float32."""
        return maps_from_distances(self.distances[index : index + 1], self.image_size)[
            0
        ]

    def maps(self) -> np.ndarray:
        """The blurred anomaly maps (N, S, S) of all images, float32."""
        return maps_from_distances(self.distances, self.image_size)


def maps_from_distances(distances: np.ndarray, image_size: int) -> np.ndarray:
    """Upsample and blur patch distances (N, h, w) into maps (N, S, S).

    The same computation as the model's own, so map maxima equal the scores.
    """
    if len(distances) == 0:
        return np.zeros((0, image_size, image_size), np.float32)
    grid = torch.from_numpy(np.ascontiguousarray(distances, dtype=np.float32))
    return anomaly_map.anomaly_maps(grid, (image_size, image_size)).numpy()


@st.cache_data(max_entries=4096, show_spinner=False)
def _score_chunk(
    fingerprint: str, keys: tuple[str, ...], device: str, _entry: ModelEntry, _items
) -> Scored:
    padim = cached_model(_entry, device)
    prediction, skipped = padim.predict([item.pair() for item in _items], len(_items))
    scored = Scored(image_size=padim.config.image_size, skipped=skipped)
    if prediction is not None:
        scored.names = prediction.names
        scored.scores = prediction.scores.numpy()
        scored.distances = prediction.distances.numpy()
        scored.sizes = prediction.sizes
    return scored


def score_items(
    entry: ModelEntry, items: Sequence[Item], device: str, label: str = "Scoring"
) -> Scored:
    """Score images with ``entry``, chunk by chunk, with a progress bar.

    Raises:
        WeightsMissingError, ModelFileError: If the model cannot be loaded.
    """
    chunks = [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]
    parts: list[Scored] = []
    bar = st.empty()
    start, done = time.perf_counter(), 0
    for chunk in chunks:
        keys = tuple(item.key for item in chunk)
        parts.append(_score_chunk(entry.fingerprint, keys, device, entry, chunk))
        done += len(chunk)
        if len(chunks) > 1:
            elapsed = time.perf_counter() - start
            text = time_left_text(label, done, len(items), elapsed)
            bar.progress(done / len(items), text=text)
    bar.empty()
    return concat(parts, entry.config.image_size)


def concat(parts: Sequence[Scored], image_size: int) -> Scored:
    """Join chunk results into one."""
    usable = [part for part in parts if len(part)]
    skipped = [item for part in parts for item in part.skipped]
    if not usable:
        return Scored(image_size=image_size, skipped=skipped)
    return Scored(
        names=[name for part in usable for name in part.names],
        scores=np.concatenate([part.scores for part in usable]),
        distances=np.concatenate([part.distances for part in usable]),
        sizes=[size for part in usable for size in part.sizes],
        image_size=image_size,
        skipped=skipped,
    )


@dataclass(frozen=True)
class Scale:
    """The one colour scale of a model: raw ``low``, ``threshold``, ``high``.

    Raw values map piecewise-linearly to 0, 0.5 and 1, the same for every
    image, so a colour always means the same distance.
    """

    low: float
    threshold: float
    high: float

    def normalize(self, values: np.ndarray | float) -> np.ndarray:
        """Normalised values of raw ones, in [0, 1]."""
        return metrics.normalize_scores(
            np.asarray(values, dtype=np.float64), self.threshold, self.low, self.high
        )

    def raw(self, normalized: float) -> float:
        """The raw value that normalises to ``normalized``."""
        if normalized <= 0.5:
            return self.low + (self.threshold - self.low) * normalized / 0.5
        return self.threshold + (self.high - self.threshold) * (normalized - 0.5) / 0.5


def scale_of(thresholds: Thresholds, scores: np.ndarray | None = None) -> Scale | None:
    """The colour scale of ``thresholds``, completed from ``scores`` if needed.

    Returns None when there is no image threshold and no score to start from.
    """
    threshold = thresholds.image
    if threshold is None:
        if scores is None or len(scores) == 0:
            return None
        threshold = float(np.median(scores))
    low = thresholds.score_min
    if low is None:
        low = float(np.min(scores)) if scores is not None and len(scores) else 0.0
    high = thresholds.score_max
    span = max(threshold - low, MIN_SPAN_FRACTION * abs(threshold), 1e-6)
    if low >= threshold:  # a threshold moved below the saved range
        low = threshold - span
    if high is None or high <= threshold:  # or above it
        high = threshold + span
    return Scale(low, threshold, high)


def verdicts(scores: np.ndarray, threshold: float | None) -> list[str]:
    """``fail`` where ``score >= threshold``, else ``pass``; ``unset`` without one."""
    if threshold is None:
        return ["unset"] * len(scores)
    return ["fail" if score >= threshold else "pass" for score in scores]
