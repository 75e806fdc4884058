"""Codec speed, printed as one JSON object.

Rates are packets per second on one core.  Because these machines are
noisy, every rate is reported next to ``floor_per_s``: the bare crypto a
relay hop cannot avoid (one RSA-2048 OAEP decryption, LIONESS over the
payload and over header 2), measured in the same run with raw
``cryptography``/``hashlib`` calls, not through our code.

Usage: python3 benchmarks/codec.py [--packets N] [--rounds R]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from typing import Callable, Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from mixminion.codec.build import build_forward_packet, build_message_packets, encode_message_payloads
from mixminion.codec.header import Hop
from mixminion.codec.process import Exit, PacketProcessor, Relay
from mixminion.codec.replay import MemoryReplayLog
from mixminion.codec.routing import SMTP_TYPE, HostInfo
from mixminion.codec.rsa import OAEP_LABEL, PrivateKey

_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=OAEP_LABEL)
_ZERO_IV = bytes(16)


def _raw_lioness_decrypt(block: bytes, keys: Sequence[bytes]) -> bytes:
    """LIONESS decryption written directly against cryptography/hashlib."""
    k1, k2, k3, k4 = keys

    def stream(key: bytes, left: bytes, right: bytes) -> bytes:
        aes_key = hashlib.sha1(key + left + key).digest()[:16]
        return Cipher(algorithms.AES(aes_key), modes.CTR(_ZERO_IV)).encryptor().update(right)

    def mix(key: bytes, left: bytes, right: bytes) -> bytes:
        h = hashlib.sha1(key)
        h.update(right)
        h.update(key)
        return (int.from_bytes(left, "big") ^ int.from_bytes(h.digest(), "big")).to_bytes(20, "big")

    left, right = block[:20], block[20:]
    left = mix(k4, left, right)
    right = stream(k3, left, right)
    left = mix(k2, left, right)
    right = stream(k1, left, right)
    return left + right


def _floor_hop(key, packet: bytes, keys: Sequence[bytes]) -> None:
    key.decrypt(packet[:256], _OAEP)
    _raw_lioness_decrypt(packet[4096:], keys)
    _raw_lioness_decrypt(packet[2048:4096], keys)


def _rate(fn: Callable[[bytes], object], packets: Sequence[bytes], rounds: int) -> float:
    """Best-of-``rounds`` packets per second for ``fn`` over ``packets``."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for p in packets:
            fn(p)
        best = min(best, time.perf_counter() - start)
    return len(packets) / best


def _processor_rate(key: PrivateKey, packets: Sequence[bytes], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        proc = PacketProcessor([(key, MemoryReplayLog())])  # fresh log: no replays
        start = time.perf_counter()
        for p in packets:
            proc.process(p)
        best = min(best, time.perf_counter() - start)
    return len(packets) / best


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    keys = [PrivateKey.generate(2048) for _ in range(4)]
    hops = [Hop(k.public, HostInfo(f"mix{i}.example.net", 48000 + i, os.urandom(20)))
            for i, k in enumerate(keys)]
    path1, path2 = hops[:2], hops[2:]
    [payload] = encode_message_payloads(b"benchmark message\n" * 20, os.urandom)

    # Hop by hop: 0 relays, 1 swaps, 2 relays, 3 exits.
    stages: list[list[bytes]] = [[
        build_forward_packet(payload, path1, path2, SMTP_TYPE, b"bench@example.com",
                             os.urandom).packet
        for _ in range(args.packets)
    ]]
    for hop in range(3):
        proc = PacketProcessor([(keys[hop], MemoryReplayLog())])
        outs = []
        for p in stages[-1]:
            result = proc.process(p)
            assert isinstance(result, Relay), result
            outs.append(result.packet)
        stages.append(outs)
    check = PacketProcessor([(keys[3], MemoryReplayLog())]).process(stages[3][0])
    assert isinstance(check, Exit), check

    floor_keys = [os.urandom(20) for _ in range(4)]
    raw_key = keys[0].key
    floor = _rate(lambda p: _floor_hop(raw_key, p, floor_keys), stages[0], args.rounds)
    relay = _processor_rate(keys[0], stages[0], args.rounds)
    swap = _processor_rate(keys[1], stages[1], args.rounds)
    exit_rate = _processor_rate(keys[3], stages[3], args.rounds)

    build_times = []
    for _ in range(max(50, args.packets // 3)):
        start = time.perf_counter()
        build_forward_packet(payload, path1, path2, SMTP_TYPE, b"bench@example.com", os.urandom)
        build_times.append(time.perf_counter() - start)

    big = os.urandom(1 << 20)
    frag_times = []
    for _ in range(3):
        start = time.perf_counter()
        built = build_message_packets(big, SMTP_TYPE, b"bench@example.com",
                                      lambda i: (path1, path2), os.urandom)
        frag_times.append(time.perf_counter() - start)

    print(json.dumps({
        "relay_per_s": round(relay, 1),
        "swap_per_s": round(swap, 1),
        "exit_per_s": round(exit_rate, 1),
        "floor_per_s": round(floor, 1),
        "relay_ratio": round(relay / floor, 3),
        "swap_ratio": round(swap / floor, 3),
        "build_4hop_ms": round(statistics.median(build_times) * 1000, 3),
        "fragment_1mib_ms": round(statistics.median(frag_times) * 1000, 1),
        "fragment_1mib_packets": len(built),
        "packets": args.packets,
        "rounds": args.rounds,
        "python": sys.version.split()[0],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
