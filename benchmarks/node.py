"""One mix node's relay rate and memory, printed as one JSON object.

The node runs as a real child process (``twistd -n mixminion``, Timed pool,
one-second mix interval).  This process sends it packets with
:class:`MMTPClient`; the next hop, an MMTP responder that only counts what
arrives, is a second child process (``--serve-sink``), as it would be
another machine.  So a relayed packet crosses MMTP in, the durable
incoming queue, processing (replay log and result in one transaction), the
pool, the outgoing queue and MMTP out (decryption runs in the node's
processing child process).

* ``relay_per_s``: the rate at which relayed packets arrive at the next
  hop between the 10th and the 90th percentile arrival, i.e. once the
  pipeline is full (nothing leaves the pool before the first mix, and the
  last packets wait for the last one); ``end_to_end_per_s`` divides all
  packets by the time from the first send to the last arrival instead.
* ``codec_relay_per_s``: :meth:`PacketProcessor.process` alone on the same
  packets, in this process, with an in-memory replay log (best of two
  passes); ``pipeline_ratio`` is ``relay_per_s`` over it.
* ``ingest_per_s``: packets acknowledged per second by the node, and
  ``queues_when_ingested`` where the packets were at that moment (a long
  ``incoming`` queue means processing, not reception, was the limit);
  ``node_cpu_ms_per_packet`` (the node and its processing child) and the
  CPU shares of the node and of this process say how much of the machine
  the run used: on two cores, the sender and the next hop (counted
  together as ``bench_cpu_share``) take about a sixth of it.
* ``rss_mb_50k``: the resident memory (VmRSS, the node's process and its
  processing child together) of a second node, whose mix
  interval is a day, once 50,000 packets pushed through MMTP sit in its
  pool (read from its metrics page); ``pss_mb_50k`` the same as
  proportional set size (pages the two processes share, such as the
  interpreter's and the libraries', counted once); ``rss_idle_mb`` and
  ``pss_idle_mb`` before the first packet.

One client (``--clients``, default 1) is one peer: MMTP lets it have six
unacknowledged packets on each of two connections, so its rate is bounded
by the node's acknowledgement latency; several clients stand for several
peers.  ``--profile`` runs the relay node under cProfile (reactor thread).

``--workers N`` runs the relay node with ``ProcessingWorkers: N``.
``slowest_client_share`` is the slowest client's acknowledged packets, by
the time half of all were acknowledged, over an even share (1.0 with one
client); ``rss_mb_when_ingested`` the relay node's resident memory (both
processes) once every packet is acknowledged.

Usage: python3 benchmarks/node.py [--packets N] [--clients N] [--workers N] [--pool N]
       [--profile FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from typing import Optional

from twisted.internet import defer, protocol, task, threads
from zope.interface import implementer

from mixminion.codec.build import build_forward_packet
from mixminion.codec.header import Hop, HopRouting, build_header
from mixminion.codec.packet import PAYLOAD_LEN
from mixminion.codec.process import PacketProcessor, Relay
from mixminion.codec.replay import MemoryReplayLog
from mixminion.codec.routing import DROP_TYPE, FWD_IPV4_TYPE, IPv4Info
from mixminion.codec.rsa import PrivateKey
from mixminion.mmtp.initiator import NextHop, MMTPClient
from mixminion.mmtp.interfaces import IPacketSink
from mixminion.mmtp.responder import responder_factory
from mixminion.mmtp.tls import ResponderTLS
from mixminion.procinfo import child_pids
from mixminion.server.keys import read_pem_key
from mixminion.testing.processes import MixNode, family_rss_mb, metrics_text

MIX_INTERVAL = 1  # seconds, for the relay run
WINDOW = 2000  # packets outstanding at once while filling the pool


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def family_cpu_seconds(pid: int) -> float:
    """:func:`cpu_seconds` of ``pid`` plus its child processes alive now."""
    return cpu_seconds(pid) + sum(cpu_seconds(c) for c in child_pids(pid))


@implementer(IPacketSink)
class CountingSink:
    """The next hop: counts distinct arrivals and notes when each came."""

    def __init__(self) -> None:
        self.digests: set[bytes] = set()  # of each packet's first 32 bytes
        self.times: list[float] = []  # time.monotonic() of each distinct arrival

    def receivePacket(self, packet: bytes, peer: str) -> defer.Deferred:  # noqa: N802
        # The first 256 bytes are an RSA-OAEP ciphertext: random, so they
        # tell packets apart without hashing 32 KiB (this process shares the
        # machine with the node; its CPU is not the node's to spend).
        digest = packet[:32]
        if digest not in self.digests:
            self.digests.add(digest)
            self.times.append(time.monotonic())
        return defer.succeed(None)

    def answer(self) -> dict:
        """What a request on the control channel gets (with the CPU time)."""
        return {"times": self.times}


def serve_sink(sink: Optional[CountingSink] = None) -> None:
    """The next hop's own process (``--serve-sink``): an MMTP responder
    with a fresh identity that counts arrivals (in ``sink``, by default a
    :class:`CountingSink`).  It prints its port and KeyID, then its count
    as it grows; a line on stdin asks for the sink's :meth:`answer` (the
    arrival times) and its CPU time, and end of stdin stops it."""
    from twisted.internet import reactor, stdio
    from twisted.protocols.basic import LineReceiver

    sink = CountingSink() if sink is None else sink
    identity = PrivateKey.generate(2048)
    port = reactor.listenTCP(0, responder_factory(sink, ResponderTLS(identity, "sink",
                                                                     clock=reactor), reactor),
                             interface="127.0.0.1")

    class Control(LineReceiver):
        delimiter = b"\n"

        def connectionMade(self) -> None:  # noqa: N802
            self.reported = -1
            self.sendLine(json.dumps({"port": port.getHost().port,
                                      "keyid": identity.public.keyid.hex()}).encode())
            self.ticker = task.LoopingCall(self.report)
            self.ticker.start(0.02)

        def report(self) -> None:
            if len(sink.times) != self.reported:
                self.reported = len(sink.times)
                self.sendLine(json.dumps({"count": self.reported}).encode())

        def lineReceived(self, line: bytes) -> None:  # noqa: N802
            self.sendLine(json.dumps({**sink.answer(), "cpu": time.process_time()}).encode())

        def connectionLost(self, reason=None) -> None:  # noqa: N802
            if self.ticker.running:
                self.ticker.stop()
            reactor.stop()

    stdio.StandardIO(Control())
    reactor.run()


class SinkProcess(protocol.ProcessProtocol):
    """The parent's handle on :func:`serve_sink` running as a child process.

    The next hop is a machine of its own in a real network; in this
    process, its reactor would share one thread with the sender's, and
    every burst the node relays would hold up the sender's packets."""

    #: the script run with ``--serve-sink`` (another benchmark's own sink)
    script = os.path.abspath(__file__)

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.count = 0
        self._buffer = b""
        self._started: defer.Deferred = defer.Deferred()
        self._answer: Optional[defer.Deferred] = None
        self.exited: defer.Deferred = defer.Deferred()

    async def start(self) -> tuple[int, bytes]:
        """Spawn it; its (port, identity KeyID)."""
        self.reactor.spawnProcess(self, sys.executable,
                                  [sys.executable, self.script, "--serve-sink"],
                                  env=os.environ.copy())
        hello = await self._started
        return hello["port"], bytes.fromhex(hello["keyid"])

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            message = json.loads(line)
            if "port" in message:
                self._started.callback(message)
            elif "count" in message:
                self.count = message["count"]
            elif "times" in message and self._answer is not None:
                answer, self._answer = self._answer, None
                answer.callback(message)

    async def ask(self) -> dict:
        """The sink's answer (:meth:`CountingSink.answer`) and ``cpu``."""
        self._answer = defer.Deferred()
        self.transport.write(b"times\n")
        return await self._answer

    async def times_and_cpu(self) -> tuple[list[float], float]:
        """Arrival times so far and the process's CPU seconds."""
        message = await self.ask()
        return message["times"], message["cpu"]

    def processEnded(self, reason) -> None:  # noqa: N802
        if not self._started.called:
            self._started.errback(reason)
        self.exited.callback(None)

    async def stop(self) -> None:
        self.transport.closeStdin()
        await self.exited


