"""Speed and memory of PaDiM next to the floor set by its backbone alone.

    .venv/bin/python bench/benchmark.py --out results/benchmark.md
    .venv/bin/python bench/benchmark.py --quick

For each configuration and number of training images, fresh processes warm
the backbone up on one batch, then time:

- floor: the training images decoded and resized batch by batch (timed
  apart), each batch run through the bare feature extractor to the deepest
  layer used; once in its own process just before the fit and once right
  after the fit, averaged, so that a change in machine load shows in both;
- fit: ``Padim.fit`` on the image files, decoding included, and the peak
  resident memory of that process, which has done nothing but one warm-up
  batch before.

A saved model is then loaded in fresh processes, which score decoded test
images in batches and one at a time (the app's case), alternating with the
bare feature extractor on the same tensors, batch by batch; the fastest of a
few rounds counts for each batch. Their peak covers loading and scoring.

Random backbone weights are used for the ResNets (speed does not depend on
them); efficientnet_lite0 uses its bundled ImageNet weights.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "bsdata"
IMAGE_SIZE = 256
BATCH_SIZE = 16

# Rounds of each predict measurement; the fastest counts, since other
# processes only ever add time.
PREDICT_ROUNDS = 3

# The targets.
FIT_TARGET = 1.25
PREDICT_TARGET = 1.3
MEMORY_GROWTH_TARGET = 1.1
WIDE_MEMORY_TARGET_MB = 8000


@dataclass(frozen=True)
class Config:
    """One benchmarked model: backbone, layers, channels kept."""

    name: str
    backbone: str
    layers: tuple[str, ...]
    n_features: int
    pre_trained: bool


CONFIGS = {
    config.name: config
    for config in (
        Config("resnet18", "resnet18", ("layer1", "layer2", "layer3"), 100, False),
        Config(
            "wide_resnet50_2",
            "wide_resnet50_2",
            ("layer1", "layer2", "layer3"),
            550,
            False,
        ),
        Config(
            "efficientnet_lite0",
            "efficientnet_lite0",
            ("stride4", "stride8", "stride16"),
            100,
            True,
        ),
    )
}


def peak_rss_mb() -> float:
    """Peak resident memory since the last :func:`reset_peak`, in MB (10^6 B)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def reset_peak() -> None:
    """Start a new peak resident memory at the size in use now (Linux).

    Memory the C allocator keeps from earlier work (here, the floor pass) is
    handed back first, so that it does not count towards the next peak.
    """
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def image_paths(folder: Path, count: int) -> list[Path]:
    """``count`` image files from ``folder`` (recursively), repeated if needed."""
    found = sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"}
    )
    if not found:
        raise SystemExit(f"no images in {folder}")
    return [found[i % len(found)] for i in range(count)]


def decode(paths: list[Path], batch_size: int) -> tuple[list, float]:
    """Decode, resize and normalise ``paths`` in batches; return them and seconds."""
    from padim_core.images import read_image, to_tensor

    start = time.perf_counter()
    batches = [
        to_tensor([read_image(path) for path in paths[i : i + batch_size]], IMAGE_SIZE)
        for i in range(0, len(paths), batch_size)
    ]
    return batches, time.perf_counter() - start


def build_padim(config: Config):
    """A :class:`Padim` for ``config`` at the benchmark's image size."""
    from padim_core.model import Padim

    return Padim(
        backbone=config.backbone,
        layers=config.layers,
        pre_trained=config.pre_trained,
        n_features=config.n_features,
        image_size=IMAGE_SIZE,
    )


def floor_pass(extractor, paths: list[Path], batch_size: int) -> tuple[float, float]:
    """Decode batch by batch and run the bare extractor: (decode s, forward s)."""
    import torch

    from padim_core.images import read_image, to_tensor

    decode_s = forward_s = 0.0
    for i in range(0, len(paths), batch_size):
        start = time.perf_counter()
        images = [read_image(path) for path in paths[i : i + batch_size]]
        batch = to_tensor(images, IMAGE_SIZE)
        middle = time.perf_counter()
        with torch.no_grad():
            extractor(batch)
        decode_s += middle - start
        forward_s += time.perf_counter() - middle
    return decode_s, forward_s


