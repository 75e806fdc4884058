"""``tap-example.conf``, the smallest working configuration, run the way its
comment says: ``twistd -n mixminion -c tap-example.conf``.

It must need nothing beside a checkout: a relative ``BaseDir`` (read from
the configuration file's folder, wherever twistd is started) and no mail
server (MBOX appends to a local file).  The test runs a copy of the file,
with ``etc/mbox-addresses.example`` beside it as in a checkout, changing
only the port (a free one) and the mix interval (one second instead of a
minute, so that the message comes out at once), from another folder; it
sends a message to the example's mailbox ``alice`` and finds it in the
mbox file, then stops the node.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.trial import unittest

from mixminion.codec.build import build_message_packets
from mixminion.codec.routing import MBOX_TYPE
from mixminion.server.config import load_config
from mixminion.testing.processes import MixNode, read_text

#: the global reactor (untyped: its interfaces are spread over many zope ones)
reactor: Any = _reactor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "tap-example.conf")
ADDRESSES = os.path.join("etc", "mbox-addresses.example")


def with_value(text: str, key: str, value: str) -> str:
    """``text`` with its one ``KEY: ...`` line set to ``value``."""
    changed, count = re.subn(rf"^{re.escape(key)}:.*$", f"{key}: {value}", text, flags=re.M)
    assert count == 1, f"{count} lines {key}: in {EXAMPLE}"
    return changed


class TapExampleTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def test_paths_are_beside_the_file(self) -> None:
        """The file as shipped: its folder holds BaseDir and the mbox file,
        and no exit hands mail to an MTA."""
        config = load_config(EXAMPLE)
        base = os.path.join(REPO, "tap-base")
        self.assertEqual(config.server.base_dir, base)
        self.assertEqual(config.get("Delivery/MBOX", "AddressFile"),
                         os.path.join(REPO, ADDRESSES))
        self.assertEqual(config.get("Delivery/MBOX", "MboxFile"), os.path.join(base, "mail.mbox"))
        self.assertIsNone(config.get("Delivery/MBOX", "SMTPServer"))
        self.assertIsNone(config.delivery("SMTP"))

    def test_starts_and_delivers_without_a_mail_server(self) -> defer.Deferred:
        return defer.ensureDeferred(self._start_and_deliver())

    async def _start_and_deliver(self) -> None:
        node = MixNode(self, "tap")
        text = read_text(EXAMPLE)
        text = with_value(with_value(text, "Port", str(node.port)), "MixInterval", "1 second")
        node.write(text)
        os.makedirs(os.path.join(node.dir, "etc"))
        shutil.copy(os.path.join(REPO, ADDRESSES), os.path.join(node.dir, ADDRESSES))
        # twistd runs elsewhere (its log goes there too): BaseDir must still
        # be beside the configuration file.
        elsewhere = os.path.join(node.dir, "elsewhere")
        os.makedirs(elsewhere)
        node.daemon.directory = elsewhere
        node.base = os.path.join(node.dir, "tap-base")

        await node.start(listening=True)
        self.assertTrue(os.path.isfile(os.path.join(node.base, "keys", "identity.key")),
                        node.daemon.report())
        self.assertEqual(sorted(os.listdir(elsewhere)), ["tap.log", "tap.out"])

        body = b"Hello from tap-example.conf.\n"
        hop = node.hop()
        await node.send([built.packet for built in build_message_packets(
            body, MBOX_TYPE, b"alice", lambda i: ([hop], [hop]), os.urandom)])
        mbox = os.path.join(node.base, "mail.mbox")
        await node.daemon.wait_for(reactor, "the message in tap-base/mail.mbox",
                                   lambda: body.decode() in read_text(mbox), timeout=60)
        self.assertIn("alice@localhost.localdomain", read_text(mbox))

        self.assertEqual(await node.daemon.stop(reactor), -signal.SIGTERM)
        self.assertNotIn("Traceback", node.daemon.text())
