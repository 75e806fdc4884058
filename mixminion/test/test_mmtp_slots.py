"""Inbound connection slots under attack (issue 12 point 2), in memory.

A full table makes room by closing the connection that has made the least
progress; per-address and per-network caps bound what one peer can take
(a loopback address is a network of its own); a peer that negotiates and
then says nothing is closed at the first-frame deadline; JUNK frames do
not keep a connection open past the idle limit.

Everything runs on a ``task.Clock``: the guarded TLS factory on
``StringTransport``s (the test plays the TLS layer by calling the MMTP
protocol's ``peerSpoke``/``handshakeCompleted`` itself), the responder
alone through the harness of ``test_mmtp_protocol``, and one honest
initiator over in-memory TLS (``iosim``) against a table of idle sockets.
"""

from __future__ import annotations

import socket
from typing import Any, Optional

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionAborted
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from mixminion.mmtp.limits import (
    ConnectionCounter,
    ConnectionLimits,
    Progress,
    Stage,
    eviction_order,
    network_key,
)
from mixminion.mmtp.responder import responder_factory
from mixminion.mmtp.stats import MMTPStats
from mixminion.mmtp.tls import ResponderTLS
from mixminion.test import test_mmtp_protocol as base
from mixminion.testing.keys import key

NOW = base.NOW
VERSION_LINE = base.VERSION_LINE


class Conn:
    """One accepted connection: the TLS protocol the factory built, on a
    StringTransport, and the MMTP protocol inside it."""

    def __init__(self, tls: Any, transport: StringTransport) -> None:
        self.tls = tls
        self.transport = transport
        self.mmtp = tls.wrappedProtocol

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnected)

    def spoke(self) -> "Conn":
        self.mmtp.peerSpoke()
        return self

    def handshaken(self) -> "Conn":
        self.spoke().mmtp.handshakeCompleted()
        return self

    def ready(self) -> "Conn":
        self.handshaken().mmtp.dataReceived(VERSION_LINE)
        assert self.mmtp.stage is Stage.READY
        return self

    def deliver(self, n: int) -> "Conn":
        self.mmtp.dataReceived(base.send_frame(base.make_packet(n)))
        assert self.mmtp.stage is Stage.DELIVERING
        return self

    def lost(self) -> None:
        """What TCP reports once the socket is gone."""
        self.tls.connectionLost(Failure(ConnectionAborted()))


class SocketTransport(StringTransport):
    """A StringTransport whose ``getHandle`` is a real socket."""

    def __init__(self, handle: socket.socket) -> None:
        super().__init__()
        handle.setblocking(False)
        self.handle = handle

    def getHandle(self) -> socket.socket:  # noqa: N802
        return self.handle


class Table:
    """The guarded factory a node listens with, on a fake clock."""

    def __init__(self, sink: Optional[base.HeldSink] = None, **limits: Any) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.stats = MMTPStats()
        self.sink = sink if sink is not None else base.MemorySink()
        tls = ResponderTLS(key("responder"), "Lisbon", clock=self.clock)
        self.factory = responder_factory(self.sink, tls, self.clock, ConnectionLimits(**limits),
                                         None, self.stats)
        self._port = 1000

    def connect(self, host: str) -> Optional[Conn]:
        self._port += 1
        cls = IPv6Address if ":" in host else IPv4Address
        addr = cls("TCP", host, self._port)
        tls = self.factory.buildProtocol(addr)
        if tls is None:
            return None
        transport = StringTransport(peerAddress=addr)
        tls.makeConnection(transport)
        return Conn(tls, transport)

    def must_connect(self, host: str) -> Conn:
        conn = self.connect(host)
        assert conn is not None, f"{host} was refused"
        return conn

    def later(self, seconds: float = 1.0) -> None:
        self.clock.advance(seconds)

    @property
    def counted(self) -> int:
        return self.factory.counter.total


