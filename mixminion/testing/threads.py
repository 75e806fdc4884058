"""Worker threads that run in place, for unit tests of the pipeline stages.

``Outgoing`` and ``DurableSink`` write to their store in a worker thread
(:func:`mixminion.server.workers.run_in`) and hear back through their
reactor's ``callFromThread``.  A test hands the stage an
:class:`InPlaceWorker` (``worker=``), which runs each write at once, in the
test's own thread, and an :class:`InPlaceReactor` (a ``task.Clock``).  The write's result
comes back as the reactor would deliver it, in a later turn: as a call due
now, which ``advance(0)`` makes (with whatever it sets off in turn).  So
the test drives both time and the threads' answers by hand, and nothing
waits on the real clock.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from twisted.internet import task
from twisted.python.failure import Failure

__all__ = ["InPlaceWorker", "InPlaceReactor"]

T = TypeVar("T")


class InPlaceReactor(task.Clock):
    """A ``task.Clock`` that also takes calls "from a thread": each is due
    now, and made by the next ``advance``."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:  # noqa: N802
        self.callLater(0, f, *args, **kwargs)


class InPlaceWorker:
    """Stands in for a worker ``ThreadPool``: runs each call at once, in
    the test's thread; ``running`` is true meanwhile (a test can tell what
    ran "in the worker")."""

    def __init__(self) -> None:
        self.started = False
        self.running = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.started = False

    def callInThreadWithCallback(self, on_result: Callable[[bool, Any], None],  # noqa: N802
                                 func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.running = True
        try:
            result = func(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)
        finally:
            self.running = False
