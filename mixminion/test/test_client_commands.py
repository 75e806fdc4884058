"""The reference client's commands and options this client lacked (issue
15, points 5 and 6): ``count-packets``, ``clean-queue``, the fragment
pool commands, the other command names, ``--status-fd``,
``--reply-block-fd``, and the exit status of unknown options and of an
empty message.

Each command has a test showing its effect and one for wrong arguments
(status 2, one line naming the command).  Commands run in-process through
``Env`` from test_client_cli, with its directory of four servers.
"""

from __future__ import annotations

import base64
import fcntl
import os
import random
import re
import time

from twisted.trial import unittest

from mixminion.client.store import ClientQueue, FragmentPool, message_id_text
from mixminion.codec.exit import parse_text_messages
from mixminion.codec.payload import parse_payload
from mixminion.codec.routing import NextHop
from mixminion.codec.surb import parse_reply_blocks
from mixminion.test import test_client_cli as cli_tests
from mixminion.test.test_client_cli import DAY, Env, inline
from mixminion.test.test_client_decode import fragment_texts, mbox

STATUS_LINE = re.compile(r"\[MIXMINION:\] [A-Z_]+( \S+)*\n")


class StatusPipe:
    """A pipe whose write end a command gets as ``--status-fd``."""

    def __init__(self, test: unittest.TestCase) -> None:
        self.r, self.w = os.pipe()
        self.test = test
        test.addCleanup(self._close)

    def _close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass

    def lines(self) -> list[str]:
        """Everything written, once the command is done; each line checked."""
        os.close(self.w)
        chunks = []
        while chunk := os.read(self.r, 65536):
            chunks.append(chunk)
        text = b"".join(chunks).decode("ascii")
        lines = text.splitlines(keepends=True)
        for line in lines:
            self.test.assertRegex(line, STATUS_LINE)
        return [line[:-1] for line in lines]


def fd_with(data: bytes, test: unittest.TestCase) -> int:
    """A descriptor to read ``data`` from (then end of file)."""
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    test.addCleanup(lambda: _close_quietly(r))
    return r


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def closed_fd() -> int:
    """A descriptor number nothing has open."""
    fd = 1000
    while True:
        try:
            fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError:
            return fd
        fd += 1


class UsageCase(unittest.TestCase):

    async def assert_usage_error(self, env: Env, argv: list[str], blamed: str,
                                 stdin: bytes = b"") -> str:
        status, out, err = await env.run(*argv, stdin=stdin)
        self.assertEqual((status, out), (2, b""), (argv, err))
        self.assertEqual(len(err.strip().splitlines()), 1, (argv, err))
        self.assertTrue(err.startswith(f"mixminion-client {blamed}:"), (argv, err))
        return err


# --- count-packets -------------------------------------------------------------------------


