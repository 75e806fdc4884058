"""Issue 12 point 3 on a real ``twistd mixminion`` exit: fragments of
messages that never complete, each with a new random message id.

The node reassembles (``[Delivery/Fragmented]``) and delivers to a local
mbox file (``[Delivery/MBOX] MboxFile``).  Every attack packet is a valid
forward packet built from the node's own descriptor (both legs through
the node, exit type FRAGMENT, empty routing info), whose payload is
fragment 0 of a three-fragment message with a random id: the exit must
keep it, since the two others could still come.

Before the fix every pending fragment was held in memory (about 29 KB
each, and all of them read back at a restart): the node's resident memory
grew with each one.  Now only a few hundred bytes of metadata per pending
message stay in memory and the fragments wait in the module's SQLite
file.

The flood itself runs once in the suite, at the issue's 9,000 packets:
``tests/test_attacks.py`` (``test_exit_under_fragment_flood_stays_small``,
with this module's node and packets) shows that

1. the node's memory (VmRSS of the node and its processing child) per
   pending fragment, measured as the slope between a warm-up batch and
   the end of the attack, is far below the size of a fragment, and the
   total stays under 150 MB;
2. after a restart, with every fragment still pending on disk, memory is
   about where it started;
3. an honest fragmented message sent after the attack is reassembled (its
   fragments read back from disk) and delivered to the mbox.

This module shows the last point:

4. with a small ``MaximumPendingMessages`` the oldest pending messages
   are evicted, counted (``FragmentEvicted``) and logged at WARN without
   their ids.

Measured on this 2-core machine (node and processing child, VmRSS):

* before the fix, 9,000 packets: 90.9 MB at start, 102.2 MB after 200,
  355.9 MB after 9,000 -- 29.5 KB per pending fragment (a 3,600-packet
  run failed its slope check at 29.4 KB); a restart read every fragment back
  (the old store's ``load`` of those 9,000: +260 MB);
* after: 91.3 MB at start, 97.5 MB after 400, 106.0 MB after 9,000 (peak
  106.1) -- 1.0 KB per pending fragment, the metadata and allocator noise;
  95.7 MB after a restart with the 9,000 still pending.
"""

from __future__ import annotations

#: measures time, memory or load: scripts/test.sh runs it alone, after the others
TIMED = True

import os
import re
from typing import Any

from twisted.internet import defer, threads
from twisted.internet import reactor as _reactor
from twisted.trial import unittest

from mixminion.codec.build import build_forward_packet
from mixminion.codec.header import Hop
from mixminion.codec.payload import encode_fragment, fragment_capacity
from mixminion.codec.routing import FRAGMENT_TYPE
from mixminion.testing.processes import MixNode

reactor: Any = _reactor

#: a three-fragment message: L just over one fragment
MESSAGE_LENGTH = 40000


def attack_packets(hop: Hop, count: int) -> list[bytes]:
    """``count`` packets, each fragment 0 of a new three-fragment message."""
    data_len = fragment_capacity(0)
    return [build_forward_packet(encode_fragment(0, os.urandom(20), MESSAGE_LENGTH, os.urandom(data_len)),
                                 [hop], [hop], FRAGMENT_TYPE, b"", os.urandom).packet
            for _ in range(count)]


class ExitNode(MixNode):
    """A node of ``test`` that reassembles fragmented messages
    (``fragmented`` added to its ``[Delivery/Fragmented]``) and delivers
    them to its own mbox file for ``alice``."""

    def __init__(self, test: unittest.TestCase, name: str, fragmented: str = "") -> None:
        super().__init__(test, name)
        self.mbox = os.path.join(self.dir, "delivered.mbox")
        addresses = os.path.join(self.dir, "addresses")
        with open(addresses, "w") as f:
            f.write("alice: alice@localhost.localdomain\n")
        extra = (f"[Delivery/MBOX]\nEnabled: yes\nAddressFile: {addresses}\n"
                 f"RemoveContact: remove@localhost.localdomain\nReturnAddress: exit@localhost.localdomain\n"
                 f"MboxFile: {self.mbox}\n\n"
                 f"[Delivery/Fragmented]\nEnabled: yes\nMaximumSize: 100 KB\n{fragmented}\n")
        self.write(self.config(metrics=True, extra=extra))


class FragmentFlood(unittest.TestCase):
    timeout = 900

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def test_oldest_pending_messages_are_evicted(self) -> defer.Deferred:
        return defer.ensureDeferred(self._evicted())

    async def _evicted(self) -> None:
        node = ExitNode(self, "small", fragmented="MaximumPendingMessages: 40\n")
        await node.start()
        hop = node.hop()
        packets = await threads.deferToThread(attack_packets, hop, 100)
        await node.send(packets)
        await node.wait_counted("FragmentStored", 100, timeout=60)
        await node.wait_counted("FragmentEvicted", 60, timeout=10)
        self.assertEqual(node.counted("FragmentEvicted"), 60)
        await node.daemon.wait_for(reactor, "the eviction warnings",
                                   lambda: evicted_in_log(node.daemon.text()) == 60, timeout=30)
        lines = [line for line in node.daemon.text().splitlines() if "Evicted" in line]
        for line in lines:
            self.assertIn("#warn]", line)
            self.assertIsNone(re.search(r"[0-9a-f]{16}", line.split("]", 1)[1]), line)  # no message id
        await node.daemon.stop(reactor)


def evicted_in_log(text: str) -> int:
    """Evictions reported by the WARN lines (one per flush that followed some)."""
    return sum(int(n) for n in re.findall(r"Evicted (\d+) pending fragmented messages", text))
