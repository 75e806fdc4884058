"""The ``mixminion-client`` command: options, paths, keyring, replies,
fragments and the queue.

Commands run in-process through :func:`mixminion.client.cli.run` on
trial's reactor, with a configuration and ``UserDir`` in a temporary
folder and a directory built and signed here.  Packets are followed hop
by hop with each server's :class:`PacketProcessor`; the queue test talks
real MMTP (TLS on loopback) to a responder storing into a DurableSink.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import random
import re
import socket
import time
from typing import Any, Optional, Sequence

from twisted.internet import defer, threads
from twisted.internet import reactor as _reactor
from twisted.trial import unittest

from mixminion.client import cli, keyring
from mixminion.client.commands import common
from mixminion.client.config import ConfigError, load_client_config, parse_client_config
from mixminion.client.paths import (
    ExitNeeds,
    PathError,
    PathSelector,
    parse_address,
    parse_path,
)
from mixminion.client.store import ClientQueue
from mixminion.codec.exit import classify_payload, text_for_delivery
from mixminion.codec.process import Exit, PacketProcessor, Relay
from mixminion.codec.replay import MemoryReplayLog
from mixminion.codec.routing import FRAGMENT_TYPE, SMTP_TYPE
from mixminion.directory.descriptor import (
    DeliveryInfo,
    DescriptorFields,
    IncomingMMTP,
    OutgoingMMTP,
    ServerDescriptor,
)
from mixminion.codec.textformat import previous_midnight
from mixminion.test.test_client_directory import make_directory, signed_descriptor
from mixminion.testing.keys import key

reactor: Any = _reactor
DAY = 86400
TODAY = previous_midnight(int(time.time()))
AUTHORITY = "auth"
PASSPHRASE = "correct horse battery staple"
DOC = os.path.join(os.path.dirname(__file__), "..", "..", "doc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORTS: dict[str, int] = {}


@functools.cache
def descriptor(nickname: str, smtp: bool = True, max_fragments: Optional[int] = 16,
               relay: bool = True, valid_until: int = TODAY + 30 * DAY,
               valid_after: int = TODAY - DAY, port: Optional[int] = None,
               software: Optional[str] = None) -> ServerDescriptor:
    """``nickname``'s descriptor on 127.0.0.1 (on ``port``, else one port
    per nickname for the whole run)."""
    port = port or PORTS.setdefault(nickname, free_port())
    extra = {"software": software} if software else {}
    fields = DescriptorFields(
        nickname=nickname,
        contact=f"{nickname.lower()}@example.org",
        packet_key=key(nickname + "-packet").public,
        published=valid_after + 60,
        valid_after=valid_after,
        valid_until=valid_until,
        incoming=IncomingMMTP(hostname="127.0.0.1", port=port),
        outgoing=OutgoingMMTP() if relay else None,
        smtp=DeliveryInfo(max_size_kib=100) if smtp else None,
        max_fragments=max_fragments,
        **extra,
    )
    return signed_descriptor(fields, nickname)


def standard_servers() -> list[ServerDescriptor]:
    """Alpha and Beta deliver SMTP and reassemble; Gamma only reassembles;
    Delta only relays."""
    return [server("Alpha"), server("Beta"), server("Gamma"), server("Delta")]


def server(name: str) -> ServerDescriptor:
    if name == "Gamma":
        return descriptor("Gamma", smtp=False)
    if name == "Delta":
        return descriptor("Delta", smtp=False, max_fragments=None)
    return descriptor(name)


def directory_text(descriptors: Sequence[ServerDescriptor]) -> str:
    """Today's consensus of ``descriptors``, by the one authority."""
    return make_directory(descriptors, signers=[AUTHORITY], voters=[AUTHORITY],
                          valid_after=TODAY, valid_until=TODAY + DAY)


def processors() -> dict[bytes, tuple[str, PacketProcessor]]:
    """KeyID -> (nickname, the server's packet processor)."""
    out = {}
    for d in standard_servers():
        out[d.identity_digest] = (d.nickname, PacketProcessor(
            [(key(d.nickname + "-packet"), MemoryReplayLog())]))
    return out


def route(packet: bytes, first_keyid: bytes, procs: dict) -> tuple[list[str], Exit]:
    """Process a packet hop by hop until it exits; the nicknames it visited."""
    seen, keyid = [], first_keyid
    for _ in range(40):
        name, proc = procs[keyid]
        seen.append(name)
        result = proc.process(packet)
        if isinstance(result, Exit):
            return seen, result
        assert isinstance(result, Relay), result
        packet, keyid = result.packet, result.next_hop.keyid
    raise AssertionError("packet never exited")


