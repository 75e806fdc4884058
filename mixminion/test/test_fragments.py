"""Fragmentation, FEC and reassembly (fragments.md), with the reference
test suite's known answers (fragments.md §6)."""

from __future__ import annotations

import itertools
import random
import time
from typing import Sequence

from twisted.trial import unittest

from mixminion.codec.compression import compress
from mixminion.codec.crypto import unwhiten
from mixminion.codec.errors import BuildError, CodecError, ParseError
from mixminion.codec.exit import BINARY, Plain, choose_message_type, classify_compressed
from mixminion.codec.exit_headers import encode_message
from mixminion.codec.fragments import (
    COMPLETED,
    REJECTED,
    FragmentParams,
    Outcome,
    Reassembler,
    fec_decode,
    fec_encode,
    fragment_message,
    parse_server_side_message,
    reassemble,
    server_side_prefix,
)
from mixminion.codec.payload import FragmentPayload, checksum_ok, encode_fragment, parse_payload

SMTP_TYPE = 0x0100


def rng_of(seed: int):
    return random.Random(seed).randbytes


def parsed(payloads: Sequence[bytes]) -> list[FragmentPayload]:
    out = []
    for p in payloads:
        f = parse_payload(p)
        assert isinstance(f, FragmentPayload)
        out.append(f)
    return out


class Params(unittest.TestCase):
    TABLE = [  # L, overhead, cap, k, n, chunks, chunkSize, paddedLen, paddingLen, packets
        (28673, 0, 28625, 2, 3, 1, 57250, 57250, 28577, 3),
        (60000, 0, 28625, 4, 6, 1, 114500, 114500, 54500, 6),
        (153600, 38, 28587, 8, 11, 1, 228696, 228696, 75096, 11),
        (573440, 0, 28625, 16, 22, 2, 458000, 916000, 342560, 44),
        (917605, 0, 28625, 16, 22, 3, 458000, 1374000, 456395, 66),
        (1000000, 0, 28625, 16, 22, 3, 458000, 1374000, 374000, 66),
    ]

    def test_table(self) -> None:
        for row in self.TABLE:
            p = FragmentParams.for_message(row[0], row[1])
            got = (p.length, p.overhead, p.capacity, p.k, p.n, p.chunks, p.chunk_size,
                   p.padded_length, p.padding_length, p.fragment_count)
            self.assertEqual(got, row)

    def test_reference_cases(self) -> None:
        p = FragmentParams.for_message(28 * 1024 + 1)
        self.assertEqual((p.capacity, p.k, p.n, p.chunks, p.chunk_size, p.padded_length),
                         (28625, 2, 3, 1, 57250, 57250))
        p = FragmentParams.for_message(150 * 1024, 38)
        self.assertEqual((p.capacity, p.k, p.n, p.chunks, p.chunk_size), (28587, 8, 11, 1, 228696))
        p = FragmentParams.for_message(28 * 1024 * 20)
        self.assertEqual((p.k, p.n, p.chunks, p.chunk_size, p.padded_length), (16, 22, 2, 458000, 916000))
        p = FragmentParams.for_message(28 * 1024 * 32 + 101)
        self.assertEqual((p.k, p.n, p.chunks, p.padded_length), (16, 22, 3, 1374000))

    def test_only_four_shapes(self) -> None:
        shapes = {(FragmentParams.for_message(length).k, FragmentParams.for_message(length).n)
                  for length in range(28626, 28625 * 40, 9973)}
        self.assertEqual(shapes, {(2, 3), (4, 6), (8, 11), (16, 22)})

    def test_bad_params(self) -> None:
        self.assertRaises(BuildError, FragmentParams.for_message, 40000, 1)
        self.assertRaises(BuildError, FragmentParams.for_message, 0)
        self.assertRaises(BuildError, FragmentParams.for_message, 2**32)

    def test_locate(self) -> None:
        p = FragmentParams.for_message(917605)
        self.assertEqual(p.locate(0), (0, 0))
        self.assertEqual(p.locate(21), (0, 21))
        self.assertEqual(p.locate(22), (1, 0))
        self.assertEqual(p.locate(65), (2, 21))