def case_floor(config: Config, count: int, batch_size: int, data: Path) -> dict:
    """The floor on ``count`` training images, after a warm-up batch."""
    extractor = build_padim(config).model.feature_extractor
    paths = image_paths(data / "train" / "good", count)
    floor_pass(extractor, paths[:batch_size], batch_size)  # warm-up
    decode_s, floor_s = floor_pass(extractor, paths, batch_size)
    return {"decode_s": decode_s, "floor_s": floor_s}


def case_fit(
    config: Config, count: int, batch_size: int, data: Path, save: str | None
) -> dict:
    """``Padim.fit`` on ``count`` images with its peak, then the floor; maybe save.

    The fit comes first after one warm-up batch, so that its peak is what a
    fresh process fitting these images reaches.
    """
    from padim_core.model_file import save_model

    padim = build_padim(config)
    extractor = padim.model.feature_extractor
    paths = image_paths(data / "train" / "good", count)
    floor_pass(extractor, paths[:batch_size], batch_size)  # warm-up
    finalize, spent = padim.finalize, []

    def timed_finalize():
        start = time.perf_counter()
        result = finalize()
        spent.append(time.perf_counter() - start)
        return result

    padim.finalize = timed_finalize  # the benchmark's own probe into fit
    reset_peak()
    baseline_mb = peak_rss_mb()
    start = time.perf_counter()
    padim.fit([str(path) for path in paths], batch_size)
    fit_s = time.perf_counter() - start
    peak_mb = peak_rss_mb()
    decode_s, floor_s = floor_pass(extractor, paths, batch_size)
    result = {
        "fit_s": fit_s,
        "finalize_s": sum(spent),
        "baseline_mb": baseline_mb,
        "peak_mb": peak_mb,
        "decode_after_s": decode_s,
        "floor_after_s": floor_s,
    }
    if save:
        reset_peak()
        start = time.perf_counter()
        save_model(padim, save)
        result["save_s"] = time.perf_counter() - start
        result["save_peak_mb"] = peak_rss_mb()
        result["file_mb"] = os.path.getsize(save) / 1e6
    return result


def case_predict(
    config: Config, model: str, count: int, batch_size: int, data: Path
) -> dict:
    """Load ``model`` and time predictions against the bare backbone.

    Each batch is timed through the backbone and through ``predict_tensor``
    side by side, in several rounds; each batch's fastest time counts, so a
    burst of other work on the machine rarely reaches both numbers.
    """
    import torch

    from padim_core.model_file import load_model

    start = time.perf_counter()
    padim = load_model(model)
    load_s = time.perf_counter() - start
    extractor = padim.model.feature_extractor
    batches, _ = decode(image_paths(data / "test", count), batch_size)
    with torch.no_grad():
        extractor(batches[0])  # first calls set up kernels for this shape
    padim.predict_tensor(batches[0])
    floor = [float("inf")] * len(batches)
    predict = [float("inf")] * len(batches)
    for _ in range(PREDICT_ROUNDS):
        for i, batch in enumerate(batches):
            start = time.perf_counter()
            with torch.no_grad():
                extractor(batch)
            middle = time.perf_counter()
            padim.predict_tensor(batch)
            end = time.perf_counter()
            floor[i] = min(floor[i], middle - start)
            predict[i] = min(predict[i], end - middle)
    return {
        "load_s": load_s,
        "predict_ms": sum(predict) / count * 1000,
        "floor_ms": sum(floor) / count * 1000,
        "peak_mb": peak_rss_mb(),
    }


def run_case(case: dict, threads: int | None) -> dict:
    """Run one case in a fresh interpreter and return what it measured."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--case",
        json.dumps(case),
    ]
    if threads:
        command += ["--threads", str(threads)]
    done = subprocess.run(
        command, check=False, cwd=ROOT, capture_output=True, text=True
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-3:]
        return {"error": f"exit {done.returncode}: {' / '.join(tail)}"}
    return json.loads(lines[-1])


def run_child(case: dict, threads: int | None) -> None:
    """Entry point of a child process: run ``case``, print one JSON line."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    config = CONFIGS[case["config"]]
    data = Path(case["data"])
    if case["kind"] == "floor":
        result = case_floor(config, case["count"], case["batch"], data)
    elif case["kind"] == "fit":
        result = case_fit(config, case["count"], case["batch"], data, case.get("save"))
    else:
        result = case_predict(config, case["model"], case["count"], case["batch"], data)
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result))


