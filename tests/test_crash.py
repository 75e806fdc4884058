"""Crash safety of one mix node run as a real process (issue 4).

The node under test runs as ``twistd -n mixminion`` with the Timed pool
and a one-second mix interval.  Its only next hop is an MMTP responder in
this process whose sink records what it receives.  Packets are built with
path 1 = [node] and path 2 = [next hop], so the node decrypts each one
with its packet key, swaps the headers and relays the result.

While the packets stream in (an :class:`MMTPClient` that resends every
packet whose Deferred failed), the node is killed with SIGKILL several
times at seeded random moments and restarted on the same BaseDir: half of
the kills while packets are being acknowledged (hundreds in flight), the
others while the node processes and relays its backlog, one while it is
starting up; one more restart is a clean SIGTERM.  At the end:

* every packet was acknowledged, and every acknowledged packet reached the
  next hop, byte for byte what the node's packet key makes of it (the test
  reads the key after the first start and computes each output itself);
* nothing reached the next hop that was not sent; the next hop opens every
  packet with its own packet key, and after its replay filter each input
  arrived exactly once, never as two different packets; a packet arrived
  twice only when the node was killed in between (its RECEIVED to the
  node was lost with the process);
* after a quiet period and a clean stop, the node's queues are empty and
  its replay log holds one entry per packet.

The kill schedule comes from ``MIXMINION_CRASH_SEED`` (default 4), the
number of SIGKILLs from ``MIXMINION_CRASH_KILLS`` (default 8) and the
number of packets from ``MIXMINION_CRASH_PACKETS`` (default 2000).  Every
kill, restart and count is written to ``crash.log`` in the test's
temporary directory, and the node's own logs are ``node-N.log`` beside it.
"""

from __future__ import annotations

#: checks what survives, not how fast, so it runs beside the other process
#: tests; about how many seconds it takes (scripts/test.sh starts the longest first)
SLOW = 55

import hashlib
import os
import signal
import random
import sqlite3
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from twisted.internet import defer, reactor
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from mixminion.codec.build import build_forward_packet
from mixminion.codec.header import Hop
from mixminion.codec.packet import PAYLOAD_LEN
from mixminion.codec.process import Exit, PacketProcessor, Relay, replay_value
from mixminion.codec.replay import MemoryReplayLog, ReplayLog
from mixminion.codec.routing import FRAGMENT_TYPE, IPv4Info
from mixminion.codec.rsa import PrivateKey
from mixminion.mmtp.initiator import NextHop, MMTPClient
from mixminion.mmtp.interfaces import IPacketSink
from mixminion.mmtp.responder import responder_factory
from mixminion.mmtp.tls import ResponderTLS
from mixminion.procinfo import child_pids
from mixminion.server.keys import read_pem_key
from mixminion.testing.processes import (
    Daemon,
    free_ports,
    node_config,
    port_open,
    sleep,
    wait_until,
)

N_PACKETS = int(os.environ.get("MIXMINION_CRASH_PACKETS", "2000"))
SEED = int(os.environ.get("MIXMINION_CRASH_SEED", "4"))
KILLS = int(os.environ.get("MIXMINION_CRASH_KILLS", "8"))  # SIGKILLs, plus one SIGTERM
MIX_INTERVAL = 1  # seconds; the configuration's interval has whole seconds
WINDOW = 300  # packets the client keeps outstanding at once
RETRY_DELAY = 0.25  # before a failed packet is offered again
STALL_LIMIT = 30.0  # seconds without progress: the node is stuck or lost packets
FINAL_WAIT = 60.0  # after the last restart, for every packet to reach the next hop
START_LIMIT = 30.0  # for a node to listen after it was started


def sha1(data: bytes) -> bytes:
    return hashlib.sha1(data).digest()


# --------------------------------------------------------------- the next hop


@dataclass
class Arrival:
    """One packet as the next hop received it."""

    digest: bytes
    life: int  # which run of the node was current when it arrived
    index: Optional[int]  # input whose expected output it is (None: no input's)
    replay: bool  # refused by the next hop's replay filter


class NoReplayLog(ReplayLog):
    """Sees nothing: the next hop opens every copy, and filters replays
    itself, so that it learns which input even a refused copy came from."""

    def seen_or_add(self, entry: bytes) -> bool:
        return False

    def close(self) -> None:
        pass


