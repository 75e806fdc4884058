"""Unit tests of server-side packet processing (packet.md §9, §10):
every reject reason on a crafted packet, replays, key rotation, extended
routing info, batches, and the processor over a durable replay log."""

from __future__ import annotations

import os
import random
from typing import Optional, Sequence

from twisted.trial import unittest

from mixminion.codec import crypto
from mixminion.codec.header import HopRouting, build_header
from mixminion.codec.packet import PACKET_LEN, PAYLOAD_LEN, assemble_packet
from mixminion.codec.process import (
    Drop,
    Exit,
    PacketProcessor,
    ProcessResult,
    Reject,
    RejectReason,
    Relay,
    replay_value,
)
from mixminion.codec.replay import MemoryReplayLog
from mixminion.codec import routing
from mixminion.codec.routing import HostInfo, IPv4Info
from mixminion.codec.rsa import PrivateKey, PublicKey
from mixminion.server.packetstore import PacketStore
from mixminion.server.store_replay import StoreReplayLog
from mixminion.testing.keys import key

VECTOR_REASONS = {"bad_packet_length", "rsa_oaep", "bad_subheader_length", "bad_version",
                  "bad_digest", "replay", "unknown_routing_type", "bad_routing_info"}


def server_keys() -> tuple[PrivateKey, ...]:
    """Five 2048-bit packet keys."""
    return tuple(key(f"server {i}") for i in range(5))


def host(i: int) -> bytes:
    """FWD_HOST routing info naming test server ``i``."""
    return HostInfo(f"mix{i}.example.com", 48000 + i, crypto.sha1(b"id%d" % i)).pack()


def rng(n: int) -> bytes:
    return os.urandom(n)


class Built:
    """A packet with everything its builder knew."""

    def __init__(self, packet: bytes, secrets1: list[bytes], secrets2: list[bytes],
                 payload: bytes) -> None:
        self.packet, self.secrets1, self.secrets2, self.payload = (
            packet, secrets1, secrets2, payload)


def forward(leg1: Sequence[int], leg2: Sequence[int], exit_type: int = routing.SMTP_TYPE,
            exit_info: bytes = b"T" * 20 + b"nobody@example.com",
            swap_type: int = routing.SWAP_FWD_HOST_TYPE, swap_info: Optional[bytes] = None,
            secrets1: Optional[list[bytes]] = None) -> Built:
    """A two-leg packet over servers ``leg1`` then ``leg2`` (indices into
    :func:`server_keys`), relaying by hostname."""
    keys = server_keys()
    secrets1 = secrets1 or [rng(16) for _ in leg1]
    secrets2 = [rng(16) for _ in leg2]
    hops1 = [HopRouting(keys[a].public, routing.FWD_HOST_TYPE, host(b)) for a, b in zip(leg1, leg1[1:])]
    hops1.append(HopRouting(keys[leg1[-1]].public, swap_type,
                            host(leg2[0]) if swap_info is None else swap_info))
    hops2 = [HopRouting(keys[a].public, routing.FWD_HOST_TYPE, host(b)) for a, b in zip(leg2, leg2[1:])]
    hops2.append(HopRouting(keys[leg2[-1]].public, exit_type, exit_info))
    payload = rng(PAYLOAD_LEN)
    packet = assemble_packet(build_header(hops1, secrets1, rng), build_header(hops2, secrets2, rng),
                             payload, secrets1, secrets2)
    return Built(packet, secrets1, secrets2, payload)


def single(key: PublicKey, routing_type: int, routing_info: bytes,
           secret: Optional[bytes] = None) -> bytes:
    """A packet whose header 1 has one hop and whose header 2 is random."""
    secret = secret or rng(16)
    header1 = build_header([HopRouting(key, routing_type, routing_info)], [secret], rng)
    return assemble_packet(header1, rng(2048), rng(PAYLOAD_LEN), [secret], None)


def resubheader(packet: bytes, key: PrivateKey, edit) -> bytes:
    """``packet`` with its first subheader decrypted, passed through
    ``edit`` and re-encrypted to ``key`` (the rest untouched, so the digest
    still matches unless ``edit`` changes it)."""
    plain = key.decrypt(packet[:256])
    return key.public.encrypt(edit(bytearray(plain))) + packet[256:]


def processor(*indices: int) -> tuple[PacketProcessor, list[MemoryReplayLog]]:
    logs = [MemoryReplayLog() for _ in indices]
    keys = server_keys()
    return PacketProcessor([(keys[i], log) for i, log in zip(indices, logs)]), logs


