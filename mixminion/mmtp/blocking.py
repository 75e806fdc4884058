"""MMTP over one blocking socket, with the standard library's ``ssl``.

The client sends a handful of packets to one first hop and exits; a
reactor and pyOpenSSL would cost it more CPU to import than the whole
send does (issue 15).  This is the same protocol as the node's Twisted
initiator: the sans-IO :class:`~mixminion.mmtp.machine.InitiatorMachine`
frames and checks acknowledgements, :func:`~mixminion.mmtp.chain.verify_chain`
checks the responder exactly as mmtp.md section 5 says, and the close is
the one section 7.4 asks for: our close_notify, then the peer's, then the
TCP close.

Link policy: ``legacy`` adds what 0.0.8-era servers need (TLS 1.0 with
``DHE-RSA-AES128-SHA`` at security level 0, 1024-bit link keys, SHA-1
link certificates; ``doc/mmtp-legacy.md``).  The caller decides per hop.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from mixminion.mmtp.chain import ZERO_KEYID, KeyIdMismatch, TLSVerificationError, verify_chain
from mixminion.mmtp.frames import PACKET_LEN
from mixminion.mmtp.machine import NEED_DATA, Acknowledged, InitiatorMachine, ProtocolError

__all__ = ["LinkFailure", "SendResult", "make_context", "send_packets", "ping"]

# The same suites as the Twisted side (mixminion.mmtp.tls); TLS 1.3 suites
# are OpenSSL's defaults, all AEAD (the standard library cannot name them).
_MODERN_CIPHERS = ("ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:"
                   "ECDHE-RSA-CHACHA20-POLY1305")
_LEGACY_CIPHERS = f"{_MODERN_CIPHERS}:DHE-RSA-AES128-SHA:@SECLEVEL=0"
#: how long we wait for the peer's close_notify after ours
CLOSE_WAIT = 10.0
_READ = 65536


class LinkFailure(Exception):
    """The connection failed before every packet was acknowledged; the
    message says why in one line (no addresses: the caller names the hop)."""


@dataclass
class SendResult:
    """What became of each packet handed to :func:`send_packets`, by index."""

    accepted: list[int] = field(default_factory=list)
    #: the responder answered REJECTED (full disk, say): retry later
    rejected: list[int] = field(default_factory=list)
    #: why the connection ended early, if it did
    failure: Optional[str] = None
    #: the peer answered our close_notify with its own before closing TCP
    closed_cleanly: bool = False
    #: the peer proved an identity other than the expected one
    wrong_key: bool = False


def make_context(legacy: bool) -> ssl.SSLContext:
    """An initiator context: no CA check (MMTP peers are known by key and
    checked after the handshake), no SNI, no tickets, no compression."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers(_LEGACY_CIPHERS if legacy else _MODERN_CIPHERS)
    ctx.minimum_version = ssl.TLSVersion.TLSv1 if legacy else ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def peer_chain(sock: ssl.SSLSocket) -> list[bytes]:
    """The responder's chain as sent, leaf first, as DER."""
    public = getattr(sock, "get_unverified_chain", None)  # Python 3.13 on
    if public is not None:
        return list(public() or ())
    # 3.10-3.12 have the same call on the C object, not yet wrapped.
    certs = sock._sslobj.get_unverified_chain()  # type: ignore[union-attr]
    return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in certs or ()]  # type: ignore[attr-defined]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, TLSVerificationError):
        return str(exc)
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or exc.strerror or exc})"
    if isinstance(exc, ProtocolError):
        return f"protocol error: {exc}"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc)


