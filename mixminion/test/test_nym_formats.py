"""Requests to a nymserver and its messages (doc/nym.md §2, §3)."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.trial import unittest

from mixminion.codec.routing import MBOX_TYPE
from mixminion.codec.surb import ReplyBlock, build_reply_block
from mixminion.nym.formats import (
    REQUEST_MAGIC,
    Command,
    InvalidRequest,
    Kind,
    MalformedRequest,
    NymFormatError,
    NymMessage,
    Policy,
    build_request,
    check_name,
    is_nym_message,
    parse_envelope,
    parse_nym_message,
    public_bytes,
)
from mixminion.test.test_properties import Network, default_addresses

NOW = 1_800_000_000
KEY = Ed25519PrivateKey.from_private_bytes(b"k" * 32)
OTHER = Ed25519PrivateKey.from_private_bytes(b"o" * 32)


def blocks(n: int, expiry: int = NOW + 86400) -> list[ReplyBlock]:
    path = Network(default_addresses()).path([1, 2])
    return [build_reply_block(path, MBOX_TYPE, b"me", b"user key", expiry, os.urandom)[0]
            for _ in range(n)]


def resign(signed: bytes, key: Ed25519PrivateKey = KEY) -> bytes:
    return signed + key.sign(signed)


class NameTests(unittest.TestCase):
    def test_names(self) -> None:
        for good in ("alice", "a", "bob.smith", "x_1-2", "9lives", "a" * 32):
            self.assertEqual(check_name(good), good)
        for bad in ("", "Alice", "-bob", ".x", "a" * 33, "al ice", "al@ice", "é",
                    "postmaster", "abuse", "mailer-daemon"):
            with self.assertRaises(NymFormatError, msg=bad):
                check_name(bad)


class RequestTests(unittest.TestCase):
    def test_create_round_trip(self) -> None:
        surbs = blocks(3)
        data = build_request(KEY, "alice", Command.CREATE, 1, policy=Policy.DROP,
                             reply_blocks=surbs)
        envelope = parse_envelope(data)
        self.assertEqual((envelope.nym, envelope.command, envelope.counter),
                         ("alice", Command.CREATE, 1))
        self.assertEqual(envelope.key, public_bytes(KEY.public_key()))
        self.assertTrue(envelope.verifies(envelope.key))
        request = envelope.request(NOW)
        self.assertEqual(request.policy, Policy.DROP)
        self.assertEqual([b.pack() for b in request.reply_blocks], [b.pack() for b in surbs])
        self.assertEqual(request.key, envelope.key)

    def test_send_round_trip(self) -> None:
        mail = b"Subject: hi\n\nhello there\n"
        data = build_request(KEY, "alice", Command.SEND, 7,
                             recipients=["bob@example.com", "carol@example.org"], mail=mail)
        request = parse_envelope(data).request(NOW)
        self.assertEqual(request.recipients, ("bob@example.com", "carol@example.org"))
        self.assertEqual((request.mail, request.counter), (mail, 7))

    def test_each_command_without_a_body(self) -> None:
        for command, extra in ((Command.STATUS, {}), (Command.DELETE, {}),
                               (Command.CONFIG, {"policy": Policy.HOLD})):
            request = parse_envelope(build_request(KEY, "alice", command, 3, **extra)).request(NOW)
            self.assertEqual(request.command, command)

    def test_a_changed_byte_or_another_key_does_not_verify(self) -> None:
        data = build_request(KEY, "alice", Command.STATUS, 5)
        self.assertTrue(parse_envelope(data).verifies(public_bytes(KEY.public_key())))
        self.assertFalse(parse_envelope(data).verifies(public_bytes(OTHER.public_key())))
        tampered = data.replace(b"Counter: 5", b"Counter: 6")
        self.assertFalse(parse_envelope(tampered).verifies(public_bytes(KEY.public_key())))
        self.assertFalse(parse_envelope(data).verifies(b"short"))

    def test_malformed_envelopes_are_refused_unanswered(self) -> None:
        good = build_request(KEY, "alice", Command.STATUS, 5)[:-64]
        cases = {
            "too short": b"Mixminion",
            "no magic": resign(good.replace(b"Mixminion-Nym-Request: 0.1", b"Hello: 0.1")),
            "no empty line": resign(good.rstrip(b"\n") + b"\n"),
            "bad name": resign(good.replace(b"Nym: alice", b"Nym: Alice")),
            "reserved": resign(good.replace(b"Nym: alice", b"Nym: postmaster")),
            "unknown command": resign(good.replace(b"status", b"launch")),
            "counter 0": resign(good.replace(b"Counter: 5", b"Counter: 0")),
            "leading zero": resign(good.replace(b"Counter: 5", b"Counter: 05")),
            "huge counter": resign(good.replace(b"Counter: 5", b"Counter: " + b"9" * 20)),
            "no counter": resign(good.replace(b"Counter: 5\n", b"")),
            "two nyms": resign(good.replace(b"Nym: alice", b"Nym: alice\nNym: bob")),
            "not ascii": resign(good.replace(b"Nym: alice", b"Nym: alice\nX-Y: \xe9")),
            "no colon": resign(good.replace(b"Nym: alice", b"Nym: alice\nGarbage")),
            "create without key": resign(good.replace(b"status", b"create")),
            "create with a bad key": resign(good.replace(b"status", b"create")
                                            .replace(b"Nym", b"Key: AAAA\nNym")),
        }
        for what, data in cases.items():
            with self.assertRaises(MalformedRequest, msg=what):
                parse_envelope(data)

    def test_invalid_requests_are_answered_with_a_reason(self) -> None:
        def envelope(command: Command, extra: bytes = b"", body: bytes = b"", **kw) -> bytes:
            data = build_request(KEY, "alice", command, 2, **kw)[:-64]
            head, _, _ = data.partition(b"\n\n")
            return resign(head + extra + b"\n\n" + body)
        cases = {
            "no reply block": (envelope(Command.ADD_SURBS), "at least one reply block"),
            "garbage blocks": (envelope(Command.ADD_SURBS, body=b"SURB garbage"),
                               "do not parse"),
            "expired": (build_request(KEY, "alice", Command.ADD_SURBS, 2,
                                      reply_blocks=blocks(2, expiry=NOW - 1)), "2 of the"),
            "config without policy": (envelope(Command.CONFIG), "needs a Policy"),
            "bad policy": (envelope(Command.CONFIG, b"\nPolicy: keep"), "'hold' or 'drop'"),
            "field not taken": (envelope(Command.STATUS, b"\nTo: bob@example.com"),
                                "status takes no To"),
            "body not taken": (envelope(Command.DELETE, body=b"x"), "delete takes no body"),
            "send without To": (envelope(Command.SEND, body=b"hi"), "needs a To"),
            "bad address": (envelope(Command.SEND, b"\nTo: bob", b"hi"), "not an e-mail"),
            "empty mail": (envelope(Command.SEND, b"\nTo: bob@example.com", b" \n"),
                           "needs a mail"),
            "21 recipients": (build_request(KEY, "alice", Command.SEND, 2, mail=b"hi",
                                            recipients=[f"u{i}@example.com" for i in range(21)]),
                              "at most 20"),
            "two policies": (envelope(Command.CONFIG, b"\nPolicy: hold\nPolicy: drop"),
                             "more than one Policy"),
        }
        for what, (data, reason) in cases.items():
            envelope_ = parse_envelope(data)
            self.assertTrue(envelope_.verifies(public_bytes(KEY.public_key())), what)
            with self.assertRaises(InvalidRequest, msg=what) as caught:
                envelope_.request(NOW)
            self.assertIn(reason, str(caught.exception), what)

    def test_the_magic_is_first(self) -> None:
        data = build_request(KEY, "alice", Command.STATUS, 1)
        self.assertTrue(data.startswith(REQUEST_MAGIC))
        self.assertEqual(len(data) - data.index(b"\n\n") - 2, 64)


class MessageTests(unittest.TestCase):
    def test_mail_round_trip(self) -> None:
        message = NymMessage("alice", Kind.MAIL, 4, 1, body=b"From: bob@example.com\n\nhi\n")
        data = message.to_bytes()
        self.assertTrue(is_nym_message(data))
        self.assertEqual(parse_nym_message(data), message)

    def test_answers(self) -> None:
        ok = NymMessage("alice", Kind.ANSWER, 9, 0, counter=3, body=b"created\n")
        refused = NymMessage("alice", Kind.ANSWER, 8, 2, counter=4, ok=False,
                             reason="the name is taken")
        for message in (ok, refused):
            self.assertEqual(parse_nym_message(message.to_bytes()), message)
        self.assertIn(b"Status: refused\nReason: the name is taken\n", refused.to_bytes())

    def test_a_reason_is_one_line(self) -> None:
        message = NymMessage("alice", Kind.ANSWER, 0, 0, counter=1, ok=False,
                             reason="two\nlines\r\nhere")
        self.assertEqual(parse_nym_message(message.to_bytes()).reason, "two lines here")

    def test_not_a_message(self) -> None:
        self.assertFalse(is_nym_message(b"Hello\n"))
        good = NymMessage("alice", Kind.ANSWER, 1, 0, counter=1).to_bytes()
        for bad in (b"Hello", good.replace(b"Kind: answer", b"Kind: other"),
                    good.replace(b"Reply-Blocks: 1", b"Reply-Blocks: x"),
                    good.replace(b"Status: ok", b"Status: maybe"),
                    good.replace(b"Nym: alice", b"Nym: alice\nNym: bob")):
            with self.assertRaises(NymFormatError):
                parse_nym_message(bad)
