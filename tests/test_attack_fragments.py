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
file.  The test shows:

1. the node's memory (VmRSS of the node and its processing child) per
   pending fragment, measured as the slope between a warm-up batch and
   the end of the attack, is far below the size of a fragment, and the
   total stays under 150 MB;
2. after a restart, with every fragment still pending on disk, memory is
   about where it started;
3. an honest fragmented message sent after the attack is reassembled (its
   fragments read back from disk) and delivered to the mbox;
4. with a small ``MaximumPendingMessages`` the oldest pending messages
   are evicted, counted (``FragmentEvicted``) and logged at WARN without
   their ids.

The default, 3,600 packets, keeps the test well under a minute here;
``MIXMINION_FRAGMENT_ATTACK=9000`` runs the issue's full figure (about 80
s).  Measured on this 2-core machine (node and processing child, VmRSS):

* before the fix, 9,000 packets: 90.9 MB at start, 102.2 MB after 200,
  355.9 MB after 9,000 -- 29.5 KB per pending fragment (the default run
  fails its slope check at 29.4 KB); a restart read every fragment back
  (the old store's ``load`` of those 9,000: +260 MB);
* after: 91.3 MB at start, 97.5 MB after 400, 106.0 MB after 9,000 (peak
  106.1) -- 1.0 KB per pending fragment, the metadata and allocator noise;
  95.7 MB after a restart with the 9,000 still pending.
"""

from __future__ import annotations

import os
import re
import signal
import time
from typing import Any

from twisted.internet import defer, threads
from twisted.internet import reactor as _reactor
from twisted.trial import unittest

from mixminion.codec.build import build_forward_packet, build_message_packets
from mixminion.codec.header import Hop
from mixminion.codec.payload import encode_fragment, fragment_capacity
from mixminion.codec.routing import FRAGMENT_TYPE, MBOX_TYPE, HostInfo
from mixminion.directory.descriptor import parse_descriptor
from mixminion.mmtp.initiator import Destination, MMTPClient
from mixminion.testing.processes import Daemon, family_rss_mb, free_ports, metric, node_config

reactor: Any = _reactor

ATTACK = int(os.environ.get("MIXMINION_FRAGMENT_ATTACK", "3600"))
#: fragments sent before the baseline is taken (allocator, SQLite cache, queues warmed up)
WARM_UP = 400
#: sent at once on one client; the next batch waits for the node to store these
BATCH = 400
RSS_LIMIT_MB = 150
#: the most memory a pending fragment may cost the node (a fragment is 28,625 bytes)
SLOPE_LIMIT_KB = 4.0
#: a three-fragment message: L just over one fragment
MESSAGE_LENGTH = 40000
#: 60 KB of text in short lines (delivered as text, not base64): three fragments
HONEST_BODY = b"".join(os.urandom(32).hex().encode() + b"\n" for _ in range(930))


def attack_packets(hop: Hop, count: int) -> list[bytes]:
    """``count`` packets, each fragment 0 of a new three-fragment message."""
    data_len = fragment_capacity(0)
    return [build_forward_packet(encode_fragment(0, os.urandom(20), MESSAGE_LENGTH, os.urandom(data_len)),
                                 [hop], [hop], FRAGMENT_TYPE, b"", os.urandom).packet
            for _ in range(count)]


class ExitNode:
    def __init__(self, test: "FragmentFlood", name: str, fragmented: str = "") -> None:
        self.test = test
        self.dir = os.path.join(test.dir, name)
        os.makedirs(self.dir)
        self.base = os.path.join(self.dir, "base")
        self.mbox = os.path.join(self.dir, "delivered.mbox")
        self.port, self.metrics_port = free_ports(2)
        addresses = os.path.join(self.dir, "addresses")
        with open(addresses, "w") as f:
            f.write("alice: alice@localhost.localdomain\n")
        extra = (f"[Delivery/MBOX]\nEnabled: yes\nAddressFile: {addresses}\n"
                 f"RemoveContact: remove@localhost.localdomain\nReturnAddress: exit@localhost.localdomain\n"
                 f"MboxFile: {self.mbox}\n\n"
                 f"[Delivery/Fragmented]\nEnabled: yes\nMaximumSize: 100 KB\n{fragmented}\n")
        self.conf = os.path.join(self.dir, "node.conf")
        with open(self.conf, "w") as f:
            f.write(node_config(self.base, self.port, nickname=name,
                                server=f"MetricsPort: {self.metrics_port}", extra=extra))
        self.daemon = Daemon(self.dir, ["mixminion", "-c", self.conf], name=name)
        self.name = name
        test.addCleanup(self.daemon.kill)

    async def start(self, starts: int = 1) -> None:
        self.daemon.start()
        await self.daemon.wait_for_line(reactor, f"Mix node {self.name} started", count=starts,
                                        timeout=60)

    def hop(self) -> Hop:
        with open(os.path.join(self.base, "keys", "key_0001", "ServerDesc")) as f:
            desc = parse_descriptor(f.read(), time.time())
        self.identity = desc.identity_digest
        return Hop(desc.packet_key, HostInfo.parse(desc.routing_info))

    async def send(self, packets: list[bytes]) -> None:
        client = MMTPClient(reactor)
        try:
            destination = Destination("127.0.0.1", self.port, self.identity)
            results = await defer.DeferredList([client.send_packet(destination, p) for p in packets],
                                               consumeErrors=True)
        finally:
            await client.close()
        failed = [value for ok, value in results if not ok]
        self.test.assertEqual(failed, [], f"{len(failed)} packets refused")

    def counted(self, event: str) -> int:
        return metric(self.metrics_port, event)

    async def wait_counted(self, event: str, at_least: int, timeout: float) -> None:
        await self.daemon.wait_for(reactor, f"{event} >= {at_least}",
                                   lambda: self.counted(event) >= at_least, timeout=timeout,
                                   interval=0.5)

    def rss_mb(self) -> float:
        return family_rss_mb(self.daemon.pid)


class FragmentFlood(unittest.TestCase):
    timeout = 900

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def note(self, text: str) -> None:
        print(f"[fragment flood] {text}", flush=True)

    def test_pending_fragments_do_not_stay_in_memory(self) -> defer.Deferred:
        return defer.ensureDeferred(self._flood())

    async def _flood(self) -> None:
        node = ExitNode(self, "exit")
        await node.start()
        hop = node.hop()
        started = time.monotonic()
        packets = await threads.deferToThread(attack_packets, hop, ATTACK)
        self.note(f"built {ATTACK} packets in {time.monotonic() - started:.1f} s; "
                  f"node at {node.rss_mb():.1f} MB")

        sent = 0
        samples: list[tuple[int, float]] = []
        for size in [WARM_UP] + [BATCH] * ((ATTACK - WARM_UP) // BATCH) + [(ATTACK - WARM_UP) % BATCH]:
            if not size:
                continue
            await node.send(packets[sent:sent + size])
            sent += size
            await node.wait_counted("FragmentStored", sent, timeout=120)
            samples.append((sent, node.rss_mb()))
            self.note(f"{sent} fragments pending: {samples[-1][1]:.1f} MB")
        del packets
        (n0, m0), (n1, m1) = samples[0], samples[-1]
        slope_kb = (m1 - m0) * 1024 / (n1 - n0)
        peak = max(m for _, m in samples)
        self.note(f"{ATTACK} pending fragments in {time.monotonic() - started:.1f} s: "
                  f"{m0:.1f} MB -> {m1:.1f} MB (peak {peak:.1f}), {slope_kb:.2f} KB per fragment")
        self.assertEqual(node.counted("FragmentEvicted"), 0)
        self.assertLess(slope_kb, SLOPE_LIMIT_KB)
        self.assertLess(peak, RSS_LIMIT_MB)

        # A restart reads back what is pending: the metadata only.
        self.assertEqual(await node.daemon.stop(reactor), -signal.SIGTERM)
        await node.start(starts=2)
        await node.daemon.wait_for_line(reactor, f"{ATTACK} partial messages", timeout=60)
        restarted = node.rss_mb()
        self.note(f"after a restart with {ATTACK} pending: {restarted:.1f} MB")
        self.assertLess(restarted, m0 + ATTACK * SLOPE_LIMIT_KB / 1024)

        # An honest fragmented message still gets through, reassembled from disk.
        honest = [b.packet for b in build_message_packets(HONEST_BODY, MBOX_TYPE, b"alice",
                                                          lambda i: ([hop], [hop]), os.urandom)]
        self.assertGreater(len(honest), 1)
        await node.send(honest)
        await node.wait_counted("ExitDelivered:MBOX", 1, timeout=60)
        with open(node.mbox, "rb") as f:
            self.assertTrue(HONEST_BODY in f.read(), "the honest message is not in the mbox")
        self.assertEqual(node.counted("FragmentCompleted"), 1)
        await node.daemon.stop(reactor)

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
