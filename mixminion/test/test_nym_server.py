"""The nymserver's logic on its real store (doc/nym.md §2-§4): requests
through the codec as they arrive at the exit, refusals (answered or not),
counters, the durable per-nym queue and reply-block accounting, mail in
and out.  Packets are followed through real processing to the owner's
exit and decoded with the owner's reply-block key."""

from __future__ import annotations

import os
from typing import Optional

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.trial import unittest

from mixminion.codec.build import build_encrypted_forward_packet, encode_message_payloads
from mixminion.codec.compression import decompress
from mixminion.codec.decode import decode_reply
from mixminion.codec.exit_headers import parse_message
from mixminion.codec.fragments import reassemble
from mixminion.codec.payload import ENC_FWD_OVERHEAD, FragmentPayload, parse_payload
from mixminion.codec.process import Exit
from mixminion.codec.routing import MBOX_TYPE
from mixminion.codec.surb import ReplyBlock, build_reply_block
from mixminion.exits.fragment_store import DiskReassembler, FragmentStore
from mixminion.exits.nym.nymserver import DAY, Delivery, Handled, Nymserver, NymSettings
from mixminion.exits.nym.store import NymStore
from mixminion.nym.formats import (
    NYM_TYPE,
    Command,
    Kind,
    NymMessage,
    Policy,
    build_request,
    parse_nym_message,
)
from mixminion.test.test_properties import Network, default_addresses
from mixminion.testing.keys import key

NOW = 1_800_000_000.0
NYM_KEY = key("nymserver")
OWNER = Ed25519PrivateKey.from_private_bytes(b"o" * 32)
STRANGER = Ed25519PrivateKey.from_private_bytes(b"s" * 32)
USER_KEY = b"owner's reply-block key"
DOMAIN = "nym.example.org"
#: server 0 runs the nymserver; the owner's reply blocks go 1, 2
NYMSERVER, SURB_PATH = 0, [1, 2]


class NymCase(unittest.TestCase):
    settings = NymSettings(DOMAIN, max_nyms=3, sends_per_day=2, incoming_per_hour=3,
                           max_queued=4, max_message_size=40_000)

    def setUp(self) -> None:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        self.folder = folder
        self.net = Network(default_addresses())
        self.blacklist = {"spam@example.com"}
        self.open()
        self.counter = 0

    def open(self) -> None:
        self.store = NymStore.in_dir(self.folder)
        self.fragment_store = FragmentStore(os.path.join(self.folder, "requests.db"))
        self.addCleanup(self.store.close)
        self.addCleanup(self.fragment_store.close)
        self.server = Nymserver(self.store, DiskReassembler.load(self.fragment_store), NYM_KEY,
                                self.settings, lambda a: a in self.blacklist,
                                lambda: self.net.hops[NYMSERVER], os.urandom)

    def blocks(self, n: int, expiry: float = NOW + 7 * DAY) -> list[ReplyBlock]:
        return [build_reply_block(self.net.path(SURB_PATH), MBOX_TYPE, b"me", USER_KEY,
                                  int(expiry), os.urandom)[0] for _ in range(n)]

    def request(self, command: Command, *, key: Ed25519PrivateKey = OWNER,
                counter: Optional[int] = None, nym: str = "alice", **kw) -> bytes:
        if counter is None:
            self.counter += 1
            counter = self.counter
        return build_request(key, nym, command, counter, **kw)

    def arrive(self, data: bytes, now: float = NOW) -> list:
        """``data`` sent as the client sends it (encrypted to the nym key,
        fragmented when large) through the network to the nymserver's exit;
        the result of each exit payload."""
        results = []
        for payload in encode_message_payloads(data, os.urandom, overhead=ENC_FWD_OVERHEAD):
            built = build_encrypted_forward_packet(payload, NYM_KEY.public, self.net.path([3]),
                                                   self.net.path([4, NYMSERVER]), NYM_TYPE,
                                                   b"", os.urandom)
            _visited, exit_ = self.net.deliver(built.packet, 3)
            assert isinstance(exit_, Exit) and exit_.exit_type == NYM_TYPE
            results.append(self.server.receive(exit_.tag, exit_.payload, now))
        return results

    def create(self, surbs: int = 5, **kw) -> None:
        [result] = self.arrive(self.request(Command.CREATE, reply_blocks=self.blocks(surbs), **kw))
        self.assertIs(result.outcome, Handled.DONE, result.detail)

    def owner_reads(self, delivery: Delivery) -> NymMessage:
        """Follow each packet from the nymserver's node to the owner's exit,
        decode with the owner's key, reassemble, parse."""
        payloads = []
        for packet in delivery.packets:
            visited, exit_ = self.net.deliver(packet, NYMSERVER)
            self.assertEqual(visited, [NYMSERVER, *SURB_PATH])
            assert isinstance(exit_, Exit)
            self.assertEqual((exit_.exit_type, exit_.address), (MBOX_TYPE, b"me"))
            plain = decode_reply(exit_.payload, exit_.tag, USER_KEY)
            self.assertIsNotNone(plain)
            payloads.append(parse_payload(plain))
        if isinstance(payloads[0], FragmentPayload):
            compressed = reassemble(payloads)
        else:
            compressed = payloads[0].data[:payloads[0].size]
        _headers, body = parse_message(decompress(compressed, 10**7))
        return parse_nym_message(body)

    def deliver_all(self, nym: str = "alice", now: float = NOW) -> list[NymMessage]:
        read = []
        while (delivery := self.server.next_delivery(nym, now)) is not None:
            self.server.delivered(delivery)
            read.append(self.owner_reads(delivery))
        return read


