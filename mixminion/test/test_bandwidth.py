"""Tests of the MMTP token bucket (mmtp.md §8.4, :mod:`mixminion.mmtp.bandwidth`).

Everything runs on a ``task.Clock``: single connections on a
``StringTransport`` (whose ``producerState`` shows whether reads are
paused), and a whole MMTP exchange, initiator to responder over in-memory
TLS, through both wrappers exactly as a node builds them.  No test sleeps;
the rate is checked in simulated seconds.
"""

from __future__ import annotations

import random
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial import unittest
from zope.interface import implementer

from mixminion.mmtp.bandwidth import HIGH_WATER, SLICE, BandwidthLimiter
from mixminion.mmtp.initiator import NextHop, InitiatorSettings, MMTPClient
from mixminion.mmtp.interfaces import IPacketSink
from mixminion.mmtp.responder import responder_factory
from mixminion.mmtp.stats import MMTPStats
from mixminion.mmtp.tls import InitiatorTLS, ResponderTLS
from mixminion.testing.keys import key
from mixminion.testing.asserts import NearAssertions

PEER = IPv4Address("TCP", "198.51.100.7", 40000)
NOW = 1767225600.0  # 2026-01-01 00:00:00 UTC, for the certificates


class Recorder(Protocol):
    """The protocol above the wrapper (TLS, in a node)."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.lost: Optional[Any] = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.lost = reason


class Refusing(Factory):
    def buildProtocol(self, addr: Any) -> None:  # noqa: N802
        return None


@implementer(IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.paused = False

    def pauseProducing(self) -> None:  # noqa: N802
        self.paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False

    def stopProducing(self) -> None:  # noqa: N802
        pass


class Link:
    """One wrapped connection on a StringTransport."""

    def __init__(self, limiter: BandwidthLimiter) -> None:
        self.wrapper = limiter.wrap_factory(Factory.forProtocol(Recorder)).buildProtocol(PEER)
        self.inner: Recorder = self.wrapper.wrappedProtocol
        self.tcp = StringTransport()
        self.wrapper.makeConnection(self.tcp)

    @property
    def sent(self) -> int:
        return len(self.tcp.value())

    @property
    def reading(self) -> bool:
        return self.tcp.producerState == "producing"


def data(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


class LimiterTestCase(NearAssertions, unittest.TestCase):
    def limiter(self, rate: Optional[int], spike: Optional[int] = None) -> BandwidthLimiter:
        self.clock = Clock()
        return BandwidthLimiter(self.clock, rate, spike)

    def assertIdle(self, limiter: BandwidthLimiter) -> None:  # noqa: N802
        """Nothing waits, so no timer may run."""
        self.assertFalse(limiter.waiting)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class UnlimitedTests(LimiterTestCase):
    def test_bytes_pass_straight_through(self) -> None:
        limiter = self.limiter(None)
        link = Link(limiter)
        payload = data(1 << 20)
        link.wrapper.write(payload)
        link.wrapper.writeSequence([b"ab", b"cd"])
        link.wrapper.dataReceived(payload)
        self.assertEqual(link.tcp.value(), payload + b"abcd")
        self.assertEqual(bytes(link.inner.received), payload)
        self.assertTrue(link.reading)
        self.assertEqual(limiter.bytes_total, 2 * len(payload) + 4)
        self.assertIdle(limiter)

    def test_spike_defaults_to_five_times_the_rate(self) -> None:
        limiter = self.limiter(1000)
        self.assertEqual((limiter.rate, limiter.spike), (1000, 5000))
        self.assertEqual(limiter.tokens, 5000)

    def test_bad_limits(self) -> None:
        self.assertRaises(ValueError, self.limiter, 0)
        self.assertRaises(ValueError, self.limiter, 1000, 0)


class WriteTests(LimiterTestCase):
    def test_spike_then_the_rate(self) -> None:
        """Rate 1000 B/s, bucket 5000: 20,000 bytes go 5000 at once,
        then 1000 a simulated second, in order."""
        limiter = self.limiter(1000, 5000)
        link = Link(limiter)
        payload = data(20000)
        link.wrapper.write(payload)
        self.assertEqual(link.sent, 5000)
        for second in range(1, 16):
            self.clock.advance(1)
            self.assertEqual(link.sent, 5000 + 1000 * second)
        self.assertEqual(link.tcp.value(), payload)
        self.assertIdle(limiter)

    def test_released_in_tenths_of_a_second(self) -> None:
        limiter = self.limiter(1000, 5000)
        link = Link(limiter)
        link.wrapper.write(data(6000))
        self.assertEqual(link.sent, 5000)
        self.clock.advance(0.099)
        self.assertEqual(link.sent, 5000, "less than a tick's worth is not sent")
        self.clock.advance(0.001)
        self.assertEqual(link.sent, 5100)

    def test_long_run_rate_is_exact(self) -> None:
        limiter = self.limiter(1000, 5000)
        link = Link(limiter)
        link.wrapper.write(data(200000))
        self.clock.pump([0.097] * 1000)  # 97 s in uneven steps
        self.assertLessEqual(abs(link.sent - (5000 + 97000)), 1)

    def test_later_writes_wait_behind_held_ones(self) -> None:
        limiter = self.limiter(1000, 5000)
        link = Link(limiter)
        chunks = [data(3000, seed) for seed in range(5)]
        for chunk in chunks:
            link.wrapper.write(chunk)
        self.clock.pump([1] * 10)
        self.assertEqual(link.tcp.value(), b"".join(chunks))

    def test_tokens_never_exceed_the_bucket(self) -> None:
        """A wake-up late by ten seconds (a busy reactor) finds a full
        bucket, not ten seconds' worth."""
        limiter = self.limiter(1000, 5000)
        link = Link(limiter)
        link.wrapper.write(data(20000))
        self.clock.advance(10)
        self.assertEqual(link.sent, 10000)

    def test_two_connections_share_one_bucket(self) -> None:
        limiter = self.limiter(1000, 5000)
        a, b = Link(limiter), Link(limiter)
        a.wrapper.write(data(5000))
        b.wrapper.write(b"x" * 100)
        self.assertEqual((a.sent, b.sent), (5000, 0))
        self.clock.advance(0.1)
        self.assertEqual(b.sent, 100)
        self.assertIdle(limiter)

    def test_held_writes_are_released_round_robin(self) -> None:
        limiter = self.limiter(1000, 1000)
        a, b = Link(limiter), Link(limiter)
        a.wrapper.write(data(50000))
        b.wrapper.write(data(50000))
        self.assertEqual((a.sent, b.sent), (1000, 0))
        self.clock.pump([0.125] * 80)  # 10 s: 10,000 bytes
        self.assertEqual(a.sent - 1000 + b.sent, 10000)
        self.assertNear(a.sent - 1000, b.sent, delta=125)

    def test_slices_share_one_wake_up(self) -> None:
        """A tick's worth larger than a TLS record is shared in slices."""
        limiter = self.limiter(1 << 20, 1 << 20)
        a, b = Link(limiter), Link(limiter)
        a.wrapper.write(data(2 << 20))
        b.wrapper.write(data(1 << 20))
        self.assertEqual((a.sent, b.sent), (1 << 20, 0))
        self.clock.advance(0.125)
        got_a, got_b = a.sent - (1 << 20), b.sent
        self.assertEqual(got_a + got_b, (1 << 20) // 8)
        self.assertLessEqual(abs(got_a - got_b), SLICE)

    def test_close_waits_for_held_bytes(self) -> None:
        limiter = self.limiter(1000, 1000)
        link = Link(limiter)
        link.wrapper.write(data(3000))
        link.wrapper.loseConnection()
        self.assertFalse(link.tcp.disconnecting, "held bytes (a close_notify) would be lost")
        self.clock.pump([0.125] * 15)
        self.assertEqual(link.sent, 2875)
        self.assertFalse(link.tcp.disconnecting)
        self.clock.advance(0.125)
        self.assertEqual(link.sent, 3000)
        self.assertTrue(link.tcp.disconnecting)

    def test_close_with_nothing_held_is_immediate(self) -> None:
        link = Link(self.limiter(1000))
        link.wrapper.write(b"bye")
        link.wrapper.loseConnection()
        self.assertTrue(link.tcp.disconnecting)

    def test_abort_drops_held_bytes(self) -> None:
        limiter = self.limiter(1000, 1000)
        link = Link(limiter)
        link.wrapper.write(data(3000))
        link.wrapper.abortConnection()
        link.wrapper.write(b"after the abort")
        link.wrapper.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(link.sent, 1000)
        self.assertIdle(limiter)

    def test_producer_paused_while_much_is_held(self) -> None:
        limiter = self.limiter(100000, 100000)
        link = Link(limiter)
        producer = Producer()
        link.wrapper.registerProducer(producer, True)
        link.wrapper.write(data(100000 + HIGH_WATER))
        self.assertFalse(producer.paused, "exactly HIGH_WATER held")
        link.wrapper.write(b"x")
        self.assertTrue(producer.paused)
        # The TCP transport pauses it too (its own buffer is full) ...
        link.tcp.producer.pauseProducing()
        self.clock.advance(1)
        self.assertEqual(link.sent, 100000 + HIGH_WATER + 1)
        self.assertTrue(producer.paused, "the transport still wants it paused")
        # ... and only resuming both lets it go on.
        link.tcp.producer.resumeProducing()
        self.assertFalse(producer.paused)
        link.wrapper.unregisterProducer()
        self.assertIsNone(link.tcp.producer)


class ReadTests(LimiterTestCase):
    def test_read_delivered_then_paused_until_debt_repaid(self) -> None:
        limiter = self.limiter(1000, 5000)
        link = Link(limiter)
        payload = data(6000)
        link.wrapper.dataReceived(payload)
        self.assertEqual(bytes(link.inner.received), payload, "what arrived is delivered")
        self.assertFalse(link.reading)
        self.assertEqual(limiter.tokens, -1000)
        self.clock.advance(1)  # the debt is repaid, but no tick's worth yet
        self.assertFalse(link.reading)
        self.clock.advance(0.1)
        self.assertTrue(link.reading)
        self.assertIdle(limiter)

    def test_dry_bucket_stops_every_connection(self) -> None:
        limiter = self.limiter(1000, 5000)
        a, b = Link(limiter), Link(limiter)
        a.wrapper.dataReceived(data(5000))
        self.assertFalse(a.reading)
        self.assertFalse(b.reading)
        b.wrapper.write(b"ack")
        self.assertEqual(b.sent, 0, "no socket is serviced while the bucket is empty")
        late = Link(limiter)
        self.assertFalse(late.reading, "a new connection waits too")
        self.clock.advance(0.1)
        self.assertTrue(all(link.reading for link in (a, b, late)))
        self.assertEqual(b.tcp.value(), b"ack")
        self.assertIdle(limiter)

    def test_protocol_pause_outlasts_the_bucket(self) -> None:
        """The responder pauses reads while its disk is behind; a refilled
        bucket must not resume them, nor the reverse."""
        limiter = self.limiter(1000, 5000)
        link = Link(limiter)
        link.inner.transport.pauseProducing()
        link.wrapper.dataReceived(data(6000))
        self.clock.advance(2)
        self.assertFalse(link.reading)
        link.inner.transport.resumeProducing()
        self.assertTrue(link.reading)
        link.wrapper.dataReceived(data(1000))
        self.assertFalse(link.reading)
        link.inner.transport.pauseProducing()
        link.inner.transport.resumeProducing()
        self.assertFalse(link.reading, "still waiting for tokens")
        self.clock.advance(1.1)
        self.assertTrue(link.reading)

    def test_held_writes_do_not_starve_reads(self) -> None:
        """At a wake-up the held writes take every token, yet reads are
        resumed: each may read a chunk on credit, then all pause."""
        limiter = self.limiter(1000, 1000)
        a, b = Link(limiter), Link(limiter)
        a.wrapper.write(data(5000))
        self.assertFalse(b.reading, "the writes emptied the bucket")
        self.clock.advance(0.1)
        self.assertEqual(a.sent, 1100)
        self.assertTrue(b.reading)
        b.wrapper.dataReceived(data(10))
        self.assertEqual(len(b.inner.received), 10)
        self.assertFalse(a.reading or b.reading)
        self.assertEqual(limiter.tokens, -10)
        self.clock.advance(0.11)  # the debt first, then a tick's worth
        self.assertEqual(a.sent, 1200)
        self.assertTrue(b.reading)

    def test_connection_lost_leaves_no_timer(self) -> None:
        limiter = self.limiter(1000, 1000)
        a, b = Link(limiter), Link(limiter)
        a.wrapper.dataReceived(data(3000))
        b.wrapper.write(data(500))
        self.assertTrue(limiter.waiting)
        a.wrapper.connectionLost(Failure(ConnectionDone()))
        b.wrapper.connectionLost(Failure(ConnectionDone()))
        self.assertIdle(limiter)
        self.assertIsNotNone(a.inner.lost)
        # The debt stays with the bucket: the next connection waits for it.
        c = Link(limiter)
        c.wrapper.write(b"hello")
        self.assertEqual(c.sent, 0)
        self.clock.advance(2.1)
        self.assertEqual(c.tcp.value(), b"hello")


class SetLimitsTests(LimiterTestCase):
    def test_unlimiting_releases_everything(self) -> None:
        limiter = self.limiter(1000, 1000)
        a, b = Link(limiter), Link(limiter)
        payload = data(10000)
        a.wrapper.write(payload)
        b.wrapper.dataReceived(data(10))
        self.assertFalse(b.reading)
        limiter.set_limits(None)
        self.assertEqual(a.tcp.value(), payload)
        self.assertTrue(b.reading)
        self.assertIdle(limiter)
        a.wrapper.write(b"more")
        self.assertEqual(a.tcp.value(), payload + b"more")

    def test_limiting_starts_with_a_full_bucket(self) -> None:
        limiter = self.limiter(None)
        link = Link(limiter)
        limiter.set_limits(1000)
        link.wrapper.write(data(6000))
        self.assertEqual(link.sent, 5000)
        self.clock.advance(1)
        self.assertEqual(link.sent, 6000)

    def test_new_rate_applies_to_held_bytes(self) -> None:
        limiter = self.limiter(1000, 1000)
        link = Link(limiter)
        link.wrapper.write(data(20000))
        self.clock.advance(1)
        self.assertEqual(link.sent, 2000)
        limiter.set_limits(4000, 4000)
        self.clock.advance(1)
        self.assertEqual(link.sent, 6000)

    def test_smaller_spike_empties_the_bucket(self) -> None:
        limiter = self.limiter(1000, 5000)
        limiter.set_limits(1000, 2000)
        self.assertEqual(limiter.tokens, 2000)
        link = Link(limiter)
        link.wrapper.write(data(3000))
        self.assertEqual(link.sent, 2000)


class WrapperTests(LimiterTestCase):
    def test_refused_connection_stays_refused(self) -> None:
        factory = self.limiter(1000).wrap_factory(Refusing())
        self.assertIsNone(factory.buildProtocol(PEER))

    def test_endpoint_fires_with_the_protocol_above(self) -> None:
        limiter = self.limiter(1000, 1000)
        transports = []

        class Endpoint:
            def connect(self, factory: Any) -> defer.Deferred[Any]:
                proto = factory.buildProtocol(PEER)
                transports.append(StringTransport())
                proto.makeConnection(transports[-1])
                return defer.succeed(proto)

        d = limiter.wrap_endpoint(Endpoint()).connect(Factory.forProtocol(Recorder))
        proto = self.successResultOf(d)
        self.assertIsInstance(proto, Recorder)
        proto.transport.write(data(1500))
        self.assertEqual(len(transports[0].value()), 1000)


# ------------------------------------ MMTP over in-memory TLS, both wrappers


class PausableTransport(iosim.FakeTransport):
    """iosim's transport ignores ``pauseProducing``; this one keeps what
    arrives while paused, and delivers it a turn after resuming, as a
    reactor would."""

    def __init__(self, protocol: Any, is_server: bool, clock: Clock) -> None:
        super().__init__(protocol, is_server)
        self.clock = clock
        self.paused = False
        self.pauses = 0
        self.backlog: list[bytes] = []

    def pauseProducing(self) -> None:  # noqa: N802
        if not self.paused:
            self.pauses += 1
        self.paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False
        self.clock.callLater(0, self._deliver)

    def bufferReceived(self, buf: Any) -> None:  # noqa: N802
        self.backlog.append(buf)
        self._deliver()

    def _deliver(self) -> None:
        while self.backlog and not self.paused:
            super().bufferReceived(self.backlog.pop(0))


@implementer(IPacketSink)
class ListSink:
    def __init__(self) -> None:
        self.stored: list[bytes] = []

    def receivePacket(self, packet: bytes, peer: str) -> defer.Deferred[None]:  # noqa: N802
        self.stored.append(packet)
        return defer.succeed(None)


class OverTLSTests(unittest.TestCase):
    def test_mmtp_through_a_limited_responder(self) -> None:
        """The node's wiring: ``wrap_factory`` around the responder's TLS
        factory, ``wrap_endpoint`` under the initiator's TLS.  The limited
        side's bytes (both directions, TLS included) take their time at
        the rate, and both sides count the same bytes."""
        clock = Clock()
        clock.advance(NOW)
        rate, spike = 100_000, 200_000
        server_side = BandwidthLimiter(clock, rate, spike)
        client_side = BandwidthLimiter(clock, None)  # only counts
        sink = ListSink()
        listening = server_side.wrap_factory(
            responder_factory(sink, ResponderTLS(key("responder"), "Lisbon", clock=clock), clock))
        client = MMTPClient(clock, InitiatorTLS(), InitiatorSettings(), MMTPStats())
        pumps: list[iosim.IOPump] = []
        server_tcp: list[PausableTransport] = []

        class Endpoint:
            def connect(self, factory: Any) -> defer.Deferred[Any]:
                server = listening.buildProtocol(PEER)
                initiator = factory.buildProtocol(None)
                server_tcp.append(PausableTransport(server, True, clock))
                pumps.append(iosim.connect(server, server_tcp[-1], initiator,
                                           PausableTransport(initiator, False, clock),
                                           greet=False, clock=clock))
                return defer.succeed(initiator)

        def connect(destination: NextHop, factory: Any) -> defer.Deferred[Any]:
            # wrapClientTLS(tls, endpoint).connect(factory), with the clock
            # in-memory TLS needs (mixminion.mmtp.initiator.MMTPClient.connect)
            tls = TLSMemoryBIOFactory(client.tls, True, factory, clock=clock)
            d = client_side.wrap_endpoint(Endpoint()).connect(tls)
            return d.addCallback(lambda proto: proto.wrappedProtocol)

        client.connect = connect  # type: ignore[method-assign]
        destination = NextHop("192.0.2.1", 48099, key("responder").public.keyid)
        packets = [data(32768, seed) for seed in range(20)]
        acked: list[Any] = []
        for p in packets:
            client.send_packet(destination, p).addBoth(acked.append)
        start = clock.seconds()
        for _ in range(100000):
            moved = any([pump.pump() for pump in pumps])
            if not moved:
                if len(acked) == len(packets) and not server_side.waiting:
                    break
                clock.advance(0.01)
        self.assertEqual(acked, [None] * len(packets))
        self.assertEqual(sink.stored, packets)
        elapsed = clock.seconds() - start
        wire = server_side.bytes_total
        self.assertEqual(client_side.bytes_total, wire)
        self.assertGreater(wire, len(packets) * 32794, "TLS records and handshake are counted")
        self.assertGreaterEqual(elapsed, (wire - spike) / rate)
        self.assertLess(elapsed, (wire - spike) / rate + 0.5)
        self.assertGreater(server_tcp[0].pauses, 0, "reads were paused")
        self.assertFalse(server_side.waiting)
