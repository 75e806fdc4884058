"""``mixminion-client nym`` (issue 17, doc/nym.md §6): the owner's side of
nyms, and ``decode`` of what a nymserver sends back.

Commands run in-process through ``Env`` from test_client_cli, with its
four servers and Omega, a node whose descriptor has ``[Delivery/Nym]``.
Requests are followed hop by hop to Omega, decrypted there with the nym
key and read back as the nymserver will read them; the nymserver's
answers and mails are sent through the reply blocks the requests brought,
as the nymserver will send them, and decoded with the client.
"""

from __future__ import annotations

import email
import email.header
import functools
import io
import os
import random
import time
from typing import Any, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.trial import unittest

from mixminion.client import cli, keyring
from mixminion.client.commands import nym as nym_cmd
from mixminion.client.config import ConfigError, parse_client_config
from mixminion.client.keyring import NymEntry
from mixminion.client.paths import hop_for
from mixminion.client.store import ClientQueue
from mixminion.codec.build import build_reply_packet, encode_message_payloads
from mixminion.codec.compression import decompress, reassembled_limit, singleton_limit
from mixminion.codec.decode import decode_encrypted
from mixminion.codec.exit import classify_payload, text_for_delivery
from mixminion.codec.exit_headers import parse_message
from mixminion.codec.fragments import reassemble
from mixminion.codec.payload import FragmentPayload, SingletonPayload, parse_payload
from mixminion.codec.process import PacketProcessor
from mixminion.codec.replay import MemoryReplayLog
from mixminion.codec.routing import SMTP_TYPE
from mixminion.codec.surb import ReplyBlock, parse_reply_blocks
from mixminion.directory.descriptor import (
    DescriptorFields,
    IncomingMMTP,
    NymInfo,
    OutgoingMMTP,
    ServerDescriptor,
)
from mixminion.nym.formats import (
    NYM_TYPE,
    Command,
    Envelope,
    Kind,
    NymMessage,
    Policy,
    parse_envelope,
    public_bytes,
)
from mixminion.test import test_client_cli as cli_tests
from mixminion.test.test_client_cli import (
    DAY,
    DOC,
    PASSPHRASE,
    PASSPHRASE_VAR,
    TODAY,
    Env,
    directory_text,
    inline,
    route,
    signed_descriptor,
    standard_servers,
)
from mixminion.test.test_client_commands import StatusPipe, UsageCase
from mixminion.testing.keys import key

DOMAIN = "nym.example.org"
OWNER = "me@example.org"
CREATE = ["nym", "create", "alice", "--to", OWNER, "-D", "no", "--queue"]


@functools.cache
def nym_node(nickname: str = "Omega", nym_key: str = "nym", domain: str = DOMAIN,
             published: int = TODAY - DAY + 60) -> ServerDescriptor:
    """A relaying node whose descriptor has ``[Delivery/Nym]``."""
    fields = DescriptorFields(
        nickname=nickname, contact=f"{nickname.lower()}@example.org",
        packet_key=key(nickname + "-packet").public, published=published,
        valid_after=TODAY - DAY, valid_until=TODAY + 30 * DAY,
        incoming=IncomingMMTP(hostname="127.0.0.1",
                              port=cli_tests.PORTS.setdefault(nickname, cli_tests.free_port())),
        outgoing=OutgoingMMTP(), nym=NymInfo(domain, key(nym_key).public))
    return signed_descriptor(fields, nickname)


def servers(*nym_nodes: ServerDescriptor) -> list[ServerDescriptor]:
    return standard_servers() + list(nym_nodes or [nym_node()])


def processors() -> dict[bytes, tuple[str, PacketProcessor]]:
    procs = cli_tests.processors()
    for name in ("Omega", "Psi"):
        d = nym_node(name)
        procs[d.identity_digest] = (name, PacketProcessor(
            [(key(name + "-packet"), MemoryReplayLog())]))
    return procs


def nym_env(test: unittest.TestCase, *nym_nodes: ServerDescriptor, extra: str = "") -> Env:
    return Env(test, servers(*nym_nodes), extra=extra)


def stored(env: Env) -> keyring.Keyring:
    with open(keyring.keyring_path(env.user_dir)) as f:
        return keyring.decrypt_keyring(f.read(), PASSPHRASE)


