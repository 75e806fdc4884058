"""Compression (packet.md §12): the reference's exact zlib output, bounded
decompression and the bomb limits."""

from __future__ import annotations

import random
import tracemalloc
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from mixminion.codec.compression import (
    SELF_TEST_INPUT,
    SELF_TEST_OUTPUT,
    DecompressionLimitExceeded,
    compress,
    decompress,
    looks_like_bomb,
    reassembled_limit,
    singleton_limit,
    zlib_self_test,
)
from mixminion.codec.errors import CodecError, CompressionError

INVISIBLE_MAN = (
    b"All dreamers and sleepwalkers must pay the price, and even the invisible "
    b"victim is responsible for the fate of all.\n   -- _Invisible Man_"
)
INVISIBLE_MAN_Z = bytes.fromhex(
    "78da3dcbc10d02310c44d13b554c012c3d70e4400d2bb33b11168e13c52188ee1141e2fa"
    "f4ffd90c7ba364b680f88e30b2bec41e5fc8cfe8a8f246bf13b5e9c6e38c38e8d3d48786"
    "de8c18ba75cdd04063d4e23f4da5cd2e49274a82989d0e009605ebe5ff5ec5d70f74673081"
)


def _zeros_stream(total: int, step: int = 1 << 20) -> bytes:
    """Our compression of ``total`` zero bytes, without holding them."""
    c = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY)
    block = bytes(step)
    parts = [c.compress(block) for _ in range(total // step)]
    parts.append(c.compress(bytes(total % step)))
    return b"".join(parts) + c.flush()


class KnownAnswers(unittest.TestCase):
    def test_self_test(self) -> None:
        zlib_self_test()
        self.assertEqual(len(SELF_TEST_OUTPUT), 55)
        self.assertEqual(compress(SELF_TEST_INPUT), SELF_TEST_OUTPUT)

    def test_invisible_man(self) -> None:
        self.assertEqual(len(INVISIBLE_MAN), 137)
        self.assertEqual(compress(INVISIBLE_MAN), INVISIBLE_MAN_Z)
        self.assertEqual(len(INVISIBLE_MAN_Z), 0x6D)
        self.assertEqual(decompress(INVISIBLE_MAN_Z, 137), INVISIBLE_MAN)

    def test_header(self) -> None:
        for data in (b"", b"x", bytes(1000), random.Random(1).randbytes(5000)):
            self.assertEqual(compress(data)[:2], b"\x78\xda")


class Decompress(unittest.TestCase):
    @settings(max_examples=60, deadline=None)
    @given(st.binary(max_size=4000))
    def test_round_trip(self, data: bytes) -> None:
        self.assertEqual(decompress(compress(data), len(data)), data)

    def test_exact_limit(self) -> None:
        data = b"spam " * 500
        z = compress(data)
        self.assertEqual(decompress(z, len(data)), data)
        self.assertRaises(DecompressionLimitExceeded, decompress, z, len(data) - 1)
        self.assertRaises(DecompressionLimitExceeded, decompress, z, 0)
        self.assertEqual(decompress(compress(b""), 0), b"")

    def test_limit_exceeded_is_compression_error(self) -> None:
        self.assertTrue(issubclass(DecompressionLimitExceeded, CompressionError))

    def test_rejects_short_and_foreign_headers(self) -> None:
        self.assertRaises(CompressionError, decompress, b"", 100)
        self.assertRaises(CompressionError, decompress, b"\x78\xda\x03\x00\x00", 100)
        # default-level zlib (78 9C) and raw deflate are refused
        self.assertRaises(CompressionError, decompress, zlib.compress(b"hello" * 10), 100)
        raw = zlib.compressobj(9, zlib.DEFLATED, -15)
        self.assertRaises(CompressionError, decompress, raw.compress(b"hi") + raw.flush(), 100)

    def test_rejects_bad_stream(self) -> None:
        z = bytearray(compress(INVISIBLE_MAN))
        z[-1] ^= 1  # Adler-32
        self.assertRaises(CompressionError, decompress, bytes(z), 1000)
        bad = b"\x78\xda" + b"\xff" * 30
        self.assertRaises(CompressionError, decompress, bad, 1000)

    def test_rejects_truncated_stream(self) -> None:
        z = compress(random.Random(2).randbytes(2000))
        for cut in (6, 100, len(z) - 1):
            e = self.assertRaises(CompressionError, decompress, z[:cut], 10000)
            self.assertNotIsInstance(e, DecompressionLimitExceeded)

    def test_trailing_bytes_ignored(self) -> None:
        self.assertEqual(decompress(INVISIBLE_MAN_Z + b"garbage\x00", 1000), INVISIBLE_MAN)

    def test_zlib_bomb_is_not_allocated(self) -> None:
        """50 MB of zeros: refused while holding at most the limit."""
        z = _zeros_stream(50 * 1000 * 1000)
        limit = singleton_limit(len(z))
        self.assertLess(limit, 2 * 1000 * 1000)
        tracemalloc.start()
        try:
            self.assertRaises(DecompressionLimitExceeded, decompress, z, limit)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 2 * limit + 1000000)

    @settings(max_examples=150, deadline=None)
    @given(st.binary(max_size=300), st.integers(0, 5000))
    def test_random_input_only_codec_errors(self, data: bytes, limit: int) -> None:
        for candidate in (data, b"\x78\xda" + data):
            try:
                decompress(candidate, limit)
            except CodecError:
                pass


class Limits(unittest.TestCase):
    def test_singleton_limit(self) -> None:
        self.assertEqual(singleton_limit(10), 20480)
        self.assertEqual(singleton_limit(1024), 20480)
        self.assertEqual(singleton_limit(1025), 20500)
        self.assertEqual(singleton_limit(28650), 573000)

    def test_reassembled_limit(self) -> None:
        self.assertEqual(reassembled_limit(10), 200)
        self.assertEqual(reassembled_limit(40021), 800420)

    def test_sender_warning(self) -> None:
        self.assertFalse(looks_like_bomb(1024 * 100, 1024))
        self.assertTrue(looks_like_bomb(1025 * 20, 1025))
        self.assertFalse(looks_like_bomb(1025 * 20 - 1, 1025))
        z = compress(bytes(25 * 1024))
        self.assertFalse(looks_like_bomb(25 * 1024, len(z)))  # tiny, no warning
        z = _zeros_stream(10 * 1000 * 1000)
        self.assertTrue(looks_like_bomb(10 * 1000 * 1000, len(z)))
