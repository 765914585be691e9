"""Command line: fit, predict and evaluate.

    python -m padim_core fit --train DIR --out MODEL [--review FILE] [...]
    python -m padim_core predict --model MODEL [--out DIR] [--csv FILE] PATH...
    python -m padim_core evaluate --model MODEL --data DIR [--json FILE]

Exit status 0 on success, 2 with a one-line message on stderr for bad
arguments or unusable input. Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from padim_core import metrics
from padim_core.anomaly_map import anomaly_maps
from padim_core.backbones import BACKBONES, WeightsUnavailableError
from padim_core.images import (
    DEFAULT_IMAGE_SIZE,
    ImageError,
    Skipped,
    find_images,
    read_image,
)
from padim_core.model import DEFAULT_BATCH_SIZE, Padim, Thresholds
from padim_core.model_file import ModelFileError, load_model, save_model
from padim_core.mvtec import read_mask, read_test_set
from padim_core.review import (
    MIN_REVIEW_IMAGES,
    TrainingReview,
    fit_with_review,
    write_csv,
)
from padim_core.visualize import add_legend, draw_outline, overlay

logger = logging.getLogger(__name__)

DEFAULT_CLI_BACKBONE = "efficientnet_lite0"


class UsageError(Exception):
    """Bad arguments or unusable input: exit 2 with this message."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the three commands."""
    parser = _Parser(prog="python -m padim_core", description=__doc__.split("\n")[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress")
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser
    )

    fit = commands.add_parser("fit", help="fit a model on images of good parts")
    fit.add_argument("--train", required=True, type=Path, help="folder of good images")
    fit.add_argument("--out", required=True, type=Path, help="model file to write")
    fit.add_argument(
        "--backbone", default=DEFAULT_CLI_BACKBONE, choices=sorted(BACKBONES)
    )
    fit.add_argument("--layers", nargs="+", help="backbone layers (default: table's)")
    fit.add_argument("--n-features", type=int, help="random channels kept")
    fit.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    fit.add_argument("--seed", type=int, default=0, help="seed of the channel subset")
    fit.add_argument("--no-pretrained", action="store_true", help="random weights")
    fit.add_argument("--weights", type=Path, help="local backbone weights file")
    fit.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    fit.add_argument(
        "--review",
        type=Path,
        metavar="FILE",
        help="also score each training image with a model fitted without it, "
        "flag those unlike the rest, and write path,out_of_fold_score,"
        "modified_z,flagged here (one more pass over the images)",
    )
    _add_engine_options(fit)

    predict = commands.add_parser("predict", help="score images with a model")
    predict.add_argument("--model", required=True, type=Path)
    predict.add_argument("--out", type=Path, help="folder for heatmap overlays (PNG)")
    predict.add_argument("--csv", type=Path, help="write path,score,verdict here")
    predict.add_argument("--threshold", type=float, help="override the image threshold")
    predict.add_argument("--weights", type=Path, help="local backbone weights file")
    predict.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    _add_engine_options(predict)
    predict.add_argument("paths", nargs="+", type=Path, help="image files or folders")

    evaluate = commands.add_parser("evaluate", help="metrics on an MVTec-layout set")
    evaluate.add_argument("--model", required=True, type=Path)
    evaluate.add_argument("--data", required=True, type=Path)
    evaluate.add_argument("--json", type=Path, help="also write the JSON here")
    evaluate.add_argument(
        "--save-thresholds",
        action="store_true",
        help="store the F1-optimal image and pixel thresholds in the model",
    )
    evaluate.add_argument("--weights", type=Path, help="local backbone weights file")
    evaluate.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    return parser


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="run in this process, or on Ray (needs requirements-ray.txt)",
    )
    parser.add_argument(
        "--address",
        help="Ray cluster to join (HOST:PORT of its head); default: a local one",
    )


def _ray_engine(args: argparse.Namespace):
    """The Ray engine module for ``--engine ray``, None for ``local``."""
    if args.engine == "local":
        if args.address is not None:
            raise UsageError("--address needs --engine ray")
        return None
    try:
        from padim_core import distributed
    except ImportError as error:
        raise UsageError(str(error)) from None
    return distributed


