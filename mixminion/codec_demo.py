"""``mixminion-codec-demo``: the codec end to end, without a network.

Generates packet keys for a few servers, builds a forward message and a
SURB reply, and runs each packet through the servers hop by hop with the
same code a real node uses, printing every hop's decision.  It is the
quickest way to see the Type III packet format work on a fresh machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Sequence

from mixminion.codec.build import build_message_packets, build_reply_packet, encode_message_payloads
from mixminion.codec.decode import decode_payload
from mixminion.codec.exit import classify_payload
from mixminion.codec.exit_headers import parse_message
from mixminion.codec.header import Hop
from mixminion.codec.process import Drop, Exit, PacketProcessor, Reject, Relay
from mixminion.codec.replay import MemoryReplayLog
from mixminion.codec.routing import MBOX_TYPE, SMTP_TYPE, HostInfo, type_name
from mixminion.codec.rsa import PrivateKey
from mixminion.codec.surb import build_reply_block


@dataclass
class DemoServer:
    nickname: str
    hop: Hop
    processor: PacketProcessor


def make_servers(count: int) -> list[DemoServer]:
    servers = []
    for i in range(count):
        identity = os.urandom(20)  # stands in for an identity key digest
        packet_key = PrivateKey.generate(2048)
        host = HostInfo(f"mix{i}.example.net", 48099 + i, identity)
        servers.append(DemoServer(f"mix{i}", Hop(packet_key.public, host),
                                  PacketProcessor([(packet_key, MemoryReplayLog())])))
    return servers


def _follow(packet: bytes, server: DemoServer, by_address: dict, out) -> Exit | None:
    """Feed ``packet`` to ``server`` and on to each next hop; print each
    hop's decision and return the exit result, if any."""
    hop = 1
    while True:
        result = server.processor.process(packet)
        if isinstance(result, Relay):
            nxt = by_address[result.relay_info]
            print(f"  hop {hop}: {server.nickname} relays by {type_name(result.routing_type)}"
                  f" to {nxt.nickname}", file=out)
            packet, server = result.packet, nxt
        elif isinstance(result, Exit):
            print(f"  hop {hop}: {server.nickname} exits by {type_name(result.exit_type)}"
                  f" to {result.address.decode('ascii', 'replace')!r}", file=out)
            return result
        elif isinstance(result, Drop):
            print(f"  hop {hop}: {server.nickname} drops a dummy packet", file=out)
            return None
        else:
            assert isinstance(result, Reject)
            print(f"  hop {hop}: {server.nickname} rejects: {result.reason.value}", file=out)
            return None
        hop += 1


def main(argv: Sequence[str] | None = None, out=sys.stdout) -> int:
    parser = argparse.ArgumentParser(
        prog="mixminion-codec-demo",
        description="Build Type III packets for freshly generated keys and process them "
                    "hop by hop.")
    parser.add_argument("--servers", type=int, default=4, help="servers to generate (>= 2)")
    parser.add_argument("--message", default="Hello from the Type III codec.\n",
                        help="message text to send")
    args = parser.parse_args(argv)
    if args.servers < 2:
        parser.error("--servers must be at least 2")

    print(f"Generating packet keys for {args.servers} servers...", file=out)
    servers = make_servers(args.servers)
    by_address = {s.hop.address: s for s in servers}
    hops = [s.hop for s in servers]
    half = len(hops) // 2
    path1, path2 = hops[:half], hops[half:]

    print("Forward message, SMTP exit:", file=out)
    built = build_message_packets(args.message.encode(), SMTP_TYPE, b"alice@example.com",
                                  lambda i: (path1, path2), os.urandom,
                                  headers={"SUBJECT": "codec demo"})
    for pkt in built:
        result = _follow(pkt.packet, by_address[pkt.first_hop.address], by_address, out)
        if result is not None:
            delivered = classify_payload(result.payload)
            print(f"  delivered: {type(delivered).__name__}: "
                  f"{getattr(delivered, 'headers', {})} {getattr(delivered, 'body', b'')!r}",
                  file=out)

    print("Reply through a single-use reply block (SURB), MBOX exit:", file=out)
    user_key = os.urandom(20)
    surb, _seed = build_reply_block(list(reversed(path2)), MBOX_TYPE, b"nym",
                                    user_key, int(time.time()) + 86400, os.urandom)
    [payload] = encode_message_payloads(b"A reply nobody can trace.\n", os.urandom)
    reply = build_reply_packet(payload, path1, surb, os.urandom)
    result = _follow(reply.packet, by_address[reply.first_hop.address], by_address, out)
    if result is not None:
        decoded = decode_payload(result.payload, result.tag, {"me": user_key})
        if decoded is None:
            print("  the SURB's owner cannot decode the reply", file=out)
        else:
            _headers, body = parse_message(decoded.message())
            print(f"  the SURB's owner decodes a {decoded.kind}: {body!r}", file=out)

    print("Replaying the reply packet at its first hop:", file=out)
    _follow(reply.packet, by_address[reply.first_hop.address], by_address, out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
