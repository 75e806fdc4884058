"""When pings leave: a Poisson process (doc/reliability.md §1).

Exponential gaps make pings look like traffic rather than like a clock: an
observer who sees a node send at regular times can single those packets
out.  The randomness and the clock are injected, so tests replay a seeded
schedule on :class:`twisted.internet.task.Clock`.
"""

from __future__ import annotations

import random
from typing import Callable, Optional

from twisted.application import service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger


class PoissonSchedule:
    """Gaps between events of a Poisson process with the given mean gap."""

    def __init__(self, mean_interval: float, rng: random.Random) -> None:
        if mean_interval <= 0:
            raise ValueError(f"the mean interval must be positive, not {mean_interval}")
        self.mean_interval = mean_interval
        self._rng = rng

    def next_delay(self) -> float:
        """Seconds until the next event: exponential, so memoryless."""
        return self._rng.expovariate(1.0 / self.mean_interval)


class PingLoop(service.Service):
    """Calls ``ping()`` at the times of ``schedule`` on ``clock``.

    An exception from ``ping`` is logged and the loop goes on: one failed
    ping must not stop the measurements.  What ``ping`` returns is ignored
    (a Deferred must handle its own errors).  Stopping cancels the pending
    call.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, schedule: PoissonSchedule,
                 ping: Callable[[], object]) -> None:
        self._clock = clock
        self._schedule = schedule
        self._ping = ping
        self._call: Optional[IDelayedCall] = None

    def startService(self) -> None:
        super().startService()
        self._arm()

    def stopService(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return super().stopService()

    def _arm(self) -> None:
        self._call = self._clock.callLater(self._schedule.next_delay(), self._fire)

    def _fire(self) -> None:
        self._call = None
        try:
            self._ping()
        except Exception:
            self.log.failure("A ping could not be sent")
        if self.running:
            self._arm()
