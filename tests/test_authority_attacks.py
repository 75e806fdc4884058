"""Issue 12 point 8 on a real ``twistd mixminion-directory``: connection
floods and oversized uploads from 127.x.y.z, while the authority keeps
answering ``GET /directory`` and publishing its consensus.

One authority (``VoteInterval: 3 seconds``, ``RequestTimeout: 3 seconds``,
the default connection limits 256 / 16) started through the shared process
harness; the attackers are plain sockets of this test, each bound to its
own loopback address (any 127.0.0.0/8 address works with no set-up):

1. 300 idle connections from 127.0.0.1: the authority keeps 16 of them and
   closes the rest at once; ``GET /directory`` from 127.0.0.2 is answered
   meanwhile, and the 16 are closed at the request deadline, after which
   127.0.0.1 is answered again.
2. 280 idle connections from 20 addresses (14 each): the authority holds
   at most 256 connections (its open files stay bounded: before the fix,
   20,000 of them exhausted its descriptors), and an honest client is
   answered again within the deadline.
3. A ``POST /publish`` declaring a 100 GB body, then trickling bytes: 413
   before the body is read, the connection closed, and no file opened;
   before the fix the body went to a temporary file under /tmp.
4. A chunked upload sent as fast as possible: cut off (413, or a reset
   once the sender has pushed 1 MB past the refusal) after a few
   megabytes at most, no file opened, memory flat.

Afterwards the authority still publishes a consensus.  About 12-15 s here.
"""

from __future__ import annotations

#: measures time, memory or load: scripts/test.sh runs it alone, after the others
TIMED = True

import errno
import os
import select
import signal
import socket
import time
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.trial import unittest

from mixminion.testing.processes import Daemon, free_ports, rss_kb

reactor: Any = _reactor

REQUEST_TIMEOUT = 3
#: the defaults of MaxConnections and MaxConnectionsPerAddress
MAX_CONNECTIONS, PER_ADDRESS = 256, 16
PUBLISHED = "Published consensus"
HUNDRED_GB = 100 * 1024 ** 3
#: the authority's sockets besides HTTP clients: its listener, a log pipe or two
SPARE_SOCKETS = 8


