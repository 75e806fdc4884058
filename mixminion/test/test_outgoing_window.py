"""Regression tests for two outgoing-queue bugs found by the crash test and
the node benchmark (issue 4).

* A mix that moved a large pool into the ``out`` queue made the node read
  every packet of it into memory at once (20,000 packets: 725 MB resident);
  now at most ``max_in_flight`` are handed to MMTP, and more as they leave.
* A clean shutdown aborted the sends under way, and those failures marked
  the next hop's address as failed, so after a restart everything for it
  waited for the first retry interval (an hour by default).
"""

from __future__ import annotations

from twisted.trial import unittest

from typing import Optional

from twisted.python.failure import Failure

from mixminion.mmtp.initiator import CannotConnect, ConnectionFailed, NextHopBusy
from mixminion.server.items import NextHop, encode_item
from mixminion.server.outgoing import Outgoing
from mixminion.server.queues import OUT
from mixminion.server.stats import NodeStats
from mixminion.testing.fakes import HeldClient, ListSink, scratch_store
from mixminion.testing.threads import InPlaceWorker, InPlaceReactor


class OutgoingWindowTests(unittest.TestCase):
    def setUp(self) -> None:
        self.store = scratch_store(self)
        self.stats = NodeStats()
        #: the clock, and the reactor the store's removals (run in place)
        #: report to: ``settle`` delivers their results
        self.clock = InPlaceReactor()
        self.clock.advance(1000)
        self.client = HeldClient()
        self.meta = encode_item(NextHop("127.0.0.1", 5000, b"\x01" * 20))

    def outgoing(self, window: int) -> Outgoing:
        out = Outgoing(self.store, self.client, (60, 60), self.clock, b"\x07" * 20,
                       self.stats.count, ListSink(), worker=InPlaceWorker())
        out.max_in_flight = window
        self.addCleanup(out.stop)
        return out

    def settle(self) -> None:
        """Let the removals written report back, as the reactor's next turn would."""
        self.clock.advance(0)

    def test_at_most_a_window_of_packets_is_handed_to_mmtp(self) -> None:
        self.store.add_many(OUT, [bytes(32768)] * 25, now=1000, meta=[self.meta] * 25)
        out = self.outgoing(10)
        self.assertEqual(out.flush(), 10)
        self.assertEqual(len(self.client.sent), 10)
        for _, d in self.client.sent[:4]:
            d.callback(None)
        self.settle()  # removed: four more go out without waiting for a mix
        self.assertEqual(len(self.client.sent), 14)
        self.assertEqual(out.flush(), 0)  # a new flush does not double anything
        answered = 4
        while answered < len(self.client.sent):
            self.assertLessEqual(len(self.client.sent) - answered, 10)
            for _, d in self.client.sent[answered:]:
                d.callback(None)
            answered = len(self.client.sent)
            self.settle()
        self.assertEqual(len(self.client.sent), 25)
        self.assertEqual(self.store.count(OUT), 0)

    def test_a_failure_does_not_send_the_rest_of_its_address(self) -> None:
        self.store.add_many(OUT, [bytes(32768)] * 5, now=1000, meta=[self.meta] * 5)
        out = self.outgoing(2)
        self.assertEqual(out.flush(), 2)
        self.client.sent[0][1].errback(ConnectionFailed("down"))
        self.client.sent[1][1].errback(ConnectionFailed("down"))
        self.assertEqual(len(self.client.sent), 2)  # the address waits for its retry
        self.assertEqual(self.store.count(OUT), 5)
        self.clock.advance(61)
        self.assertEqual(out.flush(), 2)

    async def test_shutdown_aborts_are_not_held_against_the_next_hop(self) -> None:
        self.store.add_many(OUT, [bytes(32768)] * 3, now=1000, meta=[self.meta] * 3)
        out = self.outgoing(10)
        self.assertEqual(out.flush(), 3)
        stopped = out.stop()
        for _, d in self.client.sent:
            d.errback(ConnectionFailed("client shutting down"))
        await stopped
        again = Outgoing(self.store, HeldClient(), (60, 60), self.clock, b"\x07" * 20,
                         self.stats.count, ListSink(), worker=InPlaceWorker())
        self.addCleanup(again.stop)
        self.assertEqual(again.flush(), 3)  # right away after the restart

    async def test_listeners_hear_how_each_attempt_ended(self) -> None:
        """Acknowledged (None) or the failure; not a send our own memory
        bound put off, nor one our shutdown cut short (the pinger records
        its first hops' failures from this)."""
        ids = self.store.add_many(OUT, [bytes(32768)] * 4, now=1000, meta=[self.meta] * 4)
        out = self.outgoing(10)
        heard: list[tuple[int, Optional[type]]] = []

        def listen(packet_id: int, failure: Optional[Failure]) -> None:
            heard.append((packet_id, None if failure is None else failure.type))
        out.attempt_listeners.append(listen)
        self.assertEqual(out.flush(), 4)
        sent = [d for _, d in self.client.sent]
        sent[0].callback(None)
        sent[1].errback(CannotConnect("cannot connect: refused"))
        sent[2].errback(NextHopBusy("our own limit"))
        self.settle()
        stopped = out.stop()
        sent[3].errback(ConnectionFailed("client shutting down"))
        self.settle()
        await stopped
        self.assertEqual(heard, [(ids[0], None), (ids[1], CannotConnect)])