class CountPacketsTests(UsageCase):
    timeout = 120

    @inline
    async def test_counts_what_queue_builds(self) -> None:
        env = Env(self)
        big = env.write("big", random.Random(1).randbytes(70000))
        pipe = StatusPipe(self)
        status, out, err = await env.run("count-packets", "-t", "bob@example.org", "-i", big,
                                         "-P", "*3", "-D", "no", "--status-fd", str(pipe.w))
        self.assertEqual((status, out), (0, b"6 packets needed\n"), err)
        self.assertEqual(pipe.lines(), ["[MIXMINION:] COUNT_PACKETS 6"])
        self.assertEqual(env.queued(), [])  # nothing built, nothing queued
        status, _, err = await env.run("queue", "-t", "bob@example.org", "-i", big, "-P", "*3",
                                       "-D", "no")
        self.assertEqual(status, 0, err)
        self.assertEqual(len(env.queued()), 6)

    @inline
    async def test_drop_replies_and_deliver_fragments(self) -> None:
        env = Env(self)
        status, out, err = await env.run("count-packets", "-t", "drop", "-D", "no")
        self.assertEqual((status, out), (0, b"1 packets needed\n"), err)
        # 40000 incompressible bytes: 2 fragments' worth, sent as 3 (k=2, n=3);
        # a reply and --deliver-fragments carry no server-side prefix
        medium = env.write("m", random.Random(2).randbytes(40000))
        for extra in (["-R"], ["-t", "bob@example.org", "--deliver-fragments"]):
            status, out, err = await env.run("count-packets", *extra, "-i", medium, "-D", "no")
            self.assertEqual((status, out), (0, b"3 packets needed\n"), (extra, err))
        status, out, err = await env.run("count-packets", "-t", "bob@example.org",
                                         "--subject", "Hi", "-D", "no", stdin=b"short\n")
        self.assertEqual((status, out), (0, b"1 packets needed\n"), err)

    @inline
    async def test_the_path_is_checked_as_send_checks_it(self) -> None:
        """Gamma delivers no SMTP: send would refuse it as the exit, so
        count-packets does too."""
        env = Env(self)
        status, out, err = await env.run("count-packets", "-t", "bob@example.org",
                                         "-P", "Alpha,Gamma", "-D", "no", stdin=b"x\n")
        self.assertEqual((status, out), (1, b""), err)
        self.assertIn("Gamma", err)

    @inline
    async def test_wrong_arguments(self) -> None:
        env = Env(self)
        for argv in (["count-packets", "-D", "no"],
                     ["count-packets", "-t", "bob@example.org", "-R", "-D", "no"],
                     ["count-packets", "-R", "blocks.txt", "-D", "no"],
                     ["count-packets", "-t", "bob@example.org", "--swap-at", "1"],
                     ["count-packets", "-t", "bob@example.org", "--deliver-fragments",
                      "--subject", "x", "-D", "no"]):
            await self.assert_usage_error(env, argv, "count-packets")


# --- clean-queue ------------------------------------------------------------------------


class CleanQueueTests(UsageCase):

    def fill(self, env: Env, ages: dict[str, list[float]]) -> None:
        """Queue a packet for each age (in days) for each first hop."""
        queue = ClientQueue(env.user_dir)
        now = time.time()
        for nickname, days in ages.items():
            d = cli_tests.server(nickname)
            hop = NextHop("127.0.0.1", d.port, d.identity_digest)
            for age in days:
                queue.add(hop, nickname, os.urandom(32768), now - age * DAY)

    def left(self, env: Env) -> dict[str, list[int]]:
        now = time.time()
        out: dict[str, list[int]] = {}
        for q in env.queued():
            out.setdefault(q.nickname, []).append(round((now - q.inserted) / DAY))
        return {k: sorted(v) for k, v in out.items()}

    @inline
    async def test_removes_old_packets_per_server(self) -> None:
        env = Env(self)
        self.fill(env, {"Alpha": [1, 10, 70], "Beta": [2, 61, 65], "Gamma": [5]})
        status, out, err = await env.run("clean-queue")  # 60 days
        self.assertEqual(status, 0, err)
        self.assertEqual(out.decode().splitlines(),
                         ["Removed 1 packets for Alpha", "Removed 2 packets for Beta"])
        self.assertEqual(self.left(env), {"Alpha": [1, 10], "Beta": [2], "Gamma": [5]})
        status, out, err = await env.run("clean-queue", "--days=3", "Alpha", "Gamma")
        self.assertEqual((status, out), (0, b"Removed 1 packets for Alpha\n"
                                            b"Removed 1 packets for Gamma\n"), err)
        self.assertEqual(self.left(env), {"Alpha": [1], "Beta": [2]})
        status, out, err = await env.run("clean-queue", "-d", "30")
        self.assertEqual((status, out), (0, b"No packets removed.\n"), err)
        # a first hop named by its KeyID; -d 0 removes all of its packets
        keyid = cli_tests.server("Beta").identity_digest.hex()
        status, out, err = await env.run("clean-queue", "-d", "0", keyid)
        self.assertEqual((status, out), (0, b"Removed 1 packets for Beta\n"), err)
        self.assertEqual(self.left(env), {"Alpha": [1]})
        status, out, err = await env.run("clean-queue", "-d", "0", "Nobody")
        self.assertEqual((status, out), (0, b"No packets removed.\n"), err)
        self.assertIn("No queued packets for Nobody", err)

    @inline
    async def test_wrong_arguments(self) -> None:
        env = Env(self)
        for argv in (["clean-queue", "-d", "-1"], ["clean-queue", "--days"],
                     ["clean-queue", "-d", "week"], ["clean-queue", "--bogus"]):
            await self.assert_usage_error(env, argv, "clean-queue")


