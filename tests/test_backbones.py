"""The backbone table, weights handling and early stopping."""

import pytest
import torch
import torchvision

from padim_core.backbones import (
    BACKBONES,
    WeightsUnavailableError,
    build_feature_extractor,
)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_table_strides_and_channels_match_the_networks(name):
    spec = BACKBONES[name]
    extractor = build_feature_extractor(name, list(spec.layers), pre_trained=False)
    features = extractor(torch.zeros(1, 3, 64, 64))
    for layer, (stride, channels) in spec.layers.items():
        assert features[layer].shape[1] == channels, layer
        assert features[layer].shape[-1] == 64 // stride, layer
    assert spec.default_n_features <= spec.channels(spec.default_layers)


def test_resnet_runs_only_as_deep_as_needed():
    extractor = build_feature_extractor("resnet18", ["layer2"], pre_trained=False)
    assert list(extractor.stages) == ["layer1", "layer2"]
    assert set(extractor(torch.zeros(1, 3, 64, 64))) == {"layer2"}


def test_extractor_is_frozen_and_in_eval_mode():
    extractor = build_feature_extractor("resnet18", ["layer1"], pre_trained=False)
    assert not extractor.training
    assert not any(p.requires_grad for p in extractor.parameters())


def test_missing_imagenet_weights_name_file_folder_and_alternatives(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsUnavailableError) as error:
        build_feature_extractor(
            "resnet18", ["layer1"], pre_trained=True, download=False
        )
    message = str(error.value)
    assert "resnet18-f37072fd.pth" in message
    assert str(tmp_path / "checkpoints") in message
    assert "efficientnet_lite0" in message
    assert "pre_trained=False" in message
    assert "local weights file" in message


def test_cached_imagenet_weights_are_used(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    reference = torchvision.models.resnet18(weights=None)
    (tmp_path / "checkpoints").mkdir()
    torch.save(
        reference.state_dict(), tmp_path / "checkpoints" / "resnet18-f37072fd.pth"
    )
    extractor = build_feature_extractor("resnet18", ["layer1"], download=False)
    assert torch.equal(extractor.stem[0].weight, reference.conv1.weight)


def test_local_weights_file_is_loaded(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "mine.pth"
    torch.save(reference.state_dict(), path)
    extractor = build_feature_extractor("resnet18", ["layer1"], weights=path)
    assert torch.equal(extractor.stem[0].weight, reference.conv1.weight)


def test_local_weights_file_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "bad.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights file"):
        build_feature_extractor("resnet18", ["layer1"], weights=path)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "the file is empty"),
        (b"\x80\x02", "EOFError"),  # torch's own message is empty here
    ],
)
def test_unreadable_local_weights_file_says_why(tmp_path, content, reason):
    path = tmp_path / "cut.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"cannot read weights file .*: {reason}$"):
        build_feature_extractor("resnet18", ["layer1"], weights=path)


def test_unreadable_cached_imagenet_weights_say_why(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"")
    with pytest.raises(WeightsUnavailableError, match="the file is empty; delete"):
        build_feature_extractor("resnet18", ["layer1"], download=False)


def test_local_weights_of_another_network_are_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="lacks"):
        build_feature_extractor("resnet18", ["layer1"], weights=path)


def test_missing_local_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        build_feature_extractor("resnet18", ["layer1"], weights=tmp_path / "no.pth")


def test_efficientnet_lite0_loads_bundled_weights_offline():
    extractor = build_feature_extractor("efficientnet_lite0", ["stride4"])
    stem = extractor.network._conv_stem.weight
    assert stem.abs().sum() > 0
    random = build_feature_extractor(
        "efficientnet_lite0", ["stride4"], pre_trained=False
    )
    assert not torch.equal(stem, random.network._conv_stem.weight)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_random_weights_are_rebuilt_identically_from_the_seed(name):
    layers = BACKBONES[name].default_layers[:1]
    first = build_feature_extractor(name, layers, pre_trained=False, seed=4)
    torch.manual_seed(99)  # outside random state must not matter
    again = build_feature_extractor(name, layers, pre_trained=False, seed=4)
    other = build_feature_extractor(name, layers, pre_trained=False, seed=5)
    for a, b, c in zip(first.parameters(), again.parameters(), other.parameters()):
        assert torch.equal(a, b)
    assert not all(
        torch.equal(a, c) for a, c in zip(first.parameters(), other.parameters())
    )
