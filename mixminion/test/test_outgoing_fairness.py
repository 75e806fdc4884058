"""Issue 12 point 1: next hops that never answer must not stall the others.

The attack: many packets, each for a different next hop that accepts TCP
(or not even that) and never answers.  Before, the outgoing queue handed
its oldest 512 ready packets to MMTP and the client gave its
``MaxConnections`` slots first come first served, each held by a silent
peer for a 60 s TLS deadline: a packet for a healthy next hop queued
behind them waited for hours.

Everything here runs in memory on one ``task.Clock``: healthy next hops
are a real responder over in-memory TLS (the harness of
``test_mmtp_client_limit``), black holes are peers that accept TCP and
never send a byte (so TLS never completes), peers that never accept
(the connect never finishes), and a real responder that never stores
(TLS and the version exchange complete, no acknowledgement ever comes).
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.logger import LogLevel, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient

from mixminion.mmtp.initiator import (
    CannotConnect,
    ConnectionFailed,
    HandshakeFailed,
    NextHop,
    NextHopBusy,
    InitiatorSettings,
    unproven_share,
)
from mixminion.mmtp.responder import responder_factory
from mixminion.mmtp.stats import MMTPStats
from mixminion.server.items import encode_item
from mixminion.server.outgoing import Outgoing
from mixminion.server.queues import OUT
from mixminion.server.stats import NodeStats
from mixminion.testing.fakes import HeldClient, ListSink, scratch_store
from mixminion.test.test_mmtp_client_limit import Hops
from mixminion.test.test_mmtp_protocol import (
    HeldSink,
    LogMixin,
    MemorySink,
    Outcomes,
    make_packet,
)

#: every deadline of the client, at its default
DEADLINE = InitiatorSettings().ack_timeout


class BlackHoles(Hops):
    """:class:`Hops` where some hosts are black holes:

    * ``silent``: TCP connects, the peer never says a word (TLS never
      completes);
    * ``unreachable``: the TCP connect never finishes;
    * ``mute``: a real responder whose storage never finishes: TLS and the
      version exchange complete, no acknowledgement ever comes.

    ``open_to`` counts connections made to each host."""

    def __init__(self, sink: HeldSink, settings: Optional[InitiatorSettings] = None) -> None:
        super().__init__(sink, settings)
        self.silent: set[str] = set()
        self.unreachable: set[str] = set()
        self.mute: set[str] = set()
        self.mute_server = responder_factory(HeldSink(), self.responder_tls, self.clock, None,
                                             None, MMTPStats())
        self.peak_unproven = 0

    def connect(self, destination: NextHop, factory: Any) -> defer.Deferred[Any]:
        self.peak_unproven = max(self.peak_unproven, self.client.unproven_connections)
        host = destination.host
        if host in self.unreachable:
            self.opened.append(destination)
            self.peak = max(self.peak, self.client.connections)
            return defer.Deferred()  # cancelled by the client's connect deadline
        if host not in self.silent and host not in self.mute:
            return super().connect(destination, factory)
        self.opened.append(destination)
        self.peak = max(self.peak, self.client.connections)
        client_tls = TLSMemoryBIOFactory(self.client.tls, True, factory, clock=self.clock)
        addr = IPv4Address("TCP", "203.0.113.5", 50000 + len(self.links))
        server = (Protocol if host in self.silent
                  else lambda: self.mute_server.buildProtocol(addr))
        client, _, pump = connectedServerAndClient(
            server, lambda: client_tls.buildProtocol(None), greet=False, clock=self.clock)
        self.links.append((client, None, pump))
        return defer.succeed(client.wrappedProtocol)

    def advance(self, seconds: float, step: float = 1.0) -> None:
        """Let ``seconds`` pass, moving bytes after each ``step``."""
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end - 1e-9:
            self.clock.advance(min(step, end - self.clock.seconds()))
            self.flush()

    def prove(self, hop: NextHop) -> None:
        """``hop`` acknowledges one packet: the client knows it answers."""
        ds = Outcomes([self.client.send_packet(hop, make_packet(999))])
        self.flush()
        assert ds.results == [None], ds.results
        assert self.client.proven(hop)


def holes(n: int, prefix: str = "198.51.100") -> list[NextHop]:
    """``n`` different black-hole next hops."""
    return [NextHop(f"{prefix}.{i // 250}.{i % 250}", 48099, bytes(20))
            for i in range(n)]


class ClientFairnessTests(LogMixin):
    """The MMTP client: slots, deadlines, memory, reporting."""

    def network(self, max_connections: int = 8, **settings: Any) -> BlackHoles:
        net = BlackHoles(MemorySink(), InitiatorSettings(max_connections=max_connections,
                                                         **settings))
        self.addCleanup(net.client.close)
        return net

    def test_a_proven_next_hop_is_not_stuck_behind_black_holes(self) -> None:
        """With every connection a black hole may get taken, a packet for a
        next hop that has answered before still goes at once."""
        net = self.network(max_connections=8)
        good = net.hop("192.0.2.1")
        net.prove(good)
        bad = holes(200)
        net.silent.update(d.host for d in bad)
        black = net.send_to(bad)
        net.flush()
        self.assertEqual(net.client.connections, unproven_share(8))
        self.assertEqual(unproven_share(8), 6)
        started = net.clock.seconds()
        honest = net.send_to([good] * 5, first=1)
        net.flush()
        self.assertEqual(honest.results, [None] * 5)
        self.assertEqual(net.clock.seconds(), started, "sent within no simulated time at all")
        self.assertEqual(black.results.count("?"), 200)
        self.assertLessEqual(net.peak, 8)
        self.assertLessEqual(net.peak_unproven, 6)

    def test_a_new_next_hop_waits_at_most_its_turn(self) -> None:
        """A next hop nobody has heard from yet waits in the common line,
        first come first served: bounded by the black holes queued before
        it, each costing one slot for one deadline."""
        net = self.network(max_connections=8)
        bad = holes(30)
        net.silent.update(d.host for d in bad)
        black = net.send_to(bad)
        good = net.hop("192.0.2.1")
        honest = net.send_to([good], first=100)
        net.flush()
        rounds = -(-len(bad) // unproven_share(8))  # 30 holes, 6 at a time: 5 deadlines
        net.advance(rounds * DEADLINE - 1)
        self.assertEqual(honest.results, ["?"])
        net.advance(1)
        self.assertEqual(honest.results, [None])
        self.assertEqual(black.types(), [HandshakeFailed] * 30)
        self.assertLessEqual(net.peak, 8)
        self.assertEqual(net.client.connections, 0)

    def test_a_peer_that_never_completes_tls_frees_its_slot(self) -> None:
        net = self.network(max_connections=1)
        a, b = holes(2)
        net.silent.add(a.host)
        ds = net.send_to([a, b])
        net.flush()
        self.assertEqual(net.opened, [a])
        net.advance(DEADLINE - 1)
        self.assertEqual(ds.results, ["?", "?"])
        net.advance(1)
        self.assertEqual(ds.types(), [HandshakeFailed, None])
        self.assertEqual(str(ds.results[0]), "TLS handshake timed out")
        self.assertEqual(net.opened, [a, b])
        self.assertEqual(net.client.connections, 0)
        self.assertEqual(net.client.stats["TimedOut"], 1)

    def test_a_peer_that_never_acknowledges_frees_its_slot(self) -> None:
        """TLS and the version exchange complete; no acknowledgement comes:
        the slot is free 30 s after the TCP connection (not the 300 s idle
        timeout), and the other packets waiting for that next hop fail with
        it instead of taking the next connection."""
        net = self.network(max_connections=1, max_packets_per_connection=2)
        a, b = holes(2)
        net.mute.add(a.host)
        ds = net.send_to([a, a, a, b])
        net.flush()
        self.assertEqual(net.opened, [a])
        net.advance(DEADLINE - 1)
        self.assertEqual(ds.results, ["?"] * 4)
        net.advance(1)
        self.assertEqual(ds.types(), [ConnectionFailed] * 3 + [None])
        self.assertEqual(str(ds.results[0]), "no acknowledgement in time")
        self.assertEqual(net.opened, [a, b], "the stuck next hop's third packet did not "
                         "take the free connection")
        self.assertEqual(net.client.connections, 0)

    def test_acknowledgements_must_keep_coming(self) -> None:
        """After the first acknowledgement each next one must come within
        the deadline too (a peer acknowledging once per idle timeout would
        otherwise hold a slot forever); one that stops is stuck, and its
        packets still waiting for a connection fail with it."""
        sink = HeldSink()
        net = BlackHoles(sink, InitiatorSettings(max_connections=1,
                                                 max_packets_per_connection=3))
        self.addCleanup(net.client.close)
        good = net.hop("192.0.2.1")
        ds = net.send_to([good] * 4)
        net.flush()
        net.advance(DEADLINE - 1)
        net.store(0)
        self.assertEqual(ds.results, [None, "?", "?", "?"])
        self.assertTrue(net.client.proven(good))
        net.advance(DEADLINE - 1)
        self.assertEqual(ds.results, [None, "?", "?", "?"])
        net.advance(1)
        self.assertEqual(ds.types(), [None] + [ConnectionFailed] * 3)
        self.assertEqual(str(ds.results[3]), "no acknowledgement in time")
        self.assertEqual(len(net.links), 1, "no new connection for the fourth")
        self.assertEqual(net.client.connections, 0)
        self.assertFalse(net.client.proven(good))
        self.assertEqual(net.client.stuck_destinations, 1)

    def test_an_unreachable_peer_frees_its_slot(self) -> None:
        """The connect itself never finishes (SYN dropped): the client's own
        connect deadline cancels it."""
        net = self.network(max_connections=1)
        a, b = holes(2)
        net.unreachable.add(a.host)
        ds = net.send_to([a, a, b])
        net.advance(DEADLINE - 1)
        self.assertEqual(ds.results, ["?"] * 3)
        net.advance(1)
        self.assertEqual(ds.types(), [CannotConnect, CannotConnect, None])
        self.assertEqual(str(ds.results[0]), "cannot connect: timed out")
        self.assertEqual(net.client.stats["FailedConnect"], 1)
        self.assertEqual(net.client.connections, 0)

    def test_a_proven_next_hop_that_goes_silent_is_demoted(self) -> None:
        net = self.network(max_connections=4)
        good = net.hop("192.0.2.1")
        net.prove(good)
        net.mute.add(good.host)
        ds = net.send_to([good])
        net.advance(DEADLINE)
        self.assertEqual(ds.types(), [ConnectionFailed])
        self.assertFalse(net.client.proven(good))
        self.assertEqual(net.client.stuck_destinations, 1)
        net.mute.discard(good.host)
        ds = net.send_to([good], first=1)
        net.flush()
        self.assertEqual(ds.results, [None])
        self.assertTrue(net.client.proven(good))
        self.assertEqual(net.client.stuck_destinations, 0, "answering again ends being stuck")

    def test_packets_held_per_destination_are_bounded(self) -> None:
        net = self.network(max_connections=2, max_queued_per_destination=5)
        [a] = holes(1)
        net.silent.add(a.host)
        ds = net.send_to([a] * 7)
        net.flush()
        self.assertEqual(ds.types()[5:], [NextHopBusy] * 2)
        self.assertEqual(net.client.held(a), 5)
        self.assertEqual(net.client.stats["AttemptedRelay"], 5)
        net.advance(DEADLINE)
        self.assertEqual(ds.types(), [HandshakeFailed] * 5 + [NextHopBusy] * 2)
        self.assertEqual(net.client.held(a), 0)
        ds = net.send_to([a] * 5, first=10)  # room again
        self.assertEqual(ds.results, ["?"] * 5)

    def test_stuck_next_hops_are_reported_once_with_counts(self) -> None:
        net = self.network(max_connections=4, stuck_report_interval=600)
        bad = holes(40)
        net.silent.update(d.host for d in bad[:20])
        net.unreachable.update(d.host for d in bad[20:])
        ds = net.send_to(bad + bad[:2])  # two of them have two packets
        net.advance(DEADLINE)  # the first three (the share of 4) time out together
        self.assertEqual(self.logged("Next hops stuck", LogLevel.warn), [])
        net.advance(5)
        [first] = self.expect_log("Next hops stuck", LogLevel.warn, count=1)
        self.assertEqual((first["new"], first["stuck"], first["packets"]), (3, 3, 5))
        net.advance(500)  # many more time out: no new warning meanwhile
        self.expect_log("Next hops stuck", LogLevel.warn, count=1)
        self.assertEqual(ds.results.count("?"), 0)
        net.advance(100)  # the end of the interval: one report for the rest
        [_, second] = self.expect_log("Next hops stuck", LogLevel.warn, count=2)
        self.assertEqual((second["new"], second["stuck"], second["packets"]), (37, 40, 37))
        self.assertEqual(net.client.stats["StuckNextHop"], 40)
        net.advance(600)  # a quiet interval ends the series
        self.expect_log("Next hops stuck", LogLevel.warn, count=2)
        for event in self.logs:
            if event.get("log_level") in (LogLevel.info, LogLevel.warn, LogLevel.error):
                text = formatEvent(event)
                self.assertNotIn("198.51.100.", text, "an address above debug")
        self.assertEqual(len(self.logged("is stuck", LogLevel.debug)), 40)
        self.assertIn("198.51.100.", formatEvent(self.logged("is stuck", LogLevel.debug)[0]))


class QueueFairnessTests(LogMixin):
    """The outgoing queue: turns, per-destination and probation bounds."""

    def setUp(self) -> None:
        super().setUp()
        self.store = scratch_store(self)
        self.stats = NodeStats()
        self.clock = task.Clock()
        self.clock.advance(1000)

    def queue(self, dests: list[NextHop]) -> None:
        meta = [encode_item(NextHop(d.host, d.port, d.keyid)) for d in dests]
        self.store.add_many(OUT, [bytes(32768)] * len(dests), now=1000, meta=meta)

    def outgoing(self, client: Any) -> Outgoing:
        out = Outgoing(self.store, client, (60, 60), self.clock, b"\x07" * 20,
                       self.stats.count, ListSink(), reactor=reactor)
        self.addCleanup(out.stop)
        return out

    def healthy(self, out: Outgoing, dest: NextHop) -> None:
        """``dest`` answered before."""
        out._state(dest).succeeded(self.clock.seconds())
        self.assertTrue(out.healthy(dest))

    def test_destinations_take_turns(self) -> None:
        """A packet queued after a hundred for another next hop goes in the
        first turn, not after them."""
        a, b = NextHop("192.0.2.1", 48099, bytes(20)), NextHop("192.0.2.2", 48099,
                                                                       bytes(20))
        self.queue([a] * 100 + [b])
        client = HeldClient()
        out = self.outgoing(client)
        out.max_in_flight = 10
        self.assertEqual(out.flush(), 10)
        self.assertEqual([dest for dest, _ in client.sent[:2]], [a, b])

    def test_a_healthy_next_hop_is_not_stuck_behind_new_ones(self) -> None:
        good = NextHop("192.0.2.1", 48099, bytes(20))
        bad = holes(600)
        self.queue(bad + [good] * 3)  # the attack first
        client = HeldClient()
        out = self.outgoing(client)
        self.healthy(out, good)
        sent = out.flush()
        self.assertEqual(len(client.to(good)), 3)
        self.assertEqual([dest for dest, _ in client.sent[:3]], [good] * 3,
                         "healthy next hops take their turns first")
        self.assertEqual(sent, 3 + out.max_in_flight_on_probation)
        self.assertLess(sent, out.max_in_flight)
        # More for the healthy next hop while the probation share is full: at once.
        self.queue([good] * 2)
        out.flush()
        self.assertEqual(len(client.to(good)), 5)
        # A black hole failing frees its place for the next on probation.
        client.to(bad[0])[0].errback(ConnectionFailed("no acknowledgement in time"))
        self.assertEqual(len(client.sent), sent + 3)
        self.assertEqual(client.sent[-1][0], bad[out.max_in_flight_on_probation])
        self.expect_log("Relay to a next hop failed", LogLevel.info, count=1)

    def test_packets_in_flight_per_destination_are_bounded(self) -> None:
        good = NextHop("192.0.2.1", 48099, bytes(20))
        self.queue([good] * 200)
        client = HeldClient()
        out = self.outgoing(client)
        cap = out.max_in_flight_per_destination
        self.assertEqual(out.flush(), cap)
        for d in client.to(good)[:cap // 2 - 1]:
            d.callback(None)
        self.assertEqual(len(client.sent), cap, "refilled half empty, in one read")
        client.sent[cap // 2 - 1][1].callback(None)
        self.assertEqual(len(client.sent), cap + cap // 2)
        self.assertEqual(out.flush(), 0, "a flush adds nothing beyond the bound")
        self.assertEqual(len(client.to(good)) - cap // 2, cap)

    def test_failures_of_a_destination_are_logged_once(self) -> None:
        a = holes(1)[0]
        self.queue([a] * 5)
        client = HeldClient()
        out = self.outgoing(client)
        self.assertEqual(out.flush(), 5)
        for _, d in client.sent:
            d.errback(ConnectionFailed("no acknowledgement in time"))
        self.expect_log("Relay to a next hop failed", LogLevel.info, count=1)
        self.assertEqual(len(client.sent), 5, "its other packets wait for its retry")

    def test_the_clients_own_bound_is_not_a_failure(self) -> None:
        a = holes(1)[0]
        self.queue([a] * 2)
        client = HeldClient()
        out = self.outgoing(client)
        out.flush()
        client.sent[0][1].errback(NextHopBusy("held"))
        self.assertTrue(out._state(a).ready(self.clock.seconds()))
        self.assertEqual(out.flush(), 1, "sent again by the next flush")


class EndToEndTests(LogMixin):
    """The queue and the client together, the node's wiring, on one clock:
    a node under the black-hole attack still relays to a healthy next hop
    at once, holds at most MaxConnections connections and frees each black
    hole's slot after its deadline."""

    def setUp(self) -> None:
        super().setUp()
        self.store = scratch_store(self)
        self.stats = NodeStats()

    def test_healthy_next_hop_during_the_attack(self) -> None:
        net = BlackHoles(MemorySink(), InitiatorSettings(max_connections=16,
                                                         max_queued_per_destination=128))
        self.addCleanup(net.client.close)
        out = Outgoing(self.store, net.client, (3600, 3600), net.clock, b"\x07" * 20,
                       self.stats.count, ListSink(), reactor=reactor)
        self.addCleanup(out.stop)
        good = net.hop("192.0.2.1")
        bad = holes(2000)
        net.silent.update(d.host for d in bad[::2])
        net.unreachable.update(d.host for d in bad[1::2])

        def queue(dests: list[NextHop]) -> None:
            meta = [encode_item(NextHop(d.host, d.port, d.keyid)) for d in dests]
            self.store.add_many(OUT, [make_packet(i) for i in range(len(dests))],
                                now=net.clock.seconds(), meta=meta)

        queue([good])  # the healthy next hop answers once before the attack
        out.flush()
        net.flush()
        self.assertTrue(out.healthy(good))
        queue(bad)
        out.flush()
        net.flush()
        self.assertEqual(net.client.connections, unproven_share(16))
        for second in range(0, 300, 10):  # honest packets all along the attack
            queue([good] * 3)
            out.flush()
            net.flush()
            self.assertEqual(net.client.stats["SuccessfulRelay"], 1 + 3 * (second // 10 + 1),
                             f"held up at {second} s")
            net.advance(10)
        self.assertLessEqual(net.peak, 16)
        self.assertLessEqual(net.peak_unproven, unproven_share(16))
        # each black hole cost one slot for one deadline: 12 per 30 s
        self.assertEqual(net.client.stats["FailedRelay"], 300 // DEADLINE * unproven_share(16))
        self.assertLessEqual(out._probation_out, out.max_in_flight_on_probation)
        self.expect_log("Next hops stuck", LogLevel.warn, count=1)
