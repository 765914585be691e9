"""The model file: one safetensors file with statistics and configuration.

No pickle is written or read. The tensors are the channel indices, the mean
and the scatter matrix about the mean (so a saved model can be extended with
more images); the header's metadata holds the configuration, thresholds and
facts about the fit as JSON. The inverse covariances are recomputed on load.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from padim_core.gaussian import RunningGaussian
from padim_core.model import Padim, PadimConfig, Thresholds

logger = logging.getLogger(__name__)

FORMAT_NAME = "padim_core.model"
FORMAT_VERSION = 1
MODEL_SUFFIX = ".safetensors"

_TENSORS = ("channel_index", "count", "mean", "scatter")


class ModelFileError(ValueError):
    """A model file that cannot be used, with the reason."""


def save_model(padim: Padim, path: str | Path) -> Path:
    """Write ``padim`` to ``path`` atomically (temporary file, then rename).

    Raises:
        ValueError: If the model has no statistics yet.
    """
    if padim.stats is None or padim.stats.count == 0:
        raise ValueError("the model has no training images; fit it before saving")
    path = Path(path)
    padim.stats.center()
    tensors = {
        "channel_index": padim.model.channel_index.cpu().contiguous(),
        "count": torch.tensor([padim.stats.count], dtype=torch.int64),
        "mean": padim.stats.shift.cpu().contiguous(),
        "scatter": padim.stats.scatter.cpu().contiguous(),
    }
    info = dict(padim.metadata)
    info.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    info["n_images"] = padim.stats.count
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(padim.config.to_dict()),
        "thresholds": json.dumps(vars(padim.thresholds)),
        "info": json.dumps(info),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    logger.info("saved model to %s", path)
    return path


def read_header(path: str | Path) -> dict:
    """Read and check a model file's metadata without loading its tensors.

    Returns:
        A dict with ``config`` (PadimConfig), ``thresholds`` (Thresholds) and
        ``info`` (dict).

    Raises:
        ModelFileError: If the file is not a model file of a readable version.
    """
    path = Path(path)
    header = _raw_header(path)
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path.name}: not a padim_core model file")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise ModelFileError(f"{path.name}: format version is missing") from None
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path.name}: written in model format {version} by a newer "
            f"padim_core; this version reads format {FORMAT_VERSION}"
        )
    try:
        config = PadimConfig.from_dict(json.loads(metadata["config"]))
        thresholds = Thresholds(**json.loads(metadata.get("thresholds", "{}")))
        info = json.loads(metadata.get("info", "{}"))
    except (KeyError, TypeError, ValueError) as error:
        raise ModelFileError(f"{path.name}: bad configuration ({error})") from error
    missing = [name for name in _TENSORS if name not in header]
    if missing:
        raise ModelFileError(f"{path.name}: missing tensors {missing}")
    return {"config": config, "thresholds": thresholds, "info": info, "header": header}


def _raw_header(path: Path) -> dict:
    """Parse the safetensors JSON header, refusing anything else."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                raise ModelFileError(f"{path.name}: file too short to be a model")
            length = int.from_bytes(prefix, "little")
            if length > min(size - 8, 100 * 2**20):
                raise ModelFileError(
                    f"{path.name}: not a safetensors file (header length {length})"
                )
            header = json.loads(file.read(length))
    except OSError as error:
        raise ModelFileError(f"{path.name}: cannot read ({error})") from error
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFileError(
            f"{path.name}: not a safetensors file (pickles are never loaded)"
        ) from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path.name}: not a safetensors file")
    return header


def load_model(
    path: str | Path,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> Padim:
    """Load a model file and rebuild a ready-to-score :class:`Padim`.

    Args:
        path: The ``.safetensors`` model file.
        weights: Local backbone weights, if the model was fitted with them.
        device: Torch device to score on.

    Raises:
        ModelFileError: If the file is not a usable model; the message names
            the file and what is wrong.
    """
    path = Path(path)
    parsed = read_header(path)
    config: PadimConfig = parsed["config"]
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFileError(f"{path.name}: damaged tensors ({error})") from error
    _check_tensors(path.name, config, tensors)
    try:
        padim = Padim(
            backbone=config.backbone,
            layers=config.layers,
            pre_trained=config.pre_trained,
            n_features=config.n_features,
            image_size=config.image_size,
            seed=config.seed,
            weights=weights,
            device=device,
        )
    except ValueError as error:
        raise ModelFileError(f"{path.name}: {error}") from error
    if not torch.equal(padim.model.channel_index.cpu(), tensors["channel_index"]):
        raise ModelFileError(
            f"{path.name}: channel indices differ from those of seed {config.seed}"
        )
    mean, scatter = tensors["mean"].to(device), tensors["scatter"].to(device)
    padim.stats = RunningGaussian(
        count=int(tensors["count"][0]),
        shift=mean,
        sum=torch.zeros_like(mean),
        scatter=scatter,
    )
    padim.thresholds = parsed["thresholds"]
    padim.metadata = parsed["info"]
    padim.finalize()
    logger.info("loaded model %s", path)
    return padim


def _check_tensors(name: str, config: PadimConfig, tensors: dict) -> None:
    missing = [key for key in _TENSORS if key not in tensors]
    if missing:
        raise ModelFileError(f"{name}: missing tensors {missing}")
    index, count = tensors["channel_index"], tensors["count"]
    mean, scatter = tensors["mean"], tensors["scatter"]
    c = config.n_features
    if tuple(index.shape) != (c,):
        raise ModelFileError(
            f"{name}: channel_index has shape {tuple(index.shape)}, "
            f"expected ({c},) for n_features={c}"
        )
    if mean.ndim != 2 or mean.shape[1] != c:
        raise ModelFileError(
            f"{name}: mean has shape {tuple(mean.shape)}, expected (P, {c})"
        )
    p = mean.shape[0]
    if tuple(scatter.shape) != (p, c, c):
        raise ModelFileError(
            f"{name}: scatter has shape {tuple(scatter.shape)}, "
            f"expected ({p}, {c}, {c})"
        )
    if mean.dtype != torch.float32 or scatter.dtype != torch.float32:
        raise ModelFileError(f"{name}: statistics must be float32")
    if count.numel() != 1 or int(count[0]) < 1:
        raise ModelFileError(f"{name}: image count must be a positive number")
    if not (torch.isfinite(mean).all() and torch.isfinite(scatter).all()):
        raise ModelFileError(f"{name}: statistics hold NaN or infinity")
