"""``mixminion-client decode``: what it writes for each kind of received
message, the separator between several messages, ``--separate`` and its
argument errors (issue 15, point 4).

The expected bytes follow the original client (ClientMain.decodeMessage
and clientDecode): delivered plaintext/binary blocks as delivered, and
anything decompressed here with its exit header block; the separator and
``--separate`` are ours (doc/mixminion-client.1, decode).
"""

from __future__ import annotations

import io
import os
import random
import stat
import zlib
from typing import Any

from twisted.trial import unittest

from mixminion.client import cli
from mixminion.client.commands import decode as decode_cmd
from mixminion.codec.build import encode_message_payloads
from mixminion.codec.compression import compress
from mixminion.codec.exit import (
    BINARY,
    OVERCOMPRESSED,
    PLAINTEXT,
    classify_payload,
    encode_text_message,
    text_for_delivery,
)
from mixminion.test import test_client_cli as cli_tests
from mixminion.test.test_client_cli import Env, inline, reactor

HEADER_BLOCK = b"SUBJECT:Re: hello\n\n"


def mbox(*texts: bytes) -> bytes:
    """Messages as a mailbox: each an e-mail around its armored block."""
    return b"".join(b"From anon@example.org Mon Jan  1 00:00:00 2024\nSubject: Type III\n\n"
                    + t + b"\n" for t in texts)


def fragment_texts(body: bytes, seed: int, headers: dict[str, str]) -> list[bytes]:
    """A message too big for one packet, as the exit delivers its fragments
    (``Message-type: fragment``) to a recipient who reassembles."""
    rng = random.Random(seed)
    payloads = encode_message_payloads(body, rng.randbytes, headers=headers)
    assert len(payloads) > 1
    return [text_for_delivery(classify_payload(p)) for p in payloads]


class TTY(io.BytesIO):
    def isatty(self) -> bool:
        return True


async def run_on_tty(env: Env, *argv: str) -> tuple[int, bytes, str]:
    out, err = TTY(), io.StringIO()
    status = await cli.run(list(argv), stdin=io.BytesIO(), stdout=out, stderr=err,
                           environ=env.environ, reactor=reactor)
    return status, out.getvalue(), err.getvalue()


class ReplyHelpers(unittest.TestCase):
    """Replies through reply blocks, routed hop by hop as in test_client_cli."""

    timeout = 120

    async def replies(self, env: Env, messages: list[tuple[bytes, list[str]]],
                      identity: str = "") -> list[bytes]:
        """Generate one reply block per message, reply with each (extra
        ``queue`` arguments alongside), and return the delivered texts."""
        argv = ["generate-surb", "-t", "me@example.org", "-n", str(len(messages)),
                "-P", "Alpha,Beta", "-D", "no"]
        if identity:
            argv.append(f"--identity={identity}")
        status, surbs, err = await env.run(*argv)
        self.assertEqual(status, 0, err)
        surb_file = env.write(f"surbs-{identity}", surbs)
        texts = []
        for i, (message, extra) in enumerate(messages):
            status, _, err = await env.run("queue", "-R", surb_file, "-i",
                                           env.write(f"m{i}", message), "-P", "Delta",
                                           "-D", "no", *extra)
            self.assertEqual(status, 0, err)
            texts += await cli_tests.ReplyTests.deliveries(self, env, 1)  # type: ignore[arg-type]
        return texts


