"""Message compression (spec: packet.md §12).

Every client must produce bit-identical zlib output for the same input, or
exit observers could tell implementations apart; hence the fixed settings
and the start-up self test.  Decompression is always bounded so that a
"zlib bomb" never allocates more than the caller's limit.
"""

from __future__ import annotations

import zlib

from mixminion.codec.errors import CompressionError

#: every stream we produce or accept starts with these two bytes
#: (CMF = deflate with a 32 KiB window, FLG = level 9, no dictionary)
ZLIB_HEADER = b"\x78\xda"
MIN_COMPRESSED_LEN = 6

_LEVEL = 9
_WBITS = 15
_MEM_LEVEL = 8

#: singletons may always expand to at least this many bytes
MIN_SINGLETON_LIMIT = 20480
#: a message expanding by this factor or more looks like a bomb
BOMB_FACTOR = 20
#: senders only warn about compressed messages longer than this
WARN_MIN_COMPRESSED = 1024

SELF_TEST_INPUT = b"aZbAAcdefg" * 1000
SELF_TEST_OUTPUT = bytes.fromhex(
    "78daedc6411100200800b06cd4f08702f66f600eefb6d772ed88533d37cdcccccccc"
    "ccccccccccccccccccccccccccccbedd03718d0a93"
)


class DecompressionLimitExceeded(CompressionError):
    """The stream is valid so far but expands past the allowed size: the
    message is *overcompressed* and is delivered still compressed."""


class ZlibIncompatible(CompressionError):
    """The local zlib does not reproduce the reference's output, so using
    it to send would make our messages distinguishable."""


def compress(data: bytes) -> bytes:
    """zlib level 9, 15-bit window, memLevel 8, default strategy."""
    c = zlib.compressobj(_LEVEL, zlib.DEFLATED, _WBITS, _MEM_LEVEL, zlib.Z_DEFAULT_STRATEGY)
    return c.compress(data) + c.flush()


def zlib_self_test() -> None:
    """Raise :class:`ZlibIncompatible` unless zlib gives the spec's known
    answer; a client must not send messages when this fails."""
    got = compress(SELF_TEST_INPUT)
    if got != SELF_TEST_OUTPUT:
        raise ZlibIncompatible(
            f"zlib {zlib.ZLIB_RUNTIME_VERSION} does not reproduce the reference "
            "compression; refusing to produce distinguishable messages"
        )


def decompress(data: bytes, limit: int) -> bytes:
    """Inflate ``data`` to at most ``limit`` bytes.

    Raises :class:`CompressionError` on anything but a complete stream with
    our header, and :class:`DecompressionLimitExceeded` when the output
    would be longer than ``limit``.  Never holds more than ``limit + 1``
    output bytes.  Bytes after the end of the stream are ignored.
    """
    if limit < 0:
        raise ValueError("negative decompression limit")
    if len(data) < MIN_COMPRESSED_LEN or data[:2] != ZLIB_HEADER:
        raise CompressionError("not a zlib stream with the expected header")
    d = zlib.decompressobj(_WBITS)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as exc:
        raise CompressionError(f"error in compressed data: {exc}") from None
    if len(out) > limit:
        raise DecompressionLimitExceeded(f"message expands to more than {limit} bytes")
    if not d.eof:
        # All input consumed with room left in the output: the stream ends early.
        raise CompressionError("truncated compressed data")
    return out


def singleton_limit(compressed_len: int) -> int:
    """Largest expansion allowed for a delivered singleton."""
    return max(MIN_SINGLETON_LIMIT, BOMB_FACTOR * compressed_len)


def reassembled_limit(compressed_len: int) -> int:
    """Largest expansion allowed for a reassembled (fragmented) message."""
    return BOMB_FACTOR * compressed_len


def looks_like_bomb(message_len: int, compressed_len: int) -> bool:
    """True when a sender should warn: the receiver may treat the message
    as overcompressed (compressed > 1 KiB and shrunk by 20x or more)."""
    return compressed_len > WARN_MIN_COMPRESSED and message_len >= BOMB_FACTOR * compressed_len