# Whether a progress line on stderr still waits for its end of line.
_progress_line_open = False


def _progress(quiet: bool, label: str, start: float | None = None):
    """A progress reporter; ``start`` (perf_counter) defaults to now."""
    start = time.perf_counter() if start is None else start

    def report(done: int, total: int) -> None:
        global _progress_line_open
        if quiet or total == 0:
            return
        elapsed = time.perf_counter() - start
        left = elapsed / done * (total - done) if done else math.nan
        _progress_line_open = done < total
        print(
            f"\r{label}: {done}/{total} images, {elapsed:.0f}s, ~{left:.0f}s left",
            end="" if done < total else "\n",
            file=sys.stderr,
            flush=True,
        )

    return report


def _review_progress(quiet: bool, files: int):
    """Progress of a fit with review: the fit's pass, then the review's.

    The review's clock starts when the fit's pass ends, so its time left
    counts the review alone.
    """
    fit = _progress(quiet, "fit")
    review = None

    def report(done: int, total: int) -> None:
        nonlocal review
        if done <= files:
            fit(done, files)
            if done == files:
                review = _progress(quiet, "review", time.perf_counter())
            return
        review = review or _progress(quiet, "review")
        review(done - files, total - files)

    return report


def _report_skipped(skipped: Sequence[Skipped]) -> None:
    for item in skipped:
        print(f"skipped {item.name}: {item.reason}", file=sys.stderr)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")


def run_fit(args: argparse.Namespace) -> int:
    """Fit on every image under ``--train`` and write the model file."""
    _check_batch_size(args.batch_size)
    ray_engine = _ray_engine(args)
    if not args.train.is_dir():
        raise UsageError(f"--train {args.train}: not a folder")
    if args.out.is_dir():
        raise UsageError(f"--out {args.out}: is a folder; give a model file name")
    paths, skipped = find_images([args.train])
    if not paths:
        raise UsageError(f"--train {args.train}: no image files found")
    training = {path.resolve() for path in paths}
    if args.out.resolve() in training:
        raise UsageError(
            f"--out {args.out}: is one of the training images; give a new model "
            "file name"
        )
    if args.review is not None:
        _check_review(args, ray_engine, training)
    padim = Padim(
        backbone=args.backbone,
        layers=args.layers,
        pre_trained=not args.no_pretrained,
        n_features=args.n_features,
        image_size=args.image_size,
        seed=args.seed,
        weights=args.weights,
    )
    review = None
    if args.review is not None:
        progress = _review_progress(args.quiet, len(paths))
        with warnings.catch_warnings():
            # Too few usable images ends the command with that reason below.
            warnings.filterwarnings(
                "ignore", message="the review of the training images needs"
            )
            report, review = fit_with_review(padim, paths, args.batch_size, progress)
        report.skipped.extend(review.skipped)
    elif ray_engine is None:
        report = padim.fit(paths, args.batch_size, _progress(args.quiet, "fit"))
    else:
        progress = _progress(args.quiet, "fit")
        with _standard_output(divert=True):
            report = ray_engine.fit(
                padim, paths, args.batch_size, progress, args.address
            )
    _report_skipped(skipped + report.skipped)
    padim.metadata["train_dir"] = str(args.train)
    save_model(padim, args.out)
    print(
        f"fitted {padim.config.backbone} on {report.images} images in "
        f"{report.seconds:.1f}s; model written to {args.out}",
        file=sys.stderr,
    )
    if review is not None:
        _write_review(review, args.review)
    return 0


def _check_review(args: argparse.Namespace, ray_engine, training: set[Path]) -> None:
    """Refuse ``--review`` where it cannot run, before any image is read.

    ``training`` holds the resolved paths of the training images, which the
    review's CSV must not overwrite, no more than the model file.
    """
    found = len(training)
    if ray_engine is not None:
        raise UsageError("--review runs with --engine local only")
    if str(args.review) == "-":
        raise UsageError("--review -: give a CSV file name; the review goes to a file")
    if args.review.resolve() == args.out.resolve():
        raise UsageError(
            f"--review {args.review}: is the --out model file; give the review a "
            "file of its own"
        )
    if args.review.resolve() in training:
        raise UsageError(
            f"--review {args.review}: is one of the training images; give a new CSV "
            "file name"
        )
    _check_text_output("--review", args.review, "CSV")
    if found < MIN_REVIEW_IMAGES:
        raise UsageError(
            f"--review needs at least {MIN_REVIEW_IMAGES} training images (2 per "
            f"fold); --train {args.train} has {found}"
        )


