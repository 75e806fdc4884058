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
``connections_per_destination`` at once).  At most ``max_connections``
connections are connecting or open in all (``[Outgoing/MMTP]
MaxConnections``); a destination that needs one when none is free waits
in line for the next one that closes.

A next hop that never answers must not stall the others (issue 12: 6,000
packets each for a different address that accepted TCP and said nothing
held every slot, and an honest packet waited behind them for hours):

* Deadlines bound what a black hole costs: ``connect_timeout`` for TCP,
  ``handshake_timeout`` for TLS, and ``ack_timeout`` from the TCP
  connection to the first acknowledgement and from each acknowledgement
  to the next while any is awaited (30 s each).  A connection that runs
  out of one is aborted, the destination's waiting packets fail with it
  (its caller retries them on its own schedule, not at once here), and
  the slot goes to the next in line.
* Next hops that have acknowledged a packet (*proven*, remembered for the
  last :data:`PROVEN_MEMORY` of them until one fails) wait in a line of
  their own, and a quarter of ``max_connections`` is theirs alone: new or
  failing next hops, which anyone can name by the thousand in the packets
  they send us, never hold every slot.  Between the two lines, whichever
  destination waited longer goes first.
* ``max_queued_per_destination`` bounds the packets held in memory for one
  destination; one more fails at once with :class:`NextHopBusy`.
* A destination whose connection ran out of a deadline is *stuck*: the
  first is logged at WARN within :data:`STUCK_GRACE` (with those stuck
  meanwhile), later ones in one WARN per ``stuck_report_interval``, with
  counts of next hops and packets; addresses only at debug.

The client also enforces ``[Outgoing/MMTP] Allow``/``Deny`` when given an
``allows(ip, port)`` callable: a next hop named by an IP literal is judged
before connecting (nothing is sent to it, not even a SYN); one named by a
hostname is judged by the address TCP actually connected to, before any
MMTP byte (the TLS handshake may have begun).  Either way its packets fail
with :class:`NextHopDenied`, which a caller must not retry.
"""

from __future__ import annotations

import os
from collections import OrderedDict, deque
from dataclasses import dataclass, field, fields
from typing import Callable, Optional

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mixminion.codec.routing import NextHop
from mixminion.events import Event
from mixminion.mmtp.limits import normalize_address
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

#: proven next hops remembered (the most recently proven); one forgotten
#: waits in the common line again until it acknowledges a packet
PROVEN_MEMORY = 4096
#: stuck next hops remembered, so that each is counted once
STUCK_MEMORY = 16384
#: seconds from the first stuck next hop of a series to its report
STUCK_GRACE = 5.0


class MMTPError(Exception):
    """A packet did not reach the next hop; it may be retried (except
    after :class:`NextHopDenied`)."""


class PacketRejected(MMTPError):
    """The peer answered REJECTED (it could not store the packet)."""


class ConnectionFailed(MMTPError):
    """The connection failed or broke before the packet was acknowledged."""


class PeerAuthenticationFailed(ConnectionFailed):
    """The peer's certificate chain did not prove the expected identity."""


class NextHopBusy(MMTPError):
    """We hold ``max_queued_per_destination`` packets for this next hop
    already; this is our own limit, not the next hop's failure (send it
    again once some of the others are answered)."""


class NextHopDenied(MMTPError):
    """Our ``[Outgoing/MMTP]`` Allow/Deny rules forbid relaying to the next
    hop's address.  Unlike the other errors this is no reason to retry: a
    denied hop stays denied until the operator changes the rules."""


#: ``allows(ip, port)``: may we relay to this address?  (the node passes
#: ``[Outgoing/MMTP]``'s rules; first matching rule wins, none matching allows)
AddressPolicy = Callable[[str, int], bool]


def literal_address(host: str) -> Optional[str]:
    """``host`` in canonical form if it is an IP literal (so no name
    lookup can change where it leads), else None."""
    addr = normalize_address(host)
    return str(addr) if addr is not None else None


@dataclass
class _Item:
    data: bytes
    junk: bool
    deferred: defer.Deferred = field(default_factory=defer.Deferred)


