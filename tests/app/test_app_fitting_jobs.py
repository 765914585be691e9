"""The background fit: hold-out split, saving, cancelling, fits that overlap."""

from __future__ import annotations

import threading
import time

import pytest

from app_ui.fitting import FitRequest, get_job, split_holdout, start_fit
from app_ui.sources import Item, demo_items
from app_ui.widgets import time_left_text
from padim_core import demo, workspace
from padim_core.model import Thresholds


@pytest.mark.parametrize(("n", "held"), [(1, 0), (4, 0), (5, 1), (20, 2), (120, 12)])
def test_a_tenth_is_held_out_from_five_images_on(n, held):
    items = demo_items(demo.train_images(n))
    train, kept_out = split_holdout(items)
    assert len(kept_out) == held
    assert sorted(train + kept_out, key=items.index) == items


def _request(root, n: int) -> FitRequest:
    return FitRequest(
        items=demo_items(demo.train_images(n)),
        name="job",
        root=root,
        image_size=64,
        n_features=8,
        batch_size=2,
    )


def _wait(job) -> None:
    deadline = time.monotonic() + 120
    while job.running:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_fit_job_saves_the_model_and_makes_it_active(tmp_path):
    job = start_fit(_request(tmp_path, 10))
    _wait(job)

    assert job.error is None
    assert get_job(job.id) is job
    assert workspace.get_active(tmp_path).name == "job"
    assert (job.n_images, job.held_out) == (9, 1)
    assert job.request.items == []  # the uploads are let go


def _watch(job) -> set[tuple[str, tuple[int, int] | None, str]]:
    """The (phase, step, unit) states seen until the job ends."""
    seen = set()
    while job.running:
        seen.add((job.phase, job.step, job.unit))
        time.sleep(0.005)
    return seen


def _broken(tmp_path, n: int) -> list[Item]:
    """``n`` files that are not images."""
    items = []
    for i in range(n):
        path = tmp_path / f"broken{i}.png"
        path.write_bytes(b"not an image")
        items.append(Item(path.name, str(path), path=path))
    return items


@pytest.mark.parametrize(("good", "fitted", "held"), [(3, 3, 0), (6, 5, 1)])
def test_broken_files_never_count_towards_the_hold_out(tmp_path, good, fitted, held):
    request = _request(tmp_path / "ws", good)
    request.items[1:1] = _broken(tmp_path, 2)  # 5 or 8 files, 2 of them broken
    job = start_fit(request)
    _wait(job)

    assert job.error is None
    assert (job.n_images, job.held_out) == (fitted, held)
    assert sorted(skip.name for skip in job.skipped) == ["broken0.png", "broken1.png"]


def test_a_checked_fit_counts_the_files_read_then_the_images_scored(tmp_path):
    request = _request(tmp_path / "ws", 18)
    request.items += _broken(tmp_path, 3)  # 18 usable: 16 to fit on, 2 held out
    request.review = True
    job = start_fit(request)
    seen = _watch(job)

    assert job.error is None and job.n_images == 16
    assert job.review.reviewed == 16 + 2 and job.review.held_out == 2
    assert job.total == 16 + 18 + 2  # fit, check (16 + 2 held out), threshold
    assert job.step == (2, 2)
    decoding = {step for phase, step, _ in seen if phase.startswith("Decoding")}
    assert all(total == 21 for _, total in decoding)  # every file, broken ones too
    fitting = {step for phase, step, _ in seen if phase == "Fitting"}
    checking = {
        (step, unit) for phase, step, unit in seen if phase.startswith("Checking")
    }
    assert fitting and {total for _, total in fitting} == {16}
    assert checking and {total for (_, total), _ in checking} == {18}
    assert {unit for _, unit in checking} == {"images"}
    assert all(0 <= done <= total for done, total in fitting | dict(checking).keys())


def test_a_check_that_cannot_run_never_says_it_checks(tmp_path):
    request = _request(tmp_path / "ws", 3)
    request.items += _broken(tmp_path, 1)  # 4 files, too few to hold out
    request.review = True
    job = start_fit(request)
    seen = _watch(job)

    assert job.error is None and job.review.note is not None
    assert not [phase for phase, _, _ in seen if phase.startswith("Checking")]
    assert {step[1] for _, step, _ in seen if step is not None} == {4}
    assert job.step == (4, 4) and job.total == 4


