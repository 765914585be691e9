"""A corpus of bad, odd and hostile inputs, each with its expected outcome.

Every file is generated here, into ``tmp_path``. Odd but valid images must be
used; unusable ones skipped with a reason that names the file; zips unpacked
only inside their folder; model files never a way in; and no NaN or infinity
may reach the user. The CLI exits 2 with one line only when nothing usable
is left.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import threading
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from padim_core import images
from padim_core.archives import ArchiveError, Unpacked, extract_zip, unpack_zip
from padim_core.cli import main
from padim_core.gaussian import FewImagesWarning
from padim_core.images import ImageError, ImageWarning, find_images, read_image
from padim_core.loader import iter_batches
from padim_core.model import Padim
from padim_core.model_file import (
    FORMAT_VERSION,
    ModelFileError,
    grid_positions,
    load_model,
    read_header,
    save_model,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore::padim_core.gaussian.FewImagesWarning",
    "ignore::padim_core.images.ImageWarning",
)

SIZE = 64
N_FEATURES = 16
REPOSITORY = Path(__file__).resolve().parents[1]


# --- builders -----------------------------------------------------------------


def _noise(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = len(mode) if mode in ("RGB", "RGBA", "CMYK") else 1
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze(2) if channels == 1 else array, mode=mode)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` greyscale pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _exif_rotated_jpeg() -> bytes:
    """40x20 JPEG, red top-left corner, EXIF orientation 6 (turn 90 clockwise)."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 10))
    exif = image.getexif()
    exif[0x0112] = 6
    return _encode(image, "JPEG", exif=exif.tobytes(), quality=95)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), (80 * i, 0, 0)) for i in range(3)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def _multipage_tiff() -> bytes:
    pages = [_noise(32, 24, seed) for seed in range(3)]
    return _encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def _grey16() -> bytes:
    ramp = np.linspace(0, 65535, 48 * 32).reshape(32, 48).astype(np.uint16)
    return _encode(Image.fromarray(ramp), "PNG")


def _palette(transparent: bool) -> bytes:
    image = _noise(32, 32).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _encode(image, "PNG", **({"transparency": 0} if transparent else {}))


def _bad_crc_png() -> bytes:
    data = bytearray(_encode(_noise(32, 32), "PNG"))
    data[29] ^= 0xFF  # inside IHDR's CRC
    return bytes(data)


@dataclass(frozen=True)
class ImageCase:
    """One generated file and what must happen to it.

    Attributes:
        name: File name, extension included.
        make: Returns the file's bytes.
        used: Whether the file must be used.
        match: Regex the skip reason (or, for used files, a warning) must match.
        size: Expected (width, height) of a used image after decoding.
        setup: Adjusts limits for the case, e.g. a tiny pixel limit.
    """

    name: str
    make: Callable[[], bytes]
    used: bool
    match: str = ""
    size: tuple[int, int] | None = None
    setup: Callable[[pytest.MonkeyPatch], None] | None = None


def _tiny_pillow_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)


def _tiny_file_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 100)