@dataclass
class InitiatorSettings:
    writeahead: int = 6
    max_packets_per_connection: int = 1000
    #: TCP connect
    connect_timeout: float = 30.0
    #: TLS handshake, from the TCP connection
    handshake_timeout: float = 30.0
    #: from the TCP connection to the first acknowledgement, then from one
    #: to the next while any is awaited: a peer that accepted TCP and never
    #: completes TLS, never answers our version or never acknowledges frees
    #: its slot after this long
    ack_timeout: float = 30.0
    idle_timeout: float = 300.0
    #: how long to wait for the peer's TLS close_notify after ours; a peer
    #: that never answers would otherwise hold the destination forever
    close_timeout: float = 30.0
    #: open connections to one destination: one accepts new packets while
    #: the one before it waits for its last acknowledgements
    connections_per_destination: int = 2
    #: connections connecting or open, to all destinations together
    #: (``[Outgoing/MMTP] MaxConnections``); a change applies to the next
    #: connection opened, open ones are never cut for it
    max_connections: int = 16
    #: packets held in memory for one destination (waiting for a connection
    #: or sent and not acknowledged); 0: no limit
    max_queued_per_destination: int = 0
    #: stuck next hops after the first are reported at WARN at most once
    #: per this many seconds, with counts
    stuck_report_interval: float = 600.0
    #: local address to connect from (None: the system's choice)
    bind_address: Optional[tuple[str, int]] = None


@implementer(IHandshakeListener)
class MMTPInitiatorProtocol(Protocol):
    log = Logger()

    def __init__(self, destination: NextHop, tls: InitiatorTLS, clock: IReactorTime,
                 settings: InitiatorSettings, stats: MMTPStats,
                 on_done: Callable[["MMTPInitiatorProtocol"], None],
                 on_ack: Optional[Callable[[NextHop], None]] = None) -> None:
        self.destination = destination
        self.tls = tls
        self.clock = clock
        self.settings = settings
        self.stats = stats
        self.on_done = on_done
        self.on_ack = on_ack
        self.machine: InitiatorMachine[_Item] = InitiatorMachine(writeahead=settings.writeahead)
        self.timers = Timers(clock)
        self.queued = 0
        self.acked = 0
        self.closing = False
        self.authenticated = False
        #: one of our deadlines (handshake, ack, idle) closed it
        self.timed_out = False
        #: closed by the client for reasons of its own (shutdown, address
        #: rules, nothing left to send), not by any fault of the peer's
        self.closed_by_us = False
        #: items that failed when the connection was lost
        self.lost = 0
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

    @property
    def failure(self) -> Optional[Failure]:
        """Why it failed (None if it closed cleanly or is still open)."""
        return self._failure

    def connectionMade(self) -> None:  # noqa: N802
        set_no_delay(self.transport)
        self.timers.start("handshake", self.settings.handshake_timeout,
                          lambda: self._deadline("TLS handshake timed out"))
        # Runs until the connection closes: restarted by each acknowledgement
        # (the connection closes once nothing more is awaited).
        self.timers.start("ack", self.settings.ack_timeout,
                          lambda: self._deadline("no acknowledgement in time"))

    def handshakeCompleted(self) -> None:  # noqa: N802
        self.timers.cancel("handshake")
        try:
            self.tls.authenticate(self.transport, self.destination.keyid, self.clock.seconds())
        except KeyIdMismatch as exc:
            self.stats.count(Event.KEY_ID_MISMATCH)
            self.log.warn("Next hop's identity key does not match its routing info: {why}",
                          why=str(exc))
            self._fail(PeerAuthenticationFailed(str(exc)))
            return
        except TLSVerificationError as exc:
            self.stats.count(Event.FAILED_CONNECT)
            self.log.warn("Next hop failed certificate verification: {why}", why=str(exc))
            self._fail(PeerAuthenticationFailed(str(exc)))
            return
        self.authenticated = True
        self.stats.count(Event.SUCCESSFUL_CONNECT)
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
            self.stats.count(Event.PROTOCOL_ERROR)
            self.log.info("Next hop broke the MMTP protocol ({code})", code=exc.code)
            self._fail(ConnectionFailed(f"protocol error: {exc.code}"))
            return
        self._flush()

    def _acknowledged(self, item: _Item, accepted: bool) -> None:
        self.acked += 1
        self.timers.restart("ack", self.settings.ack_timeout,
                            lambda: self._deadline("no acknowledgement in time"))
        if self.on_ack is not None:
            self.on_ack(self.destination)
        if accepted:
            if not item.junk:
                self.stats.count(Event.SUCCESSFUL_RELAY)
            item.deferred.callback(None)
        else:
            if not item.junk:
                self.stats.count(Event.FAILED_RELAY)
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
        self.stats.count(Event.TIMED_OUT)
        self.log.info("Next hop did not finish closing the MMTP connection; aborting it")
        self.transport.abortConnection()

    def _touch(self) -> None:
        self.timers.restart("idle", self.settings.idle_timeout,
                            lambda: self._deadline("connection timed out"))

    def _deadline(self, why: str) -> None:
        self.timed_out = True
        self.stats.count(Event.TIMED_OUT)
        self._fail(ConnectionFailed(why))

    def _fail(self, error: Exception, by_us: bool = False) -> None:
        if self._failure is None:
            self._failure = Failure(error)
            self.closed_by_us = by_us
        self.closing = True
        self.timers.cancel_all()
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # noqa: N802
        self.closing = True
        self.timers.cancel_all()
        failure = self._failure or Failure(ConnectionFailed(
            f"connection lost: {reason.getErrorMessage() if reason else 'unknown'}"))
        outstanding = [i for i in self.machine.outstanding() if not i.deferred.called]
        self.lost = len(outstanding)
        if outstanding:
            self.log.info("MMTP connection to a next hop lost with {count} packets "
                          "unacknowledged: {why}", count=len(outstanding),
                          why=failure.getErrorMessage())
        else:
            self.log.debug("MMTP connection to a next hop closed after {acked} "
                           "acknowledgements", acked=self.acked)
        for item in outstanding:
            if not item.junk:
                self.stats.count(Event.FAILED_RELAY)
            item.deferred.errback(failure)
        self.on_done(self)


