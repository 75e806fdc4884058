"""Reliability formats (doc/reliability.md §2-§3): signed ping reports, an
authority's vote values, and the ``[Reliability]`` section of votes and
the consensus."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterable, Mapping, Sequence

from twisted.trial import unittest

from mixminion.codec import textformat as tf
from mixminion.codec.errors import BuildError, ParseError
from mixminion.directory.descriptor import (
    PUBLISHED_SKEW,
    DescriptorFields,
    IncomingMMTP,
    build_descriptor,
    parse_descriptor,
)
from mixminion.directory.directory import (
    MalformedDirectory,
    SignedDirectory,
    VoteRejected,
    build_directory,
    parse_legacy_directory,
)
from mixminion.directory.reliability import (
    BadReportDigest,
    BadReportSignature,
    MalformedReport,
    Measured,
    PingerInfo,
    PingReport,
    ReliabilitySettings,
    ReportError,
    ReportFields,
    ReportInFuture,
    ServerReliability,
    StaleReport,
    UnlistedPinger,
    UnsupportedReportVersion,
    accept_report,
    build_report,
    format_report,
    parse_report,
    vote_values,
)
from mixminion.directory.voting import accept_vote, compute_consensus
from mixminion.test.test_directory import (
    DAY,
    NOW,
    ONE_DAY,
    accepted,
    body_of,
    descriptor,
    fp,
    info,
    legacy_text,
    parse,
    rng,
    sign_by,
    standard_descriptors,
    unsigned_edit,
    vote_text,
    voters,
)
from mixminion.testing.keys import key

PUBLISHED = NOW - 60
START = PUBLISHED - 6 * 3600
HOUR = 3600
S1 = "1" * 40
S2 = "2" * 40


def measured(server: str, reliability: float, sent: int = 20, median_ms: int = 400) -> Measured:
    returned = round(sent * reliability)
    return Measured(server, sent, returned, reliability, median_ms if returned else 0, 2 * median_ms if returned else 0)


def fields(*lines: Measured, pinger: str = "Pinger", published: int = PUBLISHED, **changes: Any) -> ReportFields:
    base = ReportFields(pinger, published, START, published, lines or (measured(S2, 0.5), measured(S1, 0.987)))
    return dataclasses.replace(base, **changes)


def signed_edit(old: str, new: str, signer: str = "pinger") -> str:
    """A report whose text was edited before signing: only the edit is wrong."""
    unsigned = format_report(fields(), key(signer).public)
    assert old in unsigned, old
    return tf.sign_document(unsigned.replace(old, new, 1), key(signer), rng)


class ReportTests(unittest.TestCase):
    """§2: the report's text, signature and every refusal."""

    def refused(self, error: type[ReportError], text: str, fragment: str, now: float = NOW) -> None:
        exc = self.assertRaises(error, parse_report, text, now)
        self.assertIn(fragment, str(exc))
        self.assertNotIn("\n", str(exc))

    def test_text(self) -> None:
        text = build_report(fields(), key("pinger"), rng)
        lines = text.splitlines()
        self.assertEqual(lines[:7], [
            "[Ping-Report]",
            "Version: 0.1",
            "Pinger: Pinger",
            f"Identity: {tf.encode_base64(key('pinger').public.der)}",
            "Published: 2024-02-01 00:59:00",
            "Interval-Start: 2024-01-31 18:59:00",
            "Interval-End: 2024-02-01 00:59:00",
        ])
        self.assertEqual(lines[7:9], [f"Measured: {S1} 20 20 0.987 400 800", f"Measured: {S2} 20 10 0.500 400 800"])
        self.assertEqual([line.split(":")[0] for line in lines[9:]], ["Digest", "Signature"])

    def test_round_trip(self) -> None:
        report = parse_report(build_report(fields(), key("pinger"), rng), NOW)
        self.assertEqual(report.to_fields(), fields())
        self.assertEqual(report.fingerprint, fp("pinger"))
        self.assertEqual(report.digest, tf.document_digest(report.text))
        self.assertEqual(report.warnings, ())

    def test_reliability_rounded_to_three_decimals(self) -> None:
        text = build_report(fields(measured(S1, 0.98765)), key("pinger"), rng)
        self.assertIn(f"Measured: {S1} 20 20 0.988 400 800\n", text)
        self.assertEqual(parse_report(text, NOW).measured[0].reliability, 0.988)

    def test_build_refuses_what_readers_refuse(self) -> None:
        for bad in (
            fields(measured(S1, 1.2)),
            fields(measured(S1, -0.1)),
            fields(Measured(S1, 5, 5, float("nan"), 1, 2)),
            fields(Measured(S1, 5, 6, 1.0, 1, 2)),
            fields(measured("a" * 40, 0.5)),
            fields(measured(S1, 0.5), measured(S1, 0.6)),
            fields(pinger="not a nickname"),
            fields(interval_end=PUBLISHED + 1),
        ):
            self.assertRaises(BuildError, build_report, bad, key("pinger"), rng)

    def test_signed_by_another_key(self) -> None:
        forged = tf.sign_document(format_report(fields(), key("pinger").public), key("other"), rng)
        self.refused(BadReportSignature, forged, "does not verify")

    def test_tampered_measured_line(self) -> None:
        text = build_report(fields(), key("pinger"), rng)
        tampered = text.replace(f"{S2} 20 10 0.500", f"{S2} 20 10 0.900", 1)
        self.assertNotEqual(tampered, text)
        self.refused(BadReportDigest, tampered, "does not match the text")

    def test_transport_mangling_tolerated(self) -> None:
        text = build_report(fields(), key("pinger"), rng)
        self.assertEqual(parse_report(text.replace("\n", "\r\n"), NOW).to_fields(), fields())

    def test_version(self) -> None:
        self.refused(UnsupportedReportVersion, signed_edit("Version: 0.1", "Version: 0.2"), "Version is '0.2'")

    def test_starts_with_ping_report(self) -> None:
        self.refused(MalformedReport, signed_edit("[Ping-Report]", "[Server]"), "must start with [Ping-Report]")

    def test_published_in_future(self) -> None:
        text = build_report(fields(published=NOW + PUBLISHED_SKEW + 1), key("pinger"), rng)
        self.refused(ReportInFuture, text, "Published")
        self.assertEqual(parse_report(text, NOW + 1).published, NOW + PUBLISHED_SKEW + 1)

    def test_interval(self) -> None:
        end, start = f"Interval-End: {tf.format_time(PUBLISHED)}", f"Interval-Start: {tf.format_time(START)}"
        after_published = signed_edit(end, f"Interval-End: {tf.format_time(PUBLISHED + 1)}")
        self.refused(MalformedReport, after_published, "end by Published")
        empty = signed_edit(start, f"Interval-Start: {tf.format_time(PUBLISHED)}")
        self.refused(MalformedReport, empty, "non-empty")

    def test_malformed_measured(self) -> None:
        good = f"{S1} 20 20 0.987 400 800"
        for bad, fragment in (
            (f"{S1[:39]} 20 20 0.987 400 800", "not a fingerprint"),
            (f"{S1[:39]}G 20 20 0.987 400 800", "not a fingerprint"),
            (f"{'a' * 40} 20 20 0.987 400 800", "not a fingerprint"),
            (f"{S1} -1 0 0.987 400 800", "'-1' is not a decimal integer"),
            (f"{S1} 20 -2 0.987 400 800", "'-2' is not a decimal integer"),
            (f"{S1} 20 21 0.987 400 800", "21 pings returned of 20 sent"),
            (f"{S1} 20 20 1.001 400 800", "not a reliability"),
            (f"{S1} 20 20 -0.100 400 800", "not a reliability"),
            (f"{S1} 20 20 0.98 400 800", "not a reliability"),
            (f"{S1} 20 20 0.9870 400 800", "not a reliability"),
            (f"{S1} 20 20 1 400 800", "not a reliability"),
            (f"{S1} 20 20 0.987 -400 800", "'-400' is not a decimal integer"),
            (f"{S1} 20 20 0.987 400 -800", "'-800' is not a decimal integer"),
            (f"{S1} 20 20 0.987 400 399", "below the median"),
            (f"{S1} 20 20 0.987 400", "has 5 fields, not 6"),
            (f"{S2} 20 10 0.500 400 800", "appears twice"),
        ):
            self.refused(MalformedReport, signed_edit(good, bad), fragment)

    def test_missing_field(self) -> None:
        self.refused(MalformedReport, signed_edit("Pinger: Pinger\n", ""), "missing required field Pinger")

    def test_bad_identity_key(self) -> None:
        weak = tf.sign_document(format_report(fields(), key("weak", 1024).public), key("weak", 1024), rng)
        self.refused(MalformedReport, weak, "Identity")

    def test_unknown_key_tolerated(self) -> None:
        report = parse_report(signed_edit("Pinger: Pinger\n", "Pinger: Pinger\nColour: blue\n"), NOW)
        self.assertEqual(len(report.warnings), 1)
        self.assertIn("Colour", report.warnings[0])

    def test_errors_are_parse_errors(self) -> None:
        self.assertTrue(issubclass(ReportError, ParseError))