class FEC(unittest.TestCase):
    @staticmethod
    def blocks(k: int, size: int = 8) -> list[bytes]:
        return [bytes((31 * i + 7 * x + 1) % 256 for x in range(size)) for i in range(k)]

    def test_known_answers(self) -> None:
        """fragments.md §4.5: the check fragments for 8-byte blocks."""
        expected = {
            (2, 3): ["43564d505feae9f4"],
            (4, 6): ["0dd019a4d3520429", "06f63b04b010ab5d"],
            (8, 11): ["451a3f96d7611bf1", "80af37d6f5033bc4", "66b1f29391631df0"],
            (16, 22): ["728762ee7cd2820d", "a212c241f8bccfaf", "b2e58c5d6d520164",
                       "0ead6b8d5630fbea", "36025a653a8f0ab2", "409ccc3af6e9d4f6"],
        }
        self.assertEqual(self.blocks(2)[0].hex(), "01080f161d242b32")
        self.assertEqual(self.blocks(2)[1].hex(), "20272e353c434a51")
        for (k, n), checks in expected.items():
            out = fec_encode(self.blocks(k), n)
            self.assertEqual(out[:k], self.blocks(k))
            self.assertEqual([b.hex() for b in out[k:]], checks)
            self.assertEqual(fec_encode(self.blocks(k), n, [n - 1]), [out[n - 1]])

    def test_any_k_decode(self) -> None:
        rnd = random.Random(5)
        for k, n in [(3, 5), (10, 20), (30, 40), (3, 4), (3, 3), (1, 1), (2, 255)]:
            data = [rnd.randbytes(16) for _ in range(k)]
            enc = fec_encode(data, n)
            subsets = list(itertools.islice(itertools.combinations(range(n), k), 10))
            subsets += [tuple(rnd.sample(range(n), k)) for _ in range(5)]
            for subset in subsets:
                pairs = [(i, enc[i]) for i in subset]
                rnd.shuffle(pairs)
                self.assertEqual(fec_decode(k, n, pairs), data, (k, n, subset))

    def test_invalid_parameters(self) -> None:
        self.assertRaises(BuildError, fec_encode, self.blocks(5), 3)
        self.assertRaises(BuildError, fec_encode, [], 10)
        self.assertRaises(BuildError, fec_encode, self.blocks(10), 300)
        self.assertRaises(BuildError, fec_encode, self.blocks(2), 256)
        self.assertRaises(BuildError, fec_encode, [b"ab", b"c"], 3)
        self.assertRaises(BuildError, fec_encode, self.blocks(2), 3, [3])

    def test_bad_decode_input(self) -> None:
        """Inputs on which zfec would hang or return garbage are refused."""
        enc = fec_encode(self.blocks(4), 6)
        self.assertRaises(ParseError, fec_decode, 4, 6, [(0, enc[0]), (0, enc[0]), (1, enc[1]), (2, enc[2])])
        self.assertRaises(ParseError, fec_decode, 4, 6, [(0, enc[0]), (1, enc[1]), (2, enc[2]), (6, enc[3])])
        self.assertRaises(ParseError, fec_decode, 4, 6, [(0, enc[0]), (1, enc[1]), (2, enc[2])])
        self.assertRaises(ParseError, fec_decode, 4, 6, [(i, enc[i]) for i in range(5)])
        self.assertRaises(ParseError, fec_decode, 4, 6, [(0, enc[0]), (1, enc[1]), (2, enc[2]), (3, b"x")])
        self.assertRaises(BuildError, fec_decode, 5, 3, [])