def steady_rate(times: list[float]) -> float:
    """Arrivals per second between the 10th and the 90th percentile
    arrival: the node's rate once its pipeline is full, without the
    first mix interval (nothing leaves before it) or the last one."""
    n = len(times)
    lo, hi = n // 10, n - n // 10 - 1
    return (hi - lo) / (times[hi] - times[lo])


class Node(MixNode):
    """A ``twistd -n mixminion`` child process on a fresh BaseDir (by
    default at the default LogLevel, WARN), whose keys this process reads."""

    def __init__(self, workdir: str, name: str, interval: str, profile: Optional[str] = None,
                 server: str = "", log_level: str = "WARN", incoming: str = "") -> None:
        super().__init__(workdir, name, twistd_options=[
            f"--profile={profile}", "--profiler=cprofile", "--savestats"] if profile else [])
        self.write(self.config(metrics=True, server=server, mix_interval=interval,
                               log_level=log_level, contact="bench@localhost.localdomain",
                               incoming=incoming))

    async def started(self, reactor) -> None:
        """Start it, wait until it listens, then read its keys."""
        await self.start(listening=True)
        keys = os.path.join(self.base, "keys")
        keyset = sorted(d for d in os.listdir(keys) if d.startswith("key_"))[0]
        self.identity_key = read_pem_key(os.path.join(keys, "identity.key")).public
        self.private_packet_key = read_pem_key(os.path.join(keys, keyset, "mix.key"))
        self.dest = NextHop("127.0.0.1", self.port, self.identity_key.keyid)
        self.relay_hop = Hop(self.private_packet_key.public,
                             IPv4Info("127.0.0.1", self.port, self.identity_key.keyid))

    async def queues(self, reactor) -> dict[str, int]:
        """Queue lengths from the node's metrics page."""
        body = await threads.deferToThread(metrics_text, self.metrics_port, 30)
        return {m.group(1): int(float(m.group(2)))
                for m in re.finditer(r"^mixminion_queue_(\w+)_packets (\S+)$", body, re.M)}

    async def stop(self, reactor) -> None:
        await self.daemon.stop(reactor, 60, strict=False)