class _Connection:
    """One TLS connection to a responder, authenticated on open."""

    def __init__(self, host: str, port: int, keyid: bytes, *, legacy: bool, timeout: float,
                 now: Callable[[], float], cache: dict[bytes, bytes],
                 context: Optional[ssl.SSLContext] = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self.monotonic = monotonic
        raw = socket.create_connection((host, port), timeout=timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ctx = context or make_context(legacy)
            self.sock = ctx.wrap_socket(raw, server_hostname=None, suppress_ragged_eofs=False)
        except BaseException:
            raw.close()
            raise
        try:
            self.keyid = verify_chain(peer_chain(self.sock), keyid, now(), cache, legacy)
        except BaseException:
            self.sock.close()
            raise
        self.machine: InitiatorMachine[int] = InitiatorMachine()

    def _budget(self, deadline: float) -> None:
        """Each socket call waits at most ``timeout``, and all of them
        together end by ``deadline``: a peer trickling a byte at a time
        cannot hold the client (and its lock) for long."""
        left = deadline - self.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        self.sock.settimeout(min(self.timeout, left))

    def exchange(self, frames: Sequence[tuple[bytes, bool]], result: SendResult) -> None:
        """Send each ``(data, junk)``; record each acknowledgement."""
        m = self.machine
        # the handshake's allowance, then one per frame
        deadline = self.monotonic() + self.timeout * (2 + len(frames))
        self._budget(deadline)
        self.sock.sendall(m.start())
        for index, (data, junk) in enumerate(frames):
            (m.queue_junk if junk else m.queue_packet)(data, index)
        while not m.finished:
            out = m.data_to_send()
            if out:
                self._budget(deadline)
                self.sock.sendall(out)
            self._budget(deadline)
            data = self.sock.recv(_READ)
            if not data:
                m.receive_eof()
            else:
                m.receive_data(data)
            while (event := m.next_event()) is not NEED_DATA:
                if isinstance(event, Acknowledged):
                    (result.accepted if event.accepted else result.rejected).append(event.item)
            if not data:
                raise LinkFailure("the server closed the connection early")
        m.close()

    def close(self) -> bool:
        """Our close_notify, then wait for the peer's (mmtp.md section 7.4);
        True if it came.  The TCP connection is closed either way."""
        try:
            self.sock.settimeout(min(self.sock.gettimeout() or CLOSE_WAIT, CLOSE_WAIT))
            self.sock.unwrap().close()
            return True
        except (OSError, ValueError):
            self.sock.close()
            return False

    def abort(self) -> None:
        self.sock.close()


def _run(host: str, port: int, keyid: bytes, frames: Sequence[tuple[bytes, bool]], *,
         legacy: bool, timeout: float, now: Callable[[], float],
         cache: Optional[dict[bytes, bytes]], context: Optional[ssl.SSLContext],
         monotonic: Callable[[], float] = time.monotonic) -> SendResult:
    result = SendResult()
    try:
        conn = _Connection(host, port, keyid, legacy=legacy, timeout=timeout, now=now,
                           cache={} if cache is None else cache, context=context,
                           monotonic=monotonic)
    except (OSError, ValueError, TLSVerificationError) as exc:
        result.failure = _reason(exc)
        result.wrong_key = isinstance(exc, KeyIdMismatch)
        return result
    try:
        conn.exchange(frames, result)
    except (OSError, ProtocolError, LinkFailure) as exc:
        result.failure = _reason(exc)
        conn.abort()
        return result
    result.closed_cleanly = conn.close()
    return result


def send_packets(host: str, port: int, keyid: bytes, packets: Sequence[bytes], *,
                 legacy: bool = False, timeout: float = 120.0,
                 now: Callable[[], float] = time.time,
                 cache: Optional[dict[bytes, bytes]] = None,
                 context: Optional[ssl.SSLContext] = None,
                 monotonic: Callable[[], float] = time.monotonic) -> SendResult:
    """Send ``packets`` (32 KiB each) to the responder at ``host:port``
    whose identity hashes to ``keyid``, on one connection.  Never raises
    for anything the network or the peer does: see ``result.failure``.
    ``timeout`` bounds each wait, and ``timeout`` times (2 + packets) the
    whole exchange (by ``monotonic``)."""
    for packet in packets:
        if len(packet) != PACKET_LEN:
            raise ValueError(f"MMTP sends {PACKET_LEN}-byte packets, not {len(packet)}")
    return _run(host, port, keyid, [(p, False) for p in packets], legacy=legacy,
                timeout=timeout, now=now, cache=cache, context=context, monotonic=monotonic)


def ping(host: str, port: int, keyid: bytes = ZERO_KEYID, *, legacy: bool = False,
         timeout: float = 120.0, now: Callable[[], float] = time.time,
         rng: Callable[[int], bytes] = os.urandom) -> SendResult:
    """Connect, authenticate (unless ``keyid`` is all zero), send one JUNK
    frame (mmtp.md section 9) and close: the server is up if it was
    acknowledged."""
    return _run(host, port, keyid, [(rng(PACKET_LEN), True)], legacy=legacy, timeout=timeout,
                now=now, cache=None, context=None)
