"""An authority's reject list and its SIGHUP, in process: parsing the file,
matching descriptors, the store refusing uploads and leaving rejected
servers out of its votes, three authorities on loopback where one or two
reject a server, reloading, and the schema against ``etc/authority.conf``
and ``mixminion-directory(8)``.  ``tests/test_directory_reject.py`` runs the
same with real ``twistd`` processes and nodes."""

from __future__ import annotations

import importlib
import os
import re
import signal
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

import mixminion
from mixminion.config.syntax import ConfigError
from mixminion.directory import reload as reload_module
from mixminion.directory import tap
from mixminion.directory.authconfig import AUTHORITY_SCHEMA, load_authority_config, parse_authority_config
from mixminion.directory.authority import AuthorityStore
from mixminion.directory.descriptor import IncomingMMTP, parse_descriptor
from mixminion.directory.http import HTTPClient
from mixminion.directory.rejects import RejectList, parse_entry
from mixminion.directory.reload import ReloadService, applier
from mixminion.directory.service import Authority, AuthoritySettings, PublishResource
from mixminion.signals import SignalService
from mixminion.test import test_authority as base
from mixminion.testing.keys import key

NOW, DAY, descriptor = base.NOW, base.DAY, base.descriptor
REPO = os.path.dirname(os.path.dirname(os.path.abspath(mixminion.__file__)))
FP = "0123456789ABCDEF0123456789ABCDEF01234567"


def parsed(nickname: str = "Quince", **changes: Any):
    return parse_descriptor(descriptor(nickname, **changes), NOW)


def at(hostname: str, ip: Any = None) -> IncomingMMTP:
    return IncomingMMTP(hostname=hostname, ip=ip)


class LogCase(unittest.TestCase):
    def setUp(self) -> None:
        self.logs = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        #: lines logged before this many events are not looked at
        self.since = 0

    def logged(self, level: LogLevel = LogLevel.info) -> list[str]:
        return [formatEvent(e) for e in list(self.logs)[self.since:] if e.get("log_level") == level]


# --- the file --------------------------------------------------------------------------------------


