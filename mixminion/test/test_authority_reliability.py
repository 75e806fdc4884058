"""The authority's side of reliability (doc/reliability.md §2-§3, issue 16):
``POST /report`` through the authority's real HTTP site, the reports kept
on disk across restarts, the vote's ``[Reliability]`` section under the
``[Reliability]`` options, a consensus carrying it signed by three
authorities on loopback, and the options' schema, example, manual and
SIGHUP.  The report and vote formats themselves are
``test_reliability_formats``'."""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Optional
from urllib.parse import urlencode

from twisted.internet import defer, reactor, task, threads
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from mixminion.codec import textformat as tf
from mixminion.config.syntax import ConfigError
from mixminion.directory import tap
from mixminion.directory.authconfig import (
    AUTHORITY_SECTIONS,
    RELIABILITY_SCHEMA,
    load_authority_config,
    parse_authority_config,
)
from mixminion.directory.authority import ReportStore
from mixminion.directory.directory import SignedDirectory
from mixminion.directory.http import HTTPClient
from mixminion.directory.httpserver import AuthoritySite
from mixminion.directory.rejects import RejectList
from mixminion.directory.reliability import (
    Measured,
    ReliabilitySettings,
    ReportFields,
    ServerReliability,
    build_report,
    format_report,
)
from mixminion.directory.reload import ReloadService, applier
from mixminion.directory.service import Authority, AuthoritySettings, authority_root
from mixminion.directory.voting import accept_vote
from mixminion.test import test_authority as base
from mixminion.test import test_authority_reject as reject_tests
from mixminion.test.test_reliability_formats import measured
from mixminion.testing.daemon import authority_config, upload_report
from mixminion.testing.keys import key

NOW, HOUR, rng = base.NOW, 3600, base.rng
PUBLISHED = NOW - 60
#: four nodes in four networks with four operators (``test_authority.descriptor``)
NODES = ("Quince", "Rowan", "Sorrel", "Tansy")
#: what each node measures of every other (its own voice in the medians)
SEEN_BY = {"Quince": 0.9, "Rowan": 0.8, "Sorrel": 0.7, "Tansy": 0.6}
LATENCY_BY = {"Quince": 100, "Rowan": 200, "Sorrel": 300, "Tansy": 400}


def fp(name: str) -> str:
    return key(name).public.fingerprint


def report(pinger: str, lines: Iterable[Measured] = (), published: int = PUBLISHED,
           signer: Optional[str] = None) -> str:
    """``pinger``'s signed report of ``lines`` over the hour before ``published``."""
    fields = ReportFields(pinger, published, published - HOUR, published, tuple(lines))
    if signer is None:
        return build_report(fields, key(pinger), rng)
    return tf.sign_document(format_report(fields, key(pinger).public), key(signer), rng)


def of_others(pinger: str, sent: int = 20, published: int = PUBLISHED) -> str:
    """``pinger``'s report on every other node, all at ``SEEN_BY[pinger]``."""
    return report(pinger, [measured(fp(n), SEEN_BY[pinger], sent=sent, median_ms=LATENCY_BY[pinger])
                           for n in NODES if n != pinger], published)


