"""Fit and evaluate PaDiM on every dataset in ../shared/datasets, via the CLI.

    .venv/bin/python bench/evaluate_datasets.py --out results/datasets.md
    .venv/bin/python bench/evaluate_datasets.py --first 300 \
        --out results/datasets_first300.md

Prints a markdown table of image AUROC, pixel AUROC and AUPRO per dataset and
backbone, and writes it to --out. Every number comes from
``python -m padim_core fit`` then ``python -m padim_core evaluate``.

``--first N`` fits on the first N training images in file-name order only,
the protocol of the independent figures in ../shared/datasets/README.md, so
the two can be compared like for like.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from padim_core.images import find_images

DATASETS = ROOT.parent / "shared" / "datasets"

# (label, extra fit arguments): ImageNet weights that ship offline, and random
# weights as the floor any learnt feature should beat.
CONFIGS = [
    ("efficientnet_lite0, ImageNet weights", ["--backbone", "efficientnet_lite0"]),
    ("resnet18, random weights", ["--backbone", "resnet18", "--no-pretrained"]),
]


def run(arguments: list[str]) -> str:
    """Run the CLI and return its stdout; stop on failure."""
    command = [sys.executable, "-m", "padim_core", "-q", *arguments]
    result = subprocess.run(
        command, check=False, cwd=ROOT, capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr}")
    return result.stdout


def first_images(train: Path, count: int, folder: Path) -> Path:
    """A folder of links to the first ``count`` images of ``train``, by name."""
    images, _ = find_images([train])
    if len(images) < count:
        sys.exit(f"{train} has {len(images)} images, fewer than --first {count}")
    subset = folder / f"first{count}"
    subset.mkdir()
    for index, image in enumerate(images[:count]):
        (subset / f"{index:05d}{image.suffix}").symlink_to(image.resolve())
    return subset


def evaluate(
    dataset: Path, fit_arguments: list[str], folder: Path, first: int | None
) -> dict:
    """Fit on dataset/train (or its first images), evaluate on dataset/test."""
    model = folder / f"{dataset.name}.safetensors"
    train = dataset / "train"
    start = time.perf_counter()
    if first is not None:
        train = first_images(train, first, Path(tempfile.mkdtemp(dir=folder)))
    run(["fit", "--train", str(train), "--out", str(model), *fit_arguments])
    fit_seconds = time.perf_counter() - start
    result = json.loads(
        run(["evaluate", "--model", str(model), "--data", str(dataset)])
    )
    result["fit_seconds"] = fit_seconds
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "datasets.md")
    parser.add_argument("--datasets", nargs="+", default=["bsdata", "magnetic_tile"])
    parser.add_argument(
        "--first",
        type=int,
        metavar="N",
        help="fit on the first N training images by file name, not on all",
    )
    args = parser.parse_args()
    if args.first is not None and args.first < 1:
        parser.error("--first must be at least 1")

    lines = [
        (
            "| dataset | backbone | image AUROC | its 95 % bootstrap interval "
            "| pixel AUROC | AUPRO | images (good / defect) | fit s | evaluate s |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as folder:
        for name in args.datasets:
            for label, fit_arguments in CONFIGS:
                r = evaluate(DATASETS / name, fit_arguments, Path(folder), args.first)
                lines.append(
                    f"| {name} | {label} | {r['image_auroc']:.3f} | "
                    f"{r['image_auroc_low']:.3f} to {r['image_auroc_high']:.3f} | "
                    f"{r['pixel_auroc']:.3f} | {r['aupro']:.3f} | "
                    f"{r['n_good']} / {r['n_defect']} | {r['fit_seconds']:.0f} | "
                    f"{r['seconds']:.0f} |"
                )
                print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