class Env:
    """A temporary home for the client: config, UserDir and a directory."""

    def __init__(self, test: unittest.TestCase,
                 descriptors: Optional[Sequence[ServerDescriptor]] = None,
                 extra: str = "") -> None:
        base = os.path.abspath(test.mktemp())
        os.makedirs(base)
        self.user_dir = os.path.join(base, "user")
        os.makedirs(self.user_dir, mode=0o700)
        self.rc = os.path.join(base, "mixminionrc")
        with open(self.rc, "w") as f:
            f.write(f"[User]\nUserDir: {self.user_dir}\n"
                    f"[DirectoryServers]\nAuthority: http://127.0.0.1:9/ "
                    f"{key(AUTHORITY).public.fingerprint}\n"
                    f"[Network]\nTimeout: 10 seconds\n{extra}")
        with open(os.path.join(self.user_dir, "dir"), "w") as f:
            f.write(directory_text(standard_servers() if descriptors is None else descriptors))
        self.base = base
        self.environ = {"MIXMINIONRC": self.rc, "HOME": base, PASSPHRASE_VAR: PASSPHRASE}

    def path(self, name: str) -> str:
        return os.path.join(self.base, name)

    def write(self, name: str, data: bytes) -> str:
        with open(self.path(name), "wb") as f:
            f.write(data)
        return self.path(name)

    async def run(self, *argv: str, stdin: bytes = b"",
                  environ: Optional[dict] = None) -> tuple[int, bytes, str]:
        out, err = io.BytesIO(), io.StringIO()
        status = await cli.run(list(argv), stdin=io.BytesIO(stdin), stdout=out, stderr=err,
                               environ=environ or self.environ, reactor=reactor,
                               offload=threads.deferToThread)
        return status, out.getvalue(), err.getvalue()

    def queued(self) -> list:
        return list(ClientQueue(self.user_dir).packets())


PASSPHRASE_VAR = common.PASSPHRASE_ENV


def inline(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any) -> defer.Deferred:
        return defer.ensureDeferred(fn(*args))
    return wrapper


# --- usage errors and help ------------------------------------------------------------


class UsageTests(unittest.TestCase):

    @inline
    async def test_usage_errors_exit_2_with_one_line(self) -> None:
        env = Env(self)
        cases = [
            [],
            ["frobnicate"],
            ["send", "--bogus"],
            ["send", "-t", "a@example.org", "-P", "*2", "-H", "3", "-D", "no"],
            ["send", "-t", "a@example.org", "--queue", "--no-queue", "-D", "no"],
            ["send", "-D", "maybe", "-t", "a@example.org"],
            ["send", "-i", "x", "-D", "no"],
            ["send", "-t", "a@example.org", "-H", "0"],
            ["flush", "-n", "many"],
            ["decode", "-v", "-Q"],
            ["decode", "--passphrase-fd", "x"],
            ["import-server"],
            ["send", "-t", "drop", "-i", "somefile", "-D", "no"],
            ["send", "-t", "a@b.org", "-P", "Alpha:Beta", "--swap-at", "1", "-D", "no"],
        ]
        for argv in cases:
            status, out, err = await env.run(*argv)
            self.assertEqual(status, 2, (argv, err))
            self.assertEqual(len(err.strip().splitlines()), 1, (argv, err))
            self.assertIn("mixminion-client", err)

    @inline
    async def test_help_documents_every_option(self) -> None:
        """Each command's --help lists each of its options, and the man
        page lists every command and option too."""
        env = Env(self)
        _, parsers = cli.build_parser(io.StringIO())
        with open(os.path.join(DOC, "mixminion-client.1")) as f:
            man = f.read().replace("\\-", "-")
        for name, parser in parsers.items():
            status, out, _ = await env.run(name, "--help")
            self.assertEqual(status, 0)
            text = out.decode()
            self.assertIn(f"mixminion-client {name}", text)
            self.assertIn(name, man)
            for action in parser._actions:
                for option in action.option_strings:
                    self.assertIn(option, text, (name, option))
                    self.assertIn(option, man, (name, option))
                if option_help := action.help:
                    self.assertNotEqual(option_help, "", (name, action))

    @inline
    async def test_top_level_help(self) -> None:
        status, out, _ = await Env(self).run("--help")
        self.assertEqual(status, 0)
        for name in cli.COMMANDS:
            self.assertIn(name, out.decode())


