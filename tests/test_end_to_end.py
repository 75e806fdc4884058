"""Issue 6: the whole system end to end, as a user runs it.

A testnet of 3 directory authorities and 5 mix nodes, started with
``mixminion-testnet up --nodes 5 --mta 127.0.0.1:PORT --blacklist FILE DIR``
against a real opensmtpd of the test's own (every recipient lands in one
maildir; see :mod:`mixminion.testing.mta` for how smtpd must be run), and
``mixminion-client`` run as a subprocess with the testnet's client
configuration:

(a) ``send -t alice@example.com`` with the default path reaches the MTA;
(b) a 200 KiB message of base64 text (random, so it compresses little)
    travels as fragments, is reassembled by the exit and arrives whole;
(c) ``generate-surb`` -> ``send -R`` -> the reply lands in the testnet's
    mbox and ``decode`` shows it;
(d) mail to a blacklisted address is refused at the exit (the exits'
    ``ExitBlacklisted`` and ``ExitFailed:SMTP`` counters) and never reaches
    the MTA;
(e) ``send -t drop`` packets vanish at their last hop (``DroppedDummy``)
    and nothing is delivered;

then with the first hop stopped ``send`` queues (exit 0), and after the
network is brought up again ``flush`` delivers.  A second test runs every
client command's ``--help`` and bad arguments.

Needs root and opensmtpd (one smtpd per machine: the test fails if one is
already running).  About 30 s here (at most about 4 min when everything times out).  Cleanup runs ``mixminion-testnet
down`` and SIGKILLs whatever of the network is still alive.
"""

from __future__ import annotations

#: about how many seconds it takes: scripts/test.sh starts the longest first
SLOW = 31

import base64
import io
import json
import os
import re
import signal
import sys
from typing import Any, Awaitable, Callable, Optional

from twisted.internet import defer, utils
from twisted.internet import reactor as _reactor
from twisted.trial import unittest

from mixminion.codec.exit import PLAINTEXT, parse_text_message
from mixminion.testing.mta import MTA, start_opensmtpd
from mixminion.testing.processes import pid_alive, sleep, wait_until

reactor: Any = _reactor

NODES = 5
PASSPHRASE = "testnet"  # mixminion.testnet.PASSPHRASE
BIG_SIZE = 200 * 1024
BLOCKED = "blocked@example.com"
DROPS = 3
COMMAND_TIMEOUT = 120
DELIVERY_TIMEOUT = 60
EVENT = 'mixminion_events_total{{event="{}"}}'


def big_text(size: int) -> bytes:
    """``size`` bytes of base64 text (76-column lines) of random bytes."""
    text = base64.encodebytes(os.urandom(size))
    return text[:size - 1] + b"\n"


async def run(argv: list[str], env: dict[str, str], cwd: str,
              timeout: float = COMMAND_TIMEOUT) -> tuple[int, str, str]:
    d = utils.getProcessOutputAndValue(argv[0], argv[1:], env=env, path=cwd, reactor=reactor)
    d.addTimeout(timeout, reactor)
    out, err, code = await d
    return code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


