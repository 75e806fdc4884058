"""The MMTP initiator: sending packets to other servers.

:class:`MMTPInitiatorProtocol` is one connection to a next hop, from the
TCP connect until it is lost.  It wraps an :class:`InitiatorMachine`:
after the TLS handshake it checks that the peer's chain is certified by
the identity key the routing info names, negotiates the version, and
pipelines frames (six in flight by default).  Each packet has a Deferred
that fires on RECEIVED and fails on REJECTED or on any loss of the
connection, so the caller keeps its copy until the peer has it.

The life of a connection is one Automat machine, its states named by
:class:`Phase` and its transitions listed together at the end of
:class:`MMTPInitiatorProtocol`::

    CONNECTING --TCP up--> HANDSHAKING --TLS done--> NEGOTIATING
        --version agreed--> OPEN --all acknowledged--> CLOSING --lost--> CLOSED
    CONNECTING --connect failed--> CLOSED
    HANDSHAKING, NEGOTIATING, OPEN, CLOSING --failed--> ABORTING --lost--> CLOSED

:class:`MMTPClient` queues packets on one connection per destination, at
most ``max_packets_per_connection`` on each; the next connection opens
while the full one still waits for its acknowledgements (at most
``connections_per_destination`` at once).  At most ``max_connections``
connections are connecting or open in all (``[Outgoing/MMTP]
MaxConnections``); a destination that needs one when none is free waits
in line for the next one that closes.  What the client holds for a
destination (its packets, its connections, its place in line) is one
:class:`_Destination`; which next hops proved themselves or got stuck is
remembered apart (:class:`_Recent`), for longer than any of that lasts.

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

import enum
import os
from collections import OrderedDict, deque
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, Callable, Optional

from automat import MethodicalMachine
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
#: the default of each deadline that bounds what a next hop that never
#: answers costs us: TCP connect, TLS handshake, acknowledgement, close
DEADLINE = 30.0


class MMTPError(Exception):
    """A packet did not reach the next hop; it may be retried (except
    after :class:`NextHopDenied`)."""


class PacketRejected(MMTPError):
    """The peer answered REJECTED (it could not store the packet)."""


class ConnectionFailed(MMTPError):
    """The connection failed or broke before the packet was acknowledged."""


class CannotConnect(ConnectionFailed):
    """TCP did not connect (refused, unreachable, name unknown, or out of
    time)."""


class HandshakeFailed(ConnectionFailed):
    """TCP connected, but the connection ended before TLS was up with the
    peer the routing info names (a TLS error, the handshake deadline, or
    the peer closing first)."""


class PeerAuthenticationFailed(HandshakeFailed):
    """The peer's certificate chain did not prove the expected identity."""


#: how far a failed send got, as the pinger records it against a first
#: hop (doc/reliability.md §1): the connect, the TLS handshake (the peer
#: proven included), or the peer's REJECTED
LINK_CONNECT = "connect"
LINK_TLS = "tls"
LINK_REJECTED = "rejected"


def link_failure(failure: Failure) -> Optional[str]:
    """Which link-level failure ``failure`` is (:data:`LINK_CONNECT`,
    :data:`LINK_TLS`, :data:`LINK_REJECTED`), or None for any other: a
    connection that broke after MMTP began, our own limits, our rules."""
    if failure.check(CannotConnect):
        return LINK_CONNECT
    if failure.check(HandshakeFailed):
        return LINK_TLS
    if failure.check(PacketRejected):
        return LINK_REJECTED
    return None


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


@lru_cache(maxsize=4096)
def literal_address(host: str) -> Optional[str]:
    """``host`` in canonical form if it is an IP literal (so no name
    lookup can change where it leads), else None.  Asked for every packet
    sent; remembered, since a node relays to a few hundred hosts."""
    addr = normalize_address(host)
    return str(addr) if addr is not None else None


@dataclass
class _Item:
    data: bytes
    junk: bool
    deferred: defer.Deferred = field(default_factory=defer.Deferred)
    #: sent again once already, after the kept-open connection it went out
    #: on was closed under it (see :attr:`MMTPInitiatorProtocol.returned`)
    resent: bool = False


@dataclass(frozen=True)
class _Ending:
    """Why a connection failed: what its packets fail with, whether one
    of our deadlines ran out, and whether the client gave it up for
    reasons of its own (shutdown, address rules, nothing left to send)
    rather than for any fault of the peer's."""

    error: Exception
    timed_out: bool = False
    by_us: bool = False