IMAGE_CASES = [
    ImageCase("empty.png", lambda: b"", False, "the file is empty"),
    ImageCase("text.png", lambda: b"just some text\n" * 5, False, "not an image"),
    ImageCase(
        "truncated.png",
        lambda: _encode(_noise(64, 64), "PNG")[:400],
        False,
        "cannot be decoded.*truncated",
    ),
    ImageCase(
        "truncated.jpg",
        lambda: _encode(_noise(64, 64), "JPEG")[:600],
        False,
        "cannot be decoded",
    ),
    ImageCase("bad_crc.png", _bad_crc_png, False, "cannot be decoded|not an image"),
    ImageCase("grey16.png", _grey16, True, size=(48, 32)),
    ImageCase(
        "grey_L.png",
        lambda: _encode(_noise(40, 30, mode="L"), "PNG"),
        True,
        size=(40, 30),
    ),
    ImageCase(
        "grey_alpha.png",
        lambda: _encode(_noise(40, 30).convert("LA"), "PNG"),
        True,
        size=(40, 30),
    ),
    ImageCase("bilevel.png", lambda: _encode(_noise(40, 30).convert("1"), "PNG"), True),
    ImageCase("rgba.png", lambda: _encode(_noise(40, 30, mode="RGBA"), "PNG"), True),
    ImageCase("palette.png", lambda: _palette(False), True, size=(32, 32)),
    ImageCase("palette_transparent.png", lambda: _palette(True), True),
    ImageCase(
        "cmyk.jpg",
        lambda: _encode(Image.new("CMYK", (40, 30), (0, 255, 0, 0)), "JPEG"),
        True,
        size=(40, 30),
    ),
    ImageCase(
        "float.ppm",
        lambda: _encode(Image.new("F", (24, 16), 0.5), "PPM"),
        True,
        size=(24, 16),
    ),
    ImageCase("exif_rotated.jpg", _exif_rotated_jpeg, True, size=(20, 40)),
    ImageCase("animated.gif", _animated_gif, True, "3 frames", (32, 32)),
    ImageCase("multipage.tiff", _multipage_tiff, True, "3 frames", (32, 24)),
    ImageCase("webp.webp", lambda: _encode(_noise(30, 20), "WEBP"), True),
    ImageCase("plain.bmp", lambda: _encode(_noise(30, 20), "BMP"), True),
    ImageCase(
        "one_pixel.png",
        lambda: _encode(Image.new("RGB", (1, 1)), "PNG"),
        False,
        "1x1 pixels is smaller than the minimum",
    ),
    ImageCase(
        "claims_10G_pixels.png",
        lambda: _png_header_only(100_000, 100_000),
        False,
        "decompression bomb",
    ),
    ImageCase(
        "claims_72M_pixels.png",
        lambda: _png_header_only(9_000, 8_000),
        False,
        "9000x8000 pixels is more than the limit",
    ),
    ImageCase(
        "over_pillow_limit.png",
        lambda: _encode(_noise(40, 40), "PNG"),
        False,
        "decompression bomb",
        setup=_tiny_pillow_limit,
    ),
    ImageCase(
        "over_file_limit.png",
        lambda: _encode(_noise(40, 40), "PNG"),
        False,
        "larger than",
        setup=_tiny_file_limit,
    ),
    ImageCase(
        "wide.png", lambda: _encode(_noise(4000, 10), "PNG"), True, size=(4000, 10)
    ),
    ImageCase(
        "tall.png", lambda: _encode(_noise(10, 4000), "PNG"), True, size=(10, 4000)
    ),
    ImageCase(
        "black.png",
        lambda: _encode(Image.new("RGB", (32, 32)), "PNG"),
        True,
        "one flat colour",
    ),
    ImageCase(
        "targa_named.png",
        lambda: _encode(_noise(32, 32), "TGA"),
        False,
        "not in an accepted format",
    ),
    ImageCase(
        "postscript_named.png",
        lambda: _encode(_noise(32, 32), "EPS"),
        False,
        "not in an accepted format",
    ),
]


def _write_case(case: ImageCase, folder: Path) -> Path:
    path = folder / case.name
    path.write_bytes(case.make())
    return path


# --- images one by one --------------------------------------------------------


@pytest.mark.parametrize("case", IMAGE_CASES, ids=lambda case: case.name)
def test_image_case_is_used_or_skipped_by_name(
    case: ImageCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if case.setup is not None:
        case.setup(monkeypatch)
    path = _write_case(case, tmp_path)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if not case.used:
            with pytest.raises(ImageError, match=case.match) as error:
                read_image(path)
            assert error.value.name == str(path)
            return
        image = read_image(path)

    assert image.mode == "RGB"
    if case.size is not None:
        assert image.size == case.size
    messages = [str(w.message) for w in caught if w.category is ImageWarning]
    if case.match:
        assert any(case.name in m and case.match in m for m in messages), messages


def test_exif_orientation_turns_the_pixels_too(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    path.write_bytes(_exif_rotated_jpeg())
    array = np.asarray(read_image(path))

    # Turned 90 degrees clockwise, the red top-left corner is now top-right.
    assert array.shape == (40, 20, 3)
    assert array[2, -3, 0] > 200 and array[2, -3, 2] < 60
    assert array[2, 2, 2] > 200


def test_transparent_pixels_become_black(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (16, 16), (255, 255, 255, 0))
    rgba.paste((255, 255, 255, 255), (0, 0, 8, 16))
    image = read_image(_encode(rgba, "PNG"), "half.png")
    assert image.getpixel((2, 2)) == (255, 255, 255)
    assert image.getpixel((12, 2)) == (0, 0, 0)


def test_16_bit_range_maps_to_8_bits() -> None:
    image = read_image(_grey16(), "grey16.png")
    low, high = image.getextrema()[0]
    assert (low, high) == (0, 255)


def test_corpus_folder_keeps_going_and_names_every_skip(tmp_path: Path) -> None:
    default_cases = [case for case in IMAGE_CASES if case.setup is None]
    for case in default_cases:
        _write_case(case, tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"hidden files are ignored")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    paths, skipped = find_images([tmp_path])

    used, decoded_skips = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageWarning)
        for batch in iter_batches(paths, SIZE, batch_size=4):
            used.extend(Path(name).name for name in batch.names)
            decoded_skips.extend(batch.skipped)
            if batch.tensor is not None:
                assert torch.isfinite(batch.tensor).all()
    skipped_names = {Path(item.name).name: item.reason for item in skipped}
    skipped_names |= {Path(item.name).name: item.reason for item in decoded_skips}

    assert sorted(used) == sorted(c.name for c in default_cases if c.used)
    assert set(skipped_names) == {c.name for c in default_cases if not c.used} | {
        "notes.txt",
        "dangling.png",
    }
    assert skipped_names["notes.txt"] == "not an image file extension"
    assert skipped_names["dangling.png"] == "a link to nothing"


# --- sets of images, fitted and scored ----------------------------------------


def _fit(sources, n_features: int = N_FEATURES) -> Padim:
    padim = Padim("efficientnet_lite0", n_features=n_features, image_size=SIZE, seed=1)
    padim.fit(sources, batch_size=4)
    return padim


@pytest.fixture(scope="module")
def fitted() -> Padim:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewImagesWarning)
        return _fit([(f"n{i}", _noise(48, 48, seed=i)) for i in range(8)])