class EvictionTests(base.LogMixin):
    def test_eviction_order(self) -> None:
        """Busy last; then by stage; then the most crowded network's; then
        the one idle longest."""
        ranked = sorted([
            (Progress(True, Stage.ACCEPTED, 0.0), 1),
            (Progress(False, Stage.DELIVERING, 0.0), 1),
            (Progress(False, Stage.READY, 5.0), 1),
            (Progress(False, Stage.ACCEPTED, 9.0), 1),
            (Progress(False, Stage.ACCEPTED, 1.0), 1),
            (Progress(False, Stage.ACCEPTED, 9.5), 4),
            (Progress(False, Stage.HANDSHAKING, 0.0), 1),
        ], key=lambda pc: eviction_order(*pc))
        self.assertEqual([(p.busy, p.stage.name, p.since, crowd) for p, crowd in ranked], [
            (False, "ACCEPTED", 9.5, 4), (False, "ACCEPTED", 1.0, 1), (False, "ACCEPTED", 9.0, 1),
            (False, "HANDSHAKING", 0.0, 1), (False, "READY", 5.0, 1),
            (False, "DELIVERING", 0.0, 1), (True, "ACCEPTED", 0.0, 1)])

    def test_full_table_closes_the_least_progress_first(self) -> None:
        t = Table(max_connections=6)  # one network each: the crowd plays no part
        delivering_old = t.must_connect("192.0.1.1").ready().deliver(1)
        t.later()
        delivering_new = t.must_connect("192.0.2.1").ready().deliver(2)
        t.later()
        # Having spoken, whatever the stage, ranks by when it progressed.
        ready = t.must_connect("192.0.3.1").ready()
        t.later()
        handshaken = t.must_connect("192.0.4.1").handshaken()
        t.later()
        spoke = t.must_connect("192.0.5.1").spoke()
        t.later()
        ready.mmtp.dataReceived(base.junk_frame(base.make_packet(3)))  # JUNK is no progress
        idle = t.must_connect("192.0.6.1")  # the newest, but silent
        order = [idle, ready, handshaken, spoke, delivering_old, delivering_new]
        self.assertEqual(t.counted, 6)

        newcomers = []
        for victim in order:
            t.later()
            newcomer = t.must_connect(f"198.51.{len(newcomers)}.7")  # never refused
            self.assertTrue(victim.closed, f"expected {victim.mmtp.stage.name} to go")
            self.assertEqual([c for c in order if c.closed], order[:order.index(victim) + 1])
            self.assertEqual(t.counted, 6, "the victim's slot goes to the newcomer at once")
            # Each newcomer makes progress at once, as an honest peer does.
            newcomers.append(newcomer.ready().deliver(10 + len(newcomers)))
        self.assertEqual(t.stats["EvictedConnection"], 6)
        self.assertEqual(t.stats["RefusedConnection"], 0)
        self.assertFalse(any(c.closed for c in newcomers))
        self.assertEqual(t.factory.counter.per_source, {f"198.51.{n}.7": 1 for n in range(6)})

        # TCP then reports the victims lost: nothing is counted twice.
        for victim in order:
            victim.lost()
        self.assertEqual(t.counted, 6)
        newcomers[0].lost()
        self.assertEqual(t.counted, 5)
        self.assertIsNotNone(t.connect("203.0.113.1"))
        self.assertEqual(t.stats["EvictedConnection"], 6)

        # One WARN line for the burst, not one per eviction; the count
        # since then is in the next line, at most a minute later.
        self.expect_log("MMTP connection table full (6 connections): made room for newcomers "
                        "by closing the connection with the least progress, 1 times",
                        LogLevel.warn, count=1)
        self.expect_log("MMTP connection closed to make room: accepted", LogLevel.debug,
                        count=1)
        t.later(60)
        t.must_connect("203.0.113.2")
        self.expect_log("least progress, 6 times since the last report", LogLevel.warn, count=1)
        self.assertEqual(t.sink.stored, [base.make_packet(n) for n in (1, 2)]
                         + [base.make_packet(10 + n) for n in range(6)])

    def test_the_most_crowded_network_gives_way_first(self) -> None:
        """Among connections equally advanced, the network holding the most
        slots loses one, even a younger one: a peer holding a single slot
        keeps it while the crowd churns."""
        t = Table(max_connections=6, max_per_source=8, max_per_network=8)
        lone = t.must_connect("203.0.113.9")  # oldest, has not spoken yet
        crowd = []
        for n in range(5):
            t.later()
            crowd.append(t.must_connect(f"192.0.2.{n + 1}"))
        for n in range(20):  # the crowd reconnects as fast as it is closed
            t.later()
            self.assertIsNotNone(t.connect(f"192.0.2.{n % 5 + 1}"))
            self.assertFalse(lone.closed, f"the lone peer lost its slot to newcomer {n}")
        self.assertTrue(all(c.closed for c in crowd))
        self.assertEqual(t.stats["EvictedConnection"], 20)
        # Two networks of one connection each: the older goes.
        t = Table(max_connections=2)
        old = t.must_connect("192.0.2.1")
        t.later()
        young = t.must_connect("198.51.100.1")
        t.later()
        t.must_connect("203.0.113.1")
        self.assertEqual((old.closed, young.closed), (True, False))

    def test_parked_handshakes_do_not_outrank_a_newcomer(self) -> None:
        """Attackers that finish TLS and the protocol line, then park,
        reconnecting when closed: an honest newcomer still in its handshake
        is not pushed out by their reconnections."""
        t = Table(max_connections=4)
        parked = []
        for n in range(4):
            parked.append(t.must_connect(f"192.0.{n}.1").ready())
            t.later()
        honest = t.must_connect("203.0.113.9").spoke()
        for n in range(3):  # each parked one closed reconnects, and parks again
            t.later(0.1)
            t.must_connect(f"192.0.{n}.1").ready()
            self.assertFalse(honest.closed, f"pushed out by reconnection {n}")
        self.assertEqual([c.closed for c in parked], [True] * 4)
        honest.handshaken()
        honest.mmtp.dataReceived(VERSION_LINE)
        honest.deliver(1)
        self.assertEqual(t.sink.stored, [base.make_packet(1)])

    def test_a_hello_already_waiting_counts_at_accept(self) -> None:
        """Under a flood the node accepts late: a peer whose TLS hello is
        already in the socket has spoken from the start."""
        t = Table()
        waiting, sent = socket.socketpair()
        silent, other = socket.socketpair()
        for sock in (waiting, sent, silent, other):
            self.addCleanup(sock.close)
        sent.sendall(b"\x16\x03\x01")  # the start of a ClientHello
        conns = []
        for handle in (waiting, silent):
            tls = t.factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1))
            tls.makeConnection(SocketTransport(handle))
            conns.append(tls.wrappedProtocol)
        self.assertEqual([c.stage for c in conns], [Stage.HANDSHAKING, Stage.ACCEPTED])
        self.assertEqual(waiting.recv(10), b"\x16\x03\x01", "the bytes stay for TLS")

    def test_a_connection_mid_frame_is_spared_while_an_idle_one_exists(self) -> None:
        t = Table(max_connections=2)
        finished = t.must_connect("192.0.2.1").ready().deliver(1)  # more progress, but idle
        t.later()
        receiving = t.must_connect("192.0.2.2").ready()
        receiving.mmtp.dataReceived(base.send_frame(base.make_packet(2))[:20000])
        self.assertTrue(receiving.mmtp.progress().busy)
        t.must_connect("192.0.2.3")
        self.assertTrue(finished.closed)
        self.assertFalse(receiving.closed)
        receiving.mmtp.dataReceived(base.send_frame(base.make_packet(2))[20000:])
        self.assertEqual(t.sink.stored, [base.make_packet(1), base.make_packet(2)])

    def test_packets_being_stored_make_a_connection_busy(self) -> None:
        """Closing it would leave a stored packet unacknowledged (the peer
        would send it again): an idle newcomer goes first."""
        t = Table(base.HeldSink(), max_connections=2)
        storing = t.must_connect("192.0.2.1").ready().deliver(1)
        self.assertEqual(storing.mmtp.progress().busy, True)
        t.later()
        idle = t.must_connect("192.0.2.2")
        t.later()
        t.must_connect("192.0.2.3")
        self.assertTrue(idle.closed)
        self.assertFalse(storing.closed)

    def test_when_every_connection_is_busy_the_least_progressed_goes(self) -> None:
        t = Table(max_connections=2)
        packets = t.must_connect("192.0.2.1").ready().deliver(1)
        packets.mmtp.dataReceived(base.send_frame(base.make_packet(2))[:100])
        t.later()
        first = t.must_connect("192.0.2.2").ready()
        first.mmtp.dataReceived(base.send_frame(base.make_packet(3))[:100])
        self.assertTrue(packets.mmtp.progress().busy and first.mmtp.progress().busy)
        self.assertIsNotNone(t.connect("192.0.2.3"))
        self.assertTrue(first.closed, "the busy one that has delivered nothing goes")
        self.assertFalse(packets.closed)

    def test_a_connection_already_closing_is_not_a_victim(self) -> None:
        """Aborted (timed out) but not yet reported lost by TCP: its slot
        comes back when TCP says so; another connection must go now."""
        t = Table(max_connections=2, handshake_timeout=5)
        dying = t.must_connect("192.0.2.1")
        t.later(1)
        other = t.must_connect("192.0.2.2")
        t.later(4)
        self.assertTrue(dying.closed)  # the handshake deadline fired
        self.assertEqual(t.counted, 2)
        t.must_connect("192.0.2.3")
        self.assertTrue(other.closed)
        self.assertEqual(t.stats["EvictedConnection"], 1)
        dying.lost()
        other.lost()
        self.assertEqual(t.counted, 1)

    def test_honest_tls_peer_gets_in_and_stays_in_through_an_idle_flood(self) -> None:
        """A real initiator over in-memory TLS against a table full of idle
        sockets, with 100 more idle sockets arriving once its hello is in:
        it takes the slot of the oldest idle socket and is never the one
        closed, because it has said something and they have not."""
        limits = ConnectionLimits(max_connections=8, max_per_source=2)
        net = base.Network(base.MemorySink(), limits=limits)
        flood: list[Conn] = []

        def idle(n: int) -> None:
            host = f"198.51.{n % 200}.{1 + n % 2}"
            addr = IPv4Address("TCP", host, 2000 + n)
            tls = net.server.buildProtocol(addr)
            self.assertIsNotNone(tls, f"idle socket {n} refused")
            transport = StringTransport(peerAddress=addr)
            tls.makeConnection(transport)
            flood.append(Conn(tls, transport))
            net.clock.advance(0.01)

        for n in range(8):
            idle(n)
        outcomes = net.send([base.make_packet(n) for n in range(5)])
        [(client, server, pump)] = net.links
        pump.pump()  # the ClientHello reaches the node
        self.assertEqual(server.wrappedProtocol.stage, Stage.HANDSHAKING)
        for n in range(8, 108):
            idle(n)
        net.flush()
        self.assertEqual(outcomes.results, [None] * 5)
        self.assertEqual(net.sink.stored, [base.make_packet(n) for n in range(5)])
        self.assertEqual(net.server_stats["EvictedConnection"], 101)
        self.assertEqual(sum(c.closed for c in flood), 101)
        self.assertEqual(net.server_stats["RefusedConnection"], 0)


