"""What pinging costs a node, and how fast a failed node leaves client
paths (issue 16, doc/reliability.md), printed as one JSON object.

* ``ping_share``: pinging as a share of a node's measured capacity at the
  default ``[Pinging]`` settings (a ping every ``Interval`` = 2 minutes on
  average, a report every ``ReportInterval`` = 1 hour), in a network where
  every node pings.  Each ping is handled by ``packets_per_ping`` nodes
  (``X``, ``S``, ``Y`` and the pinger: 4), so on average every node handles
  ``packets_per_ping / Interval`` ping packets a second; the pinger's own
  work (building a ping, signing a report) is turned into relayed-packet
  equivalents by the node's CPU per relayed packet.  Divided by
  ``relay_per_s``.  Target: at most 0.02.

  - ``relay_per_s`` and ``node_cpu_ms_per_packet``: a real node relaying
    ``--packets`` packets, measured by ``benchmarks/node.py``'s relay run
    in this run (one sender, a next hop in a child process).
  - ``packets_per_ping``: measured on the test network: the packets all
    nodes received over MMTP (``ReceivedPacket``) divided by the pings
    they sent (``PingSent``) over ``--count-s`` seconds of a network
    carrying nothing else.
  - ``ping_build_ms`` and ``report_sign_ms``: building one ping packet
    (:func:`mixminion.server.pinging.packets.build_ping`) over the test
    network's descriptors, and measuring plus signing a report on every
    server, in this process (median of 50 and of 10).

* ``exclusion_s``: seconds from a node's failure (SIGSTOP: hung, its
  sockets open) until the consensus the authorities serve puts it below
  the client's reliability floor (0.9): from then on a client that
  downloads the directory leaves it out of its paths.  With the test
  network's settings (``mixminion-testnet up``: a ping every 2 s, lost
  after 20 s, reports every 10 s, votes every 3 s).  ``--trials`` nodes in
  turn, each resumed (SIGCONT) and measured back above the floor
  (``recovery_s``) before the next; the median and every run.

Usage: python3 benchmarks/pinger.py [--packets N] [--nodes N] [--trials N] [--count-s S]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Optional

from twisted.internet import defer, task, threads

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import node as node_bench  # noqa: E402  benchmarks/node.py: the relay run

from mixminion import testnet  # noqa: E402
from mixminion.codec.header import Hop  # noqa: E402
from mixminion.codec.routing import IPv4Info  # noqa: E402
from mixminion.codec.rsa import PrivateKey  # noqa: E402
from mixminion.config.intervals import parse_interval  # noqa: E402
from mixminion.directory.reliability import ReportFields, build_report  # noqa: E402
from mixminion.events import Event  # noqa: E402
from mixminion.server.config import SCHEMA  # noqa: E402
from mixminion.server.keys import read_pem_key  # noqa: E402
from mixminion.server.pinging.handles import new_handle  # noqa: E402
from mixminion.server.pinging.inference import PingOutcome, measure  # noqa: E402
from mixminion.server.pinging.packets import build_ping  # noqa: E402
from mixminion.testing.daemon import metric  # noqa: E402

FLOOR = 0.9
#: seconds a node may take to be measured, excluded, or back
WAIT_S = 240.0


def default_seconds(option: str) -> float:
    """``[Pinging] option``'s default from the schema, in seconds."""
    return float(parse_interval(SCHEMA["Pinging"].option(option).default))


def median_ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def log(text: str) -> None:
    print(f"pinger: {text}", file=sys.stderr, flush=True)


async def capacity(reactor: Any, packets: int) -> dict:
    """``benchmarks/node.py``'s relay run, with ``packets`` packets."""
    sink = node_bench.SinkProcess(reactor)
    port, keyid = await sink.start()
    sink_hop = Hop(PrivateKey.generate(2048).public, IPv4Info("127.0.0.1", port, keyid))
    try:
        with tempfile.TemporaryDirectory() as work:
            result = await node_bench.relay_run(reactor, work, sink_hop, sink, packets, 1, None)
    finally:
        await sink.stop()
    return {k: result[k] for k in ("relay_per_s", "node_cpu_ms_per_packet", "codec_relay_per_s")}


class Network:
    """The test network, and what its first authority serves."""

    def __init__(self, reactor: Any, net: testnet.Network) -> None:
        self.reactor = reactor
        self.net = net

    async def reliability(self) -> dict[str, Optional[float]]:
        """nickname -> reliability in the consensus (None: unmeasured)."""
        directory = await testnet.authority_directory(self.reactor, self.net,
                                                      self.net.authorities[0])
        if directory is None:
            return {}
        by_fp = directory.reliability
        return {d.nickname.lower(): (by_fp[d.fingerprint].reliability
                                     if d.fingerprint in by_fp else None)
                for d in directory.descriptors}

    async def wait(self, what: str, check: Callable[[dict], bool], poll: float = 0.5) -> float:
        """Seconds until the consensus satisfies ``check``."""
        start = time.monotonic()
        while True:
            values = await self.reliability()
            if values and check(values):
                return time.monotonic() - start
            if time.monotonic() - start > WAIT_S:
                raise RuntimeError(f"{what}: not within {WAIT_S:.0f} s; last seen {values}")
            await testnet.sleep(self.reactor, poll)

    def counts(self) -> tuple[int, int]:
        """(packets received over MMTP, pings sent), all nodes together."""
        received = sent = 0
        for n in self.net.nodes:
            received += metric(n.metrics_port, Event.RECEIVED_PACKET)
            sent += metric(n.metrics_port, Event.PING_SENT)
        return received, sent