def slowest_share(ack_times: list[list[float]]) -> float:
    """How the slowest client fared while all of them sent: its
    acknowledged packets, by the time half of all packets were
    acknowledged, over an even share of those (1.0: every client got as
    much; near 0: one was starved)."""
    every = sorted(t for times in ack_times for t in times)
    half = every[len(every) // 2]
    fair = (len(every) // 2 + 1) / len(ack_times)
    return min(sum(1 for t in times if t <= half) for times in ack_times) / fair


async def relay_run(reactor, workdir: str, sink_hop: Hop, sink: SinkProcess, packets: int,
                    n_clients: int, profile: Optional[str], workers: int = 1) -> dict:
    # Every client connects from 127.0.0.1: the limits per address and
    # per network would refuse the 9th; they must allow each client's two
    # connections, as the node's peers would have from addresses of their own.
    limit = max(128, 2 * n_clients + 8)
    node = Node(workdir, "relay", f"{MIX_INTERVAL} seconds", profile,
                server=f"ProcessingWorkers: {workers}",
                incoming=f"MaxConnections: {limit}\nMaxConnectionsPerAddress: {limit}\n"
                         f"MaxConnectionsPerNetwork: {limit}\n")
    try:
        await node.started(reactor)
        dummy = Hop(PrivateKey.generate(2048).public, IPv4Info("127.0.0.1", 1, bytes(20)))
        batch = [build_forward_packet(os.urandom(PAYLOAD_LEN), [node.relay_hop, sink_hop], [dummy],
                                      DROP_TYPE, b"", os.urandom).packet
                 for _ in range(packets)]
        codec = 0.0
        for _ in range(2):
            processor = PacketProcessor([(node.private_packet_key, MemoryReplayLog())])
            start = time.perf_counter()
            for packet in batch:
                result = processor.process(packet)
            codec = max(codec, packets / (time.perf_counter() - start))
            assert isinstance(result, Relay), result
        # Several clients stand for several peers (each has its own MMTP
        # window of unacknowledged packets); the default is one.
        clients = [MMTPClient(reactor) for _ in range(n_clients)]
        print(f"relay: sending {packets} packets to node pid {node.daemon.pid}", file=sys.stderr,
              flush=True)
        _, sink_cpu_start = await sink.times_and_cpu()
        start = time.monotonic()
        cpu_start, own_start = family_cpu_seconds(node.daemon.pid), time.process_time()
        ack_times: list[list[float]] = [[] for _ in clients]

        def send(i: int, packet: bytes) -> defer.Deferred:
            d = clients[i % len(clients)].send_packet(node.dest, packet)
            return d.addCallback(lambda _: ack_times[i % len(clients)].append(time.monotonic()))

        sends = [send(i, p) for i, p in enumerate(batch)]
        del batch
        await defer.gatherResults(sends)
        acked = time.monotonic() - start
        backlog = await node.queues(reactor)  # where packets wait once all are in
        rss_ingested = family_rss_mb(node.daemon.pid)
        deadline = time.monotonic() + 120
        while sink.count < packets and time.monotonic() < deadline:
            await task.deferLater(reactor, 0.01, lambda: None)
        if sink.count < packets:
            raise RuntimeError(f"only {sink.count} of {packets} packets relayed; "
                               f"see {node.daemon.log}")
        times, sink_cpu = await sink.times_and_cpu()
        elapsed = times[-1] - start
        node_cpu = family_cpu_seconds(node.daemon.pid) - cpu_start
        own_cpu = time.process_time() - own_start + sink_cpu - sink_cpu_start
        for client in clients:
            await client.close()
        relay = steady_rate(times)
        return {"relay_per_s": round(relay, 1),
                "codec_relay_per_s": round(codec, 1),
                "pipeline_ratio": round(relay / codec, 3),
                "end_to_end_per_s": round(packets / elapsed, 1),
                "relay_elapsed_s": round(elapsed, 2),
                "ingest_per_s": round(packets / acked, 1),
                "queues_when_ingested": backlog,
                "node_cpu_ms_per_packet": round(node_cpu / packets * 1000, 3),
                "node_cpu_share": round(node_cpu / elapsed, 2),
                "bench_cpu_share": round(own_cpu / elapsed, 2),
                "rss_mb_when_ingested": round(rss_ingested, 1),
                "slowest_client_share": round(slowest_share(ack_times), 3)}
    finally:
        await node.stop(reactor)


async def pool_run(reactor, workdir: str, sink_hop: Hop, total: int) -> dict:
    """Fill a node's pool with ``total`` packets; its memory once they are in."""
    node = Node(workdir, "pool", "1 day")
    try:
        await node.started(reactor)
        # Idle means with its processing child started and settled.
        while not child_pids(node.daemon.pid):
            await task.deferLater(reactor, 0.1, lambda: None)
        await task.deferLater(reactor, 3, lambda: None)
        idle_rss, idle_pss = family_rss_mb(node.daemon.pid), family_rss_mb(node.daemon.pid, "Pss")
        routing = [HopRouting(node.private_packet_key.public, FWD_IPV4_TYPE,
                              sink_hop.address.pack())]
        rest = os.urandom(32768 - 2048)  # header 2 and payload: the node never checks them

        def make() -> bytes:
            return build_header(routing, [os.urandom(16)], os.urandom) + rest

        client = MMTPClient(reactor)
        done = defer.Deferred()
        state = {"next": 0, "out": 0, "acked": 0, "retries": 0}

        def pump() -> None:
            while state["next"] < total and state["out"] < WINDOW:
                state["next"] += 1
                send(make())

        def send(packet: bytes) -> None:
            state["out"] += 1
            d = client.send_packet(node.dest, packet)
            d.addCallbacks(received, failed, errbackArgs=(packet,))

        def received(_):
            state["out"] -= 1
            state["acked"] += 1
            if state["acked"] == total:
                done.callback(None)
            pump()

        def failed(_, packet: bytes):
            # REJECTED (the node's incoming queue is full): offer it again.
            state["out"] -= 1
            state["retries"] += 1
            reactor.callLater(0.5, send, packet)

        start = time.perf_counter()
        pump()
        await done
        pushed = time.perf_counter() - start
        deadline = time.monotonic() + 600
        while True:
            sizes = await node.queues(reactor)
            if sizes.get("pool", 0) >= total and not sizes.get("incoming", 0):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"pool did not fill: {sizes}; see {node.daemon.log}")
            await task.deferLater(reactor, 0.5, lambda: None)
        pooled = time.perf_counter() - start
        await task.deferLater(reactor, 2, lambda: None)  # let the last batch settle
        rss, peak = family_rss_mb(node.daemon.pid), family_rss_mb(node.daemon.pid, "VmHWM")
        pss = family_rss_mb(node.daemon.pid, "Pss")
        await client.close()
        size = "50k" if total == 50000 else str(total)
        return {f"rss_mb_{size}": round(rss, 1), f"pss_mb_{size}": round(pss, 1),
                "rss_peak_mb": round(peak, 1), "rss_idle_mb": round(idle_rss, 1),
                "pss_idle_mb": round(idle_pss, 1),
                "pool_fill_s": round(pooled, 1), "pool_push_per_s": round(total / pushed, 1),
                "pool_rejected_sends": state["retries"]}
    finally:
        await node.stop(reactor)


async def run(reactor, args) -> None:
    sink = SinkProcess(reactor)
    sink_port, sink_keyid = await sink.start()
    # The sink never decrypts: its packet key only shapes the headers.
    packet_key = PrivateKey.generate(2048)
    sink_hop = Hop(packet_key.public, IPv4Info("127.0.0.1", sink_port, sink_keyid))
    result: dict = {"packets": args.packets, "clients": args.clients,
                    "processing_workers": args.workers, "mix_interval_s": MIX_INTERVAL}
    try:
        with tempfile.TemporaryDirectory() as work:
            result.update(await relay_run(reactor, work, sink_hop, sink, args.packets,
                                          args.clients, args.profile, args.workers))
            if args.pool:
                result.update(await pool_run(reactor, work, sink_hop, args.pool))
    finally:
        await sink.stop()
    result["python"] = sys.version.split()[0]
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 16,000 packets give eight mix rounds inside the measured window; with
    # 8,000 the figure moved by +-0.04 from run to run.
    parser.add_argument("--packets", type=int, default=16000,
                        help="packets for the relay run (default 16000)")
    parser.add_argument("--clients", type=int, default=1,
                        help="MMTP clients sending at once, as several peers would (default 1)")
    parser.add_argument("--workers", type=int, default=1,
                        help="the node's ProcessingWorkers (default 1)")
    parser.add_argument("--pool", type=int, default=50000,
                        help="packets for the memory run (default 50000; 0 skips it)")
    parser.add_argument("--profile", metavar="FILE",
                        help="run the relay node under cProfile, stats saved to FILE")
    parser.add_argument("--serve-sink", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_sink:
        serve_sink()
        return
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
