"""The MMTP initiator: sending packets to other servers.

:class:`MMTPInitiatorProtocol` wraps an :class:`InitiatorMachine` for one
TLS connection: after the handshake it checks that the peer's chain is
certified by the identity key the routing info names, negotiates the
version, and pipelines frames (six in flight by default).  Each packet has
a Deferred that fires on RECEIVED and fails on REJECTED or on any loss of
the connection, so the caller keeps its copy until the peer has it.

:class:`MMTPClient` queues packets on one connection per destination, at
most ``max_packets_per_connection`` on each; the next connection opens
while the full one still waits for its acknowledgements (at most
``connections_per_destination`` at once).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mixminion.mmtp.machine import (
    NEED_DATA,
    Acknowledged,
    InitiatorMachine,
    ProtocolError,
    VersionAgreed,
)
from mixminion.mmtp.stats import MMTPStats
from mixminion.mmtp.timers import Timers
from mixminion.mmtp.transport import set_no_delay
from mixminion.mmtp.tls import InitiatorTLS, KeyIdMismatch, TLSVerificationError

PACKET_LEN = 32768


class MMTPError(Exception):
    """A packet did not reach the next hop; it may be retried."""


class PacketRejected(MMTPError):
    """The peer answered REJECTED (it could not store the packet)."""


class ConnectionFailed(MMTPError):
    """The connection failed or broke before the packet was acknowledged."""


class PeerAuthenticationFailed(ConnectionFailed):
    """The peer's certificate chain did not prove the expected identity."""


@dataclass(frozen=True)
class Destination:
    """A next hop: where to connect and which identity to expect."""

    host: str
    port: int
    keyid: bytes


@dataclass
class _Item:
    data: bytes
    junk: bool
    deferred: defer.Deferred = field(default_factory=defer.Deferred)


@dataclass
class InitiatorSettings:
    writeahead: int = 6
    max_packets_per_connection: int = 1000
    connect_timeout: float = 60.0
    handshake_timeout: float = 60.0
    idle_timeout: float = 300.0
    #: how long to wait for the peer's TLS close_notify after ours; a peer
    #: that never answers would otherwise hold the destination forever
    close_timeout: float = 30.0
    #: open connections to one destination: one accepts new packets while
    #: the one before it waits for its last acknowledgements
    connections_per_destination: int = 2
    #: local address to connect from (None: the system's choice)
    bind_address: Optional[tuple[str, int]] = None


