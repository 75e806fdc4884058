"""``mixminion-testnet`` as a user runs it: ``up``, ``status``, ``demo``,
``down``, each a real process, on a network of 3 authorities, 5 nodes and
the SMTP sink in a temporary folder.

About 15-25 s here.  Cleanup runs ``down`` and then SIGKILLs any process
of the network still alive, so a failed test leaves nothing behind.
"""

from __future__ import annotations

#: about how many seconds it takes: scripts/test.sh starts the longest first
SLOW = 36

import json
import os
import signal
import sys
from typing import Any

from twisted.internet import defer, utils
from twisted.internet import reactor as _reactor
from twisted.trial import unittest

from mixminion.testing.processes import pid_alive

reactor: Any = _reactor

COMMAND_TIMEOUT = 150


class TestnetTests(unittest.TestCase):

    timeout = 240

    def setUp(self) -> None:
        self.dir = os.path.join(os.path.abspath(self.mktemp()), "net")
        os.makedirs(os.path.dirname(self.dir))
        self.pids: dict[str, int] = {}
        self.addCleanup(self.kill_leftovers)

    async def command(self, *args: str) -> tuple[int, str]:
        argv = ["-m", "mixminion.testnet", *args]
        d = utils.getProcessOutputAndValue(sys.executable, argv, env=dict(os.environ),
                                           path=os.path.dirname(self.dir), reactor=reactor)
        d.addTimeout(COMMAND_TIMEOUT, reactor)
        out, err, code = await d
        text = (out + err).decode("utf-8", "replace")
        return code, text

    def read_pids(self) -> dict[str, int]:
        with open(os.path.join(self.dir, "testnet.json"), encoding="utf-8") as f:
            state = json.load(f)
        pids = {}
        for proc in state["procs"]:
            with open(os.path.join(proc["directory"], "twistd.pid"), encoding="ascii") as f:
                pids[proc["name"]] = int(f.read())
        return pids

    async def kill_leftovers(self) -> None:
        if os.path.exists(os.path.join(self.dir, "testnet.json")):
            await self.command("down", self.dir)
        for name, pid in self.pids.items():
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)

    def test_up_status_demo_down(self) -> defer.Deferred:
        return defer.ensureDeferred(self.scenario())

    async def scenario(self) -> None:
        code, text = await self.command("up", "--nodes", "5", self.dir)
        self.assertEqual(code, 0, text)
        self.pids = self.read_pids()
        self.assertIn("The network is up", text)
        self.assertEqual(sorted(self.pids), sorted(
            ["auth1", "auth2", "auth3", "smtpsink"] + [f"node{i}" for i in range(1, 6)]))
        rc = os.path.join(self.dir, "client", "mixminionrc")
        with open(rc, encoding="utf-8") as f:
            config = f.read()
        self.assertEqual(config.count("Authority: http://127.0.0.1:"), 3)
        self.assertIn("Threshold: 2", config)
        self.assertIn(f"MIXMINIONRC={rc}", text)

        code, text = await self.command("status", self.dir)
        self.assertEqual(code, 0, text)
        self.assertIn("9 of 9 processes up.", text)
        self.assertEqual(text.count("5 servers, signed by"), 3, text)
        self.assertEqual(text.count("queued incoming"), 5, text)

        code, text = await self.command("demo", self.dir)
        self.assertEqual(code, 0, text)
        self.assertIn("Using the running network", text)
        self.assertIn("Delivered by SMTP", text)
        self.assertRegex(text, r"Hello from mixminion-testnet \(forward-[0-9a-f]+\)")
        self.assertRegex(text, r"\| A reply through your reply block \(reply-[0-9a-f]+\)")
        self.assertIn("Demo succeeded", text)
        mails = [n for n in os.listdir(os.path.join(self.dir, "mail")) if n.endswith(".eml")]
        self.assertEqual(len(mails), 1)

        code, text = await self.command("nym-demo", self.dir)
        self.assertEqual(code, 0, text)
        self.assertIn("Using the running network", text)
        self.assertRegex(text, r"request 1 done")
        self.assertRegex(text, r"\| Hi, who are you\? \(nym-[0-9a-f]+\)")
        self.assertRegex(text, r"\| From: demo-[0-9a-f]+@nym\.localhost\.localdomain")
        self.assertIn("Nym demo succeeded", text)

        code, text = await self.command("down", self.dir)
        self.assertEqual(code, 0, text)
        self.assertNotIn("killed", text)
        left = [name for name, pid in self.pids.items() if pid_alive(pid)]
        self.assertEqual(left, [], f"still running after down: {left}")
        leftover_pidfiles = [n for n in self.pids
                             if os.path.exists(os.path.join(self.dir, n, "twistd.pid"))]
        self.assertEqual(leftover_pidfiles, [])
        code, text = await self.command("status", self.dir)
        self.assertEqual(code, 1)
        self.assertIn("0 of 9 processes up.", text)