class AcceptReportTests(unittest.TestCase):
    """§2: what an authority adds: staleness and listing."""

    MAX_AGE = 2 * 6 * HOUR

    def accept(self, text: str, now: float = NOW, listed: Iterable[str] = (fp("pinger"),)) -> PingReport:
        return accept_report(text, now, self.MAX_AGE, set(listed).__contains__)

    def test_accepted(self) -> None:
        text = build_report(fields(), key("pinger"), rng)
        self.assertEqual(self.accept(text).to_fields(), fields())
        self.assertEqual(self.accept(text, now=PUBLISHED + self.MAX_AGE).published, PUBLISHED)

    def test_stale(self) -> None:
        text = build_report(fields(), key("pinger"), rng)
        exc = self.assertRaises(StaleReport, self.accept, text, now=PUBLISHED + self.MAX_AGE + 1)
        self.assertIn("Pinger", str(exc))

    def test_unlisted(self) -> None:
        text = build_report(fields(), key("pinger"), rng)
        exc = self.assertRaises(UnlistedPinger, self.accept, text, listed=[fp("other")])
        self.assertIn(fp("pinger"), str(exc))

    def test_verifies_first(self) -> None:
        forged = tf.sign_document(format_report(fields(), key("pinger").public), key("other"), rng)
        self.assertRaises(BadReportSignature, self.accept, forged)