# --- the fragment pool ----------------------------------------------------------------------


def pool_ids(env: Env) -> list[str]:
    return [message_id_text(e.message_id)
            for e in FragmentPool(env.user_dir).reassembler.entries()]


class FragmentPoolTests(UsageCase):
    timeout = 120

    @inline
    async def test_list_reassemble_and_purge_with_p(self) -> None:
        env = Env(self)
        status, out, err = await env.run("list-fragments")
        self.assertEqual((status, out), (0, b"(No fragments being reassembled)\n"), err)
        body = random.Random(7).randbytes(45000)
        texts = fragment_texts(body, 1, {"SUBJECT": "parts"})
        first = parse_payload(payload_of(texts[0]))
        mid = message_id_text(first.message_id)
        status, _, err = await env.run("decode", "-i", env.write("f0", mbox(texts[0])))
        self.assertEqual(status, 0, err)
        status, out, err = await env.run("list-fragments")
        self.assertEqual((status, out.decode()),
                         (0, f"{mid}: to ---. {first.message_length} bytes "
                             "(1/2 packets received)\n"), err)
        status, out, err = await env.run("reassemble", mid)
        self.assertEqual((status, out), (1, b""), err)
        self.assertIn("still missing fragments (1/2 packets received)", err)
        # decode writes the message the moment it is complete ...
        status, out, err = await env.run("decode", "-i", env.write("f1", mbox(texts[1])))
        self.assertEqual((status, out), (0, b"SUBJECT:parts\n\n" + body), err)
        # ... and the pool keeps it until it is purged
        status, out, err = await env.run("list-fragments")
        self.assertEqual(out.decode(), f"{mid}: to ---. {first.message_length} bytes "
                                       "(2/2 packets received)\n")
        status, out, err = await env.run("reassemble", mid[:6], "-o", env.path("out"))
        self.assertEqual((status, out), (0, b""), err)
        with open(env.path("out"), "rb") as f:
            self.assertEqual(f.read(), b"SUBJECT:parts\n\n" + body)
        self.assertEqual(os.stat(env.path("out")).st_mode & 0o777, 0o600)
        status, out, err = await env.run("reassemble", "-P", mid.upper())
        self.assertEqual((status, out), (0, b"SUBJECT:parts\n\n" + body), err)
        self.assertEqual(pool_ids(env), [])
        status, out, err = await env.run("reassemble", mid)
        self.assertEqual((status, out), (1, b""), err)
        self.assertIn(f"No such message as '{mid}'", err)
        # the spare fragment arriving later starts nothing again
        status, out, err = await env.run("decode", "-i", env.write("f2", mbox(texts[2])))
        self.assertEqual((status, out), (0, b""), err)
        self.assertEqual(pool_ids(env), [])

    @inline
    async def test_several_messages_sorted_and_written_together(self) -> None:
        env = Env(self)
        bodies = [random.Random(10 + i).randbytes(40000) + b"." for i in range(2)]
        texts = [fragment_texts(b, 20 + i, {}) for i, b in enumerate(bodies)]
        status, _, err = await env.run("decode", "-i", env.write(
            "all", mbox(*texts[0][:2], *texts[1][:2])))
        self.assertEqual(status, 0, err)
        ids = pool_ids(env)
        self.assertEqual(len(ids), 2)
        status, out, _ = await env.run("list-fragments")
        self.assertEqual([line.split(":")[0] for line in out.decode().splitlines()],
                         sorted(ids))
        status, out, err = await env.run("reassemble", *ids)
        self.assertEqual(status, 0, err)
        by_id = {message_id_text(parse_payload(payload_of(t[0])).message_id): b
                 for t, b in zip(texts, bodies)}
        self.assertEqual(out, b"\n" + by_id[ids[0]] + b"\n==== message 2 of 2\n\n"
                         + by_id[ids[1]])

    @inline
    async def test_zlib_bomb_needs_force(self) -> None:
        env = Env(self)
        body = random.Random(3).randbytes(30000) + bytes(2_000_000)
        texts = fragment_texts(body, 4, {})
        self.assertEqual(len(texts), 3)
        status, _, err = await env.run("decode", "-F", "-o", env.path("d"), "-i",
                                       env.write("f", mbox(*texts[:2])))
        self.assertEqual(status, 0, err)
        (mid,) = pool_ids(env)
        status, out, err = await env.run("reassemble", mid)
        self.assertEqual((status, out), (1, b""), err)
        self.assertIn("zlib bomb", err)
        status, out, err = await env.run("reassemble", "-F", mid)
        self.assertEqual((status, out), (0, b"\n" + body), err)

    @inline
    async def test_purge_fragments(self) -> None:
        env = Env(self)
        texts = fragment_texts(random.Random(8).randbytes(45000), 2, {})
        status, _, err = await env.run("decode", "-i", env.write("f0", mbox(texts[0])))
        self.assertEqual(status, 0, err)
        (mid,) = pool_ids(env)
        status, out, err = await env.run("purge-fragments", mid)
        self.assertEqual((status, out), (0, b""), err)
        self.assertIn(f"Removed 1 message(s) from the fragment pool: {mid}", err)
        status, out, _ = await env.run("list-fragments")
        self.assertEqual(out, b"(No fragments being reassembled)\n")
        # the rest of a purged message is dropped, not collected again
        status, out, err = await env.run("decode", "-i", env.write("f", mbox(*texts[1:])))
        self.assertEqual((status, out), (0, b""), err)
        self.assertEqual(pool_ids(env), [])
        status, _, err = await env.run("purge-fragments", "0123abcd")
        self.assertEqual(status, 1)
        self.assertIn("No such message", err)

    @inline
    async def test_wrong_arguments(self) -> None:
        env = Env(self)
        for argv, blamed in ((["list-fragments", "extra"], "list-fragments"),
                             (["reassemble"], "reassemble"),
                             (["reassemble", "-o"], "reassemble"),
                             (["reassemble", "abc", "--bogus"], "reassemble"),
                             (["purge-fragments"], "purge-fragments"),
                             (["purge-fragments", "abc", "-P"], "purge-fragments")):
            await self.assert_usage_error(env, argv, blamed)


