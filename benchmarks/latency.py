"""The latency one mix node adds to a relayed packet, at 10, 50 and 90 % of
its capacity, printed as one JSON object (issue 18, point 2).

The node and the next hop are benchmarks/node.py's: the node a real child
process (``twistd -n mixminion``, Timed pool, with its processing child),
the next hop a second child process (``--serve-sink``) that notes when each
distinct packet arrives and its first 32 bytes.  This process sends with
one :class:`MMTPClient`.  Each packet is a relay through the node to the
next hop (a header for the node routing it FWD_IPV4 to the sink; header 2
and payload are random, as in node.py's pool run: the node never checks
them).  Before a run this process puts every packet through the codec
with the node's packet key (:class:`PacketProcessor`, in-memory replay
log): what the node will send on is then known, so its first 32 bytes
match each arrival to its packet.

* ``capacity_per_s``: one sender flat out (``--capacity-packets`` queued at
  once, as node.py's relay run), relayed packets per second between the
  10th and the 90th percentile arrival (node.py's ``steady_rate``).
* ``loads``: for 10, 50 and 90 % of that, packets sent at that rate for
  ``--seconds`` (at most ``--packets``), Poisson arrivals by default,
  each sent by a timer set for it.  Per packet, the *added latency* is
  its arrival at the next hop minus its acknowledgement by the node (the MMTP
  RECEIVED, seen here as its ``send_packet`` Deferred firing: the node
  has synced it to its incoming log).  Both processes read
  ``time.monotonic()`` on one machine.  ``added_ms`` gives its
  percentiles; ``ack_ms`` the time from our send to that RECEIVED (our
  queue and the node's reception commit; not part of the added latency);
  ``offered_per_s`` the rate actually sent; ``node_cpu_share`` the node's
  and its processing child's CPU over the run, in cores.
* ``p99_ms_at_50pct``: the issue's target is 10 ms.

``--capacity PER_S`` skips the capacity run and takes PER_S as the
capacity: the load levels then offer the same rates from run to run,
whatever else the machine is doing, and their ``node_cpu_share`` over
``offered_per_s`` compares the CPU a packet costs.

``--dump FILE`` writes every packet's three times, a JSON line per load
level, to match against a trace of the node's own events.

The mix interval.  ``[Server] MixInterval`` counts whole seconds, at
least 1 (mixminion/server/config.py, ``_check_server``), so the shortest
Timed interval the node accepts is 1 s: every packet then waits in the
pool for the next mix (0 to 1 s) and leaves with the whole batch, so
``added_ms`` measures the mix interval, not the hop.  With
``--mix-interval`` under 1 (e.g. 0.002) the node's configuration still
says 1 second, and a ``sitecustomize`` module that this benchmark puts on
the node's ``PYTHONPATH`` (nothing under mixminion/ changes) makes its
:class:`Mixer` tick at that interval instead, and also mix as soon as
processing commits a batch: a stand-in for the test-only pass-through
the issue asks for, reported as ``mix_interval_patched``.

Usage: python3 benchmarks/latency.py [--seconds S] [--packets N] [--capacity-packets N]
       [--capacity PER_S] [--mix-interval S] [--spacing poisson|even] [--dump FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional, TextIO

from twisted.internet import defer, task

from mixminion.codec.header import HopRouting, build_header
from mixminion.codec.packet import PACKET_LEN
from mixminion.codec.process import PacketProcessor, Relay
from mixminion.codec.replay import MemoryReplayLog
from mixminion.codec.routing import FWD_IPV4_TYPE, IPv4Info
from mixminion.mmtp.initiator import InitiatorSettings, MMTPClient

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from node import (  # noqa: E402  (benchmarks/node.py)
    CountingSink,
    Node,
    SinkProcess,
    family_cpu_seconds,
    serve_sink,
    steady_rate,
)

LOADS = (10, 50, 90)  # percent of the measured capacity
TARGET_P99_MS = 10.0  # at 50 %
HEADER_LEN = 2048
#: the node's Mixer interval, for the sitecustomize below
INTERVAL_VARIABLE = "MIXMINION_BENCH_MIX_INTERVAL"

#: Put on the node's PYTHONPATH as sitecustomize.py when --mix-interval is
#: under a second: the configuration cannot say it (whole seconds, at
#: least 1), so the Mixer's own start picks the interval up instead.
SITECUSTOMIZE = f'''\
"""Written by benchmarks/latency.py: the node's Mixer ticks every
${INTERVAL_VARIABLE} seconds, whatever MixInterval says, and mixes as
soon as processing commits a batch (test-only)."""
import os

from mixminion.server import mixing, node

_interval = float(os.environ["{INTERVAL_VARIABLE}"])
_start = mixing.Mixer.start
_start_pipeline = node.MixNode.start_pipeline


def _patched_start(self):
    self.interval = _interval
    _start(self)


def _patched_start_pipeline(self):
    _start_pipeline(self)
    again = []

    def mix(counts=None):
        # A commit during a round: one more round once it ends (the Mixer
        # skips a round asked for while one runs).
        if self.mixer._round is None:
            self.mixer.mix()
        elif not again:
            again.append(True)
            self.mixer._round.addBoth(lambda result: (again.clear(), mix(), result)[2])

    self.processor.batch_listeners.append(mix)


mixing.Mixer.start = _patched_start
node.MixNode.start_pipeline = _patched_start_pipeline
'''


class MatchingSink(CountingSink):
    """node.py's next hop, also keeping each distinct arrival's first 32
    bytes (hex) beside its time, so the sender can tell which packet came."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []  # aligned with self.times

    def receivePacket(self, packet: bytes, peer: str) -> defer.Deferred:  # noqa: N802
        if packet[:32] not in self.digests:
            self.order.append(packet[:32].hex())
        return super().receivePacket(packet, peer)

    def answer(self) -> dict:
        return {"times": self.times, "digests": self.order}


