"""The demo set: monocrystalline solar cells from the ``elpv-dataset`` package.

Electroluminescence images of solar cells, 300 x 300 greyscale, each with a
defect probability given by experts (Buerhop-Lutz et al., "A Benchmark for
Visual Identification of Defective Solar Cells in Electroluminescence
Imagery", EU PVSEC 2018). Cells of probability 0 are good, of probability 1
defective; the uncertain ones in between are left out. There are no masks.

The splits are fixed and disjoint, taken in file order, so every run of the
demo sees the same images: a small training set (for speed on a CPU), a
labelled validation set, a few cells to inspect and a lot for batch scoring.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_PACKAGE = "elpv_dataset"
CELL_TYPE = "mono"
GOOD_PROBABILITY = 0.0
DEFECTIVE_PROBABILITY = 1.0

# Split sizes. 120 good cells fit in well under a minute on two CPU cores and
# give more images than channels, so the covariances rest on data.
N_TRAIN = 120
N_VALIDATION_GOOD = 40
N_VALIDATION_DEFECTIVE = 40
N_INSPECT_DEFECTIVE = 6
N_INSPECT_GOOD = 2
N_BATCH_GOOD = 40
N_BATCH_DEFECTIVE = 40


class DemoUnavailableError(RuntimeError):
    """The demo images are not installed."""


@dataclass(frozen=True)
class DemoCell:
    """One labelled cell image."""

    path: Path
    probability: float
    cell_type: str

    @property
    def name(self) -> str:
        """The image's file name."""
        return self.path.name


def data_dir() -> Path:
    """The package's data folder, holding ``labels.csv`` and ``images/``.

    Raises:
        DemoUnavailableError: If the package is not installed.
    """
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or spec.origin is None:
        raise DemoUnavailableError(
            f"the demo images need the Python package {DEMO_PACKAGE.replace('_', '-')}"
            " (pip install elpv-dataset)"
        )
    return Path(spec.origin).parent / "data"


@functools.cache
def read_labels() -> tuple[DemoCell, ...]:
    """Every cell of the package with its defect probability and type.

    Raises:
        DemoUnavailableError: If the package or its label file is missing.
    """
    folder = data_dir()
    labels = folder / "labels.csv"
    if not labels.is_file():
        raise DemoUnavailableError(f"the demo's label file {labels} is missing")
    cells = []
    for line in labels.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) != 3:
            continue
        path, probability, cell_type = fields
        cells.append(DemoCell(folder / path, float(probability), cell_type))
    logger.info("read %d demo cell labels from %s", len(cells), labels)
    return tuple(cells)


def _cells(probability: float) -> list[Path]:
    """Paths of the monocrystalline cells of one probability, in file order."""
    chosen = [
        cell.path
        for cell in read_labels()
        if cell.cell_type == CELL_TYPE and cell.probability == probability
    ]
    return sorted(chosen)


def _good() -> list[Path]:
    return _cells(GOOD_PROBABILITY)


def _defective() -> list[Path]:
    return _cells(DEFECTIVE_PROBABILITY)


def train_images(n: int = N_TRAIN) -> list[Path]:
    """The first ``n`` good cells (at most :data:`N_TRAIN`), to fit on."""
    if not 1 <= n <= N_TRAIN:
        raise ValueError(f"n={n} training images is not allowed: choose 1 to {N_TRAIN}")
    return _good()[:n]


def validation_images() -> tuple[list[Path], list[Path]]:
    """Good and defective cells for choosing thresholds: (good, defective)."""
    good = _good()[N_TRAIN : N_TRAIN + N_VALIDATION_GOOD]
    return good, _defective()[:N_VALIDATION_DEFECTIVE]


def inspection_images() -> list[Path]:
    """A few cells to inspect: defective ones first, then good ones."""
    start = N_TRAIN + N_VALIDATION_GOOD
    defective = _defective()[
        N_VALIDATION_DEFECTIVE : N_VALIDATION_DEFECTIVE + N_INSPECT_DEFECTIVE
    ]
    return defective + _good()[start : start + N_INSPECT_GOOD]


def batch_images() -> list[Path]:
    """A mixed lot of cells to score in one go, none of them seen before."""
    good_start = N_TRAIN + N_VALIDATION_GOOD + N_INSPECT_GOOD
    defective_start = N_VALIDATION_DEFECTIVE + N_INSPECT_DEFECTIVE
    good = _good()[good_start : good_start + N_BATCH_GOOD]
    defective = _defective()[defective_start : defective_start + N_BATCH_DEFECTIVE]
    return sorted(good + defective)
