"""Releasing a large mix pool: the reactor's longest tick, time and memory,
printed as one JSON object (issue 12 point 9).

Each run is a child process that does what a node does when its mix fires
(the node's own ``Mixer`` and ``Outgoing``, wired as ``MixNode`` wires
them: the round's work in the mixing worker thread, then a flush of the
outgoing queue) on a packet store filled beforehand by another child
process: ``--packets`` relay packets of 32 KiB in the pool, spread over
``--destinations`` next hops, bodies in their own files as in a node.  The
next hops are an in-memory MMTP client that acknowledges each packet
``--ack-ms`` after it is handed over, so every packet leaves and nothing
measured here is TLS.

* ``longest_tick_ms``: the worst lateness of a 10 ms ``LoopingCall`` on
  the reactor from the mix until the last packet left: how long the
  reactor was unable to serve anything (a connection, the metrics page) at
  once.  ``ticks_over_100ms`` counts the late calls over 100 ms.
* ``release_s``: from the mix until the pool and the outgoing queue are
  empty.
* ``peak_rss_mb``: the run's peak resident memory (VmHWM) and
  ``idle_rss_mb`` its memory before the mix, Python and the store's caches
  included.

Medians over ``--runs`` runs (each figure's worst run beside it).

Usage: python3 benchmarks/pool_flush.py [--packets N] [--destinations N] [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from twisted.internet import defer, task

from mixminion.mmtp.initiator import NextHop
from mixminion.server.items import encode_item
from mixminion.server.mixing import Mixer
from mixminion.server.outgoing import Outgoing
from mixminion.server.packetstore import PacketStore
from mixminion.server.mix_algorithm import TimedMix
from mixminion.server.queues import MIX, OUT
from mixminion.server.stats import NodeStats
from mixminion.server.workers import run_in, worker_thread

#: seconds between two calls of the tick probe
PROBE = 0.01
#: packets stored per transaction while filling
FILL_BATCH = 2000


def open_store(directory: str) -> PacketStore:
    """The store laid out as a node's ``QueueDir`` holds it."""
    return PacketStore(os.path.join(directory, "packets.db"),
                       body_dir=os.path.join(directory, "bodies"))


def fill(directory: str, packets: int, destinations: int) -> None:
    """``--fill``: the pool, ``packets`` relay packets over ``destinations``
    next hops (198.18.0.0/15, never a real address)."""
    store = open_store(directory)
    metas = [encode_item(NextHop(f"198.18.{i // 250}.{i % 250 + 1}", 48099,
                                   i.to_bytes(20, "big"))) for i in range(destinations)]
    body = os.urandom(32768)
    for start in range(0, packets, FILL_BATCH):
        n = min(FILL_BATCH, packets - start)
        store.add_many(MIX, [body] * n, time.time(),
                       [metas[(start + j) % destinations] for j in range(n)])
    store.close()


def vm_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        found = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    assert found is not None
    return int(found.group(1))


class AckingClient:
    """The next hops: each packet acknowledged ``delay`` seconds after it
    is handed over (nothing kept: a real client keeps the packet until
    then, which :attr:`Outgoing.max_in_flight` bounds)."""

    def __init__(self, reactor: Any, delay: float) -> None:
        self.reactor = reactor
        self.delay = delay
        self.sent = 0

    def send_packet(self, dest: NextHop, packet: bytes) -> defer.Deferred:
        self.sent += 1
        d: defer.Deferred = defer.Deferred()
        self.reactor.callLater(self.delay, d.callback, None)
        return d


class NoSelf:
    """The node's own sink: every packet here is for another node."""

    def receivePacket(self, packet: bytes, peer: str) -> defer.Deferred:  # noqa: N802
        raise AssertionError("a packet for ourselves")


async def release(reactor: Any, directory: str, ack_delay: float) -> dict:
    """``--run``: one mix of the whole pool and its flush, measured."""
    store = open_store(directory)
    pooled = store.count(MIX)
    stats = NodeStats()
    client = AckingClient(reactor, ack_delay)
    outgoing = Outgoing(store, client, (3600,), reactor, b"\x07" * 20,  # type: ignore[arg-type]
                        stats.count, NoSelf())
    mixing_pool = worker_thread("mixminion-mixing")
    mixer = Mixer(store, TimedMix(), 3600, reactor, {}, stats.count,
                  outgoing.flush, run_write=lambda fn, *args: run_in(reactor, mixing_pool, fn,
                                                                     *args))
    idle_kb = vm_kb("VmRSS")
    late: list[float] = []
    expected = [0.0]

    def probe() -> None:
        now = time.monotonic()
        if expected[0]:
            late.append(now - expected[0])
        expected[0] = now + PROBE

    ticker = task.LoopingCall(probe)
    ticker.start(PROBE)
    await task.deferLater(reactor, 0.5, lambda: None)  # settled: the probe's own noise
    quiet = max(late, default=0.0)
    late.clear()
    started = time.monotonic()
    await mixer.mix()
    mixed = time.monotonic() - started
    while store.count(OUT) or store.count(MIX):
        await task.deferLater(reactor, 0.05, lambda: None)
    released = time.monotonic() - started
    ticker.stop()
    await outgoing.stop()
    if mixing_pool.started:
        mixing_pool.stop()
    store.close()
    return {"packets": pooled, "relayed": client.sent,
            "longest_tick_ms": round(max(late) * 1000, 1),
            "ticks_over_100ms": sum(1 for x in late if x > 0.1),
            "quiet_longest_tick_ms": round(quiet * 1000, 1),
            "mix_s": round(mixed, 2), "release_s": round(released, 2),
            "idle_rss_mb": round(idle_kb / 1024, 1), "peak_rss_mb": round(vm_kb("VmHWM") / 1024, 1)}


def child(*args: str) -> str:
    return subprocess.run([sys.executable, os.path.abspath(__file__), *args], check=True,
                          stdout=subprocess.PIPE, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=60000,
                        help="relay packets in the pool (default 60000, the issue's figure)")
    parser.add_argument("--destinations", type=int, default=300,
                        help="next hops they are spread over (default 300)")
    parser.add_argument("--runs", type=int, default=5, help="runs (default 5)")
    parser.add_argument("--ack-ms", type=float, default=5.0,
                        help="each next hop's acknowledgement delay (default 5 ms)")
    parser.add_argument("--fill", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--run", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fill:
        fill(args.fill, args.packets, args.destinations)
        return
    if args.run:
        task.react(lambda reactor: defer.ensureDeferred(release(reactor, args.run,
                                                                args.ack_ms / 1000))
                   .addCallback(lambda result: print(json.dumps(result))))
        return
    runs = []
    for n in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="pool-flush-") as work:
            child("--fill", work, "--packets", str(args.packets),
                  "--destinations", str(args.destinations))
            runs.append(json.loads(child("--run", work, "--ack-ms", str(args.ack_ms))))
            shutil.rmtree(work, ignore_errors=True)
        print(f"run {n + 1}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
    result: dict[str, Any] = {"packets": args.packets, "destinations": args.destinations,
                              "runs": args.runs, "ack_ms": args.ack_ms}
    for key, worst in (("longest_tick_ms", max), ("ticks_over_100ms", max),
                       ("release_s", max), ("mix_s", max), ("peak_rss_mb", max),
                       ("idle_rss_mb", max), ("quiet_longest_tick_ms", max)):
        values = [r[key] for r in runs]
        result[key] = statistics.median(values)
        result[f"{key}_worst"] = worst(values)
    result["python"] = sys.version.split()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
