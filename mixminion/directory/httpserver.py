"""The authority's HTTP server: ``twisted.web`` with the limits a public service needs.

A plain :class:`twisted.web.server.Site` gave an attacker three cheap ways
to stop an authority (issue 12, point 8, measured on loopback):

* no connection limit: 20,000 connections that trickle a byte now and
  then exhausted its file descriptors, and ``GET /directory`` failed with
  EMFILE.  Twisted's idle timeout is reset by every byte, so it never fired;
* a request body goes to a temporary file once it is larger than 100 KB,
  before any resource sees it: 200 MB of a declared 100 GB upload reached
  ``/tmp``, and five held uploads filled the disk and stopped the consensus;
* its access log wrote every client's IP address and user agent at INFO,
  and who downloads the directory is who uses the network.

What this module does instead, with no new state machine in the request
parser (Twisted's ``HTTPChannel`` still parses):

* :class:`AuthoritySite` counts open connections in total and per client
  address and refuses (closes at once, before any byte is read) beyond
  ``MaxConnections`` / ``MaxConnectionsPerAddress``;
* every request must arrive whole -- request line, headers and body --
  within ``RequestTimeout`` of the connection opening or of the previous
  answer (a keep-alive connection waiting for its next request is on the
  same clock); trickling does not extend it;
* a body is kept in memory and never beyond ``max_body``: a larger
  ``Content-Length`` is answered 413 before a body byte is read, and a
  chunked body is cut off at the first chunk that passes the cap;
* no access log: one DEBUG line per request, without the client's
  address; refusals are counted and summed up at WARN at most once a
  minute, without addresses (each refusal, with its address, is at DEBUG).

After a 413 the answer is sent and our side half-closed; what the client
still sends is read and dropped for ``LINGER`` seconds (at most
``LINGER_BYTES``) so that it can read the answer instead of a reset, and
then the connection is aborted.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from typing import Any, Optional

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.web import http, server

from mixminion.directory.authority import MAX_DESCRIPTOR_SIZE

log = Logger()

#: defaults of ``[Authority] MaxConnections``, ``MaxConnectionsPerAddress``, ``RequestTimeout``
MAX_CONNECTIONS = 256
MAX_CONNECTIONS_PER_ADDRESS = 16
REQUEST_TIMEOUT = 30.0
#: after refusing a request we keep reading (and dropping) for this many seconds or bytes,
#: whichever comes first, so that a client that sends its body before reading can still
#: read the answer instead of a reset
LINGER = 2.0
LINGER_BYTES = 1 << 20
#: seconds a closing connection may take to flush our answer before it is aborted
ABORT_AFTER = 5.0
#: at most one WARN summary of refusals per this many seconds
WARN_INTERVAL = 60.0
#: connections the kernel may queue before we accept them (capped by net.core.somaxconn).
#: Twisted's default, 50, let a burst of 300 connections from one address fill the
#: queue: later SYNs, honest ones too, were dropped and retried after 1, 3, 7 s.  We
#: accept (and refuse over the limits) at once, so a long queue costs little.
LISTEN_BACKLOG = 1024


@dataclass(frozen=True)
class HTTPLimits:
    """What one :class:`AuthoritySite` allows (``AuthoritySettings.http_limits``)."""

    max_connections: int = MAX_CONNECTIONS
    max_connections_per_address: int = MAX_CONNECTIONS_PER_ADDRESS
    #: seconds for a whole request (line, headers, body); also the keep-alive idle limit
    request_timeout: float = REQUEST_TIMEOUT
    #: largest request body accepted, in bytes (the service: 4 x MaxDescriptorSize)
    max_body: int = 4 * MAX_DESCRIPTOR_SIZE


class ConnectionSlots:
    """Open connections, in total and per client address."""

    def __init__(self, total: int, per_address: int) -> None:
        self.total, self.per_address = total, per_address
        self.open = 0
        self.by_address: dict[str, int] = {}

    def take(self, address: str) -> Optional[str]:
        """Take a slot for ``address``; None if taken, else which limit refused it."""
        if self.open >= self.total:
            return "total"
        if self.by_address.get(address, 0) >= self.per_address:
            return "per-address"
        self.open += 1
        self.by_address[address] = self.by_address.get(address, 0) + 1
        return None

    def give_back(self, address: str) -> None:
        left = self.by_address.get(address, 0) - 1
        if left < 0:
            raise ValueError(f"no slot taken for {address}")
        self.open -= 1
        if left:
            self.by_address[address] = left
        else:
            del self.by_address[address]


class Refusals:
    """What was refused: counted for the whole run, and summed up at WARN at
    most once every ``WARN_INTERVAL`` seconds (the first at once, the rest
    when the interval is over, so the end of an attack is reported too)."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.total: dict[str, int] = {}
        self.unreported: dict[str, int] = {}
        self.last_warning: Optional[float] = None
        self._pending: Optional[IDelayedCall] = None

    def count(self, why: str) -> None:
        self.total[why] = self.total.get(why, 0) + 1
        self.unreported[why] = self.unreported.get(why, 0) + 1
        if self._pending is not None:
            return
        now = self.clock.seconds()
        if self.last_warning is None or now - self.last_warning >= WARN_INTERVAL:
            self.report()
        else:
            self._pending = self.clock.callLater(self.last_warning + WARN_INTERVAL - now, self.report)

    def report(self) -> None:
        self._pending = None
        if not self.unreported:
            return
        summary = ", ".join(f"{n} {reason}" for reason, n in sorted(self.unreported.items()))
        log.warn("HTTP: refused {summary} (client addresses at DEBUG)", summary=summary,
                 counts=dict(self.unreported))
        self.unreported = {}
        self.last_warning = self.clock.seconds()

    def stop(self) -> None:
        """Report what is left now; schedule nothing more."""
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self.report()