class MatchingSinkProcess(SinkProcess):
    """node.py's handle on the next hop's process, running this script's
    :class:`MatchingSink`."""

    script = os.path.abspath(__file__)

    async def arrivals(self) -> tuple[list[str], list[float]]:
        """Every distinct arrival so far: first 32 bytes (hex), and times."""
        message = await self.ask()
        return message["digests"], message["times"]


@dataclass
class Packets:
    """Headers for the node (each packet is one of them and the shared
    ``rest``: 32 KiB objects are made only when sent, so a load level's
    thousands of packets cost 2 KiB each while they wait), and the first
    32 bytes (hex) the node will send on for each, to its index."""

    headers: list[bytes]
    rest: bytes
    expected: dict[str, int] = field(default_factory=dict)

    def packet(self, i: int) -> bytes:
        return self.headers[i] + self.rest


def prepare(node: Node, sink_info: IPv4Info, count: int, expect: bool) -> Packets:
    """``count`` packets through ``node`` to the sink; with ``expect``, what
    the node will emit for each (the codec is deterministic given its key;
    a fresh replay log, since the node's has not seen them either)."""
    routing = [HopRouting(node.private_packet_key.public, FWD_IPV4_TYPE, sink_info.pack())]
    rest = os.urandom(PACKET_LEN - HEADER_LEN)
    packets = Packets([build_header(routing, [os.urandom(16)], os.urandom)
                       for _ in range(count)], rest)
    if expect:
        processor = PacketProcessor([(node.private_packet_key, MemoryReplayLog())])
        for i in range(count):
            result = processor.process(packets.packet(i))
            assert isinstance(result, Relay) and result.relay_info == sink_info, result
            packets.expected[result.packet[:32].hex()] = i
    return packets


@dataclass
class Sends:
    """What the sender saw of one run (``time.monotonic()``, NaN: never)."""

    sent_at: list[float]
    acked_at: list[float]
    failures: dict[str, int]


async def send(reactor, node: Node, packets: Packets, offsets: Optional[list[float]]) -> Sends:
    """Send every packet, at ``offsets`` seconds from now (None: all at
    once), on one client; fires once each is acknowledged or refused.

    One timer at a time, set for the next packet due; whatever is due when
    it fires is sent, so a late timer catches up instead of lowering the
    rate.  (A timer every millisecond, as before, cost this process about
    as much CPU as the node at low load, on the cores the node shares.)"""
    n = len(packets.headers)
    sends = Sends([math.nan] * n, [math.nan] * n, {})
    # As a node upstream sends (its [Outgoing/MMTP] KeepOpen default): at
    # low load a connection per packet would spend the node's CPU on
    # handshakes that a real previous hop does not cause.
    client = MMTPClient(reactor, settings=InitiatorSettings(keep_open=5.0))
    pending: list[defer.Deferred] = []

    def acked(_, i: int) -> None:
        sends.acked_at[i] = time.monotonic()

    def failed(failure, i: int) -> None:
        why = failure.getErrorMessage()
        sends.failures[why] = sends.failures.get(why, 0) + 1

    def send_one(i: int) -> None:
        sends.sent_at[i] = time.monotonic()
        d = client.send_packet(node.dest, packets.packet(i))
        pending.append(d.addCallbacks(acked, failed, callbackArgs=(i,), errbackArgs=(i,)))

    # The objects made so far (the packets, the schedule) never become
    # garbage during the run: a collection walking them held this
    # process's reactor for milliseconds, so acknowledgements were seen
    # late and some added latencies came out below zero.
    gc.collect()
    gc.freeze()
    if offsets is None:
        for i in range(n):
            send_one(i)
    else:
        start, state = time.monotonic(), {"next": 0}
        done: defer.Deferred = defer.Deferred()

        def due() -> None:
            elapsed = time.monotonic() - start
            i = state["next"]
            while i < n and offsets[i] <= elapsed:
                send_one(i)
                i += 1
            state["next"] = i
            if i == n:
                done.callback(None)
            else:
                reactor.callLater(max(0.0, offsets[i] - (time.monotonic() - start)), due)

        due()
        await done
    await defer.DeferredList(pending)
    await client.close()
    gc.unfreeze()
    return sends


