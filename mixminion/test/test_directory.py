"""Directories: legacy and multi-signed formats, threshold verification,
vote acceptance and consensus (descriptors.md §7, §8 step 7, §9)."""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Iterable, Sequence

from twisted.trial import unittest

from mixminion.codec.errors import BuildError, ParseError
from mixminion.codec import textformat as tf
from mixminion.directory.descriptor import (
    DescriptorFields,
    IncomingMMTP,
    ServerDescriptor,
    build_descriptor,
    parse_descriptor,
)
from mixminion.directory.directory import (
    SIG_BAD,
    SIG_DUPLICATE,
    SIG_NOT_VOTING,
    SIG_OTHER_DIGEST,
    SIG_UNTRUSTED,
    BadDirectoryDescriptor,
    BadSignatureBlock,
    ConsensusError,
    DirectoryError,
    DirectoryExpired,
    DirectoryInfo,
    DirectoryNotYetValid,
    LegacyDirectory,
    MalformedDirectory,
    NotEnoughSignatures,
    SignedDirectory,
    TamperedDirectory,
    UnsupportedDirectoryVersion,
    VoteRejected,
    VotingServer,
    add_signature_blocks,
    build_directory,
    is_superseded,
    parse_any_directory,
    parse_directory,
    parse_legacy_directory,
    sign_directory,
    signature_block,
    sort_versions,
    version_key,
)
from mixminion.directory.voting import accept_vote, compute_consensus, consensus_threshold
from mixminion.test.vectorkit import vectors_dir
from mixminion.testing.keys import key

DAY = 1706745600  # 2024-02-01, also the descriptor vectors' validate_at
ONE_DAY = 86400
NOW = DAY + 3600
DESC_AFTER = DAY - 10 * ONE_DAY
DESC_UNTIL = DAY + 20 * ONE_DAY
PUBLISHED = DAY - 5 * ONE_DAY + 43200
AUTHORITIES = ("auth-a", "auth-b", "auth-c")


def rng(n: int) -> bytes:
    return b"\x42" * n


def other_rng(n: int) -> bytes:
    return b"\x17" * n


def fp(name: str) -> str:
    return key(name).public.fingerprint


def url(name: str) -> str:
    return f"http://{name}.example.org/dir/"


def voting_servers(names: Iterable[str] = AUTHORITIES) -> tuple[VotingServer, ...]:
    return tuple(VotingServer(fp(n), url(n)) for n in names)


def voters(names: Iterable[str] = AUTHORITIES) -> dict[str, tuple[Any, str]]:
    return {fp(n): (key(n).public, url(n)) for n in names}


def trusted(names: Iterable[str] = AUTHORITIES) -> list[str]:
    return [fp(n) for n in names]


@functools.cache
def descriptor(
    nickname: str,
    server: str | None = None,
    published: int = PUBLISHED,
    valid_after: int = DESC_AFTER,
    valid_until: int = DESC_UNTIL,
    contact: str | None = None,
    signing_rng: Any = rng,
) -> ServerDescriptor:
    fields = DescriptorFields(
        nickname=nickname,
        contact=contact or f"{nickname.lower()}@example.org",
        packet_key=key("packet").public,
        published=published,
        valid_after=valid_after,
        valid_until=valid_until,
        incoming=IncomingMMTP(hostname=f"{nickname.lower()}.example.net"),
    )
    text = build_descriptor(fields, key(server or f"srv-{nickname.lower()}"), signing_rng)
    return parse_descriptor(text, published, check_validity=False)


def standard_descriptors() -> list[ServerDescriptor]:
    return [descriptor("Cedar"), descriptor("alder"), descriptor("Birch")]


def info(**changes: Any) -> DirectoryInfo:
    base = DirectoryInfo(
        status="consensus",
        valid_after=DAY,
        valid_until=DAY + ONE_DAY,
        recommended_nicknames=("Birch", "alder"),
        voting_servers=tuple(reversed(voting_servers())),
        client_versions=("0.0.8", "0.0.8alpha3"),
        server_versions=("0.0.9", "0.0.8rc1"),
    )
    return dataclasses.replace(base, **changes)


def sign_by(text: str, names: Iterable[str]) -> str:
    for name in names:
        text = sign_directory(text, key(name), rng)
    return text


def signed_directory(
    names: Iterable[str] = ("auth-a", "auth-b"),
    descriptors: Sequence[ServerDescriptor] | None = None,
    **changes: Any,
) -> str:
    unsigned = build_directory(info(**changes), standard_descriptors() if descriptors is None else descriptors)
    return sign_by(unsigned, names)


def parse(text: str | bytes, now: float = NOW, threshold: int = 2, **kw: Any) -> SignedDirectory:
    kw.setdefault("trusted", trusted())
    return parse_directory(text, now, threshold=threshold, **kw)


