"""``[Server] MaxBandwidth`` and ``MaxBandwidthSpike``: one token bucket
for all of a node's MMTP traffic (mmtp.md §8.4).

The bucket holds at most MaxBandwidthSpike bytes (5 x MaxBandwidth
unless set) and fills at MaxBandwidth bytes a second.  Every MMTP
connection, accepted or opened, in both directions, draws from the same
bucket, and it counts bytes on the TCP socket: TLS records, handshakes and
alerts included, because those are the bytes an operator's link carries.
So the wrappers sit between TCP and TLS (:meth:`BandwidthLimiter.wrap_factory`
around the listening TLS factory, :meth:`BandwidthLimiter.wrap_endpoint`
under ``wrapClientTLS``); the codec and the MMTP protocols know nothing of it.

Refill.  The reference adds a second's worth of tokens once a second.  Here
the bucket fills continuously: its level is computed from the clock each
time it is used, so the long-run rate is exact however late timers fire.
A timer runs only while something waits (held writes or paused reads) and
fires when the bucket will hold a tenth of a second's worth (:data:`TICK`),
so waiting traffic moves in bursts of MaxBandwidth/10 bytes ten times a
second, smoother than the reference's one burst a second.  When nothing
waits, no timer runs.

Writes beyond the tokens are held, in order, in the connection's buffer
and released as tokens come, round-robin over the connections in slices of
at most one TLS record (:data:`SLICE`), so one busy connection cannot keep
the others waiting.  A producer registered on the connection is paused
while more than :data:`HIGH_WATER` bytes are held.

Reads cannot be refused: the kernel has already received the chunk.  It is
delivered at once and charged, which may leave the bucket in debt; then no
socket is serviced (every connection's reads paused with
``pauseProducing``, writes held) until the debt is repaid and a tick's
worth is back.  At that wake-up held writes take the tokens, but reads
are resumed even when the writes took them all: every connection may then
read one chunk on credit (the first such read pauses them all again), so
neither direction can starve the other, and the debt is repaid before the
next wake-up, which keeps the long-run rate exact.

Unlimited (rate ``None``): the wrappers stay in place, so a SIGHUP can
set a limit later; each read or write then costs one test and an addition
(the byte count, :attr:`BandwidthLimiter.bytes_total`).

Measured (``benchmarks/bandwidth.py``): a real node with ``MaxBandwidth:
1 MB`` kept busy over loopback TLS moved 1.0006 x the limit on the wire
over 20 s with two connections, 1.0037 x with eight (bytes still in
socket buffers at the end of the window); the first second carried the
5 MB spike plus the second's refill.

A peer's partial-frame deadline (``ConnectionLimits.frame_timeout``) keeps
running while the bucket holds its reads: with a very low MaxBandwidth and
many busy connections a 32 KiB frame can take longer than that deadline.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, Optional, Set

from twisted.internet import defer
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import implementer

#: seconds' worth of tokens a waiting connection is woken up for
TICK = 0.1
#: the most bytes one held connection gets before the next one's turn
SLICE = 16384
#: held bytes above which a connection's producer is paused ...
HIGH_WATER = 65536
#: ... until they are down to this
LOW_WATER = 16384


class _Pauses:
    """Pauses ``target`` while at least one reason holds.

    Two parties may want one thing paused: the bucket and the MMTP
    protocol both pause a socket's reads, the bucket and the TCP transport
    both pause a producer.  Neither may resume what the other paused."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.reasons: Set[str] = set()

    def pause(self, reason: str) -> None:
        if reason not in self.reasons:
            was_running = not self.reasons
            self.reasons.add(reason)
            if was_running:
                self.target.pauseProducing()

    def resume(self, reason: str) -> None:
        if reason in self.reasons:
            self.reasons.discard(reason)
            if not self.reasons:
                self.target.resumeProducing()


@implementer(IPushProducer)
class _ProducerGate(_Pauses):
    """Stands for a streaming producer before the TCP transport, which
    pauses it for its own full buffer ("transport"), while the bucket
    pauses it for bytes held above the TCP transport ("bandwidth")."""

    def pauseProducing(self) -> None:  # noqa: N802
        self.pause("transport")

    def resumeProducing(self) -> None:  # noqa: N802
        self.resume("transport")

    def stopProducing(self) -> None:  # noqa: N802
        self.target.stopProducing()