class AuthorityRequest(server.Request):
    """A request whose body stays in memory and never grows past the site's cap."""

    def gotLength(self, length: Optional[int]) -> None:  # noqa: N802
        # twisted.web would use a temporary file above 100 KB: never here
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802
        channel = self.channel
        if channel is None or channel.refused:
            return
        size = self.content.tell() + len(data)
        if size > channel.limits.max_body:
            channel.refuse_body(f"more than {channel.limits.max_body} bytes")
            return
        self.content.write(data)


class AuthorityChannel(http.HTTPChannel):
    """HTTP/1.1 with a deadline per request and refusals that skip the resource tree."""

    site: "AuthoritySite"
    requestFactory = AuthorityRequest
    abortTimeout = ABORT_AFTER
    #: the client's address, as counted by the site
    address: str = "?"
    #: True once we answered 413: nothing more is parsed or processed
    refused = False
    _deadline: Optional[IDelayedCall] = None
    _linger: Optional[IDelayedCall] = None
    _dropped = 0
    _released = False
    #: requests answered on this connection
    _answered = 0

    @property
    def limits(self) -> HTTPLimits:
        return self.site.limits

    def connectionMade(self) -> None:  # noqa: N802
        super().connectionMade()
        self._arm_deadline()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.refused:  # lingering: read and dropped
            self._dropped += len(data)
            if self._dropped > LINGER_BYTES:
                self._abort()
            return
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:  # noqa: N802
        declared = self.length
        if declared is not None and declared > self.limits.max_body:
            self.refuse_body(f"{declared} bytes declared")
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:  # noqa: N802
        if self.refused:
            return
        self._cancel(self._deadline)
        super().allContentReceived()

    def requestDone(self, request) -> None:  # noqa: N802
        # the next request (or our close) is on the clock from now on;
        # a pipelined one already buffered disarms it again at once
        self._arm_deadline()
        self._answered += 1
        super().requestDone(request)

    # --- refusals and deadlines ----------------------------------------------------------------

    def refuse_body(self, what: str) -> None:
        """413, then read-and-drop for ``LINGER`` seconds, then abort."""
        self.refused = True
        self._cancel(self._deadline)
        self.setTimeout(None)
        self.site.refused("body too large", self.address, what)
        body = (f"Status: 0\nMessage: Upload too large: {what}; at most "
                f"{self.limits.max_body} bytes are accepted.\n").encode("ascii")
        self.transport.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        self._networkProducer.unregisterProducer()
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()
        else:
            self.transport.loseConnection()
        self._linger = self.callLater(LINGER, self._abort)

    def _arm_deadline(self) -> None:
        self._cancel(self._deadline)
        self._deadline = self.callLater(self.limits.request_timeout, self._too_slow)

    def _too_slow(self) -> None:
        self._deadline = None
        # a request being received is in self.requests; a part of its first line, in the buffer
        if self._answered and not self.requests and not self._buffer:
            log.debug("HTTP: idle keep-alive connection from {address} closed", address=self.address)
        else:  # nothing asked since the connection opened, or a request left unfinished
            self.site.refused("request not complete in time", self.address,
                              f"{self.limits.request_timeout:g} s")
        self.timeoutConnection()

    def timeoutConnection(self) -> None:  # noqa: N802
        # replaces Twisted's, which names the client's address at INFO
        if self._abortingCall is not None:
            return  # closing already
        log.debug("HTTP: closing the connection from {address}", address=self.address)
        self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        self.loseConnection()

    def forceAbortClient(self) -> None:  # noqa: N802
        log.debug("HTTP: aborting the connection from {address}", address=self.address)
        self._abortingCall = None
        self._abort()

    def _abort(self) -> None:
        self._cancel(self._linger)
        self._linger = None
        if self.transport is not None:
            self.transport.abortConnection()

    @staticmethod
    def _cancel(call: Optional[IDelayedCall]) -> None:
        if call is not None and call.active():
            call.cancel()

    def connectionLost(self, reason) -> None:  # noqa: N802
        self._cancel(self._deadline)
        self._cancel(self._linger)
        self._deadline = self._linger = None
        super().connectionLost(reason)
        if not self._released:
            self._released = True
            self.site.release(self.address)