class _InitiatorFactory(Factory):
    #: one per outgoing connection: no "Starting factory" line for each
    noisy = False

    def __init__(self, build: Callable[[], MMTPInitiatorProtocol]) -> None:
        self._build = build

    def buildProtocol(self, addr):  # noqa: N802
        return self._build()


def unproven_share(max_connections: int) -> int:
    """Connections that next hops not proven may hold: all but a quarter
    of ``max_connections`` (all of them below 4), kept for proven ones."""
    limit = max(1, max_connections)
    return max(1, limit - limit // 4)


@dataclass(eq=False)
class _Peer:
    """What the client holds for one destination."""

    destination: NextHop
    #: packets on no connection yet, oldest first
    pending: deque[_Item] = field(default_factory=deque)
    #: connections connecting or open (at most connections_per_destination)
    live: int = 0
    #: a connection is being opened; it takes ``pending`` once it is up
    connecting: bool = False
    #: the open connection new packets go to while it accepts them
    active: Optional[MMTPInitiatorProtocol] = None
    #: in one of the client's lines of destinations waiting for a connection
    in_line: bool = False
    #: packets held for it: pending, or on its connections unacknowledged
    held: int = 0
    #: when it joined its line (the client's count of arrivals)
    since: int = 0


@dataclass(eq=False)
class _Slot:
    """One connection, counted against ``max_connections`` from the
    connect until it is lost."""

    #: to a next hop not proven when it opened: counted in the unproven share
    unproven: bool
    #: our connect deadline cancelled the connect
    timed_out: bool = False


class MMTPClient:
    """Sends packets to next hops, reusing connections per destination.

    ``connect`` may be replaced in tests: it takes a destination and a
    protocol factory and returns a Deferred firing with the connected
    protocol (by default TCP via ``HostnameEndpoint``, wrapped in TLS).

    ``allows`` (``None``: every address) may be replaced at any time; it
    applies to packets sent and connections made from then on.
    ``wrap_endpoint``, if given, wraps each TCP endpoint under TLS (the
    node's bandwidth limiter counts the bytes there).
    """

    log = Logger()

    def __init__(self, reactor, tls: Optional[InitiatorTLS] = None,
                 settings: Optional[InitiatorSettings] = None,
                 stats: Optional[MMTPStats] = None,
                 allows: Optional[AddressPolicy] = None,
                 wrap_endpoint: Optional[Callable[[IStreamClientEndpoint],
                                                  IStreamClientEndpoint]] = None) -> None:
        self.reactor = reactor
        self.wrap_endpoint = wrap_endpoint
        self.tls = tls or InitiatorTLS()
        self.settings = settings or InitiatorSettings()
        self.stats = stats or MMTPStats()
        self.allows = allows
        self._peers: dict[NextHop, _Peer] = {}
        #: destinations that need a connection and wait for one to be free
        #: (MaxConnections): those not proven ...
        self._line: deque[_Peer] = deque()
        #: ... and those proven, which have a share of the slots of their own
        self._proven_line: deque[_Peer] = deque()
        #: numbers the destinations as they join a line
        self._arrivals = 0
        #: next hops that acknowledged a packet and have not failed since
        #: (the most recent last)
        self._proven: OrderedDict[NextHop, None] = OrderedDict()
        #: connections connecting or open, to every destination
        self._connections = 0
        #: ... of them to next hops not proven when they opened
        self._unproven_connections = 0
        #: every open connection, including full ones no longer a peer's active
        self._protocols: set[MMTPInitiatorProtocol] = set()
        self._opening = False
        #: next hops whose last connection ran out of a deadline
        self._stuck: OrderedDict[NextHop, None] = OrderedDict()
        #: stuck next hops and their packets since the last report
        self._stuck_new = 0
        self._stuck_packets = 0
        #: the next report (None: no series is running; the next stuck next
        #: hop starts one, reported after STUCK_GRACE)
        self._stuck_report: Optional[IDelayedCall] = None

    @property
    def connections(self) -> int:
        """Connections connecting or open now."""
        return self._connections

    @property
    def unproven_connections(self) -> int:
        """Connections connecting or open now to next hops not proven."""
        return self._unproven_connections

    @property
    def waiting_destinations(self) -> int:
        """Destinations whose packets wait for a free connection."""
        return (sum(1 for peer in self._line if peer.pending)
                + sum(1 for peer in self._proven_line if peer.pending))

    @property
    def stuck_destinations(self) -> int:
        """Next hops whose last connection ran out of a deadline."""
        return len(self._stuck)

    def proven(self, destination: NextHop) -> bool:
        """Whether ``destination`` acknowledged a packet and has not failed
        since (as far as the client remembers)."""
        return destination in self._proven

    def held(self, destination: NextHop) -> int:
        """Packets held in memory for ``destination``."""
        peer = self._peers.get(destination)
        return peer.held if peer is not None else 0

    def apply_settings(self, settings: InitiatorSettings) -> None:
        """Take ``settings`` (after a SIGHUP): copied into the settings the
        open connections share; a higher ``max_connections`` opens
        connections for waiting destinations at once."""
        if settings is not self.settings:
            for f in fields(InitiatorSettings):
                setattr(self.settings, f.name, getattr(settings, f.name))
        self._open_waiting()

    def send_packet(self, destination: NextHop, packet: bytes) -> defer.Deferred:
        """Deferred firing when ``destination`` acknowledges RECEIVED."""
        if len(packet) != PACKET_LEN:
            return defer.fail(ValueError("MMTP packets are 32768 bytes"))
        return self._enqueue(destination, _Item(packet, False))

    def send_junk(self, destination: NextHop) -> defer.Deferred:
        """Send one JUNK frame (link padding, or a liveness check)."""
        return self._enqueue(destination, _Item(os.urandom(PACKET_LEN), True))

    # --- address rules ------------------------------------------------------------

    def _allowed(self, ip: str, port: int) -> bool:
        return self.allows is None or self.allows(ip, port)

    def _denied_literal(self, destination: NextHop) -> bool:
        """A next hop given as an IP literal that the rules deny."""
        if self.allows is None:
            return False
        ip = literal_address(destination.host)
        return ip is not None and not self._allowed(ip, destination.port)

    def _peer_address(self, proto: MMTPInitiatorProtocol) -> Optional[str]:
        """The address TCP connected to (None if the transport cannot say)."""
        peer = proto.transport.getPeer() if proto.transport is not None else None
        addr = normalize_address(str(getattr(peer, "host", "")))
        return str(addr) if addr is not None else None

    # --- queueing -----------------------------------------------------------------

    def _enqueue(self, destination: NextHop, item: _Item) -> defer.Deferred:
        if self._denied_literal(destination):
            self.log.debug("Not relaying to {host}:{port}: denied by the outgoing address "
                           "rules", host=destination.host, port=destination.port)
            return defer.fail(NextHopDenied("the next hop's address is denied by our "
                                                "[Outgoing/MMTP] rules"))
        peer = self._peers.get(destination)
        if peer is None:
            peer = self._peers[destination] = _Peer(destination)
        cap = self.settings.max_queued_per_destination
        if cap > 0 and peer.held >= cap:
            self._forget_if_idle(peer)
            return defer.fail(NextHopBusy(f"{cap} packets are held for this next hop "
                                              "already"))
        if not item.junk:
            self.stats.count(Event.ATTEMPTED_RELAY)
        peer.held += 1
        item.deferred.addBoth(self._released, peer)
        peer.pending.append(item)
        self._dispatch(peer)
        if self._line or self._proven_line:  # max_connections may have been raised
            self._open_waiting()
        return item.deferred

    @staticmethod
    def _released(result, peer: _Peer):
        peer.held -= 1
        return result

    def _dispatch(self, peer: _Peer) -> None:
        """Put ``peer``'s pending packets on its open connection; ask for
        another connection for those that do not fit."""
        proto = peer.active
        while peer.pending and proto is not None and proto.accepting:
            proto.queue(peer.pending.popleft())
        if (peer.pending and not peer.connecting
                and peer.live < self.settings.connections_per_destination):
            if not peer.in_line:
                peer.in_line = True
                self._arrivals += 1
                peer.since = self._arrivals
                if peer.destination in self._proven:
                    self._proven_line.append(peer)
                else:
                    self._line.append(peer)
            self._open_waiting()
        # else: the connection being opened takes them, or one of the
        # destination's own connections must finish first (_finished)

    def _open_waiting(self) -> None:
        """Open connections for the destinations in line while fewer than
        ``max_connections`` are connecting or open; those not proven only
        while they hold fewer than their share (:func:`unproven_share`)."""
        if self._opening:  # called again from a connect that finished at once
            return
        self._opening = True
        try:
            while self._connections < max(1, self.settings.max_connections):
                peer = self._next_in_line()
                if peer is None:
                    break
                peer.in_line = False
                if (peer.pending and not peer.connecting
                        and peer.live < self.settings.connections_per_destination):
                    self._open(peer)
        finally:
            self._opening = False

    def _next_in_line(self) -> Optional[_Peer]:
        """The next destination to connect to, first come first served:
        whichever waited longer, but the common one only while it holds
        less than its share."""
        proven = self._proven_line
        common = self._line if self._unproven_connections < unproven_share(
            self.settings.max_connections) else None
        if proven and common:
            line = proven if proven[0].since < common[0].since else common
        else:
            line = proven or common
        return line.popleft() if line else None

    def _open(self, peer: _Peer) -> None:
        """Connect for ``peer``'s pending packets; a full connection keeps
        draining its acknowledgements while the next one does its handshake."""
        slot = _Slot(unproven=peer.destination not in self._proven)
        peer.connecting = True
        peer.live += 1
        self._connections += 1
        if slot.unproven:
            self._unproven_connections += 1
        self.stats.count(Event.ATTEMPTED_CONNECT)
        destination = peer.destination

        def build() -> MMTPInitiatorProtocol:
            return MMTPInitiatorProtocol(destination, self.tls, self.reactor, self.settings,
                                         self.stats, lambda proto: self._finished(proto, peer, slot),
                                         self._acknowledged)

        d = self.connect(destination, _InitiatorFactory(build))
        if not d.called and self.settings.connect_timeout > 0:
            # Our own deadline too: it covers a name lookup, and a connect
            # replaced in tests.
            def expire() -> None:
                slot.timed_out = True
                d.cancel()

            deadline = self.reactor.callLater(self.settings.connect_timeout, expire)

            def settled(result):
                if deadline.active():
                    deadline.cancel()
                return result

            d.addBoth(settled)
        d.addCallbacks(self._connected, self._connect_failed,
                       callbackArgs=(peer,), errbackArgs=(peer, slot))

    def connect(self, destination: NextHop, factory: Factory) -> defer.Deferred:
        endpoint = HostnameEndpoint(self.reactor, destination.host, destination.port,
                                    timeout=self.settings.connect_timeout,
                                    bindAddress=self.settings.bind_address)
        if self.wrap_endpoint is not None:
            endpoint = self.wrap_endpoint(endpoint)
        return wrapClientTLS(self.tls, endpoint).connect(factory)

    def _connected(self, proto: MMTPInitiatorProtocol, peer: _Peer) -> None:
        peer.connecting = False
        self._protocols.add(proto)
        if self.allows is not None:
            address = self._peer_address(proto)
            if address is None or not self._allowed(address, peer.destination.port):
                self._refuse(proto, peer, address)
                return
        if not peer.pending:
            # Its packets failed while it connected (close()): nothing to send.
            proto._fail(ConnectionFailed("nothing left to send"), by_us=True)
            return
        peer.active = proto
        self._dispatch(peer)

    def _refuse(self, proto: MMTPInitiatorProtocol, peer: _Peer, address: Optional[str]) -> None:
        """The next hop's name led to an address the rules deny: close
        before any MMTP byte and fail its packets (they are not retried)."""
        self.stats.count(Event.DENIED_CONNECT)
        self.log.warn("Refused to relay to a next hop: its hostname leads to an address "
                      "denied by our [Outgoing/MMTP] rules")
        self.log.debug("Next hop {host}:{port} connected at {address}, which the outgoing "
                       "address rules deny", host=peer.destination.host,
                       port=peer.destination.port, address=address)
        error = NextHopDenied("the next hop's address is denied by our "
                                  "[Outgoing/MMTP] rules")
        self._fail_pending(peer, Failure(error))  # first: the abort must not reopen for them
        proto._fail(error, by_us=True)

    def _fail_pending(self, peer: _Peer, failure: Failure) -> int:
        """Fail the packets waiting for a connection; how many there were."""
        items = list(peer.pending)
        peer.pending.clear()
        self._forget_if_idle(peer)
        for item in items:
            if not item.junk:
                self.stats.count(Event.FAILED_RELAY)
            item.deferred.errback(failure)
        return len(items)

    def _release(self, peer: _Peer, slot: _Slot) -> None:
        peer.live -= 1
        self._connections -= 1
        if slot.unproven:
            self._unproven_connections -= 1

    def _connect_failed(self, failure: Failure, peer: _Peer, slot: _Slot) -> None:
        peer.connecting = False
        self._release(peer, slot)
        self.stats.count(Event.FAILED_CONNECT)
        timed_out = slot.timed_out or failure.check(error.TimeoutError) is not None
        if timed_out:
            self.stats.count(Event.TIMED_OUT)
        # The reason may name the next hop (a DNS error does): debug only.
        self.log.info("Could not connect to a next hop: {kind}",
                      kind="timed out" if timed_out else failure.type.__name__)
        self.log.debug("Could not connect to a next hop: {why}", why=failure.getErrorMessage())
        self._proven.pop(peer.destination, None)
        why = "timed out" if slot.timed_out else failure.getErrorMessage()
        failed = self._fail_pending(peer, Failure(ConnectionFailed(f"cannot connect: {why}")))
        if timed_out:
            self._stuck_next_hop(peer.destination, failed)
        self._open_waiting()

    def _finished(self, proto: MMTPInitiatorProtocol, peer: _Peer, slot: _Slot) -> None:
        self._protocols.discard(proto)
        self._release(peer, slot)
        if peer.active is proto:
            peer.active = None
        if not proto.closed_by_us and (proto.timed_out or (
                not proto.acked and (proto.failure or proto.lost))):
            # The next hop stopped answering, or took nothing: it is no
            # longer proven, and what waits for it fails too (its caller
            # retries it on its own schedule) instead of holding the next
            # free connection.
            self._proven.pop(peer.destination, None)
            failure = proto.failure or Failure(ConnectionFailed(
                "connection lost before any acknowledgement"))
            failed = proto.lost + self._fail_pending(peer, failure)
            if proto.timed_out:
                self._stuck_next_hop(peer.destination, failed)
        self._dispatch(peer)  # the destination's own limit may have held some
        self._open_waiting()  # a connection is free for the next in line
        self._forget_if_idle(peer)

    def _forget_if_idle(self, peer: _Peer) -> None:
        if (not peer.live and not peer.pending
                and self._peers.get(peer.destination) is peer):
            del self._peers[peer.destination]

    # --- proven and stuck next hops ----------------------------------------------

    def _acknowledged(self, destination: NextHop) -> None:
        """``destination`` acknowledged a frame: proven (again)."""
        if destination in self._proven:
            self._proven.move_to_end(destination)
        else:
            self._proven[destination] = None
            if len(self._proven) > PROVEN_MEMORY:
                self._proven.popitem(last=False)
        if destination in self._stuck:
            del self._stuck[destination]
            self.log.debug("Next hop {host}:{port} answers again",
                           host=destination.host, port=destination.port)

    def _stuck_next_hop(self, destination: NextHop, packets: int) -> None:
        """A connection to ``destination`` ran out of a deadline, failing
        ``packets`` packets: count it, and report it (see
        :meth:`_report_stuck`)."""
        self.log.debug("Next hop {host}:{port} is stuck: no acknowledgement within the "
                       "deadline", host=destination.host, port=destination.port)
        if destination in self._stuck:
            self._stuck.move_to_end(destination)
        else:
            self._stuck[destination] = None
            if len(self._stuck) > STUCK_MEMORY:
                self._stuck.popitem(last=False)
            self._stuck_new += 1
            self.stats.count(Event.STUCK_NEXT_HOP)
        self._stuck_packets += packets
        if self._stuck_report is None:
            # Reported shortly, with those that time out with it (the
            # connections of an attack tend to run out together).
            self._stuck_report = self.reactor.callLater(
                min(STUCK_GRACE, max(0.0, self.settings.stuck_report_interval)),
                self._report_stuck)

    def _report_stuck(self) -> None:
        """One WARN for the stuck next hops since the last one, then none
        for ``stuck_report_interval``; a quiet interval ends the series (the
        next stuck next hop is reported after :data:`STUCK_GRACE`)."""
        self._stuck_report = None
        if not self._stuck_new:
            return
        interval = self.settings.stuck_report_interval
        self.log.warn("Next hops stuck: {new} newly, {stuck} in all ({packets} packets "
                      "failed, each kept for a retry on its next hop's schedule). A stuck "
                      "next hop acknowledged nothing within its connect, handshake or "
                      "acknowledgement deadline; addresses are logged at debug level only. "
                      "Next report in {interval:.0f} s at the earliest",
                      new=self._stuck_new, packets=self._stuck_packets,
                      stuck=len(self._stuck), interval=interval)
        self._stuck_new = self._stuck_packets = 0
        if interval > 0:
            self._stuck_report = self.reactor.callLater(interval, self._report_stuck)

    def close(self) -> defer.Deferred:
        """Abort every connection; packets in flight or waiting for a
        connection fail (their callers keep them queued)."""
        error = Failure(ConnectionFailed("client shutting down"))
        if self._stuck_report is not None and self._stuck_report.active():
            self._stuck_report.cancel()
        self._stuck_report = None
        self._line.clear()
        self._proven_line.clear()
        for peer in list(self._peers.values()):
            peer.in_line = False
            self._fail_pending(peer, error)
        for proto in list(self._protocols):
            proto._fail(ConnectionFailed("client shutting down"), by_us=True)
        return defer.succeed(None)
