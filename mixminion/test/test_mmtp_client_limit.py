"""The MMTP client's two node-wide bounds (server.md §14.6): at most
``MaxConnections`` connections at once, and ``[Outgoing/MMTP]``
Allow/Deny on the address a next hop actually is.

Everything runs in memory on a ``task.Clock``, through real TLS to a real
responder (the harness of ``test_mmtp_protocol``); each destination's host
"resolves" to the peer address its fake TCP connection reports.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.logger import LogLevel, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import FakeTransport, connectedServerAndClient

from mixminion.mmtp.initiator import (
    AddressPolicy,
    InitiatorSettings,
    NextHop,
    NextHopDenied,
    Phase,
    literal_address,
)
from mixminion.test.test_mmtp_protocol import (
    HeldSink,
    LogMixin,
    MemorySink,
    Network,
    Outcomes,
    make_packet,
)


def no_loopback(ip: str, port: int) -> bool:
    """``Deny: 127.0.0.0/255.0.0.0`` and nothing else."""
    return not ip.startswith("127.")


class Hops(Network):
    """A :class:`Network` with many next hops, all the same responder.
    ``resolve`` maps a hostname to the address TCP connects to; ``opened``
    lists the destinations connected to, in order; ``peak`` is the most
    connections the client ever had at once."""

    def __init__(self, sink: HeldSink, settings: Optional[InitiatorSettings] = None,
                 allows: Optional[AddressPolicy] = None,
                 resolve: Optional[dict[str, str]] = None) -> None:
        super().__init__(sink, settings)
        self.client.allows = allows
        self.resolve = resolve or {}
        self.opened: list[NextHop] = []
        self.peak = 0

    def hop(self, name: str) -> NextHop:
        return NextHop(name, 48099, self.destination.keyid)

    def connect(self, destination: NextHop, factory: Any) -> defer.Deferred[Any]:
        self.opened.append(destination)
        self.peak = max(self.peak, self.client.connections)
        ip = self.resolve.get(destination.host, destination.host)
        peer = IPv4Address("TCP", ip, destination.port)
        client_tls = TLSMemoryBIOFactory(self.client.tls, True, factory, clock=self.clock)
        addr = IPv4Address("TCP", "203.0.113.5", 50000 + len(self.links))
        client, server, pump = connectedServerAndClient(
            lambda: self.server.buildProtocol(addr), lambda: client_tls.buildProtocol(None),
            clientTransportFactory=lambda p: FakeTransport(p, isServer=False, peerAddress=peer),
            greet=False, clock=self.clock)
        self.links.append((client, server, pump))
        self.initiators.append(client.wrappedProtocol)
        return defer.succeed(client.wrappedProtocol)

    def send_to(self, hops: list[NextHop], first: int = 0) -> Outcomes:
        """Packet ``first + i`` to ``hops[i]``."""
        return Outcomes([self.client.send_packet(hop, make_packet(first + i))
                         for i, hop in enumerate(hops)])

    def store(self, n: int) -> None:
        """The responder finishes storing packet ``n``; bytes move until quiet."""
        packets = [p for p, _ in self.sink.held]
        self.sink.store(packets.index(make_packet(n)))
        self.flush()


class MaxConnectionsTests(LogMixin):
    def test_waiting_destinations_go_in_order_as_connections_close(self) -> None:
        net = Hops(HeldSink(), InitiatorSettings(max_connections=2))
        hops = [net.hop(f"192.0.2.{i}") for i in range(5)]
        ds = net.send_to(hops)
        net.flush()
        self.assertEqual(net.opened, hops[:2])
        self.assertEqual(net.client.connections, 2)
        self.assertEqual(net.client.waiting_destinations, 3)
        self.assertEqual(net.sink.waiting, 2)
        for n in range(5):
            net.store(n)  # hop n acknowledges and closes: the next in line connects
            self.assertEqual(net.opened, hops[:min(5, n + 3)])
        self.assertEqual(ds.results, [None] * 5)
        self.assertEqual(net.peak, 2)
        self.assertEqual(net.client.connections, 0)
        self.assertEqual(net.client.stats["SuccessfulRelay"], 5)

    def test_lowering_at_run_time_applies_to_the_next_connection(self) -> None:
        settings = InitiatorSettings(max_connections=3)
        net = Hops(HeldSink(), settings)
        hops = [net.hop(f"192.0.2.{i}") for i in range(5)]
        ds = net.send_to(hops)
        net.flush()
        self.assertEqual(net.opened, hops[:3])
        net.client.apply_settings(InitiatorSettings(max_connections=1))
        self.assertIs(net.client.settings, settings)  # shared with open connections
        self.assertEqual(net.client.connections, 3, "open connections are not cut")
        net.store(0)
        net.store(1)
        self.assertEqual((net.opened, net.client.connections), (hops[:3], 1))
        net.store(2)  # the last of the three closes: one may open
        self.assertEqual((net.opened, net.client.connections), (hops[:4], 1))
        # Raising it opens connections for the waiting at once.
        net.client.apply_settings(InitiatorSettings(max_connections=16))
        self.assertEqual((net.opened, net.client.connections), (hops, 2))
        net.store(3)
        net.store(4)
        self.assertEqual(ds.results, [None] * 5)

    def test_a_destinations_next_connection_waits_its_turn(self) -> None:
        """Per destination, a second connection opens while the first
        drains; under MaxConnections it queues behind others that waited."""
        net = Hops(HeldSink(), InitiatorSettings(max_connections=2,
                                                 max_packets_per_connection=1))
        a, b = net.hop("192.0.2.1"), net.hop("192.0.2.2")
        ds = net.send_to([a, a, a, b])
        net.flush()
        self.assertEqual(net.opened, [a, a], "two per destination, the most both limits allow")
        net.store(0)  # a's first connection closes: b waited longer than a's third packet
        self.assertEqual(net.opened, [a, a, b])
        net.store(1)
        self.assertEqual(net.opened, [a, a, b, a])
        net.store(3)
        net.store(2)
        self.assertEqual(ds.results, [None] * 4)
        self.assertEqual(net.peak, 2)

    def test_connect_failure_frees_the_slot(self) -> None:
        net = Hops(MemorySink(), InitiatorSettings(max_connections=1))
        hops = [net.hop("192.0.2.1"), net.hop("192.0.2.2")]
        refused: list[defer.Deferred[Any]] = []
        tcp = net.connect

        def connect(destination: NextHop, factory: Any) -> defer.Deferred[Any]:
            if destination == hops[0]:
                net.opened.append(destination)
                refused.append(defer.Deferred())
                return refused[-1]
            return tcp(destination, factory)

        net.client.connect = connect  # type: ignore[method-assign]
        ds = net.send_to(hops)
        self.assertEqual(net.opened, hops[:1])
        refused[0].errback(ConnectionRefusedError("refused"))
        net.flush()
        self.assertEqual(net.opened, hops)
        self.assertEqual(ds.types()[1], None)
        self.assertEqual(net.client.connections, 0)


class AddressRuleTests(LogMixin):
    def test_denied_literal_is_never_connected_to(self) -> None:
        net = Hops(MemorySink(), allows=no_loopback)
        ds = net.send_to([net.hop("127.0.0.1"), net.hop("192.0.2.1")])
        net.flush()
        self.assertEqual(net.opened, [net.hop("192.0.2.1")])
        self.assertEqual(ds.types(), [NextHopDenied, None])
        self.assertEqual(net.sink.stored, [make_packet(1)])
        self.assertEqual(net.client.stats["AttemptedConnect"], 1)
        self.assertEqual(net.client.stats["AttemptedRelay"], 1)

    def test_hostname_leading_to_a_denied_address_is_refused_after_connecting(self) -> None:
        net = Hops(HeldSink(), InitiatorSettings(max_connections=1), allows=no_loopback,
                   resolve={"evil.example": "127.0.0.1", "good.example": "192.0.2.7"})
        good, evil = net.hop("good.example"), net.hop("evil.example")
        ds = net.send_to([good, evil, evil])  # evil's two wait for the one connection
        net.flush()
        self.assertEqual(net.opened, [good])
        net.store(0)  # good's connection closes: evil connects, and is refused at once
        self.assertEqual(net.opened, [good, evil])
        self.assertEqual(ds.types(), [None, NextHopDenied, NextHopDenied])
        refused = net.initiators[1]
        self.assertIs(refused.phase, Phase.CLOSED)
        self.assertEqual(net.client.stats["SuccessfulConnect"], 1, "evil's TLS was not checked")
        self.assertIsNone(refused.machine.version, "no MMTP byte was sent")
        self.assertEqual([p for p, _ in net.sink.held], [make_packet(0)])
        self.assertEqual(net.client.connections, 0)
        self.assertEqual(net.client.stats["DeniedConnect"], 1)
        self.assertEqual(net.client.stats["FailedRelay"], 2)
        [warn] = self.expect_log("Refused to relay to a next hop", LogLevel.warn, count=1)
        self.assertNotIn("127.0.0.1", formatEvent(warn))
        self.assertNotIn("evil.example", formatEvent(warn))
        self.expect_log("Next hop evil.example:48099 connected at 127.0.0.1", LogLevel.debug,
                        count=1)

    def test_refused_hostname_frees_its_connection(self) -> None:
        net = Hops(MemorySink(), InitiatorSettings(max_connections=1), allows=no_loopback,
                   resolve={"evil.example": "127.0.0.1"})
        ds = net.send_to([net.hop("evil.example"), net.hop("192.0.2.1")])
        net.flush()
        self.assertEqual(ds.types(), [NextHopDenied, None])
        self.assertEqual(net.peak, 1)

    def test_rules_replaced_at_run_time(self) -> None:
        net = Hops(MemorySink())
        ds = net.send_to([net.hop("127.0.0.1")])
        net.flush()
        net.client.allows = no_loopback
        ds2 = net.send_to([net.hop("127.0.0.1")], first=1)
        net.flush()
        self.assertEqual((ds.types(), ds2.types()), ([None], [NextHopDenied]))
        self.assertEqual(len(net.opened), 1)

    def test_literal_address(self) -> None:
        self.assertEqual(literal_address("192.0.2.1"), "192.0.2.1")
        self.assertEqual(literal_address("::ffff:127.0.0.1"), "127.0.0.1")
        self.assertIsNone(literal_address("mix.example.org"))
        self.assertIsNone(literal_address("127.1"), "left to the check after connecting")