def stored_nym(env: Env, name: str = "alice") -> NymEntry:
    (entry,) = [n for n in stored(env).nyms if n.name == name]
    return entry


def public_key(entry: NymEntry) -> bytes:
    return public_bytes(Ed25519PrivateKey.from_private_bytes(entry.secret).public_key())


def _message(compressed: bytes, limit: int) -> bytes:
    """A request as the nymserver reads it: decompressed, after its (empty)
    exit header block."""
    message = decompress(compressed, limit)
    headers, body = parse_message(message)
    assert message.startswith(b"\n") and headers == {}, message[:40]
    return body


class NymCase(UsageCase):
    timeout = 120

    def at_nymserver(self, env: Env, nym_key: str = "nym", node: str = "Omega"
                     ) -> list[tuple[Envelope, int]]:
        """Every queued packet routed to its exit, which must be ``node``
        with the exit type NYM and an empty address; decrypted with the
        nym key, reassembled, parsed: each request and its packet count.
        The packets leave the queue."""
        procs = processors()
        singles: list[bytes] = []
        fragments: dict[bytes, list[FragmentPayload]] = {}
        queue = ClientQueue(env.user_dir)
        for q in env.queued():
            seen, exit_ = route(q.packet, q.destination.keyid, procs)
            self.assertEqual(seen[-1], node)
            self.assertGreaterEqual(len(seen), 2)
            self.assertEqual((exit_.exit_type, exit_.address), (NYM_TYPE, b""))
            inner = decode_encrypted(exit_.payload, exit_.tag, key(nym_key))
            self.assertIsNotNone(inner, "not encrypted to the nym key")
            assert inner is not None
            payload = parse_payload(inner)
            if isinstance(payload, FragmentPayload):
                fragments.setdefault(payload.message_id, []).append(payload)
            else:
                assert isinstance(payload, SingletonPayload)
                compressed = payload.compressed
                singles.append(_message(compressed, singleton_limit(len(compressed))))
            queue.remove(q.handle)
        out = [(parse_envelope(body), 1) for body in singles]
        for parts in fragments.values():
            compressed = reassemble(parts)
            out.append((parse_envelope(_message(compressed, reassembled_limit(len(compressed)))),
                        len(parts)))
        return out

    def one_request(self, env: Env, **kw: Any) -> Envelope:
        (got,) = self.at_nymserver(env, **kw)
        return got[0]

    async def create(self, env: Env, *extra: str) -> Envelope:
        status, out, err = await env.run(*CREATE, *extra)
        self.assertEqual(status, 0, err)
        self.assertIn(b"Queued 1 packet", out)
        return self.one_request(env)

    def verified(self, env: Env, envelope: Envelope, name: str = "alice") -> Any:
        """The request, its signature checked with the stored nym key."""
        self.assertTrue(envelope.verifies(public_key(stored_nym(env, name))))
        return envelope.request(env_now())

    async def through(self, env: Env, blocks: Sequence[ReplyBlock], message: NymMessage
                      ) -> list[bytes]:
        """``message`` sent as the nymserver sends it (one reply block per
        packet, its node as the first leg); the texts delivered to the owner."""
        payloads = encode_message_payloads(message.to_bytes(), os.urandom)
        self.assertLessEqual(len(payloads), len(blocks))
        procs = processors()
        texts = []
        for payload, block in zip(payloads, blocks):
            built = build_reply_packet(payload, [hop_for(nym_node())], block, os.urandom)
            _, exit_ = route(built.packet, nym_node().identity_digest, procs)
            self.assertEqual((exit_.exit_type, exit_.address), (SMTP_TYPE, OWNER.encode()))
            texts.append(text_for_delivery(classify_payload(exit_.payload), exit_.tag))
        return texts


def env_now() -> int:
    return int(time.time())


# --- requests ----------------------------------------------------------------------------------


