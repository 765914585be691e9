"""The training-image review: out-of-fold scores, the flag rule, the CLI."""

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from padim_core.cli import main
from padim_core.model import Padim
from padim_core.review import (
    MIN_REVIEW_IMAGES,
    MODIFIED_Z_CUTOFF,
    ReviewWarning,
    fit_with_review,
    fold_of,
    modified_z_scores,
)

SIZE = 64
N_FEATURES = 8


def _picture(seed: int, odd: bool = False) -> Image.Image:
    """A smooth gradient with a little seeded noise; ``odd`` adds a white block."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(40, 200, SIZE)[None, :, None] * np.ones((SIZE, 1, 3))
    pixels = ramp + rng.normal(0, 6, (SIZE, SIZE, 3))
    if odd:
        pixels[20:44, 20:44] = 255
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _pairs(n: int, odd: tuple[int, ...] = ()) -> list[tuple[str, Image.Image]]:
    return [(f"good/{i:03d}.png", _picture(i, i in odd)) for i in range(n)]


def _padim(seed: int = 0) -> Padim:
    return Padim(
        "resnet18",
        pre_trained=False,
        n_features=N_FEATURES,
        image_size=SIZE,
        seed=seed,
    )


def _fit_quietly(padim: Padim, sources, batch_size: int = 5) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        padim.fit(sources, batch_size)


@pytest.fixture(scope="module")
def reviewed():
    torch.manual_seed(0)
    padim = _padim()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report, review = fit_with_review(padim, _pairs(30, odd=(17,)), batch_size=7)
    return padim, report, review


def test_a_fit_with_review_gives_the_plain_fit_bit_for_bit(reviewed):
    padim, report, _ = reviewed
    plain = _padim()
    _fit_quietly(plain, _pairs(30, odd=(17,)), batch_size=7)

    assert report.images == plain.n_images == 30
    assert torch.equal(padim.stats.shift, plain.stats.shift)
    assert torch.equal(padim.stats.scatter, plain.stats.scatter)
    assert torch.equal(
        padim.model.gaussian.inv_covariance, plain.model.gaussian.inv_covariance
    )


def test_out_of_fold_scores_equal_two_plain_fits_on_the_folds(reviewed):
    _, _, review = reviewed
    sources = dict(_pairs(30, odd=(17,)))
    folds = [[row.path for row in review.rows if row.fold == f] for f in (0, 1)]
    assert sorted(map(len, folds)) == [15, 15]

    expected = {}
    for fitted_on, scored in (folds, folds[::-1]):
        padim = _padim()
        _fit_quietly(padim, [(name, sources[name]) for name in fitted_on])
        prediction, _ = padim.predict([(name, sources[name]) for name in scored])
        expected.update(zip(prediction.names, prediction.scores.tolist()))

    assert [row.path for row in review.rows] == list(sources)
    got = [row.score for row in review.rows]
    np.testing.assert_allclose(got, [expected[name] for name in sources], rtol=1e-4)


def test_the_odd_image_is_flagged_and_only_it(reviewed):
    _, _, review = reviewed
    assert [row.path for row in review.flagged] == ["good/017.png"]
    assert review.note is None
    assert all((row.score > review.cutoff) == row.flagged for row in review.rows)


def _held(odd: bool = True) -> list[tuple[str, Image.Image]]:
    """Four images kept out of the fit, the third one with a white block."""
    return [(f"held/{i:03d}.png", _picture(100 + i, odd and i == 2)) for i in range(4)]


@pytest.fixture(scope="module")
def with_held_out():
    padim = _padim()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report, review = fit_with_review(
            padim, _pairs(30), batch_size=7, held_out=_held()
        )
    return padim, report, review


def test_held_out_images_are_checked_but_not_fitted(with_held_out):
    padim, report, review = with_held_out
    plain = _padim()
    _fit_quietly(plain, _pairs(30), batch_size=7)

    assert report.images == padim.n_images == 30
    assert torch.equal(padim.stats.scatter, plain.stats.scatter)
    assert torch.equal(
        padim.model.gaussian.inv_covariance, plain.model.gaussian.inv_covariance
    )
    assert [row.path for row in review.rows] == [
        *(name for name, _ in _pairs(30)),
        *(name for name, _ in _held()),
    ]
    assert [row.held_out for row in review.rows] == [False] * 30 + [True] * 4
    assert review.held_out == 4
    assert [row.path for row in review.flagged] == ["held/002.png"]


def test_a_held_out_image_is_scored_by_one_fold_alone(with_held_out):
    _, _, review = with_held_out
    sources = dict(_pairs(30))
    held = dict(_held())
    fitted = [row for row in review.rows if not row.held_out]
    checked = [row for row in review.rows if row.held_out]
    assert {row.fold for row in checked} == {0, 1}  # both folds score some

    for row in checked:
        padim = _padim()  # fitted on the fold the image stands in for, not its own
        names = [other.path for other in fitted if other.fold != row.fold]
        assert len(names) == 15
        _fit_quietly(padim, [(name, sources[name]) for name in names])
        prediction, _ = padim.predict([(row.path, held[row.path])])
        np.testing.assert_allclose(row.score, prediction.scores[0].item(), rtol=1e-4)


def test_progress_counts_the_images_left_to_score_after_the_fit():
    sources = [*_pairs(6), ("broken.png", b"not an image")]
    extra = [*_held(odd=False)[:2], ("gone.png", b"")]
    calls = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, review = fit_with_review(
            _padim(), sources, 2, lambda *c: calls.append(c), held_out=extra
        )

    fitting = [call for call in calls if call[0] <= len(sources)]
    scoring = [call for call in calls if call[0] > len(sources)]
    assert {total for _, total in fitting} == {2 * 7 + 3}  # before any is read
    assert {total for _, total in scoring} == {7 + 6 + 3}  # 6 usable, 3 held out
    assert scoring[-1] == (16, 16)
    assert len(review.rows) == 8 and review.held_out == 2
    assert [item.name for item in review.skipped] == ["gone.png"]


def test_progress_without_a_review_ends_with_the_fit():
    calls = []
    with pytest.warns(ReviewWarning):
        fit_with_review(_padim(), _pairs(3), 2, lambda *c: calls.append(c))
    assert calls[-1] == (3, 3) and all(done <= 3 for done, _ in calls)


def test_modified_z_on_known_numbers():
    # median 3, absolute deviations 2 1 0 1 97, MAD 1
    z = modified_z_scores([1.0, 2.0, 3.0, 4.0, 100.0])
    np.testing.assert_allclose(z, np.array([-2, -1, 0, 1, 97]) / 1.4826)
    # median 0, MAD 1: the edge is 3.5 * 1.4826 = 5.1891 above the median
    below = modified_z_scores([-1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 5.18])
    above = modified_z_scores([-1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 5.2])
    assert below[-1] < MODIFIED_Z_CUTOFF == 3.5 < above[-1]
    np.testing.assert_allclose(above[-1], 5.2 / 1.4826)


def test_modified_z_with_no_spread_warns_and_is_infinite_above():
    with pytest.warns(ReviewWarning, match="spread is 0"):
        z = modified_z_scores([2.0, 2.0, 2.0, 1.0, 9.0])
    assert z.tolist() == [0.0, 0.0, 0.0, -np.inf, np.inf]


def test_folds_alternate_within_pairs_and_depend_on_the_seed():
    folds = [fold_of(7, k) for k in range(100)]
    assert all(folds[k] != folds[k + 1] for k in range(0, 100, 2))
    assert folds == [fold_of(7, k) for k in range(100)]
    assert folds != [fold_of(8, k) for k in range(100)]


def test_the_review_is_the_same_whatever_the_batch_size(reviewed):
    _, _, review = reviewed
    padim = _padim()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _, again = fit_with_review(padim, _pairs(30, odd=(17,)), batch_size=30)
    assert [row.fold for row in again.rows] == [row.fold for row in review.rows]
    np.testing.assert_allclose(
        [row.score for row in again.rows], [row.score for row in review.rows], rtol=1e-4
    )


def test_too_few_usable_images_fit_but_say_why_there_is_no_review():
    sources = [*_pairs(MIN_REVIEW_IMAGES - 1), ("broken.png", b"not an image")]
    padim = _padim()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("error", ReviewWarning)
        with pytest.raises(ReviewWarning, match="at least 4 usable images"):
            fit_with_review(padim, sources)
    padim = _padim()
    with pytest.warns(ReviewWarning):
        report, review = fit_with_review(padim, sources)
    assert review.rows == [] and "3 were usable" in review.note
    assert padim.model.gaussian is not None and report.images == 3
    assert [item.name for item in report.skipped] == ["broken.png"]


def test_a_model_holding_images_is_refused():
    padim = _padim()
    _fit_quietly(padim, _pairs(4))
    with pytest.raises(ValueError, match="fitted from scratch; this one holds 4"):
        fit_with_review(padim, _pairs(4))


def _folder(tmp_path, n: int, odd: tuple[int, ...] = (), name: str = "train"):
    """``n`` images in ``tmp_path / name``, those in ``odd`` with a white block."""
    folder = tmp_path / name
    folder.mkdir()
    for filename, picture in _pairs(n, odd):
        picture.save(folder / filename.removeprefix("good/"))
    return folder


def _fit_command(folder, tmp_path, *extra: str) -> list[str]:
    return [
        "-q",
        "fit",
        "--train",
        str(folder),
        "--out",
        str(tmp_path / "m.safetensors"),
        "--backbone",
        "resnet18",
        "--no-pretrained",
        "--image-size",
        str(SIZE),
        "--n-features",
        str(N_FEATURES),
        *extra,
    ]


def test_cli_writes_the_review_csv_sorted_and_names_the_flagged(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    _folder(tmp_path, 24, odd=(5,), name="=lot")
    out = tmp_path / "review.csv"
    assert main(_fit_command("=lot", tmp_path, "--review", str(out))) == 0

    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == [
        "path",
        "out_of_fold_score",
        "modified_z",
        "flagged",
        "held_out",
    ]
    assert len(rows) == 24
    scores = [float(row["out_of_fold_score"]) for row in rows]
    assert scores == sorted(scores, reverse=True)
    assert rows[0]["path"] == "=lot/005.png"  # exactly as found, for scripts
    assert all(Path(row["path"]).is_file() for row in rows)
    assert [row["flagged"] for row in rows] == ["true"] + ["false"] * 23
    assert {row["held_out"] for row in rows} == {"false"}
    err = capsys.readouterr().err
    assert "flagged =lot/005.png: out-of-fold score" in err
    assert f"1 of 24 training images looks unlike the rest; see {out}" in err
    assert (tmp_path / "m.safetensors").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--review", "{tmp}"), "is a folder; give a CSV file name"),
        (("--review", "{tmp}/no/r.csv"), "its folder does not exist"),
        (("--review", "{tmp}/r.csv", "--engine", "ray"), "--engine local only"),
    ],
)
def test_cli_review_refusals_exit_2_with_one_line(tmp_path, capsys, extra, message):
    folder = _folder(tmp_path, 4)
    extra = [part.format(tmp=tmp_path) for part in extra]
    assert main(_fit_command(folder, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "m.safetensors").exists()


def test_cli_review_of_too_few_images_exits_2_before_fitting(tmp_path, capsys):
    folder = _folder(tmp_path, 3)
    command = _fit_command(folder, tmp_path, "--review", str(tmp_path / "r.csv"))
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: --review needs at least 4 training images (2 per fold); "
        f"--train {folder} has 3"
    )
    assert not (tmp_path / "m.safetensors").exists()


def test_cli_review_with_unreadable_files_keeps_the_model(tmp_path, capsys):
    folder = _folder(tmp_path, 3)
    (folder / "broken.png").write_bytes(b"not an image")
    review = tmp_path / "r.csv"
    assert main(_fit_command(folder, tmp_path, "--review", str(review))) == 2
    err = capsys.readouterr().err
    assert f"skipped {folder / 'broken.png'}:" in err
    assert err.strip().splitlines()[-1].startswith("error: the review of the")
    assert f"the model was written, {review} was not" in err
    assert err.count("needs at least 4 usable images") == 1  # said once
    assert (tmp_path / "m.safetensors").is_file() and not review.exists()
