"""The client's link to its first hop, through ``mixminion-client`` itself.

The first hop is a test peer over real loopback TLS that poses as an
original 0.0.8 server (TLS 1.0 only, a 1024-bit link key): refused by
default, accepted with ``--legacy`` or ``[Network] Legacy: yes``, accepted
automatically when the hop's descriptor names the original software; and
``ping`` (an MMTP handshake with one JUNK frame) says up or down, why, and
whether the identity key matched the descriptor.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet import threads
from twisted.trial import unittest

from mixminion.codec.process import Exit
from mixminion.test.test_client_cli import (
    Env,
    descriptor,
    inline,
    key,
    processors,
    route,
    standard_servers,
)
from mixminion.testing.tlspeer import TLSPeer

ORIGINAL = "Mixminion 0.0.8alpha3"


class LinkPolicyTests(unittest.TestCase):

    def setUp(self) -> None:
        self.peer = TLSPeer(key("Alpha"), link_bits=1024, original=True, nickname="Alpha")
        self.addCleanup(self.peer.close)

    def env(self, software: Optional[str] = None, extra: str = "") -> Env:
        others = [d for d in standard_servers() if d.nickname != "Alpha"]
        return Env(self, [descriptor("Alpha", port=self.peer.port, software=software)] + others, extra=extra)

    async def send(self, env: Env, *more: str) -> tuple[int, bytes, str]:
        return await env.run("send", "-t", "bob@example.org", "-i", env.write("m", b"hi\n"),
                             "-P", "Alpha,Beta", "-D", "no", *more)

    async def delivered(self) -> Exit:
        await threads.deferToThread(self.peer.join)
        (packet,) = self.peer.records[0].packets
        seen, exit_ = route(packet, key("Alpha").public.keyid, processors())
        self.assertEqual(seen, ["Alpha", "Beta"])
        return exit_

    @inline
    async def test_refused_by_default(self) -> None:
        env = self.env()
        status, out, err = await self.send(env)
        self.assertEqual(status, 0, err)
        self.assertIn("Could not deliver to Alpha: TLS failed", err)
        self.assertEqual(len(env.queued()), 1)

    @inline
    async def test_a_modern_hop_with_a_short_link_key_is_refused(self) -> None:
        """The key-size rule, not just the TLS version, holds by default."""
        self.peer.close()
        self.peer = TLSPeer(key("Alpha"), link_bits=1024, nickname="Alpha")
        self.addCleanup(self.peer.close)
        env = self.env()
        status, _, err = await self.send(env)
        self.assertEqual(status, 0, err)
        self.assertIn("Could not deliver to Alpha: the link key is shorter than 2048 bits", err)
        self.assertEqual(len(env.queued()), 1)

    @inline
    async def test_accepted_with_the_option(self) -> None:
        env = self.env()
        status, out, err = await self.send(env, "--legacy")
        self.assertEqual(status, 0, err)
        self.assertIn(b"Sent 1 packet", out)
        self.assertEqual(env.queued(), [])
        self.assertEqual((await self.delivered()).address, b"bob@example.org")

    @inline
    async def test_accepted_with_the_configuration_option(self) -> None:
        env = self.env(extra="Legacy: yes\n")
        status, out, err = await self.send(env)
        self.assertEqual(status, 0, err)
        self.assertIn(b"Sent 1 packet", out)
        await self.delivered()

    @inline
    async def test_accepted_for_a_descriptor_naming_the_original_software(self) -> None:
        env = self.env(software=ORIGINAL)
        status, out, err = await self.send(env)
        self.assertEqual(status, 0, err)
        self.assertIn(b"Sent 1 packet", out)
        await self.delivered()

    @inline
    async def test_flush_keeps_the_policy_of_the_queued_packet(self) -> None:
        env = self.env(software=ORIGINAL)
        status, out, err = await self.send(env, "--queue")
        self.assertEqual(status, 0, err)
        status, out, err = await env.run("flush")
        self.assertEqual(status, 0, err)
        self.assertIn(b"Queue flushed", out)
        await self.delivered()


class PingTests(unittest.TestCase):
    """``mixminion-client ping`` against live test peers."""

    def peer(self, identity: str = "Alpha", **kw: object) -> TLSPeer:
        peer = TLSPeer(key(identity), nickname="Alpha", **kw)  # type: ignore[arg-type]
        self.addCleanup(peer.close)
        return peer

    def env(self, port: int, software: Optional[str] = None) -> Env:
        others = [d for d in standard_servers() if d.nickname != "Alpha"]
        return Env(self, [descriptor("Alpha", port=port, software=software)] + others)

    @inline
    async def test_up_and_identity_checked(self) -> None:
        peer = self.peer()
        status, out, err = await self.env(peer.port).run("ping", "Alpha", "-D", "no")
        self.assertEqual((status, out), (0, b">>> Server seems to be running\nAlpha is up\n"))
        self.assertIn("Pinging a server tells", err)
        await threads.deferToThread(peer.join)
        self.assertEqual(peer.records[0].junk, 1)
        self.assertEqual(peer.records[0].ending, "close_notify")

    @inline
    async def test_wrong_key(self) -> None:
        peer = self.peer(identity="Impostor")
        status, out, _ = await self.env(peer.port).run("ping", "Alpha", "-D", "no")
        self.assertEqual(status, 1)
        self.assertEqual(out, b">>> Server seems to be running, but its key is wrong!\n"
                              b"Alpha is down\n")
        self.assertEqual(peer.records and peer.records[0].junk, 0)

    @inline
    async def test_down_with_the_reason(self) -> None:
        peer = self.peer(connections=0)
        await threads.deferToThread(peer.join)
        status, out, _ = await self.env(peer.port).run("ping", "Alpha", "-D", "no")
        self.assertEqual(status, 1)
        self.assertEqual(out, b">>> Couldn't connect to server: Connection refused\n"
                              b"Alpha is down\n")

    @inline
    async def test_host_and_port_without_identity_check(self) -> None:
        peer = self.peer(identity="Anybody")
        status, out, _ = await Env(self).run("ping", f"127.0.0.1:{peer.port}")
        self.assertEqual(status, 0)
        self.assertEqual(out.decode(), ">>> Server seems to be running (its identity was not "
                         f"checked: no descriptor)\n127.0.0.1:{peer.port} is up\n")

    @inline
    async def test_original_server_by_descriptor(self) -> None:
        peer = self.peer(link_bits=1024, original=True)
        status, out, _ = await self.env(peer.port, ORIGINAL).run("ping", "Alpha", "-D", "no")
        self.assertEqual((status, out), (0, b">>> Server seems to be running\nAlpha is up\n"))

    @inline
    async def test_wrong_arguments(self) -> None:
        env = Env(self)
        for argv in (["ping"], ["ping", "127.0.0.1:port"], ["ping", "x.example:70000"]):
            status, _, err = await env.run(*argv)
            self.assertEqual(status, 2, (argv, err))
            self.assertEqual(len(err.strip().splitlines()), 1, (argv, err))
            self.assertIn("mixminion-client ping", err)
        status, _, err = await env.run("ping", "Nobody", "-D", "no")
        self.assertEqual(status, 1)
        self.assertEqual(len([ln for ln in err.splitlines() if "[ERROR]" in ln]), 1, err)

    @inline
    async def test_help(self) -> None:
        status, out, _ = await Env(self).run("ping", "--help")
        self.assertEqual(status, 0)
        self.assertIn(b"host[:port]", out)