class Fragmenting(unittest.TestCase):
    def test_150k_overhead_38(self) -> None:
        data = random.Random(1).randbytes(150 * 1024)
        payloads = fragment_message(data, rng_of(2), overhead=38)
        self.assertEqual(len(payloads), 11)
        frags = parsed(payloads)
        self.assertTrue(all(len(f.data) == 28587 for f in frags))
        self.assertTrue(all(len(p) == 28634 for p in payloads))
        blocks = fec_decode(8, 11, [(f.index, f.data) for f in frags[3:11]])
        self.assertEqual(unwhiten(b"".join(blocks)[:153600]), data)
        self.assertEqual(reassemble(frags[3:]), data)

    def test_three_chunks(self) -> None:
        data = random.Random(3).randbytes(28 * 32 * 1024 + 101)
        frags = parsed(fragment_message(data, rng_of(4)))
        self.assertEqual(len(frags), 66)
        self.assertTrue(all(len(f.data) == 28625 for f in frags))
        self.assertEqual([f.index for f in frags], list(range(66)))
        rnd = random.Random(5)
        chosen = [f for c in range(3) for f in rnd.sample(frags[22 * c : 22 * (c + 1)], 16)]
        rnd.shuffle(chosen)
        self.assertEqual(reassemble(chosen), data)

    def test_packet_counts(self) -> None:
        rnd = random.Random(6)
        for size, overhead, count in [(30 * 1024, 0, 3), (900 * 1024, 0, 66),
                                      (150 * 1024, 38, 11), (200 * 1024, 0, 11)]:
            m = compress(rnd.randbytes(size))
            self.assertEqual(len(fragment_message(m, rng_of(size), overhead)), count)

    def test_prefix(self) -> None:
        m = b"Prefix!" + random.Random(7).randbytes(30000)
        payloads = fragment_message(m, rng_of(8))
        self.assertEqual(len(payloads), 3)
        self.assertTrue(all(checksum_ok(p) for p in payloads))
        self.assertEqual(reassemble(parsed(payloads)[1:]), m)

    def test_random_draw_order(self) -> None:
        """Message id first, then the padding."""
        draws: list[int] = []

        def rng(n: int) -> bytes:
            draws.append(n)
            return bytes([len(draws)]) * n

        m = random.Random(9).randbytes(40000)
        frags = parsed(fragment_message(m, rng))
        params = FragmentParams.for_message(40000)
        self.assertEqual(draws, [20, params.padding_length])
        self.assertEqual(frags[0].message_id, b"\x01" * 20)
        self.assertEqual(frags[1].data[-100:], b"\x02" * 100)  # padding sits at the end of block 1

    def test_explicit_id_and_padding(self) -> None:
        m = random.Random(10).randbytes(40000)
        params = FragmentParams.for_message(40000)
        a = fragment_message(m, rng_of(11), message_id=b"I" * 20, padding=bytes(params.padding_length))
        b = fragment_message(m, lambda n: bytes(n), message_id=b"I" * 20)
        self.assertEqual(a, b)
        self.assertRaises(BuildError, fragment_message, m, rng_of(1), message_id=b"short")
        self.assertRaises(BuildError, fragment_message, m, rng_of(1), padding=b"")

    def test_refuses_small_messages(self) -> None:
        self.assertRaises(BuildError, fragment_message, bytes(28625), rng_of(1))
        self.assertRaises(BuildError, fragment_message, bytes(28587), rng_of(1), 38)
        self.assertEqual(len(fragment_message(bytes(28626), rng_of(1))), 3)
        self.assertEqual(len(fragment_message(bytes(28588), rng_of(1), 38)), 3)

    def test_one_mebibyte_is_fast(self) -> None:
        m = random.Random(12).randbytes(1 << 20)
        start = time.perf_counter()
        payloads = fragment_message(m, rng_of(13))
        elapsed = time.perf_counter() - start
        self.assertEqual(len(payloads), 66)
        self.assertLess(elapsed, 1.0)  # ~30 ms on a laptop; generous for CI


class ServerSidePrefix(unittest.TestCase):
    def test_prefix(self) -> None:
        self.assertEqual(server_side_prefix(SMTP_TYPE, b"nobody@example.com"),
                         bytes.fromhex("010000126e6f626f6479406578616d706c652e636f6d"))
        self.assertRaises(BuildError, server_side_prefix, 0x10000, b"")
        self.assertRaises(BuildError, server_side_prefix, 1, bytes(0x10000))

    def test_parse(self) -> None:
        m = server_side_prefix(0x0101, b"fred") + b"compressed"
        self.assertEqual(parse_server_side_message(m), (0x0101, b"fred", b"compressed"))
        self.assertEqual(parse_server_side_message(b"\x01\x00\x00\x00"), (0x100, b"", b""))
        self.assertEqual(parse_server_side_message(b"\x01\x00\x00\x02ab"), (0x100, b"ab", b""))
        for bad in (b"", b"\x01\x00\x00", b"\x01\x00\x00\x03ab"):
            self.assertRaises(ParseError, parse_server_side_message, bad)


def _message(seed: int, size: int = 40000, overhead: int = 0) -> tuple[bytes, list[FragmentPayload]]:
    m = random.Random(seed).randbytes(size)
    return m, parsed(fragment_message(m, rng_of(seed + 1), overhead))


def _forge(f: FragmentPayload, **changes) -> FragmentPayload:
    """A checked fragment with some fields changed."""
    raw = encode_fragment(changes.get("index", f.index), changes.get("message_id", f.message_id),
                          changes.get("message_length", f.message_length), changes.get("data", f.data))
    out = parse_payload(raw)
    assert isinstance(out, FragmentPayload)
    return out