@dataclass
class InitiatorSettings:
    """Outbound limits and timeouts, in seconds.  The client and its
    connections share one instance (a SIGHUP copies new values into it:
    :meth:`MMTPClient.apply_settings`)."""

    writeahead: int = 6
    max_packets_per_connection: int = 1000
    #: TCP connect
    connect_timeout: float = DEADLINE
    #: TLS handshake, from the TCP connection
    handshake_timeout: float = DEADLINE
    #: from the TCP connection to the first acknowledgement, then from one
    #: to the next while any is awaited: a peer that accepted TCP and never
    #: completes TLS, never answers our version or never acknowledges frees
    #: its slot after this long
    ack_timeout: float = DEADLINE
    idle_timeout: float = 300.0
    #: how long a connection stays open once everything on it is
    #: acknowledged, for packets that come soon after (0: close at once,
    #: as the reference does, mmtp.md §7.4 step 3); closed sooner when a
    #: destination waits for its slot
    keep_open: float = 0.0
    #: how long to wait for the peer's TLS close_notify after ours; a peer
    #: that never answers would otherwise hold the destination forever
    close_timeout: float = DEADLINE
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


class Phase(enum.Enum):
    """Where a connection to a next hop is in its life: the states of
    :class:`MMTPInitiatorProtocol`'s machine."""

    #: TCP connect (and name lookup) under way, against ``connect_timeout``
    CONNECTING = "connecting"
    #: TCP up: TLS handshake under way; the handshake and first
    #: acknowledgement deadlines run from here
    HANDSHAKING = "handshaking"
    #: TLS done: the peer's chain is checked at once (a wrong one fails
    #: the connection), then our version line goes out
    NEGOTIATING = "negotiating"
    #: version agreed: frames go out, acknowledgements come back (it takes
    #: packets until it holds ``max_packets_per_connection``, then drains)
    OPEN = "open"
    #: everything acknowledged, kept open for ``keep_open`` seconds: a
    #: packet queued meanwhile goes out at once (OPEN again), with no new
    #: TCP connection or TLS handshake; no deadline but this one runs
    IDLE = "idle"
    #: everything acknowledged: our close_notify is out; aborted if the
    #: peer does not answer it within ``close_timeout``
    CLOSING = "closing"
    #: failed (deadline, wrong peer, protocol error, or closed by the
    #: client): aborted, waiting for the transport to report the loss
    ABORTING = "aborting"
    #: lost, or never connected: its packets and its slot are settled
    CLOSED = "closed"


#: the phases in which a connection takes packets
_TAKING = frozenset({Phase.CONNECTING, Phase.HANDSHAKING, Phase.NEGOTIATING, Phase.OPEN,
                     Phase.IDLE})
#: the phases in which queued frames may be written (our version line is out)
_WRITING = frozenset({Phase.NEGOTIATING, Phase.OPEN})


def _phase_states(machine: MethodicalMachine) -> list[Any]:
    """One state of ``machine`` per :class:`Phase`, in its order (the first
    is the initial one), each serialized as its phase so that
    :attr:`MMTPInitiatorProtocol.phase` can tell where a connection is."""
    states: list[Any] = []
    for phase in Phase:
        def state(self: Any) -> None:
            pass

        state.__name__ = state.__qualname__ = phase.value
        states.append(machine.state(initial=not states, serialized=phase)(state))
    return states