def _assert_finite(prediction) -> None:
    assert prediction is not None
    for tensor in (prediction.scores, prediction.distances, prediction.maps):
        assert torch.isfinite(tensor).all()


def test_mixed_sizes_in_one_set_are_all_used(fitted: Padim) -> None:
    sizes = [(48, 48), (4000, 10), (10, 4000), (300, 200), (8, 8)]
    sources = [(f"{w}x{h}", _noise(w, h, seed=w + h)) for w, h in sizes]
    prediction, skipped = fitted.predict(sources)

    assert skipped == []
    assert prediction.sizes == sizes
    assert tuple(prediction.maps.shape) == (len(sizes), SIZE, SIZE)
    _assert_finite(prediction)


def test_duplicates_are_used_and_score_alike(fitted: Padim, tmp_path: Path) -> None:
    data = _encode(_noise(48, 48, seed=99), "PNG")
    (tmp_path / "a.png").write_bytes(data)
    (tmp_path / "copy_of_a.png").write_bytes(data)
    prediction, skipped = fitted.predict(find_images([tmp_path])[0])

    assert skipped == []
    assert prediction.names == [
        str(tmp_path / "a.png"),
        str(tmp_path / "copy_of_a.png"),
    ]
    torch.testing.assert_close(prediction.scores[0], prediction.scores[1])


def test_constant_training_images_warn_and_score_finite() -> None:
    black = [(f"black{i}", Image.new("RGB", (48, 48))) for i in range(4)]
    with pytest.warns(FewImagesWarning) as caught:
        padim = _fit(black, n_features=2)
    assert any("4 training images gave identical" in str(w.message) for w in caught)
    probes = black[:1] + [
        ("white", Image.new("RGB", (48, 48), (255, 255, 255))),
        ("noise", _noise(48, 48)),
    ]
    prediction, _ = padim.predict(probes)

    _assert_finite(prediction)
    assert prediction.scores[0] < prediction.scores[1]


def test_constant_image_scored_by_a_normal_model_is_finite(fitted: Padim) -> None:
    probes = [("black", Image.new("RGB", (48, 48))), ("white", Image.new("L", (9, 9)))]
    _assert_finite(fitted.predict(probes)[0])


def test_one_training_image_warns_and_scores_finite() -> None:
    with pytest.warns(FewImagesWarning, match="1 image"):
        padim = _fit([("only", _noise(48, 48))])
    prediction, _ = padim.predict(
        [("only", _noise(48, 48)), ("other", _noise(48, 48, 3))]
    )
    _assert_finite(prediction)
    assert prediction.scores[0] < prediction.scores[1]


def test_fewer_training_images_than_features_warns_and_scores_finite() -> None:
    with pytest.warns(FewImagesWarning, match="3 images for 100 channels"):
        padim = _fit([(f"n{i}", _noise(48, 48, i)) for i in range(3)], n_features=100)
    _assert_finite(padim.predict([("x", _noise(48, 48, 7))])[0])


