"""Named one-shot timers on an injected clock.

Each MMTP connection runs several deadlines at once (handshake, version
line, partial frame, idle); this keeps their bookkeeping in one place and
lets tests drive them with ``task.Clock``.

Two of them (idle, partial frame) are pushed back with every chunk of
data, several times per packet.  :meth:`Timers.restart` therefore only
records a later due time; the pending call, if it fires before that time,
re-arms itself for the rest (an earlier one resets the call).  A deadline
still fires exactly when due.
"""

from __future__ import annotations

from typing import Callable, Dict

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Timers:
    """At most one pending call per name; starting a name restarts it."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._calls: Dict[str, IDelayedCall] = {}
        self._due: Dict[str, float] = {}

    def start(self, name: str, seconds: float, fn: Callable[[], None]) -> None:
        self.cancel(name)
        if seconds and seconds > 0:
            self._due[name] = self.clock.seconds() + seconds
            self._calls[name] = self.clock.callLater(seconds, self._fire, name, fn)

    def restart(self, name: str, seconds: float, fn: Callable[[], None]) -> None:
        """Move a running deadline to ``seconds`` from now (start it if it
        is not running); costs no reactor call while it only moves later."""
        call = self._calls.get(name)
        if call is not None and seconds and seconds > 0:
            due = self.clock.seconds() + seconds
            self._due[name] = due
            if due < call.getTime():  # sooner (a reload shortened the timeout)
                call.reset(seconds)
        else:
            self.start(name, seconds, fn)

    def running(self, name: str) -> bool:
        return name in self._calls

    def cancel(self, name: str) -> None:
        call = self._calls.pop(name, None)
        self._due.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def cancel_all(self) -> None:
        for name in list(self._calls):
            self.cancel(name)

    def _fire(self, name: str, fn: Callable[[], None]) -> None:
        remaining = self._due[name] - self.clock.seconds()
        if remaining > 0:  # pushed back since this call was scheduled
            self._calls[name] = self.clock.callLater(remaining, self._fire, name, fn)
            return
        del self._calls[name], self._due[name]
        fn()