# --- vote values (§3) ---------------------------------------------------------------------

SETTINGS = ReliabilitySettings(min_pings=10, min_pingers=3)


def report(pinger: str, *lines: Measured, published: int = PUBLISHED) -> PingReport:
    text = build_report(fields(*lines, pinger="P" + pinger.replace("-", ""), published=published), key(pinger), rng)
    return parse_report(text, NOW)


def pingers(n: int) -> list[str]:
    """``n`` pingers in order of their fingerprints (the lowest speaks for a group)."""
    return sorted((f"pinger-{i}" for i in range(n)), key=fp)


def separate(names: Iterable[str]) -> dict[str, PingerInfo]:
    """Each node on its own /16, with its own operator."""
    return {fp(n): PingerInfo(f"10.{i}.0.0/16", f"{n}@example.org") for i, n in enumerate(names)}


def values(
    reports: Iterable[PingReport],
    infos: Mapping[str, PingerInfo],
    servers: Sequence[str] = (S1,),
    settings: ReliabilitySettings = SETTINGS,
) -> dict[str, ServerReliability]:
    return vote_values(reports, infos, servers, settings)


class VoteValueTests(unittest.TestCase):
    """§3 steps 1-4."""

    def test_liar_does_not_move_honest_median(self) -> None:
        honest, liar = pingers(5)[:4], pingers(5)[4]
        reports = [report(p, measured(S1, r)) for p, r in zip(honest, (0.95, 1.0, 0.9, 0.97))]
        reports.append(report(liar, measured(S1, 0.0)))
        got = values(reports, separate(honest + [liar]))[S1]
        self.assertEqual(got, ServerReliability(0.95, 400, 5))
        self.assertGreaterEqual(got.reliability, 0.9)

    def test_liar_does_not_lift_dead_server(self) -> None:
        names = pingers(5)
        reports = [report(p, measured(S1, 0.0)) for p in names[:4]] + [report(names[4], measured(S1, 1.0))]
        self.assertEqual(values(reports, separate(names))[S1].reliability, 0.0)

    def test_too_few_pingers_unmeasured(self) -> None:
        names = pingers(3)
        reports = [report(p, measured(S1, 0.9)) for p in names[:2]]
        self.assertEqual(values(reports, separate(names)), {})
        self.assertEqual(values(reports + [report(names[2], measured(S1, 0.9))], separate(names))[S1].pingers, 3)

    def test_too_few_pings_abstains(self) -> None:
        names = pingers(3)
        reports = [report(p, measured(S1, 0.9)) for p in names[:2]] + [report(names[2], measured(S1, 0.9, sent=9))]
        self.assertEqual(values(reports, separate(names)), {})
        nine = dataclasses.replace(SETTINGS, min_pings=9)
        self.assertEqual(values(reports, separate(names), settings=nine)[S1].pingers, 3)

    def test_same_network_counts_once(self) -> None:
        names = pingers(3)
        infos = separate(names)
        infos[fp(names[1])] = dataclasses.replace(infos[fp(names[1])], network=infos[fp(names[0])].network)
        reports = [report(p, measured(S1, r)) for p, r in zip(names, (0.2, 0.99, 0.9))]
        self.assertEqual(values(reports, infos), {})
        # the group speaks with its lowest fingerprint: 0.2, not 0.99
        two = dataclasses.replace(SETTINGS, min_pingers=2)
        self.assertEqual(values(reports, infos, settings=two)[S1], ServerReliability(0.2, 400, 2))

    def test_same_operator_counts_once(self) -> None:
        names = pingers(4)
        infos = separate(names)
        infos[fp(names[3])] = dataclasses.replace(infos[fp(names[3])], operator=infos[fp(names[2])].operator)
        reports = [report(p, measured(S1, 0.9)) for p in names]
        self.assertEqual(values(reports, infos)[S1].pingers, 3)

    def test_shared_keys_do_not_chain(self) -> None:
        """a and b share a network, b and c an operator: a (the lowest
        fingerprint) and c are heard, b is not, and nothing folds a into c."""
        a, b, c, d = pingers(4)
        infos = separate([a, b, c, d])
        infos[fp(b)] = PingerInfo(infos[fp(a)].network, "b@example.org")
        infos[fp(c)] = PingerInfo("10.99.0.0/16", "b@example.org")
        reports = [report(p, measured(S1, 0.9)) for p in (a, b, c, d)]
        self.assertEqual(values(reports, infos, settings=dataclasses.replace(SETTINGS, min_pingers=1))[S1].pingers, 3)

    def test_copied_contacts_take_one_place_per_network(self) -> None:
        """Two nodes in one network copy two honest operators' Contact and
        report 0: one of them is heard, in place of one honest pinger."""
        names = pingers(6)
        liars, honest = names[:2], names[2:]
        infos = separate(names)
        for liar, victim in zip(liars, honest):
            infos[fp(liar)] = PingerInfo("10.66.0.0/16", infos[fp(victim)].operator)
        reports = [report(p, measured(S1, 0.0)) for p in liars]
        reports += [report(p, measured(S1, 1.0)) for p in honest]
        self.assertEqual(values(reports, infos)[S1], ServerReliability(1.0, 400, 4))

    def test_silent_member_passes_the_voice(self) -> None:
        """The lowest fingerprint *that reported on S* (with MinPings) speaks for its group."""
        names = pingers(5)
        infos = separate(names)
        for sibling in names[1:3]:
            infos[fp(sibling)] = dataclasses.replace(infos[fp(sibling)], operator=infos[fp(names[0])].operator)
        reports = [
            report(names[0], measured(S2, 0.5)),
            report(names[1], measured(S1, 0.1, sent=9)),
            report(names[2], measured(S1, 0.7)),
        ]
        reports += [report(p, measured(S1, 0.9)) for p in names[3:]]
        self.assertEqual(values(reports, infos)[S1], ServerReliability(0.9, 400, 3))

    def test_no_vouching_for_oneself(self) -> None:
        """A server's own report is not heard; a sibling on another network
        that shares its operator is one voice among the rest, too few to
        lift it; a sibling in its network is not heard."""
        names = pingers(5)
        server, sibling, others = names[0], names[1], names[2:]
        infos = separate(names)
        infos[fp(sibling)] = dataclasses.replace(infos[fp(sibling)], operator=infos[fp(server)].operator)
        reports = [
            report(server, measured(fp(server), 1.0), measured(fp(sibling), 1.0)),
            report(sibling, measured(fp(server), 1.0), measured(fp(sibling), 1.0)),
        ]
        reports += [report(p, measured(fp(server), 0.1), measured(fp(sibling), 0.1)) for p in others]
        got = values(reports, infos, servers=[fp(server), fp(sibling)])
        self.assertEqual(got, {fp(server): ServerReliability(0.1, 400, 4), fp(sibling): ServerReliability(0.1, 400, 4)})
        infos[fp(sibling)] = dataclasses.replace(infos[fp(sibling)], network=infos[fp(server)].network)
        got = values(reports, infos, servers=[fp(server), fp(sibling)])
        self.assertEqual(got, {fp(server): ServerReliability(0.1, 400, 3), fp(sibling): ServerReliability(0.1, 400, 3)})

    def test_sibling_of_non_pinging_server(self) -> None:
        names = pingers(4)
        infos = separate(names)
        infos[S1] = PingerInfo(infos[fp(names[0])].network, "s1@example.org")
        reports = [report(p, measured(S1, 1.0 if p == names[0] else 0.5)) for p in names]
        self.assertEqual(values(reports, infos)[S1], ServerReliability(0.5, 400, 3))

    def test_pinger_list(self) -> None:
        names = pingers(4)
        reports = [report(p, measured(S1, 0.9)) for p in names]
        only = dataclasses.replace(SETTINGS, pingers=frozenset(fp(p) for p in names[:2]))
        self.assertEqual(values(reports, separate(names), settings=only), {})
        two = dataclasses.replace(only, min_pingers=2)
        self.assertEqual(values(reports, separate(names), settings=two)[S1].pingers, 2)

    def test_unlisted_pinger_ignored(self) -> None:
        names = pingers(4)
        reports = [report(p, measured(S1, 0.9)) for p in names]
        self.assertEqual(values(reports, separate(names[:3]))[S1].pingers, 3)
        self.assertEqual(values(reports, separate(names[:2])), {})

    def test_latest_report_counts(self) -> None:
        names = pingers(3)
        old = report(names[0], measured(S1, 0.1), published=PUBLISHED - HOUR)
        reports = [report(p, measured(S1, r)) for p, r in zip(names, (0.9, 0.5, 0.6))]
        for order in (reports + [old], [old] + reports):
            self.assertEqual(values(order, separate(names))[S1].reliability, 0.6)

    def test_latency_only_from_returned_pings(self) -> None:
        names = pingers(5)
        rates = (0.0, 0.0, 0.5, 0.6, 0.7)
        reports = [report(p, measured(S1, r, median_ms=300 + 10 * i)) for i, (p, r) in enumerate(zip(names, rates))]
        self.assertEqual(values(reports, separate(names))[S1], ServerReliability(0.5, 330, 5))
        dead = [report(p, measured(S1, 0.0)) for p in names]
        self.assertEqual(values(dead, separate(names))[S1], ServerReliability(0.0, 0, 5))

    def test_only_requested_servers(self) -> None:
        names = pingers(3)
        reports = [report(p, measured(S1, 0.9), measured(S2, 0.8)) for p in names]
        self.assertEqual(set(values(reports, separate(names), servers=[S2, "3" * 40])), {S2})

    def test_report_order_irrelevant(self) -> None:
        names = pingers(5)
        reports = [report(p, measured(S1, 0.5 + 0.1 * i), measured(S2, 0.9 - 0.1 * i)) for i, p in enumerate(names)]
        infos = separate(names)
        infos[fp(names[4])] = infos[fp(names[3])]
        results = [values(order, infos, servers=[S1, S2]) for order in itertools.permutations(reports)]
        self.assertTrue(all(r == results[0] for r in results))
        self.assertEqual(set(results[0]), {S1, S2})

    def test_settings_checked(self) -> None:
        self.assertRaises(ValueError, ReliabilitySettings, 0, 3)
        self.assertRaises(ValueError, ReliabilitySettings, 10, 0)
        self.assertRaises(ValueError, ReliabilitySettings, 10, 3, frozenset({"not a fingerprint"}))

    def test_pinger_info_from_descriptor(self) -> None:
        def described(hostname: str, contact: str) -> PingerInfo:
            fields = DescriptorFields(
                nickname="Quince", contact=contact, packet_key=key("packet").public,
                published=PUBLISHED, valid_after=DAY, valid_until=DAY + ONE_DAY,
                incoming=IncomingMMTP(hostname=hostname, ip="192.0.2.7"),
            )
            return PingerInfo.of(parse_descriptor(build_descriptor(fields, key("srv-quince"), rng), NOW))

        expected = PingerInfo("198.51.0.0/16", "admin@example.org")
        self.assertEqual(described("198.51.100.7", "Admin@Example.ORG"), expected)
        self.assertEqual(described("198.51.3.9", "x").network, described("198.51.100.7", "y").network)
        self.assertEqual(described("Mix.Example.NET", "x").network, "host mix.example.net")
        self.assertEqual(described("300.1.2.3", "x").network, "host 300.1.2.3")