def replace_once(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def body_of(text: str) -> str:
    return text[text.index("[Directory-Info]\n") :]


def unsigned_edit(signed: str, old: str, new: str) -> str:
    """Edit the signed body and drop the signatures, ready to sign again."""
    return replace_once(body_of(signed), old, new)


# --- building ------------------------------------------------------------------------------


class BuildTests(unittest.TestCase):
    """Producer rules of §7.2."""

    def test_info_text(self) -> None:
        text = build_directory(info(), [])
        servers = sorted(voting_servers())
        expected = (
            "[Directory-Info]\n"
            "Version: 0.3\n"
            "Status: consensus\n"
            "Valid-After: 2024-02-01\n"
            "Valid-Until: 2024-02-02\n"
            "Recommended-Servers: alder, birch\n"
            + "".join(f"Voting-Server: {v.fingerprint} {v.url}\n" for v in servers)
            + "[Recommended-Software]\n"
            "MixminionClient: 0.0.8alpha3, 0.0.8\n"
            "MixminionServer: 0.0.8rc1, 0.0.9\n"
        )
        self.assertEqual(text, expected)

    def test_descriptors_sorted_and_verbatim(self) -> None:
        descs = standard_descriptors() + [descriptor("Alder", "srv-alder", valid_after=DESC_AFTER - ONE_DAY)]
        text = build_directory(info(), descs)
        positions = [text.index(tf.clean(d.text)) for d in descs]
        # alder (earlier Valid-After first), alder, birch, cedar
        self.assertEqual(sorted(range(4), key=lambda i: positions[i]), [3, 1, 2, 0])
        self.assertEqual(text, build_directory(info(), list(reversed(descs))))

    def test_duplicate_descriptor_once(self) -> None:
        text = build_directory(info(), [descriptor("alder"), descriptor("alder")])
        self.assertEqual(text.count("[Server]\n"), 1)

    def test_resigned_copy_chosen_deterministically(self) -> None:
        first, second = descriptor("alder"), descriptor("alder", signing_rng=other_rng)
        self.assertEqual(first.digest, second.digest)
        self.assertNotEqual(first.text, second.text)
        self.assertEqual(build_directory(info(), [first, second]), build_directory(info(), [second, first]))

    def test_version_order(self) -> None:
        versions = ["1.0", "0.0.8", "0.0.8rc2", "0.0.8alpha3", "0.0.10", "0.0.8beta1", "0.0.8pre1", "0.0.8.1", "0.0.8alpha10"]
        self.assertEqual(
            sort_versions(versions),
            ("0.0.8alpha3", "0.0.8alpha10", "0.0.8beta1", "0.0.8pre1", "0.0.8rc2", "0.0.8", "0.0.8.1", "0.0.10", "1.0"),
        )
        self.assertLess(version_key("99.0.0"), version_key("weird"))

    def test_refuses_bad_info(self) -> None:
        for changes in (
            {"valid_after": DAY + 5},
            {"valid_until": DAY},
            {"status": "draft"},
            {"voting_servers": ()},
            {"voting_servers": (VotingServer("1234", "http://x/"),)},
            {"voting_servers": (VotingServer(fp("auth-a"), "http://x y/"),)},
            {"recommended_nicknames": ("not a nick",)},
            {"client_versions": ("0.1, 0.2",)},
            {"client_versions": (" 0.1",)},
            {"client_versions": ("",)},
        ):
            self.assertRaises(BuildError, build_directory, info(**changes), [])

    def test_round_trip(self) -> None:
        text = signed_directory()
        directory = parse(text)
        normal = info(
            recommended_nicknames=("alder", "birch"),
            voting_servers=tuple(sorted(voting_servers())),
            client_versions=("0.0.8alpha3", "0.0.8"),
            server_versions=("0.0.8rc1", "0.0.9"),
        )
        self.assertEqual(directory.info, normal)
        self.assertEqual([d.nickname for d in directory.descriptors], ["alder", "Birch", "Cedar"])
        self.assertEqual(set(directory.descriptors), set(standard_descriptors()))
        self.assertEqual(directory.signers, tuple(sorted([fp("auth-a"), fp("auth-b")])))
        self.assertEqual(directory.text, text)
        self.assertEqual(directory.warnings, ())
        self.assertEqual(directory.digest, tf.sha1(body_of(text).encode()))
        self.assertEqual([d.nickname for d in directory.recommended_servers()], ["alder", "Birch"])
        self.assertEqual(directory.descriptors_for("CEDAR"), [descriptor("Cedar")])
        self.assertEqual(directory.descriptors_for("nobody"), [])

    def test_empty_lists_round_trip(self) -> None:
        empty = info(recommended_nicknames=(), client_versions=(), server_versions=())
        directory = parse(sign_by(build_directory(empty, []), AUTHORITIES))
        self.assertEqual(directory.info.recommended_nicknames, ())
        self.assertEqual(directory.info.client_versions, ())
        self.assertEqual(directory.descriptors, ())


class SigningTests(unittest.TestCase):
    """Signature blocks are outside the digest: sign independently, merge."""

    def test_independent_signatures_merge(self) -> None:
        unsigned = build_directory(info(), standard_descriptors())
        blocks = {n: signature_block(unsigned, key(n), rng) for n in AUTHORITIES}
        one = add_signature_blocks(unsigned, [blocks["auth-a"], blocks["auth-b"], blocks["auth-c"]])
        two = add_signature_blocks(sign_directory(unsigned, key("auth-c"), rng), [blocks["auth-b"], blocks["auth-a"]])
        self.assertEqual(one, two)
        self.assertEqual(one.count("[Signed-Directory]\n"), 3)
        self.assertEqual(len(parse(one, threshold=3).signers), 3)

    def test_signing_twice_is_idempotent(self) -> None:
        once = signed_directory(("auth-a",))
        self.assertEqual(sign_directory(once, key("auth-a"), other_rng), once)

    def test_block_for_other_text_refused(self) -> None:
        unsigned = build_directory(info(), standard_descriptors())
        other = build_directory(info(recommended_nicknames=()), standard_descriptors())
        block = signature_block(other, key("auth-b"), rng)
        self.assertRaises(BadSignatureBlock, add_signature_blocks, unsigned, [block])

    def test_malformed_block_refused(self) -> None:
        unsigned = build_directory(info(), [])
        block = signature_block(unsigned, key("auth-b"), rng) + "Extra: field\n"
        self.assertRaises(MalformedDirectory, add_signature_blocks, unsigned, [block])


# --- threshold verification --------------------------------------------------------------------------


def forged_block(claimed: str, actual: str, digest: bytes) -> str:
    """A block naming ``claimed``'s key but signed by ``actual``."""
    return tf.render_document([("Signed-Directory", [
        tf.Line("Directory-Identity", tf.encode_base64(key(claimed).public.der)),
        tf.Line("Directory-Digest", tf.encode_base64(digest)),
        tf.Line("Directory-Signature", tf.encode_base64(key(actual).sign(digest, rng))),
    ])])


class ThresholdTests(unittest.TestCase):
    """§8 step 7 as fixed: threshold distinct trusted Voting-Server signers."""

    def test_two_of_three(self) -> None:
        self.assertEqual(len(parse(signed_directory(("auth-b", "auth-c"))).signers), 2)

    def test_one_of_three(self) -> None:
        exc = self.assertRaises(NotEnoughSignatures, parse, signed_directory(("auth-a",)))
        self.assertNotIsInstance(exc, TamperedDirectory)
        self.assertIn("1 valid signature(s)", str(exc))
        self.assertIn("2 required", str(exc))
        self.assertEqual(exc.valid, (fp("auth-a"),))

    def test_unsigned(self) -> None:
        exc = self.assertRaises(NotEnoughSignatures, parse, build_directory(info(), []), threshold=1)
        self.assertIn("no signature", str(exc))

    def test_threshold_must_be_positive(self) -> None:
        self.assertRaises(ValueError, parse, build_directory(info(), []), threshold=0)

    def test_untrusted_signer_not_counted(self) -> None:
        servers = voting_servers(AUTHORITIES + ("outsider",))
        text = signed_directory(("auth-a", "outsider"), voting_servers=servers)
        exc = self.assertRaises(NotEnoughSignatures, parse, text)
        self.assertEqual([(c.fingerprint, c.status) for c in exc.rejected], [(fp("outsider"), SIG_UNTRUSTED)])
        self.assertIn(f"{fp('outsider')}: not a trusted authority", str(exc))
        self.assertEqual(len(parse(text, trusted=trusted(AUTHORITIES + ("outsider",))).signers), 2)

    def test_trusted_but_not_voting_not_counted(self) -> None:
        text = signed_directory(("auth-a", "auth-c"), voting_servers=voting_servers(("auth-a", "auth-b")))
        exc = self.assertRaises(NotEnoughSignatures, parse, text)
        self.assertEqual([c.status for c in exc.rejected], [SIG_NOT_VOTING])

    def test_same_key_twice_counts_once(self) -> None:
        unsigned = build_directory(info(), standard_descriptors())
        text = signature_block(unsigned, key("auth-a"), rng) + signature_block(unsigned, key("auth-a"), other_rng) + unsigned
        exc = self.assertRaises(NotEnoughSignatures, parse, text)
        self.assertEqual([c.status for c in exc.rejected], [SIG_DUPLICATE])
        self.assertEqual(parse(text, threshold=1).signers, (fp("auth-a"),))

    def test_wrong_key(self) -> None:
        unsigned = build_directory(info(), standard_descriptors())
        digest = tf.sha1(unsigned.encode())
        text = forged_block("auth-b", "auth-c", digest) + signature_block(unsigned, key("auth-a"), rng) + unsigned
        exc = self.assertRaises(NotEnoughSignatures, parse, text)
        self.assertEqual([(c.fingerprint, c.status) for c in exc.rejected], [(fp("auth-b"), SIG_BAD)])
        self.assertIn("signature does not verify", str(exc))

    def test_trusted_keys_mapping(self) -> None:
        text = signed_directory()
        keys = {fp(n): key(n).public for n in AUTHORITIES}
        self.assertEqual(len(parse(text, trusted=keys).signers), 2)
        wrong = {fp("auth-a"): key("auth-b").public}
        self.assertRaises(ValueError, parse, text, trusted=wrong)

    def test_fingerprints_with_spaces_and_lower_case(self) -> None:
        spaced = [" ".join(f[i : i + 4] for i in range(0, 40, 4)).lower() for f in trusted()]
        self.assertEqual(len(parse(signed_directory(), trusted=spaced).signers), 2)

    def test_errors_are_parse_errors(self) -> None:
        for error in (NotEnoughSignatures, TamperedDirectory, DirectoryExpired, MalformedDirectory, BadDirectoryDescriptor, VoteRejected):
            self.assertTrue(issubclass(error, DirectoryError) and issubclass(error, ParseError))


class ValidityTests(unittest.TestCase):
    """Directory dates are checked (the reference never did, §10 item 2)."""

    def test_expired(self) -> None:
        exc = self.assertRaises(DirectoryExpired, parse, signed_directory(), now=DAY + ONE_DAY + 1)
        self.assertIn("expired at 2024-02-02", str(exc))

    def test_not_yet_valid(self) -> None:
        exc = self.assertRaises(DirectoryNotYetValid, parse, signed_directory(), now=DAY - 1)
        self.assertIn("not valid before 2024-02-01", str(exc))

    def test_closed_interval(self) -> None:
        parse(signed_directory(), now=DAY)
        parse(signed_directory(), now=DAY + ONE_DAY)

    def test_unchecked(self) -> None:
        parse(signed_directory(), now=DAY + 5 * ONE_DAY, check_validity=False)

    def test_forged_expired_reports_signatures_first(self) -> None:
        self.assertRaises(NotEnoughSignatures, parse, signed_directory(("auth-a",)), now=DAY + 5 * ONE_DAY)


class TamperTests(unittest.TestCase):
    """A changed byte anywhere in the body voids every signature."""

    def test_changed_descriptor(self) -> None:
        text = replace_once(signed_directory(), "Contact: birch@example.org", "Contact: birch@example.com")
        exc = self.assertRaises(TamperedDirectory, parse, text)
        self.assertIsInstance(exc, NotEnoughSignatures)
        self.assertEqual({c.status for c in exc.rejected}, {SIG_OTHER_DIGEST})
        self.assertIn("changed after", str(exc))

    def test_changed_info(self) -> None:
        text = replace_once(signed_directory(), "Recommended-Servers: alder, birch", "Recommended-Servers: alder, birch, cedar")
        self.assertRaises(TamperedDirectory, parse, text)

    def test_bad_descriptor_signed_by_authorities(self) -> None:
        edited = unsigned_edit(signed_directory(), "Contact: birch@example.org", "Contact: birch@example.com")
        exc = self.assertRaises(BadDirectoryDescriptor, parse, sign_by(edited, ("auth-a", "auth-b")))
        self.assertIn("'Birch'", str(exc))
        self.assertIn("Digest", str(exc))
        self.assertEqual((exc.index, exc.nickname), (2, "Birch"))

    def test_verified_digests_still_check_descriptor_digest(self) -> None:
        edited = unsigned_edit(signed_directory(), "Contact: birch@example.org", "Contact: birch@example.com")
        digests = {d.digest for d in standard_descriptors()}
        self.assertRaises(BadDirectoryDescriptor, parse, sign_by(edited, ("auth-a", "auth-b")), verified_digests=digests)


class ManglingTests(unittest.TestCase):
    """§9: line endings and indentation do not matter; inserted lines do."""

    def test_crlf(self) -> None:
        parse(signed_directory().replace("\n", "\r\n"))

    def test_lone_cr(self) -> None:
        parse(signed_directory().replace("\n", "\r"))

    def test_reindented(self) -> None:
        lines = signed_directory().split("\n")
        mangled = "\n".join(("  " if i % 2 else "\t") + line + (" \t" if i % 3 else "") for i, line in enumerate(lines) if line)
        directory = parse(mangled.encode("ascii"))
        self.assertEqual(len(directory.descriptors), 3)
        self.assertEqual(directory.text, signed_directory())

    def test_inserted_line(self) -> None:
        text = replace_once(signed_directory(), "Status: consensus\n", "Status: consensus\nExtra: line\n")
        self.assertRaises(TamperedDirectory, parse, text)

    def test_inserted_blank_line(self) -> None:
        text = replace_once(signed_directory(), "Status: consensus\n", "Status: consensus\n\n")
        self.assertRaises(MalformedDirectory, parse, text)


class MalformedTests(unittest.TestCase):
    def resigned(self, old: str, new: str) -> str:
        return sign_by(unsigned_edit(signed_directory(), old, new), ("auth-a", "auth-b"))

    def test_unknown_info_key_tolerated(self) -> None:
        directory = parse(self.resigned("Status: consensus\n", "Status: consensus\nFuture-Field: 1\n"))
        self.assertEqual(len(directory.warnings), 1)
        self.assertIn("Future-Field", directory.warnings[0])

    def test_unknown_signature_key_fatal(self) -> None:
        text = replace_once(signed_directory(), "Directory-Signature:", "Surprise: 1\nDirectory-Signature:")
        self.assertRaises(MalformedDirectory, parse, text)

    def test_extra_section_in_signature_block_fatal(self) -> None:
        text = replace_once(signed_directory(), "[Directory-Info]\n", "[Other]\nA: b\n[Directory-Info]\n")
        self.assertRaises(MalformedDirectory, parse, text)

    def test_short_digest_in_block(self) -> None:
        text = signed_directory(("auth-a",))
        start = text.index("Directory-Digest: ") + len("Directory-Digest: ")
        end = text.index("\n", start)
        self.assertRaises(MalformedDirectory, parse, text[:start] + "AAAA" + text[end:])

    def test_version(self) -> None:
        exc = self.assertRaises(UnsupportedDirectoryVersion, parse, self.resigned("Version: 0.3", "Version: 0.4"))
        self.assertIn("0.4", str(exc))

    def test_status(self) -> None:
        self.assertRaises(MalformedDirectory, parse, self.resigned("Status: consensus", "Status: draft"))

    def test_recommended_must_be_nicknames(self) -> None:
        text = self.resigned("Recommended-Servers: alder, birch", "Recommended-Servers: alder, b!rch")
        self.assertRaises(MalformedDirectory, parse, text)

    def test_dates_out_of_order(self) -> None:
        self.assertRaises(MalformedDirectory, parse, self.resigned("Valid-Until: 2024-02-02", "Valid-Until: 2024-02-01"))

    def test_voting_server_syntax(self) -> None:
        line = f"Voting-Server: {sorted(voting_servers())[0].fingerprint}"
        self.assertRaises(MalformedDirectory, parse, self.resigned(line, line[:-2]))

    def test_no_voting_server(self) -> None:
        text = body_of(signed_directory())
        text = "".join(line + "\n" for line in text.splitlines() if not line.startswith("Voting-Server"))
        self.assertRaises(MalformedDirectory, parse, text, threshold=1)

    def test_wrong_start(self) -> None:
        self.assertRaises(MalformedDirectory, parse, "[Directory-Stuff]\nA: b\n")
        self.assertRaises(MalformedDirectory, parse, signature_block(build_directory(info(), []), key("auth-a"), rng))

    def test_not_ascii(self) -> None:
        self.assertRaises(MalformedDirectory, parse, signed_directory().replace("alder, birch", "alder, b\xefrch"))


# --- vote acceptance ---------------------------------------------------------------------------------


def vote_text(signer: str, descriptors: Sequence[ServerDescriptor] | None = None, **changes: Any) -> str:
    changes.setdefault("status", "vote")
    return signed_directory((signer,), descriptors, **changes)


class VoteAcceptanceTests(unittest.TestCase):
    """Every rule of §7.2 "Vote acceptance", one at a time."""

    def accept(self, text: str, valid_after: int = DAY) -> SignedDirectory:
        return accept_vote(text, voters(), valid_after, NOW)

    def rejected(self, text: str, fragment: str) -> VoteRejected:
        exc = self.assertRaises(VoteRejected, self.accept, text)
        self.assertIn(fragment, str(exc))
        return exc

    def resigned(self, old: str, new: str, signer: str = "auth-b") -> str:
        return sign_by(unsigned_edit(vote_text(signer), old, new), (signer,))

    def test_good_vote(self) -> None:
        vote = self.accept(vote_text("auth-b"))
        self.assertEqual(vote.signers, (fp("auth-b"),))
        self.assertEqual(vote.status, "vote")
        self.accept(vote_text("auth-b"), valid_after=DAY + 3600)  # the expected day, not the instant

    def test_two_signatures(self) -> None:
        self.rejected(sign_directory(vote_text("auth-b"), key("auth-a"), rng), "exactly one signature; this one has 2")

    def test_no_signature(self) -> None:
        self.rejected(build_directory(info(status="vote"), []), "this one has 0")

    def test_signed_by_non_voter(self) -> None:
        exc = self.rejected(vote_text("outsider"), "not a trusted authority")
        self.assertIsInstance(exc.__cause__, NotEnoughSignatures)

    def test_bad_signature(self) -> None:
        unsigned = build_directory(info(status="vote"), [])
        self.rejected(forged_block("auth-b", "auth-c", tf.sha1(unsigned.encode())) + unsigned, "does not verify")

    def test_tampered(self) -> None:
        self.rejected(replace_once(vote_text("auth-b"), "alder, birch", "alder"), "altered after signing")

    def test_version(self) -> None:
        self.rejected(self.resigned("Version: 0.3", "Version: 0.2"), "Version is '0.2'")

    def test_status(self) -> None:
        self.rejected(vote_text("auth-b", status="consensus"), "not 'vote'")

    def test_voting_servers_not_sorted(self) -> None:
        servers = sorted(voting_servers())
        first, second = (f"Voting-Server: {v.fingerprint} {v.url}\n" for v in servers[:2])
        self.rejected(self.resigned(first + second, second + first), "not sorted")

    def test_voting_servers_differ(self) -> None:
        self.rejected(vote_text("auth-b", voting_servers=voting_servers(("auth-a", "auth-b"))), "missing")
        changed = tuple(VotingServer(v.fingerprint, v.url + "x") for v in voting_servers())
        self.rejected(vote_text("auth-b", voting_servers=changed), "unexpected")
        more = voting_servers(AUTHORITIES + ("outsider",))
        self.rejected(vote_text("auth-b", voting_servers=more), f"unexpected {fp('outsider')}")

    def test_valid_after(self) -> None:
        self.rejected(vote_text("auth-b", valid_after=DAY + ONE_DAY, valid_until=DAY + 2 * ONE_DAY), "expected 2024-02-01")

    def test_valid_until(self) -> None:
        self.rejected(vote_text("auth-b", valid_until=DAY + 2 * ONE_DAY), "one day after")

    def test_versions_not_sorted(self) -> None:
        self.rejected(self.resigned("MixminionClient: 0.0.8alpha3, 0.0.8", "MixminionClient: 0.0.8, 0.0.8alpha3"), "MixminionClient")
        self.rejected(self.resigned("MixminionServer: 0.0.8rc1, 0.0.9", "MixminionServer: 0.0.9, 0.0.8rc1"), "MixminionServer")

    def test_descriptors_not_sorted(self) -> None:
        body = body_of(vote_text("auth-b"))
        first = body.index("[Server]\n")
        head, parts = body[:first], body[first:].split("[Server]\n")[1:]
        swapped = head + "".join("[Server]\n" + p for p in reversed(parts))
        self.rejected(sign_by(swapped, ("auth-b",)), "descriptors are not sorted")

    def test_bad_descriptor(self) -> None:
        edited = unsigned_edit(vote_text("auth-b"), "Contact: cedar@example.org", "Contact: cedar@example.com")
        self.rejected(sign_by(edited, ("auth-b",)), "'Cedar'")


# --- consensus ------------------------------------------------------------------------------------------


def accepted(signer: str, descriptors: Sequence[ServerDescriptor], **changes: Any) -> SignedDirectory:
    return accept_vote(vote_text(signer, descriptors, **changes), voters(), DAY, NOW)


def consensus_text(votes: Sequence[SignedDirectory], names: Iterable[str] = AUTHORITIES) -> str:
    return build_directory(*compute_consensus(votes, voters(names), DAY))


class ConsensusTests(unittest.TestCase):
    """§7.2 "Consensus computation" steps 1-4, and determinism."""

    def test_threshold(self) -> None:
        self.assertEqual([consensus_threshold(n) for n in (1, 2, 3, 4, 5, 6, 7)], [1, 1, 2, 2, 3, 3, 4])

    def test_items_by_threshold(self) -> None:
        # Every vote carries all three servers, so only step 2's count decides
        # the recommendations (damson: 1 vote of 3, below the threshold of 2).
        carried = [descriptor("alder"), descriptor("Birch"), descriptor("damson")]
        votes = [
            accepted("auth-a", carried, recommended_nicknames=("Alder", "birch", "damson"), client_versions=("0.0.8", "0.0.9"), server_versions=("0.0.9",)),
            accepted("auth-b", carried, recommended_nicknames=("alder", "Birch"), client_versions=("0.0.8",), server_versions=()),
            accepted("auth-c", carried, recommended_nicknames=("alder",), client_versions=("0.0.8", "0.0.9", "1.0"), server_versions=("0.0.9", "1.0")),
        ]
        info_, descs = compute_consensus(votes, voters(), DAY)
        self.assertEqual(info_.status, "consensus")
        self.assertEqual((info_.valid_after, info_.valid_until), (DAY, DAY + ONE_DAY))
        self.assertEqual(info_.recommended_nicknames, ("alder", "birch"))
        self.assertEqual(info_.client_versions, ("0.0.8", "0.0.9"))
        self.assertEqual(info_.server_versions, ("0.0.9",))
        self.assertEqual(info_.voting_servers, tuple(sorted(voting_servers())))
        self.assertEqual(descs, carried)

    def test_recommends_only_carried_servers(self) -> None:
        """Deviation from §7.2 step 2 (doc/decisions-directory.md): a nickname
        every vote recommends is still left out of Recommended-Servers when
        the consensus carries no descriptor for it."""
        alder = descriptor("alder")
        damson = descriptor("Damson")  # in one vote only: identity below the threshold
        cedar, rogue = descriptor("Cedar"), descriptor("Rogue", "srv-cedar")  # one identity, two nicknames
        elm = descriptor("Elm", valid_after=DAY - 40 * ONE_DAY, valid_until=DAY - ONE_DAY)  # expired
        names = ("alder", "cedar", "damson", "elm", "ghost")  # ghost: no descriptor anywhere
        votes = [
            accepted("auth-a", [alder, cedar, damson, elm], recommended_nicknames=names),
            accepted("auth-b", [alder, cedar, elm], recommended_nicknames=names),
            accepted("auth-c", [alder, elm, rogue], recommended_nicknames=names),
        ]
        info_, descs = compute_consensus(votes, voters(), DAY)
        self.assertEqual(descs, [alder])
        self.assertEqual(info_.recommended_nicknames, ("alder",))
        directory = parse(sign_by(build_directory(info_, descs), ("auth-a", "auth-b")))
        self.assertIn("Recommended-Servers: alder\n", directory.text)
        self.assertEqual(directory.recommended_servers(), [alder])
        for name in ("cedar", "damson", "elm", "ghost"):
            self.assertFalse(directory.is_recommended(name), name)

    def test_doctored_vote_outvoted(self) -> None:
        alder, birch, cedar, damson = (descriptor(n) for n in ("alder", "Birch", "Cedar", "Damson"))
        votes = [
            accepted("auth-a", [alder, birch, cedar, damson]),  # damson: nobody else has it
            accepted("auth-b", [alder, birch]),
            accepted("auth-c", [alder, cedar]),
        ]
        _, descs = compute_consensus(votes, voters(), DAY)
        self.assertEqual(descs, [alder, birch, cedar])

    def test_four_voters_threshold_two(self) -> None:
        names = AUTHORITIES + ("auth-d",)
        alder, damson = descriptor("alder"), descriptor("Damson")
        votes = [
            accept_vote(vote_text(n, d, voting_servers=voting_servers(names)), voters(names), DAY, NOW)
            for n, d in (("auth-a", [alder, damson]), ("auth-b", [alder]))
        ]
        self.assertEqual(compute_consensus(votes, voters(names), DAY)[1], [alder])

    def test_inconsistent_nickname_excluded(self) -> None:
        cedar, rogue, alder = descriptor("Cedar"), descriptor("Rogue", "srv-cedar"), descriptor("alder")
        self.assertEqual(cedar.identity, rogue.identity)
        votes = [accepted("auth-a", [alder, cedar]), accepted("auth-b", [alder, cedar]), accepted("auth-c", [alder, rogue])]
        self.assertEqual(compute_consensus(votes, voters(), DAY)[1], [alder])

    def test_nickname_case_is_consistent(self) -> None:
        upper = descriptor("ALDER", "srv-alder", valid_after=DESC_UNTIL, valid_until=DESC_UNTIL + 10 * ONE_DAY)
        votes = [accepted("auth-a", [descriptor("alder")]), accepted("auth-b", [upper])]
        self.assertEqual(len(compute_consensus(votes, voters(), DAY)[1]), 2)

    def test_superseded_dropped(self) -> None:
        old = descriptor("alder")
        newer = descriptor("alder", published=PUBLISHED + ONE_DAY, contact="new@example.org")
        votes = [accepted("auth-a", [old]), accepted("auth-b", [newer]), accepted("auth-c", [old, newer])]
        self.assertEqual(compute_consensus(votes, voters(), DAY)[1], [newer])

    def test_partially_covered_kept(self) -> None:
        old = descriptor("alder")
        half = descriptor("alder", published=PUBLISHED + ONE_DAY, valid_until=DAY + 5 * ONE_DAY)
        votes = [accepted("auth-a", [old, half]), accepted("auth-b", [old, half])]
        self.assertEqual(set(compute_consensus(votes, voters(), DAY)[1]), {old, half})

    def test_expired_and_far_future_dropped(self) -> None:
        expired = descriptor("alder", valid_after=DAY - 40 * ONE_DAY, valid_until=DAY - ONE_DAY)
        edge = descriptor("alder", valid_after=DAY + 30 * ONE_DAY, valid_until=DAY + 60 * ONE_DAY)
        far = descriptor("alder", valid_after=DAY + 31 * ONE_DAY, valid_until=DAY + 60 * ONE_DAY, contact="far@example.org")
        ending_today = descriptor("alder", valid_after=DAY - 30 * ONE_DAY, valid_until=DAY, contact="x@example.org")
        descs = [expired, edge, far, ending_today]
        votes = [accepted("auth-a", descs), accepted("auth-b", descs)]
        self.assertEqual(compute_consensus(votes, voters(), DAY)[1], [ending_today, edge])

    def test_deterministic(self) -> None:
        alder2 = descriptor("alder", signing_rng=other_rng)  # same digest, other signature bytes
        votes = [
            accepted("auth-a", [descriptor("alder"), descriptor("Birch")], client_versions=("0.0.9", "0.0.8")),
            accepted("auth-b", [alder2, descriptor("Cedar")], client_versions=("0.0.8", "0.0.9")),
            accepted("auth-c", [descriptor("alder"), descriptor("Birch"), descriptor("Cedar")]),
        ]
        texts = {consensus_text(order) for order in (votes, votes[::-1], [votes[1], votes[2], votes[0]])}
        self.assertEqual(len(texts), 1)

    def test_refuses_unaccepted_votes(self) -> None:
        vote = accepted("auth-a", [])
        self.assertRaises(ConsensusError, compute_consensus, [vote, vote], voters(), DAY)
        self.assertRaises(ConsensusError, compute_consensus, [vote], voters(), DAY)  # 1 < threshold 2
        self.assertRaises(ConsensusError, compute_consensus, [vote, accepted("auth-b", [])], voters(), DAY + ONE_DAY)
        servers = voting_servers(AUTHORITIES + ("outsider",))
        foreign = parse(vote_text("outsider", [], voting_servers=servers), threshold=1, trusted=[fp("outsider")], check_validity=False)
        self.assertRaises(ConsensusError, compute_consensus, [vote, foreign], voters(), DAY)

    def test_full_exchange(self) -> None:
        """Three authorities vote, accept each other's votes, each computes
        and signs the consensus; a client needs two of the signatures."""
        views = {
            "auth-a": [descriptor("alder"), descriptor("Birch"), descriptor("Damson")],
            "auth-b": [descriptor("alder"), descriptor("Birch")],
            "auth-c": [descriptor("alder"), descriptor("Cedar")],
        }
        published = {n: vote_text(n, d) for n, d in views.items()}
        consensus = {}
        for me in AUTHORITIES:
            votes = [accept_vote(published[n], voters(), DAY, NOW) for n in reversed(AUTHORITIES)]
            consensus[me] = consensus_text(votes)
        self.assertEqual(len(set(consensus.values())), 1)
        blocks = [signature_block(consensus[n], key(n), rng) for n in AUTHORITIES]
        merged = add_signature_blocks(consensus["auth-c"], blocks[:2])
        directory = parse(merged, NOW)
        self.assertEqual(directory.status, "consensus")
        self.assertEqual([d.nickname for d in directory.descriptors], ["alder", "Birch"])
        self.assertEqual(directory.signers, tuple(sorted(fp(n) for n in ("auth-a", "auth-b"))))


class SupersessionTests(unittest.TestCase):
    """§5.5 interval arithmetic."""

    def test_rules(self) -> None:
        base = descriptor("alder")
        later_same = descriptor("alder", published=PUBLISHED + 60, contact="b@example.org")
        earlier = descriptor("alder", published=PUBLISHED - 60, contact="c@example.org")
        first_half = descriptor("alder", published=PUBLISHED + 60, valid_until=DAY, contact="d@example.org")
        second_half = descriptor("alder", published=PUBLISHED + 60, valid_after=DAY, contact="e@example.org")
        gap = descriptor("alder", published=PUBLISHED + 60, valid_after=DAY + ONE_DAY, contact="f@example.org")
        other_name = descriptor("Birch", published=PUBLISHED + 60, valid_after=DESC_AFTER)
        self.assertTrue(is_superseded(base, [later_same]))
        self.assertFalse(is_superseded(base, [base]))
        self.assertFalse(is_superseded(base, [earlier]))
        self.assertTrue(is_superseded(base, [first_half, second_half]))
        self.assertFalse(is_superseded(base, [first_half, gap]))
        self.assertFalse(is_superseded(base, [other_name]))


# --- legacy 0.2 -----------------------------------------------------------------------------------------


def legacy_text(
    descriptors: Sequence[ServerDescriptor] | None = None,
    signer: str = "auth-a",
    *,
    published: int = DAY,
    valid_after: int = DAY,
    valid_until: int = DAY + ONE_DAY,
    server_header: str = "[Server]",
) -> str:
    """A directory as the legacy generator wrote it (commit 889bfa2)."""
    header = (
        "[Directory]\nVersion: 0.2\n"
        f"Published: {tf.format_time(published)}\n"
        f"Valid-After: {tf.format_date(valid_after)}\nValid-Until: {tf.format_date(valid_until)}\n"
        "Recommended-Servers: alder, BIRCH\n"
        f"[Signature]\nDirectoryIdentity: {tf.encode_base64(key(signer).public.der)}\n"
        "DirectoryDigest:\nDirectorySignature:\n"
        "[Recommended-Software]\nMixminionClient: 0.0.7, 0.0.8alpha3\nMixminionServer: 0.0.8 0.0.9\n"
    )
    descs = standard_descriptors() if descriptors is None else descriptors
    body = "".join(tf.clean(d.text).replace("[Server]", server_header, 1) for d in descs)
    return tf.sign_document(header + body, key(signer), rng, "DirectoryDigest", "DirectorySignature")


class LegacyTests(unittest.TestCase):
    """§7.1 with the reference's gaps closed."""

    def parse(self, text: str, now: float = NOW, names: Iterable[str] = ("auth-a",), **kw: Any) -> LegacyDirectory:
        return parse_legacy_directory(text, now, trusted(names), **kw)

    def test_parses(self) -> None:
        directory = self.parse(legacy_text())
        self.assertEqual(directory.signers, (fp("auth-a"),))
        self.assertEqual(directory.client_versions, ("0.0.7", "0.0.8alpha3"))
        self.assertEqual(directory.server_versions, ("0.0.8", "0.0.9"))
        self.assertEqual([d.nickname for d in directory.recommended_servers()], ["alder", "Birch"])
        self.assertEqual(set(directory.descriptors), set(standard_descriptors()))
        self.assertEqual(directory.published, DAY)

    def test_spaced_server_header_split(self) -> None:
        directory = self.parse(legacy_text([descriptor("alder")], server_header="[ Server ]"))
        self.assertEqual(len(directory.descriptors), 1)

    def test_untrusted_signer(self) -> None:
        exc = self.assertRaises(NotEnoughSignatures, self.parse, legacy_text(signer="outsider"))
        self.assertIn("not a trusted authority", str(exc))

    def test_expired_and_not_yet_valid(self) -> None:
        self.assertRaises(DirectoryExpired, self.parse, legacy_text(), now=DAY + 2 * ONE_DAY)
        self.assertRaises(DirectoryNotYetValid, self.parse, legacy_text(), now=DAY - 60)
        self.parse(legacy_text(), now=DAY + 2 * ONE_DAY, check_validity=False)

    def test_published_in_future(self) -> None:
        text = legacy_text(published=DAY + 7200)
        self.assertRaises(DirectoryNotYetValid, self.parse, text, now=DAY + 3600, check_validity=False)

    def test_tampered(self) -> None:
        text = replace_once(legacy_text(), "Contact: birch@example.org", "Contact: birch@example.net")
        self.assertRaises(TamperedDirectory, self.parse, text)

    def test_bad_signature(self) -> None:
        text = legacy_text()
        start = text.index("DirectorySignature: ") + len("DirectorySignature: ")
        flipped = "B" if text[start] != "B" else "C"
        exc = self.assertRaises(NotEnoughSignatures, self.parse, text[:start] + flipped + text[start + 1 :])
        self.assertEqual(exc.rejected[0].status, SIG_BAD)

    def test_bad_descriptor(self) -> None:
        signed = legacy_text()
        unsigned = tf.blank_signature_lines(replace_once(signed, "Contact: cedar@example.org", "Contact: cedar@example.net"), "DirectoryDigest", "DirectorySignature")
        text = tf.sign_document(unsigned, key("auth-a"), rng, "DirectoryDigest", "DirectorySignature")
        exc = self.assertRaises(BadDirectoryDescriptor, self.parse, text)
        self.assertIn("'Cedar'", str(exc))

    def test_version(self) -> None:
        text = replace_once(legacy_text(), "Version: 0.2", "Version: 0.3")
        self.assertRaises(UnsupportedDirectoryVersion, self.parse, text)

    def test_crlf(self) -> None:
        self.parse(legacy_text().replace("\n", "\r\n"))

    def test_any_chooses_by_first_line(self) -> None:
        legacy = parse_any_directory(legacy_text(), NOW, trusted=trusted(), threshold=1)
        self.assertIsInstance(legacy, LegacyDirectory)
        modern = parse_any_directory(signed_directory(), NOW, trusted=trusted(), threshold=2)
        self.assertIsInstance(modern, SignedDirectory)
        self.assertEqual(len(modern.recommended_servers()), len(legacy.recommended_servers()))
        exc = self.assertRaises(NotEnoughSignatures, parse_any_directory, legacy_text(), NOW, trusted=trusted(), threshold=2)
        self.assertIn("legacy", str(exc))


# --- the descriptor vectors -------------------------------------------------------------------------------


class VectorTests(unittest.TestCase):
    """The shared descriptor vectors, embedded in a test-signed directory."""

    def setUp(self) -> None:
        self.data = json.loads((vectors_dir() / "descriptors.json").read_text())
        self.at = self.data["valid"][0]["validate_at"]

    def directory(self, texts: Sequence[str]) -> str:
        descs = [parse_descriptor(t, self.at, check_validity=False, verified_digests={tf.document_digest(t)}) for t in texts]
        return sign_by(build_directory(info(valid_after=tf.previous_midnight(self.at), valid_until=tf.previous_midnight(self.at) + ONE_DAY), descs), ("auth-a", "auth-c"))

    def test_valid_vectors(self) -> None:
        texts = [entry["text"] for entry in self.data["valid"]]
        directory = parse(self.directory(texts), now=self.at)
        self.assertEqual(sorted(d.digest.hex() for d in directory.descriptors), sorted(e["digest_hex"] for e in self.data["valid"]))
        for entry in self.data["valid"]:
            self.assertIn(entry["text"], directory.text)

    def test_invalid_vectors(self) -> None:
        good = self.data["valid"]
        for entry in self.data["invalid"]:
            original = next(g for g in good if g["text"].split("\n")[2] == entry["text"].split("\n")[2])
            text = self.directory([g["text"] for g in good])
            edited = sign_by(unsigned_edit(text, original["text"], entry["text"]), ("auth-a", "auth-c"))
            exc = self.assertRaises(BadDirectoryDescriptor, parse, edited, now=self.at)
            self.assertIn(entry["expected_error"].capitalize(), str(exc), entry["why"])