class CapTests(base.LogMixin):
    def test_network_keys(self) -> None:
        self.assertEqual(network_key("192.0.2.77"), "192.0.2.0/24")
        self.assertEqual(network_key("::ffff:192.0.2.77"), "192.0.2.0/24")
        self.assertEqual(network_key("192.0.2.77", ipv4_prefix=16), "192.0.0.0/16")
        self.assertEqual(network_key("2001:db8:1:2::3"), "2001:db8:1::/48")
        self.assertEqual(network_key("2001:db8:1:2::3", ipv6_prefix=64), "2001:db8:1:2::/64")
        # Loopback: each address is a network of its own.
        self.assertEqual(network_key("127.0.0.1"), "127.0.0.1/32")
        self.assertEqual(network_key("127.5.1.1"), "127.5.1.1/32")
        self.assertEqual(network_key("::1"), "::1/128")
        self.assertEqual(network_key("not an address"), "not an address")

    def test_per_network_cap(self) -> None:
        t = Table(max_connections=100, max_per_source=8, max_per_network=3)
        for host in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
            t.must_connect(host)
        self.assertIsNone(t.connect("192.0.2.200"))
        self.expect_log("MMTP connection refused: too many connections from one network",
                        LogLevel.info, count=1)
        t.must_connect("192.0.3.1")  # the next /24
        for host in ("2001:db8:1:1::1", "2001:db8:1:2::1", "2001:db8:1:ffff::1"):
            t.must_connect(host)
        self.assertIsNone(t.connect("2001:db8:1:3::1"))
        t.must_connect("2001:db8:2::1")  # the next /48
        self.assertEqual(t.stats["RefusedConnection"], 2)
        self.assertEqual(t.factory.counter.per_network, {
            "192.0.2.0/24": 3, "192.0.3.0/24": 1, "2001:db8:1::/48": 3, "2001:db8:2::/48": 1})

    def test_loopback_peers_are_not_lumped_together(self) -> None:
        """A test network's nodes on 127.0.0.1, 127.0.0.2... each get their
        full per-address share, however low the per-network cap."""
        t = Table(max_connections=100, max_per_source=4, max_per_network=2)
        for host in ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.5.1.1"):
            for _ in range(2):
                t.must_connect(host)
        self.assertEqual(t.counted, 8)
        self.assertIsNone(t.connect("127.0.0.1"), "the cap still applies to one address")
        self.assertEqual(len(t.factory.counter.per_network), 4)
        # Default caps: the per-network cap never bites before the per-address one.
        t = Table()
        for _ in range(8):
            t.must_connect("127.0.0.1")
        self.assertIsNone(t.connect("127.0.0.1"))
        self.expect_log("too many connections from one address", LogLevel.info)

    def test_a_newcomer_over_its_caps_does_not_evict(self) -> None:
        t = Table(max_connections=3, max_per_source=2, max_per_network=2)
        first = t.must_connect("192.0.2.1")
        t.must_connect("192.0.2.2")
        t.must_connect("198.51.100.1")
        self.assertIsNone(t.connect("192.0.2.3"))
        self.assertFalse(first.closed)
        self.assertEqual(t.stats["EvictedConnection"], 0)
        self.assertIsNotNone(t.connect("203.0.113.1"))  # within its caps: room is made
        self.assertTrue(first.closed)

    def test_prefix_change_keeps_counts_consistent(self) -> None:
        """A SIGHUP may change the prefixes while connections are open."""
        limits = ConnectionLimits(max_per_network=10)
        counter = ConnectionCounter(limits)
        counter.opened("192.0.2.1")
        limits.ipv4_prefix = 16
        counter.opened("192.0.2.1")  # still counted where its first one is
        counter.opened("192.0.9.1")
        self.assertEqual(counter.per_network, {"192.0.2.0/24": 2, "192.0.0.0/16": 1})
        for host in ("192.0.2.1", "192.0.9.1", "192.0.2.1"):
            counter.closed(host)
        self.assertEqual((counter.total, counter.per_source, counter.per_network), (0, {}, {}))