def _write_review(review: TrainingReview, path: Path) -> None:
    """Write the review's CSV and name the flagged images on stderr."""
    if review.note is not None:
        raise UsageError(f"{review.note}; the model was written, {path} was not")
    write_csv(review, path)
    for row in review.flagged:
        print(
            f"flagged {row.path}: out-of-fold score {row.score:.1f}, "
            f"modified z {row.modified_z:.1f}",
            file=sys.stderr,
        )
    look = "looks" if len(review.flagged) == 1 else "look"
    print(
        f"{len(review.flagged)} of {len(review.rows)} training images {look} unlike "
        f"the rest; see {path}",
        file=sys.stderr,
    )


def _verdict(score: float, threshold: float | None) -> str:
    if threshold is None:
        return "unset"
    return "fail" if score >= threshold else "pass"


def run_predict(args: argparse.Namespace) -> int:
    """Score images; print or write ``path,score,verdict``; draw overlays."""
    _check_batch_size(args.batch_size)
    ray_engine = _ray_engine(args)
    padim = load_model(args.model, weights=args.weights)
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise UsageError(f"--threshold must be a finite number, got {args.threshold}")
    threshold = args.threshold if args.threshold is not None else padim.thresholds.image
    _check_predict_outputs(args)
    paths, skipped = find_images(args.paths)
    if not paths:
        _report_skipped(skipped)
        raise UsageError("no image files among the paths given")
    inputs = {path.resolve() for path in paths}
    if args.csv is not None and args.csv.resolve() in inputs:
        raise UsageError(f"--csv {args.csv}: is one of the images to score")
    rows, grids = [], []
    progress = _progress(args.quiet, "predict")
    with _standard_output(divert=ray_engine is not None) as standard_output:
        if ray_engine is None:
            batches = padim.predict_batches(paths, args.batch_size)
        else:
            # Overlays are drawn from the patch distances: no maps need travel.
            batches = ray_engine.predict_batches(
                padim, paths, args.batch_size, args.address, maps=False
            )
        for prediction, batch_skipped, batch in batches:
            skipped.extend(batch_skipped)
            progress(batch.done, batch.total)
            if prediction is None:
                continue
            for name, score, grid in zip(
                prediction.names, prediction.scores.tolist(), prediction.distances
            ):
                rows.append((name, score, _verdict(score, threshold)))
                if args.out is not None:
                    grids.append(grid)
        _report_skipped(skipped)
        if not rows:
            raise UsageError("none of the images could be used")
        _write_rows(rows, args.csv, standard_output)
    if args.out is not None:
        _write_overlays(padim, rows, grids, args.out, threshold)
    if threshold is None:
        print(
            "note: the model has no image threshold; verdicts are 'unset' "
            "(give --threshold, or run evaluate --save-thresholds)",
            file=sys.stderr,
        )
    return 0


@contextlib.contextmanager
def _standard_output(divert: bool) -> Iterator[TextIO]:
    """Yield where output meant for standard output goes.

    With ``divert``, whatever else writes to file descriptor 1 during the
    block lands on standard error, and only what is written to the yielded
    handle reaches standard output. Ray's driver prints notices about dead
    workers on descriptor 1, which would otherwise mix into a CSV there.
    """
    if not divert:
        yield sys.stdout
        return
    sys.stdout.flush()
    kept = os.dup(1)
    try:
        os.dup2(2, 1)
        with open(os.dup(kept), "w", newline="", closefd=True) as handle:
            yield handle
    finally:
        sys.stdout.flush()
        os.dup2(kept, 1)
        os.close(kept)