# --- configuration ---------------------------------------------------------------------


class ConfigTests(unittest.TestCase):

    def test_options(self) -> None:
        c = parse_client_config(
            "[User]\nUserDir: /tmp/u\n[Security]\nForwardPath: ?,?:?\nBlockExits: A, b\n"
            "SURBLifetime: 3 days\n[DirectoryServers]\nAuthority: http://x.example/ "
            + "AB" * 20 + "\nThreshold: 1\n[Network]\nTimeout: 30 seconds\n")
        self.assertEqual(c.user_dir, "/tmp/u")
        self.assertEqual(c.forward_path, "?,?:?")
        self.assertEqual(c.block_exits, frozenset({"a", "b"}))
        self.assertEqual(c.surb_lifetime, 3 * DAY)
        self.assertEqual(c.timeout, 30)
        self.assertEqual(c.authorities[0].fingerprint, "AB" * 20)

    def test_errors(self) -> None:
        for text in ("[Bogus]\nX: 1\n", "[Security]\nForwardPat: ~3\n",
                     "[Network]\nTimeout: soon\n", "[Server]\nNickname: x\n"):
            self.assertRaises(ConfigError, parse_client_config, text)

    def test_obsolete_warns(self) -> None:
        c = parse_client_config("[Security]\nPathLength: 4\n")
        self.assertIn("ForwardPath: *N", c.warnings[0])


# --- path syntax and selection -------------------------------------------------------


class PathSyntaxTests(unittest.TestCase):

    def test_elements_and_swap(self) -> None:
        spec = parse_path("Alpha,?,*2:~3,'file:with,comma'")
        self.assertEqual(spec.swap, 3)
        self.assertEqual([str(e) for e in spec.elements], ["Alpha", "?", "*2", "~3", "file:with,comma"])
        self.assertEqual(spec.elements[-1].name, "file:with,comma")
        self.assertEqual(str(parse_path("~5")), "?,~4")

    def test_errors(self) -> None:
        for text, kind in [("a:b:c", "forward"), ("*", "forward"), ("a,,b", "forward"),
                           (":a", "forward"), ("a:", "forward"), ("?", "forward"),
                           ("a:b", "reply"), ("a:b", "surb"), ("'open", "forward"),
                           ("'q'x,b", "forward"), ("~x", "forward")]:
            self.assertRaises(PathError, parse_path, text, kind)
        self.assertEqual(len(parse_path("?", "reply").elements), 1)

    def test_addresses(self) -> None:
        self.assertEqual(parse_address("a@example.org").exit_type, SMTP_TYPE)
        self.assertEqual(parse_address("smtp:a@example.org").address, b"a@example.org")
        mbox = parse_address("mbox:joe@Alpha")
        self.assertEqual((mbox.address, mbox.forced_server), (b"joe", "Alpha"))
        self.assertEqual(parse_address("0x0200:xyz").exit_type, 0x200)
        for bad in ("nobody", "a@1.2.3.4", "0x0001:x", "mbox:"):
            self.assertRaises(PathError, parse_address, bad)


