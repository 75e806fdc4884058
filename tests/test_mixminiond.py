"""``mixminiond`` against real ``twistd mixminion`` nodes: ``fingerprint``,
``status``, ``reload``, ``stop``, ``republish`` and ``keys``, each run as the
installed console script (a process of its own, as an operator runs it).

The nodes run through :mod:`mixminion.testing.processes`.  ``mixminiond``
runs in a thread: the test's reactor must stay free to answer the nodes
(the fake directory authority of the republish tests lives in it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

from twisted.internet import defer, threads
from twisted.internet import reactor as _reactor
from twisted.trial import unittest
from twisted.web import resource, server

from mixminion.server.pidfile import read_pid
from mixminion.testing.processes import MixNode, pid_alive

reactor: Any = _reactor

#: the console script beside this Python, else the module
_BESIDE = os.path.join(os.path.dirname(sys.executable), "mixminiond")
MIXMINIOND = ([_BESIDE] if os.access(_BESIDE, os.X_OK)
              else [sys.executable, "-m", "mixminion.server.mixminiond"])

AUTHORITY_FINGERPRINT = "AB" * 20


def mixminiond(*args: str) -> defer.Deferred:
    """Run ``mixminiond ARGS`` to its end, in a thread: a CompletedProcess."""
    return threads.deferToThread(
        subprocess.run, [*MIXMINIOND, *args], stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=120)


class FakeAuthority(resource.Resource):
    """A directory authority's ``/publish``: counts the uploads and answers
    ``Status: 1`` (or 0 once ``accept`` is False)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.uploads = 0
        self.accept = True

    def render_POST(self, request: Any) -> bytes:  # noqa: N802
        self.uploads += 1
        request.setHeader(b"content-type", b"text/plain")
        return b"Status: 1\nMessage: ok\n" if self.accept else b"Status: 0\nMessage: go away\n"


class MixminiondTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def assertOneLine(self, done: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
        """Exit status ``code``, nothing on stdout, one ``mixminiond:`` line
        on stderr holding every fragment."""
        self.assertEqual(done.returncode, code, done)
        self.assertEqual(done.stdout, "")
        self.assertEqual(len(done.stderr.splitlines()), 1, done.stderr)
        self.assertTrue(done.stderr.startswith("mixminiond: "), done.stderr)
        for fragment in fragments:
            self.assertIn(fragment, done.stderr)
        return done.stderr

    async def healthy(self, node: MixNode) -> subprocess.CompletedProcess:
        """``mixminiond status`` once it says healthy (the first status is
        written just after the start line)."""
        async def check():
            done = await mixminiond("status", "-c", node.conf)
            return done if done.returncode == 0 else None
        return await node.daemon.wait_for(reactor, "mixminiond status to say healthy", check,
                                          timeout=30, interval=0.5)

    async def started(self) -> MixNode:
        """A node started and healthy."""
        node = MixNode(self)
        await node.start()
        await self.healthy(node)
        return node

    # --- fingerprint, status, stop ------------------------------------------------------

    def test_fingerprint_status_stop(self) -> defer.Deferred:
        return defer.ensureDeferred(self._fingerprint_status_stop())

    async def _fingerprint_status_stop(self) -> None:
        node = MixNode(self)
        await node.start()
        pid = node.daemon.pid
        fingerprint = node.descriptor().fingerprint
        done = await mixminiond("fingerprint", "-c", node.conf)
        self.assertEqual((done.returncode, done.stdout, done.stderr), (0, fingerprint + "\n", ""))

        done = await self.healthy(node)
        lines = done.stdout.splitlines()
        self.assertEqual(lines[0], f"running (pid {pid}), healthy")
        for fact in ("nickname: node", f"fingerprint: {fingerprint}",
                     f"listening: 127.0.0.1:{node.port}, 127.0.0.1:{node.metrics_port}",
                     "processing: running", "last errors: none"):
            self.assertIn(fact, lines)
        self.assertRegex(done.stdout, r"\nkeys: \S+ \S+ UTC to \S+ \S+ UTC \(live\)")
        self.assertRegex(done.stdout, r"\nstarted: \S+ \S+ UTC \(up [^)]+\)\n")
        done = await mixminiond("status", "-c", node.conf, "--json")
        self.assertEqual(done.returncode, 0, done)
        doc = json.loads(done.stdout)
        self.assertEqual((doc["pid"], doc["running"], doc["fingerprint"], doc["health"]["ok"]),
                         (pid, True, fingerprint, True))

        done = await mixminiond("stop", "-c", node.conf)
        self.assertEqual((done.returncode, done.stdout, done.stderr),
                         (0, f"stopped (process {pid})\n", ""))
        # mixminiond waited for the end of the process: only its exit status
        # (a zombie's, reaped here) is left.
        self.assertFalse(pid_alive(pid))
        self.assertEqual(node.daemon.process.wait(timeout=10), -signal.SIGTERM)
        self.assertFalse(os.path.exists(os.path.join(node.base, "pid")))

        done = await mixminiond("status", "-c", node.conf)
        self.assertEqual(done.returncode, 3, done)
        self.assertTrue(done.stdout.startswith("not running; last status written "), done.stdout)
        self.assertIn(f"fingerprint: {fingerprint}", done.stdout)
        done = await mixminiond("status", "-c", node.conf, "--json")
        self.assertEqual(done.returncode, 3, done)
        self.assertFalse(json.loads(done.stdout)["running"])
        self.assertOneLine(await mixminiond("stop", "-c", node.conf), 3, "not running")
        done = await mixminiond("fingerprint", "-c", node.conf)
        self.assertEqual((done.returncode, done.stdout), (0, fingerprint + "\n"))

    def test_fingerprint_before_the_first_start(self) -> defer.Deferred:
        return defer.ensureDeferred(self._no_key())

    async def _no_key(self) -> None:
        node = MixNode(self)
        node.write(node.config())
        self.assertOneLine(await mixminiond("fingerprint", "-c", node.conf), 1,
                           "no identity key at ", "identity.key")

    def test_a_stale_pid_file_never_signals_a_stranger(self) -> defer.Deferred:
        """After a crash the pid file stays; its number may be another
        program's by now."""
        return defer.ensureDeferred(self._stale())

    async def _stale(self) -> None:
        node = await self.started()
        pid_file = os.path.join(node.base, "pid")
        node.daemon.kill()
        self.assertEqual(read_pid(pid_file), node.daemon.pid)
        done = await mixminiond("status", "-c", node.conf)
        self.assertEqual(done.returncode, 3, done)
        self.assertTrue(done.stdout.startswith("not running; last status written "), done.stdout)

        stranger = subprocess.Popen(["sleep", "60"])
        self.addCleanup(stranger.wait)
        self.addCleanup(stranger.kill)
        with open(pid_file, "w") as f:
            f.write(f"{stranger.pid}\n")
        for command in ("stop", "reload"):
            self.assertOneLine(await mixminiond(command, "-c", node.conf), 3,
                               f"names process {stranger.pid}, which is not a running "
                               "mixminion node")
        self.assertIsNone(stranger.poll())
        # The node starts again over the stale file.
        await node.start()
        await self.healthy(node)

    # --- reload -------------------------------------------------------------------------

    def test_reload(self) -> defer.Deferred:
        return defer.ensureDeferred(self._reload())

    async def _reload(self) -> None:
        node = await self.started()
        pid = node.daemon.pid
        done = await mixminiond("reload", "-c", node.conf)
        self.assertEqual((done.returncode, done.stdout, done.stderr),
                         (0, f"reloaded (process {pid})\n", ""))
        self.assertEqual(len(node.daemon.lines("SIGHUP: configuration unchanged")), 1)

        node.write(node.config(metrics=True, server="MaxQueuedPackets: 1\nIdentityKeyBits: 4096"))
        done = await mixminiond("reload", "-c", node.conf)
        self.assertEqual(done.returncode, 0, done)
        self.assertEqual(done.stdout.splitlines(), [
            "SIGHUP: [Server] IdentityKeyBits changed; it takes effect after a restart",
            f"reloaded (process {pid})"])
        self.assertEqual(len(node.daemon.lines("SIGHUP: applied 1 changed options")), 1)

        # A file the node would refuse is not sent at all.
        sighups = len(node.daemon.lines("SIGHUP"))
        node.write(node.config(metrics=True, server="MaxQueuedPacketz: 1"))
        line = self.assertOneLine(await mixminiond("reload", "-c", node.conf), 2,
                                  "MaxQueuedPacketz")
        self.assertNotIn("Traceback", line)
        self.assertEqual(len(node.daemon.lines("SIGHUP")), sighups)
        self.assertTrue(node.daemon.alive())
        self.assertEqual(node.daemon.pid, pid)

    # --- republish ----------------------------------------------------------------------

    def authority(self) -> tuple[FakeAuthority, str]:
        authority = FakeAuthority()
        port = reactor.listenTCP(0, server.Site(authority), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return authority, f"http://127.0.0.1:{port.getHost().port}/"

    def test_republish(self) -> defer.Deferred:
        return defer.ensureDeferred(self._republish())

    async def _republish(self) -> None:
        authority, url = self.authority()
        node = MixNode(self)
        await node.start(node.config(metrics=True, extra=(
            f"[DirectoryServers]\nPublish: yes\nAuthority: {url} {AUTHORITY_FINGERPRINT}\n")))
        await node.daemon.wait_for_line(reactor, "published (1 of 1 authorities)")
        await self.healthy(node)
        before = authority.uploads
        done = await mixminiond("republish", "-c", node.conf)
        self.assertEqual((done.returncode, done.stdout, done.stderr), (0, f"published to {url}\n", ""))
        self.assertGreater(authority.uploads, before)
        self.assertEqual(len(node.daemon.lines("Publication (republish)")), 1)

        authority.accept = False
        line = self.assertOneLine(await mixminiond("republish", "-c", node.conf), 1,
                                  "publication incomplete: ", "rejected", "go away")
        self.assertIn("retries", line)
        self.assertEqual(len(node.daemon.lines("Publication (republish)")), 2)

    def test_republish_without_authorities(self) -> defer.Deferred:
        return defer.ensureDeferred(self._nothing_to_republish())

    async def _nothing_to_republish(self) -> None:
        node = await self.started()
        self.assertOneLine(await mixminiond("republish", "-c", node.conf), 1,
                           "publishes no descriptor")
        self.assertEqual(node.daemon.lines("SIGUSR2"), [])
        # SIGUSR2 from elsewhere does not end a node that does not publish.
        node.daemon.signal(signal.SIGUSR2)
        await node.daemon.wait_for_line(reactor, "SIGUSR2: nothing to republish")
        self.assertTrue(node.daemon.alive())

    # --- keys ---------------------------------------------------------------------------

    def test_keys(self) -> defer.Deferred:
        return defer.ensureDeferred(self._keys())

    async def _keys(self) -> None:
        node = MixNode(self)
        await node.start()
        fingerprint = node.descriptor().fingerprint
        done = await mixminiond("keys", "-c", node.conf)
        self.assertEqual(done.returncode, 0, done)
        lines = done.stdout.splitlines()
        self.assertEqual(lines[0], f"identity: {fingerprint}")
        self.assertRegex(lines[1], r"^key_0001  \S+ \S+ UTC to \S+ \S+ UTC  live  not published$")

        self.assertOneLine(await mixminiond("keys", "-c", node.conf, "--delete-expired"), 1,
                           "the node is running")
        self.assertTrue(os.path.isdir(os.path.join(node.base, "keys", "key_0001")))
        self.assertEqual(read_pid(os.path.join(node.base, "pid")), node.daemon.pid)

        self.assertEqual((await mixminiond("stop", "-c", node.conf)).returncode, 0)
        done = await mixminiond("keys", "-c", node.conf, "--delete-expired")
        self.assertEqual(done.returncode, 0, done)
        self.assertEqual(done.stdout.splitlines()[-1], "no expired keysets to delete")
        # The lock it held is free again: the node starts.
        await node.start()
        await self.healthy(node)