class LimitedProtocol(ProtocolWrapper):
    """One connection's bytes, in and out, drawn from the bucket; it is
    the transport of the TLS layer above it."""

    factory: "_LimitedFactory"

    def __init__(self, factory: "_LimitedFactory", wrapped: Any) -> None:
        super().__init__(factory, wrapped)
        self.limiter = factory.limiter
        #: the protocol above, kept after ``connectionLost`` drops
        #: ``wrappedProtocol`` (what an endpoint's Deferred fires with)
        self.inner = wrapped
        #: bytes written above but not yet given to TCP, oldest first
        self.held = bytearray()
        #: the TCP transport's reads, paused by the bucket or the protocol above
        self.reading = _Pauses(None)
        self._producer: Optional[_ProducerGate] = None
        self._close_when_sent = False
        #: aborted or lost: bytes written now go nowhere (and are not held)
        self.finished = False

    # --- IProtocol, from the TCP transport below ----------------------------

    def connectionMade(self) -> None:  # noqa: N802
        self.reading.target = self.transport
        self.limiter._add(self)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.limiter._received(len(data))
        self.wrappedProtocol.dataReceived(data)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.finished = True
        self.limiter._remove(self)
        self._producer = None
        super().connectionLost(reason)

    # --- ITransport, for the protocol above ----------------------------------

    def write(self, data: bytes) -> None:
        self.limiter._send(self, data)

    def writeSequence(self, data: Any) -> None:  # noqa: N802
        self.limiter._send(self, b"".join(data))

    def loseConnection(self) -> None:  # noqa: N802
        """Close once the held bytes are sent (a TLS close_notify among
        them): closing TCP now would drop them."""
        self.disconnecting = 1
        if self.held:
            self._close_when_sent = True
        else:
            self.transport.loseConnection()

    def abortConnection(self) -> None:  # noqa: N802
        self.disconnecting = 1
        self.finished = True
        self.limiter._drop(self)
        self.transport.abortConnection()

    def pauseProducing(self) -> None:  # noqa: N802
        """The protocol above stops reading (the responder does while the
        disk is behind); the bucket must not resume what it paused."""
        self.reading.pause("protocol")

    def resumeProducing(self) -> None:  # noqa: N802
        self.reading.resume("protocol")

    def stopProducing(self) -> None:  # noqa: N802
        self.transport.stopProducing()

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        if not streaming:
            # Pull producers are resumed by TCP whenever its buffer is
            # empty; nothing above us uses one (TLS registers push ones).
            self.transport.registerProducer(producer, streaming)
            return
        self._producer = _ProducerGate(producer)
        self.transport.registerProducer(self._producer, True)
        if len(self.held) > HIGH_WATER:
            self._producer.pause("bandwidth")

    def unregisterProducer(self) -> None:  # noqa: N802
        self._producer = None
        self.transport.unregisterProducer()

    # --- used by the limiter -------------------------------------------------

    def _hold(self, data: bytes) -> None:
        self.held += data
        if self._producer is not None and len(self.held) > HIGH_WATER:
            self._producer.pause("bandwidth")

    def _released(self) -> None:
        """Some held bytes went out: let the producer go on, and finish a
        close that waited for them."""
        if self._producer is not None and len(self.held) <= LOW_WATER:
            self._producer.resume("bandwidth")
        if not self.held and self._close_when_sent:
            self._close_when_sent = False
            self.transport.loseConnection()


class _LimitedFactory(WrappingFactory):
    protocol = LimitedProtocol
    #: one per outgoing connection: Twisted's "Starting factory" lines would
    #: be four INFO lines per next hop tried
    noisy = False

    def __init__(self, limiter: "BandwidthLimiter", wrapped: IProtocolFactory) -> None:
        super().__init__(wrapped)
        self.limiter = limiter

    def buildProtocol(self, addr: Any) -> Optional[LimitedProtocol]:  # noqa: N802
        # A wrapped factory may refuse (address rules, connection limits).
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        return self.protocol(self, inner)