def open_files(pid: int) -> list[str]:
    """What the process's descriptors point to (sockets as ``socket:[N]``)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass  # closed meanwhile
    return found


def held_sockets(pid: int) -> int:
    return sum(t.startswith("socket:") for t in open_files(pid))


def regular_files(pid: int) -> set[str]:
    return {t for t in open_files(pid) if t.startswith("/")}


def tree_size(path: str) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(folder, name))
            except OSError:
                pass
    return total


def connect_from(source: str, port: int) -> socket.socket:
    """A non-blocking connection being made from ``source`` to 127.0.0.1:``port``."""
    s = socket.socket()
    s.setblocking(False)
    s.bind((source, 0))
    s.connect_ex(("127.0.0.1", port))
    return s


def closed_by_peer(s: socket.socket) -> bool:
    """True once the authority closed (or reset) this idle connection."""
    poller = select.poll()
    poller.register(s, select.POLLIN | select.POLLERR | select.POLLHUP)
    if not poller.poll(0):
        return False
    try:
        return s.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return False
        return True


def get(source: str, port: int, path: str = "/directory", timeout: float = 3.0) -> Optional[bytes]:
    """One HTTP/1.0 GET from ``source``; the answer, or None if refused."""
    with socket.socket() as s:
        s.settimeout(timeout)
        s.bind((source, 0))
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: authority\r\n\r\n".encode())
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except OSError:
            return None
    answer = b"".join(chunks)
    return answer or None


class AuthorityAttackTests(unittest.TestCase):

    timeout = 60

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.base = os.path.join(self.dir, "base")
        [self.port] = free_ports(1)
        self.conf = os.path.join(self.dir, "authority.conf")
        with open(self.conf, "w") as f:
            f.write(f"[Authority]\nBaseDir: base\nNickname: Target\nPort: {self.port}\n"
                    f"VoteInterval: 3 seconds\nRequestTimeout: {REQUEST_TIMEOUT} seconds\n")
        self.auth = Daemon(self.dir, ["mixminion-directory", "-c", self.conf], name="authority")
        self.addCleanup(self.auth.kill)
        self.sockets: list[socket.socket] = []
        self.addCleanup(self.close_sockets)

    def close_sockets(self) -> None:
        for s in self.sockets:
            s.close()
        self.sockets = []

    async def wait(self, what: str, check, timeout: float) -> float:
        """``Daemon.wait_for``; returns the seconds it took."""
        started = time.monotonic()
        await self.auth.wait_for(reactor, what, check, timeout=timeout, interval=0.05)
        return time.monotonic() - started

    def refused(self) -> int:
        """How many of the attack's connections the authority has closed."""
        return sum(map(closed_by_peer, self.sockets))

    def answered(self, source: str) -> bool:
        answer = get(source, self.port)
        return answer is not None and answer.startswith(b"HTTP/1.0 200 ")

    def test_floods_and_huge_uploads(self) -> defer.Deferred:
        return defer.ensureDeferred(self._attacks())

    async def _attacks(self) -> None:
        self.auth.start()
        await self.auth.wait_for_line(reactor, PUBLISHED, timeout=20)
        self.assertTrue(self.answered("127.0.0.2"))
        pid = self.auth.pid
        files_before, rss_before = regular_files(pid), rss_kb(pid)
        size_before = tree_size(self.base)

        # 1. one address, 300 idle connections
        self.sockets = [connect_from("127.0.0.1", self.port) for _ in range(300)]
        await self.wait("all but 16 refused", lambda: self.refused() >= 300 - PER_ADDRESS,
                        timeout=REQUEST_TIMEOUT - 0.5)
        self.assertLessEqual(held_sockets(pid), PER_ADDRESS + SPARE_SOCKETS)
        self.assertTrue(self.answered("127.0.0.2"), "GET /directory while 127.0.0.1 floods")
        await self.wait("the held 16 closed at the deadline", lambda: self.refused() == 300,
                        timeout=REQUEST_TIMEOUT + 3)
        self.close_sockets()
        self.assertTrue(self.answered("127.0.0.1"), "127.0.0.1 answered again after the flood")

        # 2. twenty addresses, 14 idle connections each: past the total limit
        self.sockets = [connect_from(f"127.0.1.{i}", self.port) for i in range(1, 21) for _ in range(14)]
        await self.wait("the total limit reached", lambda: self.refused() >= 280 - MAX_CONNECTIONS,
                        timeout=REQUEST_TIMEOUT - 0.5)
        self.assertLessEqual(held_sockets(pid), MAX_CONNECTIONS + SPARE_SOCKETS)
        took = await self.wait("an honest GET answered again", lambda: self.answered("127.0.0.3"),
                               timeout=REQUEST_TIMEOUT + 4)
        self.assertLess(took, REQUEST_TIMEOUT + 3)
        self.close_sockets()

        # 3. a declared 100 GB body, trickled
        s = connect_from("127.0.0.4", self.port)
        self.sockets.append(s)
        s.setblocking(True)
        s.settimeout(5)
        s.sendall(b"POST /publish HTTP/1.1\r\nHost: authority\r\n"
                  b"Content-Type: application/x-www-form-urlencoded\r\n"
                  b"Content-Length: %d\r\n\r\ndesc=" % HUNDRED_GB)
        answer = b""
        for _ in range(40):
            try:
                s.send(b"x" * 1024)
            except OSError:
                break
            readable, _, _ = select.select([s], [], [], 0.05)
            if readable:
                try:
                    data = s.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                answer += data
            self.assertEqual(regular_files(pid) - files_before, set(), "a file opened for the body")
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertIn(b"107374182400 bytes declared", answer)
        await self.wait("the 100 GB upload closed", lambda: closed_by_peer(s), timeout=5)
        self.close_sockets()

        # 4. a chunked body as fast as the socket takes it
        s = connect_from("127.0.0.5", self.port)
        self.sockets.append(s)
        s.setblocking(True)
        s.settimeout(5)
        s.sendall(b"POST /publish HTTP/1.1\r\nHost: authority\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"%x\r\n%s\r\n" % (65536, b"y" * 65536)
        sent, answer, error = 0, b"", None
        while sent < 64 * 1024 * 1024 and not answer:
            try:
                s.sendall(piece)
                sent += len(piece)
                if select.select([s], [], [], 0)[0]:
                    answer = s.recv(65536)
            except OSError as exc:
                error = exc
                break
        # Read in time, the answer is a 413; a sender that pushes on past the
        # authority's 1 MB of lingering is reset, and the reset can overtake it.
        if answer:
            self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
            self.assertIn(b"more than 131072 bytes", answer)
            await self.wait("the chunked upload closed", lambda: closed_by_peer(s), timeout=5)
        else:
            self.assertIsInstance(error, (ConnectionResetError, BrokenPipeError), (sent, error))
        self.assertLess(sent, 16 * 1024 * 1024)  # what the sockets' buffers hold
        self.assertEqual(regular_files(pid) - files_before, set(), "a file opened for the body")
        self.close_sockets()

        # the authority is still itself: nothing stored, memory flat, consensus published
        self.assertLess(tree_size(self.base) - size_before, 64 * 1024)
        self.assertLess(rss_kb(pid) - rss_before, 50 * 1024)
        published = self.auth.text().count(PUBLISHED)
        await self.auth.wait_for_line(reactor, PUBLISHED, timeout=10, count=published + 1)
        self.assertTrue(self.answered("127.0.0.1"))
        log = self.auth.text()
        for address in ("127.0.0.1", "127.0.0.4", "127.0.1.7"):
            self.assertNotIn(address, log.replace(f"127.0.0.1:{self.port}", ""))
        self.assertIn("HTTP: refused", log)
        # twistd ends by re-raising SIGTERM once it has shut down cleanly
        self.assertIn(await self.auth.stop(reactor), (0, -signal.SIGTERM))
        self.assertIn("Server Shut Down.", self.auth.text())