class RequestTests(NymCase):

    @inline
    async def test_create_is_encrypted_to_the_nymserver_and_signed_with_reply_blocks(self) -> None:
        env = nym_env(self)
        envelope = await self.create(env, "--surbs", "4", "--policy", "drop")
        request = self.verified(env, envelope)
        self.assertEqual((request.nym, request.command, request.counter, request.policy),
                         ("alice", Command.CREATE, 1, Policy.DROP))
        self.assertEqual(request.key, public_key(stored_nym(env)))
        self.assertEqual(len(request.reply_blocks), 4)
        entry = stored_nym(env)
        self.assertEqual((entry.domain, entry.server, entry.address, entry.counter),
                         (DOMAIN, "Omega", OWNER, 1))
        self.assertEqual(entry.server_key, key("nym").public.der)
        # the reply blocks lead to the owner, who decodes what comes through them
        mail = b"From: bob@example.org\nSubject: hello\n\nHello, alice.\n"
        texts = await self.through(env, request.reply_blocks[:1],
                                   NymMessage("alice", Kind.MAIL, 3, 0, body=mail))
        status, out, err = await env.run("decode", "-i", env.write("in", texts[0]))
        self.assertEqual(status, 0, err)
        self.assertEqual(out, b"Mail for nym alice@nym.example.org (3 reply block(s) left at the "
                              b"nymserver, 0 mail(s) waiting):\n" + mail)

    @inline
    async def test_counters_increase_across_commands_and_survive(self) -> None:
        env = nym_env(self)
        await self.create(env, "--surbs", "2")
        runs = [(["nym", "status", "alice"], Command.STATUS),
                (["nym", "config", "alice", "--policy", "hold"], Command.CONFIG),
                (["nym", "add-surbs", "alice", "--surbs", "3"], Command.ADD_SURBS),
                (["nym", "send", "alice", "-t", "bob@example.org", "-i", env.write("m", b"hi\n")],
                 Command.SEND)]
        for counter, (argv, command) in enumerate(runs, 2):
            status, _, err = await env.run(*argv, "-D", "no", "--queue")
            self.assertEqual(status, 0, err)
            request = self.verified(env, self.one_request(env))
            self.assertEqual((request.command, request.counter), (command, counter))
            self.assertEqual(stored_nym(env).counter, counter)
        self.assertEqual(request.recipients, ("bob@example.org",))
        status, out, err = await env.run("nym", "list")
        self.assertEqual(status, 0, err)
        self.assertRegex(out.decode(), r"\Aalice@nym\.example\.org \(nymserver Omega\): counter 5, "
                                       r"created \d{4}-\d\d-\d\d \d\d:\d\d:\d\d GMT\n\Z")

    @inline
    async def test_the_counter_is_on_disk_before_the_request_leaves(self) -> None:
        env = nym_env(self)
        await self.create(env)
        seen: list[int] = []
        original = nym_cmd.deliver

        async def deliver(ctx: Any, items: list, mode: str) -> int:
            seen.append(stored_nym(env).counter)
            raise OSError("the machine stops here")

        self.patch(nym_cmd, "deliver", deliver)
        status, _, err = await env.run("nym", "status", "alice", "-D", "no")
        self.assertEqual(status, 1)
        self.assertEqual(seen, [2])
        # the next request never reuses it
        self.patch(nym_cmd, "deliver", original)
        status, _, err = await env.run("nym", "status", "alice", "-D", "no", "--queue")
        self.assertEqual(status, 0, err)
        self.assertEqual(self.one_request(env).counter, 3)

    @inline
    async def test_a_large_request_is_fragmented_to_the_nymserver(self) -> None:
        env = nym_env(self)
        status, out, err = await env.run(*CREATE, "--surbs", "30")
        self.assertEqual(status, 0, err)
        self.assertIn("reassembles it", err)
        ((envelope, packets),) = self.at_nymserver(env)  # each packet ends at Omega
        self.assertGreater(packets, 1)
        self.assertEqual(out, f"Queued {packets} packet(s); run 'mixminion-client flush' to "
                              "send them.\n".encode())
        request = self.verified(env, envelope)
        self.assertEqual(len(request.reply_blocks), 30)

    @inline
    async def test_send_carries_the_mail_and_its_headers(self) -> None:
        env = nym_env(self)
        await self.create(env)
        text = "Grüße.\n".encode()
        status, _, err = await env.run("nym", "send", "alice", "-t", "bob@example.org",
                                       "-t", "carol@example.org", "--subject", "Köln, again",
                                       "--in-reply-to", "<1@example.org>", "-D", "no",
                                       "--queue", stdin=text)
        self.assertEqual(status, 0, err)
        request = self.verified(env, self.one_request(env))
        self.assertEqual(request.recipients, ("bob@example.org", "carol@example.org"))
        mail = email.message_from_bytes(request.mail)
        self.assertEqual(str(email.header.make_header(email.header.decode_header(mail["Subject"]))),
                         "Köln, again")
        self.assertEqual(mail["In-Reply-To"], "<1@example.org>")
        self.assertEqual(mail.get_content_charset(), "utf-8")
        self.assertEqual(mail.get_payload(decode=True), text)
        # without headers: an empty header block, then the text as given
        status, _, err = await env.run("nym", "send", "alice", "-t", "bob@example.org", "-D",
                                       "no", "--queue", "-i", env.write("m", b"Subject: not\n"))
        self.assertEqual(status, 0, err)
        self.assertEqual(self.verified(env, self.one_request(env)).mail, b"\nSubject: not\n")

    @inline
    async def test_add_surbs_goes_to_the_last_address(self) -> None:
        env = nym_env(self)
        await self.create(env, "--surbs", "1")
        status, _, err = await env.run("nym", "add-surbs", "alice", "-D", "no", "--queue")
        self.assertEqual(status, 0, err)
        request = self.verified(env, self.one_request(env))
        self.assertEqual(len(request.reply_blocks), nym_cmd.DEFAULT_SURBS)
        texts = await self.through(env, request.reply_blocks[-1:],
                                   NymMessage("alice", Kind.ANSWER, 11, 0, counter=2))
        status, out, err = await env.run("decode", "-i", env.write("in", texts[0]))
        self.assertEqual((status, out), (0, b"Answer for nym alice@nym.example.org: request 2 "
                                            b"done (11 reply block(s) left at the nymserver, "
                                            b"0 mail(s) waiting).\n"), err)

    @inline
    async def test_delete_sends_then_forgets_and_local_only_forgets(self) -> None:
        env = nym_env(self)
        await self.create(env)
        status, _, err = await env.run(*CREATE[:2], "bob", *CREATE[3:])
        self.assertEqual(status, 0, err)
        self.at_nymserver(env)
        status, _, err = await env.run("nym", "delete", "alice", "-D", "no", "--queue")
        self.assertEqual(status, 0, err)
        request = self.one_request(env)
        self.assertEqual((request.command, request.counter), (Command.DELETE, 2))
        self.assertEqual([n.name for n in stored(env).nyms], ["bob"])
        self.assertTrue(stored(env).keys, "the reply-block keys stay, to decode the answer")
        status, _, err = await env.run("nym", "delete", "bob", "--local")
        self.assertEqual(status, 0, err)
        self.assertEqual(env.queued(), [])
        status, out, err = await env.run("nym", "list")
        self.assertEqual((status, out), (0, b"(No nyms in the keyring)\n"), err)

    @inline
    async def test_status_lines(self) -> None:
        env = nym_env(self)
        pipe = StatusPipe(self)
        status, _, err = await env.run(*CREATE, "--status-fd", str(pipe.w))
        self.assertEqual(status, 0, err)
        self.assertEqual(pipe.lines(), ["[MIXMINION:] NYM_REQUEST alice@nym.example.org create 1"])


