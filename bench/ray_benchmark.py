"""Images per second of the Ray engine with 1 and 2 local workers.

    .venv/bin/python bench/ray_benchmark.py [--images 64] [--maps] [--out FILE]

Fits on the first good training images of ../shared/datasets/bsdata and
scores as many test images (good and pitted), once in this process and then
on a local Ray cluster bound to 127.0.0.1 with 1 and 2 workers. Each Ray time
runs from the call to the last result: the workers' start (a fresh Python
with torch, then the model) is in it, the cluster's start is not and is shown
apart. Ray workers score as the command line has them, sending scores and
patch distances back; ``--maps`` has them send the full anomaly maps too.
Needs requirements-ray.txt. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from padim_core import distributed
from padim_core.model import DEFAULT_BATCH_SIZE, Padim

DATA = ROOT.parent / "shared" / "datasets" / "bsdata"
BACKBONE = "efficientnet_lite0"  # bundled ImageNet weights: no download
IMAGE_SIZE = 256
WORKER_COUNTS = (1, 2)


def build_padim() -> Padim:
    return Padim(backbone=BACKBONE, image_size=IMAGE_SIZE)


def image_paths(data: Path, count: int) -> tuple[list[Path], list[Path]]:
    """``count`` training images, and ``count`` test images of both kinds."""
    train = sorted((data / "train" / "good").iterdir())[:count]
    good = sorted((data / "test" / "good").iterdir())[: count // 2]
    pitting = sorted((data / "test" / "pitting").iterdir())[: count - len(good)]
    if len(train) < count or len(good) + len(pitting) < count:
        raise SystemExit(f"{data} holds fewer than {count} images of each kind")
    return train, good + pitting


class Clock:
    """Times one job: its start, its first finished batch, its last one."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.first_images = 0
        self.end = self.start

    def batch_done(self, done: int, total: int = 0) -> None:
        self.end = time.perf_counter()
        if self.first is None:
            self.first, self.first_images = self.end, done

    def rates(self, images: int) -> tuple[float, float]:
        """Images per second over the whole job, and after its first batch."""
        whole = images / (self.end - self.start)
        rest = images - self.first_images
        return whole, rest / (self.end - self.first) if rest else float("nan")


def time_fit(fit: Callable[[Callable[[int, int], None]], object], images: int):
    clock = Clock()
    fit(clock.batch_done)
    clock.end = time.perf_counter()  # the merge and inversion count too
    return clock.rates(images)


def time_predict(batches, images: int) -> tuple[float, float]:
    clock = Clock()
    for _, _, batch in batches:
        clock.batch_done(batch.done)
    return clock.rates(images)


def measure(
    train: list[Path], test: list[Path], batch_size: int, maps: bool = False
) -> tuple[dict[str, dict[str, tuple[float, float]]], float]:
    """Rates of fit and predict by engine, and the Ray cluster's start time."""
    rates = {}
    local = build_padim()
    rates["this process"] = {
        "fit": time_fit(lambda done: local.fit(train, batch_size, done), len(train)),
        "predict": time_predict(local.predict_batches(test, batch_size), len(test)),
    }

    start = time.perf_counter()
    with distributed.connect():
        cluster_start = time.perf_counter() - start
        for workers in WORKER_COUNTS:
            padim = build_padim()
            fit = functools.partial(
                distributed.fit, padim, train, batch_size, workers=workers
            )
            batches = distributed.predict_batches(
                local, test, batch_size, workers=workers, maps=maps
            )
            rates[f"Ray, {workers} worker{'s' * (workers > 1)}"] = {
                "fit": time_fit(lambda done, fit=fit: fit(progress=done), len(train)),
                "predict": time_predict(batches, len(test)),
            }
    return rates, cluster_start


def table(
    rates: dict[str, dict[str, tuple[float, float]]],
    train: int,
    test: int,
    cluster_start: float,
) -> str:
    heading = (
        f"Ray engine on {os.cpu_count()} CPUs: {BACKBONE} at {IMAGE_SIZE} px, "
        f"fit on {train} images, predict on {test}, images per second."
    )
    lines = [
        heading,
        "",
        "| engine | fit | fit, after 1st batch | predict | predict, after 1st batch |",
        "|---|---|---|---|---|",
    ]
    for engine, row in rates.items():
        cells = [f"{rate:.1f}" for job in ("fit", "predict") for rate in row[job]]
        lines.append(f"| {engine} | " + " | ".join(cells) + " |")
    note = (
        "A job's rate counts from the call to the last result, so for Ray it "
        "includes starting the workers (a fresh Python with torch each); the "
        '"after 1st batch" rates leave that out. Starting the local cluster '
        f"itself took {cluster_start:.1f} s and is in neither."
    )
    lines += ["", note]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64, help="images per job")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, help="also write the table here")
    parser.add_argument(
        "--maps", action="store_true", help="Ray workers send the full maps back"
    )
    args = parser.parse_args(argv)

    train, test = image_paths(args.data, args.images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few images for many channels
        rates, cluster_start = measure(train, test, args.batch_size, args.maps)
    text = table(rates, len(train), len(test), cluster_start)
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main(sys.argv[1:])
