"""The node's clocks (issue 12 point 7): schedules count elapsed time, a
wall-clock step is noticed, logged once and kept across a restart.

The clocks are injected (a settable wall clock and monotonic clock), and
:func:`install` is tried on a real, not-running Twisted reactor: its own
timer code, driven by hand, with no sleeping."""

from __future__ import annotations

import json
import os
import time

from twisted.internet.selectreactor import SelectReactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from mixminion.server.clock import (
    ClockWatch,
    ElapsedClock,
    describe,
    install,
    load_skew,
    skew_path,
)

HOUR = 3600.0


class Clocks:
    """A wall clock and a monotonic clock the test moves."""

    def __init__(self, wall: float = 1_800_000_000.0, monotonic: float = 5_000.0) -> None:
        self.now, self.mono = wall, monotonic

    def elapse(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds

    def step(self, seconds: float) -> None:
        """The wall clock is set; no time passes."""
        self.now += seconds

    def elapsed_clock(self, skew: float = 0.0) -> ElapsedClock:
        return ElapsedClock(lambda: self.now, lambda: self.mono, skew)


class ElapsedClockTests(unittest.TestCase):
    def test_starts_at_wall_time_and_ignores_steps(self) -> None:
        t = Clocks()
        clock = t.elapsed_clock()
        self.assertEqual(clock.seconds(), t.now)
        t.elapse(30)
        t.step(2 * HOUR)
        self.assertEqual(clock.seconds(), t.now - 2 * HOUR)
        self.assertEqual(clock.step(), 2 * HOUR)
        t.step(-6 * HOUR)
        self.assertEqual(clock.seconds(), t.now + 4 * HOUR)
        self.assertEqual(clock.step(), -4 * HOUR)

    def test_settling_a_step_keeps_the_scale(self) -> None:
        t = Clocks()
        clock = t.elapsed_clock()
        before = clock.seconds()
        t.step(2 * HOUR)
        clock.settle(clock.step())
        self.assertEqual(clock.seconds(), before)
        self.assertEqual(clock.step(), 0)
        self.assertEqual(clock.skew, -2 * HOUR)

    def test_a_restart_continues_with_the_kept_skew(self) -> None:
        """Downtime counts by the wall clock; the step before it does not."""
        t = Clocks()
        first = t.elapsed_clock()
        stamped = first.seconds()  # a packet queued before the step
        t.elapse(60)
        t.step(2 * HOUR)
        first.settle(first.step())
        t.elapse(600)  # ten minutes of downtime, and a new monotonic origin
        t.mono = 12.0
        second = t.elapsed_clock(first.skew)
        self.assertAlmostEqual(second.seconds() - stamped, 660)


class InstallTests(unittest.TestCase):
    """A real reactor's timers after :func:`install`."""

    def setUp(self) -> None:
        self.t = Clocks()
        self.reactor = SelectReactor()
        install(self.reactor, self.t.elapsed_clock())
        self.ran: list[str] = []

    def test_a_step_back_does_not_hold_timers(self) -> None:
        self.reactor.callLater(10, self.ran.append, "mix")
        self.t.step(-4 * HOUR)
        self.t.elapse(10)
        self.assertEqual(self.reactor.timeout(), 0)
        self.reactor.runUntilCurrent()
        self.assertEqual(self.ran, ["mix"])

    def test_a_step_forward_does_not_run_timers_early(self) -> None:
        self.reactor.callLater(60, self.ran.append, "retry")
        self.t.step(2 * HOUR)
        self.t.elapse(1)
        self.reactor.runUntilCurrent()
        self.assertEqual(self.ran, [])
        self.assertAlmostEqual(self.reactor.timeout(), 59)


class ClockWatchTests(unittest.TestCase):
    def setUp(self) -> None:
        self.t = Clocks()
        self.clock = self.t.elapsed_clock()
        work = self.mktemp()
        os.makedirs(work)
        self.path = skew_path(work)
        self.watch = ClockWatch(self.clock, self.path, reactor=None)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def warnings(self) -> list[dict]:
        return [e for e in self.events if e.get("log_level") is not None
                and e["log_level"].name == "warn"]

    def test_drift_under_the_tolerance_is_not_a_step(self) -> None:
        self.t.elapse(10)
        self.t.step(2)
        self.assertIsNone(self.watch.check())
        self.assertEqual(self.warnings(), [])
        self.assertFalse(os.path.exists(self.path))

    def test_a_step_is_logged_once_and_kept(self) -> None:
        self.t.elapse(10)
        self.t.step(2 * HOUR)
        self.assertEqual(self.watch.check(), 2 * HOUR)
        self.t.elapse(10)
        self.assertIsNone(self.watch.check())
        [warning] = self.warnings()
        self.assertEqual((warning["direction"], warning["size"]), ("forward", "2 h 0 min 0 s"))
        self.assertEqual(load_skew(self.path), -2 * HOUR)
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)

    def test_a_step_back(self) -> None:
        self.t.step(-4 * HOUR - 30)
        self.watch.check()
        [warning] = self.warnings()
        self.assertEqual((warning["direction"], warning["size"]), ("back", "4 h 0 min 30 s"))
        self.assertEqual(load_skew(self.path), 4 * HOUR + 30)

    def test_a_skew_that_cannot_be_kept_is_said(self) -> None:
        self.watch.path = os.path.join(self.path, "missing", "clock.json")
        self.t.step(HOUR)
        self.assertEqual(self.watch.check(), HOUR)
        self.assertEqual(len(self.warnings()), 2)
        self.assertEqual(self.clock.skew, -HOUR)


class SkewFileTests(unittest.TestCase):
    def test_missing_or_damaged_files_mean_no_skew(self) -> None:
        path = self.mktemp()
        self.assertEqual(load_skew(path), 0.0)
        for text in ("not json", "[1, 2]", '{"skew": "soon"}', '{"other": 1}'):
            with open(path, "w") as f:
                f.write(text)
            self.assertEqual(load_skew(path), 0.0, text)
        with open(path, "w") as f:
            json.dump({"skew": -7200}, f)
        self.assertEqual(load_skew(path), -7200.0)

    def test_sizes_are_said_in_hours_minutes_seconds(self) -> None:
        self.assertEqual(describe(7203), "2 h 0 min 3 s")
        self.assertEqual(describe(-125), "2 min 5 s")
        self.assertEqual(describe(9.6), "10 s")


class StatsSummaryDateTests(unittest.TestCase):
    """The statistics summary is dated by the wall clock, its period
    measured by the elapsed one."""

    def test_dates_follow_the_wall_clock(self) -> None:
        from twisted.internet import task

        from mixminion.server.clock import WallClock
        from mixminion.server.stats import NodeStats, StatsReport

        elapsed = task.Clock()
        elapsed.advance(1_000_000)
        wall = [1_800_000_000.0]
        report = StatsReport(NodeStats(), "unused", elapsed, True, 2 * HOUR,
                             wall=WallClock(lambda: wall[0]))
        report.start()
        elapsed.advance(3600)
        wall[0] += 3600 + 2 * HOUR  # the hour passed, and the clock stepped
        text = report.summary(elapsed.seconds())
        stamp = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))  # noqa: E731
        self.assertIn(f"from {stamp(wall[0] - 3600)} to {stamp(wall[0])}", text)
        report.stop()
