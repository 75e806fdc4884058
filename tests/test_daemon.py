"""``twistd mixminion`` without ``-n``: a real daemon relays and stops.

twistd builds the service tree before it forks; anything started then
(threads) is gone in the daemon.  This runs the node the way an operator
would and checks that a packet is processed and delivered, and that
SIGTERM stops it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mixminion.codec.build import build_message_packets
from mixminion.codec.header import Hop
from mixminion.codec.routing import MBOX_TYPE
from mixminion.directory.descriptor import parse_descriptor
from mixminion.mmtp.initiator import Destination, MMTPClient

CONFIG = """\
[Server]
BaseDir: {base}
Mode: relay
Nickname: daemon
Contact-Email: daemon@localhost.localdomain
MixAlgorithm: Timed
MixInterval: 1 second
LogLevel: INFO

[Incoming/MMTP]
Enabled: yes
IP: 127.0.0.1
Hostname: localhost
Port: {port}

[Outgoing/MMTP]
Enabled: yes

[Delivery/MBOX]
Enabled: yes
AddressFile: {addresses}
RemoveContact: daemon@localhost.localdomain
ReturnAddress: nobody@localhost.localdomain
MboxFile: {mbox}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaemonTests(unittest.TestCase):
    async def _wait_for(self, what: str, check, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}; log:\n{self._log_tail()}")
            await task.deferLater(reactor, 0.1, lambda: None)

    def _log_tail(self) -> str:
        try:
            with open(self.logfile) as f:
                return "".join(f.readlines()[-30:])
        except OSError:
            return "(no log)"

    def test_daemon_delivers_and_stops(self) -> defer.Deferred:
        return defer.ensureDeferred(self._daemon_round_trip())

    async def _daemon_round_trip(self) -> None:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        addresses = os.path.join(base, "addresses")
        with open(addresses, "w") as f:
            f.write("me: me@localhost.localdomain\n")
        mbox = os.path.join(base, "mail.mbox")
        port = _free_port()
        conf = os.path.join(base, "node.conf")
        with open(conf, "w") as f:
            f.write(CONFIG.format(base=os.path.join(base, "node"), port=port,
                                  addresses=addresses, mbox=mbox))
        pidfile = os.path.join(base, "twistd.pid")
        self.logfile = os.path.join(base, "twistd.log")
        done = subprocess.run(["twistd", "--pidfile", pidfile, "--logfile", self.logfile,
                               "mixminion", "-c", conf], capture_output=True, text=True,
                              timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.addCleanup(self._kill, pidfile)
        desc_path = os.path.join(base, "node", "keys", "key_0001", "ServerDesc")
        await self._wait_for("the daemon's descriptor and start-up line",
                         lambda: os.path.exists(desc_path) and "started" in self._log_tail())
        with open(desc_path) as f:
            desc = parse_descriptor(f.read(), time.time())
        hop = Hop(desc.packet_key, _host_info(desc))
        [built] = build_message_packets(b"daemon mail\n", MBOX_TYPE, b"me",
                                        lambda i: ([hop], [hop]), os.urandom)
        client = MMTPClient(reactor)
        await client.send_packet(Destination("127.0.0.1", port, desc.identity_digest),
                                 built.packet)

        def delivered() -> bool:
            return os.path.exists(mbox) and b"daemon mail" in open(mbox, "rb").read()

        await self._wait_for("the message in the mbox file", delivered)
        with open(pidfile) as f:
            pid = int(f.read())
        os.kill(pid, signal.SIGTERM)
        await self._wait_for("the daemon to exit", lambda: not _alive(pid))
        self.assertIn("Server Shut Down", self._log_tail())

    def _kill(self, pidfile: str) -> None:
        try:
            with open(pidfile) as f:
                os.kill(int(f.read()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def _host_info(desc):
    from mixminion.codec.routing import HostInfo

    return HostInfo.parse(desc.routing_info)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