class RequestTests(NymCase):
    def test_create_then_answer_through_a_reply_block(self) -> None:
        self.create(surbs=5, policy=Policy.DROP)
        record = self.store.get("alice")
        self.assertEqual((record.counter, record.policy), (1, Policy.DROP))
        [answer] = self.deliver_all()
        self.assertEqual((answer.kind, answer.ok, answer.counter), (Kind.ANSWER, True, 1))
        self.assertEqual(answer.reply_blocks, 4)
        self.assertIn(b"created alice@nym.example.org with 5 reply blocks", answer.body)
        self.assertEqual(self.store.count_reply_blocks("alice", int(NOW)), 4)

    def test_replays_and_forgeries_are_ignored_and_spend_nothing(self) -> None:
        self.create()
        self.deliver_all()
        status = self.request(Command.STATUS)
        [first] = self.arrive(status)
        self.assertIs(first.outcome, Handled.DONE)
        [again] = self.arrive(status)
        self.assertIs(again.outcome, Handled.IGNORED)
        self.assertIn("counter 2 is not new", again.detail)
        older = self.request(Command.STATUS, counter=1)
        self.assertIs(self.arrive(older)[0].outcome, Handled.IGNORED)
        forged = self.request(Command.STATUS, key=STRANGER, counter=99)
        [result] = self.arrive(forged)
        self.assertIs(result.outcome, Handled.IGNORED)
        self.assertIn("does not verify", result.detail)
        unknown = self.request(Command.STATUS, nym="bob", counter=5)
        self.assertIs(self.arrive(unknown)[0].outcome, Handled.IGNORED)
        self.assertEqual(self.store.get("alice").counter, 2, "forgeries moved no counter")
        self.assertEqual(len(self.deliver_all()), 1, "only the one status was answered")

    def test_malformed_and_unreadable_are_ignored(self) -> None:
        self.create()
        self.assertIs(self.server.handle(b"garbage", NOW).outcome, Handled.IGNORED)
        self.assertIs(self.server.receive(b"t" * 20, os.urandom(28672), NOW).outcome,
                      Handled.UNREADABLE)

    def test_a_request_that_verifies_but_cannot_be_done_is_answered(self) -> None:
        self.create()
        bad = self.request(Command.SEND, recipients=["bob@example.com"], mail=b" ")
        [result] = self.arrive(bad)
        self.assertIs(result.outcome, Handled.REFUSED)
        answers = self.deliver_all()
        self.assertEqual([(a.counter, a.ok) for a in answers], [(1, True), (2, False)])
        self.assertEqual(answers[1].reason, "send needs a mail")
        self.assertEqual(self.store.get("alice").counter, 2, "the counter is used up")

    def test_a_taken_name_is_refused_through_the_requests_own_blocks(self) -> None:
        self.create()
        [result] = self.arrive(self.request(Command.CREATE, key=STRANGER, counter=1,
                                            reply_blocks=self.blocks(2)))
        self.assertIs(result.outcome, Handled.REFUSED)
        answer = self.owner_reads(result.immediate)
        self.assertEqual((answer.ok, answer.reason), (False, "the name alice is taken"))
        self.assertEqual(self.store.get("alice").key, OWNER.public_key().public_bytes_raw())

    def test_at_most_max_nyms(self) -> None:
        for name in ("a1", "a2", "a3"):
            self.create(nym=name)
        [result] = self.arrive(self.request(Command.CREATE, nym="a4",
                                            reply_blocks=self.blocks(1)))
        self.assertIs(result.outcome, Handled.REFUSED)
        self.assertIsNone(self.store.get("a4"))

    def test_a_create_with_expired_blocks_is_ignored(self) -> None:
        [result] = self.arrive(self.request(Command.CREATE,
                                            reply_blocks=self.blocks(2, expiry=NOW - 1)))
        self.assertIs(result.outcome, Handled.IGNORED)

    def test_a_fragmented_request(self) -> None:
        """Thirty reply blocks do not fit in one packet; k of the n
        fragments complete it, later ones change nothing."""
        results = self.arrive(self.request(Command.CREATE, reply_blocks=self.blocks(30)))
        self.assertGreater(len(results), 1)
        outcomes = [r.outcome for r in results]
        self.assertEqual(outcomes.count(Handled.DONE), 1)
        self.assertEqual(outcomes.count(Handled.FRAGMENT), len(results) - 1)
        self.assertEqual(self.store.count_reply_blocks("alice", int(NOW)), 30)

    def test_add_surbs_config_status_delete(self) -> None:
        self.create(surbs=2)
        self.arrive(self.request(Command.ADD_SURBS, reply_blocks=self.blocks(3)))
        self.arrive(self.request(Command.CONFIG, policy=Policy.DROP))
        self.arrive(self.request(Command.STATUS))
        answers = self.deliver_all()
        self.assertEqual([a.body.split(b"\n")[0] for a in answers[:3]],
                         [b"created alice@nym.example.org with 2 reply blocks",
                          b"5 reply blocks held", b"policy drop"])
        self.assertIn(b"Policy: drop\n", answers[3].body)
        self.assertIn(b"Reply blocks held: 5\n", answers[3].body, "when it was asked")
        self.assertEqual(answers[3].reply_blocks, 1, "when it left")
        [result] = self.arrive(self.request(Command.DELETE))
        self.assertIsNone(self.store.get("alice"))
        self.assertEqual(self.store.count_reply_blocks("alice", 0), 0)
        goodbye = self.owner_reads(result.immediate)
        self.assertEqual(goodbye.body, b"deleted alice@nym.example.org\n")

    def test_at_most_max_reply_blocks_kept(self) -> None:
        self.settings = NymSettings(DOMAIN, max_reply_blocks=4)
        self.open()
        self.create(surbs=3)
        self.arrive(self.request(Command.ADD_SURBS, reply_blocks=self.blocks(3, NOW + 9 * DAY)))
        self.assertEqual(self.store.count_reply_blocks("alice", 0), 4)
        self.assertEqual(self.store.count_reply_blocks("alice", int(NOW + 8 * DAY)), 3,
                         "the ones that expire last are kept")


