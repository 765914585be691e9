"""Labelled test sets in the MVTec AD folder layout.

<root>/test/good/*                      normal images
<root>/test/<defect>/*                  defective images
<root>/ground_truth/<defect>/<stem>_mask.png   optional pixel masks
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from padim_core.images import IMAGE_EXTENSIONS, Skipped, read_image

NORMAL_CLASS = "good"


@dataclass(frozen=True)
class Sample:
    """One labelled test image."""

    path: Path
    defect: str
    mask_path: Path | None

    @property
    def label(self) -> int:
        """1 for a defective image, 0 for a normal one."""
        return int(self.defect != NORMAL_CLASS)


def read_test_set(root: str | Path) -> tuple[list[Sample], list[Skipped]]:
    """List the test images of an MVTec-layout folder with labels and masks.

    Raises:
        ValueError: If ``root/test`` is missing or holds no class folders.
    """
    root = Path(root)
    test = root / "test"
    if not test.is_dir():
        raise ValueError(f"{root}: no test/ folder (expected the MVTec layout)")
    classes = sorted(p for p in test.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{test}: no class folders such as good/")
    samples, skipped = [], []
    for folder in classes:
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append(Skipped(str(path), "not an image file extension"))
                continue
            mask = root / "ground_truth" / folder.name / f"{path.stem}_mask.png"
            has_mask = folder.name != NORMAL_CLASS and mask.is_file()
            samples.append(Sample(path, folder.name, mask if has_mask else None))
    return samples, skipped


def read_mask(sample: Sample, size: int) -> np.ndarray:
    """The sample's mask at ``size`` x ``size`` as bool; all False if none.

    Nearest-neighbour resizing keeps the mask binary. The mask file is read
    with the same checks as any image.

    Raises:
        ImageError: If the mask file cannot be used as an image.
    """
    if sample.mask_path is None:
        return np.zeros((size, size), dtype=bool)
    mask = read_image(sample.mask_path, warn_flat=False).convert("L")
    resized = mask.resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(resized) >= 128
