"""Sans-IO MMTP state machines (spec: mmtp.md §6, §7, §8, §11, §14.2).

The shape is h11's: the protocol layer hands received bytes to
``receive_data``, pulls events with ``next_event`` until it gets
``NEED_DATA``, tells the machine what the application decided (``accept``,
``queue_packet``...) and writes whatever ``data_to_send`` returns.  The
machines never touch a socket, a clock or a logger, so timeouts, TLS,
back-pressure and logging stay in the Twisted layer and every rule below can
be tested by pumping bytes between two machines.

Errors are split by whose fault they are: :class:`RemoteProtocolError` means
the peer broke the protocol (close the connection; the machine is dead),
:class:`LocalProtocolError` means our own code called the machine wrongly.
"""

from __future__ import annotations

import enum
import hmac
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Generic, Optional, Sequence, TypeVar, Union

from mixminion.mmtp.frames import (
    ACK_LEN,
    COMMAND_LEN,
    CRLF,
    FRAME_LEN,
    JUNK_COMMAND,
    MAX_LINE_LENGTH,
    MMTP_VERSION,
    PACKET_LEN,
    SEND_COMMAND,
    BytesLike,
    frame_digests,
    parse_version_line,
    version_line,
)

__all__ = [
    "ProtocolError", "LocalProtocolError", "RemoteProtocolError",
    "NeedData", "NEED_DATA", "VersionAccepted", "PacketReceived",
    "JunkReceived", "VersionAgreed", "Acknowledged", "ResponderEvent",
    "InitiatorEvent", "ResponderMachine", "InitiatorMachine",
]

ItemT = TypeVar("ItemT")

_PACKET_START = COMMAND_LEN
_DIGEST_START = COMMAND_LEN + PACKET_LEN


# ---------------------------------------------------------------------------
# Errors


class ProtocolError(Exception):
    """An MMTP rule was broken.  ``code`` is stable and machine-readable (for
    counters and tests); the message is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"


class LocalProtocolError(ProtocolError):
    """Our own code used the machine wrongly (a bug on this side)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: close the connection without a reply."""


# ---------------------------------------------------------------------------
# Events


class NeedData(enum.Enum):
    """Sentinel type: nothing more can happen until more bytes arrive."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value

    __str__ = __repr__


NEED_DATA = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class VersionAccepted:
    """Responder: the initiator's version line was good; the reply is queued
    in ``data_to_send``."""

    version: str


@dataclass(frozen=True, slots=True)
class PacketReceived:
    """Responder: a SEND frame with a good digest.  Store the packet
    durably, then call ``accept(seq)``, or ``reject(seq)`` if it cannot be
    stored (§11)."""

    seq: int
    packet: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class JunkReceived:
    """Responder: a JUNK frame with a good digest; call ``accept(seq)``."""

    seq: int


@dataclass(frozen=True, slots=True)
class VersionAgreed:
    """Initiator: the responder chose ``version``; frames may now flow."""

    version: str


@dataclass(frozen=True, slots=True)
class Acknowledged(Generic[ItemT]):
    """Initiator: the responder answered for ``item``.  ``accepted`` is True
    for RECEIVED (delete the packet) and False for REJECTED (retry later)."""

    item: ItemT
    accepted: bool


ResponderEvent = Union[VersionAccepted, PacketReceived, JunkReceived]
InitiatorEvent = Union[VersionAgreed, "Acknowledged[object]"]


# ---------------------------------------------------------------------------
# Receive buffer


