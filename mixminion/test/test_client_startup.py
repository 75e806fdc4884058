"""``mixminion-client send`` loads only what sending needs (issue 15, point 7).

Each case runs the real console script's entry point in a fresh
interpreter, then lists the modules it loaded: no Twisted, pyOpenSSL,
server, authority or download code for a send, and no TLS at all when
the packets only go to the queue.  (What the start-up costs is measured
by ``benchmarks/client.py``, not here.)
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

from twisted.internet import threads
from twisted.trial import unittest

from mixminion.test.test_client_cli import Env, descriptor, inline, key, standard_servers
from mixminion.testing.tlspeer import TLSPeer

#: module name prefixes a send must not load, and why
FORBIDDEN = {
    "twisted": "the reactor is for directory downloads only",
    "OpenSSL": "the client speaks TLS with the standard library",
    "mixminion.server": "node code",
    "mixminion.directory.authority": "authority code",
    "mixminion.directory.httpserver": "authority code",
    "mixminion.client.download": "directory downloads only",
    "cryptography.x509": "the chain check reads certificates itself",
}

_PROBE = """
import json, sys
from mixminion.client.launch import main
try:
    main()
except SystemExit as exit:
    status = exit.code
print(json.dumps({"status": status, "modules": sorted(sys.modules)}))
"""


def loaded_by(env: Env, *argv: str) -> tuple[int, list[str]]:
    """Run ``mixminion-client ARGV`` in a fresh interpreter: exit status
    and the modules it loaded."""
    out = subprocess.run([sys.executable, "-c", _PROBE, *argv], env={**env.environ},
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.splitlines()[-1])
    return result["status"], result["modules"]


def forbidden_in(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in FORBIDDEN)]


class SendStartupTests(unittest.TestCase):

    @inline
    async def test_send_loads_no_twisted_server_or_authority_code(self) -> None:
        peer = TLSPeer(key("Alpha"), nickname="Alpha")
        self.addCleanup(peer.close)
        others = [d for d in standard_servers() if d.nickname != "Alpha"]
        env = Env(self, [descriptor("Alpha", port=peer.port)] + others)
        status, modules = await threads.deferToThread(
            loaded_by, env, "send", "-t", "bob@example.org", "-P", "Alpha,Beta", "-D", "no",
            "-i", env.write("m", b"hello\n"))
        self.assertEqual(status, 0)
        await threads.deferToThread(peer.join)
        self.assertEqual(len(peer.records[0].packets), 1)  # it did send
        self.assertIn("ssl", modules)
        self.assertEqual(forbidden_in(modules), [])

    def test_queueing_loads_no_tls(self) -> None:
        env = Env(self)
        status, modules = loaded_by(env, "send", "--queue", "-t", "bob@example.org", "-P",
                                    "Alpha,Beta", "-D", "no", "-i", env.write("m", b"hi\n"))
        self.assertEqual(status, 0)
        self.assertEqual(forbidden_in(modules), [])
        self.assertNotIn("ssl", modules)
        self.assertNotIn("mixminion.mmtp.blocking", modules)


class DownloadDriverTests(unittest.TestCase):
    """The console script when a command does need the reactor: a send
    whose directory download fails carries on; Ctrl-C during a download
    stops the send, and nothing is sent or queued."""

    def env_with_authority(self, url: str, first_hop_port: int) -> Env:
        others = [d for d in standard_servers() if d.nickname != "Alpha"]
        env = Env(self, [descriptor("Alpha", port=first_hop_port)] + others)
        with open(env.rc) as f:
            text = f.read()
        with open(env.rc, "w") as f:
            f.write(text.replace("http://127.0.0.1:9/", url))
        return env

    def send_argv(self, env: Env) -> list[str]:
        return [sys.executable, "-c", "from mixminion.client.launch import main; main()",
                "send", "-t", "bob@example.org", "-P", "Alpha,Beta", "-D", "yes",
                "-i", env.write("m", b"hello\n")]

    @inline
    async def test_failed_download_then_send(self) -> None:
        peer = TLSPeer(key("Alpha"), nickname="Alpha")
        self.addCleanup(peer.close)
        env = self.env_with_authority("http://127.0.0.1:9/", peer.port)
        out = await threads.deferToThread(subprocess.run, self.send_argv(env), env=env.environ,
                                          capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("Continuing with the servers already known", out.stderr)
        self.assertIn("Sent 1 packet", out.stdout)
        await threads.deferToThread(peer.join)
        self.assertEqual(len(peer.records[0].packets), 1)

    def test_interrupt_during_download_sends_nothing(self) -> None:
        silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
        self.addCleanup(silent.close)
        peer = TLSPeer(key("Alpha"), nickname="Alpha")
        self.addCleanup(peer.close)
        env = self.env_with_authority(f"http://127.0.0.1:{silent.getsockname()[1]}/", peer.port)
        proc = subprocess.Popen(self.send_argv(env), env=env.environ, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.addCleanup(proc.kill)
        # The request reaching the authority means the reactor is running
        # the download: interrupt it there.
        silent.settimeout(30)
        conn, _ = silent.accept()
        self.addCleanup(conn.close)
        conn.settimeout(30)
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = conn.recv(4096)
            self.assertTrue(chunk, "the client closed before asking")
            request += chunk
        self.assertTrue(request.startswith(b"GET "))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        self.assertEqual(proc.returncode, 1, err)
        self.assertIn("Interrupted.", err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(out, "")
        self.assertEqual(env.queued(), [])
        self.assertEqual(peer.records, [])