def run_path(built: Built, path: Sequence[int]) -> list[ProcessResult]:
    """Feed the packet through ``path`` (fresh servers), relaying outputs."""
    results: list[ProcessResult] = []
    packet = built.packet
    for index in path:
        result = processor(index)[0].process(packet)
        results.append(result)
        if not isinstance(result, Relay):
            break
        packet = result.packet
    return results


class RejectReasonTests(unittest.TestCase):
    def test_values_are_the_vector_codes(self) -> None:
        self.assertEqual({r.value for r in RejectReason}, VECTOR_REASONS)
        for reason in RejectReason:
            self.assertIs(RejectReason(reason.value), reason)
            self.assertTrue(reason.description)

    def test_constructor_refuses_nonsense(self) -> None:
        self.assertRaises(ValueError, PacketProcessor, [])
        small = key("small", 1024)
        self.assertRaises(ValueError, PacketProcessor, [(small, MemoryReplayLog())])


class ForwardTests(unittest.TestCase):
    """Valid packets: relays, the swap point, exits."""

    def test_four_hops_end_to_end(self) -> None:
        built = forward([0, 1], [2, 3])
        results = run_path(built, [0, 1, 2, 3])
        self.assertEqual([type(r) for r in results], [Relay, Relay, Relay, Exit])
        self.assertEqual([r.routing_type for r in results[:3]],
                         [routing.FWD_HOST_TYPE, routing.SWAP_FWD_HOST_TYPE, routing.FWD_HOST_TYPE])
        self.assertEqual(results[0].relay_info, HostInfo.parse(host(1)))
        self.assertEqual(results[1].relay_info, HostInfo.parse(host(2)))
        secrets = built.secrets1 + built.secrets2
        for result, secret in zip(results, secrets):
            self.assertEqual(result.subheader.secret, secret)
            self.assertEqual(result.key_index, 0)
            if isinstance(result, Relay):
                self.assertEqual(len(result.packet), PACKET_LEN)
        final = results[-1]
        assert isinstance(final, Exit)
        self.assertEqual(final.payload, built.payload)
        self.assertEqual(final.exit_type, routing.SMTP_TYPE)
        self.assertEqual(final.tag, b"T" * 20)
        self.assertEqual(final.address, b"nobody@example.com")
        self.assertEqual(final.routing_info, b"T" * 20 + b"nobody@example.com")
        self.assertEqual(final.application_key,
                         crypto.derive_key(secrets[-1], crypto.APPLICATION_KEY_MODE))

    def test_tagless_exit(self) -> None:
        result = run_path(forward([0], [1], routing.FRAGMENT_TYPE, b""), [0, 1])[-1]
        assert isinstance(result, Exit)
        self.assertEqual((result.tag, result.address, result.routing_info), (b"", b"", b""))

    def test_ipv4_relays(self) -> None:
        v4 = IPv4Info("192.0.2.7", 48099, crypto.sha1(b"id1"))
        built = forward([0], [1], swap_type=routing.SWAP_FWD_IPV4_TYPE, swap_info=v4.pack())
        first, second = run_path(built, [0, 1])
        assert isinstance(first, Relay)
        self.assertEqual(first.relay_info, v4)
        self.assertIsInstance(second, Exit)
        packet = single(server_keys()[0].public, routing.FWD_IPV4_TYPE, v4.pack())
        self.assertEqual(processor(0)[0].process(packet).relay_info, v4)

    def test_long_exit_routing_info(self) -> None:
        """A 300-byte address: the exit subheader is extended (RL > 172)."""
        info = b"L" * 20 + b"x" * 280
        results = run_path(forward([0, 1], [2, 3], routing.MBOX_TYPE, info), [0, 1, 2, 3])
        final = results[-1]
        assert isinstance(final, Exit)
        self.assertEqual(final.subheader.routing_length, 300)
        self.assertEqual(len(final.subheader.routing_info), 172)
        self.assertEqual(final.routing_info, info)
        self.assertEqual((final.tag, final.address), (b"L" * 20, b"x" * 280))

    def test_long_exit_single_hop(self) -> None:
        info = b"Q" * 20 + b"y" * 1000
        packet = single(server_keys()[0].public, routing.SMTP_TYPE, info)
        result = processor(0)[0].process(packet)
        assert isinstance(result, Exit)
        self.assertEqual(result.routing_info, info)

    def test_extended_relay_routing_info(self) -> None:
        """A hostname long enough that the relay's routing info overflows."""
        name = ".".join(["a" * 50] * 3) + ".example.com"
        info = HostInfo(name, 1, bytes(20)).pack()
        self.assertGreater(len(info), 172)
        keys = server_keys()
        secrets = [rng(16), rng(16)]
        h1 = build_header([HopRouting(keys[0].public, routing.FWD_HOST_TYPE, info),
                           HopRouting(keys[1].public, routing.SMTP_TYPE, b"t" * 20 + b"a@b.example")],
                          secrets, rng)
        packet = assemble_packet(h1, rng(2048), rng(PAYLOAD_LEN), secrets, None)
        first = processor(0)[0].process(packet)
        assert isinstance(first, Relay)
        self.assertEqual(first.routing_info, info)
        self.assertEqual(first.relay_info.hostname, name)
        second = processor(1)[0].process(first.packet)
        assert isinstance(second, Exit)
        self.assertEqual(second.address, b"a@b.example")

    def test_bytes_like_input(self) -> None:
        built = forward([0], [1])
        for data in (bytearray(built.packet), memoryview(built.packet)):
            self.assertIsInstance(processor(0)[0].process(data), Relay)