# --- the [Reliability] section (§3) ------------------------------------------------------------

ALDER, BIRCH, CEDAR = (descriptor(n) for n in ("alder", "Birch", "Cedar"))


def section(text: str) -> str:
    start = text.index("[Reliability]\n")
    return text[start : text.index("[Server]\n")]


class SectionTests(unittest.TestCase):
    """Writing and reading ``[Reliability]``."""

    def setUp(self) -> None:
        self.values = {
            CEDAR.fingerprint: ServerReliability(0.5, 1200, 3),
            ALDER.fingerprint: ServerReliability(0.98765, 250, 4),
            "F" * 40: ServerReliability(1.0, 10, 3),  # not carried
        }

    def test_written_sorted_between_software_and_servers(self) -> None:
        text = build_directory(info(reliability=self.values), standard_descriptors())
        lines = sorted([f"Server: {ALDER.fingerprint} 0.988 250 4", f"Server: {CEDAR.fingerprint} 0.500 1200 3"])
        self.assertEqual(section(text), "[Reliability]\n" + "".join(line + "\n" for line in lines))
        self.assertLess(text.index("MixminionServer:"), text.index("[Reliability]"))
        self.assertNotIn("F" * 40, text)

    def test_round_trip(self) -> None:
        text = build_directory(info(reliability=self.values), standard_descriptors())
        directory = parse(sign_by(text, ("auth-a", "auth-b")))
        self.assertEqual(dict(directory.reliability), {
            ALDER.fingerprint: ServerReliability(0.988, 250, 4),
            CEDAR.fingerprint: ServerReliability(0.5, 1200, 3),
        })
        self.assertEqual(directory.warnings, ())
        self.assertEqual(body_of(directory.text), build_directory(directory.info, directory.descriptors))

    def test_without_measurements_unchanged(self) -> None:
        text = build_directory(info(), standard_descriptors())
        self.assertNotIn("[Reliability]", text)
        uncarried = info(reliability={"F" * 40: ServerReliability(1.0, 10, 3)})
        self.assertEqual(build_directory(uncarried, standard_descriptors()), text)
        directory = parse(sign_by(text, ("auth-a", "auth-b")))
        self.assertEqual(dict(directory.reliability), {})
        self.assertEqual(build_directory(directory.info, directory.descriptors), body_of(directory.text))

    def test_legacy_directory_unmeasured(self) -> None:
        directory = parse_legacy_directory(legacy_text(), NOW, [fp("auth-a")])
        self.assertEqual(dict(directory.reliability), {})

    def test_build_refuses_unwritable_values(self) -> None:
        for bad in (
            {ALDER.fingerprint: ServerReliability(1.5, 10, 3)},
            {ALDER.fingerprint: ServerReliability(0.5, -1, 3)},
            {ALDER.fingerprint: ServerReliability(0.5, 10, 0)},
            {ALDER.fingerprint.lower(): ServerReliability(0.5, 10, 3)},
        ):
            self.assertRaises(BuildError, build_directory, info(reliability=bad), standard_descriptors())

    def signed_edit(self, old: str, new: str) -> str:
        text = build_directory(info(reliability=self.values), standard_descriptors())
        return sign_by(unsigned_edit(text, old, new), ("auth-a", "auth-b"))

    def test_malformed_lines_reject_the_directory(self) -> None:
        line = f"Server: {ALDER.fingerprint} 0.988 250 4"
        fingerprint = ALDER.fingerprint
        for bad, fragment in (
            (f"Server: {fingerprint} 0.98 250 4", "not a reliability"),
            (f"Server: {fingerprint} 1.200 250 4", "not a reliability"),
            (f"Server: {fingerprint} 0.988 -250 4", "not a decimal integer"),
            (f"Server: {fingerprint} 0.988 250 0", "out of range"),
            (f"Server: {fingerprint} 0.988 250", "has 3 fields, not 4"),
            (f"Server: {fingerprint} 0.988 250 4 7", "has 5 fields, not 4"),
            (f"Server: {fingerprint.lower()} 0.988 250 4", "not a fingerprint"),
            (f"{line}\n{line}", "listed twice"),
            (f"Server: {'F' * 40} 0.988 250 4", "no descriptor in the directory"),
        ):
            exc = self.assertRaises(MalformedDirectory, parse, self.signed_edit(line, bad))
            self.assertIn(fragment, str(exc))

    def test_unknown_key_is_a_warning(self) -> None:
        directory = parse(self.signed_edit("[Reliability]\n", "[Reliability]\nMethod: median\n"))
        self.assertEqual(len(directory.reliability), 2)
        self.assertTrue(any("Method" in w for w in directory.warnings))

    def test_vote_section_must_be_sorted(self) -> None:
        fingerprints = sorted([ALDER.fingerprint, CEDAR.fingerprint])
        text = body_of(vote_text("auth-b", reliability=self.values))
        accept_vote(sign_by(text, ("auth-b",)), voters(), DAY, NOW)
        first, second = (text[text.index(f"Server: {f}"):].split("\n", 1)[0] + "\n" for f in fingerprints)
        swapped = text.replace(first + second, second + first)
        self.assertNotEqual(swapped, text)
        exc = self.assertRaises(VoteRejected, accept_vote, sign_by(swapped, ("auth-b",)), voters(), DAY, NOW)
        self.assertIn("[Reliability] Server lines are not sorted", str(exc))


