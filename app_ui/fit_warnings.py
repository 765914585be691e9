"""Warnings of a background fit, collected for its page.

The engine warns through :mod:`warnings` (too few images, identical
features, odd images, a review that could not be made). A fit runs on its
own thread while pages run on others, so ``warnings.catch_warnings``, which
swaps process-wide state, would mix the threads' warnings up and could leave
the wrong handler installed when two of them end out of order. Instead, one
handler, installed once, hands each warning of the engine's kinds to the fit
it belongs to: the one running on the current thread, or, for an image
decoded on a helper thread, the fit that holds an image of that name. Every
other warning goes where it went before.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterable, Iterator

from padim_core.gaussian import FewImagesWarning
from padim_core.images import ImageWarning
from padim_core.review import ReviewWarning

logger = logging.getLogger(__name__)

# The engine's warnings a user can act on; other libraries' stay in the log.
COLLECTED = (FewImagesWarning, ImageWarning, ReviewWarning)

_lock = threading.Lock()
_current = threading.local()
_logs: list[WarningLog] = []
_previous = warnings.showwarning


class WarningLog:
    """The warnings of one fit, in order, each text once.

    Args:
        names: The names of the fit's images; an image warning that starts
            with one of them belongs to this fit, whichever thread raised it.

    Attributes:
        about_model: Warnings about the fit as a whole (few or identical
            images), which matter most.
        about_images: Warnings about single images (flat, several frames).
    """

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.names = frozenset(names)
        self.about_model: list[str] = []
        self.about_images: list[str] = []

    def add(self, text: str, category: type[Warning] = UserWarning) -> None:
        """Keep ``text`` unless it is kept already."""
        kept = self.about_images if issubclass(category, ImageWarning) else None
        kept = self.about_model if kept is None else kept
        if text not in kept:
            kept.append(text)

    def owns(self, text: str) -> bool:
        """Whether ``text`` (``"<image name>: <reason>"``) is about an image here."""
        head = text
        while ": " in head:
            head = head.rpartition(": ")[0]
            if head in self.names:
                return True
        return False


@contextlib.contextmanager
def collecting(log: WarningLog) -> Iterator[WarningLog]:
    """Collect the engine's warnings of the fit run in this block into ``log``."""
    _install()
    _current.log = log
    with _lock:
        _logs.append(log)
    try:
        yield log
    finally:
        _current.log = None
        with _lock:
            _logs.remove(log)


def _install() -> None:
    """Route warnings through :func:`_show`; see each warning every time."""
    global _previous
    with _lock:
        if warnings.showwarning is not _show:
            _previous = warnings.showwarning
            warnings.showwarning = _show
        for category in COLLECTED:  # not once per place: every fit sees its own
            warnings.filterwarnings("always", category=category)


def _show(message, category, filename, lineno, file=None, line=None) -> None:
    log = _owner(category, str(message))
    if log is None:
        _previous(message, category, filename, lineno, file, line)
    else:
        logger.info("fit warning: %s", message)
        log.add(str(message), category)


def _owner(category: type[Warning], text: str) -> WarningLog | None:
    if not issubclass(category, COLLECTED):
        return None
    log = getattr(_current, "log", None)
    if log is not None or not issubclass(category, ImageWarning):
        return log
    with _lock:
        return next((one for one in _logs if one.owns(text)), None)