class RejectTests(unittest.TestCase):
    """One crafted packet per reject reason, in the spec's order of checks."""

    def setUp(self) -> None:
        self.key = server_keys()[0]
        self.proc, (self.log,) = processor(0)
        self.packet = single(self.key.public, routing.FWD_HOST_TYPE, host(1))

    def assertReject(self, packet: bytes, reason: RejectReason,
                     proc: Optional[PacketProcessor] = None) -> Reject:
        result = (proc or self.proc).process(packet)
        self.assertIsInstance(result, Reject)
        self.assertEqual(result.reason, reason)
        return result

    def test_bad_packet_length(self) -> None:
        for data in (b"", self.packet[:-1], self.packet + b"\0", self.packet * 2):
            self.assertReject(data, RejectReason.BAD_PACKET_LENGTH)
        self.assertEqual(len(self.log), 0)

    def test_rsa_oaep(self) -> None:
        self.assertReject(rng(PACKET_LEN), RejectReason.RSA_OAEP)
        self.assertReject(b"\xff" * 256 + self.packet[256:], RejectReason.RSA_OAEP)
        wrong, _ = processor(1)
        self.assertReject(self.packet, RejectReason.RSA_OAEP, wrong)
        flipped = bytearray(self.packet)
        flipped[7] ^= 8
        self.assertReject(bytes(flipped), RejectReason.RSA_OAEP)
        self.assertEqual(len(self.log), 0)

    def test_bad_subheader_length(self) -> None:
        for size in (0, 3, 213):
            packet = self.key.public.encrypt(rng(size)) + self.packet[256:]
            self.assertIsNone(self.assertReject(packet, RejectReason.BAD_SUBHEADER_LENGTH)
                              .subheader)

    def test_bad_version(self) -> None:
        for major, minor in ((1, 3), (0, 2), (255, 3)):
            def edit(sub: bytearray, major: int = major, minor: int = minor) -> bytes:
                sub[0], sub[1] = major, minor
                return bytes(sub)
            result = self.assertReject(resubheader(self.packet, self.key, edit),
                                       RejectReason.BAD_VERSION)
            self.assertEqual((result.subheader.major, result.subheader.minor), (major, minor))
        self.assertEqual(len(self.log), 0)

    def test_bad_digest(self) -> None:
        def edit(sub: bytearray) -> bytes:
            sub[20] ^= 1
            return bytes(sub)
        self.assertReject(resubheader(self.packet, self.key, edit), RejectReason.BAD_DIGEST)
        for offset in (256, 1000, 2047):
            flipped = bytearray(self.packet)
            flipped[offset] ^= 0x40
            self.assertReject(bytes(flipped), RejectReason.BAD_DIGEST)
        self.assertEqual(len(self.log), 0)

    def test_replay(self) -> None:
        first = self.proc.process(self.packet)
        self.assertIsInstance(first, Relay)
        self.assertIn(replay_value(first.subheader.secret), self.log)
        second = self.assertReject(self.packet, RejectReason.REPLAY)
        self.assertEqual(second.subheader, first.subheader)
        # Another packet reusing the secret (a reused reply block) too.
        again = single(self.key.public, routing.SMTP_TYPE, b"t" * 20 + b"x@y.example",
                       secret=first.subheader.secret)
        self.assertReject(again, RejectReason.REPLAY)
        # A fresh server has never seen it.
        self.assertIsInstance(processor(0)[0].process(self.packet), Relay)

    def test_drop(self) -> None:
        packet = single(self.key.public, routing.DROP_TYPE, b"")
        result = self.proc.process(packet)
        self.assertIsInstance(result, Drop)
        self.assertIn(replay_value(result.subheader.secret), self.log)
        self.assertReject(packet, RejectReason.REPLAY)

    def test_unknown_routing_type(self) -> None:
        for rtype in (0x0005, 0x0050, 0x00FF):
            packet = single(self.key.public, rtype, host(1))
            result = self.assertReject(packet, RejectReason.UNKNOWN_ROUTING_TYPE)
            self.assertIn(replay_value(result.subheader.secret), self.log)

    def test_rejected_late_still_uses_its_entry(self) -> None:
        """The vectors' unknown_routing_type case: the edited packet is
        refused, then the original, with the same secret, is a replay."""
        def edit(sub: bytearray) -> bytes:
            sub[40:42] = (0x0050).to_bytes(2, "big")
            return bytes(sub)
        self.assertReject(resubheader(self.packet, self.key, edit),
                          RejectReason.UNKNOWN_ROUTING_TYPE)
        self.assertReject(self.packet, RejectReason.REPLAY)

    def test_bad_routing_info(self) -> None:
        cases = [
            (routing.FWD_IPV4_TYPE, host(1)),                      # host info under an IPv4 type
            (routing.SWAP_FWD_IPV4_TYPE, b"\x01" * 25),
            (routing.FWD_HOST_TYPE, b"\x00\x01" + bytes(20)),      # no hostname
            (routing.FWD_HOST_TYPE, b"\x00\x01" + bytes(20) + b"_.com"),
            (routing.SWAP_FWD_HOST_TYPE, b"\x00\x01" + bytes(20) + b".lead.dot"),
            (routing.SMTP_TYPE, b"short"),                         # tag needs 20 bytes
            (routing.MBOX_TYPE, b""),
        ]
        for rtype, info in cases:
            packet = single(self.key.public, rtype, info)
            result = self.assertReject(packet, RejectReason.BAD_ROUTING_INFO)
            self.assertEqual(result.subheader.routing_type, rtype)
            self.assertIn(replay_value(result.subheader.secret), self.log)

    def test_never_raises(self) -> None:
        """Bit flips anywhere, junk, and subheaders with a valid version and
        digest but arbitrary routing all give a result, never an exception."""
        gen = random.Random(1234)
        built = forward([0], [1])
        for _ in range(40):
            flipped = bytearray(built.packet)
            flipped[gen.randrange(PACKET_LEN)] ^= 1 << gen.randrange(8)
            self.assertIsInstance(processor(0)[0].process(bytes(flipped)),
                                  (Relay, Reject))
        for _ in range(60):
            rtype = gen.choice([0, 1, 2, 3, 4, 5, 0xFF, 0x100, 0x101, 0x103, 0x105, 0xFFFF,
                                gen.randrange(0x10000)])
            rlen = gen.choice([0, 5, 26, 171, 172, 173, 1792 + 172, 1792 + 173, 0xFFFF,
                               gen.randrange(0x10000)])
            def edit(sub: bytearray, rtype: int = rtype, rlen: int = rlen) -> bytes:
                sub[38:40] = rlen.to_bytes(2, "big")
                sub[40:42] = rtype.to_bytes(2, "big")
                sub[42:] = bytes(gen.getrandbits(8) for _ in range(172))
                return bytes(sub)
            packet = resubheader(self.packet, self.key, edit)
            result = processor(0)[0].process(packet)
            self.assertIsInstance(result, (Relay, Exit, Drop, Reject))
            if isinstance(result, Relay):
                self.assertEqual(len(result.packet), PACKET_LEN)
            if isinstance(result, Exit):
                self.assertEqual(len(result.routing_info), rlen)


