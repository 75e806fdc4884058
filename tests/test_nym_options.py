"""``[Delivery/Nym]`` on a real ``twistd -n mixminion`` process (doc/nym.md,
mixminiond.conf(5)): what a SIGHUP applies and what waits for a restart,
and the start-ups it refuses with one line.  What the nymserver does with
nyms is tests/test_nym_network.py's."""

from __future__ import annotations

import os
import signal
import smtplib
from typing import Any

from twisted.internet import defer, threads
from twisted.internet import reactor as _reactor
from twisted.trial import unittest

from mixminion.testing.daemon import run_twistd
from mixminion.testing.processes import MixNode, free_ports

reactor: Any = _reactor


def nym_section(domain: str, port: int, more: str = "") -> str:
    return (f"[Delivery/Nym]\nEnabled: yes\nDomain: {domain}\nIncomingPort: {port}\n"
            f"SMTPServer: 127.0.0.1\nSMTPPort: 9\n{more}")


def rcpt(port: int, address: str) -> tuple[int, bytes]:
    """The listener's answer to ``RCPT TO:<address>``."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo()
        smtp.mail("carol@example.org")
        return smtp.rcpt(address)


class NymOptionTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def test_sighup_applies_the_domain_and_leaves_the_port(self) -> defer.Deferred:
        return defer.ensureDeferred(self._reload())

    async def _reload(self) -> None:
        node = MixNode(self)
        first, second = free_ports(2)
        await node.start(node.config(extra=nym_section("one.example", first)))
        answer = await threads.deferToThread(rcpt, first, "x@one.example")
        self.assertEqual(answer, (550, b"no such nym here"))
        answer = await threads.deferToThread(rcpt, first, "x@two.example")
        self.assertEqual(answer, (550, b"not a domain of this server"))
        descriptor = os.path.join(node.base, "keys", "key_0001", "ServerDesc")
        with open(descriptor) as f:
            self.assertIn("[Delivery/Nym]\nVersion: 0.1\nDomain: one.example\nKey: ", f.read())

        node.write(node.config(extra=nym_section("two.example", second)))
        node.daemon.signal(signal.SIGHUP)
        await node.daemon.wait_for_line(reactor, "SIGHUP: applied 1 changed options")
        await node.daemon.wait_for_line(
            reactor, "SIGHUP: [Delivery/Nym] IncomingPort changed; it takes effect after a restart")
        answer = await threads.deferToThread(rcpt, first, "x@two.example")
        self.assertEqual(answer, (550, b"no such nym here"), "the new domain, on the old port")
        answer = await threads.deferToThread(rcpt, first, "x@one.example")
        self.assertEqual(answer, (550, b"not a domain of this server"))
        await node.daemon.wait_for(reactor, "the new descriptor", lambda: "Domain: two.example"
                                   in open(descriptor).read())

    def test_refused_start_ups_are_one_line(self) -> None:
        node = MixNode(self)
        [port] = free_ports(1)
        cases = {
            "no domain": ("[Delivery/Nym]\nEnabled: yes\nIncomingPort: 2525\n",
                          "[Delivery/Nym] Domain is required when the nymserver is enabled"),
            "no port": ("[Delivery/Nym]\nEnabled: yes\nDomain: nym.example.org\n",
                        "[Delivery/Nym] IncomingPort is required when the nymserver is enabled"),
            "bad domain": (nym_section("not a domain", port),
                           "[Delivery/Nym] Domain 'not a domain' is not a domain name"),
            "zero limit": (nym_section("nym.example.org", port, "MaxNyms: 0\n"),
                           "[Delivery/Nym] MaxNyms must be at least 1"),
        }
        for what, (section, line) in cases.items():
            node.write(node.config(extra=section))
            done = run_twistd(["mixminion", "-c", node.conf], cwd=self.dir)
            self.assertNotEqual(done.returncode, 0, what)
            self.assertIn(line, done.stdout, what)
            self.assertNotIn("Traceback", done.stdout, what)

        node.write(node.config(extra=nym_section("nym.example.org", port)))
        key = os.path.join(node.base, "deliver", "NYM", "nym.key")
        os.makedirs(os.path.dirname(key), mode=0o700, exist_ok=True)
        with open(key, "w") as f:
            f.write("not a key\n")
        os.chmod(key, 0o644)
        done = run_twistd(["mixminion", "-c", node.conf], cwd=self.dir)
        self.assertNotEqual(done.returncode, 0)
        self.assertIn(f"{key} can be read by group or others (mode 644); chmod 600 it",
                      done.stdout)
        self.assertNotIn("Traceback", done.stdout)
