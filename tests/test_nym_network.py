"""A nym on the test network, with a real MTA (issue 17, doc/nym.md).

Three authorities and four nodes as ``mixminion-testnet`` makes them; the
last node runs the nymserver (``nym.localhost.localdomain``) and sends its
nyms' mail to a real opensmtpd, which also relays mail for the nym domain
to the nymserver's listener, as an MTA in front of it would in production.
Everything the owner does goes through ``mixminion-client`` as a process:

1. ``nym create alice`` with three reply blocks (to the owner's mbox):
   the answer arrives and ``decode`` shows it;
2. carol, an ordinary address, mails ``alice@nym.localhost.localdomain``
   through the MTA: it reaches the owner's mbox and ``decode`` shows it;
3. the owner answers as the nym (``nym send``): carol's mail arrives at the
   MTA ``From: alice@nym.localhost.localdomain``;
4. the reply blocks are used up; carol mails again: the mail waits;
5. the nymserver is killed (SIGKILL) and started again;
6. ``nym add-surbs``: the waiting mail arrives;
7. a replayed request (a counter already used, in a fresh packet: the mix
   network itself drops a packet seen before) and a forged one (another
   key) are refused without an answer: nothing more reaches the mbox.
"""

from __future__ import annotations

#: about how many seconds it takes: scripts/test.sh starts the longest first
SLOW = 60

import os
import re
import signal
import smtplib
import subprocess
import sys
import time
from typing import Any, Optional

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer, threads
from twisted.internet import reactor as _reactor
from twisted.trial import unittest

from mixminion import testnet
from mixminion.client import keyring as keyring_mod
from mixminion.client.paths import hop_for
from mixminion.codec.build import build_encrypted_forward_packet, encode_message_payloads
from mixminion.codec.payload import ENC_FWD_OVERHEAD
from mixminion.mmtp.blocking import send_packets
from mixminion.nym.formats import NYM_TYPE, Command, build_request
from mixminion.testing.daemon import free_ports
from mixminion.testing.mta import MTA, start_opensmtpd

reactor: Any = _reactor

NYM = "alice"
ADDRESS = f"{NYM}@{testnet.NYM_DOMAIN}"
CAROL = "carol@example.org"
WAIT = 60.0


