"""The MMTP responder: Twisted glue around :class:`ResponderMachine`.

The protocol only feeds bytes to the machine, hands packets to the sink,
and writes what the machine says.  A packet is acknowledged RECEIVED only
after the sink's Deferred fires (the packet is on disk); a sink failure
sends REJECTED.  Deadlines run on an injected clock:

* ``handshake``: from TCP accept to the end of the TLS handshake;
* ``line``: from there to the protocol line;
* ``first frame``: from the protocol line to the first complete frame
  (SEND or JUNK), so a peer that negotiates and then says nothing holds a
  slot for 30 s, not for the idle timeout;
* ``frame``: a frame once started must be finished (slowloris guard);
* ``idle``: from the handshake or the last *packet*.  JUNK frames and
  stray bytes do not push it back: link padding alone cannot keep a
  connection open past the idle limit (issue 12: one JUNK frame every
  200 s kept a connection forever).  We chose "only packets count" over
  "JUNK counts, with a cap": it needs no new number, and a peer that has
  nothing to send has no reason to hold a slot.  When it runs out while a
  frame is arriving, the frame deadline decides: a packet that completes
  saves the connection, a JUNK frame that completes closes it.  While we
  owe the peer acknowledgements (our disk is slow) it does not run out.

The first-frame deadline likewise leaves a frame already under way to the
frame deadline.  Together: a connection that never delivers a packet is
closed at most handshake + line + first frame (+ frame) after accept, and
idle + frame after its last packet.

When the connection table is full, :class:`GuardedTLSFactory` closes the
connection that has made the least progress (:func:`~mixminion.mmtp.limits.eviction_order`)
to make room for the newcomer, and counts it as ``EvictedConnection``.
"""

from __future__ import annotations

import socket
from typing import Optional

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from mixminion.events import Event
from mixminion.mmtp.interfaces import IPacketSink
from mixminion.mmtp.limits import (
    ConnectionCounter,
    ConnectionLimits,
    NetworkRules,
    Progress,
    Stage,
    eviction_order,
)
from mixminion.mmtp.machine import (
    NEED_DATA,
    JunkReceived,
    PacketReceived,
    ProtocolError,
    ResponderMachine,
    VersionAccepted,
)
from mixminion.mmtp.stats import MMTPStats
from mixminion.mmtp.timers import Timers
from mixminion.mmtp.transport import set_no_delay, tcp_transport


