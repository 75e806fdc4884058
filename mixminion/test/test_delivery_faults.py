"""Delivery under faults (issue 12 points 4 and 6): an unreadable item is
moved aside once and the others go on; each module works on its own, so a
module that hangs holds back only itself; an MTA gets at most
MaxSMTPConnections sessions at once."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, task
from twisted.trial import unittest

from mixminion.codec.build import encode_message_payloads
from mixminion.codec.routing import MBOX_TYPE, SMTP_TYPE
from mixminion.exits.context import ExitContext
from mixminion.exits.interfaces import ExitModuleBase
from mixminion.exits.items import DeliveryResult
from mixminion.exits.mta import SMTPRelay
from mixminion.exits.registry import Dispatcher
from mixminion.server.delivery import Delivery
from mixminion.server.items import DeliveryItem, encode_item
from mixminion.server.packetstore import PacketStore
from mixminion.server.queues import QUARANTINE, delivery_queue
from mixminion.server.stats import NodeStats


class Recorder(ExitModuleBase):
    """An exit module that records what it is given; ``hold`` keeps its
    deliveries (or its periodic work) waiting until released."""

    uses_tag = False
    retry_schedule = (100, 100)

    def __init__(self, name: str, exit_type: int) -> None:
        self.name = name
        self.exit_types = frozenset({exit_type})
        self.delivered: list[Any] = []
        self.held: list[defer.Deferred] = []
        self.hold_deliveries = False
        self.hold_flush = False

    def deliver(self, item) -> defer.Deferred:
        if self.hold_deliveries:
            d: defer.Deferred = defer.Deferred()
            self.held.append(d)
            return d.addCallback(lambda _: DeliveryResult.OK)
        self.delivered.append(item)
        return defer.succeed(DeliveryResult.OK)

    def flush(self) -> defer.Deferred:
        if self.hold_flush:
            d: defer.Deferred = defer.Deferred()
            self.held.append(d)
            return d
        return defer.succeed(None)


def queue_messages(store: PacketStore, module: str, exit_type: int, count: int) -> list[int]:
    """``count`` one-packet messages in ``module``'s delivery queue, queued at 5000."""
    payloads = [encode_message_payloads(f"message {i}\n".encode(), os.urandom)[0]
                for i in range(count)]
    meta = [encode_item(DeliveryItem(exit_type, b"T" * 20 + b"nym", bytes(16)))] * count
    return store.add_many(delivery_queue(module), payloads, now=5000, meta=meta)


class DeliveryFaultTests(unittest.TestCase):
    def setUp(self) -> None:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        self.store = PacketStore(os.path.join(folder, "packets.db"),
                                 body_dir=os.path.join(folder, "bodies"))
        self.addCleanup(self.store.close)
        self.stats = NodeStats()
        self.clock = task.Clock()
        self.clock.advance(5000)
        self.mbox = Recorder("MBOX", MBOX_TYPE)
        self.smtp = Recorder("SMTP", SMTP_TYPE)
        dispatcher = Dispatcher(ExitContext(base_dir=folder, clock=self.clock,
                                            reactor=self.clock, counters=self.stats))
        dispatcher.add_module(self.mbox)
        dispatcher.add_module(self.smtp)
        self.delivery = Delivery(self.store, dispatcher, self.clock, self.stats.count)

    def queue(self, module: str, exit_type: int, count: int) -> list[int]:
        return queue_messages(self.store, module, exit_type, count)

    def test_an_unreadable_body_is_moved_aside_once(self) -> None:
        async def go() -> None:
            ids = self.queue("MBOX", MBOX_TYPE, 3)
            self.queue("SMTP", SMTP_TYPE, 2)
            # The body of the middle item is zeroed on disk, as a damaged
            # slot would read.
            self.store._bodies.zero([ids[1]], lambda first, last: True, ids[-1])
            self.assertEqual(await self.delivery.flush(), 4)
            self.assertEqual((len(self.mbox.delivered), len(self.smtp.delivered)), (2, 2))
            self.assertEqual(self.stats["Quarantined:MBOX"], 1)
            self.assertEqual(self.store.ids(QUARANTINE), [ids[1]])
            self.assertEqual(self.store.count(delivery_queue("MBOX")), 0)
            # Moved aside: the next round does not meet it again.
            self.assertEqual(await self.delivery.flush(), 0)
            self.assertEqual(self.stats["Quarantined:MBOX"], 1)
            self.assertEqual(self.flushLoggedErrors(), [])

        return defer.ensureDeferred(go())

    def test_a_damaged_record_is_moved_aside(self) -> None:
        async def go() -> None:
            ids = self.queue("MBOX", MBOX_TYPE, 2)
            self.store.update_meta(ids[0], b"{not json")
            self.assertEqual(await self.delivery.flush(), 1)
            self.assertEqual(self.store.ids(QUARANTINE), [ids[0]])
            self.assertEqual(self.stats["Quarantined:MBOX"], 1)

        return defer.ensureDeferred(go())

    def test_a_hung_module_holds_back_only_itself(self) -> None:
        """SMTP's periodic work and deliveries hang; MBOX mail still goes,
        round after round, and the next round does not wait for SMTP."""
        async def go() -> None:
            self.smtp.hold_flush = True
            self.queue("SMTP", SMTP_TYPE, 2)
            self.queue("MBOX", MBOX_TYPE, 1)
            first = self.delivery.flush()
            self.assertEqual(len(self.mbox.delivered), 1)
            self.assertFalse(first.called)
            self.smtp.hold_flush = False
            self.smtp.hold_deliveries = True
            self.queue("MBOX", MBOX_TYPE, 1)
            second = self.delivery.flush()  # SMTP's flush still runs: not doubled
            self.assertEqual(len(self.mbox.delivered), 2)
            self.assertEqual(len(self.smtp.held), 1 + 2)  # one flush, two deliveries
            for held in self.smtp.held:
                held.callback(None)
            await first
            await second
            self.assertEqual(self.store.count(delivery_queue("SMTP")), 0)

        return defer.ensureDeferred(go())