class MailInTests(NymCase):
    def test_mail_waits_for_reply_blocks_and_leaves_in_order(self) -> None:
        self.create(surbs=2)
        self.deliver_all()  # the answer uses one block
        for i in range(3):
            self.assertIsNone(self.server.accept_mail("alice", b"Subject: %d\n\nhi\n" % i, NOW))
        first = self.deliver_all()
        self.assertEqual([(m.kind, m.body) for m in first],
                         [(Kind.MAIL, b"Subject: 0\n\nhi\n")])
        self.assertEqual((first[0].reply_blocks, first[0].queued), (0, 2))
        self.arrive(self.request(Command.ADD_SURBS, reply_blocks=self.blocks(4)))
        later = self.deliver_all()
        self.assertEqual([m.kind for m in later], [Kind.ANSWER, Kind.MAIL, Kind.MAIL])
        self.assertEqual([m.body for m in later[1:]], [b"Subject: 1\n\nhi\n", b"Subject: 2\n\nhi\n"])
        self.assertEqual([m.queued for m in later], [2, 1, 0])

    def test_the_queue_survives_a_restart(self) -> None:
        self.create(surbs=1)
        self.deliver_all()
        self.server.accept_mail("alice", b"kept\n", NOW)
        self.store.close()
        self.fragment_store.close()
        self.open()
        self.arrive(self.request(Command.ADD_SURBS, reply_blocks=self.blocks(2), counter=2))
        self.assertEqual([m.body for m in self.deliver_all()][1:], [b"kept\n"])

    def test_a_large_mail_takes_several_blocks(self) -> None:
        self.create(surbs=6)
        self.deliver_all()
        big = os.urandom(35_000)
        self.assertIsNone(self.server.accept_mail("alice", big, NOW))
        [mail] = self.deliver_all()
        self.assertEqual(mail.body, big)
        self.assertEqual(mail.reply_blocks, 4 - 2, "two fragments, two blocks")

    def test_refusals(self) -> None:
        self.create(surbs=1)
        self.assertEqual(self.server.check_recipient("bob", NOW)[0], 550)
        self.assertEqual(self.server.accept_mail("alice", b"x" * 40_001, NOW)[0], 552)
        for _ in range(3):
            self.assertIsNone(self.server.accept_mail("alice", b"m\n", NOW))
        self.assertEqual(self.server.accept_mail("alice", b"m\n", NOW)[0], 452, "hourly limit")
        self.assertIsNone(self.server.accept_mail("alice", b"m\n", NOW + 3600), "next hour")
        self.assertEqual(self.server.accept_mail("alice", b"m\n", NOW + 3600)[0], 452,
                         "the queue holds 4")

    def test_policy_drop_refuses_when_no_block_is_left(self) -> None:
        self.create(surbs=1, policy=Policy.DROP)
        self.assertIsNone(self.server.check_recipient("alice", NOW))
        self.deliver_all()
        self.assertEqual(self.server.check_recipient("alice", NOW)[0], 550)

    def test_blocks_about_to_expire_are_not_used(self) -> None:
        self.create(surbs=1)
        self.deliver_all()
        self.arrive(self.request(Command.ADD_SURBS, reply_blocks=self.blocks(1, NOW + 1800)))
        self.assertIsNone(self.server.next_delivery("alice", NOW))
        self.assertEqual(self.store.forget_expired(int(NOW) + 3600), 1)


