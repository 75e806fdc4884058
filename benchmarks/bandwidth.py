"""A node's MMTP throughput under ``[Server] MaxBandwidth``, printed as one
JSON object.

The node is a real child process (``twistd -n mixminion``, the twistd
beside this Python) with ``MaxBandwidth: 1 MB`` (1,048,576 bytes a second)
and the default spike (5 x).  This process keeps it busy with JUNK frames
over ``--clients`` MMTP connections: JUNK crosses MMTP exactly like a
packet (32,794-byte frame, 30-byte acknowledgement) but the node drops it
at once, so neither its disk nor its processing can be the limit, and it
relays nothing, so the bytes on our connections are all the MMTP bytes its
bucket counts.

Our client counts its own bytes on the TCP sockets (TLS records, handshakes
and acks, both directions) with an unlimited
:class:`~mixminion.mmtp.bandwidth.BandwidthLimiter`, which is the quantity
the node limits.

* ``measured_bytes_per_s``: those wire bytes per second after
  ``--warmup`` seconds (by then the initial 5 MB burst is long gone),
  until the end of the run; ``ratio`` is it over ``limit_bytes_per_s``.
* ``packet_bytes_per_s``: acknowledged frames x 32,768 per second over the
  same window (the payload alone, about 0.4 % under the wire figure);
  ``packet_ratio`` is it over the limit.
* ``first_second_bytes``: wire bytes in the first second: the burst the
  bucket allows (up to the spike plus a second's refill).
* ``limiter_active``: whether the node logged the limit it applied.

Usage: python3 benchmarks/bandwidth.py [--seconds N] [--warmup N] [--clients N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from twisted.internet import defer, task

from mixminion.mmtp.bandwidth import BandwidthLimiter
from mixminion.mmtp.initiator import PACKET_LEN, InitiatorSettings, MMTPClient
from mixminion.server.config import parse_size

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from node import Node  # noqa: E402  (benchmarks/node.py)

LIMIT = "1 MB"
#: frames queued per client beyond what its connection has in flight
QUEUED = 32
SAMPLE = 0.25  # seconds between samples of the byte count


class LimitedNode(Node):
    """benchmarks/node.py's node with ``MaxBandwidth`` set."""

    def __init__(self, workdir: str, bandwidth: str) -> None:  # noqa: D107
        # LogLevel INFO: the node says which limit it applied.
        super().__init__(workdir, "limited", "1 second", server=f"MaxBandwidth: {bandwidth}",
                         log_level="INFO")

    def logged(self, text: str) -> bool:
        return text in self.daemon.text()


def rate_between(samples: list[tuple[float, int]], since: float) -> tuple[float, float, int]:
    """(seconds, bytes) between the first sample at or after ``since`` and
    the last one, and that first sample's index."""
    first = next(i for i, (t, _) in enumerate(samples) if t >= since)
    (t0, b0), (t1, b1) = samples[first], samples[-1]
    return t1 - t0, b1 - b0, first


async def run(reactor, args) -> dict:
    limit = parse_size(LIMIT)
    with tempfile.TemporaryDirectory() as work:
        node = LimitedNode(work, LIMIT)
        try:
            await node.started(reactor)
            counter = BandwidthLimiter(reactor, None)  # counts, never limits
            settings = InitiatorSettings(max_packets_per_connection=1 << 30)
            clients = [MMTPClient(reactor, settings=settings, wrap_endpoint=counter.wrap_endpoint)
                       for _ in range(args.clients)]
            acked = [0]
            failures: list[str] = []
            running = [True]

            def send(client: MMTPClient) -> None:
                d = client.send_junk(node.dest)
                d.addCallbacks(done, failed, callbackArgs=(client,))

            def done(_, client: MMTPClient) -> None:
                acked[0] += 1
                if running[0]:
                    send(client)

            def failed(failure) -> None:
                if running[0]:
                    failures.append(failure.getErrorMessage())

            print(f"bandwidth: {args.seconds} s of JUNK to node pid {node.daemon.pid} "
                  f"(MaxBandwidth: {LIMIT})", file=sys.stderr, flush=True)
            start = time.monotonic()
            samples: list[tuple[float, int]] = [(0.0, 0)]
            acks: list[int] = [0]

            def sample() -> None:
                samples.append((time.monotonic() - start, counter.bytes_total))
                acks.append(acked[0])

            for client in clients:
                for _ in range(QUEUED):
                    send(client)
            ticker = task.LoopingCall(sample)
            ticker.start(SAMPLE, now=False)
            await task.deferLater(reactor, args.seconds, lambda: None)
            ticker.stop()
            sample()
            running[0] = False
            for client in clients:
                await client.close()
            if failures:
                raise RuntimeError(f"{len(failures)} frames failed, e.g. {failures[0]}; "
                                   f"see {node.daemon.log}")
            seconds, wire, first = rate_between(samples, args.warmup)
            frames = acks[-1] - acks[first]
            one = next(b for t, b in samples if t >= 1.0)
            measured = wire / seconds
            payload = frames * PACKET_LEN / seconds
            return {"limit_bytes_per_s": limit,
                    "measured_bytes_per_s": round(measured),
                    "ratio": round(measured / limit, 4),
                    "packet_bytes_per_s": round(payload),
                    "packet_ratio": round(payload / limit, 4),
                    "first_second_bytes": one,
                    "spike_bytes": 5 * limit,
                    "window_s": round(seconds, 2),
                    "frames_acked": acks[-1],
                    "clients": args.clients,
                    "limiter_active": node.logged("MMTP bandwidth limited to"),
                    "python": sys.version.split()[0]}
        finally:
            await node.stop(reactor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=25.0,
                        help="length of the run (default 25)")
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="seconds left out of the measurement (default 5)")
    parser.add_argument("--clients", type=int, default=2,
                        help="MMTP connections sending at once (default 2)")
    args = parser.parse_args()

    async def main_async(reactor) -> None:
        print(json.dumps(await run(reactor, args)))

    task.react(lambda reactor: defer.ensureDeferred(main_async(reactor)))


if __name__ == "__main__":
    main()