def test_training_set_with_nothing_usable_names_a_reason(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("text")
    with pytest.raises(ValueError, match="none of the 2 files.*empty.png: the file"):
        _fit(find_images([tmp_path])[0])


class _NanFeatures(nn.Module):
    """A backbone whose weights went bad: every feature is NaN."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v * float("nan") for k, v in self.inner(images).items()}


def test_damaged_backbone_weights_never_give_nan_scores(fitted: Padim) -> None:
    padim = Padim("efficientnet_lite0", n_features=N_FEATURES, image_size=SIZE, seed=1)
    padim.stats, padim.model.gaussian = fitted.stats, fitted.model.gaussian
    padim.model.feature_extractor = _NanFeatures(padim.model.feature_extractor)
    with pytest.raises(ValueError, match="NaN or infinite features"):
        padim.predict([("x", _noise(48, 48))])


# --- zip archives -------------------------------------------------------------


def _zip(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            archive.writestr(info, target)
    return buffer.getvalue()


PNG = _encode(_noise(16, 16), "PNG")


@dataclass(frozen=True)
class ZipCase:
    """An archive, the flat names it must give, and the skips by reason."""

    id: str
    make: Callable[[], bytes]
    written: tuple[str, ...]
    skipped: dict[str, str]


ZIP_CASES = [
    ZipCase(
        "nested_folders",
        lambda: _zip({"line1/good/a.png": PNG, "line1/good/b.png": PNG, "c.png": PNG}),
        ("line1_good_a.png", "line1_good_b.png", "c.png"),
        {},
    ),
    ZipCase(
        "clashing_flat_names",
        lambda: _zip({"a/b.png": PNG, "a_b.png": PNG, "A/B.PNG": PNG}),
        ("a_b.png", "a_b-1.png", "A_B.png"),
        {},
    ),
    ZipCase(
        "dot_dot_members",
        lambda: _zip(
            {"../evil.png": PNG, "ok/../../evil2.png": PNG, "..\\evil3.png": PNG}
        ),
        (),
        {
            "../evil.png": "climbs out",
            "ok/../../evil2.png": "climbs out",
            "..\\evil3.png": "climbs out",
        },
    ),
    ZipCase(
        "absolute_members",
        lambda: _zip({"/tmp/abs.png": PNG, "C:/abs.png": PNG, "\\abs.png": PNG}),
        (),
        {
            "/tmp/abs.png": "absolute",
            "C:/abs.png": "absolute",
            "\\abs.png": "absolute",
        },
    ),
    ZipCase(
        "symlink_member",
        lambda: _zip({"real.png": PNG}, symlinks={"link.png": "/etc/passwd"}),
        ("real.png",),
        {"link.png": "symbolic link"},
    ),
    ZipCase(
        "junk_members",
        lambda: _zip(
            {
                "a.png": PNG,
                "readme.txt": b"hi",
                "__MACOSX/._a.png": b"\x00",
                ".hidden.png": PNG,
                "inner.zip": _zip({"x.png": PNG}),
            }
        ),
        ("a.png",),
        {
            "readme.txt": "not an image",
            "__MACOSX/._a.png": "macOS",
            ".hidden.png": "hidden",
            "inner.zip": "nested archives are not unpacked",
        },
    ),
    ZipCase(
        "high_ratio_member",
        lambda: _zip({"ok.png": PNG, "flat.bmp": b"\x00" * (8 * 2**20)}),
        ("ok.png",),
        {"flat.bmp": "zip bomb"},
    ),
]


@pytest.mark.parametrize("case", ZIP_CASES, ids=lambda case: case.id)
def test_zip_case_unpacks_only_images_inside_the_folder(
    case: ZipCase, tmp_path: Path
) -> None:
    dest = tmp_path / "workspace" / "upload"
    written, skipped = extract_zip(case.make(), dest, name=f"{case.id}.zip")

    assert [path.name for path in written] == list(case.written)
    assert all(path.parent == dest.resolve() for path in written)
    assert {item.name for item in skipped} == set(case.skipped)
    for item in skipped:
        assert case.skipped[item.name] in item.reason
    outside = [p for p in tmp_path.rglob("*") if dest.resolve() not in p.parents]
    assert all(p.is_dir() for p in outside), outside


def test_zip_bomb_by_total_size_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    bomb = _zip({f"part{i}.bmp": b"\x00" * 2**20 for i in range(20)})
    with pytest.raises(ArchiveError, match="bomb"):
        extract_zip(bomb, tmp_path, max_total_bytes=10 * 2**20, name="bomb.zip")
    assert list(tmp_path.iterdir()) == []


def test_zip_member_that_inflates_past_its_declared_size_is_skipped(
    tmp_path: Path,
) -> None:
    data = bytearray(_zip({"liar.bmp": b"\x00" * 500_000, "ok.png": PNG}))
    # Shrink the declared size in both the local and the central header.
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(signature)
        data[at + offset : at + offset + 4] = struct.pack("<I", 1000)
    written, skipped = extract_zip(bytes(data), tmp_path / "out")

    assert [path.name for path in written] == ["ok.png"]
    assert [item.name for item in skipped] == ["liar.bmp"]
    assert list((tmp_path / "out").iterdir()) == written


def test_zip_with_too_many_members_is_refused(tmp_path: Path) -> None:
    many = _zip({f"{i}.png": PNG for i in range(30)})
    with pytest.raises(ArchiveError, match="30 members, more than the limit of 20"):
        extract_zip(many, tmp_path, max_members=20)


@pytest.mark.parametrize("data", [b"", b"not a zip", PNG], ids=["empty", "text", "png"])
def test_something_else_than_a_zip_is_refused(data: bytes, tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="up.zip: not a readable zip"):
        extract_zip(data, tmp_path, name="up.zip")


def test_zip_never_overwrites_nor_follows_links_in_the_folder(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "a.png").write_bytes(b"earlier upload")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"secret")
    (dest / "b.png").symlink_to(secret)
    written, _ = extract_zip(_zip({"a.png": PNG, "b.png": PNG}), dest)

    assert [path.name for path in written] == ["a-1.png", "b-1.png"]
    assert (dest / "a.png").read_bytes() == b"earlier upload"
    assert secret.read_bytes() == b"secret"


def test_unpack_zip_pairs_each_member_with_its_file(tmp_path: Path) -> None:
    archive = _zip(
        {"x/a.png": PNG, "../bad.png": PNG, "y/a.png": PNG, "x/a.png.txt": b""}
    )
    unpacked, skipped = unpack_zip(archive, tmp_path)

    assert unpacked == [
        Unpacked("x/a.png", tmp_path.resolve() / "x_a.png"),
        Unpacked("y/a.png", tmp_path.resolve() / "y_a.png"),
    ]
    assert [item.name for item in skipped] == ["../bad.png", "x/a.png.txt"]


def test_refused_zip_removes_the_folder_it_created(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError):
        extract_zip(b"not a zip", tmp_path / "new" / "folder")
    assert not (tmp_path / "new" / "folder").exists()


def test_unpacked_zip_images_decode(tmp_path: Path) -> None:
    written, _ = extract_zip(_zip({"x/a.png": PNG, "y/a.png": PNG}), tmp_path)
    assert [read_image(path).size for path in written] == [(16, 16), (16, 16)]


# --- model files --------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path(fitted: Padim, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(fitted, tmp_path_factory.mktemp("model") / "good.safetensors")


def _parts(path: Path) -> tuple[dict, dict]:
    length = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8 : 8 + length])
    return load_file(path), header["__metadata__"]


def _rewrite(
    source: Path,
    target: Path,
    tensors: Callable[[dict], None] | None = None,
    config: Callable[[dict], None] | None = None,
    metadata: Callable[[dict], None] | None = None,
) -> None:
    """Copy a model file, changing tensors, configuration or metadata."""
    values, meta = _parts(source)
    if tensors is not None:
        tensors(values)
    if config is not None:
        parsed = json.loads(meta["config"])
        config(parsed)
        meta["config"] = json.dumps(parsed)
    if metadata is not None:
        metadata(meta)
    save_file(values, target, metadata=meta)


class _Evil:
    """Unpickling this would create the marker file."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _pickle_file(good: Path, target: Path) -> None:
    _Evil.marker = str(target.with_suffix(".pwned"))
    target.write_bytes(pickle.dumps(_Evil()))


def _nan_mean(tensors: dict) -> None:
    tensors["mean"][0, 0] = float("nan")


def _indefinite_scatter(tensors: dict) -> None:
    """No negative variance, yet no covariance: |correlation| far above 1."""
    tensors["scatter"][0].zero_()
    tensors["scatter"][0, 0, 1] = tensors["scatter"][0, 1, 0] = 1e6


MODEL_CASES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "torch_save_dict": (
        lambda good, path: torch.save({"mean": torch.zeros(3)}, path),
        "pickles are never loaded",
    ),
    "malicious_pickle": (_pickle_file, "pickles are never loaded"),
    "empty": (lambda good, path: path.write_bytes(b""), "too short"),
    "truncated_tensors": (
        lambda good, path: path.write_bytes(
            good.read_bytes()[: good.stat().st_size // 2]
        ),
        "damaged tensors",
    ),
    "truncated_header": (
        lambda good, path: path.write_bytes(good.read_bytes()[:100]),
        r"not a safetensors model file \(its header would not fit\)",
    ),
    "header_length_bomb": (
        lambda good, path: path.write_bytes(struct.pack("<Q", 2**62) + b"{}"),
        r"not a safetensors model file \(its header would not fit\)",
    ),
    "deeply_nested_header": (
        lambda good, path: path.write_bytes(
            struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000
        ),
        r"not a safetensors model file \(its header is not JSON\)",
    ),
    "foreign_safetensors": (
        lambda good, path: save_file({"x": torch.zeros(2)}, path),
        "not a padim_core model file",
    ),
    "future_version": (
        lambda good, path: _rewrite(
            good,
            path,
            metadata=lambda m: m.update(format_version=str(FORMAT_VERSION + 1)),
        ),
        "newer padim_core",
    ),
    "channels_not_matching_config": (
        lambda good, path: _rewrite(
            good, path, config=lambda c: c.update(n_features=N_FEATURES + 1)
        ),
        "shape",
    ),
    "positions_not_matching_config": (
        lambda good, path: _rewrite(
            good, path, config=lambda c: c.update(image_size=96)
        ),
        "positions",
    ),
    "unknown_backbone": (
        lambda good, path: _rewrite(
            good, path, config=lambda c: c.update(backbone="x")
        ),
        "unknown backbone",
    ),
    "n_features_as_text": (
        lambda good, path: _rewrite(
            good, path, config=lambda c: c.update(n_features="16")
        ),
        "bad configuration",
    ),
    "nan_threshold": (
        lambda good, path: _rewrite(
            good, path, metadata=lambda m: m.update(thresholds='{"image": NaN}')
        ),
        "finite number",
    ),
    "threshold_as_text": (
        lambda good, path: _rewrite(
            good, path, metadata=lambda m: m.update(thresholds='{"image": "high"}')
        ),
        "finite number",
    ),
    "nan_in_stats": (
        lambda good, path: _rewrite(good, path, tensors=_nan_mean),
        "NaN or infinity",
    ),
    "huge_mean": (
        lambda good, path: _rewrite(
            good, path, tensors=lambda t: t["mean"].fill_(1e30)
        ),
        "not statistics of a fit",
    ),
    "float64_stats": (
        lambda good, path: _rewrite(
            good, path, tensors=lambda t: t.update(mean=t["mean"].double())
        ),
        "dtype",
    ),
    "negative_variance": (
        lambda good, path: _rewrite(
            good, path, tensors=lambda t: t["scatter"][0].diagonal().fill_(-5.0)
        ),
        "negative variances",
    ),
    "indefinite_scatter": (
        lambda good, path: _rewrite(good, path, tensors=_indefinite_scatter),
        "cannot be inverted",
    ),
    "zero_count": (
        lambda good, path: _rewrite(good, path, tensors=lambda t: t["count"].zero_()),
        "positive",
    ),
    "a_folder": (lambda good, path: path.mkdir(), "cannot read"),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_bad_model_file_is_refused_with_its_name(
    case: str, model_path: Path, tmp_path: Path
) -> None:
    make, match = MODEL_CASES[case]
    path = tmp_path / f"{case}.safetensors"
    make(model_path, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewImagesWarning)
        with pytest.raises(ModelFileError, match=match) as error:
            load_model(path)
    assert str(error.value).startswith(path.name)
    assert not path.with_suffix(".pwned").exists()


def test_the_malicious_pickle_would_really_create_the_marker(tmp_path: Path) -> None:
    path = tmp_path / "evil.safetensors"
    _pickle_file(path, path)
    pickle.loads(path.read_bytes())  # the very thing the loader must never do
    assert path.with_suffix(".pwned").exists()


def test_malicious_pickle_through_the_cli_creates_nothing(
    model_path: Path, tmp_path: Path
) -> None:
    path = tmp_path / "evil.safetensors"
    _pickle_file(model_path, path)
    image = tmp_path / "a.png"
    image.write_bytes(PNG)
    result = _run_cli("predict", "--model", str(path), str(image))

    assert result.returncode == 2
    line = _only_one_error_line(result.stderr)
    assert line.startswith("error: evil.safetensors: a pickle or torch.save file")
    assert not path.with_suffix(".pwned").exists()


def test_the_good_model_file_loads(model_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewImagesWarning)
        loaded = load_model(model_path)
    assert loaded.n_images == 8
    assert read_header(model_path)["config"].n_features == N_FEATURES


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
@pytest.mark.parametrize("image_size", [32, 45, 100])
def test_grid_positions_match_the_network(backbone: str, image_size: int) -> None:
    padim = Padim(backbone, pre_trained=False, n_features=4, image_size=image_size)
    embedding = padim.embed(torch.zeros(1, 3, image_size, image_size))
    h, w = embedding.shape[-2:]
    assert grid_positions(padim.config) == h * w


# --- atomic, concurrent saves -------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_model_has_the_umask_permissions(
    fitted: Padim, tmp_path: Path, umask: int
) -> None:
    previous = os.umask(umask)
    try:
        path = save_model(fitted, tmp_path / "m.safetensors")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_threads_saving_one_model_to_one_path_never_corrupt_it(
    fitted: Padim, tmp_path: Path
) -> None:
    path = tmp_path / "shared.safetensors"
    save_model(fitted, path)
    scatter_before = fitted.stats.scatter.clone()
    errors: list[BaseException] = []

    def save_many() -> None:
        try:
            for _ in range(5):
                save_model(fitted, path)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    def load_many() -> None:
        try:
            for _ in range(10):
                read_header(path)
                load_file(path)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=save_many) for _ in range(3)]
    threads.append(threading.Thread(target=load_many))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    torch.testing.assert_close(fitted.stats.scatter, scatter_before, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewImagesWarning)
        loaded = load_model(path)
    probe = [("x", _noise(48, 48, 5))]
    torch.testing.assert_close(
        loaded.predict(probe)[0].scores,
        fitted.predict(probe)[0].scores,
        rtol=1e-4,
        atol=1e-4,
    )
    assert [p.name for p in tmp_path.iterdir()] == ["shared.safetensors"]


