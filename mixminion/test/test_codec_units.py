"""Known answers of packet.md §20.1 that no other test module checks, and
the builder's refusals.

Subheader packing, IPv4 and host routing info, reply blocks (binary, text,
generated), the SURB seed and its secrets, SMTP address rules, building
errors, replayed SURBs, and a Twisted-free codec.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys

from twisted.trial import unittest

from mixminion.codec import crypto
from mixminion.codec.build import (
    build_dummy_packet,
    build_encrypted_forward_packet,
    build_forward_packet,
    build_message_packets,
    build_reply_packet,
    encode_message_payloads,
)
from mixminion.codec.errors import BuildError, CodecError, ParseError
from mixminion.codec.header import (
    MAX_ROUTING_INFO_LEN,
    MIN_SUBHEADER_LEN,
    SUBHEADER_LEN,
    Subheader,
    build_header,
    check_header_room,
    leg_routing,
)
from mixminion.codec.header import Hop
from mixminion.codec.packet import PAYLOAD_LEN
from mixminion.codec.payload import ENC_FWD_OVERHEAD
from mixminion.codec.process import Drop, Exit, Reject, RejectReason, Relay
from mixminion.codec.routing import (
    DROP_TYPE,
    FRAGMENT_TYPE,
    FWD_HOST_TYPE,
    FWD_IPV4_TYPE,
    MBOX_TYPE,
    SMTP_TYPE,
    SWAP_FWD_HOST_TYPE,
    SWAP_FWD_IPV4_TYPE,
    HostInfo,
    IPv4Info,
    check_smtp_address,
    parse_relay_info,
)
from mixminion.codec.surb import (
    MAX_SURB_HOPS,
    ReplyBlock,
    build_reply_block,
    parse_reply_blocks,
    secret_generator,
    seed_is_valid,
)
from mixminion.test.test_properties import (
    Network,
    default_addresses,
    recipient_keys,
    seeded_rng,
    server_keys,
)

SECRET = b"abcdeabcdeabcdef"
DIGEST = b"ABCDEFGHIJABCDEFGHIJ"
ELIOT = (b"Who is the third who walks always beside you? / "
         b"When I count, there are only you and I together / "
         b"But when I look ahead up the white road / "
         b"There is always another one walking beside you")

SURB_EXAMPLE = (b"SURB\x00\x01\x00\x00\x00\x00" + b"Z" * 2048 + b"\x00\x0A" + b"\x00\x01"
                + b"\x99" * 16 + b"F" * 10)

SEED_TAG = b"To light my way out\xBE"
SEED_USER_KEY = b"out I would have to burn every paper in the briefcase"


class SubheaderTests(unittest.TestCase):
    """packet.md §3 and §20.1, "Subheader packing"."""

    def test_hello(self) -> None:
        sub = Subheader(3, 0, SECRET, DIGEST, 5, 1, b"Hello")
        packed = sub.pack()
        self.assertEqual(packed, b"\x03\x00" + SECRET + DIGEST + b"\x00\x05\x00\x01Hello")
        # What is left of the 214 bytes is the next header's underflow.
        self.assertEqual(SUBHEADER_LEN - len(packed), 256 - 42 - 42 - 5)
        self.assertEqual(SUBHEADER_LEN - len(packed), 167)
        more = bytes(range(167))
        parsed = Subheader.parse(packed + more)
        self.assertEqual(parsed, Subheader(3, 0, SECRET, DIGEST, 5, 1, b"Hello", more))
        self.assertEqual(parsed.overflow_length, 0)
        self.assertEqual(parsed.pack(), packed + more)
        self.assertEqual(Subheader.parse(packed), sub)

    def test_eliot_overflows_by_fourteen(self) -> None:
        """186 bytes of routing info: 172 in the RSA block, 14 overflow."""
        self.assertEqual(len(ELIOT), 186)
        sub = Subheader(3, 9, SECRET, DIGEST, len(ELIOT), 300, ELIOT)
        packed = sub.pack()
        self.assertEqual(len(packed), 214)
        self.assertEqual(packed, b"\x03\x09" + SECRET + DIGEST + b"\x00\xBA\x01\x2C" + ELIOT[:172])
        self.assertEqual(sub.overflow_length, 14)
        self.assertEqual(ELIOT[MAX_ROUTING_INFO_LEN:], b"ing beside you")
        parsed = Subheader.parse(packed)
        self.assertEqual((parsed.routing_length, parsed.routing_type), (186, 300))
        self.assertEqual((parsed.routing_info, parsed.underflow), (ELIOT[:172], b""))
        self.assertEqual(parsed.overflow_length, 14)

    def test_lengths(self) -> None:
        base = Subheader(0, 3, SECRET, DIGEST, 0, 0, b"").pack()
        self.assertEqual(len(base), MIN_SUBHEADER_LEN)
        for bad in (base[:41], base + bytes(214), base + bytes(173), b""):
            self.assertRaises(ParseError, Subheader.parse, bad)
        self.assertEqual(len(base + bytes(172)), 214)
        self.assertEqual(Subheader.parse(base + bytes(172)).underflow, bytes(172))
        self.assertRaises(ParseError, Subheader.parse, bytes(41))
        self.assertRaises(ParseError, Subheader.parse, bytes(256))


class RoutingInfoTests(unittest.TestCase):
    """packet.md §5 and §20.1, IPv4 and host routing info."""

    IPV4 = bytes.fromhex("12F400BCBBE30011223344556677889900112233445566778899")
    HOST = b"\x30\x55" + b"zbcd" * 5 + b"the.hostname.is.here"

    def test_ipv4(self) -> None:
        info = IPv4Info.parse(self.IPV4)
        self.assertEqual(info, IPv4Info("18.244.0.188", 48099, self.IPV4[6:]))
        self.assertEqual(info.port, 0xBBE3)
        self.assertEqual(info.pack(), self.IPV4)
        for rtype in (FWD_IPV4_TYPE, SWAP_FWD_IPV4_TYPE):
            self.assertEqual(parse_relay_info(rtype, self.IPV4), info)
        for bad in (self.IPV4[:25], self.IPV4 + b"\x00"):
            self.assertRaises(ParseError, IPv4Info.parse, bad)
            self.assertRaises(ParseError, parse_relay_info, FWD_IPV4_TYPE, bad)

    def test_host(self) -> None:
        info = HostInfo.parse(self.HOST)
        self.assertEqual(info, HostInfo("the.hostname.is.here", 0x3055, b"zbcd" * 5))
        self.assertEqual(info.pack(), self.HOST)
        for rtype in (FWD_HOST_TYPE, SWAP_FWD_HOST_TYPE):
            self.assertEqual(parse_relay_info(rtype, self.HOST), info)
        no_host = self.HOST[:22]
        for bad in (b"z", no_host, no_host + b"_.com", no_host + b".lead", no_host + b"a..b",
                    no_host + b"sp ace", no_host + b"nl\n", no_host + b"\xe9t\xe9"):
            self.assertRaises(ParseError, HostInfo.parse, bad)
        # An IPv4 type does not read host info, and the other way round.
        self.assertRaises(ParseError, parse_relay_info, FWD_IPV4_TYPE, self.HOST)
        self.assertRaises(ParseError, parse_relay_info, FWD_HOST_TYPE, b"\x01" * 21)

    def test_hostname_lowercased(self) -> None:
        """packet.md §5.2: lower-cased after parsing."""
        info = HostInfo.parse(self.HOST[:22] + b"The.HostName.IS-here")
        self.assertEqual(info.hostname, "the.hostname.is-here")

    def test_not_relay_types(self) -> None:
        for rtype in (DROP_TYPE, 0x0005, SMTP_TYPE, FRAGMENT_TYPE):
            self.assertRaises(ParseError, parse_relay_info, rtype, self.HOST)


class ReplyBlockTests(unittest.TestCase):
    """packet.md §15.1 and §20.1, "Reply block"."""

    def test_example(self) -> None:
        block = ReplyBlock.parse(SURB_EXAMPLE)
        self.assertEqual(block, ReplyBlock(0, b"Z" * 2048, 1, b"F" * 10, b"\x99" * 16))
        self.assertEqual(block.pack(), SURB_EXAMPLE)
        self.assertEqual(block.digest, crypto.sha1(SURB_EXAMPLE))
        self.assertEqual(parse_reply_blocks(SURB_EXAMPLE * 2), [block, block])
        spaced = b" \t" + SURB_EXAMPLE + b"\r\n \n" + SURB_EXAMPLE + b"\n"
        self.assertEqual(parse_reply_blocks(spaced), [block, block])

    def test_parse_errors(self) -> None:
        def error(data: bytes) -> str:
            return str(self.assertRaises(ParseError, ReplyBlock.parse, data))
        self.assertIn("extra data", error(SURB_EXAMPLE * 2))
        self.assertIn("extra data", error(SURB_EXAMPLE + b"\n"))
        self.assertIn("truncated", error(SURB_EXAMPLE[:-1]))
        self.assertIn("truncated", error(SURB_EXAMPLE[:2077]))
        self.assertIn("magic", error(b"SURF" + SURB_EXAMPLE[4:]))
        self.assertIn("version", error(SURB_EXAMPLE[:5] + b"\x02" + SURB_EXAMPLE[6:]))
        self.assertIn("version", error(SURB_EXAMPLE[:4] + b"\x01" + SURB_EXAMPLE[5:]))
        for data in (b"", b" \n ", SURB_EXAMPLE + b" x", SURB_EXAMPLE[:-3]):
            self.assertRaises(ParseError, parse_reply_blocks, data)

    def test_armored_text_without_a_block(self) -> None:
        """Text that starts like armour but holds no block is an error, as
        empty binary input is (it used to give an empty list)."""
        for data in (b"-----BEGIN", b"  -----BEGIN TYPE III REPLY BLOCK", b"-----BEGIN X\n"):
            error = self.assertRaises(ParseError, parse_reply_blocks, data)
            self.assertIn("no reply block", str(error))

    def test_generated_with_expiry_3(self) -> None:
        net = Network(default_addresses())
        path = net.path([1, 2])
        block, seed = build_reply_block(path, MBOX_TYPE, b"fred", b"user key", 3, seeded_rng(3))
        ri = path[0].address.pack()
        self.assertEqual(ri, HostInfo("mix1.example.net", 48100, path[0].address.keyinfo).pack())
        self.assertEqual(block.pack(),
                         b"SURB\x00\x01\x00\x00\x00\x03" + block.header
                         + struct.pack(">H", len(ri)) + b"\x00\x04" + block.key + ri)
        self.assertEqual((block.routing_type, block.routing_info), (SWAP_FWD_HOST_TYPE, ri))
        text = block.to_text()
        self.assertTrue(text.startswith("-----BEGIN TYPE III REPLY BLOCK-----\nVersion: 0.2\n\n"),
                        text[:80])
        self.assertTrue(text.endswith("\n-----END TYPE III REPLY BLOCK-----\n"), text[-80:])
        self.assertEqual(parse_reply_blocks(text.encode("ascii")), [block])
        self.assertEqual(parse_reply_blocks((text + "junk between\n" + text).encode("ascii")),
                         [block, block])
        self.assertEqual(ReplyBlock.parse(block.pack()), block)
        self.assertTrue(seed_is_valid(seed, b"user key"))


class SurbSeedTests(unittest.TestCase):
    """packet.md §15.2 and §20.1, "SURB seed test"."""

    SECRETS = [bytes.fromhex("43b817173b64add3a575f1c5c250b312"),
               bytes.fromhex("48fdb1148fe2454c767805910c8b7e81"),
               bytes.fromhex("ba94da5457368f13614e013ce2a2edc3")]

    def test_digests(self) -> None:
        validate = crypto.sha1(SEED_TAG + SEED_USER_KEY + b"Validate")
        self.assertEqual(validate.hex(), "7d268ad379de83c275875e1cd24acb6126502400")
        self.assertTrue(seed_is_valid(SEED_TAG, SEED_USER_KEY))
        self.assertFalse(seed_is_valid(SEED_TAG, SEED_USER_KEY + b"."))
        generate = crypto.sha1(SEED_TAG + SEED_USER_KEY + b"Generate")[:16]
        self.assertEqual(generate.hex(), "9ecd74605d98ac29359c917e131792f1")

    def test_first_three_secrets(self) -> None:
        gen = secret_generator(SEED_TAG, SEED_USER_KEY)
        self.assertEqual([gen(16) for _ in range(3)], self.SECRETS)
        key = bytes.fromhex("9ecd74605d98ac29359c917e131792f1")
        self.assertEqual(crypto.prng(key, 48), b"".join(self.SECRETS))

    def test_secrets_in_a_generated_surb(self) -> None:
        """With the seed test's tag as the first draw, a two-hop SURB gives
        hop 0 the second secret, hop 1 the first, and K the third."""
        net = Network(default_addresses())
        first_draw = [True]

        def rng(n: int) -> bytes:
            """The seed test's tag first (it validates at once), then zeros."""
            if first_draw[0]:
                first_draw[0] = False
                self.assertEqual(n, 20)
                return SEED_TAG
            return bytes(n)

        block, seed = build_reply_block(net.path([0, 1]), SMTP_TYPE, b"me@example.org",
                                        SEED_USER_KEY, 0, rng)
        self.assertEqual(seed, SEED_TAG)
        self.assertEqual(block.key, self.SECRETS[2])
        first = Subheader.parse(server_keys()[0].decrypt(block.header[:256]))
        self.assertEqual(first.secret, self.SECRETS[1])
        relay = net.processors[0].process(_swap_into(block, net))
        assert isinstance(relay, Relay), relay
        last = net.processors[1].process(relay.packet)
        assert isinstance(last, Exit), last
        self.assertEqual(last.subheader.secret, self.SECRETS[0])
        self.assertEqual((last.tag, last.address), (SEED_TAG, b"me@example.org"))


