"""Signals an operator sends a running node or authority, as a service.

SIGHUP reloads the configuration (node and authority); SIGUSR2 is
``mixminiond republish``.  SIGUSR1 is not ours: twistd rotates its log
file on it.
"""

from __future__ import annotations

import signal
from typing import Any, Callable

from twisted.application import service


class SignalService(service.Service):
    """Runs ``action`` in the reactor thread on each ``signum``.  The handler
    goes in before any service starts: a signal sent as soon as the pid
    file exists must act, not take its default action (for SIGHUP and
    SIGUSR2: end the process)."""

    def __init__(self, signum: int, action: Callable[[], Any], reactor) -> None:
        self.signum, self.action, self.reactor = signum, action, reactor
        self._previous: Any = None

    def privilegedStartService(self) -> None:  # noqa: N802
        super().privilegedStartService()
        self._previous = signal.signal(
            self.signum, lambda signum, frame: self.reactor.callFromThread(self.action))

    def stopService(self):  # noqa: N802
        super().stopService()
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None
