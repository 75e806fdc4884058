"""The processing child's lifecycle (issue 13): what the node sends the
child and when, for each thing the child says or does, with a fake child
and a ``task.Clock`` (the real child: test_pipeline, test_processing_failure)."""

from __future__ import annotations

import os
from typing import Optional

from twisted.internet import defer, task
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from mixminion.server import childmessages as msg
from mixminion.server.processing import (
    DISK_RECHECK_INTERVAL,
    STOP_TIMEOUT,
    Processor,
)
from mixminion.testing.keys import key


class _Exited:
    def getErrorMessage(self) -> str:
        return "exit status 1"


class _Transport:
    """The child's pipes: what the node wrote, closed and signalled."""

    def __init__(self) -> None:
        self.sent: list[msg.Message] = []
        self.closed = False
        self.signals: list[str] = []

    def write(self, data: bytes) -> None:
        self.sent.extend(msg.decode(line) for line in data.splitlines())

    def closeStdin(self) -> None:  # noqa: N802
        self.closed = True

    def signalProcess(self, signal: str) -> None:  # noqa: N802
        self.signals.append(signal)


class _Reactor:
    def __init__(self, clock: task.Clock) -> None:
        self.callLater = clock.callLater
        self.seconds = clock.seconds
        self.children: list[object] = []
        self.envs: list[object] = []
        self.refuse: Optional[OSError] = None

    def spawnProcess(self, proto, *args, **kwargs) -> None:  # noqa: N802
        self.children.append(proto)
        self.envs.append(kwargs.get("env"))
        if self.refuse is not None:
            raise self.refuse
        proto.transport = _Transport()


