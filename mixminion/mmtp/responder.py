"""The MMTP responder: Twisted glue around :class:`ResponderMachine`.

The protocol only feeds bytes to the machine, hands packets to the sink,
and writes what the machine says.  A packet is acknowledged RECEIVED only
after the sink's Deferred fires (the packet is on disk); a sink failure
sends REJECTED.  Deadlines (handshake, version line, partial frame, idle)
run on an injected clock.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from mixminion.mmtp.interfaces import IPacketSink
from mixminion.mmtp.limits import AddressRules, ConnectionCounter, ConnectionLimits
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

    # --- connection lifecycle --------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        peer = self.transport.getPeer()
        self.peer = getattr(peer, "host", str(peer))
        self.factory.stats.count("ReceivedConnection")
        self._tcp = tcp_transport(self.transport)
        set_no_delay(self.transport)
        self.timers.start("handshake", self.factory.limits.handshake_timeout,
                          lambda: self._timed_out("TLS handshake"))

    def handshakeCompleted(self) -> None:  # noqa: N802
        self._handshake_done = True
        self.timers.cancel("handshake")
        self.timers.start("line", self.factory.limits.line_timeout,
                          lambda: self._timed_out("protocol line"))
        self._touch()

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
        self._touch()
        frames_before = self.frames
        try:
            self.machine.receive_data(data)
            self._drain()
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        self._watch_partial_frame(progressed=self.frames != frames_before)

    def _drain(self) -> None:
        machine = self.machine
        event = machine.next_event()
        if event is NEED_DATA:
            return  # most chunks: part of a frame (TLS records are 16 KiB)
        while event is not NEED_DATA:
            if isinstance(event, PacketReceived):
                self.frames += 1
                self._store(event.seq, event.packet)
            elif isinstance(event, JunkReceived):
                self.frames += 1
                machine.accept(event.seq)
            elif isinstance(event, VersionAccepted):
                self.timers.cancel("line")
            event = machine.next_event()
        self._flush()
        self._apply_backpressure()

    def _store(self, seq: int, packet: bytes) -> None:
        d = defer.maybeDeferred(self.factory.sink.receivePacket, packet, self.peer)
        d.addCallbacks(self._stored, self._not_stored, callbackArgs=(seq,),
                       errbackArgs=(seq,))

    def _stored(self, _result, seq: int) -> None:
        self.factory.stats.count("ReceivedPacket")
        self.stored += 1
        self._acknowledge(seq, True)

    def _not_stored(self, failure: Failure, seq: int) -> None:
        self.factory.stats.count("RejectedPacket")
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

    def _touch(self) -> None:
        self.timers.restart("idle", self.factory.limits.idle_timeout,
                            lambda: self._timed_out("idle connection"))

    def _timed_out(self, what: str) -> None:
        self.factory.stats.count("TimedOut")
        self.log.info("MMTP connection closed: {what} timed out", what=what)
        self._abort()

    def _protocol_error(self, exc: ProtocolError) -> None:
        self._count_protocol_error(exc)
        self._abort()

    def _count_protocol_error(self, exc: ProtocolError) -> None:
        self.factory.stats.count("ProtocolError")
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


class GuardedTLSFactory(TLSMemoryBIOFactory):
    """TLS server factory that applies ``Allow``/``Deny`` rules and
    connection limits when TCP accepts, before any TLS work is done."""

    log = Logger()

    def __init__(self, context_factory, wrapped: MMTPResponderFactory,
                 rules: Optional[AddressRules] = None, clock: Optional[IReactorTime] = None) -> None:
        super().__init__(context_factory, False, wrapped, clock=clock)
        self.rules = rules or AddressRules()
        self.counter = ConnectionCounter(wrapped.limits)
        self.stats = wrapped.stats
        self._hosts: dict[int, str] = {}

    def buildProtocol(self, addr):  # noqa: N802
        host = getattr(addr, "host", "")
        if not self.rules.allows(host):
            self.stats.count("DeniedConnection")
            self.log.info("MMTP connection refused by address rules")
            return None
        why = self.counter.refusal(host)
        if why is not None:
            self.stats.count("RefusedConnection")
            self.log.info("MMTP connection refused: {why}", why=why)
            return None
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            self.counter.opened(host)
            self._hosts[id(protocol)] = host
        return protocol

    def unregisterProtocol(self, protocol) -> None:  # noqa: N802
        host = self._hosts.pop(id(protocol), None)
        if host is not None:
            self.counter.closed(host)
        super().unregisterProtocol(protocol)


def responder_factory(sink: IPacketSink, tls, clock: IReactorTime,
                      limits: Optional[ConnectionLimits] = None,
                      rules: Optional[AddressRules] = None,
                      stats: Optional[MMTPStats] = None) -> GuardedTLSFactory:
    """The factory to listen with: limits → TLS (``tls`` is a
    :class:`mixminion.mmtp.tls.ResponderTLS`) → MMTP → ``sink``."""
    inner = MMTPResponderFactory(sink, clock, limits, stats)
    return GuardedTLSFactory(tls, inner, rules, clock=clock)