def test_the_progress_words_count_the_pass_and_the_time_left_the_job():
    text = time_left_text("Checking", 20, 40, 10.0, shown=(2, 20))
    assert text == "Checking: 2 of 20 images · 10 s · about 10 s left"
    assert time_left_text("Fitting", 3, 9, 2.0, (3, 5), "files") == (
        "Fitting: 3 of 5 files · 2 s · about 4 s left"
    )
    assert time_left_text("Fitting", 5, 20, 5.0) == (
        "Fitting: 5 of 20 images · 5 s · about 15 s left"
    )


def test_a_cancelled_fit_saves_nothing(tmp_path):
    request = _request(tmp_path, 40)
    job = start_fit(request)
    job.cancelled = True
    _wait(job)

    assert job.error == "cancelled"
    assert workspace.list_models(tmp_path) == []


class _Gate:
    """An upload whose bytes are handed out only once the test opens the gate."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reached = threading.Event()
        self.opened = threading.Event()

    def getvalue(self) -> bytes:
        self.reached.set()
        assert self.opened.wait(60)
        return self.data


def _gated_request(entry, n: int) -> tuple[FitRequest, _Gate]:
    paths = demo.train_images()[100 : 100 + n]
    gate = _Gate(paths[0].read_bytes())
    items = [Item("gated.png", f"gate-{id(gate)}", upload=gate)]
    items += demo_items(paths[1:])
    request = FitRequest(
        items=items,
        name=entry.name,
        root=entry.path.parent.parent,
        image_size=entry.config.image_size,
        extend=entry.path,
    )
    return request, gate


def test_a_second_fit_of_one_name_is_refused_while_the_first_runs(tmp_path):
    first = start_fit(_request(tmp_path, 40))
    try:
        with pytest.raises(ValueError, match="is being fitted already"):
            start_fit(_request(tmp_path, 10))
    finally:
        first.cancelled = True
        _wait(first)
    again = start_fit(_request(tmp_path, 10))
    _wait(again)
    assert again.error is None and again.path.stem == "job"


def test_a_fit_refuses_a_name_a_model_has(tmp_path):
    done = start_fit(_request(tmp_path, 10))
    _wait(done)

    with pytest.raises(ValueError, match="exists already"):
        start_fit(_request(tmp_path, 10))


def test_thresholds_saved_while_images_are_added_are_kept(fitted):
    request, gate = _gated_request(fitted, 3)
    job = start_fit(request)
    assert gate.reached.wait(60)  # the model is loaded, the images not yet added
    new = Thresholds(50.0, 40.0, 10.0, 90.0)
    workspace.save_thresholds(fitted.path, new)
    gate.opened.set()
    _wait(job)

    assert job.error is None
    after = workspace.describe(fitted.path)
    assert after.thresholds == new
    assert after.n_images == fitted.n_images + 3


def test_two_fits_adding_to_one_model_both_land(fitted):
    first, gate = _gated_request(fitted, 3)
    second = FitRequest(
        items=demo_items(demo.train_images()[110:112]),
        name=fitted.name,
        root=first.root,
        extend=fitted.path,
    )
    job = start_fit(first)
    assert gate.reached.wait(60)
    other = start_fit(second)
    time.sleep(0.5)
    assert other.running and other.phase.startswith("Waiting")
    gate.opened.set()
    _wait(job)
    _wait(other)

    assert job.error is None and other.error is None
    assert workspace.describe(fitted.path).n_images == fitted.n_images + 5


def test_a_waiting_fit_can_be_cancelled(fitted):
    first, gate = _gated_request(fitted, 2)
    job = start_fit(first)
    assert gate.reached.wait(60)
    waiting = start_fit(
        FitRequest(
            items=demo_items(demo.train_images()[110:111]),
            name=fitted.name,
            root=first.root,
            extend=fitted.path,
        )
    )
    waiting.cancelled = True
    _wait(waiting)
    gate.opened.set()
    _wait(job)

    assert waiting.error == "cancelled"
    assert workspace.describe(fitted.path).n_images == fitted.n_images + 2
