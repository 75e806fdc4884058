"""Server descriptors: build/parse round trips and every rejection rule."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from typing import Any

from twisted.trial import unittest

from mixminion.codec.errors import BuildError, ParseError
from mixminion.codec.rsa import PrivateKey, PublicKey
from mixminion.codec import textformat as tf
from mixminion.directory.descriptor import (
    PublishedRule,
    BadDigest,
    BadKey,
    BadSignature,
    DeliveryInfo,
    DescriptorError,
    DescriptorFields,
    Expired,
    IncomingMMTP,
    MalformedDescriptor,
    NotYetValid,
    NymInfo,
    OutgoingMMTP,
    PublishedInFuture,
    UnsupportedVersion,
    build_descriptor,
    format_descriptor,
    parse_descriptor,
)
from mixminion.test.vectorkit import vectors_dir
from mixminion.testing.keys import key

PUBLISHED = 1705321800  # 2024-01-15 12:30:00
VALID_AFTER = 1705276800  # 2024-01-15
VALID_UNTIL = VALID_AFTER + 30 * 86400  # 2024-02-14
NOW = VALID_AFTER + 86400


def fixed_rng(n: int) -> bytes:
    return b"\x5a" * n


def identity() -> PrivateKey:
    return key("identity")


def full_fields(**changes: Any) -> DescriptorFields:
    """Every section and optional field set."""
    fields = minimal_fields(
        nickname="Quince",
        contact="quince-admin@example.org",
        incoming=IncomingMMTP(
            hostname="Quince.Example.NET",
            port=48099,
            ip="192.0.2.7",
            address_rules=(PublishedRule("Deny", "192.0.2.0/255.255.255.0"), PublishedRule("Allow", "* 48099")),
        ),
        outgoing=OutgoingMMTP(address_rules=(PublishedRule("Allow", "*"),)),
        mbox=DeliveryInfo(64, allow_from=False),
        smtp=DeliveryInfo(32),
        max_fragments=66,
        software="Mixminion-Twisted 0.1",
        insecurities=("Software is alpha", "Log is too verbose"),
        contact_fingerprint="ABCD 1234",
        comments="Test server; do not use.",
        platform="CPython 3.11",
        configuration="Server/Mode='relay'",
    )
    return dataclasses.replace(fields, **changes)


def minimal_fields(**changes: Any) -> DescriptorFields:
    """Only the required fields."""
    fields = DescriptorFields(
        nickname="Bare",
        contact="bare@example.org",
        packet_key=key("packet").public,
        published=PUBLISHED,
        valid_after=VALID_AFTER,
        valid_until=VALID_UNTIL,
    )
    return dataclasses.replace(fields, **changes)


def signed(fields: DescriptorFields | None = None, signer: PrivateKey | None = None) -> str:
    """Format and sign without the builder's checks: may be a bad descriptor."""
    signer = signer or identity()
    return tf.sign_document(format_descriptor(fields or full_fields(), signer.public), signer, fixed_rng)


def resign(text: str, signer: PrivateKey | None = None) -> str:
    """Sign an edited text again so that only the edit is wrong."""
    return tf.sign_document(text, signer or identity(), fixed_rng)