class ConsensusTests(unittest.TestCase):
    """§3 "Consensus": lower medians over the votes that measured a server."""

    def votes(self, measurements: Sequence[Mapping[str, ServerReliability]]) -> list[SignedDirectory]:
        names = ("auth-a", "auth-b", "auth-c")
        return [accepted(n, [ALDER, BIRCH, CEDAR], reliability=m) for n, m in zip(names, measurements)]

    def test_lower_medians(self) -> None:
        a, b, c = ALDER.fingerprint, BIRCH.fingerprint, CEDAR.fingerprint
        votes = self.votes([
            {a: ServerReliability(0.9, 300, 5), b: ServerReliability(0.2, 100, 3), c: ServerReliability(1.0, 50, 4)},
            {a: ServerReliability(0.95, 200, 3), b: ServerReliability(0.4, 900, 6)},
            {a: ServerReliability(0.1, 800, 4)},
        ])
        got = compute_consensus(votes, voters(), DAY)[0].reliability
        # alder: each component's own lower median; birch: two votes of three, the
        # threshold (lower of two); cedar: one vote, below the threshold
        self.assertEqual(dict(got), {a: ServerReliability(0.9, 300, 4), b: ServerReliability(0.2, 100, 3)})

    def test_only_carried_servers(self) -> None:
        damson = descriptor("Damson")  # in one vote only: not carried by the consensus
        value = {damson.fingerprint: ServerReliability(0.9, 300, 5)}
        votes = [accepted("auth-a", [ALDER, damson], reliability=value), accepted("auth-b", [ALDER]), accepted("auth-c", [ALDER])]
        info_, descs = compute_consensus(votes, voters(), DAY)
        self.assertEqual(descs, [ALDER])
        self.assertEqual(dict(info_.reliability), {})

    def test_vote_order_irrelevant(self) -> None:
        a, c = ALDER.fingerprint, CEDAR.fingerprint
        votes = self.votes([
            {a: ServerReliability(0.9, 300, 5), c: ServerReliability(0.3, 700, 3)},
            {a: ServerReliability(0.7, 200, 3), c: ServerReliability(0.6, 100, 9)},
            {a: ServerReliability(0.1, 800, 4), c: ServerReliability(0.45, 400, 6)},
        ])
        texts = {build_directory(*compute_consensus(list(order), voters(), DAY)) for order in itertools.permutations(votes)}
        self.assertEqual(len(texts), 1)
        directory = parse(sign_by(texts.pop(), ("auth-a", "auth-b")))
        self.assertEqual(dict(directory.reliability), {a: ServerReliability(0.7, 300, 4), c: ServerReliability(0.45, 400, 6)})
