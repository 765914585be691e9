"""Labelled validation sets: good and defective images, and optional masks.

Images come from the demo, from separate uploads per class, or from one zip
or folder in the MVTec AD layout (``test/good/``, ``test/<defect>/``,
``ground_truth/<defect>/<name>_mask.png``). Masks are matched to defective
images by file name, with the defect folder to tell equal names apart.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import streamlit as st
from PIL import Image

from app_ui.scoring import maps_from_distances
from app_ui.sources import (
    DEMO,
    FOLDER,
    Item,
    default_source,
    demo_items,
    demo_mismatch_note,
    upload_items,
    uploader,
)
from app_ui.state import PERSIST
from padim_core import demo, metrics
from padim_core.images import ImageError, Skipped, read_image
from padim_core.workspace import ModelEntry

SEPARATE = "Upload good and defective images"
MVTEC = "Upload a zip or folder in MVTec layout"
MASK_SUFFIX = "_mask"
GOOD_FOLDER = "good"


@dataclass
class Validation:
    """A labelled validation set.

    Attributes:
        good: Images of good parts.
        defective: Images of defective parts.
        masks: Defect masks by the name of the defective image they belong to.
        skipped: Files left out, with the reason.
    """

    good: list[Item] = field(default_factory=list)
    defective: list[Item] = field(default_factory=list)
    masks: dict[str, Item] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def key(self) -> str:
        """A short id of the images, their labels and masks: another set, another id."""
        content = [
            [item.key for item in self.good],
            [item.key for item in self.defective],
            sorted((name, mask.key) for name, mask in self.masks.items()),
        ]
        return hashlib.sha1(json.dumps(content).encode()).hexdigest()[:12]


def pick_validation(key: str, model: ModelEntry | None = None) -> Validation:
    """Let the user take the demo's validation set or upload a labelled one.

    A ``model`` not fitted on the demo starts on the uploads, and a note says
    so when the demo is chosen all the same.
    """
    choices = [DEMO, SEPARATE, MVTEC]
    choice = st.radio(
        "Validation images",
        choices,
        index=choices.index(default_source(choices, model)),
        horizontal=True,
        key=f"{key}_source",
        persist_state=PERSIST,
        captions=[
            (
                f"{demo.N_VALIDATION_GOOD} good and {demo.N_VALIDATION_DEFECTIVE} "
                "defective cells, no masks"
            ),
            "masks optional",
            "test/good, test/<defect>, ground_truth/<defect>",
        ],
    )
    if choice == DEMO:
        demo_mismatch_note(model)
        good, defective = demo.validation_images()
        return Validation(demo_items(good), demo_items(defective))
    if choice == SEPARATE:
        return _separate(key)
    return _mvtec(key)


def _separate(key: str) -> Validation:
    left, middle, right = st.columns(3)
    with left:
        good, skipped_good = upload_items(uploader("Good parts", f"{key}_good"))
    with middle:
        defective, skipped_bad = upload_items(uploader("Defective parts", f"{key}_bad"))
    with right:
        masks, skipped_masks = upload_items(
            uploader("Defect masks (optional)", f"{key}_masks")
        )
    matched, unmatched = match_masks(defective, masks)
    skipped = skipped_good + skipped_bad + skipped_masks + unmatched
    return Validation(good, defective, matched, skipped)


def _mvtec(key: str) -> Validation:
    folder = st.toggle(
        "Upload a folder instead of files or a zip",
        key=f"{key}_folder",
        persist_state=PERSIST,
    )
    files = uploader(
        "Labelled images",
        f"{key}_mvtec_{FOLDER if folder else 'files'}",
        folder=folder,
    )
    items, skipped = upload_items(files)
    return split_mvtec(items, skipped)


def split_mvtec(items: Sequence[Item], skipped: list[Skipped]) -> Validation:
    """Sort items by their folders: good, defective or mask.

    When a ``test`` folder exists, only images inside it are validation
    images (a ``train`` folder beside it is left out).
    """
    has_test = any("test" in PurePosixPath(item.name).parts for item in items)
    good, defective, masks = [], [], []
    for item in items:
        parts = PurePosixPath(item.name).parts
        if "ground_truth" in parts:
            masks.append(item)
        elif has_test and "test" not in parts:
            skipped.append(Skipped(item.name, "outside the test/ folder"))
        elif len(parts) > 1 and parts[-2] == GOOD_FOLDER:
            good.append(item)
        else:
            defective.append(item)
    matched, unmatched = match_masks(defective, masks)
    return Validation(good, defective, matched, skipped + unmatched)


def _mask_key(name: str) -> tuple[str, str]:
    path = PurePosixPath(name)
    parent = path.parent.name if len(path.parts) > 1 else ""
    return parent, path.stem.removesuffix(MASK_SUFFIX)


def match_masks(
    defective: Sequence[Item], masks: Sequence[Item]
) -> tuple[dict[str, Item], list[Skipped]]:
    """Pair masks with defective images by name; report masks left over.

    ``a/001_mask.png`` (or ``a/001.png``) belongs to the image ``a/001.*``;
    without a folder match, a unique stem match is taken.
    """
    by_key = {_mask_key(mask.name): mask for mask in masks}
    by_stem: dict[str, list[Item]] = {}
    for mask in masks:
        by_stem.setdefault(_mask_key(mask.name)[1], []).append(mask)
    matched: dict[str, Item] = {}
    for image in defective:
        parent, stem = _mask_key(image.name)
        mask = by_key.get((parent, stem))
        if mask is None and len(by_stem.get(stem, [])) == 1:
            mask = by_stem[stem][0]
        if mask is not None:
            matched[image.name] = mask
    used = {mask.key for mask in matched.values()}
    unmatched = [
        Skipped(mask.name, "a mask that matches no defective image by name")
        for mask in masks
        if mask.key not in used
    ]
    return matched, unmatched


@st.cache_data(max_entries=1024, show_spinner=False)
def _mask_array(key: str, size: int, _item: Item) -> np.ndarray | None:
    try:
        image = read_image(_item.source(), _item.name)
    except ImageError:
        return None
    resized = image.resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(resized).max(axis=2) >= 128


def mask_stack(
    names: Sequence[str], masks: dict[str, Item], size: int
) -> tuple[np.ndarray, list[Skipped]]:
    """Masks (N, S, S) for ``names``; images without a mask get all False."""
    stack = np.zeros((len(names), size, size), dtype=bool)
    skipped = []
    for i, name in enumerate(names):
        item = masks.get(name)
        if item is None:
            continue
        array = _mask_array(item.key, size, item)
        if array is None:
            skipped.append(Skipped(item.name, "the mask cannot be read as an image"))
        else:
            stack[i] = array
    return stack, skipped


@st.cache_data(max_entries=16, show_spinner="Measuring the maps against the masks…")
def pixel_metrics(
    fingerprint: str,
    keys: tuple,
    _distances: np.ndarray,
    _masks: np.ndarray,
    image_size: int,
) -> dict:
    """Pixel AUROC, AUPRO and the suggested pixel threshold of scored images.

    The suggestion is :func:`padim_core.metrics.optimal_pixel_threshold`, as
    in ``evaluate``, so both give the same threshold for the same images.

    Args:
        fingerprint: The model's fingerprint; with ``keys``, the cache key.
        keys: The images' and their masks' keys.
        _distances: Patch distances (N, h, w).
        _masks: Masks (N, S, S), bool; all False for good images.
        image_size: The model's input side S.

    Returns:
        ``pixel_auroc``, ``aupro``, ``suggested`` and its ``f1``, and the
        pixel sample (``sample_masks``, ``sample_maps``) to rate other
        thresholds on.
    """
    maps = maps_from_distances(_distances, image_size)
    sample_masks, sample_maps = metrics.pixel_sample(_masks, maps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.MetricWarning)
        threshold, f1 = metrics.optimal_pixel_threshold(_masks, maps)
        return {
            "pixel_auroc": metrics.pixel_auroc(_masks, maps),
            "aupro": metrics.aupro(_masks, maps),
            "suggested": threshold,
            "f1": f1,
            "sample_maps": sample_maps,
            "sample_masks": sample_masks,
        }
