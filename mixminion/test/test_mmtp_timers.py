"""Named deadlines: restart only records the new time, yet fires exactly."""

from __future__ import annotations

from twisted.internet import task
from twisted.trial import unittest

from mixminion.mmtp.timers import Timers


class TimersTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.timers = Timers(self.clock)
        self.fired: list[float] = []

    def fire(self) -> None:
        self.fired.append(self.clock.seconds())

    def test_fires_when_due(self) -> None:
        self.timers.start("idle", 10, self.fire)
        self.clock.advance(9.9)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, [10])
        self.assertFalse(self.timers.running("idle"))

    def test_restart_moves_the_deadline_without_a_new_call(self) -> None:
        self.timers.start("idle", 10, self.fire)
        self.clock.advance(4)
        self.timers.restart("idle", 10, self.fire)
        self.clock.advance(3)
        self.timers.restart("idle", 10, self.fire)  # due at 17 now
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(3)  # t=10: the first call finds it early
        self.assertEqual(self.fired, [])
        self.assertTrue(self.timers.running("idle"))
        self.clock.advance(6.9)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, [17])

    def test_restart_can_bring_a_deadline_forward(self) -> None:
        # A reload that lowers a timeout applies to connections already open.
        self.timers.start("idle", 300, self.fire)
        self.clock.advance(5)
        self.timers.restart("idle", 10, self.fire)
        self.clock.advance(9.9)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, [15])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_restart_of_a_stopped_timer_starts_it(self) -> None:
        self.timers.restart("frame", 5, self.fire)
        self.clock.advance(5)
        self.assertEqual(self.fired, [5])
        self.timers.restart("frame", 5, self.fire)
        self.clock.advance(5)
        self.assertEqual(self.fired, [5, 10])

    def test_cancel_and_cancel_all(self) -> None:
        self.timers.start("a", 1, self.fire)
        self.timers.start("b", 2, self.fire)
        self.timers.restart("a", 3, self.fire)
        self.timers.cancel("a")
        self.clock.advance(2)
        self.assertEqual(self.fired, [2])
        self.timers.start("c", 1, self.fire)
        self.timers.cancel_all()
        self.clock.advance(10)
        self.assertEqual(self.fired, [2])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_start_replaces_a_pushed_deadline(self) -> None:
        self.timers.start("x", 10, self.fire)
        self.timers.restart("x", 20, self.fire)
        self.timers.start("x", 1, self.fire)
        self.clock.advance(1)
        self.assertEqual(self.fired, [1])
        self.clock.advance(30)
        self.assertEqual(self.fired, [1])

    def test_zero_seconds_means_no_deadline(self) -> None:
        self.timers.start("x", 0, self.fire)
        self.timers.restart("y", 0, self.fire)
        self.assertFalse(self.timers.running("x") or self.timers.running("y"))
        self.assertEqual(self.clock.getDelayedCalls(), [])