@implementer(IHandshakeListener)
class MMTPInitiatorProtocol(Protocol):
    log = Logger()

    def __init__(self, destination: Destination, tls: InitiatorTLS, clock: IReactorTime,
                 settings: InitiatorSettings, stats: MMTPStats,
                 on_done: Callable[["MMTPInitiatorProtocol"], None]) -> None:
        self.destination = destination
        self.tls = tls
        self.clock = clock
        self.settings = settings
        self.stats = stats
        self.on_done = on_done
        self.machine: InitiatorMachine[_Item] = InitiatorMachine(writeahead=settings.writeahead)
        self.timers = Timers(clock)
        self.queued = 0
        self.acked = 0
        self.closing = False
        self.authenticated = False
        self._failure: Optional[Failure] = None

    # --- used by the client ------------------------------------------------

    @property
    def accepting(self) -> bool:
        """Whether more packets may still be queued on this connection."""
        return (not self.closing and not self.machine.dead
                and self.queued < self.settings.max_packets_per_connection)

    def queue(self, item: _Item) -> None:
        self.queued += 1
        if item.junk:
            self.machine.queue_junk(item.data, item)
        else:
            self.machine.queue_packet(item.data, item)
        if self.authenticated:
            self._flush()

    # --- connection lifecycle ------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        set_no_delay(self.transport)
        self.timers.start("handshake", self.settings.handshake_timeout,
                          lambda: self._fail(ConnectionFailed("TLS handshake timed out")))

    def handshakeCompleted(self) -> None:  # noqa: N802
        self.timers.cancel("handshake")
        try:
            self.tls.authenticate(self.transport, self.destination.keyid, self.clock.seconds())
        except KeyIdMismatch as exc:
            self.stats.count("KeyIdMismatch")
            self.log.warn("Next hop's identity key does not match its routing info: {why}",
                          why=str(exc))
            self._fail(PeerAuthenticationFailed(str(exc)))
            return
        except TLSVerificationError as exc:
            self.stats.count("FailedConnect")
            self.log.warn("Next hop failed certificate verification: {why}", why=str(exc))
            self._fail(PeerAuthenticationFailed(str(exc)))
            return
        self.authenticated = True
        self.stats.count("SuccessfulConnect")
        self.transport.write(self.machine.start())
        self._touch()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self._touch()
        try:
            self.machine.receive_data(data)
            while True:
                event = self.machine.next_event()
                if event is NEED_DATA:
                    break
                if isinstance(event, Acknowledged):
                    self._acknowledged(event.item, event.accepted)
                elif isinstance(event, VersionAgreed):
                    pass
        except ProtocolError as exc:
            self.stats.count("ProtocolError")
            self.log.info("Next hop broke the MMTP protocol ({code})", code=exc.code)
            self._fail(ConnectionFailed(f"protocol error: {exc.code}"))
            return
        self._flush()

    def _acknowledged(self, item: _Item, accepted: bool) -> None:
        self.acked += 1
        if accepted:
            if not item.junk:
                self.stats.count("SuccessfulRelay")
            item.deferred.callback(None)
        else:
            if not item.junk:
                self.stats.count("FailedRelay")
            item.deferred.errback(PacketRejected("the next hop answered REJECTED"))

    def _flush(self) -> None:
        if self.machine.dead:
            return
        out = self.machine.data_to_send()
        if out:
            self.transport.write(out)
        if self.machine.version is not None and self.machine.finished:
            # Everything acknowledged: close (mmtp.md §7.4 step 3); packets
            # that come later open a new connection.
            self._close()

    def _close(self) -> None:
        if not self.closing:
            self.closing = True
            self.machine.close()
            self.timers.cancel_all()
            # Until connectionLost the client keeps this connection as the
            # destination's, so a peer that never answers our close_notify
            # must not hold it (and the packets waiting for it) forever.
            self.timers.start("close", self.settings.close_timeout, self._close_timed_out)
            self.transport.loseConnection()

    def _close_timed_out(self) -> None:
        self.stats.count("TimedOut")
        self.log.info("Next hop did not finish closing the MMTP connection; aborting it")
        self.transport.abortConnection()

    def _touch(self) -> None:
        self.timers.restart("idle", self.settings.idle_timeout,
                            lambda: self._fail(ConnectionFailed("connection timed out")))

    def _fail(self, error: Exception) -> None:
        if self._failure is None:
            self._failure = Failure(error)
        self.closing = True
        self.timers.cancel_all()
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # noqa: N802
        self.closing = True
        self.timers.cancel_all()
        failure = self._failure or Failure(ConnectionFailed(
            f"connection lost: {reason.getErrorMessage() if reason else 'unknown'}"))
        outstanding = [i for i in self.machine.outstanding() if not i.deferred.called]
        if outstanding:
            self.log.info("MMTP connection to a next hop lost with {count} packets "
                          "unacknowledged: {why}", count=len(outstanding),
                          why=failure.getErrorMessage())
        else:
            self.log.debug("MMTP connection to a next hop closed after {acked} "
                           "acknowledgements", acked=self.acked)
        for item in outstanding:
            if not item.junk:
                self.stats.count("FailedRelay")
            item.deferred.errback(failure)
        self.on_done(self)


class _InitiatorFactory(Factory):
    def __init__(self, build: Callable[[], MMTPInitiatorProtocol]) -> None:
        self._build = build

    def buildProtocol(self, addr):  # noqa: N802
        return self._build()