class AuthoritySite(server.Site):
    """A :class:`~twisted.web.server.Site` with connection and request limits and
    no access log.

    ``reactor`` is the clock of every deadline (a ``task.Clock`` in tests).
    """

    protocol = AuthorityChannel  # HTTP/1.1 only: an authority speaks no TLS, hence no h2
    requestFactory = AuthorityRequest

    def __init__(self, resource, limits: HTTPLimits = HTTPLimits(), reactor: Any = None) -> None:
        # no idle timer of Twisted's: the request deadline is stricter, and two
        # timers firing together would close the connection twice
        super().__init__(resource, timeout=None, reactor=reactor)
        self.limits = limits
        self.slots = ConnectionSlots(limits.max_connections, limits.max_connections_per_address)
        self.refusals = Refusals(self.reactor)

    def buildProtocol(self, addr):  # noqa: N802
        address = str(getattr(addr, "host", addr))
        full = self.slots.take(address)
        if full is not None:
            self.refused(f"connection ({full} limit)", address,
                         f"{self.slots.open} open, {self.slots.by_address.get(address, 0)} from it")
            return None  # the listening port closes the socket at once
        channel = super().buildProtocol(addr)
        channel.address = address
        return channel

    def release(self, address: str) -> None:
        self.slots.give_back(address)

    def refused(self, why: str, address: str, detail: str) -> None:
        log.debug("HTTP: refused {why} from {address}: {detail}", why=why, address=address,
                  detail=detail)
        self.refusals.count(why)

    # --- no access log -------------------------------------------------------------------------

    def startFactory(self) -> None:  # noqa: N802
        pass  # HTTPFactory would open the access log and start a timer for its dates

    def stopFactory(self) -> None:  # noqa: N802
        self.refusals.stop()

    def log(self, request) -> None:
        log.debug("HTTP: {method} {path} -> {code}, {size} bytes",
                  method=(request.method or b"?").decode("ascii", "replace"),
                  path=(request.path or b"?").decode("ascii", "replace"),
                  code=request.code, size=request.sentLength)
