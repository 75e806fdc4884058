"""Exit modules (server.md §9): item decoding, dispatch, mail formatting,
blacklist, SMTP against a real in-process SMTP server on loopback, MBOX,
DROP, FRAGMENT reassembly across restarts, and plugin discovery."""

from __future__ import annotations

import base64
import dataclasses
import email
import email.policy
import importlib
import os
import random
import shutil
import sys
import tempfile
import textwrap
from typing import Any, Optional

from twisted.internet import defer, protocol, reactor, task
from twisted.logger import LogLevel
from twisted.mail import smtp
from twisted.trial import unittest
from zope.interface import implementer

import mixminion.plugins
from mixminion.codec.build import encode_message_payloads
from mixminion.codec.compression import compress
from mixminion.codec.errors import BuildError
from mixminion.codec.exit import (
    BINARY,
    ENCRYPTED,
    FRAGMENT,
    OVERCOMPRESSED,
    PLAINTEXT,
    Corrupt,
    Encrypted,
    FragmentPiece,
    Overcompressed,
    Plain,
    parse_text_message,
)
from mixminion.codec.exit_headers import encode_message
from mixminion.codec.fragments import fragment_message, server_side_prefix
from mixminion.codec.payload import PAYLOAD_LEN, encode_singleton, parse_payload
from mixminion.codec.routing import DROP_TYPE, FRAGMENT_TYPE, MBOX_TYPE, SMTP_TYPE
from mixminion.exits import (
    BrokenExitPlugin,
    DeliveryItem,
    DeliveryResult,
    ExitConfigError,
    ExitContext,
    MissingExitModule,
    UndeliverableItem,
    make_delivery_item,
    make_reassembled_item,
)
from mixminion.exits.blacklist import Blacklist
from mixminion.exits.drop import DropModule
from mixminion.exits.fragment import DAY
from mixminion.exits.interfaces import ExitModuleBase
from mixminion.exits.mail import MailOptions, format_mail, one_line
from mixminion.exits.mbox import MBOXModule, parse_address_file
from mixminion.exits.mta import mbox_quote, smtp_data
from mixminion.config.intervals import parse_retry_schedule as parse_schedule
from mixminion.config.values import parse_size
from mixminion.exits.registry import Dispatcher, build_dispatcher, find_exit_modules
from mixminion.exits.smtp import SMTPModule
from mixminion.mmtp.stats import MMTPStats
from mixminion.server.delivery import Delivery
from mixminion.server.queues import delivery_queue
from mixminion.test.test_mmtp_protocol import LogMixin
from mixminion.testing.fakes import scratch_store

TAG = bytes(range(1, 21))
RETURN = "noreply@mix.example"
TEST_TYPE = 0x7F00


def rng_of(seed: int):
    return random.Random(seed).randbytes


def singleton(body: bytes, headers: Optional[dict] = None, seed: int = 1) -> bytes:
    return encode_singleton(compress(encode_message(headers or {}, body)), rng_of(seed))