def benchmark_config(config: Config, args: argparse.Namespace, folder: Path) -> dict:
    """All measurements of one configuration."""
    base = {"config": config.name, "data": str(args.data), "batch": args.batch_size}
    model = str(folder / f"{config.name}.safetensors")
    fits = []
    for count in args.counts:
        save = model if count == max(args.counts) else None
        before = run_case({**base, "count": count, "kind": "floor"}, args.threads)
        fit = run_case(
            {**base, "count": count, "kind": "fit", "save": save}, args.threads
        )
        fits.append({"count": count, **fit})
        if "error" not in before and "error" not in fit:
            fits[-1]["floors_s"] = [before["floor_s"], fit["floor_after_s"]]
            fits[-1]["floor_s"] = sum(fits[-1]["floors_s"]) / 2
            fits[-1]["decode_s"] = (before["decode_s"] + fit["decode_after_s"]) / 2
        else:
            fits[-1].setdefault("error", before.get("error"))
        log(f"{config.name} fit {count}: {fits[-1]}")
    predicts = []
    for batch in (args.batch_size, 1):
        case = {**base, "kind": "predict", "model": model, "batch": batch}
        result = run_case({**case, "count": args.predict_images}, args.threads)
        predicts.append({"batch": batch, **result})
        log(f"{config.name} predict batch {batch}: {predicts[-1]}")
    return {"config": asdict(config), "fits": fits, "predicts": predicts}


def log(message: str) -> None:
    """Progress on stderr, so stdout keeps only the table."""
    print(message, file=sys.stderr, flush=True)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None if either is missing."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def cell(value: float | None, digits: int = 2) -> str:
    """A table cell: the number, or a dash when it is missing."""
    return "-" if value is None else f"{value:.{digits}f}"


def verdict(value: float | None, limit: float) -> str:
    """``value`` with a mark saying whether it is within ``limit``."""
    if value is None:
        return "-"
    return f"{value:.2f} {'ok' if value <= limit else 'MISSED'}"


def row(*cells: object) -> str:
    """One markdown table row."""
    return "| " + " | ".join(str(value) for value in cells) + " |"


def fit_table(results: list[dict]) -> list[str]:
    """Markdown rows of the fit measurements."""
    lines = [
        row(
            "config",
            "images",
            "decode s",
            "floor s (before / after fit)",
            "fit s",
            "of which finalize s",
            f"fit / (floor + decode), target {FIT_TARGET}",
            "peak RSS MB",
            f"peak / peak at fewest images, target {MEMORY_GROWTH_TARGET}",
        ),
        row("---", *["---:"] * 8),
    ]
    for result in results:
        name, fits = result["config"]["name"], result["fits"]
        for fit in fits:
            if "error" in fit:
                lines.append(
                    row(name, fit["count"], f"failed: {fit['error']}", *[""] * 6)
                )
                continue
            base = fit["floor_s"] + fit["decode_s"]
            growth = ratio(fit["peak_mb"], fits[0].get("peak_mb"))
            lines.append(
                row(
                    name,
                    fit["count"],
                    cell(fit["decode_s"]),
                    " / ".join(cell(value) for value in fit["floors_s"]),
                    cell(fit["fit_s"]),
                    cell(fit["finalize_s"]),
                    verdict(ratio(fit["fit_s"], base), FIT_TARGET),
                    cell(fit["peak_mb"], 0),
                    verdict(growth, MEMORY_GROWTH_TARGET),
                )
            )
    return lines