class KeyRotationTests(unittest.TestCase):
    """A server with an old and a new packet key (packet.md §9 step 2)."""

    def test_both_keys_accepted_each_with_its_log(self) -> None:
        proc, (old_log, new_log) = processor(0, 1)
        keys = server_keys()
        to_old = single(keys[0].public, routing.FWD_HOST_TYPE, host(2))
        to_new = single(keys[1].public, routing.FWD_HOST_TYPE, host(2))
        old = proc.process(to_old)
        new = proc.process(to_new)
        self.assertEqual((old.key_index, new.key_index), (0, 1))
        self.assertIn(replay_value(old.subheader.secret), old_log)
        self.assertNotIn(replay_value(old.subheader.secret), new_log)
        self.assertIn(replay_value(new.subheader.secret), new_log)
        self.assertNotIn(replay_value(new.subheader.secret), old_log)
        for packet in (to_old, to_new):
            self.assertEqual(proc.process(packet).reason, RejectReason.REPLAY)
        stranger = single(keys[2].public, routing.FWD_HOST_TYPE, host(2))
        self.assertEqual(proc.process(stranger).reason, RejectReason.RSA_OAEP)

    def test_same_secret_under_two_keys_is_no_replay(self) -> None:
        """Logs are per key: one secret seen by each key is two entries."""
        proc, logs = processor(0, 1)
        keys = server_keys()
        secret = rng(16)
        for packet_key in keys[:2]:
            result = proc.process(single(packet_key.public, routing.FWD_HOST_TYPE, host(2), secret))
            self.assertIsInstance(result, Relay)
        self.assertEqual([len(log) for log in logs], [1, 1])

    def test_exit_under_second_key(self) -> None:
        proc, _ = processor(3, 4)
        built = forward([0], [4], routing.MBOX_TYPE, b"m" * 20 + b"fred")
        relay = processor(0)[0].process(built.packet)
        result = proc.process(relay.packet)
        assert isinstance(result, Exit)
        self.assertEqual(result.key_index, 1)
        self.assertEqual(result.payload, built.payload)