async def wait_arrivals(reactor, sink: MatchingSinkProcess, at_least: int,
                        timeout: float) -> None:
    """Until the sink has counted ``at_least`` packets, or ``timeout``."""
    deadline = time.monotonic() + timeout
    while sink.count < at_least and time.monotonic() < deadline:
        await task.deferLater(reactor, 0.01, lambda: None)


def schedule(rate: float, count: int, spacing: str, rng: random.Random) -> list[float]:
    """Send offsets (seconds) for ``count`` packets at ``rate`` a second:
    Poisson arrivals (as many independent peers would give) or even."""
    offsets, t = [], 0.0
    for _ in range(count):
        offsets.append(t)
        t += rng.expovariate(rate) if spacing == "poisson" else 1 / rate
    return offsets


def percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def summary_ms(values: list[float]) -> Optional[dict[str, float]]:
    """p50/p90/p99/max/min of ``values`` (seconds) in milliseconds."""
    if not values:
        return None
    ordered = sorted(values)
    out = {f"p{p}": percentile(ordered, p) for p in (50, 90, 99)}
    out.update(max=ordered[-1], min=ordered[0])
    return {k: round(v * 1000, 2) for k, v in out.items()}


async def capacity_run(reactor, node: Node, sink: MatchingSinkProcess, sink_info: IPv4Info,
                       count: int, interval: float) -> dict:
    """Relayed packets per second with one sender flat out (as node.py's
    relay run, on this node, whose mixing the load levels use too)."""
    packets = prepare(node, sink_info, count, expect=False)
    base = sink.count
    sends = await send(reactor, node, packets, None)
    acked_at = [t for t in sends.acked_at if not math.isnan(t)]
    acked = len(acked_at)
    await wait_arrivals(reactor, sink, base + acked, 60 + 3 * interval)
    _, times = await sink.arrivals()
    times = times[base:]
    if len(times) < count // 2:
        raise RuntimeError(f"capacity run: {len(times)} of {count} packets relayed; "
                           f"see {node.daemon.log}")
    return {"capacity_per_s": round(steady_rate(times), 1),
            "capacity_ingest_per_s": round(acked / (max(acked_at) - min(sends.sent_at)), 1),
            "capacity_packets": count, "capacity_relayed": len(times),
            "capacity_refused": sum(sends.failures.values())}


async def load_run(reactor, node: Node, sink: MatchingSinkProcess, sink_info: IPv4Info,
                   rate: float, count: int, spacing: str, interval: float,
                   rng: random.Random, dump: Optional[TextIO] = None) -> dict:
    """``count`` packets at ``rate`` a second; per packet, arrival at the
    next hop minus acknowledgement by the node (each packet's three times
    to ``dump`` too, one JSON line, for a closer look)."""
    packets = prepare(node, sink_info, count, expect=True)
    offsets = schedule(rate, count, spacing, rng)
    base = sink.count
    cpu_start, wall_start = family_cpu_seconds(node.daemon.pid), time.monotonic()
    sends = await send(reactor, node, packets, offsets)
    acked = [i for i, t in enumerate(sends.acked_at) if not math.isnan(t)]
    await wait_arrivals(reactor, sink, base + len(acked), 30 + 3 * interval)
    node_cpu = family_cpu_seconds(node.daemon.pid) - cpu_start
    busy = time.monotonic() - wall_start
    digests, times = await sink.arrivals()
    arrived_at = [math.nan] * count
    for digest, t in zip(digests[base:], times[base:]):
        i = packets.expected.get(digest)
        if i is not None:
            arrived_at[i] = t
    if dump is not None:
        json.dump({"rate": rate, "sent": sends.sent_at, "acked": sends.acked_at,
                   "arrived": arrived_at}, dump)
        dump.write("\n")
    added = [arrived_at[i] - sends.acked_at[i] for i in acked if not math.isnan(arrived_at[i])]
    ack = [sends.acked_at[i] - sends.sent_at[i] for i in acked]
    sent_span = sends.sent_at[-1] - sends.sent_at[0]
    return {"target_per_s": round(rate, 1),
            "offered_per_s": round((count - 1) / sent_span, 1) if sent_span > 0 else None,
            "sent": count, "acknowledged": len(acked),
            "arrived": sum(not math.isnan(t) for t in arrived_at),
            "refused": sends.failures,
            "added_ms": summary_ms(added),
            "ack_ms": summary_ms(ack),
            "node_cpu_share": round(node_cpu / busy, 2)}