class AttemptBoundTests(unittest.TestCase):
    """Issue 12 point 9: a pool released into a delivery queue does not
    start an attempt (and hold a payload in memory) per queued item."""

    setUp = DeliveryFaultTests.setUp
    queue = DeliveryFaultTests.queue

    def test_attempts_under_way_are_bounded(self) -> None:
        async def go() -> None:
            self.delivery.max_attempts = 8
            self.delivery.read_slice = 16
            self.mbox.hold_deliveries = True
            self.queue("MBOX", MBOX_TYPE, 50)
            self.queue("SMTP", SMTP_TYPE, 3)
            round_ = self.delivery.flush()
            self.assertEqual(len(self.mbox.held), 8)
            self.assertEqual(len(self.smtp.delivered), 3)  # the other module goes on
            # A second round leaves the queue to the scan under way.
            self.assertEqual(await self.delivery.flush(), 0)
            self.assertEqual(len(self.mbox.held), 8)
            released = 0
            while released < len(self.mbox.held):
                self.mbox.held[released].callback(None)
                released += 1
                self.clock.advance(0)  # between slices the scan lets the reactor in
                self.assertLessEqual(len(self.mbox.held) - released, 8)
            self.assertEqual(await round_, 53)
            self.assertEqual((len(self.mbox.held), self.store.count(delivery_queue("MBOX"))),
                             (50, 0))

        return defer.ensureDeferred(go())

    def test_stop_starts_no_more_attempts(self) -> None:
        async def go() -> None:
            self.delivery.max_attempts = 4
            self.mbox.hold_deliveries = True
            self.queue("MBOX", MBOX_TYPE, 20)
            round_ = self.delivery.flush()
            stopped = self.delivery.stop()
            for d in list(self.mbox.held):
                d.callback(None)
            await stopped
            await round_
            self.assertEqual(len(self.mbox.held), 4)
            self.assertEqual(self.store.count(delivery_queue("MBOX")), 16)

        return defer.ensureDeferred(go())


class SMTPSessionBoundTests(unittest.TestCase):
    def test_at_most_max_sessions_at_once(self) -> None:
        """Twenty messages do not open twenty SMTP sessions: at most
        ``max_sessions``; the others start as sessions end."""
        from twisted.internet import error
        from twisted.internet.testing import MemoryReactorClock
        from twisted.python.failure import Failure

        reactor = MemoryReactorClock()
        relay = SMTPRelay("127.0.0.1", 2525, reactor, _Quiet(), timeout=30, max_sessions=3)
        results = [relay.send("r@example.org", f"to{i}@example.org", b"Subject: x\n\nhi\n")
                   for i in range(20)]
        self.assertEqual(len(reactor.tcpClients), 3)
        outcomes: list = []
        for d in results:
            d.addCallback(outcomes.append)
        # The MTA refuses the first three: each is a RETRY, and three more
        # sessions take their places.
        for _host, _port, factory, _timeout, _bind in list(reactor.tcpClients):
            factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        self.assertEqual(outcomes, [DeliveryResult.RETRY] * 3)
        self.assertEqual(len(reactor.tcpClients), 6)


class _Quiet:
    def warn(self, *args: Any, **kwargs: Any) -> None:
        pass

    info = debug = error = warn