def predict_table(results: list[dict]) -> list[str]:
    """Markdown rows of the predict measurements."""
    lines = [
        row(
            "config",
            "images per call",
            "floor ms/image",
            "predict ms/image",
            f"predict / floor, target {PREDICT_TARGET}",
            "peak RSS MB",
            "model load s",
        ),
        row("---", *["---:"] * 6),
    ]
    for result in results:
        name = result["config"]["name"]
        for predict in result["predicts"]:
            if "error" in predict:
                error = predict["error"]
                lines.append(row(name, predict["batch"], f"failed: {error}", *[""] * 4))
                continue
            lines.append(
                row(
                    name,
                    predict["batch"],
                    cell(predict["floor_ms"], 1),
                    cell(predict["predict_ms"], 1),
                    verdict(
                        ratio(predict["predict_ms"], predict["floor_ms"]),
                        PREDICT_TARGET,
                    ),
                    cell(predict["peak_mb"], 0),
                    cell(predict["load_s"]),
                )
            )
    return lines


def file_table(results: list[dict]) -> list[str]:
    """Markdown rows of model file size and the cost of saving it."""
    lines = [
        row("config", "model file MB", "save s", "peak RSS while saving MB"),
        row("---", "---:", "---:", "---:"),
    ]
    for result in results:
        saved = [fit for fit in result["fits"] if "file_mb" in fit]
        for fit in saved:
            lines.append(
                row(
                    result["config"]["name"],
                    cell(fit["file_mb"], 1),
                    cell(fit["save_s"]),
                    cell(fit["save_peak_mb"], 0),
                )
            )
    return lines


def memory_line(results: list[dict]) -> list[str]:
    """The wide_resnet50_2 memory target, if that configuration ran."""
    for result in results:
        if result["config"]["name"] != "wide_resnet50_2":
            continue
        peaks = [fit.get("peak_mb") for fit in result["fits"]]
        peaks += [predict.get("peak_mb") for predict in result["predicts"]]
        if None in peaks:
            return ["- wide_resnet50_2 within 8 GB: a measurement failed"]
        worst = max(peaks)
        mark = "ok" if worst <= WIDE_MEMORY_TARGET_MB else "MISSED"
        found = f"{worst:.0f} MB (target {WIDE_MEMORY_TARGET_MB} MB) {mark}"
        return [f"- wide_resnet50_2 peak RSS, fit and predict: {found}"]
    return []


def machine(threads: int | None, load: float) -> list[str]:
    """Lines describing the machine and the software."""
    import torch

    model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as meminfo:
        memory_gb = int(meminfo.readline().split()[1]) / 1e6
    threads = threads or torch.get_num_threads()
    python = platform.python_version()
    return [
        f"- CPU: {model}, {os.cpu_count()} cores, {memory_gb:.0f} GB memory",
        f"- torch {torch.__version__}, {threads} threads, Python {python}",
        f"- load average (1 min) at start / end: {load:.2f} / {os.getloadavg()[0]:.2f}",
    ]


def report(results: list[dict], args: argparse.Namespace, load: float) -> str:
    """The whole markdown report."""
    command = " ".join([".venv/bin/python", "bench/benchmark.py", *args.argv])
    images = (
        f"- images: {args.data.name}, {IMAGE_SIZE}x{IMAGE_SIZE}, batch size "
        f"{args.batch_size}; predict on {args.predict_images} test images"
    )
    lines = [
        "# Benchmark",
        "",
        f"`{command}`",
        "",
        *machine(args.threads, load),
        images,
        *memory_line(results),
        "",
        "## Fit",
        "",
        *fit_table(results),
        "",
        "## Predict",
        "",
        *predict_table(results),
        "",
        "## Model file",
        "",
        *file_table(results),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    parser.add_argument(
        "--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS)
    )
    parser.add_argument("--counts", nargs="+", type=int, default=[50, 200, 800])
    parser.add_argument("--predict-images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--threads", type=int, help="torch threads (default: all)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument(
        "--quick", action="store_true", help="resnet18, 16 and 64 images, 8 to score"
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.configs, args.counts, args.predict_images = ["resnet18"], [16, 64], 8
    args.argv = argv
    return args


def main(argv: list[str]) -> None:
    """Run the benchmark, print the report and write it to ``--out``."""
    args = parse_args(argv)
    if args.case:
        run_child(json.loads(args.case), args.threads)
        return
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="padim-bench-") as folder:
        results = [
            benchmark_config(CONFIGS[name], args, Path(folder)) for name in args.configs
        ]
    text = report(results, args, load)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        (args.out.with_suffix(".json")).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(sys.argv[1:])