def _check_text_output(
    option: str, path: Path, kind: str, model: Path | None = None
) -> None:
    """Refuse a CSV or JSON output that cannot be written or would replace a model.

    A model file is never overwritten by a report: neither ``model``, the
    ``--model`` in use, nor any other ``.safetensors`` file.
    """
    if model is not None and path.resolve() == model.resolve():
        raise UsageError(
            f"{option} {path}: is the --model file; give the {kind} a file of its own"
        )
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a {kind} file name")
    if not path.parent.is_dir():
        raise UsageError(f"{option} {path}: its folder does not exist")
    if path.is_file() and path.suffix.lower() == ".safetensors":
        raise UsageError(
            f"{option} {path}: is a model file; give the {kind} a file of its own"
        )


def _check_predict_outputs(args: argparse.Namespace) -> None:
    """Refuse outputs that cannot be written, before any image is scored."""
    if args.csv is not None:
        _check_text_output("--csv", args.csv, "CSV", args.model)
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: is a file; give a folder for the heatmaps")


def _write_rows(
    rows: list[tuple[str, float, str]], path: Path | None, stdout: TextIO
) -> None:
    with contextlib.ExitStack() as stack:
        handle = stdout
        if path is not None:
            handle = stack.enter_context(open(path, "w", newline=""))
        writer = csv.writer(handle)
        writer.writerow(["path", "score", "verdict"])
        for name, score, verdict in rows:
            writer.writerow([name, f"{score:.4f}", verdict])


def display_scale(thresholds: Thresholds, scores: Sequence[float]) -> Thresholds:
    """A complete colour scale: the model's thresholds, else the scores' range.

    Every image of a run shares the scale, so equal colours mean equal
    distances.
    """
    low = thresholds.score_min if thresholds.score_min is not None else 0.0
    high = thresholds.score_max if thresholds.score_max is not None else max(scores)
    middle = thresholds.image if thresholds.image is not None else (low + high) / 2
    low = min(low, middle)
    if thresholds.score_max is None:
        # No saved range: as much room above the threshold as below it.
        high = max(high, 2 * middle - low)
    high = max(high, middle)
    return Thresholds(
        image=middle, pixel=thresholds.pixel, score_min=low, score_max=high
    )