class _ReceiveBuffer:
    """Unconsumed received bytes: a bytearray and a read offset.

    Consumed bytes are dropped when the live remainder is no longer than
    what was just consumed (so the move costs no more than the parse did)
    or when they outnumber the live bytes (so a huge chunk is not kept whole
    until its end).  Each byte is thus moved a bounded number of times --
    O(total bytes) whatever the chunking -- and once the events are drained
    the buffer holds only the incomplete unit that follows.
    """

    __slots__ = ("_data", "_start", "_scanned")

    def __init__(self) -> None:
        self._data = bytearray()
        self._start = 0
        self._scanned = 0  # bytes already searched for CRLF, from _start

    def __len__(self) -> int:
        return len(self._data) - self._start

    @property
    def allocated(self) -> int:
        """Bytes held, consumed ones not yet dropped included."""
        return len(self._data)

    def append(self, data: BytesLike) -> None:
        self._data += data

    def find_line(self, limit: int) -> Optional[int]:
        """Length of the first CRLF-terminated line if it fits in ``limit``
        bytes, else None.  Only bytes not searched before are scanned."""
        begin = self._start + max(self._scanned - 1, 0)
        end = min(len(self._data), self._start + limit)
        at = self._data.find(CRLF, begin, end)
        if at < 0:
            self._scanned = end - self._start
            return None
        return at + len(CRLF) - self._start

    def startswith(self, prefix: bytes) -> bool:
        """Whether the live bytes begin with ``prefix`` (no copy)."""
        return self._data.startswith(prefix, self._start)

    def peek(self, begin: int, end: int) -> bytes:
        """A copy of live bytes ``[begin:end)`` (offsets from the read point)."""
        with memoryview(self._data) as view:
            return bytes(view[self._start + begin:self._start + end])

    def view(self, begin: int, end: int) -> memoryview:
        """A zero-copy view of live bytes; release it before the next append."""
        return memoryview(self._data)[self._start + begin:self._start + end]

    def consume(self, n: int) -> None:
        """Drop the next ``n`` live bytes."""
        self._start += n
        self._scanned = 0
        live = len(self._data) - self._start
        if live == 0:
            self._data.clear()
            self._start = 0
        elif live <= n or self._start > live:
            del self._data[:self._start]
            self._start = 0

    def take(self, n: int) -> bytes:
        """Copy and consume the next ``n`` live bytes."""
        chunk = self.peek(0, n)
        self.consume(n)
        return chunk


# ---------------------------------------------------------------------------
# Shared plumbing


def _check_versions(versions: Sequence[str]) -> tuple[str, ...]:
    version_line(versions)  # raises ValueError for an unusable list
    return tuple(versions)


def _check_line_length(max_line_length: int, versions: Sequence[str]) -> int:
    if max_line_length < len(version_line(versions)):
        raise ValueError("max_line_length is shorter than our own version line")
    return max_line_length


class _Machine:
    """What both sides share: the receive buffer, EOF and the dead state."""

    def __init__(self, versions: Sequence[str], max_line_length: int) -> None:
        self._versions = _check_versions(versions)
        self._max_line = _check_line_length(max_line_length, self._versions)
        self._rbuf = _ReceiveBuffer()
        self._eof = False
        self._error: Optional[RemoteProtocolError] = None
        self._version: Optional[str] = None

    @property
    def version(self) -> Optional[str]:
        """The agreed MMTP version, once the exchange is done."""
        return self._version

    @property
    def error(self) -> Optional[RemoteProtocolError]:
        """The peer error that killed this machine, if any."""
        return self._error

    @property
    def dead(self) -> bool:
        """True once a peer error was raised: only close the connection."""
        return self._error is not None

    @property
    def peer_closed(self) -> bool:
        """True once ``receive_eof`` was called."""
        return self._eof

    @property
    def buffered(self) -> int:
        """Received bytes not yet turned into events."""
        return len(self._rbuf)

    def receive_data(self, data: BytesLike) -> None:
        """Buffer bytes from the peer; events come from ``next_event``.
        An empty string is ignored (EOF is ``receive_eof``).  Raises
        RemoteProtocolError for bytes the peer could not legally send at
        all yet (before our version line) or any more (after it closed)."""
        if self._error is not None:  # (inline: this runs for every TLS record)
            self._check_alive()
        if not data:
            return
        if self._eof:
            raise self._fail("data_after_close", "bytes arrived after the peer closed")
        self._before_receive()
        self._rbuf.append(data)

    def receive_eof(self) -> None:
        """The peer closed its side.  Clean unless a unit was cut short;
        complete units still buffered remain available from next_event."""
        self._check_alive()
        self._eof = True
        if not self._rbuf:
            return
        if self._version is None:
            if self._rbuf.find_line(self._max_line) is None:
                raise self._fail("truncated_line", "connection closed in the version line")
        elif len(self._rbuf) % self._unit_len:
            raise self._fail(f"truncated_{self._unit_name}",
                             f"connection closed in the middle of a {self._unit_name}")

    # What the peer sends in the data phase (set by each side).
    _unit_len = 1
    _unit_name = "unit"

    def _before_receive(self) -> None:
        """Subclass hook: refuse bytes the peer could not legally send yet."""

    def _check_alive(self) -> None:
        if self._error is not None:
            raise LocalProtocolError(
                "dead", f"machine is dead after a peer error ({self._error.code})")

    def _fail(self, code: str, message: str) -> RemoteProtocolError:
        """Kill the machine; return the error for the caller to raise."""
        self._error = RemoteProtocolError(code, message)
        return self._error

    def _read_line(self, trailing_code: str) -> Optional[bytes]:
        """The peer's version line, once complete and alone in the buffer."""
        length = self._rbuf.find_line(self._max_line)
        if length is None:
            if len(self._rbuf) >= self._max_line:
                raise self._fail("line_too_long",
                                 f"no CRLF in the first {self._max_line} bytes")
            return None
        if len(self._rbuf) > length:
            raise self._fail(trailing_code,
                             "bytes followed the version line before it was answered")
        return self._rbuf.take(length)


