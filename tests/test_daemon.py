"""``twistd mixminion`` without ``-n``: a real daemon relays and stops.

twistd builds the service tree before it forks; anything started then
(threads) is gone in the daemon.  This runs the node the way an operator
would and checks that a packet is processed and delivered, and that
SIGTERM stops it.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

from twisted.internet import defer, reactor
from twisted.trial import unittest

from mixminion.codec.build import build_message_packets
from mixminion.codec.header import Hop
from mixminion.codec.routing import MBOX_TYPE, HostInfo
from mixminion.directory.descriptor import parse_descriptor
from mixminion.mmtp.initiator import NextHop, MMTPClient
from mixminion.testing.processes import (
    free_ports,
    node_config,
    pid_alive,
    read_text,
    run_twistd,
    wait_until,
)


class DaemonTests(unittest.TestCase):
    async def _wait_for(self, what: str, check: Callable[[], Any], timeout: float = 30.0) -> None:
        await wait_until(reactor, what, check, timeout,
                         report=lambda _: f"log:\n{self._log_tail()}", error=self.failureException)

    def _log_tail(self) -> str:
        return "".join(read_text(self.logfile).splitlines(keepends=True)[-30:]) or "(no log)"

    def test_daemon_delivers_and_stops(self) -> defer.Deferred:
        return defer.ensureDeferred(self._daemon_round_trip())

    async def _daemon_round_trip(self) -> None:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        addresses = os.path.join(base, "addresses")
        with open(addresses, "w") as f:
            f.write("me: me@localhost.localdomain\n")
        mbox = os.path.join(base, "mail.mbox")
        [port] = free_ports(1)
        conf = os.path.join(base, "node.conf")
        with open(conf, "w") as f:
            f.write(node_config(
                os.path.join(base, "node"), port, nickname="daemon",
                contact="daemon@localhost.localdomain",
                extra=(f"[Delivery/MBOX]\nEnabled: yes\nAddressFile: {addresses}\n"
                       "RemoveContact: daemon@localhost.localdomain\n"
                       f"ReturnAddress: nobody@localhost.localdomain\nMboxFile: {mbox}\n")))
        pidfile = os.path.join(base, "twistd.pid")
        self.logfile = os.path.join(base, "twistd.log")
        done = run_twistd(["--pidfile", pidfile, "--logfile", self.logfile, "mixminion", "-c", conf],
                          cwd=base, foreground=False)
        self.assertEqual(done.returncode, 0, done.stdout)
        self.addCleanup(self._kill, pidfile)
        desc_path = os.path.join(base, "node", "keys", "key_0001", "ServerDesc")
        await self._wait_for("the daemon's descriptor and start-up line",
                             lambda: os.path.exists(desc_path) and "started" in self._log_tail())
        with open(desc_path) as f:
            desc = parse_descriptor(f.read(), time.time())
        hop = Hop(desc.packet_key, HostInfo.parse(desc.routing_info))
        [built] = build_message_packets(b"daemon mail\n", MBOX_TYPE, b"me",
                                        lambda i: ([hop], [hop]), os.urandom)
        client = MMTPClient(reactor)
        await client.send_packet(NextHop("127.0.0.1", port, desc.identity_digest),
                                 built.packet)

        def delivered() -> bool:
            return os.path.exists(mbox) and b"daemon mail" in open(mbox, "rb").read()

        await self._wait_for("the message in the mbox file", delivered)
        with open(pidfile) as f:
            pid = int(f.read())
        os.kill(pid, signal.SIGTERM)
        await self._wait_for("the daemon to exit", lambda: not pid_alive(pid))
        self.assertIn("Server Shut Down", self._log_tail())

    def _kill(self, pidfile: str) -> None:
        try:
            with open(pidfile) as f:
                os.kill(int(f.read()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