def _write_overlays(
    padim: Padim,
    rows: list[tuple[str, float, str]],
    grids: list[torch.Tensor],
    folder: Path,
    threshold: float | None,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    scale = display_scale(
        Thresholds(
            threshold,
            padim.thresholds.pixel,
            padim.thresholds.score_min,
            padim.thresholds.score_max,
        ),
        [score for _, score, _ in rows],
    )
    size = (padim.config.image_size, padim.config.image_size)
    used: set[str] = set()
    for (name, score, _), grid in zip(rows, grids):
        image = read_image(name)
        raw = anomaly_maps(grid.unsqueeze(0), size)[0].numpy()
        normalized = metrics.normalize_scores(
            raw, scale.image, scale.score_min, scale.score_max
        )
        picture = overlay(image, normalized)
        if scale.pixel is not None:
            picture = draw_outline(picture, raw >= scale.pixel)
        picture = add_legend(
            picture, scale.score_min, scale.image, scale.score_max, score
        )
        stem = Path(name).stem
        unique, k = stem, 1
        while unique in used:
            unique, k = f"{stem}_{k}", k + 1
        used.add(unique)
        picture.save(folder / f"{unique}_heatmap.png")


def run_evaluate(args: argparse.Namespace) -> int:
    """Print metrics of the model on an MVTec-layout test set as JSON."""
    _check_batch_size(args.batch_size)
    if args.json is not None:
        _check_text_output("--json", args.json, "JSON", args.model)
    start = time.perf_counter()
    try:
        samples, skipped = read_test_set(args.data)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if not samples:
        raise UsageError(f"--data {args.data}: no test images found")
    padim = load_model(args.model, weights=args.weights)
    size = padim.config.image_size
    by_name = {str(sample.path): sample for sample in samples}
    labels, scores, maps, masks = [], [], [], []
    progress = _progress(args.quiet, "evaluate")
    sources = [sample.path for sample in samples]
    for prediction, batch_skipped, batch in padim.predict_batches(
        sources, args.batch_size
    ):
        skipped.extend(batch_skipped)
        progress(batch.done, batch.total)
        if prediction is None:
            continue
        for i, name in enumerate(prediction.names):
            sample = by_name[name]
            try:
                masks.append(read_mask(sample, size))
            except ImageError as error:
                skipped.append(Skipped(name, f"its mask {error}"))
                continue
            labels.append(sample.label)
            scores.append(float(prediction.scores[i]))
            maps.append(prediction.maps[i].numpy())
    _report_skipped(skipped)
    if not labels:
        raise UsageError("none of the test images could be used")
    result = _evaluation(
        np.array(labels), np.array(scores), np.stack(maps), np.stack(masks)
    )
    result["seconds"] = round(time.perf_counter() - start, 3)
    result["skipped"] = [{"path": s.name, "reason": s.reason} for s in skipped]
    if args.save_thresholds:
        _save_thresholds(padim, args.model, result, scores)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


def _evaluation(
    labels: np.ndarray, scores: np.ndarray, maps: np.ndarray, masks: np.ndarray
) -> dict:
    """Image and pixel metrics; undefined ones are None in the JSON."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.MetricWarning)
        threshold, f1 = (math.nan, math.nan)
        if labels.any() and not labels.all():
            threshold, f1 = metrics.optimal_f1_threshold(labels, scores)
        pixel_threshold = math.nan
        if masks.any():
            pixel_threshold, _ = metrics.optimal_pixel_threshold(masks, maps)
        interval = metrics.image_auroc_interval(labels, scores)
        values = {
            "image_auroc": metrics.image_auroc(labels, scores),
            "image_auroc_low": interval[0],
            "image_auroc_high": interval[1],
            "pixel_auroc": metrics.pixel_auroc(masks, maps),
            "aupro": metrics.aupro(masks, maps),
            "image_f1": f1,
            "threshold": threshold,
            "pixel_threshold": pixel_threshold,
        }
    result = {
        key: (None if math.isnan(v) else round(float(v), 4))
        for key, v in values.items()
    }
    result["n_good"] = int((labels == 0).sum())
    result["n_defect"] = int((labels == 1).sum())
    return result


def _save_thresholds(
    padim: Padim, path: Path, result: dict, scores: list[float]
) -> None:
    padim.thresholds = Thresholds(
        image=result["threshold"],
        pixel=result["pixel_threshold"],
        score_min=float(min(scores)),
        score_max=float(max(scores)),
    )
    save_model(padim, path)
    print(f"thresholds saved in {path}", file=sys.stderr)


COMMANDS = {"fit": run_fit, "predict": run_predict, "evaluate": run_evaluate}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    original_format = warnings.formatwarning
    try:
        args = build_parser().parse_args(argv)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.formatwarning = _one_line_warning
            return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        message = "interrupted"
    except Exception as error:
        message = _error_message(error)
        if message is None:
            raise
    finally:
        warnings.formatwarning = original_format
    global _progress_line_open
    if _progress_line_open:  # end the interrupted progress line first
        print(file=sys.stderr)
        _progress_line_open = False
    print(f"error: {' '.join(message.splitlines())}", file=sys.stderr)
    return 2


def _error_message(error: Exception) -> str | None:
    """The one-line message for an error the user can act on; None for a bug.

    Ray is imported only with ``--engine ray``, so its errors are looked up
    among the loaded modules rather than imported here. An error raised in a
    Ray worker's own code reaches here wrapped, with the worker's traceback
    in its text; only the original error's type and message are kept.
    """
    ray_exceptions = sys.modules.get("ray.exceptions")
    if ray_exceptions is not None and isinstance(error, ray_exceptions.RayError):
        cause = getattr(error, "cause", None)
        if isinstance(error, ray_exceptions.RayTaskError) and cause is not None:
            return f"a Ray worker failed: {type(cause).__name__}: {cause}"
        first = str(error).strip().splitlines()[:1] or [""]
        return f"Ray failed: {type(error).__name__}: {first[0]}"
    engine = sys.modules.get("padim_core.distributed")
    if engine is not None and isinstance(error, engine.WorkerLostError):
        return str(error)
    expected = (UsageError, ModelFileError, WeightsUnavailableError, OSError)
    if isinstance(error, (*expected, ValueError, TypeError)):
        return str(error)
    return None


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"