class DeadlineTests(base.LogMixin):
    def harness(self, sink: Optional[base.HeldSink] = None, **limits: Any) -> base.ResponderHarness:
        return base.ResponderHarness(sink if sink is not None else base.MemorySink(),
                                     ConnectionLimits(**limits))

    def test_first_frame_deadline(self) -> None:
        h = self.harness(first_frame_timeout=30, idle_timeout=300)
        h.negotiate()
        h.run_out(30)
        self.assertEqual(h.stats["TimedOut"], 1)
        h.lost(ConnectionAborted())
        self.expect_log("MMTP connection closed: first frame timed out", LogLevel.info, count=1)

    def test_first_frame_deadline_is_met_by_any_frame(self) -> None:
        h = self.harness(first_frame_timeout=30, idle_timeout=300)
        h.negotiate()
        h.clock.advance(10)
        h.feed(base.junk_frame(base.make_packet(1)))
        h.clock.advance(100)
        self.assertFalse(h.aborted)

    def test_a_frame_under_way_is_left_to_the_frame_deadline(self) -> None:
        h = self.harness(first_frame_timeout=30, frame_timeout=60, idle_timeout=300)
        h.negotiate()
        h.clock.advance(20)
        frame = base.send_frame(base.make_packet(2))
        h.feed(frame[:1000])
        h.clock.advance(40)  # t=60: past the first-frame deadline, not the frame's
        self.assertFalse(h.aborted)
        h.feed(frame[1000:])
        self.assertEqual(h.sink.stored, [base.make_packet(2)])
        h.clock.advance(200)
        self.assertFalse(h.aborted)

    def test_junk_does_not_extend_life(self) -> None:
        """One JUNK frame every 200 s (the issue's attack): closed when the
        idle limit since the last packet is up."""
        h = self.harness(idle_timeout=300)
        h.negotiate()
        h.feed(base.send_frame(base.make_packet(1)))
        for n in range(1, 3):  # t=100, t=200: JUNK, acknowledged
            h.clock.advance(100)
            junk = base.make_packet(100 + n)
            h.feed(base.junk_frame(junk))
            self.assertEqual(h.written()[-30:], base.junk_ack(junk))
        h.run_out(100)
        h.lost(ConnectionAborted())
        self.expect_log("MMTP connection closed: idle connection timed out", LogLevel.info,
                        count=1)

    def test_junk_frame_finishing_after_the_idle_limit_closes(self) -> None:
        h = self.harness(idle_timeout=300, frame_timeout=60)
        h.negotiate()
        h.feed(base.send_frame(base.make_packet(1)))
        h.written()
        h.clock.advance(290)
        junk = base.make_packet(7)
        frame = base.junk_frame(junk)
        h.feed(frame[:1000])
        h.clock.advance(20)  # t=310: idle is up, the frame deadline decides
        self.assertFalse(h.aborted)
        h.feed(frame[1000:])
        self.assertEqual(h.written(), base.junk_ack(junk), "the frame is still answered")
        self.assertTrue(h.aborted)
        h.lost(ConnectionAborted())
        self.expect_log("idle connection (JUNK only) timed out", LogLevel.info, count=1)

    def test_packet_finishing_after_the_idle_limit_saves_the_connection(self) -> None:
        h = self.harness(idle_timeout=300, frame_timeout=60)
        h.negotiate()
        h.feed(base.send_frame(base.make_packet(7)))
        h.clock.advance(290)
        frame = base.send_frame(base.make_packet(8))
        h.feed(frame[:1000])
        h.clock.advance(20)
        h.feed(frame[1000:])
        self.assertFalse(h.aborted)
        self.assertEqual(h.sink.stored, [base.make_packet(7), base.make_packet(8)])
        h.run_out(300)  # idle counts again from the packet (t=310)

    def test_trickled_bytes_do_not_extend_life(self) -> None:
        """A frame trickled in never completes: the frame deadline ends it,
        and the bytes themselves never moved the idle limit."""
        h = self.harness(idle_timeout=300, frame_timeout=60)
        h.negotiate()
        h.feed(base.send_frame(base.make_packet(1)))
        h.clock.advance(280)
        h.trickle(base.junk_frame(base.make_packet(2)), 60)
        self.assertTrue(h.aborted)
        self.assertEqual(h.clock.seconds(), 340)
        h.lost(ConnectionAborted())
        self.expect_log("partial frame timed out", LogLevel.info, count=1)

    def test_waiting_for_our_disk_is_not_idle(self) -> None:
        h = self.harness(base.HeldSink(), idle_timeout=300)
        h.negotiate()
        h.feed(base.send_frame(base.make_packet(1)))
        h.clock.advance(300)  # the packet is still being stored
        h.clock.advance(100)
        self.assertFalse(h.aborted)
        h.sink.store(0)
        self.assertEqual(h.written(), base.received_ack(base.make_packet(1)))
        h.clock.advance(200)  # idle restarted at t=300, when it was due
        self.assertTrue(h.aborted)
