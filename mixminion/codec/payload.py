"""Singleton and fragment payload formats (spec: packet.md §11).

A payload is 28672 bytes as the exit sees it, or 28634 after end-to-end
decryption of an encrypted forward message (38 bytes of overhead).  Its
first bit says whether it is a singleton (a whole compressed message) or one
FEC fragment of a larger message.  The SHA-1 checksum is what tells a
plaintext payload from an encrypted one, so :func:`checksum_ok` is on every
decoder's hot path and is kept cheap.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Union

from mixminion.codec.crypto import RandomSource, digests_equal, sha1
from mixminion.codec.errors import BuildError, ChecksumError, ParseError

__all__ = [
    "PAYLOAD_LEN", "ENC_FWD_OVERHEAD", "ENC_PAYLOAD_LEN", "SINGLETON_OVERHEAD",
    "FRAGMENT_OVERHEAD", "MESSAGE_ID_LEN", "MAX_FRAGMENT_INDEX", "MAX_MESSAGE_LEN",
    "OVERHEADS", "ChecksumError", "SingletonPayload", "FragmentPayload", "Payload",
    "max_singleton_size", "fragment_capacity", "overhead_of", "encode_singleton",
    "encode_fragment", "parse_payload", "checksum_ok", "is_fragment",
]

PAYLOAD_LEN = 28672
#: payload space lost to end-to-end encryption (42 OAEP - 20 tag + 16 key)
ENC_FWD_OVERHEAD = 38
ENC_PAYLOAD_LEN = PAYLOAD_LEN - ENC_FWD_OVERHEAD
#: size (2) + hash (20)
SINGLETON_OVERHEAD = 22
#: index (3) + hash (20) + message id (20) + message length (4)
FRAGMENT_OVERHEAD = 47
MESSAGE_ID_LEN = 20
#: fragment indices have 23 bits (the top bit of byte 0 marks a fragment)
MAX_FRAGMENT_INDEX = 0x7FFFFF
#: MSGLEN is a u32
MAX_MESSAGE_LEN = 0xFFFFFFFF
OVERHEADS = (0, ENC_FWD_OVERHEAD)

_DIGEST_LEN = 20
_VALID_LENGTHS = frozenset({PAYLOAD_LEN, ENC_PAYLOAD_LEN})
_FRAG_TAIL = struct.Struct(">20sI")  # message id, MSGLEN


@dataclass(frozen=True)
class SingletonPayload:
    """A whole message: ``size`` bytes of compressed data, then padding."""

    size: int
    hash: bytes
    data: bytes  # compressed message || padding (everything after the hash)

    @property
    def compressed(self) -> bytes:
        return self.data[: self.size]

    @property
    def overhead(self) -> int:
        return PAYLOAD_LEN - SINGLETON_OVERHEAD - len(self.data)


@dataclass(frozen=True)
class FragmentPayload:
    """One FEC-encoded fragment of a message of ``message_length`` bytes."""

    index: int
    hash: bytes
    message_id: bytes
    message_length: int
    data: bytes  # the FEC-encoded fragment (28625 or 28587 bytes)

    @property
    def overhead(self) -> int:
        return PAYLOAD_LEN - FRAGMENT_OVERHEAD - len(self.data)

    def to_bytes(self) -> bytes:
        """The payload this was parsed from (the hash is recomputed)."""
        return encode_fragment(self.index, self.message_id, self.message_length, self.data)


Payload = Union[SingletonPayload, FragmentPayload]


def _check_overhead(overhead: int) -> None:
    if overhead not in OVERHEADS:
        raise BuildError(f"payload overhead must be 0 or {ENC_FWD_OVERHEAD}, not {overhead}")


def max_singleton_size(overhead: int = 0) -> int:
    """Largest compressed message that fits one payload (28650 / 28612)."""
    _check_overhead(overhead)
    return PAYLOAD_LEN - SINGLETON_OVERHEAD - overhead


def fragment_capacity(overhead: int = 0) -> int:
    """FEC fragment bytes per payload (28625 / 28587)."""
    _check_overhead(overhead)
    return PAYLOAD_LEN - FRAGMENT_OVERHEAD - overhead


def overhead_of(payload: bytes) -> int:
    """0 for a 28672-byte payload, 38 for a 28634-byte one."""
    if len(payload) not in _VALID_LENGTHS:
        raise ParseError(f"payload must be {PAYLOAD_LEN} or {ENC_PAYLOAD_LEN} bytes, not {len(payload)}")
    return PAYLOAD_LEN - len(payload)


def encode_singleton(compressed: bytes, rng: RandomSource, overhead: int = 0) -> bytes:
    """``u16 SIZE || H(DATA) || DATA`` with ``DATA = compressed || padding``."""
    pad = max_singleton_size(overhead) - len(compressed)
    if pad < 0:
        raise BuildError(
            f"compressed message of {len(compressed)} bytes does not fit a singleton payload"
        )
    padding = rng(pad)
    if len(padding) != pad:
        raise BuildError("random source returned the wrong number of bytes")
    data = compressed + padding
    return struct.pack(">H", len(compressed)) + sha1(data) + data


def encode_fragment(index: int, message_id: bytes, message_length: int, data: bytes) -> bytes:
    """``0x80|idx(23 bits) || H(rest) || rest`` with ``rest = id || u32 L || data``."""
    if not 0 <= index <= MAX_FRAGMENT_INDEX:
        raise BuildError(f"fragment index {index} does not fit 23 bits")
    if len(message_id) != MESSAGE_ID_LEN:
        raise BuildError("message id must be 20 bytes")
    if len(data) not in (fragment_capacity(0), fragment_capacity(ENC_FWD_OVERHEAD)):
        raise BuildError(f"fragment data must be 28625 or 28587 bytes, not {len(data)}")
    if not len(data) < message_length <= MAX_MESSAGE_LEN:
        raise BuildError("message length must exceed the fragment size and fit 32 bits")
    rest = _FRAG_TAIL.pack(message_id, message_length) + data
    head = bytes((0x80 | (index >> 16), (index >> 8) & 0xFF, index & 0xFF))
    return head + sha1(rest) + rest


def is_fragment(payload: bytes) -> bool:
    """The top bit of byte 0 marks a fragment payload."""
    return bool(payload) and payload[0] & 0x80 != 0


def checksum_ok(payload: bytes) -> bool:
    """Does the payload have a valid length and a matching SHA-1?

    Hashes through a memoryview so a 28 KiB payload is never copied.
    """
    if len(payload) not in _VALID_LENGTHS:
        return False
    start = SINGLETON_OVERHEAD + 1 if payload[0] & 0x80 else SINGLETON_OVERHEAD
    digest = sha1(memoryview(payload)[start:])
    return digests_equal(digest, payload[start - _DIGEST_LEN : start])


def parse_payload(payload: bytes) -> Payload:
    """Check (packet.md §11.3) and split a decrypted payload.

    Raises :class:`ChecksumError` when the hash does not match (the payload
    is encrypted or not for us) and :class:`ParseError` when it checks but is
    malformed.
    """
    overhead_of(payload)
    if not checksum_ok(payload):
        raise ChecksumError("payload checksum does not match")
    if payload[0] & 0x80:
        return _parse_fragment(payload)
    return _parse_singleton(payload)


def _parse_singleton(payload: bytes) -> SingletonPayload:
    size = (payload[0] << 8) | payload[1]
    data = payload[SINGLETON_OVERHEAD:]
    if size > len(data):
        raise ParseError(f"singleton size {size} exceeds its {len(data)} data bytes")
    return SingletonPayload(size, payload[2:SINGLETON_OVERHEAD], data)


def _parse_fragment(payload: bytes) -> FragmentPayload:
    index = ((payload[0] & 0x7F) << 16) | (payload[1] << 8) | payload[2]
    message_id, length = _FRAG_TAIL.unpack_from(payload, 23)
    data = payload[FRAGMENT_OVERHEAD:]
    if length <= len(data):
        # a message that fits one fragment is never fragmented
        raise ParseError(f"fragment message length {length} is not above {len(data)}")
    return FragmentPayload(index, payload[3:23], message_id, length, data)