class NymNetworkTests(unittest.TestCase):

    timeout = 300

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.t0 = time.monotonic()
        self.mta: Optional[MTA] = None

    def note(self, text: str) -> None:
        print(f"[nym +{time.monotonic() - self.t0:.0f} s] {text}", file=sys.stderr)

    # --- the owner, as a person runs the client -----------------------------------------------

    def client(self, *argv: str, stdin: bytes = b"") -> str:
        env = {**os.environ, "MIXMINIONRC": self.net.client_rc,
               "MIXMINION_PASSPHRASE": testnet.PASSPHRASE}
        done = subprocess.run(testnet.client_command() + list(argv), input=stdin, env=env,
                              capture_output=True, timeout=120)
        out = done.stdout.decode("utf-8", "replace") + done.stderr.decode("utf-8", "replace")
        if done.returncode != 0:
            raise AssertionError(f"mixminion-client {' '.join(argv)} exited "
                                 f"{done.returncode}:\n{out}")
        return out

    async def decoded(self) -> str:
        return await threads.deferToThread(self.client, "decode", "-i", self.net.mbox)

    async def wait_decoded(self, what: str, text: str, count: int = 1) -> str:
        """The owner's decoded mbox once ``text`` is in it ``count`` times."""
        async def check() -> Optional[str]:
            if not os.path.exists(self.net.mbox):
                return None
            out = await self.decoded()
            return out if out.count(text) >= count else None
        return await testnet.wait_for(reactor, self.net, what, check, WAIT, 1.0)

    # --- carol, through the MTA -----------------------------------------------------------

    def mail_to_nym(self, subject: str, text: str) -> None:
        assert self.mta is not None
        with smtplib.SMTP("127.0.0.1", self.mta.port, timeout=30) as smtp:
            smtp.sendmail(CAROL, [ADDRESS], f"From: {CAROL}\nTo: {ADDRESS}\n"
                                            f"Subject: {subject}\n\n{text}\n")

    # --- requests the client would never send --------------------------------------------------

    def raw_request(self, request: bytes) -> None:
        """``request`` encrypted to the nymserver and sent as a fresh
        packet over node1 (as the client sends, without its checks)."""
        directory = testnet.listed(self.net, self._directory_text(), time.time())
        assert directory is not None
        by_name = {d.nickname.lower(): d for d in directory.descriptors}
        first, server = by_name["node1"], by_name[self.nymserver.name]
        assert server.nym is not None
        [payload] = encode_message_payloads(request, os.urandom, overhead=ENC_FWD_OVERHEAD)
        built = build_encrypted_forward_packet(payload, server.nym.key, [hop_for(first)],
                                               [hop_for(server)], NYM_TYPE, b"", os.urandom)
        result = send_packets(first.hostname, first.port, first.identity_digest, [built.packet],
                              timeout=30)
        assert result.failure is None, result.failure

    def _directory_text(self) -> bytes:
        import urllib.request

        with urllib.request.urlopen(self.net.authorities[0].url + "directory", timeout=10) as f:
            return f.read()

    def nym_key(self) -> Ed25519PrivateKey:
        text = keyring_mod.read_keyring_text(self.net.client_dir)
        ring = keyring_mod.decrypt_keyring(text, testnet.PASSPHRASE)
        [entry] = [n for n in ring.nyms if n.name == NYM]
        return Ed25519PrivateKey.from_private_bytes(entry.secret)

    async def ignored_requests(self) -> int:
        values = await testnet.node_metrics(reactor, self.nymserver) or {}
        return int(values.get('mixminion_events_total{event="NymRequest:ignored"}', 0))

    # --- the test -----------------------------------------------------------------------------

    def test_a_nym_through_the_network_and_a_real_mta(self) -> defer.Deferred:
        return defer.ensureDeferred(self.scenario())

    async def scenario(self) -> None:
        [mta_port] = free_ports(1)
        self.net = testnet.create_network(self.dir, 4, f"127.0.0.1:{mta_port}")
        self.addCleanup(lambda: defer.ensureDeferred(
            testnet.stop_all(reactor, self.net, quiet=True)))
        [self.nymserver] = [n for n in self.net.nodes if n.nym_port is not None]
        self.mta = await start_opensmtpd(self, self.dir, port=mta_port,
                                         relays={testnet.NYM_DOMAIN: self.nymserver.nym_port})
        await testnet.bring_up(reactor, self.dir, 4, f"127.0.0.1:{mta_port}")
        self.note("network and MTA up")

        out = await threads.deferToThread(self.client, "nym", "create", NYM, "--surbs", "3",
                                          "--to", "mbox:me@node2")
        self.assertIn("Request 1 (create)", out)
        decoded = await self.wait_decoded("the answer to create", "request 1 done")
        self.assertIn(f"created {ADDRESS} with 3 reply blocks", decoded)
        self.note("created")

        await threads.deferToThread(self.mail_to_nym, "who are you", "Hello alice, carol here.")
        decoded = await self.wait_decoded("carol's mail in the owner's mbox",
                                          "Hello alice, carol here.")
        self.assertIn(f"Mail for nym {ADDRESS}", decoded)
        self.assertIn("Subject: who are you", decoded)
        self.note("carol's mail decoded")

        await threads.deferToThread(self.client, "nym", "send", NYM, "-t", CAROL, "--subject",
                                    "Re: who are you", stdin=b"Nobody you know.\n")

        async def answered() -> Optional[Any]:
            assert self.mta is not None
            found = [m for m in self.mta.messages() if m["Subject"] == "Re: who are you"]
            return found[0] if found else None
        mail = await testnet.wait_for(reactor, self.net, "the nym's mail at the MTA", answered,
                                      WAIT, 1.0)
        self.assertEqual(mail["From"], ADDRESS)
        self.assertEqual(mail["To"], CAROL)
        self.assertIn("Nobody you know.", mail.get_payload())
        await self.wait_decoded("the answer to send", "request 2 done")
        self.note("the nym's answer reached carol through the MTA")

        # Three reply blocks: create's answer, carol's mail, send's answer.
        await threads.deferToThread(self.mail_to_nym, "are you there", "Second mail from carol.")
        await testnet.sleep(reactor, 3)
        self.assertNotIn("Second mail from carol.", await self.decoded(), "no reply block left")

        pid = self.nymserver.pid()
        os.kill(pid, signal.SIGKILL)
        await testnet.wait_for(reactor, self.net, "the nymserver to die",
                               lambda: defer.succeed(self.nymserver.pid() is None or None),
                               10, 0.2)
        testnet.start(self.nymserver)
        await testnet.started(reactor, self.net, [self.nymserver])
        self.note("nymserver killed and started again")

        await threads.deferToThread(self.client, "nym", "add-surbs", NYM, "--surbs", "3")
        await self.wait_decoded("the waiting mail after add-surbs", "Second mail from carol.")
        # (the answer leaves first, but packets are mixed: either may arrive first)
        decoded = await self.wait_decoded("the answer to add-surbs", "request 3 done")
        self.note("the mail that waited arrived")

        before = await self.ignored_requests()
        messages = decoded.count("==== message")
        key = self.nym_key()
        replayed = build_request(key, NYM, Command.STATUS, 2)
        forged = build_request(Ed25519PrivateKey.generate(), NYM, Command.STATUS, 99)
        for request in (replayed, forged):
            await threads.deferToThread(self.raw_request, request)

        async def refused() -> Optional[bool]:
            return True if await self.ignored_requests() >= before + 2 else None
        await testnet.wait_for(reactor, self.net, "both requests refused", refused, WAIT, 1.0)

        def said() -> Optional[bool]:
            with open(self.nymserver.log, encoding="utf-8", errors="replace") as f:
                counts = re.findall(r"NYM: (\d+) request\(s\) refused without an answer", f.read())
            return True if sum(map(int, counts)) >= 2 else None
        await testnet.wait_for(reactor, self.net, "the refusals said in the log",
                               lambda: defer.succeed(said()), 30, 1.0)
        with open(self.nymserver.log, encoding="utf-8", errors="replace") as f:
            self.assertNotIn(NYM, f.read(), "no nym's name in the log")
        await testnet.sleep(reactor, 3)
        self.assertEqual((await self.decoded()).count("==== message"), messages,
                         "a refused request spends no reply block")
        self.note("replay and forgery refused without an answer")
