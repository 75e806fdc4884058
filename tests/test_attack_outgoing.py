"""Issue 12 point 1 on real ``twistd mixminion`` nodes: the outgoing
black-hole attack.

An attacker sends node A many valid packets whose next hop is each a
different ``127.x.y.z`` address at one port, where a plain TCP listener
(bound to 0.0.0.0, so it answers for every 127.0.0.0/8 address) accepts
the connection and never says a word: no TLS, no MMTP, no
acknowledgement.  Then an honest sender sends packets through A to a
second real node G, which A has relayed to before (G is a healthy next
hop).

Before the fix A handed at most 512 packets to MMTP at once, in queue
order, and its MMTP client gave the ``MaxConnections`` slots to waiting
destinations first come first served, each slot held by a black hole for
its 60 s TLS handshake deadline: the honest packets waited behind every
black hole queued before them (about an hour for 1,200 of them with 16
connections).  Now a next hop that has answered before has connection
slots and a share of the in-flight window that unproven next hops cannot
take, destinations take turns, and a connection that accepted TCP but
brought no acknowledgement within 30 s is closed and its next hop logged
as stuck (WARN, once per report interval, with counts, no address).

The test shows, with ``MaxConnections: 16`` and the attack still going
(hundreds of attack packets still queued at A):

1. every honest packet reaches G (G's ``ReceivedPacket`` counter) within
   60 s of being sent;
2. A never holds more than ``MaxConnections`` connections to the black
   hole;
3. the resident memory of A (node and processing child) stays under
   150 MB;
4. A warns about stuck next hops, naming none of their addresses.

``MIXMINION_OUTGOING_ATTACK=6000`` runs the issue's figure (slower to
build and send); the default of 1,200 keeps the test near a minute.
"""

from __future__ import annotations

#: measures time, memory or load: scripts/test.sh runs it alone, after the others
TIMED = True

import os
import time
from typing import Any

from twisted.internet import defer, threads
from twisted.internet import reactor as _reactor
from twisted.trial import unittest

from mixminion.codec.build import build_forward_packet
from mixminion.codec.header import Hop
from mixminion.codec.packet import PAYLOAD_LEN
from mixminion.codec.routing import DROP_TYPE, IPv4Info
from mixminion.testing.processes import MixNode, forward_packets, gauge, relay_and_next_hop

reactor: Any = _reactor

ATTACK = int(os.environ.get("MIXMINION_OUTGOING_ATTACK", "1200"))
HONEST = 30
MAX_CONNECTIONS = 16
#: each honest packet must reach G within this many seconds of being sent
HONEST_DEADLINE = 60.0
RSS_LIMIT_MB = 150


def attack_address(n: int) -> str:
    """The ``n``-th black-hole next hop: a different 127.x.y.z each."""
    n += 1
    return f"127.{(n >> 16) % 254 + 1}.{(n >> 8) & 255}.{n & 255 or 1}"


def attack_packets(a: MixNode, port: int, count: int) -> list[bytes]:
    """``count`` packets through A, each to a different black-hole next hop."""
    packets = []
    first = a.hop()
    for n in range(count):
        hole = Hop(a.packet_key, IPv4Info(attack_address(n), port, os.urandom(20)))
        packets.append(build_forward_packet(os.urandom(PAYLOAD_LEN), [first], [hole],
                                            DROP_TYPE, b"", os.urandom).packet)
    return packets


class OutgoingBlackHole(unittest.TestCase):
    timeout = 600

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def note(self, text: str) -> None:
        print(f"[outgoing black hole] {text}", flush=True)

    def test_honest_packets_pass_black_hole_next_hops(self) -> defer.Deferred:
        return defer.ensureDeferred(self._attack())

    async def _attack(self) -> None:
        # G is a next hop A has relayed to: one packet A -> G first.
        hole, hole_port, a, g = await relay_and_next_hop(
            self, outgoing=f"MaxConnections: {MAX_CONNECTIONS}")
        baseline = a.rss_mb()

        started = time.monotonic()
        attack = await threads.deferToThread(attack_packets, a, hole_port, ATTACK)
        honest = await threads.deferToThread(forward_packets, a, g, HONEST)
        self.note(f"built {ATTACK} attack and {HONEST} honest packets in "
                  f"{time.monotonic() - started:.1f} s; A at {baseline:.1f} MB")

        started = time.monotonic()
        await a.send(attack)
        del attack
        self.note(f"A acknowledged {ATTACK} attack packets in "
                  f"{time.monotonic() - started:.1f} s")
        # The attack is under way: A is connecting to black holes.
        await a.daemon.wait_for(reactor, "A's first connections to the black holes",
                                lambda: hole.total >= 1, timeout=60, interval=0.2)

        peak_rss = a.rss_mb()
        sent_at = time.monotonic()
        await a.send(honest)
        arrivals: list[float] = []
        deadline = sent_at + HONEST_DEADLINE
        while True:
            got = g.counted("ReceivedPacket") - 1
            now = time.monotonic()
            arrivals += [now - sent_at] * (got - len(arrivals))
            peak_rss = max(peak_rss, a.rss_mb())
            if got >= HONEST or now > deadline:
                break
            await threads.deferToThread(time.sleep, 0.25)
        queued = gauge(a.metrics_port, "queue_outgoing_packets")
        self.note(f"{len(arrivals)} of {HONEST} honest packets at G within "
                  f"{HONEST_DEADLINE:.0f} s (last after {max(arrivals, default=0):.1f} s); "
                  f"A: {queued:.0f} packets still queued, {hole.open} connections to the black "
                  f"hole now, {hole.most} at most, {hole.total} in all, {len(hole.addresses)} "
                  f"addresses; RSS {peak_rss:.1f} MB at most")
        self.assertEqual(len(arrivals), HONEST,
                         f"only {len(arrivals)} of {HONEST} honest packets reached G within "
                         f"{HONEST_DEADLINE:.0f} s")
        self.assertGreater(queued, ATTACK // 2, "the attack was still going")
        self.assertLessEqual(hole.most, MAX_CONNECTIONS)
        self.assertLess(peak_rss, RSS_LIMIT_MB)

        # Stuck next hops are reported at WARN, counted, never named.
        await a.daemon.wait_for(reactor, "the stuck next hops warning",
                                lambda: "Next hops stuck" in a.daemon.text(), timeout=60,
                                interval=0.5)
        self.note(f"A's warning after {time.monotonic() - sent_at:.1f} s: "
                  + [line for line in a.daemon.text().splitlines()
                     if "Next hops stuck" in line][0])
        warnings = [line for line in a.daemon.text().splitlines() if "Next hops stuck" in line]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("#warn]", warnings[0])
        leaked = [line for line in a.daemon.text().splitlines()
                  if any(f"{address}" in line for address in hole.addresses)]
        self.assertEqual(leaked, [], "a black hole's address was logged above debug")
        self.assertLessEqual(hole.most, MAX_CONNECTIONS)
        self.assertGreater(a.counted("FailedRelay"), 0)
        self.assertEqual(g.counted("ReceivedPacket"), 1 + HONEST)
        await a.daemon.stop(reactor)
        await g.daemon.stop(reactor)
