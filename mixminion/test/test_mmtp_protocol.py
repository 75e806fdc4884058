"""Unit tests of the MMTP Twisted layer (mmtp.md §5-§8, §11, §14.2).

Everything runs in memory on a ``task.Clock``: the responder protocol on a
``StringTransport`` (TLS adds nothing to what it decides), the initiator
against a real responder over in-memory TLS (``iosim`` with
``TLSMemoryBIOFactory(..., clock=clock)``), and the address rules and
connection counters through the factory that enforces them at accept.

Acknowledgements and frames are computed here from SHA-1 directly, not with
``mixminion.mmtp.frames``, so a mistake there cannot hide itself.  Every
test ends by checking the log line an operator would see, and that nothing
was lost: each packet acknowledged RECEIVED is in the sink, and nothing is
stored for a rejected or broken frame.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.trial import unittest
from zope.interface import implementer

from mixminion.mmtp.initiator import (
    LINK_TLS,
    ConnectionFailed,
    HandshakeFailed,
    InitiatorSettings,
    MMTPClient,
    NextHop,
    PacketRejected,
    PeerAuthenticationFailed,
    Phase,
    link_failure,
)
from mixminion.mmtp.interfaces import IPacketSink
from mixminion.mmtp.limits import (
    ConnectionCounter,
    ConnectionLimits,
    NetworkRule,
    NetworkRules,
    normalize_address,
)
from mixminion.mmtp.responder import (
    GuardedTLSFactory,
    MMTPResponderFactory,
    MMTPResponderProtocol,
    responder_factory,
)
from mixminion.mmtp.stats import MMTPStats
from mixminion.mmtp.tls import InitiatorTLS, ResponderTLS
from mixminion.testing.keys import key

NOW = 1767225600.0  # 2026-01-01 00:00:00 UTC; certificates are made for it
PACKET_LEN = 32768
VERSION_LINE = b"MMTP 0.3\r\n"
PEER = IPv4Address("TCP", "198.51.100.7", 40000)


# ------------------------------------------------------------------ helpers


def make_packet(n: int) -> bytes:
    """A distinct, reproducible 32 KiB packet."""
    return random.Random(n).randbytes(PACKET_LEN)


def sha1(data: bytes) -> bytes:
    return hashlib.sha1(data).digest()


def send_frame(packet: bytes) -> bytes:
    return b"SEND\r\n" + packet + sha1(packet + b"SEND")


def junk_frame(junk: bytes) -> bytes:
    return b"JUNK\r\n" + junk + sha1(junk + b"JUNK")


def received_ack(packet: bytes) -> bytes:
    return b"RECEIVED\r\n" + sha1(packet + b"RECEIVED")


def rejected_ack(packet: bytes) -> bytes:
    return b"REJECTED\r\n" + sha1(packet + b"REJECTED")


def junk_ack(junk: bytes) -> bytes:
    return b"RECEIVED\r\n" + sha1(junk + b"RECEIVED JUNK")


class DiskFull(OSError):
    """What a failing store raises in these tests."""


@implementer(IPacketSink)
class HeldSink:
    """Holds each packet's Deferred so the test decides when storage ends;
    ``stored`` holds exactly the packets whose storage succeeded."""

    def __init__(self) -> None:
        self.held: list[tuple[bytes, defer.Deferred[Any]]] = []
        self.stored: list[bytes] = []
        self.peers: list[str] = []

    def receivePacket(self, packet: bytes, peer: str) -> defer.Deferred[Any]:  # noqa: N802
        d: defer.Deferred[Any] = defer.Deferred()
        self.held.append((packet, d))
        self.peers.append(peer)
        self.arrived(len(self.held) - 1)
        return d

    def arrived(self, index: int) -> None:
        """What becomes of packet ``index`` at once: here nothing (the
        test stores or fails it when it likes)."""

    @property
    def waiting(self) -> int:
        """Packets handed over whose storage has not finished."""
        return sum(1 for _, d in self.held if not d.called)

    def store(self, index: int) -> None:
        packet, d = self.held[index]
        self.stored.append(packet)
        d.callback(len(self.stored))

    def fail(self, index: int) -> None:
        self.held[index][1].errback(DiskFull(28, "No space left on device"))

    def store_all(self) -> None:
        for i, (_, d) in enumerate(self.held):
            if not d.called:
                self.store(i)


class MemorySink(HeldSink):
    """Stores every packet at once."""

    def arrived(self, index: int) -> None:
        self.store(index)


class FailingSink(HeldSink):
    """A store whose disk is full: every packet fails at once."""

    def arrived(self, index: int) -> None:
        self.fail(index)


class LogMixin(unittest.TestCase):
    """Captures twisted.logger events for the test's duration."""

    def setUp(self) -> None:
        self.logs = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def logged(self, fragment: str, level: Optional[LogLevel] = None) -> list[dict[str, Any]]:
        """Events whose text contains ``fragment`` (at ``level`` if given)."""
        return [e for e in self.logs
                if fragment in (formatEvent(e) or "")
                and (level is None or e.get("log_level") == level)]

    def expect_log(self, fragment: str, level: LogLevel,
                   count: Optional[int] = None) -> list[dict[str, Any]]:
        """Assert the operator saw ``fragment`` (``count`` times if given)."""
        found = self.logged(fragment, level)
        seen = [f"{e.get('log_level').name}: {formatEvent(e)}" for e in self.logs
                if e.get("log_namespace", "").startswith("mixminion")]
        if count is None:
            self.assertTrue(found, f"no {level.name} log line containing {fragment!r}; saw {seen}")
        else:
            self.assertEqual(len(found), count,
                             f"{level.name} lines containing {fragment!r}; saw {seen}")
        return found


