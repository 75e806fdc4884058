"""Byte-exact MMTP wire units (spec: mmtp.md §6, §7.1, §7.2).

Everything here is a constant or a pure function over bytes.  A frame's
digest and both of its possible acknowledgements share the prefix
``SHA1(data || ...)``, so :func:`frame_digests` hashes the 32 KiB once and
finishes three copies of the hash state: the costly part of a frame is done
exactly once on each side of the link.
"""

from __future__ import annotations

import hashlib
import re
from typing import Optional, Sequence, Union

from mixminion.codec.packet import PACKET_LEN

__all__ = [
    "PACKET_LEN", "DIGEST_LEN", "CRLF", "PROTOCOL_PREFIX", "MMTP_VERSION",
    "VERSION_LINE", "MAX_LINE_LENGTH", "SEND_COMMAND", "JUNK_COMMAND",
    "COMMAND_LEN", "FRAME_LEN", "RECEIVED_COMMAND", "REJECTED_COMMAND",
    "ACK_COMMAND_LEN", "ACK_LEN", "BytesLike", "version_line",
    "parse_version_line", "is_valid_version", "frame_digests",
    "expected_acks", "send_frame", "junk_frame",
]

BytesLike = Union[bytes, bytearray, memoryview]

DIGEST_LEN = 20
CRLF = b"\r\n"
PROTOCOL_PREFIX = b"MMTP "
#: the only version the reference speaks since May 2003 (§1)
MMTP_VERSION = "0.3"
#: ``4D 4D 54 50 20 30 2E 33 0D 0A`` (§6)
VERSION_LINE = b"MMTP 0.3\r\n"
#: a protocol line (CRLF included) may not be longer than this (§6)
MAX_LINE_LENGTH = 4096

SEND_COMMAND = b"SEND\r\n"
JUNK_COMMAND = b"JUNK\r\n"
COMMAND_LEN = 6
#: 6 + 32768 + 20 = 32794 bytes, initiator to responder (§7.1)
FRAME_LEN = COMMAND_LEN + PACKET_LEN + DIGEST_LEN

RECEIVED_COMMAND = b"RECEIVED\r\n"
REJECTED_COMMAND = b"REJECTED\r\n"
ACK_COMMAND_LEN = 10
#: 10 + 20 = 30 bytes, responder to initiator (§7.2)
ACK_LEN = ACK_COMMAND_LEN + DIGEST_LEN

# The suffixes hashed after the 32768 data bytes (§7.2): no separator, no CRLF.
_SEND_SUFFIX = b"SEND"
_JUNK_SUFFIX = b"JUNK"
_RECEIVED_SUFFIX = b"RECEIVED"
_RECEIVED_JUNK_SUFFIX = b"RECEIVED JUNK"
_REJECTED_SUFFIX = b"REJECTED"

# A version token: visible ASCII, no whitespace, no comma.
_VERSION_RE = re.compile(rb"[\x21-\x2b\x2d-\x7e]+")
# ``MMTP <token>CRLF`` where the token has no whitespace (§6 step 2).
_LINE_RE = re.compile(rb"MMTP ([\x21-\x7e]+)\r\n")


def is_valid_version(version: str) -> bool:
    """True if ``version`` can stand in a version list on the wire."""
    try:
        raw = version.encode("ascii")
    except (UnicodeEncodeError, AttributeError):
        return False
    return _VERSION_RE.fullmatch(raw) is not None


def version_line(versions: Sequence[str]) -> bytes:
    """``"MMTP " || V || CRLF`` for versions most preferred first."""
    if not versions or not all(is_valid_version(v) for v in versions):
        raise ValueError("need one or more versions of visible ASCII without commas")
    return PROTOCOL_PREFIX + ",".join(versions).encode("ascii") + CRLF


def parse_version_line(line: BytesLike) -> Optional[list[str]]:
    """The versions offered by an ``MMTP <token>CRLF`` line, or None if the
    line does not have that shape.  Empty list items are dropped: they can
    never match a version anyway."""
    match = _LINE_RE.fullmatch(line)
    if match is None:
        return None
    return [v for v in match.group(1).decode("ascii").split(",") if v]


def frame_digests(data: BytesLike, junk: bool = False) -> tuple[bytes, bytes, bytes]:
    """``(frame digest, accept ack, reject ack)`` for one 32768-byte unit.

    The acks are the full 30-byte strings.  A JUNK unit's accept ack uses the
    ``RECEIVED JUNK`` suffix; its reject ack is the one the reference
    initiator expects (§7.4) even though responders never send it.
    """
    if len(data) != PACKET_LEN:
        raise ValueError(f"MMTP carries {PACKET_LEN}-byte units, not {len(data)}")
    base = hashlib.sha1()
    base.update(data)
    frame = _finish(base, _JUNK_SUFFIX if junk else _SEND_SUFFIX)
    accept = _finish(base, _RECEIVED_JUNK_SUFFIX if junk else _RECEIVED_SUFFIX)
    reject = _finish(base, _REJECTED_SUFFIX)
    return frame, RECEIVED_COMMAND + accept, REJECTED_COMMAND + reject


def _finish(base: "hashlib._Hash", suffix: bytes) -> bytes:
    """SHA1(data || suffix) from a hash state that has seen ``data``."""
    h = base.copy()
    h.update(suffix)
    return h.digest()


def expected_acks(packet: BytesLike, junk: bool = False) -> tuple[bytes, bytes]:
    """The 30-byte ``(accept, reject)`` acks the initiator waits for."""
    _, accept, reject = frame_digests(packet, junk)
    return accept, reject


def send_frame(packet: BytesLike) -> bytes:
    """The 32794-byte SEND frame carrying ``packet``."""
    digest = frame_digests(packet)[0]
    return b"".join((SEND_COMMAND, packet, digest))


def junk_frame(junk: BytesLike) -> bytes:
    """The 32794-byte JUNK frame carrying 32768 random bytes ``junk``."""
    digest = frame_digests(junk, junk=True)[0]
    return b"".join((JUNK_COMMAND, junk, digest))
