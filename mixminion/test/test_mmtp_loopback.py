"""MMTP over real sockets: real TLS, real TCP on 127.0.0.1 and ::1, a real
DurableSink (SQLite WAL, group commit in a worker thread) on a temporary
directory, on the global reactor.

The happy paths prove that every packet acknowledged RECEIVED is on disk,
byte for byte, by reopening the store after the node stopped.  The
adversarial peers are small scripted protocols (raw TCP, or TLS built with
``InitiatorTLS``) that break one rule each; every one must end with the
connection closed, a log line an operator can act on, and nothing stored.

Waits are Deferreds with short deadlines (never ``time.sleep``); the only
real-time wait is the slowloris test's 0.5 s frame deadline.
"""

from __future__ import annotations

import functools
import os
import random
import resource
import warnings
from typing import Any, Callable, Coroutine, Optional, TypeVar

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from mixminion.mmtp.initiator import (
    LINK_CONNECT,
    LINK_REJECTED,
    LINK_TLS,
    CannotConnect,
    HandshakeFailed,
    NextHop,
    InitiatorSettings,
    MMTPClient,
    PacketRejected,
    PeerAuthenticationFailed,
    link_failure,
)
from mixminion.mmtp.interfaces import IPacketSink
from mixminion.mmtp.limits import ConnectionLimits, NetworkRule, NetworkRules
from mixminion.mmtp.responder import GuardedTLSFactory, responder_factory
from mixminion.mmtp.stats import MMTPStats
from mixminion.mmtp.tls import InitiatorTLS, ResponderTLS
from mixminion.server.durable import DurableSink
from mixminion.server.packetstore import PacketStore, PacketStoreError
from mixminion.test.test_mmtp_protocol import make_packet, send_frame
from mixminion.testing.keys import key
from mixminion.testing.sockets import can_bind, have_ipv6_loopback

PACKET_LEN = 32768
VERSION_LINE = b"MMTP 0.3\r\n"
DEADLINE = 10.0  # seconds any single wait may take before the test fails
T = TypeVar("T")


# ------------------------------------------------------------------ helpers


SECOND_LOOPBACK = "127.0.0.2"


def need_second_loopback() -> None:
    if not can_bind(SECOND_LOOPBACK):
        raise unittest.SkipTest(f"cannot bind {SECOND_LOOPBACK}: the well-behaved client "
                                "needs a loopback address other than the flood's 127.0.0.1")


def inline(fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., defer.Deferred[T]]:
    """Run an ``async def`` test as the Deferred trial waits for."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> defer.Deferred[T]:
        return defer.ensureDeferred(fn(*args))

    return wrapper


def within(d: defer.Deferred[T], what: str, seconds: float = DEADLINE) -> defer.Deferred[T]:
    """``d``, failed with a readable error if it takes longer than ``seconds``."""

    def timed_out(failure: Failure) -> Failure:
        if failure.check(defer.TimeoutError):
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        return failure

    return d.addTimeout(seconds, reactor).addErrback(timed_out)


async def wait_until(condition: Callable[[], bool], what: str,
                     seconds: float = DEADLINE) -> None:
    """Poll ``condition`` on the reactor (every 5 ms) for state that emits
    no event of its own, such as a counter reaching zero."""
    deadline = reactor.seconds() + seconds
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting until {what}")
        await deferLater(reactor, 0.005, lambda: None)


class LogWatch:
    """Every twisted.logger event during one test, with waits for lines
    that other processes' sides of a socket emit a little later."""

    def __init__(self, test: unittest.TestCase) -> None:
        self.events: list[dict[str, Any]] = []
        self._waiters: list[tuple[Callable[[], bool], defer.Deferred[None]]] = []
        globalLogPublisher.addObserver(self)
        test.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        for waiter in list(self._waiters):
            if waiter[0]():
                self._waiters.remove(waiter)
                waiter[1].callback(None)

    def matching(self, fragment: str, level: LogLevel) -> list[dict[str, Any]]:
        return [e for e in self.events
                if e.get("log_level") == level and fragment in (formatEvent(e) or "")]

    def ours(self) -> list[str]:
        return [f"{e['log_level'].name}: {formatEvent(e)}" for e in self.events
                if e.get("log_namespace", "").startswith("mixminion")]

    def wait_for(self, fragment: str, level: LogLevel, count: int = 1) -> defer.Deferred[None]:
        """Fires once ``count`` lines containing ``fragment`` were logged."""

        def seen() -> bool:
            return len(self.matching(fragment, level)) >= count

        if seen():
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        waiter = (seen, d)
        self._waiters.append(waiter)

        def timed_out(failure: Failure) -> None:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            raise AssertionError(f"{count} {level.name} line(s) containing {fragment!r} "
                                 f"never came; saw {self.ours()}")

        return d.addTimeout(DEADLINE, reactor).addErrback(timed_out)

    def initiator_closes(self) -> int:
        """Initiator connections that ended, cleanly or not."""
        return (len(self.matching("MMTP connection to a next hop closed after", LogLevel.debug))
                + len(self.matching("MMTP connection to a next hop lost with", LogLevel.info)))