class PathSelectionTests(unittest.TestCase):

    def selector(self, env: Env, **blocks: Any) -> PathSelector:
        args = argparse.Namespace(quiet=True, verbose=False)
        ctx = common.Context(io.BytesIO(), io.BytesIO(), io.StringIO(), env.environ, reactor, args)
        ctx.config = load_client_config(env.rc, env.environ)
        for k, v in blocks.items():
            setattr(ctx.config, k, frozenset(v))
        directory = common.default_directory(ctx)
        directory.load()
        now = time.time()
        return common.make_selector(ctx, directory, now, previous_midnight(int(now + DAY)))

    def test_rules_hold_over_many_draws(self) -> None:
        expired = descriptor("Old", valid_after=TODAY - 40 * DAY, valid_until=TODAY - 10 * DAY)
        env = Env(self, standard_servers() + [expired])
        sel = self.selector(env)
        needs = ExitNeeds(parse_address("a@example.org"), size=1000)
        for text in ("~5", "*4", "?,?:?,?", "Gamma,*3"):
            spec = parse_path(text)
            for _ in range(30):
                legs = sel.choose(spec, "forward", needs)
                hops = legs.hops
                self.assertTrue(legs.leg1 and legs.leg2)
                self.assertGreaterEqual(len(hops), 2)
                for a, b in zip(hops, hops[1:]):
                    self.assertNotEqual(a.nickname, b.nickname, str(legs))
                self.assertNotIn("Old", [d.nickname for d in hops])
                self.assertIn(hops[-1].nickname, ("Alpha", "Beta"))  # only they deliver SMTP
        self.assertEqual(len(sel.choose(parse_path("*4"), "forward", needs).hops), 4)

    def test_a_one_hop_draw_padded_for_the_swap_point_repeats_no_server(self) -> None:
        """'~5' can draw one hop; it becomes the exit, the swap point adds
        a hop after it, and that hop is an exit too: it must differ."""
        env = Env(self, standard_servers())
        sel = self.selector(env)
        sel._approx = lambda n: 0  # ~5 is one hop plus ~4: draw none more
        needs = ExitNeeds(parse_address("a@example.org"), size=1000)
        for _ in range(40):
            legs = sel.choose(parse_path("~5"), "forward", needs)
            a, b = legs.hops
            self.assertNotEqual(a.nickname, b.nickname, str(legs))

    def test_fragmented_exit_needs_reassembly_and_size(self) -> None:
        sel = self.selector(Env(self))
        needs = ExitNeeds(parse_address("a@example.org"), size=60000, fragments=6)
        for _ in range(10):
            self.assertIn(sel.choose(parse_path("*3"), "forward", needs).leg2[-1].nickname,
                          ("Alpha", "Beta"))
        too_big = ExitNeeds(parse_address("a@example.org"), size=500 * 1024, fragments=30)
        self.assertRaises(PathError, sel.validate, parse_path("*3"), too_big, "forward")
        self.assertIn("reassembles at most 16", needs.problem(descriptor("Alpha")) or
                      ExitNeeds(needs.address, 1000, fragments=17).problem(descriptor("Alpha")))
        self.assertIn("does not reassemble",
                      ExitNeeds(needs.address, 1000, fragments=3).problem(server("Delta")))

    def test_named_exit_must_support_delivery(self) -> None:
        sel = self.selector(Env(self))
        needs = ExitNeeds(parse_address("a@example.org"), size=100)
        self.assertRaises(PathError, sel.validate, parse_path("Alpha,Gamma"), needs, "forward")
        sel.validate(parse_path("Gamma,Alpha"), needs, "forward")
        self.assertRaises(PathError, sel.validate, parse_path("Nobody,Alpha"), needs, "forward")
        self.assertRaises(PathError, sel.validate, parse_path("*2"),
                          ExitNeeds(parse_address("mbox:joe")), "forward")

    def test_blocked_servers_and_swap_at(self) -> None:
        sel = self.selector(Env(self), block_servers={"beta"}, block_entries={"gamma"})
        needs = ExitNeeds(parse_address("a@example.org"), size=100)
        for _ in range(20):
            legs = sel.choose(parse_path("*3"), "forward", needs)
            self.assertNotIn("Beta", [d.nickname for d in legs.hops])
            self.assertNotEqual(legs.hops[0].nickname, "Gamma")
        legs = sel.choose(parse_path("*4"), "forward", needs, swap_at=1)
        self.assertEqual((len(legs.leg1), len(legs.leg2)), (1, 3))
        self.assertRaises(PathError, sel.choose, parse_path("*2"), "forward", needs, swap_at=2)

    def test_too_many_hops_do_not_fit(self) -> None:
        sel = self.selector(Env(self))
        self.assertRaises(PathError, sel.choose, parse_path("*30:*2"), "forward",
                          ExitNeeds(parse_address("a@example.org")))


# --- keyring -----------------------------------------------------------------------------