def replace_line(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


class RoundTripTests(unittest.TestCase):
    """What build_descriptor writes, parse_descriptor reads back unchanged."""

    def test_full_round_trip(self) -> None:
        fields = full_fields()
        text = build_descriptor(fields, identity(), fixed_rng)
        desc = parse_descriptor(text, NOW)
        self.assertEqual(desc.to_fields(), fields)
        self.assertEqual(desc.identity, identity().public)
        self.assertEqual(desc.identity_digest, identity().public.keyid)
        self.assertEqual(desc.fingerprint, identity().public.fingerprint)
        self.assertEqual(desc.digest, tf.document_digest(text))
        self.assertEqual(desc.text, text)
        self.assertEqual(desc.warnings, ())
        self.assertIs(desc.secure_configuration, False)
        self.assertEqual(desc.why_insecure, "Software is alpha, Log is too verbose")
        self.assertEqual(desc.capabilities, {"mbox", "smtp", "relay", "frag"})
        self.assertEqual(desc.caps, "mbox smtp relay frag")
        self.assertTrue(desc.can_start_at())
        self.assertTrue(desc.supports_packet_version())

    def test_nym_section_round_trip(self) -> None:
        """[Delivery/Nym] (doc/nym.md §1): domain and request key."""
        fields = full_fields(nym=NymInfo("nym.example.org", key("nym").public))
        text = build_descriptor(fields, identity(), fixed_rng)
        self.assertIn("[Delivery/Nym]\nVersion: 0.1\nDomain: nym.example.org\nKey: ", text)
        desc = parse_descriptor(text, NOW)
        self.assertEqual(desc.nym, NymInfo("nym.example.org", key("nym").public))
        self.assertEqual(desc.to_fields(), fields)
        self.assertIsNone(parse_descriptor(build_descriptor(full_fields(), identity(), fixed_rng),
                                           NOW).nym)

    def test_nym_section_bad_key_or_other_version(self) -> None:
        text = signed(full_fields(nym=NymInfo("nym.example.org", key("nym").public)))
        with self.assertRaises(BadKey):
            parse_descriptor(resign(re.sub(r"(\[Delivery/Nym\]\n(?:.*\n)*?Key: )\S+",
                                           r"\1AAAA", text)), NOW)
        other = parse_descriptor(resign(replace_line(
            text, "[Delivery/Nym]\nVersion: 0.1", "[Delivery/Nym]\nVersion: 0.9")), NOW)
        self.assertIsNone(other.nym)
        self.assertTrue(any("[Delivery/Nym] Version is '0.9'" in w for w in other.warnings))

    def test_routing_info(self) -> None:
        """FWD_HOST: u16 port, identity keyid, lower-cased hostname."""
        desc = parse_descriptor(build_descriptor(full_fields(), identity(), fixed_rng), NOW)
        self.assertEqual(
            desc.routing_info,
            b"\xbb\xe3" + identity().public.keyid + b"quince.example.net",
        )
        self.assertEqual(desc.hostname, "Quince.Example.NET")
        self.assertEqual(desc.port, 48099)

    def test_address_rules_keep_order(self) -> None:
        desc = parse_descriptor(build_descriptor(full_fields(), identity(), fixed_rng), NOW)
        assert desc.incoming is not None
        self.assertEqual(
            desc.incoming.address_rules,
            (PublishedRule("Deny", "192.0.2.0/255.255.255.0"), PublishedRule("Allow", "* 48099")),
        )

    def test_minimal_round_trip(self) -> None:
        """No [Incoming/MMTP]: nobody can reach it, so no capabilities."""
        fields = minimal_fields()
        text = build_descriptor(fields, identity(), fixed_rng)
        desc = parse_descriptor(text, NOW)
        self.assertEqual(desc.to_fields(), fields)
        self.assertIs(desc.secure_configuration, True)
        self.assertIsNone(desc.routing_info)
        self.assertIsNone(desc.hostname)
        self.assertEqual(desc.capabilities, frozenset())
        self.assertEqual(desc.caps, "")
        self.assertFalse(desc.can_start_at())
        self.assertNotIn("[Testing]", text)

    def test_deterministic_with_fixed_rng(self) -> None:
        fields = full_fields()
        self.assertEqual(
            build_descriptor(fields, identity(), fixed_rng),
            build_descriptor(fields, identity(), fixed_rng),
        )

    def test_equality_is_by_digest(self) -> None:
        text = build_descriptor(full_fields(), identity(), fixed_rng)
        again = parse_descriptor(text.replace("\n", "\r\n"), NOW)
        self.assertEqual(parse_descriptor(text, NOW), again)
        other = parse_descriptor(build_descriptor(full_fields(published=PUBLISHED + 1), identity(), fixed_rng), NOW)
        self.assertNotEqual(again, other)
        self.assertEqual(len({again, other, parse_descriptor(text, NOW)}), 2)

    def test_producer_form(self) -> None:
        """LF only, final LF, no blanks around lines, 'Key: value'."""
        text = build_descriptor(full_fields(), identity(), fixed_rng)
        self.assertTrue(text.endswith("\n"))
        self.assertNotIn("\r", text)
        self.assertEqual(tf.clean(text), text)
        for line in text.splitlines():
            self.assertTrue(line.startswith("[") or ": " in line, line)
        self.assertTrue(text.startswith("[Server]\nDescriptor-Version: 0.2\nNickname: Quince\n"))

    def test_same_text_as_vectors(self) -> None:
        """Formatting the vectors' parsed contents gives their exact text."""
        data = json.loads((vectors_dir() / "descriptors.json").read_text())
        for entry in data["valid"]:
            desc = parse_descriptor(entry["text"], entry["validate_at"])
            self.assertEqual(
                format_descriptor(desc.to_fields(), desc.identity),
                tf.blank_signature_lines(entry["text"]),
            )


class CanonicalisationTests(unittest.TestCase):
    """Newline and indentation mangling does not break the signature (§9)."""

    def setUp(self) -> None:
        self.text = build_descriptor(full_fields(), identity(), fixed_rng)
        self.digest = parse_descriptor(self.text, NOW).digest

    def test_crlf(self) -> None:
        self.assertEqual(parse_descriptor(self.text.replace("\n", "\r\n"), NOW).digest, self.digest)

    def test_lone_cr(self) -> None:
        self.assertEqual(parse_descriptor(self.text.replace("\n", "\r"), NOW).digest, self.digest)

    def test_indentation_and_trailing_blanks(self) -> None:
        mangled = "".join(" \t" + line + "\t \n" for line in self.text.splitlines())
        self.assertEqual(parse_descriptor(mangled, NOW).digest, self.digest)

    def test_missing_final_newline(self) -> None:
        self.assertEqual(parse_descriptor(self.text[:-1], NOW).digest, self.digest)

    def test_bytes_input(self) -> None:
        self.assertEqual(parse_descriptor(self.text.encode("ascii"), NOW).digest, self.digest)

    def test_clean(self) -> None:
        self.assertEqual(tf.clean("  a: b \r\n\tc:d\rx"), "a: b\nc:d\nx\n")

    def test_only_first_two_signature_lines_blanked(self) -> None:
        text = "[A]\nDigest: 1\nX: y\nSignature: 2\n[B]\nDigest: 3\n"
        self.assertEqual(
            tf.blank_signature_lines(text), "[A]\nDigest:\nX: y\nSignature:\n[B]\nDigest: 3\n"
        )

    def test_later_digest_line_is_signed(self) -> None:
        """A Digest key in an unknown later section is covered, not blanked."""
        text = resign(self.text + "[Future]\nDigest: extra\n")
        desc = parse_descriptor(text, NOW)
        self.assertIn("line", desc.warnings[0])
        tampered = text.replace("Digest: extra", "Digest: other")
        self.assertRaises(BadDigest, parse_descriptor, tampered, NOW)


class SignatureTests(unittest.TestCase):
    def setUp(self) -> None:
        self.text = build_descriptor(full_fields(), identity(), fixed_rng)

    def test_tampered_after_signing(self) -> None:
        text = replace_line(self.text, "Contact: quince-admin@", "Contact: mallory@")
        exc = self.assertRaises(BadDigest, parse_descriptor, text, NOW)
        self.assertIn("[Server] Digest:", str(exc))
        self.assertIn("does not match the text", str(exc))

    def test_tampered_with_digest_recomputed(self) -> None:
        text = replace_line(self.text, "Port: 48099", "Port: 48100")
        old = parse_descriptor(self.text, NOW).digest
        new = tf.document_digest(text)
        text = replace_line(text, tf.encode_base64(old), tf.encode_base64(new))
        exc = self.assertRaises(BadSignature, parse_descriptor, text, NOW)
        self.assertIn("[Server] Signature: does not verify", str(exc))

    def test_signed_by_another_key(self) -> None:
        """Identity says one key, the signature is by another."""
        text = tf.sign_document(format_descriptor(full_fields(), identity().public), key("other"), fixed_rng)
        self.assertRaises(BadSignature, parse_descriptor, text, NOW)

    def test_signature_wrong_length(self) -> None:
        sig = parse_descriptor(self.text, NOW).signature
        text = replace_line(self.text, tf.encode_base64(sig), tf.encode_base64(sig[:-1]))
        exc = self.assertRaises(BadSignature, parse_descriptor, text, NOW)
        self.assertIn("255 bytes, but the Identity key needs 256", str(exc))

    def test_digest_wrong_length(self) -> None:
        digest = parse_descriptor(self.text, NOW).digest
        text = replace_line(self.text, tf.encode_base64(digest), tf.encode_base64(digest[:10]))
        exc = self.assertRaises(BadDigest, parse_descriptor, text, NOW)
        self.assertIn("is 10 bytes, not 20", str(exc))

    def test_verified_digest_skips_rsa_only(self) -> None:
        sig = parse_descriptor(self.text, NOW).signature
        forged = bytes([sig[0] ^ 1]) + sig[1:]
        text = replace_line(self.text, tf.encode_base64(sig), tf.encode_base64(forged))
        digest = tf.document_digest(text)
        self.assertRaises(BadSignature, parse_descriptor, text, NOW)
        self.assertEqual(parse_descriptor(text, NOW, verified_digests={digest}).digest, digest)
        self.assertRaises(Expired, parse_descriptor, text, VALID_UNTIL + 1, verified_digests={digest})

    def test_errors_are_parse_errors(self) -> None:
        for cls in (BadDigest, BadSignature, BadKey, Expired, MalformedDescriptor):
            self.assertTrue(issubclass(cls, DescriptorError))
            self.assertTrue(issubclass(cls, ParseError))


class ValidityTests(unittest.TestCase):
    def setUp(self) -> None:
        self.text = build_descriptor(full_fields(), identity(), fixed_rng)

    def test_expired(self) -> None:
        exc = self.assertRaises(Expired, parse_descriptor, self.text, VALID_UNTIL + 1)
        self.assertIn("expired at 2024-02-14", str(exc))

    def test_not_yet_valid(self) -> None:
        """A keyset published ahead of its Valid-After (as servers do)."""
        text = build_descriptor(full_fields(published=VALID_AFTER - 86400), identity(), fixed_rng)
        exc = self.assertRaises(NotYetValid, parse_descriptor, text, VALID_AFTER - 1)
        self.assertIn("not valid before 2024-01-15", str(exc))

    def test_interval_is_closed(self) -> None:
        parse_descriptor(self.text, VALID_UNTIL)
        text = build_descriptor(full_fields(published=VALID_AFTER), identity(), fixed_rng)
        parse_descriptor(text, VALID_AFTER)

    def test_unchecked_validity(self) -> None:
        """Directories and a server's future keysets: validity judged later."""
        desc = parse_descriptor(self.text, VALID_UNTIL + 86400, check_validity=False)
        self.assertFalse(desc.is_valid_at(VALID_UNTIL + 86400))
        self.assertTrue(desc.is_valid_over(VALID_AFTER, VALID_UNTIL))
        self.assertFalse(desc.is_valid_over(VALID_AFTER - 1, VALID_UNTIL))

    def test_published_in_future(self) -> None:
        parse_descriptor(self.text, PUBLISHED - 600, check_validity=False)
        exc = self.assertRaises(
            PublishedInFuture, parse_descriptor, self.text, PUBLISHED - 601, check_validity=False
        )
        self.assertIn("[Server] Published: 2024-01-15 12:30:00 is more than 600 s", str(exc))

    def test_until_not_after_after(self) -> None:
        text = resign(replace_line(self.text, "Valid-Until: 2024-02-14", "Valid-Until: 2024-01-15"))
        exc = self.assertRaises(MalformedDescriptor, parse_descriptor, text, NOW)
        self.assertIn("Valid-Until: 2024-01-15 is not after Valid-After 2024-01-15", str(exc))


class KeyTests(unittest.TestCase):
    def test_packet_key_wrong_size(self) -> None:
        text = signed(full_fields(packet_key=key("small", 1024).public))
        exc = self.assertRaises(BadKey, parse_descriptor, text, NOW)
        self.assertIn("[Server] Packet-Key: modulus is 1024 bits; must be 2048 bits", str(exc))

    def test_bad_exponent(self) -> None:
        text = signed(full_fields(packet_key=key("e3", 2048, 3).public))
        exc = self.assertRaises(BadKey, parse_descriptor, text, NOW)
        self.assertIn("[Server] Packet-Key: RSA public exponent must be 65537", str(exc))

    def test_identity_too_small(self) -> None:
        text = signed(full_fields(), key("small", 1024))
        exc = self.assertRaises(BadKey, parse_descriptor, text, NOW)
        self.assertIn("[Server] Identity: modulus is 1024 bits; must be 2048-4096 bits", str(exc))

    def test_oversized_key(self) -> None:
        der = identity().public.der
        big = base64.b64encode(der + bytes(560 - len(der))).decode()
        text = resign(replace_line(signed(), tf.encode_base64(der), big))
        exc = self.assertRaises(BadKey, parse_descriptor, text, NOW)
        self.assertIn("Identity: key is 560 bytes after base64 decoding; at most 550", str(exc))

    def test_not_a_key(self) -> None:
        text = resign(replace_line(signed(), tf.encode_base64(key("packet").public.der), "AAAA"))
        exc = self.assertRaises(BadKey, parse_descriptor, text, NOW)
        self.assertIn("[Server] Packet-Key: not a DER RSA public key", str(exc))

    def test_builder_refuses_bad_keys(self) -> None:
        self.assertRaises(
            BuildError, build_descriptor, full_fields(packet_key=key("small", 1024).public), identity(), fixed_rng
        )
        self.assertRaises(BuildError, build_descriptor, full_fields(), key("small", 1024), fixed_rng)


class FieldRuleTests(unittest.TestCase):
    """Each format rule of descriptors.md §2-§4, with the message it gives."""

    def setUp(self) -> None:
        self.text = signed()

    def reject(self, text: str | bytes, *fragments: str, cls: type = MalformedDescriptor) -> None:
        exc = self.assertRaises(cls, parse_descriptor, text, NOW)
        for fragment in fragments:
            self.assertIn(fragment, str(exc))

    def edited(self, old: str, new: str) -> str:
        return resign(replace_line(self.text, old, new))

    def test_missing_required_field(self) -> None:
        self.reject(self.edited("Contact: quince-admin@example.org\n", ""),
                    "line 1: [Server] missing required field Contact")

    def test_missing_required_field_in_subsection(self) -> None:
        self.reject(self.edited("Hostname: Quince.Example.NET\n", ""),
                    "[Incoming/MMTP] missing required field Hostname")

    def test_bad_nickname(self) -> None:
        for nick in ("9lives", "under_score", "A" * 25):
            self.reject(self.edited("Nickname: Quince", f"Nickname: {nick}"),
                        "line 3: [Server] Nickname:", "is not a nickname")
        self.assertRaises(BuildError, build_descriptor, full_fields(nickname="9lives"), identity(), fixed_rng)

    def test_longest_nickname(self) -> None:
        parse_descriptor(self.edited("Nickname: Quince", "Nickname: " + "Q-" * 12), NOW)

    def test_repeated_field(self) -> None:
        self.reject(self.edited("Port: 48099\n", "Port: 48099\nPort: 48100\n"),
                    "[Incoming/MMTP] Port: repeated (first at line")

    def test_unknown_section_tolerated(self) -> None:
        desc = parse_descriptor(resign(self.text + "[Future/Thing]\nFoo: bar\n"), NOW)
        self.assertIn("unknown section [Future/Thing] ignored", desc.warnings[0])
        self.assertIn("Future/Thing", [s.name for s in desc.sections])

    def test_unknown_key_tolerated(self) -> None:
        desc = parse_descriptor(self.edited("Contact:", "New-Field: 1\nContact:"), NOW)
        self.assertIn("[Server] New-Field: unknown key ignored", desc.warnings[0])

    def test_section_of_other_version_skipped(self) -> None:
        text = self.edited("[Delivery/MBOX]\nVersion: 0.1", "[Delivery/MBOX]\nVersion: 0.2\nNew: x")
        desc = parse_descriptor(text, NOW)
        self.assertNotIn("mbox", desc.capabilities)
        self.assertIsNone(desc.mbox)
        self.assertIn("[Delivery/MBOX] Version is '0.2', not 0.1; section ignored", desc.warnings[0])

    def test_incoming_of_other_version_skipped(self) -> None:
        desc = parse_descriptor(self.edited("Version: 0.1\nIP:", "Version: 0.9\nIP:"), NOW)
        self.assertIsNone(desc.routing_info)
        self.assertEqual(desc.capabilities, frozenset())

    def test_descriptor_version(self) -> None:
        self.reject(self.edited("Descriptor-Version: 0.2", "Descriptor-Version: 0.3"),
                    "line 2: [Server] Descriptor-Version is '0.3', not 0.2", cls=UnsupportedVersion)

    def test_server_must_come_first(self) -> None:
        self.reject(resign("[Future]\nX: y\n" + self.text), "must start with [Server]")

    def test_blank_line(self) -> None:
        self.reject(self.text.replace("[Incoming/MMTP]", "\n[Incoming/MMTP]"), "blank line")

    def test_comment(self) -> None:
        self.reject(self.text.replace("[Incoming/MMTP]", "# hi\n[Incoming/MMTP]"), "comment")

    def test_non_ascii(self) -> None:
        self.reject(self.text.replace("Test server", "T\u00e9st server"), "character 0xe9 is not allowed")
        self.reject(self.text.encode("ascii").replace(b"Test", b"T\xffst"), "character 0xff")

    def test_empty(self) -> None:
        self.reject("", "empty")
        self.reject("\n", "empty")

    def test_line_without_colon(self) -> None:
        self.reject(self.text.replace("[Outgoing/MMTP]", "garbage\n[Outgoing/MMTP]"), "expected 'Key: value'")

    def test_repeated_section(self) -> None:
        self.reject(resign(self.text + "[Outgoing/MMTP]\nVersion: 0.1\nProtocols: 0.3\n"),
                    "section [Outgoing/MMTP] repeated")

    def test_malformed_section_header(self) -> None:
        self.reject(self.text.replace("[Outgoing/MMTP]", "[Outgoing/MMTP"), "malformed section header")

    def test_lengths(self) -> None:
        self.reject(self.edited("Contact: quince-admin@example.org", "Contact: " + "c" * 257),
                    "[Server] Contact: 257 characters long; at most 256 allowed")
        self.reject(self.edited("Comments: Test server; do not use.", "Comments: " + "c" * 1025),
                    "Comments: 1025 characters long; at most 1024")
        self.reject(self.edited("Contact-Fingerprint: ABCD 1234", "Contact-Fingerprint: " + "f" * 129),
                    "Contact-Fingerprint: 129 characters long; at most 128")
        parse_descriptor(self.edited("Contact: quince-admin@example.org", "Contact: " + "c" * 256), NOW)

    def test_dates(self) -> None:
        self.reject(self.edited("Valid-After: 2024-01-15", "Valid-After: 2024-1-15"), "is not a date")
        self.reject(self.edited("Valid-After: 2024-01-15", "Valid-After: 2024-02-30"), "is not a calendar date")
        self.reject(self.edited("Valid-After: 2024-01-15", "Valid-After: 2024/01-15"), "is not a date")
        self.reject(self.edited("Valid-After: 2024-01-15", "Valid-After: 1969-12-31"), "year before 1970")
        desc = parse_descriptor(self.edited("Valid-After: 2024-01-15", "Valid-After: 2024/01/15"), NOW)
        self.assertEqual(desc.valid_after, VALID_AFTER)

    def test_times(self) -> None:
        self.reject(self.edited("Published: 2024-01-15 12:30:00", "Published: 2024-01-15"), "is not a time")
        self.reject(self.edited("Published: 2024-01-15 12:30:00", "Published: 2024-01-15 24:00:00"),
                    "time of day out of range")
        desc = parse_descriptor(
            self.edited("Published: 2024-01-15 12:30:00", "Published: 2024-01-15 12:30:00.250"), NOW
        )
        self.assertEqual(desc.published, PUBLISHED)

    def test_port(self) -> None:
        self.reject(self.edited("Port: 48099", "Port: 0"), "[Incoming/MMTP] Port: 0 is out of range")
        self.reject(self.edited("Port: 48099", "Port: 65536"), "65536 is out of range")
        self.reject(self.edited("Port: 48099", "Port: -1"), "'-1' is not a decimal integer")

    def test_hostname(self) -> None:
        for host in (".lead.dot", "a..b", "under_score.net", "x" * 256):
            self.reject(self.edited("Hostname: Quince.Example.NET", f"Hostname: {host}"),
                        "[Incoming/MMTP] Hostname:", "is not a hostname")

    def test_ip(self) -> None:
        self.reject(self.edited("IP: 192.0.2.7", "IP: 192.0.2.256"), "is not a dotted-quad IPv4 address")

    def test_address_rules(self) -> None:
        self.reject(self.edited("Allow: * 48099", "Allow: */255.0.0.0"), "'*' cannot take a mask")
        self.reject(self.edited("Allow: * 48099", "Allow: * 9-8"), "empty port range")
        self.reject(self.edited("Allow: * 48099", "Allow: nowhere"), "is not an address rule")

    def test_boolean(self) -> None:
        self.reject(self.edited("Allow-From: no", "Allow-From: maybe"), "'maybe' is not a boolean")
        desc = parse_descriptor(self.edited("Allow-From: no", "Allow-From: TRUE"), NOW)
        assert desc.mbox is not None
        self.assertTrue(desc.mbox.allow_from)

    def test_base64_ignores_stray_characters(self) -> None:
        digest = parse_descriptor(self.text, NOW).digest
        b64 = tf.encode_base64(digest)
        desc = parse_descriptor(replace_line(self.text, b64, b64[:4] + "!" + b64[4:]), NOW)
        self.assertEqual(desc.digest, digest)


class BuilderTests(unittest.TestCase):
    def test_dates_must_be_midnight(self) -> None:
        exc = self.assertRaises(
            BuildError, build_descriptor, full_fields(valid_after=VALID_AFTER + 5), identity(), fixed_rng
        )
        self.assertIn("valid_after", str(exc))

    def test_no_line_injection(self) -> None:
        exc = self.assertRaises(
            BuildError, build_descriptor, full_fields(comments="hi\n[Delivery/MBOX]"), identity(), fixed_rng
        )
        self.assertIn("one line of printing ASCII", str(exc))

    def test_no_surrounding_blanks(self) -> None:
        self.assertRaises(BuildError, build_descriptor, full_fields(contact=" x@y "), identity(), fixed_rng)

    def test_value_that_would_read_back_differently(self) -> None:
        exc = self.assertRaises(
            BuildError, build_descriptor, full_fields(packet_versions=("0.3, 0.4",)), identity(), fixed_rng
        )
        self.assertIn("packet_versions would read back as", str(exc))

    def test_rejected_by_parser(self) -> None:
        exc = self.assertRaises(
            BuildError, build_descriptor, full_fields(contact="c" * 257), identity(), fixed_rng
        )
        self.assertIn("Contact: 257 characters long", str(exc))

    def test_regenerate_from_parsed(self) -> None:
        """A server re-signs the same content with a new Published time."""
        desc = parse_descriptor(build_descriptor(full_fields(), identity(), fixed_rng), NOW)
        newer = dataclasses.replace(desc.to_fields(), published=PUBLISHED + 3600)
        again = parse_descriptor(build_descriptor(newer, identity(), fixed_rng), NOW)
        self.assertEqual(again.published, PUBLISHED + 3600)
        self.assertNotEqual(again.digest, desc.digest)


class TextFormatTests(unittest.TestCase):
    def test_format_date_uses_t_plus_one(self) -> None:
        self.assertEqual(tf.format_date(VALID_AFTER), "2024-01-15")
        self.assertEqual(tf.format_date(VALID_AFTER + 5), "2024-01-15")
        self.assertEqual(tf.format_date(VALID_AFTER - 1), "2024-01-15")
        self.assertEqual(tf.format_date(VALID_AFTER - 2), "2024-01-14")

    def test_previous_midnight(self) -> None:
        self.assertEqual(tf.previous_midnight(PUBLISHED), VALID_AFTER)
        self.assertEqual(tf.previous_midnight(VALID_AFTER), VALID_AFTER)

    def test_list(self) -> None:
        self.assertEqual(tf.decode_list(" a , b,c "), ("a", "b", "c"))
        self.assertEqual(tf.decode_list(""), ("",))

    def test_section_header_spacing(self) -> None:
        sections = tf.parse_sections("[ Server ] trailing\nA: b\n")
        self.assertEqual(sections[0].name, "Server")
        self.assertEqual(sections[0].entries, (tf.Entry("A", "b", 2),))

    def test_strict_fields(self) -> None:
        section = tf.parse_sections("[Signed-Directory]\nX: 1\n")[0]
        exc = self.assertRaises(tf.TextFormatError, tf.read_fields, section, {}, strict=True)
        self.assertIn("line 2: [Signed-Directory] X: unknown key", str(exc))

    def test_sign_document_needs_both_lines(self) -> None:
        self.assertRaises(BuildError, tf.sign_document, "[A]\nDigest:\n", identity(), fixed_rng)

    def test_public_key_round_trip(self) -> None:
        pub = identity().public
        self.assertEqual(tf.load_public_key(pub.der, 256, 512), pub)
        self.assertIsInstance(pub, PublicKey)
