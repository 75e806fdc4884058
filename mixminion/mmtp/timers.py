"""Named one-shot timers on an injected clock.

Each MMTP connection runs several deadlines at once (handshake, version
line, partial frame, idle); this keeps their bookkeeping in one place and
lets tests drive them with ``task.Clock``.
"""

from __future__ import annotations

from typing import Callable, Dict

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Timers:
    """At most one pending call per name; starting a name restarts it."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._calls: Dict[str, IDelayedCall] = {}

    def start(self, name: str, seconds: float, fn: Callable[[], None]) -> None:
        self.cancel(name)
        if seconds and seconds > 0:
            self._calls[name] = self.clock.callLater(seconds, self._fire, name, fn)

    def restart(self, name: str, seconds: float, fn: Callable[[], None]) -> None:
        """Push an existing deadline back (cheaper than cancel + start)."""
        call = self._calls.get(name)
        if call is not None and call.active():
            call.reset(seconds)
        else:
            self.start(name, seconds, fn)

    def running(self, name: str) -> bool:
        call = self._calls.get(name)
        return call is not None and call.active()

    def cancel(self, name: str) -> None:
        call = self._calls.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def cancel_all(self) -> None:
        for name in list(self._calls):
            self.cancel(name)

    def _fire(self, name: str, fn: Callable[[], None]) -> None:
        self._calls.pop(name, None)
        fn()