@implementer(IPacketSink)
class RecordingSink:
    """The durable sink, plus a record of which peer sent each packet."""

    def __init__(self, inner: DurableSink) -> None:
        self.inner = inner
        self.peers: list[str] = []

    def receivePacket(self, packet: bytes, peer: str) -> defer.Deferred[Any]:  # noqa: N802
        self.peers.append(peer)
        return self.inner.receivePacket(packet, peer)


class BrokenStore(PacketStore):
    """A store whose disk fails on every write (read side still works)."""

    def add_many(self, *args: Any, **kwargs: Any) -> list[int]:
        raise PacketStoreError("cannot store packets: disk I/O error")


class Node:
    """A responder listening on loopback, storing into SQLite on disk."""

    def __init__(self, test: unittest.TestCase, host: str = "127.0.0.1",
                 limits: Optional[ConnectionLimits] = None,
                 rules: Optional[NetworkRules] = None,
                 store_class: type[PacketStore] = PacketStore) -> None:
        directory = test.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, "incoming.db")
        self.store = store_class(self.path)
        self.sink = RecordingSink(DurableSink(self.store, reactor))
        self.stats = MMTPStats()
        self.tls = ResponderTLS(key("responder"), "Lisbon", clock=reactor)
        self.factory: GuardedTLSFactory = responder_factory(
            self.sink, self.tls, reactor, limits, rules, self.stats)
        self.host = host
        # Room for the 500-connection flood to queue before we accept.
        self.port = reactor.listenTCP(0, self.factory, backlog=1024, interface=host)
        self.port_number: int = self.port.getHost().port
        self.stopped = False
        test.addCleanup(lambda: defer.ensureDeferred(self.stop()))

    def destination(self, expect: str = "responder") -> NextHop:
        return NextHop(self.host, self.port_number, key(expect).public.keyid)

    def open_connections(self) -> int:
        return self.factory.counter.total + len(self.factory.protocols)

    async def stop(self) -> None:
        """Stop listening, drop connections, finish writes, close the store."""
        if self.stopped:
            return
        self.stopped = True
        await self.port.stopListening()
        for proto in list(self.factory.protocols):
            proto.abortConnection()
        await wait_until(lambda: self.open_connections() == 0, "the node's connections closed")
        await self.sink.inner.stop()
        self.store.close()

    def on_disk(self) -> list[bytes]:
        """What a fresh PacketStore finds in the file after the node stopped."""
        assert self.stopped, "stop the node first: its writes must be finished"
        store = PacketStore(self.path)
        try:
            return [packet for _, packet in store.iterate("incoming")]
        finally:
            store.close()


