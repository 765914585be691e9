"""PadimModel and Padim on tiny seeded inputs with random weights."""

import pytest
import torch
import torch.nn.functional as F

from padim_core.model import Padim, PadimModel, make_config, select_channels

SIZE = 64


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fitted() -> Padim:
    padim = Padim("resnet18", pre_trained=False, n_features=20, image_size=SIZE)
    padim.partial_fit(_images(6))
    padim.partial_fit(_images(6, seed=1))
    return padim.finalize()


def test_forward_returns_features_in_training_and_maps_in_eval(fitted):
    model = fitted.model
    model.train()
    features = model(_images(2))
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "layer1": (2, 64, 16, 16),
        "layer2": (2, 128, 8, 8),
        "layer3": (2, 256, 4, 4),
    }
    assert not model.feature_extractor.training

    model.eval()
    maps = model(_images(2))
    assert maps.shape == (2, SIZE, SIZE)
    assert torch.isfinite(maps).all()


def test_embedding_equals_upsampling_everything_then_selecting(fitted):
    model = fitted.model
    features = model.feature_extractor(_images(2))
    grid = features["layer1"].shape[-2:]
    everything = torch.cat(
        [F.interpolate(features[name], size=grid, mode="nearest") for name in features],
        dim=1,
    )
    expected = everything.index_select(1, model.channel_index)
    assert torch.equal(model.generate_embedding(features), expected)


def test_prediction_shapes_and_score_is_the_maps_maximum(fitted):
    scores, distances, maps = fitted.predict_tensor(_images(3, seed=5))
    assert scores.shape == (3,)
    assert distances.shape == (3, 16, 16)
    assert maps.shape == (3, SIZE, SIZE)
    assert torch.equal(scores, maps.flatten(1).amax(1))


def test_same_images_and_seed_give_the_same_model_bit_for_bit():
    def fit() -> Padim:
        padim = Padim("resnet18", pre_trained=False, n_features=10, image_size=SIZE)
        torch.manual_seed(123)  # random init must not depend on outside state...
        padim.partial_fit(_images(4))
        return padim.finalize()

    # ...except the backbone's random init itself, which we seed per build.
    torch.manual_seed(0)
    first = fit()
    torch.manual_seed(0)
    second = fit()
    assert torch.equal(first.model.channel_index, second.model.channel_index)
    assert torch.equal(first.stats.scatter, second.stats.scatter)
    assert torch.equal(
        first.model.gaussian.inv_covariance, second.model.gaussian.inv_covariance
    )


def test_channel_subset_depends_only_on_the_seed():
    assert torch.equal(select_channels(448, 100, 7), select_channels(448, 100, 7))
    assert not torch.equal(select_channels(448, 100, 7), select_channels(448, 100, 8))
    chosen = select_channels(448, 100, 7)
    assert chosen.unique().numel() == 100 and chosen.max() < 448


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backbone": "vgg16"}, r"unknown backbone 'vgg16'.*resnet18"),
        ({"layers": ["layer9"]}, r"unknown layer.*layer9.*layer1"),
        ({"layers": []}, "no layers given"),
        ({"n_features": 449}, r"n_features=449.*choose 1 to 448"),
        ({"n_features": 0}, "choose 1 to 448"),
        ({"image_size": 16}, "image_size=16"),
        ({"backbone": "efficientnet_lite0", "layers": ["layer1"]}, "stride4"),
    ],
)
def test_bad_configuration_lists_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_config(**kwargs)


def test_defaults_come_from_the_backbone_table():
    assert make_config("resnet18").n_features == 100
    assert make_config("wide_resnet50_2").n_features == 550
    lite = make_config("efficientnet_lite0")
    assert lite.layers == ("stride4", "stride8", "stride16")
    assert lite.n_features == 100


def test_layers_are_ordered_shallow_to_deep():
    assert make_config(layers=["layer3", "layer1"]).layers == ("layer1", "layer3")


def test_anomalib_style_constructor():
    model = PadimModel(
        ["layer1", "layer2"], backbone="resnet18", pre_trained=False, n_features=30
    )
    assert model.channel_index.numel() == 30
    assert "layer3" not in model.feature_extractor.stages


def test_wrong_input_shape_is_refused(fitted):
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 3, 64, 64\)"):
        fitted.predict_tensor(torch.zeros(1, 3, 32, 32))


def test_unfitted_model_cannot_predict():
    padim = Padim("resnet18", pre_trained=False, n_features=5, image_size=SIZE)
    with pytest.raises(RuntimeError, match="not fitted"):
        padim.predict_tensor(_images(1))