def payload_of(text: bytes) -> bytes:
    """The raw payload inside a delivered ``Message-type: fragment`` block."""
    (message,) = parse_text_messages(text)
    return message.contents


# --- other names of commands -----------------------------------------------------------------


class AliasTests(UsageCase):
    timeout = 120

    @inline
    async def test_other_names_run_the_same_commands(self) -> None:
        env = Env(self)
        status, listed, err = await env.run("list-servers", "-D", "no")
        self.assertEqual(status, 0, err)
        self.assertIn(b"Alpha", listed)
        self.assertEqual((await env.run("list-server", "-D", "no"))[:2], (0, listed))
        status, surbs, err = await env.run("generate-surbs", "-t", "me@example.org", "-n", "2",
                                           "-P", "Alpha", "-D", "no")
        self.assertEqual(status, 0, err)
        self.assertEqual(len(parse_reply_blocks(surbs)), 2)
        status, out, err = await env.run("inspect-surb", env.write("s", surbs))
        self.assertEqual(status, 0, err)
        self.assertEqual(out.count(b"Used: no"), 2)
        for alias, name in (("list-server", "list-servers"), ("generate-surbs", "generate-surb"),
                            ("inspect-surb", "inspect-surbs")):
            status, out, _ = await env.run(alias, "--help")
            self.assertEqual(status, 0)
            self.assertIn(f"usage: mixminion-client {name}", out.decode())
        status, out, _ = await env.run("--help")
        self.assertIn("(also: list-server)", out.decode())

    @inline
    async def test_wrong_arguments(self) -> None:
        env = Env(self)
        await self.assert_usage_error(env, ["list-server", "--bogus"], "list-servers")
        await self.assert_usage_error(env, ["inspect-surb"], "inspect-surbs")
        await self.assert_usage_error(env, ["generate-surbs", "-n", "0"], "generate-surb")


