"""Singleton and fragment payloads (packet.md §11), including the
reference test suite's edge cases (packet.md §20.1)."""

from __future__ import annotations

import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from mixminion.codec.crypto import sha1
from mixminion.codec.errors import BuildError, ChecksumError, CodecError, ParseError
from mixminion.codec.payload import (
    ENC_FWD_OVERHEAD,
    ENC_PAYLOAD_LEN,
    MAX_FRAGMENT_INDEX,
    PAYLOAD_LEN,
    FragmentPayload,
    SingletonPayload,
    checksum_ok,
    encode_fragment,
    encode_singleton,
    fragment_capacity,
    is_fragment,
    max_singleton_size,
    overhead_of,
    parse_payload,
)


def _contents(n: int) -> bytes:
    return (b"payload" * (n // 7 + 1))[:n]


def _singleton(size: int, data: bytes) -> bytes:
    return struct.pack(">H", size) + sha1(data) + data


def _fragment(head: bytes, rest: bytes) -> bytes:
    return head + sha1(rest) + rest


def rng_of(seed: int):
    return random.Random(seed).randbytes


class ReferenceCases(unittest.TestCase):
    """packet.md §20.1, "Payloads"."""

    def test_singleton(self) -> None:
        p = parse_payload(_singleton(255, _contents(28650)))
        self.assertIsInstance(p, SingletonPayload)
        assert isinstance(p, SingletonPayload)
        self.assertEqual(p.size, 255)
        self.assertEqual(p.compressed, _contents(255))
        self.assertEqual(p.hash, sha1(_contents(28650)))
        self.assertEqual(p.overhead, 0)

    def test_singleton_encrypted_length(self) -> None:
        p = parse_payload(_singleton(255, _contents(28650 - 38)))
        assert isinstance(p, SingletonPayload)
        self.assertEqual(p.size, 255)
        self.assertEqual(p.overhead, ENC_FWD_OVERHEAD)

    def test_bad_lengths(self) -> None:
        self.assertRaises(ParseError, parse_payload, _singleton(255, _contents(28651)))
        self.assertRaises(ParseError, parse_payload, _singleton(255, _contents(28633 - 22)))
        self.assertEqual(len(_singleton(255, _contents(28633 - 22))), 28633)

    def test_size_larger_than_data(self) -> None:
        payload = _singleton(0x7FFF, _contents(28650))
        self.assertTrue(checksum_ok(payload))
        e = self.assertRaises(ParseError, parse_payload, payload)
        self.assertNotIsInstance(e, ChecksumError)
        # the largest size that fits is accepted
        self.assertEqual(parse_payload(_singleton(28650, _contents(28650))).size, 28650)  # type: ignore[union-attr]

    def test_fragment(self) -> None:
        payload = _fragment(b"\x80\x00\x02", b"This is a message123" + b"\x00\x01\x00\x00" + _contents(28625))
        p = parse_payload(payload)
        assert isinstance(p, FragmentPayload)
        self.assertEqual(p.index, 2)
        self.assertEqual(p.message_length, 65536)
        self.assertEqual(p.message_id, b"This is a message123")
        self.assertEqual(p.data, _contents(28625))
        self.assertEqual(p.overhead, 0)
        self.assertEqual(p.to_bytes(), payload)

    def _msglen(self, length: int, data_len: int) -> bytes:
        rest = b"This is a message123" + struct.pack(">I", length) + _contents(data_len)
        return _fragment(b"\x80\x00\x02", rest)

    def test_msglen_limits(self) -> None:
        self.assertEqual(parse_payload(self._msglen(0x6FD2, 28625)).message_length, 0x6FD2)  # type: ignore[union-attr]
        self.assertRaises(ParseError, parse_payload, self._msglen(0x6FD1, 28625))
        self.assertEqual(parse_payload(self._msglen(0x6FAC, 28587)).message_length, 0x6FAC)  # type: ignore[union-attr]
        self.assertRaises(ParseError, parse_payload, self._msglen(0x6FAB, 28587))
        self.assertRaises(ParseError, parse_payload, self._msglen(0, 28625))


class Checksums(unittest.TestCase):
    def test_bad_checksum_is_checksum_error(self) -> None:
        good = encode_singleton(b"hello", rng_of(1))
        for pos in (2, 21, 22, 100, PAYLOAD_LEN - 1):
            bad = bytearray(good)
            bad[pos] ^= 0x40
            self.assertFalse(checksum_ok(bytes(bad)))
            self.assertRaises(ChecksumError, parse_payload, bytes(bad))

    def test_size_and_index_not_covered(self) -> None:
        """The checksum skips the size (singleton) and index (fragment)."""
        good = bytearray(encode_singleton(b"hello", rng_of(1)))
        good[1] = 7
        self.assertEqual(parse_payload(bytes(good)).size, 7)  # type: ignore[union-attr]
        frag = bytearray(encode_fragment(5, b"i" * 20, 40000, bytes(28625)))
        frag[2] = 9
        self.assertEqual(parse_payload(bytes(frag)).index, 9)  # type: ignore[union-attr]

    def test_checksum_ok_lengths(self) -> None:
        self.assertFalse(checksum_ok(b""))
        self.assertFalse(checksum_ok(bytes(100)))
        good = encode_singleton(b"x", rng_of(3))
        self.assertTrue(checksum_ok(good))
        self.assertFalse(checksum_ok(good + b"\x00"))
        self.assertFalse(checksum_ok(good[:-1]))

    def test_top_bit_decides(self) -> None:
        self.assertTrue(is_fragment(encode_fragment(0, b"i" * 20, 40000, bytes(28625))))
        self.assertFalse(is_fragment(encode_singleton(b"x", rng_of(3))))
        self.assertFalse(is_fragment(b""))


class Singletons(unittest.TestCase):
    def test_sizes(self) -> None:
        self.assertEqual(max_singleton_size(0), 28650)
        self.assertEqual(max_singleton_size(38), 28612)
        self.assertRaises(BuildError, max_singleton_size, 1)

    def test_largest_fits(self) -> None:
        for overhead in (0, 38):
            size = max_singleton_size(overhead)
            payload = encode_singleton(b"c" * size, rng_of(4), overhead)
            self.assertEqual(len(payload), PAYLOAD_LEN - overhead)
            self.assertEqual(parse_payload(payload).compressed, b"c" * size)  # type: ignore[union-attr]
            self.assertRaises(BuildError, encode_singleton, b"c" * (size + 1), rng_of(4), overhead)

    def test_rng_must_deliver(self) -> None:
        self.assertRaises(BuildError, encode_singleton, b"abc", lambda n: b"")

    @settings(max_examples=30, deadline=None)
    @given(st.binary(max_size=2000), st.sampled_from([0, 38]), st.integers(0, 2**32))
    def test_round_trip(self, data: bytes, overhead: int, seed: int) -> None:
        payload = encode_singleton(data, rng_of(seed), overhead)
        self.assertEqual(len(payload), PAYLOAD_LEN - overhead)
        self.assertEqual(overhead_of(payload), overhead)
        p = parse_payload(payload)
        assert isinstance(p, SingletonPayload)
        self.assertEqual((p.size, p.compressed, p.overhead), (len(data), data, overhead))
        self.assertTrue(checksum_ok(payload))


class Fragments(unittest.TestCase):
    def test_capacity(self) -> None:
        self.assertEqual(fragment_capacity(0), 28625)
        self.assertEqual(fragment_capacity(38), 28587)

    def test_index_bits(self) -> None:
        for index in (0, 1, 0xFFFF, 0x10000, 0x123456, MAX_FRAGMENT_INDEX):
            payload = encode_fragment(index, b"m" * 20, 10**6, bytes(28625))
            self.assertEqual(payload[0] & 0x80, 0x80)
            self.assertEqual(parse_payload(payload).index, index)  # type: ignore[union-attr]
        self.assertEqual(encode_fragment(0x10000, b"m" * 20, 10**6, bytes(28625))[:3], b"\x81\x00\x00")
        self.assertRaises(BuildError, encode_fragment, MAX_FRAGMENT_INDEX + 1, b"m" * 20, 10**6, bytes(28625))
        self.assertRaises(BuildError, encode_fragment, -1, b"m" * 20, 10**6, bytes(28625))

    def test_build_checks(self) -> None:
        self.assertRaises(BuildError, encode_fragment, 0, b"m" * 19, 10**6, bytes(28625))
        self.assertRaises(BuildError, encode_fragment, 0, b"m" * 20, 10**6, bytes(28624))
        self.assertRaises(BuildError, encode_fragment, 0, b"m" * 20, 28625, bytes(28625))
        self.assertRaises(BuildError, encode_fragment, 0, b"m" * 20, 2**32, bytes(28625))
        encode_fragment(0, b"m" * 20, 2**32 - 1, bytes(28625))

    @settings(max_examples=20, deadline=None)
    @given(st.integers(0, MAX_FRAGMENT_INDEX), st.binary(min_size=20, max_size=20),
           st.sampled_from([28625, 28587]), st.integers(28626, 2**32 - 1))
    def test_round_trip(self, index: int, mid: bytes, data_len: int, length: int) -> None:
        data = random.Random(index).randbytes(data_len)
        payload = encode_fragment(index, mid, length, data)
        p = parse_payload(payload)
        assert isinstance(p, FragmentPayload)
        self.assertEqual((p.index, p.message_id, p.message_length, p.data), (index, mid, length, data))
        self.assertEqual(len(payload), PAYLOAD_LEN - p.overhead)


def _fix_checksum(data: bytes) -> bytes:
    start = 23 if data[0] & 0x80 else 22
    return data[: start - 20] + sha1(data[start:]) + data[start:]


class Fuzz(unittest.TestCase):
    @settings(max_examples=100, deadline=None)
    @given(st.one_of(st.binary(max_size=200),
                     st.sampled_from([PAYLOAD_LEN, ENC_PAYLOAD_LEN, PAYLOAD_LEN + 1, 22, 23, 47]).map(
                         lambda n: random.Random(n).randbytes(n))))
    def test_random_bytes(self, data: bytes) -> None:
        try:
            parse_payload(data)
        except CodecError:
            pass
        self.assertIn(checksum_ok(data), (True, False))

    @settings(max_examples=60, deadline=None)
    @given(st.integers(0, 2**32), st.sampled_from([PAYLOAD_LEN, ENC_PAYLOAD_LEN]), st.binary(max_size=8))
    def test_random_with_valid_checksum(self, seed: int, length: int, head: bytes) -> None:
        data = _fix_checksum((head + random.Random(seed).randbytes(length))[:length])
        self.assertTrue(checksum_ok(data))
        try:
            p = parse_payload(data)
        except ChecksumError:
            self.fail("checksum was fixed")
        except ParseError:
            return
        self.assertIsInstance(p, (SingletonPayload, FragmentPayload))
