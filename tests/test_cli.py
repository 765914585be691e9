"""The command line on a small subset of ../shared/datasets/bsdata."""

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from padim_core.cli import display_scale, main
from padim_core.model import Thresholds
from padim_core.model_file import load_model
from padim_core.visualize import LEGEND_HEIGHT

BSDATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "bsdata"

pytestmark = pytest.mark.skipif(not BSDATA.is_dir(), reason=f"{BSDATA} not found")


def _link(files, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        (folder / file.name).symlink_to(file)


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    """A small MVTec-layout copy (symlinks) of bsdata."""
    root = tmp_path_factory.mktemp("bsdata")
    _link(sorted((BSDATA / "train" / "good").iterdir())[:24], root / "train" / "good")
    _link(sorted((BSDATA / "test" / "good").iterdir())[:6], root / "test" / "good")
    pitting = sorted((BSDATA / "test" / "pitting").iterdir())[:6]
    _link(pitting, root / "test" / "pitting")
    masks = [
        BSDATA / "ground_truth" / "pitting" / f"{p.stem}_mask.png" for p in pitting
    ]
    _link(masks, root / "ground_truth" / "pitting")
    return root


@pytest.fixture(scope="module")
def model(subset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "bs.safetensors"
    status = main(
        [
            "-q",
            "fit",
            "--train",
            str(subset / "train"),
            "--out",
            str(out),
            "--image-size",
            "128",
            "--n-features",
            "40",
            "--batch-size",
            "8",
        ]
    )
    assert status == 0
    return out


def test_fit_writes_a_loadable_model(model):
    padim = load_model(model)
    assert padim.config.backbone == "efficientnet_lite0"
    assert padim.config.image_size == 128
    assert padim.n_images == 24


def test_predict_writes_csv_and_overlays(model, subset, tmp_path, capsys):
    out, table = tmp_path / "heat", tmp_path / "scores.csv"
    status = main(
        [
            "-q",
            "predict",
            "--model",
            str(model),
            "--csv",
            str(table),
            "--out",
            str(out),
            "--threshold",
            "10",
            str(subset / "test"),
        ]
    )
    assert status == 0
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 12
    assert {row["verdict"] for row in rows} <= {"pass", "fail"}
    for row in rows:
        assert (row["verdict"] == "fail") == (float(row["score"]) >= 10)
    overlays = sorted(out.glob("*_heatmap.png"))
    assert len(overlays) == 12
    # Each overlay keeps the image's size and adds the colour legend below it.
    originals = {path.stem: path for path in (subset / "test").rglob("*.jpg")}
    for drawn_path in overlays:
        original = originals[drawn_path.name.removesuffix("_heatmap.png")]
        with Image.open(original) as image, Image.open(drawn_path) as drawn:
            assert drawn.size == (image.width, image.height + LEGEND_HEIGHT)


def test_predict_without_threshold_says_so(model, subset, capsys):
    image = next((subset / "test" / "good").iterdir())
    assert main(["-q", "predict", "--model", str(model), str(image)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == "path,score,verdict"
    assert captured.out.splitlines()[1].endswith(",unset")
    assert "no image threshold" in captured.err


def test_evaluate_prints_metrics_and_saves_thresholds(model, subset, tmp_path, capsys):
    report = tmp_path / "metrics.json"
    status = main(
        [
            "-q",
            "evaluate",
            "--model",
            str(model),
            "--data",
            str(subset),
            "--json",
            str(report),
            "--save-thresholds",
        ]
    )
    assert status == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(report.read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1", "threshold"):
        assert 0 <= result[key] <= 1 or key == "threshold", key
    assert (result["n_good"], result["n_defect"]) == (6, 6)
    low, high = result["image_auroc_low"], result["image_auroc_high"]
    assert 0 <= low <= result["image_auroc"] <= high <= 1
    # 24 training images at 128 px: well above chance, far from the full fit.
    assert result["pixel_auroc"] > 0.6
    assert load_model(model).thresholds.image == pytest.approx(result["threshold"])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["fit", "--out", "m.safetensors"], "--train"),
        (["fit", "--train", "nowhere", "--out", "m"], "not a folder"),
        (["predict", "--model", "missing.safetensors", "x.png"], "missing.safetensors"),
        (["evaluate", "--model", "m", "--data", "."], "no test/ folder"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    arguments, message, capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert main(arguments) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ")
    assert message in error
    assert len(error.splitlines()) == 1


def test_an_empty_weights_file_is_named_with_the_reason(subset, tmp_path, capsys):
    empty = tmp_path / "empty.pth"
    empty.touch()
    command = ["fit", "--train", str(subset / "train"), "--out", str(tmp_path / "m")]

    assert main([*command, "--weights", str(empty)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"error: cannot read weights file {empty}: the file is empty"


def test_bad_n_features_lists_what_is_allowed(subset, tmp_path, capsys):
    status = main(
        [
            "fit",
            "--train",
            str(subset / "train"),
            "--out",
            str(tmp_path / "m"),
            "--n-features",
            "5000",
        ]
    )
    assert status == 2
    assert "choose 1 to 176" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("saved", "scores", "expected"),
    [
        (Thresholds(image=30.0), [14.0], (0.0, 30.0, 60.0)),
        (
            Thresholds(image=10.0, score_min=2.0, score_max=50.0),
            [99.0],
            (2.0, 10.0, 50.0),
        ),
        (Thresholds(), [8.0, 20.0], (0.0, 10.0, 20.0)),
    ],
)
def test_display_scale_is_shared_and_centred_on_the_threshold(saved, scores, expected):
    scale = display_scale(saved, scores)
    assert (scale.score_min, scale.image, scale.score_max) == expected


def _fit_args(subset: Path, out: Path) -> list[str]:
    return ["-q", "fit", "--train", str(subset / "train"), "--out", str(out)]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("model", "is the --out model file"),
        ("image", "is one of the training images"),
        ("-", "give a CSV file name"),
    ],
)
def test_the_review_never_overwrites_the_model_or_an_image(
    subset, tmp_path, capsys, name, message
):
    out = tmp_path / "m.safetensors"
    image = min((subset / "train" / "good").iterdir())
    review = {"model": out, "image": image, "-": Path("-")}[name]
    before = image.read_bytes()

    assert main([*_fit_args(subset, out), "--review", str(review)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: --review {review}: ")
    assert message in error and len(error.splitlines()) == 1
    assert not out.exists() and image.read_bytes() == before
    assert not Path("-").exists()


def test_the_model_never_overwrites_a_training_image(subset, tmp_path, capsys):
    image = min((subset / "train" / "good").iterdir())
    before = image.read_bytes()

    assert main(_fit_args(subset, image)) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        f"error: --out {image}: is one of the training images; give a new model "
        "file name"
    )
    assert image.read_bytes() == before


@pytest.mark.parametrize(
    ("option", "target", "message"),
    [
        ("--out", "file", "is a file; give a folder for the heatmaps"),
        ("--csv", "folder", "is a folder; give a CSV file name"),
        ("--csv", "missing/x.csv", "its folder does not exist"),
        ("--csv", "image", "is one of the images to score"),
    ],
)
def test_predict_refuses_unwritable_outputs_before_scoring(
    model, subset, tmp_path, capsys, option, target, message
):
    image = tmp_path / "one.jpg"
    image.write_bytes(min((subset / "test" / "good").iterdir()).read_bytes())
    (tmp_path / "file").write_text("keep me")
    (tmp_path / "folder").mkdir()
    path = image if target == "image" else tmp_path / target
    before = image.read_bytes()

    status = main(["predict", "--model", str(model), option, str(path), str(image)])

    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""  # nothing was scored
    assert captured.err.strip() == f"error: {option} {path}: {message}"
    assert (tmp_path / "file").read_text() == "keep me"
    assert image.read_bytes() == before


def test_the_review_progress_counts_its_own_time(monkeypatch, capsys):
    from padim_core import cli

    clock = iter([0.0, 10.0, 10.0, 12.0])  # fit starts; fit ends; review batch
    monkeypatch.setattr(cli.time, "perf_counter", lambda: next(clock))
    report = cli._review_progress(False, 4)
    report(4, 8)  # the fit's pass is done at 10 s
    report(6, 8)  # half the review, 2 s later

    lines = capsys.readouterr().err.replace("\r", "\n").split()
    text = " ".join(lines)
    assert "fit: 4/4 images, 10s, ~0s left" in text
    assert "review: 2/4 images, 2s, ~2s left" in text


def test_an_interrupt_ends_the_progress_line_before_its_message(
    subset, tmp_path, capsys, monkeypatch
):
    from padim_core import cli

    def interrupted_fit(self, sources, batch_size, progress):
        progress(8, 24)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.Padim, "fit", interrupted_fit)
    out = tmp_path / "m.safetensors"

    assert main(["fit", "--train", str(subset / "train"), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.splitlines()[-1] == "error: interrupted"
    assert "left\nerror: interrupted\n" in error
    assert not out.exists()


@pytest.mark.parametrize(
    ("command", "option", "target", "message"),
    [
        ("predict", "--csv", "model", "is the --model file"),
        ("predict", "--csv", "other", "is a model file"),
        ("evaluate", "--json", "model", "is the --model file"),
        ("evaluate", "--json", "other", "is a model file"),
        ("fit", "--review", "other", "is a model file"),
    ],
)
def test_no_report_is_written_over_a_model_file(
    model, subset, tmp_path, capsys, command, option, target, message
):
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(model.read_bytes())
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"another model")
    path = mine if target == "model" else other
    arguments = {
        "predict": ["predict", "--model", str(mine), str(subset / "test" / "good")],
        "evaluate": ["evaluate", "--model", str(mine), "--data", str(subset)],
        "fit": _fit_args(subset, tmp_path / "new.safetensors"),
    }[command]

    assert main([*arguments, option, str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().startswith(f"error: {option} {path}: {message}")
    assert captured.out == ""
    assert mine.read_bytes() == model.read_bytes()
    assert other.read_bytes() == b"another model"