def printable_noise(n: int, seed: int = 7) -> bytes:
    """``n`` bytes of text that barely compresses, in lines of 76."""
    return base64.encodebytes(rng_of(seed)(n * 3 // 4 + 3))[:n]


def plain_item(body: bytes, headers: Optional[dict] = None, address: bytes = b"bob@example.com",
               exit_type: int = SMTP_TYPE) -> DeliveryItem:
    return make_delivery_item(exit_type, TAG + address, singleton(body, headers), b"k" * 16, 0.0)


def header_block(text: bytes) -> list[bytes]:
    return text.split(b"\n\n", 1)[0].split(b"\n")


def remove_plugin_caches() -> None:
    """Delete the ``dropin.cache`` files plugin discovery wrote."""
    for directory in mixminion.plugins.__path__:
        cache = os.path.join(directory, "dropin.cache")
        if os.path.exists(cache):
            os.remove(cache)


class Harness:
    """A base directory, a clock, counters and a context."""

    def __init__(self, case: unittest.TestCase, clock: Any = None) -> None:
        case.addCleanup(remove_plugin_caches)
        self.base = os.path.abspath(case.mktemp())
        os.makedirs(self.base)
        self.clock = clock if clock is not None else task.Clock()
        self.counters = MMTPStats()
        self.context = ExitContext(self.base, self.clock, reactor, counters=self.counters)

    def path(self, name: str) -> str:
        return os.path.join(self.base, name)

    def write(self, name: str, text: str) -> str:
        with open(self.path(name), "w") as f:
            f.write(text)
        return self.path(name)


# --- the loopback MTA -----------------------------------------------------------------


@implementer(smtp.IMessage)
class _Message:
    def __init__(self, box: list, sender: str, recipient: str) -> None:
        self.box, self.sender, self.recipient, self.lines = box, sender, recipient, []

    def lineReceived(self, line: bytes) -> None:  # noqa: N802
        self.lines.append(line)

    def eomReceived(self) -> defer.Deferred:  # noqa: N802
        self.box.append((self.sender, self.recipient, b"".join(line + b"\n" for line in self.lines)))
        return defer.succeed(None)

    def connectionLost(self) -> None:  # noqa: N802
        pass


@implementer(smtp.IMessageDelivery)
class _Delivery:
    def __init__(self) -> None:
        self.received: list[tuple[str, str, bytes]] = []
        self.refuse: dict[str, int] = {}

    def receivedHeader(self, helo, origin, recipients):  # noqa: N802
        return None

    def validateFrom(self, helo, origin):  # noqa: N802
        return origin

    def validateTo(self, user):  # noqa: N802
        address = str(user.dest)
        if address in self.refuse:
            raise smtp.SMTPBadRcpt(user, code=self.refuse[address])
        sender = str(user.orig)
        return lambda: _Message(self.received, sender, address)


class _MTAFactory(protocol.ServerFactory):
    def __init__(self, delivery: _Delivery) -> None:
        self.delivery = delivery
        self.open: list[defer.Deferred] = []

    def buildProtocol(self, addr):  # noqa: N802
        p = smtp.ESMTP()
        p.delivery = self.delivery
        p.host = b"mta.test"
        p.factory = self
        lost: defer.Deferred = defer.Deferred()
        self.open.append(lost)
        original = p.connectionLost

        def connection_lost(reason):
            original(reason)
            lost.callback(None)

        p.connectionLost = connection_lost
        return p


class LoopbackMTA:
    """A real SMTP server (``twisted.mail.smtp.ESMTP``) on 127.0.0.1 that
    records the envelope and the data of every message."""

    def __init__(self, case: unittest.TestCase) -> None:
        self.delivery = _Delivery()
        self.factory = _MTAFactory(self.delivery)
        self.listening = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.port = self.listening.getHost().port
        case.addCleanup(self.stop)

    @property
    def received(self) -> list[tuple[str, str, bytes]]:
        return self.delivery.received

    def stop(self) -> defer.Deferred:
        d = defer.DeferredList(list(self.factory.open))
        d.addCallback(lambda _: self.listening.stopListening())
        return d


def unused_port() -> int:
    """A loopback port nobody listens on."""
    port = reactor.listenTCP(0, protocol.ServerFactory(), interface="127.0.0.1")
    number = port.getHost().port
    port.stopListening()
    return number


def smtp_section(port: int, **extra: Any) -> dict[str, Any]:
    section = {"Enabled": "yes", "ReturnAddress": RETURN, "SMTPServer": "127.0.0.1", "SMTPPort": str(port)}
    section.update(extra)
    return section


# --- §9.1 items, §9.2 dispatch ------------------------------------------------------------


class Items(unittest.TestCase):
    def test_tag_split(self) -> None:
        item = plain_item(b"hi\n")
        self.assertEqual((item.tag, item.address), (TAG, b"bob@example.com"))
        self.assertIsInstance(item.classification, Plain)
        self.assertEqual(item.kind, "plain")
        self.assertEqual(item.application_key, b"k" * 16)

    def test_exactly_twenty_bytes_gives_empty_address(self) -> None:
        item = make_delivery_item(MBOX_TYPE, TAG, singleton(b"x"))
        self.assertEqual((item.tag, item.address), (TAG, b""))

    def test_short_routing_info_is_undeliverable(self) -> None:
        self.assertRaises(UndeliverableItem, make_delivery_item, SMTP_TYPE, TAG[:19], singleton(b"x"))
        self.assertRaises(UndeliverableItem, make_delivery_item, TEST_TYPE, b"", singleton(b"x"))

    def test_tagless_types(self) -> None:
        for exit_type in (FRAGMENT_TYPE, DROP_TYPE):
            item = make_delivery_item(exit_type, b"abc", singleton(b"x"))
            self.assertEqual((item.tag, item.address), (b"", b"abc"))
        item = make_delivery_item(TEST_TYPE, b"short", singleton(b"x"), uses_tag=False)
        self.assertEqual((item.tag, item.address), (b"", b"short"))

    def test_classifications(self) -> None:
        self.assertIsInstance(make_delivery_item(SMTP_TYPE, TAG, rng_of(3)(PAYLOAD_LEN)).classification,
                              Encrypted)
        bomb = encode_singleton(compress(b"\0" * 1_000_000), rng_of(4))
        self.assertIsInstance(make_delivery_item(SMTP_TYPE, TAG, bomb).classification, Overcompressed)
        bad_zlib = encode_singleton(b"\x78\xda" + b"\xff" * 40, rng_of(5))
        item = make_delivery_item(SMTP_TYPE, TAG, bad_zlib)
        self.assertIsInstance(item.classification, Corrupt)
        self.assertTrue(item.is_corrupt)
        frag = fragment_message(printable_noise(40000), rng_of(6))[0]
        self.assertIsInstance(make_delivery_item(FRAGMENT_TYPE, b"", frag).classification, FragmentPiece)

    def test_reassembled_item(self) -> None:
        item = make_reassembled_item(SMTP_TYPE, b"a@b.example", compress(b"\nbody"), 5.0)
        self.assertEqual((item.tag, item.address, item.reassembled, item.queued_at),
                         (b"", b"a@b.example", True, 5.0))
        self.assertEqual(item.classification.body, b"body")
        # 20 x the compressed length, not the singleton minimum of 20 KiB
        zeros = compress(b"\0" * 15000)
        self.assertIsInstance(make_reassembled_item(SMTP_TYPE, b"", zeros).classification, Overcompressed)


class RecordingModule(ExitModuleBase):
    """A test module: records items, answers from a script."""

    name = "RECORD"
    exit_types = frozenset({TEST_TYPE})
    retry_schedule = [600, 600, 600]

    def __init__(self, answers=(), exit_types=None, uses_tag=True) -> None:
        self.items: list[DeliveryItem] = []
        self.answers = list(answers)
        self.uses_tag = uses_tag
        if exit_types is not None:
            self.exit_types = frozenset(exit_types)

    def deliver(self, item):
        self.items.append(item)
        answer = self.answers.pop(0) if self.answers else DeliveryResult.OK
        if isinstance(answer, Exception):
            raise answer
        return defer.succeed(answer)


class Dispatch(unittest.TestCase):
    def setUp(self) -> None:
        self.h = Harness(self)
        self.dispatcher = Dispatcher(self.h.context)
        self.module = RecordingModule()
        self.dispatcher.add_module(self.module)

    @defer.inlineCallbacks
    def test_delivers_to_module(self):
        result = yield self.dispatcher.deliver_payload(TEST_TYPE, TAG + b"addr", singleton(b"x"), b"", 3.0)
        self.assertIs(result, DeliveryResult.OK)
        self.assertEqual(self.module.items[0].address, b"addr")
        self.assertEqual(self.h.counters["ExitDelivered:RECORD"], 1)

    @defer.inlineCallbacks
    def test_module_tag_rule_used(self):
        self.module.uses_tag = False
        yield self.dispatcher.deliver_payload(TEST_TYPE, b"tiny", singleton(b"x"))
        self.assertEqual((self.module.items[0].tag, self.module.items[0].address), (b"", b"tiny"))

    @defer.inlineCallbacks
    def test_short_routing_info_dropped(self):
        result = yield self.dispatcher.deliver_payload(TEST_TYPE, b"tiny", singleton(b"x"))
        self.assertIs(result, DeliveryResult.NORETRY)
        self.assertEqual(self.module.items, [])
        self.assertEqual(self.h.counters["ExitUndeliverable"], 1)

    @defer.inlineCallbacks
    def test_unknown_type_dropped(self):
        result = yield self.dispatcher.deliver(make_delivery_item(0x7777, TAG, singleton(b"x")))
        self.assertIs(result, DeliveryResult.NORETRY)
        self.assertEqual(self.h.counters["ExitUnknownType"], 1)

    @defer.inlineCallbacks
    def test_corrupt_dropped_never_delivered(self):
        bad = encode_singleton(b"\x78\xda" + b"\xff" * 40, rng_of(5))
        result = yield self.dispatcher.deliver_payload(TEST_TYPE, TAG, bad)
        self.assertIs(result, DeliveryResult.NORETRY)
        self.assertEqual(self.module.items, [])
        self.assertEqual(self.h.counters["ExitCorrupt"], 1)

    @defer.inlineCallbacks
    def test_results_and_exceptions(self):
        self.module.answers = [DeliveryResult.RETRY, DeliveryResult.NORETRY, RuntimeError("boom"), "junk"]
        results = []
        for _ in range(4):
            results.append((yield self.dispatcher.deliver_payload(TEST_TYPE, TAG, singleton(b"x"))))
        R = DeliveryResult
        self.assertEqual(results, [R.RETRY, R.NORETRY, R.NORETRY, R.NORETRY])
        self.assertEqual(self.h.counters["ExitModuleError:RECORD"], 2)
        self.assertEqual(self.h.counters["ExitRetry:RECORD"], 1)
        self.assertEqual(self.h.counters["ExitFailed:RECORD"], 3)

    def test_conflicting_modules(self):
        self.assertRaises(ExitConfigError, self.dispatcher.add_module, RecordingModule())

    def test_broken_module_rejected(self):
        @implementer(mixminion.exits.IExitModule)
        class NoAdvertise:
            name, exit_types, priority, uses_tag, retry_schedule = "HALF", frozenset({0x7F01}), 0, False, []

            def configure(self, section, context): ...
            def deliver(self, item): ...
            def flush(self): ...
            def stop(self): ...

        e = self.assertRaises(BrokenExitPlugin, self.dispatcher.add_module, NoAdvertise())
        self.assertIn("advertise", str(e))
        self.assertIsNone(self.dispatcher.module_for(0x7F01))

    @defer.inlineCallbacks
    def test_drop_module(self):
        drop = DropModule()
        drop.configure({}, self.h.context)
        self.dispatcher.add_module(drop)
        result = yield self.dispatcher.deliver_payload(DROP_TYPE, b"anything", singleton(b"x"))
        self.assertIs(result, DeliveryResult.OK)
        self.assertEqual((drop.dropped, self.h.counters["ExitDropModule"]), (1, 1))
        self.assertIsNone(drop.advertise())
        self.assertRaises(ExitConfigError, DropModule().configure, {"Foo": "bar"}, self.h.context)


# --- options and retry ---------------------------------------------------------------------


class Options(unittest.TestCase):
    def test_sizes(self):
        self.assertEqual(parse_size("100K"), 102400)
        self.assertEqual(parse_size("2 MB"), 2 << 20)
        self.assertEqual(parse_size("1 GB"), 1 << 30)
        self.assertEqual(parse_size("512 bytes"), 512)
        self.assertEqual(parse_size("77"), 77)
        for bad in ("1 GBX", "10 parsecs", "K", "1 K 2"):
            self.assertRaises(ValueError, parse_size, bad)

    def test_schedules(self):
        self.assertEqual(parse_schedule("7 hours for 6 days"), (25200,) * 21)
        self.assertEqual(parse_schedule("every 1 hour for 1 day, 7 hours for 5 days"),
                         (3600,) * 24 + (25200,) * 18)
        self.assertEqual(parse_schedule("10 min, .5 hour"), (600, 1800))
        self.assertRaises(ValueError, parse_schedule, "every 1 hour")


# --- §9.3 mail formatting ------------------------------------------------------------------


class MailFormat(unittest.TestCase):
    options = MailOptions(return_address=RETURN, x_abuse="abuse@mix.example")

    def test_plaintext_exact(self):
        headers = {"SUBJECT": "Greetings", "FROM": "Alice", "IN-REPLY-TO": "<1@x>",
                   "REFERENCES": "<0@x> <1@x>"}
        item = plain_item(b"Hello Bob,\n-- \nAlice\n", headers)
        self.assertEqual(format_mail(item, "bob@example.com", self.options), textwrap.dedent("""\
            To: bob@example.com
            From: "[Anon] Alice" <noreply@mix.example>
            Subject: Greetings
            In-Reply-To: <1@x>
            References: <0@x> <1@x>
            X-Anonymous: yes
            X-Abuse: abuse@mix.example

            -----BEGIN TYPE III ANONYMOUS MESSAGE-----
            Message-type: plaintext

            Hello Bob,
            - -- 
            Alice
            -----END TYPE III ANONYMOUS MESSAGE-----
            """).encode())

    def test_defaults_disclaimer_and_folding(self):
        options = MailOptions(
            return_address=RETURN, from_tag="[Mix]",
            comments="This message was sent through an anonymous remailer; its sender cannot be "
                     "traced by this server.",
            disclaimer="This message was sent anonymously. Replies to the From address are discarded; "
                       "to stop receiving anonymous mail write to the operator.")
        text = format_mail(plain_item(b"no final newline"), "bob@example.com", options)
        self.assertEqual(text, textwrap.dedent("""\
            To: bob@example.com
            From: noreply@mix.example
            Subject: Type III Anonymous Message
            X-Anonymous: yes
            Comments: This message was sent through an anonymous remailer; its
                sender cannot be traced by this server.

            This message was sent anonymously. Replies to the From address are
            discarded; to stop receiving anonymous mail write to the operator.

            -----BEGIN TYPE III ANONYMOUS MESSAGE-----
            Message-type: plaintext

            no final newline
            -----END TYPE III ANONYMOUS MESSAGE-----
            """).encode())
        text = format_mail(plain_item(b"x", {"FROM": "Alice"}), "bob@example.com", options)
        self.assertIn(b'From: "[Mix] Alice" <noreply@mix.example>\n', text)
        refused = MailOptions(return_address=RETURN, allow_from=False, subject_line="Anon mail")
        text = format_mail(plain_item(b"x", {"FROM": "Alice"}), "bob@example.com", refused)
        self.assertIn(b"From: noreply@mix.example\nSubject: Anon mail\n", text)

    def _roundtrip(self, item: DeliveryItem, expected_type: str, contents: bytes) -> bytes:
        text = format_mail(item, "bob@example.com", self.options)
        parsed = parse_text_message(text)
        self.assertEqual(parsed.message_type, expected_type)
        self.assertEqual(parsed.contents, contents)
        return text

    def test_encrypted(self):
        payload = rng_of(3)(PAYLOAD_LEN)
        item = make_delivery_item(SMTP_TYPE, TAG + b"bob@example.com", payload)
        text = self._roundtrip(item, ENCRYPTED, payload)
        self.assertEqual(parse_text_message(text).tag, TAG)
        self.assertIn(b"It is a reply to one of your reply\nblocks", text)
        self.assertIn(b"Decoding-handle: " + base64.b64encode(TAG) + b"\n", text)

    def test_overcompressed(self):
        compressed = compress(b"\0" * 1_000_000)
        item = make_delivery_item(SMTP_TYPE, TAG + b"b@c.example", encode_singleton(compressed, rng_of(1)))
        text = self._roundtrip(item, OVERCOMPRESSED, compressed)
        self.assertIn(b"factor of 20", text)

    def test_binary(self):
        body = bytes(range(256)) * 4
        text = self._roundtrip(plain_item(body), BINARY, body)
        self.assertIn(b"base64-encoded", text)

    def test_fragment_delivered_raw(self):
        frag = fragment_message(printable_noise(40000), rng_of(6))[0]
        item = make_delivery_item(SMTP_TYPE, TAG + b"b@c.example", frag)
        text = self._roundtrip(item, FRAGMENT, frag)
        self.assertIn(b"one fragment of a larger message", text)

    def test_long_lines_are_base64(self):
        body = b"short line\n" + b"x" * 997 + b"\n"
        text = self._roundtrip(plain_item(body), BINARY, body)
        self.assertIn(b"lines are too long for e-mail", text)
        self.assertLessEqual(max(len(line) for line in text.split(b"\n")), 998)
        body = b"-" + b"x" * 995 + b"\n"  # 998 with the dash escape
        self._roundtrip(plain_item(body), PLAINTEXT, body)

    def test_plaintext_has_no_explanation(self):
        text = format_mail(plain_item(b"hello\n"), "bob@example.com", self.options)
        self.assertIn(b"X-Abuse: abuse@mix.example\n\n-----BEGIN", text)

    def test_corrupt_is_never_formatted(self):
        bad = make_delivery_item(SMTP_TYPE, TAG, encode_singleton(b"\x78\xda" + b"\xff" * 40, rng_of(5)))
        self.assertRaises(BuildError, format_mail, bad, "bob@example.com", self.options)

    def test_cr_never_reaches_the_mta(self):
        text = format_mail(plain_item(b"a\r\n.\r\nb\rc\n"), "bob@example.com", self.options)
        self.assertNotIn(b"\r", text)
        self.assertIn(b"a\n.\nb\nc\n", text)

    def test_one_line(self):
        self.assertEqual(one_line("a\r\nb\tc\x00d\x7f  e"), "a b c d e")
        self.assertEqual(one_line("caf\u00e9 \u2028x\u0085y"), "caf? x y")
        self.assertEqual(one_line(b"\xff\r\n"), "?")
        self.assertEqual(len(one_line("x" * 2000)), 900)


INJECTIONS = {
    "SUBJECT": "Hi\r\nBcc: victim@example.org\r\n\r\nforged body",
    "FROM": 'Eve" <eve@evil.example>\r\nTo: victim@example.org\n\\',
    "IN-REPLY-TO": "<1@x>\nX-Injected: yes\x00",
    "REFERENCES": "<2@x>\u2028Reply-To: eve@evil.example\u0085\rX-Injected: 2",
}
_HEADER_LINE = b"^[A-Za-z-]+: [\x20-\x7e]*$"


class HeaderInjection(unittest.TestCase):
    """Sender-controlled values can never add a header or end the header
    block: each becomes one line of printable ASCII."""

    def check(self, text: bytes) -> None:
        lines = header_block(text)
        self.assertEqual([line.split(b":")[0] for line in lines],
                         [b"To", b"From", b"Subject", b"In-Reply-To", b"References", b"X-Anonymous"])
        for line in lines:
            self.assertRegex(line, _HEADER_LINE)
        head = text.split(b"\n\n", 1)[0]
        self.assertNotIn(b"\r", head)
        self.assertNotIn(b"\nBcc", head)
        self.assertNotIn(b"\nX-Injected", head)
        parsed = email.message_from_bytes(text, policy=email.policy.default)
        self.assertEqual(sorted(parsed.keys()),
                         sorted(["To", "From", "Subject", "In-Reply-To", "References", "X-Anonymous"]))
        self.assertEqual(parsed["To"], "bob@example.com")
        self.assertEqual(parsed["From"].addresses[0].addr_spec, RETURN)

    def test_directly_built_headers(self):
        # Values the exit-header parser would never produce, built by hand.
        classification = Plain(dict(INJECTIONS), b"body\n", b"")
        item = DeliveryItem(SMTP_TYPE, TAG + b"bob@example.com", classified=classification)
        text = format_mail(item, "bob@example.com", MailOptions(return_address=RETURN))
        self.check(text)
        self.assertIn(b'From: "[Anon] Eve <eve@evil.example> To: victim@example.org" <noreply@mix.example>\n',
                      text)
        self.assertIn(b"Subject: Hi Bcc: victim@example.org forged body\n", text)

    def test_through_a_payload(self):
        # What a sender can actually put in a packet: the parser stops at
        # the first line with a control character, so nothing gets through.
        raw = b"SUBJECT:Hi\r\nBcc: victim@example.org\n\nbody\n"
        item = make_delivery_item(SMTP_TYPE, TAG + b"bob@example.com",
                                  encode_singleton(compress(raw), rng_of(2)))
        text = format_mail(item, "bob@example.com", MailOptions(return_address=RETURN))
        lines = header_block(text)
        self.assertEqual([line.split(b":")[0] for line in lines], [b"To", b"From", b"Subject", b"X-Anonymous"])

    def test_long_from_stays_within_line_limit(self):
        options = MailOptions(return_address=RETURN, from_tag="[" + "T" * 500 + "]")
        text = format_mail(plain_item(b"x", {"FROM": "n" * 900}), "bob@example.com", options)
        self.assertLessEqual(max(len(line) for line in header_block(text)), 998)

    def test_config_values_cannot_inject(self):
        options = MailOptions(return_address=RETURN, x_abuse="a\r\nBcc: x@y.example", comments="c\nTo: z",
                              subject_line="s\r\nCc: w", from_tag='[A"]\r\n')
        text = format_mail(plain_item(b"x", {"FROM": "f"}), "bob@example.com", options)
        for line in header_block(text):
            self.assertRegex(line, _HEADER_LINE)
        self.assertNotIn(b"\nBcc", text.split(b"\n\n")[0])


# --- §9.5 blacklist ------------------------------------------------------------------------


class Blacklists(unittest.TestCase):
    RULES = """\
        # comment lines and blank lines are ignored

        deny address Victim@Example.COM
        DENY user postmaster
        deny onehost spam.example
        deny allhosts foo.gov
        deny pattern /^root@|\\.mil$/
        """

    def setUp(self) -> None:
        self.bl = Blacklist.from_text(textwrap.dedent(self.RULES))

    def test_each_rule(self):
        denied = {
            "victim@example.com": "address", "VICTIM@example.com": "address",
            "postmaster@anything.example": "user", "PostMaster@x.example": "user",
            "a@spam.example": "onehost", "a@foo.gov": "allhosts", "a@b.foo.gov": "allhosts",
            "a@B.C.FOO.GOV": "allhosts", "root@host.example": "pattern", "a@army.mil": "pattern",
        }
        for address, kind in denied.items():
            rule = self.bl.match(address)
            self.assertIsNotNone(rule, address)
            self.assertEqual(rule.kind, kind, address)
        allowed = ["other@example.com", "victim@example.com.au", "postmaster2@x.example",
                   "a@sub.spam.example", "a@gov", "a@notfoo.gov", "a@foo.gov.example", "chroot@host.example",
                   "a@mil.example"]
        for address in allowed:
            self.assertNotIn(address, self.bl)
        self.assertEqual(len(self.bl), 5)

    def test_routing_in_the_local_part_does_not_slip_past(self):
        """The relay would pass these on to a denied address (issue 12
        point 10: victim%example.gov@relay.org passed a rule on example.gov)."""
        for address, kind in {
            "victim%example.com@relay.org": "address",
            "a%b.foo.gov@relay.org": "allhosts",
            "x%a%spam.example@relay.org": "onehost",
            "foo.gov!a@relay.org": "allhosts",
            "postmaster%ok.example@relay.org": "user",
        }.items():
            rule = self.bl.match(address)
            self.assertIsNotNone(rule, address)
            self.assertEqual(rule.kind, kind, address)
        for address in ("victim%example.net@relay.org", "a!b@relay.org", "%@relay.org",
                        "a%@relay.org"):
            self.assertNotIn(address, self.bl, address)

    def test_bad_lines(self):
        for line in ("allow address a@b.example", "deny address", "deny nobody x", "deny address not-an-address",
                     "deny onehost 1.2.3.4", "deny user a@b", "deny pattern ^x$", "deny pattern /(/"):
            self.assertRaises(ExitConfigError, Blacklist.from_text, line)


# --- SMTP module against a loopback MTA -------------------------------------------------------


class SMTPDelivery(unittest.TestCase):
    def setUp(self) -> None:
        self.h = Harness(self, clock=reactor)
        self.mta = LoopbackMTA(self)

    def module(self, **extra: Any) -> SMTPModule:
        module = SMTPModule()
        module.configure(smtp_section(extra.pop("port", self.mta.port), **extra), self.h.context)
        self.addCleanup(module.stop)
        return module

    @defer.inlineCallbacks
    def test_delivered_envelope_and_body(self):
        module = self.module()
        body = b"Hello\n.\n..dots\nFrom the start\n"
        item = plain_item(body, {"SUBJECT": "Test"})
        result = yield module.deliver(item)
        self.assertIs(result, DeliveryResult.OK)
        [(sender, recipient, data)] = self.mta.received
        self.assertEqual((sender, recipient), (RETURN, "bob@example.com"))
        self.assertEqual(data, format_mail(item, "bob@example.com", module.options))
        self.assertEqual(parse_text_message(data).contents, body)

    @defer.inlineCallbacks
    def test_dot_line_at_chunk_boundary(self):
        # Twisted reads the message in 16 KiB chunks; a "." line starting a
        # chunk must still be stuffed, or the rest would be read as commands.
        module = self.module()
        start = format_mail(plain_item(b"@MARK@"), "bob@example.com", module.options).index(b"@MARK@")
        filler = 16384 - start - 1
        lines, rest = divmod(filler, 70)
        body = (b"a" * 69 + b"\n") * lines + b"b" * rest + b"\n.\nRSET\nMAIL FROM:<eve@evil.example>\n.\nend\n"
        item = plain_item(body)
        text = format_mail(item, "bob@example.com", module.options)
        self.assertEqual(text[16383:16386], b"\n.\n")
        result = yield module.deliver(item)
        self.assertIs(result, DeliveryResult.OK)
        [(sender, _, data)] = self.mta.received
        self.assertEqual(data, text)
        self.assertEqual(parse_text_message(data).contents, body)

    def test_smtp_data(self):
        self.assertEqual(smtp_data(b".a\nb\r\n..c\rd"), b"..a\r\nb\r\n...c\r\nd\r\n")
        self.assertEqual(smtp_data(b"x\n"), b"x\r\n")

    @defer.inlineCallbacks
    def test_header_injection_end_to_end(self):
        module = self.module()
        classification = Plain(dict(INJECTIONS), b"body\n", b"")
        item = DeliveryItem(SMTP_TYPE, TAG + b"bob@example.com", classified=classification)
        result = yield module.deliver(item)
        self.assertIs(result, DeliveryResult.OK)
        [(_, recipient, data)] = self.mta.received
        self.assertEqual(recipient, "bob@example.com")
        HeaderInjection.check(self, data)

    @defer.inlineCallbacks
    def test_mta_down_is_retry(self):
        module = self.module(port=unused_port())
        result = yield module.deliver(plain_item(b"x"))
        self.assertIs(result, DeliveryResult.RETRY)

    @defer.inlineCallbacks
    def test_permanent_and_temporary_refusals(self):
        module = self.module()
        self.mta.delivery.refuse = {"gone@example.com": 550, "busy@example.com": 450}
        gone = yield module.deliver(plain_item(b"x", address=b"gone@example.com"))
        busy = yield module.deliver(plain_item(b"x", address=b"busy@example.com"))
        self.assertEqual((gone, busy), (DeliveryResult.NORETRY, DeliveryResult.RETRY))
        self.assertEqual(self.mta.received, [])

    @defer.inlineCallbacks
    def test_invalid_addresses(self):
        module = self.module()
        for address in (b"bob@10.0.0.1", b"not an address", b"a@b\r\nRCPT TO:<x@y>", b"",
                        b"a" * 250 + b"@example.com"):
            result = yield module.deliver(plain_item(b"x", address=address))
            self.assertIs(result, DeliveryResult.NORETRY)
        self.assertEqual(self.h.counters["ExitInvalidAddress"], 5)
        self.assertEqual(self.mta.received, [])

    @defer.inlineCallbacks
    def test_blacklist(self):
        path = self.h.write("blacklist", "deny allhosts example.org\ndeny user root\n")
        module = self.module(BlacklistFile=path)
        denied = yield module.deliver(plain_item(b"x", address=b"someone@sub.example.org"))
        root = yield module.deliver(plain_item(b"x", address=b"ROOT@example.com"))
        fine = yield module.deliver(plain_item(b"x", address=b"someone@example.com"))
        self.assertEqual((denied, root, fine), (DeliveryResult.NORETRY, DeliveryResult.NORETRY, DeliveryResult.OK))
        self.assertEqual(self.h.counters["ExitBlacklisted"], 2)
        self.assertEqual([r for _, r, _ in self.mta.received], ["someone@example.com"])

    @defer.inlineCallbacks
    def test_maximum_size(self):
        module = self.module(MaximumSize="32K")
        self.assertEqual(module.options.max_size, 32768)
        too_big = yield module.deliver(plain_item(printable_noise(32769)))
        fits = yield module.deliver(plain_item(printable_noise(32768)))
        self.assertEqual((too_big, fits), (DeliveryResult.NORETRY, DeliveryResult.OK))
        self.assertEqual(self.h.counters["ExitOversize"], 1)
        # an encrypted payload counts as its 28 KiB
        fits = yield module.deliver(make_delivery_item(SMTP_TYPE, TAG + b"b@c.example", rng_of(1)(PAYLOAD_LEN)))
        self.assertIs(fits, DeliveryResult.OK)

    def test_maximum_size_raised_and_rounded(self):
        self.assertEqual(self.module(MaximumSize="1K").options.max_size, 32768)
        self.assertEqual(self.module(MaximumSize="40000").options.max_size, 40960)
        self.assertEqual(self.module().options.max_size, 102400)

    @defer.inlineCallbacks
    def test_corrupt_not_mailed(self):
        module = self.module()
        bad = make_delivery_item(SMTP_TYPE, TAG + b"bob@example.com",
                                 encode_singleton(b"\x78\xda" + b"\xff" * 40, rng_of(5)))
        result = yield module.deliver(bad)
        self.assertIs(result, DeliveryResult.NORETRY)
        self.assertEqual(self.mta.received, [])

    def test_configuration_errors(self):
        for section in (
            {"Enabled": "yes"},  # no ReturnAddress
            smtp_section(25, SendmailCommand=sys.executable),  # with SMTPServer
            smtp_section(25, MboxFile="x"),
            smtp_section(25, Bogus="1"),
            smtp_section(0),
            smtp_section(25, BlacklistFile=self.h.path("missing")),
            smtp_section(25, MaximumSize="1 GBX"),
            smtp_section(25, Retry="every 2 hours"),
            smtp_section(25, ReturnAddress="two words@x.example"),
        ):
            self.assertRaises(ExitConfigError, SMTPModule().configure, section, self.h.context)

    def test_advertise(self):
        ad = self.module(AllowFromAddress="no", MaximumSize="64K").advertise()
        self.assertEqual((ad.section, ad.fields),
                         ("Delivery/SMTP", (("Version", "0.1"), ("Maximum-Size", "64"), ("Allow-From", "no"))))
        self.assertEqual((ad.descriptor_value.max_size_kib, ad.descriptor_value.allow_from), (64, False))
        self.assertIsNone(self.module(Advertise="no").advertise())


SINK = """\
import sys
data = sys.stdin.buffer.read()
with open(sys.argv[1], "wb") as f:
    f.write(data)
sys.exit(int(sys.argv[2]))
"""


class SendmailCommandDelivery(unittest.TestCase):
    def setUp(self) -> None:
        self.h = Harness(self, clock=reactor)
        self.script = self.h.write("sink.py", SINK)

    def module(self, status: int) -> SMTPModule:
        module = SMTPModule()
        section = {"Enabled": "yes", "ReturnAddress": RETURN,
                   "SendmailCommand": [sys.executable, self.script, self.h.path("out"), str(status)]}
        module.configure(section, self.h.context)
        return module

    @defer.inlineCallbacks
    def test_command_gets_message_on_stdin(self):
        item = plain_item(b"via a command\n", {"SUBJECT": "$(rm -rf /); `id`"})
        result = yield self.module(0).deliver(item)
        self.assertIs(result, DeliveryResult.OK)
        with open(self.h.path("out"), "rb") as f:
            self.assertEqual(f.read(), format_mail(item, "bob@example.com", MailOptions(return_address=RETURN)))

    @defer.inlineCallbacks
    def test_failing_command_is_retry(self):
        result = yield self.module(75).deliver(plain_item(b"x"))
        self.assertIs(result, DeliveryResult.RETRY)

    def test_port_default_does_not_conflict(self):
        # A parsed configuration always carries SMTPPort's default.
        module = SMTPModule()
        module.configure({"Enabled": True, "ReturnAddress": RETURN, "SMTPPort": 25,
                          "SendmailCommand": (sys.executable, "-c", "pass")}, self.h.context)
        self.assertEqual(module.transport.argv, [sys.executable, "-c", "pass"])

    def test_command_string_is_split_not_shelled(self):
        module = SMTPModule()
        module.configure({"Enabled": "yes", "ReturnAddress": RETURN,
                          "SendmailCommand": f"{sys.executable} -c 'import sys'"}, self.h.context)
        self.assertEqual(module.transport.argv[1:], ["-c", "import sys"])
        self.assertRaises(ExitConfigError, SMTPModule().configure,
                          {"Enabled": "yes", "ReturnAddress": RETURN, "SendmailCommand": "/no/such/sendmail -t"},
                          self.h.context)


# --- §9.4 MBOX --------------------------------------------------------------------------------


ALIASES = """\
# mailbox aliases
alice: alice@example.com
bob = bob@example.net

Carol:carol@example.org
"""


class MBOXDelivery(unittest.TestCase):
    def setUp(self) -> None:
        self.h = Harness(self, clock=task.Clock())
        self.h.clock.advance(86400 * 365)
        self.aliases = self.h.write("aliases", ALIASES)

    def module(self, **extra: Any) -> MBOXModule:
        section = {"Enabled": "yes", "ReturnAddress": RETURN, "RemoveContact": "admin@mix.example",
                   "AddressFile": self.aliases}
        section.update(extra)
        module = MBOXModule()
        module.configure(section, self.h.context)
        self.addCleanup(module.stop)
        return module

    def test_address_file(self):
        self.assertEqual(parse_address_file(ALIASES), {"alice": "alice@example.com", "bob": "bob@example.net",
                                                        "Carol": "carol@example.org"})
        for bad in ("alice", "alice: two words", "a b: c", ": x", "al\x01ce: x"):
            self.assertRaises(ExitConfigError, parse_address_file, bad)

    @defer.inlineCallbacks
    def test_mbox_dates_come_from_the_wall_clock(self):
        """The node's schedule clock ignores wall-clock steps; the date on a
        delivered message is the calendar's."""
        wall = task.Clock()
        wall.advance(86400 * 366 * 2)
        self.h.context = dataclasses.replace(self.h.context, wall=wall)
        module = self.module(MboxFile="dated.mbox")
        item = make_delivery_item(MBOX_TYPE, TAG + b"alice", singleton(b"hello\n", {}))
        self.assertEqual((yield module.deliver(item)), DeliveryResult.OK)
        with open(self.h.path("dated.mbox"), "rb") as f:
            self.assertTrue(f.read().startswith(b"From noreply@mix.example Mon Jan  3 00:00:00 1972\n"))

    @defer.inlineCallbacks
    def test_mbox_file(self):
        self.assertRaises(ExitConfigError, self.module, MboxFile="inbox.mbox", FromTag="[Mine]")
        module = self.module(MboxFile="inbox.mbox", FromTag="[Anon]")
        body = b"Dear Alice,\nFrom here on\n>From there\n"
        results = []
        for name, headers in ((b"alice", {"FROM": "Bob", "SUBJECT": "Hi"}), (b"bob", {})):
            item = make_delivery_item(MBOX_TYPE, TAG + name, singleton(body, headers))
            results.append((yield module.deliver(item)))
        self.assertEqual(results, [DeliveryResult.OK] * 2)
        with open(self.h.path("inbox.mbox"), "rb") as f:
            mbox = f.read()
        messages = mbox.split(b"\n\nFrom ")
        self.assertEqual(len(messages), 2)
        self.assertTrue(mbox.startswith(b"From noreply@mix.example Fri Jan  1 00:00:00 1971\nTo: alice@example.com\n"))
        self.assertIn(b'From: "[Anon] Bob" <noreply@mix.example>\nSubject: Hi\n', mbox)
        self.assertIn(b"\n>From here on\n>>From there\n", mbox)
        self.assertIn(b"\nTo: bob@example.net\n", mbox)
        import mailbox

        box = mailbox.mbox(self.h.path("inbox.mbox"), create=False)
        self.addCleanup(box.close)
        self.assertEqual([m["To"] for m in box], ["alice@example.com", "bob@example.net"])

    @defer.inlineCallbacks
    def test_unknown_mailbox(self):
        module = self.module(MboxFile="inbox.mbox")
        for name in (b"mallory", b"Alice", b"carol", b"", b"\xffalice"):
            result = yield module.deliver(make_delivery_item(MBOX_TYPE, TAG + name, singleton(b"x")))
            self.assertIs(result, DeliveryResult.NORETRY)
        self.assertEqual(self.h.counters["ExitUnknownMailbox"], 5)
        self.assertFalse(os.path.exists(self.h.path("inbox.mbox")))

    @defer.inlineCallbacks
    def test_through_smtp(self):
        h = Harness(self, clock=reactor)
        mta = LoopbackMTA(self)
        section = smtp_section(mta.port, RemoveContact="admin@mix.example", AddressFile=self.aliases)
        module = MBOXModule()
        module.configure(section, h.context)
        self.addCleanup(module.stop)
        result = yield module.deliver(make_delivery_item(MBOX_TYPE, TAG + b"Carol", singleton(b"hi\n")))
        self.assertIs(result, DeliveryResult.OK)
        [(sender, recipient, data)] = mta.received
        self.assertEqual((sender, recipient), (RETURN, "carol@example.org"))
        self.assertTrue(data.startswith(b"To: carol@example.org\n"))

    def test_configuration_errors(self):
        base = {"Enabled": "yes", "ReturnAddress": RETURN, "RemoveContact": "a@b.example",
                "AddressFile": self.aliases}
        for change in ({"AddressFile": None}, {"RemoveContact": None}, {"AddressFile": self.h.path("none")},
                       {"MboxFile": "x", "SMTPServer": "localhost"}, {"BlacklistFile": self.aliases}):
            section = {k: v for k, v in {**base, **change}.items() if v is not None}
            self.assertRaises(ExitConfigError, MBOXModule().configure, section, self.h.context)
        bad = self.h.write("bad-aliases", "alice: a@b.example\nthis line is wrong\n")
        self.assertRaises(ExitConfigError, MBOXModule().configure, {**base, "AddressFile": bad}, self.h.context)

    def test_mbox_quote(self):
        self.assertEqual(mbox_quote(b"From a\n>From b\nxFrom c\n>>From d"), b">From a\n>>From b\nxFrom c\n>>>From d")


# --- §9.7 FRAGMENT ------------------------------------------------------------------------------


BIG_BODY = printable_noise(90000, seed=11) + b"\n"


def fragments_for(body: bytes, exit_type: int, address: bytes, headers=None, seed: int = 21) -> list[bytes]:
    payloads = encode_message_payloads(body, rng_of(seed), headers=headers, exit_type=exit_type,
                                       exit_address=address)
    assert len(payloads) > 1
    return payloads


class Fragments(LogMixin):
    def setUp(self) -> None:
        super().setUp()
        self.clock = task.Clock()
        self.clock.advance(20000 * DAY + 3600)
        self.h = Harness(self, clock=self.clock)
        self.aliases = self.h.write("aliases", ALIASES)
        self.modules: list = []
        #: the node's queues, where FRAGMENT hands back what it completes
        self.store = scratch_store(self)

    def config(self, **fragmented: Any) -> dict:
        return {
            "Delivery/Fragmented": {"Enabled": "yes", "MaximumSize": "200K", **fragmented},
            "Delivery/MBOX": {"Enabled": "yes", "ReturnAddress": RETURN, "RemoveContact": "a@b.example",
                              "AddressFile": self.aliases, "MboxFile": "inbox.mbox", "MaximumSize": "1M"},
        }

    def start(self, **fragmented: Any) -> Dispatcher:
        return self.node_delivery(build_dispatcher(self.config(**fragmented), self.h.context))

    def node_delivery(self, dispatcher: Dispatcher) -> Dispatcher:
        """The node's delivery stage around ``dispatcher`` (its queues
        take what FRAGMENT hands back)."""
        self.addCleanup(dispatcher.stop)
        self.delivery = Delivery(self.store, dispatcher, self.clock, self.h.counters.count)
        return dispatcher

    @defer.inlineCallbacks
    def feed(self, dispatcher: Dispatcher, payload: bytes, address: bytes = b""):
        """One fragment through the dispatcher, then a delivery round (in
        which a message it completed is delivered)."""
        result = yield dispatcher.deliver_payload(FRAGMENT_TYPE, address, payload, b"", self.clock.seconds())
        yield self.delivery.flush()
        return result

    def mbox(self) -> bytes:
        path = self.h.path("inbox.mbox")
        if not os.path.exists(path):
            return b""
        with open(path, "rb") as f:
            return f.read()

    @defer.inlineCallbacks
    def test_reassembly_across_restart(self):
        payloads = fragments_for(BIG_BODY, MBOX_TYPE, b"alice", {"SUBJECT": "Big one"})
        k = parse_payload(payloads[0])
        self.assertEqual(len(payloads), 6)  # k=4, n=6
        first = self.start()
        order = [5, 2, 3]
        for index in order:
            result = yield self.feed(first, payloads[index])
            self.assertIs(result, DeliveryResult.OK)
        self.assertEqual(self.mbox(), b"")
        yield first.stop()
        # A new dispatcher and module read the state back from disk.
        second = self.start()
        fragment = second.module_named("FRAGMENT")
        self.assertEqual(list(fragment.reassembler.pending), [k.message_id])
        self.assertEqual(fragment.reassembler.missing(k.message_id), 1)
        result = yield self.feed(second, payloads[0])
        self.assertIs(result, DeliveryResult.OK)
        mbox = self.mbox()
        self.assertIn(b"To: alice@example.com\n", mbox)
        self.assertIn(b"Subject: Big one\n", mbox)
        self.assertEqual(parse_text_message(mbox).contents, BIG_BODY)
        self.assertEqual(self.h.counters["FragmentCompleted"], 1)
        # Late fragments of a completed message are dropped quietly, also after a restart.
        yield second.stop()
        third = self.start()
        result = yield self.feed(third, payloads[1])
        self.assertIs(result, DeliveryResult.OK)
        self.assertEqual(self.h.counters["FragmentDropped"], 1)
        self.assertEqual(parse_text_message(self.mbox()).contents, BIG_BODY)

    @defer.inlineCallbacks
    def test_expiry(self):
        payloads = fragments_for(BIG_BODY, MBOX_TYPE, b"alice")
        dispatcher = self.start(MaximumInterval="2 days")
        yield self.feed(dispatcher, payloads[0])
        fragment = dispatcher.module_named("FRAGMENT")
        mid = parse_payload(payloads[0]).message_id
        # midnight of the arrival day + 2 days: not yet
        self.clock.advance(2 * DAY - 3600)
        yield dispatcher.flush()
        self.assertEqual(fragment.reassembler.status_of(mid), "PENDING")
        self.clock.advance(DAY)
        yield dispatcher.flush()
        self.assertEqual(fragment.reassembler.status_of(mid), "REJECTED")
        self.assertEqual(self.h.counters["FragmentExpired"], 1)
        yield dispatcher.stop()
        restarted = self.start()
        for payload in payloads[1:]:
            yield self.feed(restarted, payload)
        self.assertEqual(self.mbox(), b"")
        self.assertEqual(restarted.module_named("FRAGMENT").reassembler.status_of(mid), "REJECTED")

    @defer.inlineCallbacks
    def test_overcompressed(self):
        # A compressed stream whose expansion is more than 20 times the
        # (padded) compressed length: delivered still compressed.
        compressed = compress(b"\0" * 2_000_000) + printable_noise(30000)
        message = server_side_prefix(MBOX_TYPE, b"bob") + compressed
        dispatcher = self.start()
        for payload in fragment_message(message, rng_of(3)):
            yield self.feed(dispatcher, payload)
        delivered = parse_text_message(self.mbox())
        self.assertEqual(delivered.message_type, OVERCOMPRESSED)
        self.assertEqual(delivered.contents, compressed)
        self.assertIn(b"To: bob@example.net\n", self.mbox())

    @defer.inlineCallbacks
    def test_maximum_size(self):
        dispatcher = self.start(MaximumSize="40K")
        payloads = fragments_for(printable_noise(60000), MBOX_TYPE, b"alice")
        for payload in payloads:
            yield self.feed(dispatcher, payload)
        self.assertEqual(self.mbox(), b"")
        self.assertEqual(self.h.counters["FragmentMessageRejected"], 1)
        # Declared far beyond MaximumSize: refused at the first fragment.
        huge = fragment_message(server_side_prefix(MBOX_TYPE, b"bob") + printable_noise(200000), rng_of(9))
        result = yield self.feed(dispatcher, huge[0])
        self.assertIs(result, DeliveryResult.NORETRY)
        self.assertEqual(self.h.counters["FragmentRejected"], 1)

    @defer.inlineCallbacks
    def test_refuses_other_items(self):
        dispatcher = self.start()
        payloads = fragments_for(BIG_BODY, MBOX_TYPE, b"alice")
        not_empty = yield self.feed(dispatcher, payloads[0], address=b"x")
        singleton_ = yield self.feed(dispatcher, singleton(b"x"))
        encrypted = yield self.feed(dispatcher, rng_of(2)(PAYLOAD_LEN))
        self.assertEqual([not_empty, singleton_, encrypted], [DeliveryResult.NORETRY] * 3)
        self.assertEqual(self.h.counters["FragmentRefused"], 3)

    @defer.inlineCallbacks
    def test_malformed_wrapper_rejected(self):
        dispatcher = self.start()
        message = b"\x01\x01\xff\xff" + printable_noise(30000)  # routing info longer than the message
        for payload in fragment_message(message, rng_of(4)):
            yield self.feed(dispatcher, payload)
        self.assertEqual(self.h.counters["FragmentMessageRejected"], 1)
        self.assertEqual(self.mbox(), b"")

    @defer.inlineCallbacks
    def test_retry_of_reassembled_message(self):
        """A completed message goes to the node's queue of its module and
        follows that module's retry schedule, across a restart."""
        config = self.config()
        dispatcher = build_dispatcher(config, self.h.context)
        target = RecordingModule([DeliveryResult.RETRY, DeliveryResult.RETRY], exit_types={TEST_TYPE})
        dispatcher.add_module(target)
        self.node_delivery(dispatcher)
        payloads = fragments_for(BIG_BODY, TEST_TYPE, b"somewhere")
        for payload in payloads[:4]:
            yield self.feed(dispatcher, payload)
        self.assertEqual(len(target.items), 1, "first tried in the round that completed it")
        item = target.items[0]
        self.assertEqual((item.exit_type, item.address, item.tag, item.reassembled), (TEST_TYPE, b"somewhere", b"", True))
        fragment = dispatcher.module_named("FRAGMENT")
        self.assertEqual(fragment.store.outbox(), [], "handed back, not kept")
        self.assertEqual(self.store.count(delivery_queue(target.name)), 1)
        yield self.delivery.flush()  # not due yet
        self.assertEqual(len(target.items), 1)
        yield dispatcher.stop()
        # After a restart the message is still waiting, and retried on schedule.
        restarted = build_dispatcher(config, self.h.context)
        restarted.add_module(target)
        self.node_delivery(restarted)
        self.clock.advance(600)
        yield self.delivery.flush()
        self.assertEqual(len(target.items), 2)
        self.clock.advance(600)
        yield self.delivery.flush()
        self.assertEqual(len(target.items), 3)
        self.assertEqual(target.items[2].classification.body, BIG_BODY)
        self.assertEqual(self.store.count(delivery_queue(target.name)), 0)

    @defer.inlineCallbacks
    def test_a_message_the_node_cannot_take_waits_in_the_outbox(self):
        """Until the node's queue takes a completed message, FRAGMENT keeps
        it (durably) and offers it again at each round."""
        dispatcher = self.start()
        self.h.context.hand_back.connect(self.refuse)
        payloads = fragments_for(BIG_BODY, MBOX_TYPE, b"alice")
        for payload in payloads[:4]:
            result = yield dispatcher.deliver_payload(FRAGMENT_TYPE, b"", payload, b"", self.clock.seconds())
            self.assertIs(result, DeliveryResult.OK)
        fragment = dispatcher.module_named("FRAGMENT")
        self.assertEqual(len(fragment.store.outbox()), 1)
        self.expect_log("Could not queue a reassembled message", LogLevel.error, 1)
        self.h.context.hand_back.connect(self.delivery.hand_back)
        yield self.delivery.flush()
        self.assertEqual(fragment.store.outbox(), [])
        self.assertEqual(parse_text_message(self.mbox()).contents, BIG_BODY)

    def refuse(self, item: DeliveryItem) -> None:
        raise OSError("disk full")

    def test_advertise_and_validation(self):
        dispatcher = self.start()
        fields = dispatcher.descriptor_fields()
        # 200K needs 8 fragments of 28625 bytes: one chunk with k=8, n=ceil(8 x 4/3)=11
        self.assertEqual(fields["max_fragments"], 11)
        self.assertEqual(fields["mbox"].max_size_kib, 1024)
        self.assertNotIn("smtp", fields)
        config = self.config()
        del config["Delivery/MBOX"]
        self.assertRaises(ExitConfigError, build_dispatcher, config, self.h.context)
        config = self.config()
        del config["Delivery/Fragmented"]["MaximumSize"]
        self.assertRaises(ExitConfigError, build_dispatcher, config, self.h.context)


# --- building from the configuration --------------------------------------------------------------


class Configuration(unittest.TestCase):
    def setUp(self) -> None:
        self.h = Harness(self)

    def test_enabled_modules_only(self):
        config = {
            "Delivery/SMTP": smtp_section(25, Retry="every 1 hour for 1 day, 7 hours for 5 days"),
            "Delivery/MBOX": {"Enabled": "no"},
            "Server": {"Nickname": "ignored"},
        }
        dispatcher = build_dispatcher(config, self.h.context)
        self.assertEqual(sorted(m.name for m in dispatcher.modules), ["DROP", "SMTP"])
        self.assertIsInstance(dispatcher.module_for(SMTP_TYPE), SMTPModule)
        self.assertIsNone(dispatcher.module_for(MBOX_TYPE))
        self.assertEqual(dispatcher.module_for(SMTP_TYPE).retry_schedule, [3600] * 24 + [25200] * 18)
        self.assertEqual([ad.section for ad in dispatcher.advertise()], ["Delivery/SMTP"])

    def test_typed_values_accepted(self):
        config = {"Delivery/SMTP": {"Enabled": True, "ReturnAddress": RETURN, "MaximumSize": 65536,
                                    "AllowFromAddress": False, "Retry": [60, 120], "SMTPPort": 2525}}
        smtp_module = build_dispatcher(config, self.h.context).module_named("SMTP")
        self.assertEqual((smtp_module.options.max_size, smtp_module.options.allow_from,
                          smtp_module.retry_schedule, smtp_module.transport.port), (65536, False, [60, 120], 2525))

    def test_errors(self):
        self.assertRaises(ExitConfigError, build_dispatcher, {"Delivery/SMTP": {"ReturnAddress": RETURN}},
                          self.h.context)
        self.assertRaises(ExitConfigError, build_dispatcher, {"Delivery/SMTP": {"Enabled": "perhaps"}},
                          self.h.context)
        e = self.assertRaises(MissingExitModule, build_dispatcher, {"Delivery/NNTP": {"Enabled": "yes"}},
                              self.h.context)
        self.assertIn("[Delivery/NNTP]", str(e))
        e = self.assertRaises(MissingExitModule, build_dispatcher, {}, self.h.context, required=["NNTP"])
        self.assertIn("'NNTP' is configured but no installed plugin provides it", str(e))
        self.assertIn("SMTP", str(e))


# --- plugin discovery ----------------------------------------------------------------------------


TEST_PLUGIN = '''\
from twisted.internet import defer
from twisted.plugin import IPlugin
from zope.interface import implementer

from mixminion.exits.interfaces import IExitModule, IExitModuleFactory
from mixminion.exits.items import DeliveryResult

DELIVERED = []


@implementer(IExitModule)
class TestExitModule:
    name = "TESTEXIT"
    exit_types = frozenset({0x7F10})
    priority = 0
    uses_tag = False
    retry_schedule = [60]

    def configure(self, section, context):
        self.section = dict(section)

    def deliver(self, item):
        DELIVERED.append(item)
        return defer.succeed(DeliveryResult.OK)

    def flush(self):
        return defer.succeed(None)

    def advertise(self):
        return None

    def stop(self):
        return defer.succeed(None)


@implementer(IPlugin, IExitModuleFactory)
class Factory:
    name = "TESTEXIT"
    section = "Delivery/TestExit"
    description = "a module that exists only in the tests"

    def create(self):
        return TestExitModule()


testexit = Factory()
'''

BROKEN_PLUGIN = '''\
from twisted.plugin import IPlugin
from zope.interface import implementer

from mixminion.exits.interfaces import IExitModuleFactory


@implementer(IPlugin, IExitModuleFactory)
class HalfDone:
    name = "HALFDONE"
    description = "forgot its section"

    def create(self):
        return None


halfdone = HalfDone()
'''


class PluginDiscovery(unittest.TestCase):
    def setUp(self) -> None:
        self.h = Harness(self)
        self.root = tempfile.mkdtemp(prefix="mixminion-plugins-")
        self.plugin_dir = os.path.join(self.root, "mixminion", "plugins")
        os.makedirs(self.plugin_dir)
        sys.path.insert(0, self.root)
        self.addCleanup(self.clean_up)

    def add_plugin(self, name: str, text: str) -> None:
        with open(os.path.join(self.plugin_dir, name + ".py"), "w") as f:
            f.write(text)
        importlib.invalidate_caches()

    def clean_up(self) -> None:
        sys.path.remove(self.root)
        if self.plugin_dir in mixminion.plugins.__path__:
            mixminion.plugins.__path__.remove(self.plugin_dir)
        for name in list(sys.modules):
            if name in ("mixminion.plugins.test_exit_plugin", "mixminion.plugins.broken_exit_plugin"):
                del sys.modules[name]
        remove_plugin_caches()
        shutil.rmtree(self.root, ignore_errors=True)

    def test_builtin_modules_found(self):
        found = find_exit_modules(strict=True)
        for name, section in (("SMTP", "Delivery/SMTP"), ("MBOX", "Delivery/MBOX"),
                              ("FRAGMENT", "Delivery/Fragmented"), ("DROP", None)):
            self.assertEqual(found[name].section, section)
        self.assertNotIn("TESTEXIT", found)

    @defer.inlineCallbacks
    def test_test_only_module_discovered_and_dispatched(self):
        self.add_plugin("test_exit_plugin", TEST_PLUGIN)
        found = find_exit_modules(strict=True)
        self.assertIn("TESTEXIT", found)
        self.assertIn("SMTP", found)
        dispatcher = build_dispatcher({"Delivery/TestExit": {"Enabled": "yes", "Colour": "blue"}},
                                      self.h.context, found, required=["TESTEXIT"])
        module = dispatcher.module_named("TESTEXIT")
        self.assertEqual(module.section, {"Enabled": "yes", "Colour": "blue"})
        result = yield dispatcher.deliver_payload(0x7F10, b"short-is-fine", singleton(b"hello"))
        self.assertIs(result, DeliveryResult.OK)
        plugin_module = sys.modules["mixminion.plugins.test_exit_plugin"]
        [item] = plugin_module.DELIVERED
        self.assertEqual((item.address, item.classification.body), (b"short-is-fine", b"hello"))

    def test_broken_plugin_rejected(self):
        self.add_plugin("test_exit_plugin", TEST_PLUGIN)
        self.add_plugin("broken_exit_plugin", BROKEN_PLUGIN)
        e = self.assertRaises(BrokenExitPlugin, find_exit_modules, strict=True)
        message = str(e)
        self.assertIn("mixminion.plugins.broken_exit_plugin.halfdone", message)
        self.assertIn("section", message)
        # Not strict: logged and left out, the others still usable.
        found = find_exit_modules()
        self.assertNotIn("HALFDONE", found)
        self.assertIn("TESTEXIT", found)
        self.assertRaises(MissingExitModule, build_dispatcher, {}, self.h.context, found, required=["HALFDONE"])

    def test_factory_building_a_broken_module(self):
        text = TEST_PLUGIN.replace("    def advertise(self):\n        return None\n\n", "")
        self.add_plugin("test_exit_plugin", text)
        found = find_exit_modules(strict=True)
        e = self.assertRaises(BrokenExitPlugin, build_dispatcher, {"Delivery/TestExit": {"Enabled": "yes"}},
                              self.h.context, found)
        self.assertIn("advertise", str(e))
