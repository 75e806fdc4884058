"""When processing cannot run (issue 12 point 5): a damaged packet store
made the processing child crash in a loop (164 restarts) while the node
kept acknowledging packets it would never process.  Now, after a few
failures in a row, the node says so once at ERROR, refuses packets
(REJECTED) and restarts the child less and less often; the first batch
done clears it."""

from __future__ import annotations

import os
from typing import Callable, Optional

from twisted.internet import defer, reactor, task
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher

from mixminion.server.childmessages import Batch, Ready
from mixminion.server.durable import DurableSink, SinkRefused
from mixminion.server.processing import FAILURES_BEFORE_FAILING, MAX_RESTART_DELAY, Processor
from mixminion.test.test_pipeline import TwoStoreTestCase, _packet
from mixminion.testing.keys import key


class ProcessingFailureTests(TwoStoreTestCase):
    def processor(self, store_path: str, restart_delay: float,
                  count: Optional[Callable[[str, int], None]] = None) -> Processor:
        processor = Processor(self.incoming.path, store_path, reactor, count or self.stats.count,
                              restart_delay=restart_delay)
        self.addCleanup(processor.stop)
        return processor

    def test_a_child_crashing_in_a_loop_makes_the_node_refuse(self) -> None:
        """A real child on a store that is not a database exits at once,
        every time; the sink fed by the same processor then refuses."""
        logs = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        damaged = os.path.join(os.path.dirname(self.store.path), "damaged.db")
        with open(damaged, "wb") as f:
            f.write(os.urandom(8192))  # not a SQLite file: the child cannot open it
        gave_up: defer.Deferred[None] = defer.Deferred()

        def count(name: str, n: int) -> None:
            self.stats.count(name, n)
            if name == "ProcessingFailing":  # resume once the processor has said so
                reactor.callLater(0, gave_up.callback, None)

        processor = self.processor(damaged, restart_delay=0.02, count=count)
        sink = DurableSink(self.store, reactor, "incoming", unable=lambda: processor.failing)
        self.addCleanup(sink.stop)

        async def go() -> None:
            await sink.receivePacket(_packet(), "peer")  # accepted while nothing has failed
            processor.set_keys([key("mix0")])
            await gave_up  # counted when the processor gives up: no clock to poll
            self.assertIsNotNone(processor.failing)
            self.assertEqual(processor.starts, FAILURES_BEFORE_FAILING)
            with self.assertRaises(SinkRefused) as refused:
                await sink.receivePacket(_packet(), "peer")
            self.assertIn("processing is not running", str(refused.exception))
            self.assertEqual(self.stats["ProcessingFailing"], 1)
            failing = [e for e in logs if e["log_level"] == LogLevel.error
                       and "Processing is not running" in e["log_format"]]
            self.assertEqual(len(failing), 1)

        return defer.ensureDeferred(go())

    def test_restarts_slow_down_and_the_first_batch_clears_it(self) -> None:
        clock = task.Clock()
        spawned: list[object] = []

        class Reactor:
            callLater = clock.callLater
            seconds = clock.seconds

            def spawnProcess(self, proto, *args, **kwargs):  # noqa: N802
                spawned.append(proto)
                proto.transport = None

        processor = Processor(self.incoming.path, self.store.path, Reactor(), self.stats.count,
                              restart_delay=1.0)
        processor.set_keys([key("mix0")])
        delays = []
        for _ in range(9):
            child = processor._child
            processor._ended(child, _Exited())
            pending = [c for c in clock.getDelayedCalls() if c.active()]
            delays.append(round(pending[0].getTime() - clock.seconds(), 3))
            clock.advance(delays[-1])
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0])
        self.assertTrue(processor.failing)
        self.assertEqual(MAX_RESTART_DELAY, 60.0)
        processor._child.transport = _Pipe()
        processor._message(Ready())
        processor._message(Batch(0, {}))
        self.assertIsNone(processor.failing)
        processor._ended(processor._child, _Exited())
        [retry] = [c for c in clock.getDelayedCalls() if c.active()]
        self.assertEqual(retry.getTime() - clock.seconds(), 1.0)  # back to the first delay


class _Exited:
    def getErrorMessage(self) -> str:
        return "exit status 1"


class _Pipe:
    def write(self, data: bytes) -> None:
        pass