def _swap_into(block: ReplyBlock, net: Network) -> bytes:
    """A reply packet through ``block`` as its first SURB hop receives it:
    a one-hop leg 1 over server 5, already processed."""
    built = build_reply_packet(bytes(PAYLOAD_LEN), net.path([5]), block, seeded_rng(4))
    swapped = net.processors[5].process(built.packet)
    assert isinstance(swapped, Relay), swapped
    return swapped.packet


class SmtpAddressTests(unittest.TestCase):
    """packet.md §5.3: ``local@domain`` of dot-separated atoms, no IP literal."""

    GOOD = [b"nobody@example.com", b"a@b", b"first.last@sub.example.org", b"x+tag@example.com",
            b"o'neil@example.ie", b"{weird}!#$%&*=?^`|~@example.net", b"user@1.2.3.4a",
            b"user@host-1.example", b"a@123.example"]
    BAD = [b"", b"nobody", b"@example.com", b"nobody@", b"a@@b", b"a@b@c", b"a b@example.com",
           b"a..b@example.com", b".a@example.com", b"a.@example.com", b"a@example.com.",
           b"a@.example.com", b"<a@example.com>", b"a@example,com", b"a;b@example.com",
           b"a\\b@example.com", b'"a"@example.com', b"a(b)@example.com", b"a:b@example.com",
           b"a@example.com\n", b"a\x00@example.com", b"a\x7f@example.com", b"\xe9@example.com",
           b"a@[1.2.3.4]", b"a@1.2.3.4", b"a@127.0.0.1", b"a@1234", b"a@1.2.3.4.5", b"a@..."]

    def test_good(self) -> None:
        for address in self.GOOD:
            check_smtp_address(address)

    def test_bad(self) -> None:
        for address in self.BAD:
            self.assertRaises(ParseError, check_smtp_address, address)

    def test_builder_checks_too(self) -> None:
        """The client refuses what the exit would refuse (CodecError: today
        a ParseError from the shared check)."""
        net = Network(default_addresses())
        for address in (b"a@1.2.3.4", b"a@[10.0.0.1]", b"not an address"):
            self.assertRaises(CodecError, build_message_packets, b"hi", SMTP_TYPE, address,
                              lambda i: (net.path([0]), net.path([1])), seeded_rng(0))
        # MBOX names are the server's business: not an e-mail address.
        built = build_message_packets(b"hi", MBOX_TYPE, b"not an address",
                                      lambda i: (net.path([0]), net.path([1])), seeded_rng(0))
        self.assertEqual(len(built), 1)