class KeyringTests(unittest.TestCase):

    def test_round_trip_and_wrong_passphrase(self) -> None:
        ring = keyring.Keyring()
        secret = ring.surb_key("Alice", time.time())
        self.assertEqual(ring.surb_key("alice", time.time()), secret)  # reused: 90 days left
        ring.unknown.append((7, b"future item"))
        text = keyring.encrypt_keyring(ring, "pw", log_n=12)
        self.assertNotIn(secret.hex(), text)
        back = keyring.decrypt_keyring(text, "pw")
        self.assertEqual([(k.identity, k.secret) for k in back.keys], [("alice", secret)])
        self.assertEqual(back.unknown, [(7, b"future item")])
        self.assertRaises(keyring.WrongPassphrase, keyring.decrypt_keyring, text, "wrong")

    def test_tampering_and_reference_format_refused(self) -> None:
        from mixminion.codec.armor import armor, dearmor
        text = keyring.encrypt_keyring(keyring.Keyring(), "pw", log_n=12)
        body = bytearray(dearmor(text).body)
        body[-1] ^= 1
        self.assertRaises(keyring.WrongPassphrase, keyring.decrypt_keyring,
                          armor(keyring.ARMOR_NAME, [("Version", "1.0")], bytes(body)), "pw")
        old = armor(keyring.ARMOR_NAME, [("Version", "0.1")], b"KEYRING2\0" + b"x" * 60)
        with self.assertRaises(keyring.KeyringError) as cm:
            keyring.decrypt_keyring(old, "pw")
        self.assertIn("original Mixminion client", str(cm.exception))

    def test_key_renewed_when_close_to_expiry(self) -> None:
        ring = keyring.Keyring()
        now = time.time()
        first = ring.surb_key("", now)
        self.assertNotEqual(ring.surb_key("", now + 70 * DAY), first)
        self.assertEqual(len(ring.decoding_keys(now + 70 * DAY)), 2)


# --- replies and decoding -----------------------------------------------------------------


class ReplyTests(unittest.TestCase):
    timeout = 120

    async def deliveries(self, env: Env, count: int) -> list[bytes]:
        """Route every queued packet to its exit; the text each exit delivers."""
        procs = processors()
        texts = []
        queued = env.queued()
        self.assertEqual(len(queued), count)
        for q in queued:
            _, exit_ = route(q.packet, q.destination.keyid, procs)
            self.assertEqual(exit_.exit_type, SMTP_TYPE)
            self.assertEqual(exit_.address, b"me@example.org")
            texts.append(text_for_delivery(classify_payload(exit_.payload), exit_.tag))
            ClientQueue(env.user_dir).remove(q.handle)
        return texts

    @inline
    async def test_surb_reply_decoded_with_keyring(self) -> None:
        env = Env(self)
        status, surbs, err = await env.run("generate-surb", "-t", "me@example.org",
                                           "-P", "Alpha,Gamma,Beta", "-D", "no")
        self.assertEqual(status, 0, err)
        self.assertIn(b"-----BEGIN TYPE III REPLY BLOCK-----", surbs)
        self.assertTrue(os.path.exists(keyring.keyring_path(env.user_dir)))
        surb_file = env.write("surbs.txt", surbs)
        status, out, err = await env.run("inspect-surbs", surb_file)
        self.assertEqual(status, 0, err)
        self.assertIn(b"Used: no", out)
        message = b"Thank you for your message.\nSee you.\n"
        status, out, err = await env.run("queue", "-R", surb_file, "-i", env.write("m", message),
                                         "--subject", "Re: hello", "-P", "Delta,Gamma", "-D", "no")
        self.assertEqual(status, 0, err)
        self.assertIn(b"Queued 1 packet", out)
        (text,) = await self.deliveries(env, 1)
        self.assertIn(b"Decoding-handle:", text)
        delivered = env.write("mail", b"From: someone\n\n" + text)
        status, out, err = await env.run("decode", "-i", delivered)
        self.assertEqual(status, 0, err)
        # as the reference writes it: the reply's header block, then the body
        self.assertEqual(out, b"SUBJECT:Re: hello\n\n" + message)
        # the block was marked used: a second reply through it is refused
        status, _, err = await env.run("queue", "-R", surb_file, "-i", env.write("m2", b"x"),
                                       "-D", "no")
        self.assertEqual(status, 1)
        self.assertIn("reply block", err)
        status, out, _ = await env.run("inspect-surbs", surb_file)
        self.assertIn(b"Used: yes", out)
        # a wrong passphrase is refused
        wrong = dict(env.environ, **{PASSPHRASE_VAR: "not it"})
        status, _, err = await env.run("decode", "-i", delivered, environ=wrong)
        self.assertEqual(status, 1)
        self.assertIn("passphrase", err)

    @inline
    async def test_empty_passphrase_is_warned_about(self) -> None:
        """A keyring created with an empty passphrase works, but the user is
        told once that it protects nothing (issue 12 point 10)."""
        env = Env(self)
        empty = dict(env.environ, **{PASSPHRASE_VAR: ""})
        status, _, err = await env.run("generate-surb", "-t", "me@example.org", "-P", "Alpha",
                                       "-D", "no", environ=empty)
        self.assertEqual(status, 0, err)
        self.assertIn("empty passphrase", err)
        status, _, err = await env.run("generate-surb", "-t", "me@example.org", "-P", "Alpha",
                                       "-D", "no", environ=empty)
        self.assertEqual(status, 0, err)
        self.assertNotIn("empty passphrase", err)  # said when it is created only

    @inline
    async def test_passphrase_fd(self) -> None:
        env = Env(self)
        environ = {k: v for k, v in env.environ.items() if k != PASSPHRASE_VAR}
        r, w = os.pipe()
        os.write(w, b"from a pipe\n")
        os.close(w)
        self.addCleanup(os.close, r)
        status, _, err = await env.run("generate-surb", "-t", "me@example.org", "-P", "Alpha",
                                       "-D", "no", "--passphrase-fd", str(r), environ=environ)
        self.assertEqual(status, 0, err)
        with open(keyring.keyring_path(env.user_dir)) as f:
            keyring.decrypt_keyring(f.read(), "from a pipe")
        self.assertEqual(os.stat(keyring.keyring_path(env.user_dir)).st_mode & 0o777, 0o600)

    @inline
    async def test_fragmented_reply_reassembled_across_runs(self) -> None:
        env = Env(self)
        status, surbs, err = await env.run("generate-surb", "-t", "me@example.org", "-n", "3",
                                           "-P", "*2", "-D", "no")
        self.assertEqual(status, 0, err)
        surb_file = env.write("surbs", surbs)
        message = random.Random(5).randbytes(40000)
        status, out, err = await env.run("queue", "-R", surb_file, "-i", env.write("m", message),
                                         "-P", "?", "-D", "no")
        self.assertEqual(status, 0, err)
        texts = await self.deliveries(env, 3)
        status, out, err = await env.run("decode", "-i", env.write("d1", texts[2]))
        self.assertEqual((status, out), (0, b""), err)
        self.assertIn("Stored 1 fragment", err)
        status, out, err = await env.run("decode", "-i", env.write("d2", texts[0]),
                                         "-o", env.path("out"))
        self.assertEqual(status, 0, err)
        with open(env.path("out"), "rb") as f:
            self.assertEqual(f.read(), b"\n" + message)  # its (empty) header block first

    @inline
    async def test_decode_plain_and_garbage(self) -> None:
        env = Env(self)
        from mixminion.codec.exit import PLAINTEXT, encode_text_message
        text = encode_text_message(b"hello there\n", PLAINTEXT)
        status, out, err = await env.run("decode", "-i", env.write("p", text))
        self.assertEqual((status, out), (0, b"hello there\n"), err)
        status, out, err = await env.run("decode", "-i", env.write("g", b"nothing here\n"))
        self.assertEqual(status, 1)
        self.assertIn("TYPE III ANONYMOUS MESSAGE", err)