class Reassembly(unittest.TestCase):
    def test_complete_then_drop(self) -> None:
        m, frags = _message(20)
        r = Reassembler()
        first = r.add(frags[2], day=100)
        self.assertEqual(first.outcome, Outcome.STORED)
        self.assertEqual(r.status_of(frags[0].message_id), "PENDING")
        self.assertEqual(r.missing(frags[0].message_id), 1)
        done = r.add(frags[1], day=101)
        self.assertEqual(done.outcome, Outcome.COMPLETED)
        self.assertEqual(done.message, m)
        self.assertEqual(r.status[frags[0].message_id], (COMPLETED, 101))
        self.assertEqual(r.add(frags[0], day=101).outcome, Outcome.DROPPED)
        self.assertEqual(r.pending, {})

    def test_identical_duplicate_ignored(self) -> None:
        _, frags = _message(21, 70000)
        r = Reassembler()
        self.assertEqual(r.add(frags[0], 1).outcome, Outcome.STORED)
        self.assertEqual(r.add(frags[0], 1).outcome, Outcome.UNNEEDED)
        self.assertEqual(r.missing(frags[0].message_id), 3)

    def test_different_fragment_same_index_rejects(self) -> None:
        _, frags = _message(22)
        r = Reassembler()
        r.add(frags[0], 1)
        evil = _forge(frags[0], data=bytes(28625))
        self.assertEqual(r.add(evil, 1).outcome, Outcome.REJECTED)
        self.assertEqual(r.status_of(frags[0].message_id), REJECTED)
        self.assertEqual(r.add(frags[1], 1).outcome, Outcome.DROPPED)
        self.assertEqual(r.pending, {})

    def test_index_out_of_range_rejects(self) -> None:
        """66 for a 66-fragment message rejects it; later fragments drop."""
        _, frags = _message(23, 28 * 32 * 1024 + 101)
        self.assertEqual(len(frags), 66)
        r = Reassembler()
        for f in frags[:5]:
            self.assertEqual(r.add(f, 1).outcome, Outcome.STORED)
        self.assertEqual(r.add(_forge(frags[0], index=66), 1).outcome, Outcome.REJECTED)
        for f in frags[5:]:
            self.assertEqual(r.add(f, 1).outcome, Outcome.DROPPED)

    def test_index_out_of_range_first(self) -> None:
        _, frags = _message(24)
        r = Reassembler()
        self.assertEqual(r.add(_forge(frags[0], index=3), 1).outcome, Outcome.REJECTED)
        self.assertEqual(r.add(frags[0], 1).outcome, Outcome.DROPPED)

    def test_length_mismatch_rejects(self) -> None:
        _, frags = _message(25)
        r = Reassembler()
        r.add(frags[0], 1)
        self.assertEqual(r.add(_forge(frags[1], message_length=40001), 1).outcome, Outcome.REJECTED)

    def test_overhead_mismatch_rejects(self) -> None:
        _, frags = _message(26)
        _, other = _message(27, overhead=38)
        r = Reassembler()
        r.add(frags[0], 1)
        odd = _forge(other[1], message_id=frags[0].message_id, message_length=40000)
        self.assertEqual(r.add(odd, 1).outcome, Outcome.REJECTED)

    def test_identity_mismatch_rejects(self) -> None:
        m, frags = _message(28)
        r = Reassembler()
        r.add(frags[0], 1, nym="alice")
        self.assertEqual(r.add(frags[1], 1, nym="bob").outcome, Outcome.REJECTED)
        r2 = Reassembler()
        r2.add(frags[0], 1, nym="alice")
        self.assertEqual(r2.add(frags[2], 1, nym="alice").message, m)

    def test_decoded_chunk_makes_fragments_unneeded(self) -> None:
        m, frags = _message(29, 28 * 1024 * 20)  # 2 chunks of 22
        r = Reassembler()
        for f in frags[:16]:
            r.add(f, 1)
        self.assertEqual(r.pending[frags[0].message_id].fragments, {})
        self.assertIn(0, r.pending[frags[0].message_id].chunks)
        self.assertEqual(r.add(frags[16], 1).outcome, Outcome.UNNEEDED)
        evil = _forge(frags[17], data=bytes(28625))  # cannot be compared any more
        self.assertEqual(r.add(evil, 1).outcome, Outcome.UNNEEDED)
        results = [r.add(f, 1) for f in reversed(frags[22:])]
        self.assertEqual(results[15].outcome, Outcome.COMPLETED)
        self.assertEqual(results[15].message, m)
        self.assertTrue(all(x.outcome is Outcome.DROPPED for x in results[16:]))

    def test_interleaved_messages(self) -> None:
        m1, f1 = _message(30)
        m2, f2 = _message(31, 70000)
        r = Reassembler()
        done = {}
        for f in [f2[5], f1[2], f2[4], f2[0], f1[0], f2[1]]:
            res = r.add(f, 1)
            if res.message is not None:
                done[res.message_id] = res.message
        self.assertEqual(done, {f1[0].message_id: m1, f2[0].message_id: m2})

    def test_expiry(self) -> None:
        m, old = _message(32)
        _, new = _message(33)
        r = Reassembler()
        r.add(old[0], day=10)
        r.add(old[0], day=12)  # duplicate: the insertion day stays 10
        r.add(new[0], day=12)
        self.assertEqual(r.expire(before_day=12, today=14), [old[0].message_id])
        self.assertEqual(r.status[old[0].message_id], (REJECTED, 14))
        self.assertEqual(r.add(old[1], 14).outcome, Outcome.DROPPED)
        self.assertEqual(r.add(new[1], 14).outcome, Outcome.COMPLETED)
        self.assertEqual(r.expire(before_day=100), [])
        self.assertEqual(sorted(r.forget_status(15)), sorted([old[0].message_id, new[0].message_id]))
        # once forgotten, the message may start again from scratch
        self.assertEqual(r.add(old[1], 20).outcome, Outcome.STORED)
        self.assertEqual(r.add(old[2], 20).message, m)

    def test_reject_by_caller(self) -> None:
        _, frags = _message(34)
        r = Reassembler()
        r.add(frags[0], 1)
        r.reject(frags[0].message_id, 2)
        self.assertEqual(r.add(frags[1], 2).outcome, Outcome.DROPPED)

    def test_max_length(self) -> None:
        _, frags = _message(35, 70000)
        r = Reassembler(max_length=60000)
        self.assertEqual(r.add(frags[0], 1).outcome, Outcome.REJECTED)
        _, small = _message(36)
        self.assertEqual(r.add(small[0], 1).outcome, Outcome.STORED)

    def test_snapshot_restore(self) -> None:
        m, frags = _message(37, 28 * 1024 * 20)
        r = Reassembler()
        for f in frags[:20]:
            r.add(f, 3, nym="n")
        r.reject(b"x" * 20, 3)
        state = r.snapshot()
        r2 = Reassembler.restore(state)
        self.assertEqual(r2.snapshot(), state)
        results = [r2.add(f, 4, nym="n") for f in frags[22:38]]
        self.assertEqual(results[-1].message, m)
        self.assertEqual(r2.status_of(b"x" * 20), REJECTED)

    def test_add_payload(self) -> None:
        m = random.Random(38).randbytes(40000)
        payloads = fragment_message(m, rng_of(39))
        r = Reassembler()
        r.add_payload(payloads[0], 1)
        self.assertEqual(r.add_payload(payloads[2], 1).message, m)
        self.assertRaises(CodecError, r.add_payload, b"junk", 1)

    def test_reassemble_helper_errors(self) -> None:
        _, f1 = _message(40)
        _, f2 = _message(41)
        self.assertRaises(ParseError, reassemble, f1[:1])
        self.assertRaises(ParseError, reassemble, [f1[0], f2[1]])
        self.assertRaises(ParseError, reassemble, [f1[0], _forge(f1[0], data=bytes(28625))])