class OutputFormTests(ReplyHelpers):

    @inline
    async def test_plaintext_is_written_as_delivered(self) -> None:
        contents = b"Hello.\n-- \nA dash line, escaped in the block.\n\xe9t\xe9\n"
        text = encode_text_message(contents, PLAINTEXT)
        self.assertIn(b"- -- \n", text)
        status, out, err = await Env(self).run("decode", stdin=text)
        self.assertEqual((status, out), (0, contents), err)

    @inline
    async def test_plaintext_without_a_message_type(self) -> None:
        text = (b"-----BEGIN TYPE III ANONYMOUS MESSAGE-----\n\nNo type line.\n"
                b"-----END TYPE III ANONYMOUS MESSAGE-----\n")
        status, out, err = await Env(self).run("decode", stdin=text)
        self.assertEqual((status, out), (0, b"No type line.\n"), err)

    @inline
    async def test_binary_is_written_exactly_but_not_to_a_terminal(self) -> None:
        env = Env(self)
        contents = bytes(range(256)) * 3 + b"\xff no newline"
        text = encode_text_message(contents, BINARY)
        status, out, err = await env.run("decode", "-i", env.write("b", text))
        self.assertEqual((status, out), (0, contents), err)
        status, out, err = await run_on_tty(env, "decode", "-i", env.path("b"))
        self.assertEqual((status, out), (1, b""))
        self.assertIn("binary", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        status, out, err = await run_on_tty(env, "decode", "-F", "-i", env.path("b"))
        self.assertEqual((status, out), (0, contents), err)

    @inline
    async def test_overcompressed_compressed_unless_forced(self) -> None:
        env = Env(self)
        message = b"SUBJECT:zeros\n\n" + b"0" * 300000
        compressed = compress(message)
        path = env.write("o", encode_text_message(compressed, OVERCOMPRESSED))
        status, out, err = await env.run("decode", "-i", path)
        self.assertEqual((status, out), (0, compressed), err)
        self.assertIn("zlib bomb", err)
        status, out, err = await env.run("decode", "-F", "-i", path)
        self.assertEqual((status, out), (0, message), err)
        self.assertEqual(zlib.decompress(compressed), out)

    @inline
    async def test_replies_keep_their_header_block(self) -> None:
        """A reply with headers starts with them (NAME:VALUE, no space),
        one without with the empty line ending the empty header block."""
        env = Env(self)
        first = b"Thank you.\n"
        second = b"No subject here\nand no final newline"
        texts = await self.replies(env, [(first, ["--subject", "Re: hello"]), (second, [])])
        status, out, err = await env.run("decode", "-i", env.write("r1", mbox(texts[0])))
        self.assertEqual((status, out), (0, HEADER_BLOCK + first), err)
        self.assertNotIn("identity", err)
        status, out, err = await env.run("decode", "-i", env.write("r2", mbox(texts[1])))
        self.assertEqual((status, out), (0, b"\n" + second), err)

    @inline
    async def test_a_block_that_cannot_be_decoded_does_not_stop_the_others(self) -> None:
        """The man page: nothing is written for it, the others are, exit 1."""
        env = Env(self)
        (reply,) = await self.replies(env, [(b"Reply.\n", [])])
        os.unlink(os.path.join(env.user_dir, "keys", "keyring.txt"))
        plain = encode_text_message(b"Plain.\n", PLAINTEXT)
        broken = encode_text_message(b"not zlib at all", OVERCOMPRESSED)
        status, out, err = await env.run("decode", "-F", "-i",
                                         env.write("mixed", mbox(plain, reply, broken, plain)))
        self.assertEqual(status, 1, err)
        self.assertEqual(out, decode_cmd.join_messages([b"Plain.\n", b"Plain.\n"]))
        self.assertEqual(err.count("no keyring"), 1, err)
        self.assertIn("does not decompress", err)

    @inline
    async def test_reply_to_a_named_identity_is_logged(self) -> None:
        env = Env(self)
        (text,) = await self.replies(env, [(b"For Ludwig.\n", [])], identity="Ludwig")
        status, out, err = await env.run("decode", stdin=text)
        self.assertEqual((status, out), (0, b"\nFor Ludwig.\n"), err)
        # identities are kept in lower case (the reference's tutorial shows the same)
        self.assertIn("Decoded reply message to identity 'ludwig'", err)

    @inline
    async def test_fragments_reassembled_with_their_header_block(self) -> None:
        env = Env(self)
        body = random.Random(7).randbytes(45000)
        texts = fragment_texts(body, 1, {"SUBJECT": "parts"})
        self.assertIn(b"Message-type: fragment", texts[0])
        status, out, err = await env.run("decode", "-i", env.write("f0", mbox(texts[0])))
        self.assertEqual((status, out), (0, b""), err)
        self.assertIn("Stored 1 fragment", err)
        status, out, err = await env.run("decode", "-i", env.write("f", mbox(*texts[1:])))
        self.assertEqual((status, out), (0, b"SUBJECT:parts\n\n" + body), err)
        # the message is done: the same fragments again write nothing
        status, out, err = await env.run("decode", "-i", env.path("f"))
        self.assertEqual((status, out), (0, b""), err)


class SeparatorTests(ReplyHelpers):

    @inline
    async def test_two_replies_in_one_mailbox(self) -> None:
        env = Env(self)
        first, second = b"First answer.\n", b"Second answer.\n"
        texts = await self.replies(env, [(first, ["--subject", "Re: hello"]), (second, [])])
        status, out, err = await env.run("decode", "-i", env.write("box", mbox(*texts)))
        self.assertEqual(status, 0, err)
        self.assertEqual(out, HEADER_BLOCK + first + b"==== message 2 of 2\n" + b"\n" + second)
        # the same to a file
        status, _, err = await env.run("decode", "-i", env.path("box"), "-o", env.path("out"))
        self.assertEqual(status, 0, err)
        with open(env.path("out"), "rb") as f:
            self.assertEqual(f.read(), out)

    @inline
    async def test_separator_on_its_own_line_and_counts_messages_written(self) -> None:
        env = Env(self)
        body = random.Random(8).randbytes(40000)
        frags = fragment_texts(body, 2, {})
        binary = b"\x00\x01 ends without a newline"
        # the first fragment alone is stored; the second completes the message
        box = mbox(encode_text_message(b"one\n", PLAINTEXT), frags[0],
                   encode_text_message(binary, BINARY), *frags[1:],
                   encode_text_message(b"last\n", PLAINTEXT))
        status, out, err = await env.run("decode", stdin=box)
        self.assertEqual(status, 0, err)
        self.assertEqual(out, b"one\n" + b"==== message 2 of 4\n" + binary + b"\n"
                         + b"==== message 3 of 4\n" + b"\n" + body
                         + (b"" if body.endswith(b"\n") else b"\n")
                         + b"==== message 4 of 4\n" + b"last\n")

    @inline
    async def test_one_message_has_no_separator(self) -> None:
        status, out, err = await Env(self).run(
            "decode", stdin=mbox(encode_text_message(b"==== message 1 of 1\n", PLAINTEXT)))
        self.assertEqual((status, out), (0, b"==== message 1 of 1\n"), err)

    def test_join_messages(self) -> None:
        join = decode_cmd.join_messages
        self.assertEqual(join([]), b"")
        self.assertEqual(join([b"a"]), b"a")
        self.assertEqual(join([b"a", b"", b"c"]),
                         b"a\n==== message 2 of 3\n==== message 3 of 3\nc")


class SeparateTests(ReplyHelpers):

    def mode(self, path: str) -> int:
        return stat.S_IMODE(os.stat(path).st_mode)

    def read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    @inline
    async def test_each_message_in_its_own_file(self) -> None:
        env = Env(self)
        first, second = b"First answer.\n", b"Second answer, binary \xff"
        texts = await self.replies(env, [(first, ["--subject", "Re: hello"]), (second, [])])
        box = env.write("box", mbox(*texts, encode_text_message(b"plain\n", PLAINTEXT)))
        target = env.path("decoded")
        status, out, err = await env.run("decode", "-i", box, "--separate", target)
        self.assertEqual((status, out), (0, b""), err)
        self.assertEqual(self.mode(target), 0o700)
        self.assertEqual(sorted(os.listdir(target)), ["msg-0001", "msg-0002", "msg-0003"])
        self.assertEqual(self.read(os.path.join(target, "msg-0001")), HEADER_BLOCK + first)
        self.assertEqual(self.read(os.path.join(target, "msg-0002")), b"\n" + second)
        self.assertEqual(self.read(os.path.join(target, "msg-0003")), b"plain\n")
        for name in os.listdir(target):
            self.assertEqual(self.mode(os.path.join(target, name)), 0o600, name)
        self.assertIn("Wrote 3 decoded message(s)", err)
        self.assertIn("msg-0001, msg-0002, msg-0003", err)

    @inline
    async def test_existing_files_are_never_overwritten(self) -> None:
        env = Env(self)
        target = env.path("decoded")
        os.mkdir(target, 0o755)
        for name in ("msg-0001", "msg-0007", "notes"):
            with open(os.path.join(target, name), "wb") as f:
                f.write(b"mine " + name.encode())
        box = env.write("box", mbox(encode_text_message(b"a\n", PLAINTEXT),
                                    encode_text_message(b"b\n", PLAINTEXT)))
        status, _, err = await env.run("decode", "-i", box, "--separate", target)
        self.assertEqual(status, 0, err)
        self.assertIn("Wrote 2 decoded message(s)", err)
        self.assertEqual(self.mode(target), 0o755)  # an existing directory is left as it is
        self.assertEqual(self.read(os.path.join(target, "msg-0008")), b"a\n")
        self.assertEqual(self.read(os.path.join(target, "msg-0009")), b"b\n")
        for name in ("msg-0001", "msg-0007", "notes"):
            self.assertEqual(self.read(os.path.join(target, name)), b"mine " + name.encode())
        # a second run goes on numbering
        status, _, err = await env.run("decode", "-i", box, "--separate", target)
        self.assertEqual(status, 0, err)
        self.assertEqual(self.read(os.path.join(target, "msg-0011")), b"b\n")

    def test_a_name_taken_meanwhile_is_skipped(self) -> None:
        """A file that appears after the directory was listed (another
        process) is skipped, not overwritten."""
        target = self.mktemp()
        os.mkdir(target)
        with open(os.path.join(target, "msg-0002"), "wb") as f:
            f.write(b"theirs")
        real = os.listdir

        def listing(path: Any) -> list[str]:
            return [n for n in real(path) if n != "msg-0002"]

        self.patch(os, "listdir", listing)
        names = decode_cmd.write_separate(target, [b"1", b"2", b"3"])
        self.assertEqual(names, ["msg-0001", "msg-0003", "msg-0004"])
        self.assertEqual(self.read(os.path.join(target, "msg-0002")), b"theirs")
        self.assertEqual(self.read(os.path.join(target, "msg-0003")), b"2")

    @inline
    async def test_no_messages_written_still_reported(self) -> None:
        env = Env(self)
        frags = fragment_texts(random.Random(9).randbytes(40000), 3, {})
        target = env.path("decoded")
        status, _, err = await env.run("decode", "--separate", target, stdin=mbox(frags[0]))
        self.assertEqual(status, 0, err)
        self.assertEqual(os.listdir(target), [])
        self.assertIn("Wrote 0 decoded message(s)", err)

    @inline
    async def test_refused_when_not_a_directory(self) -> None:
        env = Env(self)
        frags = fragment_texts(random.Random(10).randbytes(40000), 4, {})
        target = env.write("afile", b"not a directory")
        status, out, err = await env.run("decode", "--separate", target, stdin=mbox(frags[0]))
        self.assertEqual((status, out), (1, b""))
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("not a directory", err)
        self.assertEqual(self.read(target), b"not a directory")
        # nothing was decoded: the fragment did not go into the pool
        self.assertFalse(os.path.exists(os.path.join(env.user_dir, "fragments", "pool")))


class ArgumentTests(unittest.TestCase):

    @inline
    async def test_wrong_arguments_exit_2_with_one_line(self) -> None:
        env = Env(self)
        plain = encode_text_message(b"x\n", PLAINTEXT)
        for argv in (["decode", "--separate", env.path("d"), "-o", env.path("o")],
                     ["decode", "-o", "-", "--separate", env.path("d")],
                     ["decode", "--separate"],
                     ["decode", env.path("message")]):
            status, out, err = await env.run(*argv, stdin=plain)
            self.assertEqual((status, out), (2, b""), argv)
            self.assertEqual(len(err.strip().splitlines()), 1, (argv, err))
            self.assertIn("mixminion-client", err)
            self.assertFalse(os.path.exists(env.path("d")), argv)
            self.assertFalse(os.path.exists(env.path("o")), argv)
