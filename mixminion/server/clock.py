"""Time in a running node: elapsed time for schedules, the wall clock for dates.

Twisted's reactor counts in wall-clock seconds (``time.time``), and so did
every schedule of ours.  The wall clock can step: an NTP correction, an
operator's ``date -s``, a virtual machine resumed.  A step forward of two
hours expired every queued message whose retry schedule was shorter; a
step back of four hours stopped every timer (mixing included) until the
clock caught up.  Intervals must be measured on the monotonic clock.

:class:`ElapsedClock` gives seconds on the wall clock's scale (so the
stamps already in the queues stay meaningful) that advance only as time
elapses: it is the monotonic clock plus an offset fixed at start.  The
node installs it as its reactor's clock (:func:`install`), so
``callLater``, ``LoopingCall`` and every queue stamp and retry time use it.
Dates that are compared with other machines' clocks -- key and
certificate validity, descriptors, the date on a delivered message -- use
the wall clock (:data:`WALL`).

:class:`ClockWatch` compares the two every few seconds: when the wall
clock has moved against elapsed time by more than
:data:`STEP_TOLERANCE`, it says so at WARN and remembers the difference
(the *skew*) in ``WorkDir/clock.json``, so the elapsed clock after a
restart continues the same scale: stamps written before the step keep
their age.  Downtime between two runs is measured by the wall clock, as
it must be (nothing else survives a reboot).
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

from twisted.application import service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mixminion.fileutil import atomic_write

#: a wall clock moving by less than this against elapsed time is drift or
#: slewing, not a step
STEP_TOLERANCE = 5.0
#: seconds between two comparisons of the clocks
CHECK_INTERVAL = 10.0


class WallClock:
    """The calendar: what peers and readers compare with their own clocks."""

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self._now = now

    def seconds(self) -> float:
        return self._now()


#: the system's wall clock
WALL = WallClock()


class ElapsedClock:
    """Seconds since the epoch that advance only as time elapses.

    ``skew`` is how far this clock stands from the wall clock (elapsed
    minus wall) because of steps seen so far; it starts at the value kept
    from earlier runs.
    """

    def __init__(self, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic, skew: float = 0.0) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self.skew = skew
        self._offset = wall() + skew - monotonic()

    def seconds(self) -> float:
        return self._monotonic() + self._offset

    def step(self) -> float:
        """How far the wall clock moved against elapsed time since the
        skew was last settled (positive: it jumped forward)."""
        return self._wall() + self.skew - self.seconds()

    def settle(self, step: float) -> None:
        """Count ``step`` into the skew: the wall clock moved, we did not."""
        self.skew -= step


def install(reactor, clock: ElapsedClock) -> None:
    """Make ``reactor`` count its timers on ``clock``.

    Twisted reads the time through the reactor's ``seconds`` for every
    delayed call it schedules, sleeps for and runs, so replacing it before
    the node schedules anything moves all of them onto elapsed time (the
    two agree at the moment of the switch, so anything already scheduled
    keeps its delay).
    """
    reactor.seconds = clock.seconds


def skew_path(work_dir: str) -> str:
    return os.path.join(work_dir, "clock.json")


def load_skew(path: str) -> float:
    """The skew kept by an earlier run (0 if none, or unreadable: then the
    queues' stamps are taken as wall-clock times, as before any step)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f).get("skew", 0.0)
    except (OSError, ValueError, AttributeError):
        return 0.0
    return float(value) if isinstance(value, (int, float)) else 0.0


def describe(seconds: float) -> str:
    """``2 h 0 min 3 s`` for a step's size."""
    whole = int(round(abs(seconds)))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min {secs} s"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


class ClockWatch(service.Service):
    """Notices wall-clock steps, logs each once, and keeps the skew."""

    log = Logger()

    def __init__(self, clock: ElapsedClock, path: str, reactor,
                 interval: float = CHECK_INTERVAL, tolerance: float = STEP_TOLERANCE) -> None:
        self.clock = clock
        self.path = path
        self.reactor = reactor
        self.interval = interval
        self.tolerance = tolerance
        self._loop: Optional[LoopingCall] = None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._loop = LoopingCall(self.check)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True)

    def stopService(self):  # noqa: N802
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def check(self) -> Optional[float]:
        """Compare the clocks; returns the step settled now, if any."""
        step = self.clock.step()
        if abs(step) < self.tolerance:
            return None
        self.clock.settle(step)
        self.log.warn(
            "The system clock jumped {direction} by {size}; retry and expiry times, mixing "
            "and every other schedule keep counting the time that really elapsed",
            direction="forward" if step > 0 else "back", size=describe(step))
        try:
            atomic_write(self.path, json.dumps({"skew": self.clock.skew}).encode())
        except OSError as exc:
            self.log.warn("Could not keep the clock skew in {path}: {why}; after a restart "
                          "queued items' ages are counted by the wall clock",
                          path=self.path, why=exc.strerror)
        return step
