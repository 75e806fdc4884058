"""An exit whose mail server hangs (issue 12 point 6): the node opens at
most ``MaxSMTPConnections`` sessions to it, and mail for another module
keeps flowing meanwhile.

Before the fix the node opened one session per queued message (about
1,100 at once in the attack campaign), and a delivery round waited for the
slowest, so MBOX mail waited behind SMTP sessions hanging until their
300 s timeout.
"""

from __future__ import annotations

#: measures time, memory or load: scripts/test.sh runs it alone, after the others
TIMED = True

import os

from twisted.internet import defer
from twisted.internet import reactor as _reactor

from mixminion.codec.build import build_message_packets
from mixminion.codec.routing import MBOX_TYPE, SMTP_TYPE
from mixminion.testing.processes import BlackHole, MixNode, read_text
from tests.test_node_options import NodeTestCase

reactor: object = _reactor


class HungMTATests(NodeTestCase):
    def test_sessions_are_bounded_and_mbox_mail_still_goes(self) -> defer.Deferred:
        return defer.ensureDeferred(self._hung_mta())

    async def _hung_mta(self) -> None:
        hole = BlackHole()
        listening = _reactor.listenTCP(0, hole, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.addCleanup(hole.close_all)
        aliases = os.path.join(self.dir, "aliases")
        with open(aliases, "w") as f:
            f.write("alice: alice@example.org\n")
        mbox = os.path.join(self.dir, "alice.mbox")
        node = MixNode(self)
        await node.start(node.config(extra=(
            f"[Delivery/SMTP]\nEnabled: yes\nReturnAddress: exit@example.org\n"
            f"SMTPServer: 127.0.0.1\nSMTPPort: {listening.getHost().port}\n"
            f"MaxSMTPConnections: 3\n"
            f"[Delivery/MBOX]\nEnabled: yes\nReturnAddress: exit@example.org\n"
            f"RemoveContact: exit@example.org\nAddressFile: {aliases}\nMboxFile: {mbox}\n")))
        hop = node.hop()

        def packets(exit_type: int, address: bytes, body: bytes) -> list[bytes]:
            return [b.packet for b in build_message_packets(
                body, exit_type, address, lambda i: ([hop], [hop]), os.urandom)]

        smtp = [p for i in range(30)
                for p in packets(SMTP_TYPE, f"user{i}@example.com".encode(), b"to smtp\n")]
        self.assertEqual(await node.send_all(smtp), [None] * len(smtp))
        await node.daemon.wait_for(reactor, "the first sessions to the hung MTA",
                                   lambda: hole.total >= 3)
        mail = [p for i in range(5) for p in packets(MBOX_TYPE, b"alice", f"note {i}\n".encode())]
        self.assertEqual(await node.send_all(mail), [None] * len(mail))
        await node.daemon.wait_for(
            reactor, "the five MBOX messages",
            lambda: all(f"note {i}" in read_text(mbox) for i in range(5)), timeout=60)
        self.assertLessEqual(hole.most, 3)
        self.assertEqual(hole.open, 3)