class MailOutTests(NymCase):
    def test_send_composes_from_the_nym_and_drops_other_headers(self) -> None:
        self.create()
        mail = (b"From: owner@real.example\nSubject: hello\nX-Secret: mine\n"
                b"In-Reply-To: <a@b>\n\nthe text\n")
        self.arrive(self.request(Command.SEND, recipients=["bob@example.com", "spam@example.com"],
                                 mail=mail))
        [out] = self.store.mail_out_due(NOW)
        self.assertEqual(out.recipient, "bob@example.com")
        text = out.text.decode()
        self.assertTrue(text.startswith("From: alice@nym.example.org\nTo: bob@example.com\n"))
        self.assertIn("\nSubject: hello\n", text)
        self.assertIn("\nIn-Reply-To: <a@b>\n", text)
        self.assertNotIn("owner@real.example", text)
        self.assertNotIn("X-Secret", text)
        self.assertTrue(text.endswith("\n\nthe text\n"))
        answer = self.deliver_all()[-1]
        self.assertIn(b"not sent to (blacklisted): spam@example.com", answer.body)

    def test_daily_send_limit(self) -> None:
        self.create()
        for _ in range(3):
            self.arrive(self.request(Command.SEND, recipients=["bob@example.com"], mail=b"hi\n"))
        answers = self.deliver_all()
        self.assertEqual([a.ok for a in answers], [True, True, True, False])
        self.assertIn("sent 2 mails today", answers[-1].reason)
        self.assertEqual(len(self.store.mail_out_due(NOW)), 2)