class EndToEndTests(unittest.TestCase):

    timeout = 240

    def setUp(self) -> None:
        self.top = os.path.abspath(self.mktemp())
        os.makedirs(self.top)
        self.dir = os.path.join(self.top, "net")
        self.pids: dict[str, int] = {}
        self.mta: Optional[MTA] = None
        self.addCleanup(self.bring_down)

    # -- the processes -------------------------------------------------------------

    async def run_testnet(self, *args: str) -> tuple[int, str]:
        code, out, err = await run([sys.executable, "-m", "mixminion.testnet", *args],
                                   dict(os.environ), self.top)
        return code, out + err

    async def client(self, *args: str) -> tuple[int, str, str]:
        env = dict(os.environ, MIXMINIONRC=os.path.join(self.dir, "client", "mixminionrc"),
                   MIXMINION_PASSPHRASE=PASSPHRASE)
        return await run([sys.executable, "-m", "mixminion.client.cli", *args], env, self.top)

    async def client_ok(self, *args: str) -> str:
        code, out, err = await self.client(*args)
        self.assertEqual(code, 0, f"mixminion-client {' '.join(args)}:\n{out}{err}")
        return out + err

    def state(self) -> dict[str, Any]:
        with open(os.path.join(self.dir, "testnet.json"), encoding="utf-8") as f:
            return json.load(f)

    def read_pids(self) -> dict[str, int]:
        pids = {}
        for proc in self.state()["procs"]:
            try:
                with open(os.path.join(proc["directory"], "twistd.pid"), encoding="ascii") as f:
                    pids[proc["name"]] = int(f.read())
            except (OSError, ValueError):
                pass
        return pids

    async def bring_down(self) -> None:
        if os.path.exists(os.path.join(self.dir, "testnet.json")):
            self.pids.update(self.read_pids())
            await self.run_testnet("down", self.dir)
        for pid in self.pids.values():
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)

    async def start_mta(self) -> MTA:
        return await start_opensmtpd(self, self.top)

    # -- what came out -------------------------------------------------------------

    def mails(self) -> list[Any]:
        assert self.mta is not None
        return self.mta.messages()

    def mails_with(self, token: bytes) -> list[Any]:
        return [m for m in self.mails() if token in m.as_bytes()]

    def mbox_text(self) -> bytes:
        try:
            with open(os.path.join(self.dir, "mbox"), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    async def metrics(self, node: dict[str, Any]) -> dict[str, float]:
        from mixminion.testnet import Proc, node_metrics

        values = await node_metrics(reactor, Proc(**node))
        self.assertIsNotNone(values, f"{node['name']}'s metrics page does not answer")
        return values or {}

    async def counters(self, *events: str) -> dict[str, int]:
        """Each event's total over every node."""
        total = dict.fromkeys(events, 0)
        for node in self.state()["procs"]:
            if node["kind"] == "node":
                m = await self.metrics(node)
                for e in events:
                    total[e] += int(m.get(EVENT.format(e), 0))
        return total

    def logs(self) -> str:
        from mixminion.testnet import Proc

        out = [Proc(**proc).daemon().report(15) for proc in self.state()["procs"]]
        if self.mta is not None:
            out.append(self.mta.process.report())
        return "\n".join(out)

    async def wait_until(self, what: str, check: Callable[[], Awaitable[Any]],
                         timeout: float = DELIVERY_TIMEOUT) -> Any:
        return await wait_until(reactor, what, check, timeout, 0.3,
                                report=lambda _: self.logs(), error=self.failureException)

    # -- the test --------------------------------------------------------------------

    def test_network(self) -> defer.Deferred:
        return defer.ensureDeferred(self.scenario())

    async def scenario(self) -> None:
        self.mta = await self.start_mta()
        blacklist = os.path.join(self.top, "blacklist.conf")
        with open(blacklist, "w", encoding="ascii") as f:
            f.write(f"# refused by the exits\ndeny address {BLOCKED}\n")
        up = ["up", "--nodes", str(NODES), "--mta", f"127.0.0.1:{self.mta.port}", self.dir]
        code, text = await self.run_testnet(*up[:-1], "--blacklist", blacklist, self.dir)
        self.assertEqual(code, 0, text)
        self.pids = self.read_pids()
        self.assertEqual(len(self.pids), 3 + NODES, text)  # no sink: the MTA is real
        for proc in self.state()["procs"]:
            if proc["exit"]:
                with open(proc["conf"], encoding="utf-8") as f:
                    self.assertIn(f"BlacklistFile: {blacklist}\n", f.read())

        run_id = os.urandom(4).hex().encode()
        files = os.path.join(self.top, "files")
        os.makedirs(files)

        def write(name: str, data: bytes) -> str:
            path = os.path.join(files, name)
            with open(path, "wb") as f:
                f.write(data)
            return path

        forward_token = b"forward-" + run_id
        reply_token = b"reply-" + run_id
        blocked_token = b"blocked-" + run_id
        big = big_text(BIG_SIZE)
        self.assertEqual(len(big), BIG_SIZE)
        forward = write("forward.txt", b"Hello through the default path (" + forward_token + b").\n")
        large = write("large.txt", big)
        reply = write("reply.txt", b"An answer through a reply block (" + reply_token + b").\n")
        blocked = write("blocked.txt", b"This must not be mailed (" + blocked_token + b").\n")
        surb = os.path.join(files, "reply.surb")
        events = ("DroppedDummy", "ExitBlacklisted", "ExitFailed:SMTP", "ExitDelivered:SMTP")
        before = await self.counters(*events)

        # (c) first, since it has two steps
        out = await self.client_ok("generate-surb", "-o", surb)
        self.assertTrue(os.path.getsize(surb) > 0, out)
        sends = [
            ("send", "-t", "alice@example.com", "-i", forward),                      # (a)
            ("send", "-t", "bob@example.com", "--subject", "large", "-i", large),  # (b)
            ("send", "-R", surb, "-i", reply),                                     # (c)
            ("send", "-t", BLOCKED, "-i", blocked),                                # (d)
        ] + [("send", "-t", "drop")] * DROPS                                      # (e)
        results = await defer.gatherResults(
            [defer.ensureDeferred(self.client(*args)) for args in sends], consumeErrors=True)
        for args, (code, out, err) in zip(sends, results):
            self.assertEqual(code, 0, f"mixminion-client {' '.join(args)}:\n{out}{err}")
            self.assertIn("Sent ", out + err, f"{args}: {out}{err}")
            self.assertNotIn("queued", out + err, f"{args}: {out}{err}")
        sent = re.search(r"Sent (\d+) packet", results[1][1] + results[1][2])
        self.assertTrue(sent and int(sent.group(1)) > 1, f"(b) went as one packet: {results[1]}")

        # (a)
        async def forward_arrived() -> list[Any]:
            return self.mails_with(forward_token)
        [mail] = await self.wait_until("the forward message in the maildir", forward_arrived)
        self.assertEqual(mail["To"], "alice@example.com")
        text = parse_text_message(mail.get_payload(decode=True))
        self.assertEqual(text.message_type, PLAINTEXT)
        self.assertIn(forward_token, text.contents)

        # (b)
        async def large_arrived() -> list[Any]:
            return [m for m in self.mails() if m["Subject"] == "large"]
        [mail] = await self.wait_until("the 200 KiB message in the maildir", large_arrived)
        self.assertEqual(mail["To"], "bob@example.com")
        text = parse_text_message(mail.get_payload(decode=True))
        self.assertEqual(text.contents, big, "the 200 KiB message did not arrive whole")

        # (c)
        async def reply_arrived() -> bool:
            return b"TYPE III ANONYMOUS MESSAGE" in self.mbox_text()
        await self.wait_until("the reply in the mbox", reply_arrived)
        received = write("received.mbox", self.mbox_text())
        code, out, err = await self.client("decode", "-i", received)
        self.assertEqual(code, 0, out + err)
        self.assertIn(reply_token.decode(), out)

        # (d) and (e)
        async def counted() -> Optional[dict[str, int]]:
            now = await self.counters(*events)
            if (now["ExitBlacklisted"] > before["ExitBlacklisted"]
                    and now["DroppedDummy"] >= before["DroppedDummy"] + DROPS):
                return now
            return None
        after = await self.wait_until("the exits to count the blacklisted message and the dummies",
                                      counted)
        self.assertEqual(after["ExitBlacklisted"] - before["ExitBlacklisted"], 1, after)
        self.assertEqual(after["ExitFailed:SMTP"] - before["ExitFailed:SMTP"], 1, after)
        self.assertEqual(after["DroppedDummy"] - before["DroppedDummy"], DROPS, after)
        self.assertEqual(after["ExitDelivered:SMTP"] - before["ExitDelivered:SMTP"], 2, after)
        await sleep(reactor, 2)  # anything late would show now
        self.assertEqual(self.mails_with(blocked_token), [])
        self.assertEqual(len(self.mails()), 2, [m["To"] for m in self.mails()])
        self.assertEqual(self.mbox_text().count(b"\nFrom ") + self.mbox_text().startswith(b"From "), 1)

        # the queue: first hop down, send queues; up again, flush delivers
        state = {p["name"]: p for p in self.state()["procs"]}
        first = "node1"
        pid = self.pids[first]
        os.kill(pid, signal.SIGTERM)

        async def stopped() -> bool:
            return not pid_alive(pid)
        await self.wait_until(f"{first} to stop", stopped, 15)
        queued_token = b"queued-" + run_id
        queued = write("queued.txt", b"Sent while the first hop was down (" + queued_token + b").\n")
        code, out, err = await self.client("send", "-t", "carol@example.com", "-P", f"{first},*3",
                                           "-i", queued)
        self.assertEqual(code, 0, out + err)
        self.assertIn("queued", out + err)
        self.assertIn("flush", out + err)
        out = await self.client_ok("inspect-queue")
        self.assertIn(first, out)
        code, text = await self.run_testnet(*up)
        self.assertEqual(code, 0, text)
        self.assertIn("Restarting 1 process", text)
        self.pids.update(self.read_pids())
        self.assertTrue(state[first]["port"])
        out = await self.client_ok("flush")
        self.assertNotIn("still queued", out)

        async def queued_arrived() -> list[Any]:
            return self.mails_with(queued_token)
        [mail] = await self.wait_until("the flushed message in the maildir", queued_arrived)
        self.assertEqual(mail["To"], "carol@example.com")
        code, out, err = await self.client("inspect-queue")
        self.assertNotIn(first, out)

        code, text = await self.run_testnet("down", self.dir)
        self.assertEqual(code, 0, text)
        left = [name for name, p in self.pids.items() if pid_alive(p)]
        self.assertEqual(left, [], f"still running after down: {left}")


class ClientCommandLineTests(unittest.TestCase):
    """Every command as a new user meets it: ``--help`` and mistakes."""

    timeout = 60

    def setUp(self) -> None:
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(self.home)

    async def client(self, *args: str) -> tuple[int, str, str]:
        env = dict(os.environ, HOME=self.home)
        env.pop("MIXMINIONRC", None)
        env.pop("MIXMINION_PASSPHRASE", None)
        return await run([sys.executable, "-m", "mixminion.client.cli", *args], env, self.home)

    def test_help_and_usage_errors(self) -> defer.Deferred:
        return defer.ensureDeferred(self.check())

    async def check(self) -> None:
        from mixminion.client.cli import COMMANDS, build_parser

        _, parsers = build_parser(io.StringIO())
        # The first command a new user runs writes ~/.mixminionrc and says so
        # on stderr; the mistakes below are made after that.
        code, out, err = await self.client("inspect-queue")
        self.assertEqual(code, 0, out + err)
        self.assertIn(".mixminionrc", err)
        self.assertEqual(sorted(parsers), sorted(COMMANDS))
        calls: list[tuple[str, ...]] = [("--help",)]
        calls += [(name, "--help") for name in parsers]
        bad: list[tuple[str, ...]] = [
            ("no-such-command",),
            ("send", "-t", "alice@example.com", "-R", "x.surb"),
            ("send", "-H", "0", "-t", "alice@example.com"),
            ("send", "--queue", "--no-queue", "-t", "alice@example.com"),
            ("queue",),
            ("flush", "-n", "many"),
            ("generate-surb", "-n", "0"),
            ("list-servers", "-D", "maybe"),
            ("import-server",),
            ("inspect-surbs",),
            ("decode", "--passphrase-fd", "-1"),
        ] + [(name, "--no-such-option") for name in parsers]
        results = await defer.gatherResults(
            [defer.ensureDeferred(self.client(*args)) for args in calls + bad], consumeErrors=True)
        for args, (code, out, err) in zip(calls, results):
            self.assertEqual(code, 0, f"{args}: {out}{err}")
            if len(args) == 2:
                for action in parsers[args[0]]._actions:
                    for option in action.option_strings:
                        self.assertIn(option, out, f"'{args[0]} --help' does not mention {option}")
            else:
                for name in COMMANDS:
                    self.assertIn(name, out)
        for args, (code, out, err) in zip(bad, results[len(calls):]):
            self.assertEqual(code, 2, f"{args}: exit {code}\n{out}{err}")
            lines = err.strip().splitlines()
            self.assertEqual(len(lines), 1, f"{args}: not one line on stderr: {err!r}")
            self.assertTrue(lines[0].startswith("mixminion-client"), f"{args}: {err!r}")
            self.assertEqual(out, "", f"{args}: wrote to stdout: {out!r}")