class RawPeer(Protocol):
    """A scripted peer that speaks whatever the test writes."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.reason: Optional[Failure] = None
        self.lost: defer.Deferred[None] = defer.Deferred()
        self._wants: list[tuple[int, defer.Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data
        for want in list(self._wants):
            if len(self.received) >= want[0]:
                self._wants.remove(want)
                want[1].callback(bytes(self.received))

    def wait_bytes(self, n: int) -> defer.Deferred[bytes]:
        if len(self.received) >= n:
            return defer.succeed(bytes(self.received))
        d: defer.Deferred[bytes] = defer.Deferred()
        self._wants.append((n, d))
        return within(d, f"{n} bytes from the responder")

    def connectionLost(self, reason: Failure = None) -> None:  # noqa: N802
        for _, d in self._wants:
            d.errback(AssertionError(f"connection lost before the expected bytes: {reason}"))
        self._wants = []
        self.reason = reason
        self.lost.callback(None)


@implementer(IHandshakeListener)
class RawTLSPeer(RawPeer):
    """A scripted peer over TLS made with InitiatorTLS (no MMTP logic)."""

    def __init__(self) -> None:
        super().__init__()
        self.handshake: defer.Deferred[None] = defer.Deferred()

    def handshakeCompleted(self) -> None:  # noqa: N802
        self.handshake.callback(None)


class LoopbackCase(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.logs = LogWatch(self)

    def client(self, bind: Optional[str] = None, **settings: Any) -> MMTPClient:
        bind_address = (bind, 0) if bind is not None else None
        client = MMTPClient(reactor, InitiatorTLS(),
                            InitiatorSettings(bind_address=bind_address, **settings))
        self.addCleanup(client.close)
        return client

    async def raw(self, node: Node, tls: bool = False,
                  bind: Optional[str] = None) -> Any:
        """Connect a scripted peer to ``node`` from ``bind`` (a loopback address)."""
        peer = RawTLSPeer() if tls else RawPeer()
        endpoint_class = TCP6ClientEndpoint if ":" in node.host else TCP4ClientEndpoint
        endpoint = endpoint_class(reactor, node.host, node.port_number, timeout=DEADLINE,
                                  bindAddress=(bind, 0) if bind else None)
        if tls:
            factory = TLSMemoryBIOFactory(InitiatorTLS(), True, Factory.forProtocol(lambda: peer))
            await within(endpoint.connect(factory), "TCP connect")
        else:
            await within(connectProtocol(endpoint, peer), "TCP connect")
        self.addCleanup(self._drop, peer)
        return peer

    async def raw_mmtp(self, node: Node) -> RawTLSPeer:
        """A scripted peer that got through TLS and the version exchange."""
        peer = await self.raw(node, tls=True)
        await within(peer.handshake, "the TLS handshake")
        peer.transport.write(VERSION_LINE)
        self.assertEqual(await peer.wait_bytes(len(VERSION_LINE)), VERSION_LINE)
        return peer

    def _drop(self, peer: RawPeer) -> defer.Deferred[Any]:
        if not peer.lost.called:
            peer.transport.abortConnection()
        return peer.lost

    async def send_all(self, client: MMTPClient, destination: NextHop,
                       packets: list[bytes]) -> list[tuple[bool, Any]]:
        ds = [client.send_packet(destination, p) for p in packets]
        return await within(defer.DeferredList(ds, consumeErrors=True),
                            f"{len(packets)} acknowledgements")

    async def settle(self, node: Node, client: Optional[MMTPClient] = None) -> None:
        """Wait until every connection has closed on both sides."""
        if client is not None:
            opened = client.stats["AttemptedConnect"] - client.stats["FailedConnect"]
            await wait_until(lambda: self.logs.initiator_closes() >= opened,
                             f"the client's {opened} connections closed")
        await wait_until(lambda: node.open_connections() == 0, "the node's connections closed")

    def responder_closes(self) -> list[dict[str, Any]]:
        return self.logs.matching("MMTP connection closed (version", LogLevel.debug)


# ------------------------------------------------------------ happy paths


class DeliveryTests(LoopbackCase):
    @inline
    async def test_thousand_packets_reach_the_disk(self) -> None:
        node = Node(self)
        client = self.client()
        packets = [os.urandom(PACKET_LEN) for _ in range(1000)]
        results = await self.send_all(client, node.destination(), packets)
        self.assertEqual([ok for ok, _ in results], [True] * 1000)
        await self.settle(node, client)
        await node.stop()
        on_disk = node.on_disk()
        self.assertEqual(len(on_disk), 1000)
        self.assertEqual(sorted(on_disk), sorted(packets))
        self.assertEqual(client.stats["SuccessfulRelay"], 1000)
        self.assertEqual(node.stats["ReceivedPacket"], 1000)
        self.assertEqual(node.stats["ProtocolError"] + node.stats["RejectedPacket"], 0)
        closes = self.responder_closes()
        self.assertEqual(len(closes), client.stats["SuccessfulConnect"])
        self.assertEqual(sum(e["stored"] for e in closes), 1000)
        self.assertEqual(self.logs.initiator_closes(), len(closes))
        # One outgoing connection is not four lines of Twisted's factory log.
        self.assertEqual([e["log_namespace"] for e in self.logs.matching("Starting factory",
                                                                         LogLevel.info)],
                         ["mixminion.mmtp.responder.MMTPResponderFactory"])

    @inline
    async def test_ipv6_listener(self) -> None:
        if not have_ipv6_loopback():
            raise unittest.SkipTest("this machine cannot bind a TCP socket to ::1")
        node = Node(self, host="::1")
        client = self.client()
        packets = [make_packet(n) for n in range(20)]
        results = await self.send_all(client, node.destination(), packets)
        self.assertEqual([ok for ok, _ in results], [True] * 20)
        await self.settle(node, client)
        self.assertEqual(node.sink.peers, ["::1"] * 20)
        [closed] = self.responder_closes()
        self.assertEqual(closed["stored"], 20)
        await node.stop()
        self.assertEqual(sorted(node.on_disk()), sorted(packets))


    @inline
    async def test_refused_connect_fails_every_packet(self) -> None:
        """Nobody listening: every packet fails, retriably (§11)."""
        node = Node(self)
        await node.stop()  # the port is closed now
        client = self.client()
        results = await self.send_all(client, node.destination(),
                                      [make_packet(n) for n in range(2)])
        self.assertEqual([type(r.value) for _, r in results], [CannotConnect] * 2)
        self.assertEqual([link_failure(r) for _, r in results], [LINK_CONNECT] * 2)
        self.assertTrue(str(results[0][1].value).startswith("cannot connect: "))
        self.assertEqual(client.stats["FailedConnect"], 1)
        await self.logs.wait_for("Could not connect to a next hop", LogLevel.info)


    @inline
    async def test_a_peer_that_never_does_tls_is_a_handshake_failure(self) -> None:
        """TCP accepted, then silence or a close: the packets fail as a
        TLS failure (what the pinger records against a first hop), not as a
        connect failure."""
        for ending in ("silent", "closes"):
            port = reactor.listenTCP(0, Factory.forProtocol(
                lambda ending=ending: _TCPOnly(ending)), interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            client = self.client(handshake_timeout=0.5)
            results = await self.send_all(
                client, NextHop("127.0.0.1", port.getHost().port, b"k" * 20), [make_packet(1)])
            [(ok, failure)] = results
            self.assertFalse(ok)
            self.assertIsInstance(failure.value, HandshakeFailed, ending)
            self.assertEqual(link_failure(failure), LINK_TLS, ending)


class _TCPOnly(Protocol):
    """Accepts TCP and never speaks TLS: stays silent, or closes at once."""

    def __init__(self, ending: str) -> None:
        self.ending = ending

    def connectionMade(self) -> None:  # noqa: N802
        if self.ending == "closes":
            self.transport.loseConnection()


# ---------------------------------------------------------- adversarial


class AdversaryTests(LoopbackCase):
    async def assert_nothing_stored(self, node: Node) -> None:
        await self.settle(node)
        await node.stop()
        self.assertEqual(node.on_disk(), [])
        self.assertEqual(node.stats["ReceivedPacket"], 0)

    @inline
    async def test_garbage_instead_of_tls(self) -> None:
        node = Node(self)
        peer = await self.raw(node)
        peer.transport.write(random.Random(7).randbytes(4096))
        await within(peer.lost, "the responder to close")
        self.assertEqual(bytes(peer.received), b"")
        await self.logs.wait_for("MMTP connection closed during the TLS handshake",
                                 LogLevel.info)
        self.assertEqual(node.stats["ReceivedConnection"], 1)
        await self.assert_nothing_stored(node)

    @inline
    async def test_garbage_after_the_handshake(self) -> None:
        node = Node(self)
        peer = await self.raw(node, tls=True)
        await within(peer.handshake, "the TLS handshake")
        garbage = bytes(b if b != 0x0A else 0x0B for b in random.Random(8).randbytes(8192))
        peer.transport.write(garbage)
        await within(peer.lost, "the responder to close")
        self.assertEqual(bytes(peer.received), b"", "no reply to garbage")
        await self.logs.wait_for("MMTP peer broke the protocol (line_too_long)", LogLevel.info)
        self.assertEqual(node.stats["ProtocolError"], 1)
        await self.assert_nothing_stored(node)

    @inline
    async def test_wrong_protocol_version(self) -> None:
        node = Node(self)
        peer = await self.raw(node, tls=True)
        await within(peer.handshake, "the TLS handshake")
        peer.transport.write(b"MMTP 0.2\r\n")
        await within(peer.lost, "the responder to close")
        self.assertEqual(bytes(peer.received), b"", "no reply to an unknown version (§6)")
        await self.logs.wait_for("MMTP peer broke the protocol (no_common_version)",
                                 LogLevel.info)
        await self.assert_nothing_stored(node)

    @inline
    async def test_truncated_packet(self) -> None:
        node = Node(self)
        peer = await self.raw_mmtp(node)
        peer.transport.write(send_frame(make_packet(1))[:20000])
        peer.transport.loseConnection()
        await within(peer.lost, "the connection to close")
        self.assertEqual(bytes(peer.received), VERSION_LINE)
        await self.logs.wait_for("MMTP peer broke the protocol (truncated_frame)", LogLevel.info)
        await self.assert_nothing_stored(node)

    @inline
    async def test_wrong_digest(self) -> None:
        node = Node(self)
        peer = await self.raw_mmtp(node)
        frame = bytearray(send_frame(make_packet(2)))
        frame[-1] ^= 0x80
        peer.transport.write(bytes(frame))
        await within(peer.lost, "the responder to close")
        self.assertEqual(bytes(peer.received), VERSION_LINE, "no acknowledgement")
        await self.logs.wait_for("MMTP peer broke the protocol (bad_digest)", LogLevel.info)
        await self.assert_nothing_stored(node)

    @inline
    async def test_slowloris_is_timed_out(self) -> None:
        node = Node(self, limits=ConnectionLimits(frame_timeout=0.5, idle_timeout=30))
        peer = await self.raw_mmtp(node)
        peer.transport.write(send_frame(make_packet(3))[:1000])
        started = reactor.seconds()
        await within(peer.lost, "the frame deadline", seconds=5)
        self.assertGreaterEqual(reactor.seconds() - started, 0.45)
        self.assertEqual(bytes(peer.received), VERSION_LINE)
        await self.logs.wait_for("MMTP connection closed: partial frame timed out",
                                 LogLevel.info)
        self.assertEqual(node.stats["TimedOut"], 1)
        await self.assert_nothing_stored(node)

    @inline
    async def test_flood_from_one_address(self) -> None:
        """500 idle TCP connections from 127.0.0.1; max_per_source keeps
        the node serving a client on 127.0.0.2."""
        flood = 500
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 2 * flood + 200:  # both ends of each connection are ours
            flood = (soft - 200) // 2
            warnings.warn(f"RLIMIT_NOFILE={soft}: flood lowered to {flood} connections")
        need_second_loopback()
        per_source = 8
        node = Node(self, limits=ConnectionLimits(max_per_source=per_source,
                                                  handshake_timeout=60))
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", node.port_number, timeout=DEADLINE)
        peers = [RawPeer() for _ in range(flood)]
        for peer in peers:
            self.addCleanup(self._drop, peer)
        await within(defer.gatherResults([connectProtocol(endpoint, p) for p in peers]),
                     f"{flood} TCP connects")
        refused = flood - per_source
        await self.logs.wait_for("MMTP connection refused: too many connections from one "
                                 "address", LogLevel.info, count=refused)
        await wait_until(lambda: sum(p.lost.called for p in peers) >= refused,
                         "the refused connections to close")
        self.assertEqual(node.factory.counter.per_source, {"127.0.0.1": per_source})

        client = self.client(bind=SECOND_LOOPBACK)
        packets = [make_packet(n) for n in range(20)]
        results = await self.send_all(client, node.destination(), packets)
        self.assertEqual([ok for ok, _ in results], [True] * 20)
        self.assertEqual(node.sink.peers, [SECOND_LOOPBACK] * 20)
        self.assertEqual(sum(p.lost.called for p in peers), refused, "the flood's 8 stay")
        self.assertEqual(node.stats["RefusedConnection"], refused)

        await defer.gatherResults([self._drop(p) for p in peers])
        await self.settle(node, client)
        await node.stop()
        self.assertEqual(sorted(node.on_disk()), sorted(packets))

    @inline
    async def test_wrong_identity_key(self) -> None:
        node = Node(self)
        client = self.client()
        results = await self.send_all(client, node.destination(expect="impostor"),
                                      [make_packet(n) for n in range(3)])
        self.assertEqual([type(r.value) for _, r in results], [PeerAuthenticationFailed] * 3)
        self.assertEqual([link_failure(r) for _, r in results], [LINK_TLS] * 3)
        self.assertEqual(client.stats["KeyIdMismatch"], 1)
        self.assertEqual(client.stats["SuccessfulConnect"], 0)
        await self.logs.wait_for("Next hop's identity key does not match its routing info",
                                 LogLevel.warn)
        await self.settle(node, client)
        [closed] = self.responder_closes()
        self.assertEqual((closed["version"], closed["frames"]), (None, 0), "MMTP bytes were sent")
        await self.assert_nothing_stored(node)

    @inline
    async def test_failing_sink_answers_rejected(self) -> None:
        node = Node(self, store_class=BrokenStore)
        client = self.client()
        results = await self.send_all(client, node.destination(),
                                      [make_packet(n) for n in range(3)])
        self.assertEqual([type(r.value) for _, r in results], [PacketRejected] * 3)
        self.assertEqual([link_failure(r) for _, r in results], [LINK_REJECTED] * 3)
        self.assertEqual(node.stats["RejectedPacket"], 3)
        self.assertEqual(client.stats["FailedRelay"], 3)
        await self.logs.wait_for("Packet refused by storage; answering REJECTED", LogLevel.warn,
                                 count=3)
        # DurableSink logs each failed batch's traceback; those are expected.
        self.assertTrue(self.flushLoggedErrors(PacketStoreError))
        await self.settle(node, client)
        await self.assert_nothing_stored(node)

    @inline
    async def test_address_rules_enforced_at_accept(self) -> None:
        need_second_loopback()
        rules = NetworkRules([NetworkRule.parse("deny", "127.0.0.1"),
                              NetworkRule.parse("allow", "127.0.0.0/8"),
                              NetworkRule.parse("deny", "*")])
        node = Node(self, rules=rules)
        peer = await self.raw(node, tls=True)  # sends its ClientHello at once
        await within(peer.lost, "the denied connection to close")
        self.assertFalse(peer.handshake.called)
        self.assertEqual(bytes(peer.received), b"")
        self.assertEqual(node.stats["DeniedConnection"], 1)
        self.assertEqual(node.stats["ReceivedConnection"], 0, "TLS was reached")
        self.assertEqual(self.logs.matching("MMTP connection refused by address rules",
                                            LogLevel.info).__len__(), 1)

        client = self.client(bind=SECOND_LOOPBACK)
        packets = [make_packet(n) for n in range(5)]
        results = await self.send_all(client, node.destination(), packets)
        self.assertEqual([ok for ok, _ in results], [True] * 5)
        self.assertEqual(node.sink.peers, [SECOND_LOOPBACK] * 5)
        await self.settle(node, client)
        await node.stop()
        self.assertEqual(sorted(node.on_disk()), sorted(packets))