# --- forward messages and the queue --------------------------------------------------------


class SendTests(unittest.TestCase):
    timeout = 120

    @inline
    async def test_large_message_fragments_to_one_exit(self) -> None:
        env = Env(self)
        message = random.Random(1).randbytes(70000)
        status, out, err = await env.run("queue", "-t", "bob@example.org", "-i",
                                         env.write("big", message), "-P", "*3", "-D", "no")
        self.assertEqual(status, 0, err)
        queued = env.queued()
        self.assertEqual(len(queued), 6)  # 3 fragments' worth -> k=4, n=6
        procs = processors()
        exits = set()
        for q in queued:
            seen, exit_ = route(q.packet, q.destination.keyid, procs)
            self.assertEqual(exit_.exit_type, FRAGMENT_TYPE)
            exits.add(seen[-1])
        self.assertEqual(len(exits), 1)
        self.assertIn(exits.pop(), ("Alpha", "Beta"))

    @inline
    async def test_headers_travel_to_the_exit(self) -> None:
        env = Env(self)
        status, _, err = await env.run("queue", "-t", "bob@example.org", "-i",
                                       env.write("m", b"body\n"), "--subject", "Hi",
                                       "--from", "Anon", "-P", "Gamma:Alpha", "-D", "no")
        self.assertEqual(status, 0, err)
        (q,) = env.queued()
        seen, exit_ = route(q.packet, q.destination.keyid, processors())
        self.assertEqual(seen, ["Gamma", "Alpha"])
        result = classify_payload(exit_.payload)
        self.assertEqual(result.headers, {"SUBJECT": "Hi", "FROM": "Anon"})
        self.assertEqual(result.body, b"body\n")
        status, _, err = await env.run("queue", "-t", "bob@example.org", "-i", env.path("m"),
                                       "--from", "a:b", "-D", "no")
        self.assertEqual(status, 1)
        self.assertIn("FROM", err)

    @inline
    async def test_first_hop_down_then_flush(self) -> None:
        from mixminion.mmtp.responder import responder_factory
        from mixminion.mmtp.tls import ResponderTLS
        from mixminion.server.durable import DurableSink
        from mixminion.server.packetstore import PacketStore

        env = Env(self)
        status, out, err = await env.run("send", "-t", "bob@example.org", "-i",
                                         env.write("m", b"hello\n"), "-P", "Alpha,Beta", "-D", "no")
        self.assertEqual(status, 0, err)
        self.assertIn(b"queued", out)
        self.assertIn("Could not deliver to Alpha", err)
        (q,) = env.queued()
        path = os.path.join(env.user_dir, "queue", q.handle)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        status, out, _ = await env.run("inspect-queue")
        self.assertIn(b"1 packets for Alpha", out)

        store = PacketStore(env.path("incoming.db"))
        sink = DurableSink(store, reactor)
        tls = ResponderTLS(key("Alpha"), "Alpha", clock=reactor)
        port = reactor.listenTCP(PORTS["Alpha"], responder_factory(sink, tls, reactor),
                                 interface="127.0.0.1")

        async def stop() -> None:
            await port.stopListening()
            await sink.stop()
            store.close()
        self.addCleanup(lambda: defer.ensureDeferred(stop()))

        status, out, err = await env.run("flush")
        self.assertEqual(status, 0, err)
        self.assertIn(b"Queue flushed", out)
        self.assertEqual(env.queued(), [])
        stored = [p for _, p in store.iterate("incoming")]
        self.assertEqual(stored, [q.packet])
        seen, exit_ = route(stored[0], key("Alpha").public.keyid, processors())
        self.assertEqual((seen, exit_.address), (["Alpha", "Beta"], b"bob@example.org"))
        status, out, _ = await env.run("flush")
        self.assertEqual((status, out), (0, b"No packets to flush.\n"))

    @inline
    async def test_no_queue_loses_and_fails(self) -> None:
        env = Env(self)
        status, _, err = await env.run("send", "--no-queue", "-t", "bob@example.org", "-i",
                                       env.write("m", b"x"), "-P", "Beta,Alpha", "-D", "no")
        self.assertEqual(status, 1)
        self.assertIn("lost", err)
        self.assertEqual(env.queued(), [])

    @inline
    async def test_list_and_import_servers(self) -> None:
        env = Env(self, [descriptor("Alpha"), descriptor("Beta")])
        status, out, err = await env.run("list-servers", "-D", "no")
        self.assertEqual(status, 0, err)
        self.assertEqual(out.decode().splitlines(),
                         ["Alpha:smtp relay frag\t(ok)", "Beta:smtp relay frag\t(ok)"])
        status, out, err = await env.run("import-server", env.write("g", server("Gamma").text.encode()))
        self.assertEqual(status, 0, err)
        status, out, _ = await env.run("list-servers", "-D", "no", "Gamma")
        self.assertEqual(out, b"Gamma:relay frag\t(not recommended)\n")
        status, _, err = await env.run("import-server", env.write("bad", b"[Server]\nNope\n"))
        self.assertEqual(status, 1)
        status, _, err = await env.run("list-servers", "-D", "no", "Nobody")
        self.assertEqual(status, 1)


class ManPageTests(unittest.TestCase):

    def test_server_man_page_lists_every_schema_option(self) -> None:
        from mixminion.server.config import SCHEMA_SECTIONS
        with open(os.path.join(DOC, "mixminiond.conf.5")) as f:
            man = f.read().replace("\\-", "-")
        for section in SCHEMA_SECTIONS:
            self.assertIn(f"[{section.name}]", man)
            for option in section.options:
                self.assertTrue(re.search(rf"\b{re.escape(option.key)}\b", man),
                                f"{section.name} {option.key}")

    def test_generated_tables_are_current(self) -> None:
        import subprocess
        import sys
        script = os.path.join(DOC, "gen_conf_man.py")
        result = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