# --- --status-fd ------------------------------------------------------------------------------


class StatusFdTests(UsageCase):
    timeout = 120

    @inline
    async def test_generated_surb_is_the_replys_decoding_handle(self) -> None:
        env = Env(self)
        pipe = StatusPipe(self)
        status, surbs, err = await env.run("generate-surb", "-t", "me@example.org", "-n", "2",
                                           "-P", "Alpha", "-D", "no", "--status-fd", str(pipe.w))
        self.assertEqual(status, 0, err)
        lines = pipe.lines()
        self.assertEqual(len(lines), 2)
        tags = [line.split(" ")[2] for line in lines]
        self.assertTrue(all(line.startswith("[MIXMINION:] GENERATED_SURB ") for line in lines))
        self.assertTrue(all(len(base64.b64decode(t, validate=True)) == 20 for t in tags))
        status, _, err = await env.run("queue", "-R", env.write("s", surbs), "-i",
                                       env.write("m", b"thanks\n"), "-P", "Delta", "-D", "no")
        self.assertEqual(status, 0, err)
        (text,) = await cli_tests.ReplyTests.deliveries(self, env, 1)  # type: ignore[arg-type]
        self.assertIn(f"Decoding-handle: {tags[0]}".encode(), text)

    @inline
    async def test_inspect_surb_lines(self) -> None:
        env = Env(self)
        status, surbs, err = await env.run("generate-surb", "-t", "me@example.org", "-n", "2",
                                           "-P", "Alpha", "-D", "no")
        self.assertEqual(status, 0, err)
        surb_file = env.write("s", surbs)
        blocks = parse_reply_blocks(surbs)
        status, _, err = await env.run("queue", "-R", surb_file, "-i", env.write("m", b"hi\n"),
                                       "-P", "Delta", "-D", "no")
        self.assertEqual(status, 0, err)
        pipe = StatusPipe(self)
        status, out, err = await env.run("inspect-surbs", surb_file, "--status-fd", str(pipe.w))
        self.assertEqual(status, 0, err)
        self.assertEqual(pipe.lines(), [
            f"[MIXMINION:] INSPECT_SURB {blocks[0].digest.hex()} {blocks[0].timestamp} 1",
            f"[MIXMINION:] INSPECT_SURB {blocks[1].digest.hex()} {blocks[1].timestamp} 0"])
        self.assertIn(blocks[0].digest.hex().upper().encode(), out)

    @inline
    async def test_nothing_written_by_commands_without_status(self) -> None:
        env = Env(self)
        pipe = StatusPipe(self)
        status, _, err = await env.run("inspect-queue", "--status-fd", str(pipe.w))
        self.assertEqual(status, 0, err)
        self.assertEqual(pipe.lines(), [])

    @inline
    async def test_descriptor_not_open_for_writing(self) -> None:
        env = Env(self)
        bad = closed_fd()
        err = await self.assert_usage_error(env, ["count-packets", "-t", "drop", "-D", "no",
                                                  f"--status-fd={bad}"], "count-packets")
        self.assertIn(f"file descriptor {bad} is not open", err)
        readable = fd_with(b"", self)
        err = await self.assert_usage_error(env, ["inspect-queue", "--status-fd", str(readable)],
                                            "inspect-queue")
        self.assertIn("open for reading only", err)
        await self.assert_usage_error(env, ["inspect-queue", "--status-fd", "-3"],
                                      "inspect-queue")


# --- --reply-block-fd --------------------------------------------------------------------------


