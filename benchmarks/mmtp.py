"""MMTP throughput over loopback TLS, printed as one JSON object.

A responder with a durable sink (SQLite WAL, fsync per commit) runs in a
child process; this process sends it packets with :class:`MMTPClient`.  In
the same run, plain Twisted TLS moves the same number of bytes between the
same two processes with no MMTP and no disk, which gives
``raw_tls_mb_per_s`` and the ratio that cancels out machine noise.

Usage: python3 benchmarks/mmtp.py [--packets N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS

from mixminion.mmtp.frames import FRAME_LEN
from mixminion.mmtp.initiator import NextHop, MMTPClient
from mixminion.mmtp.tls import InitiatorTLS

HERE = os.path.dirname(os.path.abspath(__file__))


def start_server(mode: str, workdir: str, expect_bytes: int = 0):
    """Start ``_mmtp_server.py``; return (process, port, keyid)."""
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "_mmtp_server.py"), mode, workdir, str(expect_bytes)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    if len(line) != 2:
        proc.kill()
        raise RuntimeError(f"benchmark server did not start: {line!r}")
    return proc, int(line[0]), bytes.fromhex(line[1])


class _RawSender(protocol.Protocol):
    """Writes ``total`` bytes and waits for the server's one-byte answer."""

    def __init__(self, total: int, done: defer.Deferred) -> None:
        self.total, self.done = total, done

    def connectionMade(self) -> None:  # noqa: N802
        chunk = os.urandom(FRAME_LEN)
        for _ in range(self.total // FRAME_LEN):
            self.transport.write(chunk)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if not self.done.called:
            self.done.callback(time.perf_counter())
        self.transport.loseConnection()


async def raw_tls(reactor, port: int, total: int) -> float:
    done: defer.Deferred = defer.Deferred()
    factory = protocol.Factory.forProtocol(lambda: _RawSender(total, done))
    endpoint = wrapClientTLS(InitiatorTLS(), TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    start = time.perf_counter()
    await endpoint.connect(factory)
    end = await done
    return total / (end - start) / 1e6


async def mmtp(reactor, port: int, keyid: bytes, packets: int) -> float:
    client = MMTPClient(reactor)
    dest = NextHop("127.0.0.1", port, keyid)
    payloads = [os.urandom(32768) for _ in range(packets)]
    start = time.perf_counter()
    await defer.gatherResults([client.send_packet(dest, p) for p in payloads])
    return time.perf_counter() - start


async def run(reactor, args) -> None:
    total = args.packets * FRAME_LEN
    with tempfile.TemporaryDirectory() as work:
        proc, port, keyid = start_server("mmtp", work)
        try:
            elapsed = await mmtp(reactor, port, keyid, args.packets)
        finally:
            proc.stdin.close()
            stored = int(proc.stdout.readline() or -1)
            proc.wait()
        raw_proc, raw_port, _ = start_server("raw", work, total)
        try:
            raw = await raw_tls(reactor, raw_port, total)
        finally:
            raw_proc.stdin.close()
            raw_proc.wait()
    mb_per_s = total / elapsed / 1e6
    print(json.dumps({
        "packets": args.packets,
        "stored": stored,
        "packets_per_s": round(args.packets / elapsed, 1),
        "mb_per_s": round(mb_per_s, 2),
        "raw_tls_mb_per_s": round(raw, 2),
        "ratio": round(mb_per_s / raw, 3),
    }))
    if stored != args.packets:
        raise SystemExit(f"only {stored} of {args.packets} packets were stored")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=5000)
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
