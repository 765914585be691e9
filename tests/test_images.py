"""Tests for padim_core.images: decoding, conversion, tensors and file finding."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from padim_core import images
from padim_core.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageError,
    ImageWarning,
    Skipped,
    find_images,
    iter_decoded,
    read_image,
    to_tensor,
)
from padim_core.loader import iter_batches


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_read_image_takes_a_path_bytes_or_a_file_object(tmp_path: Path) -> None:
    data = _png(_noise(20, 10))
    path = tmp_path / "a.png"
    path.write_bytes(data)
    decoded = [read_image(path), read_image(data), read_image(io.BytesIO(data))]
    arrays = [np.asarray(image) for image in decoded]

    assert all(image.size == (20, 10) and image.mode == "RGB" for image in decoded)
    assert all(np.array_equal(arrays[0], array) for array in arrays[1:])


def test_errors_name_the_file_as_given() -> None:
    with pytest.raises(
        ImageError, match=r"^upload 3\.png: the file is empty$"
    ) as error:
        read_image(b"", "upload 3.png")
    assert (error.value.name, error.value.reason) == (
        "upload 3.png",
        "the file is empty",
    )
    with pytest.raises(ImageError, match="^<upload>: "):
        read_image(b"not an image")


def test_missing_file_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "absent.png")


@pytest.mark.parametrize(
    ("width", "height", "used"),
    [(8, 8, True), (7, 8, False), (8, 7, False), (2000, 8, True)],
)
def test_smallest_side_is_eight_pixels(width: int, height: int, used: bool) -> None:
    data = _png(_noise(width, height))
    if used:
        assert read_image(data, "x.png").size == (width, height)
    else:
        with pytest.raises(ImageError, match="smaller than the minimum of 8x8"):
            read_image(data, "x.png")


def test_pixel_limit_is_checked_before_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(images, "MAX_PIXELS", 99)
    with pytest.raises(ImageError, match="10x10 pixels is more than the limit of 99"):
        read_image(_png(_noise(10, 10)), "x.png")


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("I;16", 65535, 255),
        ("I;16", 257 * 100, 100),
        ("I", 65535, 255),
        ("F", 0.5, 127),
        ("F", 200.0, 200),
        ("L", 77, 77),
        ("1", 1, 255),
    ],
)
def test_every_mode_becomes_8_bit_rgb(mode: str, value: float, expected: int) -> None:
    image = images._to_8bit_rgb(Image.new(mode, (9, 9), value))
    assert image.mode == "RGB"
    assert image.getpixel((4, 4)) == (expected,) * 3


def test_float_image_with_nan_becomes_finite_pixels() -> None:
    array = np.full((9, 9), np.nan, dtype=np.float32)
    array[0, 0] = np.inf
    image = images._to_8bit_rgb(Image.fromarray(array, mode="F"))
    assert np.asarray(image).max() == 0


def test_palette_transparency_becomes_black() -> None:
    image = Image.new("P", (9, 9), 1)
    image.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    image.info["transparency"] = 1
    assert images._to_8bit_rgb(image).getpixel((0, 0)) == (0, 0, 0)


def test_flat_image_warns_but_is_used() -> None:
    with pytest.warns(ImageWarning, match="grey.png: the image is one flat colour"):
        image = read_image(_png(Image.new("RGB", (9, 9), (128, 128, 128))), "grey.png")
    assert image.size == (9, 9)


def test_flat_warning_can_be_turned_off_for_masks() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_image(_png(Image.new("L", (9, 9), 255)), "mask.png", warn_flat=False)


def test_varied_image_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_image(_png(_noise(9, 9)), "noise.png")


def test_to_tensor_resizes_and_normalises() -> None:
    white = Image.new("RGB", (30, 10), (255, 255, 255))
    tensor = to_tensor([white, _noise(5, 50)], image_size=32)

    assert tensor.shape == (2, 3, 32, 32)
    assert tensor.dtype == torch.float32
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(tensor[0, :, 5, 5], expected)


def test_to_tensor_refuses_an_empty_list() -> None:
    with pytest.raises(ValueError, match="no images"):
        to_tensor([])


def test_find_images_walks_folders_sorted_and_reports_the_rest(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / ".cache").mkdir()
    for name in ["b/2.PNG", "1.jpg", "notes.txt", ".cache/x.png", ".hidden.png"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "loop").symlink_to(tmp_path)  # a link loop ends the walk, not hangs
    os.mkfifo(tmp_path / "pipe.png")
    found, skipped = find_images([tmp_path, tmp_path / "absent.png"])

    assert found == [tmp_path / "1.jpg", tmp_path / "b" / "2.PNG"]
    assert skipped == [
        Skipped(str(tmp_path / "notes.txt"), "not an image file extension"),
        Skipped(str(tmp_path / "pipe.png"), "not a regular file or folder"),
        Skipped(str(tmp_path / "absent.png"), "no such file or folder"),
    ]


def test_find_images_keeps_files_named_directly(tmp_path: Path) -> None:
    odd = tmp_path / "scan.dat"
    odd.write_bytes(b"x")
    assert find_images([odd]) == ([odd], [])


def test_iter_decoded_goes_on_after_a_bad_file() -> None:
    sources = [("bad.png", b""), ("good.png", _png(_noise(9, 9)))]
    results = list(iter_decoded(sources))

    assert results[0] == ("bad.png", Skipped("bad.png", "the file is empty"))
    assert results[1][0] == "good.png"
    assert isinstance(results[1][1], Image.Image)


def test_batches_give_each_usable_image_its_position_among_the_sources() -> None:
    good = _png(_noise(9, 9))
    sources = [("a", good), ("bad", b""), ("c", good), ("d", good), ("bad2", b"")]
    batches = list(iter_batches(sources, image_size=32, batch_size=2))

    assert [batch.indices for batch in batches] == [[0], [2, 3], []]
    assert [batch.names for batch in batches] == [["a"], ["c", "d"], []]