# --- choosing the nymserver, and what refuses ---------------------------------------------------


class NymserverTests(NymCase):

    @inline
    async def test_the_one_nymserver_is_the_default_else_server_names_it(self) -> None:
        env = Env(self, standard_servers())
        status, out, err = await env.run(*CREATE)
        self.assertEqual((status, out), (1, b""))
        self.assertIn("No known server runs a nymserver", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        env = nym_env(self, nym_node(), nym_node("Psi", "nym-psi", "psi.example.org"))
        status, out, err = await env.run(*CREATE)
        self.assertEqual((status, out), (1, b""))
        self.assertIn("Several servers run a nymserver (Omega, Psi); choose one with --server "
                      "NICK.", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        status, _, err = await env.run(*CREATE, "--server", "Alpha")
        self.assertEqual(status, 1)
        self.assertIn("Alpha runs no nymserver", err)
        status, _, err = await env.run(*CREATE, "--server", "psi")
        self.assertEqual(status, 0, err)
        (entry,) = stored(env).nyms
        self.assertEqual((entry.server, entry.domain), ("Psi", "psi.example.org"))
        self.at_nymserver(env, nym_key="nym-psi", node="Psi")

    @inline
    async def test_a_changed_nym_key_is_refused(self) -> None:
        env = nym_env(self)
        await self.create(env)
        replaced = nym_node(nym_key="other-nym", published=TODAY - DAY + 120)
        with open(os.path.join(env.user_dir, "dir"), "w") as f:
            f.write(directory_text(servers(replaced)))
        status, out, err = await env.run("nym", "status", "alice", "-D", "no", "--queue")
        self.assertEqual((status, out), (1, b""))
        self.assertIn("is not the one alice@nym.example.org was created with", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertEqual((env.queued(), stored_nym(env).counter), ([], 1))

    @inline
    async def test_errors_a_user_can_cause_are_one_line(self) -> None:
        env = nym_env(self)
        status, _, err = await env.run("nym", "status", "alice", "-D", "no")
        self.assertEqual(status, 1)
        self.assertIn("You have no keyring", err)
        await self.create(env)
        wrong = dict(env.environ, **{PASSPHRASE_VAR: "not it"})
        cases = [(["nym", "status", "bob", "-D", "no"], env.environ, "You have no nym 'bob'"),
                 (CREATE, env.environ, "You already have the nym alice@nym.example.org"),
                 (["nym", "list"], wrong, "passphrase"),
                 (["nym", "status", "alice", "-D", "no"], wrong, "passphrase"),
                 (["nym", "send", "alice", "-t", "bob@example.org", "-D", "no"], env.environ,
                  "standard input is empty")]
        for argv, environ, expected in cases:
            status, out, err = await env.run(*argv, environ=environ)
            self.assertEqual((status, out), (1, b""), (argv, err))
            self.assertIn(expected, err)
            self.assertEqual(len(err.strip().splitlines()), 1, (argv, err))
            self.assertNotIn("Traceback", err)
        self.assertEqual(env.queued(), [])
        self.assertEqual(stored_nym(env).counter, 1)

    @inline
    async def test_wrong_arguments(self) -> None:
        env = nym_env(self)
        many = [a for i in range(21) for a in ("-t", f"r{i}@example.org")]
        for argv, blamed in [
                (["nym"], "nym"),
                (["nym", "frobnicate"], "nym"),
                (["nym", "create"], "nym create"),
                (["nym", "create", "Root", "--to", OWNER], "nym create"),
                (["nym", "create", "-bad", "--to", OWNER], "nym create"),
                (["nym", "create", "a" * 33, "--to", OWNER], "nym create"),
                (["nym", "create", "alice"], "nym create"),  # no --to, no SURBAddress
                (["nym", "create", "alice", "--to", OWNER, "--surbs", "0"], "nym create"),
                (["nym", "create", "alice", "--to", OWNER, "--surbs", "101"], "nym create"),
                (["nym", "create", "alice", "--to", OWNER, "--policy", "keep"], "nym create"),
                (["nym", "create", "alice", "--to", OWNER, "--lifetime", "x"], "nym create"),
                (["nym", "status"], "nym status"),
                (["nym", "status", "alice", "--bogus"], "nym status"),
                (["nym", "status", "alice", "-P", "*2", "-H", "3"], "nym status"),
                (["nym", "config", "alice"], "nym config"),
                (["nym", "send", "alice"], "nym send"),
                (["nym", "send", "alice", "-t", "nobody"], "nym send"),
                (["nym", "send", "alice", *many], "nym send"),
                (["nym", "send", "alice", "-t", "b@example.org", "--subject", "a\nb"], "nym send"),
                (["nym", "list", "alice"], "nym list"),
                (["nym", "-v", "list", "-Q"], "nym list")]:
            await self.assert_usage_error(env, argv, blamed, stdin=b"text\n")

    @inline
    async def test_help_and_man_page_name_every_option(self) -> None:
        env = nym_env(self)
        _, parsers = cli.build_parser(io.StringIO())
        with open(os.path.join(DOC, "mixminion-client.1")) as f:
            man = f.read().replace("\\-", "-")
        leaves = parsers["nym"].leaves
        self.assertEqual(list(leaves), ["create", "add-surbs", "send", "config", "status",
                                        "delete", "list"])
        for name, parser in leaves.items():
            status, out, _ = await env.run("nym", name, "--help")
            self.assertEqual(status, 0)
            text = out.decode()
            self.assertIn(f"mixminion-client nym {name}", text)
            self.assertTrue(f".SS nym {name}" in man, f"no section for nym {name}")
            for action in parser._actions:
                for option in action.option_strings:
                    self.assertIn(option, text, (name, option))
                    self.assertTrue(option in man, (name, option))
        status, out, _ = await env.run("nym", "--help")
        self.assertEqual(status, 0)
        for name in leaves:
            self.assertIn(name, out.decode())


# --- decode -----------------------------------------------------------------------------------


class DecodeTests(NymCase):

    async def blocks(self, env: Env, count: int = 10) -> list[ReplyBlock]:
        return list(self.verified(env, await self.create(env, "--surbs", str(count))).reply_blocks)

    @inline
    async def test_an_answer_and_a_warning_below_warn_below(self) -> None:
        env = nym_env(self)
        blocks = await self.blocks(env)
        refused = NymMessage("alice", Kind.ANSWER, 3, 1, counter=1, ok=False,
                             reason="the name is taken")
        ok = NymMessage("alice", Kind.ANSWER, 5, 0, counter=2)
        texts = (await self.through(env, blocks[:1], refused)
                 + await self.through(env, blocks[1:2], ok))
        pipe = StatusPipe(self)
        status, out, err = await env.run("decode", "-i", env.write("in", b"".join(texts)),
                                         "--status-fd", str(pipe.w))
        self.assertEqual(status, 0, err)
        self.assertEqual(out, b"Answer for nym alice@nym.example.org: request 1 refused: the "
                              b"name is taken (3 reply block(s) left at the nymserver, 1 mail(s) "
                              b"waiting).\n==== message 2 of 2\nAnswer for nym "
                              b"alice@nym.example.org: request 2 done (5 reply block(s) left at "
                              b"the nymserver, 0 mail(s) waiting).\n")
        warnings = [line for line in err.splitlines() if "[WARN]" in line]
        self.assertEqual(len(warnings), 1, err)  # 3 is below 5; 5 is not
        self.assertIn("only 3 reply block(s) for alice@nym.example.org", warnings[0])
        self.assertIn("'mixminion-client nym add-surbs alice'", warnings[0])
        self.assertEqual(pipe.lines(), [
            "[MIXMINION:] NYM_ANSWER alice@nym.example.org 1 refused 3 1",
            "[MIXMINION:] NYM_ANSWER alice@nym.example.org 2 ok 5 0"])
        # [Nym] WarnBelow: 2 does not warn for 3
        with open(env.rc) as f:
            rc = env.write("rc-2", (f.read() + "[Nym]\nWarnBelow: 2\n").encode())
        status, _, err = await env.run("decode", "-i", env.path("in"),
                                       environ=dict(env.environ, MIXMINIONRC=rc))
        self.assertEqual(status, 0, err)
        self.assertNotIn("[WARN]", err)

    @inline
    async def test_a_fragmented_mail_reassembled_across_reply_blocks(self) -> None:
        env = nym_env(self)
        blocks = await self.blocks(env)
        body = b"Subject: a big one\n\n" + random.Random(3).randbytes(40000)
        texts = await self.through(env, blocks, NymMessage("alice", Kind.MAIL, 2, 0, body=body))
        self.assertGreater(len(texts), 1)
        status, out, err = await env.run("decode", "-i", env.write("first", texts[0]))
        self.assertEqual((status, out), (0, b""), err)
        status, out, err = await env.run("decode", "-i", env.write("rest", b"".join(texts[1:])),
                                         "-o", env.path("out"))
        self.assertEqual(status, 0, err)
        with open(env.path("out"), "rb") as f:
            self.assertEqual(f.read(), b"Mail for nym alice@nym.example.org (2 reply block(s) "
                                       b"left at the nymserver, 0 mail(s) waiting):\n" + body)
        self.assertIn("nym add-surbs alice", err)

    @inline
    async def test_other_replies_and_forward_messages_are_written_as_before(self) -> None:
        """Only a reply through our reply blocks is a nymserver's message; a
        plaintext forward message that looks like one is written as is."""
        from mixminion.codec.exit import PLAINTEXT, encode_text_message
        env = nym_env(self)
        look_alike = NymMessage("alice", Kind.MAIL, 0, 0, body=b"x\n").to_bytes()
        status, out, err = await env.run("decode", stdin=encode_text_message(look_alike, PLAINTEXT))
        self.assertEqual((status, out), (0, look_alike), err)
        self.assertNotIn("[WARN]", err)
        blocks = await self.blocks(env, 1)
        damaged = b"Mixminion-Nym: 0.1\nNym: alice\nKind: mail\n\nno counts\n"
        payloads = encode_message_payloads(damaged, os.urandom)
        built = build_reply_packet(payloads[0], [hop_for(nym_node())], blocks[0], os.urandom)
        _, exit_ = route(built.packet, nym_node().identity_digest, processors())
        text = text_for_delivery(classify_payload(exit_.payload), exit_.tag)
        status, out, err = await env.run("decode", stdin=text)
        self.assertEqual((status, out), (0, b"\n" + damaged), err)
        self.assertIn("does not parse", err)
        # through a reply block of the default identity: not the nymserver's
        status, surbs, err = await env.run("generate-surb", "-t", OWNER, "-D", "no")
        self.assertEqual(status, 0, err)
        forged = NymMessage("alice", Kind.ANSWER, 9, 0, counter=7)
        (text,) = await self.through(env, parse_reply_blocks(surbs), forged)
        status, out, err = await env.run("decode", stdin=text)
        self.assertEqual((status, out), (0, b"\n" + forged.to_bytes()), err)
        self.assertIn("not made for that nym", err)


# --- keyring and configuration ----------------------------------------------------------------


class KeyringTests(unittest.TestCase):

    def entry(self, name: str = "alice") -> NymEntry:
        return NymEntry(name, DOMAIN, "Omega", "mbox:me@Alpha", key("nym").public.der,
                        os.urandom(32), counter=2**63 - 1, created=1_700_000_000)

    def test_nyms_round_trip_with_the_other_items(self) -> None:
        ring = keyring.Keyring()
        ring.surb_key("alice@nym.example.org", env_now())
        ring.nyms += [self.entry(), self.entry("bob")]
        ring.unknown.append((7, b"future item"))
        text = keyring.encrypt_keyring(ring, "pw", log_n=12)
        back = keyring.decrypt_keyring(text, "pw")
        self.assertEqual(sorted(back.nyms, key=lambda n: n.name), ring.nyms)
        self.assertEqual(back.unknown, [(7, b"future item")])
        self.assertEqual(len(back.keys), 1)

    def test_a_malformed_nym_is_refused(self) -> None:
        packed = self.entry().pack()
        for bad in (packed[:-1], packed + b"x", b"\x02" + packed[1:], packed[:40]):
            with self.assertRaises(keyring.KeyringError) as cm:
                keyring.Keyring.from_plaintext(bytes([keyring.NYM_ITEM])
                                               + len(bad).to_bytes(2, "big") + bad)
            self.assertIn("nym", str(cm.exception))


class ConfigTests(unittest.TestCase):

    def test_warn_below(self) -> None:
        self.assertEqual(parse_client_config("").nym_warn_below, 5)
        self.assertEqual(parse_client_config("[Nym]\nWarnBelow: 0\n").nym_warn_below, 0)
        self.assertEqual(parse_client_config("[Nym]\nWarnBelow: 12\n").nym_warn_below, 12)
        for text in ("[Nym]\nWarnBelow: many\n", "[Nym]\nWarnBelow: -1\n",
                     "[Nym]\nWarnBelow: 1\nWarnBelow: 2\n", "[Nym]\nWarnAbove: 1\n"):
            with self.assertRaises(ConfigError) as cm:
                parse_client_config(text, "rc")
            self.assertIn("Nym", str(cm.exception))

    def test_the_default_file_names_it(self) -> None:
        from mixminion.client.config import DEFAULT_FILE
        self.assertIn("[Nym]\n#WarnBelow: 5\n", DEFAULT_FILE)
        self.assertEqual(parse_client_config(DEFAULT_FILE.replace("#WarnBelow", "WarnBelow"))
                         .nym_warn_below, 5)