class BuildErrorTests(unittest.TestCase):
    """What the builders refuse (packet.md §6 step 2, §7.1, §15, §16)."""

    def setUp(self) -> None:
        self.net = Network(default_addresses())
        self.rng = seeded_rng(1)
        self.payload = bytes(PAYLOAD_LEN)

    def test_empty_legs(self) -> None:
        one, none = self.net.path([0]), self.net.path([])
        for path1, path2 in ((none, one), (one, none), (none, none)):
            self.assertRaises(BuildError, build_forward_packet, self.payload, path1, path2,
                              SMTP_TYPE, b"a@b.example", self.rng)
            self.assertRaises(BuildError, build_dummy_packet, path1, path2, self.rng)
            self.assertRaises(BuildError, build_encrypted_forward_packet,
                              bytes(PAYLOAD_LEN - ENC_FWD_OVERHEAD), recipient_keys()[0].public,
                              path1, path2, SMTP_TYPE, b"a@b.example", self.rng)
        block, _ = build_reply_block(one, MBOX_TYPE, b"me", b"k", 0, self.rng)
        self.assertRaises(BuildError, build_reply_packet, self.payload, none, block, self.rng)
        self.assertRaises(BuildError, build_reply_block, none, MBOX_TYPE, b"me", b"k", 0, self.rng)
        self.assertRaises(BuildError, build_header, [], [], self.rng)
        self.assertRaises(BuildError, check_header_room, [])

    def test_path_too_long(self) -> None:
        sixteen = self.net.path([i % 6 for i in range(16)])
        self.assertRaises(BuildError, build_forward_packet, self.payload, sixteen,
                          self.net.path([0]), SMTP_TYPE, b"a@b.example", self.rng)
        self.assertRaises(BuildError, build_forward_packet, self.payload, self.net.path([0]),
                          sixteen, SMTP_TYPE, b"a@b.example", self.rng)
        self.assertRaises(BuildError, build_reply_block, self.net.path([0] * (MAX_SURB_HOPS + 1)),
                          MBOX_TYPE, b"me", b"k", 0, self.rng)
        # One subheader bigger than a header, and 8 of 256 bytes (the most
        # that fit) against 9.
        self.assertRaises(BuildError, check_header_room, [2049])
        check_header_room([256] * 8)
        self.assertRaises(BuildError, check_header_room, [256] * 9)
        # The last subheader borrows 256 - size bytes from the padding, so
        # the others may take 1792 bytes at most.
        check_header_room([112] * 16 + [100])
        check_header_room([112] * 16 + [256])
        self.assertRaises(BuildError, check_header_room, [112] * 15 + [113, 100])
        self.assertRaises(BuildError, check_header_room, [112] * 16 + [257])

    def test_payload_wrong_size(self) -> None:
        one = self.net.path([0])
        for size in (0, PAYLOAD_LEN - 1, PAYLOAD_LEN + 1, PAYLOAD_LEN - ENC_FWD_OVERHEAD):
            self.assertRaises(BuildError, build_forward_packet, bytes(size), one, one,
                              SMTP_TYPE, b"a@b.example", self.rng)
        block, _ = build_reply_block(one, MBOX_TYPE, b"me", b"k", 0, self.rng)
        self.assertRaises(BuildError, build_reply_packet, bytes(PAYLOAD_LEN - 1), one, block,
                          self.rng)
        for size in (PAYLOAD_LEN, PAYLOAD_LEN - ENC_FWD_OVERHEAD - 1):
            self.assertRaises(BuildError, build_encrypted_forward_packet, bytes(size),
                              recipient_keys()[0].public, one, one, SMTP_TYPE, b"a@b.example",
                              self.rng)

    def test_exit_types(self) -> None:
        one = self.net.path([0])
        for exit_type in (FWD_IPV4_TYPE, SWAP_FWD_HOST_TYPE, 0x0005, 0x00FF, 0x10000, -1):
            self.assertRaises(BuildError, build_forward_packet, self.payload, one, one, exit_type,
                              b"a@b.example", self.rng)
            self.assertRaises(BuildError, build_message_packets, b"x", exit_type, b"a@b.example",
                              lambda i: (one, one), self.rng)

    def test_drop_has_its_tag_suppressed(self) -> None:
        """A dummy's DROP exit carries no tag and no routing info (§5.3,
        §17), and the last hop drops it."""
        built = build_dummy_packet(self.net.path([0, 1]), self.net.path([2]), self.rng)
        self.assertEqual(built.tag, b"")
        first = self.net.processors[0].process(built.packet)
        assert isinstance(first, Relay), first
        second = self.net.processors[1].process(first.packet)
        assert isinstance(second, Relay), second
        last = self.net.processors[2].process(second.packet)
        assert isinstance(last, Drop), last
        self.assertEqual((last.subheader.routing_type, last.subheader.routing_length,
                          last.subheader.routing_info), (DROP_TYPE, 0, b""))

    def test_fragments_must_share_an_exit(self) -> None:
        body = seeded_rng(2)(60_000)
        paths = lambda i: (self.net.path([0]), self.net.path([i % 2 + 1]))  # noqa: E731
        self.assertRaises(BuildError, build_message_packets, body, SMTP_TYPE, b"a@b.example",
                          paths, self.rng)

    def test_leg_routing(self) -> None:
        """Each hop names the next; the last one does the leg's final routing."""
        path = self.net.path([0, 1, 2])
        routing = leg_routing(path, SMTP_TYPE, b"tag")
        self.assertEqual([(r.routing_type, r.routing_info) for r in routing],
                         [(FWD_HOST_TYPE, path[1].address.pack()),
                          (FWD_HOST_TYPE, path[2].address.pack()), (SMTP_TYPE, b"tag")])
        self.assertEqual([r.packet_key for r in routing], [h.packet_key for h in path])
        self.assertEqual(leg_routing([], SMTP_TYPE, b"tag"), [])