_SAVER = """
import sys, warnings
warnings.simplefilter("ignore")
from padim_core.model_file import load_model, save_model
padim = load_model(sys.argv[1])
padim.metadata["writer"] = sys.argv[3]
for _ in range(4):
    save_model(padim, sys.argv[2])
"""


def test_processes_saving_to_one_path_leave_a_loadable_model(
    model_path: Path, tmp_path: Path
) -> None:
    target = tmp_path / "raced.safetensors"
    savers = [
        subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(model_path), str(target), str(k)],
            cwd=REPOSITORY,
            stderr=subprocess.PIPE,
        )
        for k in range(2)
    ]
    for saver in savers:
        assert saver.wait(timeout=180) == 0, saver.stderr.read().decode()
        saver.stderr.close()

    header = read_header(target)
    assert header["info"]["writer"] in ("0", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewImagesWarning)
        assert load_model(target).n_images == 8
    assert [p.name for p in tmp_path.iterdir()] == ["raced.safetensors"]


def test_unsaveable_model_leaves_the_old_file(fitted: Padim, tmp_path: Path) -> None:
    path = save_model(fitted, tmp_path / "m.safetensors")
    before = path.read_bytes()
    fitted.with_thresholds(image=float("nan"))
    try:
        with pytest.raises(ValueError, match="finite number"):
            save_model(fitted, path)
    finally:
        fitted.with_thresholds(image=None)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# --- the command line ---------------------------------------------------------


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "padim_core", *args],
        cwd=REPOSITORY,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