class MMTPClient:
    """Sends packets to next hops, reusing connections per destination.

    ``connect`` may be replaced in tests: it takes a destination and a
    protocol factory and returns a Deferred firing with the connected
    protocol (by default TCP via ``HostnameEndpoint``, wrapped in TLS).
    """

    log = Logger()

    def __init__(self, reactor, tls: Optional[InitiatorTLS] = None,
                 settings: Optional[InitiatorSettings] = None,
                 stats: Optional[MMTPStats] = None) -> None:
        self.reactor = reactor
        self.tls = tls or InitiatorTLS()
        self.settings = settings or InitiatorSettings()
        self.stats = stats or MMTPStats()
        self._active: dict[Destination, MMTPInitiatorProtocol] = {}
        self._connecting: dict[Destination, list[_Item]] = {}
        self._waiting: dict[Destination, list[_Item]] = {}
        #: connections per destination, connecting or open
        self._live: dict[Destination, int] = {}
        #: every open connection, including full ones no longer in _active
        self._protocols: set[MMTPInitiatorProtocol] = set()

    def send_packet(self, destination: Destination, packet: bytes) -> defer.Deferred:
        """Deferred firing when ``destination`` acknowledges RECEIVED."""
        if len(packet) != PACKET_LEN:
            return defer.fail(ValueError("MMTP packets are 32768 bytes"))
        self.stats.count("AttemptedRelay")
        return self._enqueue(destination, _Item(packet, False))

    def send_junk(self, destination: Destination) -> defer.Deferred:
        """Send one JUNK frame (link padding, or a liveness check)."""
        return self._enqueue(destination, _Item(os.urandom(PACKET_LEN), True))

    def _enqueue(self, destination: Destination, item: _Item) -> defer.Deferred:
        proto = self._active.get(destination)
        if proto is not None and proto.accepting:
            proto.queue(item)
        elif destination in self._connecting:
            self._connecting[destination].append(item)
        elif self._live.get(destination, 0) < self.settings.connections_per_destination:
            self._open(destination, [item])
        else:
            self._waiting.setdefault(destination, []).append(item)
        return item.deferred

    def _open(self, destination: Destination, items: list[_Item]) -> None:
        """Connect for ``items``; a full connection keeps draining its
        acknowledgements while the next one does its handshake."""
        self._connecting[destination] = items
        self._live[destination] = self._live.get(destination, 0) + 1
        self.stats.count("AttemptedConnect")

        def build() -> MMTPInitiatorProtocol:
            return MMTPInitiatorProtocol(destination, self.tls, self.reactor, self.settings,
                                         self.stats, self._finished)

        d = self.connect(destination, _InitiatorFactory(build))
        d.addCallbacks(self._connected, self._connect_failed,
                       callbackArgs=(destination,), errbackArgs=(destination,))

    def connect(self, destination: Destination, factory: Factory) -> defer.Deferred:
        endpoint = HostnameEndpoint(self.reactor, destination.host, destination.port,
                                    timeout=self.settings.connect_timeout,
                                    bindAddress=self.settings.bind_address)
        return wrapClientTLS(self.tls, endpoint).connect(factory)

    def _connected(self, proto: MMTPInitiatorProtocol, destination: Destination) -> None:
        items = self._connecting.pop(destination, [])
        self._active[destination] = proto
        self._protocols.add(proto)
        for i, item in enumerate(items):
            if not proto.accepting:
                self._overflow(destination, items[i:])
                break
            proto.queue(item)

    def _overflow(self, destination: Destination, items: list[_Item]) -> None:
        if self._live.get(destination, 0) < self.settings.connections_per_destination:
            self._open(destination, items)
        else:
            self._waiting.setdefault(destination, []).extend(items)

    def _connect_failed(self, failure: Failure, destination: Destination) -> None:
        items = self._connecting.pop(destination, [])
        self._live[destination] -= 1
        self.stats.count("FailedConnect")
        self.log.info("Could not connect to a next hop: {why}", why=failure.getErrorMessage())
        error = Failure(ConnectionFailed(f"cannot connect: {failure.getErrorMessage()}"))
        for item in items:
            if not item.junk:
                self.stats.count("FailedRelay")
            item.deferred.errback(error)
        self._start_waiting(destination)

    def _finished(self, proto: MMTPInitiatorProtocol) -> None:
        destination = proto.destination
        self._protocols.discard(proto)
        self._live[destination] -= 1
        if not self._live[destination]:
            del self._live[destination]
        if self._active.get(destination) is proto:
            del self._active[destination]
        self._start_waiting(destination)

    def _start_waiting(self, destination: Destination) -> None:
        waiting = self._waiting.pop(destination, [])
        if not waiting:
            return
        proto = self._active.get(destination)
        if proto is not None and proto.accepting:
            for i, item in enumerate(waiting):
                if not proto.accepting:
                    self._overflow(destination, waiting[i:])
                    return
                proto.queue(item)
        elif destination in self._connecting:
            self._connecting[destination].extend(waiting)
        else:
            self._overflow(destination, waiting)

    def close(self) -> defer.Deferred:
        """Abort every connection (their packets fail and stay queued)."""
        for proto in list(self._protocols):
            proto._fail(ConnectionFailed("client shutting down"))
        return defer.succeed(None)