class ReplayTests(unittest.TestCase):
    """packet.md §10, §20.1 "Server behaviour": SURBs are single-use."""

    def test_surb_used_twice(self) -> None:
        """The second reply through one SURB is refused at the SURB's first
        hop, whatever leg 1 it took."""
        net = Network(default_addresses())
        rng = seeded_rng(7)
        block, seed = build_reply_block(net.path([2, 3]), MBOX_TYPE, b"me", b"key", 0, rng)
        payload, = encode_message_payloads(b"first answer", rng)
        built = build_reply_packet(payload, net.path([0]), block, rng)
        visited, result = net.deliver(built.packet, 0)
        self.assertEqual(visited, [0, 2, 3])
        assert isinstance(result, Exit), result
        self.assertEqual(result.tag, seed)
        payload, = encode_message_payloads(b"second answer", rng)
        built = build_reply_packet(payload, net.path([1, 4]), block, rng)
        visited, result = net.deliver(built.packet, 1)
        self.assertEqual(visited, [1, 4, 2])
        assert isinstance(result, Reject), result
        self.assertIs(result.reason, RejectReason.REPLAY)

    def test_same_prng_seed_same_secrets(self) -> None:
        """Two SURBs built from the same random source share their secrets
        and so collide in the first hop's replay log."""
        net = Network(default_addresses())
        first, _ = build_reply_block(net.path([2, 3]), MBOX_TYPE, b"me", b"key", 0, seeded_rng(8))
        second, _ = build_reply_block(net.path([2, 3]), MBOX_TYPE, b"me", b"key", 0, seeded_rng(8))
        self.assertEqual(first, second)
        outcomes = []
        for block, leg in ((first, [0]), (second, [1])):
            payload, = encode_message_payloads(b"answer", seeded_rng(len(leg) + leg[0]))
            built = build_reply_packet(payload, net.path(leg), block, seeded_rng(leg[0]))
            outcomes.append(net.deliver(built.packet, leg[0])[1])
        self.assertIsInstance(outcomes[0], Exit)
        assert isinstance(outcomes[1], Reject), outcomes[1]
        self.assertIs(outcomes[1].reason, RejectReason.REPLAY)