@implementer(IStreamClientEndpoint)
class _LimitedEndpoint:
    def __init__(self, limiter: "BandwidthLimiter", endpoint: IStreamClientEndpoint) -> None:
        self._limiter = limiter
        self._endpoint = endpoint

    def connect(self, factory: IProtocolFactory) -> defer.Deferred:
        d = self._endpoint.connect(self._limiter.wrap_factory(factory))
        d.addCallback(lambda wrapper: wrapper.inner)
        return d


class BandwidthLimiter:
    """The token bucket, shared by every connection made through
    :meth:`wrap_factory` or :meth:`wrap_endpoint`.

    ``rate`` is bytes a second (``None``: unlimited); ``spike`` the
    bucket's size (``None``: 5 x ``rate``).  The bucket starts full.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, rate: Optional[int] = None,
                 spike: Optional[int] = None) -> None:
        self.clock = clock
        self.rate: Optional[int] = None
        self.spike: Optional[int] = None
        #: bytes in and out so far, limited or not
        self.bytes_total = 0
        self._tokens = 0.0  # may be negative: a read's debt
        self._stamp = clock.seconds()
        self._conns: Set[LimitedProtocol] = set()
        #: connections holding bytes, in the order they are served
        self._writers: Deque[LimitedProtocol] = deque()
        #: the bucket ran out: every connection's reads are paused and
        #: new writes are held until the next wake-up
        self._dry = False
        self._wakeup: Optional[IDelayedCall] = None
        self.set_limits(rate, spike)

    # --- public --------------------------------------------------------------

    def set_limits(self, rate: Optional[int], spike: Optional[int] = None) -> None:
        """Change the limits at once (a SIGHUP): held bytes are released
        at the new rate, or all at once when ``rate`` is ``None``."""
        if rate is None:
            spike = None
        else:
            if rate <= 0:
                raise ValueError(f"MaxBandwidth must be more than 0 bytes a second, not {rate}")
            if spike is None:
                spike = 5 * rate
            elif spike <= 0:
                raise ValueError(f"MaxBandwidthSpike must be more than 0 bytes, not {spike}")
        if self.rate is None:
            self._tokens = float(spike or 0)  # a new limit starts with a full bucket
            self._stamp = self.clock.seconds()
        else:
            self._refill()  # what the old rate earned until now
        changed = (rate, spike) != (self.rate, self.spike)
        self.rate, self.spike = rate, spike
        if rate is None:
            self._open_up()
        else:
            self._tokens = min(self._tokens, float(spike))
            self._cancel_wakeup()
            if self._dry or self._writers:
                self._schedule()
        if changed:
            if rate is None:
                self.log.info("MMTP bandwidth: unlimited")
            else:
                self.log.info("MMTP bandwidth limited to {rate} bytes/s, bursts of {spike} bytes",
                              rate=rate, spike=spike)

    @property
    def limited(self) -> bool:
        return self.rate is not None

    @property
    def tokens(self) -> float:
        """Bytes that could be sent now (negative: a read's debt)."""
        if self.rate is None:
            return float("inf")
        self._refill()
        return self._tokens

    @property
    def waiting(self) -> bool:
        """Whether a connection waits for tokens (a timer runs only then)."""
        return self._dry or bool(self._writers)

    def wrap_factory(self, factory: IProtocolFactory) -> IProtocolFactory:
        """``factory`` with every connection's bytes counted on the bucket;
        wrap the outermost (TLS) factory so the count is of TCP bytes."""
        return _LimitedFactory(self, factory)

    def wrap_endpoint(self, endpoint: IStreamClientEndpoint) -> IStreamClientEndpoint:
        """``endpoint`` whose connections draw from the bucket; give it to
        ``wrapClientTLS`` so it counts the bytes under TLS.  Its Deferred
        fires with the protocol of the factory passed to ``connect``."""
        return _LimitedEndpoint(self, endpoint)

    # --- the bucket ------------------------------------------------------------

    def _refill(self) -> None:
        now = self.clock.seconds()
        elapsed = now - self._stamp
        self._stamp = now
        if elapsed > 0:  # a clock stepped back earns nothing
            self._tokens = min(float(self.spike), self._tokens + elapsed * self.rate)

    def _quantum(self) -> float:
        """The tokens to wait for: a tick's worth, at least one byte, at
        most the bucket."""
        return min(float(self.spike), max(1.0, self.rate * TICK))

    def _received(self, n: int) -> None:
        self.bytes_total += n
        if self.rate is None:
            return
        self._refill()
        self._tokens -= n
        if self._tokens < 1:
            self._run_dry()

    def _send(self, conn: LimitedProtocol, data: bytes) -> None:
        if not data or conn.finished:
            return
        if self.rate is None:
            self.bytes_total += len(data)
            conn.transport.write(data)
            return
        if conn.held or self._dry or self._writers:
            # Behind this connection's earlier bytes, or the others' turn.
            self._hold(conn, data)
            self._schedule()
            return
        self._refill()
        n = min(len(data), max(0, int(self._tokens)))
        if n:
            self._tokens -= n
            self._emit(conn, data if n == len(data) else data[:n])
        if n < len(data):
            self._hold(conn, data[n:])
        if self._tokens < 1:
            self._run_dry()

    def _hold(self, conn: LimitedProtocol, data: bytes) -> None:
        if not conn.held:
            self._writers.append(conn)
        conn._hold(data)

    def _emit(self, conn: LimitedProtocol, data: bytes) -> None:
        self.bytes_total += len(data)
        conn.transport.write(data)

    def _run_dry(self) -> None:
        if not self._dry:
            self._dry = True
            for conn in list(self._conns):
                conn.reading.pause("bandwidth")
        self._schedule()

    def _schedule(self) -> None:
        if self._wakeup is None:
            self._refill()
            delay = max(0.0, (self._quantum() - self._tokens) / self.rate)
            self._wakeup = self.clock.callLater(delay, self._wake)

    def _cancel_wakeup(self) -> None:
        if self._wakeup is not None:
            if self._wakeup.active():
                self._wakeup.cancel()
            self._wakeup = None

    def _wake(self) -> None:
        self._wakeup = None
        self._refill()
        if self._tokens < 1:  # a read came in debt since this was set
            self._schedule()
            return
        if self._dry:
            self._dry = False
            for conn in list(self._conns):
                conn.reading.resume("bandwidth")
        self._release()
        if self._writers:
            # Reads stay resumed though the writes took every token: each
            # connection may read one chunk on credit, so writes cannot
            # starve reads; the first such read pauses them all again.
            self._schedule()

    def _release(self) -> None:
        """Held bytes out, round-robin, while there are tokens."""
        while self._writers:
            room = int(self._tokens)
            if room < 1:
                break
            conn = self._writers.popleft()
            n = min(room, len(conn.held), SLICE)
            chunk = bytes(conn.held[:n])
            del conn.held[:n]
            if conn.held:
                self._writers.append(conn)
            self._tokens -= n
            self._emit(conn, chunk)
            conn._released()

    def _open_up(self) -> None:
        """No limit any more: release everything held and every read."""
        self._cancel_wakeup()
        if self._dry:
            self._dry = False
            for conn in list(self._conns):
                conn.reading.resume("bandwidth")
        while self._writers:
            conn = self._writers.popleft()
            chunk = bytes(conn.held)
            del conn.held[:]
            self._emit(conn, chunk)
            conn._released()

    # --- connections -------------------------------------------------------------

    def _add(self, conn: LimitedProtocol) -> None:
        self._conns.add(conn)
        if self._dry:
            conn.reading.pause("bandwidth")

    def _drop(self, conn: LimitedProtocol) -> None:
        """Forget what ``conn`` holds (it is aborted or gone)."""
        if conn.held:
            del conn.held[:]
            self._writers.remove(conn)

    def _remove(self, conn: LimitedProtocol) -> None:
        self._drop(conn)
        self._conns.discard(conn)
        if not self._conns:
            # Nobody left to wait; the next connection meets the same
            # bucket (a debt included) and sets a timer if it must wait.
            self._cancel_wakeup()
            self._dry = False