FIT = ["-q", "fit", "--image-size", str(SIZE), "--n-features", str(N_FEATURES)]


def _only_one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert stderr.rstrip().splitlines()[-1] == errors[0]
    return errors[0]


def test_cli_fit_skips_bad_files_by_name_and_goes_on(tmp_path: Path, capsys) -> None:
    train = tmp_path / "train"
    train.mkdir()
    for i in range(3):
        _noise(48, 48, i).save(train / f"good{i}.png")
    for case in IMAGE_CASES[:4]:
        _write_case(case, train)
    out = tmp_path / "m.safetensors"
    status = main([*FIT, "--train", str(train), "--out", str(out)])

    stderr = capsys.readouterr().err
    assert status == 0
    assert out.is_file()
    for case in IMAGE_CASES[:4]:
        assert f"skipped {train / case.name}: " in stderr


def test_cli_fit_with_nothing_usable_exits_2_with_one_line(
    tmp_path: Path, capsys
) -> None:
    for case in IMAGE_CASES[:4]:
        _write_case(case, tmp_path)
    status = main([*FIT, "--train", str(tmp_path), "--out", str(tmp_path / "m")])

    line = _only_one_error_line(capsys.readouterr().err)
    assert status == 2
    assert "none of the 4 files could be used" in line
    assert not (tmp_path / "m").exists()