@implementer(IPacketSink)
class NextHopSink:
    """Records every packet, opens it with the next hop's packet key and runs
    it through the next hop's replay filter: what a real next hop would
    accept is what counts."""

    def __init__(self, packet_key: PrivateKey, current_life: Callable[[], int]) -> None:
        self.processor = PacketProcessor([(packet_key, NoReplayLog())])
        self.replay_log = MemoryReplayLog()
        self.current_life = current_life
        self.expected: dict[bytes, int] = {}  # digest of the node's output -> input
        self.arrivals: list[Arrival] = []
        self.accepted: dict[int, int] = {}  # input -> copies past the replay filter
        self.outputs: dict[int, set[bytes]] = {}  # input -> distinct packets carrying it
        self.problems: list[str] = []

    def receivePacket(self, packet: bytes, peer: str) -> defer.Deferred:  # noqa: N802
        digest = sha1(packet)
        index = self.expected.get(digest)
        result = self.processor.process(packet)
        replay = False
        if not isinstance(result, Exit):
            self.problems.append(f"next hop could not open a packet: {result!r:.120}")
        else:
            opened = int.from_bytes(result.payload[:4], "big")
            if index is not None and opened != index:
                self.problems.append(f"packet for input {index} carries input {opened}")
            self.outputs.setdefault(opened, set()).add(digest)
            replay = self.replay_log.seen_or_add(replay_value(result.subheader.secret))
            if not replay:
                self.accepted[opened] = self.accepted.get(opened, 0) + 1
        self.arrivals.append(Arrival(digest, self.current_life(), index, replay))
        return defer.succeed(None)

    def distinct(self) -> int:
        return len(self.accepted)


# -------------------------------------------------------------- the client side


@dataclass
class Sender:
    """Streams packets to the node and offers every failed one again until
    the node answers RECEIVED."""

    client: MMTPClient
    dest: NextHop
    packets: list[bytes]
    pending: deque = field(default_factory=deque)
    outstanding: set = field(default_factory=set)
    acked: set = field(default_factory=set)
    failures: int = 0
    _retry_call: object = None

    def start(self) -> None:
        self.pending.extend(range(len(self.packets)))
        self.pump()

    def pump(self) -> None:
        while self.pending and len(self.outstanding) < WINDOW:
            index = self.pending.popleft()
            self.outstanding.add(index)
            d = self.client.send_packet(self.dest, self.packets[index])
            d.addCallbacks(self._received, self._failed, callbackArgs=(index,),
                           errbackArgs=(index,))

    def _received(self, _result: object, index: int) -> None:
        self.outstanding.discard(index)
        self.acked.add(index)
        self.pump()

    def _failed(self, _failure: Failure, index: int) -> None:
        self.outstanding.discard(index)
        self.failures += 1
        self.pending.append(index)
        if self._retry_call is None:
            self._retry_call = reactor.callLater(RETRY_DELAY, self._retry)

    def _retry(self) -> None:
        self._retry_call = None
        self.pump()

    def stop(self) -> None:
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self.pending.clear()


# ------------------------------------------------------------------------ the test