class LifecycleTests(unittest.TestCase):
    def setUp(self) -> None:
        self.logs = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.new_processor()

    def new_processor(self) -> None:
        self.clock = task.Clock()
        self.reactor = _Reactor(self.clock)
        folder = self.mktemp()
        self.processor = Processor(os.path.join(folder, "incoming"),
                                   os.path.join(folder, "packets.db"), self.reactor,
                                   lambda name, n: None, restart_delay=1.0)

    def ready(self) -> _Transport:
        """Keys given, the child started and ready: returns its pipe."""
        self.processor.set_keys([key("mix0")])
        pipe = self.processor._child.transport
        self.processor._message(msg.Ready())
        return pipe

    def drains(self, pipe: _Transport) -> int:
        return sum(isinstance(m, msg.Drain) for m in pipe.sent)

    def errors(self) -> list[str]:
        return [e["log_format"] for e in self.logs if e["log_level"] == LogLevel.error]

    def pending(self) -> list[float]:
        return [c.getTime() - self.clock.seconds() for c in self.clock.getDelayedCalls()
                if c.active()]

    def test_ready_gets_the_keys_then_a_drain(self) -> None:
        pipe = self.ready()
        self.assertEqual([type(m) for m in pipe.sent], [msg.Keys, msg.Drain])

    def test_kicks_during_a_drain_ask_for_one_more_drain(self) -> None:
        pipe = self.ready()
        idle = self.processor.wait_idle()
        for ids in ([1], [2], [3]):
            self.processor.stored(ids)
        self.assertEqual(self.drains(pipe), 1)
        self.processor._message(msg.Idle())
        self.assertEqual(self.drains(pipe), 2)
        self.assertEqual(pipe.sent[-1].through, 3)
        self.assertNoResult(idle)  # the second drain may find packets
        self.processor._message(msg.Idle())
        self.successResultOf(idle)
        self.assertEqual(self.drains(pipe), 2)

    def test_a_draining_child_is_told_what_was_committed_since(self) -> None:
        """Each kick with newly committed packets sends one More (the drain
        under way goes on to them); a kick with nothing new sends none."""
        pipe = self.ready()
        self.processor.stored([1])
        self.processor.stored([2, 3])
        self.processor.kick()
        self.assertEqual([m for m in pipe.sent if isinstance(m, msg.More)],
                         [msg.More(1), msg.More(3)])
        self.processor._message(msg.Idle())
        self.processor._message(msg.Idle())
        self.processor.stored([4])  # idle: a Drain, not a More
        self.assertEqual(pipe.sent[-1].through, 4)
        self.assertIsInstance(pipe.sent[-1], msg.Drain)

    def test_the_child_runs_with_one_malloc_arena_unless_told_otherwise(self) -> None:
        self.patch(os, "environ", {"PATH": "/bin"})
        self.ready()
        self.assertEqual(self.reactor.envs[-1]["MALLOC_ARENA_MAX"], "1")
        self.new_processor()
        self.patch(os, "environ", {"MALLOC_ARENA_MAX": "4"})
        self.ready()
        self.assertEqual(self.reactor.envs[-1]["MALLOC_ARENA_MAX"], "4")

    def test_nothing_starts_or_drains_without_keys(self) -> None:
        self.processor.kick()
        self.assertEqual(self.reactor.children, [])
        self.successResultOf(self.processor.wait_idle())
        pipe = self.ready()
        self.processor.kick()
        self.processor.set_keys([])
        self.processor._message(msg.Idle())
        self.assertEqual(self.drains(pipe), 1)  # the packets wait for keys
        self.processor.set_keys([key("mix0")])
        self.assertEqual(self.drains(pipe), 2)

    def test_new_keys_go_to_a_ready_child_and_a_starting_one_gets_them_when_ready(self) -> None:
        self.processor.set_keys([key("mix0")])
        pipe = self.processor._child.transport
        self.processor.set_keys([key("mix1"), key("mix0")])
        self.assertEqual(pipe.sent, [])
        self.processor._message(msg.Ready())
        self.assertEqual(pipe.sent[0], msg.Keys((key("mix1").der, key("mix0").der)))
        self.processor.set_keys([key("mix1")])
        self.assertEqual(pipe.sent[-1], msg.Keys((key("mix1").der,)))

    def test_a_failed_drain_is_asked_again_of_the_same_child_after_the_back_off(self) -> None:
        pipe = self.ready()
        self.processor._message(msg.Failed("disk I/O error"))
        self.assertEqual(self.pending(), [1.0])
        self.processor.stored([5])  # no drain before the wait is over
        self.assertEqual(self.drains(pipe), 1)
        self.clock.advance(1.0)
        self.assertEqual(self.drains(pipe), 2)
        self.assertEqual(self.processor.starts, 1)
        self.assertEqual(self.errors(), ["Packet processing failed; will retry: {why}"])

    def test_kicks_do_not_restart_a_dead_child_before_its_back_off(self) -> None:
        self.ready()
        self.processor._ended(self.processor._child, _Exited())
        self.assertIsNone(self.processor._child)
        self.processor.stored([1])
        self.processor.wait_idle()
        self.assertEqual(self.processor.starts, 1)
        self.clock.advance(1.0)
        self.assertEqual(self.processor.starts, 2)

    def test_a_child_that_dies_while_paused_for_disk_is_restarted_once(self) -> None:
        self.ready()
        self.processor._message(msg.Paused("/q", 1, 2))
        self.assertEqual(self.pending(), [DISK_RECHECK_INTERVAL])
        self.processor._ended(self.processor._child, _Exited())
        self.assertEqual(self.pending(), [1.0])  # the recheck is cancelled
        self.clock.advance(1.0)
        self.assertEqual(self.processor.starts, 2)
        self.assertEqual(self.pending(), [])

    def test_a_start_that_fails_is_logged_before_processing_is_said_not_running(self) -> None:
        self.reactor.refuse = OSError("Too many open files")
        self.processor.set_keys([key("mix0")])
        for delay in (1.0, 2.0):
            self.clock.advance(delay)
        self.assertEqual(self.processor.starts, 3)
        self.assertEqual(self.processor.failing,
                         "cannot start the processing child: Too many open files")
        cannot = "Cannot start the processing child ({why}); trying again"
        self.assertEqual(self.errors()[-2:], [cannot, self.errors()[-1]])
        self.assertIn("Processing is not running", self.errors()[-1])

    def test_with_several_workers_each_line_names_its_worker(self) -> None:
        from mixminion.server.draining import Share

        self.processor = Processor(self.mktemp(), self.mktemp(), self.reactor,
                                   lambda name, n: None, share=Share(1, 2))
        pipe = self.ready()
        self.processor._message(msg.Failed("disk I/O error"))
        [event] = [e for e in self.logs if e["log_level"] == LogLevel.error]
        self.assertEqual(event["log_namespace"], "mixminion.server.processing.worker1")
        self.assertEqual(len(pipe.sent), 2)
        self.new_processor()
        self.ready()
        self.processor._message(msg.Failed("disk I/O error"))
        self.assertEqual([e["log_namespace"] for e in self.logs
                          if e["log_level"] == LogLevel.error][-1],
                         "mixminion.server.processing.Processor")

    def test_stop_closes_stdin_and_fires_when_the_child_has_exited(self) -> None:
        pipe = self.ready()
        child = self.processor._child
        first, second = self.processor.stop(), self.processor.stop()
        self.assertTrue(pipe.closed)
        self.assertNoResult(first)
        self.processor._message(msg.Batch(3, {}))  # the last batch still counts
        self.assertEqual(self.processor.consumed_through, 3)
        self.processor._message(msg.Idle())
        self.processor._ended(child, _Exited())
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(self.pending(), [])  # the kill is cancelled
        self.assertEqual(self.errors(), [])
        self.processor.kick()
        self.assertEqual(self.processor.starts, 1)
        self.successResultOf(self.processor.stop())

    def test_a_child_stopped_before_it_is_ready_is_not_asked_to_drain(self) -> None:
        self.processor.set_keys([key("mix0")])
        pipe = self.processor._child.transport
        stopped = self.processor.stop()
        self.processor._message(msg.Ready())
        self.assertEqual(pipe.sent, [])
        self.assertEqual(self.errors(), [])
        self.processor._ended(self.processor._child, _Exited())
        self.successResultOf(stopped)

    def test_a_child_that_does_not_exit_is_killed(self) -> None:
        pipe = self.ready()
        stopped = self.processor.stop()
        self.clock.advance(STOP_TIMEOUT)
        self.assertEqual(pipe.signals, ["KILL"])
        self.processor._ended(self.processor._child, _Exited())
        self.successResultOf(stopped)

    def test_stop_while_waiting_leaves_no_timer(self) -> None:
        self.successResultOf(self.processor.stop())  # no child yet
        for wait in (msg.Paused("/q", 1, 2), msg.Failed("no")):
            self.new_processor()
            self.ready()
            self.processor._message(wait)
            stopped = self.processor.stop()
            self.processor._ended(self.processor._child, _Exited())
            self.successResultOf(stopped)
            self.assertEqual(self.pending(), [], wait)
        self.new_processor()
        self.ready()
        self.processor._ended(self.processor._child, _Exited())
        self.successResultOf(self.processor.stop())  # no child: at once
        self.assertEqual(self.pending(), [])

    def test_stop_from_an_idle_waiter_runs_after_the_idle(self) -> None:
        pipe = self.ready()
        stopped: list[defer.Deferred[None]] = []
        self.processor.wait_idle().addCallback(lambda _: stopped.append(self.processor.stop()))
        self.processor._message(msg.Idle())  # the drain asked for before the wait
        self.processor._message(msg.Idle())
        self.assertTrue(pipe.closed)
        self.processor._ended(self.processor._child, _Exited())
        self.successResultOf(stopped[0])

    def test_a_message_out_of_turn_is_logged_and_ignored(self) -> None:
        pipe = self.ready()
        self.processor._message(msg.Idle())
        self.processor._message(msg.Idle())  # no drain asked for
        self.processor._message(msg.Ready())
        self.processor._message(msg.Drain(1))  # ours, not the child's
        self.assertEqual(self.errors(), ["Processing child sent {kind} out of turn; ignored"] * 3)
        self.processor.kick()
        self.assertEqual(self.drains(pipe), 2)