class ServerSideReassembly(unittest.TestCase):
    """fragments.md §6: 200 KiB to pirates@sea with SUBJECT Hello."""

    def test_pirates(self) -> None:
        body = random.Random(50).randbytes(200 * 1024)
        compressed = compress(encode_message({"SUBJECT": "Hello"}, body))
        m = server_side_prefix(SMTP_TYPE, b"pirates@sea") + compressed
        frags = parsed(fragment_message(m, rng_of(51)))
        self.assertEqual(len(frags), 11)
        rnd = random.Random(52)
        rnd.shuffle(frags)
        r = Reassembler()
        self.assertTrue(all(r.add(f, 1).outcome is Outcome.STORED for f in frags[:6]))
        self.assertEqual(r.add(frags[6], 1).outcome, Outcome.STORED)
        done = r.add(frags[7], 1)
        self.assertEqual(done.outcome, Outcome.COMPLETED)
        self.assertEqual(r.add(frags[8], 1).outcome, Outcome.DROPPED)
        assert done.message is not None
        rt, ri, got = parse_server_side_message(done.message)
        self.assertEqual((rt, ri, got), (SMTP_TYPE, b"pirates@sea", compressed))
        result = classify_compressed(got)
        assert isinstance(result, Plain)
        self.assertEqual(result.headers, {"SUBJECT": "Hello"})
        self.assertEqual(result.body, body)
        self.assertEqual(choose_message_type(result.body), BINARY)