# ---------------------------------------------------------------------------
# Responder


class ResponderMachine(_Machine):
    """The listening side (§6 steps 2-3, §7.3).

    Each good frame becomes an event with a sequence number; the application
    answers with ``accept(seq)`` / ``reject(seq)`` whenever storage finishes,
    in any order, and the acks still leave in frame order.  ``pending_acks``
    counts frames handed out whose ack has not been written yet: the protocol
    pauses reading when it grows (any pipelining must be accepted, §14.2,
    but not buffered without limit).
    """

    _unit_len = FRAME_LEN
    _unit_name = "frame"

    def __init__(self, versions: Sequence[str] = (MMTP_VERSION,),
                 max_line_length: int = MAX_LINE_LENGTH) -> None:
        super().__init__(versions, max_line_length)
        self._out = bytearray()
        self._next_seq = 0  # sequence number of the next frame
        self._next_ack = 0  # sequence number of the next ack to write
        # seq -> (accept ack, reject ack or None for junk), awaiting the app
        self._awaiting: dict[int, tuple[bytes, Optional[bytes]]] = {}
        self._done: dict[int, bytes] = {}  # decided, waiting for earlier acks

    @property
    def pending_acks(self) -> int:
        """Frames delivered whose ack is not yet in ``data_to_send``."""
        return self._next_seq - self._next_ack

    def next_event(self) -> Union[ResponderEvent, NeedData]:
        """The next event, or NEED_DATA.  Raises RemoteProtocolError."""
        if self._error is not None:
            self._check_alive()
        if self._version is None:
            return self._next_version()
        return self._next_frame()

    def accept(self, seq: int) -> None:
        """The packet is stored (or the junk discarded): ack RECEIVED."""
        self._check_alive()
        accept, _ = self._claim(seq, rejecting=False)
        self._complete(seq, accept)

    def reject(self, seq: int) -> None:
        """The packet could not be stored: ack REJECTED (§11).  Not for JUNK."""
        self._check_alive()
        _, reject = self._claim(seq, rejecting=True)
        assert reject is not None
        self._complete(seq, reject)

    @property
    def has_data_to_send(self) -> bool:
        """Whether :meth:`data_to_send` has anything (without copying)."""
        return bool(self._out)

    def data_to_send(self) -> bytes:
        """Bytes to write: the version reply, then acks in frame order."""
        self._check_alive()
        out = bytes(self._out)
        self._out.clear()
        return out

    # -- version phase

    def _next_version(self) -> Union[VersionAccepted, NeedData]:
        line = self._read_line("pipelined_before_version")
        if line is None:
            return NEED_DATA
        offered = parse_version_line(line)
        if offered is None:
            raise self._fail("bad_version_line", f"malformed version line {line[:64]!r}")
        chosen = next((v for v in self._versions if v in offered), None)
        if chosen is None:
            raise self._fail("no_common_version",
                             f"no common MMTP version in {','.join(offered)[:64]!r}")
        self._version = chosen
        self._out += version_line((chosen,))
        return VersionAccepted(chosen)

    # -- data phase

    def _next_frame(self) -> Union[PacketReceived, JunkReceived, NeedData]:
        buf = self._rbuf
        live = len(buf)
        if live < COMMAND_LEN:
            return NEED_DATA
        send = buf.startswith(SEND_COMMAND)
        if not send and not buf.startswith(JUNK_COMMAND):
            command = buf.peek(0, COMMAND_LEN)
            raise self._fail("unknown_command", f"unknown frame command {command!r}")
        if live < FRAME_LEN:
            return NEED_DATA
        return self._take_send() if send else self._take_junk()

    def _take_send(self) -> PacketReceived:
        packet = self._rbuf.peek(_PACKET_START, _DIGEST_START)
        digest, accept, reject = frame_digests(packet)
        self._check_digest(digest)
        return PacketReceived(self._register(accept, reject), packet)

    def _take_junk(self) -> JunkReceived:
        with self._rbuf.view(_PACKET_START, _DIGEST_START) as junk:
            digest, accept, _ = frame_digests(junk, junk=True)
        self._check_digest(digest)
        return JunkReceived(self._register(accept, None))

    def _check_digest(self, expected: bytes) -> None:
        received = self._rbuf.peek(_DIGEST_START, FRAME_LEN)
        if not hmac.compare_digest(received, expected):
            raise self._fail("bad_digest", "frame digest does not match its contents")
        self._rbuf.consume(FRAME_LEN)

    def _register(self, accept: bytes, reject: Optional[bytes]) -> int:
        seq = self._next_seq
        self._next_seq += 1
        self._awaiting[seq] = (accept, reject)
        return seq

    # -- acknowledgements

    def _claim(self, seq: int, rejecting: bool) -> tuple[bytes, Optional[bytes]]:
        acks = self._awaiting.get(seq)
        if acks is None:
            what = "already acknowledged" if 0 <= seq < self._next_seq else "unknown"
            raise LocalProtocolError("bad_seq", f"frame {seq!r} is {what}")
        if rejecting and acks[1] is None:
            raise LocalProtocolError("reject_junk", f"frame {seq} is JUNK: it can only be accepted")
        del self._awaiting[seq]
        return acks

    def _complete(self, seq: int, ack: bytes) -> None:
        """Record an ack; write every ack now unblocked, in order."""
        self._done[seq] = ack
        while self._next_ack in self._done:
            self._out += self._done.pop(self._next_ack)
            self._next_ack += 1