@implementer(IHandshakeListener)
class MMTPInitiatorProtocol(Protocol):
    """One connection to a next hop, from the connect until it is lost.

    The client builds it before connecting (its factory hands out this
    one), so the whole life of a connection, and the slot it holds, is the
    one machine below; :attr:`phase` says where it is.  Why it failed
    (:attr:`ending`) is set once, by the transition into ABORTING or
    CLOSED, for the client's ``on_done``.
    """

    log = Logger()
    _lifecycle = MethodicalMachine()

    def __init__(self, destination: NextHop, tls: InitiatorTLS, clock: IReactorTime,
                 settings: InitiatorSettings, stats: MMTPStats,
                 on_done: Callable[["MMTPInitiatorProtocol"], None],
                 on_ack: Optional[Callable[[NextHop], None]] = None,
                 unproven: bool = False,
                 slot_wanted: Callable[["MMTPInitiatorProtocol"], bool] = lambda conn: False
                 ) -> None:
        self.destination = destination
        #: another destination waits for a connection slot: not kept open
        self.slot_wanted = slot_wanted
        self.tls = tls
        self.clock = clock
        self.settings = settings
        self.stats = stats
        self.on_done = on_done
        self.on_ack = on_ack
        #: opened to a next hop not proven then: counted in the unproven share
        self.unproven = unproven
        self.machine: InitiatorMachine[_Item] = InitiatorMachine(writeahead=settings.writeahead)
        self.timers = Timers(clock)
        self.queued = 0
        self.acked = 0
        #: items that failed when the connection was lost
        self.lost = 0
        #: items the client sends again on a new connection: they went out on
        #: this one as it was woken from being kept open, and it was lost
        #: before any acknowledgement since (the next hop closed it as they
        #: went: its idle timeout, a restart).  Once per item.
        self.returned: list[_Item] = []
        #: the acknowledgements counted when it was last woken (None: never kept open)
        self._acked_when_woken: Optional[int] = None
        #: why it failed (None: it closed cleanly, or is still up)
        self.ending: Optional[_Ending] = None
        self._failure: Optional[Failure] = None
        #: TLS is up and the peer's chain proved the identity its routing
        #: info names: a failure from here on is no longer the handshake's
        self.peer_proven = False

    # --- used by the client ------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._current_phase()

    @property
    def accepting(self) -> bool:
        """Whether more packets may still be queued on this connection (a
        full one takes none, even after a SIGHUP raised the limit)."""
        return (self.phase in _TAKING and not self.machine.dead
                and self.queued < self.settings.max_packets_per_connection)

    def queue(self, item: _Item) -> None:
        self.queued += 1
        if item.junk:
            self.machine.queue_junk(item.data, item)
        else:
            self.machine.queue_packet(item.data, item)
        if self.phase is Phase.IDLE:
            self._woken()
        if self.phase in _WRITING:
            self._flush()

    def close_if_idle(self) -> bool:
        """Close now if kept open with nothing to send (its slot is wanted);
        whether it was."""
        if self.phase is not Phase.IDLE:
            return False
        self._close_idle()
        return True

    @property
    def failure(self) -> Optional[Failure]:
        """Why it failed (None if it closed cleanly or is still open)."""
        return self._failure

    @property
    def timed_out(self) -> bool:
        """One of our deadlines (connect, handshake, ack, idle) ended it."""
        return self.ending is not None and self.ending.timed_out

    @property
    def closed_by_us(self) -> bool:
        """The client gave it up for reasons of its own."""
        return self.ending is not None and self.ending.by_us

    @property
    def next_hop_failed(self) -> bool:
        """Whether its end is the next hop's doing: it ran out of one of our
        deadlines, or failed (or never connected) before acknowledging
        anything; never when the client closed it for reasons of its own."""
        return not self.closed_by_us and (self.timed_out or (
            not self.acked and (self._failure is not None or self.lost > 0)))

    # --- frames and deadlines ------------------------------------------------------

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
                    self._version_agreed()
        except ProtocolError as exc:
            self.stats.count(Event.PROTOCOL_ERROR)
            self.log.info("Next hop broke the MMTP protocol ({code})", code=exc.code)
            self._fail(_Ending(ConnectionFailed(f"protocol error: {exc.code}")))
            return
        self._flush()

    def _acknowledged(self, item: _Item, accepted: bool) -> None:
        self.acked += 1
        self._ack_deadline()
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
        if self.machine.finished:
            if self.settings.keep_open > 0 and self.accepting and not self.slot_wanted(self):
                self._went_quiet()
            else:
                self._all_acknowledged()

    def _ack_deadline(self) -> None:
        """(Re)start the wait for the next acknowledgement."""
        self.timers.restart("ack", self.settings.ack_timeout,
                            lambda: self._deadline("no acknowledgement in time"))

    def _touch(self) -> None:
        self.timers.restart("idle", self.settings.idle_timeout,
                            lambda: self._deadline("connection timed out"))

    def _deadline(self, why: str) -> None:
        self.stats.count(Event.TIMED_OUT)
        error = ConnectionFailed if self.peer_proven else HandshakeFailed
        self._fail(_Ending(error(why), timed_out=True))

    def _close_timed_out(self) -> None:
        self.stats.count(Event.TIMED_OUT)
        self.log.info("Next hop did not finish closing the MMTP connection; aborting it")
        self.transport.abortConnection()

    # --- the lifecycle: states and inputs ------------------------------------------

    _connecting, _handshaking, _negotiating, _open, _idle, _closing, _aborting, _closed = (
        _phase_states(_lifecycle))

    @_lifecycle.serializer()
    def _current_phase(self, state: Phase) -> Phase:
        return state

    @_lifecycle.input()
    def connectionMade(self) -> None:  # noqa: N802
        "TCP connected: the TLS handshake starts, and our deadlines with it."

    @_lifecycle.input()
    def _connect_failed(self, ending: _Ending) -> None:
        "The connect failed or ran out of time; nothing was sent."

    @_lifecycle.input()
    def handshakeCompleted(self) -> None:  # noqa: N802
        """TLS is up: the peer's chain is checked before any MMTP byte
        goes out."""

    @_lifecycle.input()
    def _version_agreed(self) -> None:
        "The peer answered our version line: frames may flow."

    @_lifecycle.input()
    def _all_acknowledged(self) -> None:
        """Every frame queued is acknowledged: close (mmtp.md §7.4 step 3);
        packets that come later open a new connection."""

    @_lifecycle.input()
    def _went_quiet(self) -> None:
        """Every frame queued is acknowledged and ``keep_open`` is set:
        stay open for more."""

    @_lifecycle.input()
    def _woken(self) -> None:
        "A packet was queued on a connection kept open."

    @_lifecycle.input()
    def _close_idle(self) -> None:
        "Kept open long enough, or its slot is wanted: close."

    @_lifecycle.input()
    def _fail(self, ending: _Ending) -> None:
        """Give the connection up (a deadline passed, the peer broke the
        protocol or is not who its routing info names, or the client
        closes it for reasons of its own): its packets fail."""

    @_lifecycle.input()
    def connectionLost(self, reason: Failure = None) -> None:  # noqa: N802
        "The transport is gone: what was not acknowledged fails."

    # --- the lifecycle: outputs --------------------------------------------------

    @_lifecycle.output()
    def _start_deadlines(self) -> None:
        set_no_delay(self.transport)
        self.timers.start("handshake", self.settings.handshake_timeout,
                          lambda: self._deadline("TLS handshake timed out"))
        # Runs until the connection closes or is kept open with nothing
        # awaited: restarted by each acknowledgement.
        self._ack_deadline()

    @_lifecycle.output()
    def _verify_peer(self) -> None:
        """Check the peer's chain against the key id its routing info
        names; a wrong one fails the connection at once, else our version
        line goes out."""
        self.timers.cancel("handshake")
        try:
            self.tls.authenticate(self.transport, self.destination.keyid, self.clock.seconds())
        except KeyIdMismatch as exc:
            self.stats.count(Event.KEY_ID_MISMATCH)
            self.log.warn("Next hop's identity key does not match its routing info: {why}",
                          why=str(exc))
            self._fail(_Ending(PeerAuthenticationFailed(str(exc))))
            return
        except TLSVerificationError as exc:
            self.stats.count(Event.FAILED_CONNECT)
            self.log.warn("Next hop failed certificate verification: {why}", why=str(exc))
            self._fail(_Ending(PeerAuthenticationFailed(str(exc))))
            return
        self.stats.count(Event.SUCCESSFUL_CONNECT)
        self.peer_proven = True
        self.transport.write(self.machine.start())
        self._touch()

    @_lifecycle.output()
    def _start_idling(self) -> None:
        # Nothing is awaited: the acknowledgement and idle deadlines would
        # blame the next hop for our silence.
        self.timers.cancel_all()
        self.timers.start("keep open", self.settings.keep_open, self._close_idle)

    @_lifecycle.output()
    def _resume(self) -> None:
        self._acked_when_woken = self.acked
        self.timers.cancel("keep open")
        self._ack_deadline()
        self._touch()

    @_lifecycle.output()
    def _start_closing(self) -> None:
        self.machine.close()
        self.timers.cancel_all()
        # Until connectionLost the client keeps this connection as the
        # destination's, so a peer that never answers our close_notify
        # must not hold it (and the packets waiting for it) forever.
        self.timers.start("close", self.settings.close_timeout, self._close_timed_out)
        self.transport.loseConnection()

    @_lifecycle.output()
    def _record_failure(self, ending: _Ending) -> None:
        self.ending = ending
        self._failure = Failure(ending.error)

    @_lifecycle.output()
    def _stop_deadlines(self) -> None:
        self.timers.cancel_all()

    @_lifecycle.output()
    def _abort(self) -> None:
        self.transport.abortConnection()

    @_lifecycle.output()
    def _fail_outstanding(self, reason: Failure = None) -> None:
        """Fail every packet not acknowledged, with the failure that ended
        the connection (or the transport's reason), but those the client
        sends again (:attr:`returned`)."""
        error = ConnectionFailed if self.peer_proven else HandshakeFailed
        failure = self._failure or Failure(error(
            f"connection lost: {reason.getErrorMessage() if reason else 'unknown'}"))
        outstanding = [i for i in self.machine.outstanding() if not i.deferred.called]
        if self._lost_as_woken():
            self.returned = [i for i in outstanding if not i.resent]
            outstanding = [i for i in outstanding if i.resent]
            for item in self.returned:
                item.resent = True
        if self.returned:
            self.log.info("MMTP connection kept open was closed by the next hop as packets "
                          "went out: {count} sent again on a new connection",
                          count=len(self.returned))
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

    def _lost_as_woken(self) -> bool:
        """The transport went (no deadline of ours, no protocol error, not
        closed by the client) after the connection was woken from being
        kept open, with no acknowledgement since."""
        return (self.ending is None and self._acked_when_woken is not None
                and self.acked == self._acked_when_woken)

    @_lifecycle.output()
    def _tell_client(self) -> None:
        self.on_done(self)

    # --- the lifecycle: transitions ----------------------------------------------
    # The machine enters the new state before the outputs run, so an input
    # an output causes (_verify_peer's _fail, a packet's callback sending
    # more) acts on the new state.

    _connecting.upon(connectionMade, enter=_handshaking, outputs=[_start_deadlines])
    _connecting.upon(_connect_failed, enter=_closed, outputs=[_record_failure, _tell_client])
    _handshaking.upon(handshakeCompleted, enter=_negotiating, outputs=[_verify_peer])
    _negotiating.upon(_version_agreed, enter=_open, outputs=[])
    _open.upon(_all_acknowledged, enter=_closing, outputs=[_start_closing])
    _open.upon(_went_quiet, enter=_idle, outputs=[_start_idling])
    _idle.upon(_woken, enter=_open, outputs=[_resume])
    _idle.upon(_close_idle, enter=_closing, outputs=[_start_closing])
    for _up in (_handshaking, _negotiating, _open, _idle, _closing):
        _up.upon(_fail, enter=_aborting, outputs=[_record_failure, _stop_deadlines, _abort])
    # Once failed, the first failure stands: another only aborts again.
    _aborting.upon(_fail, enter=_aborting, outputs=[_stop_deadlines, _abort])
    for _up in (_handshaking, _negotiating, _open, _idle, _closing, _aborting):
        _up.upon(connectionLost, enter=_closed,
                 outputs=[_stop_deadlines, _fail_outstanding, _tell_client])
    # News that comes too late changes nothing: a handshake or bytes still
    # arriving on a connection being aborted or closed, or the client
    # shutting down after the loss.
    for _late in (handshakeCompleted, _version_agreed, _all_acknowledged, _went_quiet,
                  _close_idle):
        _aborting.upon(_late, enter=_aborting, outputs=[])
    for _late in (_all_acknowledged, _went_quiet, _close_idle):
        _closing.upon(_late, enter=_closing, outputs=[])
    _closed.upon(_fail, enter=_closed, outputs=[])
    del _up, _late