def latency_node(work: str, interval: float) -> Node:
    """node.py's node at ``interval`` seconds: in its configuration when
    it is a whole number of seconds, else through :data:`SITECUSTOMIZE`."""
    if interval >= 1:
        return Node(work, "latency", f"{int(interval)} seconds")
    shim = os.path.join(work, "shim")
    os.makedirs(shim)
    with open(os.path.join(shim, "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE)
    node = Node(work, "latency", "1 second")
    path = os.environ.get("PYTHONPATH")
    node.daemon.env = {"PYTHONPATH": shim + (os.pathsep + path if path else ""),
                       INTERVAL_VARIABLE: repr(interval)}
    return node


async def run(reactor, args: argparse.Namespace) -> None:
    sink = MatchingSinkProcess(reactor)
    sink_port, sink_keyid = await sink.start()
    sink_info = IPv4Info("127.0.0.1", sink_port, sink_keyid)
    result: dict = {"mix_interval_s": args.mix_interval,
                    "mix_interval_patched": args.mix_interval < 1,
                    "spacing": args.spacing, "seconds": args.seconds, "packets": args.packets}
    rng = random.Random(args.seed)
    dump = open(args.dump, "w") if args.dump else None
    try:
        with tempfile.TemporaryDirectory() as work:
            node = latency_node(work, args.mix_interval)
            try:
                await node.started(reactor)
                print(f"latency: node pid {node.daemon.pid}", file=sys.stderr, flush=True)
                if args.capacity:
                    result["capacity_per_s"] = args.capacity
                else:
                    result.update(await capacity_run(reactor, node, sink, sink_info,
                                                     args.capacity_packets, args.mix_interval))
                capacity = result["capacity_per_s"]
                loads = result["loads"] = {}
                for load in LOADS:
                    rate = capacity * load / 100
                    count = max(2, min(args.packets, round(rate * args.seconds)))
                    print(f"latency: {load}% load, {count} packets at {rate:.0f}/s",
                          file=sys.stderr, flush=True)
                    loads[str(load)] = await load_run(reactor, node, sink, sink_info, rate,
                                                      count, args.spacing, args.mix_interval,
                                                      rng, dump)
            finally:
                await node.stop(reactor)
    finally:
        await sink.stop()
        if dump is not None:
            dump.close()
    at_50 = result["loads"]["50"]["added_ms"]
    result["p99_ms_at_50pct"] = at_50["p99"] if at_50 else None
    result["target_p99_ms_at_50pct"] = TARGET_P99_MS
    result["python"] = sys.version.split()[0]
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10,
                        help="sending time per load level (default 10)")
    parser.add_argument("--packets", type=int, default=8000,
                        help="at most this many packets per load level (default 8000)")
    parser.add_argument("--capacity-packets", type=int, default=8000,
                        help="packets for the capacity run (default 8000)")
    parser.add_argument("--capacity", type=float, metavar="PER_S",
                        help="take this as the capacity instead of measuring it, so that "
                             "runs on different hours offer the same rates")
    parser.add_argument("--mix-interval", type=float, default=1.0,
                        help="the node's Timed interval in seconds (default 1, the shortest "
                             "its configuration accepts); under 1, set by a test-only patch")
    parser.add_argument("--spacing", choices=("poisson", "even"), default="poisson",
                        help="gaps between sends (default poisson)")
    parser.add_argument("--seed", type=int, default=18, help="for the Poisson gaps")
    parser.add_argument("--dump", metavar="FILE",
                        help="write each packet's send, acknowledgement and arrival times "
                             "(time.monotonic(), NaN: never) to FILE, a JSON line per load")
    parser.add_argument("--serve-sink", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_sink:
        serve_sink(MatchingSink())
        return
    if args.mix_interval >= 1 and args.mix_interval != int(args.mix_interval):
        parser.error("--mix-interval: whole seconds from 1 up (MixInterval), or under 1")
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
