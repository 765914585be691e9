"""Saving and loading a model file round-trips everything."""

import json
import struct

import pytest
import torch

from padim_core.model import Padim
from padim_core.model_file import (
    FORMAT_VERSION,
    ModelFileError,
    load_model,
    read_header,
    save_model,
)

SIZE = 64


@pytest.fixture(scope="module")
def padim() -> Padim:
    model = Padim("resnet18", pre_trained=False, n_features=12, image_size=SIZE, seed=3)
    generator = torch.Generator().manual_seed(0)
    model.partial_fit(torch.randn(30, 3, SIZE, SIZE, generator=generator))
    model.finalize()
    model.with_thresholds(image=12.5, pixel=9.0, score_min=3.0, score_max=20.0)
    model.metadata["name"] = "line 4"
    return model


def test_round_trip_keeps_scores_configuration_and_thresholds(padim, tmp_path):
    images = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    expected, _, _ = padim.predict_tensor(images)
    path = save_model(padim, tmp_path / "m.safetensors")

    loaded = load_model(path)  # random weights are rebuilt from the seed
    scores, _, _ = loaded.predict_tensor(images)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert loaded.config == padim.config
    assert loaded.thresholds == padim.thresholds
    assert loaded.n_images == 30
    assert loaded.metadata["name"] == "line 4"


def test_header_is_readable_without_tensors(padim, tmp_path):
    path = save_model(padim, tmp_path / "m.safetensors")
    header = read_header(path)
    assert header["config"].n_features == 12
    assert header["thresholds"].image == 12.5
    assert header["info"]["n_images"] == 30
    assert "created" in header["info"]


def test_extending_a_loaded_model_equals_fitting_everything(tmp_path):
    generator = torch.Generator().manual_seed(5)
    first, second = (
        torch.randn(8, 3, SIZE, SIZE, generator=generator),
        torch.randn(6, 3, SIZE, SIZE, generator=generator),
    )
    whole = Padim("resnet18", pre_trained=False, n_features=10, image_size=SIZE)
    whole.partial_fit(torch.cat([first, second]))
    whole.finalize()

    part = Padim("resnet18", pre_trained=False, n_features=10, image_size=SIZE)
    part.partial_fit(first)
    save_model(part, tmp_path / "part.safetensors")
    extended = load_model(tmp_path / "part.safetensors")
    extended.partial_fit(second)
    extended.finalize()
    assert extended.n_images == 14
    torch.testing.assert_close(
        extended.stats.covariance(), whole.stats.covariance(), rtol=1e-4, atol=1e-4
    )


def test_future_format_version_is_refused(padim, tmp_path):
    path = save_model(padim, tmp_path / "m.safetensors")
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"]["format_version"] = str(FORMAT_VERSION + 1)
    encoded = json.dumps(header).encode()
    encoded += b" " * (length - len(encoded)) if len(encoded) <= length else b""
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])
    with pytest.raises(ModelFileError, match=f"format {FORMAT_VERSION + 1}.*newer"):
        load_model(path)