@implementer(IHandshakeListener)
class MMTPResponderProtocol(Protocol):
    log = Logger()

    def __init__(self, factory: "MMTPResponderFactory") -> None:
        self.factory = factory
        self.machine = ResponderMachine(max_line_length=factory.limits.max_line_length)
        self.timers = Timers(factory.clock)
        self.peer = "?"
        self.closed = False
        self._paused = False
        self._tcp = None  # the TCP transport under TLS, for flow control
        self._frame_watched = False  # the partial-frame deadline is running
        self._handshake_done = False
        self.frames = 0  # good frames received (SEND and JUNK)
        self.stored = 0  # packets acknowledged RECEIVED
        self.rejected = 0  # packets acknowledged REJECTED
        self.stage = Stage.ACCEPTED
        self.progressed_at = factory.clock.seconds()  # when it last progressed
        self._idle_lapsed = False  # the idle limit passed during a frame

    # --- connection lifecycle --------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        peer = self.transport.getPeer()
        self.peer = getattr(peer, "host", str(peer))
        self.factory.stats.count(Event.RECEIVED_CONNECTION)
        self._tcp = tcp_transport(self.transport)
        set_no_delay(self.transport)
        self.progressed_at = self.factory.clock.seconds()
        self.timers.start("handshake", self.factory.limits.handshake_timeout,
                          lambda: self._timed_out("TLS handshake"))

    def peerSpoke(self) -> None:  # noqa: N802
        """The TLS layer received the peer's first bytes (its hello)."""
        if self.stage < Stage.HANDSHAKING:
            self._progress(Stage.HANDSHAKING)

    def handshakeCompleted(self) -> None:  # noqa: N802
        self._handshake_done = True
        self._progress(Stage.NEGOTIATING)
        self.timers.cancel("handshake")
        self.timers.start("line", self.factory.limits.line_timeout,
                          lambda: self._timed_out("protocol line"))
        self._restart_idle()

    def connectionLost(self, reason: Failure = None) -> None:  # noqa: N802
        closed_by_peer = not self.closed
        self.closed = True
        self.timers.cancel_all()
        self._frame_watched = False
        why = reason.getErrorMessage() if reason is not None else "unknown"
        if closed_by_peer and not self._handshake_done:
            # Scanners, non-TLS clients and failed handshakes end here; the
            # TLS layer itself says nothing.
            self.log.info("MMTP connection closed during the TLS handshake: {why}", why=why)
        elif closed_by_peer and not self.machine.dead:
            # A peer that hangs up inside a version line or a frame broke
            # the protocol; its partial frame is dropped, never stored.
            try:
                self.machine.receive_eof()
            except ProtocolError as exc:
                self._count_protocol_error(exc)
        self.log.debug(
            "MMTP connection closed (version {version}): {frames} frames, {stored} "
            "packets stored, {rejected} rejected; {why}",
            version=self.machine.version, frames=self.frames, stored=self.stored,
            rejected=self.rejected, why=why)

    # --- data -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        frames_before = self.frames
        try:
            self.machine.receive_data(data)
            self._drain()
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        if not self.closed:
            self._watch_partial_frame(progressed=self.frames != frames_before)

    def _drain(self) -> None:
        machine = self.machine
        event = machine.next_event()
        if event is NEED_DATA:
            return  # most chunks: part of a frame (TLS records are 16 KiB)
        junk_after_lapse = False
        while event is not NEED_DATA:
            if isinstance(event, PacketReceived):
                self.frames += 1
                self.timers.cancel("first frame")
                self._idle_lapsed = junk_after_lapse = False
                self._progress(Stage.DELIVERING)
                self._restart_idle()
                self._store(event.seq, event.packet)
            elif isinstance(event, JunkReceived):
                self.frames += 1
                self.timers.cancel("first frame")
                junk_after_lapse = self._idle_lapsed
                machine.accept(event.seq)
            elif isinstance(event, VersionAccepted):
                self.timers.cancel("line")
                self._progress(Stage.READY)
                self.timers.start("first frame", self.factory.limits.first_frame_timeout,
                                  self._first_frame_expired)
            event = machine.next_event()
        self._flush()
        if junk_after_lapse:
            # Idle since its last packet, and what it finished was JUNK.
            self._timed_out("idle connection (JUNK only)")
            return
        self._apply_backpressure()

    def _store(self, seq: int, packet: bytes) -> None:
        d = defer.maybeDeferred(self.factory.sink.receivePacket, packet, self.peer)
        d.addCallbacks(self._stored, self._not_stored, callbackArgs=(seq,),
                       errbackArgs=(seq,))

    def _stored(self, _result, seq: int) -> None:
        self.factory.stats.count(Event.RECEIVED_PACKET)
        self.stored += 1
        self._acknowledge(seq, True)

    def _not_stored(self, failure: Failure, seq: int) -> None:
        self.factory.stats.count(Event.REJECTED_PACKET)
        self.rejected += 1
        self.log.warn("Packet refused by storage; answering REJECTED: {why}",
                      why=failure.getErrorMessage())
        self._acknowledge(seq, False)

    def _acknowledge(self, seq: int, accepted: bool) -> None:
        if self.machine.dead:
            return  # the connection broke first; the sender will resend
        (self.machine.accept if accepted else self.machine.reject)(seq)
        if not self.closed:
            self._flush()
            self._apply_backpressure()

    def _flush(self) -> None:
        if self.machine.has_data_to_send and not self.closed:
            self.transport.write(self.machine.data_to_send())

    # --- limits -------------------------------------------------------------

    def _apply_backpressure(self) -> None:
        """Stop reading while too many packets wait for the disk."""
        busy = self.machine.pending_acks >= self.factory.limits.max_unacknowledged
        if busy and not self._paused:
            self._paused = True
            self._tcp.pauseProducing()
        elif not busy and self._paused and not self.closed:
            self._paused = False
            self._tcp.resumeProducing()
            self._watch_partial_frame(progressed=True)

    def _watch_partial_frame(self, progressed: bool = False) -> None:
        """A peer that starts a frame must finish it (slowloris guard).
        The deadline is per frame: it restarts whenever a frame completed,
        so a long pipelined batch is not cut off while it makes progress.
        It does not run while we are paused: the peer cannot finish a frame
        we do not read, and our slow disk is not its fault."""
        if self._frame_watched and not progressed and not self._paused:
            return  # more of the frame already watched (most TLS records)
        partial = (self.machine.version is not None and self.machine.buffered > 0
                   and not self._paused)
        if partial and (progressed or not self._frame_watched):
            self.timers.restart("frame", self.factory.limits.frame_timeout,
                                self._frame_timed_out)
            self._frame_watched = True
        elif not partial:
            self.timers.cancel("frame")
            self._frame_watched = False

    def _frame_timed_out(self) -> None:
        self._frame_watched = False
        self._timed_out("partial frame")

    def _receiving_frame(self) -> bool:
        """Part of a frame is here; the frame deadline watches the rest."""
        return self.machine.version is not None and self.machine.buffered > 0

    def _restart_idle(self) -> None:
        self.timers.restart("idle", self.factory.limits.idle_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        if self.machine.pending_acks > 0:
            self._restart_idle()  # it waits for our disk, not we for it
        elif self._receiving_frame():
            self._idle_lapsed = True  # the frame decides (_drain)
        else:
            self._timed_out("idle connection")

    def _first_frame_expired(self) -> None:
        if not self._receiving_frame():
            self._timed_out("first frame")

    def _progress(self, stage: Stage) -> None:
        self.stage = stage
        self.progressed_at = self.factory.clock.seconds()

    def progress(self) -> Progress:
        """How far this connection has come (the factory closes the one
        with the least progress when the table is full)."""
        busy = self._receiving_frame() or self.machine.pending_acks > 0
        return Progress(busy, self.stage, self.progressed_at)

    def evict(self) -> None:
        """Close to make room for a newcomer (the table is full)."""
        self.factory.stats.count(Event.EVICTED_CONNECTION)
        self.log.debug("MMTP connection closed to make room: {stage}, last progress "
                       "{ago:.1f}s ago", stage=self.stage.name.lower(),
                       ago=self.factory.clock.seconds() - self.progressed_at)
        if self.transport is None:
            self.closed = True
        self._abort()

    def _timed_out(self, what: str) -> None:
        self.factory.stats.count(Event.TIMED_OUT)
        self.log.info("MMTP connection closed: {what} timed out", what=what)
        self._abort()

    def _protocol_error(self, exc: ProtocolError) -> None:
        self._count_protocol_error(exc)
        self._abort()

    def _count_protocol_error(self, exc: ProtocolError) -> None:
        self.factory.stats.count(Event.PROTOCOL_ERROR)
        self.log.info("MMTP peer broke the protocol ({code}): {message}",
                      code=exc.code, message=exc.message)

    def _abort(self) -> None:
        self.timers.cancel_all()
        self._frame_watched = False
        if not self.closed:
            self.closed = True
            self.transport.abortConnection()


class MMTPResponderFactory(Factory):
    """Builds responder protocols for one listening port (inside TLS)."""

    protocol = MMTPResponderProtocol

    def __init__(self, sink: IPacketSink, clock: IReactorTime,
                 limits: Optional[ConnectionLimits] = None,
                 stats: Optional[MMTPStats] = None) -> None:
        self.sink = sink
        self.clock = clock
        self.limits = limits or ConnectionLimits()
        self.stats = stats or MMTPStats()

    def buildProtocol(self, addr) -> MMTPResponderProtocol:  # noqa: N802
        return self.protocol(self)


class _GuardedTLSProtocol(TLSMemoryBIOProtocol):
    """Tells the MMTP protocol when the peer's first TLS bytes arrive: a
    peer that has said something has made more progress than an idle
    socket (the eviction order).

    Under a flood the node accepts late, and an honest peer's hello is
    usually waiting in the socket by then; it is seen (``MSG_PEEK``, the
    bytes stay for TLS) when the connection is made, rather than one
    reactor turn later, during which a burst of newcomers may already
    have closed it."""

    _heard = False

    def makeConnection(self, transport) -> None:  # noqa: N802
        super().makeConnection(transport)
        if not self._heard and _bytes_waiting(transport):
            self._spoke()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if not self._heard and data:
            self._spoke()
        super().dataReceived(data)

    def _spoke(self) -> None:
        self._heard = True
        spoke = getattr(self.wrappedProtocol, "peerSpoke", None)
        if spoke is not None:
            spoke()


def _bytes_waiting(transport) -> bool:
    """Whether the TCP socket under ``transport`` holds received bytes
    (False when it cannot tell, as for in-memory transports)."""
    try:
        handle = transport.getHandle()
        return bool(handle.recv(1, socket.MSG_PEEK))
    except (AttributeError, OSError, TypeError, ValueError):
        return False


#: at most one WARN line about evictions in this many seconds
EVICTION_REPORT_INTERVAL = 60.0


class GuardedTLSFactory(TLSMemoryBIOFactory):
    """TLS server factory that applies ``Allow``/``Deny`` rules and
    connection limits when TCP accepts, before any TLS work is done.

    A newcomer over its address's or network's cap is refused.  One that
    passes them when the table is full takes the slot of the connection
    with the least progress, which is closed at once."""

    log = Logger()
    protocol = _GuardedTLSProtocol

    def __init__(self, context_factory, wrapped: MMTPResponderFactory,
                 rules: Optional[NetworkRules] = None, clock: Optional[IReactorTime] = None) -> None:
        super().__init__(context_factory, False, wrapped, clock=clock)
        self.rules = rules or NetworkRules()
        self.counter = ConnectionCounter(wrapped.limits)
        self.stats = wrapped.stats
        self._clock = wrapped.clock
        #: counted connections (TLS protocol -> peer address, its network);
        #: an evicted one leaves at once, before TCP reports it lost
        self._counted: dict[TLSMemoryBIOProtocol, tuple[str, str]] = {}
        self._evictions = 0  # since the last WARN line
        self._reported_at: Optional[float] = None

    def buildProtocol(self, addr):  # noqa: N802
        host = getattr(addr, "host", "")
        if not self.rules.allows(host):
            self.stats.count(Event.DENIED_CONNECTION)
            self.log.info("MMTP connection refused by address rules")
            return None
        why = self.counter.source_refusal(host)
        if why is None and self.counter.full and not self._make_room():
            why = "too many connections"
        if why is not None:
            self.stats.count(Event.REFUSED_CONNECTION)
            self.log.info("MMTP connection refused: {why}", why=why)
            return None
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            self._counted[protocol] = (host, self.counter.opened(host))
        return protocol

    def _make_room(self) -> bool:
        """Close the connection with the least progress; False if there
        is none to close (every slot taken by one already closing)."""
        crowds = self.counter.per_network
        victim, least = None, None
        for protocol, (_, network) in self._counted.items():
            mmtp = protocol.wrappedProtocol
            if mmtp.closed:
                continue
            key = eviction_order(mmtp.progress(), crowds.get(network, 0))
            if least is None or key < least:
                victim, least = protocol, key
        if victim is None:
            return False
        self.counter.closed(self._counted.pop(victim)[0])
        victim.wrappedProtocol.evict()
        self._report_eviction()
        return True

    def _report_eviction(self) -> None:
        """One WARN line now and then, with the count since the last one
        (under attack there may be thousands a second)."""
        self._evictions += 1
        now = self._clock.seconds()
        if self._reported_at is not None and now - self._reported_at < EVICTION_REPORT_INTERVAL:
            return
        self.log.warn("MMTP connection table full ({limit} connections): made room for "
                      "newcomers by closing the connection with the least progress, {count} "
                      "times since the last report",
                      limit=self.counter.limits.max_connections, count=self._evictions)
        self._evictions = 0
        self._reported_at = now

    def unregisterProtocol(self, protocol) -> None:  # noqa: N802
        counted = self._counted.pop(protocol, None)
        if counted is not None:
            self.counter.closed(counted[0])
        super().unregisterProtocol(protocol)


def responder_factory(sink: IPacketSink, tls, clock: IReactorTime,
                      limits: Optional[ConnectionLimits] = None,
                      rules: Optional[NetworkRules] = None,
                      stats: Optional[MMTPStats] = None) -> GuardedTLSFactory:
    """The factory to listen with: limits → TLS (``tls`` is a
    :class:`mixminion.mmtp.tls.ResponderTLS`) → MMTP → ``sink``."""
    inner = MMTPResponderFactory(sink, clock, limits, stats)
    return GuardedTLSFactory(tls, inner, rules, clock=clock)