class BatchTests(unittest.TestCase):
    def test_batch_matches_one_by_one(self) -> None:
        keys = server_keys()
        packets = [single(keys[0].public, routing.FWD_HOST_TYPE, host(1)),
                   single(keys[1].public, routing.SMTP_TYPE, b"t" * 20 + b"a@b.example"),
                   rng(PACKET_LEN), b"short",
                   single(keys[0].public, routing.DROP_TYPE, b""),
                   single(keys[1].public, 0x0042, b"")]
        packets += [packets[0], packets[1], packets[4]]      # replays within the batch
        batch_proc, batch_logs = processor(0, 1)
        single_proc, single_logs = processor(0, 1)
        batched = batch_proc.process_batch(packets)
        one_by_one = [single_proc.process(p) for p in packets]
        self.assertEqual(batched, one_by_one)
        self.assertEqual([r.reason for r in batched[-3:]], [RejectReason.REPLAY] * 3)
        self.assertEqual([len(log) for log in batch_logs], [len(log) for log in single_logs])
        self.assertEqual(batch_proc.process_batch([]), [])

    def test_batch_uses_one_call_per_log(self) -> None:
        calls: list[int] = []

        class CountingLog(MemoryReplayLog):
            def seen_or_add_many(self, entries):  # type: ignore[override]
                entries = list(entries)
                calls.append(len(entries))
                return super().seen_or_add_many(entries)

        keys = server_keys()
        proc = PacketProcessor([(keys[0], CountingLog()), (keys[1], CountingLog())])
        packets = [single(keys[i % 2].public, routing.FWD_HOST_TYPE, host(3)) for i in range(5)]
        results = proc.process_batch(packets)
        self.assertTrue(all(isinstance(r, Relay) for r in results))
        self.assertEqual(sorted(calls), [2, 3])


class DurableLogTests(unittest.TestCase):
    """The processor over the node's durable replay log, a table of its
    packet store (:class:`StoreReplayLog`)."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.key = server_keys()[0]
        self.path = os.path.join(self.dir, "packets.db")

    def open_log(self) -> StoreReplayLog:
        """The key's replay log in the store, opened afresh (as after a restart)."""
        store = PacketStore(self.path)
        self.addCleanup(store.close)
        return StoreReplayLog(store, self.key.public.keyid)

    def test_replay_survives_restart(self) -> None:
        packet = single(self.key.public, routing.FWD_HOST_TYPE, host(1))
        log = self.open_log()
        self.assertIsInstance(PacketProcessor([(self.key, log)]).process(packet), Relay)
        log.store.close()
        result = PacketProcessor([(self.key, self.open_log())]).process(packet)
        self.assertEqual(result.reason, RejectReason.REPLAY)

    def test_batch_over_durable_log(self) -> None:
        packets = [single(self.key.public, routing.FWD_HOST_TYPE, host(1)) for _ in range(4)]
        packets.append(packets[0])
        log = self.open_log()
        results = PacketProcessor([(self.key, log)]).process_batch(packets)
        self.assertEqual([type(r) for r in results], [Relay] * 4 + [Reject])
        log.store.close()
        self.assertEqual(self.open_log().seen_or_add_many(replay_value(r.subheader.secret)
                                                          for r in results[:4]), [True] * 4)