def pinger_work(net: testnet.Network, directory: Any) -> dict:
    """Building a ping and measuring + signing a report, in this process,
    on the test network's descriptors and a node's identity key."""
    descriptors = sorted(directory.descriptors, key=lambda d: d.nickname)
    x, s, y, me = descriptors[:4]
    build = median_ms(lambda: build_ping(x, s, y, me, new_handle(os.urandom), os.urandom), 50)
    identity = read_pem_key(os.path.join(net.nodes[0].directory, "base", "keys", "identity.key"))
    others = [d.fingerprint for d in descriptors[1:]]
    # a day of pings at the default rate, spread over the other servers
    per_day = int(86400 / default_seconds("Interval"))
    outcomes = [PingOutcome((others[i % len(others)], others[(i + 1) % len(others)],
                             others[(i + 2) % len(others)]), i % 50 != 0, 1.5)
                for i in range(per_day)]

    def report() -> None:
        measured = measure(outcomes)
        now = int(time.time())
        build_report(ReportFields("bench", now, now - 86400, now, tuple(measured.values())),
                     identity, os.urandom)
    return {"ping_build_ms": round(build, 3), "report_sign_ms": round(median_ms(report, 10), 3),
            "report_pings": per_day}


async def on_testnet(reactor: Any, nodes: int, trials: int, count_s: float) -> dict:
    with tempfile.TemporaryDirectory() as work:
        with contextlib.redirect_stdout(sys.stderr):
            net = await testnet.bring_up(reactor, os.path.join(work, "net"), nodes, None)
        try:
            network = Network(reactor, net)
            names = [n.name for n in net.nodes]
            up = await network.wait("every node measured at or above the floor", lambda v: all(
                v.get(n) is not None and v[n] >= FLOOR for n in names))
            log(f"every node measured {up:.0f} s after the consensus")
            received0, sent0 = await threads.deferToThread(network.counts)
            await testnet.sleep(reactor, count_s)
            received1, sent1 = await threads.deferToThread(network.counts)
            per_ping = (received1 - received0) / max(1, sent1 - sent0)
            log(f"{sent1 - sent0} pings, {received1 - received0} packets received: "
                f"{per_ping:.2f} per ping")
            directory = await testnet.authority_directory(reactor, net, net.authorities[0])
            work_costs = pinger_work(net, directory)
            excluded, recovered = [], []
            for victim in net.nodes[:trials]:
                pid = victim.pid()
                os.kill(pid, signal.SIGSTOP)
                try:
                    seconds = await network.wait(
                        f"{victim.name} below the floor",
                        lambda v: v.get(victim.name) is not None and v[victim.name] < FLOOR)
                finally:
                    os.kill(pid, signal.SIGCONT)
                excluded.append(round(seconds, 1))
                log(f"{victim.name} hung: excluded after {seconds:.1f} s")
                seconds = await network.wait(
                    f"{victim.name} back above the floor",
                    lambda v: v.get(victim.name) is not None and v[victim.name] >= FLOOR)
                recovered.append(round(seconds, 1))
                log(f"{victim.name} resumed: back after {seconds:.1f} s")
        finally:
            with contextlib.redirect_stdout(sys.stderr):
                await testnet.stop_all(reactor, net, quiet=True)
    return {"packets_per_ping": round(per_ping, 2), "pings_counted": sent1 - sent0,
            **work_costs, "exclusion_s": statistics.median(excluded),
            "exclusion_s_runs": excluded, "recovery_s_runs": recovered,
            "testnet_nodes": nodes,
            "testnet_pinging": " ".join(testnet.PINGING.split("\n")[1:]).strip()}


async def run(reactor: Any, args: argparse.Namespace) -> None:
    result: dict = {}
    result.update(await capacity(reactor, args.packets))
    log(f"capacity: {result['relay_per_s']} packets/s, "
        f"{result['node_cpu_ms_per_packet']} ms CPU per packet")
    result.update(await on_testnet(reactor, args.nodes, args.trials, args.count_s))
    interval, report_interval = default_seconds("Interval"), default_seconds("ReportInterval")
    packets_s = result["packets_per_ping"] / interval
    own_ms_s = result["ping_build_ms"] / interval + result["report_sign_ms"] / report_interval
    equivalent = packets_s + own_ms_s / result["node_cpu_ms_per_packet"]
    result.update({"default_interval_s": interval, "default_report_interval_s": report_interval,
                   "ping_packets_per_node_s": round(packets_s, 5),
                   "ping_share": float(f"{equivalent / result['relay_per_s']:.3g}"),
                   "python": sys.version.split()[0]})
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=16000,
                        help="packets for the capacity run (default 16000, as benchmarks/node.py)")
    parser.add_argument("--nodes", type=int, default=testnet.DEFAULT_NODES,
                        help=f"nodes of the test network (default {testnet.DEFAULT_NODES})")
    parser.add_argument("--trials", type=int, default=3,
                        help="nodes hung in turn for exclusion_s (default 3)")
    parser.add_argument("--count-s", type=float, default=40.0,
                        help="seconds over which packets per ping are counted (default 40)")
    args = parser.parse_args()
    if args.trials < 1 or args.trials > args.nodes:
        parser.error("--trials must be between 1 and --nodes")
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
