"""The model file: one safetensors file with statistics and configuration.

No pickle is written or read. The tensors are the channel indices, the mean
and the scatter matrix about the mean (so a saved model can be extended with
more images); the header's metadata holds the configuration, thresholds and
facts about the fit as JSON. The inverse covariances are recomputed on load.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from padim_core.backbones import get_spec
from padim_core.gaussian import RunningGaussian, all_finite
from padim_core.model import Padim, PadimConfig, Thresholds, make_config

logger = logging.getLogger(__name__)

FORMAT_NAME = "padim_core.model"
FORMAT_VERSION = 1
MODEL_SUFFIX = ".safetensors"

_TENSORS = ("channel_index", "count", "mean", "scatter")

# safetensors dtype names of the tensors, as written by save_model.
_DTYPES = {"channel_index": "I64", "count": "I64", "mean": "F32", "scatter": "F32"}

# How pickles and torch.save archives begin, to say so when refusing one.
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")

_KIND_NAMES = {str: "text", int: "a whole number"}

# A real header is a few kilobytes; a larger claimed length is not a model.
MAX_HEADER_BYTES = 16 * 2**20

# Embeddings of ImageNet backbones stay within tens; a mean beyond this is
# not from a fit, and would overflow float32 distances when scoring.
MAX_ABS_MEAN = 1e6


class ModelFileError(ValueError):
    """A model file that cannot be used, with the reason."""


def save_model(padim: Padim, path: str | Path) -> Path:
    """Write ``padim`` to ``path`` atomically (temporary file, then rename).

    Readers see the old file or the new one, never a mix: savers racing on
    one path each write their own temporary file, and the last rename wins.
    The file gets the permissions the umask gives new files. ``padim`` itself
    is not changed, so threads may save one model at once.

    Raises:
        ValueError: If the model has no statistics yet, its statistics hold
            NaN or infinity, or a threshold is not a finite number.
    """
    if padim.stats is None or padim.stats.count == 0:
        raise ValueError("the model has no training images; fit it before saving")
    path = Path(path)
    _check_thresholds(vars(padim.thresholds))
    tensors = _statistics_tensors(padim)
    info = dict(padim.metadata)
    info.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
    info["n_images"] = padim.stats.count
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(padim.config.to_dict()),
        "thresholds": json.dumps(vars(padim.thresholds)),
        "info": json.dumps(info, default=str),
    }
    write_safetensors(tensors, metadata, path)
    logger.info("saved model to %s", path)
    return path


def write_safetensors(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | Path
) -> None:
    """Write a safetensors file atomically: a temporary file, then a rename.

    Each call writes its own temporary file beside ``path``, so concurrent
    writers never mix: readers see one complete version, the last renamed.
    The file is flushed to disk, folder included, and gets the permissions
    the umask gives new files (not the 0o600 of a private temporary file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _create_temporary(path)
    try:
        mode = os.stat(temporary).st_mode & 0o777
        save_file(tensors, temporary, metadata=metadata)
        os.chmod(temporary, mode)  # save_file may recreate it as 0o600
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    _sync_folder(path.parent)


def _statistics_tensors(padim: Padim) -> dict[str, torch.Tensor]:
    """The tensors to save, centred on the mean, computed without mutation."""
    stats = padim.stats
    mean = stats.shift + stats.sum / stats.count
    scatter = stats.scatter
    if stats.sum.any():  # a fitted model is centred already: no 5 GB copy
        scatter = torch.baddbmm(
            scatter,
            stats.sum.unsqueeze(2),
            stats.sum.unsqueeze(1),
            alpha=-1.0 / stats.count,
        )
    if not (all_finite(mean) and all_finite(scatter)):
        raise ValueError("the model's statistics hold NaN or infinity; not saved")
    return {
        "channel_index": padim.model.channel_index.cpu().contiguous(),
        "count": torch.tensor([stats.count], dtype=torch.int64),
        "mean": mean.cpu().contiguous(),
        "scatter": scatter.cpu().contiguous(),
    }


def _create_temporary(path: Path) -> str:
    """Create an empty, uniquely named file beside ``path``; return its name.

    Created with mode 0o666 so that the umask, not a fixed 0o600, decides who
    may read the model once it is renamed into place.
    """
    while True:
        name = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
        try:
            handle = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(handle)
        return str(name)


def _sync_folder(folder: Path) -> None:
    """Flush the rename to disk so that a crash keeps the new file."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _check_thresholds(values: object, name: str = "thresholds") -> Thresholds:
    """Thresholds from a dict whose values are finite numbers or None.

    Raises:
        TypeError: If ``values`` is not a dict, or a value not a number.
        ValueError: Naming the key and value that are not allowed.
    """
    if not isinstance(values, dict):
        raise TypeError(f"{name} must be a mapping, got {type(values).__name__}")
    known = Thresholds.__dataclass_fields__
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"unknown {name} key {key!r}; allowed: {list(known)}")
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        if value is not None and (isinstance(value, bool) or not finite):
            raise ValueError(
                f"{name} {key}={value!r} is not allowed: a finite number or None"
            )
    return Thresholds(**values)


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
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path.name}: not a padim_core model file")
    _check_version(path.name, metadata.get("format_version"))
    try:
        config = _check_config(json.loads(metadata["config"]))
        thresholds = _check_thresholds(json.loads(metadata.get("thresholds", "{}")))
        info = json.loads(metadata.get("info", "{}"))
        if not isinstance(info, dict):
            raise TypeError(f"info must be a mapping, got {type(info).__name__}")
    except (KeyError, TypeError, ValueError, RecursionError) as error:
        raise ModelFileError(f"{path.name}: bad configuration ({error})") from error
    _check_header_tensors(path.name, config, header)
    return {"config": config, "thresholds": thresholds, "info": info, "header": header}


def _check_version(name: str, text: object) -> None:
    try:
        version = int(text)
    except (TypeError, ValueError):
        raise ModelFileError(f"{name}: format version is missing") from None
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{name}: written in model format {version} by a newer "
            f"padim_core; this version reads format {FORMAT_VERSION}"
        )
    if version < 1:
        raise ModelFileError(f"{name}: unknown model format {version}")


def _check_config(values: object) -> PadimConfig:
    """A configuration from JSON, validated as a fresh fit would validate it.

    Raises:
        TypeError: For values of the wrong type.
        ValueError: For unknown keys or values out of range.
    """
    if not isinstance(values, dict):
        raise TypeError(f"config must be a mapping, got {type(values).__name__}")
    config = PadimConfig.from_dict(values)
    types = {"backbone": str, "n_features": int, "image_size": int, "seed": int}
    for key, kind in types.items():
        value = getattr(config, key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise TypeError(f"{key}={value!r} is not {_KIND_NAMES[kind]}")
    if not isinstance(config.pre_trained, bool):
        raise TypeError(f"pre_trained={config.pre_trained!r} is not true or false")
    if not all(isinstance(layer, str) for layer in config.layers):
        raise ValueError(f"layers={list(config.layers)!r} are not all names")
    if not -(2**63) <= config.seed < 2**64:
        raise ValueError(f"seed={config.seed} is out of the range torch accepts")
    checked = make_config(
        config.backbone,
        config.layers,
        config.n_features,
        config.image_size,
        config.seed,
        config.pre_trained,
    )
    if checked != config:
        raise ValueError(f"layers {list(config.layers)} are not in network order")
    return config


def grid_positions(config: PadimConfig) -> int:
    """Patch positions P = h * w of the embedding at the configured size.

    Every backbone here pads its strided layers so that a layer of stride s
    gives ceil(S / s) rows and columns for an input of side S.
    """
    stride = get_spec(config.backbone).layers[config.layers[0]][0]
    side = math.ceil(config.image_size / stride)
    return side * side


def _check_header_tensors(name: str, config: PadimConfig, header: dict) -> None:
    """Check the tensors' names, dtypes and shapes as the header declares them."""
    c, p = config.n_features, grid_positions(config)
    expected = {"channel_index": (c,), "count": (1,), "mean": (p, c)}
    expected["scatter"] = (p, c, c)
    for key, shape in expected.items():
        entry = header.get(key)
        if not isinstance(entry, dict):
            raise ModelFileError(f"{name}: missing tensor {key!r}")
        if entry.get("dtype") != _DTYPES[key]:
            raise ModelFileError(
                f"{name}: {key} has dtype {entry.get('dtype')!r}, "
                f"expected {_DTYPES[key]}"
            )
        if not isinstance(entry.get("shape"), list) or tuple(entry["shape"]) != shape:
            raise ModelFileError(
                f"{name}: {key} has shape {entry.get('shape')}, expected "
                f"{list(shape)} for n_features={c} at image_size="
                f"{config.image_size} ({p} positions)"
            )


def _raw_header(path: Path) -> dict:
    """Parse the safetensors JSON header, refusing anything else."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                raise ModelFileError(f"{path.name}: file too short to be a model")
            length = int.from_bytes(prefix, "little")
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise ModelFileError(
                    _not_safetensors(path.name, prefix, "its header would not fit")
                )
            header = json.loads(file.read(length))
    except OSError as error:
        raise ModelFileError(f"{path.name}: cannot read ({error})") from error
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ModelFileError(
            _not_safetensors(path.name, prefix, "its header is not JSON")
        ) from None
    if not isinstance(header, dict):
        raise ModelFileError(
            _not_safetensors(path.name, prefix, "its header is not a JSON object")
        )
    return header


def _not_safetensors(name: str, prefix: bytes, why: str) -> str:
    if prefix.startswith(_PICKLE_MAGIC):
        return (
            f"{name}: a pickle or torch.save file; only safetensors model "
            "files are read, pickles are never loaded"
        )
    return f"{name}: not a safetensors model file ({why})"


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
    try:
        padim.finalize()
    except RuntimeError as error:  # torch.linalg.LinAlgError among them
        raise ModelFileError(
            f"{path.name}: the covariances cannot be inverted ({error})"
        ) from error
    if not padim.model.gaussian.is_finite():
        raise ModelFileError(f"{path.name}: the covariances cannot be inverted")
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
    if not (all_finite(mean) and all_finite(scatter)):
        raise ModelFileError(f"{name}: statistics hold NaN or infinity")
    if mean.abs().max() > MAX_ABS_MEAN:
        raise ModelFileError(
            f"{name}: mean values reach {float(mean.abs().max()):.3g}, beyond "
            f"{MAX_ABS_MEAN:g}; not statistics of a fit"
        )
    diagonal = scatter.diagonal(dim1=1, dim2=2)
    if (diagonal < 0).any():
        raise ModelFileError(f"{name}: scatter has negative variances")
