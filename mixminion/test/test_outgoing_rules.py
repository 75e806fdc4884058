"""``[Outgoing/MMTP] Allow``/``Deny`` enforced by the outgoing queue
(server.md §14.6): a packet whose next hop is denied is removed and
counted as ``RelayDenied``, never connected to, and the operator sees one
warning per flush that names no address (§11).

Next hops given as IP literals are judged by the queue before MMTP sees
them; one given as a hostname is judged by the MMTP client on the address
TCP connected to, and the queue drops its packets the same way.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from mixminion.mmtp.initiator import (
    ConnectionFailed,
    NextHop,
    InitiatorSettings,
    MMTPClient,
)
from mixminion.mmtp.stats import MMTPStats
from mixminion.server.config import parse_config
from mixminion.server.items import encode_item
from mixminion.server.outgoing import Outgoing
from mixminion.server.queues import OUT
from mixminion.test.test_config import BASE
from mixminion.test.test_pipeline import StoreTestCase
from mixminion.testing.fakes import HeldClient, ListSink

KEYID = b"\x01" * 20
PACKET = bytes(32768)

#: a relay's configuration ending in [Outgoing/MMTP], so tests can append its rules
CONFIG = BASE


def no_loopback(ip: str, port: int) -> bool:
    """``Deny: 127.0.0.0/255.0.0.0`` and nothing else."""
    return not ip.startswith("127.")


class TrustingTLS:
    """No TLS runs on a StringTransport: the peer is taken as proved."""

    def authenticate(self, transport: Any, keyid: bytes, now: float) -> bytes:
        return keyid


class OutgoingRulesTests(StoreTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.logs = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def queue(self, *hops: tuple[str, int]) -> list[int]:
        meta = [encode_item(NextHop(host, port, KEYID)) for host, port in hops]
        return self.store.add_many(OUT, [PACKET] * len(hops), now=1000, meta=meta)

    def outgoing(self, client: Any, allows: Any = None) -> Outgoing:
        out = Outgoing(self.store, client, (60, 60), self.clock, b"\x07" * 20,
                       self.stats.count, ListSink(), reactor=reactor, allows=allows)
        self.addCleanup(out.stop)
        return out

    def logged(self, fragment: str, level: LogLevel) -> list[str]:
        return [formatEvent(e) for e in self.logs
                if e.get("log_level") == level and fragment in (formatEvent(e) or "")]

    def test_denied_literal_is_removed_counted_and_never_sent(self) -> None:
        client = HeldClient()
        self.queue(("127.0.0.1", 48099), ("127.0.0.1", 48099), ("127.8.9.10", 5000),
                   ("192.0.2.1", 48099), ("relay.example", 48099))
        out = self.outgoing(client, no_loopback)
        self.assertEqual(out.flush(), 2)
        # A hostname is not judged here: the MMTP client judges the address
        # it connects to.
        self.assertEqual(client.hosts, [("192.0.2.1", 48099), ("relay.example", 48099)])
        self.assertEqual(self.store.count(OUT), 2)
        self.assertEqual(self.stats["RelayDenied"], 3)
        [warn] = self.logged("Allow/Deny", LogLevel.warn)
        self.assertIn("Dropped 3 packets", warn)
        self.assertNotIn("127.", warn)
        self.assertEqual(len(self.logged("Next hop 127.", LogLevel.debug)), 2)  # per address
        self.assertNotIn(NextHop("127.0.0.1", 48099, KEYID), out.addresses)
        self.assertEqual(out.flush(), 0)
        self.assertEqual(self.stats["RelayDenied"], 3, "a removed packet is not counted twice")

    def test_no_rules_allow_everything(self) -> None:
        client = HeldClient()
        self.queue(("127.0.0.1", 48099), ("192.0.2.1", 48099))
        out = self.outgoing(client)
        self.assertEqual(out.flush(), 2)
        self.assertEqual(self.stats["RelayDenied"], 0)

    def test_first_matching_rule_wins(self) -> None:
        """The node's own rules: ``Allow`` (port 48099 only by default)
        before a wider ``Deny``, and the other way round."""
        allow_first = parse_config(CONFIG + "Allow: 127.0.0.2\nDeny: 127.0.0.0/255.0.0.0\n")
        deny_first = parse_config(CONFIG + "Deny: 127.0.0.0/255.0.0.0\nAllow: 127.0.0.2\n")
        hops = [("127.0.0.2", 48099), ("127.0.0.2", 48100), ("127.0.0.1", 48099),
                ("192.0.2.1", 48099)]
        client = HeldClient()
        self.queue(*hops)
        out = self.outgoing(client, allow_first.outgoing.allows)
        self.assertEqual(out.flush(), 2)
        self.assertEqual(client.hosts, [("127.0.0.2", 48099), ("192.0.2.1", 48099)])
        self.assertEqual(self.stats["RelayDenied"], 2)
        for _, d in client.sent:
            d.errback(ConnectionFailed("down"))
        # After a SIGHUP to the other order: denied, even while the
        # address waits for its retry.
        out.allows = deny_first.outgoing.allows
        self.assertEqual(out.flush(), 0)
        self.assertEqual(self.stats["RelayDenied"], 3)
        self.assertEqual(self.store.count(OUT), 1)

    async def test_hostname_leading_to_a_denied_address_is_dropped(self) -> None:
        """The MMTP client connects, sees 127.0.0.1, sends nothing; the
        queue removes the packets without marking the address failed."""
        client = MMTPClient(self.clock, TrustingTLS(), InitiatorSettings(), MMTPStats(),
                            allows=no_loopback)  # type: ignore[arg-type]
        connecting: list[tuple[NextHop, Any, defer.Deferred[Any]]] = []

        def connect(destination: NextHop, factory: Any) -> defer.Deferred[Any]:
            connecting.append((destination, factory, defer.Deferred()))
            return connecting[-1][2]

        client.connect = connect  # type: ignore[method-assign]
        self.queue(("relay.example", 48099), ("relay.example", 48099))
        out = self.outgoing(client, no_loopback)
        self.assertEqual(out.flush(), 2)
        self.assertEqual(len(connecting), 1)
        # TCP connects: "relay.example" was 127.0.0.1.
        destination, factory, connected = connecting[0]
        protos = [factory.buildProtocol(None)]
        transports = [StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 48099))]
        protos[0].makeConnection(transports[0])
        connected.callback(protos[0])
        self.assertEqual(transports[0].value(), b"", "no MMTP byte was sent")
        self.assertTrue(transports[0].disconnected)
        protos[0].connectionLost(Failure(ConnectionAborted()))
        self.assertEqual(client.connections, 0)
        await out.stop()  # the removal is written
        self.assertEqual(self.store.count(OUT), 0)
        self.assertEqual(self.stats["RelayDenied"], 2)
        dest = NextHop("relay.example", 48099, KEYID)
        self.assertTrue(dest not in out.addresses or out.addresses[dest].first_failure is None,
                        "a denied hop is not a failing one")
        self.assertEqual(client.stats["DeniedConnect"], 1)

    async def test_client_rules_alone_drop_a_literal(self) -> None:
        """If only the MMTP client has the rules, the packet still leaves
        the queue, with no connection."""
        client = MMTPClient(self.clock, TrustingTLS(), InitiatorSettings(), MMTPStats(),
                            allows=no_loopback)  # type: ignore[arg-type]

        def connect(destination: NextHop, factory: Any) -> defer.Deferred[Any]:
            raise AssertionError("connected to a denied address")

        client.connect = connect  # type: ignore[method-assign]
        self.queue(("127.0.0.1", 48099))
        out = self.outgoing(client)
        out.flush()
        await out.stop()
        self.assertEqual(self.store.count(OUT), 0)
        self.assertEqual(self.stats["RelayDenied"], 1)
        self.assertEqual(client.stats["AttemptedConnect"], 0)