def test_cli_predict_on_the_corpus_scores_what_is_usable(
    model_path: Path, tmp_path: Path, capsys
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for case in IMAGE_CASES:
        if case.setup is None:
            _write_case(case, corpus)
    csv_path = tmp_path / "scores.csv"
    status = main(
        [
            "-q",
            "predict",
            "--model",
            str(model_path),
            "--csv",
            str(csv_path),
            str(corpus),
        ]
    )

    stderr = capsys.readouterr().err
    assert status == 0
    rows = csv_path.read_text().splitlines()[1:]
    scored = {Path(row.split(",")[0]).name: float(row.split(",")[1]) for row in rows}
    assert set(scored) == {c.name for c in IMAGE_CASES if c.used and c.setup is None}
    assert all(np.isfinite(list(scored.values())))
    for case in IMAGE_CASES:
        if not case.used and case.setup is None:
            assert f"skipped {corpus / case.name}: " in stderr


@pytest.mark.parametrize(
    "arguments, match",
    [
        (["--csv", "{tmp}"], "is a folder; give a CSV file name"),
        (["{tmp}/missing.png"], "no image files"),
        (["{tmp}/bad"], "none of the images could be used"),
    ],
    ids=["csv_is_a_folder", "missing_input", "only_bad_inputs"],
)
def test_cli_predict_failures_are_one_line(
    arguments: list[str], match: str, model_path: Path, tmp_path: Path, capsys
) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "empty.png").write_bytes(b"")
    (tmp_path / "a.png").write_bytes(PNG)
    given = [a.format(tmp=tmp_path) for a in arguments]
    if not any(a.endswith((".png", "bad")) for a in given):
        given.append(str(tmp_path / "a.png"))
    status = main(["-q", "predict", "--model", str(model_path), *given])

    assert status == 2
    assert match in _only_one_error_line(capsys.readouterr().err)


