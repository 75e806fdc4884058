"""The nymserver's SMTP listener over a real socket, with the standard
library's SMTP client: the codes it answers, what it keeps, and no
traceback for anything a sender can cause (doc/nym.md §1, §3)."""

from __future__ import annotations

import smtplib
from typing import Any, Optional

from twisted.internet import defer, reactor, threads
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

from mixminion.exits.nym.nymserver import NymSettings
from mixminion.exits.nym.smtpin import nym_smtp_factory

DOMAIN = "nym.example.org"


class FakeReceiver:
    """Nyms ``alice`` (takes mail), ``full`` (452), ``closed`` (550 at
    DATA); ``broken`` fails with an error of its own at DATA."""

    def __init__(self) -> None:
        self.settings = NymSettings(DOMAIN, max_message_size=2000)
        self.kept: list[tuple[str, bytes]] = []

    def check_recipient(self, name: str) -> defer.Deferred:
        answers: dict[str, Optional[tuple[int, str]]] = {
            "alice": None, "closed": None, "broken": None,
            "full": (452, "this nym holds as much mail as it can; try later")}
        return defer.succeed(answers.get(name, (550, "no such nym here")))

    async def accept_mail(self, name: str, text: bytes) -> Optional[tuple[int, str]]:
        if name == "broken":
            raise OSError("No space left on device")
        if name == "closed":
            return 550, "this nym has no reply block left and does not hold mail"
        self.kept.append((name, text))
        return None


class ListenerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.receiver = FakeReceiver()
        self.port = reactor.listenTCP(0, nym_smtp_factory(self.receiver), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def send(self, to: str, body: str = "Subject: hi\n\nhello\n") -> defer.Deferred:
        """(code, text) of each step that refused, or None when kept."""
        def talk() -> Any:
            with smtplib.SMTP("127.0.0.1", self.port.getHost().port, timeout=10) as client:
                try:
                    client.sendmail("bob@example.com", [to], body)
                except smtplib.SMTPRecipientsRefused as exc:
                    return exc.recipients[to]
                except smtplib.SMTPDataError as exc:
                    return exc.smtp_code, exc.smtp_error
            return None
        return threads.deferToThread(talk)

    async def test_mail_for_a_nym_is_kept_with_its_sender(self) -> None:
        self.assertIsNone(await self.send("Alice@NYM.example.org"))
        [(name, text)] = self.receiver.kept
        self.assertEqual(name, "alice")
        self.assertTrue(text.startswith(b"Return-Path: <bob@example.com>\n"))
        self.assertIn(b"Received: by nym.example.org (mixminion nymserver);", text)
        self.assertNotIn(b"127.0.0.1", text, "no client address")
        self.assertTrue(text.endswith(b"Subject: hi\n\nhello\n"))
        said = " ".join(formatEvent(e) for e in self.events
                        if e.get("log_level", LogLevel.info) > LogLevel.debug)
        self.assertNotIn("bob@example.com", said, "no address in the log above debug")
        self.assertNotIn("alice", said.lower())

    async def test_refusals_have_the_nymservers_codes(self) -> None:
        for to, code in (("nobody@nym.example.org", 550), ("alice@other.example", 550),
                         ("-bad@nym.example.org", 550), ("full@nym.example.org", 452)):
            answer = await self.send(to)
            self.assertEqual(answer[0], code, to)
        code, text = await self.send("closed@nym.example.org")
        self.assertEqual((code, text), (550, b"this nym has no reply block left and does not "
                                             b"hold mail"))
        code, _ = await self.send("alice@nym.example.org", "x" * 3000)
        self.assertEqual(code, 552)
        self.assertEqual(self.receiver.kept, [])

    async def test_a_failure_of_ours_is_451_and_one_line(self) -> None:
        code, _ = await self.send("broken@nym.example.org")
        self.assertEqual(code, 451)
        warnings = [e for e in self.events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(self.flushLoggedErrors(), [])