class _InitiatorFactory(Factory):
    """Hands the connection the client built to the TCP connection the
    connect makes, once (a second one would have no slot: it is closed)."""

    #: one per outgoing connection: no "Starting factory" line for each
    noisy = False

    def __init__(self, connection: MMTPInitiatorProtocol) -> None:
        self._connection: Optional[MMTPInitiatorProtocol] = connection

    def buildProtocol(self, addr) -> Optional[MMTPInitiatorProtocol]:  # noqa: N802
        connection, self._connection = self._connection, None
        return connection


def unproven_share(max_connections: int) -> int:
    """Connections that next hops not proven may hold: all but a quarter
    of ``max_connections`` (all of them below 4), kept for proven ones."""
    limit = max(1, max_connections)
    return max(1, limit - limit // 4)


class _Recent:
    """The next hops most recently marked, at most ``size`` of them (the
    least recently marked is forgotten first): the client's memory of
    which hops proved themselves, or got stuck, outlives their queues."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._hops: OrderedDict[NextHop, None] = OrderedDict()

    def __contains__(self, hop: object) -> bool:
        return hop in self._hops

    def __len__(self) -> int:
        return len(self._hops)

    def mark(self, hop: NextHop) -> bool:
        """Remember ``hop`` as the most recent; whether it is new."""
        if hop in self._hops:
            self._hops.move_to_end(hop)
            return False
        self._hops[hop] = None
        if len(self._hops) > self.size:
            self._hops.popitem(last=False)
        return True

    def forget(self, hop: NextHop) -> bool:
        """Forget ``hop``; whether it was remembered."""
        if hop not in self._hops:
            return False
        del self._hops[hop]
        return True


@dataclass(eq=False)
class _Destination:
    """What the client holds for one next hop while it has packets or
    connections (it is forgotten when it has neither)."""

    destination: NextHop
    #: packets on no connection yet, oldest first
    pending: deque[_Item] = field(default_factory=deque)
    #: connections connecting or open (at most connections_per_destination)
    connections: list[MMTPInitiatorProtocol] = field(default_factory=list)
    #: the connection being opened: it takes ``pending`` once it is up
    opening: Optional[MMTPInitiatorProtocol] = None
    #: the open connection new packets go to while it accepts them
    active: Optional[MMTPInitiatorProtocol] = None
    #: packets held for it: pending, or on its connections unacknowledged
    held: int = 0
    #: when it joined one of the client's lines of destinations waiting for
    #: a connection (the client's count of arrivals); 0: in neither
    in_line_since: int = 0


class MMTPClient:
    """Sends packets to next hops, reusing connections per destination.

    ``connect`` may be replaced in tests: it takes a destination and a
    protocol factory and returns a Deferred firing with the connected
    protocol (by default TCP via ``HostnameEndpoint``, wrapped in TLS);
    the factory builds one protocol, the connection the client made for
    the connect.

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
        #: every next hop with packets waiting or connections
        self._destinations: dict[NextHop, _Destination] = {}
        #: destinations that need a connection and wait for one to be free
        #: (MaxConnections): those not proven ...
        self._line: deque[_Destination] = deque()
        #: ... and those proven, which have a share of the slots of their own
        self._proven_line: deque[_Destination] = deque()
        #: numbers the destinations as they join a line
        self._arrivals = 0
        #: next hops that acknowledged a packet and have not failed since
        self._proven = _Recent(PROVEN_MEMORY)
        #: next hops whose last connection ran out of a deadline
        self._stuck = _Recent(STUCK_MEMORY)
        #: connections connecting or open, to every destination
        self._connections = 0
        #: ... of them to next hops not proven when they opened
        self._unproven_connections = 0
        #: _open_waiting is running (a connect that finishes at once calls it again)
        self._filling = False
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
        return (sum(1 for dest in self._line if dest.pending)
                + sum(1 for dest in self._proven_line if dest.pending))

    @property
    def stuck_destinations(self) -> int:
        """Next hops whose last connection ran out of a deadline."""
        return len(self._stuck)

    @property
    def _protocols(self) -> list[MMTPInitiatorProtocol]:
        """Every connection past its connect, including full ones no longer
        a destination's active one (tests/test_three_nodes.py waits until
        there is none)."""
        return [conn for dest in self._destinations.values() for conn in dest.connections
                if conn is not dest.opening]

    def proven(self, destination: NextHop) -> bool:
        """Whether ``destination`` acknowledged a packet and has not failed
        since (as far as the client remembers)."""
        return destination in self._proven

    def held(self, destination: NextHop) -> int:
        """Packets held in memory for ``destination``."""
        dest = self._destinations.get(destination)
        return dest.held if dest is not None else 0

    def apply_settings(self, settings: InitiatorSettings) -> None:
        """Take ``settings`` (after a SIGHUP): copied into the settings the
        open connections share; a higher ``max_connections`` opens
        connections for waiting destinations at once."""
        if settings is not self.settings:
            shorter = settings.keep_open < self.settings.keep_open
            for f in fields(InitiatorSettings):
                setattr(self.settings, f.name, getattr(settings, f.name))
            if shorter:  # connections kept open under the old value close now
                for conn in self._protocols:
                    conn.close_if_idle()
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

    def _peer_address(self, conn: MMTPInitiatorProtocol) -> Optional[str]:
        """The address TCP connected to (None if the transport cannot say)."""
        peer = conn.transport.getPeer() if conn.transport is not None else None
        addr = normalize_address(str(getattr(peer, "host", "")))
        return str(addr) if addr is not None else None

    # --- queueing -----------------------------------------------------------------

    def _enqueue(self, destination: NextHop, item: _Item) -> defer.Deferred:
        if self._denied_literal(destination):
            self.log.debug("Not relaying to {host}:{port}: denied by the outgoing address "
                           "rules", host=destination.host, port=destination.port)
            return defer.fail(NextHopDenied("the next hop's address is denied by our "
                                                "[Outgoing/MMTP] rules"))
        dest = self._destinations.get(destination)
        if dest is None:
            dest = self._destinations[destination] = _Destination(destination)
        cap = self.settings.max_queued_per_destination
        if cap > 0 and dest.held >= cap:
            self._forget_if_idle(dest)
            return defer.fail(NextHopBusy(f"{cap} packets are held for this next hop "
                                              "already"))
        if not item.junk:
            self.stats.count(Event.ATTEMPTED_RELAY)
        dest.held += 1
        item.deferred.addBoth(self._released, dest)
        dest.pending.append(item)
        self._dispatch(dest)
        if self._line or self._proven_line:  # max_connections may have been raised
            self._open_waiting()
        return item.deferred

    @staticmethod
    def _released(result, dest: _Destination):
        dest.held -= 1
        return result

    def _dispatch(self, dest: _Destination) -> None:
        """Put ``dest``'s pending packets on its open connection; ask for
        another connection for those that do not fit."""
        conn = dest.active
        while dest.pending and conn is not None and conn.accepting:
            conn.queue(dest.pending.popleft())
        if (dest.pending and dest.opening is None
                and len(dest.connections) < self.settings.connections_per_destination):
            if not dest.in_line_since:
                self._arrivals += 1
                dest.in_line_since = self._arrivals
                if dest.destination in self._proven:
                    self._proven_line.append(dest)
                else:
                    self._line.append(dest)
            self._open_waiting()
        # else: the connection being opened takes them, or one of the
        # destination's own connections must finish first (_finished)

    def _open_waiting(self) -> None:
        """Open connections for the destinations in line while fewer than
        ``max_connections`` are connecting or open; those not proven only
        while they hold fewer than their share (:func:`unproven_share`)."""
        if self._filling:  # called again from a connect that finished at once
            return
        self._filling = True
        try:
            while self._connections < max(1, self.settings.max_connections):
                dest = self._next_in_line()
                if dest is None:
                    break
                dest.in_line_since = 0
                if (dest.pending and dest.opening is None
                        and len(dest.connections) < self.settings.connections_per_destination):
                    self._open(dest)
            self._close_idle_for_waiting()
        finally:
            self._filling = False

    def _slot_wanted(self, finishing: Optional[MMTPInitiatorProtocol] = None) -> bool:
        """Whether a connection with all acknowledged (``finishing``) must
        not stay open: see :meth:`_slots_wanted`."""
        return self._slots_wanted(finishing) > 0

    def _slots_wanted(self, finishing: Optional[MMTPInitiatorProtocol] = None) -> int:
        """Every slot is taken: how many destinations wait that freed slots
        would go to, beyond those the connections already closing will
        serve (0 while a slot is free)."""
        if self._connections < max(1, self.settings.max_connections):
            return 0
        closing = sum(1 for conn in self._protocols if conn.phase is Phase.CLOSING)
        return max(0, self._could_take_a_slot(finishing) - closing)

    def _could_take_a_slot(self, finishing: Optional[MMTPInitiatorProtocol] = None) -> int:
        """How many destinations in line freed slots could go to: every
        proven one, and unproven ones only as far as their share has room,
        now or once its idle (or ``finishing``, or closing) connections
        are gone.  Closing kept-open connections for the others (under a
        flood of new next hops, say) would free slots that nobody may
        take, and keep no connection open at all."""
        proven = sum(1 for dest in self._proven_line if dest.pending)
        unproven = sum(1 for dest in self._line if dest.pending)
        if not unproven:
            return proven
        room = max(0, unproven_share(self.settings.max_connections)
                   - self._unproven_connections)
        room += sum(1 for conn in self._protocols if conn.unproven and (
            conn.phase in (Phase.IDLE, Phase.CLOSING) or conn is finishing))
        return proven + min(unproven, room)

    def _close_idle_for_waiting(self) -> None:
        """If every slot is taken and destinations wait that could take
        one (:meth:`_slots_wanted`), close as many connections kept open
        with nothing to send; each frees its slot once lost."""
        wanted = self._slots_wanted()
        if not wanted:
            return
        # Connections counted in the unproven share first: closing one frees
        # a slot and room in the share.
        for conn in sorted(self._protocols, key=lambda conn: not conn.unproven):
            if wanted and conn.close_if_idle():
                wanted -= 1

    def _next_in_line(self) -> Optional[_Destination]:
        """The next destination to connect to, first come first served:
        whichever waited longer, but the common one only while it holds
        less than its share."""
        proven = self._proven_line
        common = self._line if self._unproven_connections < unproven_share(
            self.settings.max_connections) else None
        if proven and common:
            line = proven if proven[0].in_line_since < common[0].in_line_since else common
        else:
            line = proven or common
        return line.popleft() if line else None

    # --- connections --------------------------------------------------------------

    def _open(self, dest: _Destination) -> None:
        """Connect for ``dest``'s pending packets; a full connection keeps
        draining its acknowledgements while the next one does its handshake.
        The connection counts against ``max_connections`` from now until
        it is settled (:meth:`_finished`)."""
        conn = MMTPInitiatorProtocol(dest.destination, self.tls, self.reactor, self.settings,
                                     self.stats, lambda conn: self._finished(conn, dest),
                                     self._acknowledged,
                                     unproven=dest.destination not in self._proven,
                                     slot_wanted=self._slot_wanted)
        dest.connections.append(conn)
        dest.opening = conn
        self._connections += 1
        if conn.unproven:
            self._unproven_connections += 1
        self.stats.count(Event.ATTEMPTED_CONNECT)

        d = self.connect(dest.destination, _InitiatorFactory(conn))
        expired = False
        if not d.called and self.settings.connect_timeout > 0:
            # Our own deadline too: it covers a name lookup, and a connect
            # replaced in tests.
            def expire() -> None:
                nonlocal expired
                expired = True
                d.cancel()

            deadline = self.reactor.callLater(self.settings.connect_timeout, expire)

            def settled(result):
                if deadline.active():
                    deadline.cancel()
                return result

            d.addBoth(settled)
        d.addCallbacks(lambda _: self._connected(conn, dest),
                       lambda failure: self._could_not_connect(failure, conn, expired))

    def connect(self, destination: NextHop, factory: Factory) -> defer.Deferred:
        endpoint = HostnameEndpoint(self.reactor, destination.host, destination.port,
                                    timeout=self.settings.connect_timeout,
                                    bindAddress=self.settings.bind_address)
        if self.wrap_endpoint is not None:
            endpoint = self.wrap_endpoint(endpoint)
        return wrapClientTLS(self.tls, endpoint).connect(factory)

    def _connected(self, conn: MMTPInitiatorProtocol, dest: _Destination) -> None:
        dest.opening = None
        if self.allows is not None:
            address = self._peer_address(conn)
            if address is None or not self._allowed(address, dest.destination.port):
                self._refuse(conn, dest, address)
                return
        if not dest.pending:
            # Its packets failed while it connected (close()): nothing to send.
            conn._fail(_Ending(ConnectionFailed("nothing left to send"), by_us=True))
            return
        dest.active = conn
        self._dispatch(dest)

    def _could_not_connect(self, failure: Failure, conn: MMTPInitiatorProtocol,
                           expired: bool) -> None:
        """The connect failed (``expired``: our deadline cancelled it)."""
        self.stats.count(Event.FAILED_CONNECT)
        timed_out = expired or failure.check(error.TimeoutError) is not None
        if timed_out:
            self.stats.count(Event.TIMED_OUT)
        # The reason may name the next hop (a DNS error does): debug only.
        self.log.info("Could not connect to a next hop: {kind}",
                      kind="timed out" if timed_out else failure.type.__name__)
        self.log.debug("Could not connect to a next hop: {why}", why=failure.getErrorMessage())
        why = "timed out" if expired else failure.getErrorMessage()
        conn._connect_failed(_Ending(CannotConnect(f"cannot connect: {why}"), timed_out))

    def _refuse(self, conn: MMTPInitiatorProtocol, dest: _Destination,
                address: Optional[str]) -> None:
        """The next hop's name led to an address the rules deny: close
        before any MMTP byte and fail its packets (they are not retried)."""
        self.stats.count(Event.DENIED_CONNECT)
        self.log.warn("Refused to relay to a next hop: its hostname leads to an address "
                      "denied by our [Outgoing/MMTP] rules")
        self.log.debug("Next hop {host}:{port} connected at {address}, which the outgoing "
                       "address rules deny", host=dest.destination.host,
                       port=dest.destination.port, address=address)
        error = NextHopDenied("the next hop's address is denied by our "
                                  "[Outgoing/MMTP] rules")
        self._fail_pending(dest, Failure(error))  # first: the abort must not reopen for them
        conn._fail(_Ending(error, by_us=True))

    def _fail_pending(self, dest: _Destination, failure: Failure) -> int:
        """Fail the packets waiting for a connection; how many there were."""
        items = list(dest.pending)
        dest.pending.clear()
        self._forget_if_idle(dest)
        for item in items:
            if not item.junk:
                self.stats.count(Event.FAILED_RELAY)
            item.deferred.errback(failure)
        return len(items)

    def _finished(self, conn: MMTPInitiatorProtocol, dest: _Destination) -> None:
        """``conn`` is lost, or never connected: its slot is free.  If the
        next hop is to blame (:attr:`MMTPInitiatorProtocol.next_hop_failed`)
        it is no longer proven, and what waits for it fails too (its caller
        retries it on its own schedule) instead of holding the next free
        connection."""
        dest.connections.remove(conn)
        if dest.opening is conn:
            dest.opening = None
        if dest.active is conn:
            dest.active = None
        self._connections -= 1
        if conn.unproven:
            self._unproven_connections -= 1
        # Sent as the next hop closed a connection kept open: first in line
        # for the next one, as if never sent.
        dest.pending.extendleft(reversed(conn.returned))
        if conn.next_hop_failed:
            self._proven.forget(dest.destination)
            failure = conn.failure or Failure(ConnectionFailed(
                "connection lost before any acknowledgement"))
            failed = conn.lost + self._fail_pending(dest, failure)
            if conn.timed_out:
                self._stuck_next_hop(dest.destination, failed)
        self._dispatch(dest)  # the destination's own limit may have held some
        self._open_waiting()  # a connection is free for the next in line
        self._forget_if_idle(dest)

    def _forget_if_idle(self, dest: _Destination) -> None:
        if (not dest.connections and not dest.pending
                and self._destinations.get(dest.destination) is dest):
            del self._destinations[dest.destination]

    # --- proven and stuck next hops ----------------------------------------------

    def _acknowledged(self, destination: NextHop) -> None:
        """``destination`` acknowledged a frame: proven (again)."""
        self._proven.mark(destination)
        if self._stuck.forget(destination):
            self.log.debug("Next hop {host}:{port} answers again",
                           host=destination.host, port=destination.port)

    def _stuck_next_hop(self, destination: NextHop, packets: int) -> None:
        """A connection to ``destination`` ran out of a deadline, failing
        ``packets`` packets: count it, and report it (see
        :meth:`_report_stuck`)."""
        self.log.debug("Next hop {host}:{port} is stuck: no acknowledgement within the "
                       "deadline", host=destination.host, port=destination.port)
        if self._stuck.mark(destination):
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
        for dest in list(self._destinations.values()):
            dest.in_line_since = 0
            self._fail_pending(dest, error)
        for conn in self._protocols:
            conn._fail(_Ending(ConnectionFailed("client shutting down"), by_us=True))
        return defer.succeed(None)