# ------------------------------------------------------ responder (no TLS)


class ResponderHarness:
    """One responder protocol on a StringTransport, on a fake clock.  The
    test plays the TLS layer: it calls ``handshakeCompleted`` itself."""

    def __init__(self, sink: HeldSink, limits: Optional[ConnectionLimits] = None) -> None:
        self.clock = Clock()
        self.sink = sink
        self.stats = MMTPStats()
        self.limits = limits or ConnectionLimits()
        self.factory = MMTPResponderFactory(sink, self.clock, self.limits, self.stats)
        self.proto: MMTPResponderProtocol = self.factory.buildProtocol(PEER)
        self.transport = StringTransport(peerAddress=PEER)
        self.proto.makeConnection(self.transport)

    def negotiate(self) -> None:
        self.proto.handshakeCompleted()
        self.feed(VERSION_LINE)
        assert self.written() == VERSION_LINE

    def feed(self, data: bytes, chunk: int = 4096) -> None:
        """Deliver ``data`` in reads of ``chunk`` bytes; like the TLS layer,
        deliver nothing more once the protocol aborted."""
        for i in range(0, len(data), chunk):
            if self.aborted:
                return
            self.proto.dataReceived(data[i:i + chunk])

    def run_out(self, seconds: float) -> None:
        """Let ``seconds`` pass: a deadline due then must close the
        connection then, not a moment (0.1 s) earlier."""
        self.clock.advance(seconds - 0.1)
        assert not self.aborted, f"closed before {seconds}s"
        self.clock.advance(0.1)
        assert self.aborted, f"still open after {seconds}s"

    def trickle(self, frame: bytes, seconds: int) -> None:
        """Feed ``frame`` as a slowloris does, 100 bytes every 10 s for
        ``seconds``; the connection must stay open until the last step."""
        for second in range(0, seconds, 10):
            assert not self.aborted, f"closed early at {second}s"
            self.feed(frame[second * 10:second * 10 + 100])
            self.clock.advance(10)

    def written(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    @property
    def aborted(self) -> bool:
        """StringTransport marks abortConnection (not loseConnection) so."""
        return bool(self.transport.disconnected)

    def lost(self, reason: Exception) -> None:
        """What TCP reports once the connection is gone."""
        self.proto.connectionLost(Failure(reason))


class ResponderTests(LogMixin):
    def harness(self, sink: Optional[HeldSink] = None, **limits: Any) -> ResponderHarness:
        return ResponderHarness(sink if sink is not None else HeldSink(),
                                ConnectionLimits(**limits))

    # -- version negotiation (§6)

    def test_version_reply_is_our_choice(self) -> None:
        h = self.harness()
        h.proto.handshakeCompleted()
        h.feed(b"MMTP 0.9,0.3,0.1\r\n")
        self.assertEqual(h.written(), b"MMTP 0.3\r\n")
        self.assertEqual(h.proto.machine.version, "0.3")
        self.assertFalse(h.aborted)
        h.lost(ConnectionDone())
        [event] = self.expect_log("MMTP connection closed (version 0.3): 0 frames", LogLevel.debug)
        self.assertEqual(h.stats["ProtocolError"], 0)
        self.assertEqual(h.sink.held, [])

    def check_refused_line(self, line: bytes, code: str) -> None:
        h = self.harness()
        h.proto.handshakeCompleted()
        h.feed(line)
        self.assertEqual(h.written(), b"", "no reply may be sent (§6)")
        self.assertTrue(h.aborted)
        self.assertEqual(h.stats["ProtocolError"], 1)
        h.lost(ConnectionAborted())
        self.expect_log(f"MMTP peer broke the protocol ({code})", LogLevel.info, count=1)
        self.assertEqual(h.sink.held, [])

    def test_old_version_closed_without_reply(self) -> None:
        self.check_refused_line(b"MMTP 0.2\r\n", "no_common_version")

    def test_malformed_version_line(self) -> None:
        self.check_refused_line(b"HELO mmtp\r\n", "bad_version_line")

    def test_data_pipelined_before_the_reply(self) -> None:
        self.check_refused_line(VERSION_LINE + b"SEND\r\n", "pipelined_before_version")

    def test_version_line_too_long(self) -> None:
        self.check_refused_line(b"MMTP " + b"9" * 5000, "line_too_long")

    # -- data phase (§7.3, §11)

    def test_received_only_after_the_sink_fires(self) -> None:
        h = self.harness()
        h.negotiate()
        packet = make_packet(1)
        h.feed(send_frame(packet), chunk=1000)
        self.assertEqual([p for p, _ in h.sink.held], [packet])
        self.assertEqual(h.sink.peers, ["198.51.100.7"])
        self.assertEqual(h.written(), b"", "RECEIVED before durable storage (§11)")
        h.clock.advance(10)
        self.assertEqual(h.written(), b"")
        h.sink.store(0)
        self.assertEqual(h.written(), received_ack(packet))
        self.assertEqual(h.stats["ReceivedPacket"], 1)
        h.lost(ConnectionDone())
        self.expect_log("1 frames, 1 packets stored, 0 rejected", LogLevel.debug, count=1)
        self.assertEqual(h.sink.stored, [packet])

    def test_sink_failure_answers_rejected(self) -> None:
        h = self.harness()
        h.negotiate()
        packet = make_packet(2)
        h.feed(send_frame(packet))
        self.assertEqual(h.written(), b"")
        h.sink.fail(0)
        self.assertEqual(h.written(), rejected_ack(packet))
        self.assertFalse(h.aborted, "a refusal keeps the connection open (§11)")
        self.assertEqual((h.stats["RejectedPacket"], h.stats["ReceivedPacket"]), (1, 0))
        self.expect_log("Packet refused by storage; answering REJECTED: "
                        "[Errno 28] No space left on device", LogLevel.warn, count=1)
        self.assertEqual(h.sink.stored, [])

    def test_sink_that_fails_synchronously(self) -> None:
        h = self.harness(FailingSink())
        h.negotiate()
        packets = [make_packet(n) for n in range(3)]
        h.feed(b"".join(send_frame(p) for p in packets))
        self.assertEqual(h.written(), b"".join(rejected_ack(p) for p in packets))
        self.expect_log("answering REJECTED", LogLevel.warn, count=3)
        self.assertEqual(h.sink.stored, [])

    def test_out_of_order_storage_acks_in_order(self) -> None:
        h = self.harness()
        h.negotiate()
        packets = [make_packet(n) for n in range(4)]
        h.feed(b"".join(send_frame(p) for p in packets), chunk=7777)
        self.assertEqual(len(h.sink.held), 4)
        h.sink.store(2)
        h.sink.store(3)
        self.assertEqual(h.written(), b"", "ack 2 may not overtake ack 0")
        h.sink.store(0)
        self.assertEqual(h.written(), received_ack(packets[0]))
        h.sink.fail(1)
        self.assertEqual(h.written(), rejected_ack(packets[1]) + received_ack(packets[2])
                         + received_ack(packets[3]))
        h.lost(ConnectionDone())
        self.expect_log("4 frames, 3 packets stored, 1 rejected", LogLevel.debug, count=1)
        self.assertEqual(sorted(h.sink.stored), sorted([packets[0], packets[2], packets[3]]))

    def test_junk_is_acknowledged_and_discarded(self) -> None:
        h = self.harness()
        h.negotiate()
        junk = make_packet(99)
        h.feed(junk_frame(junk))
        self.assertEqual(h.written(), junk_ack(junk))
        self.assertEqual(h.sink.held, [], "junk never reaches the store")
        h.lost(ConnectionDone())
        self.expect_log("1 frames, 0 packets stored", LogLevel.debug, count=1)

    def test_wrong_digest_closes_without_ack(self) -> None:
        h = self.harness()
        h.negotiate()
        frame = bytearray(send_frame(make_packet(3)))
        frame[-1] ^= 1
        h.feed(bytes(frame))
        self.assertTrue(h.aborted)
        self.assertEqual(h.written(), b"")
        self.assertEqual(h.sink.held, [], "a bad frame is never handed to storage")
        h.lost(ConnectionAborted())
        self.expect_log("MMTP peer broke the protocol (bad_digest)", LogLevel.info, count=1)

    def test_unknown_command_closes_at_once(self) -> None:
        h = self.harness()
        h.negotiate()
        h.feed(b"SENT\r\n")
        self.assertTrue(h.aborted)
        h.lost(ConnectionAborted())
        self.expect_log("(unknown_command)", LogLevel.info, count=1)
        self.assertEqual(h.sink.held, [])

    def test_peer_closing_mid_frame_is_logged_and_nothing_stored(self) -> None:
        h = self.harness()
        h.negotiate()
        h.feed(send_frame(make_packet(4))[:20000])
        h.lost(ConnectionDone())
        self.expect_log("MMTP peer broke the protocol (truncated_frame)", LogLevel.info, count=1)
        self.assertEqual(h.stats["ProtocolError"], 1)
        self.assertEqual(h.sink.held, [])

    # -- timeouts (§14.2), all on the fake clock

    def test_handshake_timeout(self) -> None:
        """With the real TLS wrapper in front, on a silent TCP peer."""
        clock = Clock()
        clock.advance(NOW)
        stats = MMTPStats()
        tls = ResponderTLS(key("responder"), "Lisbon", clock=clock)
        factory = responder_factory(HeldSink(), tls, clock,
                                    ConnectionLimits(handshake_timeout=20), None, stats)
        proto = factory.buildProtocol(PEER)
        transport = StringTransport(peerAddress=PEER)
        proto.makeConnection(transport)
        clock.advance(19.999)
        self.assertFalse(transport.disconnected)
        clock.advance(0.001)
        self.assertTrue(transport.disconnected)
        self.assertEqual(stats["TimedOut"], 1)
        proto.connectionLost(Failure(ConnectionAborted()))
        self.expect_log("MMTP connection closed: TLS handshake timed out", LogLevel.info, count=1)
        self.assertEqual(factory.counter.total, 0, "the slot is given back")

    def test_line_timeout(self) -> None:
        h = self.harness(line_timeout=30, idle_timeout=300)
        h.proto.handshakeCompleted()
        h.feed(b"MMTP 0.")
        h.clock.advance(29.9)
        self.assertFalse(h.aborted)
        h.feed(b"3")  # progress does not extend the line deadline
        h.clock.advance(0.1)
        self.assertTrue(h.aborted)
        self.assertEqual(h.written(), b"")
        h.lost(ConnectionAborted())
        self.expect_log("MMTP connection closed: protocol line timed out", LogLevel.info, count=1)

    def test_slowloris_partial_frame_timeout(self) -> None:
        """A trickle keeps the idle timer alive but not the frame deadline."""
        h = self.harness(frame_timeout=60, idle_timeout=15)
        h.negotiate()
        h.trickle(send_frame(make_packet(5)), 60)
        self.assertTrue(h.aborted)
        self.assertEqual(h.clock.seconds(), 60)
        h.lost(ConnectionAborted())
        self.expect_log("MMTP connection closed: partial frame timed out", LogLevel.info, count=1)
        self.assertEqual(h.sink.held, [])

    def test_frame_deadline_restarts_for_each_frame(self) -> None:
        """A long pipelined batch whose reads never end on a frame boundary
        is progress, not a slowloris: each frame gets its own deadline."""
        h = self.harness(MemorySink(), frame_timeout=60, idle_timeout=300)
        h.negotiate()
        packets = [make_packet(n) for n in range(3)]
        stream = b"".join(send_frame(p) for p in packets)
        half = len(stream) // 6  # half a frame
        h.feed(stream[:3 * half])  # t=0: 1.5 frames
        h.clock.advance(40)
        h.feed(stream[3 * half:5 * half])  # t=40: frame 2 done, half of 3
        h.clock.advance(40)  # t=80: past the first partial's 60 s
        self.assertFalse(h.aborted, "a connection making progress was cut off")
        h.feed(stream[5 * half:])
        self.assertEqual(h.written(), b"".join(received_ack(p) for p in packets))
        h.feed(send_frame(make_packet(9))[:10])
        h.run_out(60)
        h.lost(ConnectionAborted())
        self.expect_log("partial frame timed out", LogLevel.info, count=1)
        self.assertEqual(h.sink.stored, packets)

    def test_idle_timeout(self) -> None:
        h = self.harness(MemorySink(), idle_timeout=300)
        h.negotiate()
        h.feed(send_frame(make_packet(6)))
        self.assertEqual(len(h.written()), 30)
        h.run_out(300)
        self.assertEqual(h.stats["TimedOut"], 1)
        h.lost(ConnectionAborted())
        self.expect_log("MMTP connection closed: idle connection timed out", LogLevel.info,
                        count=1)
        self.assertEqual(h.sink.stored, [make_packet(6)])

    # -- back-pressure

    def test_backpressure_pauses_and_resumes_reading(self) -> None:
        h = self.harness(max_unacknowledged=3)
        h.negotiate()
        packets = [make_packet(n) for n in range(4)]
        h.feed(b"".join(send_frame(p) for p in packets[:2]))
        self.assertEqual(h.transport.producerState, "producing")
        h.feed(send_frame(packets[2]))
        self.assertEqual(h.transport.producerState, "paused")
        h.sink.store(1)  # ack 1 is still behind ack 0
        self.assertEqual(h.transport.producerState, "paused")
        h.sink.store(0)
        self.assertEqual(h.transport.producerState, "producing")
        self.assertEqual(h.written(), received_ack(packets[0]) + received_ack(packets[1]))
        h.feed(send_frame(packets[3]))
        h.sink.store_all()
        self.assertEqual(h.written(), received_ack(packets[2]) + received_ack(packets[3]))
        h.lost(ConnectionDone())
        self.expect_log("4 frames, 4 packets stored", LogLevel.debug, count=1)
        self.assertEqual(h.sink.stored, [packets[1], packets[0], packets[2], packets[3]])

    def test_paused_peer_is_not_a_slowloris(self) -> None:
        """While we do not read, the peer cannot finish its frame: the frame
        deadline waits for us, then restarts in full."""
        h = self.harness(max_unacknowledged=1, frame_timeout=60, idle_timeout=1000)
        h.negotiate()
        first, second = make_packet(7), make_packet(8)
        h.feed(send_frame(first) + send_frame(second)[:500])
        self.assertEqual(h.transport.producerState, "paused")
        h.clock.advance(120)  # the disk is slow
        self.assertFalse(h.aborted, "the peer was blamed for our slow disk")
        h.sink.store(0)
        self.assertEqual(h.transport.producerState, "producing")
        h.run_out(60)
        h.lost(ConnectionAborted())
        self.expect_log("partial frame timed out", LogLevel.info, count=1)
        self.assertEqual(h.sink.stored, [first])


# ------------------------------------------- initiator over in-memory TLS


class Network:
    """An MMTPClient whose connections go, through in-memory TLS, to one
    responder factory; both sides share one fake clock."""

    def __init__(self, sink: HeldSink, settings: Optional[InitiatorSettings] = None,
                 limits: Optional[ConnectionLimits] = None, expect: str = "responder") -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.sink = sink
        self.server_stats = MMTPStats()
        self.responder_tls = ResponderTLS(key("responder"), "Lisbon", clock=self.clock)
        self.server = responder_factory(sink, self.responder_tls, self.clock, limits, None,
                                        self.server_stats)
        self.client = MMTPClient(self.clock, InitiatorTLS(), settings or InitiatorSettings(),
                                 MMTPStats())
        self.client.connect = self.connect  # type: ignore[method-assign]
        self.destination = NextHop("192.0.2.1", 48099, key(expect).public.keyid)
        self.links: list[tuple[Any, Any, IOPump]] = []
        self.initiators: list[Any] = []  # MMTPInitiatorProtocol, one per link

    def connect(self, destination: NextHop, factory: Any) -> defer.Deferred[Any]:
        client_tls = TLSMemoryBIOFactory(self.client.tls, True, factory, clock=self.clock)
        addr = IPv4Address("TCP", "203.0.113.5", 50000 + len(self.links))
        client, server, pump = connectedServerAndClient(
            lambda: self.server.buildProtocol(addr), lambda: client_tls.buildProtocol(None),
            greet=False, clock=self.clock)
        self.links.append((client, server, pump))
        self.initiators.append(client.wrappedProtocol)
        return defer.succeed(client.wrappedProtocol)

    def send(self, packets: list[bytes]) -> Outcomes:
        return Outcomes([self.client.send_packet(self.destination, p) for p in packets])

    def flush(self, probe: Optional[Callable[[], None]] = None) -> None:
        """Move bytes on every link until all are quiet; ``probe`` runs
        after each step."""
        moved = True
        while moved:
            moved = False
            for _, _, pump in list(self.links):
                if pump.pump():
                    moved = True
                    if probe is not None:
                        probe()


class ScriptedPeer:
    """An MMTPClient whose one connection is a StringTransport: the test
    plays the TLS layer and the next hop, calling the protocol itself."""

    def __init__(self, tls: Any, settings: InitiatorSettings) -> None:
        self.clock = Clock()
        self.client = MMTPClient(self.clock, tls, settings)
        self.client.connect = self.connect  # type: ignore[method-assign]
        self.destination = NextHop("192.0.2.9", 1, bytes(20))
        self.transport = StringTransport()
        self.proto: Any = None  # MMTPInitiatorProtocol, once connected

    def connect(self, destination: NextHop, factory: Any) -> defer.Deferred[Any]:
        assert self.proto is None, "one connection only"
        self.proto = factory.buildProtocol(None)
        self.proto.makeConnection(self.transport)
        return defer.succeed(self.proto)

    def send(self, packets: list[bytes]) -> Outcomes:
        return Outcomes([self.client.send_packet(self.destination, p) for p in packets])


class Outcomes:
    """Records, once, how each packet's Deferred ended: None for RECEIVED,
    the exception for a failure, "?" while it has not fired."""

    def __init__(self, deferreds: list[defer.Deferred[Any]]) -> None:
        self.results: list[Any] = ["?"] * len(deferreds)
        for i, d in enumerate(deferreds):
            d.addCallbacks(self._ok, self._failed, callbackArgs=(i,), errbackArgs=(i,))

    def _ok(self, _: Any, i: int) -> None:
        self.results[i] = None

    def _failed(self, failure: Failure, i: int) -> None:
        self.results[i] = failure.value

    def types(self) -> list[Any]:
        return [r if r is None or r == "?" else type(r) for r in self.results]


class InitiatorTests(LogMixin):
    def test_delivers_over_tls(self) -> None:
        net = Network(MemorySink())
        packets = [make_packet(n) for n in range(10)]
        ds = net.send(packets)
        net.flush()
        self.assertEqual(ds.results, [None] * 10)
        self.assertEqual(net.sink.stored, packets)
        self.assertEqual(net.client.stats["SuccessfulRelay"], 10)
        self.assertEqual(net.client.stats["SuccessfulConnect"], 1)
        self.expect_log("MMTP connection to a next hop closed after 10 acknowledgements",
                        LogLevel.debug, count=1)
        self.expect_log("10 frames, 10 packets stored", LogLevel.debug, count=1)

    def test_key_id_mismatch(self) -> None:
        net = Network(MemorySink(), expect="someone else")
        ds = net.send([make_packet(n) for n in range(3)])
        net.flush()
        self.assertEqual(ds.types(), [PeerAuthenticationFailed] * 3)
        self.assertEqual(net.client.stats["KeyIdMismatch"], 1)
        self.assertEqual(net.client.stats["SuccessfulConnect"], 0)
        self.assertEqual(net.client.stats["FailedRelay"], 3)
        self.assertEqual(net.sink.held, [], "nothing may be sent to the wrong node")
        self.expect_log("Next hop's identity key does not match its routing info",
                        LogLevel.warn, count=1)
        self.expect_log("lost with 3 packets unacknowledged", LogLevel.info, count=1)
        [closed] = self.expect_log("MMTP connection closed (version None)", LogLevel.debug)
        self.assertEqual(closed["frames"], 0)

    def test_rejected_packets_fail_with_packet_rejected(self) -> None:
        net = Network(FailingSink())
        ds = net.send([make_packet(n) for n in range(3)])
        net.flush()
        self.assertEqual(ds.types(), [PacketRejected] * 3)
        self.assertEqual(net.client.stats["FailedRelay"], 3)
        self.assertEqual(net.server_stats["RejectedPacket"], 3)
        self.assertEqual(net.sink.stored, [])
        self.expect_log("answering REJECTED", LogLevel.warn, count=3)
        self.expect_log("closed after 3 acknowledgements", LogLevel.debug, count=1)

    def test_connection_lost_mid_batch_fails_the_rest(self) -> None:
        net = Network(HeldSink())
        packets = [make_packet(n) for n in range(10)]
        ds = net.send(packets)
        net.flush()
        self.assertEqual(len(net.sink.held), 6)
        net.sink.store(0)
        net.sink.store(1)
        net.flush()
        self.assertEqual(ds.results[:3], [None, None, "?"])
        self.assertEqual(len(net.sink.held), 8)
        _, server, _ = net.links[0]
        server.transport.abortConnection()  # the TCP connection dies
        net.flush()
        self.assertEqual(ds.types(), [None] * 2 + [ConnectionFailed] * 8)
        # after MMTP began: not a link-level failure the pinger records
        self.assertIsNone(link_failure(Failure(ds.results[2])))
        self.expect_log("lost with 8 packets unacknowledged", LogLevel.info, count=1)
        net.sink.store_all()  # storage finishing late acknowledges nothing
        net.flush()
        self.assertEqual(net.client.stats["SuccessfulRelay"], 2)
        self.assertEqual(net.sink.stored[:2], packets[:2])

    def test_max_packets_per_connection(self) -> None:
        net = Network(MemorySink(), InitiatorSettings(max_packets_per_connection=3))
        packets = [make_packet(n) for n in range(7)]
        ds = net.send(packets)
        net.flush()
        self.assertEqual(ds.results, [None] * 7)
        self.assertEqual(len(net.links), 3)
        self.assertEqual([p.queued for p in net.initiators], [3, 3, 1])
        self.assertEqual(sorted(net.sink.stored), sorted(packets))
        closes = self.expect_log("MMTP connection to a next hop closed after", LogLevel.debug,
                                 count=3)
        self.assertEqual(sorted(e["acked"] for e in closes), [1, 3, 3])

    def test_writeahead_never_exceeds_six(self) -> None:
        net = Network(HeldSink())
        packets = [make_packet(n) for n in range(20)]
        ds = net.send(packets)
        in_flight: list[int] = []

        def probe() -> None:
            for proto in net.initiators:
                in_flight.append(proto.machine.pending)

        net.flush(probe)
        self.assertEqual(net.sink.waiting, 6)
        for i in range(20):
            net.sink.store(i)
            net.flush(probe)
            self.assertEqual(net.sink.waiting, min(6, 19 - i))
        self.assertEqual(max(in_flight), 6)
        self.assertEqual(ds.results, [None] * 20)
        self.assertEqual(net.sink.stored, packets)
        self.expect_log("closed after 20 acknowledgements", LogLevel.debug, count=1)

    def test_close_aborts_every_connection(self) -> None:
        """Shutting down fails every packet in flight, including those of a
        full connection that a newer one replaced as the destination's."""
        net = Network(HeldSink(), InitiatorSettings(max_packets_per_connection=2))
        ds = net.send([make_packet(n) for n in range(4)])
        net.flush()
        self.assertEqual((len(net.links), net.sink.waiting), (2, 4))
        net.client.close()
        net.flush()
        self.assertEqual(ds.types(), [ConnectionFailed] * 4)
        self.expect_log("lost with 2 packets unacknowledged: client shutting down",
                        LogLevel.info, count=2)

    def test_close_notify_has_a_deadline(self) -> None:
        """A next hop that never answers our close_notify would keep the
        connection (and the destination's slot) forever."""
        net = Network(MemorySink(), InitiatorSettings(close_timeout=30))
        ds = net.send([make_packet(1)])
        _, _, pump = net.links[0]
        while ds.results == ["?"]:  # stop pumping once the ack arrived
            self.assertTrue(pump.pump())
        proto = net.initiators[0]
        self.assertIs(proto.phase, Phase.CLOSING)
        client_io = pump.clientIO
        client_io.getOutBuffer()  # the close_notify is lost in the network
        net.clock.advance(29.9)
        self.assertFalse(client_io.disconnecting)
        net.clock.advance(0.1)
        self.assertTrue(client_io.disconnecting)
        net.flush()
        self.expect_log("Next hop did not finish closing the MMTP connection; aborting it",
                        LogLevel.info, count=1)
        self.expect_log("closed after 1 acknowledgements", LogLevel.debug, count=1)
        self.assertEqual(ds.results, [None])
        self.assertEqual(net.sink.stored, [make_packet(1)])

    def test_handshake_timeout(self) -> None:
        peer = ScriptedPeer(InitiatorTLS(), InitiatorSettings(handshake_timeout=10))
        ds = peer.send([make_packet(1)])
        peer.clock.advance(9.9)
        self.assertFalse(peer.transport.disconnected)
        peer.clock.advance(0.1)
        self.assertTrue(peer.transport.disconnected)
        self.assertIs(peer.proto.phase, Phase.ABORTING)
        peer.proto.connectionLost(Failure(ConnectionAborted()))
        self.assertIs(peer.proto.phase, Phase.CLOSED)
        [error] = ds.results
        self.assertIs(type(error), HandshakeFailed)
        self.assertEqual(link_failure(Failure(error)), LINK_TLS)
        self.assertEqual(str(error), "TLS handshake timed out")
        self.expect_log("lost with 1 packets unacknowledged: TLS handshake timed out",
                        LogLevel.info, count=1)


    def test_phases_of_a_connection(self) -> None:
        """A connection's life, as :class:`Phase` names it, from the TCP
        connection to its loss."""
        peer = ScriptedPeer(TrustingTLS(), InitiatorSettings())
        packet = make_packet(1)
        ds = peer.send([packet])
        phases = [peer.proto.phase]
        for step in (peer.proto.handshakeCompleted,
                     lambda: peer.proto.dataReceived(VERSION_LINE),
                     lambda: peer.proto.dataReceived(received_ack(packet)),
                     lambda: peer.proto.connectionLost(Failure(ConnectionDone()))):
            step()
            phases.append(peer.proto.phase)
        self.assertEqual(phases, [Phase.HANDSHAKING, Phase.NEGOTIATING, Phase.OPEN,
                                  Phase.CLOSING, Phase.CLOSED])
        self.assertEqual(peer.transport.value(), VERSION_LINE + send_frame(packet))
        self.assertEqual(ds.results, [None])
        self.assertEqual(peer.client.connections, 0)

    def test_junk_is_acknowledged_end_to_end(self) -> None:
        net = Network(MemorySink())
        ds = Outcomes([net.client.send_junk(net.destination) for _ in range(2)])
        net.flush()
        self.assertEqual(ds.results, [None, None])
        self.assertEqual(net.sink.held, [], "junk is never stored")
        self.assertEqual(net.client.stats["SuccessfulRelay"], 0, "junk is not relay traffic")
        self.expect_log("2 frames, 0 packets stored", LogLevel.debug, count=1)

    def scripted_peer(self, replies: list[bytes], code: str) -> None:
        """The initiator against a responder that says ``replies`` (one read
        each) after our version line: it must fail every packet and close."""
        peer = ScriptedPeer(TrustingTLS(), InitiatorSettings())
        ds = peer.send([make_packet(n) for n in range(3)])
        peer.proto.handshakeCompleted()
        self.assertEqual(peer.transport.value(), VERSION_LINE)
        peer.transport.clear()
        for reply in replies:
            peer.proto.dataReceived(reply)
        self.assertTrue(peer.transport.disconnected)
        peer.proto.connectionLost(Failure(ConnectionAborted()))
        self.assertEqual(ds.types(), [ConnectionFailed] * 3)
        self.assertEqual(str(ds.results[0]), f"protocol error: {code}")
        self.expect_log(f"Next hop broke the MMTP protocol ({code})", LogLevel.info, count=1)
        self.expect_log("lost with 3 packets unacknowledged", LogLevel.info, count=1)

    def test_wrong_version_reply(self) -> None:
        self.scripted_peer([b"MMTP 0.2\r\n"], "bad_version_reply")

    def test_bad_acknowledgement(self) -> None:
        packet = make_packet(0)
        bad = b"RECEIVED\r\n" + sha1(packet + b"REJECTED")  # neither of the two acks
        self.scripted_peer([VERSION_LINE, bad], "bad_ack")

    def test_reply_pipelined_after_the_version_line(self) -> None:
        """No acknowledgement can be due before our frames were sent (§6.4)."""
        self.scripted_peer([VERSION_LINE + b"RECEIVED\r\n"], "data_before_version")


class TrustingTLS:
    """Stands in for InitiatorTLS where no TLS runs: the peer is taken to
    have proved the expected identity."""

    def authenticate(self, transport: Any, keyid: bytes, now: float) -> bytes:
        return keyid


# ---------------------------------------------------------------- limits


class LimitsTests(LogMixin):
    """Allow/Deny and connection counts, as pure functions and as enforced
    by GuardedTLSFactory when TCP accepts (before any TLS work)."""

    def guarded(self, rules: NetworkRules, **limits: Any) -> GuardedTLSFactory:
        clock = Clock()
        clock.advance(NOW)
        tls = ResponderTLS(key("responder"), "Lisbon", clock=clock)
        return responder_factory(MemorySink(), tls, clock, ConnectionLimits(**limits), rules,
                                 MMTPStats())

    def assert_denied_at_accept(self, rules: NetworkRules, host: str) -> None:
        factory = self.guarded(rules)
        cls = IPv6Address if ":" in host else IPv4Address
        self.assertIsNone(factory.buildProtocol(cls("TCP", host, 1234)))
        self.assertEqual(factory.stats["DeniedConnection"], 1)
        self.assertEqual(factory.counter.total, 0)
        self.expect_log("MMTP connection refused by address rules", LogLevel.info, count=1)

    @staticmethod
    def rules(*lines: str, default_allow: bool = True) -> NetworkRules:
        return NetworkRules([NetworkRule.parse(*line.split(" ", 1)) for line in lines],
                            default_allow)

    def test_parse(self) -> None:
        self.assertEqual(NetworkRule.parse("Allow", " * "), NetworkRule(True, None))
        self.assertEqual(NetworkRule.parse("DENY", "10.1.2.3/8").network.exploded,
                         "10.0.0.0/8")
        self.assertEqual(str(NetworkRule.parse("deny", "2001:db8::1").network),
                         "2001:db8::1/128")
        for verb, text in (("permit", "*"), ("deny", "10.0.0.0/33"), ("allow", "host.example")):
            self.assertRaises(ValueError, NetworkRule.parse, verb, text)
        self.assert_denied_at_accept(self.rules("deny 192.0.2.0/24"), "192.0.2.200")

    def test_ipv4_cidr(self) -> None:
        rules = self.rules("deny 192.0.2.0/25")
        self.assertEqual([rules.allows(h) for h in ("192.0.2.0", "192.0.2.127", "192.0.2.128",
                                                    "192.0.3.1")],
                         [False, False, True, True])
        self.assert_denied_at_accept(rules, "192.0.2.5")

    def test_ipv6_cidr(self) -> None:
        rules = self.rules("deny 2001:db8:1::/48")
        self.assertFalse(rules.allows("2001:db8:1:ffff::1"))
        self.assertFalse(rules.allows("2001:db8:1::1%eth0"))  # zone ids are ignored
        self.assertTrue(rules.allows("2001:db8:2::1"))
        self.assertTrue(rules.allows("192.0.2.1"), "an IPv6 rule never matches IPv4")
        self.assert_denied_at_accept(rules, "2001:db8:1::9")

    def test_first_match_wins_and_star(self) -> None:
        rules = self.rules("allow 10.1.0.0/16", "deny 10.0.0.0/8", "allow *",
                           default_allow=False)
        self.assertTrue(rules.allows("10.1.200.1"))
        self.assertFalse(rules.allows("10.2.0.1"))
        self.assertTrue(rules.allows("172.16.0.1"))
        self.assertTrue(rules.allows("::1"), "* covers IPv6 too")
        closed = self.rules("allow 127.0.0.1", "deny *")
        self.assertTrue(closed.allows("127.0.0.1"))
        self.assertFalse(closed.allows("127.0.0.2"))
        self.assertFalse(closed.allows("not an address"), "unparsable + rules: refuse")
        self.assertTrue(NetworkRules().allows("not an address"))
        self.assertFalse(self.rules("allow 10.0.0.0/8", default_allow=False).allows("11.0.0.1"))
        self.assert_denied_at_accept(closed, "127.0.0.2")

    def test_ipv4_mapped_ipv6(self) -> None:
        """A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d; both
        spellings must be caught by a rule in either spelling."""
        self.assertEqual(str(normalize_address("::ffff:192.0.2.1")), "192.0.2.1")
        v4_rule = self.rules("deny 192.0.2.0/24")
        self.assertFalse(v4_rule.allows("::ffff:192.0.2.1"))
        self.assertTrue(v4_rule.allows("::ffff:192.0.3.1"))
        mapped_rule = self.rules("deny ::ffff:192.0.2.0/120")
        self.assertFalse(mapped_rule.allows("192.0.2.77"), "a Deny in mapped form was ignored")
        self.assertFalse(mapped_rule.allows("::ffff:192.0.2.77"))
        self.assertTrue(mapped_rule.allows("192.0.3.1"))
        self.assertFalse(self.rules("deny ::ffff:198.51.100.7").allows("198.51.100.7"))
        self.assert_denied_at_accept(mapped_rule, "::ffff:192.0.2.9")

    def test_connection_counter(self) -> None:
        counter = ConnectionCounter(ConnectionLimits(max_connections=3, max_per_source=2))
        self.assertIsNone(counter.refusal("192.0.2.1"))
        counter.opened("192.0.2.1")
        counter.opened("::ffff:192.0.2.1")  # the same source
        self.assertEqual(counter.refusal("192.0.2.1"), "too many connections from one address")
        self.assertIsNone(counter.refusal("192.0.2.2"))
        counter.opened("192.0.2.2")
        self.assertEqual(counter.refusal("192.0.2.3"), "too many connections")
        counter.closed("192.0.2.1")
        self.assertIsNone(counter.refusal("192.0.2.1"))
        counter.closed("192.0.2.1")
        counter.closed("192.0.2.1")  # one too many: never negative
        self.assertEqual((counter.total, counter.per_source), (1, {"192.0.2.2": 1}))
        counter.closed("192.0.2.2")
        self.assertEqual((counter.total, counter.per_source), (0, {}))

        # Through the factory: the slot is taken at accept and given back
        # when the connection is lost.
        factory = self.guarded(NetworkRules(), max_connections=3, max_per_source=2)
        addr = IPv4Address("TCP", "192.0.2.1", 1)
        protos = []
        for _ in range(2):
            protos.append(factory.buildProtocol(addr))
            protos[-1].makeConnection(StringTransport(peerAddress=addr))
        self.assertIsNone(factory.buildProtocol(addr))
        self.expect_log("MMTP connection refused: too many connections from one address",
                        LogLevel.info, count=1)
        protos[0].connectionLost(Failure(ConnectionDone()))
        self.assertEqual(factory.counter.per_source, {"192.0.2.1": 1})
        self.assertIsNotNone(factory.buildProtocol(addr))
        self.assertEqual(factory.stats["RefusedConnection"], 1)
        self.expect_log("MMTP connection closed during the TLS handshake", LogLevel.info,
                        count=1)
