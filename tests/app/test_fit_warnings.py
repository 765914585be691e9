"""Warnings of background fits reach their own fit, and only theirs."""

from __future__ import annotations

import threading
import warnings

from app_ui.fit_warnings import WarningLog, collecting
from padim_core.gaussian import FewImagesWarning
from padim_core.images import ImageWarning


def _in_thread(work) -> None:
    thread = threading.Thread(target=work)
    thread.start()
    thread.join(30)


def test_a_fit_gets_its_own_warnings_and_its_images_from_helper_threads():
    log = WarningLog(["lot.zip/a: b.png"])
    with warnings.catch_warnings(record=True) as elsewhere:
        warnings.simplefilter("always")
        with collecting(log):
            warnings.warn("fitted on 3 images", FewImagesWarning, stacklevel=1)
            warnings.warn("fitted on 3 images", FewImagesWarning, stacklevel=1)
            _in_thread(
                lambda: warnings.warn("lot.zip/a: b.png: one flat colour", ImageWarning)
            )
            _in_thread(lambda: warnings.warn("other.png: one colour", ImageWarning))
            warnings.warn("a library's own", UserWarning, stacklevel=1)

    assert log.about_model == ["fitted on 3 images"]
    assert log.about_images == ["lot.zip/a: b.png: one flat colour"]
    assert [str(w.message) for w in elsewhere] == [
        "other.png: one colour",
        "a library's own",
    ]


def test_two_fits_that_end_out_of_order_keep_their_warnings_apart():
    first, second = WarningLog(), WarningLog()
    entered, go_on = threading.Event(), threading.Event()

    def fit_two() -> None:
        with collecting(second):
            entered.set()
            go_on.wait(30)
            warnings.warn("second fit", FewImagesWarning, stacklevel=1)

    thread = threading.Thread(target=fit_two)
    with collecting(first):
        thread.start()
        entered.wait(30)
        warnings.warn("first fit", FewImagesWarning, stacklevel=1)
    go_on.set()
    thread.join(30)
    with warnings.catch_warnings(record=True) as after:
        warnings.warn("after both", FewImagesWarning, stacklevel=1)

    assert first.about_model == ["first fit"]
    assert second.about_model == ["second fit"]
    assert [str(w.message) for w in after] == ["after both"]