class PurityTests(unittest.TestCase):
    def test_codec_imports_without_twisted(self) -> None:
        """Clients and tools use the codec without Twisted (doc/codec.md);
        the packet processor and its replay log need no sqlite either."""
        code = ("import sys; import mixminion.codec.build, mixminion.codec.process, "
                "mixminion.codec.decode, mixminion.codec.surb, mixminion.codec.replay; "
                "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('twisted', 'sqlite3')); "
                "print(bad); assert not bad")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertEqual(proc.stdout.strip(), "[]")


class TagRulesTests(unittest.TestCase):
    """A packet's exit routing info must match what its exit type expects."""

    def _paths(self):
        hop = Hop(server_keys()[0].public, HostInfo("mix.example.net", 48099, bytes(20)))
        return [hop], [hop]

    def test_tag_presence_follows_the_exit_type(self) -> None:
        p1, p2 = self._paths()
        payload = bytes(28672)
        self.assertEqual(len(build_forward_packet(payload, p1, p2, SMTP_TYPE, b"a@b.c",
                                                  os.urandom).tag), 20)
        self.assertEqual(build_forward_packet(payload, p1, p2, FRAGMENT_TYPE, b"",
                                              os.urandom).tag, b"")
        with self.assertRaises(BuildError):
            build_forward_packet(payload, p1, p2, DROP_TYPE, b"", os.urandom, tagged=True)
        with self.assertRaises(BuildError):
            build_forward_packet(payload, p1, p2, MBOX_TYPE, b"nym", os.urandom, tagged=False)

    def test_bad_smtp_address_is_a_build_error(self) -> None:
        p1, p2 = self._paths()
        with self.assertRaises(BuildError):
            build_message_packets(b"hi", SMTP_TYPE, b"user@127.0.0.1", lambda i: (p1, p2),
                                  os.urandom)