class CrashTest(unittest.TestCase):
    timeout = 400
    #: packets sent, and SIGKILLs among them
    packets = N_PACKETS
    kills = KILLS
    #: ``[Server] ProcessingWorkers`` of every run of the node
    workers = 1
    #: ... except the last, which runs with this many (None: the same)
    last_workers: Optional[int] = None

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.base = os.path.join(self.dir, "base")
        [self.port] = free_ports(1)
        self.conf = os.path.join(self.dir, "node.conf")
        self.configure(self.workers)
        self.rng = random.Random(SEED)
        self.lines: list[str] = []
        self.t0 = time.monotonic()
        #: the node's current run (``node-N.log`` and ``node-N.out`` for run N)
        self.node: Optional[Daemon] = None
        self.lives = 0
        self.addCleanup(self._kill_leftover)

    # --- diagnostics -----------------------------------------------------------

    def note(self, text: str) -> None:
        line = f"{time.monotonic() - self.t0:7.2f}s {text}"
        self.lines.append(line)
        with open(os.path.join(self.dir, "crash.log"), "a") as f:
            f.write(line + "\n")

    def diagnosis(self) -> str:
        last = self.node.report(30) if self.node is not None else ""
        return "\n".join(self.lines[-60:]) + f"\n(last run of the node)\n{last}"

    def configure(self, workers: int) -> None:
        with open(self.conf, "w") as f:
            f.write(node_config(self.base, self.port, nickname="crashtest",
                                contact="crash@localhost.localdomain",
                                mix_interval=f"{MIX_INTERVAL} seconds",
                                server=f"ProcessingWorkers: {workers}"))

    def _kill_leftover(self) -> None:
        if self.node is not None:
            self.node.kill()

    # --- the node's lives --------------------------------------------------------

    def spawn(self) -> Daemon:
        """Start the node's next run."""
        node = Daemon(self.dir, ["mixminion", "-c", self.conf], name=f"node-{self.lives}")
        node.start()
        self.node = node
        self.lives += 1
        self.note(f"start #{self.lives - 1} (pid {node.pid})")
        return node

    async def wait_listening(self, node: Daemon) -> None:
        await wait_until(reactor, f"{node.name} to listen",
                         lambda: port_open(reactor, self.port, 1), START_LIMIT, 0.05,
                         watch=[node], report=lambda _: self.diagnosis(),
                         error=self.failureException)

    async def kill(self, why: str) -> None:
        node = self.node
        assert node is not None
        if not node.alive():
            self.fail(f"{node.name} died by itself\n{self.diagnosis()}")
        hop = self.hop
        self.note(f"SIGKILL {node.name} ({why}): acked {len(self.sender.acked)}, "
                  f"in flight {len(self.sender.outstanding)}, next hop {len(hop.arrivals)} "
                  f"arrivals / {hop.distinct()} distinct")
        # Every other time the processing child dies too, as in a power
        # cut; otherwise it outlives the node by a batch at most.
        children = child_pids(node.pid) if (self.lives - 1) % 2 else []
        node.kill()
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if children:
            self.note(f"  and its processing child {children}")

    async def stop_cleanly(self, why: str) -> None:
        """SIGTERM, and the node must be gone within 30 s."""
        node = self.node
        assert node is not None
        self.note(f"SIGTERM {node.name} ({why}): acked {len(self.sender.acked)}, "
                  f"in flight {len(self.sender.outstanding)}, next hop "
                  f"{len(self.hop.arrivals)} arrivals / {self.hop.distinct()} distinct")
        status = await node.stop(reactor, 30, strict=False)
        clean = status != -signal.SIGKILL
        self.note(f"{node.name} stopped: exit status {status}")
        self.assertTrue(clean, f"node did not stop within 30 s of SIGTERM\n{self.diagnosis()}")

    # --- the run -------------------------------------------------------------------

    def progress(self, trigger: str) -> int:
        """How far the run is: packets acknowledged, or packets relayed."""
        return len(self.sender.acked) if trigger == "acks" else self.hop.distinct()

    async def _wait_progress(self, trigger: str, threshold: int) -> None:
        seen, since = self.progress(trigger), time.monotonic()
        while seen < threshold:
            if time.monotonic() - since > STALL_LIMIT:
                lost = sorted(self.sender.acked - set(self.hop.accepted))
                self.fail(f"no progress for {STALL_LIMIT} s ({trigger} {seen}); "
                          f"{len(lost)} acknowledged packets not relayed (first: {lost[:10]})"
                          f"\n{self.diagnosis()}")
            if not self.node.alive():
                self.fail(f"{self.node.name} died by itself\n{self.diagnosis()}")
            await sleep(reactor, 0.02)
            if self.progress(trigger) != seen:
                seen, since = self.progress(trigger), time.monotonic()

    def kill_plan(self) -> list[tuple[str, str, int, float]]:
        """(signal, trigger, threshold, delay) per event.

        Half the events come once a random number of packets were
        acknowledged (spread over the stream, so packets are in flight to
        the node), the other half once a random number were relayed (the
        node is working off its queues); each after a further random delay.
        One SIGKILL instead comes a random moment after a restart (the node
        is still recovering), and one event is a clean stop (SIGTERM),
        whose aborted sends must not be held against the next hop.
        """
        events = self.kills + 1
        halves = [("acks", (events + 1) // 2), ("relayed", events // 2)]
        plan = []
        for trigger, count in halves:
            for k in range(count):
                lo = int(self.packets * (0.05 + 0.9 * k / count))
                hi = int(self.packets * (0.05 + 0.9 * (k + 1) / count))
                plan.append(["KILL", trigger, self.rng.randrange(lo, hi),
                             self.rng.uniform(0.0, 0.3)])
        startup, term = self.rng.sample(range(1, events), 2)
        plan[startup][1:] = ["start", 0, self.rng.uniform(0.3, 2.0)]
        plan[term][0] = "TERM"
        return [tuple(event) for event in plan]  # type: ignore[misc]

    async def crash_run(self, plan: list[tuple[str, str, int, float]]) -> None:
        node = self.spawn()
        await self.wait_listening(node)
        # ProcessingWorkers took effect: that many processing children
        await wait_until(reactor, f"{self.workers} processing children",
                         lambda: len(child_pids(node.pid)) == self.workers, START_LIMIT, 0.05,
                         watch=[node], report=lambda _: self.diagnosis(),
                         error=self.failureException)
        keys = os.path.join(self.base, "keys")
        identity = read_pem_key(os.path.join(keys, "identity.key"))
        keysets = sorted(d for d in os.listdir(keys) if d.startswith("key_"))
        node_key = read_pem_key(os.path.join(keys, keysets[0], "mix.key"))
        self.note(f"node keysets {keysets}; building {self.packets} packets")

        hop_identity = PrivateKey.generate(2048)
        hop_packet_key = PrivateKey.generate(2048)
        self.hop = NextHopSink(hop_packet_key, lambda: self.lives - 1)
        listener = reactor.listenTCP(
            0, responder_factory(self.hop, ResponderTLS(hop_identity, "nexthop", clock=reactor),
                                 reactor), interface="127.0.0.1")
        self.addCleanup(listener.stopListening)
        hop_port = listener.getHost().port

        build_rng = random.Random(SEED + 1).randbytes
        path1 = [Hop(node_key.public, IPv4Info("127.0.0.1", self.port, identity.public.keyid))]
        path2 = [Hop(hop_packet_key.public,
                     IPv4Info("127.0.0.1", hop_port, hop_identity.public.keyid))]
        packets = []
        for i in range(self.packets):
            payload = i.to_bytes(4, "big") + build_rng(PAYLOAD_LEN - 4)
            packets.append(build_forward_packet(payload, path1, path2, FRAGMENT_TYPE, b"",
                                                build_rng).packet)
        # What the node must make of each packet: processing is deterministic.
        mirror = PacketProcessor([(node_key, MemoryReplayLog())])
        for i, packet in enumerate(packets):
            result = mirror.process(packet)
            self.assertIsInstance(result, Relay)
            self.hop.expected[sha1(result.packet)] = i
        self.note(f"built and mirrored {self.packets} packets; next hop on port {hop_port}")

        client = MMTPClient(reactor)
        self.sender = Sender(client, NextHop("127.0.0.1", self.port, identity.public.keyid),
                             packets)
        self.addCleanup(lambda: sleep(reactor, 0.5))  # connection attempts being torn down
        self.addCleanup(client.close)
        self.addCleanup(self.sender.stop)
        self.sender.start()

        for n, (sig, trigger, point, delay) in enumerate(plan):
            if trigger == "start":
                why = f"{delay:.2f} s after its start"
            else:
                await self._wait_progress(trigger, point)
                why = f"{trigger} >= {point}, + {delay:.2f} s"
            await sleep(reactor, delay)
            if sig == "KILL":
                await self.kill(why)
            else:
                await self.stop_cleanly(why)
            await sleep(reactor, self.rng.uniform(0.05, 0.5))
            if n + 1 == len(plan) and self.last_workers is not None:
                self.configure(self.last_workers)
                self.note(f"the last run has {self.last_workers} processing workers")
            node = self.spawn()
            if n + 1 < len(plan) and plan[n + 1][1] == "start":
                continue  # the next kill lands while this run starts up
            await self.wait_listening(node)

        await self._wait_progress("acks", self.packets)
        self.note(f"all {self.packets} acknowledged after {self.sender.failures} failed sends")
        deadline = time.monotonic() + FINAL_WAIT
        while self.hop.distinct() < self.packets and time.monotonic() < deadline:
            if not self.node.alive():
                self.fail(f"{self.node.name} died by itself\n{self.diagnosis()}")
            await sleep(reactor, 0.1)
        # A quiet period: anything still to come (a duplicate, a stray
        # packet) has time to arrive before the queues are read.
        await sleep(reactor, 3 * MIX_INTERVAL + 1)
        self.note(f"next hop: {len(self.hop.arrivals)} arrivals, {self.hop.distinct()} distinct")

        await self.stop_cleanly("end of the run")
        self.check()

    def check(self) -> None:
        hop, sender = self.hop, self.sender
        report = self.diagnosis()
        self.assertEqual(hop.problems, [], report)
        unknown = [a for a in hop.arrivals if a.index is None]
        self.assertEqual(len(unknown), 0, f"{len(unknown)} packets relayed that were never "
                                          f"sent\n{report}")
        self.assertEqual(len(sender.acked), self.packets, report)
        missing = sorted(sender.acked - set(hop.accepted))
        self.assertEqual(missing, [], f"{len(missing)} acknowledged packets never relayed "
                                      f"(first: {missing[:10]})\n{report}")
        self.assertEqual(set(hop.accepted), sender.acked, report)
        twice = {i: n for i, n in hop.accepted.items() if n != 1}
        self.assertEqual(twice, {}, f"inputs accepted more than once by the next hop\n{report}")
        # The node never made two different packets of one input (a second
        # processing after a lost replay entry would be byte-identical, but
        # anything else, e.g. a wrong key, would show here).
        forked = {i: len(d) for i, d in hop.outputs.items() if len(d) > 1}
        self.assertEqual(forked, {}, f"inputs relayed as different packets\n{report}")
        # A packet may reach the next hop twice only when the node died
        # between the two copies: the first copy's RECEIVED died with it.
        last_life: dict[bytes, int] = {}
        same_life = []
        for arrival in hop.arrivals:
            if last_life.get(arrival.digest) == arrival.life:
                same_life.append(arrival.index)
            last_life[arrival.digest] = arrival.life
        self.assertEqual(same_life, [], f"packets relayed twice by one run of the node\n{report}")
        duplicates = sum(1 for a in hop.arrivals if a.replay)
        self.note(f"checked: {self.packets} acked and relayed once; {duplicates} resends after "
                  f"kills; {sender.failures} failed sends retried; {self.lives} runs")

        db = sqlite3.connect(os.path.join(self.base, "work", "queues", "packets.db"))
        try:
            counts = dict(db.execute("SELECT queue, COUNT(*) FROM packets GROUP BY queue"))
            replay_entries = db.execute("SELECT COUNT(*) FROM replay").fetchone()[0]
        finally:
            db.close()
        self.note(f"store after stop: {counts or 'empty'}; {replay_entries} replay entries")
        self.assertEqual({q: n for q, n in counts.items() if n}, {},
                         f"packets left in the node's queues\n{self.diagnosis()}")
        self.assertEqual(replay_entries, self.packets, self.diagnosis())
        # The incoming log and the body files keep nothing either: what
        # was consumed or relayed is zeros (or gone).
        leftover = {}
        for sub in ("incoming", "bodies"):
            folder = os.path.join(self.base, "work", "queues", sub)
            for name in os.listdir(folder):
                with open(os.path.join(folder, name), "rb") as f:
                    data = f.read()
                if data.strip(b"\0"):
                    leftover[f"{sub}/{name}"] = len(data)
        self.assertEqual(leftover, {}, f"packet data left on disk\n{self.diagnosis()}")

    def test_kill_and_restart_loses_and_duplicates_nothing(self) -> defer.Deferred:
        plan = self.kill_plan()
        self.note(f"seed {SEED}, {self.packets} packets, kill plan {plan}")
        return defer.ensureDeferred(self.crash_run(plan))


class TwoWorkersCrashTest(CrashTest):
    """The same with ``ProcessingWorkers: 2`` (issue 18): two processing
    children share the incoming log and one replay log, and SIGKILLs take
    both.  The last run has one worker, so it starts from the marks two
    workers left: packets one of them had processed above the other's
    mark are refused as replays, never processed twice."""

    workers = 2
    last_workers = 1
    # Half the packets and kills: the one-worker run above covers the
    # schedule at full length; this one is about the shares.
    packets = N_PACKETS // 2
    kills = max(4, KILLS // 2)