class ParseTests(unittest.TestCase):
    def test_three_forms_comments_and_blank_lines(self) -> None:
        rejects = RejectList.parse(
            "# servers we keep out\n\n"
            f"{FP.lower()}   # by key\n"
            "0123 4567 89AB CDEF 0123 4567 89AB CDEF 0123 4568\n"
            "BadNode\n"
            "  192.0.2.0/24  \n"
            "198.51.100.7\n"
            "2001:db8::/32 # IPv6\n"
            "::ffff:203.0.113.0/120\n", "rejects")
        self.assertEqual([(e.kind, e.value, e.line) for e in rejects.entries], [
            ("fingerprint", FP, 3),
            ("fingerprint", FP[:-1] + "8", 4),
            ("nickname", "badnode", 5),
            ("address", "192.0.2.0/24", 6),
            ("address", "198.51.100.7/32", 7),
            ("address", "2001:db8::/32", 8),
            ("address", "203.0.113.0/24", 9),  # IPv4-mapped: matched as IPv4
        ])
        self.assertEqual(str(rejects.entries[2]), "nickname badnode (rejects:5)")
        self.assertEqual(rejects.summary(), "7 entries (2 fingerprint, 1 nickname, 4 address)")
        self.assertEqual(RejectList().summary(), "0 entries")

    def test_bad_lines_name_the_file_and_the_line(self) -> None:
        cases = {
            "node_1": "is not a fingerprint (40 hex digits), a nickname",
            "two words": "one entry a line",
            "Averyveryverylongnickname1": "is not a fingerprint (40 hex digits), a nickname",
            FP[:-2]: "38 hex digits, not 40",
            "192.0.2.300": '"192.0.2.300" is not an address or network',
            "192.0.2.0/33": "is not an address or network",
            "10.0.0.1 10.0.0.2": "one entry a line",
            "0.0.0.0/0": "would reject every server",
            "::/0": "would reject every server",
            "1bad": "is not an address or network",
        }
        for line, reason in cases.items():
            with self.assertRaises(ConfigError) as caught:
                RejectList.parse(f"# fine\nGood\n{line}  # bad\nAlsoGood\n", "/etc/rejects")
            self.assertTrue(str(caught.exception).startswith("/etc/rejects:3: "), str(caught.exception))
            self.assertIn(reason, str(caught.exception), line)
            self.assertNotIn("\n", str(caught.exception))

    def test_not_ascii(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            RejectList.parse(b"Good\nB\xc3\xa4d\n", "rejects")
        self.assertEqual(str(caught.exception), "rejects:2: not ASCII text")

    def test_same_entries_on_other_lines_are_the_same_list(self) -> None:
        self.assertEqual(RejectList.parse("A\nB\n", "f"), RejectList.parse("# moved\nA\n\nB\n", "f"))
        self.assertNotEqual(RejectList.parse("A\n", "f"), RejectList.parse("A\nB\n", "f"))

    def test_forms_cannot_be_confused(self) -> None:
        self.assertEqual(parse_entry("cafe"), ("nickname", "cafe"))  # hex, but a nickname
        self.assertEqual(parse_entry("ABCDEF0123456789ABCDEF01"), ("nickname", "abcdef0123456789abcdef01"))
        self.assertEqual(parse_entry("fe80::1")[0], "address")


# --- matching --------------------------------------------------------------------------------------


class MatchTests(unittest.TestCase):
    def test_by_fingerprint_nickname_and_advertised_address(self) -> None:
        quince = parsed("Quince", incoming=at("quince.example.org", "192.0.2.7"))
        rejects = RejectList.parse(f"{quince.fingerprint.lower()}\n", "r")
        self.assertEqual(rejects.match(quince).kind, "fingerprint")
        self.assertEqual(RejectList.parse("QUINCE\n", "r").match(quince).kind, "nickname")
        self.assertEqual(RejectList.parse("192.0.2.0/28\n", "r").match(quince).kind, "address")
        literal = parsed("Quince", incoming=at("198.51.100.9"))
        self.assertEqual(RejectList.parse("198.51.100.9\n", "r").match(literal).kind, "address")

    def test_what_does_not_match(self) -> None:
        quince = parsed("Quince", incoming=at("quince.example.org", "192.0.2.7"))
        rejects = RejectList.parse(f"Rowan\n{FP}\n192.0.2.8\n2001:db8::/32\n", "r")
        self.assertIsNone(rejects.match(quince))
        # a host name is never resolved, even when it would resolve to a rejected address
        named = parsed("Quince", incoming=at("localhost"))
        self.assertIsNone(RejectList.parse("127.0.0.0/8\n", "r").match(named))

    def test_a_fingerprint_entry_is_named_before_a_nickname_entry(self) -> None:
        quince = parsed("Quince")
        rejects = RejectList.parse(f"quince\n{quince.fingerprint}\n", "r")
        self.assertEqual(rejects.match(quince).line, 2)


# --- the store -------------------------------------------------------------------------------------


class StoreTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.logs: list[tuple[str, str]] = []
        self.store = AuthorityStore(self.dir, NOW, log=lambda level, message: self.logs.append((level, message)))

    def test_upload_refused_with_a_message_and_not_stored(self) -> None:
        text = descriptor("Quince")
        fingerprint = parse_descriptor(text, NOW).fingerprint
        self.store.rejects = RejectList.parse("# note\nquince\n", "/etc/rejects")
        accepted, message = self.store.accept_upload(text, NOW)
        self.assertFalse(accepted)
        self.assertEqual(message, f"Server Quince ({fingerprint}) is on this authority's reject list: "
                                  "this authority refuses its descriptors and leaves it out of its votes.")
        self.assertEqual(self.store.all(), [])
        self.assertEqual(os.listdir(os.path.join(self.dir, "descriptors")), [])
        self.assertIsNone(self.store.owner_of("Quince"))  # the nickname is not bound either
        self.assertEqual(self.logs, [("info", f"refused descriptor of Quince ({fingerprint}, from upload): "
                                              "reject list nickname quince (/etc/rejects:2)")])

    def test_a_stored_server_leaves_the_vote_and_comes_back(self) -> None:
        self.store.accept_upload(descriptor("Quince"), NOW)
        self.store.accept_upload(descriptor("Rowan"), NOW)
        self.store.rejects = RejectList.parse("rowan\n", "r")
        self.assertEqual([d.nickname for d in self.store.descriptors(NOW)], ["Quince"])
        self.assertEqual(len(self.store.all()), 2)  # still on disk
        self.store.rejects = RejectList()
        self.assertEqual([d.nickname for d in self.store.descriptors(NOW)], ["Quince", "Rowan"])

    def test_the_reject_list_outranks_the_vote_file(self) -> None:
        votes = os.path.join(self.dir, "votes")
        text = descriptor("Quince")
        with open(votes, "w") as f:
            f.write(f"yes Quince {parse_descriptor(text, NOW).fingerprint}\n")
        store = AuthorityStore(self.dir, NOW, admission="manual", vote_file=votes,
                               rejects=RejectList.parse("Quince\n", "r"))
        self.assertFalse(store.accept_upload(text, NOW)[0])

    def test_publish_answer_over_http(self) -> None:
        settings = AuthoritySettings(base_dir=self.mktemp(), nickname="Auth0",
                                     rejects=RejectList.parse("Quince\n", "r"))
        client = HTTPClient(reactor, timeout=5)
        self.addCleanup(client.close)
        authority = Authority(settings, key("auth0"), task.Clock(), client, rng=base.rng)
        authority.clock.advance(NOW)
        request, body = base.render(PublishResource(authority), b"POST",
                                    args={b"desc": [descriptor("Quince").encode("ascii")]})
        self.assertEqual(request.responseCode, 200)  # §7.3: the answer is in the body
        self.assertTrue(body.startswith(b"Status: 0\nMessage: Server Quince ("), body)
        self.assertIn(b"reject list", body)


# --- three authorities on loopback -----------------------------------------------------------------


class LoopbackRounds(LogCase):
    """Three in-process authorities (``test_authority.RoundTests``' set-up:
    Quince uploaded to the first, Rowan to the second, Sorrel to the third),
    for round tests in other modules."""

    timeout = 60
    tearDown = base.RoundTests.tearDown
    run_round = base.RoundTests.run_round
    client_view = base.RoundTests.client_view

    def setUp(self) -> None:
        LogCase.setUp(self)
        base.RoundTests.setUp(self)  # type: ignore[arg-type]


class RoundTests(LoopbackRounds):
    """The reject list in voting rounds."""

    def reject(self, authority: Authority, text: str) -> None:
        authority.store.rejects = RejectList.parse(text, f"rejects-{authority.settings.nickname}")

    def listed(self) -> set[str]:
        texts = {a.directory for a in self.auths}
        self.assertEqual(len(texts), 1)
        view = self.client_view(texts.pop(), threshold=3)
        self.assertEqual(len(view.signers), 3)
        return {d.nickname for d in view.descriptors}

    @defer.inlineCallbacks
    def test_rejected_by_two_of_three_never_enters(self):
        sorrel = self.auths[2].store.all()[0]
        self.reject(self.auths[0], f"{sorrel.fingerprint}\n")
        self.reject(self.auths[1], "sorrel\n")
        yield self.run_round(self.auths, NOW)
        for authority in self.auths[:2]:  # not imported from the third one's vote
            self.assertFalse(authority.store.has(sorrel.digest))
        yield self.run_round(self.auths, NOW + 3)
        self.assertEqual(self.listed(), {"Quince", "Rowan"})
        self.assertNotIn("sorrel", self.client_view(self.auths[0].directory).info.recommended_nicknames)

    @defer.inlineCallbacks
    def test_rejected_by_one_stays_and_that_one_signs(self):
        self.reject(self.auths[0], "sorrel\n")
        yield self.run_round(self.auths, NOW)
        yield self.run_round(self.auths, NOW + 3)
        self.assertEqual(self.listed(), {"Quince", "Rowan", "Sorrel"})
        self.assertNotIn("Sorrel", self.auths[0].vote_text)
        self.assertIn("The consensus lists 1 server(s) on our reject list, voted for by enough "
                      "other authorities: Sorrel", self.logged())

    @defer.inlineCallbacks
    def test_listed_then_rejected_by_two_leaves(self):
        yield self.run_round(self.auths, NOW)
        yield self.run_round(self.auths, NOW + 3)
        self.assertEqual(self.listed(), {"Quince", "Rowan", "Sorrel"})
        self.reject(self.auths[1], "sorrel\n")
        self.reject(self.auths[2], "Sorrel\n")  # its own upload: on disk, out of its vote
        yield self.run_round(self.auths, NOW + 6)
        self.assertEqual(self.listed(), {"Quince", "Rowan"})
        self.assertEqual(len(self.auths[2].store.all()), 3)


# --- SIGHUP ----------------------------------------------------------------------------------------


class ReloadTests(LogCase):
    def setUp(self) -> None:
        super().setUp()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.conf = os.path.join(self.dir, "authority.conf")
        self.rejects = os.path.join(self.dir, "rejects")
        self.write("Quince\n")
        self.configure("RejectFile: rejects\n")
        settings = load_authority_config(self.conf)
        client = HTTPClient(reactor, timeout=5)
        self.addCleanup(client.close)
        self.authority = Authority(settings, key("auth0"), task.Clock(), client, rng=base.rng)
        self.service = ReloadService(self.authority, self.conf, reactor)
        self.since = len(self.logs)  # only what the reload says

    def configure(self, extra: str) -> None:
        with open(self.conf, "w") as f:
            f.write(f"[Authority]\nBaseDir: base\nNickname: Auth0\nPort: 48080\n{extra}")

    def write(self, text: str) -> None:
        with open(self.rejects, "w") as f:
            f.write(text)

    def test_relative_to_the_configuration_file(self) -> None:
        self.assertEqual(self.authority.settings.reject_file, self.rejects)
        self.assertEqual(self.authority.settings.config_file, self.conf)
        self.assertEqual(self.authority.store.rejects.summary(), "1 entry (1 nickname)")

    def test_edited_list_is_applied(self) -> None:
        self.write("Quince\n# later\nRowan\n192.0.2.0/24\n")
        self.assertEqual(self.service.reload(), ["RejectFile"])
        self.assertIsNotNone(self.authority.store.rejects.match(parsed("Rowan")))
        self.assertEqual(self.logged(), [
            f"SIGHUP: reject list {self.rejects} applied: 3 entries (2 nickname, 1 address)",
            "SIGHUP: applied RejectFile"])

    def test_unchanged_list_is_not_said_to_be_applied(self) -> None:
        self.write("# a comment moves it\nQuince\n")
        self.assertEqual(self.service.reload(), [])
        self.assertEqual(self.authority.store.rejects.entries[0].line, 2)  # the log names the new line
        self.assertEqual(self.logged(), [f"SIGHUP: nothing to apply; reject list {self.rejects}: "
                                         "1 entry (1 nickname)"])

    def test_bad_line_keeps_the_old_list(self) -> None:
        old = self.authority.store.rejects
        self.write("Rowan\nno_such thing\n")
        self.assertIsNone(self.service.reload())
        self.assertIs(self.authority.store.rejects, old)
        [warning] = self.logged(LogLevel.warn)
        self.assertEqual(warning, "SIGHUP: configuration not reloaded, still running on the old one: "
                                  f'{self.rejects}:2: "no_such thing" is not a fingerprint (40 hex '
                                  "digits), a nickname (1-24 letters, digits and '-', starting with a "
                                  "letter) or an address network (e.g. 192.0.2.0/24, 2001:db8::/32); "
                                  "one entry a line")

    def test_missing_file_keeps_the_old_list(self) -> None:
        os.unlink(self.rejects)
        self.assertIsNone(self.service.reload())
        [warning] = self.logged(LogLevel.warn)
        self.assertIn(f"authority.conf:5: [Authority] RejectFile: cannot read {self.rejects}: "
                      "No such file or directory", warning)

    def test_what_needs_a_restart_is_only_said(self) -> None:
        self.configure("RejectFile: rejects\nThreshold: 1\nLogLevel: INFO\n")
        with open(self.conf) as f:
            text = f.read()
        with open(self.conf, "w") as f:
            f.write(text.replace("Port: 48080", "Port: 48081"))
        self.assertEqual(self.service.reload(), [])
        self.assertEqual(self.authority.settings.port, 48080)
        self.assertIsNone(self.authority.settings.threshold)
        self.assertEqual(self.logged(LogLevel.warn), [
            "SIGHUP: [Authority] Port changed; it takes effect after a restart",
            "SIGHUP: [Authority] Threshold changed; it takes effect after a restart"])
        self.assertFalse([line for line in self.logged() if "applied" in line])

    def test_live_options(self) -> None:
        levels: list[str] = []
        self.patch(reload_module, "set_log_level", levels.append)
        self.configure("RejectFile: rejects\nLogLevel: debug\nAdmission: manual\nVoteFile: votes\n"
                       "ClientVersions: 0.1.0, 0.1.1\nServerVersions: 0.1.1\n")
        self.assertEqual(self.service.reload(), ["Admission", "VoteFile", "ClientVersions",
                                                 "ServerVersions", "LogLevel"])
        self.assertEqual(levels, ["DEBUG"])
        store = self.authority.store
        self.assertEqual(store.admission, "manual")
        self.assertEqual(store.votes.path, os.path.join(self.dir, "base", "votes"))
        vote = self.authority.make_vote(NOW)
        self.assertIn("MixminionClient: 0.1.0, 0.1.1\nMixminionServer: 0.1.1\n", vote)

    def test_the_plugin_reloads_from_its_file_on_sighup(self) -> None:
        options = tap.Options()
        options.parseOptions(["-c", self.conf])
        svc = tap.makeService(options)
        self.addCleanup(svc.authority.client.close)
        [reloader] = [s for s in svc if isinstance(s, ReloadService)]
        self.assertEqual(reloader.config_path, self.conf)
        [hup] = [s for s in svc if isinstance(s, SignalService) and s.signum == signal.SIGHUP]
        self.assertEqual(hup.action, reloader.reload)
        before = signal.getsignal(signal.SIGHUP)
        hup.privilegedStartService()
        self.assertIsNot(signal.getsignal(signal.SIGHUP), before)
        hup.stopService()
        self.assertIs(signal.getsignal(signal.SIGHUP), before)

    def test_start_up_stops_at_a_bad_line(self) -> None:
        self.write("Quince\n\n10.0.0.0/8 192.0.2.0/24\n")
        options = tap.Options()
        options.parseOptions(["-c", self.conf])
        with self.assertRaises(SystemExit) as caught:
            tap.makeService(options)
        self.assertEqual(str(caught.exception.code),
                         f'mixminion-directory: {self.rejects}:3: "10.0.0.0/8 192.0.2.0/24" is not an '
                         "address or network (e.g. 192.0.2.7, 192.0.2.0/24, 2001:db8::/32); one entry a line")


# --- the schema, the example and the manual ----------------------------------------------------------


def _documented(path: str) -> dict[str, str]:
    """Each ``#Key: value`` or ``Key: value`` line of an example file, with
    the comment block just above it: ``{key: "comment\\nKey: value"}``."""
    found: dict[str, str] = {}
    comment: list[str] = []
    with open(path) as f:
        for line in f:
            entry = re.match(r"#?([A-Za-z][A-Za-z0-9-]*):\s", line)
            if entry and entry.group(1) in {o.key for o in AUTHORITY_SCHEMA.options}:
                found.setdefault(entry.group(1), " ".join(comment) + "\n" + line.lstrip("#").strip())
            elif line.startswith("#"):
                comment.append(line[1:].strip())
            else:
                comment = []
    return found


def _manual_items(path: str) -> dict[str, str]:
    """The ``.TP`` items of the CONFIGURATION section: ``{key: text}``."""
    with open(path) as f:
        page = f.read()
    section = page.split(".SH CONFIGURATION\n", 1)[1].split("\n.SH ", 1)[0]
    items: dict[str, str] = {}
    for item in section.split(".TP\n")[1:]:
        tag, _, body = item.partition("\n")
        for word in re.findall(r"[A-Za-z]+", tag):
            items[word] = " ".join(body.split())
    return items


class SchemaTests(unittest.TestCase):
    CONF = os.path.join(REPO, "etc", "authority.conf")
    MAN = os.path.join(REPO, "doc", "mixminion-directory.8")

    def test_every_option_is_a_field_with_one_way_to_its_effect(self) -> None:
        fields = AuthoritySettings.__dataclass_fields__
        for option in AUTHORITY_SCHEMA.options:
            self.assertIn(option.name, fields, option.key)
            self.assertEqual(bool(option.reload) + bool(option.consumer), 1, option.key)
            if option.reload:
                self.assertTrue(callable(applier(option.reload)), option.key)
            else:
                module, _, name = option.consumer.partition(":")
                self.assertTrue(hasattr(importlib.import_module(module), name), option.consumer)
            if option.default is not None:
                option.type.parse(option.default)

    def test_the_example_mentions_every_option_with_its_default_and_effect(self) -> None:
        documented = _documented(self.CONF)
        for option in AUTHORITY_SCHEMA.options:
            self.assertIn(option.key, documented, f"{option.key} missing from etc/authority.conf")
            comment, written = documented[option.key].rsplit("\n", 1)
            self.assertEqual("SIGHUP applies it" in comment, option.effect == "reload", option.key)
            self.assertEqual("restart applies a change" in comment, option.effect != "reload",
                             option.key)
            if option.default is not None:
                shown = option.type.parse(written.split(":", 1)[1].strip())
                self.assertEqual(shown, AUTHORITY_SCHEMA.default(option.key), option.key)

    def test_the_example_parses(self) -> None:
        with open(self.CONF, "rb") as f:
            data = f.read()
        self.assertFalse(re.search(rb"[^\x20-\x7e\n]", data))
        settings = parse_authority_config(data, self.CONF)
        self.assertEqual(settings.nickname, "Quorum1")

    def test_the_manual_describes_every_option_and_its_effect(self) -> None:
        items = _manual_items(self.MAN)
        for option in AUTHORITY_SCHEMA.options:
            self.assertIn(option.key, items, f"{option.key} missing from mixminion-directory.8")
            body = items[option.key].lower()
            self.assertEqual("sighup applies it" in body, option.effect == "reload", option.key)
            self.assertEqual("a restart applies a change" in body, option.effect != "reload",
                             option.key)