# ---------------------------------------------------------------------------
# Initiator


@dataclass(slots=True)
class _Unsent(Generic[ItemT]):
    data: BytesLike
    junk: bool
    item: ItemT


@dataclass(slots=True)
class _Pending(Generic[ItemT]):
    item: ItemT
    accept: bytes
    reject: bytes


class InitiatorMachine(_Machine, Generic[ItemT]):
    """The connecting side (§6 steps 1 and 4, §7.4).

    Items are queued with an opaque handle; each ack is reported as
    ``Acknowledged(handle, accepted)``.  At most ``writeahead`` frames are
    unacknowledged at a time.  When ``finished`` turns true the protocol
    closes the connection; on any failure it fails ``outstanding()``.
    """

    _unit_len = ACK_LEN
    _unit_name = "ack"

    def __init__(self, versions: Sequence[str] = (MMTP_VERSION,), writeahead: int = 6,
                 max_line_length: int = MAX_LINE_LENGTH) -> None:
        super().__init__(versions, max_line_length)
        if writeahead < 1:
            raise ValueError("writeahead must be at least 1")
        self._writeahead = writeahead
        self._started = False
        self._closed = False
        self._unsent: Deque[_Unsent[ItemT]] = deque()
        self._pending: Deque[_Pending[ItemT]] = deque()

    # -- state

    @property
    def finished(self) -> bool:
        """Version agreed and every queued item acknowledged: close now."""
        return (self._version is not None and self._error is None
                and not self._unsent and not self._pending)

    @property
    def unsent(self) -> int:
        """Items queued whose frames have not been written yet."""
        return len(self._unsent)

    @property
    def pending(self) -> int:
        """Frames written and not yet acknowledged."""
        return len(self._pending)

    def outstanding(self) -> list[ItemT]:
        """Every item without an ack, oldest first (works after errors too,
        so the protocol can fail them all)."""
        return [p.item for p in self._pending] + [u.item for u in self._unsent]

    # -- calls from the protocol

    def start(self) -> bytes:
        """The version line to write once TLS and the key check succeeded."""
        self._check_alive()
        if self._started:
            raise LocalProtocolError("already_started", "start() was already called")
        self._started = True
        return version_line(self._versions)

    def queue_packet(self, packet: BytesLike, item: ItemT) -> None:
        """Send ``packet`` (32768 bytes); report its ack with ``item``.
        The bytes are framed when the window opens, not copied now: do not
        mutate a bytearray after queueing it."""
        self._queue(packet, False, item)

    def queue_junk(self, junk: BytesLike, item: ItemT) -> None:
        """Send 32768 random bytes as link padding (§9)."""
        self._queue(junk, True, item)

    def close(self) -> None:
        """We are closing: no more frames will be queued or written."""
        self._closed = True

    def next_event(self) -> Union[VersionAgreed, Acknowledged[ItemT], NeedData]:
        """The next event, or NEED_DATA.  Raises RemoteProtocolError."""
        self._check_alive()
        if self._version is None:
            return self._next_version()
        return self._next_ack()

    def data_to_send(self) -> bytes:
        """Frames the write-ahead window allows now (nothing before the
        version is agreed, after ``close`` or after the peer closed)."""
        self._check_alive()
        if self._version is None or self._closed or self._eof:
            return b""
        parts: list[BytesLike] = []
        while self._unsent and len(self._pending) < self._writeahead:
            self._frame_next(parts)
        return b"".join(parts)

    # -- internals

    def _queue(self, data: BytesLike, junk: bool, item: ItemT) -> None:
        self._check_alive()
        if self._closed or self._eof:
            raise LocalProtocolError("closed", "cannot queue on a closing connection")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise LocalProtocolError("bad_packet", f"expected bytes, got {type(data).__name__}")
        if len(data) != PACKET_LEN:
            raise LocalProtocolError(
                "bad_packet_length", f"MMTP sends {PACKET_LEN}-byte units, not {len(data)}")
        self._unsent.append(_Unsent(data, junk, item))

    def _frame_next(self, parts: list[BytesLike]) -> None:
        """Move the oldest unsent item to pending; append its frame to ``parts``."""
        unsent = self._unsent.popleft()
        digest, accept, reject = frame_digests(unsent.data, unsent.junk)
        self._pending.append(_Pending(unsent.item, accept, reject))
        parts += (JUNK_COMMAND if unsent.junk else SEND_COMMAND, unsent.data, digest)

    def _before_receive(self) -> None:
        if not self._started:
            raise self._fail("data_before_version",
                             "the responder spoke before our version line")

    def _next_version(self) -> Union[VersionAgreed, NeedData]:
        line = self._read_line("data_before_version")
        if line is None:
            return NEED_DATA
        for offered in self._versions:
            if line == version_line((offered,)):
                self._version = offered
                return VersionAgreed(offered)
        raise self._fail("bad_version_reply", f"unexpected version reply {line[:64]!r}")

    def _next_ack(self) -> Union[Acknowledged[ItemT], NeedData]:
        if not self._rbuf:
            return NEED_DATA
        if not self._pending:
            raise self._fail("unexpected_ack", "bytes arrived with no frame awaiting an ack")
        if len(self._rbuf) < ACK_LEN:
            return NEED_DATA
        ack = self._rbuf.take(ACK_LEN)
        head = self._pending[0]
        if hmac.compare_digest(ack, head.accept):
            accepted = True
        elif hmac.compare_digest(ack, head.reject):
            accepted = False
        else:
            raise self._fail("bad_ack", f"acknowledgement matches neither digest: {ack[:10]!r}")
        self._pending.popleft()
        return Acknowledged(head.item, accepted)