def test_cli_evaluate_skips_samples_whose_mask_is_bad(
    model_path: Path, tmp_path: Path, capsys
) -> None:
    for folder in ("test/good", "test/crack", "ground_truth/crack"):
        (tmp_path / folder).mkdir(parents=True)
    for i in range(3):
        _noise(48, 48, i).save(tmp_path / "test" / "good" / f"{i}.png")
        _noise(48, 48, 10 + i).save(tmp_path / "test" / "crack" / f"{i}.png")
    masks = tmp_path / "ground_truth" / "crack"
    Image.new("L", (48, 48), 255).save(masks / "0_mask.png")
    (masks / "1_mask.png").write_text("not a mask")
    (masks / "2_mask.png").write_bytes(_png_header_only(20_000, 20_000))
    status = main(
        ["-q", "evaluate", "--model", str(model_path), "--data", str(tmp_path)]
    )

    result = json.loads(capsys.readouterr().out)
    assert status == 0
    assert (result["n_good"], result["n_defect"]) == (3, 1)
    reasons = {Path(item["path"]).name: item["reason"] for item in result["skipped"]}
    assert set(reasons) == {"1.png", "2.png"}
    assert reasons["1.png"].startswith(f"its mask {masks / '1_mask.png'}: not an image")
    assert "decompression bomb" in reasons["2.png"]


@pytest.mark.parametrize("threshold", ["nan", "inf", "-inf"])
def test_cli_predict_refuses_a_threshold_that_is_not_finite(
    threshold: str, model_path: Path, tmp_path: Path, capsys
) -> None:
    (tmp_path / "a.png").write_bytes(PNG)
    arguments = [f"--threshold={threshold}", str(tmp_path / "a.png")]
    status = main(["-q", "predict", "--model", str(model_path), *arguments])

    assert status == 2
    assert "finite" in _only_one_error_line(capsys.readouterr().err)


def test_cli_fit_refuses_a_folder_as_output_before_fitting(
    tmp_path: Path, capsys
) -> None:
    (tmp_path / "train").mkdir()
    _noise(48, 48).save(tmp_path / "train" / "a.png")
    status = main([*FIT, "--train", str(tmp_path / "train"), "--out", str(tmp_path)])

    assert status == 2
    line = _only_one_error_line(capsys.readouterr().err)
    assert line == f"error: --out {tmp_path}: is a folder; give a model file name"


@pytest.mark.parametrize("seed", [-5, 2**64 - 1])
def test_any_seed_torch_accepts_round_trips(seed: int, tmp_path: Path) -> None:
    padim = Padim("efficientnet_lite0", n_features=4, image_size=32, seed=seed)
    padim.fit([("a", _noise(32, 32)), ("b", _noise(32, 32, 1))])
    path = save_model(padim, tmp_path / "m.safetensors")
    assert load_model(path).config.seed == seed


def test_cli_bad_model_file_exits_2_without_traceback(
    model_path: Path, tmp_path: Path
) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(model_path.read_bytes()[:1000])
    result = _run_cli("predict", "--model", str(path), str(tmp_path))

    assert result.returncode == 2
    assert "short.safetensors: damaged tensors" in _only_one_error_line(result.stderr)