class KeysInUseTests(unittest.TestCase):
    """:meth:`Processor.keys_in_use`: a drain under way when the keys change
    ends with the keys it began with, so a retired key's replay entries
    must outlive it (a replay of a packet for that key, in that drain,
    would otherwise pass as new)."""

    setUp = LifecycleTests.new_processor

    def test_at_once_when_no_drain_runs(self) -> None:
        self.processor.set_keys([key("mix0")])  # starting: keys come with Ready
        self.successResultOf(self.processor.keys_in_use())
        self.processor._message(msg.Ready())
        self.processor._message(msg.Idle())
        self.processor.set_keys([key("mix1")])
        self.successResultOf(self.processor.keys_in_use())

    def test_after_the_drain_under_way_ends(self) -> None:
        self.processor.set_keys([key("mix0")])
        self.processor._message(msg.Ready())  # keys, then a drain
        self.processor.stored([1, 2])  # the drain goes on (More)
        self.processor.set_keys([key("mix1")])
        in_use = self.processor.keys_in_use()
        self.processor._message(msg.Batch(1))
        self.assertNoResult(in_use)
        self.processor._message(msg.Idle())  # the next drain has the new keys
        self.successResultOf(in_use)
        pipe = self.processor._child.transport
        self.assertEqual([type(m) for m in pipe.sent[-2:]], [msg.Keys, msg.Drain])

    def test_after_a_drain_that_fails_or_a_child_that_dies(self) -> None:
        self.processor.set_keys([key("mix0")])
        self.processor._message(msg.Ready())
        self.processor.set_keys([key("mix1")])
        failed = self.processor.keys_in_use()
        self.processor._message(msg.Failed("disk I/O error"))
        self.successResultOf(failed)
        self.clock.advance(1.0)  # the drain is asked again, with the new keys
        self.processor.set_keys([key("mix2")])
        died = self.processor.keys_in_use()
        self.assertNoResult(died)
        self.processor._ended(self.processor._child, _Exited())
        self.successResultOf(died)