def expected(server: str, pingers: Iterable[str] = NODES) -> ServerReliability:
    """The lower medians of what the other ``pingers`` report of ``server``."""
    others = sorted((SEEN_BY[p], LATENCY_BY[p]) for p in pingers if p != server)
    reliability = others[(len(others) - 1) // 2][0]
    latencies = sorted(latency for _, latency in others)
    return ServerReliability(reliability, latencies[(len(latencies) - 1) // 2], len(others))


def make_authority(case: unittest.TestCase, base_dir: Optional[str] = None,
                   nodes: Iterable[str] = NODES, config: Optional[AuthoritySettings] = None,
                   **settings: Any) -> Authority:
    """An authority alone, at ``NOW`` on a ``task.Clock``, listing ``nodes``;
    ``config`` or ``settings`` (fields of :class:`AuthoritySettings`)."""
    client = HTTPClient(reactor, timeout=5)
    case.addCleanup(client.close)
    clock = task.Clock()
    clock.advance(NOW)
    if config is None:
        config = AuthoritySettings(base_dir=base_dir or case.mktemp(), nickname="Auth0", **settings)
    authority = Authority(config, key("auth0"), clock, client, rng=rng)
    for node in nodes:
        assert authority.store.accept_upload(base.descriptor(node), NOW)[0], node
    return authority


def vote_of(authority: Authority) -> SignedDirectory:
    """Our vote of the round at the clock's time, as a peer accepts it."""
    now = authority.clock.seconds()
    text = authority.make_vote(now)
    return accept_vote(text, authority.voter_table, authority.round_valid_after(now), now)


class LogCase(unittest.TestCase):
    def setUp(self) -> None:
        self.logs = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        #: lines logged before this many events are not looked at
        self.since = 0

    def logged(self, containing: str = "", level: LogLevel = LogLevel.info) -> list[str]:
        events = list(self.logs)[self.since:]
        return [line for line in (formatEvent(e) for e in events if e.get("log_level") == level)
                if containing in line]


# --- POST /report ---------------------------------------------------------------------------------

#: what a node's upload says (``HTTPClient.post_text``)
TEXT = b"text/plain; charset=utf-8"


class EndpointTests(LogCase):
    """Through the authority's real site (limits included), on a StringTransport."""

    def setUp(self) -> None:
        super().setUp()
        self.authority = make_authority(self)
        self.site = AuthoritySite(authority_root(self.authority), self.authority.settings.http_limits,
                                  reactor=self.authority.clock)
        self.folder = os.path.join(self.authority.settings.base_dir, "reports")

    def post(self, body: bytes, content_type: bytes = TEXT,
             declared: Optional[int] = None) -> tuple[int, bytes, bytes]:
        """``(HTTP status, headers, body)`` of one POST /report."""
        address = IPv4Address("TCP", "192.0.2.7", 40000)
        channel = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        length = len(body) if declared is None else declared
        channel.dataReceived(b"POST /report HTTP/1.1\r\nHost: a\r\nContent-Type: %s\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (content_type, length, body))
        channel.connectionLost(Failure(ConnectionDone()))
        head, _, answer = transport.value().partition(b"\r\n\r\n")
        return int(head.split()[1]), head, answer

    def answer(self, body: bytes, content_type: bytes = TEXT) -> tuple[int, str]:
        """``(Status, Message)``; the answer is 200 text/plain, two lines."""
        code, head, answer = self.post(body, content_type)
        self.assertEqual(code, 200)
        self.assertIn(b"\r\nContent-Type: text/plain", head)
        match = re.fullmatch(r"Status: ([01])\nMessage: ([^\n]*)\n", answer.decode("ascii"))
        self.assertIsNotNone(match, answer)
        return int(match.group(1)), match.group(2)

    def stored(self) -> list[str]:
        return sorted(os.listdir(self.folder))

    def test_accepted_as_the_body(self) -> None:
        text = of_others("Quince")
        self.assertEqual(self.answer(text.encode("ascii")),
                         (1, f"Accepted the report of Quince ({fp('Quince')}) published 2024-01-15 13:29:00."))
        self.assertEqual(self.stored(), [fp("Quince")])
        with open(os.path.join(self.folder, fp("Quince"))) as f:
            self.assertEqual(f.read(), text)
        self.assertEqual(self.logged("Report:"), [
            f"Report: status 1: Accepted the report of Quince ({fp('Quince')}) published 2024-01-15 13:29:00."])
        self.assertFalse([line for line in self.logged() if "192.0.2.7" in line])  # address at DEBUG only
        self.assertTrue(self.logged("192.0.2.7", LogLevel.debug))

    def test_accepted_as_a_form_field(self) -> None:
        body = urlencode({"report": of_others("Rowan")}).encode("ascii")
        status, message = self.answer(body, b"application/x-www-form-urlencoded")
        self.assertEqual(status, 1, message)
        self.assertEqual(self.stored(), [fp("Rowan")])

    def test_form_without_the_field(self) -> None:
        body = urlencode({"desc": of_others("Rowan")}).encode("ascii")
        self.assertEqual(self.answer(body, b"application/x-www-form-urlencoded"),
                         (0, "Expected exactly one form field 'report' with the report."))

    def test_refusals_are_one_line_and_store_nothing(self) -> None:
        stale = PUBLISHED - 2 * HOUR  # the default ReportInterval is 1 hour
        cases = [
            ("bad signature", report("Quince", [measured(fp("Rowan"), 0.5)], signer="Mallory"),
             "Signature: does not verify to the digest under the Identity key"),
            ("altered", of_others("Quince").replace(" 0.900 ", " 1.000 ", 1), "Digest"),
            ("unlisted", report("Mallory", [measured(fp("Rowan"), 0.5)]), f"identity {fp('Mallory')} is not a listed node's"),
            ("stale", of_others("Quince", published=stale),
             "report by Quince published 2024-01-15 11:29:00, more than 7200 s before 2024-01-15 13:30:00"),
            ("future", of_others("Quince", published=NOW + HOUR), "after the validation time"),
            ("a descriptor", base.descriptor("Quince"), "must start with [Ping-Report], not [Server]"),
        ]
        for what, text, fragment in cases:
            status, message = self.answer(text.encode("ascii"))
            self.assertEqual(status, 0, what)
            self.assertTrue(message.startswith("Report refused: "), message)
            self.assertIn(fragment, message, what)
        self.assertEqual(self.stored(), [])
        lines = self.logged("Report:")
        self.assertEqual(len(lines), len(cases))
        self.assertTrue(all(line.startswith("Report: status 0: Report refused: ") for line in lines), lines)

    def test_garbage_is_refused_without_a_traceback(self) -> None:
        good = of_others("Quince").encode("ascii")
        garbage = [
            b"", b"hello", b"\x00\xff\xfe binary", b"[Ping-Report]\n", b"[Ping-Report\n", b"Version: 0.1\n",
            "[Ping-Report]\nPinger: \u00e9\n".encode("utf-8"), good[:len(good) // 2], b"[" * 5000,
            good.replace(b"Identity: ", b"Identity: !!"), good.replace(b"Version: 0.1", b"Version: 9"),
            good + b"\n[Ping-Report]\n" + good, b"\r\n".join(good.split(b"\n")) + b"\x00",
            good.replace(b"Measured: ", b"Measured: x", 1),
        ]
        for body in garbage:
            status, message = self.answer(body)
            self.assertEqual(status, 0, body[:40])
            self.assertNotIn("Traceback", message)
        self.assertEqual(self.stored(), [])
        self.assertEqual(len(self.logged("Report: status 0")), len(garbage))
        self.assertEqual(self.logged(level=LogLevel.error) + self.logged(level=LogLevel.critical), [])

    def test_oversized(self) -> None:
        """Above MaxDescriptorSize: refused after reading; above four times
        it: 413 before the body is read, as for /publish."""
        lines = [measured(f"{i:040X}", 0.5) for i in range(600)]
        big = report("Quince", lines).encode("ascii")
        self.assertGreater(len(big), 32 * 1024)
        self.assertEqual(self.answer(big), (0, f"Report is {len(big)} bytes; this authority accepts at most 32768."))
        code, _, answer = self.post(b"", declared=4 * 32 * 1024 + 1)
        self.assertEqual(code, 413)
        self.assertTrue(answer.startswith(b"Status: 0\nMessage: Upload too large"), answer)
        self.assertEqual(self.stored(), [])

    def test_again_and_older(self) -> None:
        older, newer = of_others("Quince", published=PUBLISHED - 600), of_others("Quince")
        self.assertEqual(self.answer(newer.encode("ascii"))[0], 1)
        self.assertEqual(self.answer(newer.encode("ascii")),
                         (1, f"Already have this report of Quince ({fp('Quince')})."))
        self.assertEqual(self.answer(older.encode("ascii")),
                         (1, f"Accepted; a later report of Quince ({fp('Quince')}) is already held."))
        self.assertEqual([r.text for r in self.authority.reports.latest()], [newer])

    def test_a_rejected_node_is_not_listed(self) -> None:
        self.authority.store.rejects = RejectList.parse("Quince\n", "rejects")
        status, message = self.answer(of_others("Quince").encode("ascii"))
        self.assertEqual(status, 0)
        self.assertIn("is not a listed node's", message)


# --- durable storage ------------------------------------------------------------------------------


class StorageTests(LogCase):
    def setUp(self) -> None:
        super().setUp()
        #: what a ReportStore logged, (level, message)
        self.said: list[tuple[str, str]] = []

    def test_a_restart_keeps_the_latest_report(self) -> None:
        authority = make_authority(self)
        folder = authority.settings.base_dir
        for pinger in NODES:
            self.assertTrue(authority.accept_report(of_others(pinger, published=PUBLISHED - 60), NOW)[0])
        latest = of_others("Quince")
        self.assertTrue(authority.accept_report(latest, NOW)[0])
        self.assertEqual(sorted(os.listdir(os.path.join(folder, "reports"))), sorted(fp(n) for n in NODES))
        before = vote_of(authority).reliability
        again = make_authority(self, base_dir=folder, nodes=())
        self.assertEqual({r.fingerprint: r.text for r in again.reports.latest()}[fp("Quince")], latest)
        self.assertEqual(vote_of(again).reliability, before)
        self.assertEqual(dict(before), {fp(n): expected(n) for n in NODES})

    def test_unusable_files_are_deleted_at_start(self) -> None:
        folder = os.path.join(self.mktemp(), "reports")
        os.makedirs(folder)
        files = {
            f".{fp('Quince')}.x1y2": of_others("Quince"),  # an interrupted atomic write
            fp("Rowan"): "[Ping-Report]\nbroken\n",
            fp("Sorrel"): of_others("Tansy"),  # under another pinger's name
            fp("Tansy"): of_others("Tansy"),
        }
        for name, text in files.items():
            with open(os.path.join(folder, name), "w") as f:
                f.write(text)
        store = ReportStore(os.path.dirname(folder), NOW, log=lambda level, message: self.said.append((level, message)))
        self.assertEqual(os.listdir(folder), [fp("Tansy")])
        self.assertEqual([r.pinger for r in store.latest()], ["Tansy"])
        self.assertEqual([level for level, _ in self.said], ["warn", "warn"])
        self.assertIn(f"stored report {fp('Sorrel')} is unusable (it is {fp('Tansy')}'s); deleted",
                      [message for _, message in self.said])

    def test_housekeeping_drops_unlisted_and_stale_reports(self) -> None:
        authority = make_authority(self, report_interval=600)
        for pinger in NODES:
            self.assertTrue(authority.accept_report(of_others(pinger), NOW)[0])
        authority.store.rejects = RejectList.parse("Tansy\n", "rejects")  # no longer listed
        vote = vote_of(authority)
        folder = os.path.join(authority.settings.base_dir, "reports")
        self.assertEqual(sorted(os.listdir(folder)), sorted(fp(n) for n in NODES[:3]))
        self.assertEqual(self.logged("dropped"), [
            f"Store: dropped the report of Tansy ({fp('Tansy')}): its pinger is no longer listed"])
        self.assertEqual(set(vote.reliability), set())  # three pingers, each server heard by two
        authority.clock.advance(2 * 600 - 60)  # exactly two report intervals after publication
        vote_of(authority)
        self.assertEqual(len(os.listdir(folder)), 3)
        authority.clock.advance(1)
        vote_of(authority)
        self.assertEqual(os.listdir(folder), [])
        self.assertEqual(len(self.logged("more than 1200 s ago")), 3)


# --- the vote -------------------------------------------------------------------------------------


class VoteTests(LogCase):
    def reported(self, reporters: Iterable[str] = NODES, sent: int = 20, **settings: Any) -> Authority:
        """An authority that accepted the reports of ``reporters``."""
        authority = make_authority(self, **settings)
        for pinger in reporters:
            accepted, message = authority.accept_report(of_others(pinger, sent=sent), NOW)
            self.assertTrue(accepted, message)
        return authority

    def test_the_vote_carries_the_medians(self) -> None:
        authority = self.reported()
        vote = vote_of(authority)
        self.assertEqual(dict(vote.reliability), {fp(n): expected(n) for n in NODES})
        self.assertIn("\n[Reliability]\nServer: ", authority.vote_text)
        [built] = self.logged("Built our vote")
        self.assertTrue(built.endswith(": 4 descriptors, 4 measured from 4 reports"), built)

    def test_without_reports_the_vote_is_unchanged(self) -> None:
        authority = make_authority(self)
        vote_of(authority)
        self.assertNotIn("[Reliability]", authority.vote_text)

    def test_min_pingers(self) -> None:
        """Two pingers: every server is heard by one or two, below the default 3."""
        self.assertEqual(dict(vote_of(self.reported(NODES[:2])).reliability), {})
        two = vote_of(self.reported(NODES[:2], min_pingers=2)).reliability
        self.assertEqual(dict(two), {fp(n): expected(n, NODES[:2]) for n in NODES[2:]})
        one = vote_of(self.reported(NODES[:2], min_pingers=1)).reliability
        self.assertEqual(set(one), {fp(n) for n in NODES})

    def test_min_pings(self) -> None:
        """Two pings through each server: every pinger abstains under the default 3."""
        self.assertEqual(dict(vote_of(self.reported(sent=2)).reliability), {})
        self.assertEqual(dict(vote_of(self.reported(sent=2, min_pings=2)).reliability),
                         {fp(n): expected(n) for n in NODES})

    def test_pingers(self) -> None:
        """Only three pingers counted: Tansy is heard by three, the others by two."""
        counted = frozenset(fp(n) for n in NODES[:3])
        vote = vote_of(self.reported(pingers=counted))
        self.assertEqual(dict(vote.reliability), {fp("Tansy"): expected("Tansy", NODES[:3])})
        self.assertEqual(len(self.reported().reports.latest()), 4)  # all kept, whatever counts

    def test_report_interval(self) -> None:
        """The age a report may have at upload and still count in a vote."""
        old = of_others("Quince", published=NOW - 1300)
        short = make_authority(self, report_interval=600)
        accepted, message = short.accept_report(old, NOW)
        self.assertFalse(accepted)
        self.assertIn("more than 1200 s before", message)
        self.assertTrue(make_authority(self).accept_report(old, NOW)[0])
        authority = self.reported(min_pingers=1, report_interval=600)
        self.assertEqual(len(vote_of(authority).reliability), 4)
        authority.clock.advance(1200)
        self.assertEqual(dict(vote_of(authority).reliability), {})

    def test_only_servers_in_the_vote(self) -> None:
        authority = self.reported(min_pingers=1)
        authority.store.rejects = RejectList.parse("Quince\n", "rejects")
        vote = vote_of(authority)
        self.assertEqual(set(vote.reliability), {fp(n) for n in NODES[1:]})
        self.assertNotIn(fp("Quince"), {d.fingerprint for d in vote.descriptors})


# --- the consensus --------------------------------------------------------------------------------


class ConsensusTests(reject_tests.LoopbackRounds):
    """Three in-process authorities on loopback (``test_authority.RoundTests``),
    each listing the four nodes, each sent their reports over HTTP."""

    def setUp(self) -> None:
        super().setUp()
        for authority in self.auths:
            for node in NODES:
                self.assertTrue(authority.store.accept_upload(base.descriptor(node), NOW)[0])

    @defer.inlineCallbacks
    def upload_everywhere(self, pingers: Iterable[str] = NODES):
        """As a node would: the form field ``report``, to every authority."""
        client = HTTPClient(reactor, clock=self.clock, timeout=10)
        self.addCleanup(client.close)
        for pinger in pingers:
            text = of_others(pinger)
            for peer in self.auths[0].settings.peers:
                response = yield client.post_form(peer.url + "report", {"report": text})
                self.assertTrue(response.body.startswith(b"Status: 1\n"), response.body)

    @defer.inlineCallbacks
    def test_signed_and_published_with_the_medians(self):
        yield self.upload_everywhere()
        yield self.run_round(self.auths, NOW)
        texts = {a.directory for a in self.auths}
        self.assertEqual(len(texts), 1)
        directory = self.client_view(texts.pop(), threshold=3)
        self.assertEqual(len(directory.signers), 3)
        self.assertEqual(dict(directory.reliability), {fp(n): expected(n) for n in NODES})
        for authority in self.auths:
            with open(os.path.join(authority.settings.base_dir, "consensus")) as f:
                self.assertIn("\n[Reliability]\n", f.read())

    @defer.inlineCallbacks
    def test_one_authority_without_reports_is_outvoted(self):
        """The consensus needs two votes measuring a server: the third,
        unmeasuring, does not keep it out and signs the same text."""
        yield self.upload_everywhere()
        self.auths[2].reports = ReportStore(self.mktemp(), NOW)
        yield self.run_round(self.auths, NOW)
        self.assertEqual(len({a.directory for a in self.auths}), 1)
        self.assertNotIn("[Reliability]", self.auths[2].vote_text)
        directory = self.client_view(self.auths[2].directory, threshold=3)
        self.assertEqual(dict(directory.reliability), {fp(n): expected(n) for n in NODES})

    @defer.inlineCallbacks
    def test_the_harness_uploads_a_report(self):
        url = self.auths[0].settings.peers[0].url
        status, answer = yield threads.deferToThread(upload_report, url, of_others("Rowan"))
        self.assertEqual((status, answer.split("\n")[0]), (200, "Status: 1"))
        status, answer = yield threads.deferToThread(upload_report, url, "garbage")
        self.assertEqual((status, answer.split("\n")[0]), (200, "Status: 0"))


# --- configuration --------------------------------------------------------------------------------

BASE = "[Authority]\nBaseDir: auth\nNickname: Quorum1\nPort: 48080\n"


class ConfigTests(unittest.TestCase):
    def parse(self, reliability: Optional[str]) -> AuthoritySettings:
        section = "" if reliability is None else f"[Reliability]\n{reliability}"
        return parse_authority_config(BASE + section, "/etc/authority.conf")

    def test_defaults_without_the_section(self) -> None:
        for text in (None, ""):
            settings = self.parse(text)
            self.assertEqual(settings.reliability, ReliabilitySettings(min_pings=3, min_pingers=3))
            self.assertEqual((settings.report_interval, settings.report_max_age), (3600, 7200))

    def test_every_option(self) -> None:
        settings = self.parse(f"MinPings: 5\nMinPingers: 2\nPingers: {fp('Quince').lower()},\n"
                              f"  {fp('Rowan')[:20]} {fp('Rowan')[20:]}\nReportInterval: 10 minutes\n")
        self.assertEqual(settings.reliability, ReliabilitySettings(5, 2, frozenset({fp("Quince"), fp("Rowan")})))
        self.assertEqual((settings.report_interval, settings.report_max_age), (600, 1200))
        self.assertIsNone(self.parse("Pingers:\n").pingers)  # empty: every listed node

    def assertConfigError(self, reliability: str, *fragments: str) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_authority_config(BASE + reliability, "authority.conf")
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)

    def test_errors_name_file_line_and_option(self) -> None:
        section = "[Reliability]\n"
        self.assertConfigError(section + "MinPings: 0\n", "authority.conf:6: [Reliability] MinPings: "
                               "must be at least 1")
        self.assertConfigError(section + "MinPingers: -2\n", "authority.conf:6: [Reliability] MinPingers: "
                               "must be at least 1")
        self.assertConfigError(section + "MinPings: three\n", "[Reliability] MinPings:", "not an integer")
        self.assertConfigError(section + f"Pingers: {fp('Quince')}, 0123\n", "[Reliability] Pingers:",
                               '"0123" is not a fingerprint')
        self.assertConfigError(section + "ReportInterval: 0 seconds\n", "[Reliability] ReportInterval: "
                               "must be at least 1 second")
        self.assertConfigError(section + "ReportInterval: hourly\n", "[Reliability] ReportInterval:",
                               "not an interval")
        self.assertConfigError(section + "MinPing: 3\n", "authority.conf:6: [Reliability] MinPing: "
                               "unknown option (known: MinPings, MinPingers, Pingers, ReportInterval)")
        self.assertConfigError(section + "MinPings: 3\nMinPings: 4\n", "MinPings: given twice")
        self.assertConfigError("[Pinging]\nEnabled: yes\n",
                               "[Pinging]: unknown section; only [Authority] and [Reliability] are allowed")
        self.assertConfigError(section + section, "appears twice")

    def test_the_entry_point_reads_them(self) -> None:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        conf = os.path.join(folder, "authority.conf")
        with open(conf, "w") as f:
            f.write(authority_config("base", "Auth1", 48080, [], 1, 60,
                                     reliability="MinPingers: 2\nReportInterval: 30 seconds\n"))
        options = tap.Options()
        options.parseOptions(["-c", conf])
        svc = tap.makeService(options)
        self.addCleanup(svc.authority.client.close)
        settings = svc.authority.settings
        self.assertEqual((settings.min_pingers, settings.report_max_age), (2, 60))
        self.assertTrue(os.path.isdir(os.path.join(folder, "base", "reports")))


class ReloadTests(LogCase):
    def setUp(self) -> None:
        super().setUp()
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        self.conf = os.path.join(folder, "authority.conf")
        self.configure("")
        self.authority = make_authority(self, config=load_authority_config(self.conf))
        self.service = ReloadService(self.authority, self.conf, reactor)
        for pinger in NODES[:2]:
            self.assertTrue(self.authority.accept_report(of_others(pinger), NOW)[0])
        self.since = len(self.logs)  # only what the reload says

    def configure(self, reliability: str) -> None:
        with open(self.conf, "w") as f:
            f.write(BASE + f"[Reliability]\n{reliability}")

    def test_sighup_applies_every_option(self) -> None:
        self.assertEqual(dict(vote_of(self.authority).reliability), {})
        self.configure(f"MinPings: 4\nMinPingers: 1\nPingers: {fp('Quince')}\nReportInterval: 10 minutes\n")
        self.assertEqual(self.service.reload(), ["MinPings", "MinPingers", "Pingers", "ReportInterval"])
        self.assertIn("SIGHUP: applied MinPings, MinPingers, Pingers, ReportInterval", self.logged())
        self.assertEqual(self.logged(level=LogLevel.warn), [])
        # only Quince counts now, one voice is enough
        self.assertEqual(dict(vote_of(self.authority).reliability),
                         {fp(n): expected(n, ["Quince"]) for n in NODES[1:]})
        # ten minutes: a report of 13:09 is stale at 13:30
        accepted, message = self.authority.accept_report(of_others("Sorrel", published=NOW - 1260), NOW)
        self.assertIn("more than 1200 s before", message)
        self.configure("MinPings: 21\nMinPingers: 1\n")  # each report has 20 pings through a server
        self.assertEqual(self.service.reload(), ["MinPings", "Pingers", "ReportInterval"])
        self.assertEqual(dict(vote_of(self.authority).reliability), {})

    def test_a_bad_value_keeps_the_old_settings(self) -> None:
        self.configure("MinPingers: 0\n")
        self.assertIsNone(self.service.reload())
        self.assertEqual(self.authority.settings.min_pingers, 3)
        [warning] = self.logged(level=LogLevel.warn)
        self.assertIn("[Reliability] MinPingers: must be at least 1", warning)


# --- the schema, the example and the manual ---------------------------------------------------------


def _example_section(path: str, name: str) -> dict[str, tuple[str, str]]:
    """``{key: (comment above it, value)}`` of the ``#Key: value`` lines
    between ``[name]`` and the next section of an example file."""
    with open(path) as f:
        text = f.read()
    body = text.split(f"\n[{name}]\n", 1)[1].split("\n[", 1)[0]
    found: dict[str, tuple[str, str]] = {}
    comment: list[str] = []
    for line in body.splitlines():
        entry = re.match(r"#?([A-Za-z][A-Za-z0-9-]*):\s*(.*)", line)
        if entry:
            found.setdefault(entry.group(1), (" ".join(comment), entry.group(2)))
        elif line.startswith("#"):
            comment.append(line[1:].strip())
        else:
            comment = []
    return found


class ReliabilitySchemaTests(unittest.TestCase):
    """``test_authority_reject.SchemaTests``, for the ``[Reliability]`` section."""

    def test_each_option_is_one_field_with_one_way_to_its_effect(self) -> None:
        fields = AuthoritySettings.__dataclass_fields__
        names = [o.name for spec in AUTHORITY_SECTIONS for o in spec.options]
        self.assertEqual(len(names), len(set(names)))  # one place per option
        for option in RELIABILITY_SCHEMA.options:
            self.assertIn(option.name, fields, option.key)
            self.assertTrue(option.reload and not option.consumer, option.key)
            self.assertTrue(callable(applier(option.reload)), option.key)
            if option.default is not None:
                self.assertEqual(option.type.parse(option.default),
                                 fields[option.name].default, option.key)

    def test_the_example_shows_every_option_with_its_default_and_effect(self) -> None:
        documented = _example_section(reject_tests.SchemaTests.CONF, "Reliability")
        self.assertEqual(list(documented), [o.key for o in RELIABILITY_SCHEMA.options])
        for option in RELIABILITY_SCHEMA.options:
            comment, written = documented[option.key]
            self.assertIn("(SIGHUP applies it.)", comment, option.key)
            self.assertNotIn("restart", comment, option.key)
            if option.default is not None:
                self.assertEqual(option.type.parse(written), RELIABILITY_SCHEMA.default(option.key))
        with open(reject_tests.SchemaTests.CONF) as f:
            uncommented = re.sub(r"(?m)^#(?=(MinPings|MinPingers|Pingers|ReportInterval):|  [0-9A-F])",
                                 "", f.read())
        settings = parse_authority_config(uncommented, reject_tests.SchemaTests.CONF)
        self.assertEqual(len(settings.pingers or ()), 2)
        self.assertEqual(settings.reliability.min_pingers, 3)

    def test_the_manual_describes_every_option_and_its_effect(self) -> None:
        items = reject_tests._manual_items(reject_tests.SchemaTests.MAN)
        for option in RELIABILITY_SCHEMA.options:
            body = items[option.key]
            self.assertIn("SIGHUP applies it.", body, option.key)
            self.assertNotIn("restart", body, option.key)
            if option.default is not None:
                self.assertIn(f"Default {option.default};", body, option.key)
        with open(reject_tests.SchemaTests.MAN) as f:
            page = f.read()
        self.assertIn('.SS "The [Reliability] section"', page)
        self.assertIn(".IB BaseDir /reports/", page)
