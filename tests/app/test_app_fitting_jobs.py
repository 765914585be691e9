"""The background fit: hold-out split, a fit that saves, a cancelled fit."""

from __future__ import annotations

import time

import pytest

from app_ui.fitting import FitRequest, get_job, split_holdout, start_fit
from app_ui.sources import demo_items
from padim_core import demo, workspace


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


def test_a_cancelled_fit_saves_nothing(tmp_path):
    request = _request(tmp_path, 40)
    job = start_fit(request)
    job.cancelled = True
    _wait(job)

    assert job.error == "cancelled"
    assert workspace.list_models(tmp_path) == []