class ReplyBlockFdTests(UsageCase):
    timeout = 120

    @inline
    async def test_reply_blocks_from_descriptors(self) -> None:
        env = Env(self)
        status, surbs, err = await env.run("generate-surb", "-t", "me@example.org", "-n", "3",
                                           "-P", "Alpha", "-D", "no")
        self.assertEqual(status, 0, err)
        # one block on one descriptor, two binary ones on another
        blocks = parse_reply_blocks(surbs)
        first = fd_with(blocks[0].to_text().encode(), self)
        rest = fd_with(blocks[1].pack() + blocks[2].pack(), self)
        message = random.Random(4).randbytes(40000)  # 3 packets
        status, out, err = await env.run("queue", "--reply-block-fd", str(first),
                                         "--reply-block-fd", str(rest), "-P", "Delta", "-D", "no",
                                         "-i", env.write("m", message))
        self.assertEqual(status, 0, err)
        self.assertIn(b"Queued 3 packet", out)
        texts = await cli_tests.ReplyTests.deliveries(self, env, 3)  # type: ignore[arg-type]
        status, out, err = await env.run("decode", "-i", env.write("d", mbox(*texts)))
        self.assertEqual((status, out), (0, b"\n" + message), err)
        # count-packets takes them too: the message is then a reply
        again = fd_with(surbs, self)
        status, out, err = await env.run("count-packets", "--reply-block-fd", str(again),
                                         "-D", "no", "-i", env.path("m"))
        self.assertEqual((status, out), (0, b"3 packets needed\n"), err)

    @inline
    async def test_unreadable_descriptor_or_blocks(self) -> None:
        env = Env(self)
        bad = closed_fd()
        status, _, err = await env.run("queue", "--reply-block-fd", str(bad), "-D", "no",
                                       "-i", env.write("m", b"x\n"))
        self.assertEqual(status, 1)
        self.assertIn(f"Cannot read reply blocks from file descriptor {bad}", err)
        junk = fd_with(b"not a reply block", self)
        status, _, err = await env.run("send", "--reply-block-fd", str(junk), "-D", "no",
                                       "-i", env.path("m"))
        self.assertEqual(status, 1)
        self.assertIn(f"file descriptor {junk}: no usable reply block", err)
        self.assertEqual(env.queued(), [])

    @inline
    async def test_wrong_arguments(self) -> None:
        env = Env(self)
        for argv in (["send", "--reply-block-fd", "x", "-D", "no"],
                     ["send", "--reply-block-fd", "0", "-D", "no"],  # message on stdin too
                     ["send", "--reply-block-fd", "5", "-t", "bob@example.org", "-D", "no"],
                     ["send", "--reply-block-fd", "5", "--swap-at", "1", "-D", "no"]):
            await self.assert_usage_error(env, argv, "send")


# --- exit status -------------------------------------------------------------------------------


class ExitStatusTests(UsageCase):

    @inline
    async def test_unknown_options_blame_the_command(self) -> None:
        env = Env(self)
        err = await self.assert_usage_error(env, ["send", "--bogus"], "send")
        self.assertIn("unrecognized arguments: --bogus", err)
        self.assertIn("see 'mixminion-client send --help'", err)
        await self.assert_usage_error(env, ["queue", "-t", "a@example.org", "stray"], "queue")
        status, _, err = await env.run("--bogus")
        self.assertEqual(status, 2)
        self.assertTrue(err.startswith("mixminion-client: "), err)

    @inline
    async def test_empty_standard_input_is_refused(self) -> None:
        env = Env(self)
        for command in ("send", "queue"):
            status, out, err = await env.run(command, "-t", "bob@example.org", "-P",
                                             "Alpha,Beta", "-D", "no", stdin=b"")
            self.assertEqual((status, out), (1, b""), (command, err))
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertIn("standard input is empty", err)
        self.assertEqual(env.queued(), [])
        # an empty file given on purpose is sent; drop never reads a message
        status, out, err = await env.run("queue", "-t", "bob@example.org", "-P", "Alpha,Beta",
                                         "-D", "no", "-i", env.write("empty", b""))
        self.assertEqual((status, out[:8]), (0, b"Queued 1"), err)
        status, out, err = await env.run("queue", "-t", "drop", "-P", "Alpha,Beta", "-D", "no")
        self.assertEqual((status, out[:8]), (0, b"Queued 1"), err)
        self.assertEqual(len(env.queued()), 2)
